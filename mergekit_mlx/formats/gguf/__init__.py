"""GGUF, llama.cpp's one-file format: read a GGUF as the Hugging Face model it encodes,
write merges as GGUF.

  architectures.py  one row per Hugging Face model_type: llama.cpp's architecture, names (from the
                gguf package's map), layout changes, metadata (reader and writer)
  layout.py     reading metadata values; Llama 3's RoPE scaling as a tensor and back
  quants.py     tensor types: which each --out-format writes, which the `gguf` package can read
  reader.py     GGUFModel: the checked header, HF names and config, dequantized tensors
  tokenizer.py  tokenizers both ways (GGUF metadata <-> tokenizer.json)
  writer.py     GGUFWriter: header first, each tensor's data at its offset as it arrives
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ...errors import ModelError
from ..base import Opener
from ..files import model_file

# the --out-format values GGUFWriter writes (quants.OUT_TYPES's keys; a test holds the two equal),
# listed here so that the registry needs no import of the gguf package, which costs a fifth of a
# second at every start on some hosts: the modules below are imported on first use
OUT_FORMATS = ("gguf-f16", "gguf-bf16", "gguf-q8_0", "gguf-q4_0", "gguf-tq1_0", "gguf-tq2_0")

_LAZY = {
    "GGUFModel": "reader",
    "check_gguf_layout": "reader",
    "GGUFWriter": "writer",
    "OUT_TYPES": "quants",
    "can_dequantize": "quants",
    "tensor_type": "quants",
    "ARCHITECTURES": "architectures",
    "gguf_tensor": "architectures",
    "hf_names_for": "architectures",
    "rope_permutation": "architectures",
    "add_tokenizer": "tokenizer",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = [
    "OUT_FORMATS",
    "ARCHITECTURES",
    "GGUFModel",
    "GGUFWriter",
    "OUT_TYPES",
    "add_tokenizer",
    "can_dequantize",
    "check_gguf_layout",
    "gguf_tensor",
    "hf_names_for",
    "open_input",
    "recognises",
    "rope_permutation",
    "tensor_type",
]


def recognises(path: Path, config: dict | None) -> bool:
    """A file named .gguf or starting with GGUF's magic, or a directory with .gguf files and no config.json."""
    if path.is_file():
        return path.suffix.lower() == ".gguf" or _has_gguf_magic(path)
    return path.is_dir() and config is None and any(path.glob("*.gguf"))


def open_input(path: Path, config: dict | None, open_model: Opener) -> Any:
    from .reader import GGUFModel

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
