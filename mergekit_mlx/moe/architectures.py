"""The MoE layouts written: Mixtral, Qwen2-MoE (one shared expert) and Qwen3-MoE, each as both
mlx-lm 0.32 and transformers (4 and 5) load it, and how one is chosen as mergekit-moe chooses.

Choice (mergekit-moe 0.1.5's rule): the layouts in the order Mixtral, DeepSeek MoE, Qwen MoE, Qwen3
MoE, kept when the name starts with `architecture` (case-insensitive; the model_type or class name
is accepted too), then the first that supports the configuration. DeepSeek MoE is not written (no
transformers class runs it without remote code): where mergekit-moe would choose it (Llama or
Mistral inputs and one shared expert without prompts) the configuration is refused, naming the way
to a Qwen2-MoE.

Where the written layout differs from mergekit-moe 0.1.5's, and why:
- experts are written one tensor per expert under the classic names (`block_sparse_moe.experts.E.w1`,
  `mlp.experts.E.gate_proj`), which mlx-lm reads and transformers 5 converts on load; mergekit-moe
  under transformers 5 writes them fused (`experts.gate_up_proj`), which mlx-lm cannot load.
- `lm_head.weight` is always written (the embedding's copy when the base ties them) and
  `tie_word_embeddings` is false: mlx-lm's qwen2_moe has no tied head, and a tied base otherwise
  loads with a missing or a silently different head.
- Qwen2-MoE's `norm_topk_prob` is false: mlx-lm's qwen2_moe never renormalises the top-k weights, so
  with mergekit-moe's `true` the two libraries compute different models.
- base tensors the layout cannot hold (attention biases of a Mixtral, an MLP bias) are refused, not dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import RecipeError
from ..mlx_lm_config import rope_settings
from .config import MoEConfig

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # a dense MLP's tensors, `model.layers.L.mlp.P.weight`
DROPPED_KEYS = (  # base config keys that do not describe the MoE
    "architectures",
    "model_type",
    "auto_map",
    "quantization",
    "quantization_config",
    "tie_word_embeddings",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "_name_or_path",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
    "mlp_bias",
    "attention_bias",
    "rope_parameters",
)
IGNORED_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")  # a buffer some checkpoints carry; every reader rebuilds it


@dataclass(frozen=True)
class MoEArchitecture:
    name: str  # mergekit-moe's name
    model_type: str
    class_name: str
    input_types: tuple[str, ...]  # base and expert model_types it is built from
    shared_experts: int  # how many shared experts it holds
    moe_block: str  # the MoE block's name in a layer
    expert_names: dict[str, str]  # dense projection -> an expert's tensor name
    attention_biases: bool = False  # q/k/v biases always present (zeros where the base has none)
    extra_base: tuple[str, ...] = ()  # per-layer base tensors beyond attention and norms
    head_dim_free: bool = False  # reads head_dim (else head_dim must be hidden_size / heads)
    extra_config: dict = field(default_factory=dict)

    def router(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.moe_block}.gate.weight"

    def expert(self, layer: int, index: int, projection: str) -> str:
        return f"model.layers.{layer}.{self.moe_block}.experts.{index}.{self.expert_names[projection]}.weight"

    def shared_expert(self, layer: int, projection: str) -> str:
        return f"model.layers.{layer}.mlp.shared_expert.{projection}.weight"

    def shared_router(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.shared_expert_gate.weight"

    def rope_warning(self, base: dict) -> str | None:
        """Why mlx-lm would run this layout built from `base` unlike transformers, if it would: mlx-lm
        0.32's mixtral, qwen2_moe and qwen3_moe apply no RoPE scaling (qwen2_moe refuses all but linear)."""
        _, scaling = rope_settings(base)
        if not scaling:
            return None
        return (
            f"the base scales RoPE ({scaling.get('rope_type')}), which mlx-lm 0.32's {self.model_type} does not: "
            "transformers runs the MoE as the base ran, mlx-lm with unscaled RoPE"
        )

    def required_base(self, layer: int) -> list[str]:
        """The base tensors a layer of this layout cannot do without (biases are made when missing)."""
        parts = ["input_layernorm.weight", "post_attention_layernorm.weight"]
        parts += [f"self_attn.{p}_proj.weight" for p in "qkvo"] + list(self.extra_base)
        return [f"model.layers.{layer}.{part}" for part in parts]

    def holds_base_tensor(self, name: str) -> bool:
        """Whether a (non-MLP) base tensor has a place in this layout."""
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            return True
        m = re.fullmatch(r"model\.layers\.\d+\.(.+)", name)
        if m is None:
            return False
        part = m.group(1)
        allowed = {"input_layernorm.weight", "post_attention_layernorm.weight"}
        allowed |= {f"self_attn.{p}_proj.weight" for p in "qkvo"}
        if self.attention_biases:
            allowed |= {f"self_attn.{p}_proj.bias" for p in "qkv"}
        return part in allowed or part in self.extra_base

    def config(self, base: dict, experts: int, per_token: int, moe_width: int, shared_width: int | None) -> dict:
        """The output's config.json: the base's, less what does not describe the MoE, plus the MoE keys."""
        out = {k: v for k, v in base.items() if k not in DROPPED_KEYS}
        theta, scaling = rope_settings(base)
        out["rope_theta"] = theta if theta is not None else 10000.0  # transformers' default for these bases
        out["rope_scaling"] = scaling
        out.update(architectures=[self.class_name], model_type=self.model_type, tie_word_embeddings=False)
        out["num_experts_per_tok"] = per_token
        if self.model_type == "mixtral":
            out.update(num_local_experts=experts, intermediate_size=moe_width, sliding_window=None)
        else:
            out.update(num_experts=experts, moe_intermediate_size=moe_width, decoder_sparse_step=1, mlp_only_layers=[])
            out.setdefault("intermediate_size", moe_width)
        if shared_width is not None:
            out["shared_expert_intermediate_size"] = shared_width
        if self.head_dim_free:
            out.setdefault("head_dim", base["hidden_size"] // base["num_attention_heads"])
        out.update(self.extra_config)
        return out


MIXTRAL = MoEArchitecture(
    name="Mixtral",
    model_type="mixtral",
    class_name="MixtralForCausalLM",
    input_types=("llama", "mistral"),
    shared_experts=0,
    moe_block="block_sparse_moe",
    expert_names={"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
)
QWEN2_MOE = MoEArchitecture(
    name="Qwen MoE",
    model_type="qwen2_moe",
    class_name="Qwen2MoeForCausalLM",
    input_types=("llama", "mistral", "qwen2"),
    shared_experts=1,
    moe_block="mlp",
    expert_names={p: p for p in PROJECTIONS},
    attention_biases=True,
    extra_config={"norm_topk_prob": False, "use_sliding_window": False, "sliding_window": None, "qkv_bias": True},
)
QWEN3_MOE = MoEArchitecture(
    name="Qwen3 MoE",
    model_type="qwen3_moe",
    class_name="Qwen3MoeForCausalLM",
    input_types=("qwen3",),
    shared_experts=0,
    moe_block="mlp",
    expert_names={p: p for p in PROJECTIONS},
    extra_base=("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
    head_dim_free=True,
    extra_config={"norm_topk_prob": True, "use_sliding_window": False, "sliding_window": None},
)
DEEPSEEK_NAME = "DeepSeek MoE"  # in mergekit-moe's order, never written
ARCHITECTURES = (MIXTRAL, QWEN2_MOE, QWEN3_MOE)
ORDER = ("Mixtral", DEEPSEEK_NAME, "Qwen MoE", "Qwen3 MoE")  # mergekit-moe's candidates, in its order


def _matches(name: str, wanted: str) -> bool:
    w = wanted.lower()
    arch = next((a for a in ARCHITECTURES if a.name == name), None)
    return name.lower().startswith(w) or (arch is not None and w in (arch.model_type, arch.class_name.lower()))


def _why_not(name: str, config: MoEConfig, model_types: list[str]) -> str | None:
    """Why a layout cannot hold this configuration (mergekit-moe's supports_config), or None."""
    shared = config.shared
    same = len(set(model_types)) == 1
    if name == "Mixtral":
        if shared:
            return "Mixtral has no shared experts"
        if not same or model_types[0] not in MIXTRAL.input_types:
            return "Mixtral is built from Llama or Mistral models, all of one type"
    elif name == DEEPSEEK_NAME:
        if len(shared) > 1:
            return "DeepSeek MoE holds at most one shared expert"
        if shared and (shared[0].positive_prompts or shared[0].negative_prompts):
            return "DeepSeek MoE does not gate its shared expert"
        if not same or model_types[0] not in ("llama", "mistral"):
            return "DeepSeek MoE is built from Llama or Mistral models"
    elif name == "Qwen MoE":
        if len(shared) != 1:
            return "Qwen MoE needs exactly one shared expert (shared_experts)"
        if config.gate_mode.reads_prompts and not shared[0].positive_prompts:
            return f"Qwen MoE gates its shared expert, so with gate_mode {config.gate_mode.value} it needs prompts"
        if not same or model_types[0] not in QWEN2_MOE.input_types:
            return "Qwen MoE is built from Qwen2, Llama or Mistral models, all of one type"
    elif name == "Qwen3 MoE":
        if shared:
            return "Qwen3 MoE has no shared experts"
        if not same or model_types[0] not in QWEN3_MOE.input_types:
            return "Qwen3 MoE is built from Qwen3 models"
    return None


def select_architecture(config: MoEConfig, model_types: list[str]) -> MoEArchitecture:
    """The output layout for `config` whose base, experts and shared experts have `model_types`."""
    names = [n for n in ORDER if config.architecture is None or _matches(n, config.architecture)]
    if not names:
        valid = ", ".join(a.name for a in ARCHITECTURES)
        raise RecipeError(f"architecture: {config.architecture!r} names no MoE layout; valid: {valid} (or leave it out)")
    reasons = []
    for name in names:
        why = _why_not(name, config, model_types)
        if why is None:
            if name == DEEPSEEK_NAME:
                raise RecipeError(
                    "shared_experts: with one ungated shared expert over Llama/Mistral models mergekit-moe writes a "
                    "DeepSeek MoE, which transformers runs only with remote code and this tool does not write; give the "
                    "shared expert positive_prompts (or use a random gate_mode) and set architecture: qwen for a Qwen2-MoE"
                )
            return next(a for a in ARCHITECTURES if a.name == name)
        reasons.append(f"{name}: {why}")
    types = ", ".join(sorted(set(model_types)))
    where = "architecture" if config.architecture else "base_model"
    raise RecipeError(f"{where}: no MoE layout fits these models ({types}) and experts: " + "; ".join(reasons))
