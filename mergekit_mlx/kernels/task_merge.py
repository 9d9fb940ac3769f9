"""The fused task merge: mergekit 0.1.5's generalized task arithmetic over one tensor.

Computed in float32 and rounded once to the base's dtype. Each task vector is sparsified
(`Sparsify`: exact magnitude top-k, or a random mask from the counter-based generator), optionally
rescaled to keep its L1 norm, weighted; with `Consensus.SUM` only the deltas that agree with the
weighted sum's sign are kept. On a GPU the kernels of `task_merge_gpu`; on the CPU the loops of
`task_merge_cpu`; elsewhere the compiled MLX graph here (the reference the others equal).
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
import numpy as np

from . import gpu, host, selection, selection_gpu, task_merge_cpu, task_merge_gpu
from .random import HASH, stream_id, stream_keys, u32, uniform_of_index
from .sums import accurate_sum
from .task_plan import ONE_F32, Consensus, Keep, ModelPlan, Sparsify, TaskMerge, plain_divisor


def plan_models(
    base: mx.array,
    others: list[mx.array],
    sparsify: Sparsify | None,
    densities: list[float],
    rescale: bool,
    seed: int,
    streams: list[int],
    backend: str | None,
) -> tuple[list[ModelPlan], mx.array | None]:
    """The per-model plans, and on the GPU the (magnitude models, 2) uint32 array of [t, cut]."""
    n = base.size
    zero_u = mx.array(0, dtype=mx.uint32)
    zero_i = mx.array(0, dtype=mx.uint32)
    one_f = ONE_F32
    plans: list[ModelPlan] = []
    for i in range(len(others)):
        d = float(densities[i])
        plans.append(ModelPlan(keep_mode(sparsify, d), zero_u, zero_i, stream_keys(seed, streams[i]), d, one_f))

    mag = [i for i, p in enumerate(plans) if p.mode == Keep.MAGNITUDE]
    sel_rows = None
    if mag:
        ks = [max(1, int(densities[i] * n)) for i in mag]
        sels = None
        if backend is not None:
            got = selection.GPU.call(backend, lambda: selection_gpu.select(backend, [others[i] for i in mag], base, ks))
            if got is not None:
                sels, sel_rows = got
        if sels is None:
            sels = selection.select_cpu_many([others[i] for i in mag], base, ks)
        for r, (i, s) in enumerate(zip(mag, sels)):
            plans[i].t, plans[i].cut, plans[i].row = s.t, s.cut, r

    if rescale:
        todo = [i for i, p in enumerate(plans) if p.mode in (Keep.MAGNITUDE, Keep.RANDOM)]
        if todo:
            sums = None
            if backend is not None:
                sums = L1_GPU.call(backend, lambda: task_merge_gpu.l1_sums(backend, base, others, plans, todo, sel_rows))
            if sums is None:
                sums = l1_cpu(base, [others[i] for i in todo], [plans[i] for i in todo])
            for i, (before, after) in zip(todo, sums):
                ok = (before >= 1e-7) & (after >= 1e-7)
                plans[i].scale = mx.where(ok, before / mx.where(ok, after, 1.0), 1.0).astype(mx.float32)
    return plans, sel_rows


def keep_mode(sparsify: Sparsify | str | None, density: float) -> Keep:
    """What a task vector of this density keeps under `sparsify`."""
    if sparsify is None or density >= 1:
        return Keep.ALL
    if sparsify == Sparsify.MAGNITUDE:
        return Keep.NONE if density <= 0 else Keep.MAGNITUDE
    return Keep.RANDOM


@cache
def _l1_parts(mode: int):
    """|d| and the kept |d| of one task vector, per sparsification mode."""

    def parts(o, b, idx, t, cut, keys, p):
        a = mx.abs(o.astype(mx.float32) - b.astype(mx.float32))
        if mode == Keep.MAGNITUDE:
            bits = a.view(mx.uint32)
            keep = (bits > t) | ((bits == t) & (idx <= cut))
        else:
            keep = uniform_of_index(idx, keys) < p
        return a, a * keep.astype(mx.float32)

    return parts


@cache
def _l1_parts_fn(mode: int):
    return mx.compile(_l1_parts(mode))


def l1_fallback(base: mx.array, other: mx.array, plan: ModelPlan, fused: bool = True) -> tuple[mx.array, mx.array]:
    """(sum |d|, sum of kept |d|) by the MLX graph; `fused`: compiled (else plain, the same sums:
    a first-use check's small reference then needs no compiler)."""
    idx = mx.arange(base.size, dtype=mx.uint32)
    keys = mx.array(list(plan.keys), dtype=mx.uint32)
    parts = _l1_parts_fn(plan.mode) if fused else _l1_parts(plan.mode)
    a, kept = parts(other.reshape(-1), base.reshape(-1), idx, plan.t, plan.cut, keys, mx.array(plan.p, dtype=mx.float32))
    return accurate_sum(a), accurate_sum(kept)


def _host_model(other: mx.array, plan: ModelPlan, weight: float = 1.0) -> task_merge_cpu.Model:
    return task_merge_cpu.Model(
        host.host(other),
        plan.mode,
        weight,
        float(plan.scale.item()) if plan.scale is not ONE_F32 else 1.0,
        int(plan.t.item()),
        int(plan.cut.item()),
        plan.keys,
        plan.p,
        plan.mask,
    )


def l1_cpu(base: mx.array, others: list[mx.array], plans: list[ModelPlan]) -> list[tuple[mx.array, mx.array]]:
    """l1_fallback's sums from task_merge_cpu's loops (the same float32 sums), one pass for all
    models; where numpy's passes run, a random model's mask is kept on its plan, so the merge does
    not draw it again."""
    if base.size <= 1024 or not selection.host_path(base, *others):
        return [l1_fallback(base, o, p) for o, p in zip(others, plans)]
    models = [_host_model(o, p) for o, p in zip(others, plans)]
    sums = task_merge_cpu.l1_block_sums(host.host(base), models, HASH)
    for m, p in zip(models, plans):
        p.mask = m.mask
    return [(accurate_sum(a), accurate_sum(kept)) for a, kept in sums]


def merge_cpu(job: TaskMerge, plans: list[ModelPlan]) -> mx.array | None:
    """The fused merge through task_merge_cpu's loops, or None where the MLX graph runs (other dtypes)."""
    base, others = job.base, job.others
    if not selection.host_path(base, *others):
        return None
    models = [_host_model(o, p, w) for o, p, w in zip(others, plans, job.weights)]
    bf16 = base.dtype == mx.bfloat16
    res, view = host.alloc((base.size,), np.uint16 if bf16 else np.float32)
    task_merge_cpu.task_merge(
        host.host(base),
        models,
        consensus=job.consensus,
        normalize=job.normalize,
        lam=job.lam,
        divisor=job.divisor,
        out_bf16=bf16,
        hasher=HASH,
        out=view,
    )
    return (res.view(mx.bfloat16) if bf16 else res).reshape(base.shape)


@cache
def combine_fn(modes: tuple[int, ...], consensus: bool, normalize: bool):
    """The elementwise tail of the merge for one configuration, compiled once."""
    return mx.compile(combine_graph(modes, consensus, normalize))


@cache
def combine_graph(modes: tuple[int, ...], consensus: bool, normalize: bool):
    """combine_fn's graph, not compiled (a first-use check's small reference: no compiler)."""

    def combine(b_in, idx, params, *others):
        # params (float32): per model [weight, scale, p]; then [lam, divisor_no_consensus]
        # sel (after the K tensors): per model t (uint32 bits), cut (uint32), k0, k1 (uint32)
        # masks multiply (d * 0 or d * scale) instead of mx.where: the compiled CPU code is faster
        K = len(modes)
        tensors, sel = others[:K], others[K:]
        b = b_in.astype(mx.float32)
        wds, ws = [], []
        for i, mode in enumerate(modes):
            w = params[3 * i]
            d = tensors[i].astype(mx.float32) - b
            if mode == Keep.NONE:
                d = mx.zeros_like(d)
            elif mode == Keep.MAGNITUDE:
                t, cut = sel[4 * i], sel[4 * i + 1]
                bits = mx.abs(d).view(mx.uint32)
                keep = (bits > t) | ((bits == t) & (idx <= cut))
                d = d * (keep.astype(mx.float32) * params[3 * i + 1])
            elif mode == Keep.RANDOM:
                keep = uniform_of_index(idx, mx.stack([sel[4 * i + 2], sel[4 * i + 3]])) < params[3 * i + 2]
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

    return combine


def fused_task_merge(
    base: mx.array,
    others: list[mx.array],
    weights: list[float],
    *,
    sparsify: Sparsify | str | None,
    densities: list[float],
    rescale: bool,
    consensus: Consensus | str | None,
    normalize: bool,
    lam: float,
    seed: int = 0,
    streams: list[int] | None = None,
) -> mx.array:
    """mergekit's generalized task arithmetic over one tensor, fused, in float32.

    sparsify: None, Sparsify.MAGNITUDE (exact top-k, ties lowest index first) or Sparsify.RANDOM
    (random_mask with streams[i]); consensus: None or Consensus.SUM (their string values are taken
    too). Returns an array of base's dtype and shape.
    """
    K = len(others)
    try:
        sparsify = None if sparsify is None else Sparsify(sparsify)
    except ValueError:
        raise ValueError(f"sparsify must be None, 'magnitude' or 'random', not {sparsify!r}") from None
    try:
        consensus = None if consensus is None else Consensus(consensus)
    except ValueError:
        raise ValueError(f"consensus must be None or 'sum', not {consensus!r}") from None
    if len(weights) != K or len(densities) != K:
        raise ValueError(f"{K} task models need {K} weights and {K} densities")
    if K == 0 or base.size == 0:
        return base
    for o in others:
        if o.shape != base.shape:
            raise ValueError(f"task model shape {o.shape} differs from the base's {base.shape}")
    gpu.check_size(base.size)
    if streams is None:
        streams = [stream_id(i) for i in range(K)]
    backend = gpu.backend()
    if sparsify is None:  # nothing to select or draw: the compiled graph is as fast as a kernel
        backend = None
    weights = [float(w) for w in weights]
    job = TaskMerge(base, tuple(others), tuple(weights), consensus is not None, bool(normalize), lam, plain_divisor(weights))
    if backend is not None:
        task_merge_gpu.prepare(backend, job, [keep_mode(sparsify, float(d)) for d in densities], rescale)
    if backend is not None and sparsify == Sparsify.MAGNITUDE and not rescale:
        plans, _ = plan_models(base, others, None, densities, False, seed, streams, None)
        mag = [i for i, d in enumerate(densities) if 0 < float(d) < 1]
        for i in range(K):
            d = float(densities[i])
            plans[i].mode = Keep.MAGNITUDE if i in mag else (Keep.ALL if d >= 1 else Keep.NONE)
        ks = [max(1, int(float(densities[i]) * base.size)) for i in mag]
        if not mag or selection.GPU.call(backend, lambda: True):
            out = MERGE_GPU.call(
                backend,
                lambda: task_merge_gpu.ties(backend, job, plans, mag, ks) if mag else task_merge_gpu.merge(backend, job, plans),
            )
            if out is not None:
                return out
    plans, sel_rows = plan_models(base, others, sparsify, densities, rescale, seed, streams, backend)
    if backend is not None:
        out = MERGE_GPU.call(backend, lambda: task_merge_gpu.merge(backend, job, plans, sel_rows))
        if out is not None:
            return out
    if sparsify is not None:
        out = merge_cpu(job, plans)
        if out is not None:
            return out
    divisor = job.divisor
    params = []
    sel = []
    for w, p in zip(weights, plans):
        params += [mx.array(w, dtype=mx.float32), p.scale.astype(mx.float32), mx.array(p.p, dtype=mx.float32)]
        sel += [p.t, p.cut, u32(p.keys[0]), u32(p.keys[1])]
    params += [mx.array(lam, dtype=mx.float32), mx.array(divisor, dtype=mx.float32)]
    fn = combine_fn(tuple(p.mode for p in plans), consensus is not None, bool(normalize))
    idx = mx.arange(base.size, dtype=mx.uint32)
    flat = fn(base.reshape(-1), idx, mx.stack(params), *[o.reshape(-1) for o in others], *sel)
    return flat.reshape(base.shape)


L1_CHECK_DENSITIES = [0.3, 0.5, 0.7]  # the densities _check_l1 rescales
MERGE_CHECK_DENSITIES = [0.3, 1.0, 0.6]  # and those _check_merge merges, with each of these settings:
MERGE_CASES = (("magnitude", True, True), ("random", True, False), (None, False, False))  # sparsify, consensus, normalize
MERGE_DTYPES = (mx.float32, mx.bfloat16)


def _check_l1(backend: str) -> bool:
    base, others = gpu.check_family(mx.float32)
    ok = True
    for sp in ("random", "magnitude"):
        with mx.stream(mx.cpu):
            plans, _ = plan_models(base, others, sp, L1_CHECK_DENSITIES, False, 9, [1, 2, 3], None)
            ref = [l1_fallback(base, others[i], plans[i], fused=False) for i in range(3)]
            mx.eval(ref)
        got = task_merge_gpu.l1_sums(backend, base, others, plans, [0, 1, 2])
        mx.eval(got)
        for (gb, ga), (rb, ra) in zip(got, ref):
            ok &= abs(gb.item() - rb.item()) <= 1e-5 * abs(rb.item()) and abs(ga.item() - ra.item()) <= 1e-5 * abs(ra.item())
    return ok


def _check_merge(backend: str) -> bool:
    ok = True
    for dtype in MERGE_DTYPES:
        base, others = gpu.check_family(dtype)
        for sp, cons, norm in MERGE_CASES:
            with mx.stream(mx.cpu):
                plans, _ = plan_models(base, others, sp, MERGE_CHECK_DENSITIES, False, 4, [7, 8, 9], None)
                ws = [1.0, -0.5, 0.7]
                div = plain_divisor(ws)
                params, sel = [], []
                for w, p in zip(ws, plans):
                    params += [mx.array(w, dtype=mx.float32), p.scale, mx.array(p.p, dtype=mx.float32)]
                    sel += [p.t, p.cut, u32(p.keys[0]), u32(p.keys[1])]
                params += [mx.array(0.9, dtype=mx.float32), mx.array(div, dtype=mx.float32)]
                fn = combine_graph(tuple(p.mode for p in plans), cons, norm)
                ref = fn(base, mx.arange(base.size, dtype=mx.uint32), mx.stack(params), *others, *sel)
                mx.eval(ref)
            got = task_merge_gpu.merge(backend, TaskMerge(base, tuple(others), tuple(ws), cons, norm, 0.9, div), plans)
            mx.eval(got)
            with mx.stream(mx.cpu):
                if dtype == mx.float32:
                    ok &= bool(mx.allclose(got, ref, rtol=1e-6, atol=1e-7).item())
                else:  # one bf16 rounding apart at most
                    g32, r32 = got.astype(mx.float32), ref.astype(mx.float32)
                    ok &= bool((mx.abs(g32 - r32) <= mx.abs(r32) * 2.0**-7).all().item())
    return ok


def _l1_launches() -> list[gpu.Launch]:
    return [task_merge_gpu.l1_launch(mx.float32, gpu.CHECK_K)]


def _merge_launches() -> list[gpu.Launch]:
    return [
        task_merge_gpu.merge_launch(dtype, dtype, [keep_mode(sp, d) for d in MERGE_CHECK_DENSITIES], cons, norm)
        for dtype in MERGE_DTYPES
        for sp, cons, norm in MERGE_CASES
    ]


L1_GPU = gpu.Group("l1", _check_l1, _l1_launches)
MERGE_GPU = gpu.Group("merge", _check_merge, _merge_launches)
