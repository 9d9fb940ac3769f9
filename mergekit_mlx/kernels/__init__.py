"""The hot paths of the merges, behind one small interface (what `methods/` and the pipeline call).

One interface, three backends: `mx.fast.metal_kernel` on an Apple GPU, CUDA on an NVIDIA GPU
(compiled once per machine by `cuda_compile`), and on the CPU native loops (`cpu_native`) or
compiled MLX graphs. Kernel sources are files in the repository's `kernels/` folder (`sources`).
Every GPU kernel group proves itself on first use against the CPU path and falls back on a
mismatch (`gpu.Group`, through the one mechanism of `checks`).

Documented rules (every backend follows them):
- Random numbers (`random`): a counter-based hash of (seed, stream, flat element index) to 32 bits;
  the uniform is the top 24 bits times 2**-24, exact in float32 and the same everywhere.
- Magnitude order (`topk`): |x| is compared as float32 bit patterns (NaN above inf); ties at the
  threshold are kept lowest flat index first.
- `fused_task_merge` follows mergekit 0.1.5's generalized task arithmetic, computed in float32
  and rounded once to the base's dtype.
- `weighted_sum` adds c_i * x_i in input order in float32 and rounds once to the first tensor's
  dtype; a product is fused into the add after it where the backend's compiler contracts (as it
  contracts MLX's own fused graphs: CUDA, Metal), rounded on its own where it does not (MLX's
  uncompiled operations, an x86-64 CPU without -march).

Modules: random (the generator), topk / selection / selection_cpu / selection_gpu (exact top-k),
task_plan / task_merge / task_merge_cpu / task_merge_gpu (the fused merge), weighted_sums (linear's
and slerp's sums of weighted tensors), sums (accurate sums), slerp (slerp's sums on the CPU),
bitlinear (BitNet's layer), staging (what the pipeline asks), finite_cpu (NaN/Inf on the CPU),
gpu (launch and first-use checks), checks, cpu_native, cuda_compile, cuda_memory, gpu_reads,
gpu_writes, host (the CPU loops' plumbing), sources.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import bitlinear, gpu, gpu_reads, gpu_writes, random, selection, task_merge, weighted_sums
from .finite_cpu import all_finite as host_all_finite
from .gpu import use_kernels
from .gpu_writes import DeviceTensor
from .random import random_mask, random_uniform, stream_id
from .selection import magnitude_threshold, topk_mask
from .slerp import host_sums as slerp_sums
from .slerp import host_sums_apply as slerp_sums_apply
from .staging import Staging, evaluate_together
from .sums import accurate_sum
from .task_merge import fused_task_merge
from .task_plan import Consensus, Sparsify
from .weighted_sums import fused_elementwise, weighted_sum

__all__ = [
    "Consensus",
    "DeviceTensor",
    "Sparsify",
    "Staging",
    "accurate_sum",
    "backend",
    "evaluate_together",
    "first_use_checks",
    "host_all_finite",
    "fused_elementwise",
    "fused_task_merge",
    "kernel_status",
    "kernels_enabled",
    "magnitude_threshold",
    "random_mask",
    "random_uniform",
    "slerp_sums",
    "slerp_sums_apply",
    "stream_id",
    "topk_mask",
    "use_kernels",
    "weighted_sum",
]

# the GPU kernel groups a method names in Method.gpu_kernels (each module registers its own)
GPU_GROUPS = {
    g.name: g for g in (random.GPU, selection.GPU, task_merge.L1_GPU, task_merge.MERGE_GPU, bitlinear.GPU, weighted_sums.GPU)
}


def kernels_enabled() -> bool:
    """False when MERGEKIT_MLX_NO_KERNELS=1, or inside use_kernels(False)."""
    return gpu.enabled()


def backend() -> str:
    """Which path runs now: 'metal', 'cuda' or 'cpu' (native loops and compiled graphs)."""
    return gpu.backend() or "cpu"


def first_use_checks(groups: Sequence[str]) -> None:
    """Run the first-use checks of these GPU kernel groups now (no-op on the CPU or when done).
    On a fresh NVIDIA machine what they launch, and the copy kernel the reads use, compile side
    by side first. Call it while no other thread uses MLX: a check computes its CPU reference
    under `mx.stream(mx.cpu)`, and MLX's default device is one for the whole process."""
    gpu_reads.prepare()
    gpu_writes.prepare()
    name = gpu.backend()
    if name is not None:
        gpu.check_groups(name, [GPU_GROUPS[what] for what in groups])


def kernel_status() -> dict[str, bool]:
    """Which GPU kernel groups passed their first-use check in this process (empty on the CPU)."""
    return gpu.status()
