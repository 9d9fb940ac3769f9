"""Moving host-loaded inputs to an NVIDIA GPU ahead of the merge that reads them.

On CUDA, MLX keeps arrays read on the CPU stream in unified (managed) memory; the first GPU
kernel that reads one migrates its pages on demand, fault by fault (as slow as reading the
files: benchmarks/RESULTS.md, section 8). `prefetch` asks the driver to migrate the pages in bulk as soon
as a reader has loaded them, on a stream of the reader's own, so the copy overlaps the reading of
the next tensors and the merge finds its inputs on the device. Only the CUDA driver library is
used (through ctypes); where it is missing or refuses, nothing happens and the merge migrates on
demand as before.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterable

import mlx.core as mx
import numpy as np

_CU_STREAM_NON_BLOCKING = 1
_CU_MEM_LOCATION_TYPE_DEVICE = 1
_CU_MEM_LOCATION_TYPE_HOST = 2
_CU_DEVICE_CPU = -1


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class Driver:
    """The CUDA driver library through ctypes: streams per thread, page-locked and pool memory, copies."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.local = threading.local()
        if self.lib.cuInit(0) != 0:
            raise OSError("cuInit failed")
        dev = ctypes.c_int()
        if self.lib.cuDeviceGet(ctypes.byref(dev), 0) != 0:
            raise OSError("no CUDA device 0")
        self.device = dev.value
        self.v2 = hasattr(self.lib, "cuMemPrefetchAsync_v2")

    def compute_capability(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.cuDeviceGetAttribute(ctypes.byref(major), 75, self.device), "cuDeviceGetAttribute")
        self.check(self.lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, self.device), "cuDeviceGetAttribute")
        return major.value, minor.value

    def stream(self) -> ctypes.c_void_p:
        """This thread's stream, on MLX's device's primary context (made current here)."""
        s = getattr(self.local, "stream", None)
        if s is None:
            ctx = ctypes.c_void_p()
            self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), self.device), "cuDevicePrimaryCtxRetain")
            self.check(self.lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
            s = ctypes.c_void_p()
            self.check(self.lib.cuStreamCreate(ctypes.byref(s), _CU_STREAM_NON_BLOCKING), "cuStreamCreate")
            self.local.stream = s
        return s

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise OSError(f"{what} failed with CUDA error {rc}")

    def pinned(self, size: int) -> int:
        """Page-locked host memory (the copy engine reads it directly); kept for the process."""
        self.stream()  # the context current in this thread
        p = ctypes.c_void_p()
        self.check(self.lib.cuMemHostAlloc(ctypes.byref(p), ctypes.c_size_t(size), ctypes.c_uint(0)), "cuMemHostAlloc")
        return p.value

    def thread_buffers(self, size: int) -> tuple[int, int]:
        """This thread's two page-locked buffers of `size` bytes, for copies that alternate between
        them (a thread's reads or its writes, one at a time); slow to get, so kept for the process."""
        kept = self.local.__dict__.setdefault("buffers", {})
        if size not in kept:
            kept[size] = (self.pinned(size), self.pinned(size))
        return kept[size]

    def alloc(self, size: int) -> int:
        """Device memory from the device's stream-ordered pool, on this thread's stream."""
        p = ctypes.c_uint64()
        self.check(self.lib.cuMemAllocAsync(ctypes.byref(p), ctypes.c_size_t(size), self.stream()), "cuMemAllocAsync")
        return p.value

    def free(self, ptr: int) -> None:
        self.check(self.lib.cuMemFreeAsync(ctypes.c_uint64(ptr), self.stream()), "cuMemFreeAsync")

    def copy_in(self, dst: int, src: int, size: int) -> None:
        """Queue a copy of host bytes (pinned) to device memory on this thread's stream."""
        self.check(
            self.lib.cuMemcpyHtoDAsync_v2(ctypes.c_uint64(dst), ctypes.c_void_p(src), ctypes.c_size_t(size), self.stream()),
            "cuMemcpyHtoDAsync",
        )

    def copy_out(self, dst: int, src: int, size: int) -> None:
        """Queue a copy of device bytes to host memory (pinned) on this thread's stream."""
        self.check(
            self.lib.cuMemcpyDtoHAsync_v2(ctypes.c_void_p(dst), ctypes.c_uint64(src), ctypes.c_size_t(size), self.stream()),
            "cuMemcpyDtoHAsync",
        )

    def sync(self) -> None:
        """Wait for everything queued on this thread's stream."""
        self.check(self.lib.cuStreamSynchronize(self.stream()), "cuStreamSynchronize")

    def record(self) -> int:
        """An event marking everything queued so far on this thread's stream."""
        ev = ctypes.c_void_p()
        self.check(self.lib.cuEventCreate(ctypes.byref(ev), ctypes.c_uint(2)), "cuEventCreate")  # no timing
        self.check(self.lib.cuEventRecord(ev, self.stream()), "cuEventRecord")
        return ev.value

    def wait_event(self, event: int) -> None:
        try:
            self.check(self.lib.cuEventSynchronize(ctypes.c_void_p(event)), "cuEventSynchronize")
        finally:
            self.lib.cuEventDestroy_v2(ctypes.c_void_p(event))

    def _default_pool(self) -> ctypes.c_void_p:
        pool = ctypes.c_void_p()
        self.stream()  # the context current in this thread
        self.check(self.lib.cuDeviceGetDefaultMemPool(ctypes.byref(pool), self.device), "cuDeviceGetDefaultMemPool")
        return pool

    def trim_pool(self) -> None:
        """Give the device's default pool's unused memory back to the driver."""
        self.check(self.lib.cuMemPoolTrimTo(self._default_pool(), ctypes.c_size_t(0)), "cuMemPoolTrimTo")

    def keep_pool(self, size: int) -> None:
        """Let the device's default pool keep up to `size` freed bytes (by default it hands all of
        them back to the driver at every synchronisation, and the next allocation maps them again)."""
        value = ctypes.c_uint64(size)
        self.check(
            self.lib.cuMemPoolSetAttribute(
                self._default_pool(),
                ctypes.c_int(4),  # RELEASE_THRESHOLD
                ctypes.byref(value),
            ),
            "cuMemPoolSetAttribute",
        )

    def prefetch(self, ptr: int, size: int, host: bool = False) -> int:
        """Start migrating managed memory to the device (or to host memory)."""
        s = self.stream()
        if self.v2:
            loc = _Location(_CU_MEM_LOCATION_TYPE_HOST, 0) if host else _Location(_CU_MEM_LOCATION_TYPE_DEVICE, self.device)
            return self.lib.cuMemPrefetchAsync_v2(ctypes.c_uint64(ptr), ctypes.c_size_t(size), loc, ctypes.c_uint(0), s)
        return self.lib.cuMemPrefetchAsync(
            ctypes.c_uint64(ptr), ctypes.c_size_t(size), _CU_DEVICE_CPU if host else self.device, s
        )


_driver: Driver | None = None
_failed = False
_lock = threading.Lock()


def driver() -> Driver | None:
    """The CUDA driver, or None where there is none (no NVIDIA GPU, no libcuda)."""
    return _get()


def _get() -> Driver | None:
    global _driver, _failed
    with _lock:
        if _driver is None and not _failed:
            try:
                _driver = Driver()
            except (OSError, AttributeError):
                _failed = True
        return _driver


def enabled() -> bool:
    """True on an NVIDIA GPU whose driver takes prefetches (MLX's CUDA backend as default device),
    unless MERGEKIT_MLX_NO_PREFETCH is set."""
    return (
        not os.environ.get("MERGEKIT_MLX_NO_PREFETCH")
        and mx.default_device() == mx.gpu
        and hasattr(mx, "cuda")
        and mx.cuda.is_available()
        and _get() is not None
    )


def to_host(arrays: Iterable[mx.array]) -> int | None:
    """Start moving evaluated arrays' pages to host memory, in bulk; returns an event to pass to
    `wait` before the host reads them (None: nothing to wait for). A file write that reads pages
    still on the GPU migrates them fault by fault, far slower than the page cache takes bytes
    from host memory (benchmarks/RESULTS.md, section 8). No-op where unsupported."""
    global _failed
    if not _prefetch_all(arrays, host=True):
        return None
    try:
        return _driver.record()
    except OSError:
        _failed = True
        return None


def wait(event: int | None) -> None:
    """Wait for an event from `to_host` (from any thread), then free it."""
    if event is not None:
        drv = _get()
        try:
            drv.wait_event(event)
        except OSError:
            pass  # the pages move on demand instead


def _address(a: mx.array) -> int:
    mv = memoryview(a)
    return np.frombuffer(mv.cast("B") if mv.format != "B" else mv, dtype=np.uint8).ctypes.data


def prefetch(arrays: Iterable[mx.array]) -> None:
    """Start migrating evaluated, host-loaded arrays to the GPU (asynchronous; no-op if unsupported)."""
    _prefetch_all(arrays, host=False)


def _prefetch_all(arrays: Iterable[mx.array], host: bool) -> bool:
    """Queue the migration of every array of 1 MB or more (to the host, or to the GPU) on this
    thread's stream; True when at least one was queued."""
    global _failed
    drv = _get()
    if drv is None or _failed:
        return False
    queued = False
    for a in arrays:
        if a.nbytes < (1 << 20):  # small tensors: a fault or two, not worth a call
            continue
        try:
            rc = drv.prefetch(_address(a), a.nbytes, host=host)
        except OSError:
            rc = -1
        if rc != 0:  # not managed memory, or the driver refuses: stop trying
            _failed = True
            return False
        queued = True
    return queued
