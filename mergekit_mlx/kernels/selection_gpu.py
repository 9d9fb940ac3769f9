"""Exact magnitude selection on a GPU (kernels/select_*.inc): sample, sort the sample, one counting
pass, resolve; where the pass does not settle the k-th value, a collecting pass (it lies between
two splitters) or a three-pass radix select (the sample missed). One read of the inputs and one
host sync in the common case. Results follow `topk`'s rule bit for bit.

Besides the kernels, only operations MLX ships compiled run here (sort, scan, reductions,
elementwise, static slices): no gather (`take`), no `mx.compile`, which MLX's CUDA backend
compiles with NVRTC on first use (seconds each on a fresh machine)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import numpy as np

from . import gpu
from .topk import Selection, bracket, tie_chunk

DIGITS = ((20, 11), (9, 11), (0, 9))  # (shift, bits): bits 30..20, 19..9, 8..0 of |x| (bit 31 is 0)
SUM_ROWS = 16  # rows of select_pass's counts a thread of select_sum adds up
SAMPLE = 4096  # sampled elements per tensor: one threadgroup of MLX's sort, and 2**12 strata
SPLITTERS = 256  # splitters per tensor in the selection pass (a power of two)
OK, BETWEEN, OUTSIDE = 1, 2, 3  # select_resolve's statuses
TIE_CHUNK = 4096  # elements per threadgroup when counting ties
U32 = mx.uint32
PATHS = ("between", "outside")  # the paths past the counting pass, as `force_path` names them
_forced: str | None = None  # force_path: every selection down the 'between'/'outside' path


@contextmanager
def force_path(path: str | None) -> Iterator[None]:
    """Tests and first-use checks: every selection inside takes the 'between' (collecting pass) or
    'outside' (radix select) path, as if the counting pass had not settled it."""
    global _forced
    previous, _forced = _forced, path
    try:
        yield
    finally:
        _forced = previous


def select_chunk(n: int) -> int:
    """Elements per threadgroup of the selection pass: a multiple of 2048, at most 2048 chunks."""
    return 2048 * max(1, -(-n // (2048 * 2048)))


def select_params(n: int, ks: list[int], override: str | None = None) -> tuple[int, int, mx.array]:
    """(sample size, chunks, up) of the selection kernels. override 'outside' / 'between' forces
    those outcomes (to check the paths that follow): every splitter the sample's minimum, and the
    top one open for 'between'."""
    s = min(SAMPLE, n)
    ch = select_chunk(n)
    chunks = -(-n // ch)
    words = [n, s, ch, chunks]
    for k in ks:
        if override is None:
            lo, hi, flags = bracket(n, k, s)
        else:
            lo, hi, flags = 0, 0, (2 if override == "between" else 0)
        words += [lo, hi, flags, k]
    return s, chunks, gpu.const_u32(tuple(words))


def _models(dtype: mx.Dtype, km: int, has_base: bool, *params: mx.Dtype) -> tuple[mx.Dtype, ...]:
    return gpu.model_dtypes(dtype, km, has_base) + params


def sample_launch(dtype: mx.Dtype, km: int, has_base: bool) -> gpu.Launch:
    ins = _models(dtype, km, has_base, U32)
    return gpu.Launch("select_sample", km, has_base, ("up",), ("smp",), ins, (U32,), (("KM", km),))


def pass_launch(dtype: mx.Dtype, km: int, has_base: bool) -> gpu.Launch:
    ins = _models(dtype, km, has_base, U32, U32)
    template = (("KM", km), ("G", SPLITTERS), ("TG", gpu.TG))
    return gpu.Launch("select_pass", km, has_base, ("srt", "up"), ("tab",), ins, (U32,), template)


def sum_launch() -> gpu.Launch:
    return gpu.Launch("select_sum", 0, False, ("tab", "up"), ("tot",), (U32, U32), (U32,), (("R", SUM_ROWS),), atomic=True)


def resolve_launch(dtype: mx.Dtype, km: int, has_base: bool) -> gpu.Launch:
    ins = _models(dtype, km, has_base, U32, U32, U32, U32)
    template = (("KM", km), ("G", SPLITTERS), ("TG", gpu.TG))
    return gpu.Launch("select_resolve", km, has_base, ("srt", "up", "tab", "tot"), ("res", "tc"), ins, (U32, U32), template)


def collect_launch(dtype: mx.Dtype, km: int, has_base: bool) -> gpu.Launch:
    ins = _models(dtype, km, has_base, U32, U32)
    return gpu.Launch("select_collect", km, has_base, ("up", "tab"), ("kb", "ki"), ins, (U32, U32), (("KM", km),))


def radix_launch(dtype: mx.Dtype, km: int, has_base: bool, shift: int, bits: int) -> gpu.Launch:
    ins, template = _models(dtype, km, has_base, U32), (("KM", km), ("SHIFT", shift), ("BITS", bits))
    return gpu.Launch("radix_hist", km, has_base, ("up",), ("hist",), ins, (U32,), template, atomic=True)


def tie_count_launch(dtype: mx.Dtype, km: int, has_base: bool) -> gpu.Launch:
    template = (("KM", km), ("CHUNK", TIE_CHUNK))
    return gpu.Launch("tie_count", km, has_base, ("up",), ("counts",), _models(dtype, km, has_base, U32), (U32,), template)


def launches(
    dtype: mx.Dtype, km: int, has_base: bool, between: tuple[int, ...] = (), outside: tuple[int, ...] = ()
) -> list[gpu.Launch]:
    """The instantiations a selection of `km` tensors of `dtype` (at most MAX_KM: one launch)
    launches: the common path, and the collecting pass ('between') and the radix select
    ('outside') for each count of tensors named that take them."""
    out = [sample_launch(dtype, km, has_base), pass_launch(dtype, km, has_base), sum_launch()]
    out.append(resolve_launch(dtype, km, has_base))
    out += [collect_launch(dtype, m, has_base) for m in between]
    for m in outside:
        out += [radix_launch(dtype, m, has_base, shift, bits) for shift, bits in DIGITS]
        out.append(tie_count_launch(dtype, m, has_base))
    return out


def select_sample(backend: str, flats: list[mx.array], has_base: bool, s: int, up: mx.array) -> mx.array:
    """Stage 1: the sorted sample, (km * s,) uint32, each tensor's row ascending."""
    km = len(flats) - int(has_base)
    smp = sample_launch(flats[0].dtype, km, has_base)(
        backend,
        flats + [up],
        grid=(-(-s // 32) * 32, 1, 1),
        threadgroup=(32, 1, 1),  # threadgroups of one simdgroup: the scattered loads on many cores at once
        output_shapes=[(gpu.padded(km * s),)],
    )[0]
    return mx.sort(smp[: km * s].reshape(km, s), axis=-1).reshape(-1)


def select_count(backend: str, flats: list[mx.array], has_base: bool, chunks: int, srt: mx.array, up: mx.array):
    """Stage 2, the pass over the data: tab (chunks * km * (2G + 1)) and its sum over the chunks."""
    km = len(flats) - int(has_base)
    w = km * (2 * SPLITTERS + 1)
    tab = pass_launch(flats[0].dtype, km, has_base)(
        backend, flats + [srt, up], grid=(chunks * gpu.TG, 1, 1), threadgroup=(gpu.TG, 1, 1), output_shapes=[(chunks * w,)]
    )[0]
    return tab, select_totals(backend, tab, chunks, w)


def select_totals(backend: str, tab: mx.array, rows: int, w: int) -> mx.array:
    """Stage 2b: the (rows, w) table of counts summed over its rows, (w,) uint32."""
    return sum_launch()(
        backend,
        [tab, gpu.const_u32((rows, w))],
        grid=(-(-rows // SUM_ROWS) * -(-w // gpu.TG) * gpu.TG, 1, 1),
        threadgroup=(gpu.TG, 1, 1),
        output_shapes=[(w,)],
        init_value=0,
    )[0]


def select_resolve(backend: str, flats: list[mx.array], has_base: bool, srt: mx.array, up: mx.array, counts):
    """Stage 3: (res (km*8), tc (km*2)), see kernels/select_resolve.inc."""
    km = len(flats) - int(has_base)
    return resolve_launch(flats[0].dtype, km, has_base)(
        backend,
        flats + [srt, up, *counts],
        grid=(km * gpu.TG, 1, 1),
        threadgroup=(gpu.TG, 1, 1),
        output_shapes=[(km * 8,), (gpu.padded(km * 2),)],
    )


def select_launch(
    backend: str, flats: list[mx.array], has_base: bool, ks: list[int], override: str | None = None
) -> tuple[mx.array, mx.array, mx.array]:
    """Sample, sort the sample, count, resolve: (res (km*8), tc (km*2), tab), all lazy."""
    s, chunks, up = select_params(flats[0].size, ks, override)
    srt = select_sample(backend, flats, has_base, s, up)
    counts = select_count(backend, flats, has_base, chunks, srt, up)
    return (*select_resolve(backend, flats, has_base, srt, up, counts), counts[0])


def _select_between(
    backend: str, flats: list[mx.array], has_base: bool, todo: list[tuple[int, list[int]]], n: int, tab: mx.array
) -> dict[int, Selection]:
    """For tensors whose k-th value lies strictly between two splitters: collect the elements in
    that bit range (one pass; each chunk writes where the pass's counts place it), then the exact
    pick among them."""
    base_l = flats[:1] if has_base else []
    xs = flats[int(has_base) :]
    ch = select_chunk(n)
    chunks = -(-n // ch)
    w = 2 * SPLITTERS + 1
    words, offset = [n, ch, len(xs) * w, 0], 0
    for m, r in todo:
        words += [r[3], r[4], offset, m * w + r[7]]
        offset += r[5]
    km = len(todo)
    kb, ki = collect_launch(flats[0].dtype, km, has_base)(
        backend,
        base_l + [xs[m] for m, _ in todo] + [gpu.const_u32(tuple(words)), tab],
        grid=(chunks * gpu.TG, 1, 1),
        threadgroup=(gpu.TG, 1, 1),
        output_shapes=[(gpu.padded(offset),)] * 2,
    )
    out, offset = {}, 0
    for m, r in todo:
        cnt, rank = r[5], r[6]
        b, i = kb[offset : offset + cnt], ki[offset : offset + cnt]
        offset += cnt
        t = gpu.element(mx.sort(b), cnt - rank)  # the rank-th largest in the range
        need = rank - (b > t).astype(mx.int32).sum()  # ties at t to keep
        eq = b == t
        ties = eq.astype(mx.int32).sum()
        order = mx.sort(mx.where(eq, i, mx.array(0xFFFFFFFF, dtype=mx.uint32)))
        # order[need - 1], picked by a reduction (a take would be a gather)
        picked = mx.min(mx.where(mx.arange(cnt) == need - 1, order, mx.array(0xFFFFFFFF, dtype=mx.uint32)))
        cut = mx.where(need == ties, mx.array(n - 1, dtype=mx.uint32), picked)
        out[m] = Selection(t, cut.astype(mx.uint32))
    return out


def select_start(
    backend: str, xs: list[mx.array], base: mx.array | None, ks: list[int], override: str | None = None
) -> list[tuple]:
    """Launch the selection's first three stages (lazy): per launch of up to three tensors,
    (flats, res, tc, tab)."""
    override = override if override is not None else _forced
    groups = []
    for g in range(0, len(xs), gpu.MAX_KM):
        flats = [a.reshape(-1) for a in gpu.common_dtype(([base] if base is not None else []) + list(xs[g : g + gpu.MAX_KM]))]
        groups.append((flats, *select_launch(backend, flats, base is not None, ks[g : g + gpu.MAX_KM], override)))
    return groups


def select_finish(
    backend: str, xs: list[mx.array], base: mx.array | None, ks: list[int], groups: list[tuple]
) -> tuple[list[Selection], mx.array]:
    """Read the statuses (a host sync unless already evaluated) and finish the tensors whose k-th
    value the counting pass did not settle."""
    n = xs[0].size
    mx.eval(*[res for _, res, _, _ in groups])
    sels: list[Selection] = []
    all_ok = True
    for g, (flats, res, tc, tab) in enumerate(groups):
        info = res.tolist()
        km = len(flats) - int(base is not None)
        rows = [info[8 * m : 8 * m + 8] for m in range(km)]
        between = [(m, r) for m, r in enumerate(rows) if r[0] == BETWEEN]
        outside = [m for m, r in enumerate(rows) if r[0] not in (OK, BETWEEN)]
        done = _select_between(backend, flats, base is not None, between, n, tab) if between else {}
        if outside:  # the sample missed: the three-pass radix select for these tensors
            redo = select_radix(
                backend, [xs[g * gpu.MAX_KM + m] for m in outside], base, [ks[g * gpu.MAX_KM + m] for m in outside]
            )
            done.update(zip(outside, redo))
        all_ok &= not done
        for m in range(km):
            sels.append(done[m] if m in done else Selection(gpu.element(tc, 2 * m), gpu.element(tc, 2 * m + 1)))
    if all_ok:
        rows = (
            mx.concatenate([tc[: 2 * (len(f) - int(base is not None))] for f, _, tc, _ in groups])
            if len(groups) > 1
            else groups[0][2]
        )
    else:
        rows = mx.stack([mx.stack([s.t.astype(mx.uint32), s.cut.astype(mx.uint32)]) for s in sels]).reshape(-1)
    return sels, rows


def select(
    backend: str, xs: list[mx.array], base: mx.array | None, ks: list[int], override: str | None = None
) -> tuple[list[Selection], mx.array]:
    """Exact top-k of |x_m - base| for each m: the selections, and their [t, cut] rows as one
    (len(xs), 2) uint32 array. One read of the inputs and one host sync in the common case."""
    return select_finish(backend, xs, base, ks, select_start(backend, xs, base, ks, override))


def final(gate_words: list[int]) -> bool:
    """A gate read back: every selection's status (the first of its 8 words) is final."""
    return all(v == OK for v in gate_words[::8])


def select_radix(backend: str, xs: list[mx.array], base: mx.array | None, ks: list[int]) -> list[Selection]:
    """Exact top-k of |x_m - base| for each m: three histogram passes over the float bits (the
    fallback when the sample's bracket misses the k-th value)."""
    out: list[Selection] = []
    n = xs[0].size
    for g in range(0, len(xs), gpu.MAX_KM):
        group = xs[g : g + gpu.MAX_KM]
        km = len(group)
        arrays = gpu.common_dtype(([base] if base is not None else []) + list(group))
        flats = [a.reshape(-1) for a in arrays]
        prefix = mx.zeros((km,), dtype=mx.uint32)
        krem = mx.array(ks[g : g + gpu.MAX_KM], dtype=mx.int32)
        n_eq = None
        for shift, bits in DIGITS:
            nb = 1 << bits
            up = mx.concatenate([mx.array([n], dtype=mx.uint32), prefix])
            hist = radix_launch(flats[0].dtype, km, base is not None, shift, bits)(
                backend,
                flats + [up],
                grid=(gpu.groups(n) * gpu.TG, 1, 1),
                threadgroup=(gpu.TG, 1, 1),
                output_shapes=[(km * nb,)],
                init_value=0,
            )[0]
            hist = hist.reshape(km, nb).astype(mx.int32)
            ge = mx.cumsum(hist, axis=1, reverse=True)  # elements at or above each bin
            digit = (ge >= krem[:, None]).astype(mx.int32).sum(axis=1) - 1
            # each row's entry at its digit, as a masked sum (take_along_axis would be a gather)
            at_digit = mx.arange(nb)[None, :] == digit[:, None]
            ge_d = mx.where(at_digit, ge, 0).sum(axis=1)
            n_eq = mx.where(at_digit, hist, 0).sum(axis=1)
            krem = krem - (ge_d - n_eq)
            prefix = (prefix << bits) | digit.astype(mx.uint32)
        # krem is now the number of ties at t to keep; n_eq the number of ties
        mx.eval(prefix, krem, n_eq)
        need, ties = krem.tolist(), n_eq.tolist()
        cuts = [mx.array(n - 1, dtype=mx.uint32)] * km
        split = [m for m in range(km) if need[m] != ties[m]]
        if split:  # some ties are dropped: keep the lowest flat indices
            cuts = _tie_cuts(backend, flats, base is not None, prefix, need, cuts, split)
        out += [Selection(gpu.element(prefix, m), cuts[m]) for m in range(km)]
    return out


def _tie_cuts(backend, flats, has_base, t, need: list[int], cuts, split):
    """Flat index of the need[m]-th tie at t[m]: per-chunk tie counts (read back), then a scan of
    the one chunk that holds it (a static slice: no gather)."""
    n = flats[0].size
    km = len(flats) - int(has_base)
    chunks = -(-n // TIE_CHUNK)
    up = mx.concatenate([mx.array([n], dtype=mx.uint32), t])
    counts = tie_count_launch(flats[0].dtype, km, has_base)(
        backend,
        flats + [up],
        grid=(chunks * gpu.TG, 1, 1),
        threadgroup=(gpu.TG, 1, 1),
        output_shapes=[(km * chunks,)],
    )[0]
    per_chunk = np.array(counts).reshape(km, chunks)
    cuts = list(cuts)
    for m in split:
        j, before = tie_chunk(per_chunk[m], need[m])
        lo, hi = j * TIE_CHUNK, min(n, (j + 1) * TIE_CHUNK)
        x = flats[m + int(has_base)][lo:hi].astype(mx.float32)
        a = mx.abs(x - flats[0][lo:hi].astype(mx.float32)) if has_base else mx.abs(x)
        eq = (a.view(mx.uint32) == gpu.element(t, m)).astype(mx.int32)
        pos = (mx.cumsum(eq) < need[m] - before).astype(mx.int32).sum()
        cuts[m] = (lo + pos).astype(mx.uint32)
    return cuts
