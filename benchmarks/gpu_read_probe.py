"""Ways to get safetensors bytes from the page cache into MLX arrays on an NVIDIA GPU, timed.

Each way reads the same files (3 x ~1.7 GB of 23 MB tensors by default, like the 0.85B family)
with T threads, tensors dealt round-robin:
  mx.load        MLX's lazy load on the CPU stream (what the executor does), then a prefetch
  pread fresh    os.preadv into a new numpy buffer per tensor (host page faults)
  pread reuse    os.preadv into one reused numpy buffer per thread (the page-cache copy alone)
  pinned+copy    os.preadv into a pinned buffer per thread, then a copy engine moves it into a
                 GPU-resident MLX array (allocated up front, as a recycled buffer would be)
  into managed   os.preadv straight into those GPU-resident MLX arrays (pages migrate back)
Usage: python benchmarks/gpu_read_probe.py [--dir /tmp/probe] [--threads 12] [--gb 1.7]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mergekit_mlx import cuda_mem

TENSOR = 5632 * 2048 * 2


def make_files(d: Path, gb: float) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    n = max(1, int(gb * 1e9 // TENSOR))
    files = []
    for m in range(3):
        f = d / f"m{m}.safetensors"
        if not f.exists():
            arrs = {f"t{i}": mx.random.normal((5632, 2048), key=mx.random.key(m * 1000 + i)).astype(mx.bfloat16)
                    for i in range(n)}
            mx.save_safetensors(str(f), arrs)
            del arrs
        files.append(f)
    return files


def jobs_of(files: list[Path]) -> list[tuple[Path, str, int, int]]:
    import json
    out = []
    for f in files:
        with open(f, "rb") as fh:
            hl = int.from_bytes(fh.read(8), "little")
            hdr = json.loads(fh.read(hl))
        for k, v in hdr.items():
            if k == "__metadata__":
                continue
            b, e = v["data_offsets"]
            out.append((f, k, 8 + hl + b, e - b))
    return out


def run_threads(T: int, work) -> float:
    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(r,)) for r in range(T)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def pread_into(fd: int, buf: np.ndarray, off: int) -> None:
    mv = memoryview(buf).cast("B")
    done = 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done:done + (64 << 20)]], off + done)
        if n <= 0:
            raise OSError("short read")
        done += n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", type=Path, default=Path("/tmp/probe"))
    p.add_argument("--threads", type=int, default=12)
    p.add_argument("--gb", type=float, default=1.7)
    a = p.parse_args()
    files = make_files(a.dir, a.gb)
    jobs = jobs_of(files)
    total = sum(j[3] for j in jobs)
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    T = a.threads
    print(f"{mx.default_device()}, {len(jobs)} tensors, {total / 1e9:.2f} GB, {T} threads", flush=True)
    rows = []

    # mx.load (current)
    out: list = [None] * len(jobs)

    def w_load(r):
        lz = {f: mx.load(str(f), stream=mx.cpu) for f in files}
        for i in range(r, len(jobs), T):
            f, k, _, _ = jobs[i]
            x = lz[f][k]
            mx.eval(x)
            cuda_mem.prefetch([x])
            out[i] = x
    for rep in range(2):
        dt = run_threads(T, w_load)
        mx.synchronize()
        rows.append((f"mx.load + prefetch (run {rep + 1}, {'cache cleared' if rep == 0 else 'buffers recycled'})", dt))
        out = [None] * len(jobs)
        if rep == 0:
            mx.clear_cache()
    mx.clear_cache()

    fds = {f: os.open(f, os.O_RDONLY) for f in files}

    def w_fresh(r):
        for i in range(r, len(jobs), T):
            f, _, off, nb = jobs[i]
            b = np.empty(nb, np.uint8)
            pread_into(fds[f], b, off)
    rows.append(("pread into a fresh numpy buffer", run_threads(T, w_fresh)))

    bufs = [np.ones(TENSOR + (1 << 20), np.uint8) for _ in range(T)]

    def w_reuse(r):
        for i in range(r, len(jobs), T):
            f, _, off, nb = jobs[i]
            pread_into(fds[f], bufs[r][:nb], off)
    rows.append(("pread into a reused numpy buffer", run_threads(T, w_reuse)))

    def w_mlx_cpu(r):
        for i in range(r, len(jobs), T):
            f, _, off, nb = jobs[i]
            x = mx.zeros((nb,), dtype=mx.uint8, stream=mx.cpu)
            mx.eval(x)
            pread_into(fds[f], np.frombuffer(memoryview(x), np.uint8), off)
            out[i] = x
    rows.append(("pread into a new MLX array (zeros, CPU stream)", run_threads(T, w_mlx_cpu)))
    out = [None] * len(jobs)

    drv = cuda_mem._get() if mx.default_device() == mx.gpu else None
    if drv is None:
        rows.append(("(no CUDA driver: the GPU ways are skipped)", 0.0))
    else:
        gpu_ways(jobs, fds, T, drv, rows)
    report(rows, T, total)


def report(rows, T, total) -> None:
    print(f"\n| way ({T} threads, {total / 1e9:.2f} GB) | s | GB/s |\n|---|---:|---:|")
    for name, dt in rows:
        print(f"| {name} | {dt:.3f} | {total / dt / 1e9 if dt > 0.01 else 0:.1f} |")


def gpu_ways(jobs, fds, T, drv, rows) -> None:
    # GPU-resident MLX destinations, allocated up front
    dst = [mx.zeros((nb,), dtype=mx.uint8) for (_, _, _, nb) in jobs]
    mx.eval(dst)
    mx.synchronize()
    t0 = time.perf_counter()
    ptrs = [np.frombuffer(memoryview(x), np.uint8).ctypes.data for x in dst]
    rows.append(("pointers of the GPU arrays (memoryview)", time.perf_counter() - t0))
    lib = drv.lib
    pinned = []
    for _ in range(T):
        hp = ctypes.c_void_p()
        rc = lib.cuMemHostAlloc(ctypes.byref(hp), ctypes.c_size_t(TENSOR + (1 << 20)), ctypes.c_uint(0))
        assert rc == 0, rc
        pinned.append(hp.value)

    def w_pinned(r):
        s = drv.stream()
        hb = np.ctypeslib.as_array((ctypes.c_uint8 * (TENSOR + (1 << 20))).from_address(pinned[r]))
        for i in range(r, len(jobs), T):
            f, _, off, nb = jobs[i]
            pread_into(fds[f], hb[:nb], off)
            assert lib.cuMemcpyHtoDAsync_v2(ctypes.c_uint64(ptrs[i]), ctypes.c_void_p(pinned[r]), ctypes.c_size_t(nb), s) == 0
            assert lib.cuStreamSynchronize(s) == 0
    rows.append(("pread into pinned, copy engine into GPU-resident MLX arrays", run_threads(T, w_pinned)))
    # check one tensor
    f, _, off, nb = jobs[5]
    ref = np.empty(nb, np.uint8)
    pread_into(fds[f], ref, off)
    ok = bool(np.array_equal(np.array(dst[5]), ref))
    rows.append((f"  (bytes correct: {ok})", 0.0))
    # make them GPU-resident again
    dst = [x + 0 for x in dst]
    mx.eval(dst)
    mx.synchronize()
    ptrs = [np.frombuffer(memoryview(x), np.uint8).ctypes.data for x in dst]

    def w_managed(r):
        for i in range(r, len(jobs), T):
            f, _, off, nb = jobs[i]
            pread_into(fds[f], np.frombuffer(memoryview(dst[i]), np.uint8), off)
    rows.append(("pread straight into GPU-resident MLX arrays", run_threads(T, w_managed)))


if __name__ == "__main__":
    main()
