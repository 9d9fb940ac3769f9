"""PCB merging, Parameter Competition Balancing (Du et al., NeurIPS 2024, arXiv 2410.02396).

Per tensor, each task vector delta_i = x_i - base flattened to one row of d elements (as mergekit
pull request #432 does, so every tensor shape is handled the same), n task vectors:
    intra_i = softmax(n * Norm(delta_i * delta_i))             (within a task)
    inter_i = sum_j softmax(Norm(delta_i * delta_j))            (between tasks, j = i included)
    beta_i  = intra_i * inter_i
    keep_i  = the int(density * d) largest beta_i (ties: lowest index first)
    merged  = sum_i keep_i beta_i delta_i / sum_i keep_i beta_i  (0 where no model is kept)
    result  = base + weight * merged
with Norm(v) = v / ||v||_2 (0 for a zero vector) and softmax over the row. The formulas are the
paper's; the parameters are those of the unmerged mergekit pull request #432: `density` (required,
the kept fraction, the paper's r) and `weight` (default 1, the paper's lambda), both for the whole
tensor. Where the pull request is wrong, this module follows the paper: the pull request divides
by the sum of beta over all models and elements, which shrinks the merged task vector by about the
tensor's size (the merge then barely moves from the base); the paper's rescale is per element. Where
int(density * d) is 0 (a density too small for a short tensor) nothing is kept and the tensor stays
at the base (the pull request divides 0 by 0). Norm is exact for any non-zero vector (the pull
request's F.normalize floors the norm at 1e-12, which matters only for deltas below ~1e-7).
"""

from __future__ import annotations

import mlx.core as mx

from .. import kernels
from .base import FINITE, MergeInputs, Method, Param, Range, float32


def unit(v: mx.array) -> mx.array:
    """v / ||v||_2 for a flat v, scaled by its largest magnitude first (so squares of tiny deltas
    neither underflow nor lose digits); a zero vector stays zero."""
    top = mx.max(mx.abs(v))
    v = v / mx.where(top > 0, top, 1.0)
    norm = mx.sqrt(kernels.accurate_sum(v * v))
    return v / mx.where(norm > 0, norm, 1.0)


def softmax(v: mx.array) -> mx.array:
    """softmax of a flat v, its denominator summed by levels: each task vector's scores are one row
    of millions of elements, and MLX's plain CPU sum of that many drifts."""
    e = mx.exp(v - mx.max(v))
    return e / kernels.accurate_sum(e)


def balancing(tvs: list[mx.array]) -> list[mx.array]:
    """beta_i = intra_i * inter_i for the flat task vectors."""
    n = len(tvs)
    inter: list[mx.array | None] = [None] * n
    for i in range(n):
        for j in range(i, n):  # Norm(delta_i * delta_j) is symmetric in i and j
            s = softmax(unit(tvs[i] * tvs[j]))
            inter[i] = s if inter[i] is None else inter[i] + s
            if j != i:
                inter[j] = s if inter[j] is None else inter[j] + s
    return [softmax(n * unit(tv * tv)) * inter_i for tv, inter_i in zip(tvs, inter)]


def pcb(inputs: MergeInputs) -> mx.array:
    base_in = inputs.tensors[inputs.base]
    others = inputs.non_base
    if not others:
        return base_in
    base = float32(base_in)
    tvs = [(float32(inputs.tensors[i]) - base).reshape(-1) for i in others]
    keep = int(inputs.shared["density"] * base.size)
    kept = [mx.where(kernels.topk_mask(b, keep), b, 0.0) for b in balancing(tvs)]
    total = sum(kept)
    merged = sum(k * tv for k, tv in zip(kept, tvs)) / mx.where(total > 0, total, 1.0)
    return (base + inputs.shared["weight"] * merged.reshape(base.shape)).astype(base_in.dtype)


METHODS = [
    Method(
        "pcb",
        pcb,
        params=(
            Param(
                "density",
                float,
                "shared",
                valid=Range(0, 1, lo_open=True),
                why="the fraction of each task vector kept by its balancing score; 0 would keep none",
            ),
            Param("weight", float, "shared", default=1.0, valid=FINITE, why="result = base + weight * merged task vector"),
        ),
        base="required",
        working_copies=16,  # per task vector its delta, intra, inter, beta and kept scores (three models), and the sums
        gpu_kernels=("select",),
        doc=(
            "PCB: scores each task vector's elements by intra-task (softmax of its squared, normalised "
            "delta) times inter-task balancing (summed softmaxes of its products with every task vector), "
            "keeps the top density of each, and adds the score-weighted mean of the kept deltas, times "
            "weight, to the base. The paper's formulas, mergekit pull request #432's parameters."
        ),
    )
]
