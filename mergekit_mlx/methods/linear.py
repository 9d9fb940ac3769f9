"""Weighted averages: `linear` (model soups) and `passthrough` (copy one input, optionally scaled)."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .. import kernels
from ..errors import RecipeError
from .base import FINITE, MergeInputs, Method, Param, float32


def linear(inputs: MergeInputs) -> mx.array:
    weights = [p["weight"] for p in inputs.per_input]
    total = sum(weights)
    if inputs.shared["normalize"] and abs(total) < 1e-8:
        raise RecipeError(
            f"parameters.weight: the weights for {inputs.name} sum to {total:g}, so normalize: true would divide "
            "by zero; change the weights or set normalize: false"
        )
    coefficients = [w / total for w in weights] if inputs.shared["normalize"] else weights
    return kernels.weighted_sum(mx.array(coefficients, dtype=mx.float32), inputs.tensors)


def passthrough(inputs: MergeInputs) -> mx.array:
    x = inputs.tensors[0]
    scale = inputs.per_input[0]["scale"]
    return x if scale is None else (float32(x) * scale).astype(x.dtype)


def check_linear(shared: dict, per_input: list[dict], base) -> tuple[None, str] | None:
    total = sum(p["weight"] for p in per_input)
    if shared["normalize"] and abs(total) < 1e-8:
        return None, f"the weights sum to {total:g}, so normalize: true would divide by zero; change them or set normalize: false"
    return None


METHODS = [
    Method(
        "linear",
        linear,
        params=(
            Param("weight", float, "input", valid=FINITE),
            Param("normalize", bool, "shared", default=True),
        ),
        base="optional",
        propagates_nonfinite=True,
        working_copies=0,  # one fused loop (a float32 running sum past 16 inputs on a GPU)
        check=check_linear,
        gpu_kernels=("weighted_sum",),
        doc="Weighted average sum(w_i * x_i), divided by sum(w_i) when normalize (default true).",
    ),
    Method(
        "passthrough",
        passthrough,
        params=(Param("scale", Optional[float], "input", default=None, valid=FINITE),),  # noqa: UP045 (a runtime kind)
        base="optional",
        max_inputs=1,
        propagates_nonfinite=True,
        doc="Copies its single input (optionally times `scale`); with slices it stacks layer ranges.",
    ),
]
