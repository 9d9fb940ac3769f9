"""Isotropic merging (Marczak et al., arXiv 2502.04959): flatten the singular spectrum of the merge.

    iso_c    the SVD of the sum of the task vectors, M = U S Vh; merged = mean(S) * U Vh (over M's
             numerical rank: methods/subspace.py says why)
    iso_cts  the top directions of that sum (the common subspace, `common_space_fraction` of the
             min(m, n) directions) and, per task vector, the top directions of what is left of it
             outside the common subspace, an equal share each; the left and the right directions
             put side by side, each set replaced by its orthogonal factor, and every direction
             weighted by the mean of all their singular values

Both give base + scaling_factor * merged. Semantics, parameter names and defaults follow FusionBench's
reference (fusion_bench/method/isotropic_merging, configs isotropic_merging/iso_c.yaml and
iso_cts.yaml: scaling_factor 1.0, common_space_fraction 0.8); the paper tunes the scaling factor
on validation data. As there, the common subspace takes int(r * fraction) directions, then gives up
or takes back the few needed for the task-specific rest to divide evenly among the N task vectors
(r - common rounded to a multiple of N, Python's round); where that rounding would ask for more
directions than the matrix has (the reference then fails), each task vector takes one fewer. A
tensor that is not 2-D, or has `decompose: false`, gets the mean of the task vectors (the
references' exclude_keys). The SVDs run in numpy on the host, in float64 (methods/subspace.py).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .base import FINITE, FRACTION, MergeInputs, Method, Param
from .subspace import (
    DECOMPOSE,
    finite,
    numerical_rank,
    orthogonal_factor,
    subspace_merge,
    thin_svd,
)

SCALING = Param("scaling_factor", float, "shared", default=1.0, valid=FINITE, why="the merged task vector's multiplier")


def iso_c_matrix(tvs: list[np.ndarray]) -> np.ndarray:
    """Iso-C's merged task vector of 2-D task vectors (float32 numpy in, float64 out)."""
    total = sum(tvs[1:], tvs[0])
    if not finite(total):
        return np.full(total.shape, np.nan, np.float32)
    u, s, vh = thin_svd(total)
    r = numerical_rank(s)  # the mean counts every singular value, as the reference's
    return (u[:, :r] * s.mean()) @ vh[:r] if s.size else total


def common_dimensions(r: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    """(directions of the common subspace, directions per task vector) of a rank-r matrix."""
    common = int(r * fraction)
    specific = round((r - common) / n_tasks) * n_tasks
    if specific > r:
        specific -= n_tasks
    return r - specific, specific // n_tasks


def iso_cts_matrix(tvs: list[np.ndarray], fraction: float) -> np.ndarray:
    """Iso-CTS's merged task vector of 2-D task vectors (float32 numpy in, float64 out)."""
    total = sum(tvs[1:], tvs[0])
    if not finite(total, *tvs):
        return np.full(total.shape, np.nan, np.float32)
    r = min(total.shape)
    if r == 0:
        return total
    common, per_task = common_dimensions(r, len(tvs), fraction)
    u, s, vh = thin_svd(total)
    lefts, values, rights = [], [], []
    uc = u[:, :common]
    for w in tvs if per_task else ():
        # what the common subspace leaves of this task vector, and its top directions
        ut, st, vt = thin_svd(w - uc @ (uc.T @ w))
        lefts.append(ut[:, :per_task])
        values.append(st[:per_task])
        rights.append(vt[:per_task])
    lefts.append(uc)
    values.append(s[:common])
    rights.append(vh[:common])
    left = orthogonal_factor(np.concatenate(lefts, axis=1))
    right = orthogonal_factor(np.concatenate(rights, axis=0))
    return (left * np.concatenate(values).mean()) @ right


def iso_c(inputs: MergeInputs) -> mx.array:
    return subspace_merge(inputs, iso_c_matrix, "scaling_factor")


def iso_cts(inputs: MergeInputs) -> mx.array:
    fraction = inputs.shared["common_space_fraction"]
    return subspace_merge(inputs, lambda tvs: iso_cts_matrix(tvs, fraction), "scaling_factor")


METHODS = [
    Method(
        "iso_c",
        iso_c,
        params=(SCALING, DECOMPOSE),
        base="required",
        # in float32 sizes, for up to three models: host task vectors, their sum, its float64 copy, U
        # and the product (float64: two each)
        working_copies=10,
        doc=(
            "Iso-C (arXiv 2502.04959, FusionBench's reference): the SVD U S Vh of the sum of the task vectors, "
            "every singular value replaced by their mean; base + scaling_factor * mean(S) U Vh. Non-2-D tensors "
            "(and decompose: false) take the mean of the task vectors. SVD: numpy, float64, on the host."
        ),
    ),
    Method(
        "iso_cts",
        iso_cts,
        params=(
            SCALING,
            Param(
                "common_space_fraction",
                float,
                "shared",
                default=0.8,
                valid=FRACTION,
                why="the share of the min(m, n) singular directions taken from the sum of the task vectors",
            ),
            DECOMPOSE,
        ),
        base="required",
        # in float32 sizes, for up to three models: host task vectors, the sum's SVD, one residual's,
        # the side-by-side factors and their orthogonal factors (float64: two each)
        working_copies=18,
        doc=(
            "Iso-CTS (arXiv 2502.04959, FusionBench's reference): the top common_space_fraction of the singular "
            "directions of the summed task vectors plus an equal share of each task vector's own top directions "
            "outside them, orthogonalised, every direction weighted by the mean singular value; "
            "base + scaling_factor * that. Non-2-D tensors (and decompose: false) take the mean of the task "
            "vectors. SVD: numpy, float64, on the host."
        ),
    ),
]
