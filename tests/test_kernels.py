"""The kernel interface against float64 numpy references (CPU fallback here; the same file runs on a GPU).

References are written from the documented rules, not from the code under test:
- random numbers: the hash in mergekit_mlx/kernels/random.py's module docstring, re-implemented in numpy;
- magnitude: k-th largest |x| in float32, ties kept lowest flat index first;
- merges: mergekit 0.1.5's generalized task arithmetic in float64.
"""

import mlx.core as mx
import numpy as np
import pytest

from mergekit_mlx import kernels as K

# the kernels on the default device: on a GPU host (benchmarks/gpu_check.sh runs -m gpu) the GPU ones
pytestmark = pytest.mark.gpu

M32 = np.uint64(0xFFFFFFFF)


# ----------------------------------------------------------------------------- numpy references


def np_mix32(x):
    x = x.astype(np.uint64) & M32
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & M32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & M32
    x ^= x >> np.uint64(16)
    return x


def np_keys(seed, stream):
    lo, hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    k0 = int(np_mix32(np.array([lo ^ int(np_mix32(np.array([(stream ^ 0x9E3779B9) & 0xFFFFFFFF]))[0])]))[0])
    k1 = int(np_mix32(np.array([k0 ^ int(np_mix32(np.array([hi ^ 0x85EBCA6B]))[0])]))[0])
    return k0, k1


def np_uniform(seed, stream, n):
    k0, k1 = np_keys(seed, stream)
    i = np.arange(n, dtype=np.uint64)
    h = np_mix32((i * np.uint64(0x9E3779B9) + np.uint64(k0)) & M32)
    h = np_mix32(h ^ np.uint64(k1))
    return (h >> np.uint64(8)).astype(np.float64) / 2.0**24


def np_topk_mask(x, k):
    a = np.abs(np.asarray(x, dtype=np.float32)).reshape(-1).astype(np.float64)
    order = np.lexsort((np.arange(a.size), -a))  # by -|x|, then by index
    mask = np.zeros(a.size, dtype=bool)
    mask[order[: max(k, 0)]] = True
    return mask.reshape(np.shape(x))


def np_gta(base, others, weights, sparsify, densities, rescale, consensus, normalize, lam, seed=0, streams=None):
    """mergekit 0.1.5 generalized task arithmetic in float64 (selection on float32 |delta|)."""
    b = np.asarray(base, dtype=np.float64)
    n = b.size
    deltas = []
    for i, (o, w, dens) in enumerate(zip(others, weights, densities)):
        d = np.asarray(o, dtype=np.float64) - b
        if sparsify is not None and dens < 1:
            if sparsify == "magnitude":
                if dens <= 0:
                    mask = np.zeros(b.shape, dtype=bool)
                else:
                    d32 = np.asarray(o, np.float32) - np.asarray(base, np.float32)
                    mask = np_topk_mask(d32, max(1, int(dens * n)))
            else:
                u = np_uniform(seed, streams[i], n).reshape(b.shape)
                mask = u < np.float32(dens)
            kept = np.where(mask, d, 0.0)
            if rescale:
                before, after = np.abs(d).sum(), np.abs(kept).sum()
                if before >= 1e-7 and after >= 1e-7:
                    kept = kept * (before / after)
            d = kept
        deltas.append(d * w)
    deltas = np.stack(deltas)
    w = np.array(weights, dtype=np.float64).reshape(-1, *([1] * b.ndim))
    if consensus == "sum":
        majority = np.where(deltas.sum(0) >= 0, 1.0, -1.0)
        mask = np.sign(deltas) == majority
        mixed = (deltas * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(0)
        divisor = w.sum()
        divisor = 1.0 if abs(divisor) < 1e-8 else divisor
    if normalize:
        mixed = mixed / divisor
    return b + mixed * lam


def family(rng, shape=(48, 40), k=3, scale=0.02, dtype=np.float32):
    base = rng.standard_normal(shape).astype(dtype)
    others = [(base + scale * rng.standard_normal(shape)).astype(dtype) for _ in range(k)]
    return base, others


def to_mx(a, dtype=None):
    x = mx.array(np.asarray(a, dtype=np.float32))
    return x.astype(dtype) if dtype is not None else x


# ----------------------------------------------------------------------------- switches and hashing


def test_kernels_switch_follows_the_environment_and_a_context_that_restores_it(monkeypatch):
    monkeypatch.setenv("MERGEKIT_MLX_NO_KERNELS", "1")
    assert not K.kernels_enabled()
    monkeypatch.delenv("MERGEKIT_MLX_NO_KERNELS")
    assert K.kernels_enabled()
    with K.use_kernels(False):
        assert not K.kernels_enabled()
        with K.use_kernels(True):
            assert K.kernels_enabled()
        assert not K.kernels_enabled()
    assert K.kernels_enabled()


def test_stream_id_is_fnv1a_of_the_joined_parts():
    def fnv1a(data: bytes) -> int:
        h = 0x811C9DC5
        for c in data:
            h = ((h ^ c) * 0x01000193) % 2**32
        return h

    assert K.stream_id("a") == 0xE40C292C  # published FNV-1a test vector
    assert K.stream_id("model.layers.0.mlp.up_proj.weight", 2) == fnv1a(b"model.layers.0.mlp.up_proj.weight\x1f2")
    assert K.stream_id("w", 1) != K.stream_id("w", 2)


def test_random_uniform_is_the_documented_hash():
    u = np.array(K.random_uniform(1234, K.stream_id("w", 0), (37, 29)))
    ref = np_uniform(1234, K.stream_id("w", 0), 37 * 29).reshape(37, 29)
    assert u.dtype == np.float32
    np.testing.assert_array_equal(u.astype(np.float64), ref)


def test_random_uniform_lies_in_unit_interval_and_folds_large_seeds():
    u = np.array(K.random_uniform(2**40 + 7, 5, (4096,)))
    assert u.min() >= 0.0 and u.max() < 1.0
    np.testing.assert_array_equal(u.astype(np.float64), np_uniform(2**40 + 7, 5, 4096))
    assert not np.array_equal(u, np.array(K.random_uniform(7, 5, (4096,))))


def test_keep_mask_frequency_matches_probability():
    n = 200_000
    for p in (0.1, 0.5, 0.9):
        freq = np.array(K.random_mask(7, 3, (n,), p)).mean()
        assert abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n)


def test_keep_mask_streams_are_independent():
    n, p = 200_000, 0.5
    a = np.array(K.random_mask(7, K.stream_id("w", 0), (n,), p))
    b = np.array(K.random_mask(7, K.stream_id("w", 1), (n,), p))
    both = (a & b).mean()
    assert abs(both - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / n)


def test_keep_mask_accepts_per_element_probabilities():
    p = np.linspace(0, 1, 1000, dtype=np.float32)
    m = np.array(K.random_mask(3, 9, (1000,), mx.array(p)))
    np.testing.assert_array_equal(m, np_uniform(3, 9, 1000) < p)
    assert not m[0] and m[-1]


# ----------------------------------------------------------------------------- magnitude selection


@pytest.mark.parametrize("k", [1, 2, 100, 777, 2999, 3000])
def test_magnitude_threshold_is_kth_largest(k):
    x = np.random.default_rng(k).standard_normal(3000).astype(np.float32)
    ref = np.sort(np.abs(x).astype(np.float64))[::-1][k - 1]
    t = K.magnitude_threshold(mx.array(x), k)
    assert t.dtype == mx.float32 and t.ndim == 0
    assert float(t.item()) == ref


def test_magnitude_threshold_with_bf16_ties_and_zeros():
    rng = np.random.default_rng(1)
    x = to_mx(rng.standard_normal((64, 64)) * 0.01, mx.bfloat16)
    xf = np.abs(np.array(x.astype(mx.float32)).astype(np.float64)).reshape(-1)
    xf[:500] = 0.0
    x = mx.array(xf.reshape(64, 64).astype(np.float32)).astype(mx.bfloat16)
    srt = np.sort(xf)[::-1]
    for k in (1, 1000, 2048, 3700, 4096):
        assert float(K.magnitude_threshold(x, k).item()) == srt[k - 1]


def test_magnitude_threshold_clamps_k():
    x = mx.array(np.array([3.0, -5.0, 1.0], dtype=np.float32))
    assert K.magnitude_threshold(x, 0).item() == 5.0
    assert K.magnitude_threshold(x, 10).item() == 1.0


@pytest.mark.parametrize("k", [1, 37, 2048, 4095])
def test_topk_mask_breaks_ties_by_lowest_index(k):
    rng = np.random.default_rng(k)
    # bf16 values: many exact ties at any threshold
    x = to_mx(rng.standard_normal((64, 64)) * 0.01, mx.bfloat16)
    m = K.topk_mask(x, k)
    assert m.dtype == mx.bool_ and m.shape == x.shape
    assert int(m.sum().item()) == k
    np.testing.assert_array_equal(np.array(m), np_topk_mask(np.array(x.astype(mx.float32)), k))


def test_topk_mask_with_a_constant_tensor_keeps_the_first_k():
    x = mx.full((10, 10), -2.0)
    np.testing.assert_array_equal(np.array(K.topk_mask(x, 13)).reshape(-1), np.arange(100) < 13)


def test_topk_mask_edges():
    x = mx.array(np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32))
    assert not np.array(K.topk_mask(x, 0)).any()
    assert not np.array(K.topk_mask(x, -3)).any()
    assert np.array(K.topk_mask(x, 35)).all()
    assert np.array(K.topk_mask(x, 99)).all()


# ----------------------------------------------------------------------------- fused merge

METHODS = {
    # name: (sparsify, consensus, normalize, rescale) as mergekit 0.1.5 defaults them
    "task_arithmetic": (None, None, False, False),
    "ties": ("magnitude", "sum", True, False),
    "dare_ties": ("random", "sum", False, True),
    "dare_linear": ("random", None, False, True),
}


def run_both(base, others, weights, densities, method, lam=1.0, seed=11, dtype=None, rescale=None):
    sp, cons, norm, resc = METHODS[method]
    resc = resc if rescale is None else rescale
    streams = [K.stream_id("t", i) for i in range(len(others))]
    got = K.fused_task_merge(
        to_mx(base, dtype),
        [to_mx(o, dtype) for o in others],
        weights,
        sparsify=sp,
        densities=densities,
        rescale=resc,
        consensus=cons,
        normalize=norm,
        lam=lam,
        seed=seed,
        streams=streams,
    )
    ref = np_gta(base, others, weights, sp, densities, resc, cons, norm, lam, seed, streams)
    return got, ref


@pytest.mark.parametrize("method", list(METHODS))
def test_fused_merge_matches_float64_reference(method):
    base, others = family(np.random.default_rng(3))
    got, ref = run_both(base, others, [1.0, 0.6, 0.3], [0.5, 0.3, 0.9], method)
    assert got.dtype == mx.float32 and got.shape == base.shape
    np.testing.assert_allclose(np.array(got), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("method", list(METHODS))
def test_fused_merge_with_negative_weights_and_lambda(method):
    base, others = family(np.random.default_rng(4))
    got, ref = run_both(base, others, [1.2, -0.7, 0.4], [0.7, 0.5, 0.2], method, lam=0.8)
    np.testing.assert_allclose(np.array(got), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_fused_merge_density_one_and_near_zero(method):
    base, others = family(np.random.default_rng(5))
    n = base.size
    got, ref = run_both(base, others, [0.5, 0.5, 0.5], [1.0, 1.5 / n, 0.0], method)
    np.testing.assert_allclose(np.array(got), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("method", list(METHODS))
def test_fused_merge_with_zero_deltas(method):
    rng = np.random.default_rng(6)
    base, others = family(rng)
    others[1] = base.copy()  # a model identical to the base
    got, ref = run_both(base, others, [0.8, 0.5, 0.3], [0.4, 0.4, 0.4], method)
    np.testing.assert_allclose(np.array(got), ref, rtol=0, atol=2e-6)
    same = [base.copy(), base.copy()]
    got, ref = run_both(base, same, [1.0, 1.0], [0.5, 0.5], method)
    np.testing.assert_array_equal(np.array(got), base)


def test_fused_ties_with_rescale_matches_reference():
    base, others = family(np.random.default_rng(7))
    got, ref = run_both(base, others, [1.0, 0.6, 0.3], [0.2, 0.4, 0.6], "ties", rescale=True)
    np.testing.assert_allclose(np.array(got), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("method", list(METHODS))
def test_fused_merge_bf16_in_bf16_out_within_one_rounding(method):
    base, others = family(np.random.default_rng(8))
    base_b = np.array(to_mx(base, mx.bfloat16).astype(mx.float32))
    others_b = [np.array(to_mx(o, mx.bfloat16).astype(mx.float32)) for o in others]
    got, ref = run_both(base_b, others_b, [1.0, 0.6, 0.3], [0.5, 0.3, 0.9], method, dtype=mx.bfloat16)
    assert got.dtype == mx.bfloat16
    got = np.array(got.astype(mx.float32)).astype(np.float64)
    # one bf16 rounding of the float64 result: half a unit in the last place (8 bits of mantissa)
    assert np.all(np.abs(got - ref) <= np.abs(ref) * 2.0**-8 + 1e-30)


def test_fused_merge_kernels_on_and_off_bit_identical():
    base, others = family(np.random.default_rng(9), shape=(96, 64))
    results = []
    for flag in (True, False):
        with K.use_kernels(flag):
            for method in METHODS:
                sp, cons, norm, resc = METHODS[method]
                results.append(
                    np.array(
                        K.fused_task_merge(
                            to_mx(base, mx.bfloat16),
                            [to_mx(o, mx.bfloat16) for o in others],
                            [1.0, 0.5, 0.25],
                            sparsify=sp,
                            densities=[0.3, 0.6, 0.9],
                            rescale=resc,
                            consensus=cons,
                            normalize=norm,
                            lam=1.0,
                            seed=5,
                        ).astype(mx.float32)
                    )
                )
    half = len(results) // 2
    for a, b in zip(results[:half], results[half:]):
        if mx.default_device() == mx.cpu:
            np.testing.assert_array_equal(a, b)
        else:  # a GPU kernel against the MLX graph: the same up to one bf16 rounding
            assert np.all(np.abs(a - b) <= np.abs(b) * 2.0**-7)


def test_fused_merge_same_seed_same_result_other_seed_differs():
    base, others = family(np.random.default_rng(10))
    args = dict(sparsify="random", densities=[0.5] * 3, rescale=True, consensus="sum", normalize=False, lam=1.0)
    a = np.array(K.fused_task_merge(mx.array(base), [mx.array(o) for o in others], [1.0] * 3, seed=1, **args))
    b = np.array(K.fused_task_merge(mx.array(base), [mx.array(o) for o in others], [1.0] * 3, seed=1, **args))
    c = np.array(K.fused_task_merge(mx.array(base), [mx.array(o) for o in others], [1.0] * 3, seed=2, **args))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_fused_merge_rejects_unknown_options():
    base = mx.zeros((4,))
    with pytest.raises(ValueError):
        K.fused_task_merge(
            base, [base], [1.0], sparsify="outliers", densities=[1.0], rescale=False, consensus=None, normalize=False, lam=1.0
        )
    with pytest.raises(ValueError):
        K.fused_task_merge(
            base, [base], [1.0], sparsify=None, densities=[1.0], rescale=False, consensus="count", normalize=False, lam=1.0
        )


# ----------------------------------------------------------------------------- BitNet b1.58

from mergekit_mlx.kernels import bitlinear as bn  # noqa: E402


def np_pack(t):
    """Hugging Face layout, written out byte by byte: byte (r, j) bits 2q..2q+1 = t[q*R + r, j] + 1."""
    out_f, in_f = t.shape
    R = -(-out_f // 4)
    packed = np.zeros((R, in_f), dtype=np.uint8)
    for q in range(4):
        for r in range(R):
            row = q * R + r
            if row < out_f:
                packed[r] |= ((t[row] + 1).astype(np.uint8) << (2 * q)).astype(np.uint8)
    return packed


@pytest.mark.parametrize("out_f", [8, 10, 13])
def test_bitnet_pack_matches_the_hf_layout_and_unpacks_exactly(out_f):
    t = np.random.default_rng(out_f).integers(-1, 2, size=(out_f, 24)).astype(np.int8)
    packed = bn.pack_ternary(mx.array(t))
    assert packed.dtype == mx.uint8 and packed.shape == (-(-out_f // 4), 24)
    np.testing.assert_array_equal(np.array(packed), np_pack(t))
    np.testing.assert_array_equal(np.array(bn.unpack_ternary(packed, out_f)), t)


def test_bitnet_absmean_quantisation():
    w = np.random.default_rng(1).standard_normal((12, 20)).astype(np.float32)
    t, s = bn.quantize_absmean(mx.array(w))
    scale = 1.0 / max(np.abs(w.astype(np.float64)).mean(), 1e-5)
    assert abs(float(s.item()) - scale) <= 1e-6 * scale
    np.testing.assert_array_equal(np.array(t), np.clip(np.round(w * np.float32(s.item())), -1, 1))


@pytest.mark.parametrize("invert", [True, False])
def test_bitnet_matmul_matches_dense_reference(invert):
    rng = np.random.default_rng(2)
    t = rng.integers(-1, 2, size=(30, 64)).astype(np.int8)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    s = 7.5
    y = bn.bitnet_matmul(mx.array(x), bn.pack_ternary(mx.array(t)), mx.array([s]), 30, invert)
    w = t.astype(np.float64) / s if invert else t.astype(np.float64) * s
    assert y.shape == (2, 3, 30)
    np.testing.assert_allclose(np.array(y), x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5)


def test_portable_bitlinear_replaces_mlx_lm_layer():
    import mlx.nn as nn

    bitlinear_layers = pytest.importorskip("mlx_lm.models.bitlinear_layers")
    rng = np.random.default_rng(3)
    layer = bitlinear_layers.BitLinear(32, 12, bias=True, invert_weight_scales=True)
    t, s = bn.quantize_absmean(mx.array(rng.standard_normal((12, 32)).astype(np.float32)))
    layer.weight, layer.weight_scale = bn.pack_ternary(t), s
    layer.bias = mx.array(rng.standard_normal(12).astype(np.float32))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [layer]

    model = Model()
    assert bn.use_portable_bitlinear(model) == 1
    assert isinstance(model.layers[0], bn.BitLinear)
    x = rng.standard_normal((1, 4, 32)).astype(np.float32)
    dense = np.array(t).astype(np.float64) / float(s.item())
    ref = x.astype(np.float64) @ dense.T + np.array(layer.bias)
    np.testing.assert_allclose(np.array(model.layers[0](mx.array(x))), ref, rtol=1e-5, atol=1e-5)


def test_accurate_sum_matches_float64_on_millions_of_values():
    x = np.abs(np.random.default_rng(0).standard_normal(3_000_001)).astype(np.float32) * 0.01
    ref = x.astype(np.float64).sum()
    assert abs(K.accurate_sum(mx.array(x)).item() - ref) <= 1e-5 * ref


# ----------------------------------------------------------------------------- the CPU path's numpy loops
# (mergekit_mlx/kernels/selection_cpu.py, task_merge_cpu.py): exact against the definition, bit for bit against the MLX graphs

from mergekit_mlx.kernels import host, selection, selection_cpu, task_merge, task_merge_cpu  # noqa: E402
from mergekit_mlx.kernels.random import HASH  # noqa: E402
from mergekit_mlx.kernels.task_plan import Keep  # noqa: E402


def pytest_generate_tests(metafunc):
    """Every test_cpu_* test runs twice: with the native loops (kernels/*.cpp, built here by the
    system's compiler) and with numpy's passes (what runs without a compiler)."""
    if metafunc.definition.name.startswith("test_cpu_"):
        metafunc.parametrize("cpu_code", ["native", "numpy"], indirect=True)


@pytest.fixture(autouse=True)
def cpu_code(request, monkeypatch):
    code = getattr(request, "param", "native")
    if code == "numpy":
        monkeypatch.setenv("MERGEKIT_MLX_NO_NATIVE", "1")
    return code


@pytest.fixture(autouse=True)
def _cpu_path_on_the_cpu(request):
    """The test_cpu_* tests are about the CPU path's numpy passes, which run where the CPU is the
    default device: on a GPU machine (benchmarks/gpu_check.sh) they switch to it for the test."""
    if not request.node.name.startswith("test_cpu_") or mx.default_device() == mx.cpu:
        yield
        return
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        yield
    finally:
        mx.set_default_device(previous)


BRACKETED = selection_cpu.SMALL + 12_345  # above the size that partitions everything: the sampled bracket runs


def np_selection(x, base, k):
    """(t, cut) from the definition: float32 bits of |x - base|, k-th largest, ties lowest index first."""
    d = np.asarray(x, np.float32) - (np.asarray(base, np.float32) if base is not None else np.float32(0))
    bits = np.abs(d).reshape(-1).view(np.uint32).astype(np.int64)
    n = bits.size
    order = np.lexsort((np.arange(n), -bits))  # by value descending, then index ascending
    t = bits[order[k - 1]]
    ties = np.flatnonzero(bits == t)
    kept = int(np.sum(bits[order[:k]] == t))  # ties among the k kept
    return int(t), int(n - 1 if kept == ties.size else ties[kept - 1])


def bf16_family(rng, n, scale=0.002):
    base = to_mx(rng.standard_normal(n) * 0.02, mx.bfloat16)
    other = to_mx(np.array(base.astype(mx.float32)) + scale * rng.standard_normal(n), mx.bfloat16)
    return base, other


def selection_of(x, base, k):
    s = selection.select_cpu(x, base, k)
    return int(s.t.item()), int(s.cut.item())


@pytest.mark.parametrize("n", [1, 2, 5, 4097, BRACKETED])
def test_cpu_selection_is_exact_with_bf16_ties(n):
    rng = np.random.default_rng(n)
    base, other = bf16_family(rng, n)
    xb, xo = np.array(base.astype(mx.float32)), np.array(other.astype(mx.float32))
    for k in sorted({1, min(2, n), max(1, n // 3), max(1, n // 2), max(1, n - 1), n}):
        assert selection_of(other, base, k) == np_selection(xo, xb, k)
        assert selection_of(other, None, k) == np_selection(xo, None, k)


def test_cpu_selection_of_float32_values_and_of_equal_models():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(BRACKETED).astype(np.float32)
    same = x.copy()
    same[::3] += 0.5  # two thirds equal the base: a tie at zero that holds the k-th value
    for k in (1, 77, BRACKETED // 2, BRACKETED - 1):
        assert selection_of(mx.array(x), None, k) == np_selection(x, None, k)
        assert selection_of(mx.array(same), mx.array(x), k) == np_selection(same, x, k)


def test_cpu_selection_of_a_constant_tensor_keeps_the_first_k():
    x = mx.full((BRACKETED,), 0.25)
    for k in (1, 1000, BRACKETED - 1):
        assert selection_of(x, None, k) == (int(np.float32(0.25).view(np.uint32)), k - 1)
    assert selection_of(x, None, BRACKETED) == (int(np.float32(0.25).view(np.uint32)), BRACKETED - 1)


def test_cpu_selection_with_nan_and_inf_orders_by_bits():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(BRACKETED) * 0.01).astype(np.float32)
    x[[5, 900, 70_000]] = [np.nan, -np.inf, np.inf]
    x[[6, 7]] = -np.float32(np.nan)
    for k in (1, 2, 3, 5, 6, BRACKETED // 2):
        assert selection_of(mx.array(x), None, k) == np_selection(x, None, k)


def test_cpu_selection_when_the_sample_misses_falls_back_to_the_partition():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(BRACKETED) * 0.01).astype(np.float32)
    x[selection_cpu.sample_positions(x.size)] = 1000.0  # the sample sees only these: its bracket is far too high
    k = x.size // 2
    assert selection_cpu.select(x, None, k) is None
    assert selection_of(mx.array(x), None, k) == np_selection(x, None, k)


def test_cpu_topk_mask_and_threshold_over_the_bracket():
    rng = np.random.default_rng(4)
    x = to_mx(rng.standard_normal((BRACKETED // 97 + 1, 97)) * 0.01, mx.bfloat16)
    xf = np.array(x.astype(mx.float32))
    for k in (1, xf.size // 3, xf.size - 1):
        np.testing.assert_array_equal(np.array(K.topk_mask(x, k)), np_topk_mask(xf, k))
        assert float(K.magnitude_threshold(x, k).item()) == np.sort(np.abs(xf).reshape(-1))[::-1][k - 1]


def graph_merge(monkeypatch, *args, **kwargs):
    """fused_task_merge through the compiled MLX graph (the path before the numpy loops)."""
    with monkeypatch.context() as m:
        m.setattr(host, "supported", lambda *a: False)
        return K.fused_task_merge(*args, **kwargs)


def bits_of(a):
    return np.array(a.view(mx.uint16 if a.dtype == mx.bfloat16 else mx.uint32))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_cpu_merge_is_bit_identical_to_the_compiled_graph(monkeypatch, dtype, method):
    rng = np.random.default_rng(12)
    n = 2 * host.CHUNK + 4321  # several chunks and a short last one
    base, others = family(rng, shape=(n,), k=3, scale=0.003)
    others[2][::5] = base[::5]  # deltas of zero, signs that cancel
    b, os_ = to_mx(base, dtype), [to_mx(o, dtype) for o in others]
    sp, cons, norm, resc = METHODS[method]
    cases = [([0.6, 0.4, 0.3], [0.5, 0.3, 0.8], 1.0, resc), ([1.0, -0.5, 0.7], [0.0, 1.0, 0.1], 0.8, not resc)]
    for weights, densities, lam, rescale in cases:
        kw = dict(
            sparsify=sp,
            densities=densities,
            rescale=rescale,
            consensus=cons,
            normalize=norm,
            lam=lam,
            seed=3,
            streams=[11, 12, 13],
        )
        got = K.fused_task_merge(b, os_, weights, **kw)
        want = graph_merge(monkeypatch, b, os_, weights, **kw)
        assert got.dtype == dtype and got.shape == b.shape
        np.testing.assert_array_equal(bits_of(got), bits_of(want))


def test_cpu_merge_with_nan_and_inf_matches_the_compiled_graph(monkeypatch):
    rng = np.random.default_rng(13)
    base, others = family(rng, shape=(5000,), k=2)
    others[0][[3, 4000]] = [np.nan, np.inf]
    base[[10, 11]] = [-np.inf, -0.0]
    others[1][11] = -0.0
    b, os_ = to_mx(base, mx.bfloat16), [to_mx(o, mx.bfloat16) for o in others]
    for sp, resc in (("magnitude", False), ("random", True)):
        kw = dict(sparsify=sp, densities=[0.5, 0.5], rescale=resc, consensus="sum", normalize=True, lam=1.0)
        got = K.fused_task_merge(b, os_, [0.6, 0.4], **kw)
        np.testing.assert_array_equal(bits_of(got), bits_of(graph_merge(monkeypatch, b, os_, [0.6, 0.4], **kw)))


def test_cpu_l1_sums_equal_the_blocked_sums_of_the_graph(cpu_code):
    rng = np.random.default_rng(14)
    n = 2 * host.GROUP + 1077  # three groups of block sums (buffers reused), the last block padded
    base, others = family(rng, shape=(n,), k=2, scale=0.01)
    b, os_ = to_mx(base, mx.bfloat16), [to_mx(o, mx.bfloat16) for o in others]
    for sp in ("random", "magnitude"):
        plans, _ = task_merge.plan_models(b, os_, sp, [0.4, 0.7], False, 5, [9, 10], None)
        want = [task_merge.l1_fallback(b, o, p) for o, p in zip(os_, plans)]
        got = task_merge.l1_cpu(b, os_, plans)
        assert [[x.item() for x in pair] for pair in got] == [[x.item() for x in pair] for pair in want]
    assert plans[0].mask is None  # magnitude masks are not stored
    plans, _ = task_merge.plan_models(b, os_, "random", [0.4, 0.7], False, 5, [9, 10], None)
    task_merge.l1_cpu(b, os_, plans)
    if cpu_code == "native":  # the native merge draws the random masks again, as the GPU does
        assert plans[0].mask is None and plans[1].mask is None
    else:  # numpy's merge reads the masks the L1 pass drew
        assert plans[0].mask.mean() == pytest.approx(0.4, abs=0.01) and plans[1].mask.mean() == pytest.approx(0.7, abs=0.01)


def test_cpu_native_loops_are_built_where_a_compiler_runs(cpu_code):
    from mergekit_mlx.kernels import cpu_native

    if cpu_code == "numpy" or cpu_native.compiler() is None:
        pytest.skip("numpy's passes: nothing is built")
    base = np.zeros(8, dtype=np.uint16)
    models = [task_merge_cpu.Model(base, mode, 1.0) for mode in (Keep.MAGNITUDE, Keep.RANDOM)]
    assert task_merge_cpu.native_merge(base, models, True, True, 1.0, 1.0, np.zeros(8, dtype=np.uint16)) is not None
    assert task_merge_cpu.native_l1(base, models) is not None
    assert selection_cpu.native_count([base, base], base) is not None


def test_cpu_bf16_rounding_is_mlx_rounding():
    specials = np.array(
        [np.nan, -np.nan, np.inf, -np.inf, 1e-40, -1e-40, 3.4e38, 0.0, -0.0, 1.00390625, 1.01171875, 1.0 + 2**-8 + 2**-20],
        dtype=np.float32,
    )
    payloads = np.array([0x7F800001, 0xFF800001, 0x7FC00001, 0x7F7FFFFF, 0x7F7F8000], dtype=np.uint32).view(np.float32)
    x = np.concatenate([specials, payloads, np.random.default_rng(15).standard_normal(10_000).astype(np.float32)])
    out = np.empty(x.size, dtype=np.uint16)
    task_merge_cpu.round_bf16(x, out, host.Scratch(x.size))
    # against MLX's CPU conversion (the path these numpy passes stand in for; a GPU writes NaN as 0x7FFF)
    ref = mx.array(x).astype(mx.bfloat16, stream=mx.cpu).view(mx.uint16, stream=mx.cpu)
    np.testing.assert_array_equal(out, np.array(ref))


def test_cpu_hash_keep_is_the_documented_uniform_below_p():
    sc = host.Scratch(5000)
    out = np.empty(5000, dtype=bool)
    k0, k1 = np_keys(77, 5)
    for p in (0.0, 0.3, 0.5, 1.0 - 2**-24, 1.0):
        HASH.mask_into(100, 5100, (k0, k1), p, sc, out)
        np.testing.assert_array_equal(out, np_uniform(77, 5, 5100)[100:] < np.float32(p))


def test_cpu_paths_split_over_two_threads_give_the_same_bits(monkeypatch):
    rng = np.random.default_rng(16)
    n = 5 * host.CHUNK + 999
    base, others = family(rng, shape=(n,), k=2, scale=0.003)
    b, os_ = to_mx(base, mx.bfloat16), [to_mx(o, mx.bfloat16) for o in others]
    runs = []
    for split in (host.SPLIT, 2 * host.CHUNK):  # the second run hands the upper half to the helper thread
        monkeypatch.setattr(host, "SPLIT", split)
        out = [
            bits_of(
                K.fused_task_merge(
                    b, os_, [0.6, 0.4], sparsify=sp, densities=[0.4, 0.6], rescale=resc, consensus="sum", normalize=True, lam=1.0
                )
            )
            for sp, resc in (("magnitude", False), ("random", True))
        ]
        out.append(np.array(K.topk_mask(os_[0], n // 3)))
        out.append(selection_of(os_[1], b, n // 2))
        runs.append(out)
    for a, c in zip(*runs):
        np.testing.assert_array_equal(a, c)
    assert runs[0][3] == np_selection(np.array(os_[1].astype(mx.float32)), np.array(b.astype(mx.float32)), n // 2)
