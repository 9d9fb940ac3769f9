"""Exact magnitude selection: the k largest |x| (of a tensor, or of a task vector x - base).

The rule (`topk`): |x| is compared as float32 bit patterns (NaN above inf); ties at the threshold
are kept lowest flat index first. On a GPU the kernels of `selection_gpu`; on the CPU the loops of
`selection_cpu`; elsewhere (other dtypes, kernels off on a GPU) MLX's partition.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from . import gpu, host, selection_cpu, selection_gpu
from .topk import Selection


def abs_bits(x: mx.array) -> mx.array:
    """|x| as float32 bit patterns: for non-negative floats the uint32 order is the float order."""
    return mx.abs(x.astype(mx.float32)).reshape(-1).view(mx.uint32)


def select_fallback(bits: mx.array, k: int) -> Selection:
    n = bits.size
    # MLX's partition is an O(n) introselect on the CPU (faster there than a scatter histogram)
    t = mx.partition(bits, n - k)[n - k]
    n_gt = (bits > t).astype(mx.int32).sum()
    return Selection(t, _tie_cut(bits, t, k - n_gt))


def _tie_cut(bits: mx.array, t: mx.array, need: mx.array) -> mx.array:
    """Flat index of the need-th element equal to t (need >= 1), scanning from index 0."""
    n = bits.size
    eq = bits == t
    n_eq = eq.astype(mx.int32).sum()
    mx.eval(n_eq, need)
    if n_eq.item() == need.item():  # every tie is kept: no scan needed
        return mx.array(n - 1, dtype=mx.uint32)
    # chunk counts, then a scan inside the one chunk that holds the need-th tie
    chunk = 4096
    pad = (-n) % chunk
    eqi = eq.astype(mx.int32)
    if pad:
        eqi = mx.concatenate([eqi, mx.zeros((pad,), dtype=mx.int32)])
    per_chunk = mx.cumsum(eqi.reshape(-1, chunk).sum(axis=1))
    j = (per_chunk < need).astype(mx.int32).sum()  # chunk index holding the need-th tie
    before = mx.where(j > 0, mx.take(per_chunk, mx.maximum(j - 1, 0)), 0)
    inside = mx.cumsum(mx.take(eqi.reshape(-1, chunk), j, axis=0))
    pos = (inside < need - before).astype(mx.int32).sum()
    return (j * chunk + pos).astype(mx.uint32)


def host_path(*arrays: mx.array) -> bool:
    """The CPU path's loops (selection_cpu, task_merge_cpu: native code or numpy's passes) apply: the CPU is the
    default device (on a GPU with kernels off, or after a GPU kernel's check failed, the compiled
    MLX graphs run on the GPU instead) and they read the dtypes."""
    return mx.default_device() == mx.cpu and host.supported(*arrays)


def select_cpu(x: mx.array, base: mx.array | None, k: int) -> Selection:
    """Exact top-k of |x - base| (|x| without base) on the CPU."""
    return select_cpu_many([x], base, [k])[0]


def select_cpu_many(xs: list[mx.array], base: mx.array | None, ks: list[int]) -> list[Selection]:
    """Exact top-k of each |x - base| on the CPU, one pass over the base: selection_cpu's sampled
    bracket, or the full partition where a bracket misses or the dtype is not one it reads."""
    got = [None] * len(xs)
    if host_path(*xs, *([base] if base is not None else [])):
        got = selection_cpu.select_many([host.host(x) for x in xs], host.host(base) if base is not None else None, ks)
    out = []
    for x, k, g in zip(xs, ks, got):
        if g is not None:
            out.append(Selection(mx.array(g.t, dtype=mx.uint32), mx.array(g.cut, dtype=mx.uint32)))
        else:
            bits = delta_bits(x, base.astype(mx.float32)) if base is not None else abs_bits(x)
            out.append(select_fallback(bits, k))
    return out


def magnitude_threshold(x: mx.array, k: int) -> mx.array:
    """The k-th largest |x| as a float32 scalar, exact (k is clamped to [1, x.size])."""
    n = x.size
    if n == 0:
        raise ValueError("magnitude_threshold of an empty tensor")
    gpu.check_size(n)
    k = min(max(int(k), 1), n)
    backend = gpu.backend()
    if backend is not None:
        out = GPU.call(backend, lambda: selection_gpu.select(backend, [x], None, [k])[0][0].t)
        if out is not None:
            return out.view(mx.float32)
    return select_cpu(x, None, k).t.view(mx.float32)


def topk_mask(x: mx.array, k: int) -> mx.array:
    """bool mask of the k largest |x|; ties at the threshold go to the lowest flat indices."""
    n = x.size
    k = int(k)
    if k <= 0:
        return mx.zeros(x.shape, dtype=mx.bool_)
    if k >= n:
        return mx.ones(x.shape, dtype=mx.bool_)
    gpu.check_size(n)
    sel = None
    backend = gpu.backend()
    if backend is not None:
        sel = GPU.call(backend, lambda: selection_gpu.select(backend, [x], None, [k])[0][0])
    if sel is None:
        sel = select_cpu(x, None, k)
        if host_path(x):
            got = selection_cpu.HostSelection(int(sel.t.item()), int(sel.cut.item()))
            mask, view = host.alloc((n,), np.bool_)
            selection_cpu.selection_mask(host.host(x), got, view)
            return mask.reshape(x.shape)
    bits = abs_bits(x)
    idx = mx.arange(n, dtype=mx.uint32)
    return _mask_of_selection(bits, idx, sel.t, sel.cut).reshape(x.shape)


@mx.compile
def _mask_of_selection(bits: mx.array, idx: mx.array, t: mx.array, cut: mx.array) -> mx.array:
    return (bits > t) | ((bits == t) & (idx <= cut))


@mx.compile
def _delta_bits_c(o: mx.array, b32: mx.array) -> mx.array:
    return mx.abs(o.astype(mx.float32) - b32).view(mx.uint32)


def delta_bits(o: mx.array, b32: mx.array) -> mx.array:
    return _delta_bits_c(o.reshape(-1), b32.reshape(-1))


def _check_select(backend: str) -> bool:
    """Every path of the selection against the CPU: the sampled bracket (ties split at t), the
    k-th strictly between two splitters (the collecting pass), and a missed bracket (radix)."""
    base, others = gpu.check_family()
    n = base.size
    ks = [1, n // 3, n - 5]
    x32 = others[0].astype(mx.float32) * 3.0
    got, want = [], []
    for override in (None, "between", "outside"):
        sels, rows = selection_gpu.select(backend, others, base, ks, override)
        got += [(s.t, s.cut) for s in sels] + [(rows[2 * m], rows[2 * m + 1]) for m in range(len(ks))]
        sels, rows = selection_gpu.select(backend, [x32], None, [n // 2], override)
        got += [(sels[0].t, sels[0].cut), (rows[0], rows[1])]
    with mx.stream(mx.cpu):
        b32 = base.astype(mx.float32)
        ref = [select_fallback(delta_bits(o, b32), k) for o, k in zip(others, ks)]
        ref32 = select_fallback(abs_bits(x32), n // 2)
        for _ in range(3):
            want += [(r.t, r.cut) for r in ref] * 2 + [(ref32.t, ref32.cut)] * 2
        return all(int(g[0].item()) == int(w[0].item()) and int(g[1].item()) == int(w[1].item()) for g, w in zip(got, want))


GPU = gpu.Group("select", _check_select)
