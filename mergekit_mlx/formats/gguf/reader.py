"""Reading a llama-family GGUF file as the Hugging Face model it encodes: names, config, tokenizer.

Reading goes through the `gguf` package's reader (a memory map; one tensor dequantized per `load`),
never `mx.load`, which drops TQ1_0/TQ2_0 tensors and decodes some K-quants wrongly. The file is
untrusted: its header is walked with bounds checks (`check_gguf_layout`) before that package
parses it, and every tensor must lie inside the file.
"""

from __future__ import annotations

import atexit
import logging
import mmap
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import numpy as np

from ...errors import ModelError
from ..base import ModelSource, TensorInfo
from . import architectures as archs
from .architectures import BY_GGUF_NAME, COMMON_FIELDS, Layout
from .layout import LLAMA3_KEY, llama3_rope_scaling, read_field
from .quants import LOADED_CODES, Q, can_dequantize
from .tokenizer import write_tokenizer

log = logging.getLogger(__name__)
T = gguf.MODEL_TENSOR

_TOKENIZER_DIRS: dict[tuple, Path | None] = {}  # GGUF file identity -> its rebuilt tokenizer directory


# GGUF value type -> bytes of one scalar (8 = string and 9 = array are walked separately)
GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
MAX_GGUF_ARRAY = 1 << 22  # items in one metadata array; a vocabulary has a few hundred thousand
MAX_GGUF_DIMS = 4  # GGML_MAX_DIMS


def check_gguf_layout(path: Path) -> None:
    """Walk a GGUF header with bounds checks, before the `gguf` package parses it.

    The package trusts counts and lengths: a metadata array claiming 2**60 items past the end of
    the file makes it loop, allocating, for ever. Here every count, length, dimension and offset is
    checked against the bytes really there, in one pass that allocates nothing per item.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        data = f.read(min(size, 24))
        if len(data) < 24 or data[:4] != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file (no GGUF magic and 24-byte preamble)")
        view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with view:
        _walk_gguf(path, view, size)


def _walk_gguf(path: Path, view: mmap.mmap, size: int) -> None:
    pos = 4
    (version,) = struct.unpack_from("<I", view, pos)
    order = ">" if version & 0xFFFF == 0 else "<"  # a big-endian file, as the gguf package tells them
    (version,) = struct.unpack_from(order + "I", view, pos)
    if version not in gguf.READER_SUPPORTED_VERSIONS:
        raise ModelError(f"{path}: GGUF version {version} is not supported (supported: 2, 3)")
    pos = 8

    def take(fmt: str, what: str) -> tuple:
        nonlocal pos
        n = struct.calcsize(order + fmt)
        if pos + n > size:
            raise ModelError(f"{path}: GGUF header: {what} (at byte {pos}) runs past the end of the file ({size} bytes)")
        values = struct.unpack_from(order + fmt, view, pos)
        pos += n
        return values

    def skip(n: int, what: str) -> None:
        nonlocal pos
        if n > size - pos:
            raise ModelError(
                f"{path}: GGUF header: {what} (at byte {pos}) needs {n} bytes, past the end of the file ({size} bytes); "
                "the file is truncated or its counts are wrong"
            )
        pos += n

    def string(what: str) -> bytes:
        (n,) = take("Q", what)
        start = pos
        skip(n, what)
        return view[start:pos]

    def value(vtype: int, what: str, depth: int = 0) -> None:
        if vtype in GGUF_SCALAR_BYTES:
            skip(GGUF_SCALAR_BYTES[vtype], what)
        elif vtype == 8:
            (n,) = take("Q", what)
            skip(n, what)
        elif vtype == 9 and depth < 2:
            itype, count = take("IQ", what)
            if count > MAX_GGUF_ARRAY:
                raise ModelError(
                    f"{path}: GGUF header: {what} claims an array of {count} items (at most {MAX_GGUF_ARRAY} are read)"
                )
            if itype in GGUF_SCALAR_BYTES:
                skip(count * GGUF_SCALAR_BYTES[itype], what)
            else:
                for _ in range(count):
                    value(itype, what, depth + 1)
        else:
            raise ModelError(f"{path}: GGUF header: {what} has an unknown value type {vtype}")

    n_tensors, n_kv = take("QQ", "the tensor and metadata counts")
    room = size - pos
    if n_kv > room // 13 or n_tensors > room // 24:  # the smallest entry of each kind
        raise ModelError(
            f"{path}: GGUF header claims {n_tensors} tensors and {n_kv} metadata entries, more than its {size} bytes can hold"
        )
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    for i in range(n_kv):
        raw = string(f"metadata key #{i}")
        try:
            key = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelError(f"{path}: GGUF metadata key #{i} is not UTF-8 text") from None
        (vtype,) = take("I", f"the type of metadata {key!r}")
        start = pos
        value(vtype, f"metadata {key!r}")
        if key == "general.alignment" and vtype == 4:
            (alignment,) = struct.unpack_from(order + "I", view, start)
    if alignment == 0 or alignment & (alignment - 1):
        raise ModelError(f"{path}: GGUF general.alignment {alignment} is not a power of two")

    spans = []
    names = set()
    for i in range(n_tensors):
        raw = string(f"the name of tensor #{i}")
        name = raw.decode("utf-8", errors="replace")
        if name in names:
            raise ModelError(f"{path}: GGUF tensor {name!r} appears twice")
        names.add(name)
        (n_dims,) = take("I", f"the rank of tensor {name!r}")
        if n_dims > MAX_GGUF_DIMS:
            raise ModelError(f"{path}: GGUF tensor {name!r} claims {n_dims} dimensions (at most {MAX_GGUF_DIMS})")
        dims = take(f"{n_dims}Q", f"the shape of tensor {name!r}")
        raw_type, offset = take("IQ", f"the type and offset of tensor {name!r}")
        try:
            qtype = Q(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelError(f"{path}: GGUF tensor {name!r} has an unknown type {raw_type}") from None
        elements = 1
        for d in dims:
            elements *= d
            if elements > 8 * size:  # no tensor type stores more than 8 values a byte
                raise ModelError(f"{path}: GGUF tensor {name!r} claims shape {list(dims)}, larger than the file")
        if dims and dims[0] % block:
            raise ModelError(
                f"{path}: GGUF tensor {name!r} of type {qtype.name} has a row of {dims[0]}, not a multiple of {block}"
            )
        spans.append((offset, elements // block * type_size, name))
    data_start = pos + (-pos) % alignment
    for offset, nbytes, name in spans:
        if data_start + offset + nbytes > size:
            raise ModelError(
                f"{path}: GGUF tensor {name!r} ({nbytes} bytes at data offset {offset}) lies past the end of the file ({size} bytes)"
            )
    spans.sort()
    for (o0, n0, a), (o1, _, b) in zip(spans, spans[1:]):
        if o1 < o0 + n0:
            raise ModelError(f"{path}: GGUF tensors {a!r} and {b!r} overlap in the file")


class GGUFModel(ModelSource):
    """One GGUF file, seen as a Hugging Face model: HF tensor names, rebuilt config and tokenizer."""

    format = "gguf"

    def __init__(self, path: Path):
        path = Path(path)
        try:
            check_gguf_layout(path)
            reader = gguf.GGUFReader(path)
        except (ValueError, KeyError, IndexError, OverflowError, TypeError, UnicodeDecodeError, MemoryError) as e:
            raise ModelError(f"{path}: not a readable GGUF file ({e})") from None
        except OSError as e:
            raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None
        self.reader = reader
        arch = read_field(reader, "general.architecture")
        blocks = read_field(reader, f"{arch}.block_count")
        experts = read_field(reader, f"{arch}.expert_count", 0)
        spec = archs.for_gguf(arch, experts) if isinstance(arch, str) else None
        if spec is None:
            raise ModelError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(BY_GGUF_NAME))}")
        if not isinstance(blocks, int) or blocks <= 0 or not isinstance(experts, int) or experts < 0:
            raise ModelError(f"{path}: GGUF metadata {arch}.block_count or {arch}.expert_count is not a count")
        self.arch = arch
        size = path.stat().st_size
        infos: dict[str, TensorInfo] = {}
        self._tensors: dict[str, tuple[Any, int | None, archs.GGUFTensor]] = {}
        self._row_blocks: dict[str, list[Any]] = {}  # Hugging Face tensor -> the GGUF tensors of its rows, in order
        split: dict[str, dict[int, tuple[Any, tuple[int, ...], archs.GGUFTensor]]] = {}
        skipped = []
        for t in reader.tensors:
            if not 0 <= t.data_offset <= t.data_offset + t.n_bytes <= size:
                raise ModelError(f"{path}: tensor {t.name!r} lies outside the file")
            names = archs.hf_names_for(spec, t.name, blocks, experts if "_exps." in t.name else 0)
            if not names:
                skipped.append(t.name)
                continue
            if t.tensor_type not in LOADED_CODES and not can_dequantize(t.tensor_type):
                raise ModelError(
                    f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which the installed gguf package "
                    "cannot dequantize (upgrade it: pip install -U gguf)"
                )
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            parts = archs.gguf_tensors(spec, names[0], blocks)
            if len(parts) > 1:  # one block of a Hugging Face tensor's rows (GraniteMoE's gate, then up)
                part = next((p for p in parts if p.name == t.name), None)
                if part is None:
                    skipped.append(t.name)
                else:
                    split.setdefault(names[0], {})[part.part] = (t, shape, part)
                continue
            # experts stacked here, one Hugging Face tensor each; a stacked Hugging Face tensor is read whole
            stacked = len(names) > 1 or ("_exps." in t.name and ".experts." in names[0])
            if stacked and (len(shape) != 3 or shape[0] != len(names)):
                raise ModelError(f"{path}: tensor {t.name!r} of shape {list(shape)} does not hold {len(names)} experts")
            for e, name in enumerate(names):
                where = archs.gguf_tensor(spec, name, blocks)
                if where is None or where.name != t.name:  # the name map does not come back: not ours to guess
                    skipped.append(t.name)
                    continue
                one = shape[1:] if stacked else shape
                hf_shape = one[::-1] if spec.transposed and name.endswith(spec.transposed) else one
                infos[name] = TensorInfo(name, hf_shape, LOADED_CODES.get(t.tensor_type, "F32"), path)
                self._tensors[name] = (t, e if stacked else None, where)
        for name, got in split.items():
            n = next(iter(got.values()))[2].parts
            shapes = {shape for _, shape, _ in got.values()}
            if sorted(got) != list(range(n)) or len(shapes) != 1 or len(next(iter(shapes))) < 2:
                raise ModelError(
                    f"{path}: {name!r} is held as {n} GGUF tensors of one shape; the file has "
                    f"{sorted(t.name for t, _, _ in got.values())} of shapes {sorted(map(list, shapes))}"
                )
            (one,) = shapes
            first, _, where = got[0]
            infos[name] = TensorInfo(name, (*one[:-2], n * one[-2], one[-1]), LOADED_CODES.get(first.tensor_type, "F32"), path)
            self._tensors[name] = (first, None, where)
            self._row_blocks[name] = [got[i][0] for i in range(n)]
        if skipped:
            log.info("%s: tensors with no Hugging Face name are not read: %s", path, ", ".join(skipped[:8]))
        try:
            config = config_from_metadata(reader, spec, infos, path)
        except (TypeError, ValueError, IndexError, KeyError) as e:  # metadata of the wrong type or shape
            raise ModelError(f"{path}: GGUF metadata is malformed ({e})") from None
        self.spec = spec
        self._layouts = _layouts(path, spec, config, infos, self._tensors)
        super().__init__(path, config, infos)
        self._tokenizer_dir: Path | None = None
        self._tokenizer_built = False

    def load(self, name: str) -> mx.array:
        info = self.info(name)
        if name in self._row_blocks:  # no layout change: llama.cpp keeps the blocks as they were
            blocks = self._row_blocks[name]
            shape = (*info.shape[:-2], info.shape[-2] // len(blocks), info.shape[-1])
            return mx.concatenate([self._decode(t, t.data).reshape(shape) for t in blocks], axis=-2)
        t, expert, _ = self._tensors[name]
        arr = self._decode(t, t.data if expert is None else t.data[expert])
        lay = self._layouts.get(name)
        if lay is None:
            return arr.reshape(info.shape)
        if lay.transpose:
            arr = arr.reshape(info.shape[::-1]).T
        arr = arr.reshape(info.shape)
        if lay.rows is not None:
            arr = arr[mx.array(np.argsort(lay.rows))]
        if lay.add:
            arr = (arr.astype(mx.float32) - lay.add).astype(arr.dtype)
        return arr

    def _decode(self, t: Any, data: np.ndarray) -> mx.array:
        try:
            if t.tensor_type == Q.BF16:
                # numpy has no bfloat16: move the raw 16-bit words and reinterpret them in MLX
                arr = mx.array(np.ascontiguousarray(data).view(np.uint16)).view(mx.bfloat16)
            elif t.tensor_type in (Q.F32, Q.F16):
                arr = mx.array(np.ascontiguousarray(data))
            else:
                arr = mx.array(gguf.quants.dequantize(np.ascontiguousarray(data), t.tensor_type))
        except (ValueError, NotImplementedError) as e:
            raise ModelError(f"{self.path}: cannot decode tensor {t.name!r} ({t.tensor_type.name}): {e}") from None
        return arr

    @property
    def tokenizer_dir(self) -> Path | None:
        """A directory with tokenizer.json and tokenizer_config.json rebuilt from the GGUF metadata."""
        if not self._tokenizer_built:
            self._tokenizer_built = True
            stat = self.path.stat()
            key = (str(self.path.resolve()), stat.st_size, stat.st_mtime_ns)
            if key not in _TOKENIZER_DIRS:
                tmp = Path(tempfile.mkdtemp(prefix="mergekit-mlx-gguf-tokenizer-"))
                atexit.register(shutil.rmtree, tmp, True)  # lives as long as the process, not the reader
                _TOKENIZER_DIRS[key] = tmp if write_tokenizer(self.reader, tmp, self.path) else None
            self._tokenizer_dir = _TOKENIZER_DIRS[key]
        return self._tokenizer_dir


def _layouts(path: Path, spec: archs.Architecture, config: dict, infos: dict[str, TensorInfo], tensors) -> dict[str, Layout]:
    """The layout change to undo for each tensor; Q/K rows must split into the metadata's heads."""
    out = {}
    for name, info in infos.items():
        where = tensors[name][2]
        try:
            lay = archs.layout(spec, name, where.kind, info.shape, config)
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise ModelError(f"{path}: tensor {name!r} {str(e).replace('the config', 'the metadata')}") from None
        if not lay.identity:
            out[name] = lay
    return out


def config_from_metadata(reader: gguf.GGUFReader, spec: archs.Architecture, infos: dict[str, TensorInfo], path: Path) -> dict:
    """A Hugging Face config.json for the model, from the `{arch}.*` metadata keys."""
    arch = spec.name

    def key(k: str, default: Any = None) -> Any:
        return read_field(reader, k.format(arch=arch) if "{arch}" in k else f"{arch}.{k}", default)

    hidden, layers, heads = key("embedding_length"), key("block_count"), key("attention.head_count")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, heads)):
        raise ModelError(f"{path}: metadata lacks {arch}.embedding_length, {arch}.block_count or {arch}.attention.head_count")
    names = spec.config_names
    config: dict[str, Any] = {"architectures": [spec.hf_class], "model_type": spec.model_type}
    config[names.get("num_hidden_layers", "num_hidden_layers")] = layers
    for f in (*COMMON_FIELDS, *spec.fields):
        value = key(f.key) if f.config else None  # no config key: a value this architecture never writes
        if value is not None:
            config[names.get(f.config[0], f.config[0])] = _short(value) if f.kind is float else f.kind(value)
    config.setdefault(names.get("num_key_value_heads", "num_key_value_heads"), heads)
    embed = next((i for n, i in infos.items() if archs.gguf_tensor(spec, n, layers).kind == T.TOKEN_EMBD), None)
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab = key("vocab_size") or (len(tokens.data) if tokens is not None else None) or (embed.shape[0] if embed else None)
    config["vocab_size"] = vocab
    config["max_position_embeddings" if "n_positions" not in names.values() else "n_positions"] = key("context_length", 2048)
    head_dim = key("attention.key_length") or hidden // heads
    if key("attention.key_length"):
        config["head_dim"] = head_dim
    rope_dims = key("rope.dimension_count")
    if spec.rope_from_partial and isinstance(rope_dims, int) and rope_dims != head_dim:
        config["partial_rotary_factor"] = rope_dims / head_dim
    config["rope_theta"] = _short(key("rope.freq_base", 10000.0))
    config["tie_word_embeddings"] = not any(archs.gguf_tensor(spec, n, layers).kind == T.OUTPUT for n in infos)
    config["torch_dtype"] = _torch_dtype(reader)
    # the biases the tensors have (config keys of the llama-style architectures)
    config[spec.attention_bias_key] = any(n.endswith(("_proj.bias", "qkv_proj.bias")) and ".self_attn." in n for n in infos)
    config["mlp_bias"] = any(n.endswith("_proj.bias") and ".mlp." in n for n in infos)
    config.update(spec.hf_config)
    config.update(archs.layer_types_of(key("attention.sliding_window_pattern"), layers))
    if spec.from_gguf:
        config.update(spec.from_gguf(config))
    scaling = key("rope.scaling.type")
    factor = key("rope.scaling.factor")
    if scaling == "linear" and factor:
        config["rope_scaling"] = {"type": "linear", "factor": factor}
    elif scaling == "yarn" and factor:
        config["rope_scaling"] = {
            "type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": key("rope.scaling.original_context_length", key("context_length", 2048)),
        }
    freqs = next((t for t in reader.tensors if t.name == gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight"), None)
    if freqs is not None:
        written = read_field(reader, LLAMA3_KEY)
        rope = llama3_rope_scaling(np.asarray(freqs.data, np.float32), head_dim, config["rope_theta"], written)
        if rope is None:
            log.warning("%s: rope_freqs does not match Llama 3 RoPE scaling; it is ignored", path)
        else:
            config["rope_scaling"] = rope
    for name in ("bos", "eos", "padding"):
        tid = read_field(reader, f"tokenizer.ggml.{name}_token_id")
        if tid is not None:
            config["pad_token_id" if name == "padding" else f"{name}_token_id"] = tid
    return config


def _short(x: float) -> float:
    """A float32 metadata value as the shortest decimal that reads back to it (1e-05, not 9.99e-06)."""
    return float(str(np.float32(x)))


def _torch_dtype(reader: gguf.GGUFReader) -> str:
    types = {t.tensor_type for t in reader.tensors if len(t.shape) > 1}
    if Q.BF16 in types:
        return "bfloat16"
    if types and types <= {Q.F32}:
        return "float32"
    return "float16"
