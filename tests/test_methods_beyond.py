"""consensus_ta, consensus_ties, magmax, pcb and arcee_fusion's importance against independent
float64 numpy references written here from the published formulas; the consensus methods also
against mergekitty's own implementation when it is importable; each method once through a recipe.

Inputs are float32 with distinct values, so magnitude and score top-k have no ties unless a test
makes them.
"""

import mlx.core as mx
import numpy as np
import pytest
from method_runs import NAME, make, run
from test_metal_syntax import emulated_cuda, needs_clang  # noqa: F401 - the emulated CUDA kernels, as a fixture
from tiny import load_np, make_family

from mergekit_mlx import merge
from mergekit_mlx.errors import RecipeError
from mergekit_mlx.methods import MergeInputs, get_method
from mergekit_mlx.methods.arcee_fusion import row_kl

SHAPES = [(12, 20), (37,), (3, 4, 5)]  # a matrix, a norm-like vector, a 3-D tensor


def models(**columns):
    """per_input for base 0 and task models given as columns: models(weight=[1, 2], k=[1, 1])."""
    n = len(next(iter(columns.values())))
    return [{}] + [{key: vals[i] for key, vals in columns.items()} for i in range(n)]


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


# ---------------- references (float64, from the papers' formulas) ----------------


def top_k(a, k):
    """mask of the k largest |a|, ties to the lowest flat index."""
    order = np.argsort(-np.abs(a).ravel(), kind="stable")
    mask = np.zeros(a.size, bool)
    mask[order[:k]] = True
    return mask.reshape(a.shape)


def task_arithmetic_vector(deltas, weights, normalize):
    mixed = sum(w * d for w, d in zip(weights, deltas))
    total = sum(weights)
    return mixed / (total if abs(total) >= 1e-8 else 1.0) if normalize else mixed


def ties_vector(deltas, weights, densities, normalize, rescale=False):
    """TIES (Yadav et al. 2023): trim to the top density magnitudes, elect the sign of the weighted
    sum, average the agreeing (by their weights when normalize)."""
    kept = []
    for d, density in zip(deltas, densities):
        if density < 1:
            t = np.where(top_k(d, int(density * d.size)), d, 0.0)
            if rescale and np.abs(t).sum() > 0:
                t = t * np.abs(d).sum() / np.abs(t).sum()
            d = t
        kept.append(d)
    wd = [w * d for w, d in zip(weights, kept)]
    sign = np.where(sum(wd) >= 0, 1.0, -1.0)
    agree = [np.sign(x) == sign for x in wd]
    mixed = sum(np.where(a, x, 0.0) for a, x in zip(agree, wd))
    divisor = sum(np.where(a, w, 0.0) for a, w in zip(agree, weights))
    return mixed / np.where(divisor == 0, 1.0, divisor) if normalize else mixed


def consensus_ref(arrays, mixed_of, lambdas, k):
    """Consensus merging (Wang et al. 2024): the multi-task vector where at least k TALL masks
    |delta_t| > lambda_t |mixed - delta_t| hold (mergekitty's strict >; the paper writes >=), else
    the base."""
    base = arrays[0].astype(np.float64)
    deltas = [a.astype(np.float64) - base for a in arrays[1:]]
    mixed = mixed_of(deltas)
    votes = sum((np.abs(d) > lam * np.abs(mixed - d)).astype(int) for d, lam in zip(deltas, lambdas))
    return base + np.where(votes >= k, mixed, 0.0)


def magmax_ref(arrays, scaling_factor):
    base = arrays[0].astype(np.float64)
    deltas = np.stack([a.astype(np.float64) - base for a in arrays[1:]])
    # the largest |delta|; on equal magnitudes the last model (argmax of the reversed stack)
    last = deltas.shape[0] - 1 - np.argmax(np.abs(deltas)[::-1], axis=0)
    chosen = np.take_along_axis(deltas, last[None], axis=0)[0]
    return base + scaling_factor * chosen


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def l2_unit(v):
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(n > 0, n, 1.0)


def pcb_ref(arrays, density, weight):
    """PCB (Du et al. 2024), eqs. for intra/inter balancing, drop and rescale, per tensor."""
    base = arrays[0].astype(np.float64)
    tv = np.stack([(a.astype(np.float64) - base).ravel() for a in arrays[1:]])
    n, d = tv.shape
    intra = softmax(n * l2_unit(tv * tv))
    inter = np.stack([sum(softmax(l2_unit(tv[i] * tv[j])) for j in range(n)) for i in range(n)])
    beta = intra * inter
    kept = np.stack([np.where(top_k(b, int(density * d)), b, 0.0) for b in beta])
    total = kept.sum(axis=0)
    merged = np.where(total > 0, (kept * tv).sum(axis=0) / np.where(total > 0, total, 1.0), 0.0)
    return base + weight * merged.reshape(base.shape)


def kl_rows(other, base):
    """mergekit's KL(softmax(other) + 1e-8 || softmax(base) + 1e-8) per row, in float64."""
    p = softmax(other.astype(np.float64)) + 1e-8
    q = softmax(base.astype(np.float64)) + 1e-8
    return np.sum(p * np.log(p / q), axis=-1)


def fusion_choice(other, base):
    """Which elements arcee_fusion gives the other model, by its formula in float64."""
    scores = np.abs(other.astype(np.float64) - base) * kl_rows(other, base)[..., None]
    flat = np.sort(scores.ravel())
    q1, med, q3 = (flat[int(q * (flat.size - 1))] for q in (0.25, 0.5, 0.75))
    return scores >= med + 1.5 * (q3 - q1)


# ---------------- consensus_ta / consensus_ties ----------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("normalize", [False, True])
def test_consensus_ta_is_task_arithmetic_kept_where_k_tall_masks_agree(shape, k, normalize):
    arrays = make(4, seed=k, shape=shape)
    ws, lams = [1.0, 0.6, -0.3], [0.4, 1.0, 2.0]
    got = run("consensus_ta", arrays, {"normalize": normalize}, models(weight=ws, k=[k] * 3, **{"lambda": lams}))
    ref = consensus_ref(arrays, lambda ds: task_arithmetic_vector(ds, ws, normalize), lams, k)
    close(got, ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("rescale", [False, True])
def test_consensus_ties_is_ties_kept_where_k_tall_masks_agree(shape, k, rescale):
    arrays = make(4, seed=10 + k, shape=shape)
    ws, dens, lams = [1.0, 0.7, 0.5], [0.5, 0.8, 1.0], [0.5, 0.5, 1.5]
    per = models(weight=ws, density=dens, k=[k] * 3, **{"lambda": lams})
    got = run("consensus_ties", arrays, {"rescale": rescale}, per)
    # the TALL masks see the task vectors themselves, not their rescaled sparsifications
    ref = consensus_ref(arrays, lambda ds: ties_vector(ds, ws, dens, True, rescale), lams, k)
    close(got, ref)


@pytest.mark.parametrize("method, plain", [("consensus_ta", "task_arithmetic"), ("consensus_ties", "ties")])
def test_consensus_with_k_0_keeps_every_element_of_the_plain_merge(method, plain):
    arrays = make(4, seed=60)
    per = models(weight=[1.0, 0.5, 0.3], density=[0.4, 0.6, 1.0])
    consensus = [dict(d, k=0) if i else d for i, d in enumerate(per)]
    np.testing.assert_array_equal(run(method, arrays, {}, consensus), run(plain, arrays, {}, per))


def test_consensus_ties_defaults_are_mergekittys():
    m = get_method("consensus_ties")
    assert [m.param(p).default for p in ("density", "normalize", "rescale", "k", "lambda")] == [1.0, True, False, 1, 1.0]
    assert get_method("consensus_ta").param("normalize").default is False


def test_consensus_of_one_model_at_weight_one_is_that_model():
    arrays = make(2, seed=3)
    for method in ("consensus_ta", "consensus_ties"):
        got = run(method, arrays, {}, models(weight=[1.0]))
        close(got, arrays[1].astype(np.float64), tol=1e-6)  # base + (x - base), rounded


def test_consensus_of_identical_models_follows_the_masks():
    base, ft = make(2, seed=4)
    arrays = [base, ft, ft]
    # unnormalized, mixed = 2 delta and |delta| > |mixed - delta| never holds: the base
    got = run("consensus_ta", arrays, {}, models(weight=[1.0, 1.0]))
    np.testing.assert_array_equal(got, base.astype(np.float64))
    # normalized, mixed = delta: every changed element is kept
    got = run("consensus_ta", arrays, {"normalize": True}, models(weight=[1.0, 1.0], k=[2, 2]))
    close(got, ft.astype(np.float64), tol=1e-6)


def test_consensus_of_zero_task_vectors_is_the_base():
    base = make(1, seed=5)[0]
    for method in ("consensus_ta", "consensus_ties"):
        got = run(method, [base, base.copy(), base.copy()], {}, models(weight=[1.0, 0.5], density=[0.5, 0.5]))
        np.testing.assert_array_equal(got, base.astype(np.float64))


@pytest.mark.parametrize("method", ["consensus_ta", "consensus_ties"])
@pytest.mark.parametrize("case", range(3))
def test_consensus_equals_mergekittys_own_implementation(method, case):
    torch = pytest.importorskip("torch")
    pytest.importorskip("mergekitty")
    from mergekitty.architecture import WeightInfo
    from mergekitty.common import ImmutableMap, ModelReference
    from mergekitty.merge_methods.generalized_task_arithmetic import GTATask
    from mergekitty.merge_methods.registry import REGISTERED_MERGE_METHODS

    if method not in REGISTERED_MERGE_METHODS:
        pytest.skip(f"this mergekitty has no {method}")
    shape = SHAPES[case]
    arrays = make(4, seed=20 + case, shape=shape)
    ws, dens = [1.0, 0.5, 0.8], [0.4, 0.6, 0.9]
    k, lam, normalize = [1, 2, 3][case], [1.0, 0.5, 0.3][case], bool(case % 2)
    refs = [ModelReference.parse(f"m{i}") for i in range(4)]
    params = [{"weight": w, "density": d, "k": k, "lambda": lam} for w, d in zip(ws, dens)]
    task = GTATask.model_construct(
        method=REGISTERED_MERGE_METHODS[method],
        tensors=None,
        base_model=refs[0],
        weight_info=WeightInfo(name=NAME),
        tensor_parameters=ImmutableMap({r: ImmutableMap(p) for r, p in zip(refs[1:], params)}),
        int8_mask=False,
        normalize=normalize,
        rescale=False,
    )
    theirs = task.execute(tensors={r: torch.from_numpy(a.copy()) for r, a in zip(refs, arrays)}).numpy()
    ours = run(method, arrays, {"normalize": normalize}, [{}] + params)
    close(ours, theirs.astype(np.float64), tol=1e-6)


# ---------------- magmax ----------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_magmax_takes_the_largest_magnitude_task_vector(shape, n):
    arrays = make(n + 1, seed=30 + n, shape=shape)
    close(run("magmax", arrays), magmax_ref(arrays, 0.5))
    close(run("magmax", arrays, {"scaling_factor": -1.25}), magmax_ref(arrays, -1.25))


def test_magmax_gives_equal_magnitudes_to_the_later_model():
    base = np.zeros(4, np.float32)
    a = np.array([0.5, -0.5, 0.25, 0.0], np.float32)
    b = np.array([-0.5, 0.5, -0.5, 0.0], np.float32)
    got = run("magmax", [base, a, b], {"scaling_factor": 1.0})
    np.testing.assert_array_equal(got, [-0.5, 0.5, -0.5, 0.0])


def test_magmax_of_zero_or_identical_task_vectors():
    base, ft = make(2, seed=6)
    np.testing.assert_array_equal(run("magmax", [base, base.copy(), base.copy()]), base.astype(np.float64))
    close(run("magmax", [base, ft, ft], {"scaling_factor": 1.0}), ft.astype(np.float64), tol=1e-6)


# ---------------- pcb ----------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("density", [0.2, 0.7, 1.0])
def test_pcb_is_the_papers_balanced_drop_and_rescale(shape, n, density):
    arrays = make(n + 1, seed=40 + n, shape=shape)
    got = run("pcb", arrays, {"density": density, "weight": 0.8})
    close(got, pcb_ref(arrays, density, 0.8))


def test_pcb_scores_of_a_2m_element_tensor_keep_their_digits():
    """Each task vector's softmax is one row of the whole tensor: its sum, and the norm, must not
    drift (MLX's plain CPU softmax of a row this long is ~1e-3 off, which moves the mixture)."""
    rng = np.random.default_rng(9)
    base = rng.normal(0, 0.02, (2048, 1024)).astype(np.float32)
    arrays = [base] + [(base + rng.normal(0, s, base.shape)).astype(np.float32) for s in (0.002, 0.004)]
    delta = run("pcb", arrays, {"density": 1.0}) - base
    expected = pcb_ref(arrays, 1.0, 1.0) - base
    assert np.max(np.abs(delta - expected)) <= 1e-5 * np.max(np.abs(expected))


def test_pcb_rescales_per_element_so_one_kept_model_keeps_its_delta():
    base, ft = make(2, seed=7)
    got = run("pcb", [base, ft], {"density": 0.3})
    kept = got != base.astype(np.float64)
    assert kept.sum() == int(0.3 * base.size)
    close(got[kept], ft.astype(np.float64)[kept], tol=1e-6)


def test_pcb_of_zero_task_vectors_is_the_base_and_of_identical_ones_their_delta():
    base, ft = make(2, seed=8)
    np.testing.assert_array_equal(run("pcb", [base, base.copy(), base.copy()], {"density": 0.5}), base.astype(np.float64))
    close(run("pcb", [base, ft, ft], {"density": 1.0}), ft.astype(np.float64), tol=1e-6)


def test_pcb_with_a_density_that_keeps_no_element_is_the_base():
    arrays = make(3, seed=11, shape=(37,))  # int(0.01 * 37) = 0
    np.testing.assert_array_equal(run("pcb", arrays, {"density": 0.01}), arrays[0].astype(np.float64))


def test_pcb_needs_a_density():
    assert get_method("pcb").param("density").required
    assert get_method("pcb").param("weight").default == 1.0


# ---------------- every method on bfloat16 inputs ----------------


@pytest.mark.parametrize(
    "method, shared, per, reference",
    [
        ("consensus_ta", {}, models(weight=[1.0, 0.5]), lambda a: consensus_ref(a, lambda ds: ds[0] + 0.5 * ds[1], [1, 1], 1)),
        (
            "consensus_ties",
            {},
            models(weight=[1.0, 0.5], density=[0.5, 0.5]),
            lambda a: consensus_ref(a, lambda ds: ties_vector(ds, [1.0, 0.5], [0.5, 0.5], True), [1, 1], 1),
        ),
        ("magmax", {}, None, lambda a: magmax_ref(a, 0.5)),
        ("pcb", {"density": 0.5}, None, lambda a: pcb_ref(a, 0.5, 1.0)),
    ],
    ids=["consensus_ta", "consensus_ties", "magmax", "pcb"],
)
def test_bfloat16_inputs_are_merged_in_float32_and_rounded_once(method, shared, per, reference):
    arrays = [np.array(mx.array(a).astype(mx.bfloat16).astype(mx.float32)) for a in make(3, seed=50)]
    m = get_method(method)
    per = [dict(d) for d in (per or [{}, {}, {}])]
    for p in m.params:
        if p.scope == "shared":
            shared.setdefault(p.name, p.default)
        else:
            for d in per[1:]:
                d.setdefault(p.name, p.default)
    tensors = [mx.array(a).astype(mx.bfloat16) for a in arrays]
    out = m.merge(MergeInputs(tensors, 0, shared, per, name=NAME, seed=0, input_ids=[0, 1, 2]))
    assert out.dtype == mx.bfloat16
    expected = np.array(mx.array(reference(arrays).astype(np.float32)).astype(mx.bfloat16).astype(mx.float32))
    got = np.array(out.astype(mx.float32))
    # one bfloat16 rounding of the float32 result: equal, or one step apart where float32 rounding sat on a tie
    assert (np.abs(got - expected) <= np.abs(expected) * 2.0**-8).all()


@needs_clang
def test_the_gpu_kernels_merge_as_the_cpu_path(emulated_cuda):  # noqa: F811
    """consensus_ties' selection and fused merge, and pcb's top-k, through the CUDA kernels (emulated
    on the CPU) equal the CPU path bit for bit."""
    arrays = make(4, seed=1, shape=(60, 50))
    cases = [
        ("consensus_ties", {}, models(weight=[1.0, 0.5, 0.3], density=[0.3, 0.5, 0.9])),
        ("consensus_ties", {"rescale": True}, models(weight=[1.0, 0.5, 0.3], density=[0.3, 0.5, 0.9], k=[2, 2, 2])),
        ("pcb", {"density": 0.4}, None),
    ]
    for method, shared, per in cases:
        outs = []
        for on in (True, False):
            emulated_cuda["on"] = on
            outs.append(run(method, arrays, dict(shared), [dict(d) for d in per] if per else None))
        emulated_cuda["on"] = True
        if shared.get("rescale"):  # the L1 sums add in another order on the GPU
            close(outs[0], outs[1], tol=1e-6)
        else:
            np.testing.assert_array_equal(outs[0], outs[1], err_msg=method)


# ---------------- arcee_fusion's importance ----------------


@pytest.mark.parametrize(
    "logit_scale, delta_scale, cols",
    [(0.02, 0.006, 1024), (0.02, 1e-5, 2048), (1.0, 0.1, 4096), (10.0, 5.0, 512), (5.0, 0.0, 64)],
)
def test_arcee_fusion_row_kl_is_within_1e_5_of_the_float64_formula(logit_scale, delta_scale, cols):
    rng = np.random.default_rng(cols)
    base = (rng.standard_normal((16, cols)) * logit_scale).astype(np.float32)
    other = (base + rng.standard_normal((16, cols)) * delta_scale).astype(np.float32)
    got = np.array(row_kl(mx.array(other), mx.array(base)))[:, 0].astype(np.float64)
    ref = kl_rows(other, base)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-30)
    assert (got >= 0).all()


def held_out_case(seed):
    """The issue's case class: float32, fine-tune deltas ~30% of the weights, a 1024x976 tensor
    (below the 1e6 elements beyond which quartiles are sampled)."""
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal((1024, 976)) * 0.02).astype(np.float32)
    other = (base * (1 + 0.3 * rng.standard_normal(base.shape))).astype(np.float32)
    return base, other


def test_arcee_fusion_chooses_as_the_float64_formula_on_the_held_out_case():
    base, other = held_out_case(0)
    got = run("arcee_fusion", [base, other])
    chose_other = (got == other) & (other != base)
    missed = int((chose_other != (fusion_choice(other, base) & (other != base))).sum())
    assert missed <= 5, f"{missed} of {base.size} elements chosen otherwise than the float64 formula"


def test_arcee_fusion_misses_no_more_elements_than_mergekit():
    torch = pytest.importorskip("torch")
    fusion = pytest.importorskip("mergekit.merge_methods.arcee_fusion")
    compute = getattr(fusion, "_compute_importance", None)
    if compute is None:
        pytest.skip("this mergekit has no _compute_importance")
    base, other = held_out_case(1)
    truth = fusion_choice(other, base)

    def choice(scores):
        flat = np.sort(scores.ravel())
        q1, med, q3 = (flat[int(q * (flat.size - 1))] for q in (0.25, 0.5, 0.75))
        return scores >= med + 1.5 * (q3 - q1)

    theirs = choice(compute(torch.from_numpy(other), torch.from_numpy(base)).numpy())
    ours = (run("arcee_fusion", [base, other]) == other) & (other != base)
    missed_theirs = int((theirs != truth).sum())
    missed_ours = int((ours != (truth & (other != base))).sum())
    assert missed_ours <= missed_theirs, (missed_ours, missed_theirs)


# ---------------- through a recipe ----------------


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("beyond"), n_finetunes=2, seed=3)


def recipe(method, family, parameters=None, per_model=None):
    base, *fts = family
    return {
        "merge_method": method,
        "base_model": str(base),
        "dtype": "float32",
        "parameters": parameters or {},
        "models": [{"model": str(f), "parameters": dict(per_model or {})} for f in fts],
    }


@pytest.mark.parametrize(
    "method, parameters, per_model, reference",
    [
        (
            "consensus_ta",
            {"k": 2, "lambda": 0.5},
            {"weight": 0.7},
            lambda a: consensus_ref(a, lambda ds: task_arithmetic_vector(ds, [0.7, 0.7], False), [0.5, 0.5], 2),
        ),
        (
            "consensus_ties",
            {},
            {"weight": 1.0, "density": 0.5},
            lambda a: consensus_ref(a, lambda ds: ties_vector(ds, [1.0, 1.0], [0.5, 0.5], True), [1.0, 1.0], 1),
        ),
        ("magmax", {}, {}, lambda a: magmax_ref(a, 0.5)),
        ("pcb", {"density": 0.4}, {}, lambda a: pcb_ref(a, 0.4, 1.0)),
    ],
    ids=["consensus_ta", "consensus_ties", "magmax", "pcb"],
)
def test_recipe_merges_every_tensor_as_the_reference(family, method, parameters, per_model, reference):
    result = merge(recipe(method, family, parameters, per_model))
    tensors = [load_np(p) for p in family]
    for name, out in result.weights.items():
        ref = reference([t[name].astype(np.float32) for t in tensors])
        close(np.array(out).astype(np.float64), ref)


def test_recipe_with_k_above_the_number_of_task_models_is_refused(family):
    with pytest.raises(RecipeError, match=r"^parameters: k is 3 but there are only 2 task models"):
        merge(recipe("consensus_ta", family, {"k": 3}, {"weight": 1.0}))


def test_recipe_with_a_different_k_per_model_is_refused(family):
    r = recipe("consensus_ties", family, {}, {"weight": 1.0})
    r["models"][1]["parameters"]["k"] = 2
    with pytest.raises(
        RecipeError,
        match=r"models\[1\]\.parameters: k must be the same for every model \(one consensus threshold\), got 2 here and 1 before",
    ):
        merge(r)


def test_recipe_without_a_pcb_density_is_refused(family):
    with pytest.raises(RecipeError, match=r"parameters\.density: required"):
        merge(recipe("pcb", family))
