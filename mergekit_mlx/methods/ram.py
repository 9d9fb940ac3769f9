"""RAM (Reinforced Agent Merging) and its tensor-local RAM+ variant.

An element changed (|delta| > epsilon) by exactly one model takes that model's delta; an element
changed by several takes the mean of their deltas; unchanged elements stay at the base. RAM+
scales each model's unique deltas by 1 + r * clip(shared / unique, 0, alpha), where shared and
unique count that model's changed elements that other models also change, or not (mergekit 0.1.5).
"""

from __future__ import annotations

import mlx.core as mx

from .base import MergeInputs, Method, Param, Range, float32

# deltas of fine-tunes are far below 1: a larger epsilon counts every element as unchanged
CHANGED = "an element counts as changed when |x - base| > epsilon"


def _task_vectors(inputs: MergeInputs, epsilon: float):
    base = float32(inputs.tensors[inputs.base])
    deltas = mx.stack([float32(inputs.tensors[i]) - base for i in inputs.non_base]).reshape(len(inputs.non_base), -1)
    changed = mx.abs(deltas) > epsilon
    counts = changed.astype(mx.int32).sum(axis=0, keepdims=True)
    kept = mx.where(changed, deltas, 0.0)
    return base, kept, changed, counts


def ram(inputs: MergeInputs) -> mx.array:
    if not inputs.non_base:
        return inputs.tensors[inputs.base]
    base, kept, _, counts = _task_vectors(inputs, inputs.shared["epsilon"])
    # unique elements: the one delta; shared ones: their mean (counts >= 1 wherever kept != 0)
    merged = kept.sum(axis=0) / mx.maximum(counts[0], 1).astype(mx.float32)
    return (base + merged.reshape(base.shape)).astype(inputs.tensors[inputs.base].dtype)


def ramplus_tl(inputs: MergeInputs) -> mx.array:
    if not inputs.non_base:
        return inputs.tensors[inputs.base]
    s = inputs.shared
    base, kept, changed, counts = _task_vectors(inputs, s["epsilon"])
    unique = counts == 1
    overlap = counts > 1
    n_shared = (changed & overlap).astype(mx.float32).sum(axis=1)
    n_unique = (changed & unique).astype(mx.float32).sum(axis=1)
    rho = n_shared / mx.maximum(n_unique, s["epsilon"])
    lam = 1 + s["r"] * mx.clip(rho, 0.0, s["alpha"])
    merged = mx.where(unique, kept * lam[:, None], 0.0).sum(axis=0) + mx.where(
        overlap, kept / mx.maximum(counts, 1).astype(mx.float32), 0.0
    ).sum(axis=0)
    return (base + merged.reshape(base.shape)).astype(inputs.tensors[inputs.base].dtype)


METHODS = [
    Method(
        "ram",
        ram,
        params=(Param("epsilon", float, "shared", default=1e-5, valid=Range(0, 1, hi_open=True), why=CHANGED),),
        base="required",
        doc=(
            "RAM: per element, a delta (|x_i - base| > epsilon) made by one model is kept whole, deltas "
            "made by several models are averaged, and unchanged elements stay at the base."
        ),
    ),
    Method(
        "ramplus_tl",
        ramplus_tl,
        params=(
            Param(
                "r",
                float,
                "shared",
                default=0.1,
                valid=Range(0, 10),
                why="unique deltas are scaled by 1 + r * clip(rho, 0, alpha)",
            ),
            Param("alpha", float, "shared", default=0.2, valid=Range(0, 10), why="the cap of rho in 1 + r * clip(rho, 0, alpha)"),
            # also the floor of the unique count rho divides by: 0 would divide by zero
            Param("epsilon", float, "shared", default=1e-5, valid=Range(0, 1, lo_open=True, hi_open=True), why=CHANGED),
        ),
        base="required",
        doc=(
            "RAM+ (tensor-local): as ram, but each model's unique deltas are scaled by "
            "1 + r * clip(shared_i / unique_i, 0, alpha), counting model i's changed elements in this tensor "
            "that other models change too (shared_i) or not (unique_i)."
        ),
    ),
]
