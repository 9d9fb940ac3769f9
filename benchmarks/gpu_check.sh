#!/usr/bin/env bash
# Kernel checks on an NVIDIA GPU with MLX-CUDA installed (../shared/gpu/ brings it to the machine):
# the kernel tests on the GPU, CPU-vs-GPU agreement (kernels, then whole merges through the command
# line), and timings against plain MLX and the floor.
# Usage, from the project root: bash benchmarks/gpu_check.sh [elements]   (log also in $OUT if set)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log=${OUT:-/tmp}/gpu_check.log
: > "$log"
status=0
step() { echo "== $1" | tee -a "$log"; shift; "$@" 2>&1 | tee -a "$log"; [[ ${PIPESTATUS[0]} == 0 ]] || status=1; }
step "hardware" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step "MLX" python3 -c 'import mlx.core as mx; print("MLX", mx.__version__, "default device", mx.default_device())'
step "kernel tests on the GPU (default device)" python3 -m pytest -q -p no:cacheprovider -m gpu tests
step "CPU vs GPU agreement" python3 benchmarks/gpu_agreement.py
step "a whole merge on the GPU against the CPU (CLI)" python3 benchmarks/gpu_merge_check.py
step "timings" python3 benchmarks/kernels_bench.py --elements "${1:-67108864}" --reps 5 --stages
echo "gpu_check status: $status" | tee -a "$log"
exit "$status"
