"""Which Hugging Face architectures GGUF holds, and how: llama.cpp's architecture, the tensor layout
changes its converter makes, and the metadata it writes, one row per `model_type`.

Tensor names come from the `gguf` package's own map (`gguf.get_tensor_name_map`), which knows the
Hugging Face names of every architecture llama.cpp runs, and metadata keys from its `gguf.Keys`.
What the package does not hold is kept here: which llama.cpp architecture a `model_type` becomes,
how its converter reshapes tensors (Llama's rotary row order, Gemma's norms stored as 1 + w,
GPT-2's transposed Conv1D weights, experts stacked into one tensor per layer), the config keys each
metadata value comes from, and, for reading a GGUF back, which of the several Hugging Face names
the package lists for a tensor the architecture's own checkpoints use.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import gguf
import numpy as np

from ...errors import RecipeError
from ...mlx_lm_config import mlx_lm_config, rope_settings

T = gguf.MODEL_TENSOR
A = gguf.MODEL_ARCH
LLM, ATTN, ROPE = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope


@dataclass(frozen=True)
class Field:
    """One metadata value: its key (`{arch}.…`), the config keys it is read from (the first one
    present; the first is the one written back on import) and its GGUF type."""

    key: str
    config: tuple[str, ...]
    kind: type = int  # int -> UINT32, float -> FLOAT32, bool -> BOOL
    default: Any = None  # written when the config has none of the keys (a value llama.cpp requires)

    def find(self, config: dict) -> Any:
        for k in self.config:
            if config.get(k) is not None:
                return config[k]
        return self.default


# values every architecture writes when its config has them (llama.cpp's generic converter set)
COMMON_FIELDS = (
    Field(LLM.CONTEXT_LENGTH, ("max_position_embeddings", "n_positions", "n_ctx")),
    Field(LLM.EMBEDDING_LENGTH, ("hidden_size", "n_embd")),
    Field(LLM.FEED_FORWARD_LENGTH, ("intermediate_size", "n_inner")),
    Field(ATTN.HEAD_COUNT, ("num_attention_heads", "n_head")),
    Field(ATTN.HEAD_COUNT_KV, ("num_key_value_heads",)),
    Field(ATTN.LAYERNORM_RMS_EPS, ("rms_norm_eps",), float),
    Field(ATTN.LAYERNORM_EPS, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"), float),
    Field(LLM.EXPERT_COUNT, ("num_local_experts", "num_experts")),
    Field(LLM.EXPERT_USED_COUNT, ("num_experts_per_tok",)),
    Field(ATTN.KEY_LENGTH, ("head_dim",)),
    Field(ATTN.VALUE_LENGTH, ("head_dim",)),
)


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face `model_type` is written as (and read back from) a llama.cpp GGUF."""

    model_type: str
    arch: A
    hf_class: str  # the config's `architectures` entry when a GGUF is read back
    permute_qk: bool = False  # Q/K rows in llama.cpp's rotary order (the Llama converter's permute)
    norm_plus_one: bool = False  # Hugging Face scales by (1 + w) (Gemma); llama.cpp stores 1 + w
    transposed: tuple[str, ...] = ()  # Hugging Face tensors kept (in, out): GPT-2's Conv1D
    fields: tuple[Field, ...] = ()  # metadata beyond COMMON_FIELDS
    rope_from_partial: bool = False  # rope.dimension_count = head_dim * partial_rotary_factor
    hf_names: dict[str, str] = field(default_factory=dict)  # GGUF stem -> Hugging Face template, on import
    hf_config: dict[str, Any] = field(default_factory=dict)  # config values fixed by the architecture, on import
    config_names: dict[str, str] = field(default_factory=dict)  # config key -> this architecture's name for it
    output: str = "optional"  # llama.cpp's output.weight: "optional" (falls back to the embedding), "required", "never"
    qkv_by_head: bool = False  # fused QKV rows per head [head][q, k, v] (GPT-NeoX); llama.cpp wants [q; k; v]
    attention_bias_key: str = "attention_bias"  # the config key saying Q/K/V have biases, on import
    derived: Callable[[dict], dict[str, Any]] | None = None  # metadata computed from the config, not copied
    from_gguf: Callable[[dict], dict[str, Any]] | None = None  # config values implied by llama.cpp's reading, on import
    refuses: Callable[[dict], str | None] | None = None  # why llama.cpp would run this config wrongly, if it would
    # Hugging Face tensor (name after the block's prefix) -> the GGUF stems of its equal blocks of rows
    # (per expert when stacked): GraniteMoE's input_linear is the gate's rows, then the up projection's
    split_rows: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


def _fields(*rows: tuple) -> tuple[Field, ...]:
    return tuple(Field(*row) for row in rows)


_SILU = {"hidden_act": "silu"}
# import: the llama-family names where the package lists another family's first
_LLAMA_NAMES = {
    "ffn_norm": "model.layers.{bid}.post_attention_layernorm",
    "ffn_up": "model.layers.{bid}.mlp.up_proj",
    "attn_q_norm": "model.layers.{bid}.self_attn.q_norm",
    "attn_k_norm": "model.layers.{bid}.self_attn.k_norm",
    "ffn_gate_inp": "model.layers.{bid}.mlp.gate",
    "ffn_gate_exps": "model.layers.{bid}.mlp.experts.gate_proj",
    "ffn_up_exps": "model.layers.{bid}.mlp.experts.up_proj",
    "ffn_down_exps": "model.layers.{bid}.mlp.experts.down_proj",
}
_MIXTRAL_NAMES = {
    **_LLAMA_NAMES,
    "ffn_gate_inp": "model.layers.{bid}.block_sparse_moe.gate",
    "ffn_gate_exps": "model.layers.{bid}.block_sparse_moe.experts.w1",
    "ffn_down_exps": "model.layers.{bid}.block_sparse_moe.experts.w2",
    "ffn_up_exps": "model.layers.{bid}.block_sparse_moe.experts.w3",
}
_POST_NORMS = {  # Gemma 2/3, OLMo 2, GLM-4: a norm after attention and after the MLP
    **_LLAMA_NAMES,
    "post_attention_norm": "model.layers.{bid}.post_attention_layernorm",
    "ffn_norm": "model.layers.{bid}.pre_feedforward_layernorm",
    "post_ffw_norm": "model.layers.{bid}.post_feedforward_layernorm",
}
_GRANITE_FIELDS = _fields(
    (ATTN.SCALE, ("attention_multiplier",), float),
    (LLM.EMBEDDING_SCALE, ("embedding_multiplier",), float),
    (LLM.RESIDUAL_SCALE, ("residual_multiplier",), float),
    (LLM.LOGIT_SCALE, ("logits_scaling",), float, 1.0),  # required by llama.cpp
)
_EXAONE_NAMES = {
    "token_embd": "transformer.wte",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
    "attn_norm": "transformer.h.{bid}.ln_1",
    "attn_q": "transformer.h.{bid}.attn.attention.q_proj",
    "attn_k": "transformer.h.{bid}.attn.attention.k_proj",
    "attn_v": "transformer.h.{bid}.attn.attention.v_proj",
    "attn_output": "transformer.h.{bid}.attn.attention.out_proj",
    "ffn_norm": "transformer.h.{bid}.ln_2",
    "ffn_gate": "transformer.h.{bid}.mlp.c_fc_0",
    "ffn_up": "transformer.h.{bid}.mlp.c_fc_1",
    "ffn_down": "transformer.h.{bid}.mlp.c_proj",
}
_SOFTCAP = (
    (LLM.ATTN_LOGIT_SOFTCAPPING, ("attn_logit_softcapping",), float),
    (LLM.FINAL_LOGIT_SOFTCAPPING, ("final_logit_softcapping",), float),
)
_WINDOW = ((ATTN.SLIDING_WINDOW, ("sliding_window",)),)
_GPT2_CONFIG = {
    "hidden_size": "n_embd",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "max_position_embeddings": "n_positions",
    "intermediate_size": "n_inner",
    "layer_norm_eps": "layer_norm_epsilon",
}


def _swa_pattern(config: dict) -> dict[str, Any]:
    """Which layers use the sliding window: per layer from `layer_types`, else every n-th layer full
    from transformers 4's `sliding_window_pattern` (llama.cpp's default pattern when neither is there)."""
    types = config.get("layer_types")
    if isinstance(types, list) and config.get("sliding_window"):
        return {ATTN.SLIDING_WINDOW_PATTERN: [t == "sliding_attention" for t in types]}
    if isinstance(config.get("sliding_window_pattern"), int):
        return {ATTN.SLIDING_WINDOW_PATTERN: int(config["sliding_window_pattern"])}
    return {}


def layer_types_of(pattern: Any, layers: int) -> dict[str, Any]:
    """The config keys saying which layers slide, from a GGUF sliding-window pattern (a bool per
    layer, or every n-th layer full): `layer_types`, and `sliding_window_pattern` where it is periodic."""
    if isinstance(pattern, int) and pattern > 0:
        slides = [(i + 1) % pattern != 0 for i in range(layers)]
    elif isinstance(pattern, list) and len(pattern) == layers:
        slides = [bool(x) for x in pattern]
    else:
        return {}
    out: dict[str, Any] = {"layer_types": ["sliding_attention" if x else "full_attention" for x in slides]}
    period = next((i + 1 for i, x in enumerate(slides) if not x), None)
    if period and all(x == ((i + 1) % period != 0) for i, x in enumerate(slides)):
        out["sliding_window_pattern"] = period
    return out


def _gemma_query_scale(layers_27b: int) -> Callable[[dict], dict[str, Any]]:
    """query_pre_attn_scalar as llama.cpp applies it (see _gemma_attention_scale)."""

    def values(config: dict) -> dict[str, Any]:
        if block_count(config) == layers_27b:
            return {"query_pre_attn_scalar": config["hidden_size"] // config["num_attention_heads"]}
        return {"query_pre_attn_scalar": head_dim(config)}

    return values


def _gemma_attention_scale(layers_27b: int) -> Callable[[dict], str | None]:
    """llama.cpp scales Gemma 2/3 queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) when the layer
    count is the 27B model's; the config's query_pre_attn_scalar must be that value."""

    def check(config: dict) -> str | None:
        scalar = config.get("query_pre_attn_scalar")
        if scalar is None:
            return None
        layers = block_count(config)
        expected = config["hidden_size"] // config["num_attention_heads"] if layers == layers_27b else head_dim(config)
        if float(scalar) != float(expected):
            return (
                f"query_pre_attn_scalar is {scalar}, but llama.cpp scales a {layers}-layer model's queries by "
                f"1/sqrt({expected}); the GGUF would compute different logits"
            )
        return None

    return check


def _requires(key: str, value: Any, default: Any) -> Callable[[dict], str | None]:
    def check(config: dict) -> str | None:
        got = config.get(key, default)
        if got != value:
            return f"{key} is {got!r}; llama.cpp computes this architecture as if it were {value!r}"
        return None

    return check


def _exaone4_window(config: dict) -> str | None:
    """llama.cpp gives EXAONE 4 its sliding window (and RoPE on the sliding layers only) when it has
    64 layers, as the 32B model; any other layer count runs every layer full, with RoPE."""
    types = config.get("layer_types") or []
    slides = config.get("sliding_window") and (config.get("sliding_window_pattern") or "sliding_attention" in types)
    if slides and block_count(config) != 64:
        return (
            f"it has a sliding window, which llama.cpp applies to EXAONE 4 models of 64 layers only; "
            f"this one has {block_count(config)}, and llama.cpp would attend fully and rotate every layer"
        )
    return None


def _exaone4_pattern(config: dict) -> dict[str, Any]:
    """mlx-lm's EXAONE 4 reads which layers slide from `sliding_window_pattern` as text ("LLLG"), and
    requires the key and `rope_scaling` (set after this where the GGUF has a scaling); transformers
    needs `layer_types` when there is no window."""
    types = config.get("layer_types") if config.get("sliding_window") else None
    period = config.get("sliding_window_pattern")
    if not types or not isinstance(period, int):
        full = ["full_attention"] * block_count(config)
        return {"sliding_window": None, "sliding_window_pattern": None, "layer_types": full, "rope_scaling": None}
    pattern = "".join("L" if t == "sliding_attention" else "G" for t in types[:period])
    return {"sliding_window_pattern": pattern, "rope_scaling": None}


def _olmoe_unsupported(config: dict) -> str | None:
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads") or config.get("num_attention_heads")
    if kv != heads:
        return (
            f"num_key_value_heads is {kv}, not num_attention_heads ({heads}); llama.cpp's OLMoE normalises "
            "K over all the hidden size's values, so it runs only models with as many K/V heads as query heads"
        )
    if config.get("clip_qkv") is not None:
        return f"clip_qkv is {config['clip_qkv']}; llama.cpp's OLMoE does not clip Q, K and V"
    return _requires("norm_topk_prob", False, False)(config)


def _gpt2_derived(config: dict) -> dict[str, Any]:
    return {LLM.FEED_FORWARD_LENGTH: int(config.get("n_inner") or 4 * int(config["n_embd"]))}


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", A.LLAMA, "LlamaForCausalLM", permute_qk=True, hf_names=_LLAMA_NAMES, hf_config=_SILU),
        Architecture("mistral", A.LLAMA, "MistralForCausalLM", permute_qk=True, hf_names=_LLAMA_NAMES, hf_config=_SILU),
        Architecture("mixtral", A.LLAMA, "MixtralForCausalLM", permute_qk=True, hf_names=_MIXTRAL_NAMES, hf_config=_SILU),
        Architecture("internlm3", A.LLAMA, "InternLM3ForCausalLM", permute_qk=True, hf_names=_LLAMA_NAMES, hf_config=_SILU),
        Architecture("smollm3", A.SMOLLM3, "SmolLM3ForCausalLM", permute_qk=True, hf_names=_LLAMA_NAMES, hf_config=_SILU),
        Architecture(
            "granite",
            A.GRANITE,
            "GraniteForCausalLM",
            permute_qk=True,
            hf_names=_LLAMA_NAMES,
            hf_config=_SILU,
            fields=_GRANITE_FIELDS,
        ),
        Architecture(
            "granitemoe",
            A.GRANITE_MOE,
            "GraniteMoeForCausalLM",
            permute_qk=True,
            hf_config=_SILU,
            hf_names={
                **_LLAMA_NAMES,
                "ffn_gate_inp": "model.layers.{bid}.block_sparse_moe.router.layer",
                "ffn_gate_exps": "model.layers.{bid}.block_sparse_moe.input_linear",
                "ffn_up_exps": "model.layers.{bid}.block_sparse_moe.input_linear",
                "ffn_down_exps": "model.layers.{bid}.block_sparse_moe.output_linear",
            },
            split_rows={"block_sparse_moe.input_linear": ("ffn_gate_exps", "ffn_up_exps")},
            fields=_GRANITE_FIELDS,
        ),
        Architecture("qwen2", A.QWEN2, "Qwen2ForCausalLM", hf_names=_LLAMA_NAMES, hf_config=_SILU),
        Architecture("qwen3", A.QWEN3, "Qwen3ForCausalLM", hf_names=_LLAMA_NAMES, hf_config=_SILU),
        Architecture(
            "qwen2_moe",
            A.QWEN2MOE,
            "Qwen2MoeForCausalLM",
            config_names={"num_local_experts": "num_experts"},  # the name Qwen's MoE configs use
            output="required",
            hf_config=_SILU,
            hf_names={
                **_LLAMA_NAMES,
                "ffn_gate_inp_shexp": "model.layers.{bid}.mlp.shared_expert_gate",
                "ffn_gate_shexp": "model.layers.{bid}.mlp.shared_expert.gate_proj",
                "ffn_up_shexp": "model.layers.{bid}.mlp.shared_expert.up_proj",
                "ffn_down_shexp": "model.layers.{bid}.mlp.shared_expert.down_proj",
            },
            fields=_fields(
                (LLM.EXPERT_FEED_FORWARD_LENGTH, ("moe_intermediate_size",)),
                (LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, ("shared_expert_intermediate_size",)),
            ),
            refuses=_requires("norm_topk_prob", False, False),
            from_gguf=lambda config: {"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": False},
        ),
        Architecture(
            "qwen3_moe",
            A.QWEN3MOE,
            "Qwen3MoeForCausalLM",
            config_names={"num_local_experts": "num_experts"},  # the name Qwen's MoE configs use
            hf_names=_LLAMA_NAMES,
            hf_config=_SILU,
            fields=_fields((LLM.EXPERT_FEED_FORWARD_LENGTH, ("moe_intermediate_size",))),
            refuses=_requires("norm_topk_prob", True, False),
            from_gguf=lambda config: {"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True},
        ),
        Architecture(
            "gemma",
            A.GEMMA,
            "GemmaForCausalLM",
            norm_plus_one=True,
            output="never",
            hf_names=_LLAMA_NAMES,
            hf_config={"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"},
        ),
        Architecture(
            "gemma2",
            A.GEMMA2,
            "Gemma2ForCausalLM",
            norm_plus_one=True,
            output="never",
            hf_names=_POST_NORMS,
            hf_config={"hidden_activation": "gelu_pytorch_tanh"},
            fields=_fields(*_SOFTCAP, *_WINDOW),
            refuses=_gemma_attention_scale(46),
            from_gguf=_gemma_query_scale(46),
            derived=_swa_pattern,
        ),
        Architecture(
            "gemma3_text",
            A.GEMMA3,
            "Gemma3ForCausalLM",
            norm_plus_one=True,
            hf_names=_POST_NORMS,
            hf_config={"hidden_activation": "gelu_pytorch_tanh"},
            fields=_fields(*_SOFTCAP[1:], *_WINDOW, (ROPE.FREQ_BASE_SWA, ("rope_local_base_freq",), float)),
            refuses=_gemma_attention_scale(62),
            from_gguf=_gemma_query_scale(62),
            derived=_swa_pattern,
        ),
        Architecture(
            "phi",
            A.PHI2,
            "PhiForCausalLM",
            output="required",
            rope_from_partial=True,
            hf_config={"hidden_act": "gelu_new"},
            hf_names={
                "token_embd": "model.embed_tokens",
                "output_norm": "model.final_layernorm",
                "attn_output": "model.layers.{bid}.self_attn.dense",
                "ffn_up": "model.layers.{bid}.mlp.fc1",
                "ffn_down": "model.layers.{bid}.mlp.fc2",
            },
        ),
        Architecture(
            "phi3",
            A.PHI3,
            "Phi3ForCausalLM",
            rope_from_partial=True,
            hf_config=_SILU,
            hf_names={
                **_LLAMA_NAMES,
                "attn_qkv": "model.layers.{bid}.self_attn.qkv_proj",
                "ffn_up": "model.layers.{bid}.mlp.gate_up_proj",
            },
            fields=_fields(*_WINDOW),
        ),
        Architecture("olmo2", A.OLMO2, "Olmo2ForCausalLM", output="required", hf_names=_POST_NORMS, hf_config=_SILU),
        Architecture(
            "olmo3",
            A.OLMO2,
            "Olmo3ForCausalLM",
            output="required",
            hf_names=_POST_NORMS,
            hf_config=_SILU,
            fields=_fields(*_WINDOW),
            derived=_swa_pattern,
        ),
        Architecture(
            "starcoder2",
            A.STARCODER2,
            "Starcoder2ForCausalLM",
            hf_config={"hidden_act": "gelu_pytorch_tanh"},
            hf_names={**_LLAMA_NAMES, "ffn_up": "model.layers.{bid}.mlp.c_fc", "ffn_down": "model.layers.{bid}.mlp.c_proj"},
        ),
        Architecture(
            "stablelm",
            A.STABLELM,
            "StableLmForCausalLM",
            attention_bias_key="use_qkv_bias",
            output="required",
            rope_from_partial=True,
            hf_names=_LLAMA_NAMES,
            hf_config=_SILU,
            fields=_fields((LLM.USE_PARALLEL_RESIDUAL, ("use_parallel_residual",), bool)),
        ),
        Architecture(
            "cohere",
            A.COMMAND_R,
            "CohereForCausalLM",
            output="never",
            hf_names=_LLAMA_NAMES,
            hf_config=_SILU,
            fields=_fields((LLM.LOGIT_SCALE, ("logit_scale",), float)),
        ),
        Architecture(
            "glm4",
            A.GLM4,
            "Glm4ForCausalLM",
            rope_from_partial=True,
            hf_config=_SILU,
            hf_names={
                **_LLAMA_NAMES,
                "post_attention_norm": "model.layers.{bid}.post_self_attn_layernorm",
                "post_ffw_norm": "model.layers.{bid}.post_mlp_layernorm",
                "ffn_up": "model.layers.{bid}.mlp.gate_up_proj",
            },
        ),
        Architecture(
            "gpt2",
            A.GPT2,
            "GPT2LMHeadModel",
            transposed=(".c_attn.weight", ".c_proj.weight", ".c_fc.weight"),
            config_names=_GPT2_CONFIG,
            hf_config={"activation_function": "gelu_new"},
            hf_names={
                "token_embd": "wte",
                "position_embd": "wpe",
                "output_norm": "ln_f",
                "output": "lm_head",
                "attn_norm": "h.{bid}.ln_1",
                "attn_qkv": "h.{bid}.attn.c_attn",
                "attn_output": "h.{bid}.attn.c_proj",
                "ffn_norm": "h.{bid}.ln_2",
                "ffn_up": "h.{bid}.mlp.c_fc",
                "ffn_down": "h.{bid}.mlp.c_proj",
            },
            derived=_gpt2_derived,
        ),
        Architecture(
            "gpt_neox",
            A.GPTNEOX,
            "GPTNeoXForCausalLM",
            output="required",
            rope_from_partial=True,
            qkv_by_head=True,
            hf_config={"hidden_act": "gelu"},
            fields=_fields((LLM.USE_PARALLEL_RESIDUAL, ("use_parallel_residual",), bool)),
            hf_names={
                "token_embd": "gpt_neox.embed_in",
                "output_norm": "gpt_neox.final_layer_norm",
                "output": "embed_out",
                "attn_norm": "gpt_neox.layers.{bid}.input_layernorm",
                "attn_qkv": "gpt_neox.layers.{bid}.attention.query_key_value",
                "attn_output": "gpt_neox.layers.{bid}.attention.dense",
                "ffn_norm": "gpt_neox.layers.{bid}.post_attention_layernorm",
                "ffn_up": "gpt_neox.layers.{bid}.mlp.dense_h_to_4h",
                "ffn_down": "gpt_neox.layers.{bid}.mlp.dense_4h_to_h",
            },
        ),
        Architecture("seed_oss", A.SEED_OSS, "SeedOssForCausalLM", hf_names=_LLAMA_NAMES, hf_config=_SILU),
        Architecture(
            "exaone",
            A.EXAONE,
            "ExaoneForCausalLM",
            # EXAONE 3's checkpoints keep the remote-code names (mlx-lm reads only those, transformers renames them)
            hf_names=_EXAONE_NAMES,
            hf_config={"activation_function": "silu", "hidden_act": "silu"},
            # the RMSNorm epsilon, under either name; never written as a LayerNorm's
            fields=_fields((ATTN.LAYERNORM_RMS_EPS, ("rms_norm_eps", "layer_norm_epsilon"), float), (ATTN.LAYERNORM_EPS, ())),
        ),
        Architecture(
            "exaone4",
            A.EXAONE4,
            "Exaone4ForCausalLM",
            hf_names={**_LLAMA_NAMES, "post_ffw_norm": "model.layers.{bid}.post_feedforward_layernorm"},
            hf_config=_SILU,
            fields=_fields(*_WINDOW),
            derived=_swa_pattern,
            refuses=_exaone4_window,
            from_gguf=_exaone4_pattern,
        ),
        Architecture(
            "ernie4_5",
            A.ERNIE4_5,
            "Ernie4_5ForCausalLM",
            attention_bias_key="use_bias",
            hf_names=_LLAMA_NAMES,
            hf_config=_SILU,
        ),
        Architecture(
            "hunyuan_v1_dense",
            A.HUNYUAN_DENSE,
            "HunYuanDenseV1ForCausalLM",
            hf_config=_SILU,
            hf_names={
                **_LLAMA_NAMES,
                "attn_q_norm": "model.layers.{bid}.self_attn.query_layernorm",
                "attn_k_norm": "model.layers.{bid}.self_attn.key_layernorm",
            },
        ),
        Architecture(
            "olmoe",
            A.OLMOE,
            "OlmoeForCausalLM",
            output="required",
            config_names={"num_local_experts": "num_experts"},
            hf_names=_LLAMA_NAMES,
            hf_config=_SILU,
            refuses=_olmoe_unsupported,
            from_gguf=lambda config: {"norm_topk_prob": False, "clip_qkv": None},
        ),
    )
}

# the architecture a GGUF file names -> the model_type it is read back as (the first row naming it)
BY_GGUF_NAME: dict[str, Architecture] = {}
for _a in ARCHITECTURES.values():
    BY_GGUF_NAME.setdefault(_a.name, _a)


def for_gguf(name: str, experts: int) -> Architecture | None:
    """The row a GGUF architecture is read back as (llama.cpp's "llama" with experts is Mixtral)."""
    if name == "llama" and experts:
        return ARCHITECTURES["mixtral"]
    return BY_GGUF_NAME.get(name)


def for_config(config: dict) -> Architecture | None:
    return ARCHITECTURES.get(str(config.get("model_type")))


# ---- tensor names -------------------------------------------------------------------------------

_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(.*)$")
_SUFFIXES = (".weight", ".bias")


@dataclass(frozen=True)
class GGUFTensor:
    """Where one Hugging Face tensor goes in a GGUF file."""

    name: str  # the GGUF tensor's name
    kind: T
    expert: int | None = None  # the tensor is this expert's slice of a stacked (experts, rows, cols) tensor
    part: int = 0  # the GGUF tensor is this block of the Hugging Face tensor's rows ...
    parts: int = 1  # ... of this many equal blocks (Architecture.split_rows)


@cache
def _name_map(arch: A, blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch, blocks)


_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_STEM_KINDS = {name.removeprefix("blk.{bid}."): kind for kind, name in gguf.TENSOR_NAMES.items()}


def gguf_tensors(spec: Architecture, hf: str, blocks: int) -> list[GGUFTensor]:
    """The GGUF tensor(s) a Hugging Face tensor becomes: one, one per block of rows that llama.cpp
    keeps apart (`split_rows`), or none if llama.cpp has no place for it."""
    parts = _split(spec, hf)
    if parts:
        return parts
    one = _mapped(spec, hf, blocks)
    return [one] if one else []


def gguf_tensor(spec: Architecture, hf: str, blocks: int) -> GGUFTensor | None:
    """The GGUF tensor a Hugging Face tensor becomes (the first block of its rows when llama.cpp keeps
    them apart), or None if llama.cpp has no place for it."""
    parts = _split(spec, hf)
    return parts[0] if parts else _mapped(spec, hf, blocks)


def _split(spec: Architecture, hf: str) -> list[GGUFTensor]:
    m = _BLOCK.match(hf) if spec.split_rows else None
    stems = spec.split_rows.get(m.group(2)) if m else None
    if not stems:
        return []
    n = len(stems)
    return [GGUFTensor(f"blk.{m.group(1)}.{s}.{m.group(3)}", _STEM_KINDS[s], None, i, n) for i, s in enumerate(stems)]


def _mapped(spec: Architecture, hf: str, blocks: int) -> GGUFTensor | None:
    """The GGUF tensor the `gguf` package's name map gives a Hugging Face tensor."""
    tmap = _name_map(spec.arch, blocks)
    expert = None
    m = _EXPERT.match(hf)
    if m:  # model.layers.3.mlp.experts.7.gate_proj.weight -> model.layers.3.mlp.experts.gate_proj (expert 7)
        hf, expert = f"{m.group(1)}.{m.group(3)}", int(m.group(2))
    found = tmap.get_type_and_name(hf, try_suffixes=_SUFFIXES)
    if found is None:
        return None
    kind, name = found
    if kind not in gguf.MODEL_TENSORS[spec.arch] or kind in (T.ROPE_FREQS, T.ATTN_ROT_EMBD) or not name.endswith(_SUFFIXES):
        return None
    return GGUFTensor(name, kind, expert)


_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_names_for(spec: Architecture, gguf_name: str, blocks: int, experts: int = 0) -> list[str]:
    """The Hugging Face name(s) of a GGUF tensor: one, or one per expert for a stacked tensor; [] if none.

    The `gguf` package lists several Hugging Face names for most tensors (one per family that
    spells it differently); the architecture's own is the one in `spec.hf_names`, else the first
    listed under its checkpoints' prefix.
    """
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return []
    m = _GGUF_BLOCK.match(stem)
    key, bid = (m.group(2), int(m.group(1))) if m else (stem, None)
    template = _hf_template(spec, key, blocks)
    if template is None:
        return []
    name = template.format(bid=bid) + "." + suffix
    if ".experts." in name and experts:
        head, _, tail = name.rpartition(".experts.")
        return [f"{head}.experts.{e}.{tail}" for e in range(experts)]
    return [name]


@cache
def _hf_templates(arch: A, blocks: int) -> dict[str, list[str]]:
    """GGUF stem (blk.N. removed) -> Hugging Face name templates the package maps to it, in its order."""
    out: dict[str, list[str]] = {}
    tmap = _name_map(arch, blocks)
    allowed = gguf.MODEL_TENSORS[arch]
    for kind, names in tmap.mappings_cfg.items():
        if kind in allowed:
            out.setdefault(gguf.TENSOR_NAMES[kind], []).extend(names)
    block_cfg = {**tmap.block_mappings_cfg, **tmap.arch_block_mappings_cfg.get(arch, {})}
    for kind, names in block_cfg.items():
        if kind in allowed:
            stem = gguf.TENSOR_NAMES[kind].removeprefix("blk.{bid}.")
            out.setdefault(stem, []).extend(n for n in names if "{bid}" in n)
    return out


def _hf_template(spec: Architecture, key: str, blocks: int) -> str | None:
    if key in spec.hf_names:
        return spec.hf_names[key]
    candidates = _hf_templates(spec.arch, blocks).get(key, [])
    prefix = "model.layers.{bid}." if "{bid}" in "".join(candidates) else "model."
    for c in candidates:
        if c.startswith(prefix) or c in ("lm_head",):
            return c
    return candidates[0] if candidates else None


# ---- tensor layouts -----------------------------------------------------------------------------


def rope_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp stores Q/K in: GGUF row i is Hugging Face row perm[i].

    Within each head, Hugging Face keeps the two rotary halves apart (first half, second half);
    llama.cpp interleaves them (pairs of adjacent rows), the layout of the original Meta checkpoints.
    """
    head = rows // n_head
    return np.arange(rows).reshape(n_head, 2, head // 2).swapaxes(1, 2).reshape(rows)


@dataclass(frozen=True)
class Layout:
    """How a tensor's Hugging Face values become its GGUF values, and back."""

    rows: np.ndarray | None = None  # GGUF row i is Hugging Face row rows[i]
    add: float = 0.0  # added to every value (Gemma's norms)
    transpose: bool = False  # Hugging Face keeps it (in, out)

    @property
    def identity(self) -> bool:
        return self.rows is None and not self.add and not self.transpose


def part_rows(shape: tuple[int, ...], part: int, parts: int) -> np.ndarray:
    """Rows of a (..., rows, cols) tensor, flattened to 2-D, in block `part` of `parts` equal blocks of
    the rows of each leading index (each expert's)."""
    if len(shape) < 2 or shape[-2] % parts:
        raise ValueError(f"has shape {list(shape)}, whose rows do not split into {parts} equal blocks")
    return np.arange(int(np.prod(shape[:-1]))).reshape(-1, parts, shape[-2] // parts)[:, part].reshape(-1)


def layout(spec: Architecture, hf: str, kind: T, shape: tuple[int, ...], config: dict) -> Layout:
    """The layout change llama.cpp's converter makes to one tensor of this architecture."""
    rows = None
    if spec.permute_qk and kind in (T.ATTN_Q, T.ATTN_K):
        heads = _int(config, "num_attention_heads")
        if kind == T.ATTN_K:
            heads = _int(config, "num_key_value_heads") or heads
        if heads <= 0 or shape[0] % (2 * heads):
            raise ValueError(f"has {shape[0]} rows, which {heads} heads (from the config) cannot split into rotary halves")
        rows = rope_permutation(shape[0], heads)
    if spec.qkv_by_head and kind == T.ATTN_QKV:
        heads = _int(config, "num_attention_heads")
        if heads <= 0 or shape[0] % (3 * heads):
            raise ValueError(f"has {shape[0]} rows, which {heads} heads (from the config) cannot split into Q, K and V")
        per = shape[0] // (3 * heads)
        rows = np.arange(shape[0]).reshape(heads, 3, per).transpose(1, 0, 2).reshape(-1)
    add = 0.0
    if spec.norm_plus_one and hf.endswith("norm.weight"):
        add = 1.0
    transpose = bool(spec.transposed) and hf.endswith(spec.transposed)
    return Layout(rows, add, transpose)


def _int(config: dict, key: str) -> int:
    v = config.get(key)
    return int(v) if v is not None else 0


# ---- metadata -----------------------------------------------------------------------------------


def normalised(config: dict) -> dict:
    """The config with transformers 4's keys, whichever style it was written in (text part only)."""
    config = mlx_lm_config(config)
    text = config.get("text_config")
    return {**config, **mlx_lm_config(text)} if isinstance(text, dict) else config


def head_dim(config: dict) -> int:
    hidden = int(config.get("hidden_size") or config["n_embd"])
    heads = int(config.get("num_attention_heads") or config["n_head"])
    return int(config.get("head_dim") or hidden // heads)


def rope_dimensions(spec: Architecture, config: dict) -> int:
    d = head_dim(config)
    if spec.rope_from_partial:
        factor = config.get("partial_rotary_factor") or config.get("rotary_pct") or 1.0
        return int(d * float(factor))
    return d


def block_count(config: dict) -> int:
    for k in ("num_hidden_layers", "n_layer", "num_layers"):
        if config.get(k) is not None:
            return int(config[k])
    raise KeyError("num_hidden_layers")


ROPE_TYPES = ("linear", "yarn", "llama3")  # the RoPE scalings a GGUF written here carries


def check_config(spec: Architecture, config: dict, out_format: str) -> None:
    """Refuse, before anything is written, what this architecture's GGUF cannot say."""
    _, rope = rope_settings(config)
    why = spec.refuses(config) if spec.refuses else None
    if why:
        raise RecipeError(f"--out-format {out_format}: this {spec.model_type} model cannot be written as GGUF: {why}")
    kind = rope and str(rope.get("rope_type")).lower()
    if kind and kind not in ROPE_TYPES:
        raise RecipeError(
            f"--out-format {out_format}: RoPE scaling {kind!r} (config rope_scaling / rope_parameters) has no "
            f"GGUF form written here; supported: {', '.join(ROPE_TYPES)}"
        )


def metadata(spec: Architecture, config: dict) -> dict[str, Any]:
    """Metadata key (with `{arch}`) -> value, from a normalised config."""
    out: dict[str, Any] = {}
    for f in (*COMMON_FIELDS, *spec.fields):
        value = f.find(config)
        if value is not None:
            out[f.key] = f.kind(value)
        elif not f.config:  # an architecture's field with no config key: the common value is not written
            out.pop(f.key, None)
    if spec.derived:
        out.update(spec.derived(config))
    heads = out[ATTN.HEAD_COUNT]
    out.setdefault(ATTN.HEAD_COUNT_KV, heads)
    theta, rope = rope_settings(config)
    out[ROPE.FREQ_BASE] = float(theta if theta is not None else 10000.0)
    out[ROPE.DIMENSION_COUNT] = rope_dimensions(spec, config)
    kind = rope and str(rope.get("rope_type")).lower()
    if kind == "linear":
        out[ROPE.SCALING_TYPE] = gguf.RopeScalingType.LINEAR.value
        out[ROPE.SCALING_FACTOR] = float(rope["factor"])
    elif kind == "yarn":
        out[ROPE.SCALING_TYPE] = gguf.RopeScalingType.YARN.value
        out[ROPE.SCALING_FACTOR] = float(rope["factor"])
        if rope.get("original_max_position_embeddings"):
            out[ROPE.SCALING_ORIG_CTX_LEN] = int(rope["original_max_position_embeddings"])
        for key, name in ((ROPE.SCALING_YARN_BETA_FAST, "beta_fast"), (ROPE.SCALING_YARN_BETA_SLOW, "beta_slow")):
            if rope.get(name) is not None:
                out[key] = float(rope[name])
    return out
