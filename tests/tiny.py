"""Tiny Llama-shaped models written on the fly in Hugging Face layout, for tests."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

WORDS = ["hello", "world", "merge", "model", "the", "a", "is", "good", "mlx", "fast"]


def llama_config(
    layers: int = 2,
    hidden: int = 32,
    vocab: int = 64,
    inter: int = 48,
    heads: int = 4,
    kv_heads: int = 2,
    tie: bool = False,
    dtype: str = "float32",
) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }


def llama_weights(cfg: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (v, h))}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        w[p + "self_attn.q_proj.weight"] = rng.normal(0, 0.2, (h, h))
        w[p + "self_attn.k_proj.weight"] = rng.normal(0, 0.2, (kv, h))
        w[p + "self_attn.v_proj.weight"] = rng.normal(0, 0.2, (kv, h))
        w[p + "self_attn.o_proj.weight"] = rng.normal(0, 0.2, (h, h))
        w[p + "mlp.gate_proj.weight"] = rng.normal(0, 0.2, (i, h))
        w[p + "mlp.up_proj.weight"] = rng.normal(0, 0.2, (i, h))
        w[p + "mlp.down_proj.weight"] = rng.normal(0, 0.2, (h, i))
        w[p + "input_layernorm.weight"] = 1 + rng.normal(0, 0.05, (h,))
        w[p + "post_attention_layernorm.weight"] = 1 + rng.normal(0, 0.05, (h,))
    w["model.norm.weight"] = 1 + rng.normal(0, 0.05, (h,))
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = rng.normal(0, 0.5, (v, h))
    return w


def write_tokenizer(path: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokens = ["<unk>", "<s>", "</s>"] + WORDS
    tokens += [f"w{k}" for k in range(vocab - len(tokens))]
    tok = Tokenizer(models.WordLevel({t: k for k, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": 128,
            }
        )
    )


def save_model(
    path: Path, cfg: dict, weights: dict[str, np.ndarray], dtype: str = "float32", shards: int = 1, tokenizer: bool = True
) -> Path:
    """Write config, weights (optionally in several shards with an index) and a tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(cfg, torch_dtype=dtype)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    mx_dtype = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[dtype]
    arrays = {k: mx.array(v.astype(np.float32)).astype(mx_dtype) for k, v in weights.items()}
    names = list(arrays)
    if shards == 1:
        mx.save_safetensors(str(path / "model.safetensors"), arrays, metadata={"format": "pt"})
    else:
        groups = np.array_split(np.arange(len(names)), shards)
        weight_map = {}
        for s, idx in enumerate(groups):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {names[j]: arrays[names[j]] for j in idx}
            mx.save_safetensors(str(path / fname), part, metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer:
        write_tokenizer(path, cfg["vocab_size"])
    return path


def make_family(
    root: Path,
    n_finetunes: int = 2,
    seed: int = 0,
    dtype: str = "float32",
    scale: float = 0.05,
    cfg: dict | None = None,
    **cfg_kw,
) -> list[Path]:
    """A base model and fine-tunes of it (base + small random task vectors); returns their paths."""
    rng = np.random.default_rng(seed)
    cfg = cfg or llama_config(**cfg_kw)
    base = llama_weights(cfg, rng)
    paths = [save_model(root / "base", cfg, base, dtype)]
    for k in range(n_finetunes):
        ft = {n: v + rng.normal(0, scale, v.shape) for n, v in base.items()}
        paths.append(save_model(root / f"ft{k + 1}", cfg, ft, dtype))
    return paths


def load_np(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a model directory as float64 numpy arrays (the reference side of a test)."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        for k, v in mx.load(str(f)).items():
            out[k] = np.array(v.astype(mx.float32)).astype(np.float64)
    return out
