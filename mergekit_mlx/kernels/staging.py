"""What the streaming executor asks of the kernels: where inputs wait between reading and merging,
and the merge of several tensors evaluated together.

On an NVIDIA GPU, plain safetensors go straight into device memory (`gpu_reads`), other inputs are
prefetched to the device as soon as they are read, and outputs go to a writer that copies them
from device memory itself (`gpu_writes`) or start moving to host memory before they are written
(`cuda_memory`); a GPU TIES merge's check that its selections were final is read back once for a
whole batch. Everywhere else these are plain MLX loads and evaluations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx

from . import cuda_memory, gpu_reads, gpu_writes, task_merge_gpu
from .gpu_reads import Staged
from .gpu_writes import DeviceTensor

Input = mx.array | Staged  # a read input: an evaluated MLX array, or bytes staged in device memory


class Staging:
    """One merge run's inputs between the readers and the merge threads."""

    def __init__(self, batch_bytes: int, on_gpu: bool, writer_copies: bool = False):
        """`writer_copies`: outputs go to host memory for a writer that takes them still in device
        memory (`DeviceTensor`s) and copies them itself."""
        self.prefetch = on_gpu and cuda_memory.enabled()
        self.direct = gpu_reads.reader(batch_bytes)
        self.device_outputs = writer_copies and gpu_writes.enabled()  # an NVIDIA GPU, checked

    def read(self, model, name: str) -> Input:
        """The tensor `name` of `model` (a format's reader): staged in device memory, or MLX's lazy load."""
        staged = self.direct.stage(model, name) if self.direct is not None else None
        return staged if staged is not None else model.load(name)

    def settle(self, inputs: Sequence[Input]) -> None:
        """Evaluate the lazily loaded inputs (in the reader's thread); on a GPU start moving them to it."""
        lazy = [x for x in inputs if isinstance(x, mx.array)]
        mx.eval(lazy)
        if self.prefetch:  # start moving them to the GPU now, not when the merge first reads them
            cuda_memory.prefetch(lazy)

    @staticmethod
    def arrays(inputs: Sequence[Input]) -> list[mx.array]:
        """The inputs as MLX arrays (staged bytes become lazy copies: call it in the merging thread)."""
        return [x.array() if isinstance(x, Staged) else x for x in inputs]

    def release(self, inputs: Sequence[Input], *, synchronize: bool = False) -> None:
        """Hand staged device memory back: after the evaluation that copied it, or (synchronize)
        after whatever may still read it."""
        staged = [x for x in inputs if isinstance(x, Staged)]
        if self.direct is not None and staged:
            if synchronize:
                mx.synchronize()
            self.direct.release(staged)

    def to_writer(self, outs: Sequence[mx.array]) -> list[tuple[mx.array | DeviceTensor, int | None]]:
        """Evaluated outputs as the writer gets them, each with an event to `wait` for before it is
        written (or None): on an NVIDIA GPU, DeviceTensors for a writer that copies them itself, else
        the arrays, whose bytes MLX copies to host memory here (not in the writing thread) and whose
        pages then start moving there in bulk."""
        if self.device_outputs:
            return [(t, None) for t in gpu_writes.device_tensors(outs)]
        handed = []
        for out in outs:
            memoryview(out)
            handed.append((out, cuda_memory.to_host([out]) if self.prefetch else None))
        return handed

    @staticmethod
    def wait(event: int | None) -> None:
        cuda_memory.wait(event)

    def close(self) -> None:
        if self.direct is not None:
            self.direct.close()


def evaluate_together(
    merges: Sequence[Callable[[], tuple[mx.array, ...]]], also: Sequence[mx.array] = ()
) -> list[tuple[mx.array, ...]]:
    """Build each merge's lazy graph (a tuple of arrays, its output first), evaluate them all with
    `also` in one go, and return them evaluated. A GPU TIES merge inside defers its check that its
    selections were final to this one evaluation; a merge whose check fails (rare) is built and
    evaluated again."""
    built = []
    for fn in merges:
        with task_merge_gpu.deferred_gate_checks() as gates:
            arrays = fn()
        built.append((fn, arrays, gates))
    mx.eval([[*arrays, *gates] for _, arrays, gates in built], list(also))
    done = []
    for fn, arrays, gates in built:
        if gates and not task_merge_gpu.gates_final(gates):  # merged again, selections finished
            arrays = fn()
            mx.eval(*arrays)
        done.append(arrays)
    return done
