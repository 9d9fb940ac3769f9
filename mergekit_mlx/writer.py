"""Writing merged tensors: shard by shard, each shard written as soon as its last tensor arrives.

A writer is told up front every tensor it will get (name, shape, dtype — the plan knows them), so
it can lay out shards, a GGUF header or a quantization config before any data exists. Tensors then
arrive in plan order through `add`, and `finish` writes what closes the output (index, config).
The directory a writer fills is a temporary one: the merge driver renames it into place only
after `finish`.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import mlx.core as mx

from .errors import RecipeError
from .models import MLX_TO_SAFETENSORS, TOKENIZER_FILES

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
    """Hugging Face layout: model(-0000i-of-0000n).safetensors + model.safetensors.index.json + config."""

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
        self.pending: dict[int, dict[str, mx.array]] = {}
        # shards already complete on disk (resume): their tensors are accepted and dropped
        self.skip = skip_shards or set()
        self.written: list[str] = []

    def wants(self, name: str) -> bool:
        """False for tensors whose shard is already on disk (a resumed merge need not compute them)."""
        return self.files[self.shard_of[name]] not in self.skip

    def add(self, name: str, array: mx.array) -> None:
        i = self.shard_of[name]
        if self.files[i] in self.skip:
            return
        shard = self.pending.setdefault(i, {})
        shard[name] = array
        if len(shard) == len(self.shards[i]):
            self._write(i, self.pending.pop(i))

    def _write(self, i: int, arrays: dict[str, mx.array]) -> None:
        tmp = self.out_dir / ("incomplete-" + self.files[i])  # mx.save_safetensors insists on the suffix
        mx.save_safetensors(str(tmp), arrays, metadata={"format": "pt"})
        tmp.rename(self.out_dir / self.files[i])  # a shard's final name means it is complete
        self.written.append(self.files[i])

    def finish(self) -> None:
        if self.pending:
            missing = [t.name for i in self.pending for t in self.shards[i] if t.name not in self.pending[i]]
            raise RuntimeError(f"merge ended with tensors never produced: {missing[:5]}")
        if len(self.files) > 1:
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index = {
                "metadata": {"total_size": total},
                "weight_map": {t.name: self.files[i] for i, shard in enumerate(self.shards) for t in shard},
            }
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        write_config(self.out_dir, self.config)


def write_config(out_dir: Path, config: dict) -> None:
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def copy_tokenizer(src: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer files (and generation_config.json) of `src` into out_dir."""
    copied = []
    for name in TOKENIZER_FILES + ("generation_config.json",):
        f = src / name
        if f.is_file():
            shutil.copyfile(f, out_dir / name)
            copied.append(name)
    return copied


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

