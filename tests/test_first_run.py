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
