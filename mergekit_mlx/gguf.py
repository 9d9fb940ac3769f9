"""GGUF files: read a llama-family GGUF as the Hugging Face model it encodes; write merges as GGUF.

Reading goes through the `gguf` package's reader (a memory map; one tensor dequantized per `load`),
never `mx.load`, which drops TQ1_0/TQ2_0 tensors and decodes some K-quants wrongly. llama.cpp
stores llama's Q and K projections with their rows permuted for its RoPE layout; the reader undoes
that and the writer applies it, as llama.cpp's convert_hf_to_gguf.py does.

Writing is incremental: the header, metadata and every tensor's info (name, shape, type, offset)
are written first, from the shapes the plan knows, then each tensor's data lands at its offset as
it arrives, converted in row chunks, so memory holds one tensor and one chunk, never the model.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import mmap
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import gguf
import mlx.core as mx
import numpy as np

from .errors import ModelError, RecipeError
from .models import TOKENIZER_FILES, ModelSource, TensorInfo, copy_side_files
from .writer import OutputTensor

log = logging.getLogger(__name__)

T = gguf.MODEL_TENSOR
Q = gguf.GGMLQuantizationType

# Hugging Face name (without .weight/.bias) <-> GGUF tensor, for the llama-family layouts
HF_TO_GGUF_GLOBAL = {"model.embed_tokens": T.TOKEN_EMBD, "model.norm": T.OUTPUT_NORM, "lm_head": T.OUTPUT}
HF_TO_GGUF_LAYER = {
    "input_layernorm": T.ATTN_NORM,
    "self_attn.q_proj": T.ATTN_Q,
    "self_attn.k_proj": T.ATTN_K,
    "self_attn.v_proj": T.ATTN_V,
    "self_attn.o_proj": T.ATTN_OUT,
    "self_attn.q_norm": T.ATTN_Q_NORM,
    "self_attn.k_norm": T.ATTN_K_NORM,
    "post_attention_layernorm": T.FFN_NORM,
    "mlp.gate_proj": T.FFN_GATE,
    "mlp.up_proj": T.FFN_UP,
    "mlp.down_proj": T.FFN_DOWN,
}
GGUF_TO_HF_GLOBAL = {gguf.TENSOR_NAMES[t]: hf for hf, t in HF_TO_GGUF_GLOBAL.items()}
GGUF_TO_HF_LAYER = {gguf.TENSOR_NAMES[t].split(".", 2)[2]: hf for hf, t in HF_TO_GGUF_LAYER.items()}
HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")
SKIPPED_HF_TENSORS = (".rotary_emb.inv_freq",)  # recomputed by every runtime; llama.cpp drops it too

# Hugging Face model_type -> (GGUF architecture, Q/K rows permuted for llama.cpp's RoPE)
HF_ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}
# GGUF architecture -> (model_type, architectures entry, Q/K rows permuted)
GGUF_ARCHS = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", False),
}

# --out-format -> (tensor type of the large matrices, general.file_type)
OUT_TYPES = {
    "gguf-f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "gguf-bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "gguf-q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "gguf-q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "gguf-tq1_0": (Q.TQ1_0, gguf.LlamaFileType.MOSTLY_TQ1_0),
    "gguf-tq2_0": (Q.TQ2_0, gguf.LlamaFileType.MOSTLY_TQ2_0),
}
TERNARY_TYPES = (Q.TQ1_0, Q.TQ2_0)
CHUNK_ELEMENTS = 1 << 22  # rows are converted and written in chunks of about this many values

# tokenizer.ggml.pre -> the pre-tokenizer split regex of the Hugging Face tokenizer it stands for
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_SPLITS = {"llama-bpe": LLAMA3_SPLIT, "smaug-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}


# ---------------------------------------------------------------------------------------------
# names and the RoPE permutation


def gguf_name(hf_name: str) -> Optional[str]:
    """The GGUF tensor name of a Hugging Face llama-family tensor, or None if it has none."""
    stem, _, suffix = hf_name.rpartition(".")
    if stem in HF_TO_GGUF_GLOBAL and suffix in ("weight", "bias"):
        return f"{gguf.TENSOR_NAMES[HF_TO_GGUF_GLOBAL[stem]]}.{suffix}"
    m = HF_LAYER.match(hf_name)
    if m and m.group(2) in HF_TO_GGUF_LAYER:
        return f"{gguf.TENSOR_NAMES[HF_TO_GGUF_LAYER[m.group(2)]].format(bid=m.group(1))}.{m.group(3)}"
    return None


def hf_name(gguf_tensor: str) -> Optional[str]:
    """The Hugging Face name of a GGUF llama-family tensor, or None if it has none."""
    stem, _, suffix = gguf_tensor.rpartition(".")
    if stem in GGUF_TO_HF_GLOBAL and suffix in ("weight", "bias"):
        return f"{GGUF_TO_HF_GLOBAL[stem]}.{suffix}"
    m = GGUF_LAYER.match(gguf_tensor)
    if m and m.group(2) in GGUF_TO_HF_LAYER:
        return f"model.layers.{m.group(1)}.{GGUF_TO_HF_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def rope_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp stores Q/K in: GGUF row i is Hugging Face row perm[i].

    Within each head, HF keeps the two rotary halves apart (first half, second half); llama.cpp
    interleaves them (pairs of adjacent rows), the layout of the original Meta checkpoints.
    """
    head = rows // n_head
    return np.arange(rows).reshape(n_head, 2, head // 2).swapaxes(1, 2).reshape(rows)


def permuted_heads(hf: str, config: dict) -> Optional[int]:
    """Heads to permute by for llama's q/k projections (weights and biases), else None."""
    if hf.endswith((".self_attn.q_proj.weight", ".self_attn.q_proj.bias")):
        return int(config["num_attention_heads"])
    if hf.endswith((".self_attn.k_proj.weight", ".self_attn.k_proj.bias")):
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


# ---------------------------------------------------------------------------------------------
# reading


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    if f is None or not f.types:
        return default
    try:
        return f.contents()
    except (ValueError, IndexError, TypeError) as e:  # e.g. a string that is not UTF-8
        raise ModelError(f"{reader.data.filename}: GGUF metadata {key!r} cannot be read ({e})") from None


_DEQUANTIZABLE: dict[Q, bool] = {}


def can_dequantize(qtype: Q) -> bool:
    """Whether the installed `gguf` package can dequantize this tensor type (tried on one block)."""
    if qtype not in _DEQUANTIZABLE:
        size = gguf.GGML_QUANT_SIZES[qtype][1]
        try:
            gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
            _DEQUANTIZABLE[qtype] = True
        except (NotImplementedError, ValueError, TypeError):
            _DEQUANTIZABLE[qtype] = False
    return _DEQUANTIZABLE[qtype]


LOADED_CODES = {Q.F32: "F32", Q.F16: "F16", Q.BF16: "BF16"}  # other types load as F32
_TOKENIZER_DIRS: dict[tuple, Optional[Path]] = {}  # GGUF file identity -> its rebuilt tokenizer directory


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
                raise ModelError(f"{path}: GGUF header: {what} claims an array of {count} items (at most {MAX_GGUF_ARRAY} are read)")
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
            raise ModelError(f"{path}: GGUF tensor {name!r} of type {qtype.name} has a row of {dims[0]}, not a multiple of {block}")
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
        arch = _field(reader, "general.architecture")
        if not isinstance(arch, str) or arch not in GGUF_ARCHS:
            raise ModelError(
                f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHS)}"
            )
        self.arch = arch
        size = path.stat().st_size
        infos: dict[str, TensorInfo] = {}
        self._tensors: dict[str, Any] = {}
        skipped = []
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is None:
                skipped.append(t.name)
                continue
            if not 0 <= t.data_offset <= t.data_offset + t.n_bytes <= size:
                raise ModelError(f"{path}: tensor {t.name!r} lies outside the file")
            if t.tensor_type not in LOADED_CODES and not can_dequantize(t.tensor_type):
                raise ModelError(
                    f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which the installed gguf package "
                    "cannot dequantize (upgrade it: pip install -U gguf)"
                )
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            infos[name] = TensorInfo(name, shape, LOADED_CODES.get(t.tensor_type, "F32"), path)
            self._tensors[name] = t
        if skipped:
            log.info("%s: tensors with no Hugging Face name are not read: %s", path, ", ".join(skipped[:8]))
        try:
            config = config_from_metadata(reader, arch, infos, path)
        except (TypeError, ValueError, IndexError, KeyError) as e:  # metadata of the wrong type or shape
            raise ModelError(f"{path}: GGUF metadata is malformed ({e})") from None
        self.permute = GGUF_ARCHS[arch][2]
        if self.permute:
            _check_rope_heads(path, config, infos)
        super().__init__(path, config, infos)
        self._tokenizer_dir: Optional[Path] = None
        self._tokenizer_built = False

    def load(self, name: str) -> mx.array:
        info = self.info(name)
        t = self._tensors[name]
        try:
            if t.tensor_type == Q.BF16:
                # numpy has no bfloat16: move the raw 16-bit words and reinterpret them in MLX
                arr = mx.array(np.ascontiguousarray(t.data).view(np.uint16)).view(mx.bfloat16)
            elif t.tensor_type in (Q.F32, Q.F16):
                arr = mx.array(np.ascontiguousarray(t.data))
            else:
                arr = mx.array(gguf.quants.dequantize(t.data, t.tensor_type))
        except (ValueError, NotImplementedError) as e:
            raise ModelError(f"{self.path}: cannot decode tensor {t.name!r} ({t.tensor_type.name}): {e}") from None
        arr = arr.reshape(info.shape)
        heads = permuted_heads(name, self.config) if self.permute else None
        if heads is not None:
            arr = arr[mx.array(np.argsort(rope_permutation(info.shape[0], heads)))]
        return arr

    @property
    def tokenizer_dir(self) -> Optional[Path]:
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


def _check_rope_heads(path: Path, config: dict, infos: dict[str, TensorInfo]) -> None:
    """Q/K rows must split into the metadata's heads and rotary halves, or `load` could not undo the permutation."""
    for name, info in infos.items():
        try:
            heads = permuted_heads(name, config)
        except (TypeError, ValueError):
            raise ModelError(f"{path}: GGUF head counts in the metadata are not integers") from None
        if heads is not None and (heads <= 0 or info.shape[0] % (2 * heads)):
            raise ModelError(
                f"{path}: tensor {name!r} has {info.shape[0]} rows, which {heads} heads (from the metadata) "
                "cannot split into rotary halves"
            )


def config_from_metadata(reader: gguf.GGUFReader, arch: str, infos: dict[str, TensorInfo], path: Path) -> dict:
    """A Hugging Face config.json for the model, from the `{arch}.*` metadata keys."""

    def key(k: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{k}", default)

    model_type, architecture, _ = GGUF_ARCHS[arch]
    hidden, layers, heads = key("embedding_length"), key("block_count"), key("attention.head_count")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, heads)):
        raise ModelError(f"{path}: metadata lacks {arch}.embedding_length, {arch}.block_count or {arch}.attention.head_count")
    embed = infos.get("model.embed_tokens.weight")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab = key("vocab_size") or (len(tokens.data) if tokens is not None else None) or (embed.shape[0] if embed else None)
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden // heads
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "intermediate_size": key("feed_forward_length"),
        "max_position_embeddings": key("context_length", 2048),
        "rms_norm_eps": _short(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _short(key("rope.freq_base", 10000.0)),
        "vocab_size": vocab,
        "hidden_act": "silu",
        "tie_word_embeddings": "lm_head.weight" not in infos,
        "torch_dtype": _torch_dtype(reader),
    }
    if arch == "qwen2":
        config["attention_bias"] = True
    scaling = key("rope.scaling.type")
    factor = key("rope.scaling.factor")
    if scaling == "linear" and factor:
        config["rope_scaling"] = {"type": "linear", "factor": factor}
    elif scaling == "yarn" and factor:
        config["rope_scaling"] = {
            "type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": key("rope.scaling.original_context_length", config["max_position_embeddings"]),
        }
    freqs = next((t for t in reader.tensors if t.name == gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight"), None)
    if freqs is not None:
        rope = llama3_rope_scaling(np.asarray(freqs.data, np.float32), head_dim, config["rope_theta"])
        if rope is None:
            log.warning("%s: rope_freqs does not match Llama 3 RoPE scaling; it is ignored", path)
        else:
            config["rope_scaling"] = rope
    for name in ("bos", "eos", "padding"):
        tid = _field(reader, f"tokenizer.ggml.{name}_token_id")
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


LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float, old_ctx: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3 RoPE scaling (what llama.cpp stores as rope_freqs)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))


def llama3_rope_scaling(stored: np.ndarray, head_dim: int, theta: float) -> Optional[dict]:
    """Llama 3 rope_scaling parameters that reproduce a stored rope_freqs tensor, if the usual ones do."""
    factor = float(stored.max())
    d = LLAMA3_DEFAULTS
    expected = llama3_rope_factors(head_dim, theta, factor, d["low_freq_factor"], d["high_freq_factor"], d["original_max_position_embeddings"])
    if expected.shape != stored.shape or not np.allclose(expected, stored, rtol=1e-4):
        return None
    return {"rope_type": "llama3", "factor": factor, **d}


# ---------------------------------------------------------------------------------------------
# tokenizer: GGUF metadata -> tokenizer.json


def write_tokenizer(reader: gguf.GGUFReader, out: Path, where: Path) -> bool:
    """Write tokenizer.json and tokenizer_config.json for the tokenizer the metadata describes.

    A tokenizer.json kept under tokenizer.huggingface.json is written back as it was. Otherwise the
    tokenizer is rebuilt from llama.cpp's vocabulary keys ("gpt2" byte-level BPE with merges, or
    "llama" SentencePiece BPE with scores). Returns False, with a warning, when neither is there.
    """
    from tokenizers import Tokenizer

    hf_json = _field(reader, gguf.Keys.Tokenizer.HF_JSON)
    if hf_json is not None:
        tok = Tokenizer.from_str(hf_json)
        (out / "tokenizer.json").write_text(hf_json, encoding="utf-8")
    else:
        tok = rebuild_tokenizer(reader, where)
        if tok is None:
            return False
        tok.save(str(out / "tokenizer.json"))

    def special(name: str) -> Optional[str]:
        tid = _field(reader, f"tokenizer.ggml.{name}_token_id")
        return tok.id_to_token(tid) if isinstance(tid, int) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special("bos"),
        "eos_token": special("eos"),
        "unk_token": special("unknown"),
        "pad_token": special("padding"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": _field(reader, f"{_field(reader, 'general.architecture')}.context_length", 2048),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}, indent=2) + "\n")
    return True


def rebuild_tokenizer(reader: gguf.GGUFReader, where: Path):
    """A `tokenizers.Tokenizer` from llama.cpp's vocabulary keys, or None for other vocabularies."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    if kind not in ("gpt2", "llama") or not tokens:
        log.warning("%s: tokenizer %r is not rebuilt (supported: gpt2, llama); take it from another model", where, kind)
        return None
    types = _field(reader, "tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in (_field(reader, "tokenizer.ggml.merges") or [])]
        pre = _field(reader, "tokenizer.ggml.pre", "default")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre == "llama-bpe"))
        split = PRE_SPLITS.get(pre)
        tok.pre_tokenizer = (
            pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(split), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )
            if split
            else pre_tokenizers.ByteLevel(add_prefix_space=False)
        )
        tok.decoder = decoders.ByteLevel()
    else:
        scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = _field(reader, "tokenizer.ggml.unknown_token_id")
        add_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
        tok = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=sentencepiece_merges(tokens, scores, types),
                unk_token=tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None,
                fuse_unk=True,
                byte_fallback=True,
            )
        )
        space = [normalizers.Replace(" ", "\u2581")]
        tok.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if add_prefix else []) + space)
        tail = [decoders.Strip(" ", 1, 0)] if add_prefix else []
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()] + tail)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == gguf.TokenType.USER_DEFINED])

    def special(name: str) -> Optional[str]:
        tid = _field(reader, f"tokenizer.ggml.{name}_token_id")
        return tokens[tid] if isinstance(tid, int) and 0 <= tid < len(tokens) else None

    bos, eos = special("bos"), special("eos")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
        specials = sorted({(t, vocab[t]) for t in ((bos,) if add_bos else ()) + ((eos,) if add_eos else ())})
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return tok


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: a token with a higher score merges first.

    Every way to split a normal token into two vocabulary pieces is a merge, ranked by the
    token's score (SentencePiece BPE applies the best-scoring merge first).
    """
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (gguf.TokenType.NORMAL, gguf.TokenType.USER_DEFINED)}
    found = []
    for tok, i in vocab.items():
        for k in range(1, len(tok)):
            a, b = tok[:k], tok[k:]
            if a in vocab and b in vocab:
                found.append((-scores[i], i, vocab[a], vocab[b], a, b))
    found.sort()
    return [(a, b) for *_, a, b in found]


# ---------------------------------------------------------------------------------------------
# tokenizer: Hugging Face directory -> GGUF metadata


def add_tokenizer(w: gguf.GGUFWriter, tok_dir: Path, vocab_size: int) -> None:
    """Embed the tokenizer of an input model directory (see `_add_tokenizer`).

    The gguf package opens whatever names it looks for, following symlinks: it is given a private
    copy of the directory's checked tokenizer files (`models.copy_side_files`) instead.
    """
    with tempfile.TemporaryDirectory(prefix="mergekit-mlx-gguf-tokenizer-") as tmp:
        copy_side_files(tok_dir, Path(tmp), TOKENIZER_FILES + ("config.json",))
        _add_tokenizer(w, Path(tmp), vocab_size, tok_dir)


def _add_tokenizer(w: gguf.GGUFWriter, tok_dir: Path, vocab_size: int, shown: Path) -> None:
    """Embed the tokenizer of a Hugging Face directory the way llama.cpp's converter does for llama.

    The vocabulary goes in as llama.cpp reads it: "llama" (SentencePiece-style, with scores) for
    BPE with byte fallback or without merges (Llama 2, tokenizer.model files, character vocabularies),
    "gpt2" (byte-level, with merges) for the rest of BPE; merges over plain characters are respelled
    in the byte-level alphabet, which is the same tokenizer for ASCII text. The tokenizer.json itself is also kept, under the GGUF key
    tokenizer.huggingface.json, so readers rebuild it exactly.
    """
    tj_path = tok_dir / "tokenizer.json"
    tj = None
    if tj_path.is_file():
        try:
            text = tj_path.read_text(encoding="utf-8")
            tj = json.loads(text)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ModelError(f"{shown / tj_path.name}: not UTF-8 JSON ({e})") from None
        w.add_string(gguf.Keys.Tokenizer.HF_JSON, text)
    scores: Optional[list[float]] = None
    merges = False
    if (tok_dir / "tokenizer.model").is_file() and _has_sentencepiece():
        vocab = gguf.vocab.SentencePieceVocab(tok_dir)
        tokens, all_scores, all_types = zip(*vocab.all_tokens())
        tokens, scores, types = [t.decode("utf-8") for t in tokens], list(all_scores), [int(t) for t in all_types]
        model, pre = "llama", "default"
    elif tj is not None and tj.get("model", {}).get("type") == "BPE":
        if tj["model"].get("byte_fallback") or not tj["model"].get("merges"):
            # llama.cpp's "gpt2" vocabulary must carry merges; a merge-less BPE is one token per piece
            tokens, scores, types, prefix = _sentencepiece_style_vocab(tj)
            model, pre = "llama", "default"
            w.add_add_space_prefix(prefix)
        elif (tj.get("decoder") or {}).get("type") == "ByteLevel":
            tokens, types = _byte_level_vocab(tj)
            model, pre, merges = "gpt2", _pre_tokenizer_name(tj), True
        else:
            tokens, types = _byte_level_vocab(tj, respell=True)
            model, pre = "gpt2", "default"
            w.add_token_merges([" ".join(_respell(p) for p in (m.split(" ", 1) if isinstance(m, str) else m)) for m in tj["model"]["merges"]])
    elif tj is not None:
        log.warning(
            "%s: a %s tokenizer has no llama.cpp vocabulary type; the GGUF keeps its tokenizer.json only",
            shown / tj_path.name, tj.get("model", {}).get("type"),
        )
        w.add_tokenizer_model("none")
        gguf.SpecialVocab(tok_dir, n_vocab=vocab_size or None).add_to_gguf(w, quiet=True)
        return
    else:
        raise RecipeError(f"{shown}: no tokenizer.json (or tokenizer.model) to embed in the GGUF output")
    if vocab_size > len(tokens):  # the embedding has rows no token names: llama.cpp pads the same way
        pad = range(len(tokens), vocab_size)
        tokens += [f"[PAD{i}]" for i in pad]
        types += [gguf.TokenType.UNUSED] * len(pad)
        if scores is not None:
            scores += [-1000.0] * len(pad)
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if scores is not None:
        w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(tok_dir, load_merges=merges, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def _has_sentencepiece() -> bool:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True


def _added(tj: dict) -> dict[int, dict]:
    return {a["id"]: a for a in tj.get("added_tokens", []) if isinstance(a, dict) and "id" in a}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest for code points from 256."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_ALPHABET = _bytes_to_unicode()


def _respell(text: str) -> str:
    """A string in the byte-level alphabet: each UTF-8 byte as its stand-in character."""
    return "".join(BYTE_ALPHABET[b] for b in text.encode("utf-8"))


def _byte_level_vocab(tj: dict, respell: bool = False) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types; with respell, model tokens move to the byte-level alphabet."""
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = _added(tj)
    for i, a in added.items():
        vocab.setdefault(a["content"], i)
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(max(by_id) + 1):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(_respell(by_id[i]) if respell and i not in added else by_id[i])
        if i in added:
            special = added[i].get("special") or (by_id[i].startswith("<|") and by_id[i].endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _sentencepiece_style_vocab(tj: dict) -> tuple[list[str], list[float], list[int], bool]:
    """A non-byte-level BPE tokenizer.json as a llama.cpp "llama" vocabulary.

    Spaces are spelled "\u2581" as SentencePiece does; a token's score ranks the merge that makes it
    (earlier merge, higher score), which is the order llama.cpp's tokenizer applies them in.
    Returns tokens, scores, types and whether a space is prepended to the text.
    """
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = _added(tj)
    for i, a in added.items():
        vocab.setdefault(a["content"], i)
    rank = {}
    for r, m in enumerate(tj["model"].get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    by_id = {i: t for t, i in vocab.items()}
    unk = tj["model"].get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(max(by_id) + 1):
        t = by_id.get(i, f"[PAD{i}]")
        scores.append(-float(rank[t]) if t in rank else 0.0)
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            types.append(gguf.TokenType.BYTE)
        elif t == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            t = t.replace(" ", "\u2581")
            types.append(gguf.TokenType.NORMAL)
        tokens.append(t)
    return tokens, scores, types, _prepends_space([tj.get("normalizer"), tj.get("pre_tokenizer")])


def _prepends_space(node: Any) -> bool:
    """Whether a normalizer/pre-tokenizer tree puts "\u2581" before the text (Prepend or Metaspace)."""
    if isinstance(node, list):
        return any(_prepends_space(n) for n in node)
    if not isinstance(node, dict):
        return False
    if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
        return True
    if node.get("type") == "Metaspace":
        return node.get("prepend_scheme", "always") != "never" and node.get("add_prefix_space", True)
    return any(_prepends_space(v) for v in node.values() if isinstance(v, (list, dict)))


def _pre_tokenizer_name(tj: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (its split regex), or "default"."""
    text = json.dumps(tj.get("pre_tokenizer"))
    for name, regex in (("llama-bpe", LLAMA3_SPLIT), ("qwen2", QWEN2_SPLIT)):
        if json.dumps(regex)[1:-1] in text:
            return name
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return "default"


# ---------------------------------------------------------------------------------------------
# writing


@dataclass
class _Planned:
    hf: str
    gguf: str
    qtype: Q
    shape: tuple[int, ...]
    nbytes: int
    offset: int
    heads: Optional[int]  # permute rows by this many heads (llama q/k), else None


def tensor_type(gguf_tensor: str, shape: tuple[int, ...], target: Q) -> Q:
    """The type a tensor is stored in, by llama.cpp's converter rules."""
    if len(shape) <= 1 or gguf_tensor.endswith("_norm.weight") or not gguf_tensor.endswith(".weight"):
        return Q.F32  # llama.cpp computes norms and biases in F32
    is_io = gguf_tensor in ("token_embd.weight", "output.weight")
    if target in TERNARY_TYPES and is_io:
        return Q.F16  # embeddings and head stay full precision in ternary models
    if target == Q.Q4_0 and gguf_tensor == "output.weight":
        return Q.Q8_0  # the head is the most sensitive matrix; llama.cpp keeps it above 4 bits
    block = gguf.GGML_QUANT_SIZES[target][0]
    if shape[-1] % block:
        return Q.F16  # rows that do not split into whole blocks
    return target


def tensor_nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


class GGUFWriter:
    """`gguf-*` output: one GGUF file, laid out up front, tensor data written as it arrives."""

    def __init__(
        self,
        out_dir: Path,
        tensors: list[OutputTensor],
        config: dict,
        out_format: str,
        tokenizer_dir: Optional[Path] = None,
        file_name: str = "model.gguf",
    ):
        if out_format not in OUT_TYPES:
            raise RecipeError(f"--out-format {out_format!r} is not a GGUF format; valid: {', '.join(OUT_TYPES)}")
        model_type = config.get("model_type")
        if model_type not in HF_ARCHS:
            raise RecipeError(
                f"--out-format {out_format}: GGUF output supports model_type {', '.join(HF_ARCHS)}; this model is {model_type!r}"
            )
        arch, permute = HF_ARCHS[model_type]
        target, file_type = OUT_TYPES[out_format]
        self.path = Path(out_dir) / file_name
        self.config = config
        self.target = target
        w = gguf.GGUFWriter(path=None, arch=arch)
        self.alignment = w.data_alignment
        _add_metadata(w, config, arch, file_type, self.path)
        extra = _extra_tensors(config)
        if tokenizer_dir is not None:
            add_tokenizer(w, Path(tokenizer_dir), int(config.get("vocab_size") or 0))
        else:
            log.warning("GGUF output has no tokenizer source; llama.cpp needs one to run the model")
        self.plan: dict[str, _Planned] = {}
        offset = 0
        for t in tensors:
            if t.name.endswith(SKIPPED_HF_TENSORS):
                continue
            name = gguf_name(t.name)
            if name is None:
                raise RecipeError(f"--out-format {out_format}: tensor {t.name!r} has no llama.cpp ({arch}) name; GGUF cannot hold it")
            qtype = tensor_type(name, t.shape, target)
            nbytes = tensor_nbytes(t.shape, qtype)
            heads = permuted_heads(t.name, config) if permute else None
            self.plan[t.name] = _Planned(t.name, name, qtype, tuple(t.shape), nbytes, offset, heads)
            offset += w.ggml_pad(nbytes, self.alignment)
        for name, arr in extra.items():
            self.plan[name] = _Planned(name, name, Q.F32, arr.shape, arr.nbytes, offset, None)
            offset += w.ggml_pad(arr.nbytes, self.alignment)
        self.total = offset
        for p in self.plan.values():
            # an F32 dtype with raw_dtype keeps the shape as the logical (element) shape
            w.add_tensor_info(p.gguf, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
        w.write_header_to_file(path=self.path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        self.file = w.fout[0]
        self.data_start = w.ggml_pad(self.file.tell(), self.alignment)
        self.pending = {t.name for t in tensors if t.name in self.plan}
        self.written: list[str] = []
        for name, arr in extra.items():
            self._put(self.plan[name], [arr.tobytes()])

    def wants(self, name: str) -> bool:
        return name in self.pending

    def add(self, name: str, array: mx.array) -> None:
        p = self.plan.get(name)
        if p is None:
            return  # a tensor GGUF does not keep (rotary inv_freq)
        if tuple(array.shape) != p.shape:
            raise ValueError(f"{name}: planned shape {list(p.shape)}, got {list(array.shape)}")
        self._put(p, self._chunks(p, array))
        self.pending.discard(name)

    def _chunks(self, p: _Planned, array: mx.array):
        """The tensor's bytes in row chunks: permuted, ternarised or quantized as planned."""
        cols = p.shape[-1] if len(p.shape) > 1 else 1  # 1-D tensors (biases) permute element-wise
        rows = array.reshape(-1, cols)
        n = rows.shape[0]
        step = max(1, CHUNK_ELEMENTS // cols)
        order = rope_permutation(n, p.heads) if p.heads else None
        inverse = None
        if p.qtype in TERNARY_TYPES:
            from .kernels.bitlinear import quantize_absmean

            inverse = quantize_absmean(array)[1]  # 1 / mean|w|, for the whole tensor
        for r0 in range(0, n, step):
            part = rows[mx.array(order[r0 : r0 + step])] if order is not None else rows[r0 : r0 + step]
            if inverse is not None:
                # absmean ternary values; TQ blocks then store them exactly (up to the f16 scale)
                part = mx.clip(mx.round(part.astype(mx.float32) * inverse), -1, 1) / inverse
            if p.qtype == Q.F32:
                yield np.array(part.astype(mx.float32)).tobytes()
            elif p.qtype == Q.F16:
                yield np.array(part.astype(mx.float16)).tobytes()
            elif p.qtype == Q.BF16:
                yield np.array(part.astype(mx.bfloat16).view(mx.uint16)).tobytes()
            else:
                yield gguf.quants.quantize(np.array(part.astype(mx.float32)), p.qtype).tobytes()

    def _put(self, p: _Planned, chunks) -> None:
        self.file.seek(self.data_start + p.offset)
        size = 0
        for b in chunks:
            self.file.write(b)
            size += len(b)
        if size != p.nbytes:
            raise RuntimeError(f"{p.hf}: wrote {size} bytes for a {p.qtype.name} tensor planned at {p.nbytes}")
        self.written.append(p.gguf)

    def finish(self) -> None:
        if self.pending:
            raise RuntimeError(f"merge ended with tensors never produced: {sorted(self.pending)[:5]}")
        self.file.truncate(self.data_start + self.total)  # the padding after the last tensor
        self.file.close()


def _add_metadata(w: gguf.GGUFWriter, config: dict, arch: str, file_type: int, path: Path) -> None:
    """Architecture metadata as llama.cpp's converter writes it for llama-family models."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    # first among the keys: how `--force` knows this tool wrote the file (output.GGUF_MARKER)
    w.add_string("mergekit_mlx.output", "mergekit-mlx")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(str(config.get("_name_or_path") or path.parent.name.lstrip(".").removesuffix(".partial") or "merged"))
    w.add_block_count(int(config["num_hidden_layers"]))
    if config.get("max_position_embeddings"):
        w.add_context_length(int(config["max_position_embeddings"]))
    w.add_embedding_length(hidden)
    if config.get("intermediate_size"):
        w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    w.add_file_type(int(file_type))
    if config.get("vocab_size"):
        w.add_vocab_size(int(config["vocab_size"]))
    head_dim = int(config.get("head_dim") or hidden // heads)
    w.add_rope_dimension_count(head_dim)
    if config.get("head_dim") or head_dim != hidden // heads:  # as the converter does when head_dim is given
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        if rope.get("original_max_position_embeddings"):
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _extra_tensors(config: dict) -> dict[str, np.ndarray]:
    """Tensors llama.cpp needs that a Hugging Face model keeps in its config (Llama 3 RoPE factors)."""
    rope = config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return {}
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    factors = llama3_rope_factors(
        head_dim,
        float(config.get("rope_theta", 10000.0)),
        float(rope.get("factor", 8.0)),
        float(rope.get("low_freq_factor", 1.0)),
        float(rope.get("high_freq_factor", 4.0)),
        int(rope.get("original_max_position_embeddings", 8192)),
    )
    return {gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight": factors.astype(np.float32)}
