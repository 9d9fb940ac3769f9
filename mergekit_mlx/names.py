"""Tensor names: which stack of layers a tensor belongs to, its layer there, and what role it plays.

Names only, no files: the planner (slices, layer ranges) and the formats (which matrices a
format compresses) both read them here.

A stack is the name up to a layer index: "model.layers." (a decoder), "visual.blocks." (Qwen2-VL's
vision tower), "h." (GPT-2 as the Hub stores it). A model may have several, each with its own count;
MoE experts are numbered inside a layer and stay with it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# "model.layers.12.mlp.up_proj.weight" -> ("model.layers.", 12, ".mlp.up_proj.weight"); the stack may
# open the name ("h.0.attn.c_attn.weight", "layers.0.self_attn.q_proj.weight"); the first stack wins,
# so "model.layers.3.mlp.experts.7.w1" is layer 3. 9 digits: a 5000-digit index is no layer.
LAYER_PATTERN = re.compile(r"^((?:[^.]*\.)*?(?:layers|h|blocks)\.)(\d{1,9})(\..+)$")

# the text decoder's stack under the names transformers gives it, most usual first
DECODER_STACKS = (
    "model.layers.",
    "model.language_model.layers.",
    "language_model.model.layers.",
    "language_model.layers.",
    "transformer.h.",
    "gpt_neox.layers.",
    "model.decoder.layers.",
    "transformer.blocks.",
    "transformer.layers.",
    "backbone.layers.",
    "h.",
    "layers.",
)

# output heads: rows (or a bias) per token at the end of the model, though a name may say "embed"
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output|output_layer|score|classifier|vocab_projector)\.|(^|\.)cls\.predictions\.")
_INPUT_EMBEDDING_HINTS = ("embed", "wte", "wpe", "word_embeddings")


def layer_index(name: str) -> int | None:
    """The index of the layer a tensor belongs to in its stack, or None for tensors outside every stack."""
    m = LAYER_PATTERN.match(name)
    return int(m.group(2)) if m else None


def layer_stack(name: str) -> str | None:
    """The stack a tensor belongs to (its name up to the layer index), or None outside every stack."""
    m = LAYER_PATTERN.match(name)
    return m.group(1) if m else None


def with_layer_index(name: str, index: int) -> str:
    """The same tensor in layer `index` (a name with no layer index is returned as it is)."""
    m = LAYER_PATTERN.match(name)
    if not m:
        return name
    return f"{m.group(1)}{index}{m.group(3)}"


def layer_stacks(names: Iterable[str]) -> dict[str, int]:
    """Every stack of a model and its count (one past its highest index), in the order first seen."""
    stacks: dict[str, int] = {}
    for name in names:
        m = LAYER_PATTERN.match(name)
        if m:
            stacks[m.group(1)] = max(stacks.get(m.group(1), 0), int(m.group(2)) + 1)
    return stacks


def is_decoder_stack(prefix: str) -> bool:
    """A stack named as transformers names a text decoder."""
    return prefix in DECODER_STACKS or prefix.endswith("model.layers.")


def text_stack(names: Iterable[str], num_layers: int) -> str | None:
    """The text decoder's stack, the one slices cut: the stack the config's layer count counts, a
    decoder's name deciding between stacks of that count (a vision tower as deep as the decoder)."""

    def rank(item: tuple[str, int]) -> tuple:
        prefix, count = item
        known = len(DECODER_STACKS) - DECODER_STACKS.index(prefix) if prefix in DECODER_STACKS else 0
        return (count == num_layers, known, is_decoder_stack(prefix), count)

    stacks = layer_stacks(names)
    return max(stacks.items(), key=rank)[0] if stacks else None


def is_output_head(name: str) -> bool:
    """An output head (lm_head, GPT-NeoX's embed_out, output, cls.predictions, ...), tied or not."""
    return bool(_HEAD.search(name))


def is_before_layers(name: str) -> bool:
    """Tensors outside the stacks that come before the layers (input embeddings); the rest (final
    norm, heads) come after. A slice merge takes the first from its first slice, the rest from its
    last, as mergekit's architecture tables (pre_weights, post_weights) do."""
    return not is_output_head(name) and any(h in name for h in _INPUT_EMBEDDING_HINTS)
