"""Writing a merge as one GGUF file (gguf-f16, gguf-bf16, gguf-q8_0, gguf-q4_0, gguf-tq1_0, gguf-tq2_0).

Writing is incremental: the header, metadata and every tensor's info (name, shape, type, offset)
are written first, from the shapes the plan knows, then each tensor's data lands at its offset as
it arrives, converted in row chunks, so memory holds one tensor and one chunk, never the model.
The file carries the marker key `mergekit_mlx.output`, by which `--force` knows this tool wrote it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np

from ...errors import RecipeError
from ...kernels.bitlinear import quantize_absmean
from ...mlx_lm_config import rope_settings
from ..base import OutputTensor, WriteOptions, Writer
from .layout import HF_ARCHS, SKIPPED_HF_TENSORS, T, gguf_name, llama3_rope_factors, permuted_heads, rope_permutation
from .quants import OUT_TYPES, TERNARY_TYPES, Q, tensor_nbytes, tensor_type
from .tokenizer import add_tokenizer

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 22  # rows are converted and written in chunks of about this many values


@dataclass
class _Planned:
    hf: str
    gguf: str
    qtype: Q
    shape: tuple[int, ...]
    nbytes: int
    offset: int
    heads: int | None  # permute rows by this many heads (llama q/k), else None


class GGUFWriter(Writer):
    """`gguf-*` output: one GGUF file, laid out up front, tensor data written as it arrives."""

    out_formats = tuple(OUT_TYPES)
    single_file = True
    file_name = "model.gguf"
    holds_tokenizer = True

    def __init__(
        self,
        out_dir: Path,
        tensors: list[OutputTensor],
        config: dict,
        out_format: str,
        options: WriteOptions = WriteOptions(),
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
        self.path = Path(out_dir) / self.file_name
        self.config = config
        self.target = target
        w = gguf.GGUFWriter(path=None, arch=arch)
        self.alignment = w.data_alignment
        _add_metadata(w, config, arch, file_type, self.path)
        extra = _extra_tensors(config)
        if options.tokenizer_dir is not None:
            add_tokenizer(w, Path(options.tokenizer_dir), int(config.get("vocab_size") or 0))
        else:
            log.warning("GGUF output has no tokenizer source; llama.cpp needs one to run the model")
        self.plan: dict[str, _Planned] = {}
        offset = 0
        for t in tensors:
            if t.name.endswith(SKIPPED_HF_TENSORS):
                continue
            name = gguf_name(t.name)
            if name is None:
                raise RecipeError(
                    f"--out-format {out_format}: tensor {t.name!r} has no llama.cpp ({arch}) name; GGUF cannot hold it"
                )
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
    theta, rope = rope_settings(config)  # transformers 4 or 5 style
    w.add_rope_freq_base(theta if theta is not None else 10000.0)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    w.add_file_type(int(file_type))
    if config.get("vocab_size"):
        w.add_vocab_size(int(config["vocab_size"]))
    head_dim = int(config.get("head_dim") or hidden // heads)
    w.add_rope_dimension_count(head_dim)
    if config.get("head_dim") or head_dim != hidden // heads:  # as the converter does when head_dim is given
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = rope or {}
    kind = rope.get("rope_type")
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
    theta, rope = rope_settings(config)  # transformers 4 or 5 style
    if rope is None or str(rope["rope_type"]).lower() != "llama3":
        return {}
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    factors = llama3_rope_factors(
        head_dim,
        theta if theta is not None else 10000.0,
        float(rope.get("factor", 8.0)),
        float(rope.get("low_freq_factor", 1.0)),
        float(rope.get("high_freq_factor", 4.0)),
        int(rope.get("original_max_position_embeddings", 8192)),
    )
    return {gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight": factors.astype(np.float32)}
