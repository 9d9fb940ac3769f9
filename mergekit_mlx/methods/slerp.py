"""Spherical linear interpolation between the base model and one other, per tensor."""

from __future__ import annotations

import math

import mlx.core as mx

from .. import kernels
from .base import FRACTION, MergeInputs, Method, Param, float32

DOT_THRESHOLD = 0.9995  # above this |cos| the two are treated as colinear: plain lerp
EPS = 1e-8


def slerp_tensors(t: float, v0: mx.array, v1: mx.array) -> mx.array:
    """slerp over the whole tensor as one vector; lerp when nearly colinear (as mergekit).

    On the CPU the norms and the dot product come from one numpy pass (kernels.slerp_sums) and only
    the combination is an MLX graph; elsewhere, and where those sums are not finite (NaN/Inf
    inputs, overflowing squares), the whole of it is (slerp_graph)."""
    if kernels.slerp_sums_apply(v0, v1):
        sums = kernels.slerp_sums(v0, v1)
        if all(math.isfinite(s) for s in sums):
            ca, cb = slerp_coefficients(t, *sums)
            return kernels.weighted_sum(mx.array([ca, cb], dtype=mx.float32), [v0, v1])
    return slerp_graph(t, v0, v1)


def slerp_coefficients(t: float, s00: float, s11: float, s01: float) -> tuple[float, float]:
    """(ca, cb) of slerp's ca * v0 + cb * v1 from v0.v0, v1.v1 and v0.v1 (finite), in float64.

    The cosine is v0.v1 / (|v0| |v1|), a norm at or below EPS counting as 1, clipped to [-1, 1]:
    mergekit's dot of the normalised copies, without a pass that divides."""
    na, nb = math.sqrt(s00), math.sqrt(s11)
    na = na if na > EPS else 1.0
    nb = nb if nb > EPS else 1.0
    dot = min(1.0, max(-1.0, s01 / (na * nb)))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, float(t)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def slerp_graph(t: float, v0: mx.array, v1: mx.array) -> mx.array:
    """slerp_tensors as one lazy MLX graph (the GPU's path): no operation MLX compiles on first
    use on an NVIDIA GPU (fused_elementwise, and the combination as kernels.weighted_sum)."""
    # the norms and the dot product as sums over one fused elementwise temporary each (the same
    # float32 values and order as norm() and the uncompiled quotients: on the CPU each uncompiled
    # step wrote a tensor-sized temporary into fresh pages)
    na = mx.sqrt(chained_sum(_squares, v0))
    nb = mx.sqrt(chained_sum(_squares, v1))
    na = mx.where(na > EPS, na, 1.0)
    nb = mx.where(nb > EPS, nb, 1.0)
    dot = mx.clip(chained_sum(_quotients_product, v0, v1, na, nb), -1.0, 1.0)
    linear = mx.abs(dot) > DOT_THRESHOLD
    theta = mx.arccos(mx.where(linear, 0.0, dot))
    sin_theta = mx.sin(theta)
    safe = mx.where(linear, 1.0, sin_theta)
    ca = mx.where(linear, 1 - t, mx.sin((1 - t) * theta) / safe)
    cb = mx.where(linear, t, mx.sin(t * theta) / safe)
    # the coefficients are scalars: only the per-element combination is fused (fusing the
    # trigonometry too folds it into every element's work)
    return kernels.weighted_sum(mx.stack([ca, cb]), [v0, v1])


SUM_CHUNK = 1 << 20  # elements per piece of a chained sum


def chained_sum(fn, *args: mx.array) -> mx.array:
    """mx.sum(fn(*args)) with fn elementwise over the tensors among args (the others scalars),
    piece by piece: each piece's sum starts from the running total ([total, summands...]), which
    continues MLX's sequential float32 sum exactly (0 + total is total, but for a zero's sign),
    and no temporary is larger than a piece (tensor-sized ones took fresh pages every time)."""
    flat = [a.reshape(-1) if a.ndim else a for a in args]
    n = max(a.size for a in flat)
    total = None
    for s in range(0, n, SUM_CHUNK):
        part = fn(*[a[s : s + SUM_CHUNK] if a.ndim else a for a in flat])
        total = mx.sum(part if total is None else mx.concatenate([total.reshape(1), part]))
    return total if total is not None else mx.sum(fn(*flat))  # an empty tensor: 0


# elementwise only (a reshape inside would split the fused loop), no add after a multiply
@kernels.fused_elementwise
def _squares(v: mx.array) -> mx.array:
    a = float32(v)
    return a * a


@kernels.fused_elementwise
def _quotients_product(v0: mx.array, v1: mx.array, na: mx.array, nb: mx.array) -> mx.array:
    return (float32(v0) / na) * (float32(v1) / nb)


def slerp(inputs: MergeInputs) -> mx.array:
    base = inputs.base
    other = 1 - base
    return slerp_tensors(inputs.shared["t"], inputs.tensors[base], inputs.tensors[other])


METHODS = [
    Method(
        "slerp",
        slerp,
        params=(Param("t", float, "shared", valid=FRACTION, why="t runs from the base (0) to the other model (1)"),),
        base="required",
        min_inputs=2,
        max_inputs=2,
        propagates_nonfinite=True,
        working_copies=0,  # chunks of the sums, and the fused combination
        gpu_kernels=("weighted_sum",),
        doc="Spherical interpolation from the base (t=0) to the other model (t=1); lerp when |cos| > 0.9995.",
    )
]
