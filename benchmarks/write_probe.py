"""Ways to write a merged model's bytes (1.7 GB in 23 MB tensors by default) to one file, timed.

sequential: one thread appends; pool N: each tensor pwritten at its offset by a pool of N threads;
each with and without the file's blocks reserved first (fallocate), and with O_DIRECT.
Usage: python benchmarks/write_probe.py [--dir /tmp/write-probe] [--gb 1.7]
"""
from __future__ import annotations

import argparse
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

TENSOR = 5632 * 2048 * 2


def pwrite_all(fd: int, data, off: int) -> None:
    data = memoryview(data)
    while len(data):
        n = os.pwrite(fd, data, off)
        data, off = data[n:], off + n


def run(path: Path, bufs: list, threads: int, prealloc: bool, direct: bool = False) -> float:
    if path.exists():
        path.unlink()
    total = sum(len(b) for b in bufs)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_DIRECT if direct else 0), 0o644)
    if prealloc:
        os.posix_fallocate(fd, 0, total)
    t = time.perf_counter()
    offs = np.cumsum([0] + [len(b) for b in bufs])[:-1]
    if threads == 1:
        for b, o in zip(bufs, offs):
            pwrite_all(fd, b, int(o))
    else:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda bo: pwrite_all(fd, bo[0], int(bo[1])), zip(bufs, offs)))
    dt = time.perf_counter() - t
    os.close(fd)
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", type=Path, default=Path("/tmp/write-probe"))
    p.add_argument("--gb", type=float, default=1.7)
    p.add_argument("--quick", action="store_true", help="only sequential buffered and O_DIRECT with 4 threads")
    a = p.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    n = max(1, int(a.gb * 1e9 // TENSOR))
    distinct = []
    for i in range(min(n, 16)):  # page-aligned (O_DIRECT) and touched; reused beyond 16 tensors
        m = mmap.mmap(-1, TENSOR)
        m.write(np.full(TENSOR, i % 251, np.uint8).tobytes())
        distinct.append(m)
    bufs = [distinct[i % len(distinct)] for i in range(n)]
    total = n * TENSOR
    rows = []
    for threads in ((1,) if a.quick else (1, 4, 8)):
        for prealloc in ((True,) if a.quick else (True, False)):
            dt = run(a.dir / "out.bin", bufs, threads, prealloc)
            rows.append((f"{'sequential' if threads == 1 else f'pool {threads}'}, "
                         f"{'fallocate first' if prealloc else 'no fallocate'}", dt))
    for threads in ((4,) if a.quick else (1, 4)):
        try:
            rows.append((f"O_DIRECT, {'sequential' if threads == 1 else f'pool {threads}'}, fallocate first",
                         run(a.dir / "out.bin", bufs, threads, True, direct=True)))
        except OSError as e:
            rows.append((f"O_DIRECT refused ({e})", 0.0))
    os.system(f"df -T {a.dir} | tail -1")
    print(f"\n| way ({total / 1e9:.2f} GB, {n} tensors) | s | GB/s |\n|---|---:|---:|")
    for name, dt in rows:
        print(f"| {name} | {dt:.3f} | {total / dt / 1e9 if dt else 0:.1f} |")


if __name__ == "__main__":
    main()
