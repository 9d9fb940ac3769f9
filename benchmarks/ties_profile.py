"""One TIES merge of 64M-element bf16 tensors (three task models, density 0.5), three times, for a
profiler on an NVIDIA GPU, e.g.:

    ncu --clock-control none -k regex:"select_pass|task_merge" -c 2 --section SpeedOfLight \\
        --section SchedulerStats python3 benchmarks/ties_profile.py

Also the inputs (`family`) and the batch of merges launched together (`ties_batch`) that
kernels_bench.py times.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx

from mergekit_mlx import kernels
from mergekit_mlx.kernels import gpu, selection_gpu, task_merge, task_merge_gpu
from mergekit_mlx.kernels.task_plan import Keep, TaskMerge, plain_divisor


def family(n: int = 1 << 26, k: int = 3, seed: int = 0) -> tuple[mx.array, list[mx.array]]:
    """A bf16 base and k task models near it (as kernels_bench.py's), evaluated."""
    keys = mx.random.split(mx.random.key(seed), k + 2)
    base = mx.random.normal((n,), key=keys[1]).astype(mx.bfloat16)
    others = [(base.astype(mx.float32) + 0.01 * mx.random.normal((n,), key=keys[2 + i])).astype(mx.bfloat16) for i in range(k)]
    mx.eval(base, *others)
    return base, others


_made_streams: list = []


def _streams(count: int) -> list:
    """The default stream and count - 1 more on the same device, made once."""
    while len(_made_streams) < count - 1:
        _made_streams.append(mx.new_stream(mx.default_device()))
    return [mx.default_stream(mx.default_device())] + _made_streams[: count - 1]


def ties_batch(
    base: mx.array,
    others: list[mx.array],
    batch: int = 8,
    pipelined: bool = False,
    second: tuple[mx.array, list[mx.array]] | None = None,
    streams: int = 1,
) -> tuple[list[mx.array], float, int]:
    """TIES (density 0.5) on `batch` tensors launched together: one evaluation and one read-back
    of the gates for all of them, as a merge that evaluates a batch of tensors at once.
    pipelined: each tensor's evaluation starts as soon as it is launched (mx.async_eval), so
    building the next tensor's graph on the host overlaps the GPU's work.
    second: another family the tensors alternate with, so that, as in a real merge, no tensor's
    inputs are still in the GPU's L2 cache from the tensor before.
    streams: tensor j is merged on GPU stream j % streams, so one tensor's small stages (sample,
    sort, sums, resolve) can run while another's passes stream through memory.
    Returns the outputs (not evaluated when a gate said no), the host's seconds launching, and how
    many of the tensors were final at the first evaluation (the rest were merged again)."""
    fams = [(base, others)] + ([second] if second is not None else [])
    k, n = len(others), base.size
    backend = gpu.backend()
    weights = (1.0 / k,) * k
    div = plain_divisor(list(weights))
    mag, ks = list(range(k)), [n // 2] * k
    started, host = [], 0.0
    for j in range(batch):
        base, others = fams[j % len(fams)]
        h0 = time.perf_counter()
        plans, _ = task_merge.plan_models(base, others, None, [0.5] * k, False, 1, list(range(k)), None)
        for p in plans:
            p.mode = Keep.MAGNITUDE
        job = TaskMerge(base, tuple(others), weights, True, True, 1.0, div)
        with mx.stream(_streams(streams)[j % streams]):
            started.append((job, plans, *task_merge_gpu.ties_start(backend, job, plans, mag, ks)))
            if pipelined:
                mx.async_eval(started[-1][2], started[-1][3])
        host += time.perf_counter() - h0
    mx.eval([s[2] for s in started], [s[3] for s in started])
    words = mx.concatenate([s[3] for s in started]).tolist()
    w = len(words) // batch
    outs = [
        task_merge_gpu.ties_finish(backend, job, plans, mag, ks, o, words[j * w : (j + 1) * w], gr)
        for j, (job, plans, o, _, gr) in enumerate(started)
    ]
    return outs, host, sum(selection_gpu.final(words[j * w : (j + 1) * w]) for j in range(batch))


def main() -> None:
    base, others = family()
    k = len(others)
    for _ in range(3):
        mx.eval(
            kernels.fused_task_merge(
                base,
                others,
                [1.0 / k] * k,
                densities=[0.5] * k,
                lam=1.0,
                seed=1,
                sparsify="magnitude",
                consensus="sum",
                normalize=True,
                rescale=False,
            )
        )
    print("first-use checks:", kernels.kernel_status() or "none (CPU path)")


if __name__ == "__main__":
    main()
