"""iso_c, iso_cts, tsv_m and wudi against independent float64 numpy references written here from
the papers' formulas (the parameters and the division of directions as FusionBench's references).

Orthogonal factors are computed here as A (A^T A)^(+1/2) from a symmetric eigendecomposition in
float64 (not from an SVD, as the code does), over A's range: where A is rank-deficient (identical
fine-tunes) the factor is the partial isometry on its range, which is what the code promises.
"""

import method_runs
import mlx.core as mx
import numpy as np
import pytest
from method_runs import NAME, run

from mergekit_mlx.methods import MergeInputs, get_method
from mergekit_mlx.methods.isotropic import common_dimensions
from mergekit_mlx.methods.wudi import interference_loss, quadratic, wudi_descent

SHAPES = [(24, 24), (40, 12), (12, 40), (30,)]


def make(n_tasks, shape, seed=0, scale=0.1):
    """A base and n_tasks fine-tunes (base + noise), float32."""
    return method_runs.make(n_tasks + 1, seed, scale, shape)


def deltas(arrays):
    base = arrays[0].astype(np.float64)
    return base, [a.astype(np.float64) - base for a in arrays[1:]]


def close(a, b, tol=2e-5):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


# ---------------- references (float64) ----------------


def inverse_sqrt(sym):
    """(sym)^(+1/2): the inverse square root on the range of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh(sym)
    keep = w > w.max() * 1e-13  # singular values above 3e-7 of the largest: float64 Grams resolve them
    return (v[:, keep] / np.sqrt(w[keep])) @ v[:, keep].T


def polar(a):
    """The orthogonal factor: A (A^T A)^(+1/2), or (A A^T)^(+1/2) A when wide."""
    return a @ inverse_sqrt(a.T @ a) if a.shape[0] >= a.shape[1] else inverse_sqrt(a @ a.T) @ a


def iso_c_ref(tvs):
    if tvs[0].ndim != 2:
        return sum(tvs) / len(tvs)
    total = sum(tvs)
    s = np.linalg.svd(total, compute_uv=False)
    return s.mean() * polar(total)


def split_ref(r, n, fraction):
    """FusionBench's division: int(r * fraction) common directions, moved so the rest divides by n."""
    per_task = round((r - int(r * fraction)) / n)
    if per_task * n > r:
        per_task -= 1
    return r - per_task * n, per_task


def iso_cts_ref(tvs, fraction):
    if tvs[0].ndim != 2:
        return sum(tvs) / len(tvs)
    common, per_task = split_ref(min(tvs[0].shape), len(tvs), fraction)
    u, s, vh = np.linalg.svd(sum(tvs), full_matrices=False)
    uc = u[:, :common]
    lefts, values, rights = [uc], [s[:common]], [vh[:common]]
    for t in tvs:
        residual = (np.eye(t.shape[0]) - uc @ uc.T) @ t
        ut, st, vt = np.linalg.svd(residual, full_matrices=False)
        lefts.append(ut[:, :per_task])
        values.append(st[:per_task])
        rights.append(vt[:per_task])
    # the order of the directions does not change the result: U diag(s) V is a sum over directions
    s_mean = np.concatenate(values).mean()
    return s_mean * polar(np.concatenate(lefts, axis=1)) @ polar(np.concatenate(rights, axis=0))


def tsv_ref(tvs):
    if tvs[0].ndim != 2:
        return sum(tvs) / len(tvs)
    k = int(min(tvs[0].shape) * (1 / len(tvs)))
    if k == 0:
        return np.zeros_like(tvs[0])
    svds = [np.linalg.svd(t, full_matrices=False) for t in tvs]
    u = np.concatenate([u[:, :k] for u, _, _ in svds], axis=1)
    s = np.concatenate([s[:k] for _, s, _ in svds])
    v = np.concatenate([vh[:k] for _, _, vh in svds], axis=0)
    return polar(u) @ np.diag(s) @ polar(v)


def wudi_loss_ref(t, tvs):
    return sum(np.sum(((t - ti) @ ti.T) ** 2) / np.sum(ti**2) for ti in tvs if np.any(ti))


def wudi_ref(tvs, iterations, lr):
    """Adam (bias-corrected, betas 0.9/0.999, eps 1e-8) on the loss, its gradient written out by hand."""
    if tvs[0].ndim != 2:
        return sum(tvs) / len(tvs), []
    t = sum(tvs)
    m = np.zeros_like(t)
    v = np.zeros_like(t)
    losses = []
    for k in range(1, iterations + 1):
        losses.append(wudi_loss_ref(t, tvs))
        g = sum(2 * (t - ti) @ ti.T @ ti / np.sum(ti**2) for ti in tvs if np.any(ti))
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        t = t - lr * (m / (1 - 0.9**k)) / (np.sqrt(v / (1 - 0.999**k)) + 1e-8)
    return t, losses


# ---------------- iso_c ----------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_iso_c_is_the_mean_singular_value_times_the_orthogonal_factor_of_the_sum(shape, n):
    arrays = make(n, shape, seed=n)
    base, tvs = deltas(arrays)
    close(run("iso_c", arrays), base + iso_c_ref(tvs))


def test_iso_c_scaling_factor_multiplies_the_merged_task_vector():
    arrays = make(3, (20, 16))
    base, tvs = deltas(arrays)
    close(run("iso_c", arrays, {"scaling_factor": 1.7}), base + 1.7 * iso_c_ref(tvs))


def test_iso_c_flattens_the_spectrum_of_the_merged_task_vector():
    arrays = make(2, (16, 16), seed=3)
    base, tvs = deltas(arrays)
    s = np.linalg.svd(run("iso_c", arrays) - base, compute_uv=False)
    close(s, np.full(16, np.linalg.svd(sum(tvs), compute_uv=False).mean()), tol=1e-4)


# ---------------- iso_cts ----------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.0])
def test_iso_cts_joins_the_common_subspace_and_each_tasks_own_directions(shape, n, fraction):
    arrays = make(n, shape, seed=10 + n)
    base, tvs = deltas(arrays)
    close(run("iso_cts", arrays, {"common_space_fraction": fraction}), base + iso_cts_ref(tvs, fraction), tol=1e-4)


def test_iso_cts_with_the_whole_space_common_is_iso_c():
    arrays = make(3, (18, 14))
    close(run("iso_cts", arrays, {"common_space_fraction": 1.0}), run("iso_c", arrays), tol=1e-4)


@pytest.mark.parametrize(
    "r, n, fraction, expected",
    [
        (24, 3, 0.8, (18, 2)),  # int(19.2) = 19 common, 5 left: rounded to 6, two per task
        (24, 2, 0.8, (20, 2)),  # 5 left: round(2.5) = 2 (to even), so 4, and 20 common
        (10, 4, 0.8, (10, 0)),  # 2 left: round(0.5) = 0 per task, all common
        (3, 2, 0.0, (1, 1)),  # 3 left: round(1.5) = 2 per task would need 4 of 3 directions: one fewer
        (5, 1, 0.5, (2, 3)),
    ],
)
def test_iso_cts_divides_the_directions_as_the_reference(r, n, fraction, expected):
    assert common_dimensions(r, n, fraction) == expected == split_ref(r, n, fraction)


# ---------------- tsv_m ----------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_tsv_m_sums_the_decorrelated_top_singular_directions_of_each_task(shape, n):
    arrays = make(n, shape, seed=20 + n)
    base, tvs = deltas(arrays)
    close(run("tsv_m", arrays), base + tsv_ref(tvs), tol=1e-4)


def test_tsv_m_weights_scale_task_vectors_before_their_svd_and_alpha_the_result():
    arrays = make(3, (20, 16), seed=5)
    base, tvs = deltas(arrays)
    per_input = [{}, {"weight": 0.5}, {"weight": 2.0}, {"weight": -1.0}]
    expected = base + 0.7 * tsv_ref([w * t for w, t in zip([0.5, 2.0, -1.0], tvs)])
    close(run("tsv_m", arrays, {"alpha": 0.7}, per_input), expected, tol=1e-4)


def test_tsv_m_with_one_task_vector_gives_the_fine_tune_back():
    arrays = make(1, (16, 12))
    close(run("tsv_m", arrays), arrays[1].astype(np.float64), tol=1e-5)


def test_tsv_m_keeps_nothing_of_a_matrix_with_fewer_directions_than_tasks():
    arrays = make(3, (2, 16))  # k = int(2 / 3) = 0, as in the reference
    close(run("tsv_m", arrays), arrays[0].astype(np.float64))


# ---------------- what all four share ----------------

ALL = [
    ("iso_c", {}),
    ("iso_cts", {}),
    ("tsv_m", {}),
    ("wudi", {"iter_num": 20, "learning_rate": 1e-3}),
]


@pytest.mark.parametrize("method, shared", ALL, ids=[m for m, _ in ALL])
def test_all_zero_task_vectors_give_the_base(method, shared):
    base = make(0, (12, 10))[0]
    close(run(method, [base, base.copy(), base.copy()], shared), base.astype(np.float64), tol=0)


@pytest.mark.parametrize("method, shared", ALL, ids=[m for m, _ in ALL])
def test_identical_fine_tunes_agree_with_the_reference(method, shared):
    base, ft = make(1, (14, 10), seed=7)
    base64, tvs = deltas([base, ft, ft.copy()])
    if method == "tsv_m":
        # the same top 5 directions twice: the rank-5 truncation of the task vector, once
        u, s, vh = np.linalg.svd(tvs[0], full_matrices=False)
        expected = (u[:, :5] * s[:5]) @ vh[:5]
    else:
        expected = {"iso_c": iso_c_ref, "iso_cts": lambda t: iso_cts_ref(t, 0.8), "wudi": lambda t: wudi_ref(t, 20, 1e-3)[0]}[
            method
        ](tvs)
    close(run(method, [base, ft, ft.copy()], shared), base64 + expected, tol=1e-4)


@pytest.mark.parametrize("method, shared", ALL, ids=[m for m, _ in ALL])
def test_tensors_that_are_not_matrices_or_not_decomposed_take_the_mean_task_vector(method, shared):
    scale = {"iso_c": "scaling_factor", "iso_cts": "scaling_factor", "tsv_m": "alpha"}.get(method)
    factor = 1.0 if scale is None else 0.6
    extra = {} if scale is None else {scale: factor}
    for shape, decompose in [((30,), True), ((3, 4, 5), True), ((12, 10), False)]:
        arrays = make(3, shape, seed=4)
        base, tvs = deltas(arrays)
        out = run(method, arrays, {**shared, **extra, "decompose": decompose})
        close(out, base + factor * sum(tvs) / 3)


@pytest.mark.parametrize("method, shared", ALL, ids=[m for m, _ in ALL])
def test_bfloat16_inputs_are_merged_in_float32_and_rounded_once(method, shared):
    arrays = make(2, (16, 12), seed=9)
    rounded = [np.array(mx.array(a).astype(mx.bfloat16).astype(mx.float32)) for a in arrays]
    expected = mx.array(run(method, rounded, shared).astype(np.float32)).astype(mx.bfloat16)
    out = run(method, arrays, shared, dtype=mx.bfloat16)
    np.testing.assert_array_equal(out, np.array(expected.astype(mx.float32)))


@pytest.mark.parametrize("method, shared", ALL[:3], ids=[m for m, _ in ALL[:3]])
def test_a_nan_input_gives_a_nan_merge_not_a_crash(method, shared):
    arrays = make(2, (8, 6))
    arrays[1][2, 3] = np.nan
    assert np.isnan(run(method, arrays, shared)).all()


# ---------------- wudi ----------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", [1, 3])
def test_wudi_is_adam_on_the_interference_loss_from_the_sum_of_task_vectors(shape, n):
    arrays = make(n, shape, seed=30 + n, scale=1.0)
    base, tvs = deltas(arrays)
    expected, _ = wudi_ref(tvs, 25, 1e-2)
    close(run("wudi", arrays, {"iter_num": 25, "learning_rate": 1e-2}), base + expected, tol=1e-4)


def test_wudi_loss_decreases_step_by_step():
    _, tvs = deltas(make(3, (24, 16), seed=2, scale=1.0))
    _, losses = wudi_descent(mx.array(np.stack(tvs).astype(np.float32)), 150, 2e-2)
    losses = [float(x) for x in losses]
    _, expected = wudi_ref(tvs, 150, 2e-2)
    np.testing.assert_allclose(losses, expected, rtol=1e-4)
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("on_host", [True, False], ids=["numpy-products", "mlx-products"])
def test_wudi_with_its_products_in_numpy_or_in_mlx_is_the_same_descent(on_host):
    _, tvs = deltas(make(3, (24, 16), seed=4, scale=1.0))
    got, losses = wudi_descent(mx.array(np.stack(tvs).astype(np.float32)), 40, 1e-2, on_host=on_host)
    expected, expected_losses = wudi_ref(tvs, 40, 1e-2)
    close(np.array(got).astype(np.float64), expected, tol=1e-4)
    np.testing.assert_allclose([float(x) for x in losses], expected_losses, rtol=1e-4)


def test_wudi_gives_the_same_bits_twice():
    arrays = make(3, (32, 20), seed=6, scale=1.0)
    shared = {"iter_num": 30, "learning_rate": 1e-2}
    np.testing.assert_array_equal(run("wudi", arrays, shared), run("wudi", arrays, shared))


def test_wudi_with_no_iterations_is_task_arithmetic():
    arrays = make(3, (12, 10))
    base, tvs = deltas(arrays)
    close(run("wudi", arrays, {"iter_num": 0}), base + sum(tvs))


@pytest.mark.parametrize("shape", [(20, 8), (8, 20), (2, 40)], ids=str)
def test_wudi_loss_as_written_and_as_a_quadratic_is_the_formula(shape):
    rng = np.random.default_rng(1)
    tvs = [rng.normal(size=shape) for _ in range(3)]
    t = rng.normal(size=shape)
    stacked = mx.array(np.stack(tvs).astype(np.float32))
    inverse = mx.array([1 / np.sum(x**2) for x in tvs], dtype=mx.float32)
    t32 = mx.array(t.astype(np.float32))
    assert float(interference_loss(t32, stacked, inverse)) == pytest.approx(wudi_loss_ref(t, tvs), rel=1e-5)
    assert float(quadratic(stacked, inverse)(t32)) == pytest.approx(wudi_loss_ref(t, tvs), rel=1e-4)


def test_wudi_of_a_very_wide_matrix_sums_the_loss_as_written():
    arrays = make(2, (3, 40), seed=12, scale=1.0)  # n = 40 > 2 N m = 12
    base, tvs = deltas(arrays)
    expected, _ = wudi_ref(tvs, 20, 1e-2)
    close(run("wudi", arrays, {"iter_num": 20, "learning_rate": 1e-2}), base + expected, tol=1e-4)


def test_wudi_leaves_an_all_zero_task_vector_out_of_the_loss():
    arrays = make(2, (12, 10), seed=8, scale=1.0)
    arrays.append(arrays[0].copy())  # a fine-tune equal to the base
    base, tvs = deltas(arrays)
    expected, _ = wudi_ref(tvs, 15, 1e-2)
    close(run("wudi", arrays, {"iter_num": 15, "learning_rate": 1e-2}), base + expected, tol=1e-4)


# ---------------- through the recipe ----------------

RECIPES = [
    ("iso_c", {"scaling_factor": 1.2}, {}),
    ("iso_cts", {"common_space_fraction": 0.6}, {}),
    ("tsv_m", {"alpha": 0.9}, {"weight": 0.8}),
    ("wudi", {"iter_num": 5, "learning_rate": 1e-3}, {}),
]


@pytest.mark.parametrize("method, shared, per_model", RECIPES, ids=[m for m, _, _ in RECIPES])
def test_recipe_merge_of_a_tiny_family_matches_the_reference(family, method, shared, per_model):
    import tiny

    from mergekit_mlx import merge

    base_path, *fts = family
    recipe = {
        "merge_method": method,
        "base_model": str(base_path),
        "parameters": shared,
        "models": [{"model": str(p), "parameters": dict(per_model)} for p in fts],
        "dtype": "float32",
    }
    merged = {k: np.array(v.astype(mx.float32)).astype(np.float64) for k, v in merge(recipe).weights.items()}
    models = [tiny.load_np(p) for p in family]
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight"):
        base = models[0][name]
        tvs = [m[name] - base for m in models[1:]]
        if method == "iso_c":
            expected = base + 1.2 * iso_c_ref(tvs)
        elif method == "iso_cts":
            expected = base + iso_cts_ref(tvs, 0.6)
        elif method == "tsv_m":
            expected = base + 0.9 * tsv_ref([0.8 * t for t in tvs])
        else:
            expected = base + wudi_ref(tvs, 5, 1e-3)[0]
        close(merged[name], expected, tol=1e-4)


def test_decompose_set_per_tensor_with_a_filter_gives_those_tensors_the_mean(family):
    import tiny

    from mergekit_mlx import merge

    base_path, *fts = family
    recipe = {
        "merge_method": "iso_c",
        "base_model": str(base_path),
        "parameters": {"decompose": [{"filter": "mlp", "value": False}, {"value": True}]},
        "models": [{"model": str(p)} for p in fts],
        "dtype": "float32",
    }
    merged = {k: np.array(v.astype(mx.float32)).astype(np.float64) for k, v in merge(recipe).weights.items()}
    models = [tiny.load_np(p) for p in family]
    for name, ref in (("model.layers.0.mlp.up_proj.weight", None), ("model.layers.0.self_attn.q_proj.weight", iso_c_ref)):
        base = models[0][name]
        tvs = [m[name] - base for m in models[1:]]
        expected = base + (sum(tvs) / len(tvs) if ref is None else ref(tvs))
        close(merged[name], expected, tol=1e-4)


def test_a_small_but_genuine_singular_direction_keeps_its_share_in_iso_c():
    # singular values from 1 down to 2e-6 (17 float32 eps): a direction a rank cut of
    # max(m, n) * eps would drop, though the float32 matrix determines it
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    v, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    s = np.concatenate([np.linspace(1.0, 0.1, 63), [2e-6]])
    task = ((u * s) @ v.T).astype(np.float32)
    base = np.zeros_like(task)
    close(run("iso_c", [base, task]), iso_c_ref([task.astype(np.float64)]), tol=1e-5)


@pytest.mark.parametrize("shape, rank", [((30, 12), 12), ((12, 30), 12), ((20, 20), 5), ((16, 16), 0)], ids=str)
def test_thin_svd_reconstructs_with_orthonormal_factors_and_zeroes_null_directions(shape, rank):
    from mergekit_mlx.methods.subspace import thin_svd

    rng = np.random.default_rng(5)
    x = (rng.normal(size=(shape[0], rank)) @ rng.normal(size=(rank, shape[1]))).astype(np.float32)
    u, s, vh = thin_svd(x)
    assert u.shape == (shape[0], min(shape)) and vh.shape == (min(shape), shape[1])
    np.testing.assert_allclose((u * s) @ vh, x, atol=1e-5 * max(1.0, float(np.abs(x).max())))
    np.testing.assert_allclose(s, np.linalg.svd(x.astype(np.float64), compute_uv=False) * (np.arange(s.size) < rank), atol=1e-5)
    np.testing.assert_allclose(u[:, :rank].T @ u[:, :rank], np.eye(rank), atol=1e-9)
    np.testing.assert_allclose(vh[:rank] @ vh[:rank].T, np.eye(rank), atol=1e-9)
    assert not u[:, rank:].any() and not s[rank:].any()


@pytest.mark.parametrize("method, shared", ALL, ids=[m for m, _ in ALL])
def test_float64_inputs_are_merged_in_float64(method, shared):
    arrays = [a.astype(np.float64) for a in make(2, (14, 10), seed=11)]
    base, tvs = deltas(arrays)
    expected = {
        "iso_c": lambda: iso_c_ref(tvs),
        "iso_cts": lambda: iso_cts_ref(tvs, 0.8),
        "tsv_m": lambda: tsv_ref(tvs),
        "wudi": lambda: wudi_ref(tvs, 20, 1e-3)[0],
    }[method]()
    m = get_method(method)
    filled = {p.name: p.default for p in m.params if p.scope == "shared"} | shared
    per_input = [{}] + [{"weight": 1.0} for _ in tvs]
    tensors = [mx.array(a, dtype=mx.float64) for a in arrays]
    with mx.stream(mx.cpu):
        out = m.merge(MergeInputs(tensors, 0, filled, per_input, name=NAME))
        assert out.dtype == mx.float64
        # mlx.optimizers.Adam keeps its learning rate and bias corrections in float32
        np.testing.assert_allclose(np.array(out), base + expected, rtol=0, atol=1e-6 if method == "wudi" else 1e-9)
