"""Exact magnitude selection on the CPU: a sampled bracket, one counting pass, a sort of what is
inside it (native code where it is built, numpy's passes otherwise). The result is the rule of
`topk`, bit for bit; None where the bracket missed (the caller then partitions everything)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from . import cpu_native
from .host import CHUNK, Scratch, abs_bits, abs_bits_at, check_data, in_halves, one_layout, quiet, scratch, widen
from .topk import bracket

SAMPLE = 1 << 16  # sampled elements that place the bracket around the k-th value
SMALL = 1 << 17  # below this many elements the selection partitions all of them
_GOLDEN_STEP = 0.6180339887498949  # sample positions: a golden-ratio sequence (no row aliasing)


@lru_cache(maxsize=64)
def sample_positions(n: int) -> np.ndarray:
    """SAMPLE flat indices spread over [0, n) by a golden-ratio sequence (no row aliasing),
    ascending (the gathers then run forward through memory); made once per size."""
    idx = np.sort((np.arange(SAMPLE, dtype=np.float64) * (_GOLDEN_STEP * n) % n).astype(np.int64))
    idx.flags.writeable = False
    return idx


@dataclass
class HostSelection:
    """A selection (see topk) as host integers."""

    t: int  # bit pattern of the k-th largest |x| (as float32 bits)
    cut: int  # last flat index whose tie at t is kept


def _small(bits: np.ndarray, k: int) -> HostSelection:
    """The exact top-k of all of `bits` (flat indices are positions)."""
    n = bits.size
    t = np.partition(bits, n - k)[n - k]
    need = k - int(np.count_nonzero(bits > t))
    ties = np.flatnonzero(bits == t)
    return HostSelection(int(t), n - 1 if ties.size == need else int(ties[need - 1]))


def select(x: np.ndarray, b: np.ndarray | None, k: int) -> HostSelection | None:
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


def _bracket(x: np.ndarray, b: np.ndarray | None, k: int) -> _Bracket:
    """[lo, hi] around the k-th largest from a sorted sample (topk.bracket's positions)."""
    n = x.size
    smp = np.sort(abs_bits_at(x, b, sample_positions(n)))
    lo, hi, flags = bracket(n, k, SAMPLE)
    return _Bracket(0 if flags & 1 else int(smp[lo]), 0xFFFFFFFF if flags & 2 else int(smp[hi]), [])


@quiet
def select_many(xs: list[np.ndarray], b: np.ndarray | None, ks: list[int], native: bool = True) -> list[HostSelection | None]:
    """select() for several tensors against one base, in one pass over the base (native code
    where it is built, numpy's passes otherwise)."""
    n = b.size if b is not None else xs[0].size
    if n <= SMALL:
        return [_small(abs_bits(x, b, 0, n, Scratch(n)), k) for x, k in zip(xs, ks)]
    brs = [_bracket(x, b, k) for x, k in zip(xs, ks)]
    fn = native_count(xs, b) if native else None

    def count(lo: int, hi: int) -> list[_Bracket]:
        if fn is not None:
            return count_native(fn, xs, b, brs, lo, hi)
        return _count_numpy(xs, b, brs, lo, hi)

    for part in in_halves(n, count):  # chunks in order
        for br, p in zip(brs, part):
            br.vals += p.vals
            br.counts += p.counts
            br.n_above += p.n_above
            br.inside += p.inside
            br.wide = br.wide or p.wide or br.inside > n // 4
    return [None if br.wide else _finish(x, b, k, br, scratch()) for x, k, br in zip(xs, ks, brs)]


def _count_numpy(xs: list[np.ndarray], b: np.ndarray | None, brs: list[_Bracket], lo: int, hi: int) -> list[_Bracket]:
    """One pass over [lo, hi) (lo a multiple of CHUNK): per tensor, the count above its bracket and
    the values inside it, chunk by chunk; a tensor stops once it is wide."""
    n = xs[0].size
    sc = scratch()
    parts = [_Bracket(br.lo, br.hi, []) for br in brs]
    for s in range(lo, hi, CHUNK):
        e = min(hi, s + CHUNK)
        bw = widen(b[s:e], sc("b", np.uint32, e - s)).view(np.float32) if b is not None else None
        for x, br in zip(xs, parts):
            if br.wide:
                continue
            bits = abs_bits(x, b, s, e, sc, bw)
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


def _finish(x: np.ndarray, b: np.ndarray | None, k: int, br: _Bracket, sc: Scratch) -> HostSelection | None:
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
        return HostSelection(int(t), n - 1)  # every tie is kept
    # the need-th tie lies in the chunk where the running tie count reaches it: scan that one
    ties = np.flatnonzero(vals == t)  # positions among the values inside, in index order
    starts = np.cumsum([0] + br.counts)  # where each chunk's values start among them
    c = int(np.searchsorted(starts, ties[need - 1], side="right")) - 1
    need -= int(np.searchsorted(ties, starts[c]))  # the ties of the chunks before
    s = c * CHUNK
    bits = abs_bits(x, b, s, min(n, s + CHUNK), sc)
    return HostSelection(int(t), s + int(np.flatnonzero(bits == t)[need - 1]))


def native_count(xs: list[np.ndarray], b: np.ndarray | None):
    """The native counting pass for these tensors (one dtype, the base's too), or None."""
    if not one_layout(xs[0].dtype, *xs, *([b] if b is not None else [])):
        return None
    defines = (("T", cpu_native.type_name(xs[0].dtype)), ("KM", str(len(xs))), ("HAS_BASE", "1" if b is not None else "0"))
    return cpu_native.checked("select_count", defines, len(xs), check_native_count)


def count_native(fn, xs: list[np.ndarray], b: np.ndarray | None, brs: list[_Bracket], lo: int, hi: int) -> list[_Bracket]:
    """select_many's count over [lo, hi) (lo a multiple of CHUNK) in one native call."""
    n = xs[0].size
    cap = n // 4 + 1  # more values inside than n // 4: wide
    vals = [np.empty(cap, dtype=np.uint32) for _ in xs]  # only the pages written are ever touched
    bracket = np.array([w for br in brs for w in (br.lo, br.hi)], dtype=np.uint32)
    nchunks = -(-(hi - lo) // CHUNK)
    above = np.zeros(len(xs), dtype=np.uint64)
    per_chunk = np.zeros((len(xs), nchunks), dtype=np.uint64)
    fn(
        cpu_native.ptr(b) if b is not None else None,
        cpu_native.pointers(xs),
        cpu_native.ptr(bracket),
        lo,
        hi,
        CHUNK,
        cpu_native.pointers(vals),
        cap,
        cpu_native.ptr(above),
        cpu_native.ptr(per_chunk),
    )
    parts = []
    for v, br, a, per in zip(vals, brs, above, per_chunk):
        inside = int(per.sum())
        parts.append(
            _Bracket(br.lo, br.hi, [v[: min(inside, cap)]], int(a), inside, inside > n // 4, per.astype(np.int64).tolist())
        )
    return parts


@quiet
def selection_mask(x: np.ndarray, sel: HostSelection, out: np.ndarray) -> None:
    """out = the bool mask of the selection: bits > t, or == t at a flat index <= cut."""
    tf = np.uint32(sel.t)

    def body(lo: int, hi: int) -> None:
        sc = scratch()
        for s in range(lo, hi, CHUNK):
            e = min(hi, s + CHUNK)
            magnitude_keep(abs_bits(x, None, s, e, sc), tf, sel.cut, s, out[s:e])

    in_halves(x.size, body)


def magnitude_keep(bits: np.ndarray, t: np.uint32, cut: int, s: int, out: np.ndarray) -> None:
    """keep = bits > t | (bits == t & index <= cut) for elements [s, s + len): the index test
    is a split of the chunk, so no index array is needed."""
    j = min(max(cut + 1 - s, 0), bits.size)  # elements [s, s + j) keep their ties
    np.greater_equal(bits[:j], t, out=out[:j])
    np.greater(bits[j:], t, out=out[j:])


def check_native_count(fn, d: dict, k: int) -> bool:
    n = 3 * CHUNK + 1001
    base, xs = check_data(d["T"], k, n)
    b = base if d["HAS_BASE"] == "1" else None
    brs = []
    for x in xs:
        bits = np.sort(abs_bits(x, b, 0, n, Scratch(n)))
        brs.append(_Bracket(int(bits[n // 2]), int(bits[n // 2 + 2000]), []))
    for lo, hi in ((0, CHUNK), (CHUNK, n)):  # two calls, as two threads make them
        with np.errstate(all="ignore"):
            want = _count_numpy(xs, b, brs, lo, hi)
        got = count_native(fn, xs, b, brs, lo, hi)
        for w, g in zip(want, got):
            if (w.n_above, w.inside, w.wide, w.counts) != (g.n_above, g.inside, g.wide, g.counts):
                return False
            if not np.array_equal(np.concatenate(w.vals), np.concatenate(g.vals)):
                return False
    return True
