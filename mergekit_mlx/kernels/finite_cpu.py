"""Whether evaluated tensors hold a NaN or an Inf, on the CPU in one native pass over each.

On the CPU the pipeline checks every output once it is evaluated, and the inputs of a method that
may drop elements (a dropped NaN would otherwise go unreported). As an MLX graph that is two
integer maxima per tensor (`pipeline.all_finite`, what a GPU runs), about a tenth of a CPU TIES
merge's time (benchmarks/RESULTS.md, section 19); the native loop (kernels/nonfinite.cpp) reads
each tensor once. Where it is not built (no compiler, MERGEKIT_MLX_NO_NATIVE=1, a failed first-use
check) or kernels are off (`--no-kernels`) the caller keeps the MLX graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from . import cpu_native, gpu

# float dtype -> (its unsigned integer: numpy, MLX, C), the bits but the sign, +Inf
_BITS = {
    mx.bfloat16: (np.uint16, mx.uint16, "uint16_t", 0x7FFF, 0x7F80),
    mx.float16: (np.uint16, mx.uint16, "uint16_t", 0x7FFF, 0x7C00),
    mx.float32: (np.uint32, mx.uint32, "uint32_t", 0x7FFFFFFF, 0x7F800000),
}


def _defines(dtype: mx.Dtype) -> tuple[tuple[str, str], ...]:
    _, _, ctype, abs_bits, inf = _BITS[dtype]
    return (("T", ctype), ("ABS", f"{abs_bits:#x}u"), ("INF", f"{inf:#x}u"))


def all_finite(arrays: Sequence[mx.array]) -> bool | None:
    """True when no array holds a NaN or an Inf, False when one does; None when the native loop
    cannot tell (a dtype it does not read, not built, kernels off): the caller checks another way.
    The arrays are evaluated here (inputs the pipeline has read already are)."""
    if not gpu.enabled() or not all(a.dtype in _BITS for a in arrays):
        return None
    out = np.zeros(1, dtype=np.uint64)
    for a in arrays:
        if a.size == 0:
            continue
        fn = cpu_native.checked("nonfinite", _defines(a.dtype), 1, check_native)
        if fn is None:
            return None
        flat = a.reshape(-1).view(_BITS[a.dtype][1])
        mx.eval(flat)
        bits = np.asarray(flat)
        fn(cpu_native.ptr(bits), bits.size, cpu_native.ptr(out))
        if out[0]:
            return False
    return True


def check_native(fn, d: dict, km: int) -> bool:
    """The loop against numpy's isfinite on values with NaN and Inf of both signs, at the start,
    in the middle and in the last, partial, stretch of vector code (first use)."""
    width = {"uint16_t": np.uint16, "uint32_t": np.uint32}[d["T"]]
    inf = int(d["INF"].rstrip("u"), 16)
    sign = 1 << (8 * np.dtype(width).itemsize - 1)
    rng = np.random.default_rng(0)
    finite = rng.integers(0, inf, 1000, dtype=np.uint64).astype(width)  # every finite pattern, either sign
    finite[::3] |= width(sign)
    cases = [finite]
    for where in (0, 517, 999):
        for bad in (inf, inf | 1, sign | inf, sign | inf | 5):  # +Inf, +NaN, -Inf, -NaN
            x = finite.copy()
            x[where] = width(bad)
            cases.append(x)
    out = np.zeros(1, dtype=np.uint64)
    for x in cases:
        fn(cpu_native.ptr(x), x.size, cpu_native.ptr(out))
        expected = np.any((x & width(sign - 1)) >= width(inf))
        if bool(out[0]) != bool(expected):
            return False
    fn(cpu_native.ptr(finite), 0, cpu_native.ptr(out))  # an empty range holds nothing
    return not out[0]
