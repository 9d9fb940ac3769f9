"""Writing merged tensors: shard by shard, each shard written as soon as its last tensor arrives.

A writer is told up front every tensor it will get (name, shape, dtype — the plan knows them), so
it can lay out shards, a GGUF header or a quantization config before any data exists. Tensors then
arrive in plan order through `add`, and `finish` writes what closes the output (index, config).
The directory a writer fills is a temporary one: the merge driver renames it into place only
after `finish`.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
import shutil
import queue
import struct
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import mlx.core as mx
import numpy as np
import xxhash

from .errors import RecipeError
from .models import MLX_TO_SAFETENSORS

DEFAULT_SHARD_BYTES = 5 * 1000**3

OUT_FORMATS = (
    "hf",
    "mlx-q4",
    "mlx-q8",
    "mlx-mxfp4",
    "gguf-f16",
    "gguf-bf16",
    "gguf-q8_0",
    "gguf-q4_0",
    "gguf-tq1_0",
    "gguf-tq2_0",
    "bitnet",
)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size


class Writer(Protocol):
    def add(self, name: str, array: mx.array) -> None: ...

    def finish(self) -> None: ...


def plan_shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Group tensors, in order, into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class SafetensorsWriter:
    """Hugging Face layout: model(-0000i-of-0000n).safetensors + model.safetensors.index.json + config.

    Shards are streamed: a shard's file is opened with room for its header when its first tensor
    arrives, each tensor's bytes are appended as it arrives (so memory never holds a shard), and
    the header is written last, for the tensors actually written. A shard gets its final name
    only when complete. The SHA-256 of every shard but the last is computed while it is written
    (`checksums`) for the resume state; the last shard is closed by `finish`, after which the
    state is no longer needed.
    """

    def __init__(
        self,
        out_dir: Path,
        tensors: list[OutputTensor],
        config: dict,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        skip_shards: Optional[set[str]] = None,
    ):
        self.out_dir = out_dir
        self.config = config
        self.shards = plan_shards(tensors, max_shard_bytes)
        self.files = shard_file_names(len(self.shards))
        self.shard_of = {t.name: i for i, shard in enumerate(self.shards) for t in shard}
        self.pending: dict[int, set[str]] = {}  # shard -> names that have arrived, while it is open
        self.open: dict[int, _ShardFile] = {}
        # shards already complete on disk (resume): their tensors are accepted and dropped
        self.skip = skip_shards or set()
        self.written: list[str] = []
        self.checksums: dict[str, str] = {}

    def wants(self, name: str) -> bool:
        """False for tensors whose shard is already on disk (a resumed merge need not compute them)."""
        return self.files[self.shard_of[name]] not in self.skip

    def add(self, name: str, array: mx.array) -> None:
        i = self.shard_of[name]
        if self.files[i] in self.skip:
            return
        arrived = self.pending.setdefault(i, set())
        arrived.add(name)
        self._write(i, {name: array})
        if len(arrived) == len(self.shards[i]) and i != len(self.shards) - 1:
            self._close(i)

    def _write(self, i: int, arrays: dict[str, mx.array]) -> None:
        """Append tensors to shard i's file (opened on its first tensor)."""
        f = self.open.get(i)
        if f is None:
            f = self.open[i] = _ShardFile(
                self.out_dir / ("incomplete-" + self.files[i]), self.shards[i], checksum=i != len(self.shards) - 1
            )
        for name, array in arrays.items():
            f.append(name, array)

    def _close(self, i: int) -> None:
        f = self.open.pop(i, None) or _ShardFile(self.out_dir / ("incomplete-" + self.files[i]), self.shards[i])
        self.pending.pop(i, None)
        digest = f.close()
        f.path.rename(self.out_dir / self.files[i])  # a shard's final name means it is complete
        if digest is not None:
            self.checksums[self.files[i]] = digest
        self.written.append(self.files[i])

    def finish(self) -> None:
        missing = [
            t.name
            for i, shard in enumerate(self.shards)
            if self.files[i] not in self.skip and self.files[i] not in self.written
            for t in shard
            if t.name not in self.pending.get(i, ())
        ]
        if missing:
            raise RuntimeError(f"merge ended with tensors never produced: {missing[:5]}")
        for i in sorted(self.pending):
            self._close(i)
        if len(self.files) > 1:
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index = {
                "metadata": {"total_size": total},
                "weight_map": {t.name: self.files[i] for i, shard in enumerate(self.shards) for t in shard},
            }
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        write_config(self.out_dir, self.config)


class _ShardFile:
    """One safetensors file written front to back: reserved header, tensors in arrival order, header.

    The header is reserved for the planned tensors (plus slack) and rewritten at close from the
    tensors written, padded with spaces as the format allows. When the planned header is the final
    one (the usual case) the checksum is computed on the fly; otherwise at close, from the file.
    """

    METADATA = {"format": "pt"}

    def __init__(self, path: Path, planned: list[OutputTensor], checksum: bool = False):
        self.path = path
        self.planned = planned
        self.entries: dict[str, dict] = {}
        self.size = 0  # data bytes written
        head = _safetensors_header([(t.name, t.dtype, t.shape, t.nbytes) for t in planned], self.METADATA)
        # the data starts on a block boundary, so that it can be written around the page cache
        self.reserved = _round_up(8 + len(head) + 64 * len(planned) + 256, _BLOCK) - 8
        self.file = open(path, "wb")
        _preallocate(self.file.fileno(), 8 + self.reserved + sum(t.nbytes for t in planned))
        self.file.write(b"\0" * (8 + self.reserved))
        self.file.flush()
        self.direct = _DirectWriter.open(path, 8 + self.reserved) if _DIRECT else None
        self.hash: Optional[_BackgroundHash] = None
        if checksum:
            self.hash = _BackgroundHash()
            self.hash.update(_header_bytes(head, self.reserved))

    def append(self, name: str, array: mx.array) -> None:
        mx.eval(array)
        view = memoryview(array)
        if not view.c_contiguous:  # a transposed or broadcast view: write it in row-major order
            array = mx.contiguous(array)
            mx.eval(array)
            view = memoryview(array)
        data = view.cast("B") if array.nbytes else b""
        if self.hash is not None:
            self.hash.update(data)
        if self.direct is not None:
            self.direct.write(data)
        else:
            _write_all(self.file, data)
        self.entries[name] = {
            "dtype": safetensors_code(array.dtype),
            "shape": list(array.shape),
            "data_offsets": [self.size, self.size + array.nbytes],
        }
        self.size += array.nbytes

    def close(self) -> Optional[str]:
        """Write the final header; returns the file's SHA-256 when it was asked for."""
        head = json.dumps({"__metadata__": self.METADATA, **self.entries}, separators=(",", ":")).encode()
        planned = [t.name for t in self.planned]
        if self.direct is not None:
            self.direct.close()
        self.file.truncate(8 + self.reserved + self.size)  # drops preallocated space left unused
        if len(head) <= self.reserved:
            self.file.seek(0)
            self.file.write(_header_bytes(head, self.reserved))
            self.file.close()
        else:  # the tensors outgrew the reserved header (shapes unlike the plan): move the data
            self.file.close()
            _rewrite_with_header(self.path, head, 8 + self.reserved)
        if self.hash is None:
            return None
        digest = self.hash.hexdigest()
        if list(self.entries) == planned and all(
            self.entries[t.name]["shape"] == list(t.shape) and self.entries[t.name]["dtype"] == safetensors_code(t.dtype)
            for t in self.planned
        ):
            return digest
        return file_digest(self.path)


# big tensors are written by several threads at once where there are cores to spare (a GPU host:
# one thread wrote page cache at 2.2 GB/s on a 16-core H200 host); a 2-core CPU keeps one
_WRITE_THREADS = max(1, min(8, (os.cpu_count() or 1) // 4))
_PARALLEL_WRITE_MIN = 64 << 20
_pool: Optional[ThreadPoolExecutor] = None
_pool_lock = threading.Lock()


def _write_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_WRITE_THREADS, thread_name_prefix="mergekit-mlx-write")
        return _pool


# On a machine with few cores, writing through the page cache costs more CPU than the merge can
# spare (a 2-core x86-64 VM: 3.7 CPU seconds for 1.7 GB buffered, 0.35 s with O_DIRECT at
# 1.5 GB/s), so shard data goes around it there; hosts with cores to spare keep the page cache
# and the parallel writes above.
_DIRECT = sys.platform.startswith("linux") and hasattr(os, "O_DIRECT") and _WRITE_THREADS < 2
_BLOCK = 4096  # O_DIRECT alignment of offsets, lengths and memory
_STAGE = 16 << 20  # bytes gathered before one direct write


class _DirectWriter:
    """Appends to a file from `start` (block-aligned) with O_DIRECT, through an aligned staging
    buffer; the last partial block is written padded and cut back by the caller's truncate."""

    def __init__(self, fd: int, start: int, path: Path):
        self.fd, self.offset, self.path = fd, start, path
        self.stage = mmap.mmap(-1, _STAGE)  # page-aligned
        self.direct_refused = False
        self.buf = np.frombuffer(self.stage, dtype=np.uint8)
        self.filled = 0

    @classmethod
    def open(cls, path: Path, start: int) -> Optional["_DirectWriter"]:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError:  # the filesystem has no direct I/O (tmpfs): the page cache it is
            return None
        return cls(fd, start, path)

    def write(self, data) -> None:
        src = np.frombuffer(data, dtype=np.uint8)
        done = 0
        while done < src.size:
            k = min(src.size - done, _STAGE - self.filled)
            np.copyto(self.buf[self.filled:self.filled + k], src[done:done + k])  # releases the GIL
            self.filled += k
            done += k
            if self.filled == _STAGE:
                self._flush(_STAGE)

    def _flush(self, length: int) -> None:
        done = 0
        # views of the staging map are released also when a write fails (a full disk): one left
        # in the traceback would make closing the map raise BufferError instead of the OSError
        with memoryview(self.stage) as whole:
            while done < length:
                with whole[done:length] as part:
                    try:
                        n = os.pwrite(self.fd, part, self.offset)
                    except OSError as e:
                        if e.errno != errno.EINVAL or self.direct_refused:
                            raise
                        # a filesystem that opens with O_DIRECT but refuses the writes: the page cache
                        self.direct_refused = True
                        os.close(self.fd)
                        self.fd = os.open(self.path, os.O_WRONLY)
                        continue
                done, self.offset = done + n, self.offset + n
        self.filled = 0

    def close(self) -> None:
        try:
            if self.filled:
                tail = _round_up(self.filled, _BLOCK)
                self.buf[self.filled:tail] = 0
                self._flush(tail)
        finally:
            os.close(self.fd)
            self.buf = None  # the staging map closes once nothing views it
            self.stage.close()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _write_all(f, data) -> None:
    """Append data to the open file f: in slices by several threads for big data, else one write."""
    if _WRITE_THREADS < 2 or len(data) < _PARALLEL_WRITE_MIN:
        f.write(data)
        return
    f.flush()
    start = f.tell()
    per = -(-len(data) // _WRITE_THREADS)
    step = -(-per // (1 << 20)) * (1 << 20)  # whole MiB slices
    jobs = [_write_pool().submit(_pwrite_all, f.fileno(), data[o:o + step], start + o)
            for o in range(0, len(data), step)]
    for j in jobs:
        j.result()
    f.seek(start + len(data))


class _BackgroundHash:
    """The content digest (`new_digest`) of a stream of buffers, computed on a thread of its own so
    that hashing a shard does not hold up the writes; at most `limit` bytes wait to be hashed."""

    def __init__(self, limit: int = 1 << 30):
        self.h = new_digest()
        self.q: "queue.Queue[Optional[object]]" = queue.Queue()
        self.room = threading.Semaphore(max(1, limit >> 20))  # in MiB
        self.t = threading.Thread(target=_BackgroundHash._run, args=(self.h, self.q, self.room),
                                  name="mergekit-mlx-hash", daemon=True)
        self.t.start()
        weakref.finalize(self, self.q.put, None)  # an abandoned shard (a failed merge) ends the thread

    @staticmethod
    def _run(h, q, room) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            data, mib = item
            h.update(data)
            for _ in range(mib):
                room.release()

    def update(self, data) -> None:
        mib = min(max(1, len(data) >> 20), 1024)
        for _ in range(mib):
            self.room.acquire()
        self.q.put((data, mib))

    def hexdigest(self) -> str:
        self.q.put(None)
        self.t.join()
        return self.h.hexdigest()


def _preallocate(fd: int, size: int) -> None:
    """Reserve a file's blocks before writing it (Linux fallocate; elsewhere nothing).

    Appending to a preallocated file cost a sixth of the CPU time of plain appends on ext4 on a
    2-core x86-64 CPU (block allocation per page otherwise). fallocate(2) itself, not
    posix_fallocate, which emulates an unsupported filesystem by writing zeros.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fallocate(fd, 0, 0, size)  # a failure (unsupported, no space) only loses the speed-up


def _safetensors_header(tensors: list[tuple[str, mx.Dtype, tuple, int]], metadata: dict) -> bytes:
    entries, offset = {}, 0
    for name, dtype, shape, nbytes in tensors:
        entries[name] = {"dtype": safetensors_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()


def _header_bytes(head: bytes, reserved: int) -> bytes:
    return struct.pack("<Q", reserved) + head + b" " * (reserved - len(head))


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _rewrite_with_header(path: Path, head: bytes, data_start: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(_header_bytes(head, _round_up(len(head), 8)))
        src.seek(data_start)
        shutil.copyfileobj(src, dst, 1 << 24)
    os.replace(tmp, path)


def new_digest():
    """The hash that tells files apart for resume (shards written, inputs read): XXH3-128. Not
    cryptographic, chosen for speed (benchmarks/RESULTS.md): it tells a re-downloaded or edited file
    from the one recorded, which is what a resume must prove; whoever can edit the inputs on purpose
    could change the merge anyway."""
    return xxhash.xxh3_128()


def file_digest(path: Path) -> str:
    h = new_digest()
    buf = bytearray(1 << 24)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def write_config(out_dir: Path, config: dict) -> None:
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def copy_tokenizer(src: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer files (and generation_config.json) of the input model directory `src` into out_dir.

    Each file is checked again as it is opened (a regular file inside `src`, see `models.model_file`)
    and copied from the descriptor that was checked: a symlink to a key or to /proc/self/environ is
    a ModelError, never a copy.
    """
    from .models import copy_side_files  # here, not above: this function alone reads input files

    return copy_side_files(src, out_dir)


def torch_dtype_name(dtype: mx.Dtype) -> str:
    return {mx.bfloat16: "bfloat16", mx.float16: "float16", mx.float32: "float32", mx.float64: "float64"}.get(
        dtype, str(dtype).split(".")[-1]
    )


def safetensors_code(dtype: mx.Dtype) -> str:
    return MLX_TO_SAFETENSORS[dtype]


def make_writer(
    out_format: str,
    out_dir: Path,
    tensors: list[OutputTensor],
    config: dict,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    tokenizer_dir: Optional[Path] = None,
    skip_shards: Optional[set[str]] = None,
    group_size: Optional[int] = None,
) -> Writer:
    """The writer for an --out-format. Non-HF writers live in their format's module."""
    if out_format == "hf":
        return SafetensorsWriter(out_dir, tensors, config, max_shard_bytes, skip_shards)
    if out_format.startswith("mlx-"):
        from .quantized import QuantizedWriter

        return QuantizedWriter(
            out_dir, tensors, config, out_format, max_shard_bytes=max_shard_bytes, group_size=group_size, skip_shards=skip_shards
        )
    if out_format.startswith("gguf-"):
        from .gguf import GGUFWriter

        return GGUFWriter(out_dir, tensors, config, out_format, tokenizer_dir=tokenizer_dir)
    if out_format == "bitnet":
        from .bitnet_format import BitNetWriter

        return BitNetWriter(out_dir, tensors, config, max_shard_bytes=max_shard_bytes, skip_shards=skip_shards)
    raise RecipeError(f"--out-format {out_format!r} is not known; valid: {', '.join(OUT_FORMATS)}")

