"""Weighted sums c_0 * x_0 + ... + c_(N-1) * x_(N-1) of tensors of one shape: linear's merge and
slerp's combination of its two tensors.

Computed in float32 (float64 stays float64) in input order, x_0 * c_0 first, and rounded once to
the first tensor's dtype (`graph`, the reference). On a GPU the kernel kernels/weighted_sum.inc
(up to MAX_KM tensors a launch; beyond that a float32 running sum goes from one launch to the
next, the same operations in the same order); on the CPU, and for dtypes the kernel does not take,
`graph` compiled by mx.compile.

Why a kernel where MLX's fused graph is as fast: on an NVIDIA GPU MLX builds each compiled graph
with NVRTC on its first use on a machine (seconds: a linear merge's whole first run took 7 s
against 1.5 s warm), while the kernel compiles beside the others in a fraction of that, once per
machine. The kernel writes the sum with plain operators as MLX generates the graph, so both are
contracted into fused multiply-adds alike (NVRTC's default, which neither changes; Metal's
default math mode); the plain graph on the CPU rounds every product, and the first-use check
allows for that difference and nothing more (`agrees`). For the same reason `fused_elementwise`
runs slerp's other fused graphs as plain operations on an NVIDIA GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import mlx.core as mx
import numpy as np

from . import gpu

MAX_KM = 16  # tensors per launch
KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)  # of every tensor (the kernel's loads and stores)
GROUPS_PER_THREAD = 4  # eight-element groups per thread of the grid-stride loop


def _float32(x: mx.array) -> mx.array:
    return x if x.dtype in (mx.float32, mx.float64) else x.astype(mx.float32)


def graph(coefficients: mx.array, *tensors: mx.array) -> mx.array:
    """The weighted sum as plain MLX operations (the first-use check's reference on the CPU stream)."""
    out = _float32(tensors[0]) * coefficients[0]
    for i, x in enumerate(tensors[1:], 1):
        out = out + _float32(x) * coefficients[i]
    return out.astype(tensors[0].dtype)


# the coefficients travel as an array, so one compiled graph serves every tensor of a shape
graph_compiled = mx.compile(graph)


def weighted_sum(coefficients: mx.array, tensors: Sequence[mx.array]) -> mx.array:
    """sum_i coefficients[i] * tensors[i] (coefficients: float32, one per tensor) in float32,
    rounded once to tensors[0]'s dtype."""
    tensors = list(tensors)
    backend = gpu.backend()
    if backend is not None and kernel_takes(tensors):
        out = GPU.call(backend, lambda: weighted_sum_gpu(backend, coefficients, tensors))
        if out is not None:
            return out
    return graph_compiled(coefficients, *tensors)


def kernel_takes(tensors: Sequence[mx.array]) -> bool:
    """One shape, dtypes the kernel loads, a size it indexes."""
    first = tensors[0]
    return all(t.shape == first.shape and t.dtype in KERNEL_DTYPES for t in tensors) and first.size <= gpu.MAX_ELEMENTS


def launch(dtypes: Sequence[mx.Dtype], out_dtype: mx.Dtype, running_sum: bool) -> gpu.Launch:
    """The kernel over tensors of `dtypes`, after a float32 running sum if `running_sum`, into `out_dtype`."""
    km = len(dtypes)
    ins = ((mx.float32,) if running_sum else ()) + tuple(dtypes) + (mx.float32, mx.uint32)
    template = (("T", out_dtype), ("KM", km), ("ACC", running_sum))
    return gpu.Launch("weighted_sum", km, running_sum, ("coef", "up"), ("out",), ins, (out_dtype,), template)


def launches(dtypes: Sequence[mx.Dtype], out_dtype: mx.Dtype, per_launch: int = MAX_KM) -> list[gpu.Launch]:
    """What a weighted sum of tensors of `dtypes` launches: per_launch tensors at a time, every
    launch but the last into a float32 running sum."""
    starts = range(0, len(dtypes), per_launch)
    return [launch(dtypes[s : s + per_launch], out_dtype if s + per_launch >= len(dtypes) else mx.float32, s > 0) for s in starts]


@cache
def _prepare(backend: str, specs: tuple[gpu.Launch, ...]) -> None:
    gpu.prebuild(backend, specs)  # once per configuration: a long sum's launches compile side by side


def weighted_sum_gpu(backend: str, coefficients: mx.array, tensors: Sequence[mx.array], per_launch: int = MAX_KM) -> mx.array:
    """The weighted sum through the kernel (tensors `kernel_takes`)."""
    first = tensors[0]
    n = first.size
    if n == 0:
        return mx.zeros(first.shape, dtype=first.dtype)
    specs = launches([t.dtype for t in tensors], first.dtype, per_launch)
    _prepare(backend, tuple(specs))
    coef = coefficients.astype(mx.float32).reshape(-1)
    up = gpu.const_u32((n,))
    grid = (gpu.stride_grid(-(-n // 8), GROUPS_PER_THREAD), 1, 1)
    acc = []
    for spec, s in zip(specs, range(0, len(tensors), per_launch)):
        e = min(len(tensors), s + per_launch)
        part = coef if (s, e) == (0, len(tensors)) else coef[s:e]
        flats = [t.reshape(-1) for t in tensors[s:e]]
        acc = spec(backend, acc + flats + [part, up], grid=grid, threadgroup=(gpu.TG, 1, 1), output_shapes=[(n,)])
    return acc[0].reshape(first.shape)


# ----------------------------------------------------------------------------- first-use check

CHECK_WEIGHTS = (0.7, -0.45, 0.0)  # a negative weight and a zero one, over three tensors
CHECK_PER_LAUNCH = (MAX_KM, 2)  # in one launch, and in two (a running sum handed on)
CHECK_DTYPES = (mx.bfloat16, mx.float16, mx.float32)
# per output dtype: half its ulp is at most 2**-p of a value, and at most `floor` where it underflows
ROUNDING = {mx.bfloat16: (8, 2.0**-126), mx.float16: (11, 2.0**-25), mx.float32: (None, 2.0**-126)}


def agrees(got: mx.array, exact32: mx.array, tensors: Sequence[mx.array], weights: Sequence[float]) -> bool:
    """`got` is a float32 sum of these products rounded once to its dtype, as `exact32` (the plain
    graph's float32 value) is: both float32 sums lie within 2 (N + 1) 2**-24 sum|c_i x_i| of the
    exact sum whatever products are fused, and the rounding adds half an ulp of the output."""
    with mx.stream(mx.cpu):
        g = np.array(got.astype(mx.float32)).astype(np.float64).reshape(-1)
        r = np.array(exact32.astype(mx.float32)).astype(np.float64).reshape(-1)
        mag = sum(
            abs(float(np.float32(w))) * np.abs(np.array(t.astype(mx.float32)).astype(np.float64).reshape(-1))
            for w, t in zip(weights, tensors)
        )
    slack = 2.0 * (len(tensors) + 1) * 2.0**-24 * mag
    p, floor = ROUNDING[got.dtype]
    tol = slack + (0.0 if p is None else 2.0**-p * (np.abs(r) + slack)) + floor
    return bool(np.all(np.abs(g - r) <= tol))


def _check(backend: str) -> bool:
    coef = mx.array(CHECK_WEIGHTS, dtype=mx.float32)
    ok = True
    for dtype in CHECK_DTYPES:
        base, others = gpu.check_family(dtype)
        tensors = [base, *others[:2]]
        with mx.stream(mx.cpu):
            exact32 = graph(coef, *[t.astype(mx.float32) for t in tensors])
            mx.eval(exact32)
        for per_launch in CHECK_PER_LAUNCH:
            got = weighted_sum_gpu(backend, coef, tensors, per_launch)
            mx.eval(got)
            ok &= got.dtype == dtype and agrees(got, exact32, tensors, CHECK_WEIGHTS)
    return ok


def _check_launches() -> list[gpu.Launch]:
    return [spec for dtype in CHECK_DTYPES for k in CHECK_PER_LAUNCH for spec in launches((dtype,) * 3, dtype, k)]


GPU = gpu.Group("weighted_sum", _check, _check_launches)


def fused_elementwise(fn):
    """fn compiled into one fused MLX kernel (mx.compile), except on an NVIDIA GPU: there MLX builds
    a compiled graph with NVRTC on its first use on a machine (seconds), so fn runs as its plain
    operations, which MLX ships compiled. Only for elementwise fns whose plain and fused forms give
    the same values: no multiply followed by an add, which a fused kernel may contract."""
    fused = mx.compile(fn)

    def run(*args: mx.array) -> mx.array:
        return fn(*args) if gpu.backend() == "cuda" else fused(*args)

    return run
