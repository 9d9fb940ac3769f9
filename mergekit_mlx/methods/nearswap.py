"""NearSwap: take the other model's value where it is close to the base, keep the base elsewhere."""

from __future__ import annotations

import mlx.core as mx

from .base import MergeInputs, Method, Param, Range, float32

DIFF_FLOOR = 1e-6  # |base - other| is clamped to this before dividing


def nearswap(inputs: MergeInputs) -> mx.array:
    a = float32(inputs.tensors[inputs.base])
    b = float32(inputs.tensors[inputs.non_base[0]])
    weight = mx.clip(inputs.shared["t"] / mx.maximum(mx.abs(a - b), DIFF_FLOOR), 0.0, 1.0)
    return (weight * b + (1 - weight) * a).astype(inputs.tensors[inputs.base].dtype)


METHODS = [
    Method(
        "nearswap",
        nearswap,
        params=(
            Param(
                "t",
                float,
                "shared",
                valid=Range(0, lo_open=True),
                why="t is the distance below which the other model's value is taken; 0 or less keeps the base",
            ),
        ),
        base="required",
        min_inputs=2,
        max_inputs=2,
        doc=(
            "Per element w = clip(t / |base - other|, 0, 1), result w * other + (1 - w) * base: elements "
            "that differ by at most t become the other model's, larger differences move only by about t."
        ),
    )
]
