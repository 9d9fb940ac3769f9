"""GGUF, llama.cpp's one-file format: read a llama-family GGUF as the Hugging Face model it encodes,
write merges as GGUF.

  layout.py     tensor names, architectures, the RoPE row order, metadata values (reader and writer)
  quants.py     tensor types: which each --out-format writes, which the `gguf` package can read
  reader.py     GGUFModel: the checked header, HF names and config, dequantized tensors
  tokenizer.py  tokenizers both ways (GGUF metadata <-> tokenizer.json)
  writer.py     GGUFWriter: header first, each tensor's data at its offset as it arrives
"""

from __future__ import annotations

from pathlib import Path

from ...errors import ModelError
from ..base import Opener
from ..files import model_file
from .layout import gguf_name, hf_name, permuted_heads, rope_permutation
from .quants import OUT_TYPES, can_dequantize, tensor_type
from .reader import GGUFModel, check_gguf_layout
from .tokenizer import add_tokenizer
from .writer import GGUFWriter

__all__ = [
    "GGUFModel",
    "GGUFWriter",
    "OUT_TYPES",
    "add_tokenizer",
    "can_dequantize",
    "check_gguf_layout",
    "gguf_name",
    "hf_name",
    "open_input",
    "permuted_heads",
    "recognises",
    "rope_permutation",
    "tensor_type",
]


def recognises(path: Path, config: dict | None) -> bool:
    """A file named .gguf or starting with GGUF's magic, or a directory with .gguf files and no config.json."""
    if path.is_file():
        return path.suffix.lower() == ".gguf" or _has_gguf_magic(path)
    return path.is_dir() and config is None and any(path.glob("*.gguf"))


def open_input(path: Path, config: dict | None, open_model: Opener) -> GGUFModel:
    if path.is_file():
        return GGUFModel(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise ModelError(f"{path}: holds several .gguf files ({', '.join(g.name for g in ggufs[:4])}); name one")
    model_file(path, ggufs[0].name, "GGUF file")
    return GGUFModel(ggufs[0])


def _has_gguf_magic(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
