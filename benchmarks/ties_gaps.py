"""Where the wall time of pipelined TIES merges goes on an NVIDIA GPU: the host's time to launch
each tensor, and (traced) the GPU's kernels and the idle time between them.

    python3 benchmarks/ties_gaps.py            # host launch time vs wall time per tensor
    python3 benchmarks/ties_gaps.py --trace    # also the last batch's kernels, traced through
                                               # PyTorch's profiler (CUPTI sees every library's)

64M-element bf16 tensors, three task models, density 0.5, eight tensors a batch, each tensor's
evaluation started as soon as it is launched (as `kernels_bench.py`'s pipelined row).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from itertools import pairwise
from pathlib import Path


def run(batches: int, batch: int, trace: bool, streams: int = 1) -> None:
    import mlx.core as mx
    from ties_profile import family, ties_batch

    base, others = family()
    second = family(seed=1)  # tensors alternate between two families: nothing carried over in L2
    prof = None
    for b in range(batches):
        if trace and b == batches - 1:
            import torch.profiler as tp

            prof = tp.profile(activities=[tp.ProfilerActivity.CUDA])
            prof.__enter__()
        t0 = time.perf_counter()
        outs, host, final = ties_batch(base, others, batch, pipelined=True, second=second, streams=streams)
        mx.eval(outs)
        wall = time.perf_counter() - t0
        print(f"batch {b}: {wall / batch * 1e3:.3f} ms a tensor, of which the host launching it "
              f"{host / batch * 1e3:.3f} ms; {final} of {batch} final at once")
    if prof is not None:
        prof.__exit__(None, None, None)
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "ties_trace.json")
            prof.export_chrome_trace(path)
            report(path, batch)


def report(path: str, batch: int) -> None:
    """The traced batch: GPU time per kernel and the GPU's idle time between kernels."""
    events = json.loads(Path(path).read_text())["traceEvents"]
    kern = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    if not kern:
        print("no kernels in the trace")
        return
    t_first, t_last = kern[0]["ts"], max(e["ts"] + e["dur"] for e in kern)
    busy, count = defaultdict(float), defaultdict(int)
    idle, end = 0.0, t_first
    for e in kern:
        idle += max(0.0, e["ts"] - end)
        end = max(end, e["ts"] + e["dur"])
        name = e["name"].split("(")[0].split("<")[0].replace("void ", "")[:40]
        busy[name] += e["dur"]
        count[name] += 1
    print(f"traced batch: {(t_last - t_first) / batch:.1f} us a tensor from the first kernel to the last, "
          f"of which the GPU idle {idle / batch:.1f} us")
    print("| kernel | launches a tensor | us a tensor |\n|---|---:|---:|")
    for name, d in sorted(busy.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {count[name] / batch:.1f} | {d / batch:.1f} |")
    gaps = defaultdict(list)
    for a, b in pairwise(kern):
        gaps[(a["name"][:24], b["name"][:24])].append(b["ts"] - (a["ts"] + a["dur"]))
    print("| after | before | mean gap (us) | times |\n|---|---|---:|---:|")
    for (a, b), g in sorted(gaps.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {a} | {b} | {sum(g) / len(g):.1f} | {len(g)} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--trace", action="store_true", help="trace the last batch's kernels (needs PyTorch)")
    ap.add_argument("--streams", type=int, default=1, help="GPU streams the tensors alternate between")
    a = ap.parse_args()
    run(a.batches, a.batch, a.trace, a.streams)


if __name__ == "__main__":
    main()
