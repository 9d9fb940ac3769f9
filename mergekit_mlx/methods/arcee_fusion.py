"""Arcee Fusion: take the other model's values only where they matter most.

Importance = |other - base| times, per row (last axis), the KL divergence between the softmax of
the other's row and of the base's row, each plus 1e-8 (mergekit's epsilon). Elements whose
importance reaches median + 1.5 * IQR of the tensor's importances take the other model's value;
the rest keep the base (mergekit 0.1.5).

The KL divergence of two nearby rows is second order in their difference, while the terms of
sum(p log(p / q)) are first order and cancel: summed in float32 they lose most of the digits, and
elements near the threshold are chosen otherwise than by the formula in float64 (mergekit too;
benchmarks/RESULTS.md, section 14). Here it is a sum of non-negative terms, with no cancellation:
since sum(p') = sum(q'), KL = sum q' phi(p'/q' - 1), phi(s) = (1 + s) log1p(s) - s >= 0, where
p - q = q expm1(log p - log q) and log p - log q = (other - base) - (lse(other) - lse(base)); phi
of a small s is its Taylor series. All in float32, so it runs on a GPU as well.
"""

from __future__ import annotations

import mlx.core as mx

from .. import kernels
from .base import MergeInputs, Method, float32

QUANTILE_SAMPLE = 1_000_000  # larger tensors estimate quartiles from this many sampled elements
SOFTMAX_EPS = 1e-8


# phi(s) = s^2 * sum_k PHI_SERIES[k] s^k: the coefficients (-1)^j / (j (j - 1)) for j = 2..9; for
# |s| < SERIES_BELOW the truncation error is below 1e-9 of phi, and the closed form would lose
# up to 1e-7 / |s| of it to cancellation
PHI_SERIES = tuple((-1) ** j / (j * (j - 1)) for j in range(2, 10))
SERIES_BELOW = 0.1
EXPM1_BELOW = 80.0  # expm1 of float32 overflows above ~88.7


def phi(s: mx.array) -> mx.array:
    """(1 + s) log1p(s) - s for s >= -1, accurate to float32 rounding also near 0 (where it is s^2 / 2)."""
    small = mx.abs(s) < SERIES_BELOW
    t = mx.where(small, s, 0.0)
    series = mx.array(PHI_SERIES[-1], dtype=mx.float32)
    for c in reversed(PHI_SERIES[:-1]):
        series = series * t + c
    ratio = mx.where(small, 1.0, 1 + s)
    closed = mx.where(ratio > 0, ratio * mx.log(mx.maximum(ratio, 1e-38)), 0.0) - s  # 0 log 0 = 0
    return mx.where(small, t * t * series, closed)


def row_kl(other: mx.array, base: mx.array) -> mx.array:
    """KL(softmax(other) + eps || softmax(base) + eps) per row (last axis, kept), as a sum of
    non-negative terms (see the module's doc string)."""
    delta = other - base
    lse_b = mx.logsumexp(base, axis=-1, keepdims=True)
    q = mx.exp(base - lse_b)
    # lse(other) - lse(base) = log sum q e^delta: through log1p/expm1 it keeps its digits for small
    # deltas (an error c in it moves the KL by ~c^2 / 2, too much when the KL is ~1e-11); where a
    # delta would overflow expm1, the plain difference of the two log-sum-exps
    fits = mx.max(delta, axis=-1, keepdims=True) < EXPM1_BELOW
    shift_fine = mx.log1p(mx.sum(q * mx.expm1(mx.minimum(delta, EXPM1_BELOW)), axis=-1, keepdims=True))
    lse_o = mx.logsumexp(other, axis=-1, keepdims=True)
    log_ratio = delta - mx.where(fits, shift_fine, lse_o - lse_b)  # log p - log q
    # p - q: q expm1(log p - log q) keeps its digits where p ~ q; far apart, the plain difference does
    near = mx.abs(log_ratio) < 1
    p_minus_q = mx.where(near, q * mx.expm1(mx.where(near, log_ratio, 0.0)), mx.exp(other - lse_o) - q)
    q_eps = q + SOFTMAX_EPS
    return mx.sum(q_eps * phi(p_minus_q / q_eps), axis=-1, keepdims=True)


def importance(other: mx.array, base: mx.array) -> mx.array:
    return mx.abs(other - base) * row_kl(other, base)


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
