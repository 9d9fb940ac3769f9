"""Merges on the hypersphere: `nuslerp` (two models), `multislerp` and `karcher` (any number).

nuslerp follows mergekit 0.1.5 exactly. karcher follows mergekit's iteration (equal weights, the
base is an ordinary input). multislerp computes the weighted spherical barycentre that mergekit's
multislerp describes, not what its code returns: see `multislerp`'s doc.
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import RecipeError
from .base import MergeInputs, Method, Param, Range, float32

NUSLERP_EPS = 1e-8  # colinear when 1 - cos^2 <= eps^2
NORM_FLOOR = 1e-7  # norms are clamped to this before dividing
TANGENT_TOL = 1e-6  # radians: the barycentre iteration stops when the mean moves less than this
BARYCENTRE_STEPS = 16
SHARE = Range(0)  # a weight that is a share of a whole: not negative
MAX_ITER = 1000  # karcher's iteration converges in tens of steps; each step waits for the device


def _compute_dtype(x: mx.array) -> mx.Dtype:
    return mx.float64 if x.dtype == mx.float64 else mx.float32


# ---- nuslerp ---------------------------------------------------------------------------------


def nuslerp_tensors(t: float, v0: mx.array, v1: mx.array, row_wise: bool, flatten: bool) -> mx.array:
    """slerp coefficients from the angle between v0 and v1, applied to the unnormalised vectors.

    flatten: the whole tensor is one vector. Otherwise each slice along the last axis is one vector,
    or along the first axis when row_wise (mergekit's naming: axis 0 is swapped to the end).
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise and v0.ndim > 1:
        v0, v1 = mx.swapaxes(v0, 0, -1), mx.swapaxes(v1, 0, -1)
    u0 = v0 / mx.maximum(mx.linalg.norm(v0, axis=-1, keepdims=True), NORM_FLOOR)
    u1 = v1 / mx.maximum(mx.linalg.norm(v1, axis=-1, keepdims=True), NORM_FLOOR)
    cos = mx.clip(mx.sum(u0 * u1, axis=-1, keepdims=True), -1.0, 1.0)
    colinear = (1 - cos * cos) <= NUSLERP_EPS**2
    theta = mx.arccos(mx.where(colinear, 0.0, cos))
    sin = mx.where(colinear, 1.0, mx.sin(theta))  # the where keeps the unused branch finite
    spherical = (mx.sin((1 - t) * theta) * v0 + mx.sin(t * theta) * v1) / sin
    out = mx.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if not flatten and row_wise and out.ndim > 1:
        out = mx.swapaxes(out, 0, -1)
    return out.reshape(shape)


def check_nuslerp(shared: dict, per_input: list[dict], base: int | None) -> tuple[None, str] | None:
    others = len(per_input) - (base is not None)
    if others != 2:
        return None, f"nuslerp merges exactly two models besides the base model, got {others}"
    if sum(p["weight"] for i, p in enumerate(per_input) if i != base) <= 0:
        return None, "the two weights sum to 0, so t = w1 / (w0 + w1) is undefined; give at least one a positive weight"
    return None


def check_multislerp(shared: dict, per_input: list[dict], base: int | None) -> tuple[None, str] | None:
    total = sum(p["weight"] for i, p in enumerate(per_input) if i != base)
    if len(per_input) - (base is not None) > 1 and total <= 0:
        return None, "the weights sum to 0, so multislerp has no barycentre; give at least one model a positive weight"
    return None


def nuslerp(inputs: MergeInputs) -> mx.array:
    others = inputs.non_base
    if len(others) != 2:
        raise RecipeError(f"nuslerp merges exactly two models besides the base model, got {len(others)} for {inputs.name}")
    w0, w1 = (inputs.per_input[i]["weight"] for i in others)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    a, b = (float32(inputs.tensors[i]) for i in others)
    row_wise, flatten = inputs.shared["nuslerp_row_wise"], inputs.shared["nuslerp_flatten"]
    if inputs.base is None:
        out = nuslerp_tensors(t, a, b, row_wise, flatten)
    else:
        base = float32(inputs.tensors[inputs.base])
        out = base + nuslerp_tensors(t, a - base, b - base, row_wise, flatten)
    return out.astype(inputs.tensors[others[0]].dtype)


# ---- weighted mean on the sphere (shared by multislerp and karcher) ---------------------------


def _sphere_step(mean: mx.array, units: mx.array, alphas: mx.array, skip_below: float) -> mx.array:
    """Weighted sum of the log maps of `units` (rows) at the unit vector `mean`.

    The log map of u at m is theta/sin(theta) * (u - cos(theta) m). Rows closer than skip_below
    radians contribute nothing (mergekit's karcher rule); with skip_below=0 a row at theta=0 takes
    the ratio's limit 1 (its log map is zero either way).
    """
    dots = mx.clip(units @ mean, -1.0, 1.0)
    theta = mx.arccos(dots)
    far = theta > 0 if skip_below == 0 else theta >= skip_below
    ratio = mx.where(far, theta / mx.where(far, mx.sin(theta), 1.0), 1.0 if skip_below == 0 else 0.0)
    coef = alphas * ratio
    return coef @ units - mx.sum(coef * dots) * mean


def _exp_map(mean: mx.array, tangent: mx.array, norm: mx.array) -> mx.array:
    return mx.cos(norm) * mean + mx.sin(norm) * (tangent / norm)


# ---- multislerp ------------------------------------------------------------------------------


def multislerp(inputs: MergeInputs) -> mx.array:
    """Weighted spherical barycentre of the (task) vectors, times their weighted mean norm."""
    others = inputs.non_base
    if len(others) == 1:
        return inputs.tensors[others[0]]
    out_dtype = inputs.tensors[others[0]].dtype
    eps = inputs.shared["eps"]
    x = mx.stack([float32(inputs.tensors[i]) for i in others])
    base = None
    if inputs.base is not None:
        base = float32(inputs.tensors[inputs.base])
        x = x - base
    flat = x.reshape(len(others), -1)
    w = mx.array([float(inputs.per_input[i]["weight"]) for i in others], dtype=flat.dtype)
    if inputs.shared["normalize_weights"]:
        w = w / mx.sum(w)
    total = float(mx.sum(w).item())
    if abs(total) < 1e-12:
        raise RecipeError(
            f"parameters.weight: the weights for {inputs.name} sum to zero, so multislerp has no barycentre; change the weights"
        )
    bary = w / total  # barycentric coordinates of the direction; `w` itself sets the magnitude
    norms = mx.linalg.norm(flat, axis=1)
    units = flat / (norms[:, None] + eps)

    mean = bary @ units
    mean_norm = mx.linalg.norm(mean)
    if mean_norm.item() < eps:
        if len(others) == 2:
            # exactly opposite directions balanced by the weights: no unique mean, interpolate linearly
            out = w[0] * x[0] + w[1] * x[1]
            return (out if base is None else out + base).astype(out_dtype)
        raise RecipeError(
            f"parameters.weight: for {inputs.name} the weighted directions cancel out (opposite task vectors "
            "with balancing weights), so multislerp has no barycentre; change the weights"
        )
    mean = mean / mean_norm
    for _ in range(BARYCENTRE_STEPS):
        tangent = _sphere_step(mean, units, bary, 0.0)
        tnorm = mx.linalg.norm(tangent)
        if tnorm.item() < TANGENT_TOL:
            break
        mean = _exp_map(mean, tangent, tnorm)
        mean = mean / mx.linalg.norm(mean)

    out = (mx.sum(norms * w) * mean).reshape(x.shape[1:])
    if base is not None:
        out = out + base
    return out.astype(out_dtype)


# ---- karcher ---------------------------------------------------------------------------------


def karcher_tensors(tensors: list[mx.array], alphas: list[float], max_iter: int, tol: float) -> mx.array:
    """Weighted Karcher mean on the unit sphere, scaled by the weighted mean norm (as mergekit).

    Inputs with norm <= tol take no part in the direction; the scale sums over all inputs.
    """
    dtype = _compute_dtype(tensors[0])
    flat = [x.astype(dtype).reshape(-1) for x in tensors]
    norms = [mx.linalg.norm(f) for f in flat]
    mx.eval(*norms)
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return mx.zeros(tensors[0].shape, dtype=dtype)
    alpha_valid = sum(alphas[i] for i in valid)
    a = mx.array([alphas[i] / alpha_valid for i in valid], dtype=dtype)
    units = mx.stack([flat[i] / norms[i] for i in valid])

    mean = a @ units
    mean_norm = mx.linalg.norm(mean)
    mean = units[0] if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = _sphere_step(mean, units, a, tol)
        tnorm = mx.linalg.norm(tangent)
        if tnorm.item() < tol:
            break
        mean = _exp_map(mean, tangent, tnorm)
        unit_norm = mx.linalg.norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    scale = sum(al * n for al, n in zip(alphas, norms))
    return (scale * mean).reshape(tensors[0].shape)


def karcher(inputs: MergeInputs) -> mx.array:
    tensors = inputs.tensors
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    out = karcher_tensors(tensors, alphas, inputs.shared["max_iter"], inputs.shared["tol"])
    return out.astype(tensors[0].dtype)


METHODS = [
    Method(
        "nuslerp",
        nuslerp,
        params=(
            Param("weight", float, "non_base", valid=SHARE, why="t = w1 / (w0 + w1) is a share of the way between the two"),
            Param("nuslerp_row_wise", bool, "shared", default=False),
            Param("nuslerp_flatten", bool, "shared", default=True),
        ),
        base="optional",
        min_inputs=2,
        max_inputs=3,
        check=check_nuslerp,
        doc=(
            "Slerp between exactly two models with t = w1 / (w0 + w1) (0.5 when the weights sum to ~0). "
            "With a base model it slerps the task vectors and adds the base back. nuslerp_flatten (default) "
            "treats the tensor as one vector; otherwise each row (last axis) is slerped separately, or each "
            "column when nuslerp_row_wise. Nearly colinear vectors are interpolated linearly."
        ),
    ),
    Method(
        "multislerp",
        multislerp,
        params=(
            Param("weight", float, "non_base", valid=SHARE, why="the weights are barycentric coordinates on the sphere"),
            Param("normalize_weights", bool, "shared", default=True),
            Param(
                "eps",
                float,
                "shared",
                default=1e-8,
                valid=Range(0, 1e-2, lo_open=True),
                why="added to each norm before dividing; a unit vector's norm is 1",
            ),
        ),
        check=check_multislerp,
        base="optional",
        min_inputs=1,
        doc=(
            "Weighted barycentre on the hypersphere of the models (or of their task vectors when a base is "
            "given), scaled by the weighted mean of their norms. The direction is the weighted Karcher mean: "
            "starting at the normalised weighted average, the weighted sum of log maps is applied through the "
            "exponential map until the mean moves by less than 1e-6 rad, so two models give exactly slerp. "
            "Deviation from mergekit 0.1.5, on purpose: mergekit projects each unit vector orthogonally onto "
            "the tangent space at the normalised average, and the weighted sum of those projections is "
            "identically zero, so its result is only the normalised weighted average (a chord mean, not a "
            "spherical one). Both agree for two models with equal weights. normalize_weights divides the "
            "weights by their sum; the direction always uses w / sum(w), the magnitude sum(w_i |x_i|)."
        ),
    ),
    Method(
        "karcher",
        karcher,
        params=(
            Param(
                "max_iter", int, "shared", default=10, valid=Range(1, MAX_ITER), why="the iteration converges in tens of steps"
            ),
            Param(
                "tol",
                float,
                "shared",
                default=1e-5,
                valid=Range(0, 1e-2, lo_open=True),
                why="the step (radians) that ends the iteration, and the norm below which an input is left out",
            ),
        ),
        base="optional",
        min_inputs=1,
        doc=(
            "Karcher (Riemannian) mean of all inputs on the unit sphere with equal weights, scaled by their "
            "mean norm; a base model is just one more input. Iterates up to max_iter times, stopping when "
            "the tangent step is shorter than tol; inputs with norm <= tol are left out of the direction."
        ),
    ),
]
