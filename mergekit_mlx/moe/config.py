"""The MoE configuration: mergekit-moe's YAML (`base_model`, `experts`, `gate_mode`, ...) as pydantic
models that refuse unknown keys, with mergekit-moe 0.1.5's defaults and checks.

Two keys mergekit-moe does not have, both optional: `tokenizer_source` (the model whose tokenizer
files the output gets; mergekit-moe always takes the base's) and `chat_template` (as in a merge
recipe: a built-in name, "auto" or a Jinja template). Where a check differs from mergekit-moe's it
is because mergekit-moe's is wrong for the mode: prompts are not required for `uniform_random`
gates, which never read them.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from ..dtypes import FLOAT_NAMES
from ..recipe import FiniteFloat, ModelRef, not_a_key, parse_yaml, read_recipe_file, short_path, validated

CONFIG_FILE = "mergekit_moe_config.yml"  # the configuration as given, kept in the output (as mergekit-moe)


class GateMode(str, Enum):
    """How the router weights are made (mergekit-moe's `gate_mode`)."""

    HIDDEN = "hidden"  # the base's hidden states at the prompts' last tokens, per layer
    HIDDEN_LAST = "hidden_last"  # the same (mergekit-moe accepts both names)
    HIDDEN_AVG = "hidden_avg"  # the base's hidden states averaged over each prompt's tokens, per layer
    CHEAP_EMBED = "cheap_embed"  # the prompts' token embeddings, the same for every layer
    RANDOM = "random"  # standard normal
    UNIFORM_RANDOM = "uniform_random"  # uniform in +-1/sqrt(hidden size), torch.nn.Linear's initialisation

    @property
    def reads_prompts(self) -> bool:
        return self is not GateMode.RANDOM and self is not GateMode.UNIFORM_RANDOM

    @property
    def runs_the_base(self) -> bool:
        return self in (GateMode.HIDDEN, GateMode.HIDDEN_LAST, GateMode.HIDDEN_AVG)


Prompt = Annotated[str, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expert(_Strict):
    """One dense model whose MLPs become an expert of every layer."""

    source_model: ModelRef
    positive_prompts: list[Prompt] | None = None
    negative_prompts: list[Prompt] | None = None
    noise_scale: FiniteFloat | None = None  # Gaussian noise of this standard deviation added to the expert's MLP
    residual_scale: FiniteFloat | None = None  # the expert's down_proj multiplied by this

    def prompts_key(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(self.positive_prompts or ()), tuple(self.negative_prompts or ())


class MoEConfig(_Strict):
    """mergekit-moe's configuration file."""

    base_model: ModelRef
    experts: Annotated[list[Expert], Field(min_length=1)]
    gate_mode: GateMode = GateMode.HIDDEN
    dtype: str | None = None
    experts_per_token: StrictInt = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None
    tokenizer_source: ModelRef | None = None  # default: the base model's tokenizer
    chat_template: str | None = None

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v):
        if v is not None and v not in FLOAT_NAMES:
            raise ValueError(f"{v!r} is not a known dtype; valid: {', '.join(FLOAT_NAMES)}")
        return v

    @model_validator(mode="after")
    def _as_mergekit_moe_checks(self):
        if self.experts_per_token < 1:
            raise ValueError("experts_per_token: must be at least 1")
        if len(self.experts) < self.experts_per_token:
            raise ValueError(
                f"experts_per_token: {self.experts_per_token} but only {len(self.experts)} expert(s); "
                "list at least as many experts as experts_per_token"
            )
        if self.gate_mode.reads_prompts:
            for i, e in enumerate(self.experts):
                if not e.positive_prompts:
                    raise ValueError(
                        f"experts[{i}].positive_prompts: gate_mode {self.gate_mode.value} needs example prompts for every "
                        "expert (or use gate_mode random / uniform_random)"
                    )
            if len(self.experts) > 1 and len({e.prompts_key() for e in self.experts}) == 1:
                raise ValueError(
                    "experts: the positive and negative prompts are the same for every expert, so every router would "
                    "prefer no expert; give each expert prompts of what should be routed to it"
                )
        shared = self.shared_experts or []
        if shared and len({bool(e.positive_prompts) for e in shared}) > 1:
            raise ValueError("shared_experts: give prompts to every shared expert or to none")
        return self

    @property
    def shared(self) -> list[Expert]:
        return list(self.shared_experts or [])

    def referenced_models(self) -> list[tuple[str, str]]:
        """(YAML location, reference) of every model the configuration names, base first."""
        refs = [("base_model", self.base_model)]
        refs += [(f"experts[{i}].source_model", e.source_model) for i, e in enumerate(self.experts)]
        refs += [(f"shared_experts[{i}].source_model", e.source_model) for i, e in enumerate(self.shared)]
        if self.tokenizer_source:
            refs.append(("tokenizer_source", self.tokenizer_source))
        return refs


KEYS = {  # where -> the keys valid there, for did-you-mean
    "": list(MoEConfig.model_fields),
    "experts": list(Expert.model_fields),
}


def config_from_dict(data: Any, where: str = "config") -> MoEConfig:
    """A MoEConfig, or a RecipeError naming the YAML key of each problem (unknown keys included)."""
    return validated(
        MoEConfig,
        data,
        where,
        what="mergekit-moe configuration",
        not_mapping="a mergekit-moe configuration is a mapping with the keys base_model and experts",
        unknown_key=lambda loc: not_a_key(loc[-1], KEYS["experts" if len(loc) > 1 else ""], "mergekit-moe's configuration"),
        enum_message=f"not a gate mode of mergekit-moe; valid: {', '.join(m.value for m in GateMode)}",
    )


def load_moe_config(config: str | Path | dict | MoEConfig) -> tuple[MoEConfig, Path | None, str]:
    """(config, the directory relative model paths may be resolved against, the YAML text kept in the
    output) from a YAML file path, a YAML string, a dict or a MoEConfig."""
    if isinstance(config, MoEConfig):
        return config, None, _to_yaml(config)
    if isinstance(config, dict):
        parsed = config_from_dict(config)
        return parsed, None, _to_yaml(parsed)
    if isinstance(config, Path) or (isinstance(config, str) and "\n" not in config and config.endswith((".yml", ".yaml"))):
        path = Path(config)
        where = short_path(path)
        text = read_recipe_file(path)
        return config_from_dict(parse_yaml(text, where), where), path.parent, text
    text = str(config)
    return config_from_dict(parse_yaml(text, "config")), None, text


def _to_yaml(config: MoEConfig) -> str:
    import yaml

    return yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)
