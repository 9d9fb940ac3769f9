"""The CPU path's hot loops in numpy: exact magnitude selection, the fused task merge, L1 sums.

MLX's compiled CPU code splits long elementwise graphs into several loops (a fusion depth of
11), writes full-size float32 intermediates between them and runs them as scalar code; numpy's
SIMD loops over cache-sized chunks do the same float32 operations in the same order 3-10x
faster. Every function here gives bit for bit what the MLX graphs in `kernels` give (the tests
hold them to that), so the documented rules of `kernels` apply unchanged:
- |x| is ordered by its float32 bit pattern; ties at the threshold are kept lowest index first;
- the merge is mergekit's generalized task arithmetic in float32, rounded once at the end.

Inputs are flat numpy views of evaluated MLX arrays (zero-copy); bfloat16 travels as its uint16
bits and is widened by a 16-bit shift, exactly as MLX converts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

CHUNK = 1 << 16  # elements per step: a few float32 temporaries of this size stay in L2
SAMPLE = 1 << 16  # sampled elements that place the bracket around the k-th value
_SMALL = 1 << 17  # below this many elements the selection partitions all of them
_SIGMAS = 6.0  # bracket half-width in binomial standard deviations of the sampled rank
_ABS = np.uint32(0x7FFFFFFF)
_GOLDEN_STEP = 0.6180339887498949  # sample positions: a golden-ratio sequence (no row aliasing)

KEEP_ALL, KEEP_NONE, MAGNITUDE, RANDOM = 0, 1, 2, 3  # the same codes as kernels._ModelPlan.mode


def supported(*arrays: mx.array) -> bool:
    """bfloat16 and float32 inputs run here; other dtypes keep the MLX graph."""
    return all(a.dtype in (mx.bfloat16, mx.float32) for a in arrays)


def host(a: mx.array) -> np.ndarray:
    """A flat numpy view of `a` (evaluated here): float32, or uint16 bits for bfloat16."""
    flat = a.reshape(-1)
    if flat.dtype == mx.bfloat16:
        flat = flat.view(mx.uint16)
    mx.eval(flat)
    return np.asarray(flat)


def _widen(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float32 values of a chunk (bf16 bits or float32) written into `out` (uint32 scratch)."""
    if src.dtype == np.uint16:
        np.left_shift(src, 16, out=out, dtype=np.uint32)
    else:
        np.copyto(out, src.view(np.uint32))
    return out.view(np.float32)


class _Scratch:
    """Per-call chunk buffers, named on first use."""

    def __init__(self, size: int):
        self.size = size
        self.bufs: dict[str, np.ndarray] = {}

    def __call__(self, name: str, dtype, c: int) -> np.ndarray:
        b = self.bufs.get(name)
        if b is None:
            b = self.bufs[name] = np.empty(self.size, dtype=dtype)
        return b[:c]

    def iota(self, c: int) -> np.ndarray:
        """0, 1, ..., c-1 as uint32 (made once)."""
        b = self.bufs.get("iota")
        if b is None:
            b = self.bufs["iota"] = np.arange(self.size, dtype=np.uint32)
        return b[:c]


def _quiet(fn):
    """NaN and Inf are data here (the caller reports them): no floating-point warnings."""

    def wrapped(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


def _abs_bits(x: np.ndarray, b: Optional[np.ndarray], s: int, e: int, sc: _Scratch) -> np.ndarray:
    """|x - b| (or |x|) of elements [s, e) as float32 bit patterns."""
    c = e - s
    d = _widen(x[s:e], sc("x", np.uint32, c))
    if b is not None:
        np.subtract(d, _widen(b[s:e], sc("b", np.uint32, c)), out=d)
    bits = d.view(np.uint32)
    np.bitwise_and(bits, _ABS, out=bits)
    return bits


def _abs_bits_at(x: np.ndarray, b: Optional[np.ndarray], idx: np.ndarray) -> np.ndarray:
    xs, bs = x[idx], (b[idx] if b is not None else None)
    sc = _Scratch(idx.size)
    return _abs_bits(xs, bs, 0, idx.size, sc).copy()


# ----------------------------------------------------------------------------- exact selection


def sample_positions(n: int) -> np.ndarray:
    """SAMPLE flat indices spread over [0, n) by a golden-ratio sequence (no row aliasing)."""
    return (np.arange(SAMPLE, dtype=np.float64) * (_GOLDEN_STEP * n) % n).astype(np.int64)


@dataclass
class Selection:
    t: int  # bit pattern of the k-th largest |x| (as float32 bits)
    cut: int  # last flat index whose tie at t is kept


def _small(bits: np.ndarray, k: int) -> Selection:
    """The exact top-k of all of `bits` (flat indices are positions)."""
    n = bits.size
    t = np.partition(bits, n - k)[n - k]
    need = k - int(np.count_nonzero(bits > t))
    ties = np.flatnonzero(bits == t)
    return Selection(int(t), n - 1 if ties.size == need else int(ties[need - 1]))


@_quiet
def select(x: np.ndarray, b: Optional[np.ndarray], k: int) -> Optional[Selection]:
    """Exact top-k of |x - b| (|x| without b), 1 <= k <= n. None when the sampled bracket missed
    the k-th value (the caller then takes the full partition)."""
    n = x.size
    if n <= _SMALL:
        return _small(_abs_bits(x, b, 0, n, _Scratch(n)), k)
    # a bracket [lo, hi] around the k-th largest from a sorted sample, wide enough to hold it
    # but for a six-sigma miss
    smp = np.sort(_abs_bits_at(x, b, sample_positions(n)))
    p = k / n
    r = k * SAMPLE / n  # expected rank of the k-th value in the sample, from the top
    margin = _SIGMAS * math.sqrt(SAMPLE * p * (1 - p)) + 4
    top, bottom = math.floor(r - margin), math.ceil(r + margin)
    hi = int(smp[SAMPLE - 1 - top]) if top >= 0 else 0xFFFFFFFF
    lo = int(smp[SAMPLE - 1 - bottom]) if bottom < SAMPLE else 0
    width, lo32, hi32 = np.uint32(hi - lo), np.uint32(lo), np.uint32(hi)
    # one pass: count the elements above the bracket, keep the values inside it (chunk by chunk)
    sc = _Scratch(min(n, CHUNK))
    n_above, inside = 0, 0
    vals = []
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        bits = _abs_bits(x, b, s, e, sc)
        rel = sc("rel", np.uint32, e - s)
        np.subtract(bits, lo32, out=rel)  # wraps below lo: one compare tests lo <= bits <= hi
        m = sc("m", np.bool_, e - s)
        np.less_equal(rel, width, out=m)
        vals.append(bits[m])
        np.greater(bits, hi32, out=m)
        n_above += int(np.count_nonzero(m))
        inside += vals[-1].size
        if inside > n // 4:  # far wider than planned (heavy ties): the partition is cheaper
            return None
    r = k - n_above  # rank of the k-th value among the values inside, from the top
    if r < 1 or r > inside:
        return None
    srt = np.sort(np.concatenate(vals))
    t = srt[inside - r]
    need = r - (inside - int(np.searchsorted(srt, t, side="right")))  # ties at t to keep
    if need == int(np.searchsorted(srt, t, side="right") - np.searchsorted(srt, t, side="left")):
        return Selection(int(t), n - 1)  # every tie is kept
    # the need-th tie lies in the chunk where the running tie count reaches it: scan that one
    for c, v in enumerate(vals):
        here = int(np.count_nonzero(v == t))
        if here >= need:
            s = c * CHUNK
            bits = _abs_bits(x, b, s, min(n, s + CHUNK), sc)
            return Selection(int(t), s + int(np.flatnonzero(bits == t)[need - 1]))
        need -= here
    raise AssertionError("the ties at the threshold were counted inside the bracket")


@_quiet
def keep_mask(x: np.ndarray, sel: Selection) -> np.ndarray:
    """bool mask of the selection: bits > t, or == t at a flat index <= cut."""
    n = x.size
    out = np.empty(n, dtype=np.bool_)
    sc = _Scratch(min(n, CHUNK))
    tf = np.uint32(sel.t)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        bits = _abs_bits(x, None, s, e, sc)
        _magnitude_keep(bits, tf, sel.cut, s, out[s:e])
    return out


def _magnitude_keep(bits: np.ndarray, t: np.uint32, cut: int, s: int, out: np.ndarray) -> None:
    """keep = bits > t | (bits == t & index <= cut) for elements [s, s + len): the index test
    is a split of the chunk, so no index array is needed."""
    j = min(max(cut + 1 - s, 0), bits.size)  # elements [s, s + j) keep their ties
    np.greater_equal(bits[:j], t, out=out[:j])
    np.greater(bits[j:], t, out=out[j:])


# ----------------------------------------------------------------------------- random masks


def _mix32(h: np.ndarray, tmp: np.ndarray, m1: np.uint32, m2: np.uint32) -> None:
    """The kernels' 32-bit finaliser, in place."""
    np.right_shift(h, 16, out=tmp)
    np.bitwise_xor(h, tmp, out=h)
    np.multiply(h, m1, out=h)
    np.right_shift(h, 15, out=tmp)
    np.bitwise_xor(h, tmp, out=h)
    np.multiply(h, m2, out=h)
    np.right_shift(h, 16, out=tmp)
    np.bitwise_xor(h, tmp, out=h)


@dataclass
class Hash:
    """The counter-based uniform of `kernels`: u = top 24 bits of mix(mix(i * golden + k0) ^ k1)
    times 2**-24. `u < p` is tested as `(h >> 8) < ceil(p * 2**24)`: exact, as u is m * 2**-24
    for an integer m."""

    golden: int
    m1: int
    m2: int

    def keep(self, s: int, e: int, keys: tuple[int, int], p: float, sc: _Scratch, out: np.ndarray) -> None:
        c = e - s
        h = sc("h", np.uint32, c)
        np.add(sc.iota(c), np.uint32(s), out=h)
        np.multiply(h, np.uint32(self.golden), out=h)
        np.add(h, np.uint32(keys[0]), out=h)
        tmp = sc("htmp", np.uint32, c)
        m1, m2 = np.uint32(self.m1), np.uint32(self.m2)
        _mix32(h, tmp, m1, m2)
        np.bitwise_xor(h, np.uint32(keys[1]), out=h)
        _mix32(h, tmp, m1, m2)
        np.right_shift(h, 8, out=h)
        bound = min(max(math.ceil(float(np.float32(p)) * 16777216.0), 0), 1 << 24)
        np.less(h, np.uint32(bound), out=out)


# ----------------------------------------------------------------------------- the fused merge


@dataclass
class Model:
    """One task model as the merge reads it (see kernels._ModelPlan)."""

    x: np.ndarray  # host view of the fine-tuned tensor
    mode: int
    weight: float
    scale: float = 1.0  # float32 L1 rescale factor
    t: int = 0  # MAGNITUDE: threshold bits
    cut: int = 0  # MAGNITUDE: last kept tie
    keys: tuple[int, int] = (0, 0)  # RANDOM: the stream's keys
    p: float = 1.0  # RANDOM: keep probability
    mask: Optional[np.ndarray] = None  # RANDOM: the keep mask, once the L1 pass has drawn it


def _keep(m: Model, bits: np.ndarray, s: int, e: int, sc: _Scratch, hasher: Hash, slot: str) -> np.ndarray:
    out = sc(slot, np.bool_, e - s)
    if m.mode == MAGNITUDE:
        _magnitude_keep(bits, np.uint32(m.t), m.cut, s, out)
    elif m.mask is not None:
        return m.mask[s:e]
    else:
        hasher.keep(s, e, m.keys, m.p, sc, out)
    return out


@_quiet
def l1_block_sums(base: np.ndarray, m: Model, hasher: Hash, block: int = 1024) -> tuple[mx.array, mx.array]:
    """Per-`block` sums of |d| and of the kept |d| (the first level of kernels.accurate_sum, the
    last block zero-padded), summed by MLX so the float32 order is MLX's. A RANDOM model's mask
    is kept in m.mask for the merge (one byte an element instead of a second hash)."""
    n = base.size
    group = CHUNK * 16
    sc = _Scratch(min(n, CHUNK))
    mask = np.empty(n, dtype=np.bool_) if m.mode == RANDOM else None
    parts = []
    for g in range(0, n, group):
        ge = min(n, g + group)
        buf = np.zeros((2, -(-(ge - g) // block) * block), dtype=np.float32)
        for s in range(g, ge, CHUNK):
            e = min(ge, s + CHUNK)
            bits = _abs_bits(m.x, base, s, e, sc)
            if mask is not None:
                keep = mask[s:e]
                hasher.keep(s, e, m.keys, m.p, sc, keep)
            else:
                keep = _keep(m, bits, s, e, sc, hasher, "keep")
            a = buf[0, s - g:e - g]
            np.copyto(a, bits.view(np.float32))
            kept = buf[1, s - g:e - g]
            np.copyto(kept, keep)  # keep.astype(float32)
            np.multiply(a, kept, out=kept)
        parts.append(mx.array(buf).reshape(2, -1, block).sum(axis=2))
    m.mask = mask
    sums = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
    return sums[0], sums[1]


def _round_bf16(f: np.ndarray, out: np.ndarray, sc: _Scratch) -> None:
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


@_quiet
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
) -> np.ndarray:
    """kernels' fused merge (the operations of kernels._combine_fn, in its order) over chunks:
    bf16 bits (uint16) when out_bf16, else float32."""
    n = base.size
    out = np.empty(n, dtype=np.uint16 if out_bf16 else np.float32)
    sc = _Scratch(min(n, CHUNK))
    f32 = np.float32
    ws = [f32(m.weight) for m in models]
    lam32, div32 = f32(lam), f32(divisor)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        c = e - s
        b = _widen(base[s:e], sc("b", np.uint32, c))
        wds = []
        for i, m in enumerate(models):
            d = _widen(m.x[s:e], sc(f"d{i}", np.uint32, c))
            np.subtract(d, b, out=d)
            if m.mode == KEEP_NONE:
                d.fill(0)
            elif m.mode in (MAGNITUDE, RANDOM):
                a = sc("a", np.uint32, c)
                np.bitwise_and(d.view(np.uint32), _ABS, out=a)  # |d| as bits
                keep = _keep(m, a, s, e, sc, hasher, "keep")
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
            np.copyto(mixed, wds[0])
            for wd in wds[1:]:
                np.add(mixed, wd, out=mixed)  # the total
            maj = sc("maj", np.float32, c)
            np.greater_equal(mixed, 0, out=flag)
            np.copyto(maj, flag)
            np.multiply(maj, f32(2.0), out=maj)
            np.subtract(maj, f32(1.0), out=maj)
            div = sc("div", np.float32, c)
            agree = sc("agree", np.float32, c)
            for i, wd in enumerate(wds):
                np.multiply(wd, maj, out=tmp)
                np.greater(tmp, 0, out=flag)
                np.copyto(agree, flag)
                if i == 0:
                    np.multiply(wd, agree, out=mixed)
                    np.multiply(ws[i], agree, out=div)
                else:
                    np.multiply(wd, agree, out=tmp)
                    np.add(mixed, tmp, out=mixed)
                    np.multiply(ws[i], agree, out=tmp)
                    np.add(div, tmp, out=div)
            np.equal(div, 0, out=flag)
            np.copyto(tmp, flag)
            np.add(div, tmp, out=div)
            if normalize:
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
            _round_bf16(mixed, out[s:e], sc)
        else:
            out[s:e] = mixed
    return out
