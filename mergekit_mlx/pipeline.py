"""The streaming executor: read -> merge -> check -> write, tensor by tensor, under a byte budget.

Reader threads load (evaluate) the inputs of the next tasks, worker threads merge them (each
thread has its own MLX stream, so merges run side by side), and the calling thread checks each
output for NaN/Inf and hands it to `write`, in plan order. Where the inputs wait and how a batch
of merges is evaluated belongs to the kernels (`kernels.Staging`, `kernels.evaluate_together`).
"""

from __future__ import annotations

import ctypes
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import kernels
from .dtypes import torch_dtype_name
from .errors import ModelError
from .methods import MergeInputs
from .options import MergeOptions
from .plan import Plan, TensorTask

# on_event(name, task, seconds): "read" when a task's inputs (from one reader) are loaded, "merge"
# when its merge is evaluated (a batch's time shared out), "host" when a GPU output is on its way
# to host memory (the copy started there; a batch's time shared out), "write" when it is written
OnEvent = Callable[[str, TensorTask, float], None]


def run_plan(
    plan: Plan,
    opts: MergeOptions,
    write: Callable[[str, mx.array], None],
    wants: Callable[[str], bool],
    on_event: OnEvent | None = None,
    to_host: bool = True,
) -> None:
    """Merge every task and hand each output to `write`, in plan order; `on_event` (benchmarks)
    hears how long each stage took for each task. On a GPU, outputs move to host memory for `write`
    to put on disk, or, when `write.takes_device_tensors`, go to it as `kernels.DeviceTensor`s that
    it copies from device memory itself; with `to_host` false (a merge kept in memory, for mlx-lm on
    the same GPU) they stay in device memory.

    Three stages overlap: reader threads load (evaluate) the inputs of the next tasks, worker
    threads merge them (each thread has its own MLX stream, so merges run side by side), and this
    thread checks each output for NaN/Inf and writes it. The tensors in flight, from loading to
    written, stay under opts.batch_bytes (or one task, when a single task is larger).
    """
    bar = _progress(plan, opts)
    todo = []
    for task in plan.tasks:
        if wants(task.out.name):
            todo.append(task)
        elif bar is not None:
            bar.update(task.out.nbytes)
    _reuse_freed_memory()
    if mx.default_device().type != mx.DeviceType.gpu:
        _keep_freed_buffers(opts.batch_bytes)
    # a writer that writes several shards side by side: the tasks in its order, a thread per lane
    lanes = getattr(write, "lanes", 1) if to_host else 1
    if lanes > 1:
        todo.sort(key=lambda t: write.position(t.out.name))
    kernels.first_use_checks(plan.method.gpu_kernels)  # before the merge threads start
    bar_lock = threading.Lock()

    def finish(task: TensorTask, out: mx.array, ok: mx.array, inputs: list[mx.array] | None) -> None:
        """Check a merged output and write it; its bytes leave the budget."""
        if not ok.item():
            _report_nonfinite(plan, task, opts, inputs)
        start = time.perf_counter()
        write(task.out.name, out)
        if on_event is not None:
            on_event("write", task, time.perf_counter() - start)
        results.done(task)
        if bar is not None:
            with bar_lock:
                bar.update(task.out.nbytes)

    try:
        # a writer that copies outputs from device memory itself gets them there (`kernels.Staging`)
        writer_copies = getattr(write, "takes_device_tensors", False)
        with _Pipeline(plan, opts, todo, _worker_count(), on_event, to_host, writer_copies) as results:
            with _WriteLanes(lanes, getattr(write, "lane", None), finish, results) as writing:
                for item in results:
                    writing.put(*item)
    finally:
        if bar is not None:
            bar.close()
        for m in plan.models:
            if hasattr(m, "release"):
                m.release()


def _worker_count() -> int:
    """Merges side by side: one per core on the CPU (at most 4); one on a GPU. Two GPU merge
    threads with many reads in flight crashed MLX 0.32.4's CUDA backend (SIGFPE inside mx.eval),
    and a GPU merge is bound by reading and writing anyway (benchmarks/RESULTS.md, section 8)."""
    if mx.default_device().type == mx.DeviceType.gpu:
        return 1
    return max(1, min(os.cpu_count() or 1, 4))


MAX_READERS = 8
GPU_TASKS_PER_EVAL = 8  # loaded tasks a GPU merge thread evaluates together, at most
CPU_TASKS_PER_EVAL = 1  # the CPU's merge threads share the tasks out instead


def _readers_per_group(plan: Plan, used: list[int], groups: int, on_cpu: bool) -> int:
    """Reader threads per group of models: one on the CPU (its cores merge); on a GPU host about
    three quarters of the cores in all (reading from the page cache scales with threads:
    benchmarks/RESULTS.md, section 8), where every model can be read by several."""
    if on_cpu or not all(getattr(plan.models[m], "parallel_reads", False) for m in used):
        return 1
    return max(1, min(4, -(-3 * (os.cpu_count() or 1) // 4 // groups)))


_JOBS: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
_THREADS: list[threading.Thread] = []
_THREADS_LOCK = threading.Lock()


def _start_threads(n: int) -> None:
    """Make sure n pipeline threads exist. They live as long as the process (daemons that never
    return): MLX 0.32 can abort the process at exit once a thread that used MLX has finished."""
    with _THREADS_LOCK:
        while len(_THREADS) < n:
            t = threading.Thread(target=_thread_main, name=f"mergekit-mlx-{len(_THREADS)}", daemon=True)
            t.start()
            _THREADS.append(t)


def _thread_main() -> None:
    while True:
        _JOBS.get()()


class _Stopped(Exception):
    pass


class _Pipeline:
    """Readers -> workers -> the caller, under a budget of bytes in flight; see run_plan.

    Each group of input models is read by one reader thread, in plan order (on a GPU host by
    several, each taking every few tasks): MLX ties a lazy array to the thread that made it, and a
    reader keeps lazy arrays of its files between calls (per thread: models.SafetensorsModel).
    Readers claim tasks (their bytes) in plan order, so the budget never waits on a later task.
    """

    def __init__(
        self,
        plan: Plan,
        opts: MergeOptions,
        tasks: list[TensorTask],
        workers: int,
        on_event: OnEvent | None = None,
        to_host: bool = True,
        writer_copies: bool = False,
    ):
        self.plan, self.opts, self.tasks, self.on_event = plan, opts, tasks, on_event
        self.on_cpu = mx.default_device().type != mx.DeviceType.gpu
        self.to_host = to_host and not self.on_cpu
        # fixed up front: a task's output shape may change while it is merged (vocabulary plans)
        self.costs = {id(t): self.cost(t) for t in tasks}
        used = sorted({m for t in tasks for m, _ in t.inputs})
        readers = max(1, min(len(used), MAX_READERS))
        groups = [{m for m in used if m % readers == r} for r in range(readers)]
        # several readers per group on a GPU host (many cores, reads are the bottleneck); each
        # takes every `per`-th task, so a group's tasks still arrive roughly in plan order
        per = _readers_per_group(plan, used, readers, self.on_cpu)
        self.jobs = [lambda g=g, r=r: self._read(g, r, per) for g in groups for r in range(per)]
        # on an NVIDIA GPU inputs go straight to device memory, past MLX's load, or are prefetched there
        self.staging = kernels.Staging(opts.batch_bytes, on_gpu=not self.on_cpu, writer_copies=writer_copies and self.to_host)
        self.jobs += [self._work] * workers
        self.cond = threading.Condition()
        self.in_flight = 0  # bytes: inputs of claimed tasks until merged, outputs until written
        self.released: dict[int, int] = {}  # id(task) -> bytes it gave back when its merge finished
        self.claimed = 0  # tasks [0, claimed) have their bytes in the budget
        self.parts: dict[int, list[mx.array | None]] = {}  # task index -> inputs read so far
        self.loaded: dict[int, list[mx.array]] = {}  # task index -> all inputs, evaluated
        self.unread = len(tasks)  # tasks not yet in self.loaded
        # task index -> (output, finite flag, inputs when the flag is false, for the report)
        # (and an event to wait for before writing it, while its pages move to host memory); the
        # output is a kernels.DeviceTensor for a writer that copies it from device memory itself
        self.results: dict[int, tuple[mx.array | kernels.DeviceTensor, mx.array, list[mx.array] | None, int | None]] = {}
        self.error: BaseException | None = None
        self.stopped = False
        self.running = 0  # threads still in _read or _work

    def cost(self, task: TensorTask) -> int:
        """Bytes a task holds in the budget: its inputs and output. On the CPU a task whose float32
        working copies (the method's count, else the planner's estimate) would not fit the budget
        takes all of it, so it runs alone: two embedding-sized merges side by side doubled the
        peak memory of the unfused graphs."""
        held = task.in_bytes + task.out.nbytes
        copies = self.plan.method.working_copies
        copies = len(task.inputs) + 2 if copies is None else copies
        if self.on_cpu and held + copies * 4 * math.prod(task.out.shape) > self.opts.batch_bytes:
            return max(held, self.opts.batch_bytes)
        return held

    def __enter__(self) -> _Pipeline:
        _start_threads(len(self.jobs))
        self.running = len(self.jobs)
        for job in self.jobs:
            _JOBS.put(lambda job=job: self._guard(job))
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the threads and wait until none of them is still using MLX; hand back the device
        memory of inputs read but not merged."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
            while self.running:
                self.cond.wait()
            for xs in list(self.parts.values()) + list(self.loaded.values()):
                self.staging.release([x for x in xs if x is not None])
            self.parts.clear()
            self.loaded.clear()
            self.staging.close()

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except _Stopped:
            pass
        except BaseException as e:  # handed to the caller's thread, which raises it
            with self.cond:
                if self.error is None:
                    self.error = e
                self.stopped = True
        finally:
            with self.cond:
                self.running -= 1
                self.cond.notify_all()

    def _wait(self, ready: Callable[[], bool]) -> None:
        """Wait (holding self.cond) until ready() or the pipeline stops."""
        while not self.stopped and not ready():
            self.cond.wait()
        if self.stopped:
            raise _Stopped

    def _admits_next(self) -> bool:
        cost = self.costs[id(self.tasks[self.claimed])]
        return self.in_flight == 0 or self.in_flight + cost <= self.opts.batch_bytes

    def _read(self, mine: set[int], turn: int = 0, turns: int = 1) -> None:
        """Read, task by task, the inputs that come from the models in `mine` (of every
        `turns`-th task, starting at `turn`)."""
        for i, task in enumerate(self.tasks):
            slots = [k for k, (m, _) in enumerate(task.inputs) if m in mine]
            if not slots or i % turns != turn:
                continue
            with self.cond:
                while self.claimed <= i:
                    self._wait(lambda: self.claimed > i or self._admits_next())  # noqa: B023 - called here
                    if self.claimed <= i:
                        self.in_flight += self.costs[id(self.tasks[self.claimed])]
                        self.claimed += 1
                        self.cond.notify_all()
            start = time.perf_counter()
            tensors = self._load(task, slots)
            if self.on_event is not None:
                self.on_event("read", task, time.perf_counter() - start)
            with self.cond:
                parts = self.parts.setdefault(i, [None] * len(task.inputs))
                for k, x in zip(slots, tensors):
                    parts[k] = x
                if all(x is not None for x in parts):
                    self.loaded[i] = self.parts.pop(i)
                    self.unread -= 1
                    self.cond.notify_all()

    def _load(self, task: TensorTask, slots: list[int]) -> list[kernels.staging.Input]:
        """These inputs of a task: evaluated MLX arrays, or bytes staged in device memory."""
        models = self.plan.models
        out: list[kernels.staging.Input] = []
        try:
            for k in slots:
                m, name = task.inputs[k]
                out.append(self.staging.read(models[m], name))
        except BaseException:
            self.staging.release(out)
            raise
        try:
            self.staging.settle(out)
        except (RuntimeError, ValueError) as e:  # a file cut short or changed since its header was read
            files = sorted({str(_file_of(models[task.inputs[k][0]], task.inputs[k][1])) for k in slots})
            raise ModelError(
                f"{', '.join(files)}: reading the input tensors of {task.out.name} failed ({e}); the file was "
                "changed or truncated during the merge"
            ) from None
        return out

    def _work(self) -> None:
        vocab = self.plan.vocab
        # a GPU merge thread evaluates the tasks loaded so far together (up to a few): each
        # evaluation and read-back costs a fixed time, paid once per batch instead of per tensor
        per_eval = CPU_TASKS_PER_EVAL if self.on_cpu else GPU_TASKS_PER_EVAL
        while True:
            with self.cond:
                self._wait(lambda: bool(self.loaded) or self.unread == 0)
                if not self.loaded:
                    return
                # the earliest tasks first: the writer waits for them
                batch = [(i, self.loaded.pop(i)) for i in sorted(self.loaded)[:per_eval]]
            read = [x for _, tensors in batch for x in tensors]
            start = time.perf_counter()
            try:
                arrays = [(i, self.staging.arrays(tensors)) for i, tensors in batch]
                # the staged inputs' copies are evaluated too (also those a merge does not read)
                merged = kernels.evaluate_together(
                    [
                        lambda i=i, ts=ts, ok=self._inputs_finite(self.tasks[i], ts): merge_task(
                            self.plan, self.tasks[i], self.opts, vocab, list(ts), ok, check_output=not self.on_cpu
                        )
                        for i, ts in arrays
                    ],
                    also=[x for _, ts in arrays for x in ts],
                )
            except BaseException:
                self.staging.release(read, synchronize=True)  # nothing may still read the staged memory
                raise
            self.staging.release(read)  # copied into MLX arrays by now: the device memory goes back
            if self.on_event is not None:
                for i, _ in batch:
                    self.on_event("merge", self.tasks[i], (time.perf_counter() - start) / len(batch))
            done = []
            start = time.perf_counter()
            outs = [out for out, _ in merged]
            # on a GPU, outputs as the writer takes them (each with an event to wait for before writing)
            handed = self.staging.to_writer(outs) if self.to_host else [(out, None) for out in outs]
            for (i, tensors), (out, ok), (out_for_writer, moved) in zip(arrays, merged, handed):
                if self.on_cpu:  # the output, evaluated, is checked here (merge_task left it out)
                    ok = mx.array(bool(ok.item()) and _host_finite(out))
                kept = None if ok.item() else tensors  # the inputs, for the NaN/Inf report
                done.append((i, out_for_writer, ok, kept, moved))
            if self.on_event is not None and self.to_host:
                for i, _ in batch:
                    self.on_event("host", self.tasks[i], (time.perf_counter() - start) / len(batch))
            del arrays, merged, batch, read, outs, handed  # no input outlives its merge here (the budget let it go)
            with self.cond:
                for i, out, ok, kept, moved in done:
                    task = self.tasks[i]
                    self.results[i] = (out, ok, kept, moved)
                    if kept is None:  # the inputs are gone: only the output waits (for its turn to be written)
                        self.released[id(task)] = self.costs[id(task)] - task.out.nbytes
                        self.in_flight -= self.released[id(task)]
                self.cond.notify_all()

    def _inputs_finite(self, task: TensorTask, tensors: list[mx.array]) -> bool | None:
        """On the CPU, whether a task's inputs (read, evaluated) hold no NaN/Inf, where the method
        may drop elements: one native pass over each (`kernels.finite_cpu`) instead of the merge
        graph's two maxima. None (the graph checks): on a GPU, where the method keeps every
        element, for a vocabulary task (its inputs are aligned first), or without the native loop."""
        if not self.on_cpu or self.plan.method.propagates_nonfinite or task.vocab:
            return None
        return kernels.host_all_finite(tensors)

    def __iter__(self):
        for i, task in enumerate(self.tasks):
            with self.cond:
                while i not in self.results and self.error is None and not self.stopped:
                    self.cond.wait()
                if self.error is not None:
                    raise self.error
                if i not in self.results:
                    raise _Stopped
                out, ok, inputs, moved = self.results.pop(i)
            self.staging.wait(moved)
            yield task, out, ok, inputs

    def done(self, task: TensorTask) -> None:
        """The task's output is written: its bytes leave the budget (its inputs' bytes left it when
        the merge finished)."""
        with self.cond:
            self.in_flight -= self.costs[id(task)] - self.released.pop(id(task), 0)
            self.cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """Stop the pipeline for an error outside it (a write): iterating raises it."""
        with self.cond:
            if self.error is None:
                self.error = error
            self.stopped = True
            self.cond.notify_all()


class _WriteLanes:
    """The writing end of run_plan: `finish` gets every merged output, in the pipeline's order.
    With one lane on the calling thread; with several (a writer that writes shards side by side),
    each lane on a pipeline thread of its own, which gets its outputs (`lane_of`) in that order.
    A lane's error stops the pipeline, and the caller raises it."""

    def __init__(self, lanes: int, lane_of: Callable[[str], int] | None, finish: Callable[..., None], pipeline: _Pipeline):
        self.lane_of, self.finish, self.pipeline = lane_of, finish, pipeline
        self.queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(lanes)] if lanes > 1 else []
        self.cond = threading.Condition()
        self.running = 0
        self.error: BaseException | None = None

    def __enter__(self) -> _WriteLanes:
        if self.queues:
            _start_threads(len(self.pipeline.jobs) + len(self.queues))  # besides the pipeline's own threads
            self.running = len(self.queues)
            for q in self.queues:
                _JOBS.put(lambda q=q: self._lane(q))
        return self

    def put(self, task: TensorTask, *rest) -> None:
        if self.queues:
            self.queues[self.lane_of(task.out.name)].put((task, *rest))
        else:
            self.finish(task, *rest)

    def _lane(self, q: queue.SimpleQueue) -> None:
        try:
            while (item := q.get()) is not None:
                if self.error is None:  # after an error the rest is dropped
                    try:
                        self.finish(*item)
                    except BaseException as e:
                        self.error = e
                        self.pipeline.fail(e)
                del item
        finally:
            with self.cond:
                self.running -= 1
                self.cond.notify_all()

    def __exit__(self, kind, error, traceback) -> None:
        """Wait for the lanes to write what they were given (or, after an error, to drop it)."""
        if error is not None and self.error is None:
            self.error = error
        for q in self.queues:
            q.put(None)
        with self.cond:
            while self.running:
                self.cond.wait()
        if error is None and self.error is not None:
            raise self.error


def _host_finite(x: mx.array) -> bool:
    """Whether an evaluated array holds no NaN/Inf: one native pass on the CPU, else the graph's check."""
    if not mx.issubdtype(x.dtype, mx.floating):
        return True
    native = kernels.host_all_finite([x])
    return bool(all_finite(x).item()) if native is None else native


def _file_of(model, name: str) -> Path:
    info = model.info(name)
    return info.file if getattr(info, "file", None) else model.path


def _reuse_freed_memory() -> None:
    """Ask glibc to serve every buffer from its heap and to keep freed memory for the next one.

    MLX's CPU allocator is malloc, and glibc gives buffers over 32 MB (and smaller ones, before
    its threshold adapts) fresh pages from mmap and unmaps them on free, so each tensor pays for
    zero-filled page faults (benchmarks/RESULTS.md, section 8, has what reusing freed memory saved).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    # M_MMAP_MAX = 0: no mmap'ed chunks. Free memory at the heap's top is still given back (the
    # default trim threshold): keeping it saved little time and raised TIES' peak RSS
    mallopt(-4, 0)


_MALLOC_TUNED = False


def _keep_freed_buffers(limit: int) -> None:
    """Let MLX's buffer cache hold as much as a batch in flight (its CPU default is 32 MB): freed
    tensor-sized buffers then serve the next loads and outputs instead of fresh pages (on a
    2-core x86-64 VM most of a TIES merge's page faults were MLX loads and zero-filled outputs)."""
    previous = mx.set_cache_limit(limit)
    if previous > limit:  # a larger limit (set by a caller) stays
        mx.set_cache_limit(previous)


def merge_task(
    plan: Plan,
    task: TensorTask,
    opts: MergeOptions,
    vocab=None,
    tensors: list[mx.array] | None = None,
    inputs_finite: bool | None = None,
    check_output: bool = True,
) -> tuple[mx.array, mx.array]:
    """The lazy graph of one output tensor, and of a flag: no NaN/Inf in it (nor in inputs it may drop).

    `tensors` are the task's inputs when the caller has loaded them already; `inputs_finite`,
    whether they hold no NaN/Inf when the caller has checked that already (None: checked here);
    without `check_output` the flag leaves the output out (the caller checks it once evaluated)."""
    if tensors is None:
        tensors = [plan.models[m].load(n) for m, n in task.inputs]
    ids = [m for m, _ in task.inputs]
    if task.vocab:
        if vocab is not None:
            tensors = vocab.align(task.out.name, tensors, ids)
        elif len({t.shape for t in tensors}) > 1:
            from .vocab import rectify_embeddings

            tensors = rectify_embeddings(task.out.name, tensors, task.base)
    inputs = MergeInputs(
        tensors=tensors,
        base=task.base,
        shared=task.shared,
        per_input=task.per_input,
        name=task.out.name,
        seed=opts.random_seed,
        input_ids=ids,
    )
    out = plan.method.merge(inputs)
    if tuple(out.shape) != task.out.shape:
        task.out = type(task.out)(task.out.name, tuple(out.shape), task.out.dtype)
    out = out.astype(task.out.dtype) if out.dtype != task.out.dtype else out
    # a method that drops elements (top-k, random masks) could hide a NaN input: check its inputs too
    watched = [out] if check_output else []
    if not plan.method.propagates_nonfinite and inputs_finite is None:
        watched += tensors
    flags = [all_finite(x) for x in watched if mx.issubdtype(x.dtype, mx.floating)]
    if inputs_finite is not None:
        flags.append(mx.array(inputs_finite))
    ok = mx.all(mx.stack(flags)) if flags else mx.array(True)
    return out, ok


# float dtype -> (signed and unsigned integers of its width, the pattern of +inf)
_INF_BITS = {
    mx.bfloat16: (mx.int16, mx.uint16, 0x7F80),
    mx.float16: (mx.int16, mx.uint16, 0x7C00),
    mx.float32: (mx.int32, mx.uint32, 0x7F800000),
    mx.float64: (mx.int64, mx.uint64, 0x7FF0000000000000),
}


def all_finite(x: mx.array) -> mx.array:
    """True when x holds no NaN or Inf, from two integer maxima of its bits (no temporaries).

    As signed integers, +Inf and the positive NaNs are the patterns at or above +Inf's; as
    unsigned ones, -Inf and the negative NaNs are those at or above -Inf's (sign bit | +Inf).
    On the CPU this costs a sixth of mx.all(mx.isfinite(x)), and a masked maximum would write
    a tensor-sized temporary (fresh pages: most of a TIES merge's page faults).
    """
    spec = _INF_BITS.get(x.dtype)
    if spec is None:
        return mx.all(mx.isfinite(x))
    if x.size == 0:
        return mx.array(True)
    sdtype, udtype, inf = spec
    sign = 1 << (8 * x.dtype.size - 1)
    positive_ok = mx.max(x.view(sdtype)) < mx.array(inf, dtype=sdtype)
    # from numpy: a Python int above 2**63 does not convert to a uint64 array
    negative_ok = mx.max(x.view(udtype)) < mx.array(np.array(sign | inf, dtype=np.uint64)).astype(udtype)
    return positive_ok & negative_ok


def _report_nonfinite(plan: Plan, task: TensorTask, opts: MergeOptions, inputs: list[mx.array] | None = None) -> None:
    if inputs is None:
        inputs = [plan.models[m].load(n) for m, n in task.inputs]
    bad_inputs = [
        f"{plan.model_paths[m]} ({n})"
        for (m, n), x in zip(task.inputs, inputs)
        if mx.issubdtype(x.dtype, mx.floating) and not mx.all(mx.isfinite(x)).item()
    ]
    if bad_inputs and opts.allow_nonfinite:
        return
    if bad_inputs:
        raise ModelError(
            f"tensor {task.out.name}: NaN or Inf in the input {', '.join(bad_inputs)}; "
            "the merge stopped (pass --allow-nonfinite to merge anyway)"
        )
    limit = _overflowed_range(plan, task, opts, inputs)
    if limit is not None:
        raise ModelError(
            f"tensor {task.out.name}: merged values reach beyond {torch_dtype_name(task.out.dtype)}'s range (largest {limit:g}), so they "
            "would be written as Inf; set the recipe's `out_dtype` (or `dtype`) to bfloat16 or float32, or lower its weights"
        )
    raise ModelError(
        f"tensor {task.out.name}: the merge produced NaN or Inf although no input has any; "
        "check the recipe's weights (e.g. a normalisation dividing by a sum near zero)"
    )


def _overflowed_range(plan: Plan, task: TensorTask, opts: MergeOptions, inputs: list[mx.array]) -> float | None:
    """The largest value of the output dtype when the merge is finite before it is rounded to that
    dtype (float16 holds at most 65504), else None."""
    if task.out.dtype not in (mx.float16, mx.bfloat16):
        return None
    wide = replace(task, out=replace(task.out, dtype=mx.float32))
    out, _ = merge_task(plan, wide, opts, plan.vocab, list(inputs))
    if not mx.all(mx.isfinite(out)).item():
        return None
    return float(mx.finfo(task.out.dtype).max)


def _progress(plan: Plan, opts: MergeOptions):
    if not opts.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=plan.bytes_written, unit="B", unit_scale=True, unit_divisor=1000, desc="merging", dynamic_ncols=True)
