"""The search's inputs, read once: every tensor of every input model held in memory, when they fit.

The bound: a search holds its inputs (their bytes as stored, e.g. bf16) plus one candidate's merged
weights (the model being scored; its float32 working copies are per tensor, under the pipeline's
batch budget). When the inputs and one candidate do not fit in the memory limit, the inputs stay on
disk and every candidate reads its tensors again through the streaming pipeline (bounded by its
batch budget; the page cache keeps what the machine can spare), which is slower but bounded. A
candidate itself must fit: it is scored as a model in memory.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import mlx.core as mx

from ..errors import OutputError
from ..formats.base import ModelSource
from ..plan import human_bytes

MEMORY_SHARE = 0.75  # of the memory available at the start, when no limit is given


class HeldModel(ModelSource):
    """An input model whose tensors were all read once and stay in memory; candidates read them
    from there, never from disk again (`release`, called after every merge, keeps them)."""

    parallel_reads = True

    def __init__(self, source: ModelSource):
        # no file offsets: the GPU reader would otherwise read the tensors from disk again
        infos = {n: replace(source.info(n), offset=None) for n in source.tensor_names()}
        super().__init__(source.path, source.config, infos)
        self.format = source.format
        self.source = source
        self.tensors: dict[str, mx.array] = {}
        for name in infos:
            x = source.load(name)
            mx.eval(x)
            self.tensors[name] = x
        source.release()

    def load(self, name: str) -> mx.array:
        return self.tensors[name]

    def input_paths(self) -> list[Path]:
        paths = getattr(self.source, "input_paths", None)
        return paths() if paths is not None else [self.path]

    @property
    def tokenizer_dir(self) -> Path | None:
        return self.source.tokenizer_dir


def model_bytes(model: ModelSource) -> int:
    return sum(model.info(n).nbytes for n in model.tensor_names())


def available_memory() -> int:
    """Bytes this process may still use: a GPU's memory where MLX reports it (Apple), else the
    memory the system says is available (Linux), else the physical memory."""
    if mx.default_device().type == mx.DeviceType.gpu:
        size = mx.device_info().get("memory_size")
        if isinstance(size, int) and size > 0:
            return size
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def hold_inputs(
    models: dict[str, ModelSource], candidate_bytes: int, batch_bytes: int, limit: int | None
) -> tuple[dict[str, ModelSource], str]:
    """The inputs for every candidate's merge, by reference: held in memory when they and one
    candidate fit within `limit` (default: MEMORY_SHARE of the memory available now), else the
    models as opened (streamed from disk for each candidate). Also one line saying which and why."""
    limit = limit if limit is not None else int(MEMORY_SHARE * available_memory())
    distinct = {id(m): m for m in models.values()}
    inputs = sum(model_bytes(m) for m in distinct.values())
    if candidate_bytes + min(batch_bytes, candidate_bytes) > limit:
        raise OutputError(
            f"one candidate is {human_bytes(candidate_bytes)} and must fit in memory to be scored, with the merge's "
            f"batch of {human_bytes(min(batch_bytes, candidate_bytes))}; the memory limit is {human_bytes(limit)} "
            "(raise --memory-limit, or search on a machine with more memory)"
        )
    if inputs + candidate_bytes > limit:
        return dict(models), (
            f"inputs streamed from disk for every candidate: {human_bytes(inputs)} of inputs and a "
            f"{human_bytes(candidate_bytes)} candidate exceed the memory limit of {human_bytes(limit)}"
        )
    held = {key: HeldModel(m) for key, m in distinct.items()}
    return {ref: held[id(m)] for ref, m in models.items()}, (
        f"inputs held in memory: {human_bytes(inputs)}, read once, and a {human_bytes(candidate_bytes)} candidate "
        f"(memory limit {human_bytes(limit)})"
    )
