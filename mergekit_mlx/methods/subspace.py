"""What the subspace merges (iso_c, iso_cts, tsv_m, wudi) share: task vectors, which tensors are
decomposed, the thin SVD and the orthogonal (polar) factor of a matrix.

Task vectors are `model - base` in float32 (`weight` times it where a method takes weights). The
references (FusionBench) decompose every 2-D tensor not named in their `exclude_keys`, embeddings
and output heads included, and give every other tensor (norms, biases, 1-D and 3-D+ tensors) the
mean of the task vectors; the `decompose` parameter, set per tensor with a filter, is that list
here (false: the mean).

Where the SVD runs: numpy on the host, whatever MLX's device, through the eigendecomposition of the
smaller Gram matrix in float64 (x^T x = V S^2 V^T, U = x V / S): within 5e-9 of LAPACK's float64
SVD on the 0.85B family's matrices and 2-3x as fast as its float32 SVD (gesdd, what the
references' torch.linalg.svd runs), whose merges are 3e-7 to 2e-6 off float64 there
(benchmarks/RESULTS.md 17).
MLX's `linalg.svd` runs only on its CPU stream (it raises on a GPU stream), and MLX's Linux CPU
wheel links the reference LAPACK, several times slower than numpy's OpenBLAS on the same cores.
The orthogonal factor U Vh of a matrix's SVD is the nearest matrix with orthonormal columns (rows,
when wide). Where the matrix is rank-deficient (two identical fine-tunes, low-rank task vectors)
the reference's factor is not unique: LAPACK's choice of the null singular vectors adds directions
that no task vector has, with weights as large as the rest. Here the directions whose singular
value is numerically zero, at or below RANK_TOLERANCE * float32 eps * the largest (the inputs are
float32), are left out (their U columns and singular values are 0): the factor is the partial
isometry on the matrix's numerical range, which is the reference's factor wherever that one is
unique. Measured in float32: exactly dependent columns leave singular
values of at most 0.16 eps * largest, a rank-32 sum of 2048 x 2048 products 0.07 eps, while the
smallest singular value of a random 2048 x 2048 matrix is about 660 eps * largest (numpy's
matrix_rank rule, max(m, n) * eps, would cut genuine directions of square matrices: 2048 * eps).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from .base import MergeInputs, Param, float32

DECOMPOSE = Param("decompose", bool, "shared", default=True)
RANK_TOLERANCE = 4.0  # singular values at or below this many eps of the largest count as zero

# one tensor's numpy decompositions at a time, each on all of OpenBLAS's threads, rather than
# several merge threads' OpenBLAS threads competing for the same cores
HOST_LINALG = threading.Lock()


def task_vectors(inputs: MergeInputs, weighted: bool = False) -> list[mx.array]:
    """`model - base` of each input but the base, in float32 (times its `weight` when `weighted`)."""
    base = float32(inputs.tensors[inputs.base])
    out = [float32(inputs.tensors[i]) - base for i in inputs.non_base]
    if weighted:
        out = [t * inputs.per_input[i]["weight"] for t, i in zip(out, inputs.non_base)]
    return out


def decomposed(inputs: MergeInputs) -> bool:
    """Whether this tensor is merged in its singular subspaces (a 2-D tensor, `decompose` true)."""
    return inputs.tensors[inputs.base].ndim == 2 and inputs.shared["decompose"]


def mean(tvs: list[mx.array]) -> mx.array:
    """The mean of the task vectors: what the references give a tensor they do not decompose."""
    return sum(tvs[1:], tvs[0]) / len(tvs)


def on_base(inputs: MergeInputs, merged: mx.array | np.ndarray, scale: float = 1.0) -> mx.array:
    """base + scale * merged task vector, in float32 (float64 for a float64 base), rounded once to
    the base's dtype."""
    base = inputs.tensors[inputs.base]
    if isinstance(merged, np.ndarray):  # float32 unless the base is float64 (MLX's float64 is CPU-only)
        wide = base.dtype == mx.float64
        merged = mx.array(merged, dtype=mx.float64 if wide else mx.float32)
    if scale != 1:
        merged = merged * scale
    return (float32(base) + merged).astype(base.dtype)


def subspace_merge(
    inputs: MergeInputs, matrix: Callable[[list[np.ndarray]], np.ndarray], scale_key: str, weighted: bool = False
) -> mx.array:
    """base + `scale_key` * matrix(task vectors), the decomposition on the host one tensor at a time;
    the base alone without task models, the mean task vector for a tensor not decomposed."""
    if not inputs.non_base:
        return inputs.tensors[inputs.base]
    tvs = task_vectors(inputs, weighted=weighted)
    scale = inputs.shared[scale_key]
    if not decomposed(inputs):
        return on_base(inputs, mean(tvs), scale)
    hosted = [host(t) for t in tvs]
    with HOST_LINALG:
        merged = matrix(hosted)
    return on_base(inputs, merged, scale)


def host(x: mx.array) -> np.ndarray:
    """A float32 numpy copy of an MLX array, float64 kept (evaluates it)."""
    return np.array(float32(x), copy=True)


def finite(*xs: np.ndarray) -> bool:
    """No decomposition is defined with NaN/Inf: such a tensor's merge is NaN, which the run reports."""
    return all(bool(np.isfinite(x).all()) for x in xs)


def thin_svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U (m, r), S (r,) descending, Vh (r, n) with x = U diag(S) Vh, r = min(m, n), in float64, from
    the smaller Gram matrix's eigendecomposition; numerically zero directions have U columns of 0."""
    if x.shape[0] < x.shape[1]:
        v, s, uh = thin_svd(x.T)
        return uh.T, s, v.T
    gram = np.zeros((x.shape[1], x.shape[1]))
    for rows in _row_blocks(x):  # float64 a block at a time: no float64 copy of a large x
        gram += rows.T @ rows
    w, v = np.linalg.eigh(gram)
    w, v = w[::-1], np.ascontiguousarray(v[:, ::-1])
    s = np.sqrt(np.maximum(w, 0.0))
    r = numerical_rank(s)
    u = np.zeros((x.shape[0], s.size))
    start = 0
    for rows in _row_blocks(x):
        u[start : start + rows.shape[0], :r] = (rows @ v[:, :r]) / s[:r]
        start += rows.shape[0]
    s[r:] = 0.0
    return u, s, v.T


def _row_blocks(x: np.ndarray, elements: int = 1 << 22):
    """x's rows in float64, about `elements` values at a time."""
    step = max(1, elements // max(1, x.shape[1]))
    for i in range(0, x.shape[0], step):
        yield x[i : i + step].astype(np.float64)


def numerical_rank(s: np.ndarray) -> int:
    """How many of the descending singular values `s` are above the float32 inputs' rounding noise."""
    if s.size == 0:
        return 0
    return int((s > s[0] * RANK_TOLERANCE * np.finfo(np.float32).eps).sum())


def orthogonal_factor(x: np.ndarray) -> np.ndarray:
    """U Vh of x's thin SVD over its numerical rank: the matrix with orthonormal columns (or rows)
    nearest to x where x has full rank, the partial isometry on x's range otherwise."""
    if x.size == 0:
        return x
    u, s, vh = thin_svd(x)
    r = numerical_rank(s)
    return u[:, :r] @ vh[:r]
