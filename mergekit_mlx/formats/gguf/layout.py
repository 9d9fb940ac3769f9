"""What llama.cpp's files look like: tensor names, architectures, the RoPE row order, metadata values.

Shared by the GGUF reader and writer, so that a name or permutation written is the one read back.
llama.cpp stores llama's Q and K projections with their rows permuted for its RoPE layout; the
reader undoes that and the writer applies it, as llama.cpp's convert_hf_to_gguf.py does.
"""

from __future__ import annotations

import math
import re
from typing import Any

import gguf
import numpy as np

from ...errors import ModelError

T = gguf.MODEL_TENSOR

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


def gguf_name(hf_name: str) -> str | None:
    """The GGUF tensor name of a Hugging Face llama-family tensor, or None if it has none."""
    stem, _, suffix = hf_name.rpartition(".")
    if stem in HF_TO_GGUF_GLOBAL and suffix in ("weight", "bias"):
        return f"{gguf.TENSOR_NAMES[HF_TO_GGUF_GLOBAL[stem]]}.{suffix}"
    m = HF_LAYER.match(hf_name)
    if m and m.group(2) in HF_TO_GGUF_LAYER:
        return f"{gguf.TENSOR_NAMES[HF_TO_GGUF_LAYER[m.group(2)]].format(bid=m.group(1))}.{m.group(3)}"
    return None


def hf_name(gguf_tensor: str) -> str | None:
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


def permuted_heads(hf: str, config: dict) -> int | None:
    """Heads to permute by for llama's q/k projections (weights and biases), else None."""
    if hf.endswith((".self_attn.q_proj.weight", ".self_attn.q_proj.bias")):
        return int(config["num_attention_heads"])
    if hf.endswith((".self_attn.k_proj.weight", ".self_attn.k_proj.bias")):
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


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
