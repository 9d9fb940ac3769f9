"""The CPU path's hot loops: exact magnitude selection, the fused task merge, L1 sums.

MLX's compiled CPU code splits long elementwise graphs into several loops (a fusion depth of
11), writes full-size float32 intermediates between them and runs them as scalar code. Here the
same float32 operations run in the same order as native loops (kernels/*.cpp, built by
`cpu_native`; 5-10x faster than numpy and free of the GIL) or, where those are not built, as
numpy's SIMD loops over cache-sized chunks (3-10x faster than the graphs). Every function here
gives bit for bit what the MLX graphs in `kernels` give (the tests hold both codes to that), so
the documented rules of `kernels` apply unchanged:
- |x| is ordered by its float32 bit pattern; ties at the threshold are kept lowest index first;
- the merge is mergekit's generalized task arithmetic in float32, rounded once at the end.

Inputs are flat numpy views of evaluated MLX arrays (zero-copy); bfloat16 travels as its uint16
bits and is widened by a 16-bit shift, exactly as MLX converts it.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from . import cpu_native
from .errors import warn_once

CHUNK = 1 << 17  # elements per step: float32 temporaries of this size stay in L2 or L3
GROUP = 1 << 20  # elements whose L1 block sums MLX takes per call
SPLIT = 1 << 25  # tensors this large (embeddings) are shared with a helper thread: they run alone
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


def alloc(shape, dtype) -> tuple[mx.array, np.ndarray]:
    """A zeroed MLX array and a writable numpy view of it: MLX's allocator reuses freed buffers,
    so a tensor-sized buffer costs no fresh (zero-filled, faulted-in) pages, and what numpy
    writes into it reaches MLX without a copy."""
    a = mx.zeros(shape, dtype={np.bool_: mx.bool_, np.uint16: mx.uint16, np.float32: mx.float32}[np.dtype(dtype).type])
    mx.eval(a)
    return a, np.asarray(a)


class _Scratch:
    """Chunk buffers, named on first use (one set per thread: see _scratch)."""

    def __init__(self, size: int):
        self.size = size
        self.bufs: dict[str, np.ndarray] = {}

    def __call__(self, name: str, dtype, c: int) -> np.ndarray:
        b = self.bufs.get(name)
        if b is None or b.size < c:
            b = self.bufs[name] = np.empty(max(c, self.size), dtype=dtype)
        return b[:c]

    def iota_times(self, c: int, factor: int) -> np.ndarray:
        """0, f, 2f, ... (c values, uint32, wrapping), made once per factor."""
        name = f"iota*{factor}"
        b = self.bufs.get(name)
        if b is None:
            b = self.bufs[name] = np.arange(self.size, dtype=np.uint32) * np.uint32(factor)
        return b[:c]


_local = threading.local()


def _scratch() -> _Scratch:
    """This thread's chunk buffers (kept: a fresh set per call would fault in new pages)."""
    sc = getattr(_local, "scratch", None)
    if sc is None:
        sc = _local.scratch = _Scratch(CHUNK)
    return sc


_jobs: "queue.SimpleQueue[Callable[[], None]]" = queue.SimpleQueue()
_helper: list[threading.Thread] = []


def _in_halves(n: int, body: Callable[[int, int], object]) -> list:
    """[body(0, n)], or for n >= SPLIT [body(0, mid), body(mid, n)] with the upper half on a
    helper thread (a daemon that lives as long as the process). body runs numpy or native code
    only, no MLX."""
    if n < SPLIT:
        return [body(0, n)]
    mid = n // 2 // CHUNK * CHUNK
    if not _helper:
        t = threading.Thread(target=lambda: [_jobs.get()() for _ in iter(int, 1)], name="mergekit-mlx-numpy", daemon=True)
        t.start()
        _helper.append(t)
    done = threading.Event()
    got: list = []

    def upper() -> None:
        try:
            with np.errstate(all="ignore"):
                got.append((True, body(mid, n)))
        except BaseException as e:  # raised again in the caller
            got.append((False, e))
        finally:
            done.set()

    _jobs.put(upper)
    lower = body(0, mid)
    done.wait()
    ok, value = got[0]
    if not ok:
        raise value
    return [lower, value]


def _quiet(fn):
    """NaN and Inf are data here (the caller reports them): no floating-point warnings."""

    def wrapped(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


def _abs_bits(x: np.ndarray, b: Optional[np.ndarray], s: int, e: int, sc: _Scratch,
              bw: Optional[np.ndarray] = None) -> np.ndarray:
    """|x - b| (or |x|) of elements [s, e) as float32 bit patterns; bw: b's chunk, widened already."""
    c = e - s
    d = _widen(x[s:e], sc("x", np.uint32, c))
    if b is not None:
        np.subtract(d, bw if bw is not None else _widen(b[s:e], sc("b", np.uint32, c)), out=d)
    bits = d.view(np.uint32)
    np.bitwise_and(bits, _ABS, out=bits)
    return bits


def _abs_bits_at(x: np.ndarray, b: Optional[np.ndarray], idx: np.ndarray) -> np.ndarray:
    xs, bs = x[idx], (b[idx] if b is not None else None)
    sc = _Scratch(idx.size)
    return _abs_bits(xs, bs, 0, idx.size, sc).copy()


# ----------------------------------------------------------------------------- exact selection


@lru_cache(maxsize=64)
def sample_positions(n: int) -> np.ndarray:
    """SAMPLE flat indices spread over [0, n) by a golden-ratio sequence (no row aliasing),
    ascending (the gathers then run forward through memory); made once per size."""
    idx = np.sort((np.arange(SAMPLE, dtype=np.float64) * (_GOLDEN_STEP * n) % n).astype(np.int64))
    idx.flags.writeable = False
    return idx


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


def select(x: np.ndarray, b: Optional[np.ndarray], k: int) -> Optional[Selection]:
    """Exact top-k of |x - b| (|x| without b), 1 <= k <= n. None when the sampled bracket missed
    the k-th value (the caller then takes the full partition)."""
    return select_many([x], b, [k])[0]


@dataclass
class _Bracket:
    lo: int
    hi: int
    vals: list  # the values inside [lo, hi], in index order (in one or more pieces)
    n_above: int = 0
    inside: int = 0
    wide: bool = False  # far wider than planned (heavy ties): the partition is cheaper
    counts: list = field(default_factory=list)  # how many of vals each chunk of CHUNK elements holds


def _bracket(x: np.ndarray, b: Optional[np.ndarray], k: int) -> _Bracket:
    """[lo, hi] around the k-th largest from a sorted sample: holds it but for a six-sigma miss."""
    n = x.size
    smp = np.sort(_abs_bits_at(x, b, sample_positions(n)))
    p = k / n
    r = k * SAMPLE / n  # expected rank of the k-th value in the sample, from the top
    margin = _SIGMAS * math.sqrt(SAMPLE * p * (1 - p)) + 4
    top, bottom = math.floor(r - margin), math.ceil(r + margin)
    hi = int(smp[SAMPLE - 1 - top]) if top >= 0 else 0xFFFFFFFF
    lo = int(smp[SAMPLE - 1 - bottom]) if bottom < SAMPLE else 0
    return _Bracket(lo, hi, [])


@_quiet
def select_many(xs: list[np.ndarray], b: Optional[np.ndarray], ks: list[int], native: bool = True) -> list[Optional[Selection]]:
    """select() for several tensors against one base, in one pass over the base (native code
    where it is built, numpy's passes otherwise)."""
    n = b.size if b is not None else xs[0].size
    if n <= _SMALL:
        return [_small(_abs_bits(x, b, 0, n, _Scratch(n)), k) for x, k in zip(xs, ks)]
    brs = [_bracket(x, b, k) for x, k in zip(xs, ks)]
    fn = _native_count(xs, b) if native else None

    def count(lo: int, hi: int) -> list[_Bracket]:
        if fn is not None:
            return _count_native(fn, xs, b, brs, lo, hi)
        return _count_numpy(xs, b, brs, lo, hi)

    for part in _in_halves(n, count):  # chunks in order
        for br, p in zip(brs, part):
            br.vals += p.vals
            br.counts += p.counts
            br.n_above += p.n_above
            br.inside += p.inside
            br.wide = br.wide or p.wide or br.inside > n // 4
    return [None if br.wide else _finish(x, b, k, br, _scratch()) for x, k, br in zip(xs, ks, brs)]


def _count_numpy(xs: list[np.ndarray], b: Optional[np.ndarray], brs: list[_Bracket], lo: int, hi: int) -> list[_Bracket]:
    """One pass over [lo, hi) (lo a multiple of CHUNK): per tensor, the count above its bracket and
    the values inside it, chunk by chunk; a tensor stops once it is wide."""
    n = xs[0].size
    sc = _scratch()
    parts = [_Bracket(br.lo, br.hi, []) for br in brs]
    for s in range(lo, hi, CHUNK):
        e = min(hi, s + CHUNK)
        bw = _widen(b[s:e], sc("b", np.uint32, e - s)).view(np.float32) if b is not None else None
        for x, br in zip(xs, parts):
            if br.wide:
                continue
            bits = _abs_bits(x, b, s, e, sc, bw)
            rel = sc("rel", np.uint32, e - s)
            np.subtract(bits, np.uint32(br.lo), out=rel)  # wraps below lo: one compare tests lo <= bits <= hi
            m = sc("m", np.bool_, e - s)
            np.less_equal(rel, np.uint32(br.hi - br.lo), out=m)
            br.vals.append(bits[m])
            br.counts.append(br.vals[-1].size)
            np.greater(bits, np.uint32(br.hi), out=m)
            br.n_above += int(np.count_nonzero(m))
            br.inside += br.vals[-1].size
            br.wide = br.inside > n // 4
    return parts


def _finish(x: np.ndarray, b: Optional[np.ndarray], k: int, br: _Bracket, sc: _Scratch) -> Optional[Selection]:
    """The k-th largest from the values inside the bracket; the cut from one chunk's scan."""
    n = x.size
    inside = br.inside
    r = k - br.n_above  # rank of the k-th value among the values inside, from the top
    if r < 1 or r > inside:
        return None
    vals = br.vals[0] if len(br.vals) == 1 else np.concatenate(br.vals)
    srt = np.sort(vals)
    t = srt[inside - r]
    above, upto = int(np.searchsorted(srt, t, side="left")), int(np.searchsorted(srt, t, side="right"))
    need = r - (inside - upto)  # ties at t to keep
    if need == upto - above:
        return Selection(int(t), n - 1)  # every tie is kept
    # the need-th tie lies in the chunk where the running tie count reaches it: scan that one
    ties = np.flatnonzero(vals == t)  # positions among the values inside, in index order
    starts = np.cumsum([0] + br.counts)  # where each chunk's values start among them
    c = int(np.searchsorted(starts, ties[need - 1], side="right")) - 1
    need -= int(np.searchsorted(ties, starts[c]))  # the ties of the chunks before
    s = c * CHUNK
    bits = _abs_bits(x, b, s, min(n, s + CHUNK), sc)
    return Selection(int(t), s + int(np.flatnonzero(bits == t)[need - 1]))


def _native_count(xs: list[np.ndarray], b: Optional[np.ndarray]):
    """The native counting pass for these tensors (one dtype, the base's too), or None."""
    if not _one_layout(xs[0].dtype, *xs, *([b] if b is not None else [])):
        return None
    defines = (("T", cpu_native.type_name(xs[0].dtype)), ("KM", str(len(xs))),
               ("HAS_BASE", "1" if b is not None else "0"))
    return _native("select_count", defines, len(xs))


def _count_native(fn, xs: list[np.ndarray], b: Optional[np.ndarray], brs: list[_Bracket], lo: int, hi: int) -> list[_Bracket]:
    """select_many's count over [lo, hi) (lo a multiple of CHUNK) in one native call."""
    n = xs[0].size
    cap = n // 4 + 1  # more values inside than n // 4: wide
    vals = [np.empty(cap, dtype=np.uint32) for _ in xs]  # only the pages written are ever touched
    bracket = np.array([w for br in brs for w in (br.lo, br.hi)], dtype=np.uint32)
    nchunks = -(-(hi - lo) // CHUNK)
    above = np.zeros(len(xs), dtype=np.uint64)
    per_chunk = np.zeros((len(xs), nchunks), dtype=np.uint64)
    fn(cpu_native.ptr(b) if b is not None else None, cpu_native.pointers(xs), cpu_native.ptr(bracket), lo, hi,
       CHUNK, cpu_native.pointers(vals), cap, cpu_native.ptr(above), cpu_native.ptr(per_chunk))
    parts = []
    for v, br, a, per in zip(vals, brs, above, per_chunk):
        inside = int(per.sum())
        parts.append(_Bracket(br.lo, br.hi, [v[:min(inside, cap)]], int(a), inside, inside > n // 4,
                              per.astype(np.int64).tolist()))
    return parts


@_quiet
def keep_mask(x: np.ndarray, sel: Selection, out: np.ndarray) -> None:
    """out = the bool mask of the selection: bits > t, or == t at a flat index <= cut."""
    tf = np.uint32(sel.t)

    def body(lo: int, hi: int) -> None:
        sc = _scratch()
        for s in range(lo, hi, CHUNK):
            e = min(hi, s + CHUNK)
            _magnitude_keep(_abs_bits(x, None, s, e, sc), tf, sel.cut, s, out[s:e])

    _in_halves(x.size, body)


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
        bound = min(max(math.ceil(float(np.float32(p)) * 16777216.0), 0), 1 << 24)
        if bound == 1 << 24:  # every top-24-bit value lies below p
            out.fill(True)
            return
        h = sc("h", np.uint32, c)
        # (s + i) * golden + k0 = i * golden + (s * golden + k0), all mod 2**32
        np.add(sc.iota_times(c, self.golden), np.uint32((s * self.golden + keys[0]) & 0xFFFFFFFF), out=h)
        tmp = sc("htmp", np.uint32, c)
        m1, m2 = np.uint32(self.m1), np.uint32(self.m2)
        _mix32(h, tmp, m1, m2)
        np.bitwise_xor(h, np.uint32(keys[1]), out=h)
        _mix32(h, tmp, m1, m2)
        np.less(h, np.uint32(bound << 8), out=out)  # (h >> 8) < bound, as h < bound * 256


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


def block_sums(a: mx.array, block: int = 1024) -> mx.array:
    """Sums of consecutive `block`-element pieces of a flat float32 array (its length a multiple of
    block): each piece as 32 interleaved running sums, then those 32. The order every L1 sum of
    the CPU path and of the MLX graphs shares; on a CPU MLX vectorises it (0.21 ns an element,
    one running sum per piece 0.82: an add's latency)."""
    lanes = 32 if block % 32 == 0 else 1
    return a.reshape(-1, block // lanes, lanes).sum(axis=1).sum(axis=-1)


def _l1_buffers(k: int) -> list[tuple[mx.array, np.ndarray]]:
    """This thread's 2k MLX arrays of 2 * GROUP float32 (|d| then the kept |d|), two per model:
    one fills while MLX sums the other. Kept, so a tensor costs no fresh pages."""
    bufs = getattr(_local, "l1", None)
    if bufs is None or len(bufs) < 2 * k:
        bufs = _local.l1 = [alloc((2 * GROUP,), np.float32) for _ in range(2 * k)]
    return bufs


@_quiet
def l1_block_sums(base: np.ndarray, models: list[Model], hasher: Hash, block: int = 1024,
                  native: bool = True) -> list[tuple[mx.array, mx.array]]:
    """Per model, per-`block` sums of |d| and of the kept |d| (the first level of
    kernels.accurate_sum, the last block zero-padded), in one pass over the base.

    Native code (where it is built) adds each block's 32 lanes (block_sums' first step) and MLX
    adds those. Otherwise MLX sums the blocks (block_sums) straight from the arrays numpy fills,
    group by group while numpy computes the next group, and a RANDOM model's mask is kept in
    m.mask for the merge (one byte an element instead of a second hash)."""
    fn = _native_l1(base, models) if native and block == 1024 else None
    if fn is not None:
        for m in models:  # the native merge draws the masks again
            m.mask = None
        return _l1_native(fn, base, models)
    n = base.size
    sc = _scratch()
    for m in models:
        m.mask = alloc((n,), np.bool_)[1] if m.mode == RANDOM else None
    bufs = _l1_buffers(len(models))
    parts: list[list[list[mx.array]]] = [[] for _ in models]  # per model, per group: [|d| sums, kept sums]
    for gi, g in enumerate(range(0, n, GROUP)):
        ge = min(n, g + GROUP)
        size = -(-(ge - g) // block) * block
        mine = bufs[(gi % 2) * len(models):(gi % 2 + 1) * len(models)]
        if gi >= 2:  # the sums that read these buffers two groups ago are done before they refill
            mx.eval([out[gi - 2] for out in parts])
        for s in range(g, ge, CHUNK):
            e = min(ge, s + CHUNK)
            bw = _widen(base[s:e], sc("b", np.uint32, e - s)).view(np.float32)
            for m, (_, buf) in zip(models, mine):
                d = _widen(m.x[s:e], sc("x", np.uint32, e - s))
                np.subtract(d, bw, out=d)
                a = buf[s - g:e - g]
                bits = a.view(np.uint32)
                np.bitwise_and(d.view(np.uint32), _ABS, out=bits)  # |d|, written where MLX sums it
                if m.mask is not None:
                    keep = m.mask[s:e]
                    hasher.keep(s, e, m.keys, m.p, sc, keep)
                else:
                    keep = _keep(m, bits, s, e, sc, hasher, "keep")
                kept = buf[GROUP + s - g:GROUP + e - g]
                np.copyto(kept, keep)  # keep.astype(float32)
                np.multiply(a, kept, out=kept)
        for (arr, buf), out in zip(mine, parts):
            if ge - g < size:  # the last block's padding
                buf[ge - g:size] = 0
                buf[GROUP + ge - g:GROUP + size] = 0
            sums = [block_sums(arr[o:o + size], block) for o in (0, GROUP)]  # views: no copy
            mx.async_eval(sums)
            out.append(sums)
    cat = (lambda xs: xs[0] if len(xs) == 1 else mx.concatenate(xs))
    return [(cat([p[0] for p in out]), cat([p[1] for p in out])) for out in parts]


def _native_l1(base: np.ndarray, models: list[Model]):
    if not _one_layout(base.dtype, base, *[m.x for m in models]):
        return None
    defines = (("T", cpu_native.type_name(base.dtype)), ("KM", str(len(models))), _modes(models))
    return _native("l1_lanes", defines, len(models))


def _l1_native(fn, base: np.ndarray, models: list[Model]) -> list[tuple[mx.array, mx.array]]:
    n, k = base.size, len(models)
    lanes_mx, lanes = alloc((-(-n // 1024), k, 2, 32), np.float32)
    f, u = _native_params(models)
    xs = cpu_native.pointers([m.x for m in models])

    def body(lo: int, hi: int) -> None:  # lo a multiple of CHUNK: of the block too
        b0, b1 = lo // 1024, -(-hi // 1024)
        fn(cpu_native.ptr(base), xs, cpu_native.ptr(f), cpu_native.ptr(u), cpu_native.ptr(lanes[b0:]), n, b0, b1)

    _in_halves(n, body)
    sums = lanes_mx.sum(axis=-1)  # block_sums' second step: the 32 lanes of each block
    return [(sums[:, m, 0], sums[:, m, 1]) for m in range(k)]


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
    out: np.ndarray,
) -> None:
    """kernels' fused merge (the operations of kernels._combine_fn, in its order) over chunks,
    into `out`: bf16 bits (uint16) when out_bf16, else float32. Native code where it is built
    (cpu_native), numpy's passes otherwise."""
    native = _native_merge(base, models, consensus, normalize, lam, divisor, out)
    if native is not None:
        _in_halves(base.size, native)
        return
    _in_halves(base.size, lambda lo, hi: _merge_range(base, models, consensus, normalize, lam, divisor,
                                                      out_bf16, hasher, out, lo, hi))


def _one_layout(dtype, *arrays: np.ndarray) -> bool:
    """The native loops read flat, contiguous arrays of one dtype."""
    return all(a.dtype == dtype and a.flags.c_contiguous for a in arrays)


def _native_params(models: list[Model], lam: float = 1.0, divisor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The native loops' parameters: f (float32) = per model [weight, scale, p], then [lam, divisor];
    u (uint32) = per model [t, cut, k0, k1]."""
    f = np.array([v for m in models for v in (m.weight, m.scale, m.p)] + [lam, divisor], dtype=np.float32)
    u = np.array([w for m in models for w in (m.t, m.cut, *m.keys)], dtype=np.uint32)
    return f, u


def _modes(models: list[Model]) -> tuple[str, str]:
    return ("MODES", ",".join(str(m.mode) for m in models))


def _native_merge(base, models, consensus, normalize, lam, divisor, out) -> Optional[Callable[[int, int], None]]:
    """body(lo, hi) running the native merge over [lo, hi), or None where it does not apply:
    mixed dtypes, an output of another dtype, no native build."""
    if not _one_layout(base.dtype, base, out, *[m.x for m in models]):
        return None
    defines = (("T", cpu_native.type_name(base.dtype)), ("KM", str(len(models))), _modes(models),
               ("CONSENSUS", str(int(consensus))), ("NORMALIZE", str(int(normalize))))
    fn = _native("task_merge", defines, len(models))
    return _merge_native(fn, base, models, lam, divisor, out) if fn is not None else None


def _merge_native(fn, base, models, lam, divisor, out) -> Callable[[int, int], None]:
    f, u = _native_params(models, lam, divisor)
    xs = cpu_native.pointers([m.x for m in models])
    return lambda lo, hi: fn(cpu_native.ptr(base), xs, cpu_native.ptr(f), cpu_native.ptr(u), cpu_native.ptr(out), lo, hi)


def _merge_range(base, models, consensus, normalize, lam, divisor, out_bf16, hasher, out, lo, hi) -> None:
    sc = _scratch()
    f32 = np.float32
    ws = [f32(m.weight) for m in models]
    lam32, div32 = f32(lam), f32(divisor)
    for s in range(lo, hi, CHUNK):
        e = min(hi, s + CHUNK)
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
            _round_bf16(mixed, out[s:e], sc)
        else:
            out[s:e] = mixed


# ----------------------------------------------------------------------------- native code


HASH = Hash(0x9E3779B9, 0x7FEB352D, 0x846CA68B)  # kernels/common.h's constants
_native_ok: dict[tuple, bool] = {}


def _native(name: str, defines: tuple[tuple[str, str], ...], km: int):
    """The native function of kernels/<name>.cpp for these defines, once it has given bit for bit
    what numpy gives on a small input in this process; None otherwise (numpy's passes run)."""
    fn = cpu_native.library(name, defines, km)
    if fn is None:
        return None
    key = (name, defines)
    if key not in _native_ok:
        try:
            _native_ok[key] = bool(_NATIVE_CHECKS[name](fn, dict(defines), km))
            reason = "disagrees with numpy"
        except Exception as e:  # noqa: BLE001 - any failure means: not this one
            _native_ok[key] = False
            reason = f"failed ({type(e).__name__}: {e})"
        if not _native_ok[key]:
            warn_once(name, f"mergekit-mlx: the native CPU '{name}' {reason}; using numpy")
    return fn if _native_ok[key] else None


def _check_data(dtype: str, k: int, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A base and k tensors near it, as host views of `dtype` (some elements equal to the base)."""
    rng = np.random.default_rng(7)
    b = rng.standard_normal(n).astype(np.float32) * np.float32(0.02)
    xs = [b + rng.standard_normal(n).astype(np.float32) * np.float32(0.005) for _ in range(k)]
    for i, x in enumerate(xs):
        x[i::5] = b[i::5]
    if dtype == "uint16_t":
        return (b.view(np.uint32) >> 16).astype(np.uint16), [(x.view(np.uint32) >> 16).astype(np.uint16) for x in xs]
    return b, xs


def _check_models(base: np.ndarray, xs: list[np.ndarray], modes: str) -> list[Model]:
    """Models in the given modes; thresholds at each tensor's median |d|."""
    models = []
    for i, (x, mode) in enumerate(zip(xs, modes.split(","))):
        bits = _abs_bits(x, base, 0, x.size, _Scratch(x.size))
        models.append(Model(x, int(mode), (0.7, -0.4, 1.1)[i % 3], 1.25, int(np.median(bits)), x.size // 2,
                            (12345 + i, 678 + i), 0.6))
    return models


def _check_merge(fn, d: dict, k: int) -> bool:
    n = 12289
    base, xs = _check_data(d["T"], k, n)
    models = _check_models(base, xs, d["MODES"])
    consensus, normalize = d["CONSENSUS"] == "1", d["NORMALIZE"] == "1"
    want, got = np.zeros(n, dtype=base.dtype), np.ones(n, dtype=base.dtype)
    with np.errstate(all="ignore"):
        _merge_range(base, models, consensus, normalize, 0.9, 1.5, base.dtype == np.uint16, HASH, want, 0, n)
    native = _merge_native(fn, base, models, 0.9, 1.5, got)
    native(0, 4099)
    native(4099, n)  # two calls, as two threads make them
    return want.tobytes() == got.tobytes()


def _check_l1(fn, d: dict, k: int) -> bool:
    n = 3 * 1024 + 77
    base, xs = _check_data(d["T"], k, n)
    models = _check_models(base, xs, d["MODES"])
    want = l1_block_sums(base, models, HASH, native=False)
    got = _l1_native(fn, base, models)
    return all(np.array_equal(np.array(a).view(np.uint32), np.array(b).view(np.uint32))
               for w, g in zip(want, got) for a, b in zip(w, g))


def _check_count(fn, d: dict, k: int) -> bool:
    n = 3 * CHUNK + 1001
    base, xs = _check_data(d["T"], k, n)
    b = base if d["HAS_BASE"] == "1" else None
    brs = []
    for x in xs:
        bits = np.sort(_abs_bits(x, b, 0, n, _Scratch(n)))
        brs.append(_Bracket(int(bits[n // 2]), int(bits[n // 2 + 2000]), []))
    for lo, hi in ((0, CHUNK), (CHUNK, n)):  # two calls, as two threads make them
        with np.errstate(all="ignore"):
            want = _count_numpy(xs, b, brs, lo, hi)
        got = _count_native(fn, xs, b, brs, lo, hi)
        for w, g in zip(want, got):
            if (w.n_above, w.inside, w.wide, w.counts) != (g.n_above, g.inside, g.wide, g.counts):
                return False
            if not np.array_equal(np.concatenate(w.vals), np.concatenate(g.vals)):
                return False
    return True


_NATIVE_CHECKS = {"task_merge": _check_merge, "l1_lanes": _check_l1, "select_count": _check_count}
