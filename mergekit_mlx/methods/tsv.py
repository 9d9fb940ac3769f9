"""TSV-Merge (Gargiulo et al., arXiv 2412.00081, "Task Singular Vectors"): low-rank task vectors,
decorrelated before they are summed.

Per 2-D tensor of N task vectors (each times its `weight`): the SVD of each, U_i S_i Vh_i, keeps its
top k = int(r * (1 / N)) directions (r = min(m, n)); the kept left vectors side by side, U = [U_1k
.. U_Nk], and the kept right vectors stacked, V = [Vh_1k; ..; Vh_Nk], are replaced by their
orthogonal factors (U Vh of their own SVDs), which removes the overlap between tasks' subspaces;
merged = orth(U) diag(S_1k .. S_Nk) orth(V), and the result is base + alpha * merged.

Semantics, names and defaults follow FusionBench's reference (fusion_bench/method/task_singular_vector,
TSVM_utils.compute_and_sum_svd_mem_reduction, config TaskSingularVectorMerging.yaml: alpha 1). Its
`alpha` as a list (one factor per task vector, applied before the SVD) is `weight` here, per model,
default 1. A matrix with fewer than N directions (k = 0) keeps nothing: its merged task vector is 0,
as in the reference. A tensor that is not 2-D, or has `decompose: false`, gets the mean of the
weighted task vectors. The reference puts the kept directions in full r-column matrices padded with
zero columns; the orthogonal factor of the kept columns alone is the same on them (the zero columns
meet zero singular values), so only those are factored. The SVDs run in numpy on the host, in
float64 (methods/subspace.py).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .base import FINITE, MergeInputs, Method, Param
from .subspace import DECOMPOSE, finite, orthogonal_factor, subspace_merge, thin_svd


def tsv_matrix(tvs: list[np.ndarray]) -> np.ndarray:
    """TSV-M's merged task vector of 2-D (weighted) task vectors (float32 numpy in, float64 out)."""
    shape = tvs[0].shape
    if not finite(*tvs):
        return np.full(shape, np.nan, np.float32)
    keep = int(min(shape) * (1 / len(tvs)))  # the reference's sv_reduction = 1 / N
    if keep == 0:
        return np.zeros(shape, np.float32)
    lefts, values, rights = [], [], []
    for w in tvs:
        u, s, vh = thin_svd(w)
        lefts.append(u[:, :keep])
        values.append(s[:keep])
        rights.append(vh[:keep])
    left = orthogonal_factor(np.concatenate(lefts, axis=1))
    right = orthogonal_factor(np.concatenate(rights, axis=0))
    return (left * np.concatenate(values)) @ right


def tsv_m(inputs: MergeInputs) -> mx.array:
    return subspace_merge(inputs, tsv_matrix, "alpha", weighted=True)


METHODS = [
    Method(
        "tsv_m",
        tsv_m,
        params=(
            Param("weight", float, "non_base", default=1.0, valid=FINITE, why="the task vector's factor before its SVD"),
            Param("alpha", float, "shared", default=1.0, valid=FINITE, why="the merged task vector's multiplier"),
            DECOMPOSE,
        ),
        base="required",
        # in float32 sizes, for up to three models: host task vectors, one SVD's factors, the kept
        # factors side by side and their orthogonal factors (float64: two each)
        working_copies=15,
        doc=(
            "TSV-M (arXiv 2412.00081, FusionBench's reference): each weighted task vector's top 1/N singular "
            "directions, the left and the right ones each replaced by their orthogonal factor, summed with "
            "their singular values; base + alpha * that. Non-2-D tensors (and decompose: false) take the mean "
            "of the weighted task vectors. SVD: numpy, float64, on the host."
        ),
    ),
]
