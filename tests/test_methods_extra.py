"""nuslerp, multislerp, karcher, model_stock, nearswap, sce, ram, ramplus_tl, arcee_fusion against
independent float64 numpy references written here from the methods' definitions (mergekit 0.1.5).

Inputs are float32 with distinct values, so variance top-k has no ties and quartiles are unambiguous.
"""

import mlx.core as mx
import numpy as np
import pytest
from method_runs import make, run

from mergekit_mlx.errors import RecipeError

SHAPE = (12, 20)


def weights(base, *ws):
    """per_input with `weight` on the non-base inputs, in order."""
    it = iter(ws)
    return [{} if i == base else {"weight": next(it)} for i in range(len(ws) + (base is not None))]


def close(a, b, tol=2e-5):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


# ---------------- references (float64) ----------------


def nuslerp_ref(t, v0, v1, row_wise=False, flatten=True):
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = np.swapaxes(v0, 0, -1), np.swapaxes(v1, 0, -1)
    n0 = np.maximum(np.linalg.norm(v0, axis=-1, keepdims=True), 1e-7)
    n1 = np.maximum(np.linalg.norm(v1, axis=-1, keepdims=True), 1e-7)
    cos = np.clip(np.sum((v0 / n0) * (v1 / n1), axis=-1, keepdims=True), -1, 1)
    theta = np.arccos(cos)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)
    out = np.where(1 - cos**2 <= 1e-16, (1 - t) * v0 + t * v1, out)
    if not flatten and row_wise:
        out = np.swapaxes(out, 0, -1)
    return out.reshape(shape)


def spherical_barycentre(units, w, steps=200):
    """argmin of sum w_i d(m, u_i)^2 on the sphere, by plain Riemannian gradient steps."""
    m = w @ units
    m /= np.linalg.norm(m)
    for _ in range(steps):
        cos = np.clip(units @ m, -1, 1)
        th = np.arccos(cos)
        ratio = np.where(th > 1e-12, th / np.sin(np.maximum(th, 1e-12)), 1.0)
        g = (w * ratio) @ units - np.sum(w * ratio * cos) * m
        n = np.linalg.norm(g)
        if n < 1e-15:
            break
        m = np.cos(n) * m + np.sin(n) * g / n
        m /= np.linalg.norm(m)
    return m


def karcher_ref(xs, max_iter=10, tol=1e-5):
    flat = [x.reshape(-1) for x in xs]
    norms = [np.linalg.norm(f) for f in flat]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return np.zeros_like(xs[0])
    alpha = 1.0 / len(xs)
    a = np.full(len(valid), 1.0 / len(valid))
    units = np.stack([flat[i] / norms[i] for i in valid])
    m = a @ units
    m = units[0] if np.linalg.norm(m) < tol else m / np.linalg.norm(m)
    for _ in range(max_iter):
        tangent = np.zeros_like(m)
        for ai, u in zip(a, units):
            d = np.clip(m @ u, -1, 1)
            th = np.arccos(d)
            if th < tol:
                continue
            tangent += ai * th / np.sin(th) * (u - d * m)
        tn = np.linalg.norm(tangent)
        if tn < tol:
            break
        m = np.cos(tn) * m + np.sin(tn) * tangent / tn
        m /= np.linalg.norm(m)
    return (sum(alpha * n for n in norms) * m).reshape(xs[0].shape)


def model_stock_ref(base, ws, filter_wise=False):
    shape = base.shape
    if filter_wise:
        b = base.reshape(1, -1) if base.ndim == 1 else base
        ws = [w.reshape(b.shape) for w in ws]
    else:
        b = base.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    off = [w - b for w in ws]
    cos = []
    for i in range(len(off)):
        for j in range(i + 1, len(off)):
            num = np.sum(off[i] * off[j], axis=-1)
            den = np.maximum(np.linalg.norm(off[i], axis=-1) * np.linalg.norm(off[j], axis=-1), 1e-6)
            cos.append(np.clip(num / den, -1, 1))
    c = np.mean(cos, axis=0)[..., None]
    n = len(ws)
    den = 1 + (n - 1) * c
    t = np.where(np.abs(den) < 1e-6, 0.0, n * c / np.where(np.abs(den) < 1e-6, 1, den))
    return (t * (sum(ws) / n) + (1 - t) * b).reshape(shape)


def sce_ref(base, xs, topk=1.0):
    tv = np.stack([x - base for x in xs])
    if topk < 1:
        if topk <= 0:
            mask = np.zeros(base.shape, bool)
        else:
            var = tv.var(axis=0)
            k = int(np.count_nonzero(var) * topk)
            mask = np.zeros(var.size, bool)
            mask[np.argsort(-var.ravel(), kind="stable")[:k]] = True
            mask = mask.reshape(var.shape)
        tv = tv * mask
    majority = np.where(tv.sum(0) >= 0, 1.0, -1.0)
    erase = np.sign(tv) == majority
    e = (tv**2).reshape(len(xs), -1).mean(1)
    w = np.full(len(xs), 1 / len(xs)) if abs(e.sum()) < 1e-6 else e / e.sum()
    w = w.reshape((-1,) + (1,) * base.ndim) * erase
    return base + (tv * w).sum(0) / np.maximum(w.sum(0), 1e-6)


def ram_ref(base, xs, eps=1e-5, plus=False, r=0.1, alpha=0.2):
    tv = np.stack([x - base for x in xs])
    changed = np.abs(tv) > eps
    count = changed.sum(0)
    out = np.zeros_like(base)
    for i in range(len(xs)):
        lam = 1.0
        if plus:
            shared_i = np.sum(changed[i] & (count > 1))
            unique_i = np.sum(changed[i] & (count == 1))
            lam = 1 + r * np.clip(shared_i / max(unique_i, eps), 0, alpha)
        d = np.where(changed[i], tv[i], 0.0)
        out += np.where(count == 1, d * lam, 0.0) + np.where(count > 1, d / np.maximum(count, 1), 0.0)
    return base + out


def fusion_ref(base, other):
    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(other) + 1e-8, softmax(base) + 1e-8
    score = np.abs(other - base) * np.sum(p * np.log(p / q), axis=-1, keepdims=True)
    s = np.sort(score.ravel())
    q1, med, q3 = (s[int(f * (s.size - 1))] for f in (0.25, 0.5, 0.75))
    return np.where(score >= med + 1.5 * (q3 - q1), other, base)


# ---------------- nuslerp ----------------


@pytest.mark.parametrize("row_wise,flatten", [(False, True), (False, False), (True, False)])
def test_nuslerp_with_base_slerps_task_vectors(row_wise, flatten):
    b, x, y = make(3, scale=0.5)
    out = run("nuslerp", [b, x, y], {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}, weights(0, 0.3, 0.7))
    b, x, y = (a.astype(np.float64) for a in (b, x, y))
    close(out, b + nuslerp_ref(0.7, x - b, y - b, row_wise, flatten))


def test_nuslerp_without_base_slerps_the_models():
    x, y = make(2, seed=1, scale=2.0)
    out = run("nuslerp", [x, y], {"nuslerp_flatten": False}, weights(None, 1.0, 3.0), base=None)
    close(out, nuslerp_ref(0.75, x.astype(np.float64), y.astype(np.float64), flatten=False))


def test_nuslerp_negative_weight_extrapolates():
    b, x, y = make(3, seed=2)
    out = run("nuslerp", [b, x, y], per_input=weights(0, -0.5, 1.5))
    b, x, y = (a.astype(np.float64) for a in (b, x, y))
    close(out, b + nuslerp_ref(1.5, x - b, y - b))


def test_nuslerp_weights_summing_to_zero_use_half():
    b, x, y = make(3, seed=3)
    out = run("nuslerp", [b, x, y], per_input=weights(0, 1.0, -1.0))
    b, x, y = (a.astype(np.float64) for a in (b, x, y))
    close(out, b + nuslerp_ref(0.5, x - b, y - b))


def test_nuslerp_colinear_rows_interpolate_linearly():
    b = np.zeros(SHAPE, np.float32)
    x = np.random.default_rng(4).normal(0, 1, SHAPE).astype(np.float32)
    out = run("nuslerp", [b, x, 2 * x], {"nuslerp_flatten": False}, weights(0, 1.0, 1.0))
    close(out, 1.5 * x.astype(np.float64))


def test_nuslerp_needs_exactly_two_other_models():
    b, x, y, z = make(4)
    with pytest.raises(RecipeError, match="exactly two"):
        run("nuslerp", [b, x, y, z], per_input=weights(0, 1.0, 1.0, 1.0))


# ---------------- multislerp ----------------


def test_multislerp_two_models_is_slerp_of_directions_times_mean_norm():
    b, x, y = make(3, seed=5, scale=1.0)
    out = run("multislerp", [b, x, y], per_input=weights(0, 0.2, 0.8))
    b, x, y = (a.astype(np.float64) for a in (b, x, y))
    d0, d1 = x - b, y - b
    n0, n1 = np.linalg.norm(d0), np.linalg.norm(d1)
    theta = np.arccos(np.sum(d0 * d1) / (n0 * n1))
    direction = (np.sin(0.2 * theta) * d0 / n0 + np.sin(0.8 * theta) * d1 / n1) / np.sin(theta)
    close(out, b + (0.2 * n0 + 0.8 * n1) * direction, 1e-4)


def test_multislerp_three_models_is_the_weighted_spherical_barycentre():
    xs = make(4, seed=6, scale=1.0)
    w = np.array([0.5, 0.3, 0.2])
    out = run("multislerp", xs, per_input=weights(0, *w))
    b = xs[0].astype(np.float64)
    d = np.stack([(x.astype(np.float64) - b).reshape(-1) for x in xs[1:]])
    n = np.linalg.norm(d, axis=1)
    expected = b + (w @ n * spherical_barycentre(d / n[:, None], w)).reshape(SHAPE)
    close(out, expected, 1e-4)


def test_multislerp_unnormalised_weights_scale_the_norm_only():
    xs = make(3, seed=7, scale=1.0)
    normal = run("multislerp", xs, per_input=weights(0, 1.0, 3.0))
    raw = run("multislerp", xs, {"normalize_weights": False}, weights(0, 1.0, 3.0))
    b = xs[0].astype(np.float64)
    close(raw - b, 4.0 * (normal - b), 1e-4)


def test_multislerp_one_model_is_that_model():
    b, x = make(2, seed=8)
    np.testing.assert_array_equal(run("multislerp", [b, x], per_input=weights(0, 0.3)), x.astype(np.float64))


def test_multislerp_opposite_pair_with_balanced_weights_is_linear():
    b = np.zeros(SHAPE, np.float32)
    x = np.random.default_rng(9).normal(0, 1, SHAPE).astype(np.float32)
    out = run("multislerp", [b, x, -x], per_input=weights(0, 1.0, 1.0))
    close(out, np.zeros(SHAPE))


def test_multislerp_zero_weight_sum_is_a_recipe_error():
    xs = make(3, seed=10)
    with pytest.raises(RecipeError, match="sum to zero"):
        run("multislerp", xs, {"normalize_weights": False}, weights(0, 1.0, -1.0))


# ---------------- karcher ----------------


def test_karcher_matches_the_reference_iteration():
    xs = make(4, seed=11, scale=1.0)
    close(run("karcher", xs), karcher_ref([x.astype(np.float64) for x in xs]), 1e-4)


def test_karcher_max_iter_zero_is_the_normalised_mean():
    xs = make(3, seed=12, scale=1.0)
    x64 = [x.astype(np.float64).reshape(-1) for x in xs]
    units = [x / np.linalg.norm(x) for x in x64]
    m = sum(units) / np.linalg.norm(sum(units))
    expected = (np.mean([np.linalg.norm(x) for x in x64]) * m).reshape(SHAPE)
    close(run("karcher", xs, {"max_iter": 0}), expected)


def test_karcher_of_two_is_the_geodesic_midpoint():
    x, y = make(2, seed=13, scale=3.0)
    x, y = x.astype(np.float64), y.astype(np.float64)
    ux, uy = x / np.linalg.norm(x), y / np.linalg.norm(y)
    mid = (ux + uy) / np.linalg.norm(ux + uy)
    close(
        run("karcher", [x.astype(np.float32), y.astype(np.float32)], base=None),
        (np.linalg.norm(x) + np.linalg.norm(y)) / 2 * mid,
        1e-5,
    )


def test_karcher_all_zero_inputs_give_zero():
    z = np.zeros(SHAPE, np.float32)
    np.testing.assert_array_equal(run("karcher", [z, z, z]), np.zeros(SHAPE))


def test_karcher_zero_input_is_left_out_of_the_direction_but_not_the_scale():
    x, y = make(2, seed=14, scale=1.0)
    z = np.zeros(SHAPE, np.float32)
    out = run("karcher", [x, y, z], base=None)
    close(out, karcher_ref([x.astype(np.float64), y.astype(np.float64), z.astype(np.float64)]), 1e-4)


def test_karcher_one_model_is_that_model():
    (x,) = make(1)
    np.testing.assert_array_equal(run("karcher", [x], base=None), x.astype(np.float64))


# ---------------- model_stock ----------------


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [3, 4])
def test_model_stock_matches_reference(filter_wise, n):
    xs = make(n, seed=15 + n)
    out = run("model_stock", xs, {"filter_wise": filter_wise})
    x64 = [x.astype(np.float64) for x in xs]
    close(out, model_stock_ref(x64[0], x64[1:], filter_wise))


def test_model_stock_filter_wise_on_a_vector_uses_one_ratio():
    xs = make(3, seed=19, shape=(20,))
    x64 = [x.astype(np.float64) for x in xs]
    close(run("model_stock", xs, {"filter_wise": True}), model_stock_ref(x64[0], x64[1:], False))


def test_model_stock_zero_task_vectors_keep_the_base():
    b = make(1)[0]
    np.testing.assert_allclose(run("model_stock", [b, b, b]), b.astype(np.float64))


def test_model_stock_identical_task_vectors_give_their_average():
    b, x = make(2, seed=20)
    close(run("model_stock", [b, x, x]), x.astype(np.float64))


def test_model_stock_opposite_pair_keeps_the_base_at_the_singularity():
    b, x = make(2, seed=21)
    y = 2 * b - x  # cos = -1, so 1 + (N - 1) cos = 0
    close(run("model_stock", [b, x, y]), b.astype(np.float64))


# ---------------- nearswap ----------------


@pytest.mark.parametrize("t", [0.0, 0.01, 0.05, 10.0, -1.0])
def test_nearswap(t):
    b, x = make(2, seed=22)
    out = run("nearswap", [b, x], {"t": t})
    b, x = b.astype(np.float64), x.astype(np.float64)
    w = np.clip(t / np.maximum(np.abs(b - x), 1e-6), 0, 1)
    close(out, w * x + (1 - w) * b)


def test_nearswap_base_may_come_second():
    b, x = make(2, seed=23)
    out = run("nearswap", [x, b], {"t": 0.05}, base=1)
    b, x = b.astype(np.float64), x.astype(np.float64)
    w = np.clip(0.05 / np.maximum(np.abs(b - x), 1e-6), 0, 1)
    close(out, w * x + (1 - w) * b)


# ---------------- sce ----------------


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.001, 0.0])
def test_sce_matches_reference(topk):
    xs = make(4, seed=24, scale=0.1)
    x64 = [x.astype(np.float64) for x in xs]
    close(run("sce", xs, {"select_topk": topk}), sce_ref(x64[0], x64[1:], topk))


def test_sce_tiny_task_vectors_use_uniform_weights():
    xs = make(3, seed=25, scale=1e-4)  # mean squares ~1e-8: below mergekit's 1e-6 floor
    x64 = [x.astype(np.float64) for x in xs]
    close(run("sce", xs), sce_ref(x64[0], x64[1:]), 1e-6)


def test_sce_zero_task_vectors_keep_the_base():
    b = make(1)[0]
    np.testing.assert_array_equal(run("sce", [b, b, b], {"select_topk": 0.5}), b.astype(np.float64))


def test_sce_base_only_is_the_base():
    b = make(1)[0]
    np.testing.assert_array_equal(run("sce", [b]), b.astype(np.float64))


# ---------------- ram / ramplus_tl ----------------


def sparse_family(seed, n=4, keep=0.4):
    """Fine-tunes that change only some elements, with overlaps between them."""
    rng = np.random.default_rng(seed)
    xs = make(n, seed=seed)
    return [xs[0]] + [np.where(rng.random(SHAPE) < keep, x, xs[0]).astype(np.float32) for x in xs[1:]]


@pytest.mark.parametrize("eps", [1e-5, 0.05])
def test_ram_matches_reference(eps):
    xs = sparse_family(26)
    x64 = [x.astype(np.float64) for x in xs]
    close(run("ram", xs, {"epsilon": eps}), ram_ref(x64[0], x64[1:], eps))


@pytest.mark.parametrize("r,alpha", [(0.1, 0.2), (0.5, 2.0), (-0.3, 0.5)])
def test_ramplus_tl_matches_reference(r, alpha):
    xs = sparse_family(27)
    x64 = [x.astype(np.float64) for x in xs]
    out = run("ramplus_tl", xs, {"r": r, "alpha": alpha})
    close(out, ram_ref(x64[0], x64[1:], plus=True, r=r, alpha=alpha))


def test_ram_zero_task_vectors_keep_the_base():
    b = make(1)[0]
    np.testing.assert_array_equal(run("ram", [b, b, b]), b.astype(np.float64))
    np.testing.assert_array_equal(run("ramplus_tl", [b, b, b]), b.astype(np.float64))


def test_ram_single_fine_tune_is_that_fine_tune():
    b, x = make(2, seed=28)
    close(run("ram", [b, x]), x.astype(np.float64), 1e-6)


# ---------------- arcee_fusion ----------------


@pytest.mark.parametrize("shape", [(16, 24), (24,)])
def test_arcee_fusion_matches_reference(shape):
    b, x = make(2, seed=29, scale=0.3, shape=shape)
    out = run("arcee_fusion", [b, x])
    close(out, fusion_ref(b.astype(np.float64), x.astype(np.float64)))
    assert 0 < np.mean(out != b) < 0.5  # some, not most, elements are taken


def test_arcee_fusion_identical_models_is_the_base():
    b = make(1)[0]
    np.testing.assert_array_equal(run("arcee_fusion", [b, b]), b.astype(np.float64))


def test_arcee_fusion_large_tensor_is_repeatable_per_seed():
    b, x = make(2, seed=30, scale=0.3, shape=(1100, 1000))
    first = run("arcee_fusion", [b, x], seed=1)
    np.testing.assert_array_equal(first, run("arcee_fusion", [b, x], seed=1))
    exact = fusion_ref(b.astype(np.float64), x.astype(np.float64))
    assert np.mean(first != exact) < 1e-3  # a 1e6 sample moves the threshold only slightly


# ---------------- dtypes ----------------


@pytest.mark.parametrize(
    "method,shared,per",
    [
        ("nuslerp", {}, weights(0, 0.4, 0.6)),
        ("multislerp", {}, weights(0, 0.4, 0.6)),
        ("karcher", {}, None),
        ("model_stock", {}, None),
        ("sce", {"select_topk": 0.5}, None),
        ("ram", {}, None),
        ("ramplus_tl", {}, None),
    ],
)
def test_bfloat16_inputs_give_bfloat16_within_rounding(method, shared, per):
    xs = make(3, seed=31)
    rounded = run(method, xs, shared, per, dtype=mx.bfloat16)
    xs16 = [np.array(mx.array(x).astype(mx.bfloat16).astype(mx.float32)) for x in xs]
    ref16 = run(method, xs16, shared, per)  # same math on the bf16-rounded inputs, in float32
    # computed in float32 from the bf16 values and rounded once: within one bf16 ulp
    np.testing.assert_allclose(rounded, ref16, rtol=2**-8, atol=2**-8 * np.abs(ref16).max())
