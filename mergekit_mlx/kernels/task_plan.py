"""What the fused task merge is told: its switches, one frozen job, and a plan per task model.

The switches follow mergekit's SparsificationMethod / ConsensusMethod; the per-model `Keep` codes
are the ones the kernels read (kernels/task_params.inc) and the CPU loops test.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum

import mlx.core as mx
import numpy as np


class Sparsify(str, Enum):
    """How each task vector is sparsified inside the fused merge."""

    MAGNITUDE = "magnitude"  # exact top-k of |delta|, ties lowest index first
    RANDOM = "random"  # DARE: kept with probability density, by the counter-based generator


class Consensus(str, Enum):
    """How the signs of the task vectors are agreed."""

    SUM = "sum"  # TIES: per element, only the deltas whose sign matches the weighted sum's


class Keep(IntEnum):
    """What one task vector keeps (the code the kernels and the CPU loops read)."""

    ALL = 0
    NONE = 1
    MAGNITUDE = 2  # the selection (t, cut)
    RANDOM = 3  # the random mask (keys, p)


ONE_F32 = mx.array(1.0, dtype=mx.float32)  # the scale of a model that is not rescaled


@dataclass
class ModelPlan:
    """How one task vector is sparsified, as scalars the combine step (or kernel) reads."""

    mode: Keep
    t: mx.array  # uint32
    cut: mx.array  # uint32
    keys: tuple[int, int]
    p: float
    scale: mx.array  # float32: rescale factor (1 when not rescaling)
    row: int = 0  # GPU: this model's row in the [t, cut] array of the magnitude selections
    mask: np.ndarray | None = None  # CPU: a random model's keep mask, drawn by the L1 pass


@dataclass(frozen=True, eq=False)
class TaskMerge:
    """One fused merge's inputs and settings, as every backend's merge step takes them."""

    base: mx.array
    others: tuple[mx.array, ...]
    weights: tuple[float, ...]
    consensus: bool
    normalize: bool
    lam: float
    divisor: float  # the sum of the weights (1 when ~0): normalize's divisor without consensus


def plain_divisor(weights: list[float]) -> float:
    # float32 adds in order, on the host (numpy rounds each add as MLX does): no device sync
    s = np.float32(0.0)
    for w in weights:
        s = np.float32(s + np.float32(w))
    v = float(s)
    return 1.0 if abs(v) < 1e-8 else v
