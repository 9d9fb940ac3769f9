"""Running a plan: read inputs lazily, merge tensor by tensor, evaluate in batches, stream out.

`merge(recipe)` keeps the result in memory (for `to_mlx_lm()` or `save()`); `merge(recipe, out)`
streams it to disk through a temporary sibling directory that is renamed into place only when
everything is written, so an interrupted merge never leaves an output that looks complete.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import queue
import sys
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Union

import mlx.core as mx
import numpy as np

from . import cuda_mem, gpu_reads, kernels
from .device import use_device
from .errors import ModelError, OutputError
from .methods import MergeInputs
from .options import MergeOptions
from .output import check_output_location, write_output, write_tokenizer
from .plan import Plan, TensorTask, make_plan
from .recipe import Recipe, load_recipe
from .writer import DEFAULT_SHARD_BYTES, write_config


@dataclass
class MergeResult:
    plan: Plan
    weights: Optional[dict[str, mx.array]] = None  # in memory, when no output path was given
    path: Optional[Path] = None  # the written model, when one was
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> dict:
        return self.plan.config

    def save(
        self, out_path: Union[str, Path], *, out_shard_size: int = DEFAULT_SHARD_BYTES, force: bool = False
    ) -> Path:
        """Write the in-memory merge as a model directory (the same layout `mergekit-mlx run` writes),
        through the same output checks: `force` replaces only an earlier output of this tool."""
        if self.weights is None:
            raise OutputError("this result was written to disk already; copy its directory instead")
        opts = MergeOptions(out_shard_size=out_shard_size, force=force)
        tasks = self.plan.tasks
        weights = self.weights

        def produce(write: Callable[[str, mx.array], None], wants: Callable[[str], bool]) -> None:
            for t in tasks:
                write(t.out.name, weights[t.out.name])

        return write_output(self.plan, Path(out_path), opts, produce)

    def to_mlx_lm(self):
        """(model, tokenizer) for mlx-lm's generate, built from memory without writing the merge."""
        from mlx_lm.utils import _get_classes, load_tokenizer

        if self.path is not None:
            from mlx_lm import load

            model, tokenizer = load(str(self.path))
            if (self.path / "config.json").exists() and "bitnet" in json.dumps(
                json.loads((self.path / "config.json").read_text()).get("quantization_config", {})
            ):
                from .bitnet import use_portable_bitlinear

                use_portable_bitlinear(model)  # mlx-lm's own BitLinear runs only on Metal
            return model, tokenizer
        config = dict(self.plan.config)
        model_class, args_class = _get_classes(config=config)
        model = model_class(args_class.from_dict(config))
        weights = dict(self.weights)
        if hasattr(model, "sanitize"):
            weights = model.sanitize(weights)
        model.load_weights(list(weights.items()), strict=True)
        model.eval()
        with tempfile.TemporaryDirectory(prefix="mergekit-mlx-tok-") as tmp:
            write_tokenizer(self.plan, Path(tmp))
            write_config(Path(tmp), config)
            tokenizer = load_tokenizer(Path(tmp), eos_token_ids=config.get("eos_token_id"))
        return model, tokenizer


def merge(
    recipe: Union[str, Path, dict, Recipe],
    out_path: Union[str, Path, None] = None,
    options: Optional[MergeOptions] = None,
    **kwargs: Any,
) -> MergeResult:
    """Merge as the recipe says. With out_path the model is streamed to disk; else kept in memory."""
    opts = options or MergeOptions(**kwargs)
    check_options = getattr(opts, "check", None)
    if check_options is not None:
        check_options()
    with use_device(opts.device):
        return _merge(recipe, out_path, opts.resolved())


def _merge(recipe: Union[str, Path, dict, Recipe], out_path: Union[str, Path, None], opts: MergeOptions) -> MergeResult:
    recipe_dir = Path(recipe).parent if isinstance(recipe, (str, Path)) and str(recipe).endswith((".yml", ".yaml")) else None
    r = load_recipe(recipe)
    kernels.set_kernels_enabled(opts.use_kernels)
    plan = make_plan(r, recipe_dir=recipe_dir, allow_crimes=opts.allow_crimes)
    if out_path is not None:
        out = Path(out_path)
        inputs = list(zip(plan.model_paths, [m.path for m in plan.models]))
        check_output_location(out, inputs, force=opts.force, resume=opts.resume)
        path = write_output(plan, out, opts, lambda write, wants: run_plan(plan, opts, write, wants))
        return MergeResult(plan, path=path)
    weights: dict[str, mx.array] = {}
    run_plan(plan, opts, weights.__setitem__, lambda name: True)
    return MergeResult(plan, weights=weights)


def run_plan(
    plan: Plan,
    opts: MergeOptions,
    write: Callable[[str, mx.array], None],
    wants: Callable[[str], bool],
) -> None:
    """Merge every task and hand each output to `write`, in plan order.

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
    kernels.first_use_checks(plan.method.gpu_kernels)  # before the merge threads start
    try:
        with _Pipeline(plan, opts, todo, _worker_count()) as results:
            for task, out, ok, inputs in results:
                if not ok.item():
                    _report_nonfinite(plan, task, opts, inputs)
                write(task.out.name, out)
                results.done(task)
                if bar is not None:
                    bar.update(task.out.nbytes)
    finally:
        if bar is not None:
            bar.close()
        for m in plan.models:
            if hasattr(m, "release"):
                m.release()


def _worker_count() -> int:
    """Merges side by side: one per core on the CPU (at most 4); one on a GPU. Two GPU merge
    threads with many reads in flight crashed MLX 0.32.4's CUDA backend (SIGFPE inside mx.eval,
    in 1 to 3 of 6 runs of a 0.85B merge with 2 GB in flight; none with one thread in 35 runs),
    and a GPU merge is bound by reading and writing anyway (7B-shape ties: 8.9-9.4 s either way)."""
    if mx.default_device().type == mx.DeviceType.gpu:
        return 1
    return max(1, min(os.cpu_count() or 1, 4))


MAX_READERS = 8
GPU_TASKS_PER_EVAL = 8  # loaded tasks a GPU merge thread evaluates together, at most
CPU_TASKS_PER_EVAL = 1  # the CPU's merge threads share the tasks out instead


def _readers_per_group(plan: Plan, used: list[int], groups: int, on_cpu: bool) -> int:
    """Reader threads per group of models: one on the CPU (its cores merge); on a GPU host about
    three quarters of the cores in all (reading from the page cache went from 4.8 to 7.1 GB/s
    between 3 and 12 threads on a 16-core H200 host), where every model can be read by several."""
    if on_cpu or not all(getattr(plan.models[m], "parallel_reads", False) for m in used):
        return 1
    return max(1, min(4, -(-3 * (os.cpu_count() or 1) // 4 // groups)))


_JOBS: "queue.SimpleQueue[Callable[[], None]]" = queue.SimpleQueue()
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

    def __init__(self, plan: Plan, opts: MergeOptions, tasks: list[TensorTask], workers: int):
        self.plan, self.opts, self.tasks = plan, opts, tasks
        self.on_cpu = mx.default_device().type != mx.DeviceType.gpu
        # fixed up front: a task's output shape may change while it is merged (vocabulary plans)
        self.costs = {id(t): self.cost(t) for t in tasks}
        used = sorted({m for t in tasks for m, _ in t.inputs})
        readers = max(1, min(len(used), MAX_READERS))
        groups = [{m for m in used if m % readers == r} for r in range(readers)]
        # several readers per group on a GPU host (many cores, reads are the bottleneck); each
        # takes every `per`-th task, so a group's tasks still arrive roughly in plan order
        per = _readers_per_group(plan, used, readers, self.on_cpu)
        self.jobs = [lambda g=g, r=r: self._read(g, r, per) for g in groups for r in range(per)]
        self.prefetch = not self.on_cpu and cuda_mem.enabled()
        # on an NVIDIA GPU, plain safetensors go straight to device memory (gpu_reads), past MLX's load
        self.direct = gpu_reads.reader(opts.batch_bytes)
        self.jobs += [self._work] * workers
        self.cond = threading.Condition()
        self.in_flight = 0  # bytes: inputs of claimed tasks until merged, outputs until written
        self.released: dict[int, int] = {}  # id(task) -> bytes it gave back when its merge finished
        self.claimed = 0  # tasks [0, claimed) have their bytes in the budget
        self.parts: dict[int, list[Optional[mx.array]]] = {}  # task index -> inputs read so far
        self.loaded: dict[int, list[mx.array]] = {}  # task index -> all inputs, evaluated
        self.unread = len(tasks)  # tasks not yet in self.loaded
        # task index -> (output, finite flag, inputs when the flag is false, for the report)
        # (and an event to wait for before writing it, while its pages move to host memory)
        self.results: dict[int, tuple[mx.array, mx.array, Optional[list[mx.array]], Optional[int]]] = {}
        self.error: Optional[BaseException] = None
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

    def __enter__(self) -> "_Pipeline":
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
            if self.direct is not None:
                for xs in list(self.parts.values()) + list(self.loaded.values()):
                    self.direct.release(xs)
                self.parts.clear()
                self.loaded.clear()
                self.direct.close()

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
                    self._wait(lambda: self.claimed > i or self._admits_next())
                    if self.claimed <= i:
                        self.in_flight += self.costs[id(self.tasks[self.claimed])]
                        self.claimed += 1
                        self.cond.notify_all()
            tensors = self._load(task, slots)
            with self.cond:
                parts = self.parts.setdefault(i, [None] * len(task.inputs))
                for k, x in zip(slots, tensors):
                    parts[k] = x
                if all(x is not None for x in parts):
                    self.loaded[i] = self.parts.pop(i)
                    self.unread -= 1
                    self.cond.notify_all()

    def _load(self, task: TensorTask, slots: list[int]) -> list[Union[mx.array, gpu_reads.Staged]]:
        """These inputs of a task: evaluated MLX arrays, or bytes staged in device memory."""
        models = self.plan.models
        out: list[Union[mx.array, gpu_reads.Staged]] = []
        try:
            for k in slots:
                m, name = task.inputs[k]
                staged = self.direct.stage(models[m], name) if self.direct is not None else None
                out.append(staged if staged is not None else models[m].load(name))
        except BaseException:
            if self.direct is not None:
                self.direct.release(out)
            raise
        lazy = [x for x in out if isinstance(x, mx.array)]
        try:
            mx.eval(lazy)
        except (RuntimeError, ValueError) as e:  # a file cut short or changed since its header was read
            files = sorted({str(_file_of(models[task.inputs[k][0]], task.inputs[k][1])) for k in slots})
            raise ModelError(
                f"{', '.join(files)}: reading the input tensors of {task.out.name} failed ({e}); the file was "
                "changed or truncated during the merge"
            ) from None
        if self.prefetch:  # start moving them to the GPU now, not when the merge first reads them
            cuda_mem.prefetch(lazy)
        return out

    def _work(self) -> None:
        vocab = self.plan.vocab
        # a GPU merge thread evaluates the tasks loaded so far together (up to a few): each
        # evaluation and read-back costs a fixed time that a 0.85B merge paid 147 times
        per_eval = CPU_TASKS_PER_EVAL if self.on_cpu else GPU_TASKS_PER_EVAL
        while True:
            with self.cond:
                self._wait(lambda: bool(self.loaded) or self.unread == 0)
                if not self.loaded:
                    return
                # the earliest tasks first: the writer waits for them
                batch = [(i, self.loaded.pop(i)) for i in sorted(self.loaded)[:per_eval]]
            staged = [x for _, tensors in batch for x in tensors if isinstance(x, gpu_reads.Staged)]
            try:
                graphs = []
                for i, tensors in batch:
                    tensors = [x.array() if isinstance(x, gpu_reads.Staged) else x for x in tensors]
                    # a GPU TIES merge's check that its selections were final is read back once
                    # for the whole batch, not once per tensor
                    with kernels.deferred_gate_checks() as gates:
                        out, ok = merge_task(self.plan, self.tasks[i], self.opts, vocab, list(tensors))
                    graphs.append((i, out, ok, tensors, gates))
                # the staged inputs' copies are evaluated too (also those a merge does not read)
                mx.eval([[out, ok, *tensors, *gates] for _, out, ok, tensors, gates in graphs])
            except BaseException:
                if staged:  # nothing may still read the staged memory when it goes back
                    mx.synchronize()
                    self.direct.release(staged)
                raise
            if staged:  # copied into MLX arrays by now: the device memory goes back
                self.direct.release(staged)
            done = []
            for i, out, ok, tensors, gates in graphs:
                if gates and not kernels.gates_final(gates):  # rare: merged again, selections finished
                    out, ok = merge_task(self.plan, self.tasks[i], self.opts, vocab, list(tensors))
                    mx.eval(out, ok)
                if not self.on_cpu:
                    memoryview(out)  # copies the output to host memory here, not in the writing thread
                # and on an NVIDIA GPU its pages start moving to the host in bulk (waited for before writing)
                moved = cuda_mem.to_host([out]) if self.prefetch else None
                kept = None if ok.item() else tensors  # the inputs, for the NaN/Inf report
                done.append((i, out, ok, kept, moved))
            del graphs, batch, tensors, gates  # no input outlives its merge here (the budget let it go)
            with self.cond:
                for i, out, ok, kept, moved in done:
                    task = self.tasks[i]
                    self.results[i] = (out, ok, kept, moved)
                    if kept is None:  # the inputs are gone: only the output waits (for its turn to be written)
                        self.released[id(task)] = self.costs[id(task)] - task.out.nbytes
                        self.in_flight -= self.released[id(task)]
                self.cond.notify_all()

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
            cuda_mem.wait(moved)
            yield task, out, ok, inputs

    def done(self, task: TensorTask) -> None:
        """The task's output is written: its bytes leave the budget (its inputs' bytes left it when
        the merge finished)."""
        with self.cond:
            self.in_flight -= self.costs[id(task)] - self.released.pop(id(task), 0)
            self.cond.notify_all()


def _file_of(model, name: str) -> Path:
    info = model.info(name)
    return info.file if getattr(info, "file", None) else model.path


def _reuse_freed_memory() -> None:
    """Ask glibc to serve every buffer from its heap and to keep freed memory for the next one.

    MLX's CPU allocator is malloc, and glibc gives buffers over 32 MB (and smaller ones, before
    its threshold adapts) fresh pages from mmap and unmaps them on free, so each tensor pays for
    zero-filled page faults: a compiled 3-model linear combination ran 2.2x faster on a 2-core
    x86-64 CPU with freed memory reused, and a TIES merge took a quarter less CPU time.
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
    # default trim threshold): keeping it saved little time and raised TIES' peak RSS 2.5 -> 3.5 GB
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
    plan: Plan, task: TensorTask, opts: MergeOptions, vocab=None, tensors: Optional[list[mx.array]] = None
) -> tuple[mx.array, mx.array]:
    """The lazy graph of one output tensor, and of a flag: no NaN/Inf in it (nor in inputs it may drop).

    `tensors` are the task's inputs when the caller has loaded them already."""
    if tensors is None:
        tensors = [plan.models[m].load(n) for m, n in task.inputs]
    ids = [m for m, _ in task.inputs]
    if task.vocab:
        if vocab is not None:
            tensors = vocab.align(task.out.name, tensors, ids)
        elif len({t.shape for t in tensors}) > 1:
            from . import tokenizer

            tensors = tokenizer.rectify_embeddings(task.out.name, tensors, task.base)
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
    watched = [out] if plan.method.propagates_nonfinite else [out, *tensors]
    flags = [all_finite(x) for x in watched if mx.issubdtype(x.dtype, mx.floating)]
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


def _report_nonfinite(plan: Plan, task: TensorTask, opts: MergeOptions, inputs: Optional[list[mx.array]] = None) -> None:
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
            f"tensor {task.out.name}: merged values reach beyond {task.out.dtype}'s range (largest {limit:g}), so they "
            "would be written as Inf; set the recipe's `out_dtype` (or `dtype`) to bfloat16 or float32, or lower its weights"
        )
    raise ModelError(
        f"tensor {task.out.name}: the merge produced NaN or Inf although no input has any; "
        "check the recipe's weights (e.g. a normalisation dividing by a sum near zero)"
    )


def _overflowed_range(plan: Plan, task: TensorTask, opts: MergeOptions, inputs: list[mx.array]) -> Optional[float]:
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
