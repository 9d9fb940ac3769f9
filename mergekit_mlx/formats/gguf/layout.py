"""Metadata values of llama.cpp's files: reading one, and Llama 3's RoPE scaling both ways (llama.cpp
keeps it as a `rope_freqs` tensor, Hugging Face as config keys). Shared by the GGUF reader and writer.
"""

from __future__ import annotations

import json
import math
from typing import Any

import gguf
import numpy as np

from ...errors import ModelError


def read_field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    if f is None or not f.types:
        return default
    try:
        return f.contents()
    except (ValueError, IndexError, TypeError) as e:  # e.g. a string that is not UTF-8
        raise ModelError(f"{reader.data.filename}: GGUF metadata {key!r} cannot be read ({e})") from None


LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float, old_ctx: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3 RoPE scaling (what llama.cpp stores as rope_freqs)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))


# where this tool's GGUF files keep the Llama 3 RoPE parameters: rope_freqs alone does not give them
# back unless they are Llama 3.1's own (llama.cpp ignores keys it does not know)
LLAMA3_KEY = "mergekit_mlx.rope_scaling.llama3"
LLAMA3_PARAMS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def llama3_params(rope: dict) -> dict:
    """The four Llama 3 RoPE parameters of a config's scaling block, with transformers' defaults."""
    return {
        "factor": float(rope.get("factor", 8.0)),
        "low_freq_factor": float(rope.get("low_freq_factor", 1.0)),
        "high_freq_factor": float(rope.get("high_freq_factor", 4.0)),
        "original_max_position_embeddings": int(rope.get("original_max_position_embeddings", 8192)),
    }


def llama3_rope_scaling(stored: np.ndarray, head_dim: int, theta: float, written: str | None = None) -> dict | None:
    """Llama 3 rope_scaling parameters that reproduce a stored rope_freqs tensor: those this tool wrote
    beside it (`written`, JSON), else Llama 3.1's with the stored factor; None if neither does."""
    candidates = []
    if isinstance(written, str):
        try:
            params = json.loads(written)
            candidates.append(llama3_params(params if isinstance(params, dict) else {}))
        except (ValueError, TypeError):
            pass
    candidates.append({"factor": float(stored.max()), **LLAMA3_DEFAULTS})
    for p in candidates:
        expected = llama3_rope_factors(
            head_dim, theta, p["factor"], p["low_freq_factor"], p["high_freq_factor"], p["original_max_position_embeddings"]
        )
        if expected.shape == stored.shape and np.allclose(expected, stored, rtol=1e-4):
            return {"rope_type": "llama3", **p}
    return None
