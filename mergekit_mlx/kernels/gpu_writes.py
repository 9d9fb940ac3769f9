"""Merged outputs copied from an NVIDIA GPU's memory to the writer, past MLX's move to unified memory.

Asking MLX's CUDA backend for an array's bytes on the host (a memoryview) moves the array into
unified memory: a fresh managed buffer and a copy into it, in the thread that asks; then its pages
migrate to host memory for the file write. That buffer later comes back from MLX's cache as some
kernel's output, and its pages migrate back to the GPU as the kernel writes them. Here the merge
thread only learns where each evaluated output lies in device memory (a one-thread kernel writes
the address), and the writing thread copies it with the copy engine, piece by piece, into two
small page-locked buffers of its own, handing each piece to the file while the next one is copied.
The array never leaves device memory and goes back to MLX's cache as device memory.

CUDA only, like `gpu_reads`: a self-test (the bytes of known arrays through every step) decides
once per machine and build; MERGEKIT_MLX_NO_DIRECT_WRITES keeps MLX's host view.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import cuda_compile, cuda_memory
from .checks import FirstUse
from .sources import kernel_source

CHUNK = 4 << 20  # bytes per copy to host memory; each writing thread has two page-locked buffers of it
ENV_OFF = "MERGEKIT_MLX_NO_DIRECT_WRITES"

# CUDA-only kernel (kernels/device_address.cu): where an array's bytes are
ADDRESS = cuda_compile.CachedKernel("mk_device_address", ["x"], ["address"], *kernel_source("device_address", "cuda"))


@dataclass
class DeviceTensor:
    """An evaluated output in device memory, for a writer that copies it to host memory (`pieces`)."""

    array: mx.array  # row-contiguous; holds the device memory until the copies are done
    ptr: int  # its first byte in device memory (0 when it has none)
    drv: cuda_memory.Driver

    @property
    def dtype(self) -> mx.Dtype:
        return self.array.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def pieces(self, before_refill: Callable[[], None] | None = None) -> Iterator[memoryview]:
        """The bytes, in order, in pieces of at most CHUNK, the next one being copied while the
        caller handles one. A piece stays valid until the next is asked for, and after that until
        `before_refill` returns: it is called before a buffer that held an earlier piece is filled
        again (whoever still reads earlier pieces, a hash on a thread of its own, finishes first).
        Call it in the thread that writes; no copy is in flight once the iteration ends."""
        n = self.array.nbytes
        if n == 0:
            return
        drv = self.drv
        bufs = drv.thread_buffers(CHUNK)
        try:
            drv.copy_out(bufs[0], self.ptr, min(CHUNK, n))
            done, j = 0, 0
            while done < n:
                size = min(CHUNK, n - done)
                drv.sync()  # piece j is in bufs[j % 2]; piece j - 1's buffer is filled next
                if done + size < n:
                    if j > 0 and before_refill is not None:
                        before_refill()
                    drv.copy_out(bufs[(j + 1) % 2], self.ptr + done + size, min(CHUNK, n - done - size))
                yield memoryview((ctypes.c_ubyte * size).from_address(bufs[j % 2]))
                done, j = done + size, j + 1
        finally:
            drv.sync()


def device_tensors(arrays: Sequence[mx.array]) -> list[DeviceTensor]:
    """Evaluated arrays as DeviceTensors: a transposed or broadcast one is made row-contiguous (on
    the GPU), and the addresses of all are found in one evaluation. Call it in the thread that
    evaluates the merge (it launches MLX work)."""
    drv = cuda_memory.driver()
    flat = [mx.contiguous(a) for a in arrays]  # an array row-contiguous already keeps its buffer
    addresses = [_address(a) if a.nbytes else None for a in flat]
    mx.eval([a for a in addresses if a is not None])
    return [DeviceTensor(a, int(p.item()) if p is not None else 0, drv) for a, p in zip(flat, addresses)]


def _address(a: mx.array) -> mx.array:
    """A uint64 array holding where `a` (row-contiguous) starts in device memory, lazily."""
    x = mx.view(a.reshape(-1), mx.uint8)  # the same buffer, read as bytes: one kernel for every dtype
    return ADDRESS(inputs=[x], output_shapes=[(1,)], output_dtypes=[mx.uint64], grid=(1, 1, 1), threadgroup=(1, 1, 1))[0]


_verdict: FirstUse[str] = FirstUse(lambda what: "copying outputs straight from GPU memory", "MLX's host view")


def prepare() -> None:
    """Start compiling the address kernel in the background, where writes will use it."""
    if not os.environ.get(ENV_OFF) and cuda_memory.enabled() and cuda_compile.available():
        ADDRESS.prepare((mx.uint8,), (mx.uint64,), ())


def enabled() -> bool:
    """True when the default device is an NVIDIA GPU whose driver and the address kernel work here
    (checked once per machine and build, as the kernels are: known bytes through every step)."""
    if os.environ.get(ENV_OFF) or not cuda_memory.enabled() or not cuda_compile.available():
        return False
    drv = cuda_memory.driver()
    with _verdict.lock:
        return _verdict.passed("direct-writes", lambda: _self_test(drv), cuda_compile.VERDICTS, "direct-writes")


def _self_test(drv: cuda_memory.Driver) -> bool:
    n = 2 * CHUNK + 4099  # three pieces, the last one short
    idx = np.arange(n, dtype=np.uint64)
    wanted_bytes = (((idx * 2654435761) % (1 << 32)) >> 13).astype(np.uint8)  # the low byte of each
    on_gpu = ((mx.arange(n, dtype=mx.uint32) * mx.array(2654435761, dtype=mx.uint32)) >> 13).astype(mx.uint8)
    grid = np.arange(30, dtype=np.float32).reshape(6, 5)  # small integers: exact in bfloat16
    wanted_t = (grid.view(np.uint32) >> 16).astype(np.uint16).T.copy()  # bfloat16 bits, transposed
    transposed = mx.array(grid).astype(mx.bfloat16).T  # a strided view: made contiguous on the way
    empty = mx.zeros((0, 4), dtype=mx.float16)
    got = device_tensors([on_gpu, transposed, empty])
    copied = [b"".join(bytes(p) for p in t.pieces()) for t in got]
    return (
        copied[0] == wanted_bytes.tobytes()
        and copied[1] == wanted_t.tobytes()
        and got[1].shape == (5, 6)
        and copied[2] == b""
        and got[2].shape == (0, 4)
    )
