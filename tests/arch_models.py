"""Tiny random models of real architectures, in either config style the Hub holds.

For each architecture transformers' own config class writes config.json (`save_pretrained`, so the
file is what a transformers-5 upload holds: `rope_parameters`, `layer_types`, renamed MoE keys), and
`transformers4_config` rewrites it the way transformers 4 wrote it (`rope_theta`, `rope_scaling`,
`torch_dtype`, the old key names). mlx-lm's model class for that config gives random weights, saved
under the checkpoint names its `sanitize` reads back, as a base and two fine-tunes.

Used by tests/test_hub_architectures.py and benchmarks/gguf_llama_cpp.py (which puts this folder on
`sys.path`). Needs transformers and mlx-lm.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
import tiny
from mlx.utils import tree_flatten

VOCAB, LAYERS = 64, 4
STYLES = ("transformers5", "transformers4")

DECODER = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
IDS = {"bos_token_id": 1, "eos_token_id": 2, "vocab_size": VOCAB}

# name -> the arguments given to transformers' config class. A name is the model_type, or
# "model_type+variant" for a second configuration of the same architecture.
ARCHITECTURES = {
    "llama": DECODER,
    # Llama 3.1's RoPE: scaled, with original_max_position_embeddings below the context length
    "llama+rope_llama3": dict(
        DECODER,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "mistral": DECODER,
    "qwen2": DECODER,
    # YaRN as Qwen2.5's model card has users add it: transformers 4 style spells it "type"
    "qwen2+rope_yarn": dict(
        DECODER,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32},
    ),
    "qwen3": DECODER,
    "gemma": DECODER,
    # queries scaled by 1/sqrt(head_dim), as in the released Gemma 2 and 3 (but 27B); llama.cpp has no other scale
    "gemma2": dict(DECODER, sliding_window=4, query_pre_attn_scalar=8),
    "gemma3_text": dict(DECODER, sliding_window=4, sliding_window_pattern=2, query_pre_attn_scalar=8),
    "phi": dict(DECODER, num_key_value_heads=4),
    "phi3": DECODER,
    "olmo2": DECODER,
    "olmo3": DECODER,
    "starcoder2": DECODER,
    "stablelm": DECODER,
    "cohere": DECODER,
    "granite": DECODER,
    "glm4": DECODER,
    "internlm3": DECODER,
    "helium": DECODER,
    "smollm3": DECODER,
    "mixtral": dict(DECODER, num_local_experts=4, num_experts_per_tok=2),
    # norm_topk_prob as in the released Qwen3-MoE models (llama.cpp always normalises)
    "qwen3_moe": dict(
        DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1, norm_topk_prob=True
    ),
    "qwen2_moe": dict(
        DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24
    ),
    "seed_oss": DECODER,
    "granitemoe": dict(DECODER, num_local_experts=4, num_experts_per_tok=2),
    "exaone": DECODER,
    # no sliding window, as EXAONE 4.0 1.2B: llama.cpp gives one to 64-layer models only (32B)
    "exaone4": dict(DECODER, sliding_window=None, layer_types=["full_attention"] * LAYERS),
    "ernie4_5": DECODER,
    "hunyuan_v1_dense": DECODER,
    # as OLMoE-1B-7B: no grouped K/V heads (llama.cpp's Q/K norms span the hidden size)
    # Apertus's own RoPE (Llama 3's scaling), its original context below this one's
    "apertus": dict(
        DECODER,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 12000000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    # LFM2's short-convolution layers between attention ones
    "lfm2": dict(DECODER, layer_types=["conv", "full_attention", "conv", "full_attention"], block_auto_adjust_ff_dim=False),
    "olmoe": dict(DECODER, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2),
    # mlx-lm's GPT-NeoX MLP is 4 x hidden_size whatever intermediate_size says; Pythia's are too
    "gpt_neox": dict(IDS, hidden_size=32, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4),
    "gpt2": dict(IDS, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=128),
}


def model_type(name: str) -> str:
    return name.partition("+")[0]


# ---- the transformers-4 config style ------------------------------------------------------------
# Checked against the config.json transformers 4.57.1 (and 4.46.3, for the architectures it has)
# writes from the same arguments, key by key; the deliberate departures are noted where made.

# transformers 5 keys (its config classes' `attribute_map`) -> the names transformers 4 wrote
RENAMED = {
    "qwen3_moe": {"num_local_experts": "num_experts"},
    "internlm3": {"attention_bias": "qkv_bias", "mlp_bias": "bias"},  # the Hub's remote-code config
    "exaone": {"num_hidden_layers": "num_layers", "rms_norm_eps": "layer_norm_epsilon"},  # the Hub's remote-code config
}
# transformers 4 config classes without a `rope_scaling` argument: they wrote no "rope_scaling": null
NO_ROPE_SCALING = {"mistral", "mixtral", "gemma", "gemma2", "glm4", "helium"}
# layer_types arrived in transformers 4.53; uploads of these architectures from before it lack the
# key (4.57 writes it but for qwen2_moe; 4.46 did not for qwen2 and gemma2). olmo3 and smollm3 came with it.
NO_LAYER_TYPES = {"qwen2", "qwen2_moe", "qwen3", "gemma2", "gemma3_text"}
# RoPE types the transformers-4 style names with the old "type" key instead of "rope_type"
OLD_TYPE_KEY = {"qwen2+rope_yarn"}


def transformers4_config(config: dict, name: str | None = None) -> dict:
    """`config` (a config.json as transformers 5 writes it) as transformers 4 wrote it: RoPE at the
    top level (`rope_theta`, `partial_rotary_factor`, `rope_scaling` null or the scaled type with
    its factors; Gemma 3's sliding layers' base as `rope_local_base_freq`; GPT-NeoX's as Pythia's
    `rotary_emb_base` and `rotary_pct`), renamed keys under their old names, `torch_dtype` for
    `dtype`, and no `layer_types` where uploads before transformers 4.53 had none."""
    name = name or config["model_type"]
    kind = model_type(name)
    out = {k: v for k, v in config.items() if k not in ("rope_parameters", "dtype")}
    rope = config.get("rope_parameters")
    if rope:
        if "full_attention" in rope:  # one RoPE per attention type
            full, sliding = rope["full_attention"], rope.get("sliding_attention", rope["full_attention"])
            if kind == "gemma3_text":
                out["rope_local_base_freq"] = sliding["rope_theta"]
            elif sliding != full:
                raise ValueError(f"{name}: transformers 4 had one RoPE for every layer, this config has {rope}")
            rope = full
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor", "rope_type")}
        rope_type = rope.get("rope_type", "default")
        if kind == "gpt_neox":  # Pythia's keys; transformers 4.57 also wrote rope_theta and partial_rotary_factor
            out["rotary_emb_base"] = rope["rope_theta"]
            out["rotary_pct"] = rope.get("partial_rotary_factor", 1.0)
        else:
            out["rope_theta"] = rope["rope_theta"]
            if "partial_rotary_factor" in rope:
                out["partial_rotary_factor"] = rope["partial_rotary_factor"]
        if rope_type != "default":
            out["rope_scaling"] = dict(scaling, **{"type" if name in OLD_TYPE_KEY else "rope_type": rope_type})
        elif kind not in NO_ROPE_SCALING:
            out["rope_scaling"] = None
    for new, old in RENAMED.get(kind, {}).items():
        if new in out:
            out[old] = out.pop(new)
    if kind == "qwen3_moe" and "head_dim" not in out:  # transformers 4 wrote it; 5 leaves it implied
        out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
    if kind in NO_LAYER_TYPES:
        out.pop("layer_types", None)
    if "dtype" in config:
        out["torch_dtype"] = config["dtype"]
    out["transformers_version"] = "4.57.1"
    return dict(sorted(out.items()))


def config_style(config: dict) -> str:
    """Which style a config.json is in: "transformers5" when it keeps RoPE in `rope_parameters` or
    names its dtype `dtype`, "transformers4" when it has neither."""
    config = config.get("text_config", config)
    return "transformers5" if "rope_parameters" in config or "dtype" in config else "transformers4"


# ---- weights ------------------------------------------------------------------------------------


def hf_name(arch: str, name: str) -> str:
    """The checkpoint name of an mlx-lm parameter (the inverse of the model's `sanitize`)."""
    if arch == "gpt2":
        return name.removeprefix("model.")
    if arch == "gpt_neox":
        name = name.removeprefix("model.")
        return name if name.startswith("embed_out.") else "gpt_neox." + re.sub(r"^h\.", "layers.", name)
    return name


def hf_weights(arch: str, model) -> dict[str, np.ndarray]:
    """An mlx-lm model's parameters as float32 numpy arrays under their checkpoint names."""
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        value = np.array(value.astype(mx.float32))
        if arch == "granitemoe" and ".switch_mlp." in name:  # stacked in checkpoints too (gate and up joined below)
            moe, _, proj = name.partition(".switch_mlp.")
            proj = proj.split(".")[0]
            weights[f"{moe}.{'output_linear' if proj == 'down_proj' else proj}.weight"] = value
        elif ".switch_mlp." in name:  # mlx-lm stacks the experts; checkpoints keep one tensor per expert
            moe, _, proj = name.partition(".switch_mlp.")
            proj = proj.split(".")[0]
            if arch == "mixtral":
                proj = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[proj]
            for e in range(value.shape[0]):
                weights[f"{moe}.experts.{e}.{proj}.weight"] = value[e]
        elif arch == "gpt2" and re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", name):
            weights[hf_name(arch, name)] = value.T  # Conv1D: (in, out) in the checkpoint
        elif arch == "lfm2" and name.endswith(".conv.conv.weight"):
            weights[name] = value.transpose(0, 2, 1)  # PyTorch's Conv1d: (channels, 1, kernel)
        elif arch == "apertus" and name.endswith(("act_fn.alpha_p", "act_fn.alpha_n")):
            weights[name] = value.reshape(1)  # xIELU's learned parameters are 1-element tensors in checkpoints
        else:
            weights[hf_name(arch, name)] = value
    for gate in [n for n in weights if n.endswith(".gate_proj.weight") and arch == "granitemoe"]:
        # GraniteMoE's input_linear: each expert's gate rows, then its up rows (mlx-lm's sanitize splits it so)
        up = weights.pop(gate.replace(".gate_proj.", ".up_proj."))
        weights[gate.replace(".gate_proj.", ".input_linear.")] = np.concatenate([weights.pop(gate), up], axis=1)
    return weights


def save(path: Path, config: dict, weights: dict[str, np.ndarray], write_tokenizer: Callable[[Path, int], None]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    mx.save_safetensors(str(path / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()}, metadata={"format": "pt"})
    write_tokenizer(path, config["vocab_size"])
    return path


# ---- families -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    paths: list[Path]  # base, ft1, ft2
    weights: list[dict[str, np.ndarray]]  # their tensors, float64


def transformers5_config(name: str, vocab: int = VOCAB, overrides: dict | None = None) -> dict:
    """The config.json transformers' config class writes for the architecture `name` (its
    ARCHITECTURES arguments, with `overrides`)."""
    import transformers

    args = dict(ARCHITECTURES[name], vocab_size=vocab, dtype="float32", **(overrides or {}))
    written = transformers.CONFIG_MAPPING[model_type(name)](**args).to_json_string(use_diff=True)
    return json.loads(written)


def build_family(
    name: str,
    root: Path,
    style: str = "transformers5",
    vocab: int = VOCAB,
    write_tokenizer: Callable[[Path, int], None] = tiny.write_tokenizer,
    overrides: dict | None = None,
) -> Family:
    """A base and two fine-tunes (base + small random deltas) of one architecture under root, with
    the config in `style` (one of STYLES); `overrides` change the config class's arguments."""
    from mlx_lm.utils import _get_classes

    from mergekit_mlx.mlx_lm_config import mlx_lm_config

    config = transformers5_config(name, vocab, overrides)
    mx.random.seed(0)
    args = mlx_lm_config(config)
    model_class, args_class = _get_classes(args)
    model = model_class(args_class.from_dict(args))
    base = hf_weights(model_type(name), model)
    if config.get("tie_word_embeddings") and "lm_head.weight" in base:
        del base["lm_head.weight"]  # a tied checkpoint has no head (mlx-lm's Gemma 3 builds one, then ties it)
    # the names are ones mlx-lm reads back: sanitize gives exactly the model's parameters
    back = model.sanitize({k: mx.array(v) for k, v in base.items()}) if hasattr(model, "sanitize") else base
    assert sorted(back) == sorted(k for k, _ in tree_flatten(model.parameters())), name
    if style == "transformers4":
        config = transformers4_config(config, name)
    elif style != "transformers5":
        raise ValueError(f"style {style!r}: one of {STYLES}")
    rng = np.random.default_rng(1)
    variants = [base] + [{k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in base.items()} for _ in range(2)]
    paths = [save(root / part, config, w, write_tokenizer) for part, w in zip(("base", "ft1", "ft2"), variants)]
    return Family(paths, [{k: v.astype(np.float64) for k, v in w.items()} for w in variants])
