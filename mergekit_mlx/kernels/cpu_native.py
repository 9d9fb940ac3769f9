"""The CPU's hot loops as native code: kernels/*.cpp built by the system's C++ compiler.

The fused merge's per-element body is the one the GPUs run (kernels/task_merge_element.inc),
behind a CPU prelude; the selection's counting pass and the L1 sums' first level are CPU-only
loops. Each variant (dtype, model count, switches) is compiled once per machine, cached on disk
like the CUDA binaries, and called through ctypes, which lets go of the GIL: the merge threads
then use every core, where numpy's many short calls keep them waiting on each other. MLX's CPU backend already builds its
compiled graphs with the same compiler at run time.

Everything here gives bit for bit what the numpy passes of `selection_cpu` and `task_merge_cpu` give (the tests hold it
to that, and each variant checks itself against them on first use). Without a compiler, when a
build or that check fails, or with MERGEKIT_MLX_NO_NATIVE=1, the numpy passes run instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

from ..errors import warn_once
from .checks import FirstUse
from .sources import cache_root, expand, model_macros

_ENV_OFF = "MERGEKIT_MLX_NO_NATIVE"
# IEEE float32 as written: no contraction into fused multiply-adds, no fast-math
_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-Wno-unknown-pragmas"]
_P = ctypes.c_void_p
_U64 = ctypes.c_uint64
_SIGNATURES = {
    "task_merge": ("mk_task_merge", [_P, _P, _P, _P, _P, _U64, _U64]),
    "l1_lanes": ("mk_l1_lanes", [_P, _P, _P, _P, _P, _U64, _U64, _U64]),
    "select_count": ("mk_select_count", [_P, _P, _P, _U64, _U64, _U64, _P, _U64, _P, _P]),
    "nonfinite": ("mk_nonfinite", [_P, _U64, _P]),
}
_lock = threading.Lock()


def enabled() -> bool:
    return not os.environ.get(_ENV_OFF)


def cache_dir() -> Path:
    return cache_root() / "cpu"


@cache
def compiler() -> tuple[str, str] | None:
    """(the C++ compiler, its version line): $CXX, else c++, g++ or clang++ on the PATH; None if none runs."""
    for name in [os.environ.get("CXX")] + ["c++", "g++", "clang++"]:
        path = shutil.which(name) if name else None
        if path is None:
            continue
        try:
            got = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if got.returncode == 0:
            return path, (got.stdout.splitlines() or [""])[0]
    return None


@cache
def _machine() -> str:
    """What -march/-mcpu=native depends on: the architecture and, on Linux, the CPU's feature flags."""
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return sig + ":" + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return sig + ":" + platform.processor()


def _arch_flags() -> list[str]:
    return ["-mcpu=native"] if platform.machine().lower() in ("arm64", "aarch64") else ["-march=native"]


def _source(name: str, defines: Sequence[tuple[str, str]], km: int) -> str:
    lines = [f"#define {k} {v}" for k, v in defines]
    lines.append("#define MK_MODELS " + " ".join(f"const T* __restrict x{m} = xs[{m}];" for m in range(km)))
    return "\n".join(lines) + "\n" + model_macros(km, True) + expand(f"{name}.cpp") + "\n"


def _build(source: str, path: Path) -> str | None:
    """Compile `source` into the shared library `path` (written under a temporary name, then
    renamed into place); the compiler's message when it fails."""
    cxx, _ = compiler()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
        src, lib = Path(tmp) / "k.cpp", Path(tmp) / "k.so"
        src.write_text(source)
        for arch in (_arch_flags(), []):  # a compiler without the native target builds generic code
            got = subprocess.run([cxx, *_FLAGS, *arch, str(src), "-o", str(lib)], capture_output=True, text=True)
            if got.returncode == 0:
                os.replace(lib, path)
                return None
        return got.stderr.strip()[-2000:] or f"{cxx} failed"


def library(name: str, defines: tuple[tuple[str, str], ...], km: int):
    """The function of kernels/<name>.cpp built with these defines, or None (switched off, no
    compiler, a failed build: warned once). Built once per machine: the cache key covers the
    source, the compiler, the flags and the CPU."""
    return _library(name, defines, km) if enabled() else None


@cache
def _library(name: str, defines: tuple[tuple[str, str], ...], km: int):
    if compiler() is None:
        return None
    source = _source(name, defines, km)
    key = hashlib.sha256("\0".join([source, *compiler(), *_FLAGS, _machine(), "v1"]).encode()).hexdigest()[:40]
    path = cache_dir() / f"{name}-{key}.so"
    with _lock:
        if not path.is_file():
            try:
                err = _build(source, path)
            except OSError as e:
                err = str(e)
            if err is not None:
                warn_once(name, f"mergekit-mlx: building the native CPU '{name}' failed; using numpy ({err})")
                return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        warn_once(name, f"mergekit-mlx: loading the native CPU '{name}' failed; using numpy ({e})")
        return None
    symbol, args = _SIGNATURES[name]
    fn = getattr(lib, symbol)
    fn.argtypes, fn.restype = args, None
    fn.keep = lib  # the library lives as long as the function
    return fn


def ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def pointers(arrays: Sequence[np.ndarray]):
    """A C array of the arrays' data pointers (kept alive by the caller's reference to it)."""
    return (ctypes.c_void_p * len(arrays))(*[ptr(a) for a in arrays])


def type_name(dtype: np.dtype) -> str:
    """The C type of a host view: uint16_t for bfloat16's bits, float for float32."""
    return {np.dtype(np.uint16): "uint16_t", np.dtype(np.float32): "float"}[np.dtype(dtype)]


_verdicts: FirstUse[tuple] = FirstUse(lambda key: f"the native CPU '{key[0]}'", "numpy", warn_key=lambda key: key[0])


def checked(name: str, defines: tuple[tuple[str, str], ...], km: int, check):
    """The function of kernels/<name>.cpp for these defines, once `check(fn, defines, km)` has
    found it gives bit for bit what numpy gives on a small input in this process; None otherwise
    (numpy's passes run)."""
    fn = library(name, defines, km)
    if fn is None:
        return None
    with _verdicts.lock:
        ok = _verdicts.passed((name, defines), lambda: check(fn, dict(defines), km))
    return fn if ok else None


def forget_checks() -> None:
    """Tests: no variant checked yet, as in a new process."""
    _verdicts.forget()


def forget_builds() -> None:
    """Tests: as in a new process, the compiler looked for and every library loaded again."""
    _library.cache_clear()
    compiler.cache_clear()
