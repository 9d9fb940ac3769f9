"""Router weights: one unit vector per expert and layer, made as mergekit-moe 0.1.5 makes them.

The rules, per gate mode (for every expert; shared experts that have prompts get theirs the same way):
- prompts are tokenized by the base's tokenizer as `bos_token + prompt` (no other special tokens,
  no chat template), each on its own (mergekit-moe pads a batch on the left; attention never sees
  the padding, and RoPE depends only on relative positions, so the states are the same).
- `hidden`: for layer L, the hidden state entering layer L (the embedding output for layer 0, the
  residual stream after layer L-1 otherwise; before any norm) at the prompt's last token, averaged
  over the expert's positive prompts; minus the same average over its negative prompts, if any;
  then divided by its L2 norm (at least 1e-8). The states are computed by mlx-lm's model of the base
  in float32 (mergekit-moe runs transformers in bfloat16), a batch of prompts at a time, on MLX's
  default device: the GPU where there is one.
- `cheap_embed`: the sum of the token embeddings (float32) of every token of every positive prompt,
  divided by its norm; minus the same unit vector of the negative prompts; divided by its norm
  again; the same vector for every layer.
- `random`: standard normal; `uniform_random`: uniform in [-1/sqrt(hidden), 1/sqrt(hidden)) (as
  torch.nn.Linear initialises); both from MLX's generator keyed by the seed (mergekit-moe draws from
  torch's global generator, unseeded).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import ModelError
from ..formats.base import ModelSource, strip_quantization
from ..formats.files import TOKENIZER_FILES, copy_side_files
from ..mlx_lm_config import mlx_lm_config
from .config import Expert, GateMode

NORM_FLOOR = 1e-8  # mergekit-moe's clamp of a norm before dividing by it
BATCH_TOKENS = 8192  # padded tokens per forward pass of the hidden-state computation
DEGENERATE_CONDITION = 5.0  # mergekit-moe warns of a layer whose gate matrix is worse conditioned


def load_prompt_tokenizer(tokenizer_dir: Path | None, where: str):
    """The base's Hugging Face tokenizer, loaded from a private copy of its tokenizer files."""
    if tokenizer_dir is None:
        raise ModelError(
            f"{where}: the base model has no tokenizer files, and gate_mode hidden/cheap_embed tokenizes the prompts "
            "with the base's tokenizer; use a base directory with its tokenizer, or a random gate_mode"
        )
    from transformers import AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="mergekit-mlx-moe-tok-"))
    try:
        copy_side_files(tokenizer_dir, tmp, TOKENIZER_FILES)
        return AutoTokenizer.from_pretrained(str(tmp))
    except (OSError, ValueError) as e:
        raise ModelError(f"{tokenizer_dir}: the tokenizer cannot be loaded ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tokenize_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of `bos_token + prompt`, with no other special tokens (mergekit-moe's tokenization)."""
    prefix = tokenizer.bos_token or ""
    out = [list(tokenizer(prefix + p, add_special_tokens=False)["input_ids"]) for p in prompts]
    for p, ids in zip(prompts, out):
        if not ids:
            raise ModelError(f"the prompt {p[:40]!r} has no tokens in the base's tokenizer")
    return out


def unit(v: mx.array) -> mx.array:
    """v divided by its L2 norm over the last axis, the norm at least NORM_FLOOR."""
    return v / mx.maximum(mx.linalg.norm(v, axis=-1, keepdims=True), NORM_FLOOR)


# ---------------- cheap_embed ----------------


def embedding_direction(embed: mx.array, prompts: list[list[int]]) -> mx.array:
    """The unit vector along the sum of the embeddings of every token of the prompts (float32)."""
    ids = mx.array([t for p in prompts for t in p], dtype=mx.int32)
    if int(mx.max(ids).item()) >= embed.shape[0]:
        raise ModelError(f"a prompt token id is outside the base's embedding ({embed.shape[0]} rows)")
    return unit(embed[ids].astype(mx.float32).sum(axis=0))


def cheap_embed_gate(embed: mx.array, positive: list[list[int]], negative: list[list[int]], layers: int) -> mx.array:
    """(layers, hidden): one expert's cheap_embed gate vector, repeated for every layer."""
    v = embedding_direction(embed, positive)
    if negative:
        v = v - embedding_direction(embed, negative)
    return mx.broadcast_to(unit(v), (layers, v.shape[-1]))


# ---------------- hidden ----------------


def states_model(base: ModelSource) -> nn.Module:
    """mlx-lm's model of the base, in float32, built from the base's tensors (any input format)."""
    from mlx_lm.utils import _get_classes

    config = mlx_lm_config(strip_quantization(base.config))
    try:
        model_class, args_class = _get_classes(config=config)
        model = model_class(args_class.from_dict(config))
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{base.path}: mlx-lm cannot build the base model to compute hidden states ({e})") from None
    weights = {n: base.load(n).astype(mx.float32) for n in base.tensor_names()}
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ModelError(f"{base.path}: the base's tensors do not fit mlx-lm's {config.get('model_type')} model ({e})") from None
    model.eval()
    return model


def prompt_states(model: nn.Module, prompts: list[list[int]], batch_tokens: int = BATCH_TOKENS) -> mx.array:
    """(prompts, layers, hidden) float32: per prompt, the hidden state entering each decoder layer at
    its last token. Prompts run in batches of similar length, padded on the right (a causal mask
    keeps padding out of every real token's attention, and positions start at 0 as unpadded)."""
    from mlx_lm.models.base import create_attention_mask

    inner = model.model
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[mx.array | None] = [None] * len(prompts)
    start = 0
    while start < len(order):
        end = start + 1  # sorted by length: the last prompt taken is the longest of the batch
        while end < len(order) and len(prompts[order[end]]) * (end - start + 1) <= batch_tokens:
            end += 1
        longest = len(prompts[order[end - 1]])
        rows = order[start:end]
        ids = np.zeros((len(rows), longest), dtype=np.int32)
        for r, i in enumerate(rows):
            ids[r, : len(prompts[i])] = prompts[i]
        last = mx.array([len(prompts[i]) - 1 for i in rows])[:, None, None]
        h = inner.embed_tokens(mx.array(ids))
        mask = create_attention_mask(h, None)
        taken = []
        for layer in inner.layers:
            taken.append(mx.take_along_axis(h, mx.broadcast_to(last, (len(rows), 1, h.shape[-1])), axis=1)[:, 0])
            h = layer(h, mask, None)
        states = mx.stack(taken, axis=1).astype(mx.float32)  # (rows, layers, hidden)
        mx.eval(states)
        for r, i in enumerate(rows):
            out[i] = states[r]
        start = end
    return mx.stack(out)


def hidden_gate(states: mx.array, positive: Sequence[int], negative: Sequence[int]) -> mx.array:
    """(layers, hidden): one expert's hidden gate from the states of its positive and negative prompts
    (indices into `states`)."""
    v = states[mx.array(list(positive))].mean(axis=0)
    if negative:
        v = v - states[mx.array(list(negative))].mean(axis=0)
    return unit(v)


# ---------------- all experts ----------------


def random_gates(mode: GateMode, layers: int, experts: int, hidden: int, seed: int) -> mx.array:
    """(layers, experts, hidden) float32 of a random gate mode, from MLX's generator keyed by `seed`."""
    key = mx.random.key(seed)
    if mode is GateMode.RANDOM:
        return mx.random.normal((layers, experts, hidden), key=key)
    scale = math.sqrt(1.0 / hidden)
    return mx.random.uniform(-scale, scale, (layers, experts, hidden), key=key)


def compute_gates(
    mode: GateMode,
    experts: Sequence[Expert],
    base: ModelSource,
    tokenizer_dir: Path | None,
    layers: int,
    hidden: int,
    seed: int,
) -> mx.array:
    """(layers, experts, hidden) float32: the router weights of `experts` (routed, then shared)."""
    if not mode.reads_prompts:
        return random_gates(mode, layers, len(experts), hidden, seed)
    tokenizer = load_prompt_tokenizer(tokenizer_dir, "base_model")
    positive = [tokenize_prompts(tokenizer, e.positive_prompts or []) for e in experts]
    negative = [tokenize_prompts(tokenizer, e.negative_prompts or []) for e in experts]
    if mode is GateMode.CHEAP_EMBED:
        embed = base.load("model.embed_tokens.weight")
        vectors = [cheap_embed_gate(embed, p, n, layers) for p, n in zip(positive, negative)]
    else:
        model = states_model(base)
        every = [ids for p, n in zip(positive, negative) for ids in p + n]
        states = prompt_states(model, every)
        del model
        vectors, at = [], 0
        for p, n in zip(positive, negative):
            pos = range(at, at + len(p))
            neg = range(at + len(p), at + len(p) + len(n))
            vectors.append(hidden_gate(states, pos, neg))
            at += len(p) + len(n)
    gates = mx.stack(vectors, axis=1)
    mx.eval(gates)
    return gates


def degenerate_layers(gates: mx.array, threshold: float = DEGENERATE_CONDITION) -> list[int]:
    """Layers whose (experts x hidden) gate matrix has a condition number above `threshold`: their
    experts are hard to tell apart (mergekit-moe's warning)."""
    g = np.array(gates.astype(mx.float32))
    return [i for i in range(g.shape[0]) if np.linalg.cond(g[i].astype(np.float64)) > threshold]
