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
NaN). The loss is a quadratic in t: with G_i = T_i^T T_i / ||T_i||^2 (n, n), A = sum_i G_i and
B = sum_i T_i G_i, computed once, loss(t) = sum(t * (t A - 2 B)) + sum_i sum(T_i * T_i G_i), the
same function as the reference's; a step is then one (m, n) by (n, n) product and its gradient's,
whatever N, where the reference's is 2N products of (m, n) by (n, m) and their gradients. Where
n > 2 N m (a very wide matrix) A would cost more than it saves, and the loss is summed as written
instead. Every step is evaluated before the next, in a fixed order, so a run gives the same bits
every time on one device. It runs on MLX's default device: on a GPU, where its products pay (on an
NVIDIA GPU MLX multiplies float32 as TF32 unless MLX_ENABLE_TF32=0). On the CPU the products (A and
B, and each step's t A with its gradient, as an `mx.custom_function` inside MLX's autodiff) are
numpy's: MLX's Linux CPU wheel multiplies with the reference BLAS, about 40x slower than numpy's
OpenBLAS on the same cores (benchmarks/RESULTS.md 17); a step is still a full-size product, so
WUDI belongs on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from .base import MergeInputs, Method, Param, Range, float32
from .subspace import DECOMPOSE, HOST_LINALG, decomposed, mean, on_base, task_vectors


def interference_loss(t: mx.array, tvs: mx.array, inverse_norms: mx.array) -> mx.array:
    """sum_i ||(t - T_i) T_i^T||_F^2 * inverse_norms[i], summed as written."""
    d = t[None] - tvs
    return (mx.square(d @ tvs.transpose(0, 2, 1)).sum(axis=(1, 2)) * inverse_norms).sum()


@mx.custom_function
def host_product(t: mx.array, a: mx.array) -> mx.array:
    """t @ a through numpy's BLAS (the CPU's products; MLX's gradient of it below)."""
    return mx.array(np.array(t, copy=False) @ np.array(a, copy=False))


@host_product.vjp
def _host_product_vjp(primals, cotangent, output):
    t, a = primals
    return mx.array(np.array(cotangent, copy=False) @ np.array(a, copy=False).T), mx.zeros_like(a)


@dataclass(frozen=True)
class Quadratic:
    """The interference loss as sum(t * (t @ a - 2 b)) + c."""

    a: mx.array  # sum_i T_i^T T_i / ||T_i||^2, (n, n)
    b: mx.array  # sum_i T_i T_i^T T_i / ||T_i||^2, (m, n)
    c: mx.array  # sum_i ||T_i T_i^T||^2 / ||T_i||^2
    on_host: bool = False  # products through numpy

    def __call__(self, t: mx.array) -> mx.array:
        product = host_product(t, self.a) if self.on_host else t @ self.a
        return (t * (product - 2 * self.b)).sum() + self.c


def quadratic(tvs: mx.array, inverse_norms: mx.array, on_host: bool = False) -> Quadratic:
    """The loss's quadratic form; its products in numpy when `on_host`."""
    if not on_host:
        grams = (tvs.transpose(0, 2, 1) @ tvs) * inverse_norms[:, None, None]
        b_terms = tvs @ grams
        return Quadratic(grams.sum(axis=0), b_terms.sum(axis=0), (tvs * b_terms).sum())
    t = np.array(tvs, copy=False)
    grams = np.matmul(t.transpose(0, 2, 1), t) * np.array(inverse_norms)[:, None, None]
    b_terms = np.matmul(t, grams)
    c = np.float32((t.astype(np.float64) * b_terms).sum())
    return Quadratic(mx.array(grams.sum(axis=0)), mx.array(b_terms.sum(axis=0)), mx.array(c), on_host=True)


def wudi_descent(
    tvs: mx.array, iterations: int, learning_rate: float, on_host: bool | None = None
) -> tuple[mx.array, list[mx.array]]:
    """The merged task vector of stacked 2-D task vectors (N, m, n), and the loss before each step.
    `on_host`: the products in numpy (None: where MLX's default device is the CPU)."""
    if on_host is None:
        on_host = mx.default_device() == mx.cpu
    tvs = float32(tvs)
    norms = mx.square(tvs).sum(axis=(1, 2))
    inverse_norms = mx.where(norms > 0, 1.0 / mx.where(norms > 0, norms, 1.0), 0.0)
    n_tasks, m, n = tvs.shape
    mx.eval(tvs, inverse_norms)
    if n <= 2 * n_tasks * m:
        form = quadratic(tvs, inverse_norms, on_host)
        mx.eval(form.a, form.b, form.c)
    else:

        def form(t: mx.array) -> mx.array:
            return interference_loss(t, tvs, inverse_norms)

    params = {"t": tvs.sum(axis=0)}
    mx.eval(params, inverse_norms)
    step = mx.value_and_grad(lambda p: form(p["t"]))
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
    stacked = mx.stack(tvs)
    if mx.default_device() == mx.cpu:
        with HOST_LINALG:  # one tensor's numpy products at a time, on all of OpenBLAS's threads
            merged, _ = wudi_descent(stacked, inputs.shared["iter_num"], inputs.shared["learning_rate"])
    else:
        merged, _ = wudi_descent(stacked, inputs.shared["iter_num"], inputs.shared["learning_rate"])
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
        # stacked task vectors, their products with the Grams, B, t, its gradient, Adam's two
        # moments, a step's product and its gradient's: counted for up to three task vectors
        working_copies=14,
        doc=(
            "WUDI (arXiv 2503.08099, FusionBench's reference): from the sum of the task vectors, iter_num Adam "
            "steps (learning_rate) on sum_i ||(t - T_i) T_i^T||^2 / ||T_i||^2 through MLX's autodiff; base + t. "
            "Non-2-D tensors (and decompose: false) take the mean of the task vectors. Runs on MLX's device."
        ),
    ),
]
