"""Reading safetensors straight into an NVIDIA GPU's memory, past MLX's loader.

MLX's CUDA backend keeps arrays in unified (managed) memory, and its load on the CPU stream fills
that memory page fault by page fault, slowly whatever was tried around it. Here a reader thread reads a tensor's bytes with pread into
a small page-locked buffer of its own and the copy engine moves each piece into device memory from
the driver's pool, overlapping the next pread: several times faster (benchmarks/RESULTS.md,
section 8, has the figures). The merge
thread then makes an MLX array of the bytes with a device-to-device copy kernel, lazily, inside
the merge's own evaluation (readers never touch MLX, so only one thread drives the GPU), and hands
the device memory back once that evaluation is done.

CUDA only: on Apple silicon MLX's load already writes memory the GPU reads, and on the CPU there is
no device memory. Anything unusual (a dtype MLX only loads on the CPU, a missing driver entry
point, a failed self-test) keeps MLX's own load for that tensor or for the whole run.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import ModelError
from . import cuda_compile, cuda_memory
from .checks import FirstUse
from .sources import kernel_source

CHUNK = 4 << 20  # bytes per pread and per copy; each reader has two page-locked buffers of it
ENV_OFF = "MERGEKIT_MLX_NO_DIRECT_READS"

# the safetensors dtype codes the GPU holds as MLX would load them (float64 lives on the CPU only);
# kernels/ reads no format module, so the codes are named here (they are the format's, see dtypes.py)
_ON_DEVICE = {
    "F32": mx.float32,
    "F16": mx.float16,
    "BF16": mx.bfloat16,
    "I32": mx.int32,
    "U32": mx.uint32,
    "I16": mx.int16,
    "U16": mx.uint16,
    "I8": mx.int8,
    "U8": mx.uint8,
    "BOOL": mx.bool_,
}

# CUDA-only kernel (kernels/device_copy.cu): the staged bytes into an MLX array
COPY = cuda_compile.CachedKernel("mk_device_copy", ["src"], ["out"], *kernel_source("device_copy", "cuda"))
_TG = 256
_MAX_THREADS = 1 << 20


@dataclass
class Staged:
    """A tensor's bytes in device memory that a reader filled; `array` makes it an MLX array."""

    ptr: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: mx.Dtype

    def array(self) -> mx.array:
        """The tensor as a lazy MLX array (a copy kernel on MLX's stream); call it in the thread
        that evaluates it, and keep the device memory until that evaluation is done."""
        if self.nbytes == 0:
            return mx.zeros(self.shape, self.dtype)
        threads = max(_TG, min(_MAX_THREADS, -(-(self.nbytes >> 4) // (4 * _TG)) * _TG))
        src = mx.array(np.array([self.ptr, self.nbytes], dtype=np.uint64))
        out = COPY(
            inputs=[src], output_shapes=[(self.nbytes,)], output_dtypes=[mx.uint8], grid=(threads, 1, 1), threadgroup=(_TG, 1, 1)
        )[0]
        return mx.view(out, self.dtype).reshape(self.shape)


class Reader:
    """Stages tensors of plain safetensors files in device memory; one per pipeline, used by
    several reader threads (each with its own stream and page-locked buffers)."""

    def __init__(self, drv, keep_bytes: int):
        self.drv = drv
        drv.keep_pool(keep_bytes)

    def stage(self, model, name: str) -> Staged | None:
        """The tensor in device memory, or None when MLX's own load should read it."""
        span = getattr(model, "file_span", None)
        info = model.info(name)
        if span is None or info.offset is None:
            return None
        dtype = _ON_DEVICE.get(info.dtype)
        if dtype is None:
            return None
        path, offset, nbytes = span(name)
        if nbytes == 0:
            return Staged(0, 0, info.shape, dtype)
        drv = self.drv
        bufs = drv.thread_buffers(CHUNK)
        ptr = drv.alloc(nbytes)
        try:
            self._fill(path, offset, nbytes, ptr, bufs)
        except BaseException:
            drv.sync()
            drv.free(ptr)
            raise
        return Staged(ptr, nbytes, info.shape, dtype)

    def _fill(self, path: Path, offset: int, nbytes: int, ptr: int, bufs: tuple[int, int]) -> None:
        drv = self.drv
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None
        try:
            done, j = 0, 0
            while done < nbytes:
                n = min(CHUNK, nbytes - done)
                buf = bufs[j % 2]
                view = (ctypes.c_char * n).from_address(buf)
                got = 0
                while got < n:
                    r = os.preadv(fd, [memoryview(view)[got:]], offset + done + got)
                    if r <= 0:
                        raise ModelError(f"{path}: the file ends before its header says (changed while merging?)")
                    got += r
                # the copy of the previous piece (from the other buffer) is done before that
                # buffer is filled again: wait for it here, after this piece's read
                drv.sync()
                drv.copy_in(ptr + done, buf, n)
                done += n
                j += 1
            drv.sync()
        finally:
            os.close(fd)

    def close(self) -> None:
        """After a merge: the pool's cached device memory goes back (a process may generate next)."""
        try:
            self.drv.sync()
            self.drv.trim_pool()
        except OSError:
            pass

    def release(self, staged: list) -> None:
        """Hand staged device memory back (its copies into MLX arrays have been evaluated)."""
        for s in staged:
            if isinstance(s, Staged) and s.nbytes:
                self.drv.free(s.ptr)


_verdict: FirstUse[str] = FirstUse(lambda what: "reading straight into GPU memory", "MLX's load")


def prepare() -> None:
    """Start compiling the copy kernel in the background, where reads will go through it (it is
    needed at the pipeline's start: its self-test, then every tensor)."""
    if not os.environ.get(ENV_OFF) and cuda_memory.enabled() and cuda_compile.available():
        COPY.prepare((mx.uint64,), (mx.uint8,), ())


def reader(keep_bytes: int) -> Reader | None:
    """A Reader when the default device is an NVIDIA GPU whose driver and the copy kernel work here
    (checked once per machine and build, as the kernels are: bytes through every step and back),
    else None."""
    if os.environ.get(ENV_OFF) or not cuda_memory.enabled():
        return None
    drv = cuda_memory.driver()
    with _verdict.lock:  # a pass is remembered on the machine, as the kernels' checks are
        ok = _verdict.passed("direct-reads", lambda: _self_test(drv), cuda_compile.VERDICTS, "direct-reads")
    return Reader(drv, keep_bytes) if ok else None


def _self_test(drv) -> bool:
    import tempfile

    data = np.arange(3 * CHUNK // 2 + 13, dtype=np.uint64).astype(np.uint8)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "probe.bin"
        path.write_bytes(b"\0" * 7 + data.tobytes())
        r = Reader(drv, 0)
        staged = Staged(drv.alloc(data.nbytes), data.nbytes, (data.nbytes,), mx.uint8)
        try:  # the device memory goes back also when a step fails
            r._fill(path, 7, data.nbytes, staged.ptr, drv.thread_buffers(CHUNK))
            got = staged.array()
            mx.eval(got)
            return bool(np.array_equal(np.array(got), data))
        finally:
            r.release([staged])
