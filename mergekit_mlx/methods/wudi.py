"""WUDI merging (Cheng et al., arXiv 2503.08099, "Whoever Started the Interference Should End It").

Per 2-D tensor of N task vectors T_i (m, n), the merged task vector t minimises the interference
each task's own inputs meet, which the paper estimates with the task vector's rows:

    loss(t) = sum_i ||(t - T_i) T_i^T||_F^2 / ||T_i||_F^2

starting from t = sum_i T_i, by `iter_num` steps of Adam (learning rate `learning_rate`, betas
0.9/0.999, eps 1e-8, bias-corrected, no weight decay) through MLX's autodiff (`mx.value_and_grad`)
and `mlx.optimizers.Adam`; the result is base + t. Names and defaults follow FusionBench's reference
(fusion_bench/method/wudi/wudi.py, config wudi/wudi.yaml: iter_num 400; its learning rate is fixed
at 1e-5, a parameter here). As there, a tensor that is not 2-D (or has `decompose: false`) gets the
mean of the task vectors, and there is no scaling factor.

Differences, each for a reason: everything is float32 (the reference steps in the model's dtype);
an all-zero task vector adds nothing to the loss (the reference divides 0 by 0 and its merge turns
NaN); where m > n each term is computed as sum((D G) * D) with G = T_i^T T_i (n, n), the same
number as ||D T_i^T||^2 at n^2 m rather than m^2 n multiply-adds a step. Every step is evaluated
before the next, in a fixed order, so a run gives the same bits every time on one device. It runs
on MLX's default device: on a GPU, where its matrix products pay (on an NVIDIA GPU MLX multiplies
float32 as TF32 unless MLX_ENABLE_TF32=0).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim

from .base import MergeInputs, Method, Param, Range
from .subspace import DECOMPOSE, decomposed, mean, on_base, task_vectors


def interference_loss(t: mx.array, tvs: mx.array, inverse_norms: mx.array, grams: mx.array | None = None) -> mx.array:
    """sum_i ||(t - T_i) T_i^T||_F^2 * inverse_norms[i]; `grams` (T_i^T T_i) where the rows outnumber the columns."""
    d = t[None] - tvs
    if grams is None:
        terms = mx.square(d @ tvs.transpose(0, 2, 1)).sum(axis=(1, 2))
    else:
        terms = ((d @ grams) * d).sum(axis=(1, 2))
    return (terms * inverse_norms).sum()


def wudi_descent(tvs: mx.array, iterations: int, learning_rate: float) -> tuple[mx.array, list[mx.array]]:
    """The merged task vector of stacked 2-D task vectors (N, m, n), and the loss before each step."""
    tvs = tvs.astype(mx.float32)
    norms = mx.square(tvs).sum(axis=(1, 2))
    inverse_norms = mx.where(norms > 0, 1.0 / mx.where(norms > 0, norms, 1.0), 0.0)
    m, n = tvs.shape[1:]
    grams = tvs.transpose(0, 2, 1) @ tvs if m > n else None
    params = {"t": tvs.sum(axis=0)}
    mx.eval(params, inverse_norms, grams)

    def loss(p: dict) -> mx.array:
        return interference_loss(p["t"], tvs, inverse_norms, grams)

    step = mx.value_and_grad(loss)
    adam = optim.Adam(learning_rate=learning_rate, betas=[0.9, 0.999], eps=1e-8, bias_correction=True)
    losses = []
    for _ in range(iterations):
        value, grads = step(params)
        params = adam.apply_gradients(grads, params)
        mx.eval(params, adam.state, value)
        losses.append(value)
    return params["t"], losses


def wudi(inputs: MergeInputs) -> mx.array:
    if not inputs.non_base:
        return inputs.tensors[inputs.base]
    tvs = task_vectors(inputs)
    if not decomposed(inputs):
        return on_base(inputs, mean(tvs))
    merged, _ = wudi_descent(mx.stack(tvs), inputs.shared["iter_num"], inputs.shared["learning_rate"])
    return on_base(inputs, merged)


METHODS = [
    Method(
        "wudi",
        wudi,
        params=(
            Param("iter_num", int, "shared", default=400, valid=Range(0, 100_000), why="Adam steps per tensor, bounded"),
            Param(
                "learning_rate",
                float,
                "shared",
                default=1e-5,
                valid=Range(0, 1, lo_open=True),
                why="Adam's step size (the reference's 1e-5 suits task vectors of fine-tunes)",
            ),
            DECOMPOSE,
        ),
        base="required",
        # stacked task vectors, t, its gradient, Adam's two moments, the differences and products of a
        # step and their gradients: counted for up to three task vectors
        working_copies=16,
        doc=(
            "WUDI (arXiv 2503.08099, FusionBench's reference): from the sum of the task vectors, iter_num Adam "
            "steps (learning_rate) on sum_i ||(t - T_i) T_i^T||^2 / ||T_i||^2 through MLX's autodiff; base + t. "
            "Non-2-D tensors (and decompose: false) take the mean of the task vectors. Runs on MLX's device."
        ),
    ),
]
