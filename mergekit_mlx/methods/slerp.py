"""Spherical linear interpolation between the base model and one other, per tensor."""

from __future__ import annotations

import mlx.core as mx

from .base import MergeInputs, Method, Param, float32

DOT_THRESHOLD = 0.9995  # above this |cos| the two are treated as colinear: plain lerp
EPS = 1e-8


def slerp_tensors(t: float, v0: mx.array, v1: mx.array) -> mx.array:
    """slerp over the whole tensor as one vector; lerp when nearly colinear (as mergekit)."""
    # the norms and the dot product as sums over one compiled elementwise temporary each (the
    # same float32 values and order as norm() and the uncompiled quotients: on the CPU each
    # uncompiled step wrote a tensor-sized temporary into fresh pages)
    na = mx.sqrt(mx.sum(_squares(v0)))
    nb = mx.sqrt(mx.sum(_squares(v1)))
    na = mx.where(na > EPS, na, 1.0)
    nb = mx.where(nb > EPS, nb, 1.0)
    dot = mx.clip(mx.sum(_quotients_product(v0, v1, na, nb)), -1.0, 1.0)
    linear = mx.abs(dot) > DOT_THRESHOLD
    theta = mx.arccos(mx.where(linear, 0.0, dot))
    sin_theta = mx.sin(theta)
    safe = mx.where(linear, 1.0, sin_theta)
    ca = mx.where(linear, 1 - t, mx.sin((1 - t) * theta) / safe)
    cb = mx.where(linear, t, mx.sin(t * theta) / safe)
    # the coefficients are scalars: only the per-element combination is compiled (compiling the
    # trigonometry too folds it into every element's work)
    return _combine(ca, cb, v0, v1)


@mx.compile
def _squares(v: mx.array) -> mx.array:
    a = float32(v).reshape(-1)
    return a * a


@mx.compile
def _quotients_product(v0: mx.array, v1: mx.array, na: mx.array, nb: mx.array) -> mx.array:
    return (float32(v0).reshape(-1) / na) * (float32(v1).reshape(-1) / nb)


@mx.compile
def _combine(ca: mx.array, cb: mx.array, v0: mx.array, v1: mx.array) -> mx.array:
    return (ca * float32(v0) + cb * float32(v1)).astype(v0.dtype)


def slerp(inputs: MergeInputs) -> mx.array:
    base = inputs.base
    other = 1 - base
    return slerp_tensors(inputs.shared["t"], inputs.tensors[base], inputs.tensors[other])


METHODS = [
    Method(
        "slerp",
        slerp,
        params=(Param("t", float, "shared"),),
        base="required",
        min_inputs=2,
        max_inputs=2,
        propagates_nonfinite=True,
        doc="Spherical interpolation from the base (t=0) to the other model (t=1); lerp when |cos| > 0.9995.",
    )
]
