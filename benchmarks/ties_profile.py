"""One TIES merge of 64M-element bf16 tensors (three task models, density 0.5), three times, for a
profiler on an NVIDIA GPU, e.g.:

    ncu --clock-control none -k regex:"select_pass|task_merge" -c 2 --section SpeedOfLight \\
        --section SchedulerStats python3 benchmarks/ties_profile.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from mergekit_mlx import kernels  # noqa: E402


def family(n: int = 1 << 26, k: int = 3) -> tuple[mx.array, list[mx.array]]:
    """A bf16 base and k task models near it (as kernels_bench.py's), evaluated."""
    keys = mx.random.split(mx.random.key(0), k + 2)
    base = mx.random.normal((n,), key=keys[1]).astype(mx.bfloat16)
    others = [(base.astype(mx.float32) + 0.01 * mx.random.normal((n,), key=keys[2 + i])).astype(mx.bfloat16)
              for i in range(k)]
    mx.eval(base, *others)
    return base, others


def main() -> None:
    base, others = family()
    k = len(others)
    for _ in range(3):
        mx.eval(kernels.fused_task_merge(base, others, [1.0 / k] * k, densities=[0.5] * k, lam=1.0, seed=1,
                                         sparsify="magnitude", consensus="sum", normalize=True, rescale=False))
    print("first-use checks:", kernels.kernel_status() or "none (CPU path)")


if __name__ == "__main__":
    main()
