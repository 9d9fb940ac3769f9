"""Reading safetensors straight into an NVIDIA GPU's memory, past MLX's loader.

MLX's CUDA backend keeps arrays in unified (managed) memory, and its load on the CPU stream fills
that memory page fault by page fault, slowly whatever was tried around it. Here reader threads put
each tensor's bytes in device memory from the driver's pool themselves, one of two ways:

- mapped (a tensor of `MAPPED_MIN` bytes or more, where the driver takes read-only pages): the
  file's pages are mapped, page-locked piece by piece with the driver and copied by the copy engine
  straight from the page cache, pinning the next piece while the last one copies; the partial pages
  at either end go the second way. No CPU copy of the bytes at all.
- through buffers: pread into a small page-locked buffer of the reader's own, the copy engine moving
  each piece while the next one is read (benchmarks/RESULTS.md, section 8, has the figures).

The merge thread then makes an MLX array of the bytes with a device-to-device copy kernel, lazily,
inside the merge's own evaluation (readers never touch MLX, so only one thread drives the GPU), and
hands the device memory back once that evaluation is done.

CUDA only: on Apple silicon MLX's load already writes memory the GPU reads, and on the CPU there is
no device memory. Anything unusual (a dtype MLX only loads on the CPU, a missing driver entry
point, a failed self-test, pages the driver will not lock) keeps the buffers or MLX's own load for
that tensor or for the whole run. The CPU never reads a mapped page, so a file cut short while it
is read is an error naming it (the buffered read finds its end), never a crash.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import threading
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
ENV_NO_MAPPED = "MERGEKIT_MLX_NO_MAPPED_READS"  # through buffers only (a comparison for benchmarks)
MAPPED_MIN = 16 << 20  # tensors this large or larger are copied from the page cache's own pages
PIECE = 64 << 20  # bytes page-locked (and copied) at a time on the mapped way

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
_COPY = cuda_compile.CachedKernel("mk_device_copy", ["src"], ["out"], *kernel_source("device_copy", "cuda"))
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
        out = _COPY(
            inputs=[src], output_shapes=[(self.nbytes,)], output_dtypes=[mx.uint8], grid=(threads, 1, 1), threadgroup=(_TG, 1, 1)
        )[0]
        return mx.view(out, self.dtype).reshape(self.shape)


class Reader:
    """Stages tensors of plain safetensors files in device memory; one per pipeline, used by
    several reader threads (each with its own stream and page-locked buffers). `mapped`: large
    tensors are copied from the file's mapped pages (the driver takes read-only pages)."""

    def __init__(self, drv, keep_bytes: int, mapped: bool = False):
        self.drv = drv
        self.mapped = mapped
        self.mapped_min, self.piece = MAPPED_MIN, PIECE
        drv.keep_pool(keep_bytes)

    def _buffers(self) -> tuple[int, int]:
        bufs = getattr(_THREAD_BUFFERS, "bufs", None)
        if bufs is None:  # page-locked memory is slow to get: kept per thread for the process
            bufs = _THREAD_BUFFERS.bufs = (self.drv.pinned(CHUNK), self.drv.pinned(CHUNK))
        return bufs

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
        ptr = drv.alloc(nbytes)
        try:
            self.fill(path, offset, nbytes, ptr)
        except BaseException:
            drv.sync()
            drv.free(ptr)
            raise
        return Staged(ptr, nbytes, info.shape, dtype)

    def fill(self, path: Path, offset: int, nbytes: int, ptr: int) -> None:
        """Put the file's bytes [offset, offset + nbytes) in device memory at `ptr`; done on return."""
        if self.mapped and nbytes >= self.mapped_min and self._fill_mapped(path, offset, nbytes, ptr):
            return
        fd = _open(path)
        try:
            self._copy(fd, path, offset, nbytes, ptr)
        finally:
            os.close(fd)

    def _fill_mapped(self, path: Path, offset: int, nbytes: int, ptr: int) -> bool:
        """The mapped way; False (nothing left queued or locked) where it cannot: the driver
        refuses the pages, or the file is shorter than the span (the buffered read names it)."""
        page = mmap.PAGESIZE
        lo, hi = -(-offset // page) * page, (offset + nbytes) // page * page  # the whole pages inside
        if hi - lo < page:
            return False
        drv, libc = self.drv, _libc()
        fd = _open(path)
        try:
            if os.fstat(fd).st_size < offset + nbytes:
                return False
            base = libc.mmap(None, hi - lo, mmap.PROT_READ, mmap.MAP_SHARED, fd, lo)
            if base is None or base == _MAP_FAILED:
                return False
            locked: list[int] = []
            try:
                self._copy(fd, path, offset, lo - offset, ptr)
                for start in range(lo, hi, self.piece):
                    n = min(self.piece, hi - start)
                    try:
                        drv.register(base + (start - lo), n)
                    except OSError:
                        if not locked:  # the driver does not take these pages: buffers from now on
                            self.mapped = False
                        return False
                    locked.append(base + (start - lo))
                    drv.copy_in(ptr + (start - offset), base + (start - lo), n)
                self._copy(fd, path, hi, offset + nbytes - hi, ptr + (hi - offset))
            finally:
                drv.sync()  # no copy reads the pages once they are unlocked and unmapped
                for addr in locked:
                    drv.unregister(addr)
                libc.munmap(ctypes.c_void_p(base), ctypes.c_size_t(hi - lo))
        finally:
            os.close(fd)
        return True

    def _copy(self, fd: int, path: Path, offset: int, nbytes: int, ptr: int) -> None:
        """The buffered way: pread into the thread's two page-locked buffers in turn, each piece
        copied to the device while the next is read; done on return."""
        if nbytes <= 0:
            return
        drv = self.drv
        bufs = self._buffers()
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


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None


_MAP_FAILED = ctypes.c_void_p(-1).value


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


_THREAD_BUFFERS = threading.local()
_verdict: FirstUse[str] = FirstUse(lambda what: "reading straight into GPU memory", "MLX's load")
_mapped_verdict: FirstUse[str] = FirstUse(lambda what: "copying inputs from mapped file pages", "page-locked buffers")


def prepare() -> None:
    """Start compiling the copy kernel in the background, where reads will go through it (it is
    needed at the pipeline's start: its self-test, then every tensor)."""
    if not os.environ.get(ENV_OFF) and cuda_memory.enabled() and cuda_compile.available():
        _COPY.prepare((mx.uint64,), (mx.uint8,), ())


def reader(keep_bytes: int) -> Reader | None:
    """A Reader when the default device is an NVIDIA GPU whose driver and the copy kernel work here
    (checked once per machine and build, as the kernels are: bytes through every step and back),
    else None. It copies from mapped pages where the driver takes read-only pages and that way
    passed its own check."""
    if os.environ.get(ENV_OFF) or not cuda_memory.enabled():
        return None
    drv = cuda_memory.driver()
    with _verdict.lock:  # a pass is remembered on the machine, as the kernels' checks are
        ok = _verdict.passed("direct-reads", lambda: _self_test(drv, False), cuda_compile.VERDICTS, "direct-reads")
    if not ok:
        return None
    mapped = not os.environ.get(ENV_NO_MAPPED) and drv.can_register_read_only()
    if mapped:
        with _mapped_verdict.lock:
            mapped = _mapped_verdict.passed("mapped-reads", lambda: _self_test(drv, True), cuda_compile.VERDICTS, "mapped-reads")
    return Reader(drv, keep_bytes, mapped=mapped)


def _self_test(drv, mapped: bool) -> bool:
    """Bytes at an odd offset of a file, through one way (mapped: in several pieces, with partial
    pages at both ends) and the copy kernel, read back equal."""
    import tempfile

    data = np.arange(3 * CHUNK // 2 + 13, dtype=np.uint64).astype(np.uint8)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "probe.bin"
        path.write_bytes(b"\0" * 7 + data.tobytes())
        r = Reader(drv, 0, mapped=mapped)
        r.mapped_min, r.piece = 0, 1 << 20
        staged = Staged(drv.alloc(data.nbytes), data.nbytes, (data.nbytes,), mx.uint8)
        try:  # the device memory goes back also when a step fails
            if mapped:
                if not r._fill_mapped(path, 7, data.nbytes, staged.ptr):
                    return False
            else:
                r.fill(path, 7, data.nbytes, staged.ptr)
            got = staged.array()
            mx.eval(got)
            return bool(np.array_equal(np.array(got), data))
        finally:
            r.release([staged])
