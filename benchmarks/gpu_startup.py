"""What a process pays before its first GPU merge: the first use of each kernel group (compile or
load, then the self-check against the CPU fallback), timed in fresh processes.

Runs child processes on the GPU: the kernel cache empty, the same cache again (what every later
merge on the machine pays: cached binaries and first-use verdicts), the binaries cached but the
checks run again, and MLX's own JIT (`MERGEKIT_MLX_MLX_JIT=1`, compiled and checked in every
process). Usage, on a machine with MLX-CUDA or Metal: python benchmarks/gpu_startup.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, time
t0 = time.perf_counter()
import mlx.core as mx
from mergekit_mlx import kernels
t_import = time.perf_counter() - t0
mx.set_default_device(mx.gpu)
out = {"import": t_import}
for what in ("uniform", "select", "l1", "merge"):
    t = time.perf_counter()
    ok = kernels._gpu_call(kernels.backend(), what, lambda: True)
    out[what] = time.perf_counter() - t
    out[what + "_ok"] = bool(ok)
print(json.dumps(out))
"""


def child(env: dict) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, **env, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    got = json.loads(res.stdout.strip().splitlines()[-1])
    got["process"] = wall
    return got


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        runs = [
            ("kernel cache empty", {"MERGEKIT_MLX_CACHE": cache}),
            ("kernel cache filled (binaries and first-use verdicts)", {"MERGEKIT_MLX_CACHE": cache}),
            ("binaries cached, checks run again (MERGEKIT_MLX_RECHECK=1)",
             {"MERGEKIT_MLX_CACHE": cache, "MERGEKIT_MLX_RECHECK": "1"}),
            ("MLX JIT in each process", {"MERGEKIT_MLX_MLX_JIT": "1"}),
        ]
        rows = [(name, child(env)) for name, env in runs]
    cols = ["import", "uniform", "select", "l1", "merge", "process"]
    print("| run | " + " | ".join(f"{c} s" for c in cols) + " | checks passed |")
    print("|---|" + "---:|" * len(cols) + "---|")
    for name, r in rows:
        ok = all(r[w + "_ok"] for w in ("uniform", "select", "l1", "merge"))
        print(f"| {name} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + f" | {'yes' if ok else 'NO'} |")


if __name__ == "__main__":
    main()
