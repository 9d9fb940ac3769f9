"""Metadata values of llama.cpp's files: reading one, and Llama 3's RoPE scaling both ways (llama.cpp
keeps it as a `rope_freqs` tensor, Hugging Face as config keys). Shared by the GGUF reader and writer.
"""

from __future__ import annotations

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


def llama3_rope_scaling(stored: np.ndarray, head_dim: int, theta: float) -> dict | None:
    """Llama 3 rope_scaling parameters that reproduce a stored rope_freqs tensor, if the usual ones do."""
    factor = float(stored.max())
    d = LLAMA3_DEFAULTS
    expected = llama3_rope_factors(
        head_dim, theta, factor, d["low_freq_factor"], d["high_freq_factor"], d["original_max_position_embeddings"]
    )
    if expected.shape != stored.shape or not np.allclose(expected, stored, rtol=1e-4):
        return None
    return {"rope_type": "llama3", "factor": factor, **d}
