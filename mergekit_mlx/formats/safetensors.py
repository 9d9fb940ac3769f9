"""Safetensors: Hugging Face and MLX model directories, read lazily and written shard by shard.

Reading: config.json plus one or more .safetensors files (from the index if there is one). Every
header is parsed and checked here before any tensor is read — size, JSON, dtypes, shapes, offsets
inside the file, no overlaps, every tensor the index lists in the file it names — so a lying header
is a ModelError naming the file, never a crash. A tensor is read only when it is evaluated.

Writing: model(-0000i-of-0000n).safetensors + model.safetensors.index.json + config.json. Tensors
are grouped in plan order into shards of at most `max_shard_bytes`; a shard's file is written front
to back as its tensors arrive (never held whole in memory) and gets its final name only when
complete, so a resumed run can keep every shard that has one.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import queue
import shutil
import struct
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .. import dtypes
from ..digest import file_digest, new_digest
from ..errors import ModelError, short_repr
from .base import ModelSource, Opener, OutputTensor, TensorInfo, WriteOptions, Writer
from .files import model_file, read_config, read_json

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


def recognises(path: Path, config: dict | None) -> bool:
    """Any model directory: the reader of last resort among the directory formats."""
    return path.is_dir()


def open_input(path: Path, config: dict | None, open_model: Opener) -> SafetensorsModel:
    """A plain reader (config.json is read here when the dispatcher found none: a ModelError)."""
    return open_checked(path, config if config is not None else read_config(path))


def open_checked(path: Path, config: dict) -> SafetensorsModel:
    """A model directory as an input: its headers read, and its index proven to match them."""
    model = SafetensorsModel(path, config)
    check_index_names(model)
    return model


# ---------------------------------------------------------------------------------------------
# reading


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity: Python accepts them, MLX's parser does not


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {dup!r} appears twice")
    return out


def _nbytes_within(shape: list[int], itemsize: int, limit: int) -> int | None:
    """Bytes of a tensor, or None once they pass `limit` (an absurd shape must not build a huge integer)."""
    if 0 in shape:
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > limit:
            return None
    return n


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header without reading tensor data.

    Checks what a hostile file could lie about: header size, JSON shape, dtypes, shapes, offsets
    inside the file, sizes consistent with shapes, and no overlapping tensors. The JSON is read as
    strictly as MLX's own parser reads it (UTF-8, no NaN, no duplicate keys), so a header that
    passes here is one `mx.load` reads the same way.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or n + 8 > size:
                raise ModelError(
                    f"{path}: safetensors header claims {n} bytes but the file has {size}; "
                    "the file is truncated or not safetensors"
                )
            text = f.read(n)
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(text.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelError(f"{path}: safetensors header is not valid JSON ({short_repr(str(e), 200)})") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}  # MLX writes "__metadata__": null when it was given none
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelError(f"{path}: safetensors __metadata__ must be an object of strings")
    data_size = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        where = f"{path}: tensor {short_repr(name)}"
        if not isinstance(entry, dict):
            raise ModelError(f"{where}: header entry must be an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in dtypes.BY_CODE:
            raise ModelError(f"{where}: unknown dtype {short_repr(dtype)} (known: {', '.join(dtypes.BY_CODE)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ModelError(f"{where}: shape must be a list of non-negative integers, got {short_repr(shape)}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise ModelError(f"{where}: data_offsets must be two integers, got {short_repr(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise ModelError(f"{where}: data_offsets {short_repr(offsets)} point outside the file's {data_size} data bytes")
        nbytes = _nbytes_within(shape, dtypes.itemsize(dtype), data_size)
        if end - begin != nbytes:
            need = "more bytes than the file holds" if nbytes is None else f"{nbytes} bytes"
            raise ModelError(f"{where}: shape {short_repr(shape)} of {dtype} needs {need}, data_offsets give {end - begin}")
        spans.append((begin, end, name))
        infos[name] = TensorInfo(name, tuple(shape), dtype, path, 8 + n + begin)
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ModelError(f"{path}: tensors {short_repr(n0)} and {short_repr(n1)} overlap in the file")
    return infos, metadata


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a model directory, from the index if there is one.

    The index and the directory are untrusted: every file must be a plain name whose real location
    (after symlinks) is the model directory, or the blobs of a Hugging Face cache snapshot.
    """
    index = path / "model.safetensors.index.json"
    if os.path.lexists(index):
        data = read_json(path, index.name, "the index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index}: needs a non-empty 'weight_map' object")
        files = []
        for name, fname in weight_map.items():
            if (
                not isinstance(fname, str)
                or any(c in fname for c in "/\\\0")
                or fname in ("", ".", "..")
                or len(fname.encode()) > 255
            ):
                raise ModelError(
                    f"{index}: weight_map entry for {short_repr(name)} must be a file name inside the model "
                    f"directory, got {short_repr(fname)}"
                )
            f = path / fname
            if f in files:
                continue
            if not os.path.lexists(f):
                raise ModelError(f"{index}: lists {fname} (for {short_repr(name)}), which does not exist")
            model_file(path, fname, "weight file", where=index)
            files.append(f)
        return files
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        model_file(path, f.name, "weight file")
    if not files:
        pickles = [p.name for ext in ("bin", "pt", "pth", "ckpt") for p in sorted(path.glob(f"*.{ext}"))]
        if pickles:
            raise ModelError(
                f"{path}: has only PyTorch pickle checkpoints ({', '.join(pickles[:3])}), which are never loaded "
                "because unpickling can run code; convert them to safetensors first, e.g. with "
                '`python -c "from transformers import AutoModelForCausalLM as M; '
                "M.from_pretrained('IN').save_pretrained('OUT', safe_serialization=True)\"`"
            )
        raise ModelError(f"{path}: no .safetensors weight files found")
    return files


class SafetensorsModel(ModelSource):
    """A Hugging Face or MLX model directory: config.json plus one or more .safetensors files."""

    def __init__(self, path: Path, config: dict):
        infos: dict[str, TensorInfo] = {}
        formats = set()
        for shard in safetensors_files(path):
            shard_infos, metadata = read_safetensors_header(shard)
            formats.add(metadata.get("format"))
            for name, info in shard_infos.items():
                if name in infos:
                    raise ModelError(f"{path}: tensor {name!r} appears in both {infos[name].file.name} and {shard.name}")
                infos[name] = info
        super().__init__(path, config, infos)
        self.format = "mlx" if formats == {"mlx"} else "hf"
        self._local = threading.local()

    # several threads may read one model: MLX ties a lazy array to the thread that made it, so
    # each thread opens the shards itself (a header parse) and keeps its own lazy arrays
    parallel_reads = True

    @property
    def _shards(self) -> dict[Path, dict[str, mx.array]]:
        shards = getattr(self._local, "shards", None)
        if shards is None:
            shards = self._local.shards = {}
        return shards

    def load(self, name: str) -> mx.array:
        info = self.info(name)
        if dtypes.mlx_dtype(info.dtype) is None:
            raise ModelError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, which MLX cannot load")
        arrays = self._shards.get(info.file)
        if arrays is None or name not in arrays:
            # mx.load of safetensors is lazy: a tensor's bytes are read only when it is evaluated
            try:
                # read on the CPU stream: on a GPU, MLX's GPU-stream load is slower (it stages every
                # tensor through pageable memory; benchmarks/RESULTS.md, section 8); the merge moves
                # the data to the device anyway
                arrays = self._shards[info.file] = mx.load(str(info.file), stream=mx.cpu)
            except (RuntimeError, ValueError) as e:  # e.g. the file changed since its header was checked
                raise ModelError(f"{info.file}: MLX cannot read it ({e})") from None
        if name not in arrays:
            raise ModelError(f"{info.file}: tensor {name!r} is in its header but MLX did not load it")
        # handed out, not kept: a cached reference would hold the evaluated data for the whole merge
        return arrays.pop(name)

    def file_span(self, name: str) -> tuple[Path, int, int]:
        """(file, offset, size in bytes) of a tensor's data, for readers that move the bytes
        themselves (gpu_reads); the same checks as `load`."""
        info = self.info(name)
        if dtypes.mlx_dtype(info.dtype) is None:
            raise ModelError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, which MLX cannot load")
        return info.file, info.offset, info.nbytes

    def release(self) -> None:
        """Forget opened shards (every thread's lazy arrays), e.g. after the planner is done with them."""
        self._local = threading.local()


def check_index_names(model: SafetensorsModel) -> None:
    """Every tensor an input's index lists is in the file it names (a loader that trusts the index
    looks for it there); headers only, `safetensors_files` has checked the index's shape already."""
    path = model.path
    index = path / "model.safetensors.index.json"
    if not os.path.lexists(index):
        return
    for name, fname in read_json(path, index.name, "the index")["weight_map"].items():
        if not model.has(name) or model.info(name).file != path / fname:
            raise ModelError(f"{index}: lists tensor {short_repr(name)} in {fname}, which does not hold it")


# ---------------------------------------------------------------------------------------------
# writing


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


class SafetensorsWriter(Writer):
    """`hf` output: model(-0000i-of-0000n).safetensors + model.safetensors.index.json + config.

    Shards are streamed: a shard's file is opened with room for its header when its first tensor
    arrives, each tensor's bytes are appended as it arrives (so memory never holds a shard), and
    the header is written last, for the tensors actually written. A shard gets its final name
    only when complete. The digest (`digest.new_digest`) of every shard but the last is computed
    while it is written (`checksums`) for the resume state; the last shard is closed by `finish`,
    after which the state is no longer needed.
    """

    out_formats = ("hf",)
    resumable = True
    copies_tokenizer = True
    known_size = True
    verifiable = True
    # shards may be written side by side (`lanes`); not by the quantizing writers, whose `add` runs
    # MLX computations (a second thread of GPU work crashed MLX's CUDA backend: pipeline.py)
    side_by_side = True
    takes_device_tensors = True  # `_ShardFile.append` copies them to host memory piece by piece

    def __init__(
        self,
        out_dir: Path,
        tensors: list[OutputTensor],
        config: dict,
        out_format: str = "hf",
        options: WriteOptions = WriteOptions(),
    ):
        self.out_dir = out_dir
        self.config = config
        self.shards = plan_shards(tensors, options.max_shard_bytes)
        self.files = shard_file_names(len(self.shards))
        self.shard_of = {t.name: i for i, shard in enumerate(self.shards) for t in shard}
        self.pending: dict[int, set[str]] = {}  # shard -> names that have arrived, while it is open
        self.open: dict[int, _ShardFile] = {}
        # shards already complete on disk (resume): their tensors are accepted and dropped
        self.skip = options.skip_shards
        self.written: list[str] = []
        self.checksums: dict[str, str] = {}
        self.lock = threading.Lock()  # the bookkeeping above, when shards are written side by side
        # The shards to write, taken `lanes` at a time: a producer that writes side by side hands
        # each lane (`lane`) its tensors from its own thread, in the order of `position`. One file
        # takes one page-cache write at a time (the filesystem's lock of the file), so the shards
        # of a window are what lets writes run in parallel.
        todo = [i for i, f in enumerate(self.files) if f not in self.skip]
        self.lanes = max(1, min(_WRITE_LANES if self.side_by_side else 1, len(todo)))
        self.window = {i: divmod(k, self.lanes) for k, i in enumerate(todo)}  # shard -> (window, lane)
        self.depth: dict[str, float] = {}  # name -> where its bytes start in its shard, as a fraction of the shard
        for shard in self.shards:
            total, start = max(1, sum(t.nbytes for t in shard)), 0
            for t in shard:
                self.depth[t.name] = start / total
                start += t.nbytes

    def lane(self, name: str) -> int:
        """The lane that writes this tensor's shard (0 .. lanes - 1)."""
        return self.window.get(self.shard_of[name], (0, 0))[1]

    def position(self, name: str) -> tuple[int, float, int]:
        """Sort key of the writing order when shards are written side by side: window by window,
        and within a window the shards' tensors interleaved by how deep into its shard each lies,
        so the shards of a window fill together and are finished about together. A shard's own
        tensors keep their plan order, so its file is the same as when written alone."""
        i = self.shard_of[name]
        return (self.window.get(i, (-1, 0))[0], self.depth[name], i)

    def wants(self, name: str) -> bool:
        """False for tensors whose shard is already on disk (a resumed merge need not compute them)."""
        return self.files[self.shard_of[name]] not in self.skip

    def add(self, name: str, array: mx.array) -> None:
        i = self.shard_of[name]
        if self.files[i] in self.skip:
            return
        with self.lock:
            arrived = self.pending.setdefault(i, set())
            arrived.add(name)
            complete = len(arrived) == len(self.shards[i])
        self._write(i, {name: array})
        if complete and i != len(self.shards) - 1:
            self._close(i)

    def _write(self, i: int, arrays: dict[str, mx.array]) -> None:
        """Append tensors to shard i's file (opened on its first tensor). A shard's tensors come
        from one thread at a time, so its file needs no lock."""
        f = self.open.get(i)
        if f is None:
            path = self.out_dir / ("incomplete-" + self.files[i])
            # a file written by a lane of its own is not cut into slices for the write threads
            f = _ShardFile(path, self.shards[i], checksum=i != len(self.shards) - 1, sliced=self.lanes == 1)
            with self.lock:
                self.open[i] = f
        for name, array in arrays.items():
            f.append(name, array)

    def _close(self, i: int) -> None:
        with self.lock:
            f = self.open.pop(i, None)
            self.pending.pop(i, None)
        f = f or _ShardFile(self.out_dir / ("incomplete-" + self.files[i]), self.shards[i])
        digest = f.close()
        f.path.rename(self.out_dir / self.files[i])  # a shard's final name means it is complete
        with self.lock:
            if digest is not None:
                self.checksums[self.files[i]] = digest
            self.written.append(self.files[i])

    def finish(self) -> None:
        self.close_shards()
        self.write_index()

    def close_shards(self) -> None:
        """Close the shards still open; every planned tensor of a shard not skipped must have arrived.
        (A rank of a distributed merge stops here: rank 0 writes the index and config.)"""
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

    def write_index(self) -> None:
        """The index of the shards (when there are several) and the config."""
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

    def __init__(self, path: Path, planned: list[OutputTensor], checksum: bool = False, sliced: bool = True):
        self.path = path
        self.sliced = sliced  # big tensors written in slices by the write threads (`_write_all`)
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
        self.hash: _BackgroundHash | None = None
        if checksum:
            self.hash = _BackgroundHash()
            self.hash.update(_header_bytes(head, self.reserved))

    def append(self, name: str, array) -> None:
        """Append a tensor's bytes: an MLX array, or a DeviceTensor (kernels/gpu_writes.py) still in
        GPU memory, whose bytes come to host memory piece by piece."""
        if not isinstance(array, mx.array):
            # a piece's buffer is filled again once the hash has read it (on the hash's thread)
            for piece in array.pieces(self.hash.drain if self.hash is not None else None):
                if self.hash is not None:
                    self.hash.update(piece)
                self._write_bytes(piece)
            self._entry(name, array.dtype, array.shape, array.nbytes)
            return
        mx.eval(array)
        view = memoryview(array)
        if not view.c_contiguous:  # a transposed or broadcast view: write it in row-major order
            array = mx.contiguous(array)
            mx.eval(array)
            view = memoryview(array)
        data = view.cast("B") if array.nbytes else b""
        if self.hash is not None:
            self.hash.update(data)
        self._write_bytes(data)
        self._entry(name, array.dtype, array.shape, array.nbytes)

    def _write_bytes(self, data) -> None:
        if self.direct is not None:
            self.direct.write(data)
        elif self.sliced:
            _write_all(self.file, data)
        else:
            self.file.write(data)

    def _entry(self, name: str, dtype: mx.Dtype, shape, nbytes: int) -> None:
        self.entries[name] = {
            "dtype": dtypes.safetensors_code(dtype),
            "shape": list(shape),
            "data_offsets": [self.size, self.size + nbytes],
        }
        self.size += nbytes

    def close(self) -> str | None:
        """Write the final header; returns the file's digest when it was asked for."""
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
            self.entries[t.name]["shape"] == list(t.shape) and self.entries[t.name]["dtype"] == dtypes.safetensors_code(t.dtype)
            for t in self.planned
        ):
            return digest
        return file_digest(self.path)


# big tensors are written by several threads at once where there are cores to spare (on a GPU host
# one thread cannot fill the page cache: benchmarks/RESULTS.md, section 8); a 2-core CPU keeps one
_WRITE_THREADS = max(1, min(8, (os.cpu_count() or 1) // 4))
_PARALLEL_WRITE_MIN = 64 << 20
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _write_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_WRITE_THREADS, thread_name_prefix="mergekit-mlx-write")
        return _pool


# On a machine with few cores, writing through the page cache costs more CPU than the merge can
# spare (ten times O_DIRECT's on a 2-core CPU: benchmarks/RESULTS.md, section 8), so shard data goes
# around it there; hosts with cores to spare keep the page cache and the parallel writes above.
_DIRECT = sys.platform.startswith("linux") and hasattr(os, "O_DIRECT") and _WRITE_THREADS < 2
# shards written side by side, each by a thread of its own, where writes go through the page cache:
# the page cache takes one file's writes one at a time however many threads write it
# (benchmarks/RESULTS.md, section 19)
_WRITE_LANES = 1 if _DIRECT else _WRITE_THREADS
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
    def open(cls, path: Path, start: int) -> _DirectWriter | None:
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
            np.copyto(self.buf[self.filled : self.filled + k], src[done : done + k])  # releases the GIL
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
                self.buf[self.filled : tail] = 0
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
    jobs = [_write_pool().submit(_pwrite_all, f.fileno(), data[o : o + step], start + o) for o in range(0, len(data), step)]
    for j in jobs:
        j.result()
    f.seek(start + len(data))


class _BackgroundHash:
    """The content digest (`new_digest`) of a stream of buffers, computed on a thread of its own so
    that hashing a shard does not hold up the writes; at most `limit` bytes wait to be hashed."""

    def __init__(self, limit: int = 1 << 30):
        self.h = new_digest()
        self.q: queue.Queue[object | None] = queue.Queue()
        self.room = threading.Semaphore(max(1, limit >> 20))  # in MiB
        self.t = threading.Thread(
            target=_BackgroundHash._run, args=(self.h, self.q, self.room), name="mergekit-mlx-hash", daemon=True
        )
        self.t.start()
        weakref.finalize(self, self.q.put, None)  # an abandoned shard (a failed merge) ends the thread

    @staticmethod
    def _run(h, q, room) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            data, mib = item
            if isinstance(data, threading.Event):  # drain waits for what was queued before it
                data.set()
                continue
            h.update(data)
            for _ in range(mib):
                room.release()

    def update(self, data) -> None:
        mib = min(max(1, len(data) >> 20), 1024)
        for _ in range(mib):
            self.room.acquire()
        self.q.put((data, mib))

    def drain(self) -> None:
        """Wait until everything handed to `update` so far is hashed (its buffers may be reused)."""
        drained = threading.Event()
        self.q.put((drained, 0))
        drained.wait()

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
        entries[name] = {"dtype": dtypes.safetensors_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
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


def write_config(out_dir: Path, config: dict) -> None:
    """config.json of an output directory."""
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
