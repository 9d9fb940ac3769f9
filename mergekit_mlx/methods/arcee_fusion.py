"""Arcee Fusion: take the other model's values only where they matter most.

Importance = |other - base| times, per row (last axis), the KL divergence between the softmax of
the other's row and of the base's row. Elements whose importance reaches median + 1.5 * IQR of the
tensor's importances take the other model's value; the rest keep the base (mergekit 0.1.5).
"""

from __future__ import annotations

import mlx.core as mx

from .. import kernels
from .base import MergeInputs, Method, float32

QUANTILE_SAMPLE = 1_000_000  # larger tensors estimate quartiles from this many sampled elements
SOFTMAX_EPS = 1e-8


def importance(other: mx.array, base: mx.array) -> mx.array:
    p = mx.softmax(other, axis=-1) + SOFTMAX_EPS
    q = mx.softmax(base, axis=-1) + SOFTMAX_EPS
    kl = mx.sum(p * mx.log(p / q), axis=-1, keepdims=True)
    return mx.abs(other - base) * kl


def fusion_threshold(scores: mx.array, seed: int, stream: int) -> mx.array:
    """median + 1.5 * (q3 - q1), each quartile the order statistic at floor(q * (n - 1))."""
    flat = scores.reshape(-1)
    if flat.size > QUANTILE_SAMPLE:
        # sampled with replacement, as mergekit does, but from the run's seed so a merge is repeatable
        key = mx.random.key(((int(seed) & 0xFFFFFFFF) << 32) | (stream & 0xFFFFFFFF))
        flat = mx.take(flat, mx.random.randint(0, flat.size, (QUANTILE_SAMPLE,), key=key))
    ordered = mx.sort(flat)
    n = ordered.size
    q1, median, q3 = (ordered[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    return median + 1.5 * (q3 - q1)


def arcee_fusion(inputs: MergeInputs) -> mx.array:
    base_in = inputs.tensors[inputs.base]
    other_index = inputs.non_base[0]
    base, other = float32(base_in), float32(inputs.tensors[other_index])
    scores = importance(other, base)
    model = inputs.input_ids[other_index] if inputs.input_ids else other_index
    keep = scores >= fusion_threshold(scores, inputs.seed, kernels.stream_id(inputs.name, model, "fusion"))
    return mx.where(keep, other, base).astype(base_in.dtype)


METHODS = [
    Method(
        "arcee_fusion",
        arcee_fusion,
        base="required",
        min_inputs=2,
        max_inputs=2,
        random=True,
        doc=(
            "Arcee Fusion: importance = |other - base| * KL(softmax(other row) || softmax(base row)); elements "
            "with importance >= median + 1.5 IQR take the other model's value, the rest keep the base. "
            "Quartiles are exact order statistics up to 1e6 elements; larger tensors sample 1e6 elements "
            "with replacement as mergekit does, drawn from the run's seed so the merge is repeatable."
        ),
    )
]
