"""How fast this machine's page cache takes a model's worth of writes: one file or several at once.

A merge's output is written through the page cache on a host with cores to spare. This writes
`--gb` GB, in a new folder inside `--dir`, as the shard writer does (each file preallocated, 64 MiB writes from host memory, no
fsync) in three ways: one file by one thread; one file by several threads, each its own slice
(`pwrite` at its offsets); and the same bytes spread over several files, a thread each. Files are
removed after each way (their dirty pages dropped, never written back), and `sync` runs between
ways, so each way starts with no dirty pages.

    python3 benchmarks/page_cache_writes.py --dir /tmp/pcw --gb 12
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mergekit_mlx.formats.safetensors import _preallocate  # noqa: E402  (the writer's own fallocate)

CHUNK = 64 << 20


def write_span(path: Path, offset: int, nbytes: int, data: memoryview, flags: int = os.O_WRONLY) -> None:
    fd = os.open(path, flags)
    try:
        done = 0
        while done < nbytes:
            n = os.pwrite(fd, data[: min(CHUNK, nbytes - done)], offset + done)
            done += n
    finally:
        os.close(fd)


def one_way(parent: Path, total: int, files: int, threads_per_file: int, data: memoryview) -> float:
    """Seconds to write `total` bytes as `files` files, each by `threads_per_file` threads, in a new
    folder inside `parent` (removed after: nothing else in `parent` is touched)."""
    directory = Path(tempfile.mkdtemp(prefix="page-cache-writes-", dir=parent))
    os.sync()
    per_file = total // files
    jobs = []
    for f in range(files):
        path = directory / f"shard-{f}"
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
        _preallocate(fd, per_file)
        os.close(fd)
        per_thread = -(-per_file // threads_per_file // CHUNK) * CHUNK
        for t in range(threads_per_file):
            start = t * per_thread
            if start < per_file:
                jobs.append(threading.Thread(target=write_span, args=(path, start, min(per_thread, per_file - start), data)))
    began = time.perf_counter()
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    took = time.perf_counter() - began
    shutil.rmtree(directory, ignore_errors=True)
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dir", type=Path, default=Path("/tmp"), help="a folder on the disk to measure (the files go in a new folder inside)"
    )
    p.add_argument("--gb", type=float, default=4.0, help="GB written by each way (default 4)")
    p.add_argument("--repeat", type=int, default=2, help="runs of each way; the fastest counts (default 2)")
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    total = int(args.gb * 1e9) // CHUNK * CHUNK
    data = memoryview(np.random.default_rng(0).integers(0, 255, CHUNK, dtype=np.uint8))
    ways = [(1, 1), (1, 4), (2, 1), (3, 1), (4, 1), (8, 1)]
    print(f"{os.cpu_count()} cores; {total / 1e9:.1f} GB to {args.dir}")
    one_way(args.dir, min(total, 1 << 30), 1, 1, data)  # untimed: the first writes of a process run slower
    print("| files | threads a file | s | GB/s |")
    print("|---:|---:|---:|---:|")
    for files, threads in ways:
        best = min(one_way(args.dir, total, files, threads, data) for _ in range(args.repeat))
        print(f"| {files} | {threads} | {best:.2f} | {total / best / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
