"""GPU launch: which backend runs, the kernel objects, first-use checks and the launch helpers.

On an Apple GPU a kernel is `mx.fast.metal_kernel`; on an NVIDIA GPU it is compiled once per
machine by `cuda_compile` (`mx.fast.cuda_kernel` where that cannot compile). Every kernel group
proves itself on first use against the CPU path (`Group`, through the one mechanism of `checks`)
and falls back to it on a mismatch or a failure.

The first run on a machine waits on no compiler it can avoid: a check's reference runs on the
CPU stream as plain MLX operations (MLX compiles an `mx.compile` graph with the C++ compiler
there, and on a GPU compiles gathers and compiled graphs with NVRTC on first use), the GPU paths
launch only our kernels and operations MLX ships compiled (sort, scan, reductions, elementwise),
and the instantiations a check launches (`Launch`) are compiled side by side before it runs
(`check_groups`).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import TypeVar

import mlx.core as mx
import numpy as np

from . import cuda_compile
from .checks import FirstUse
from .sources import kernel_source, model_macros

ENV_OFF = "MERGEKIT_MLX_NO_KERNELS"
ENV_MLX_JIT = "MERGEKIT_MLX_MLX_JIT"  # CUDA: compile with mx.fast.cuda_kernel in every process (no cache)
MAX_ELEMENTS = 2**31 - 1  # counts and indices are 32-bit

TG = 256  # threads per threadgroup for the reduction kernels
MAX_GROUPS = 1024  # grid of the grid-stride kernels (fixed: partial sums stay reproducible)
MAX_KM = 3  # tensors per selection launch (their histograms share threadgroup memory)

T = TypeVar("T")


# ----------------------------------------------------------------------------- the switch


_switch: bool | None = None  # inside use_kernels(...): its flag; None: the environment decides


def enabled() -> bool:
    """False when MERGEKIT_MLX_NO_KERNELS=1, or inside use_kernels(False)."""
    if _switch is not None:
        return _switch
    return os.environ.get(ENV_OFF, "").strip().lower() not in ("1", "true", "yes", "on")


@contextmanager
def use_kernels(flag: bool | None) -> Iterator[None]:
    """GPU kernels on or off inside the block (for every thread: the merge threads too); as before
    after it. None leaves the switch as it is."""
    global _switch
    if flag is None:
        yield
        return
    previous, _switch = _switch, bool(flag)
    try:
        yield
    finally:
        _switch = previous


# ----------------------------------------------------------------------------- backend and kernels


_substitute: tuple[Callable, Callable[[], str | None]] | None = None


def backend() -> str | None:
    """'metal', 'cuda' or None (CPU, or kernels off)."""
    if _substitute is not None:
        return _substitute[1]()
    if not enabled() or mx.default_device() != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return None


@dataclass(frozen=True)
class Launch:
    """One instantiation of a kernel: kernels/<name> for `km` models (and a base), the arrays it
    takes after them (`inputs`) and gives (`outputs`), every input's and output's dtype, and the
    template arguments; what `cuda_compile` builds once per machine. Calling it launches it."""

    name: str
    km: int
    has_base: bool
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    in_dtypes: tuple[mx.Dtype, ...]  # the base's, the models', then those of `inputs`
    out_dtypes: tuple[mx.Dtype, ...]
    template: tuple[tuple[str, object], ...] = ()
    atomic: bool = False

    def __call__(self, backend_name: str, arrays: list[mx.array], *, grid, threadgroup, output_shapes, init_value=None):
        kern = kernel(self.name, backend_name, self.km, self.has_base, self.atomic, self.inputs, self.outputs)
        return kern(
            inputs=arrays,
            template=list(self.template),
            grid=grid,
            threadgroup=threadgroup,
            output_shapes=output_shapes,
            output_dtypes=list(self.out_dtypes),
            init_value=init_value,
        )


def model_dtypes(dtype: mx.Dtype, km: int, has_base: bool) -> tuple[mx.Dtype, ...]:
    """The dtypes of a launch's base and model inputs (one dtype: `common_dtype`)."""
    return (dtype,) * (km + int(has_base))


def prebuild(backend_name: str, launches: Iterable[Launch]) -> None:
    """CUDA: start compiling these instantiations side by side in the background (a launch of one
    still compiling waits for it); nothing elsewhere, where MLX compiles on launch."""
    if backend_name != "cuda" or _substitute is not None or os.environ.get(ENV_MLX_JIT):
        return
    if not cuda_compile.available():
        return
    for spec in dict.fromkeys(launches):
        kern = kernel(spec.name, backend_name, spec.km, spec.has_base, spec.atomic, spec.inputs, spec.outputs)
        kern.prepare(spec.in_dtypes, spec.out_dtypes, spec.template)


def kernel(
    name: str,
    backend_name: str,
    km: int = 0,
    has_base: bool = False,
    atomic: bool = False,
    inputs: tuple[str, ...] = (),
    outputs: tuple[str, ...] = ("out",),
):
    """The kernel of kernels/<name>.<metal|cu> for `km` models (and a base), called like the
    function `mx.fast.metal_kernel` returns."""
    if _substitute is not None:
        return _substitute[0](name, backend_name, km, has_base, atomic, inputs, outputs)
    return _kernel(name, backend_name, km, has_base, atomic, inputs, outputs)


def _parts(name, backend_name, km, has_base, inputs) -> tuple[str, list[str], str, str]:
    """(tag, input names, header, body) of kernels/<name> for `km` models (and a base)."""
    header, body = kernel_source(name, backend_name)
    names = (["base"] if has_base else []) + [f"x{m}" for m in range(km)] + list(inputs)
    if km:
        body = model_macros(km, has_base) + body
    return f"mk_{name}_{km}{'b' if has_base else ''}", names, header, body


def cuda_translation_unit(spec: Launch) -> str:
    """What NVRTC compiles for `spec` (the shipped cubins are found by it; no device needed)."""
    tag, names, header, body = _parts(spec.name, "cuda", spec.km, spec.has_base, spec.inputs)
    kern = cuda_compile.CachedKernel(tag, names, spec.outputs, header, body)
    return kern.source(spec.in_dtypes, spec.out_dtypes, spec.template)[1]


@cache
def _kernel(name, backend_name, km, has_base, atomic, inputs, outputs):
    tag, names, header, body = _parts(name, backend_name, km, has_base, inputs)
    if backend_name == "metal":
        return mx.fast.metal_kernel(
            name=tag, input_names=names, output_names=list(outputs), source=body, header=header, atomic_outputs=atomic
        )
    mlx_jit = mx.fast.cuda_kernel(name=tag, input_names=names, output_names=list(outputs), source=body, header=header)
    if os.environ.get(ENV_MLX_JIT):
        return mlx_jit
    return cuda_compile.CachedKernel(tag, names, outputs, header, body, fallback=mlx_jit)


@contextmanager
def substitute(factory: Callable, backend_of: Callable[[], str | None], *, trusted: bool = True) -> Iterator[None]:
    """Tests: kernels made by `factory(name, backend, km, has_base, atomic, inputs, outputs)` (an
    emulator), on the backend `backend_of()` names; with `trusted` every group counts as checked."""
    global _substitute
    previous, _substitute = _substitute, (factory, backend_of)
    saved = dict(_verdicts.verdicts)
    if trusted:
        _verdicts.verdicts.update({name: True for name in GROUPS})
    try:
        yield
    finally:
        _substitute = previous
        _verdicts.verdicts.clear()
        _verdicts.verdicts.update(saved)
        const_u32.cache_clear()


# ----------------------------------------------------------------------------- first-use checks


def _remember() -> bool:
    """CUDA keeps first-use verdicts on disk unless MERGEKIT_MLX_RECHECK is set (or MLX's JIT is used)."""
    return not os.environ.get("MERGEKIT_MLX_RECHECK") and not os.environ.get(ENV_MLX_JIT)


_verdicts: FirstUse[str] = FirstUse(lambda what: f"the {backend()} '{what}' kernel", "the fallback", reference="the CPU fallback")
GROUPS: dict[str, Group] = {}


class Group:
    """Kernels that prove themselves together: `check(backend)` compares them with the CPU path;
    `launches()` lists the instantiations the check launches (compiled ahead by `check_groups`)."""

    def __init__(self, name: str, check: Callable[[str], bool], launches: Callable[[], list[Launch]] = list):
        self.name, self.check, self.launches = name, check, launches
        GROUPS[name] = self

    def _remembered(self, gpu: str):
        return cuda_compile.VERDICTS if gpu == "cuda" and _remember() else None

    def due(self, gpu: str) -> bool:
        """The check has not run in this process and no verdict of it is kept on this machine."""
        if self.name in _verdicts.verdicts:
            return False
        remembered = self._remembered(gpu)
        return remembered is None or not remembered.verified(self.name)

    def passed(self, gpu: str) -> bool:
        return _verdicts.passed(self.name, lambda: self.check(gpu), self._remembered(gpu), self.name)

    def call(self, gpu: str, fn: Callable[[], T]) -> T | None:
        """fn() when this group passed its first-use check on this GPU, else None (the caller falls back)."""
        if not self.passed(gpu):
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a launch failure: the fallback from now on
            _verdicts.failed(self.name, e)
            return None


def check_groups(gpu: str, groups: Iterable[Group]) -> None:
    """Run these groups' first-use checks now: what the due checks launch is compiled side by side
    first (on a fresh machine the compiles, one after another, took longer than the checks)."""
    groups = list(groups)
    prebuild(gpu, [spec for g in groups if g.due(gpu) for spec in g.launches()])
    for g in groups:
        g.passed(gpu)


def status() -> dict[str, bool]:
    """Which GPU kernel groups passed their first-use check in this process (empty on the CPU)."""
    return _verdicts.status()


def forget_checks() -> None:
    """Tests: no group checked yet, as in a new process."""
    _verdicts.forget()


# ----------------------------------------------------------------------------- launch helpers


def check_size(n: int) -> None:
    if n > MAX_ELEMENTS:
        raise ValueError(f"tensor of {n} elements: the kernels index at most 2**31-1 elements")


def stride_grid(n: int, per_thread: int = 4) -> int:
    """Threads for a grid-stride elementwise kernel: about `per_thread` elements each."""
    return max(TG, -(-n // (per_thread * TG)) * TG)


def groups(n: int) -> int:
    return max(1, min(MAX_GROUPS, -(-n // TG)))


def element(a: mx.array, i: int) -> mx.array:
    """a[i] of a flat array, as a 0-d array cut out by a static slice: MLX makes a[i] a gather,
    which its CUDA backend compiles on first use."""
    return a[i : i + 1].reshape(())


def common_dtype(arrays: list[mx.array]) -> list[mx.array]:
    dt = arrays[0].dtype
    if all(a.dtype == dt for a in arrays):
        return arrays
    return [a.astype(mx.float32) for a in arrays]


@lru_cache(maxsize=512)
def const_u32(words: tuple[int, ...]) -> mx.array:
    """A uint32 parameter array, kept: after its first use it stays in GPU memory, so repeated
    calls with the same parameters (every tensor of a shape in a TIES merge) move nothing."""
    return mx.array(np.array(words, dtype=np.uint32))


@lru_cache(maxsize=64)
def ones_f32(k: int) -> mx.array:
    # made from host data, not mx.ones: a cached lazy array is tied to the thread that made it,
    # and another merge thread evaluating it fails ("no Stream in current thread")
    return mx.array(np.ones((k,), dtype=np.float32))


def f32_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", float(v)))[0]


def padded(count: int) -> int:
    """Room for `count` uint32 results, at least 16 bytes: MLX serves 8 bytes or less from a
    small host-mapped pool, which kernels should not write into."""
    return max(int(count), 4)


CHECK_K = 3  # models in a check's family
CHECK_N = 12289  # elements of each


def check_family(dtype=mx.bfloat16, k=CHECK_K, n=CHECK_N, seed=0):
    """A small family with ties: bf16 task vectors and one model equal to the base in places;
    made on the CPU (the same values on every machine, no GPU work before the check)."""
    with mx.stream(mx.cpu):
        key = mx.random.key(seed)
        k1, k2 = mx.random.split(key)
        base = mx.random.normal((n,), key=k1).astype(dtype)
        noise = mx.random.normal((k, n), key=k2) * 0.01
        others = [(base.astype(mx.float32) + noise[i]).astype(dtype) for i in range(k)]
        others[-1] = mx.where(mx.arange(n) % 3 == 0, base, others[-1])
        mx.eval(base, *others)
    return base, others
