"""SCE: Select (high-variance elements), Calculate (weights from task-vector energy), Erase (signs).

Follows mergekit 0.1.5: with select_topk < 1, keep the int(select_topk * n) elements whose variance
across the task vectors is largest (n = elements with non-zero variance; ties by lowest flat index);
weight each task vector by its mean square over the sum of those (uniform when that sum is below
1e-6); keep per element only deltas whose sign matches the sign of their sum; divide by the kept
weights.
"""

from __future__ import annotations

import mlx.core as mx

from .. import kernels
from .base import MergeInputs, Method, Param, Range, float32

WEIGHT_SUM_FLOOR = 1e-6  # mergekit's threshold for falling back to uniform weights
DIVISOR_FLOOR = 1e-6


def select_mask(deltas: mx.array, fraction: float) -> mx.array:
    """bool mask over one tensor's elements: the top fraction by variance across models."""
    shape = deltas.shape[1:]
    if fraction <= 0:
        return mx.zeros(shape, dtype=mx.bool_)
    if fraction >= 1:
        return mx.ones(shape, dtype=mx.bool_)
    var = mx.var(deltas, axis=0)
    k = int(int((var != 0).astype(mx.int32).sum().item()) * fraction)
    return kernels.topk_mask(var, k)


def sce(inputs: MergeInputs) -> mx.array:
    base_in = inputs.tensors[inputs.base]
    if not inputs.non_base:
        return base_in
    base = float32(base_in)
    deltas = mx.stack([float32(inputs.tensors[i]) - base for i in inputs.non_base])
    n = deltas.shape[0]
    fraction = inputs.shared["select_topk"]
    if fraction < 1:
        deltas = mx.where(select_mask(deltas, fraction), deltas, 0.0)

    majority = mx.where(deltas.sum(axis=0) >= 0, 1.0, -1.0)
    agree = mx.sign(deltas) == majority  # zeros never agree

    energy = mx.square(deltas).reshape(n, -1).mean(axis=1)
    total = energy.sum()
    small = mx.abs(total) < WEIGHT_SUM_FLOOR
    weights = mx.where(small, 1.0 / n, energy / mx.where(small, 1.0, total))
    weights = weights.reshape((n,) + (1,) * (deltas.ndim - 1))

    kept = mx.where(agree, weights, 0.0)
    merged = (deltas * kept).sum(axis=0) / mx.maximum(kept.sum(axis=0), DIVISOR_FLOOR)
    return (base + merged).astype(base_in.dtype)


METHODS = [
    Method(
        "sce",
        sce,
        params=(
            Param(
                "select_topk",
                float,
                "shared",
                default=1.0,
                valid=Range(0, 1, lo_open=True),
                why="the fraction of elements kept; 0 or less would keep none and return the base",
            ),
            Param("int8_mask", bool, "shared", default=False),  # a memory switch in mergekit; masks here are never stored
        ),
        base="required",
        gpu_kernels=("select",),
        doc=(
            "SCE: keep the select_topk fraction of elements with the highest variance across task vectors "
            "(1 keeps all), weight each task vector by its mean square (normalised to sum 1), erase deltas "
            "against the majority sign, and add their weighted mean to the base."
        ),
    )
]
