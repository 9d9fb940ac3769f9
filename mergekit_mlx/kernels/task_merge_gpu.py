"""The fused task merge and its L1 sums on a GPU (kernels/task_merge.inc, l1_sums.inc), and the
gated TIES merge: launched right behind its selections, final unless a selection was not."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import mlx.core as mx

from . import gpu, selection_gpu
from .task_plan import ONE_F32, Keep, ModelPlan, TaskMerge

MERGE_GROUPS = 8  # groups of eight elements per thread in the merge kernel (spreads its set-up)
PARAMS = ("up", "sel", "scl", "gate")  # the inputs after the models (kernels/task_params.inc)
PARAM_DTYPES = (mx.uint32, mx.uint32, mx.float32, mx.uint32)


def l1_launch(dtype: mx.Dtype, km: int) -> gpu.Launch:
    """The L1 sums of km task vectors of `dtype` (with a base of it)."""
    ins = gpu.model_dtypes(dtype, km, True) + PARAM_DTYPES
    return gpu.Launch("l1_sums", km, True, PARAMS, ("part",), ins, (mx.float32,), (("KM", km), ("TG", gpu.TG)))


def merge_launch(dtype: mx.Dtype, out_dtype: mx.Dtype, modes: list[Keep], consensus: bool, normalize: bool) -> gpu.Launch:
    """The fused merge of task models keeping `modes`, inputs of `dtype` (`common_dtype`), out in `out_dtype`."""
    km = len(modes)
    sparse = _sparse_kind(modes)
    template = (
        ("T", out_dtype),
        ("KM", km),
        ("CONSENSUS", bool(consensus)),
        ("NORMALIZE", bool(normalize)),
        ("SPARSE", sparse),
        ("UNIFORM", sparse != 0 and all(m == sparse for m in modes)),
    )
    ins = gpu.model_dtypes(dtype, km, True) + PARAM_DTYPES
    return gpu.Launch("task_merge", km, True, PARAMS, ("out",), ins, (out_dtype,), template)


def launches(dtype: mx.Dtype, out_dtype: mx.Dtype, modes: list[Keep], consensus: bool, normalize: bool, rescale: bool):
    """What a fused merge of task models keeping `modes` launches on its common path: the
    selections (up to MAX_KM tensors a launch), the L1 sums when it rescales, the merge."""
    mag = sum(m == Keep.MAGNITUDE for m in modes)
    drawn = sum(m in (Keep.MAGNITUDE, Keep.RANDOM) for m in modes) if rescale else 0
    out = []
    for g in range(0, mag, gpu.MAX_KM):
        out += selection_gpu.launches(dtype, min(gpu.MAX_KM, mag - g), True)
    out += [l1_launch(dtype, min(gpu.MAX_KM, drawn - g)) for g in range(0, drawn, gpu.MAX_KM)]
    out.append(merge_launch(dtype, out_dtype, list(modes), consensus, normalize))
    return out


def prepare(backend: str, job: TaskMerge, modes: list[Keep], rescale: bool) -> None:
    """CUDA: start compiling, side by side, what merging `job` launches, once per configuration:
    a first merge then waits for the slowest compile, not for each one after another."""
    same = all(o.dtype == job.base.dtype for o in job.others)
    _prepare(backend, job.base.dtype if same else mx.float32, job.base.dtype, tuple(modes), job.consensus, job.normalize, rescale)


@cache
def _prepare(backend, dtype, out_dtype, modes, consensus, normalize, rescale) -> None:
    gpu.prebuild(backend, launches(dtype, out_dtype, list(modes), consensus, normalize, rescale))


def _task_inputs(job: TaskMerge, plans: list[ModelPlan], sel_rows, gate=None):
    """(flat inputs, up, sel, scl, gate) in the layout of kernels/task_params.inc."""
    n = job.base.size
    rows = [p.row for p in plans]
    if sel_rows is None:  # built from the plans' scalars (the first-use checks, CPU-made plans)
        mag = [i for i, p in enumerate(plans) if p.mode == Keep.MAGNITUDE]
        for r, i in enumerate(mag):
            rows[i] = r
        sel_rows = (
            mx.stack([mx.stack([plans[i].t.astype(mx.uint32), plans[i].cut.astype(mx.uint32)]) for i in mag]).reshape(-1)
            if mag
            else gpu.const_u32((0, 0))
        )
    words = [n, gpu.f32_bits(job.lam), gpu.f32_bits(job.divisor), 0]
    for w, p, r in zip(job.weights, plans, rows):
        words += [
            int(p.mode),
            r if p.mode == Keep.MAGNITUDE else 0,
            p.keys[0],
            p.keys[1],
            gpu.f32_bits(w),
            gpu.f32_bits(p.p),
            0,
            0,
        ]
    if any(p.scale is not ONE_F32 for p in plans):
        scl = mx.stack([p.scale.astype(mx.float32).reshape(()) for p in plans])
    else:
        scl = gpu.ones_f32(len(plans))
    flats = [a.reshape(-1) for a in gpu.common_dtype([job.base] + list(job.others))]
    if gate is None:  # selections known final: every row's status 1
        gate = gpu.const_u32((selection_gpu.OK, 0, 0, 0, 0, 0, 0, 0) * max(1, len(rows)))
    return flats, gpu.const_u32(tuple(words)), sel_rows, scl, gate


def l1_sums(
    backend: str, base: mx.array, others: list[mx.array], plans: list[ModelPlan], todo: list[int], sel_rows=None
) -> list[tuple[mx.array, mx.array]]:
    """(sum |d|, sum of kept |d|) per model in `todo`, from fixed-grid partial sums."""
    n = base.size
    sums = []
    for g in range(0, len(todo), gpu.MAX_KM):
        idx = todo[g : g + gpu.MAX_KM]
        km = len(idx)
        job = TaskMerge(base, tuple(others[i] for i in idx), (1.0,) * km, False, False, 1.0, 1.0)
        flats, up, sel, scl, gate = _task_inputs(job, [plans[i] for i in idx], sel_rows)
        groups = gpu.groups(-(-n // 8))
        part = l1_launch(flats[0].dtype, km)(
            backend,
            flats + [up, sel, scl, gate],
            grid=(groups * gpu.TG, 1, 1),
            threadgroup=(gpu.TG, 1, 1),
            output_shapes=[(groups * km * 2,)],
        )[0]
        tot = part.reshape(groups, km, 2).sum(axis=0)
        sums += [(tot[m, 0], tot[m, 1]) for m in range(km)]
    return sums


def _sparse_kind(modes: list[Keep]) -> int:
    """The merge kernel's SPARSE: 2 or 3 when every sparsified model is magnitude (or random),
    so the kernel holds only that test; 0 when both occur."""
    modes = set(modes)
    if Keep.RANDOM not in modes:
        return int(Keep.MAGNITUDE)
    return int(Keep.RANDOM) if Keep.MAGNITUDE not in modes else 0


def merge(backend: str, job: TaskMerge, plans: list[ModelPlan], sel_rows=None, gate=None) -> mx.array:
    base = job.base
    n = base.size
    flats, up, sel, scl, gate = _task_inputs(job, plans, sel_rows, gate)
    out = merge_launch(flats[0].dtype, base.dtype, [p.mode for p in plans], job.consensus, job.normalize)(
        backend,
        flats + [up, sel, scl, gate],
        grid=(gpu.stride_grid(-(-n // 8), MERGE_GROUPS), 1, 1),
        threadgroup=(gpu.TG, 1, 1),
        output_shapes=[(n,)],
    )[0]
    return out.reshape(base.shape)


# ----------------------------------------------------------------------------- gated TIES


def ties(backend: str, job: TaskMerge, plans: list[ModelPlan], mag: list[int], ks: list[int]) -> mx.array:
    """Magnitude-sparsified merge without rescaling, with one host sync: the merge is launched
    right behind the selection, gated on the device by its statuses, and evaluated together with
    them; only when a selection was not final (rare with bf16 ties, the rule for float32 data) is
    it finished and the merge run again. Under deferred_gate_checks, no sync: the gate goes to
    the caller, who checks it after evaluating."""
    out, gate, groups = ties_start(backend, job, plans, mag, ks)
    pending = getattr(_deferred, "gates", None)
    if pending is not None:
        pending.append(gate)
        return out
    mx.eval(out, gate)
    return ties_finish(backend, job, plans, mag, ks, out, gate.tolist(), groups)


_deferred = threading.local()


@contextmanager
def deferred_gate_checks() -> Iterator[list[mx.array]]:
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
    return all(selection_gpu.final(g.tolist()) for g in gates)


def ties_start(backend: str, job: TaskMerge, plans: list[ModelPlan], mag: list[int], ks: list[int]):
    """The whole gated TIES merge launched, nothing evaluated: (out, gate, groups). Several of
    these can be evaluated together, their gates read back at once, then finished one by one."""
    base = job.base
    groups = selection_gpu.select_start(backend, [job.others[i] for i in mag], base, ks)
    tcs = [tc[: 2 * (len(f) - int(base is not None))] for f, _, tc, _ in groups]
    gates = [res for _, res, _, _ in groups]
    for r, i in enumerate(mag):
        plans[i].row = r
    sel_rows = mx.concatenate(tcs) if len(tcs) > 1 else groups[0][2]  # one launch: its tc as it is
    gate = mx.concatenate(gates) if len(gates) > 1 else gates[0]
    out = merge(backend, job, plans, sel_rows, gate)
    return out, gate, groups


def ties_finish(
    backend: str,
    job: TaskMerge,
    plans: list[ModelPlan],
    mag: list[int],
    ks: list[int],
    out: mx.array,
    gate_words: list[int],
    groups,
) -> mx.array:
    """`out` when every selection was final (gate_words: the gate read back), else the merge again
    on the finished selections."""
    if selection_gpu.final(gate_words):
        return out
    sels, sel_rows = selection_gpu.select_finish(backend, [job.others[i] for i in mag], job.base, ks, groups)
    for i, s in zip(mag, sels):
        plans[i].t, plans[i].cut = s.t, s.cut
    return merge(backend, job, plans, sel_rows)
