"""Exact magnitude selection: the k largest |x| (of a tensor, or of a task vector x - base).

The rule (`topk`): |x| is compared as float32 bit patterns (NaN above inf); ties at the threshold
are kept lowest flat index first. On a GPU the kernels of `selection_gpu`; on the CPU the loops of
`selection_cpu`; elsewhere (other dtypes, kernels off on a GPU) MLX's partition.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from . import gpu, host, selection_cpu, selection_gpu
from .topk import Selection, tie_chunk


def abs_bits(x: mx.array) -> mx.array:
    """|x| as float32 bit patterns: for non-negative floats the uint32 order is the float order."""
    return mx.abs(x.astype(mx.float32)).reshape(-1).view(mx.uint32)


def select_fallback(bits: mx.array, k: int) -> Selection:
    n = bits.size
    # MLX's partition is an O(n) introselect on the CPU (faster there than a scatter histogram)
    t = gpu.element(mx.partition(bits, n - k), n - k)
    n_gt = (bits > t).astype(mx.int32).sum()
    return Selection(t, _tie_cut(bits, t, k - n_gt))


def _tie_cut(bits: mx.array, t: mx.array, need: mx.array) -> mx.array:
    """Flat index of the need-th element equal to t (need >= 1), scanning from index 0."""
    n = bits.size
    eq = (bits == t).astype(mx.int32)
    n_eq = eq.sum()
    mx.eval(n_eq, need)
    if n_eq.item() == need.item():  # every tie is kept: no scan needed
        return mx.array(n - 1, dtype=mx.uint32)
    # chunk counts (read back), then a scan inside the one chunk that holds the need-th tie (a
    # static slice: on a GPU, MLX compiles a gather on first use)
    chunk = 4096
    pad = (-n) % chunk
    padded = mx.concatenate([eq, mx.zeros((pad,), dtype=mx.int32)]) if pad else eq
    j, before = tie_chunk(np.array(padded.reshape(-1, chunk).sum(axis=1)), need.item())
    lo = j * chunk
    pos = (mx.cumsum(eq[lo : min(n, lo + chunk)]) < need.item() - before).astype(mx.int32).sum()
    return (lo + pos).astype(mx.uint32)


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


def _delta_bits(o: mx.array, b32: mx.array) -> mx.array:
    return mx.abs(o.astype(mx.float32) - b32).view(mx.uint32)


_delta_bits_c = mx.compile(_delta_bits)


def delta_bits(o: mx.array, b32: mx.array, fused: bool = True) -> mx.array:
    """|o - b32| as float32 bit patterns, flat; one compiled kernel unless `fused` is False (the
    plain graph, the same bits: a first-use check's small reference then needs no compiler)."""
    return (_delta_bits_c if fused else _delta_bits)(o.reshape(-1), b32.reshape(-1))


def _check_select(backend: str) -> bool:
    """Every path of the selection against the CPU: the sampled bracket (ties split at t), the
    k-th strictly between two splitters (the collecting pass), and a missed bracket (radix)."""
    base, others = gpu.check_family()
    n = base.size
    ks = [1, n // 3, n - 5]
    with mx.stream(mx.cpu):
        x32 = others[0].astype(mx.float32) * 3.0
        mx.eval(x32)
    got = []  # per path: each selection's [t, cut], then the rows array they come as
    for override in (None, *selection_gpu.PATHS):
        sels, rows = selection_gpu.select(backend, others, base, ks, override)
        got += [mx.stack([s.t, s.cut]).astype(mx.uint32) for s in sels] + [rows[: 2 * len(ks)]]
        sels, rows = selection_gpu.select(backend, [x32], None, [n // 2], override)
        got += [mx.stack([sels[0].t, sels[0].cut]).astype(mx.uint32), rows[:2]]
    mx.eval(got)
    with mx.stream(mx.cpu):
        b32 = base.astype(mx.float32)
        ref = [select_fallback(delta_bits(o, b32, fused=False), k) for o, k in zip(others, ks)]
        ref32 = select_fallback(abs_bits(x32), n // 2)
        want = [np.array(mx.stack([r.t, r.cut]).astype(mx.uint32)) for r in ref]
        want32 = np.array(mx.stack([ref32.t, ref32.cut]).astype(mx.uint32))
    expected = (want + [np.concatenate(want)] + [want32, want32]) * 3
    return all(np.array_equal(np.array(g).reshape(-1), w) for g, w in zip(got, expected))


def _check_launches() -> list[gpu.Launch]:
    # the bf16 family's third tensor settles at a splitter even on the forced paths (its k-th
    # |delta| is 0, the sample's minimum), so two tensors take them; unforced, one is collected
    bf16 = selection_gpu.launches(mx.bfloat16, gpu.CHECK_K, True, between=(1, 2), outside=(2,))
    return bf16 + selection_gpu.launches(mx.float32, 1, False, between=(1,), outside=(1,))


GPU = gpu.Group("select", _check_select, _check_launches)
