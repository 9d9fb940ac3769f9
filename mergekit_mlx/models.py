"""Reading input models: one `ModelSource` per model, whatever its format, lazy per tensor.

A source knows its config, the names, shapes and dtypes of its tensors (from headers alone), and
loads one tensor as an `mx.array` only when asked. Safetensors headers are parsed and checked here
before any tensor is read, so a lying header is an error naming the file, never a crash.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional

import mlx.core as mx

from .errors import ModelError

# safetensors dtype code -> (bytes per element, mlx dtype)
SAFETENSORS_DTYPES: dict[str, tuple[int, Optional[mx.Dtype]]] = {
    "F64": (8, mx.float64),
    "F32": (4, mx.float32),
    "F16": (2, mx.float16),
    "BF16": (2, mx.bfloat16),
    "I64": (8, mx.int64),
    "I32": (4, mx.int32),
    "I16": (2, mx.int16),
    "I8": (1, mx.int8),
    "U64": (8, mx.uint64),
    "U32": (4, mx.uint32),
    "U16": (2, mx.uint16),
    "U8": (1, mx.uint8),
    "BOOL": (1, mx.bool_),
    "F8_E4M3": (1, None),
    "F8_E5M2": (1, None),
}
MLX_TO_SAFETENSORS = {v[1]: k for k, v in SAFETENSORS_DTYPES.items() if v[1] is not None}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
MAX_SIDE_FILE_BYTES = 1 << 30  # a config, index or tokenizer file read whole: far above any real one
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# the files of a model directory besides config and weights that are read, copied or handed to a
# tokenizer loader: exactly these, each checked by `model_file` when the model is opened
SIDE_FILES = TOKENIZER_FILES + ("generation_config.json",)

# "model.layers.12.mlp.up_proj.weight" -> ("model.layers.", 12, ".mlp.up_proj.weight")
LAYER_PATTERN = re.compile(r"^(.*?\.(?:layers|h|blocks)\.)(\d{1,9})(\..+)$")  # 9 digits: a 5000-digit index is no layer


def layer_index(name: str) -> Optional[int]:
    """The decoder-layer index a tensor belongs to, or None for embeddings, final norm, head."""
    m = LAYER_PATTERN.match(name)
    return int(m.group(2)) if m else None


def with_layer_index(name: str, index: int) -> str:
    m = LAYER_PATTERN.match(name)
    if not m:
        return name
    return f"{m.group(1)}{index}{m.group(3)}"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code ("BF16", "F32", ...) of the tensor as loaded
    file: Optional[Path] = None  # the file that holds it
    offset: Optional[int] = None  # where its bytes start in that file, when stored there as they load

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * SAFETENSORS_DTYPES[self.dtype][0]


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity: Python accepts them, MLX's parser does not


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {dup!r} appears twice")
    return out


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value) if not isinstance(value, list) or len(value) <= 16 else f"[{len(value)} values]"
    return text if len(text) <= limit else text[:limit] + "..."


def _nbytes_within(shape: list[int], itemsize: int, limit: int) -> Optional[int]:
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
        raise ModelError(f"{path}: safetensors header is not valid JSON ({_short_repr(str(e), 200)})") from None
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
        where = f"{path}: tensor {_short_repr(name)}"
        if not isinstance(entry, dict):
            raise ModelError(f"{where}: header entry must be an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise ModelError(
                f"{where}: unknown dtype {_short_repr(dtype)} (known: {', '.join(SAFETENSORS_DTYPES)})"
            )
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ModelError(f"{where}: shape must be a list of non-negative integers, got {_short_repr(shape)}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise ModelError(f"{where}: data_offsets must be two integers, got {_short_repr(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise ModelError(
                f"{where}: data_offsets {_short_repr(offsets)} point outside the file's {data_size} data bytes"
            )
        nbytes = _nbytes_within(shape, SAFETENSORS_DTYPES[dtype][0], data_size)
        if end - begin != nbytes:
            need = "more bytes than the file holds" if nbytes is None else f"{nbytes} bytes"
            raise ModelError(
                f"{where}: shape {_short_repr(shape)} of {dtype} needs {need}, data_offsets give {end - begin}"
            )
        spans.append((begin, end, name))
        infos[name] = TensorInfo(name, tuple(shape), dtype, path, 8 + n + begin)
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ModelError(f"{path}: tensors {_short_repr(n0)} and {_short_repr(n1)} overlap in the file")
    return infos, metadata


class ModelSource:
    """One input model. Subclasses implement `load`; headers are read at construction."""

    format = "hf"
    parallel_reads = False  # True where several threads may call load() side by side

    def __init__(self, path: Path, config: dict, infos: dict[str, TensorInfo]):
        self.path = path
        self.config = config
        self._infos = infos
        # checked now, when the model is opened, so a hostile side file stops the run before any output
        self.side_files: dict[str, Path] = check_side_files(path) if path.is_dir() else {}

    def tensor_names(self) -> list[str]:
        return list(self._infos)

    def has(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise ModelError(f"{self.path}: has no tensor {name!r}") from None

    def load(self, name: str) -> mx.array:
        raise NotImplementedError  # every concrete source overrides this

    @property
    def tokenizer_dir(self) -> Optional[Path]:
        """The model directory when it holds tokenizer files (all of them checked by `check_side_files`)."""
        return self.path if any(f in self.side_files for f in TOKENIZER_FILES) else None

    @property
    def num_layers(self) -> int:
        return num_layers(self.config, self.tensor_names(), self.path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


def num_layers(config: dict, names: list[str], where: Path) -> int:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        for cfg in (config, text):
            n = cfg.get(key)
            if isinstance(n, int) and not isinstance(n, bool):
                if n < 1:
                    raise ModelError(f"{where}: config.json says {key} is {n}; a model needs at least one layer")
                return n
    found = [i for i in map(layer_index, names) if i is not None]
    if found:
        return max(found) + 1
    raise ModelError(f"{where}: config has no num_hidden_layers and no tensor names with layer indices")


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
        if SAFETENSORS_DTYPES[info.dtype][1] is None:
            raise ModelError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, which MLX cannot load")
        arrays = self._shards.get(info.file)
        if arrays is None or name not in arrays:
            # mx.load of safetensors is lazy: a tensor's bytes are read only when it is evaluated
            try:
                # read on the CPU stream: on a GPU, MLX's GPU-stream load is 2.4x slower (it stages
                # every tensor through pageable memory); the merge moves the data to the device anyway
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
        if SAFETENSORS_DTYPES[info.dtype][1] is None:
            raise ModelError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, which MLX cannot load")
        return info.file, info.offset, info.nbytes

    def release(self) -> None:
        """Forget opened shards (every thread's lazy arrays), e.g. after the planner is done with them."""
        self._local = threading.local()


def _allowed_roots(directory: Path) -> list[Path]:
    """Where a model directory's files may really live: the directory itself, and for a Hugging Face
    cache snapshot (whose files are symlinks into the repository's blobs) that blobs folder."""
    root = directory.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def model_file(directory: Path, name: str, what: str, max_bytes: Optional[int] = None, where: Optional[Path] = None) -> Path:
    """The real path of file `name` of a model directory, once it is proven safe to read.

    Every file of an input model is untrusted: it must be a regular file (not a FIFO, device, socket
    or directory, which would block or never end), whose real location after symlinks is the model
    directory or a folder in it (or the blobs folder of a Hugging Face cache snapshot), and, where it is read
    whole into memory, at most `max_bytes` long. Anything else is a ModelError naming the file (or
    `where`, the file that listed it) and what would be valid.
    """
    directory = Path(directory)
    f = directory / name
    label = f"{what} {name!r}" if where is not None and where != f else what
    where = where or f
    try:
        real = f.resolve(strict=True)
        st = real.stat()
    except (OSError, RuntimeError) as e:  # missing, a dangling or looping symlink, unreadable
        raise ModelError(f"{where}: cannot read {label} ({getattr(e, 'strerror', None) or e})") from None
    if not any(real.is_relative_to(r) for r in _allowed_roots(directory)):
        raise ModelError(
            f"{where}: {label} resolves to {real}, outside the model directory {directory}; a model's files must "
            "live in the model directory (copy the file there, or name the directory that holds it)"
        )
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(
            f"{where}: cannot read {label} (not a regular file): a model's files must be regular files; "
            "a FIFO, device, socket or directory is never read"
        )
    if max_bytes is not None and st.st_size > max_bytes:
        raise ModelError(f"{where}: {label} is {st.st_size} bytes, more than the {max_bytes} such a file may have")
    return real


def open_model_file(directory: Path, name: str, what: str, max_bytes: int = MAX_SIDE_FILE_BYTES) -> BinaryIO:
    """`model_file`, opened for reading: the descriptor itself is checked again (a regular file,
    not a symlink swapped in since), so what is read is what was checked."""
    real = model_file(directory, name, what, max_bytes)
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ModelError(f"{directory / name}: cannot read {what} ({e.strerror or e})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
        os.close(fd)
        raise ModelError(f"{directory / name}: {what} changed while it was read; it must be a regular file inside the model directory")
    return os.fdopen(fd, "rb")


def read_model_file(directory: Path, name: str, what: str, max_bytes: int = MAX_SIDE_FILE_BYTES) -> bytes:
    """The bytes of a checked model file (see `model_file`), never more than max_bytes."""
    data = bytearray()
    with open_model_file(directory, name, what, max_bytes) as f:
        try:
            # in chunks, not f.read(max_bytes + 1), which would allocate the limit up front; the
            # limit holds also for a file that grows, or a /proc-like one whose size reads 0
            while len(data) <= max_bytes and (chunk := f.read(min(1 << 24, max_bytes + 1 - len(data)))):
                data += chunk
        except OSError as e:
            raise ModelError(f"{directory / name}: cannot read {what} ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise ModelError(f"{directory / name}: {what} is more than the {max_bytes} bytes such a file may have")
    return bytes(data)


def check_side_files(directory: Path) -> dict[str, Path]:
    """The side files (`SIDE_FILES`) a model directory has, each checked by `model_file`; a name
    that is there but unsafe (a symlink out, a FIFO, a dangling link, too large) is a ModelError."""
    found = {}
    for name in SIDE_FILES:
        if os.path.lexists(directory / name):
            what = "tokenizer file" if name in TOKENIZER_FILES else "generation config"
            found[name] = model_file(directory, name, what, MAX_SIDE_FILE_BYTES)
    return found


def copy_side_files(directory: Path, out_dir: Path, names: tuple[str, ...] = SIDE_FILES) -> list[str]:
    """Copy those of `names` a model directory has into out_dir, each checked again as it is opened
    and copied from the descriptor that was checked (no gap for a symlink swapped in between)."""
    copied = []
    for name in names:
        if not os.path.lexists(directory / name):
            continue
        what = "tokenizer file" if name in TOKENIZER_FILES else name
        with open_model_file(directory, name, what) as f, open(Path(out_dir) / name, "wb") as out:
            shutil.copyfileobj(f, out)
        copied.append(name)
    return copied


def _read_json(directory: Path, name: str, what: str) -> Any:
    """A JSON file of a model directory; any way it can be unsafe or unreadable is a ModelError naming it."""
    path = directory / name
    data = read_model_file(directory, name, what)
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelError(f"{path}: {what} is not valid JSON ({_short_repr(str(e), 200)})") from None


def check_index_names(path: Path) -> None:
    """Every tensor an input's index lists is in the file it names (a loader that trusts the index
    looks for it there). Headers only; `safetensors_files` has checked the index's shape already."""
    index = path / "model.safetensors.index.json"
    if not os.path.lexists(index):
        return
    held: dict[str, set[str]] = {}
    for name, fname in _read_json(path, index.name, "the index")["weight_map"].items():
        if fname not in held:
            held[fname] = set(read_safetensors_header(path / fname)[0])
        if name not in held[fname]:
            raise ModelError(f"{index}: lists tensor {_short_repr(name)} in {fname}, which does not hold it")


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a model directory, from the index if there is one.

    The index and the directory are untrusted: every file must be a plain name whose real location
    (after symlinks) is the model directory, or the blobs of a Hugging Face cache snapshot.
    """
    index = path / "model.safetensors.index.json"
    if os.path.lexists(index):
        data = _read_json(path, index.name, "the index")
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
                    f"{index}: weight_map entry for {_short_repr(name)} must be a file name inside the model "
                    f"directory, got {_short_repr(fname)}"
                )
            f = path / fname
            if f in files:
                continue
            if not os.path.lexists(f):
                raise ModelError(f"{index}: lists {fname} (for {_short_repr(name)}), which does not exist")
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
                "`python -c \"from transformers import AutoModelForCausalLM as M; "
                "M.from_pretrained('IN').save_pretrained('OUT', safe_serialization=True)\"`"
            )
        raise ModelError(f"{path}: no .safetensors weight files found")
    return files


def read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not os.path.lexists(cfg_path):
        raise ModelError(f"{path}: no config.json (a model directory needs one)")
    config = _read_json(path, "config.json", "config.json")
    if not isinstance(config, dict):
        raise ModelError(f"{cfg_path}: must hold a JSON object")
    return config


def open_model(path: str | Path) -> ModelSource:
    """Open an input model, detecting its format: HF/MLX directory, MLX-quantized directory, GGUF file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"{p}: no such file or directory")
    if not p.is_dir():
        # a file named by the user: any path will do, but it must be a regular file (a FIFO would hang)
        if not p.is_file():
            raise ModelError(f"{p}: not a regular file or a directory; a model must be a directory with config.json and safetensors, or a .gguf file")
        if p.suffix.lower() == ".gguf" or _has_gguf_magic(p):
            from .gguf import GGUFModel

            return GGUFModel(p)
        raise ModelError(f"{p}: a model must be a directory with config.json and safetensors, or a .gguf file")
    ggufs = sorted(p.glob("*.gguf"))
    if ggufs and not os.path.lexists(p / "config.json"):
        if len(ggufs) > 1:
            raise ModelError(f"{p}: holds several .gguf files ({', '.join(g.name for g in ggufs[:4])}); name one")
        from .gguf import GGUFModel

        model_file(p, ggufs[0].name, "GGUF file")
        return GGUFModel(ggufs[0])
    config = read_config(p)
    safetensors_files(p)  # the index and the files it names, checked before anything reads them
    check_index_names(p)
    if "quantization" in config or "quantization_config" in config:
        from .quantized import open_quantized

        model = open_quantized(p, config)
        if model is not None:
            return model
    return SafetensorsModel(p, config)


def _has_gguf_magic(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
