"""Model Stock: move from the base towards the average of the fine-tunes by an angle-derived ratio.

t = N cos / (1 + (N - 1) cos), where cos is the mean pairwise cosine between the N task vectors
(per row of the last axis with filter_wise), and the result is t * average + (1 - t) * base, as in
mergekit 0.1.5. Where 1 + (N - 1) cos is ~0 there is no finite estimate and the base is kept.
"""

from __future__ import annotations

import mlx.core as mx

from .base import MergeInputs, Method, Param, float32

COS_NORM_FLOOR = 1e-6  # |a||b| is clamped to this before dividing
SINGULAR = 1e-6  # |1 + (N - 1) cos| below this keeps the base


def model_stock(inputs: MergeInputs) -> mx.array:
    base = float32(inputs.tensors[inputs.base])
    ws = [float32(inputs.tensors[i]) for i in inputs.non_base]
    shape = base.shape
    if inputs.shared["filter_wise"]:
        if base.ndim <= 1:
            base, ws = base.reshape(1, -1), [w.reshape(1, -1) for w in ws]
    else:
        base, ws = base.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - base for w in ws]
    norms = [mx.linalg.norm(o, axis=-1) for o in offsets]
    cosines = [
        mx.clip(mx.sum(offsets[i] * offsets[j], axis=-1) / mx.maximum(norms[i] * norms[j], COS_NORM_FLOOR), -1.0, 1.0)
        for i in range(len(offsets))
        for j in range(i + 1, len(offsets))
    ]
    cos = mx.expand_dims(sum(cosines) / len(cosines), -1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = mx.abs(denominator) < SINGULAR
    t = mx.where(singular, 0.0, (n * cos) / mx.where(singular, 1.0, denominator))
    average = sum(ws) / n
    out = t * average + (1 - t) * base
    return out.reshape(shape).astype(inputs.tensors[inputs.base].dtype)


METHODS = [
    Method(
        "model_stock",
        model_stock,
        params=(Param("filter_wise", bool, "shared", default=False),),
        base="required",
        min_inputs=3,
        doc=(
            "Model Stock: t = N cos / (1 + (N-1) cos) from the mean pairwise cosine of the N task vectors, "
            "result t * mean(models) + (1 - t) * base. Needs a base and at least two other models. "
            "filter_wise computes one t per row (last axis) instead of one per tensor."
        ),
    )
]
