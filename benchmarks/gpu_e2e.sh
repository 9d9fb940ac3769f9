#!/usr/bin/env bash
# End-to-end GPU figures for benchmarks/RESULTS.md, on an NVIDIA GPU host with MLX-CUDA installed
# (../shared/gpu/ brings it): the 0.85B family (every method, after one untimed run that fills the
# kernel cache, three timed runs each), direct reads into GPU memory against MLX's load (same
# outputs, both timed), and a 7B-shape family (ties, dare_ties, linear).
# Usage, from the project root: bash benchmarks/gpu_e2e.sh [workdir]   (~60 GB of disk)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
work=${1:-/tmp/mergekit-mlx-gpu}
echo "== 0.85B family"
python3 benchmarks/bench.py --device gpu --tools mlx --warmup --repeat 3 --workdir "$work/085" | grep -E "^  |^\|"
echo "== direct reads into GPU memory against MLX's load (0.85B)"
python3 benchmarks/gpu_reads_check.py "$work"/085/family-h2048-l16-i5632-v32000 --repeat 3 --work "$work/reads" | tail -7
rm -rf "$work/reads"
echo "== 7B-shape family"
python3 benchmarks/bench.py --device gpu --tools mlx --hidden 4096 --layers 32 --intermediate 11008 --heads 32 \
  --kv-heads 32 --methods ties,dare_ties,linear --workdir "$work/7b" | tail -6
if grep -l "fallback" "$work"/*/runs/*.log 2>/dev/null; then echo "some run fell back from a GPU kernel: see the logs above"; fi
