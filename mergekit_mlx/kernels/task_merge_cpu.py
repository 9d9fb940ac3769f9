"""The fused task merge and its L1 sums on the CPU: native loops (kernels/task_merge.cpp,
l1_lanes.cpp, built by `cpu_native`) or numpy's passes over cache-sized chunks, bit for bit the
operations of `task_merge`'s compiled graph in its order (float32, rounded once at the end)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import cpu_native
from .host import ABS, CHUNK, GROUP, Scratch, abs_bits, alloc, check_data, in_halves, one_layout, quiet, scratch, widen
from .random import HASH, Hash
from .selection_cpu import magnitude_keep
from .sums import block_sums
from .task_plan import Keep

_local_l1 = threading.local()


@dataclass
class Model:
    """One task model as the merge reads it (see task_plan.ModelPlan)."""

    x: np.ndarray  # host view of the fine-tuned tensor
    mode: Keep
    weight: float
    scale: float = 1.0  # float32 L1 rescale factor
    t: int = 0  # Keep.MAGNITUDE: threshold bits
    cut: int = 0  # Keep.MAGNITUDE: last kept tie
    keys: tuple[int, int] = (0, 0)  # Keep.RANDOM: the stream's keys
    p: float = 1.0  # Keep.RANDOM: keep probability
    mask: np.ndarray | None = None  # Keep.RANDOM: the keep mask, once the L1 pass has drawn it


def _kept(m: Model, bits: np.ndarray, s: int, e: int, sc: Scratch, hasher: Hash, slot: str) -> np.ndarray:
    out = sc(slot, np.bool_, e - s)
    if m.mode == Keep.MAGNITUDE:
        magnitude_keep(bits, np.uint32(m.t), m.cut, s, out)
    elif m.mask is not None:
        return m.mask[s:e]
    else:
        hasher.mask_into(s, e, m.keys, m.p, sc, out)
    return out


def _l1_buffers(k: int) -> list[tuple[mx.array, np.ndarray]]:
    """This thread's 2k MLX arrays of 2 * GROUP float32 (|d| then the kept |d|), two per model:
    one fills while MLX sums the other. Kept, so a tensor costs no fresh pages."""
    bufs = getattr(_local_l1, "bufs", None)
    if bufs is None or len(bufs) < 2 * k:
        bufs = _local_l1.bufs = [alloc((2 * GROUP,), np.float32) for _ in range(2 * k)]
    return bufs


@quiet
def l1_block_sums(
    base: np.ndarray, models: list[Model], hasher: Hash, block: int = 1024, native: bool = True
) -> list[tuple[mx.array, mx.array]]:
    """Per model, per-`block` sums of |d| and of the kept |d| (the first level of
    sums.accurate_sum, the last block zero-padded), in one pass over the base.

    Native code (where it is built) adds each block's 32 lanes (block_sums' first step) and MLX
    adds those. Otherwise MLX sums the blocks (block_sums) straight from the arrays numpy fills,
    group by group while numpy computes the next group, and a Keep.RANDOM model's mask is kept in
    m.mask for the merge (one byte an element instead of a second hash)."""
    fn = native_l1(base, models) if native and block == 1024 else None
    if fn is not None:
        for m in models:  # the native merge draws the masks again
            m.mask = None
        return _l1_native(fn, base, models)
    n = base.size
    sc = scratch()
    for m in models:
        m.mask = alloc((n,), np.bool_)[1] if m.mode == Keep.RANDOM else None
    bufs = _l1_buffers(len(models))
    parts: list[list[list[mx.array]]] = [[] for _ in models]  # per model, per group: [|d| sums, kept sums]
    for gi, g in enumerate(range(0, n, GROUP)):
        ge = min(n, g + GROUP)
        size = -(-(ge - g) // block) * block
        mine = bufs[(gi % 2) * len(models) : (gi % 2 + 1) * len(models)]
        if gi >= 2:  # the sums that read these buffers two groups ago are done before they refill
            mx.eval([out[gi - 2] for out in parts])
        for s in range(g, ge, CHUNK):
            e = min(ge, s + CHUNK)
            bw = widen(base[s:e], sc("b", np.uint32, e - s)).view(np.float32)
            for m, (_, buf) in zip(models, mine):
                d = widen(m.x[s:e], sc("x", np.uint32, e - s))
                np.subtract(d, bw, out=d)
                a = buf[s - g : e - g]
                bits = a.view(np.uint32)
                np.bitwise_and(d.view(np.uint32), ABS, out=bits)  # |d|, written where MLX sums it
                if m.mask is not None:
                    keep = m.mask[s:e]
                    hasher.mask_into(s, e, m.keys, m.p, sc, keep)
                else:
                    keep = _kept(m, bits, s, e, sc, hasher, "keep")
                kept = buf[GROUP + s - g : GROUP + e - g]
                np.copyto(kept, keep)  # keep.astype(float32)
                np.multiply(a, kept, out=kept)
        for (arr, buf), out in zip(mine, parts):
            if ge - g < size:  # the last block's padding
                buf[ge - g : size] = 0
                buf[GROUP + ge - g : GROUP + size] = 0
            sums = [block_sums(arr[o : o + size], block) for o in (0, GROUP)]  # views: no copy
            mx.async_eval(sums)
            out.append(sums)

    def cat(xs: list[mx.array]) -> mx.array:
        return xs[0] if len(xs) == 1 else mx.concatenate(xs)

    return [(cat([p[0] for p in out]), cat([p[1] for p in out])) for out in parts]


def native_l1(base: np.ndarray, models: list[Model]):
    if not one_layout(base.dtype, base, *[m.x for m in models]):
        return None
    defines = (("T", cpu_native.type_name(base.dtype)), ("KM", str(len(models))), _modes(models))
    return cpu_native.checked("l1_lanes", defines, len(models), check_native_l1)


def _l1_native(fn, base: np.ndarray, models: list[Model]) -> list[tuple[mx.array, mx.array]]:
    n, k = base.size, len(models)
    lanes_mx, lanes = alloc((-(-n // 1024), k, 2, 32), np.float32)
    f, u = _native_params(models)
    xs = cpu_native.pointers([m.x for m in models])

    def body(lo: int, hi: int) -> None:  # lo a multiple of CHUNK: of the block too
        b0, b1 = lo // 1024, -(-hi // 1024)
        fn(cpu_native.ptr(base), xs, cpu_native.ptr(f), cpu_native.ptr(u), cpu_native.ptr(lanes[b0:]), n, b0, b1)

    in_halves(n, body)
    sums = lanes_mx.sum(axis=-1)  # block_sums' second step: the 32 lanes of each block
    return [(sums[:, m, 0], sums[:, m, 1]) for m in range(k)]


def round_bf16(f: np.ndarray, out: np.ndarray, sc: Scratch) -> None:
    """float32 -> bfloat16 bits as MLX rounds: to nearest even, every NaN to 0x7FC0."""
    c = f.size
    bits = f.view(np.uint32)
    r = sc("round", np.uint32, c)
    np.right_shift(bits, 16, out=r)
    np.bitwise_and(r, np.uint32(1), out=r)
    np.add(r, np.uint32(0x7FFF), out=r)
    np.add(r, bits, out=r)
    np.right_shift(r, 16, out=r)
    np.copyto(out, r, casting="unsafe")
    nan = sc("nan", np.bool_, c)
    np.not_equal(f, f, out=nan)
    if nan.any():
        out[nan] = 0x7FC0


@quiet
def task_merge(
    base: np.ndarray,
    models: list[Model],
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
    divisor: float,
    out_bf16: bool,
    hasher: Hash,
    out: np.ndarray,
) -> None:
    """The fused merge (the operations of task_merge's compiled graph, in its order) over chunks,
    into `out`: bf16 bits (uint16) when out_bf16, else float32. Native code where it is built
    (cpu_native), numpy's passes otherwise."""
    native = native_merge(base, models, consensus, normalize, lam, divisor, out)
    if native is not None:
        in_halves(base.size, native)
        return
    in_halves(
        base.size, lambda lo, hi: merge_range(base, models, consensus, normalize, lam, divisor, out_bf16, hasher, out, lo, hi)
    )


def _native_params(models: list[Model], lam: float = 1.0, divisor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The native loops' parameters: f (float32) = per model [weight, scale, p], then [lam, divisor];
    u (uint32) = per model [t, cut, k0, k1]."""
    f = np.array([v for m in models for v in (m.weight, m.scale, m.p)] + [lam, divisor], dtype=np.float32)
    u = np.array([w for m in models for w in (m.t, m.cut, *m.keys)], dtype=np.uint32)
    return f, u


def _modes(models: list[Model]) -> tuple[str, str]:
    return ("MODES", ",".join(str(int(m.mode)) for m in models))


def native_merge(base, models, consensus, normalize, lam, divisor, out) -> Callable[[int, int], None] | None:
    """body(lo, hi) running the native merge over [lo, hi), or None where it does not apply:
    mixed dtypes, an output of another dtype, no native build."""
    if not one_layout(base.dtype, base, out, *[m.x for m in models]):
        return None
    defines = (
        ("T", cpu_native.type_name(base.dtype)),
        ("KM", str(len(models))),
        _modes(models),
        ("CONSENSUS", str(int(consensus))),
        ("NORMALIZE", str(int(normalize))),
    )
    fn = cpu_native.checked("task_merge", defines, len(models), check_native_merge)
    return _merge_native(fn, base, models, lam, divisor, out) if fn is not None else None


def _merge_native(fn, base, models, lam, divisor, out) -> Callable[[int, int], None]:
    f, u = _native_params(models, lam, divisor)
    xs = cpu_native.pointers([m.x for m in models])
    return lambda lo, hi: fn(cpu_native.ptr(base), xs, cpu_native.ptr(f), cpu_native.ptr(u), cpu_native.ptr(out), lo, hi)


def merge_range(base, models, consensus, normalize, lam, divisor, out_bf16, hasher, out, lo, hi) -> None:
    sc = scratch()
    f32 = np.float32
    ws = [f32(m.weight) for m in models]
    lam32, div32 = f32(lam), f32(divisor)
    for s in range(lo, hi, CHUNK):
        e = min(hi, s + CHUNK)
        c = e - s
        b = widen(base[s:e], sc("b", np.uint32, c))
        wds = []
        for i, m in enumerate(models):
            d = widen(m.x[s:e], sc(f"d{i}", np.uint32, c))
            np.subtract(d, b, out=d)
            if m.mode == Keep.NONE:
                d.fill(0)
            elif m.mode in (Keep.MAGNITUDE, Keep.RANDOM):
                a = sc("a", np.uint32, c)
                np.bitwise_and(d.view(np.uint32), ABS, out=a)  # |d| as bits
                keep = _kept(m, a, s, e, sc, hasher, "keep")
                kf = sc("kf", np.float32, c)
                np.copyto(kf, keep)
                if m.scale != 1:  # keep * 1 is keep: skipped
                    np.multiply(kf, f32(m.scale), out=kf)
                np.multiply(d, kf, out=d)
            np.multiply(d, ws[i], out=d)
            wds.append(d)
        mixed = sc("mixed", np.float32, c)
        flag = sc("flag", np.bool_, c)
        tmp = sc("tmp", np.float32, c)
        if consensus:
            if len(wds) == 2:
                np.add(wds[0], wds[1], out=mixed)  # the total
            else:
                np.copyto(mixed, wds[0])
                for wd in wds[1:]:
                    np.add(mixed, wd, out=mixed)
            # agree = (wd * majority > 0) with majority = +1 where total >= 0, else -1; as bools:
            # wd > 0 where the total is >= 0, wd < 0 elsewhere (NaN: never, as the product)
            ge = sc("ge", np.bool_, c)
            np.greater_equal(mixed, 0, out=ge)
            pos, neg = sc("pos", np.bool_, c), sc("neg", np.bool_, c)
            div = sc("div", np.float32, c) if normalize else None  # unused otherwise: not computed
            agree = sc("agree", np.float32, c)
            for i, wd in enumerate(wds):
                np.greater(wd, 0, out=pos)
                np.less(wd, 0, out=neg)
                np.bitwise_or(neg, pos, out=neg)  # non-zero, not NaN
                np.equal(pos, ge, out=pos)
                np.bitwise_and(pos, neg, out=pos)
                np.copyto(agree, pos)
                if i == 0:
                    np.multiply(wd, agree, out=mixed)
                    if div is not None:
                        np.multiply(ws[i], agree, out=div)
                else:
                    np.multiply(wd, agree, out=tmp)
                    np.add(mixed, tmp, out=mixed)
                    if div is not None:
                        np.multiply(ws[i], agree, out=tmp)
                        np.add(div, tmp, out=div)
            if div is not None:
                np.equal(div, 0, out=flag)
                np.copyto(tmp, flag)
                np.add(div, tmp, out=div)
                np.divide(mixed, div, out=mixed)
        else:
            np.copyto(mixed, wds[0])
            for wd in wds[1:]:
                np.add(mixed, wd, out=mixed)
            if normalize:
                np.divide(mixed, div32, out=mixed)
        if lam32 != 1:  # x * 1 is x (mixed holds no signalling NaN: it is a computed value)
            np.multiply(mixed, lam32, out=mixed)
        np.add(b, mixed, out=mixed)
        if out_bf16:
            round_bf16(mixed, out[s:e], sc)
        else:
            out[s:e] = mixed


def _check_models(base: np.ndarray, xs: list[np.ndarray], modes: str) -> list[Model]:
    """Models in the given modes; thresholds at each tensor's median |d|."""
    models = []
    for i, (x, mode) in enumerate(zip(xs, modes.split(","))):
        bits = abs_bits(x, base, 0, x.size, Scratch(x.size))
        models.append(
            Model(x, Keep(int(mode)), (0.7, -0.4, 1.1)[i % 3], 1.25, int(np.median(bits)), x.size // 2, (12345 + i, 678 + i), 0.6)
        )
    return models


def check_native_merge(fn, d: dict, k: int) -> bool:
    n = 12289
    base, xs = check_data(d["T"], k, n)
    models = _check_models(base, xs, d["MODES"])
    consensus, normalize = d["CONSENSUS"] == "1", d["NORMALIZE"] == "1"
    want, got = np.zeros(n, dtype=base.dtype), np.ones(n, dtype=base.dtype)
    with np.errstate(all="ignore"):
        merge_range(base, models, consensus, normalize, 0.9, 1.5, base.dtype == np.uint16, HASH, want, 0, n)
    native = _merge_native(fn, base, models, 0.9, 1.5, got)
    native(0, 4099)
    native(4099, n)  # two calls, as two threads make them
    return want.tobytes() == got.tobytes()


def check_native_l1(fn, d: dict, k: int) -> bool:
    n = 3 * 1024 + 77
    base, xs = check_data(d["T"], k, n)
    models = _check_models(base, xs, d["MODES"])
    want = l1_block_sums(base, models, HASH, native=False)
    got = _l1_native(fn, base, models)
    return all(
        np.array_equal(np.array(a).view(np.uint32), np.array(b).view(np.uint32)) for w, g in zip(want, got) for a, b in zip(w, g)
    )
