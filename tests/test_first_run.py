"""A GPU merge's first run on a fresh machine: what it compiles, and that what it no longer
compiles changes no result.

The first run waits on no compiler it can avoid (benchmarks/gpu_first_run.py measures it on a
GPU): the first-use checks compute their references as plain MLX graphs on the CPU stream (MLX
would build an `mx.compile` graph with the C++ compiler first), the GPU paths launch no gather
and no compiled graph (MLX's CUDA backend compiles those with NVRTC on first use), and each check
declares what it launches, so that is compiled side by side before it runs. Here, on the CPU:
the plain references equal the compiled graphs, the steps rewritten without gathers select what
the rule says (numpy references), the checks still tell a wrong kernel from a right one, and the
declared launches are the ones made. The CUDA kernels run through tests/test_metal_syntax.py's
emulator (needs clang).
"""

import io
import platform
import re
from contextlib import contextmanager

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_metal_syntax import CLANG, EmulatedKernel, np_selection

from mergekit_mlx import kernels as K
from mergekit_mlx.kernels import gpu, random, selection, selection_gpu, task_merge, task_merge_gpu
from mergekit_mlx.kernels.topk import tie_chunk
from mergekit_mlx.methods.base import float32

needs_clang = pytest.mark.skipif(CLANG is None, reason="clang not found (Debian/Ubuntu: apt-get install clang)")
GROUPS = ("uniform", "select", "l1", "merge")


# ----------------------------------------------------------------------------- helpers


def np_mask(x: np.ndarray, k: int) -> np.ndarray:
    """The top-k mask by the rule, from a full sort (k clamped to [0, n])."""
    n = x.size
    if k <= 0:
        return np.zeros(x.shape, bool)
    if k >= n:
        return np.ones(x.shape, bool)
    t, cut = np_selection(x.reshape(-1), None, k)
    bits = np.abs(x.astype(np.float32).reshape(-1)).view(np.uint32).astype(np.int64)
    return ((bits > t) | ((bits == t) & (np.arange(n) <= cut))).reshape(x.shape)


def tied_family(n: int, seed: int, dtype=mx.bfloat16):
    """A base and three task models whose deltas repeat often (a few distinct magnitudes), the last
    equal to the base at every third element."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(n).astype(np.float32)
    steps = rng.integers(-3, 4, size=(3, n)).astype(np.float32) * 0.015625
    others = [base + steps[i] for i in range(3)]
    others[2][::3] = base[::3]
    return mx.array(base).astype(dtype), [mx.array(o).astype(dtype) for o in others]


# what MLX's CUDA backend compiles with NVRTC on first use (its other operations ship compiled)
JIT_PRIMITIVES = ("Compiled", "Gather", "Scatter", "MaskedScatter", "SliceUpdate", "DynamicSlice", "CustomKernel")


def primitives(arrays) -> set[str]:
    """The operations in the graphs of these (unevaluated) arrays, by MLX's names."""
    flat = []

    def walk(a):
        if isinstance(a, mx.array):
            flat.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                walk(b)
        elif isinstance(a, dict):
            for b in a.values():
                walk(b)

    walk(arrays)
    if not flat:
        return set()
    out = io.StringIO()
    mx.export_to_dot(out, *flat)
    return set(re.findall(r'label ="([A-Za-z]+)', out.getvalue()))


class Watch:
    """What runs outside a CPU reference (`with mx.stream(mx.cpu)`, which stands for the GPU
    stream here): the operations of every graph evaluated through mx.eval or handed to a
    kernel; gathers and the kernels package's compiled graphs refused everywhere."""

    def __init__(self, monkeypatch):
        self.seen: set[str] = set()
        self.on_cpu = 0
        real_stream, real_eval = mx.stream, mx.eval

        @contextmanager
        def stream(s):
            cpu = int(s == mx.cpu)
            self.on_cpu += cpu
            try:
                with real_stream(s):
                    yield
            finally:
                self.on_cpu -= cpu

        def evaluate(*args):
            self.look(args)
            return real_eval(*args)

        def refuse(what):
            def fn(*args, **kwargs):
                raise AssertionError(f"{what} called: MLX compiles it on first use")

            return fn

        monkeypatch.setattr(mx, "stream", stream)
        monkeypatch.setattr(mx, "eval", evaluate)
        monkeypatch.setattr(mx, "take", refuse("mx.take"))
        monkeypatch.setattr(mx, "take_along_axis", refuse("mx.take_along_axis"))
        monkeypatch.setattr(task_merge, "combine_fn", refuse("the compiled combine_fn"))
        monkeypatch.setattr(random, "uniform_compiled", refuse("the compiled uniform"))
        plain_delta, plain_l1 = selection.delta_bits, task_merge.l1_fallback

        def delta_bits(o, b32, fused=True):
            assert not fused, "the compiled delta_bits called"
            return plain_delta(o, b32, fused)

        def l1_fallback(base, other, plan, fused=True):
            assert not fused, "the compiled L1 graph called"
            return plain_l1(base, other, plan, fused)

        monkeypatch.setattr(selection, "delta_bits", delta_bits)
        monkeypatch.setattr(task_merge, "l1_fallback", l1_fallback)

    def look(self, arrays) -> None:
        if not self.on_cpu:
            self.seen |= primitives(arrays)

    def compiled_on_first_use(self) -> set[str]:
        return {p for p in self.seen if p.startswith(JIT_PRIMITIVES)}


class Emulator:
    """The CUDA kernels on the CPU (test_metal_syntax's EmulatedKernel), each launch recorded as
    the gpu.Launch it is and its inputs' graphs shown to `watch`; `wrong[name]` alters a kernel's outputs."""

    def __init__(self, root):
        self.root, self.made, self.wrong, self.watch = root, [], {}, None

    def kernel(self, name, backend_name, km=0, has_base=False, atomic=False, inputs=(), outputs=("out",)):
        inner = EmulatedKernel(self.root, name, km, has_base, inputs, outputs, 0)
        names = tuple(inputs)

        def call(*, inputs, output_shapes, output_dtypes, grid, threadgroup, template=(), init_value=None, **_):
            dtypes, outs = tuple(a.dtype for a in inputs), tuple(output_dtypes)
            self.made.append(gpu.Launch(name, km, has_base, names, tuple(outputs), dtypes, outs, tuple(template), atomic))
            if self.watch is not None:
                self.watch.look(inputs)
            got = inner(inputs, output_shapes, output_dtypes, grid, threadgroup, template, init_value)
            return self.wrong[name](got) if name in self.wrong else got

        return call


@pytest.fixture
def emulator(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "emu"  # shared with test_metal_syntax: binaries built once
    root.mkdir(exist_ok=True)
    emu = Emulator(root)
    with gpu.substitute(emu.kernel, lambda: "cuda", trusted=False):
        gpu.forget_checks()
        yield emu


@pytest.fixture
def watch(emulator, monkeypatch):
    emulator.watch = Watch(monkeypatch)
    return emulator.watch


# ----------------------------------------------------------------------------- plain MLX graphs


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=40), st.data())
def test_tie_chunk_is_the_chunk_that_holds_the_need_th_tie(counts, data):
    total = sum(counts)
    if total == 0:
        return
    need = data.draw(st.integers(1, total))
    owner = [j for j, c in enumerate(counts) for _ in range(c)]  # the chunk of each tie, in order
    j = owner[need - 1]
    assert tie_chunk(np.array(counts, dtype=np.uint32), need) == (j, sum(counts[:j]))


@pytest.mark.parametrize("n", [1, 7, 4096, 4097, 12289, 20000])
def test_selection_by_plain_graphs_is_exact_with_ties_across_chunks(n):
    """float16 takes MLX's graph on the CPU (partition, then the tie scan of one 4096-element
    chunk): every k from none to all, ties split in any chunk, lowest index first."""
    rng = np.random.default_rng(n)
    x = (rng.integers(-6, 7, size=n) * 0.25).astype(np.float16)  # 13 values: ties everywhere
    xm = mx.array(x)
    xf = x.astype(np.float32)
    ks = sorted({0, 1, n // 3, n // 2 + 1, n - 1, n, n + 1})
    for k in ks:
        np.testing.assert_array_equal(np.array(K.topk_mask(xm, k)), np_mask(xf, k), err_msg=f"k={k}")
        if 1 <= k <= n:
            t, _ = np_selection(xf, None, k)
            assert K.magnitude_threshold(xm, k).item() == np.uint32(t).view(np.float32)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, 2.0, -2.0, np.inf, -np.inf, np.nan]), min_size=1, max_size=300),
    st.data(),
)
def test_selection_by_plain_graphs_orders_by_bits_with_signed_zeros_inf_and_nan(values, data):
    x = np.array(values, dtype=np.float16)
    k = data.draw(st.integers(0, x.size + 1))
    np.testing.assert_array_equal(np.array(K.topk_mask(mx.array(x), k)), np_mask(x.astype(np.float32), k))


def test_plain_references_equal_the_compiled_graphs():
    """What the first-use checks now compute uncompiled gives what the compiled graphs give: the
    uniforms, |x - base| bits and the L1 sums bit for bit, the merge within the check's own
    tolerance (bit for bit on x86-64, where MLX compiles without fused multiply-adds)."""
    n = 5003
    idx, keys = mx.arange(n, dtype=mx.uint32), random.keys_array(12345, 678)
    assert mx.array_equal(random.uniform_of_index(idx, keys), random.uniform_compiled(idx, keys)).item()
    for dtype in task_merge.MERGE_DTYPES:
        base, others = gpu.check_family(dtype)
        b32 = base.astype(mx.float32)
        for o in others:
            assert mx.array_equal(selection.delta_bits(o, b32, fused=False), selection.delta_bits(o, b32)).item()
        for sp in ("random", "magnitude"):
            plans, _ = task_merge.plan_models(base, others, sp, task_merge.L1_CHECK_DENSITIES, False, 9, [1, 2, 3], None)
            for o, p in zip(others, plans):
                plain, fused = task_merge.l1_fallback(base, o, p, fused=False), task_merge.l1_fallback(base, o, p)
                assert [v.item() for v in plain] == [v.item() for v in fused]
        for sp, cons, norm in task_merge.MERGE_CASES:
            plans, _ = task_merge.plan_models(base, others, sp, task_merge.MERGE_CHECK_DENSITIES, False, 4, [7, 8, 9], None)
            params = []
            sel = []
            for w, p in zip([1.0, -0.5, 0.7], plans):
                params += [mx.array(w, dtype=mx.float32), p.scale, mx.array(p.p, dtype=mx.float32)]
                sel += [p.t, p.cut, random.u32(p.keys[0]), random.u32(p.keys[1])]
            params = mx.stack(params + [mx.array(0.9, dtype=mx.float32), mx.array(1.2, dtype=mx.float32)])
            modes = tuple(p.mode for p in plans)
            args = (base, mx.arange(base.size, dtype=mx.uint32), params, *others, *sel)
            plain = np.array(task_merge.combine_graph(modes, cons, norm)(*args).astype(mx.float32))
            fused = np.array(task_merge.combine_fn(modes, cons, norm)(*args).astype(mx.float32))
            np.testing.assert_array_max_ulp(plain, fused, maxulp=1 if dtype == mx.float32 else 1 << 16)


# ----------------------------------------------------------------------------- through the emulated kernels


@needs_clang
def test_checks_pass_and_launch_what_they_declare(emulator, watch):
    """Each first-use check passes with its plain CPU reference, launches no operation MLX
    compiles on first use and no compiled graph, and launches exactly the instantiations it
    declares (those compiled ahead)."""
    for name in GROUPS:
        emulator.made.clear()
        assert K.GPU_GROUPS[name].check("cuda"), name
        declared = set(K.GPU_GROUPS[name].launches())
        assert set(emulator.made) == declared, name
        assert "Sort" in watch.seen or name != "select"  # the watch sees the GPU side
        assert not watch.compiled_on_first_use(), name


@needs_clang
@pytest.mark.parametrize(
    "kernel,alter",
    [
        ("random_uniform", lambda outs: [outs[0] + mx.where(mx.arange(outs[0].size) == 17, 2.0**-24, 0.0)]),
        ("select_resolve", lambda outs: [outs[0], outs[1] + (mx.arange(outs[1].size) == 1).astype(mx.uint32)]),
        ("l1_sums", lambda outs: [outs[0] * 1.001]),
        ("task_merge", lambda outs: [outs[0] * mx.where(mx.arange(outs[0].size) == 99, 1.05, 1.0).astype(outs[0].dtype)]),
    ],
)
def test_a_check_with_its_plain_reference_still_rejects_a_wrong_kernel(emulator, kernel, alter):
    """One element (one cut, one sum) off: the check of the group that launches it fails."""
    emulator.wrong[kernel] = alter
    group = {"random_uniform": "uniform", "select_resolve": "select", "l1_sums": "l1", "task_merge": "merge"}[kernel]
    assert not K.GPU_GROUPS[group].check("cuda")


@needs_clang
@pytest.mark.parametrize("n,seed", [(4097, 1), (9000, 2), (12289, 3)])
@pytest.mark.parametrize("override", [None, "between", "outside"])
def test_gpu_selection_without_gathers_is_exact(emulator, watch, n, seed, override):
    """Every path past the counting pass, with ties split in a later 4096-element chunk, and k = 1
    and k = n; with a base and without."""
    base, others = tied_family(n, seed)
    ks = [1, n // 2 + 7, n]
    with gpu.substitute(emulator.kernel, lambda: "cuda", trusted=True):
        sels, rows = selection_gpu.select("cuda", others, base, ks, override)
        b = np.array(base.astype(mx.float32))
        want = [np_selection(np.array(o.astype(mx.float32)), b, k) for o, k in zip(others, ks)]
        assert [(int(s.t.item()), int(s.cut.item())) for s in sels] == want
        assert np.array(rows).reshape(-1, 2).tolist() == [list(w) for w in want]
        watch.look([[s.t, s.cut] for s in sels])
        x = others[2].astype(mx.float32) - base.astype(mx.float32)  # no base: the deltas themselves
        sels, _ = selection_gpu.select("cuda", [x], None, [n - 3], override)
        watch.look([sels[0].t, sels[0].cut])
        assert (int(sels[0].t.item()), int(sels[0].cut.item())) == np_selection(np.array(x), None, n - 3)
    assert not watch.compiled_on_first_use()


@needs_clang
def test_gpu_merges_launch_no_gather_and_no_compiled_graph(emulator, watch):
    """TIES (gated, and with the collecting and radix paths forced) and DARE-TIES (L1 rescale)
    through the kernels equal the CPU path bit for bit / within one bf16 rounding, launch what
    `task_merge_gpu.launches` compiles ahead (and on a forced path the selection's rest), and
    nothing MLX compiles on first use."""
    base, others = tied_family(9000, 4)
    settings = {"ties": ("magnitude", False), "dare_ties": ("random", True)}
    for name, (sp, rescale) in settings.items():
        for path in (None, *selection_gpu.PATHS):
            emulator.made.clear()
            with gpu.substitute(emulator.kernel, lambda: "cuda", trusted=True), selection_gpu.force_path(path):
                got = K.fused_task_merge(
                    base, others, [0.5, 0.3, 0.2], sparsify=sp, densities=[0.3, 0.5, 0.9], rescale=rescale,
                    consensus="sum", normalize=sp == "magnitude", lam=1.0, seed=3,
                )  # fmt: skip
                watch.look(got)
                got = np.array(got.astype(mx.float32))
            modes = [task_merge.keep_mode(sp, d) for d in [0.3, 0.5, 0.9]]
            prepared = set(task_merge_gpu.launches(mx.bfloat16, mx.bfloat16, modes, True, sp == "magnitude", rescale))
            assert prepared <= set(emulator.made), (name, path)  # what a first merge compiles ahead, it launches
            rare = {spec.name for spec in set(emulator.made) - prepared}
            assert rare <= ({"select_collect", "radix_hist", "tie_count"} if path else set()), (name, path, rare)
            with K.use_kernels(False):  # the CPU path: its own loops
                want = K.fused_task_merge(
                    base, others, [0.5, 0.3, 0.2], sparsify=sp, densities=[0.3, 0.5, 0.9], rescale=rescale,
                    consensus="sum", normalize=sp == "magnitude", lam=1.0, seed=3,
                )  # fmt: skip
                want = np.array(want.astype(mx.float32))
            if rescale:
                assert np.all(np.abs(got - want) <= np.abs(want) * 2.0**-7), (name, path)
            else:
                np.testing.assert_array_equal(got, want, err_msg=f"{name} {path}")
    assert not watch.compiled_on_first_use()


# ----------------------------------------------------------------------------- weighted sums: linear and slerp
#
# linear's merge and slerp's combination go through kernels/weighted_sum.inc on a GPU instead of
# an mx.compile graph (which MLX's CUDA backend builds with NVRTC on first use). The emulator here
# gets float16 too (a software __half, rounding to nearest even), in a folder of its own.

HALF_SHIM = r"""
struct __half {
  uint16_t bits;
  __half() = default;
  __half(float f) {  // round to nearest even, as MLX's astype
    const uint32_t u = __float_as_uint(f);
    const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) { bits = uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu)); return; }
    if (a >= 0x477ff000u) { bits = uint16_t(sign | 0x7c00u); return; }  // 65520 and up: inf
    if (a >= 0x38800000u) { bits = uint16_t(sign | ((a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13)); return; }
    bits = uint16_t(sign | (uint32_t)__builtin_rintf(__uint_as_float(a) * 16777216.0f));  // subnormal: units of 2^-24
  }
  operator float() const {
    const uint32_t sign = uint32_t(bits & 0x8000u) << 16, e = (bits >> 10) & 0x1fu, m = bits & 0x3ffu;
    if (e == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    if (e == 0u) return __uint_as_float(sign | __float_as_uint(float(m) * 5.9604644775390625e-8f));
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
  }
};
"""

FMA_FREE_CPU = platform.machine().lower() in ("x86_64", "amd64")  # MLX's CPU graphs have no fused multiply-add here
W_DTYPES = (mx.bfloat16, mx.float16, mx.float32)
W_SHAPE = (37, 111)  # 4107 elements: a tail of three after the groups of eight
WEIGHTS = {
    "positive, normalised": ([0.5, 0.3, 0.2, 0.7, 0.1], True),
    "negative and zero": ([1.0, -0.5, 0.0, 2.0, -1.25], False),
    "negative, normalised": ([0.9, -0.4, 0.3, 0.0, 0.6], True),
}


@mx.compile
def old_weighted_sum(coefficients, *tensors):
    """linear's compiled graph before the kernel (3eb4ef4's methods/linear.py), verbatim."""
    out = float32(tensors[0]) * coefficients[0]
    for i, x in enumerate(tensors[1:], 1):
        out = out + float32(x) * coefficients[i]
    return out.astype(tensors[0].dtype)


@mx.compile
def old_combine(ca, cb, v0, v1):
    """slerp's compiled combination before the kernel, verbatim."""
    return (ca * float32(v0) + cb * float32(v1)).astype(v0.dtype)


@pytest.fixture
def half_emulator(tmp_path_factory, monkeypatch):
    """The Emulator with float16 as __half, not yet substituted for the kernels (the references
    are computed outside it: gpu.backend() names the emulator's backend while it is)."""
    import test_metal_syntax

    monkeypatch.setitem(test_metal_syntax.EMU_TYPES, "float16", "__half")
    monkeypatch.setattr(test_metal_syntax, "EMU_SHIM", test_metal_syntax.EMU_SHIM + HALF_SHIM)
    root = tmp_path_factory.getbasetemp() / "emu_half"  # its harness and binaries see the shim above
    root.mkdir(exist_ok=True)
    return Emulator(root)


def tensors_of(k: int, dtype, seed: int = 0, shape=W_SHAPE) -> list[mx.array]:
    rng = np.random.default_rng(seed)
    return [mx.array(rng.standard_normal(shape).astype(np.float32) * (i + 1)).astype(dtype) for i in range(k)]


def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def rounding_of(dtype) -> tuple[float, float]:
    """(2**-p with half an ulp of `dtype` at most 2**-p of a value, where it underflows: half its step)."""
    return {mx.bfloat16: (2.0**-8, 2.0**-134), mx.float16: (2.0**-11, 2.0**-25), mx.float32: (0.0, 2.0**-150)}[dtype]


def assert_float32_sum(got: mx.array, ref: np.ndarray, xs: list[np.ndarray], cs: list[float]):
    """got is sum c_i x_i (ref, float64) as a float32 sum of rounded products, rounded once to its
    dtype: within 2 (N + 1) 2**-24 sum |c_i x_i| (products, their coefficients and the adds
    rounded in float32), and half an ulp of the output."""
    mag = sum(abs(c) * np.abs(x) for c, x in zip(cs, xs))
    slack = 2.0 * (len(xs) + 1) * 2.0**-24 * mag
    rel, under = rounding_of(got.dtype)
    err = np.abs(f64(got) - ref)
    assert np.all(err <= slack + rel * (np.abs(ref) + slack) + under), float(np.max(err / (slack + rel * np.abs(ref) + under)))


def assert_same_as_the_compiled_graph(got: mx.array, old: mx.array, xs, cs):
    """Bit for bit where MLX's CPU graph has no fused multiply-add (x86-64: the emulator rounds
    every product too); elsewhere both within a float32 sum's error of each other."""
    assert got.dtype == old.dtype and got.shape == old.shape
    if FMA_FREE_CPU:
        bits = mx.uint32 if got.dtype == mx.float32 else mx.uint16
        np.testing.assert_array_equal(np.array(got.view(bits)), np.array(old.view(bits)))
    else:
        assert_float32_sum(got, f64(old), xs, cs)


@needs_clang
@pytest.mark.parametrize("dtype", W_DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_linear_through_the_kernel_is_the_float32_sum_and_the_old_compiled_graph(half_emulator, dtype, k):
    """linear with 1-5 inputs, weights positive, negative and zero, normalised or not: the float64
    sum within a float32 sum's rounding and one rounding to the dtype, and the old compiled graph's
    result bit for bit (x86-64)."""
    from mergekit_mlx.methods import MergeInputs
    from mergekit_mlx.methods.linear import linear

    xs = tensors_of(k, dtype, seed=k)
    for name, (weights, normalize) in WEIGHTS.items():
        w = weights[:k]
        cs = [x / sum(w) for x in w] if normalize else w
        inputs = MergeInputs(list(xs), None, {"normalize": normalize}, [{"weight": x} for x in w])
        old = old_weighted_sum(mx.array(cs, dtype=mx.float32), *xs)
        with gpu.substitute(half_emulator.kernel, lambda: "cuda", trusted=True):
            got = linear(inputs)
            mx.eval(got)
        assert half_emulator.made and half_emulator.made[-1].name == "weighted_sum", name  # the kernel ran
        ref = sum(c * f64(x) for c, x in zip(cs, xs))
        assert_float32_sum(got, ref, [f64(x) for x in xs], cs)
        assert_same_as_the_compiled_graph(got, old, [f64(x) for x in xs], cs)


@needs_clang
def test_a_sum_longer_than_one_launch_hands_on_a_float32_running_sum(half_emulator):
    """Tensors a launch at a time (1, 2, 3 of 7) and 18 inputs through linear (two launches of at
    most 16): the same result as one launch, bit for bit, and as the old compiled graph."""
    from mergekit_mlx.kernels import weighted_sums
    from mergekit_mlx.methods import MergeInputs
    from mergekit_mlx.methods.linear import linear

    xs = tensors_of(7, mx.bfloat16, seed=7) + tensors_of(11, mx.float32, seed=8)
    cs = [((-1) ** i) * (0.3 + 0.05 * i) for i in range(18)]
    coef = mx.array(cs, dtype=mx.float32)
    old = old_weighted_sum(coef, *xs)
    with gpu.substitute(half_emulator.kernel, lambda: "cuda", trusted=True):
        one = weighted_sums.weighted_sum_gpu("cuda", coef[:7], xs[:7])
        for per_launch in (1, 2, 3):
            half_emulator.made.clear()
            got = weighted_sums.weighted_sum_gpu("cuda", coef[:7], xs[:7], per_launch)
            assert len(half_emulator.made) == -(-7 // per_launch)
            assert half_emulator.made == weighted_sums.launches([mx.bfloat16] * 7, mx.bfloat16, per_launch)
            np.testing.assert_array_equal(np.array(got.view(mx.uint16)), np.array(one.view(mx.uint16)))
        half_emulator.made.clear()
        got = linear(MergeInputs(list(xs), None, {"normalize": False}, [{"weight": c} for c in cs]))
        mx.eval(got)
        assert [spec.km for spec in half_emulator.made] == [16, 2]
    assert_same_as_the_compiled_graph(got, old, [f64(x) for x in xs], cs)


@needs_clang
def test_non_finite_and_signed_zero_inputs_come_out_as_from_the_compiled_graph(half_emulator):
    """inf, NaN, -0.0 and sums past float16's range: NaN where the graph gives NaN, every other
    value (inf, signed zeros) bit for bit (x86-64)."""
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 60000.0, -60000.0, 1e-8, 3.0]
    rng = np.random.default_rng(9)
    for dtype in W_DTYPES:
        cols = [rng.permutation(np.array(special * 40, dtype=np.float32)) for _ in range(3)]
        xs = [mx.array(c).astype(dtype) for c in cols]
        coef = mx.array([1.5, -0.0, 0.75], dtype=mx.float32)
        old = old_weighted_sum(coef, *xs)
        with gpu.substitute(half_emulator.kernel, lambda: "cuda", trusted=True):
            got = K.weighted_sum(coef, xs)
            mx.eval(got)
        g, o = f64(got), f64(old)
        np.testing.assert_array_equal(np.isnan(g), np.isnan(o))
        if FMA_FREE_CPU:
            keep = ~np.isnan(o)
            np.testing.assert_array_equal(np.signbit(g[keep]), np.signbit(o[keep]))
            np.testing.assert_array_equal(g[keep], o[keep])


@needs_clang
def test_slerp_on_a_gpu_equals_its_compiled_graphs(half_emulator):
    """slerp_graph (the GPU's path): its sums as plain operations and its combination through the
    kernel give what the compiled graphs give, bit for bit (x86-64); and the compiled weighted sum
    is the old compiled combination."""
    from mergekit_mlx.methods.slerp import slerp_graph

    rng = np.random.default_rng(10)
    for dt0, dt1 in [(mx.bfloat16, mx.bfloat16), (mx.float16, mx.float16), (mx.float32, mx.bfloat16)]:
        a = rng.standard_normal(W_SHAPE).astype(np.float32)
        v0, v1 = mx.array(a).astype(dt0), mx.array(a + 0.5 * rng.standard_normal(W_SHAPE).astype(np.float32)).astype(dt1)
        want = slerp_graph(0.35, v0, v1)
        mx.eval(want)
        with gpu.substitute(half_emulator.kernel, lambda: "cuda", trusted=True):
            got = slerp_graph(0.35, v0, v1)
            mx.eval(got)
        assert got.dtype == dt0
        assert_same_as_the_compiled_graph(got, want, [], [])
        ca, cb = mx.array(0.8, dtype=mx.float32), mx.array(-0.3, dtype=mx.float32)
        assert_same_as_the_compiled_graph(K.weighted_sum(mx.stack([ca, cb]), [v0, v1]), old_combine(ca, cb, v0, v1), [], [])


@needs_clang
def test_the_weighted_sum_check_passes_and_launches_what_it_declares(half_emulator, monkeypatch):
    """Three dtypes, one launch and two; its reference the plain graph on the CPU stream; nothing
    launched that MLX compiles on first use."""
    from mergekit_mlx.kernels import weighted_sums

    half_emulator.watch = watch = Watch(monkeypatch)
    monkeypatch.setattr(weighted_sums, "graph_compiled", lambda *a: pytest.fail("the compiled graph called"))
    with gpu.substitute(half_emulator.kernel, lambda: "cuda", trusted=False):
        gpu.forget_checks()
        assert K.GPU_GROUPS["weighted_sum"].check("cuda")
    assert set(half_emulator.made) == set(K.GPU_GROUPS["weighted_sum"].launches())
    assert not watch.compiled_on_first_use()


@needs_clang
@pytest.mark.parametrize(
    "alter",
    [
        lambda outs: [outs[0] * mx.where(mx.arange(outs[0].size) == 99, 1.05, 1.0).astype(outs[0].dtype)],
        lambda outs: [(outs[0].astype(mx.float32) * (1 + 2.0**-10)).astype(outs[0].dtype)],  # under a bf16 rounding
    ],
    ids=["one element 5% off", "every element 0.1% off"],
)
def test_the_weighted_sum_check_rejects_a_wrong_kernel(half_emulator, alter):
    half_emulator.wrong["weighted_sum"] = alter
    with gpu.substitute(half_emulator.kernel, lambda: "cuda", trusted=False):
        gpu.forget_checks()
        assert not K.GPU_GROUPS["weighted_sum"].check("cuda")


@needs_clang
def test_linear_and_slerp_on_a_gpu_compile_nothing_on_first_use(half_emulator, monkeypatch):
    """What the GPU stream sees of linear (1 and 18 inputs) and of slerp's graph: no gather, no
    compiled graph (their inputs' graphs included: slerp's sums and coefficients)."""
    from mergekit_mlx.kernels import weighted_sums
    from mergekit_mlx.methods import MergeInputs
    from mergekit_mlx.methods.linear import linear
    from mergekit_mlx.methods.slerp import slerp_graph

    half_emulator.watch = watch = Watch(monkeypatch)
    monkeypatch.setattr(weighted_sums, "graph_compiled", lambda *a: pytest.fail("the compiled graph called"))
    with gpu.substitute(half_emulator.kernel, lambda: "cuda", trusted=True):
        for k in (1, 18):
            xs = tensors_of(k, mx.bfloat16, seed=k)
            watch.look(linear(MergeInputs(xs, None, {"normalize": True}, [{"weight": 1.0 + i} for i in range(k)])))
        v0, v1 = tensors_of(2, mx.bfloat16, seed=3)
        watch.look(slerp_graph(0.4, v0, v1))
    assert {"Sum", "ArcCos", "Multiply"} <= watch.seen  # the watch saw slerp's sums and coefficients
    assert not watch.compiled_on_first_use(), watch.seen
