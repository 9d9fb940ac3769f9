"""One TIES merge of 64M-element bf16 tensors (three task models, density 0.5), three times, for a
profiler on an NVIDIA GPU, e.g.:

    ncu --clock-control none -k regex:"select_pass|task_merge" -c 2 --section SpeedOfLight \
        --section SchedulerStats python3 benchmarks/ties_profile.py
"""
import sys, mlx.core as mx
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mergekit_mlx import kernels
n, K = 1 << 26, 3
ks = mx.random.split(mx.random.key(0), K + 2)
base = mx.random.normal((n,), key=ks[1]).astype(mx.bfloat16)
others = [(base.astype(mx.float32) + 0.01 * mx.random.normal((n,), key=ks[2 + i])).astype(mx.bfloat16) for i in range(K)]
mx.eval(base, *others)
for _ in range(3):
    out = kernels.fused_task_merge(base, others, [1.0 / K] * K, densities=[0.5] * K, lam=1.0, seed=1,
                                   sparsify="magnitude", consensus="sum", normalize=True, rescale=False)
    mx.eval(out)
print("ok", kernels.kernel_status())
