#!/usr/bin/env bash
# End-to-end GPU figures for benchmarks/RESULTS.md, on an NVIDIA GPU host with MLX-CUDA installed
# (../shared/gpu/ brings it): start-up per process, the 0.85B family (every method, after one
# untimed run that fills the kernel cache), and a 7B-shape family (ties, dare_ties, linear).
# Usage, from the project root: bash benchmarks/gpu_e2e.sh [workdir]   (needs ~60 GB of disk)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
work=${1:-/tmp/mergekit-mlx-gpu}
echo "== start-up of a process"; python3 benchmarks/gpu_startup.py
echo "== 0.85B family"; python3 benchmarks/bench.py --device gpu --tools mlx --warmup --workdir "$work/085" | tail -8
echo "== 7B-shape family"
python3 benchmarks/bench.py --device gpu --tools mlx --hidden 4096 --layers 32 --intermediate 11008 --heads 32 \
  --kv-heads 32 --methods ties,dare_ties,linear --workdir "$work/7b" | tail -6
if grep -l "fallback" "$work"/*/runs/*.log 2>/dev/null; then echo "some run fell back from a GPU kernel: see the logs above"; fi
