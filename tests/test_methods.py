"""Core merge methods against independent float64 numpy references.

Inputs are float32 with distinct magnitudes, so magnitude top-k has no ties and the references
need no tie rule; random masks are taken from the project's counter-based generator (the one
thing the reference cannot know) and everything else is recomputed here.
"""

import mlx.core as mx
import numpy as np
import pytest

from mergekit_mlx import kernels
from mergekit_mlx.errors import RecipeError
from mergekit_mlx.methods import MergeInputs, get_method

SHAPE = (24, 40)
NAME = "model.layers.0.mlp.up_proj.weight"


def make_inputs(n_models=3, seed=0, scale=0.1):
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, SHAPE).astype(np.float32)
    others = [(base + rng.normal(0, scale, SHAPE)).astype(np.float32) for _ in range(n_models - 1)]
    return [base] + others


def run(method, arrays, shared=None, per_input=None, base=0, seed=0):
    m = get_method(method)
    shared = dict(shared or {})
    per_input = per_input or [{} for _ in arrays]
    # fill defaults as the planner would
    for p in m.params:
        if p.scope == "shared" and p.name not in shared:
            shared[p.name] = p.default
        for i, d in enumerate(per_input):
            if p.scope == "non_base" and i == base:
                continue
            if p.scope != "shared" and p.name not in d:
                d[p.name] = p.default
    inputs = MergeInputs(
        tensors=[mx.array(a) for a in arrays],
        base=base,
        shared=shared,
        per_input=per_input,
        name=NAME,
        seed=seed,
        input_ids=list(range(len(arrays))),
    )
    return np.array(m.merge(inputs)).astype(np.float64)


def f64(arrays):
    return [a.astype(np.float64) for a in arrays]


# ---------------- references ----------------


def topk_ref(x, k):
    a = np.abs(x).ravel()
    order = np.lexsort((np.arange(a.size), -a))  # largest first, lowest index among equals
    mask = np.zeros(a.size, bool)
    mask[order[: max(k, 0)]] = True
    return mask.reshape(x.shape)


def l1_rescale_ref(delta, kept):
    before, after = np.abs(delta).sum(), np.abs(kept).sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def gta_ref(arrays, weights, masks, consensus, normalize, lam=1.0, rescale=False):
    base, others = f64(arrays)[0], f64(arrays)[1:]
    deltas = []
    for x, w, m in zip(others, weights, masks):
        d = x - base
        kept = np.where(m, d, 0.0)
        if rescale:
            kept = l1_rescale_ref(d, kept)
        deltas.append(kept * w)
    deltas = np.stack(deltas)
    wv = np.array(weights).reshape(-1, 1, 1)
    if consensus:
        majority = np.where(deltas.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(deltas) == majority
        mixed = (deltas * agree).sum(0)
        divisor = (wv * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(0)
        divisor = wv.sum() if abs(wv.sum()) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def random_mask(model_index, p, seed=0):
    return np.array(kernels.random_mask(seed, kernels.stream_id(NAME, model_index), SHAPE, p))


# ---------------- linear / passthrough / slerp ----------------


def test_linear_is_the_normalised_weighted_average():
    a = make_inputs()
    w = [0.2, 0.5, 0.3]
    got = run("linear", a, per_input=[{"weight": x} for x in w])
    ref = sum(wi * x for wi, x in zip(w, f64(a))) / sum(w)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_linear_without_normalize_is_the_weighted_sum():
    a = make_inputs()
    w = [1.0, -0.5, 2.0]
    got = run("linear", a, {"normalize": False}, [{"weight": x} for x in w])
    np.testing.assert_allclose(got, sum(wi * x for wi, x in zip(w, f64(a))), rtol=1e-5, atol=1e-5)


def test_linear_refuses_weights_summing_to_zero_when_normalising():
    a = make_inputs(2)
    with pytest.raises(RecipeError, match="sum to 0"):
        run("linear", a, per_input=[{"weight": 1.0}, {"weight": -1.0}])


def test_passthrough_copies_and_scales():
    a = make_inputs(1)
    np.testing.assert_array_equal(run("passthrough", a, per_input=[{"scale": None}]), f64(a)[0])
    np.testing.assert_allclose(run("passthrough", a, per_input=[{"scale": 0.5}]), 0.5 * f64(a)[0], rtol=1e-6)


def slerp_ref(t, v0, v1):
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    u0 = v0 / n0 if n0 > 1e-8 else v0
    u1 = v1 / n1 if n1 > 1e-8 else v1
    dot = np.clip(np.sum(u0 * u1), -1, 1)
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = np.arccos(dot)
    return np.sin((1 - t) * theta) / np.sin(theta) * v0 + np.sin(t * theta) / np.sin(theta) * v1


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_follows_the_great_circle(t):
    rng = np.random.default_rng(3)
    a = [rng.normal(0, 1, SHAPE).astype(np.float32) for _ in range(2)]
    got = run("slerp", a, {"t": t}, [{}, {}], base=0)
    np.testing.assert_allclose(got, slerp_ref(t, *f64(a)), rtol=1e-4, atol=1e-5)


def test_slerp_falls_back_to_lerp_for_colinear_tensors():
    rng = np.random.default_rng(4)
    v = rng.normal(0, 1, SHAPE).astype(np.float32)
    a = [v, (2 * v).astype(np.float32)]
    got = run("slerp", a, {"t": 0.25}, [{}, {}], base=0)
    np.testing.assert_allclose(got, 0.75 * f64(a)[0] + 0.25 * f64(a)[1], rtol=1e-5)


def test_slerp_base_may_be_the_second_input():
    rng = np.random.default_rng(5)
    a = [rng.normal(0, 1, SHAPE).astype(np.float32) for _ in range(2)]
    got = run("slerp", a, {"t": 0.3}, [{}, {}], base=1)
    np.testing.assert_allclose(got, slerp_ref(0.3, f64(a)[1], f64(a)[0]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_slerp_sums_are_the_norms_and_dot_of_the_uncompiled_graph(dtype):
    """The chained sums of the compiled squares and quotients give norm()'s and the plain graph's
    float32 sums bit for bit (2.5 million elements: long sums, where any reordering shows)."""
    from mergekit_mlx.methods import slerp as S

    rng = np.random.default_rng(6)
    x = rng.normal(0, 0.02, (1237, 2021)).astype(np.float32)  # 2.4 pieces of a chained sum
    v0, v1 = mx.array(x).astype(dtype), mx.array(x + rng.normal(0, 0.01, x.shape).astype(np.float32)).astype(dtype)
    a, b = v0.astype(mx.float32), v1.astype(mx.float32)
    na, nb = mx.linalg.norm(a.reshape(-1)), mx.linalg.norm(b.reshape(-1))
    assert mx.sqrt(S.chained_sum(S._squares, v0)).item() == na.item()
    assert mx.sqrt(S.chained_sum(S._squares, v1)).item() == nb.item()
    assert S.chained_sum(S._quotients_product, v0, v1, na, nb).item() == mx.sum((a / na) * (b / nb)).item()


# slerp's CPU path: the norms and the dot product from one numpy pass over chunks
# (mergekit_mlx.kernels.slerp, CHUNK = 2**17 elements), the combination a compiled MLX graph

BF16_STEP = 2.0**-8  # a bf16 rounding moves a value by at most this much of itself


@pytest.fixture
def on_cpu():
    """The CPU as MLX's default device (where the numpy pass applies), also on a GPU machine."""
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)


def slerp_pair(shape, dtype, seed, angle_noise=0.5):
    """Two tensors at a sizeable angle, as `dtype`, and their values in float64."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.02, shape).astype(np.float32)
    y = (x + rng.normal(0, 0.02 * angle_noise, shape)).astype(np.float32)
    v0, v1 = mx.array(x).astype(dtype), mx.array(y).astype(dtype)
    return v0, v1, [np.array(v.astype(mx.float32)).astype(np.float64) for v in (v0, v1)]


def within_bf16_rounding(got: mx.array, ref: np.ndarray, steps: float = 1.0):
    g = np.array(got.astype(mx.float32)).astype(np.float64)
    tol = steps * BF16_STEP * np.abs(ref) + 1e-6 * np.abs(ref).max()
    assert np.all(np.abs(g - ref) <= tol), float(np.max(np.abs(g - ref) / (np.abs(ref) + 1e-30)))


@pytest.mark.usefixtures("on_cpu")
@pytest.mark.parametrize("shape", [(7, 40001), (1001,), (2, 1 << 17), ((1 << 17) + 1,)])
def test_slerp_cpu_path_bf16_matches_float64_slerp(shape):
    """Odd sizes, sizes that are not a multiple of the chunk, and one chunk and one element."""
    from mergekit_mlx.methods.slerp import slerp_tensors

    v0, v1, (a, b) = slerp_pair(shape, mx.bfloat16, seed=11)
    got = slerp_tensors(0.4, v0, v1)
    assert got.dtype == mx.bfloat16 and got.shape == v0.shape
    within_bf16_rounding(got, slerp_ref(0.4, a, b))


@pytest.mark.usefixtures("on_cpu")
def test_slerp_cpu_path_float32_matches_float64_slerp():
    from mergekit_mlx.methods.slerp import slerp_tensors

    v0, v1, (a, b) = slerp_pair((5, 60001), mx.float32, seed=12)
    got = slerp_tensors(0.7, v0, v1)
    assert got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), slerp_ref(0.7, a, b), rtol=1e-5, atol=1e-7)


@pytest.mark.usefixtures("on_cpu")
def test_slerp_cpu_path_mixed_dtypes_give_the_base_dtype():
    from mergekit_mlx.methods.slerp import slerp_tensors

    v0, _, (a, _) = slerp_pair((3, 50001), mx.bfloat16, seed=13)
    _, v1, (_, b) = slerp_pair((3, 50001), mx.float32, seed=14)
    got = slerp_tensors(0.25, v0, v1)
    assert got.dtype == mx.bfloat16
    within_bf16_rounding(got, slerp_ref(0.25, a, b))


@pytest.mark.usefixtures("on_cpu")
def test_slerp_cpu_path_interpolates_linearly_when_colinear():
    from mergekit_mlx.methods.slerp import slerp_tensors

    v0, _, (a, _) = slerp_pair((3, 70001), mx.bfloat16, seed=15)
    v1 = v0 * -2  # exact in bf16: the cosine is -1 (antipodal counts as colinear too)
    got = slerp_tensors(0.3, v0, v1)
    within_bf16_rounding(got, 0.7 * a + 0.3 * (-2 * a))
    v1 = v0 * 2
    within_bf16_rounding(slerp_tensors(0.3, v0, v1), 0.7 * a + 0.3 * (2 * a))


@pytest.mark.usefixtures("on_cpu")
@pytest.mark.parametrize("scale", [0.0, 1e-12])
def test_slerp_cpu_path_tiny_norm_counts_as_one(scale):
    """|v0| <= 1e-8: mergekit leaves v0 unnormalised, so the cosine is about 0 and the angle
    about a right one (a zero tensor, and one of norm 1e-9 that a normalisation would keep)."""
    from mergekit_mlx.methods.slerp import slerp_tensors

    _, v1, (_, b) = slerp_pair((2, 70001), mx.bfloat16, seed=16)
    v0 = (mx.array(b, dtype=mx.float32) * (scale / 0.02)).astype(mx.bfloat16)  # v1's direction, |v0| 1e-9
    a = np.array(v0.astype(mx.float32)).astype(np.float64)
    assert np.linalg.norm(a) <= 1e-8
    got = slerp_tensors(0.3, v0, v1)
    within_bf16_rounding(got, slerp_ref(0.3, a, b))
    within_bf16_rounding(got, np.sin(0.3 * np.pi / 2) * b + np.sin(0.7 * np.pi / 2) * a)


@pytest.mark.usefixtures("on_cpu")
def test_slerp_cpu_path_and_mlx_graph_agree_within_one_bf16_step():
    """The graph's sequential float32 sums are accurate enough on 2**16 elements: the two
    paths' coefficients agree far below a bf16 step, so the outputs differ by at most one."""
    from mergekit_mlx import kernels
    from mergekit_mlx.methods.slerp import slerp_graph, slerp_tensors

    v0, v1, (a, b) = slerp_pair((64, 1024), mx.bfloat16, seed=17)
    assert kernels.slerp_sums_apply(v0, v1)
    cpu = np.array(slerp_tensors(0.6, v0, v1).astype(mx.float32)).astype(np.float64)
    graph = np.array(slerp_graph(0.6, v0, v1).astype(mx.float32)).astype(np.float64)
    # a bf16 ulp is at most 2**-7 of the value; where ca * v0 + cb * v1 nearly cancels, the
    # coefficients' difference (the graph's float32 sums: 4e-5) shows as a tiny absolute one
    step = BF16_STEP * 2 * np.maximum(np.abs(cpu), np.abs(graph)) + 1e-5 * np.abs(cpu).max()
    assert np.all(np.abs(cpu - graph) <= step)
    assert np.mean(cpu != graph) < 0.01  # one-step differences only where a value sat near a rounding midpoint


@pytest.mark.usefixtures("on_cpu")
def test_slerp_sums_are_float64_accurate():
    """v0.v0, v1.v1, v0.v1 over 2.3 chunks (bf16 pairs, a float32 input, an odd tail) to a few
    parts in a million (float32 dot products of 2**17 elements, added in float64)."""
    from mergekit_mlx import kernels

    for dtypes, n in [
        ((mx.bfloat16, mx.bfloat16), 300001),
        ((mx.bfloat16, mx.float32), 300000),
        ((mx.float32, mx.float32), 300001),
    ]:
        v0, _, (a, _) = slerp_pair((n,), dtypes[0], seed=18)
        _, v1, (_, b) = slerp_pair((n,), dtypes[1], seed=19)
        np.testing.assert_allclose(kernels.slerp_sums(v0, v1), [a @ a, b @ b, a @ b], rtol=1e-5)


@pytest.mark.usefixtures("on_cpu")
def test_slerp_sums_of_embedding_sized_tensors_split_between_threads(monkeypatch):
    """Tensors of SPLIT elements or more are summed in two halves on two threads: same sums."""
    from mergekit_mlx import kernels
    from mergekit_mlx.kernels import host

    monkeypatch.setattr(host, "SPLIT", 1 << 18)
    v0, v1, (a, b) = slerp_pair((5, 100001), mx.bfloat16, seed=20)
    a, b = a.ravel(), b.ravel()
    np.testing.assert_allclose(kernels.slerp_sums(v0, v1), [a @ a, b @ b, a @ b], rtol=1e-5)


def test_slerp_nan_input_spreads_nan_like_mergekit():
    """A NaN makes the sums NaN: the MLX graph runs, and every coefficient (so every output) is NaN."""
    from mergekit_mlx.methods.slerp import slerp_tensors

    v0, v1, _ = slerp_pair((2, 70001), mx.bfloat16, seed=21)
    v1 = mx.where(mx.arange(v1.size).reshape(v1.shape) == 5, mx.array(float("nan"), dtype=mx.bfloat16), v1)
    assert np.isnan(np.array(slerp_tensors(0.5, v0, v1).astype(mx.float32))).all()


def test_slerp_of_empty_tensors_is_empty():
    from mergekit_mlx.methods.slerp import slerp_graph, slerp_tensors

    e = mx.zeros((0, 8), dtype=mx.bfloat16)
    assert slerp_tensors(0.5, e, e).shape == (0, 8)
    assert slerp_graph(0.5, e, e).shape == (0, 8)


# ---------------- task-arithmetic family ----------------


def test_task_arithmetic_adds_weighted_task_vectors_times_lambda():
    a = make_inputs()
    w = [0.7, -0.4]
    got = run("task_arithmetic", a, {"lambda": 1.5}, [{}, {"weight": w[0]}, {"weight": w[1]}])
    ones = [np.ones(SHAPE, bool)] * 2
    np.testing.assert_allclose(got, gta_ref(a, w, ones, False, False, lam=1.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.1, 1e-4])
def test_ties_keeps_top_density_elects_signs_and_takes_the_disjoint_mean(density):
    a = make_inputs(3)
    w = [1.0, 0.6]
    got = run("ties", a, {}, [{}, {"weight": w[0], "density": density}, {"weight": w[1], "density": density}])
    n = a[0].size
    k = max(1, int(density * n))
    masks = [topk_ref(x.astype(np.float64) - a[0], k) if density < 1 else np.ones(SHAPE, bool) for x in a[1:]]
    np.testing.assert_allclose(got, gta_ref(a, w, masks, True, True), rtol=1e-5, atol=1e-5)


def test_ties_with_negative_weight():
    a = make_inputs(3)
    w = [1.0, -0.5]
    got = run("ties", a, {"normalize": False}, [{}, {"weight": w[0], "density": 0.3}, {"weight": w[1], "density": 0.3}])
    k = int(0.3 * a[0].size)
    masks = [topk_ref(x.astype(np.float64) - a[0], k) for x in a[1:]]
    np.testing.assert_allclose(got, gta_ref(a, w, masks, True, False), rtol=1e-5, atol=1e-5)


def test_ties_density_zero_keeps_nothing():
    a = make_inputs(2)
    got = run("ties", a, {}, [{}, {"weight": 1.0, "density": 0.0}])
    np.testing.assert_array_equal(got, f64(a)[0])


def test_zero_task_vectors_give_the_base():
    base = make_inputs(1)[0]
    for method in ("ties", "dare_ties", "task_arithmetic", "breadcrumbs", "della"):
        per = [{}, {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}]
        got = run(method, [base, base.copy(), base.copy()], {}, per)
        np.testing.assert_array_equal(got, base.astype(np.float64), err_msg=method)


def test_only_the_base_returns_the_base():
    base = make_inputs(1)[0]
    got = run("ties", [base], {}, [{}])
    np.testing.assert_array_equal(got, base.astype(np.float64))


@pytest.mark.parametrize("method,consensus", [("dare_linear", False), ("dare_ties", True)])
def test_dare_drops_at_random_and_rescales_to_keep_the_l1_norm(method, consensus):
    a = make_inputs(3)
    w, p = [0.8, 0.5], 0.3
    got = run(method, a, {}, [{}, {"weight": w[0], "density": p}, {"weight": w[1], "density": p}], seed=7)
    masks = [random_mask(i + 1, p, seed=7) for i in range(2)]
    np.testing.assert_allclose(got, gta_ref(a, w, masks, consensus, False, rescale=True), rtol=1e-4, atol=1e-5)


def test_dare_keeps_about_density_of_the_elements():
    m = random_mask(1, 0.3, seed=11)
    assert abs(m.mean() - 0.3) < 0.03


def test_dare_same_seed_same_merge_other_seed_other_merge():
    a = make_inputs(2)
    per = [{}, {"weight": 1.0, "density": 0.5}]
    r1 = run("dare_linear", a, {}, [dict(d) for d in per], seed=1)
    r2 = run("dare_linear", a, {}, [dict(d) for d in per], seed=1)
    r3 = run("dare_linear", a, {}, [dict(d) for d in per], seed=2)
    np.testing.assert_array_equal(r1, r2)
    assert not np.array_equal(r1, r3)


def test_breadcrumbs_drops_the_smallest_and_the_largest():
    a = make_inputs(2)
    density, gamma = 0.5, 0.1
    got = run("breadcrumbs", a, {}, [{}, {"weight": 1.0, "density": density, "gamma": gamma}])
    d = a[1].astype(np.float64) - a[0]
    n = d.size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = np.argsort(np.abs(d).ravel(), kind="stable")
    mask = np.zeros(n, bool)
    mask[order[n_bot : n_bot + target]] = True
    np.testing.assert_allclose(got, gta_ref(a, [1.0], [mask.reshape(SHAPE)], False, False), rtol=1e-5, atol=1e-6)


def test_breadcrumbs_with_gamma_zero_is_plain_magnitude_pruning():
    # mergekit 0.1.4 emptied the tensor here (indices[n_bot:-0]); 0.1.5 and this project keep `density`
    a = make_inputs(2)
    got = run("breadcrumbs", a, {}, [{}, {"weight": 1.0, "density": 0.4, "gamma": 0.0}])
    d = a[1].astype(np.float64) - a[0]
    mask = topk_ref(d, int(0.4 * d.size))
    np.testing.assert_allclose(got, gta_ref(a, [1.0], [mask], False, False), rtol=1e-5, atol=1e-6)


def test_della_keep_probability_rises_with_magnitude_rank():
    a = make_inputs(2)
    density, eps = 0.5, 0.2
    got = run("della_linear", a, {}, [{}, {"weight": 1.0, "density": density, "epsilon": eps}], seed=3)
    d = a[1].astype(np.float64) - a[0]
    ranks = np.argsort(np.argsort(np.abs(d), axis=1, kind="stable"), axis=1, kind="stable")
    probs = (density - eps) + ranks / (d.shape[1] - 1) * 2 * eps
    mask = np.array(kernels.random_mask(3, kernels.stream_id(NAME, 1), SHAPE, mx.array(probs.astype(np.float32))))
    np.testing.assert_allclose(got, gta_ref(a, [1.0], [mask], False, False, rescale=True), rtol=1e-4, atol=1e-5)


def test_della_refuses_epsilon_outside_the_density_band():
    a = make_inputs(2)
    with pytest.raises(RecipeError, match="epsilon"):
        run("della", a, {}, [{}, {"weight": 1.0, "density": 0.1, "epsilon": 0.2}])


def test_bf16_inputs_compute_in_float32_and_round_once():
    a = make_inputs(3)
    w = [0.3, 0.3]
    arrays = [mx.array(x).astype(mx.bfloat16) for x in a]
    inputs = MergeInputs(
        arrays,
        0,
        {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False},
        [{}, {"weight": w[0], "density": 1.0}, {"weight": w[1], "density": 1.0}],
        NAME,
        0,
        [0, 1, 2],
    )
    got = get_method("task_arithmetic").merge(inputs)
    assert got.dtype == mx.bfloat16
    exact = [np.array(x.astype(mx.float32)).astype(np.float64) for x in arrays]
    ref = exact[0] + w[0] * (exact[1] - exact[0]) + w[1] * (exact[2] - exact[0])
    # one rounding to bf16 at the end: within one bf16 unit in the last place (2**-8 relative)
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), ref, rtol=2**-8, atol=1e-6)
