"""Router weights: one unit vector per expert and layer, made as mergekit-moe 0.1.5 makes them.

The rules, per gate mode (for every expert; shared experts that have prompts get theirs the same way):
- prompts are tokenized by the base's tokenizer as `bos_token + prompt` (no other special tokens,
  no chat template). mergekit-moe pads a batch on the left, this tool packs prompts end to end;
  neither changes a prompt's states, since no prompt attends to another's tokens (nor to padding)
  and RoPE depends only on relative positions.
- `hidden`: for layer L, the hidden state entering layer L (the embedding output for layer 0, the
  residual stream after layer L-1 otherwise; before any norm) at the prompt's last token, averaged
  over the expert's positive prompts; minus the same average over its negative prompts, if any;
  then divided by its L2 norm (at least 1e-8). The states are computed by mlx-lm's model of the base
  in float32 (mergekit-moe runs transformers in bfloat16) on MLX's default device, the GPU where
  there is one; on the CPU its matrix products run in numpy.
- `hidden_last` is `hidden`; `hidden_avg` averages each prompt's states over its tokens instead of
  taking the last (mergekit-moe averages over the padded batch, padding positions included, which
  makes a prompt's gate depend on the other prompts' lengths; here only the prompt's own tokens count).
- `cheap_embed`: the sum of the token embeddings (float32) of every token of every positive prompt,
  divided by its norm; minus the same unit vector of the negative prompts; divided by its norm
  again; the same vector for every layer.
- `random`: standard normal; `uniform_random`: uniform in [-1/sqrt(hidden), 1/sqrt(hidden)) (as
  torch.nn.Linear initialises); both from MLX's generator keyed by the seed (mergekit-moe draws from
  torch's global generator, unseeded).
"""

from __future__ import annotations

import json
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
from ..formats.safetensors import SafetensorsModel
from ..mlx_lm_config import mlx_lm_config
from .config import Expert, GateMode

NORM_FLOOR = 1e-8  # mergekit-moe's clamp of a norm before dividing by it
PACK_TOKENS = 4096  # prompt tokens per forward pass of the hidden-state computation
DEGENERATE_CONDITION = 5.0  # mergekit-moe warns of a layer whose gate matrix is worse conditioned


def load_prompt_tokenizer(tokenizer_dir: Path | None, config: dict, where: str):
    """The base's Hugging Face tokenizer, as AutoTokenizer loads it from the base's directory (its
    config.json included: transformers picks the tokenizer class by model_type), from a private copy
    of its tokenizer files."""
    if tokenizer_dir is None:
        raise ModelError(
            f"{where}: the base model has no tokenizer files, and gate_mode hidden/cheap_embed tokenizes the prompts "
            "with the base's tokenizer; use a base directory with its tokenizer, or a random gate_mode"
        )
    from transformers import AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="mergekit-mlx-moe-tok-"))
    try:
        copy_side_files(tokenizer_dir, tmp, TOKENIZER_FILES)
        (tmp / "config.json").write_text(json.dumps(config))
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


def states_model(base: ModelSource, host_products: bool | None = None) -> nn.Module:
    """mlx-lm's model of the base, built from the base's tensors (any input format) as they are stored:
    states run through it in float32 (prompt_states), every bfloat16 or float16 weight widened exactly
    as its product runs, so a GPU holds the base at its own size. Its matrix products run in numpy
    (HostProducts) with host_products, by default where MLX's default device is the CPU."""
    from mlx_lm.utils import _get_classes

    config = mlx_lm_config(strip_quantization(base.config))
    try:
        model_class, args_class = _get_classes(config=config)
        model = model_class(args_class.from_dict(config))
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{base.path}: mlx-lm cannot build the base model to compute hidden states ({e})") from None
    weights = {n: base.load(n) for n in base.tensor_names()}
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ModelError(f"{base.path}: the base's tensors do not fit mlx-lm's {config.get('model_type')} model ({e})") from None
    del weights  # the model holds them; a weight replaced by its host copy is freed at once
    model.eval()
    if host_products if host_products is not None else mx.default_device() == mx.cpu:
        use_host_products(model.model, "model", HostProducts(base))
    return model  # weights as stored: float32 activations promote every product to float32 (exact widening)


class HostProducts:
    """Matrix products of a states model run in numpy, in float32: MLX's Linux CPU wheel multiplies
    matrices with the reference BLAS, tens of times slower than numpy's (benchmarks/RESULTS.md 16).
    A weight is widened to float32 as its product runs (bfloat16 exactly, by placing its bits in the
    high half), read straight from its safetensors file where it lies there as stored, into buffers
    reused from layer to layer: nothing the size of the model in float32 is ever held."""

    def __init__(self, source: ModelSource):
        self.source = source
        self.buffers: dict[tuple, np.ndarray] = {}

    def weight(self, name: str) -> np.ndarray:
        info = self.source.info(name)
        key = (info.shape, info.dtype)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = np.zeros(info.shape, dtype=np.float32)  # bfloat16's low halves stay zero
        bits = self.stored(name)
        if info.dtype == "BF16":
            buf.view(np.uint16).reshape(*info.shape, 2)[..., 1] = bits
        else:
            buf[...] = bits
        return buf

    def stored(self, name: str) -> np.ndarray:
        """The tensor's values as stored (bfloat16 as uint16 bits), mapped from its file where possible."""
        info = self.source.info(name)
        code = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}.get(info.dtype)
        if isinstance(self.source, SafetensorsModel) and code is not None:
            file, offset, _ = self.source.file_span(name)
            return np.memmap(file, dtype=code, mode="r", offset=offset, shape=info.shape)
        a = self.source.load(name)
        return np.array(a.view(mx.uint16)) if a.dtype == mx.bfloat16 else np.array(a.astype(mx.float32))


class HostLinear(nn.Module):
    """A linear layer whose product runs in numpy (HostProducts), its weight read as the product runs."""

    def __init__(self, linear: nn.Linear, name: str, products: HostProducts):
        super().__init__()
        self.host = (products, name)  # a tuple of no arrays: not a parameter
        if "bias" in linear:
            self.bias = linear.bias

    def __call__(self, x: mx.array) -> mx.array:
        products, name = self.host
        flat = np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1])
        y = flat @ products.weight(name).T  # BLAS reads the (out, in) buffer transposed, uncopied
        if "bias" in self:
            y += np.array(self.bias.astype(mx.float32))
        return mx.array(y.reshape(*x.shape[:-1], y.shape[-1]))


def use_host_products(module: nn.Module, prefix: str, products: HostProducts) -> None:
    """Every nn.Linear under `module` (named `prefix`) whose weight the base holds under that name, in
    that shape, replaced by a HostLinear (in place)."""
    for name, child in module.children().items():
        for i, c in enumerate(child if isinstance(child, list) else [child]):
            path = f"{prefix}.{name}" + (f".{i}" if isinstance(child, list) else "")
            weight = f"{path}.weight"
            if type(c) is nn.Linear and products.source.has(weight) and products.source.info(weight).shape == c.weight.shape:
                host = HostLinear(c, weight, products)
                if isinstance(child, list):
                    child[i] = host
                else:
                    setattr(module, name, host)
            elif isinstance(c, nn.Module):
                use_host_products(c, path, products)


def prompt_states(model: nn.Module, prompts: list[list[int]], pack_tokens: int = PACK_TOKENS, average: bool = False) -> mx.array:
    """(prompts, layers, hidden) float32: per prompt, the hidden state entering each decoder layer at
    its last token (with `average`, the mean over its tokens). Prompts run packed end to end in sequences of up to `pack_tokens` tokens, each
    attending only to itself (a block-diagonal causal mask): no padding is computed, and since RoPE
    depends only on relative positions a prompt's states are those it has alone."""
    inner = model.model
    out: list[mx.array] = []
    start = 0
    while start < len(prompts):
        end, total = start + 1, len(prompts[start])
        while end < len(prompts) and total + len(prompts[end]) <= pack_tokens:
            total += len(prompts[end])
            end += 1
        ids = np.concatenate([np.asarray(p, dtype=np.int32) for p in prompts[start:end]])
        segment = np.repeat(np.arange(end - start), [len(p) for p in prompts[start:end]])
        position = np.arange(len(ids))
        mask = mx.array((segment[:, None] == segment[None, :]) & (position[:, None] >= position[None, :]))
        last = mx.array(np.cumsum([len(p) for p in prompts[start:end]]) - 1)
        lengths = np.array([len(p) for p in prompts[start:end]])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        h = inner.embed_tokens(mx.array(ids)[None]).astype(mx.float32)
        taken = []
        for i, layer in enumerate(inner.layers):
            if average:  # each prompt's tokens summed in float32 (numpy's segment sums), then divided
                sums = np.add.reduceat(np.array(h[0].astype(mx.float32)), starts, axis=0)
                taken.append(mx.array(sums / lengths[:, None].astype(np.float32)))
            else:
                taken.append(mx.take(h[0], last, axis=0))
            if i + 1 < len(inner.layers):  # the last layer's output is no gate's
                h = layer(h, mask, None)
        states = mx.stack(taken, axis=1).astype(mx.float32)  # (prompts of the pack, layers, hidden)
        mx.eval(states)
        out.append(states)
        start = end
    return mx.concatenate(out)


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
    tokenizer = load_prompt_tokenizer(tokenizer_dir, base.config, "base_model")
    positive = [tokenize_prompts(tokenizer, e.positive_prompts or []) for e in experts]
    negative = [tokenize_prompts(tokenizer, e.negative_prompts or []) for e in experts]
    if mode is GateMode.CHEAP_EMBED:
        embed = base.load("model.embed_tokens.weight")
        vectors = [cheap_embed_gate(embed, p, n, layers) for p, n in zip(positive, negative)]
    else:
        model = states_model(base)
        every = [ids for p, n in zip(positive, negative) for ids in p + n]
        states = prompt_states(model, every, average=mode is GateMode.HIDDEN_AVG)
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
