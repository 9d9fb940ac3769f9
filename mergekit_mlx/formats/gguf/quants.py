"""GGUF tensor types: which a merge writes for each --out-format, which the installed `gguf` package reads.

The type of each tensor follows llama.cpp's converter rules (norms and biases in F32, the head kept
above 4 bits, ternary models keep embeddings and head in F16); sizes are the types' block sizes.
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from ... import dtypes

Q = gguf.GGMLQuantizationType

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


# the types a tensor loads as without dequantizing (the weight dtypes); any other type loads as F32
LOADED_CODES = {Q(d.gguf): d.code for d in dtypes.TABLE if d.weight}


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
