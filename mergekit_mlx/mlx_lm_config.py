"""The config as mlx-lm reads it: a model's config.json with the keys mlx-lm 0.32 looks for.

transformers 5 writes configs that mlx-lm 0.32.2 misreads, even for models nobody merged: RoPE
moved under `rope_parameters` (mlx-lm's llama, qwen2, mistral, gemma2, mixtral and most others
then run with their default base of 10000 and no scaling; qwen3_moe, glm4, stablelm, gpt_neox and
others refuse to build), and some keys were renamed (Qwen3-MoE's `num_experts` is now
`num_local_experts`). `mlx_lm_config(config)` adds the keys mlx-lm reads, derived from where
transformers 5 keeps them. It only adds: a key the config already has is never changed or dropped,
so a transformers-4 config comes back as it was. The file on disk is never rewritten either; the
result goes to mlx-lm in memory (`mlx_lm.utils.load_model(path, model_config=...)`).

Targets mlx-lm 0.32.2 and the configs of transformers 5.x (checked with 5.25: each architecture's
default config against the `ModelArgs` of the mlx-lm module that runs it). A newer mlx-lm that
reads `rope_parameters` itself is unaffected: the added keys agree with it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

ALL = None  # a row for every architecture
_MISSING = object()

# RoPE keys of transformers 4 that transformers 5 keeps in `rope_parameters` (or, for models with
# one RoPE per attention type, in `rope_parameters[layer type]`)
_NOT_SCALING = ("rope_theta", "partial_rotary_factor")


def _rope(config: dict, layer_type: str = "full_attention") -> dict | None:
    """`rope_parameters` of one attention type (the full-attention one when there are several)."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or not rope:
        return None
    if all(isinstance(v, dict) for v in rope.values()):  # {"full_attention": {...}, "sliding_attention": {...}}
        return rope.get(layer_type) or (next(iter(rope.values())) if layer_type == "full_attention" else None)
    return rope if layer_type == "full_attention" else None


def _rope_value(key: str, layer_type: str = "full_attention") -> Callable[[dict], Any]:
    def derive(config: dict) -> Any:
        rope = _rope(config, layer_type)
        return rope.get(key, _MISSING) if rope is not None else _MISSING

    return derive


def _rope_scaling(config: dict) -> Any:
    """transformers 4's `rope_scaling`: the non-default RoPE type with its factors, else None."""
    rope = _rope(config)
    if rope is None:
        return _MISSING
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return None  # transformers 4 wrote `"rope_scaling": null`; some mlx-lm ModelArgs require the key
    scaling = {k: v for k, v in rope.items() if k not in _NOT_SCALING}
    return {**scaling, "type": kind, "rope_type": kind}  # mlx-lm reads "type" (phi3) or "rope_type"


def rope_settings(config: dict) -> tuple[float | None, dict | None]:
    """(theta, scaling) of the model's full-attention RoPE, read from either config style:
    transformers 4's `rope_theta` and `rope_scaling`, or transformers 5's `rope_parameters` (one dict,
    or one per attention type), at the top level or else in `text_config`. scaling is transformers 4's
    `rope_scaling` with both "type" and "rope_type" set, None for the default RoPE; theta is None
    when the config names none (the caller's default applies)."""
    for cfg in (config, config.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        theta = cfg.get("rope_theta")
        if theta is None and (derived := _rope_value("rope_theta")(cfg)) is not _MISSING:
            theta = derived
        scaling = cfg.get("rope_scaling") or _rope_scaling(cfg)
        if not isinstance(scaling, dict):  # None, or _MISSING
            scaling = None
        if theta is None and scaling is None:
            continue
        if scaling is not None:
            kind = scaling.get("rope_type") or scaling.get("type") or "default"
            scaling = None if kind == "default" else {**scaling, "type": kind, "rope_type": kind}
        return (float(theta) if theta is not None else None), scaling
    return None, None


def _key(name: str) -> Callable[[dict], Any]:
    return lambda config: config.get(name, _MISSING)


def _head_dim(config: dict) -> Any:
    if "hidden_size" in config and config.get("num_attention_heads"):
        return config["hidden_size"] // config["num_attention_heads"]
    return _MISSING


# (architectures, key mlx-lm 0.32 reads, how to derive it from a transformers-5 config); applied in
# order to the config and to its `text_config`, only where the key is absent
KEYS: tuple[tuple[frozenset[str] | None, str, Callable[[dict], Any]], ...] = (
    (ALL, "rope_theta", _rope_value("rope_theta")),
    (ALL, "rope_scaling", _rope_scaling),
    (ALL, "partial_rotary_factor", _rope_value("partial_rotary_factor")),
    (frozenset({"gemma3_text"}), "rope_local_base_freq", _rope_value("rope_theta", "sliding_attention")),
    (frozenset({"gpt_neox"}), "rotary_emb_base", _key("rope_theta")),
    (frozenset({"gpt_neox"}), "rotary_pct", _key("partial_rotary_factor")),
    # MoE keys renamed by transformers 5 (its config classes keep the old name in `attribute_map`)
    (frozenset({"qwen3_moe", "mellum", "minimax", "minimax_m2"}), "num_experts", _key("num_local_experts")),
    (frozenset({"step3p5"}), "num_attention_groups", _key("num_key_value_heads")),
    (frozenset({"step3p5"}), "moe_num_experts", _key("n_routed_experts")),
    (frozenset({"step3p5"}), "moe_top_k", _key("num_experts_per_tok")),
    # other renames in transformers 5's `attribute_map`s
    (frozenset({"exaone"}), "num_layers", _key("num_hidden_layers")),
    (frozenset({"exaone"}), "layer_norm_epsilon", _key("rms_norm_eps")),
    (frozenset({"internlm3"}), "qkv_bias", _key("attention_bias")),
    (frozenset({"internlm3"}), "bias", _key("mlp_bias")),
    (frozenset({"gpt2"}), "n_ctx", _key("n_positions")),
    # transformers 5 has no key for what its model class fixes (LFM2's block width is the hidden size;
    # Apertus always normalises Q and K, never after the blocks, and has no MLP bias)
    (frozenset({"lfm2"}), "block_dim", _key("hidden_size")),
    (frozenset({"apertus"}), "mlp_bias", lambda config: False),
    (frozenset({"apertus"}), "post_norm", lambda config: False),
    (frozenset({"apertus"}), "qk_norm", lambda config: True),
    # no longer written when it is the default; transformers then uses hidden_size / heads
    (frozenset({"qwen3_moe"}), "head_dim", _head_dim),
)


def mlx_lm_config(config: dict) -> dict:
    """A copy of `config` with the keys mlx-lm 0.32 reads added where transformers 5 moved or
    renamed them (nested `text_config` too). Keys already present are kept as they are."""
    out = dict(config)
    model_type = out.get("model_type")
    for architectures, key, derive in KEYS:
        if key in out or (architectures is not None and model_type not in architectures):
            continue
        value = derive(out)
        if value is not _MISSING:
            out[key] = value
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = mlx_lm_config(out["text_config"])
    return out


def load(path: str | Path):
    """mlx-lm's `load(path)` -> (model, tokenizer), reading the config as `mlx_lm_config` maps it.
    The file on disk is left as it is: the added keys are passed to mlx-lm as `model_config`."""
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.utils import load_config

    config = load_config(Path(path))
    added = {k: v for k, v in mlx_lm_config(config).items() if config.get(k, _MISSING) != v}
    return mlx_lm_load(str(path), model_config=added)
