"""MagMax (Marczak et al., ECCV 2024, arXiv 2407.06322): per element, the task vector of largest
magnitude.

Follows FusionBench's `magmax` (tanganke/fusion_bench, matched there to the authors' release):
delta_i = x_i - base; per element the delta with the largest |delta_i|, ties going to the later
model (the running choice is replaced when |delta_i| >= |chosen|); result = base + scaling_factor
times the chosen delta. Its default scaling_factor, 0.5, is FusionBench's (the authors' script for
independently fine-tuned models). Every tensor is elementwise, whatever its number of dimensions.
"""

from __future__ import annotations

import mlx.core as mx

from .base import FINITE, MergeInputs, Method, Param, float32


def max_magnitude(deltas: list[mx.array]) -> mx.array:
    """Per element the delta of largest magnitude; on equal magnitudes the later one."""
    chosen = deltas[0]
    for d in deltas[1:]:
        chosen = mx.where(mx.abs(d) >= mx.abs(chosen), d, chosen)
    return chosen


def magmax(inputs: MergeInputs) -> mx.array:
    base_in = inputs.tensors[inputs.base]
    if not inputs.non_base:
        return base_in
    base = float32(base_in)
    chosen = max_magnitude([float32(inputs.tensors[i]) - base for i in inputs.non_base])
    return (base + inputs.shared["scaling_factor"] * chosen).astype(base_in.dtype)


METHODS = [
    Method(
        "magmax",
        magmax,
        params=(
            Param("scaling_factor", float, "shared", default=0.5, valid=FINITE, why="result = base + scaling_factor * delta"),
        ),
        base="required",
        doc=(
            "MagMax: per element the task vector of largest magnitude (ties: the later model), times "
            "scaling_factor (default 0.5, FusionBench's), added to the base."
        ),
    )
]
