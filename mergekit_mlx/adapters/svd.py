"""The truncated SVD of a task vector, as LoRA factors: dW ~ B·A with A (r, in), B (out, r).

Two methods, both in float32 (`SvdMethod`):

  EXACT       diagonalises the Gram matrix of dW's smaller side and projects dW on the top r
              eigenvectors: the best rank-r approximation within float32 rounding (MLX's
              `linalg.svd` would build both full square factors: 67 s for a 5632 x 2048 matrix here).
  RANDOMIZED  Halko, Martinsson and Tropp (2011), algorithm 4.4: a Gaussian sketch of r + oversample
              columns, then power iterations re-orthonormalised by QR until one improves the rank-r
              relative error by less than `tolerance` (that error is known from the sketch alone:
              ||dW||^2 minus its top r eigenvalues), then the same projection on the sketch's range.

Either way B·A is an orthogonal projection of dW, so its error is at least the optimal one, and the
singular values kept are the norms of the projected rows: exact even where squaring in the Gram
matrix lost the small eigenvalues. How S is split between A and B is mergekit's (`distribute_scale`:
B = U·sqrt(S), A = sqrt(S)·Vh; else B = U, A = S·Vh), and so is `sv_epsilon` (keep only singular
values above it, an absolute threshold).

Where it runs: the products of the whole matrix in MLX on a GPU and in numpy on the CPU; the QRs and
eigen-decompositions (of a sketch, or of one Gram matrix) in numpy everywhere. MLX has those only on its
CPU stream, and MLX's Linux CPU wheel links the reference BLAS and LAPACK: a 2048 x 2048 float32 product
takes 4.5 s there and 0.2 s in numpy's OpenBLAS on the same two cores, an eigh of 2048 x 2048 7 s
against 0.8 s (benchmarks/RESULTS.md 11). On an NVIDIA GPU, MLX multiplies float32 as TF32 unless
MLX_ENABLE_TF32=0 is set before it starts, which bounds the factors' accuracy to about 3e-4 relative
(below bfloat16's rounding of the factors written).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from enum import Enum
from typing import Any

import mlx.core as mx
import numpy as np


class SvdMethod(Enum):
    EXACT = "exact"
    RANDOMIZED = "randomized"


@dataclass(frozen=True)
class Factors:
    """dW ~ b @ a, with a: (r, in), b: (out, r), and the singular values kept (float32)."""

    a: mx.array
    b: mx.array
    singular_values: mx.array


@dataclass(frozen=True)
class SvdSettings:
    method: SvdMethod = SvdMethod.RANDOMIZED
    sv_epsilon: float = 0.0
    distribute_scale: bool = True
    oversample: int = 10  # RANDOMIZED: extra columns of the sketch
    power_iterations: int = 16  # RANDOMIZED: the most passes of subspace iteration
    tolerance: float = 1e-4  # RANDOMIZED: stop when a pass improves the relative error by less


def tensor_seed(seed: int, name: str) -> int:
    """The seed of one tensor's sketch: the same seed and name give the same factors."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63)


def low_rank(
    delta: mx.array, rank: int, settings: SvdSettings = SvdSettings(), seed: int = 0, *, numpy: bool | None = None
) -> Factors:
    """The factors of the best rank-`rank` approximation of a matrix (EXACT), or their randomized
    estimate (RANDOMIZED); fewer where `sv_epsilon` drops singular values. `numpy`: compute in numpy
    (True) or MLX (False); None: numpy when MLX's default device is the CPU."""
    if delta.ndim != 2:
        raise ValueError(f"low_rank needs a matrix, got shape {delta.shape}")
    ops = _ops(numpy)
    x = ops.take(delta)
    rows, cols = x.shape
    rank = max(0, min(rank, rows, cols))
    sketch = min(rank + settings.oversample, rows, cols)
    if settings.method is SvdMethod.RANDOMIZED and sketch < min(rows, cols):
        basis, small = _randomized_range(ops, x, rank, sketch, settings, seed)
        u = ops.top_eigenvectors(ops.gram64(small), rank)
        s, a, b = _split(ops, u.T @ small, basis @ u, settings, transposed=False)
    elif rows <= cols:
        left = ops.top_eigenvectors(ops.gram(x), rank)  # U (rows, r)
        s, a, b = _split(ops, left.T @ x, left, settings, transposed=False)
    else:
        right = ops.top_eigenvectors(ops.gram(ops.transpose(x)), rank)  # V (cols, r)
        s, a, b = _split(ops, (x @ right).T, right.T, settings, transposed=True)
    return Factors(ops.give(a), ops.give(b), ops.give(s))


def relative_error(delta: mx.array, a: mx.array, b: mx.array, *, numpy: bool | None = None) -> float:
    """||dW - b @ a||_F / ||dW||_F, b and a as given (their dtype's rounding counts), in float32."""
    ops = _ops(numpy)
    x = ops.take(delta)
    residual = x - ops.take(b) @ ops.take(a) if a.size else x
    norm, left = ops.sum_of_squares(x), ops.sum_of_squares(residual)
    return math.sqrt(left / norm) if norm > 0 else (0.0 if left == 0 else math.inf)


def _randomized_range(ops: _Ops, x, rank: int, k: int, settings: SvdSettings, seed: int):
    """An orthonormal (rows, k) basis Q of dW's dominant range, and Q.T @ dW."""
    total = ops.sum_of_squares(x)
    q = ops.orthonormal(x @ ops.normal((x.shape[1], k), seed))
    small = q.T @ x  # (k, cols)
    previous = math.inf
    for _ in range(settings.power_iterations):
        kept = float(ops.eigvalsh64(ops.gram64(small))[-rank:].sum()) if rank else 0.0
        error = math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0
        if previous - error < settings.tolerance:
            break
        previous = error
        q = ops.orthonormal(x @ ops.orthonormal(small.T))
        small = q.T @ x
    return q, small


def _split(ops: _Ops, loaded, orth, settings: SvdSettings, *, transposed: bool):
    """(s, a, b) from an orthonormal side `orth` and the loaded side `loaded` = S·(other side), (r, n).

    Not transposed: dW ~ orth @ loaded (orth = U, loaded = S·Vh). Transposed: dW ~ loaded.T @ orth
    (orth = Vh, loaded.T = U·S)."""
    xp = ops.xp
    s = xp.sqrt(xp.sum(loaded * loaded, axis=1))
    order = xp.argsort(-s)
    s, loaded = s[order], loaded[order]
    orth = orth[order] if transposed else orth[:, order].T  # as rows from here on
    keep = s.shape[0]
    if settings.sv_epsilon > 0:
        keep = int((s > settings.sv_epsilon).sum())  # mergekit: rank = min(R, #(s > epsilon))
    s, loaded, orth = s[:keep], loaded[:keep], orth[:keep]
    unit = loaded / xp.where(s > 0, s, 1.0)[:, None]  # a zero singular value has a zero row: nothing to divide
    u, vh = (unit.T, orth) if transposed else (orth.T, unit)
    left = xp.sqrt(s) if settings.distribute_scale else xp.ones_like(s)
    return s, vh * (s / xp.where(left > 0, left, 1.0))[:, None], u * left[None, :]


# ---------------- the two places it runs ----------------


@dataclass(frozen=True)
class _Ops:
    """What the algorithms above need beyond `@`, `.T`, indexing and `xp`'s elementwise functions."""

    xp: Any  # numpy or mlx.core

    def take(self, a: mx.array):
        raise NotImplementedError

    def give(self, a) -> mx.array:
        raise NotImplementedError


class _NumpyOps(_Ops):
    def take(self, a: mx.array) -> np.ndarray:
        return np.asarray(a.astype(mx.float32), dtype=np.float32)

    def give(self, a: np.ndarray) -> mx.array:
        return mx.array(np.ascontiguousarray(a, dtype=np.float32))

    def transpose(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.T)

    def gram(self, x: np.ndarray) -> np.ndarray:
        return x @ x.T

    def gram64(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return x @ x.T

    def top_eigenvectors(self, gram: np.ndarray, count: int) -> np.ndarray:
        _, vectors = np.linalg.eigh(gram)
        return np.ascontiguousarray(vectors[:, ::-1][:, :count], dtype=np.float32)

    def eigvalsh64(self, gram: np.ndarray) -> np.ndarray:
        return np.linalg.eigvalsh(gram)

    def orthonormal(self, y: np.ndarray) -> np.ndarray:
        return np.linalg.qr(y)[0]

    def normal(self, shape: tuple[int, int], seed: int) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)

    def sum_of_squares(self, x: np.ndarray) -> float:
        return float(np.einsum("ij,ij->", x, x, dtype=np.float64))


class _MlxOps(_NumpyOps):
    """On a GPU: the products of the whole matrix in MLX; the small factorizations in numpy, as on the CPU."""

    def take(self, a: mx.array) -> mx.array:
        return a.astype(mx.float32)

    def give(self, a) -> mx.array:
        return a if isinstance(a, mx.array) else mx.array(np.ascontiguousarray(a, dtype=np.float32))

    def transpose(self, x: mx.array) -> mx.array:
        return mx.contiguous(x.T)

    def gram(self, x: mx.array) -> np.ndarray:
        return np.asarray(x @ x.T)

    def gram64(self, x: mx.array) -> np.ndarray:
        return super().gram64(np.asarray(x))

    def top_eigenvectors(self, gram: np.ndarray, count: int) -> mx.array:
        return mx.array(super().top_eigenvectors(gram, count))

    def orthonormal(self, y: mx.array) -> mx.array:
        return mx.array(super().orthonormal(np.asarray(y)))

    def normal(self, shape: tuple[int, int], seed: int) -> mx.array:
        return mx.random.normal(shape, key=mx.random.key(seed))

    def sum_of_squares(self, x: mx.array) -> float:
        # by rows first: MLX's one-pass float32 sum of a whole 5632 x 2048 matrix is 2% off (on the CPU)
        return float(np.sum(np.asarray(mx.sum(x * x, axis=-1)), dtype=np.float64))


_NUMPY = _NumpyOps(np)
_MLX = _MlxOps(mx)


def _ops(numpy: bool | None) -> _Ops:
    if numpy is None:
        numpy = mx.default_device() == mx.cpu
    return _NUMPY if numpy else _MLX
