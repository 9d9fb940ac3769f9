"""CUDA kernels compiled once per machine and reused by every later process.

`mx.fast.cuda_kernel` compiles its source with NVRTC in every process and prefixes it with MLX's
device headers, which takes far longer than the same kernel behind just `cuda_bf16.h`, so a TIES
merge paid a long wait before its first tensor (benchmarks/RESULTS.md, section 8, has the figures).
Here the same sources are wrapped with a minimal prelude, compiled by NVRTC (through ctypes, the
library MLX's CUDA backend already depends on) to a cubin for the device, stored under
`$MERGEKIT_MLX_CACHE` (default `~/.cache/mergekit-mlx`) keyed by a hash of everything that goes
into it, and launched with `mx.fast.precompiled_cuda_kernel`. When NVRTC or the CUDA headers
cannot be found, or a compile fails, `gpu.kernel` uses `mx.fast.cuda_kernel` as before.

Instantiations known ahead (`CachedKernel.prepare`) compile side by side on a few threads (NVRTC
runs one compile per thread at a time and lets go of the GIL through ctypes); a launch that needs
one still compiling waits for it. The threads touch no MLX array.

The package also ships cubins built ahead (`kernels/prebuilt/cuda-<arch>.zip`, made by
`python -m mergekit_mlx.kernels.prebuild` from the sources a cache holds; NVRTC targets an
architecture without a device of it), so a machine's first merge finds most kernels compiled. A
shipped cubin is found by a hash of its source and architecture; a source that changed since misses
and compiles as above.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
import tempfile
import threading
import zipfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from pathlib import Path

import mlx.core as mx

from .sources import cache_root, kernel_root

CUDA_TYPES = {
    mx.float32: "float",
    mx.float16: "__half",
    mx.bfloat16: "__nv_bfloat16",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
    mx.int32: "int32_t",
    mx.uint16: "uint16_t",
    mx.uint8: "uint8_t",
    mx.bool_: "bool",
}

# what the bodies need from outside: the 16-bit float types and fixed-width integers
PRELUDE = """#include <cuda_fp16.h>
#include <cuda_bf16.h>
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
"""


class CompileError(RuntimeError):
    """NVRTC rejected a source (the message carries its log)."""


def cache_dir() -> Path:
    return cache_root() / "cuda"


def wrap_source(
    fname: str,
    header: str,
    body: str,
    inputs: Sequence[tuple[str, mx.Dtype]],
    outputs: Sequence[tuple[str, mx.Dtype]],
    template: Sequence[tuple[str, object]],
) -> str:
    """A complete translation unit: the kernel `fname` with MLX's custom-kernel signature (inputs
    as const pointers, then outputs; template arguments as constants), C linkage, no MLX headers."""
    params = [f"    const {CUDA_TYPES[dt]}* {name}" for name, dt in inputs]
    params += [f"    {CUDA_TYPES[dt]}* {name}" for name, dt in outputs]
    consts = []
    for name, value in template:
        if isinstance(value, bool):
            consts.append(f"  constexpr bool {name} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            consts.append(f"  constexpr int {name} = {value};")
        else:
            consts.append(f"  using {name} = {CUDA_TYPES[value]};")
    return (
        PRELUDE
        + header
        + f'\nextern "C" __global__ void {fname}(\n'
        + ",\n".join(params)
        + ") {\n"
        + "\n".join(consts)
        + "\n"
        + body
        + "\n}\n"
    )


# ----------------------------------------------------------------------------- NVRTC


def _loaded_library(stem: str) -> str | None:
    """Path of a shared library this process has already mapped (MLX's CUDA backend maps NVRTC)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if os.path.basename(path).startswith(stem):
                    return path
    except OSError:
        pass
    return None


def _site_nvidia_dirs() -> list[Path]:
    """site-packages/nvidia/<cuXX> folders of the CUDA wheels, next to MLX's own package."""
    out = []
    for p in [Path(mx.__file__).resolve().parent.parent] + [Path(s) for s in sys.path if s]:
        root = p.parent / "nvidia" if p.name == "mlx" else p / "nvidia"
        if root.is_dir():
            out += sorted(d for d in root.iterdir() if d.is_dir())
    return out


def _find_nvrtc() -> str | None:
    hit = _loaded_library("libnvrtc.so")
    if hit and "builtins" not in hit:
        return hit
    for d in _site_nvidia_dirs():
        for lib in sorted((d / "lib").glob("libnvrtc.so*")):
            return str(lib)
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            for lib in sorted(Path(home, "lib64").glob("libnvrtc.so*")):
                return str(lib)
    return None


def _find_include(nvrtc: str) -> str | None:
    """The folder holding cuda_bf16.h: beside NVRTC's own lib folder first (the same CUDA
    version), then where MLX's CUDA backend looks."""
    cands = [Path(nvrtc).resolve().parent.parent / "include"] + [d / "include" for d in _site_nvidia_dirs()]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append(Path(home) / "include")
    for c in cands:
        if (c / "cuda_bf16.h").is_file():
            return str(c)
    return None


class Nvrtc:
    """The few NVRTC entry points a compile needs."""

    def __init__(self, path: str, include: str):
        lib_dir = os.path.dirname(path)
        # NVRTC opens its builtins library by name; map it first so that lookup finds it
        for b in sorted(Path(lib_dir).glob("libnvrtc-builtins.so*")):
            if ".alt." not in b.name:
                ctypes.CDLL(str(b), mode=ctypes.RTLD_GLOBAL)
                break
        self.lib = ctypes.CDLL(path)
        self.include = include
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = f"{major.value}.{minor.value}"

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise CompileError(f"{what} failed with NVRTC error {rc}")

    def compile(self, source: str, arch: str, name: str = "kernel.cu") -> bytes:
        lib = self.lib
        prog = ctypes.c_void_p()
        self._check(
            lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None), "nvrtcCreateProgram"
        )
        try:
            args = [f"--gpu-architecture={arch}".encode(), f"--include-path={self.include}".encode(), b"-std=c++17"]
            arr = (ctypes.c_char_p * len(args))(*args)
            rc = lib.nvrtcCompileProgram(prog, len(args), arr)
            if rc != 0:
                size = ctypes.c_size_t()
                lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
                log = ctypes.create_string_buffer(size.value + 1)
                lib.nvrtcGetProgramLog(prog, log)
                raise CompileError(f"NVRTC could not compile {name}:\n{log.value.decode(errors='replace')[:4000]}")
            size = ctypes.c_size_t()
            self._check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            buf = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
            return buf.raw
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


def device_arch() -> str:
    """NVRTC's SASS target for device 0, with the 'a' features MLX also compiles for on sm_90+."""
    from . import cuda_memory

    drv = cuda_memory.driver()
    if drv is None:
        raise CompileError("the CUDA driver did not report a device")
    try:
        major, minor = drv.compute_capability()
    except OSError as e:
        raise CompileError(str(e)) from None
    return f"sm_{major}{minor}{'a' if major >= 9 else ''}"


_compiler_lock = threading.Lock()


def compiler() -> tuple[Nvrtc, str]:
    """(NVRTC, target architecture); raises CompileError when either cannot be found."""
    with _compiler_lock:  # found once, also when several compile threads ask first
        return _compiler()


@cache
def _compiler() -> tuple[Nvrtc, str]:
    return find_nvrtc(), device_arch()


def find_nvrtc() -> Nvrtc:
    """NVRTC and the CUDA headers, found without a device (a compile may target any architecture)."""
    path = _find_nvrtc()
    include = _find_include(path) if path is not None else None
    if path is None or include is None:
        raise CompileError("NVRTC or the CUDA headers were not found (set CUDA_HOME)")
    return Nvrtc(path, include)


def available() -> bool:
    """NVRTC, the CUDA headers and a device were found (else MLX's own JIT compiles the kernels)."""
    try:
        compiler()
    except (CompileError, OSError):
        return False
    return True


def cubin(source: str) -> bytes:
    """The compiled `source` for this device: from the disk cache, or NVRTC (then stored; each
    CachedKernel keeps its instantiations in memory). A cache that cannot be written only costs
    the next process a compile; two processes compiling one source both write it whole."""
    nv, arch = compiler()
    key = hashlib.sha256("\0".join([source, arch, nv.version, "v1"]).encode()).hexdigest()[:40]
    path = cache_dir() / f"{key}.cubin"
    try:
        data = path.read_bytes()
        if data.startswith(b"\x7fELF"):
            return data
    except OSError:
        pass
    data = prebuilt(source, arch)
    if data is not None:
        return data
    data = nv.compile(source, arch, name=f"{key}.cu")
    # the source beside its cubin: `prebuild` compiles a cache's sources for the shipped archives
    for suffix, content in ((".cu", source.encode()), (".cubin", data)):
        _write_whole(path.with_suffix(suffix), content)
    return data


def _write_whole(path: Path, data: bytes) -> None:
    """Write `path` through a temporary sibling renamed into place; a failure only costs a cache entry."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        pass


# ----------------------------------------------------------------------------- shipped cubins

PREBUILT_FORMAT = "prebuilt-v1"


def prebuilt_dir() -> Path:
    return kernel_root() / "prebuilt"


def prebuilt_member(source: str, arch: str) -> str:
    """The archive member of `source` compiled for `arch` (NVRTC's version is not part of it: a cubin
    runs wherever the driver loads it, and MLX's CUDA 13 wheel already needs a CUDA 13 driver)."""
    return hashlib.sha256("\0".join([source, arch, PREBUILT_FORMAT]).encode()).hexdigest()[:40] + ".cubin"


_archive_lock = threading.Lock()


@cache
def _archive(arch: str) -> zipfile.ZipFile | None:
    try:
        return zipfile.ZipFile(prebuilt_dir() / f"cuda-{arch}.zip")
    except (OSError, zipfile.BadZipFile):
        return None


def prebuilt(source: str, arch: str) -> bytes | None:
    """The shipped cubin of `source` for `arch`, or None."""
    with _archive_lock:  # one archive, read from several compile threads
        archive = _archive(arch)
        if archive is None:
            return None
        try:
            data = archive.read(prebuilt_member(source, arch))
        except (KeyError, OSError, zipfile.BadZipFile, RuntimeError):
            return None
    return data if data.startswith(b"\x7fELF") else None


COMPILE_THREADS = 8  # at most; fewer on a machine with fewer cores
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _compile_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            workers = max(1, min(COMPILE_THREADS, os.cpu_count() or 1))
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergekit-mlx-nvrtc")
        return _pool


class CachedKernel:
    """Called like the function `mx.fast.cuda_kernel` returns; compiles each instantiation (input
    and output dtypes, template arguments) once per machine."""

    def __init__(self, tag: str, input_names: Sequence[str], output_names: Sequence[str], header: str, body: str, fallback=None):
        self.tag, self.header, self.body = tag, header, body
        self.fallback = fallback  # called instead once a compile here has failed (MLX's own JIT)
        self.failed: str | None = None
        self.input_names, self.output_names = list(input_names), list(output_names)
        self._made: dict[tuple, Future] = {}  # instantiation -> (function name, cubin), made or being made
        self._lock = threading.Lock()

    def source(self, in_dtypes, out_dtypes, template) -> tuple[str, str]:
        """(function name, translation unit) of one instantiation."""
        key = (tuple(in_dtypes), tuple(out_dtypes), tuple(template))
        spec = repr((self.tag, [str(d) for d in key[0]], [str(d) for d in key[1]], [(n, str(v)) for n, v in key[2]]))
        fname = f"{self.tag}_{hashlib.sha256(spec.encode()).hexdigest()[:12]}"
        src = wrap_source(
            fname, self.header, self.body, list(zip(self.input_names, key[0])), list(zip(self.output_names, key[1])), key[2]
        )
        return fname, src

    def _build(self, key: tuple) -> tuple[str, bytes]:
        fname, src = self.source(*key)
        return fname, cubin(src)

    def _future(self, key: tuple, in_background: bool) -> Future:
        with self._lock:
            got = self._made.get(key)
            if got is not None:
                return got
            if in_background:
                got = self._made[key] = _compile_pool().submit(self._build, key)
                return got
            got = self._made[key] = Future()
        try:  # compiled here, in the caller's thread
            got.set_result(self._build(key))
        except BaseException as e:  # kept: every later call of this instantiation sees it
            got.set_exception(e)
        return got

    def prepare(self, in_dtypes, out_dtypes, template) -> None:
        """Start compiling this instantiation on a compile thread (a later launch waits for it)."""
        self._future((tuple(in_dtypes), tuple(out_dtypes), tuple(template)), in_background=True)

    def instance(self, in_dtypes, out_dtypes, template) -> tuple[str, bytes]:
        return self._future((tuple(in_dtypes), tuple(out_dtypes), tuple(template)), in_background=False).result()

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=(), init_value=None, **_ignored):
        if self.failed is None or self.fallback is None:
            try:
                fname, binary = self.instance([a.dtype for a in inputs], output_dtypes, template)
            except (CompileError, OSError) as e:
                if self.fallback is None:
                    raise
                self.failed = str(e)
        if self.failed is not None:
            return self.fallback(
                inputs=inputs,
                output_shapes=output_shapes,
                output_dtypes=output_dtypes,
                grid=grid,
                threadgroup=threadgroup,
                template=list(template),
                init_value=init_value,
            )
        return mx.fast.precompiled_cuda_kernel(
            name=fname,
            compiled_source=binary,
            inputs=inputs,
            output_shapes=output_shapes,
            output_dtypes=output_dtypes,
            scalars=[],
            grid=grid,
            threadgroup=threadgroup,
            init_value=init_value,
            ensure_row_contiguous=True,
        )


# ----------------------------------------------------------------------------- verdicts


@cache
def _verdict_key() -> str | None:
    """A hash of everything a first-use check's outcome depends on: the kernel sources, the Python
    that launches them and computes the CPU reference, MLX's version, the device and NVRTC."""
    try:
        nv, arch = compiler()
    except (CompileError, OSError):
        return None
    here = Path(__file__).resolve().parent
    h = hashlib.sha256("\0".join([mx.__version__, arch, nv.version, "v1"]).encode())
    for f in sorted(kernel_root().glob("*")) + sorted(here.glob("*.py")):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:40]


def verified(what: str) -> bool:
    """True when the `what` kernels passed their first-use check on this machine before, built
    from the same sources by the same MLX and NVRTC for the same device (so the check is skipped)."""
    key = _verdict_key()
    return key is not None and (cache_dir() / "verified" / f"{what}-{key}").is_file()


def mark_verified(what: str) -> None:
    key = _verdict_key()
    if key is None:
        return
    try:
        d = cache_dir() / "verified"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{what}-{key}").write_text("passed\n")
    except OSError:
        pass


class _DiskVerdicts:
    """verified / mark_verified as the `checks.Remembered` the GPU groups and direct reads use."""

    verified = staticmethod(verified)
    mark_verified = staticmethod(mark_verified)


VERDICTS = _DiskVerdicts()
