"""Where the wall time of pipelined TIES merges goes on an NVIDIA GPU: the host's time to launch
each tensor, and (under `nsys`) the GPU's kernels and the idle time between them.

    python3 benchmarks/ties_gaps.py                  # host launch time vs wall time per tensor
    nsys profile -o /tmp/ties --force-overwrite true python3 benchmarks/ties_gaps.py
    python3 benchmarks/ties_gaps.py --report /tmp/ties.nsys-rep   # the last batch's kernels

64M-element bf16 tensors, three task models, density 0.5, eight tensors a batch, each tensor's
evaluation started as soon as it is launched (as `kernels_bench.py`'s pipelined row).
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run(batches: int, batch: int) -> None:
    import mlx.core as mx

    from mergekit_mlx import kernels

    n, k = 1 << 26, 3
    keys = mx.random.split(mx.random.key(0), k + 2)
    base = mx.random.normal((n,), key=keys[1]).astype(mx.bfloat16)
    others = [(base.astype(mx.float32) + 0.01 * mx.random.normal((n,), key=keys[2 + i])).astype(mx.bfloat16)
              for i in range(k)]
    mx.eval(base, *others)
    gpu = kernels._gpu_backend()
    div = kernels._plain_divisor([1.0 / k] * k)
    for b in range(batches):
        t0 = time.perf_counter()
        started, host = [], 0.0
        for _ in range(batch):
            h0 = time.perf_counter()
            plans, _ = kernels._plan_models(base, others, None, [0.5] * k, False, 1, list(range(k)), None)
            for p in plans:
                p.mode = kernels._MAGNITUDE
            args = (gpu, base, others, [1.0 / k] * k, plans, list(range(k)), [n // 2] * k, True, True, 1.0, div)
            started.append((args, *kernels._gpu_ties_start(*args)))
            mx.async_eval(started[-1][1], started[-1][2])
            host += time.perf_counter() - h0
        mx.eval([s[1] for s in started], [s[2] for s in started])
        words = mx.concatenate([s[2] for s in started]).tolist()
        w = len(words) // batch
        outs = [kernels._gpu_ties_finish(*a, o, words[j * w:(j + 1) * w], gr) for j, (a, o, _, gr) in enumerate(started)]
        mx.eval(outs)
        wall = time.perf_counter() - t0
        print(f"batch {b}: {wall / batch * 1e3:.3f} ms a tensor, of which the host launching it "
              f"{host / batch * 1e3:.3f} ms")


def report(rep: str, batch: int) -> None:
    """The last `batch` TIES merges of the trace: GPU time per kernel and the idle time between."""
    out = subprocess.run(["nsys", "stats", "--report", "cuda_gpu_trace", "--format", "csv", "--output", "-",
                          "--force-export", "true", rep], capture_output=True, text=True).stdout
    lines = out[out.index("Start (ns)") if "Start (ns)" in out else 0:]
    rows = list(csv.DictReader(io.StringIO(lines)))
    kern = [r for r in rows if r.get("Name") and not r["Name"].startswith("[CUDA")]
    starts = [i for i, r in enumerate(kern) if r["Name"].startswith("mk_select_sample")]
    if len(starts) < batch:
        print("fewer TIES merges in the trace than a batch")
        return
    span = kern[starts[-batch]:]
    t_first = int(span[0]["Start (ns)"])
    t_last = max(int(r["Start (ns)"]) + int(r["Duration (ns)"]) for r in span)
    busy, count = defaultdict(int), defaultdict(int)
    idle, end = 0, t_first
    for r in span:
        s, d = int(r["Start (ns)"]), int(r["Duration (ns)"])
        idle += max(0, s - end)
        end = max(end, s + d)
        name = r["Name"].split("(")[0].split("<")[0].replace("void ", "")[:40]
        busy[name] += d
        count[name] += 1
    print(f"last {batch} TIES merges: {(t_last - t_first) / batch / 1e3:.1f} us a tensor on the GPU, "
          f"of which idle {idle / batch / 1e3:.1f} us")
    print("| kernel | launches a tensor | us a tensor |\n|---|---:|---:|")
    for name, d in sorted(busy.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {count[name] / batch:.1f} | {d / batch / 1e3:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--report", help="an nsys report of a run of this script: print its last batch")
    a = ap.parse_args()
    if a.report:
        report(a.report, a.batch)
    else:
        run(a.batches, a.batch)


if __name__ == "__main__":
    main()
