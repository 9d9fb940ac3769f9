"""Reading inputs into an NVIDIA GPU's memory, alone: from the files' mapped pages against through
page-locked buffers (`mergekit_mlx/kernels/gpu_reads.py`).

Reads every tensor of a family's models (page cache warm) with the merge's reader, `--threads`
threads taking tensors in turn, each tensor's device memory handed back once read, and prints per
way the seconds, GB/s and the process's CPU seconds, fastest of `--repeat`; then checks that both
ways put the same bytes on the device (a position-weighted sum of every tensor's bytes, on the GPU).

    python3 benchmarks/gpu_reads_bench.py /dev/shm/fam7b --threads 12 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def tensors(family: Path) -> list[tuple[object, str]]:
    from mergekit_mlx.formats import open_model

    out = []
    for d in sorted(p for p in family.iterdir() if (p / "config.json").exists()):
        model = open_model(d)
        out += [(model, name) for name in model.tensor_names()]
    return sorted(out, key=lambda mn: -mn[0].info(mn[1]).nbytes)  # the largest first, as a merge's plan tends to


def read_all(reader, items, threads: int, checksum: bool) -> tuple[float, float, int, list]:
    """(seconds, CPU seconds, bytes, per-tensor sums when checksum) of reading every tensor once."""
    import mlx.core as mx

    def one(item):
        model, name = item
        staged = reader.stage(model, name)
        total = None
        if checksum and staged is not None:  # a position-weighted sum of the bytes, on the GPU (one thread drives MLX)
            with lock:
                b = staged.array().reshape(-1).view(mx.uint8).astype(mx.uint32)
                weights = mx.arange(b.size, dtype=mx.uint32) % 65521 + 1
                total = int(mx.sum(b * weights).item())
        if staged is not None:
            reader.release([staged])
        return (staged.nbytes if staged is not None else 0), total

    import threading

    lock = threading.Lock()
    cpu0, t0 = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        got = list(pool.map(one, items))
    reader.drv.sync()
    return time.perf_counter() - t0, time.process_time() - cpu0, sum(n for n, _ in got), [s for _, s in got]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("family", type=Path, help="a family directory (benchmarks/make_family.py)")
    p.add_argument("--threads", type=int, default=12)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    import mlx.core as mx

    from mergekit_mlx.kernels import gpu_reads

    if not (hasattr(mx, "cuda") and mx.cuda.is_available()):
        sys.exit("gpu_reads_bench: needs MLX's CUDA backend on an NVIDIA GPU")
    items = tensors(args.family)
    files = {model.info(name).file for model, name in items}
    for f in files:  # into the page cache
        with open(f, "rb", buffering=0) as fh:
            while fh.read(1 << 26):
                pass
    rows, sums = [], {}
    for way, env in (("page-locked buffers", "1"), ("mapped pages", "")):
        os.environ[gpu_reads.ENV_NO_MAPPED] = env
        reader = gpu_reads.reader(1 << 30)
        if reader is None:
            sys.exit("gpu_reads_bench: the direct reads are off or failed their check here")
        if env == "" and not reader.mapped:
            rows.append((way, None, None, 0))
            continue
        runs = [read_all(reader, items, args.threads, checksum=False) for _ in range(args.repeat)]
        s, cpu, nbytes, _ = min(runs)
        rows.append((way, s, cpu, nbytes))
        sums[way] = read_all(reader, items, args.threads, checksum=True)[3]
        reader.close()
    print(f"\n{len(items)} tensors of {args.family}, {args.threads} threads, fastest of {args.repeat}\n")
    print("| way | s | GB/s | CPU s |\n|---|---:|---:|---:|")
    for way, s, cpu, nbytes in rows:
        if s is None:
            print(f"| {way} | not taken here (the driver refuses read-only pages, or the check failed) | | |")
        else:
            print(f"| {way} | {s:.3f} | {nbytes / s / 1e9:.1f} | {cpu:.2f} |")
    if len(sums) == 2:
        a, b = sums.values()
        print(f"\nbytes on the device: {'identical' if a == b else 'DIFFERENT'} (sums of {len(a)} tensors)")


if __name__ == "__main__":
    main()
