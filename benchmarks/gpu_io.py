"""Where the time of an I/O-bound GPU merge goes: each stage of the pipeline alone, on one family.

Stages: reading the inputs (MLX's lazy safetensors load on the CPU stream, by 1 or more threads),
the GPU reading host-loaded arrays (a three-input sum per tensor), copying outputs to host memory,
and writing them. Usage: python benchmarks/gpu_io.py FAMILY_DIR [--threads 1,3,6,12]
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import mlx.core as mx

from mergekit_mlx import cuda_mem


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def load_all(files: list[Path], threads: int, prefetch: bool = False) -> list[dict]:
    """Every tensor of every file, evaluated, read by `threads` threads (tensors dealt round-robin)."""
    jobs = [(i, k) for i, f in enumerate(files) for k in mx.load(str(f), stream=mx.cpu)]
    out = [dict() for _ in files]

    def work(r: int) -> None:
        # MLX ties a lazy array to the thread that made it: each thread opens the files itself
        lazies = [mx.load(str(f), stream=mx.cpu) for f in files]
        for i, k in jobs[r::threads]:
            a = lazies[i][k]
            mx.eval(a)
            if prefetch:
                cuda_mem.prefetch([a])
            out[i][k] = a

    ts = [threading.Thread(target=work, args=(r,)) for r in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("family", type=Path)
    p.add_argument("--threads", default="1,3,6,12")
    args = p.parse_args()
    files = [sorted((args.family / m).glob("*.safetensors")) for m in ("base", "ft1", "ft2")]
    flat = [f for fs in files for f in fs]
    size = sum(f.stat().st_size for f in flat)
    for f in flat:  # into the page cache
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    print(f"device {mx.default_device()}, inputs {size / 1e9:.2f} GB in {len(flat)} files")
    rows = []
    models = None
    for th in [int(x) for x in args.threads.split(",")]:
        dt, models = timed(lambda: load_all(flat, th))
        rows.append((f"read, {th} threads (mx.load, CPU stream)", dt, size))
        mx.clear_cache()
    names = list(models[0])
    nbytes_out = sum(models[0][k].nbytes for k in names)

    def gpu_sum():
        outs = []
        for k in names:
            o = models[0][k] + models[1][k] + models[2][k]
            mx.eval(o)
            outs.append(o)
        return outs

    dt, outs = timed(gpu_sum)
    rows.append(("GPU three-input sum per tensor, first touch of host-loaded inputs", dt, size + nbytes_out))
    dt, outs2 = timed(gpu_sum)
    rows.append(("the same again (inputs now touched by the GPU)", dt, size + nbytes_out))
    del outs2
    if cuda_mem.enabled():
        models = None
        mx.clear_cache()
        th = max(int(x) for x in args.threads.split(","))
        dt, models = timed(lambda: load_all(flat, th, prefetch=True))
        rows.append((f"read, {th} threads, each tensor prefetched to the GPU once read", dt, size))
        dt, _ = timed(gpu_sum)
        rows.append(("GPU three-input sum per tensor after the prefetch", dt, size + nbytes_out))
    dt, _ = timed(lambda: [memoryview(o) for o in outs])
    rows.append(("outputs to host memory (memoryview)", dt, nbytes_out))
    path = args.family.parent / "gpu_io_out.bin"

    def write():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(fd, 0, nbytes_out)
            for o in outs:
                os.write(fd, memoryview(o))
        finally:
            os.close(fd)

    dt, _ = timed(write)
    rows.append(("write outputs (preallocated file)", dt, nbytes_out))

    def write_parallel(threads=4):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        offsets, off = [], 0
        for o in outs:
            offsets.append(off)
            off += o.nbytes
        try:
            os.posix_fallocate(fd, 0, nbytes_out)

            def work(r):
                for j in range(r, len(outs), threads):
                    os.pwrite(fd, memoryview(outs[j]), offsets[j])

            ts = [threading.Thread(target=work, args=(r,)) for r in range(threads)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        finally:
            os.close(fd)

    os.unlink(path)
    for th in (4, 8):
        dt, _ = timed(lambda: write_parallel(th))
        rows.append((f"write outputs, {th} threads (pwrite at each tensor's offset)", dt, nbytes_out))
        os.unlink(path)
    print("| stage | s | GB/s |\n|---|---:|---:|")
    for name, dt, b in rows:
        print(f"| {name} | {dt:.3f} | {b / dt / 1e9:.1f} |")


if __name__ == "__main__":
    main()
