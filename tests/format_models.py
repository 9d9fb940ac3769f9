"""Tiny Llama-shaped models with a byte-level BPE tokenizer, for the format tests.

Hidden size 256 so that every matrix row splits into whole GGUF blocks (32 for Q8_0/Q4_0, 256 for
TQ1_0/TQ2_0); two layers; float32 weights. The tokenizer is trained on a few hundred words with the
`tokenizers` library, so the GGUF vocabulary path ("gpt2", with merges) is the real one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np

WORDS = "the quick brown fox jumps over a lazy dog and then runs far away into green hills where birds sing".split()


@dataclass
class TinyModel:
    path: Path
    weights: dict[str, np.ndarray]  # float64 copies of what was written (as float32)
    config: dict


def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


@lru_cache(maxsize=4)
def bpe_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rng = np.random.default_rng(0)
    tok.train_from_iterator([" ".join(rng.choice(WORDS, 12)) for _ in range(200)], trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", bos)])
    return tok.to_str()


def llama_shapes(hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int) -> dict[str, tuple]:
    hd = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (heads * hd, hidden),
                p + "self_attn.k_proj.weight": (kv_heads * hd, hidden),
                p + "self_attn.v_proj.weight": (kv_heads * hd, hidden),
                p + "self_attn.o_proj.weight": (hidden, heads * hd),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def tiny_model(
    path: Path,
    seed: int = 0,
    weights: dict[str, np.ndarray] | None = None,
    hidden: int = 256,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    inter: int = 512,
    vocab: int = 320,
    extra_config: dict | None = None,
) -> TinyModel:
    """Write config.json, model.safetensors (float32) and the tokenizer; return what was written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if weights is None:
        rng = np.random.default_rng(seed)
        weights = {
            n: (1 + 0.1 * rng.standard_normal(s)) if len(s) == 1 else 0.05 * rng.standard_normal(s)
            for n, s in llama_shapes(hidden, layers, heads, kv_heads, inter, vocab).items()
        }
    weights = {k: v.astype(np.float32).astype(np.float64) for k, v in weights.items()}
    mx.save_safetensors(
        str(path / "model.safetensors"),
        {k: mx.array(v.astype(np.float32)) for k, v in weights.items()},
        metadata={"format": "pt"},
    )
    (path / "tokenizer.json").write_text(bpe_tokenizer_json(vocab))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        **(extra_config or {}),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return TinyModel(path, weights, config)
