"""The CPU path's plumbing: flat numpy views of MLX arrays, per-thread chunk buffers, and the
helper thread that takes the upper half of a very large tensor.

MLX's compiled CPU code splits long elementwise graphs into several loops, writes full-size
float32 intermediates between them and runs them as scalar code. The CPU path's loops
(`selection_cpu`, `task_merge_cpu`) run the same float32 operations in the same order as native
loops (kernels/*.cpp, built by `cpu_native`, free of the GIL) or, where those are not built, as
numpy's SIMD loops over cache-sized chunks. Every one of them gives bit for bit what the MLX graphs
give (the tests hold both codes to that).

Inputs are flat numpy views of evaluated MLX arrays (zero-copy); bfloat16 travels as its uint16
bits and is widened by a 16-bit shift, exactly as MLX converts it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import mlx.core as mx
import numpy as np

CHUNK = 1 << 17  # elements per step: float32 temporaries of this size stay in L2 or L3
GROUP = 1 << 20  # elements whose L1 block sums MLX takes per call
SPLIT = 1 << 25  # tensors this large (embeddings) are shared with a helper thread: they run alone
ABS = np.uint32(0x7FFFFFFF)


def supported(*arrays: mx.array) -> bool:
    """bfloat16 and float32 inputs run here; other dtypes keep the MLX graph."""
    return all(a.dtype in (mx.bfloat16, mx.float32) for a in arrays)


def host(a: mx.array) -> np.ndarray:
    """A flat numpy view of `a` (evaluated here): float32, or uint16 bits for bfloat16."""
    flat = a.reshape(-1)
    if flat.dtype == mx.bfloat16:
        flat = flat.view(mx.uint16)
    mx.eval(flat)
    return np.asarray(flat)


def widen(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float32 values of a chunk (bf16 bits or float32) written into `out` (uint32 scratch)."""
    if src.dtype == np.uint16:
        np.left_shift(src, 16, out=out, dtype=np.uint32)
    else:
        np.copyto(out, src.view(np.uint32))
    return out.view(np.float32)


def alloc(shape, dtype) -> tuple[mx.array, np.ndarray]:
    """A zeroed MLX array and a writable numpy view of it: MLX's allocator reuses freed buffers,
    so a tensor-sized buffer costs no fresh (zero-filled, faulted-in) pages, and what numpy
    writes into it reaches MLX without a copy."""
    a = mx.zeros(shape, dtype={np.bool_: mx.bool_, np.uint16: mx.uint16, np.float32: mx.float32}[np.dtype(dtype).type])
    mx.eval(a)
    return a, np.asarray(a)


class Scratch:
    """Chunk buffers, named on first use (one set per thread: see scratch)."""

    def __init__(self, size: int):
        self.size = size
        self.bufs: dict[str, np.ndarray] = {}

    def __call__(self, name: str, dtype, c: int) -> np.ndarray:
        b = self.bufs.get(name)
        if b is None or b.size < c:
            b = self.bufs[name] = np.empty(max(c, self.size), dtype=dtype)
        return b[:c]

    def iota_times(self, c: int, factor: int) -> np.ndarray:
        """0, f, 2f, ... (c values, uint32, wrapping), made once per factor."""
        name = f"iota*{factor}"
        b = self.bufs.get(name)
        if b is None:
            b = self.bufs[name] = np.arange(self.size, dtype=np.uint32) * np.uint32(factor)
        return b[:c]


_local = threading.local()


def scratch() -> Scratch:
    """This thread's chunk buffers (kept: a fresh set per call would fault in new pages)."""
    sc = getattr(_local, "scratch", None)
    if sc is None:
        sc = _local.scratch = Scratch(CHUNK)
    return sc


_jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
_helper: list[threading.Thread] = []


def in_halves(n: int, body: Callable[[int, int], object]) -> list:
    """[body(0, n)], or for n >= SPLIT [body(0, mid), body(mid, n)] with the upper half on a
    helper thread (a daemon that lives as long as the process). body runs numpy or native code
    only, no MLX."""
    if n < SPLIT:
        return [body(0, n)]
    mid = n // 2 // CHUNK * CHUNK
    if not _helper:
        t = threading.Thread(target=lambda: [_jobs.get()() for _ in iter(int, 1)], name="mergekit-mlx-numpy", daemon=True)
        t.start()
        _helper.append(t)
    done = threading.Event()
    got: list = []

    def upper() -> None:
        try:
            with np.errstate(all="ignore"):
                got.append((True, body(mid, n)))
        except BaseException as e:  # raised again in the caller
            got.append((False, e))
        finally:
            done.set()

    _jobs.put(upper)
    lower = body(0, mid)
    done.wait()
    ok, value = got[0]
    if not ok:
        raise value
    return [lower, value]


def quiet(fn):
    """NaN and Inf are data here (the caller reports them): no floating-point warnings."""

    def wrapped(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


def one_layout(dtype, *arrays: np.ndarray) -> bool:
    """The native loops read flat, contiguous arrays of one dtype."""
    return all(a.dtype == dtype and a.flags.c_contiguous for a in arrays)


def abs_bits(x: np.ndarray, b: np.ndarray | None, s: int, e: int, sc: Scratch, bw: np.ndarray | None = None) -> np.ndarray:
    """|x - b| (or |x|) of elements [s, e) as float32 bit patterns; bw: b's chunk, widened already."""
    c = e - s
    d = widen(x[s:e], sc("x", np.uint32, c))
    if b is not None:
        np.subtract(d, bw if bw is not None else widen(b[s:e], sc("b", np.uint32, c)), out=d)
    bits = d.view(np.uint32)
    np.bitwise_and(bits, ABS, out=bits)
    return bits


def abs_bits_at(x: np.ndarray, b: np.ndarray | None, idx: np.ndarray) -> np.ndarray:
    xs, bs = x[idx], (b[idx] if b is not None else None)
    sc = Scratch(idx.size)
    return abs_bits(xs, bs, 0, idx.size, sc).copy()


def check_data(dtype: str, k: int, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Native loops' first-use checks: a base and k tensors near it, as host views of `dtype` (some elements equal to the base)."""
    rng = np.random.default_rng(7)
    b = rng.standard_normal(n).astype(np.float32) * np.float32(0.02)
    xs = [b + rng.standard_normal(n).astype(np.float32) * np.float32(0.005) for _ in range(k)]
    for i, x in enumerate(xs):
        x[i::5] = b[i::5]
    if dtype == "uint16_t":
        return (b.view(np.uint32) >> 16).astype(np.uint16), [(x.view(np.uint32) >> 16).astype(np.uint16) for x in xs]
    return b, xs
