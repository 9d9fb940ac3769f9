"""The model formats: one dispatcher for reading (`open_model`) and one for writing (`make_writer`).

Each format is one module holding its reader and its writer; the two tables below are the only
place that lists them. A reader module has `recognises(path, config)` (cheap: a name, a magic
number, a config key) and `open_input(path, config, open_model)`; the first reader in `READERS`
that recognises a path opens it. A writer class (`base.Writer`) names the --out-format values it
writes in `out_formats` and says what the output lifecycle may do with its output in its
capability attributes. Adding a format is one module and one line in each table it belongs to.

  base.py         the shared protocol: TensorInfo, ModelSource, OutputTensor, Writer, WriteOptions
  files.py        untrusted input files: checked before they are read or copied
  safetensors.py  Hugging Face / MLX directories (`hf`)
  mlx_quant.py    MLX-quantized directories (`mlx-q4`, `mlx-q8`, `mlx-mxfp4`)
  bitnet.py       BitNet b1.58 packed ternary checkpoints (`bitnet`)
  bitdelta.py     BitDelta: a fine-tune as its base plus sign bits (read; written by `convert`)
  gguf/           llama.cpp's GGUF files (`gguf-*`)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..errors import ModelError, RecipeError
from . import bitdelta, bitnet, gguf, mlx_quant, safetensors
from .base import DEFAULT_SHARD_BYTES, ModelSource, OutputTensor, WriteOptions, Writer
from .files import read_config

# input formats, in the order they are tried; the plain safetensors reader takes any directory left
READERS = (gguf, bitnet, bitdelta, mlx_quant, safetensors)

# output formats: the --out-format values each writer class writes, and how to get the class
# (GGUF's on first use: its module imports the gguf package, slow to import)
WRITERS: tuple[tuple[tuple[str, ...], Callable[[], type[Writer]]], ...] = (
    (safetensors.SafetensorsWriter.out_formats, lambda: safetensors.SafetensorsWriter),
    (mlx_quant.QuantizedWriter.out_formats, lambda: mlx_quant.QuantizedWriter),
    (gguf.OUT_FORMATS, lambda: gguf.GGUFWriter),
    (bitnet.BitNetWriter.out_formats, lambda: bitnet.BitNetWriter),
)
WRITER_OF: dict[str, Callable[[], type[Writer]]] = {name: cls for formats, cls in WRITERS for name in formats}
OUT_FORMATS: tuple[str, ...] = tuple(WRITER_OF)


def open_model(path: str | Path) -> ModelSource:
    """Open an input model, detecting its format: HF/MLX directory, MLX-quantized, BitNet or BitDelta
    directory, GGUF file (or a directory holding one)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"{p}: no such file or directory")
    if not p.is_dir() and not p.is_file():
        # a file named by the user: any path will do, but it must be a regular file (a FIFO would hang)
        raise ModelError(
            f"{p}: not a regular file or a directory; a model must be a directory with config.json and safetensors, or a .gguf file"
        )
    config = read_config(p) if p.is_dir() and os.path.lexists(p / "config.json") else None
    for reader in READERS:
        if reader.recognises(p, config):
            return reader.open_input(p, config, open_model)
    raise ModelError(f"{p}: a model must be a directory with config.json and safetensors, or a .gguf file")


def writer_class(out_format: str) -> type[Writer]:
    """The writer of an --out-format; its class attributes say what the output lifecycle may do."""
    try:
        return WRITER_OF[out_format]()
    except KeyError:
        raise RecipeError(f"--out-format {out_format!r} is not known; valid: {', '.join(OUT_FORMATS)}") from None


def make_writer(
    out_format: str,
    out_dir: Path,
    tensors: list[OutputTensor],
    config: dict,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    tokenizer_dir: Path | None = None,
    skip_shards: set[str] | None = None,
    group_size: int | None = None,
) -> Writer:
    """The writer for an --out-format, laid out for `tensors` in `out_dir`."""
    options = WriteOptions(
        max_shard_bytes=max_shard_bytes,
        group_size=group_size,
        tokenizer_dir=tokenizer_dir,
        skip_shards=frozenset(skip_shards or ()),
    )
    return writer_class(out_format)(out_dir, tensors, config, out_format, options)
