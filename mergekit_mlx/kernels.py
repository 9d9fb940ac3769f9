"""Hot paths of the task-arithmetic merges: magnitude threshold, random masks, fused TIES/DARE.

One interface, three backends: `mx.fast.metal_kernel` on an Apple GPU, CUDA on an NVIDIA GPU
(compiled once per machine by `cuda_jit`, `mx.fast.cuda_kernel` where that cannot compile), and a compiled pure-MLX fallback (the CPU path, and the path whenever kernels are
off). Kernel sources live in `kernels/` (shipped as the package `mergekit_mlx._kernels`).

Documented rules (every backend follows them):
- Random numbers: a counter-based hash of (seed, stream, flat element index) to 32 bits; the
  uniform is the top 24 bits times 2**-24, so it is exact in float32 and the same everywhere.
- Magnitude order: |x| is compared as float32 bit patterns (NaN above inf); ties at the
  threshold are kept lowest flat index first.
- `fused_task_merge` follows mergekit 0.1.5's generalized task arithmetic, computed in float32
  and rounded once to the base's dtype.
"""

from __future__ import annotations

import math
import os
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from . import cpu_kernels, cuda_jit
from .errors import warn_once as _warn_once
from .kernel_sources import kernel_source, model_macros

_ENV_OFF = "MERGEKIT_MLX_NO_KERNELS"
_ENV_MLX_JIT = "MERGEKIT_MLX_MLX_JIT"  # CUDA: compile with mx.fast.cuda_kernel in every process (no cache)
_enabled_override: Optional[bool] = None

_HASH = cpu_kernels.HASH  # the counter-based generator's constants (kernels/common.h's), one copy here
_GOLDEN, _M1, _M2 = _HASH.golden, _HASH.m1, _HASH.m2
_MASK32 = 0xFFFFFFFF
_U24 = 1.0 / 16777216.0  # 2**-24, exact in float32
_MAX_ELEMENTS = 2**31 - 1  # counts and indices are 32-bit


# ----------------------------------------------------------------------------- switches


def kernels_enabled() -> bool:
    """False when MERGEKIT_MLX_NO_KERNELS=1 or after set_kernels_enabled(False)."""
    if _enabled_override is not None:
        return _enabled_override
    return os.environ.get(_ENV_OFF, "").strip().lower() not in ("1", "true", "yes", "on")


def set_kernels_enabled(flag: bool) -> None:
    global _enabled_override
    _enabled_override = bool(flag)


# ----------------------------------------------------------------------------- hashing


def _mix32(x: int) -> int:
    """The 32-bit finaliser used everywhere (host side; the same steps as the kernels)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _M1) & _MASK32
    x ^= x >> 15
    x = (x * _M2) & _MASK32
    x ^= x >> 16
    return x


def stream_id(*parts: Union[str, int]) -> int:
    """A stable 32-bit FNV-1a hash of the parts, e.g. stream_id(tensor_name, model_index)."""
    h = 0x811C9DC5
    data = "\x1f".join(str(p) for p in parts).encode("utf-8")
    for byte in data:
        h ^= byte
        h = (h * 0x01000193) & _MASK32
    return h


def _stream_keys(seed: int, stream: int) -> tuple[int, int]:
    """Two 32-bit keys of (seed, stream); a seed of any size folds in through its high word."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    lo, hi = seed & _MASK32, seed >> 32
    k0 = _mix32(lo ^ _mix32((int(stream) & _MASK32) ^ _GOLDEN))
    k1 = _mix32(k0 ^ _mix32(hi ^ 0x85EBCA6B))
    return k0, k1


def _u32(v: int) -> mx.array:
    return mx.array(v & _MASK32, dtype=mx.uint32)


def _mix32_mx(x: mx.array) -> mx.array:
    x = x ^ (x >> 16)
    x = x * _u32(_M1)
    x = x ^ (x >> 15)
    x = x * _u32(_M2)
    return x ^ (x >> 16)


def _uniform_of_index(idx: mx.array, keys: mx.array) -> mx.array:
    """float32 uniforms in [0, 1) for uint32 flat indices and keys = [k0, k1] (uint32)."""
    h = _mix32_mx(idx * _u32(_GOLDEN) + keys[0])
    h = _mix32_mx(h ^ keys[1])
    return (h >> 8).astype(mx.float32) * _U24


_uniform_compiled = mx.compile(_uniform_of_index, shapeless=True)


def _check_size(n: int) -> None:
    if n > _MAX_ELEMENTS:
        raise ValueError(f"tensor of {n} elements: the kernels index at most 2**31-1 elements")


def _keys_array(seed: int, stream: int) -> mx.array:
    return mx.array(list(_stream_keys(seed, stream)), dtype=mx.uint32)


def random_uniform(seed: int, stream: int, shape: Sequence[int]) -> mx.array:
    """float32 uniforms in [0, 1), a pure function of (seed, stream, flat element index)."""
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    _check_size(n)
    if n == 0:
        return mx.zeros(shape, dtype=mx.float32)
    gpu = _gpu_backend()
    if gpu is not None:
        out = _gpu_call(gpu, "uniform", lambda: _gpu_uniform(gpu, seed, stream, n))
        if out is not None:
            return out.reshape(shape)
    idx = mx.arange(n, dtype=mx.uint32)
    return _uniform_compiled(idx, _keys_array(seed, stream)).reshape(shape)


def keep_mask(seed: int, stream: int, shape: Sequence[int], p: Union[float, mx.array]) -> mx.array:
    """bool mask: random_uniform(seed, stream, shape) < p (p a float or an array broadcast to shape)."""
    u = random_uniform(seed, stream, shape)
    if isinstance(p, mx.array):
        return u < p.astype(mx.float32)
    return u < mx.array(float(p), dtype=mx.float32)


# ----------------------------------------------------------------------------- magnitude selection


def _abs_bits(x: mx.array) -> mx.array:
    """|x| as float32 bit patterns: for non-negative floats the uint32 order is the float order."""
    return mx.abs(x.astype(mx.float32)).reshape(-1).view(mx.uint32)


@dataclass
class _Selection:
    """The exact top-k of one flat tensor: keep bits > t, and bits == t at flat index <= cut."""

    t: mx.array  # uint32 scalar: bit pattern of the k-th largest |x|
    cut: mx.array  # uint32 scalar: last flat index whose tie at t is kept


def _select_fallback(bits: mx.array, k: int) -> _Selection:
    n = bits.size
    # MLX's partition is an O(n) introselect on the CPU (faster there than a scatter histogram)
    t = mx.partition(bits, n - k)[n - k]
    n_gt = (bits > t).astype(mx.int32).sum()
    return _Selection(t, _tie_cut(bits, t, k - n_gt))


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


def _numpy_path(*arrays: mx.array) -> bool:
    """The CPU path's loops (cpu_kernels: native code or numpy's passes) apply: the CPU is the
    default device (on a GPU with kernels off, or after a GPU kernel's check failed, the compiled
    MLX graphs run on the GPU instead) and they read the dtypes."""
    return mx.default_device() == mx.cpu and cpu_kernels.supported(*arrays)


def _select_cpu(x: mx.array, base: Optional[mx.array], k: int) -> _Selection:
    """Exact top-k of |x - base| (|x| without base) on the CPU."""
    return _select_cpu_many([x], base, [k])[0]


def _select_cpu_many(xs: list[mx.array], base: Optional[mx.array], ks: list[int]) -> list[_Selection]:
    """Exact top-k of each |x - base| on the CPU, one pass over the base: cpu_kernels' sampled
    bracket, or the full partition where a bracket misses or the dtype is not one it reads."""
    got = [None] * len(xs)
    if _numpy_path(*xs, *([base] if base is not None else [])):
        got = cpu_kernels.select_many([cpu_kernels.host(x) for x in xs],
                                      cpu_kernels.host(base) if base is not None else None, ks)
    out = []
    for x, k, g in zip(xs, ks, got):
        if g is not None:
            out.append(_Selection(mx.array(g.t, dtype=mx.uint32), mx.array(g.cut, dtype=mx.uint32)))
        else:
            bits = _delta_bits(x, base.astype(mx.float32)) if base is not None else _abs_bits(x)
            out.append(_select_fallback(bits, k))
    return out


def magnitude_threshold(x: mx.array, k: int) -> mx.array:
    """The k-th largest |x| as a float32 scalar, exact (k is clamped to [1, x.size])."""
    n = x.size
    if n == 0:
        raise ValueError("magnitude_threshold of an empty tensor")
    _check_size(n)
    k = min(max(int(k), 1), n)
    gpu = _gpu_backend()
    if gpu is not None:
        out = _gpu_call(gpu, "select", lambda: _gpu_select(gpu, [x], None, [k])[0][0].t)
        if out is not None:
            return out.view(mx.float32)
    return _select_cpu(x, None, k).t.view(mx.float32)


def topk_mask(x: mx.array, k: int) -> mx.array:
    """bool mask of the k largest |x|; ties at the threshold go to the lowest flat indices."""
    n = x.size
    k = int(k)
    if k <= 0:
        return mx.zeros(x.shape, dtype=mx.bool_)
    if k >= n:
        return mx.ones(x.shape, dtype=mx.bool_)
    _check_size(n)
    sel = None
    gpu = _gpu_backend()
    if gpu is not None:
        sel = _gpu_call(gpu, "select", lambda: _gpu_select(gpu, [x], None, [k])[0][0])
    if sel is None:
        sel = _select_cpu(x, None, k)
        if _numpy_path(x):
            got = cpu_kernels.Selection(int(sel.t.item()), int(sel.cut.item()))
            mask, view = cpu_kernels.alloc((n,), np.bool_)
            cpu_kernels.keep_mask(cpu_kernels.host(x), got, view)
            return mask.reshape(x.shape)
    bits = _abs_bits(x)
    idx = mx.arange(n, dtype=mx.uint32)
    return _mask_of_selection(bits, idx, sel.t, sel.cut).reshape(x.shape)


@mx.compile
def _mask_of_selection(bits: mx.array, idx: mx.array, t: mx.array, cut: mx.array) -> mx.array:
    return (bits > t) | ((bits == t) & (idx <= cut))


# ----------------------------------------------------------------------------- fused merge


@dataclass
class _ModelPlan:
    """How one task vector is sparsified, as scalars the combine step (or kernel) reads."""

    mode: int  # 0 keep all, 1 keep none, 2 magnitude (t, cut), 3 random (keys, p)
    t: mx.array  # uint32
    cut: mx.array  # uint32
    keys: tuple[int, int]
    p: float
    scale: mx.array  # float32: rescale factor (1 when not rescaling)
    row: int = 0  # GPU: this model's row in the [t, cut] array of the magnitude selections
    mask: Optional[np.ndarray] = None  # CPU: a random model's keep mask, drawn by the L1 pass


_KEEP_ALL, _KEEP_NONE, _MAGNITUDE, _RANDOM = 0, 1, 2, 3
_ONE_F32 = mx.array(1.0, dtype=mx.float32)  # the scale of a model that is not rescaled


def _plan_models(
    base: mx.array,
    others: list[mx.array],
    sparsify: Optional[str],
    densities: list[float],
    rescale: bool,
    seed: int,
    streams: list[int],
    gpu: Optional[str],
) -> tuple[list[_ModelPlan], Optional[mx.array]]:
    """The per-model plans, and on the GPU the (magnitude models, 2) uint32 array of [t, cut]."""
    n = base.size
    zero_u = mx.array(0, dtype=mx.uint32)
    zero_i = mx.array(0, dtype=mx.uint32)
    one_f = _ONE_F32
    plans: list[_ModelPlan] = []
    for i in range(len(others)):
        d = float(densities[i])
        mode = _KEEP_ALL
        if sparsify is not None:
            mode = _KEEP_ALL if d >= 1 else (_KEEP_NONE if d <= 0 and sparsify == "magnitude" else None)
            if mode is None:
                mode = _MAGNITUDE if sparsify == "magnitude" else _RANDOM
        plans.append(_ModelPlan(mode, zero_u, zero_i, _stream_keys(seed, streams[i]), d, one_f))

    mag = [i for i, p in enumerate(plans) if p.mode == _MAGNITUDE]
    sel_rows = None
    if mag:
        ks = [max(1, int(densities[i] * n)) for i in mag]
        sels = None
        if gpu is not None:
            got = _gpu_call(gpu, "select", lambda: _gpu_select(gpu, [others[i] for i in mag], base, ks))
            if got is not None:
                sels, sel_rows = got
        if sels is None:
            sels = _select_cpu_many([others[i] for i in mag], base, ks)
        for r, (i, s) in enumerate(zip(mag, sels)):
            plans[i].t, plans[i].cut, plans[i].row = s.t, s.cut, r

    if rescale:
        todo = [i for i, p in enumerate(plans) if p.mode in (_MAGNITUDE, _RANDOM)]
        if todo:
            sums = None
            if gpu is not None:
                sums = _gpu_call(gpu, "l1", lambda: _gpu_l1(gpu, base, others, plans, todo, sel_rows))
            if sums is None:
                sums = _l1_cpu(base, [others[i] for i in todo], [plans[i] for i in todo])
            for i, (before, after) in zip(todo, sums):
                ok = (before >= 1e-7) & (after >= 1e-7)
                plans[i].scale = mx.where(ok, before / mx.where(ok, after, 1.0), 1.0).astype(mx.float32)
    return plans, sel_rows


@mx.compile
def _delta_bits_c(o: mx.array, b32: mx.array) -> mx.array:
    return mx.abs(o.astype(mx.float32) - b32).view(mx.uint32)


def _delta_bits(o: mx.array, b32: mx.array) -> mx.array:
    return _delta_bits_c(o.reshape(-1), b32.reshape(-1))


@lru_cache(maxsize=None)
def _l1_parts_fn(mode: int):
    """|d| and the kept |d| of one task vector, compiled per sparsification mode."""

    def parts(o, b, idx, t, cut, keys, p):
        a = mx.abs(o.astype(mx.float32) - b.astype(mx.float32))
        if mode == _MAGNITUDE:
            bits = a.view(mx.uint32)
            keep = (bits > t) | ((bits == t) & (idx <= cut))
        else:
            keep = _uniform_of_index(idx, keys) < p
        return a, a * keep.astype(mx.float32)

    return mx.compile(parts)


def _l1_fallback(base: mx.array, other: mx.array, plan: _ModelPlan) -> tuple[mx.array, mx.array]:
    idx = mx.arange(base.size, dtype=mx.uint32)
    keys = mx.array(list(plan.keys), dtype=mx.uint32)
    a, kept = _l1_parts_fn(plan.mode)(other.reshape(-1), base.reshape(-1), idx, plan.t, plan.cut, keys,
                                       mx.array(plan.p, dtype=mx.float32))
    return accurate_sum(a), accurate_sum(kept)


def _host_model(other: mx.array, plan: _ModelPlan, weight: float = 1.0) -> cpu_kernels.Model:
    return cpu_kernels.Model(
        cpu_kernels.host(other), plan.mode, weight, float(plan.scale.item()) if plan.scale is not _ONE_F32 else 1.0,
        int(plan.t.item()), int(plan.cut.item()), plan.keys, plan.p, plan.mask)


def _l1_cpu(base: mx.array, others: list[mx.array], plans: list[_ModelPlan]) -> list[tuple[mx.array, mx.array]]:
    """_l1_fallback's sums from cpu_kernels' loops (the same float32 sums), one pass for all
    models; where numpy's passes run, a random model's mask is kept on its plan, so the merge does
    not draw it again."""
    if base.size <= 1024 or not _numpy_path(base, *others):
        return [_l1_fallback(base, o, p) for o, p in zip(others, plans)]
    models = [_host_model(o, p) for o, p in zip(others, plans)]
    sums = cpu_kernels.l1_block_sums(cpu_kernels.host(base), models, _HASH)
    for m, p in zip(models, plans):
        p.mask = m.mask
    return [(accurate_sum(a), accurate_sum(kept)) for a, kept in sums]


def _merge_cpu(base, others, weights, plans, consensus, normalize, lam, divisor) -> Optional[mx.array]:
    """The fused merge through cpu_kernels' loops, or None where the MLX graph runs (other dtypes)."""
    if not _numpy_path(base, *others):
        return None
    models = [_host_model(o, p, w) for o, p, w in zip(others, plans, weights)]
    bf16 = base.dtype == mx.bfloat16
    res, view = cpu_kernels.alloc((base.size,), np.uint16 if bf16 else np.float32)
    cpu_kernels.task_merge(cpu_kernels.host(base), models, consensus=consensus, normalize=normalize,
                           lam=lam, divisor=divisor, out_bf16=bf16, hasher=_HASH, out=view)
    return (res.view(mx.bfloat16) if bf16 else res).reshape(base.shape)


def accurate_sum(a: mx.array, block: int = 1024) -> mx.array:
    """float32 sum by levels of `block`-element partial sums.

    MLX's CPU sum of millions of float32 values drifts by ~1e-3 relative (4M |N(0, 0.01)| values);
    summing in levels keeps the error near 1e-6, like the GPU's tree reductions.
    """
    a = a.reshape(-1).astype(mx.float32)
    while a.size > block:
        pad = (-a.size) % block
        if pad:
            a = mx.concatenate([a, mx.zeros((pad,), dtype=mx.float32)])
        a = cpu_kernels.block_sums(a, block)
    return a.sum()


@lru_cache(maxsize=None)
def _combine_fn(modes: tuple[int, ...], consensus: bool, normalize: bool):
    """The elementwise tail of the merge for one configuration, compiled once."""

    def combine(b_in, idx, params, *others):
        # params (float32): per model [weight, scale, p]; then [lam, divisor_no_consensus]
        # sel (after the K tensors): per model t (uint32 bits), cut (uint32), k0, k1 (uint32)
        # masks multiply (d * 0 or d * scale) instead of mx.where: the compiled CPU code is 4x faster
        K = len(modes)
        tensors, sel = others[:K], others[K:]
        b = b_in.astype(mx.float32)
        wds, ws = [], []
        for i, mode in enumerate(modes):
            w = params[3 * i]
            d = tensors[i].astype(mx.float32) - b
            if mode == _KEEP_NONE:
                d = mx.zeros_like(d)
            elif mode == _MAGNITUDE:
                t, cut = sel[4 * i], sel[4 * i + 1]
                bits = mx.abs(d).view(mx.uint32)
                keep = (bits > t) | ((bits == t) & (idx <= cut))
                d = d * (keep.astype(mx.float32) * params[3 * i + 1])
            elif mode == _RANDOM:
                keep = _uniform_of_index(idx, mx.stack([sel[4 * i + 2], sel[4 * i + 3]])) < params[3 * i + 2]
                d = d * (keep.astype(mx.float32) * params[3 * i + 1])
            wds.append(d * w)
            ws.append(w)
        lam, div0 = params[3 * K], params[3 * K + 1]
        if consensus:
            total = wds[0]
            for wd in wds[1:]:
                total = total + wd
            majority = (total >= 0).astype(mx.float32) * 2.0 - 1.0
            mixed, divisor = None, None
            for wd, w in zip(wds, ws):
                agree = (wd * majority > 0).astype(mx.float32)  # same sign, non-zero
                term, wterm = wd * agree, w * agree
                mixed = term if mixed is None else mixed + term
                divisor = wterm if divisor is None else divisor + wterm
            divisor = divisor + (divisor == 0).astype(mx.float32)  # 0 -> 1, others unchanged
        else:
            mixed = wds[0]
            for wd in wds[1:]:
                mixed = mixed + wd
            divisor = div0
        if normalize:
            mixed = mixed / divisor
        mixed = mixed * lam
        return (b + mixed).astype(b_in.dtype)

    return mx.compile(combine)


def _plain_divisor(weights: list[float]) -> float:
    # float32 adds in order, on the host (numpy rounds each add as MLX does): no device sync
    s = np.float32(0.0)
    for w in weights:
        s = np.float32(s + np.float32(w))
    v = float(s)
    return 1.0 if abs(v) < 1e-8 else v


def fused_task_merge(
    base: mx.array,
    others: list[mx.array],
    weights: list[float],
    *,
    sparsify: Optional[str],
    densities: list[float],
    rescale: bool,
    consensus: Optional[str],
    normalize: bool,
    lam: float,
    seed: int = 0,
    streams: Optional[list[int]] = None,
) -> mx.array:
    """mergekit's generalized task arithmetic over one tensor, fused, in float32.

    sparsify: None, "magnitude" (exact top-k, ties lowest index first) or "random" (keep_mask
    with streams[i]); consensus: None or "sum". Returns an array of base's dtype and shape.
    """
    K = len(others)
    if sparsify not in (None, "magnitude", "random"):
        raise ValueError(f"sparsify must be None, 'magnitude' or 'random', not {sparsify!r}")
    if consensus not in (None, "sum"):
        raise ValueError(f"consensus must be None or 'sum', not {consensus!r}")
    if len(weights) != K or len(densities) != K:
        raise ValueError(f"{K} task models need {K} weights and {K} densities")
    if K == 0 or base.size == 0:
        return base
    for o in others:
        if o.shape != base.shape:
            raise ValueError(f"task model shape {o.shape} differs from the base's {base.shape}")
    _check_size(base.size)
    if streams is None:
        streams = [stream_id(i) for i in range(K)]
    gpu = _gpu_backend()
    if sparsify is None:  # nothing to select or draw: the compiled graph is as fast as a kernel
        gpu = None
    weights = [float(w) for w in weights]
    divisor = _plain_divisor(weights)
    if gpu is not None and sparsify == "magnitude" and not rescale:
        plans, _ = _plan_models(base, others, None, densities, False, seed, streams, None)
        mag = [i for i, d in enumerate(densities) if 0 < float(d) < 1]
        for i in range(K):
            d = float(densities[i])
            plans[i].mode = _MAGNITUDE if i in mag else (_KEEP_ALL if d >= 1 else _KEEP_NONE)
        ks = [max(1, int(float(densities[i]) * base.size)) for i in mag]
        if not mag or _gpu_call(gpu, "select", lambda: True):
            out = _gpu_call(gpu, "merge", lambda: _gpu_ties(gpu, base, others, weights, plans, mag, ks,
                                                                 consensus is not None, normalize, lam, divisor)
                            if mag else _gpu_merge(gpu, base, others, weights, plans, consensus is not None,
                                                   normalize, lam, divisor))
            if out is not None:
                return out
    plans, sel_rows = _plan_models(base, others, sparsify, densities, rescale, seed, streams, gpu)
    if gpu is not None:
        out = _gpu_call(
            gpu, "merge",
            lambda: _gpu_merge(gpu, base, others, weights, plans, consensus is not None,
                               normalize, lam, divisor, sel_rows),
        )
        if out is not None:
            return out
    if sparsify is not None:
        out = _merge_cpu(base, others, weights, plans, consensus is not None, bool(normalize), lam, divisor)
        if out is not None:
            return out
    params = []
    sel = []
    for w, p in zip(weights, plans):
        params += [mx.array(w, dtype=mx.float32), p.scale.astype(mx.float32), mx.array(p.p, dtype=mx.float32)]
        sel += [p.t, p.cut, _u32(p.keys[0]), _u32(p.keys[1])]
    params += [mx.array(lam, dtype=mx.float32), mx.array(divisor, dtype=mx.float32)]
    fn = _combine_fn(tuple(p.mode for p in plans), consensus is not None, bool(normalize))
    idx = mx.arange(base.size, dtype=mx.uint32)
    flat = fn(base.reshape(-1), idx, mx.stack(params), *[o.reshape(-1) for o in others], *sel)
    return flat.reshape(base.shape)


# ----------------------------------------------------------------------------- GPU dispatch

_TG = 256  # threads per threadgroup for the reduction kernels
_MAX_GROUPS = 1024  # grid of the grid-stride kernels (fixed: partial sums stay reproducible)
_MAX_KM = 3  # tensors per selection launch (their histograms share threadgroup memory)
_DIGITS = ((20, 11), (9, 11), (0, 9))  # (shift, bits): bits 30..20, 19..9, 8..0 of |x| (bit 31 is 0)
_SUM_ROWS = 16  # rows of select_pass's counts a thread of select_sum adds up
_SAMPLE = 4096  # sampled elements per tensor: one threadgroup of MLX's sort, and 2**12 strata
_SPLITTERS = 256  # splitters per tensor in the selection pass (a power of two)
_SIGMAS = 5.0  # bracket half-width in binomial standard deviations of the sampled rank
_MERGE_GROUPS = 8  # groups of eight elements per thread in the merge kernel (spreads its set-up)
_OK, _BETWEEN, _OUTSIDE = 1, 2, 3  # select_resolve's statuses
_SELECT_OVERRIDE: Optional[str] = None  # tests: force every selection down the 'between'/'outside' path
_checked: dict[str, bool] = {}


def backend() -> str:
    """Which path runs now: 'metal', 'cuda' or 'cpu' (the compiled fallback)."""
    return _gpu_backend() or "cpu"


def _gpu_backend() -> Optional[str]:
    """'metal', 'cuda' or None (CPU, or kernels off)."""
    if not kernels_enabled() or mx.default_device() != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return None


@lru_cache(maxsize=None)
def _kernel(name: str, backend_name: str, km: int = 0, has_base: bool = False, atomic: bool = False,
            inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = ("out",)):
    header, body = kernel_source(name, backend_name)
    names = (["base"] if has_base else []) + [f"x{m}" for m in range(km)] + list(inputs)
    if km:
        body = model_macros(km, has_base) + body
    tag = f"mk_{name}_{km}{'b' if has_base else ''}"
    if backend_name == "metal":
        return mx.fast.metal_kernel(name=tag, input_names=names, output_names=list(outputs), source=body,
                                    header=header, atomic_outputs=atomic)
    mlx_jit = mx.fast.cuda_kernel(name=tag, input_names=names, output_names=list(outputs), source=body,
                                  header=header)
    if os.environ.get(_ENV_MLX_JIT):
        return mlx_jit
    return cuda_jit.CachedKernel(tag, names, outputs, header, body, fallback=mlx_jit)


def _gpu_call(gpu: str, what: str, fn):
    """fn() when the `what` kernels passed their first-use check on this GPU, else None (fallback)."""
    remember = gpu == "cuda" and _cached_verdicts()
    if what not in _checked and remember and cuda_jit.verified(what):
        _checked[what] = True  # passed on this machine with these very kernels: not run again
    if what not in _checked:
        try:
            _checked[what] = bool(_SELF_CHECKS[what](gpu))
            if _checked[what] and remember:
                cuda_jit.mark_verified(what)
            if not _checked[what]:
                _warn_once(what, f"mergekit-mlx: the {gpu} '{what}' kernel disagrees with the CPU fallback; using the fallback")
        except Exception as e:  # a compile error or a launch failure
            _checked[what] = False
            _warn_once(what, f"mergekit-mlx: the {gpu} '{what}' kernel failed ({type(e).__name__}: {e}); using the fallback")
    if not _checked[what]:
        return None
    try:
        return fn()
    except Exception as e:
        _checked[what] = False
        _warn_once(what + "!", f"mergekit-mlx: the {gpu} '{what}' kernel failed ({type(e).__name__}: {e}); using the fallback")
        return None


def first_use_checks(groups: Sequence[str]) -> None:
    """Run the first-use checks of these GPU kernel groups now (no-op on the CPU or when done).
    Call it while no other thread uses MLX: a check computes its CPU reference under
    `mx.stream(mx.cpu)`, and MLX's default device is one for the whole process."""
    gpu = _gpu_backend()
    if gpu is not None:
        for what in groups:
            _gpu_call(gpu, what, lambda: None)


def _cached_verdicts() -> bool:
    """CUDA keeps first-use verdicts on disk unless MERGEKIT_MLX_RECHECK is set (or MLX's JIT is used)."""
    return not os.environ.get("MERGEKIT_MLX_RECHECK") and not os.environ.get(_ENV_MLX_JIT)


def kernel_status() -> dict[str, bool]:
    """Which GPU kernels passed their first-use check in this process (empty on the CPU)."""
    return dict(_checked)


def _stride_grid(n: int, per_thread: int = 4) -> int:
    """Threads for a grid-stride elementwise kernel: about `per_thread` elements each."""
    return max(_TG, -(-n // (per_thread * _TG)) * _TG)


def _groups(n: int) -> int:
    return max(1, min(_MAX_GROUPS, -(-n // _TG)))


def _common_dtype(arrays: list[mx.array]) -> list[mx.array]:
    dt = arrays[0].dtype
    if all(a.dtype == dt for a in arrays):
        return arrays
    return [a.astype(mx.float32) for a in arrays]


@lru_cache(maxsize=512)
def _const_u32(words: tuple[int, ...]) -> mx.array:
    """A uint32 parameter array, kept: after its first use it stays in GPU memory, so repeated
    calls with the same parameters (every tensor of a shape in a TIES merge) move nothing."""
    return mx.array(np.array(words, dtype=np.uint32))


@lru_cache(maxsize=64)
def _ones_f32(k: int) -> mx.array:
    # made from host data, not mx.ones: a cached lazy array is tied to the thread that made it,
    # and another merge thread evaluating it fails ("no Stream in current thread")
    return mx.array(np.ones((k,), dtype=np.float32))


def _f32_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", float(v)))[0]


def _gpu_uniform(gpu: str, seed: int, stream: int, n: int) -> mx.array:
    k0, k1 = _stream_keys(seed, stream)
    up = mx.array([n, k0, k1], dtype=mx.uint32)
    kern = _kernel("random_uniform", gpu, inputs=("up",))
    return kern(inputs=[up], grid=(_stride_grid(n), 1, 1), threadgroup=(_TG, 1, 1), output_shapes=[(n,)],
                output_dtypes=[mx.float32])[0]


# --- exact magnitude selection: sample, one counting pass, resolve (kernels/select_*.inc)


def _bracket(n: int, k: int, s: int) -> tuple[int, int, int]:
    """Ascending sample positions (p_lo, p_hi) around the k-th largest of n, and open-side flags
    (1: no lower bound, 2: no upper bound): the k-th lies between them unless the sampled rank is
    off by more than _SIGMAS binomial standard deviations (then the exact fallback runs)."""
    q = k / n
    centre = (n - k) * s / n
    half = _SIGMAS * math.sqrt(s * q * (1.0 - q)) + 3.0
    lo, hi, flags = math.floor(centre - half), math.ceil(centre + half), 0
    if lo <= 0:
        lo, flags = 0, flags | 1
    if hi >= s - 1:
        hi, flags = s - 1, flags | 2
    return lo, hi, flags


def _padded(count: int) -> int:
    """Room for `count` uint32 results, at least 16 bytes: MLX serves 8 bytes or less from a
    small host-mapped pool, which kernels should not write into."""
    return max(int(count), 4)


def _select_chunk(n: int) -> int:
    """Elements per threadgroup of the selection pass: a multiple of 2048, at most 2048 chunks."""
    return 2048 * max(1, -(-n // (2048 * 2048)))


def _select_params(n: int, ks: list[int], override: Optional[str] = None) -> tuple[int, int, mx.array]:
    """(sample size, chunks, up) of the selection kernels. override 'outside' / 'between' forces
    those outcomes (to check the paths that follow): every splitter the sample's minimum, and the
    top one open for 'between'."""
    s = min(_SAMPLE, n)
    ch = _select_chunk(n)
    chunks = -(-n // ch)
    words = [n, s, ch, chunks]
    for k in ks:
        if override is None:
            lo, hi, flags = _bracket(n, k, s)
        else:
            lo, hi, flags = 0, 0, (2 if override == "between" else 0)
        words += [lo, hi, flags, k]
    return s, chunks, _const_u32(tuple(words))


def _select_sample(gpu: str, flats: list[mx.array], has_base: bool, s: int, up: mx.array) -> mx.array:
    """Stage 1: the sorted sample, (km * s,) uint32, each tensor's row ascending."""
    km = len(flats) - int(has_base)
    smp = _kernel("select_sample", gpu, km, has_base, inputs=("up",), outputs=("smp",))(
        inputs=flats + [up], template=[("KM", km)], grid=(-(-s // 32) * 32, 1, 1),
        threadgroup=(32, 1, 1),  # threadgroups of one simdgroup: the scattered loads on many cores at once
        output_shapes=[(_padded(km * s),)], output_dtypes=[mx.uint32])[0]
    return mx.sort(smp[:km * s].reshape(km, s), axis=-1).reshape(-1)


def _select_count(gpu: str, flats: list[mx.array], has_base: bool, chunks: int, srt: mx.array, up: mx.array):
    """Stage 2, the pass over the data: tab (chunks * km * (2G + 1)) and its sum over the chunks."""
    km = len(flats) - int(has_base)
    w = km * (2 * _SPLITTERS + 1)
    tab = _kernel("select_pass", gpu, km, has_base, inputs=("srt", "up"), outputs=("tab",))(
        inputs=flats + [srt, up], template=[("KM", km), ("G", _SPLITTERS), ("TG", _TG)], grid=(chunks * _TG, 1, 1),
        threadgroup=(_TG, 1, 1), output_shapes=[(chunks * w,)], output_dtypes=[mx.uint32])[0]
    return tab, _select_totals(gpu, tab, chunks, w)


def _select_totals(gpu: str, tab: mx.array, rows: int, w: int) -> mx.array:
    """Stage 2b: the (rows, w) table of counts summed over its rows, (w,) uint32."""
    return _kernel("select_sum", gpu, inputs=("tab", "up"), outputs=("tot",), atomic=True)(
        inputs=[tab, _const_u32((rows, w))], template=[("R", _SUM_ROWS)],
        grid=(-(-rows // _SUM_ROWS) * -(-w // _TG) * _TG, 1, 1), threadgroup=(_TG, 1, 1), output_shapes=[(w,)],
        output_dtypes=[mx.uint32], init_value=0)[0]


def _select_resolve(gpu: str, flats: list[mx.array], has_base: bool, srt: mx.array, up: mx.array, counts):
    """Stage 3: (res (km*8), tc (km*2)), see kernels/select_resolve.inc."""
    km = len(flats) - int(has_base)
    return _kernel("select_resolve", gpu, km, has_base, inputs=("srt", "up", "tab", "tot"),
                   outputs=("res", "tc"))(
        inputs=flats + [srt, up, *counts], template=[("KM", km), ("G", _SPLITTERS), ("TG", _TG)],
        grid=(km * _TG, 1, 1), threadgroup=(_TG, 1, 1), output_shapes=[(km * 8,), (_padded(km * 2),)],
        output_dtypes=[mx.uint32] * 2)


def _select_launch(gpu: str, flats: list[mx.array], has_base: bool, ks: list[int],
                   override: Optional[str] = None) -> tuple[mx.array, mx.array, mx.array]:
    """Sample, sort the sample, count, resolve: (res (km*8), tc (km*2), tab), all lazy."""
    s, chunks, up = _select_params(flats[0].size, ks, override)
    srt = _select_sample(gpu, flats, has_base, s, up)
    counts = _select_count(gpu, flats, has_base, chunks, srt, up)
    return (*_select_resolve(gpu, flats, has_base, srt, up, counts), counts[0])


def _select_between(gpu: str, flats: list[mx.array], has_base: bool, todo: list[tuple[int, list[int]]],
                    n: int, tab: mx.array) -> dict[int, _Selection]:
    """For tensors whose k-th value lies strictly between two splitters: collect the elements in
    that bit range (one pass; each chunk writes where the pass's counts place it), then the exact
    pick among them."""
    base_l = flats[:1] if has_base else []
    xs = flats[int(has_base):]
    ch = _select_chunk(n)
    chunks = -(-n // ch)
    w = 2 * _SPLITTERS + 1
    words, offset = [n, ch, len(xs) * w, 0], 0
    for m, r in todo:
        words += [r[3], r[4], offset, m * w + r[7]]
        offset += r[5]
    km = len(todo)
    kb, ki = _kernel("select_collect", gpu, km, has_base, inputs=("up", "tab"), outputs=("kb", "ki"))(
        inputs=base_l + [xs[m] for m, _ in todo] + [_const_u32(tuple(words)), tab],
        template=[("KM", km)], grid=(chunks * _TG, 1, 1), threadgroup=(_TG, 1, 1),
        output_shapes=[(_padded(offset),)] * 2, output_dtypes=[mx.uint32] * 2)
    out, offset = {}, 0
    for m, r in todo:
        cnt, rank = r[5], r[6]
        b, i = kb[offset:offset + cnt], ki[offset:offset + cnt]
        offset += cnt
        t = mx.sort(b)[cnt - rank]  # the rank-th largest in the range
        need = rank - (b > t).astype(mx.int32).sum()  # ties at t to keep
        eq = b == t
        ties = eq.astype(mx.int32).sum()
        order = mx.sort(mx.where(eq, i, mx.array(_MASK32, dtype=mx.uint32)))
        cut = mx.where(need == ties, mx.array(n - 1, dtype=mx.uint32), mx.take(order, need - 1))
        out[m] = _Selection(t, cut.astype(mx.uint32))
    return out


def _gpu_select_start(gpu: str, xs: list[mx.array], base: Optional[mx.array], ks: list[int],
                      override: Optional[str] = None) -> list[tuple]:
    """Launch the selection's first three stages (lazy): per launch of up to three tensors,
    (flats, res, tc, tab)."""
    override = override if override is not None else _SELECT_OVERRIDE
    groups = []
    for g in range(0, len(xs), _MAX_KM):
        flats = [a.reshape(-1) for a in _common_dtype(([base] if base is not None else []) + list(xs[g:g + _MAX_KM]))]
        groups.append((flats, *_select_launch(gpu, flats, base is not None, ks[g:g + _MAX_KM], override)))
    return groups


def _gpu_select_finish(gpu: str, xs: list[mx.array], base: Optional[mx.array], ks: list[int],
                       groups: list[tuple]) -> tuple[list[_Selection], mx.array]:
    """Read the statuses (a host sync unless already evaluated) and finish the tensors whose k-th
    value the counting pass did not settle."""
    n = xs[0].size
    mx.eval(*[res for _, res, _, _ in groups])
    sels: list[_Selection] = []
    all_ok = True
    for g, (flats, res, tc, tab) in enumerate(groups):
        info = res.tolist()
        km = len(flats) - int(base is not None)
        rows = [info[8 * m: 8 * m + 8] for m in range(km)]
        between = [(m, r) for m, r in enumerate(rows) if r[0] == _BETWEEN]
        outside = [m for m, r in enumerate(rows) if r[0] not in (_OK, _BETWEEN)]
        done = _select_between(gpu, flats, base is not None, between, n, tab) if between else {}
        if outside:  # the sample missed: the three-pass radix select for these tensors
            redo = _gpu_select_radix(gpu, [xs[g * _MAX_KM + m] for m in outside], base,
                                     [ks[g * _MAX_KM + m] for m in outside])
            done.update(zip(outside, redo))
        all_ok &= not done
        for m in range(km):
            sels.append(done[m] if m in done else _Selection(tc[2 * m], tc[2 * m + 1]))
    if all_ok:
        rows = (mx.concatenate([tc[:2 * (len(f) - int(base is not None))] for f, _, tc, _ in groups])
                if len(groups) > 1 else groups[0][2])
    else:
        rows = mx.stack([mx.stack([s.t.astype(mx.uint32), s.cut.astype(mx.uint32)]) for s in sels]).reshape(-1)
    return sels, rows


def _gpu_select(gpu: str, xs: list[mx.array], base: Optional[mx.array], ks: list[int],
                override: Optional[str] = None) -> tuple[list[_Selection], mx.array]:
    """Exact top-k of |x_m - base| for each m: the selections, and their [t, cut] rows as one
    (len(xs), 2) uint32 array. One read of the inputs and one host sync in the common case."""
    return _gpu_select_finish(gpu, xs, base, ks, _gpu_select_start(gpu, xs, base, ks, override))


def _gpu_ties(gpu, base, others, weights, plans, mag, ks, consensus, normalize, lam, divisor):
    """Magnitude-sparsified merge without rescaling, with one host sync: the merge is launched
    right behind the selection, gated on the device by its statuses, and evaluated together with
    them; only when a selection was not final (rare with bf16 ties, the rule for float32 data) is
    it finished and the merge run again. Under deferred_gate_checks, no sync: the gate goes to
    the caller, who checks it after evaluating."""
    args = (gpu, base, others, weights, plans, mag, ks, consensus, normalize, lam, divisor)
    out, gate, groups = _gpu_ties_start(*args)
    pending = getattr(_deferred, "gates", None)
    if pending is not None:
        pending.append(gate)
        return out
    mx.eval(out, gate)
    return _gpu_ties_finish(*args, out, gate.tolist(), groups)


_deferred = threading.local()


@contextmanager
def deferred_gate_checks():
    """Within it (in this thread), a GPU TIES merge returns its output without reading back
    whether its selections were final, and appends the gate it depends on to the yielded list:
    the caller evaluates the gates with the outputs (one sync for many merges) and, where
    `gates_final` says no, merges that tensor again outside this context. The output of a merge
    whose gate is not final is not its result."""
    previous = getattr(_deferred, "gates", None)
    _deferred.gates = []
    try:
        yield _deferred.gates
    finally:
        _deferred.gates = previous


def gates_final(gates: list[mx.array]) -> bool:
    """True when every deferred gate (evaluated) says its selections were final."""
    return all(_final(g.tolist()) for g in gates)


def _final(gate_words: list[int]) -> bool:
    """A gate read back: every selection's status (the first of its 8 words) is final."""
    return all(v == _OK for v in gate_words[::8])


def _gpu_ties_start(gpu, base, others, weights, plans, mag, ks, consensus, normalize, lam, divisor):
    """The whole gated TIES merge launched, nothing evaluated: (out, gate, groups). Several of
    these can be evaluated together, their gates read back at once, then finished one by one."""
    groups = _gpu_select_start(gpu, [others[i] for i in mag], base, ks)
    tcs = [tc[:2 * (len(f) - int(base is not None))] for f, _, tc, _ in groups]
    gates = [res for _, res, _, _ in groups]
    for r, i in enumerate(mag):
        plans[i].row = r
    sel_rows = mx.concatenate(tcs) if len(tcs) > 1 else groups[0][2]  # one launch: its tc as it is
    gate = mx.concatenate(gates) if len(gates) > 1 else gates[0]
    out = _gpu_merge(gpu, base, others, weights, plans, consensus, normalize, lam, divisor, sel_rows, gate)
    return out, gate, groups


def _gpu_ties_finish(gpu, base, others, weights, plans, mag, ks, consensus, normalize, lam, divisor,
                     out, gate_words, groups):
    """`out` when every selection was final (gate_words: the gate read back), else the merge again
    on the finished selections."""
    if _final(gate_words):
        return out
    sels, sel_rows = _gpu_select_finish(gpu, [others[i] for i in mag], base, ks, groups)
    for i, s in zip(mag, sels):
        plans[i].t, plans[i].cut = s.t, s.cut
    return _gpu_merge(gpu, base, others, weights, plans, consensus, normalize, lam, divisor, sel_rows)


def _gpu_select_radix(gpu: str, xs: list[mx.array], base: Optional[mx.array], ks: list[int]) -> list[_Selection]:
    """Exact top-k of |x_m - base| for each m: three histogram passes over the float bits (the
    fallback when the sample's bracket misses the k-th value)."""
    out: list[_Selection] = []
    n = xs[0].size
    for g in range(0, len(xs), _MAX_KM):
        group = xs[g:g + _MAX_KM]
        km = len(group)
        arrays = _common_dtype(([base] if base is not None else []) + list(group))
        flats = [a.reshape(-1) for a in arrays]
        kern = _kernel("radix_hist", gpu, km, base is not None, atomic=True, inputs=("up",), outputs=("hist",))
        prefix = mx.zeros((km,), dtype=mx.uint32)
        krem = mx.array(ks[g:g + _MAX_KM], dtype=mx.int32)
        n_eq = None
        for shift, bits in _DIGITS:
            nb = 1 << bits
            up = mx.concatenate([mx.array([n], dtype=mx.uint32), prefix])
            hist = kern(inputs=flats + [up], template=[("KM", km), ("SHIFT", shift), ("BITS", bits)],
                        grid=(_groups(n) * _TG, 1, 1), threadgroup=(_TG, 1, 1),
                        output_shapes=[(km * nb,)], output_dtypes=[mx.uint32], init_value=0)[0]
            hist = hist.reshape(km, nb).astype(mx.int32)
            ge = mx.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # elements at or above each bin
            digit = (ge >= krem[:, None]).astype(mx.int32).sum(axis=1) - 1
            ge_d = mx.take_along_axis(ge, digit[:, None], axis=1)[:, 0]
            n_eq = mx.take_along_axis(hist, digit[:, None], axis=1)[:, 0]
            krem = krem - (ge_d - n_eq)
            prefix = (prefix << bits) | digit.astype(mx.uint32)
        # krem is now the number of ties at t to keep; n_eq the number of ties
        mx.eval(prefix, krem, n_eq)
        need, ties = krem.tolist(), n_eq.tolist()
        cuts = [mx.array(n - 1, dtype=mx.uint32)] * km
        split = [m for m in range(km) if need[m] != ties[m]]
        if split:  # some ties are dropped: keep the lowest flat indices
            cuts = _gpu_tie_cuts(gpu, flats, base is not None, prefix, krem, cuts, split)
        out += [_Selection(prefix[m], cuts[m]) for m in range(km)]
    return out


_CHUNK = 4096  # elements per threadgroup when counting ties


def _gpu_tie_cuts(gpu, flats, has_base, t, need, cuts, split):
    """Flat index of the need[m]-th tie at t[m]: per-chunk tie counts, then a scan of one chunk."""
    n = flats[0].size
    km = len(flats) - int(has_base)
    chunks = -(-n // _CHUNK)
    kern = _kernel("tie_count", gpu, km, has_base, inputs=("up",), outputs=("counts",))
    up = mx.concatenate([mx.array([n], dtype=mx.uint32), t])
    counts = kern(inputs=flats + [up], template=[("KM", km), ("CHUNK", _CHUNK)],
                  grid=(chunks * _TG, 1, 1), threadgroup=(_TG, 1, 1),
                  output_shapes=[(km * chunks,)], output_dtypes=[mx.uint32])[0]
    cum = mx.cumsum(counts.reshape(km, chunks).astype(mx.int32), axis=1)
    b32 = flats[0].astype(mx.float32) if has_base else None
    cuts = list(cuts)
    for m in split:
        r = need[m]
        j = (cum[m] < r).astype(mx.int32).sum()  # the chunk holding the r-th tie
        before = mx.where(j > 0, mx.take(cum[m], mx.maximum(j - 1, 0)), 0)
        idx = j * _CHUNK + mx.arange(_CHUNK, dtype=mx.int32)
        safe = mx.minimum(idx, n - 1)
        x = mx.take(flats[m + int(has_base)], safe).astype(mx.float32)
        a = mx.abs(x - mx.take(b32, safe)) if has_base else mx.abs(x)
        eq = ((a.view(mx.uint32) == t[m]) & (idx < n)).astype(mx.int32)
        pos = (mx.cumsum(eq) < r - before).astype(mx.int32).sum()
        cuts[m] = (j * _CHUNK + pos).astype(mx.uint32)
    return cuts


# --- the merge and its L1 sums (kernels/task_merge.inc, l1_sums.inc)


def _task_inputs(base, others, weights, plans, lam, divisor, sel_rows, gate=None):
    """(flat inputs, up, sel, scl, gate) in the layout of kernels/task_params.inc."""
    n = base.size
    rows = [p.row for p in plans]
    if sel_rows is None:  # built from the plans' scalars (the first-use checks, CPU-made plans)
        mag = [i for i, p in enumerate(plans) if p.mode == _MAGNITUDE]
        for r, i in enumerate(mag):
            rows[i] = r
        sel_rows = (mx.stack([mx.stack([plans[i].t.astype(mx.uint32), plans[i].cut.astype(mx.uint32)])
                              for i in mag]).reshape(-1) if mag else _const_u32((0, 0)))
    words = [n, _f32_bits(lam), _f32_bits(divisor), 0]
    for w, p, r in zip(weights, plans, rows):
        words += [p.mode, r if p.mode == _MAGNITUDE else 0, p.keys[0], p.keys[1], _f32_bits(w), _f32_bits(p.p), 0, 0]
    if any(p.scale is not _ONE_F32 for p in plans):
        scl = mx.stack([p.scale.astype(mx.float32).reshape(()) for p in plans])
    else:
        scl = _ones_f32(len(plans))
    flats = [a.reshape(-1) for a in _common_dtype([base] + list(others))]
    if gate is None:  # selections known final: every row's status 1
        gate = _const_u32((_OK, 0, 0, 0, 0, 0, 0, 0) * max(1, len(rows)))
    return flats, _const_u32(tuple(words)), sel_rows, scl, gate


def _gpu_l1(gpu, base, others, plans, todo, sel_rows=None):
    """(sum |d|, sum of kept |d|) per model in `todo`, from fixed-grid partial sums."""
    n = base.size
    sums = []
    for g in range(0, len(todo), _MAX_KM):
        idx = todo[g:g + _MAX_KM]
        km = len(idx)
        flats, up, sel, scl, gate = _task_inputs(base, [others[i] for i in idx], [1.0] * km,
                                                 [plans[i] for i in idx], 1.0, 1.0, sel_rows)
        kern = _kernel("l1_sums", gpu, km, True, inputs=("up", "sel", "scl", "gate"), outputs=("part",))
        groups = _groups(-(-n // 8))
        part = kern(inputs=flats + [up, sel, scl, gate], template=[("KM", km), ("TG", _TG)],
                    grid=(groups * _TG, 1, 1), threadgroup=(_TG, 1, 1),
                    output_shapes=[(groups * km * 2,)], output_dtypes=[mx.float32])[0]
        tot = part.reshape(groups, km, 2).sum(axis=0)
        sums += [(tot[m, 0], tot[m, 1]) for m in range(km)]
    return sums


def _sparse_kind(plans: list[_ModelPlan]) -> int:
    """The merge kernel's SPARSE: 2 or 3 when every sparsified model is magnitude (or random),
    so the kernel holds only that test; 0 when both occur."""
    modes = {p.mode for p in plans}
    if _RANDOM not in modes:
        return _MAGNITUDE
    return _RANDOM if _MAGNITUDE not in modes else 0


def _gpu_merge(gpu, base, others, weights, plans, consensus, normalize, lam, divisor, sel_rows=None, gate=None):
    n = base.size
    km = len(others)
    flats, up, sel, scl, gate = _task_inputs(base, others, weights, plans, lam, divisor, sel_rows, gate)
    kern = _kernel("task_merge", gpu, km, True, inputs=("up", "sel", "scl", "gate"))
    sparse = _sparse_kind(plans)
    out = kern(inputs=flats + [up, sel, scl, gate],
               template=[("T", base.dtype), ("KM", km), ("CONSENSUS", bool(consensus)),
                         ("NORMALIZE", bool(normalize)), ("SPARSE", sparse),
                         ("UNIFORM", sparse != 0 and all(p.mode == sparse for p in plans))],
               grid=(_stride_grid(-(-n // 8), _MERGE_GROUPS), 1, 1), threadgroup=(_TG, 1, 1),
               output_shapes=[(n,)], output_dtypes=[base.dtype])[0]
    return out.reshape(base.shape)


# ----------------------------------------------------------------------------- first-use checks


def _check_inputs(dtype=mx.bfloat16, k=3, n=12289, seed=0):
    """A small family with ties: bf16 task vectors and one model equal to the base in places."""
    key = mx.random.key(seed)
    k1, k2 = mx.random.split(key)
    base = mx.random.normal((n,), key=k1).astype(dtype)
    noise = mx.random.normal((k, n), key=k2) * 0.01
    others = [(base.astype(mx.float32) + noise[i]).astype(dtype) for i in range(k)]
    others[-1] = mx.where(mx.arange(n) % 3 == 0, base, others[-1])
    mx.eval(base, *others)
    return base, others


def _check_uniform(gpu: str) -> bool:
    n = 5003
    got = _gpu_uniform(gpu, 12345, 678, n)
    with mx.stream(mx.cpu):
        ref = _uniform_compiled(mx.arange(n, dtype=mx.uint32), _keys_array(12345, 678))
        return bool(mx.array_equal(got, ref).item())


def _check_select(gpu: str) -> bool:
    """Every path of the selection against the CPU: the sampled bracket (ties split at t), the
    k-th strictly between two splitters (the collecting pass), and a missed bracket (radix)."""
    base, others = _check_inputs()
    n = base.size
    ks = [1, n // 3, n - 5]
    x32 = others[0].astype(mx.float32) * 3.0
    got, want = [], []
    for override in (None, "between", "outside"):
        sels, rows = _gpu_select(gpu, others, base, ks, override)
        got += [(s.t, s.cut) for s in sels] + [(rows[2 * m], rows[2 * m + 1]) for m in range(len(ks))]
        sels, rows = _gpu_select(gpu, [x32], None, [n // 2], override)
        got += [(sels[0].t, sels[0].cut), (rows[0], rows[1])]
    with mx.stream(mx.cpu):
        b32 = base.astype(mx.float32)
        ref = [_select_fallback(_delta_bits(o, b32), k) for o, k in zip(others, ks)]
        ref32 = _select_fallback(_abs_bits(x32), n // 2)
        for _ in range(3):
            want += [(r.t, r.cut) for r in ref] * 2 + [(ref32.t, ref32.cut)] * 2
        return all(int(g[0].item()) == int(w[0].item()) and int(g[1].item()) == int(w[1].item())
                   for g, w in zip(got, want))


def _check_l1(gpu: str) -> bool:
    base, others = _check_inputs(mx.float32)
    ok = True
    for sp in ("random", "magnitude"):
        with mx.stream(mx.cpu):
            plans, _ = _plan_models(base, others, sp, [0.3, 0.5, 0.7], False, 9, [1, 2, 3], None)
            ref = [_l1_fallback(base, others[i], plans[i]) for i in range(3)]
            mx.eval(ref)
        got = _gpu_l1(gpu, base, others, plans, [0, 1, 2])
        for (gb, ga), (rb, ra) in zip(got, ref):
            ok &= abs(gb.item() - rb.item()) <= 1e-5 * abs(rb.item()) and abs(ga.item() - ra.item()) <= 1e-5 * abs(ra.item())
    return ok


def _check_merge(gpu: str) -> bool:
    ok = True
    for dtype in (mx.float32, mx.bfloat16):
        base, others = _check_inputs(dtype)
        for sp, cons, norm in (("magnitude", True, True), ("random", True, False), (None, False, False)):
            with mx.stream(mx.cpu):
                plans, _ = _plan_models(base, others, sp, [0.3, 1.0, 0.6], False, 4, [7, 8, 9], None)
                ws = [1.0, -0.5, 0.7]
                div = _plain_divisor(ws)
                params, sel = [], []
                for w, p in zip(ws, plans):
                    params += [mx.array(w, dtype=mx.float32), p.scale, mx.array(p.p, dtype=mx.float32)]
                    sel += [p.t, p.cut, _u32(p.keys[0]), _u32(p.keys[1])]
                params += [mx.array(0.9, dtype=mx.float32), mx.array(div, dtype=mx.float32)]
                fn = _combine_fn(tuple(p.mode for p in plans), cons, norm)
                ref = fn(base, mx.arange(base.size, dtype=mx.uint32), mx.stack(params), *others, *sel)
                mx.eval(ref)
            got = _gpu_merge(gpu, base, others, ws, plans, cons, norm, 0.9, div)
            if dtype == mx.float32:
                ok &= bool(mx.allclose(got, ref, rtol=1e-6, atol=1e-7).item())
            else:  # one bf16 rounding apart at most
                g32, r32 = got.astype(mx.float32), ref.astype(mx.float32)
                ok &= bool((mx.abs(g32 - r32) <= mx.abs(r32) * 2.0**-7).all().item())
    return ok


_SELF_CHECKS = {"uniform": _check_uniform, "select": _check_select, "l1": _check_l1, "merge": _check_merge}
