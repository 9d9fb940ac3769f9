"""Writing a merge as one GGUF file (gguf-f16, gguf-bf16, gguf-q8_0, gguf-q4_0, gguf-tq1_0, gguf-tq2_0).

Writing is incremental: the header, metadata and every tensor's info (name, shape, type, offset)
are written first, from the shapes the plan knows, then each tensor's data lands at its offset as
it arrives, converted in row chunks, so memory holds one tensor and one chunk, never the model.
The file carries the marker key `mergekit_mlx.output`, by which `--force` knows this tool wrote it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np

from ...errors import RecipeError
from ...kernels.bitlinear import quantize_absmean
from ..base import OutputTensor, WriteOptions, Writer
from . import architectures as archs
from .architectures import ARCHITECTURES, Layout, T
from .layout import LLAMA3_KEY, llama3_params, llama3_rope_factors
from .quants import OUT_TYPES, TERNARY_TYPES, Q, tensor_nbytes, tensor_type
from .tokenizer import add_tokenizer

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 22  # rows are converted and written in chunks of about this many values
# Hugging Face tensors no runtime reads (recomputed buffers); llama.cpp's converter drops them too
SKIPPED_HF_TENSORS = (".rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias", ".attention.masked_bias", ".attention.bias")


@dataclass
class _Planned:
    gguf: str
    qtype: Q
    shape: tuple[int, ...]  # the GGUF tensor's logical shape (experts first when stacked)
    nbytes: int
    offset: int
    experts: int = 0  # > 0: a stacked tensor, one slice of nbytes // experts per expert


@dataclass
class _Source:
    """One Hugging Face tensor: where its bytes go and how its values change on the way."""

    target: _Planned
    layout: Layout
    shape: tuple[int, ...]
    expert: int | None


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
        spec = archs.for_config(config)
        if spec is None:
            raise RecipeError(
                f"--out-format {out_format}: GGUF output supports model_type {', '.join(sorted(ARCHITECTURES))}; "
                f"this model is {config.get('model_type')!r}"
            )
        target, file_type = OUT_TYPES[out_format]
        self.path = Path(out_dir) / self.file_name
        self.spec = spec
        self.config = archs.normalised(config)
        self.target = target
        blocks = archs.block_count(self.config)
        self.sources, planned = self._plan(tensors, blocks, out_format)
        w = gguf.GGUFWriter(path=None, arch=spec.name)
        self.alignment = w.data_alignment
        archs.check_config(spec, self.config, out_format)
        _add_metadata(w, spec, self.config, file_type, self.path)
        extra = _extra_tensors(self.config)
        if options.tokenizer_dir is not None:
            add_tokenizer(w, Path(options.tokenizer_dir), int(self.config.get("vocab_size") or 0))
        else:
            log.warning("GGUF output has no tokenizer source; llama.cpp needs one to run the model")
        offset = 0
        for p in planned:
            p.offset = offset
            offset += w.ggml_pad(p.nbytes, self.alignment)
        self.extra = {}
        for name, arr in extra.items():
            self.extra[name] = _Planned(name, Q.F32, arr.shape, arr.nbytes, offset)
            offset += w.ggml_pad(arr.nbytes, self.alignment)
        self.total = offset
        for p in [*planned, *self.extra.values()]:
            # an F32 dtype with raw_dtype keeps the shape as the logical (element) shape
            w.add_tensor_info(p.gguf, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
        w.write_header_to_file(path=self.path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        self.file = w.fout[0]
        self.data_start = w.ggml_pad(self.file.tell(), self.alignment)
        self.pending = set(self.sources)
        self.written: list[str] = []
        for name, arr in extra.items():
            self._put(self.extra[name], 0, [arr.tobytes()])

    def _plan(self, tensors: list[OutputTensor], blocks: int, out_format: str) -> tuple[dict[str, list[_Source]], list[_Planned]]:
        """Each Hugging Face tensor's GGUF tensor(s) (experts stacked), checked before anything is written."""
        spec = self.spec
        sources: dict[str, list[_Source]] = {}
        targets: dict[str, _Planned] = {}
        members: dict[str, dict[int, tuple[int, ...]]] = {}  # stacked tensor -> expert -> its shape
        kinds: dict[T, str] = {}  # GGUF tensor kind -> the (last) Hugging Face tensor of that kind
        for t in tensors:
            if t.name.endswith(SKIPPED_HF_TENSORS):
                continue
            parts = archs.gguf_tensors(spec, t.name, blocks)
            if not parts:
                raise RecipeError(
                    f"--out-format {out_format}: tensor {t.name!r} has no llama.cpp ({spec.name}) name; GGUF cannot hold it"
                )
            if len(parts) > 1:  # blocks of rows llama.cpp keeps as tensors of their own
                sources[t.name] = []
                for part in parts:
                    try:
                        rows = archs.part_rows(tuple(t.shape), part.part, part.parts)
                    except ValueError as e:
                        raise RecipeError(f"--out-format {out_format}: tensor {t.name!r} {e}") from None
                    gshape = (*t.shape[:-2], t.shape[-2] // part.parts, t.shape[-1])
                    qtype = tensor_type(part.name, gshape, self.target)
                    targets[part.name] = _Planned(part.name, qtype, gshape, tensor_nbytes(gshape, qtype), 0)
                    sources[t.name].append(_Source(targets[part.name], Layout(rows=rows), tuple(t.shape), None))
                    kinds[part.kind] = t.name
                continue
            (where,) = parts
            if where.kind == T.OUTPUT and spec.output == "never":
                log.info(
                    "%s: llama.cpp's %s always ties the head to the embedding; %s is not written", out_format, spec.name, t.name
                )
                continue
            shape = tuple(t.shape)
            try:
                lay = archs.layout(spec, t.name, where.kind, shape, self.config)
            except (TypeError, ValueError, ZeroDivisionError) as e:
                raise RecipeError(f"--out-format {out_format}: tensor {t.name!r} {e}") from None
            gshape = shape[::-1] if lay.transpose else shape
            if where.expert is not None:
                members.setdefault(where.name, {})[where.expert] = gshape
            elif where.name in targets:
                raise RecipeError(f"--out-format {out_format}: tensors {t.name!r} and another both map to GGUF {where.name!r}")
            else:
                qtype = tensor_type(where.name, gshape, self.target)
                targets[where.name] = _Planned(where.name, qtype, gshape, tensor_nbytes(gshape, qtype), 0)
            sources[t.name] = [_Source(targets.get(where.name), lay, shape, where.expert)]
            kinds[where.kind] = t.name
        for name, experts in members.items():
            shapes = set(experts.values())
            if len(shapes) != 1 or sorted(experts) != list(range(len(experts))):
                raise RecipeError(
                    f"--out-format {out_format}: the experts of GGUF {name!r} are not numbered 0..{len(experts) - 1} "
                    f"with one shape (got {len(experts)} experts, shapes {sorted(shapes)})"
                )
            shape = (len(experts), *shapes.pop())
            qtype = tensor_type(name, shape, self.target)
            targets[name] = _Planned(name, qtype, shape, tensor_nbytes(shape, qtype), 0, len(experts))
        for hf, (src, *_) in sources.items():
            if src.target is None:
                src.target = targets[archs.gguf_tensor(spec, hf, blocks).name]
        if spec.output == "required" and T.OUTPUT not in kinds and T.TOKEN_EMBD in kinds:
            # a tied model: llama.cpp's architecture has no fallback to the embedding, so it is written twice
            embed = sources[kinds[T.TOKEN_EMBD]][0]
            name = gguf.TENSOR_NAMES[T.OUTPUT] + ".weight"
            qtype = tensor_type(name, embed.target.shape, self.target)
            targets[name] = _Planned(name, qtype, embed.target.shape, tensor_nbytes(embed.target.shape, qtype), 0)
            sources[kinds[T.TOKEN_EMBD]].append(_Source(targets[name], embed.layout, embed.shape, None))
        return sources, list(targets.values())

    def wants(self, name: str) -> bool:
        return name in self.pending

    def add(self, name: str, array: mx.array) -> None:
        for src in self.sources.get(name, ()):  # none: a tensor GGUF does not keep (rotary inv_freq)
            if tuple(array.shape) != src.shape:
                raise ValueError(f"{name}: planned shape {list(src.shape)}, got {list(array.shape)}")
            p = src.target
            per = p.nbytes // p.experts if p.experts else p.nbytes
            self._put(p, (src.expert or 0) * per, self._chunks(src, array), per)
        self.pending.discard(name)

    def _chunks(self, src: _Source, array: mx.array):
        """The tensor's bytes in row chunks, in llama.cpp's layout, ternarised or quantized as planned."""
        lay, qtype = src.layout, src.target.qtype
        if lay.transpose:
            array = array.T
        cols = array.shape[-1] if array.ndim > 1 else 1  # 1-D tensors (biases) permute element-wise
        rows = array.reshape(-1, cols)
        n = rows.shape[0] if lay.rows is None else len(lay.rows)  # a block of the rows, or all of them
        step = max(1, CHUNK_ELEMENTS // cols)
        inverse = None
        if qtype in TERNARY_TYPES:
            inverse = quantize_absmean(array)[1]  # 1 / mean|w|, for the whole tensor
        for r0 in range(0, n, step):
            part = rows[mx.array(lay.rows[r0 : r0 + step])] if lay.rows is not None else rows[r0 : r0 + step]
            if lay.add:
                part = part.astype(mx.float32) + lay.add
            if inverse is not None:
                # absmean ternary values; TQ blocks then store them exactly (up to the f16 scale)
                part = mx.clip(mx.round(part.astype(mx.float32) * inverse), -1, 1) / inverse
            if qtype == Q.F32:
                yield np.array(part.astype(mx.float32)).tobytes()
            elif qtype == Q.F16:
                yield np.array(part.astype(mx.float16)).tobytes()
            elif qtype == Q.BF16:
                yield np.array(part.astype(mx.bfloat16).view(mx.uint16)).tobytes()
            else:
                yield gguf.quants.quantize(np.array(part.astype(mx.float32)), qtype).tobytes()

    def _put(self, p: _Planned, at: int, chunks, expected: int | None = None) -> None:
        self.file.seek(self.data_start + p.offset + at)
        size = 0
        for b in chunks:
            self.file.write(b)
            size += len(b)
        expected = p.nbytes if expected is None else expected
        if size != expected:
            raise RuntimeError(f"{p.gguf}: wrote {size} bytes for a {p.qtype.name} tensor planned at {expected}")
        self.written.append(p.gguf)

    def finish(self) -> None:
        if self.pending:
            raise RuntimeError(f"merge ended with tensors never produced: {sorted(self.pending)[:5]}")
        self.file.truncate(self.data_start + self.total)  # the padding after the last tensor
        self.file.close()


def _add_metadata(w: gguf.GGUFWriter, spec: archs.Architecture, config: dict, file_type: int, path: Path) -> None:
    """Architecture metadata as llama.cpp's converter writes it (`config` is archs.normalised)."""
    # first among the keys: how `--force` knows this tool wrote the file (output.GGUF_MARKER)
    w.add_string("mergekit_mlx.output", "mergekit-mlx")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(str(config.get("_name_or_path") or path.parent.name.lstrip(".").removesuffix(".partial") or "merged"))
    w.add_block_count(archs.block_count(config))
    for key, value in archs.metadata(spec, config).items():
        _add_value(w, key.format(arch=spec.name), value)
    _, rope = archs.rope_settings(config)
    if rope is not None and str(rope["rope_type"]).lower() == "llama3":
        w.add_string(LLAMA3_KEY, json.dumps(llama3_params(rope)))
    w.add_file_type(int(file_type))
    if config.get("vocab_size"):
        w.add_vocab_size(int(config["vocab_size"]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_value(w: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        w.add_array(key, list(value))
    else:
        raise TypeError(f"GGUF metadata {key}: cannot write a {type(value).__name__}")


def _extra_tensors(config: dict) -> dict[str, np.ndarray]:
    """Tensors llama.cpp needs that a Hugging Face model keeps in its config (Llama 3 RoPE factors)."""
    theta, rope = archs.rope_settings(config)
    if rope is None or str(rope["rope_type"]).lower() != "llama3":
        return {}
    factors = llama3_rope_factors(archs.head_dim(config), theta if theta is not None else 10000.0, *llama3_params(rope).values())
    return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": factors.astype(np.float32)}
