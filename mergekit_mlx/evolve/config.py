"""The search configuration: mergekit-evolve's YAML (`genome`, `tasks` and the evaluation keys), as
pydantic models that refuse unknown keys, with mergekit-evolve's defaults.

A task named `example:add` or `example:reverse` is one of the built-in example skills (see
evaluate.py); any other name is an lm-eval-harness task.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from ..evaluate import GENERATORS
from ..recipe import FiniteFloat, ModelRef, not_a_key, parse_yaml, read_recipe_file, short_path, validated


class SearchMethod(str, Enum):
    """The merge methods a genome can search, as in mergekit-evolve."""

    LINEAR = "linear"
    TASK_ARITHMETIC = "task_arithmetic"
    TIES = "ties"
    DARE_TIES = "dare_ties"
    SLERP = "slerp"


# the parameters a genotype sets per model, layer group and filter; the weight (or t) always first
GENE_PARAMETERS: dict[SearchMethod, tuple[str, ...]] = {
    SearchMethod.LINEAR: ("weight",),
    SearchMethod.TASK_ARITHMETIC: ("weight",),
    SearchMethod.TIES: ("weight", "density"),
    SearchMethod.DARE_TIES: ("weight", "density"),
    SearchMethod.SLERP: ("t",),
}
NEEDS_BASE = (SearchMethod.TASK_ARITHMETIC, SearchMethod.TIES, SearchMethod.DARE_TIES)
# mergekit-evolve's default for `normalize: null`: on for these, off for task_arithmetic
NORMALIZED_BY_DEFAULT = (SearchMethod.LINEAR, SearchMethod.TIES, SearchMethod.DARE_TIES)

EXAMPLE_PREFIX = "example:"  # tasks named example:<skill> are the built-in example skills
EXAMPLE_METRIC = "exact_match"
LM_EVAL_METRIC = "acc,none"  # mergekit-evolve's default metric
DEFAULT_EXAMPLE_PROMPTS = 100  # search prompts per example skill when `limit` is not set


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Genome(_Strict):
    """What a candidate may be: the models, the method and how finely parameters vary."""

    models: Annotated[list[ModelRef], Field(min_length=1)]
    merge_method: SearchMethod
    base_model: ModelRef | None = None
    tokenizer_source: str | None = None
    layer_granularity: Annotated[StrictInt, Field(ge=0)] = 0
    normalize: StrictBool | None = None
    allow_negative_weights: StrictBool = False
    filters: list[Annotated[str, Field(min_length=1)]] | None = None
    smooth: StrictBool = False

    @model_validator(mode="after")
    def _fits_the_method(self):
        method = self.merge_method
        if method in NEEDS_BASE and self.base_model is None:
            raise ValueError(f"merge_method {method.value} needs a base_model")
        if method in (SearchMethod.LINEAR, SearchMethod.SLERP) and self.base_model and self.base_model not in self.models:
            raise ValueError(
                f"base_model: {method.value} would take it as an input without parameters; list it in models, or remove base_model"
            )
        if method is SearchMethod.SLERP:
            if len(self.models) < 2:
                raise ValueError("slerp needs at least two models")
            if self.smooth:
                raise ValueError("smooth is not supported with slerp (as in mergekit-evolve)")
            if self.filters:
                raise ValueError("filters are not supported with slerp (as in mergekit-evolve)")
            if self.normalize is not None:
                raise ValueError("normalize: slerp has no normalize parameter; remove it")
        if len(set(self.models)) != len(self.models):
            raise ValueError("models: each model once")
        return self

    @property
    def normalized(self) -> bool | None:
        """The `normalize` the recipes get (None: the method has no such parameter)."""
        if self.merge_method is SearchMethod.SLERP:
            return None
        return self.normalize if self.normalize is not None else self.merge_method in NORMALIZED_BY_DEFAULT


class Task(_Strict):
    """One term of the fitness: weight x the task's metric."""

    name: Annotated[str, Field(min_length=1)]
    weight: FiniteFloat = 1.0
    metric: str | None = None  # default: exact_match for example tasks, mergekit-evolve's acc,none otherwise

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value  # `- my_task`, as mergekit-evolve reads it

    @model_validator(mode="after")
    def _example_metric(self):
        if self.is_example:
            skill = self.name.removeprefix(EXAMPLE_PREFIX)
            if skill not in GENERATORS:
                valid = ", ".join(EXAMPLE_PREFIX + s for s in GENERATORS)
                raise ValueError(f"name: {self.name!r} is not an example skill; valid: {valid}")
            if self.metric not in (None, EXAMPLE_METRIC):
                raise ValueError(f"metric: the example skills have one metric, {EXAMPLE_METRIC}, not {self.metric!r}")
        return self

    @property
    def is_example(self) -> bool:
        return self.name.startswith(EXAMPLE_PREFIX)

    @property
    def skill(self) -> str:
        return self.name.removeprefix(EXAMPLE_PREFIX)

    @property
    def metric_name(self) -> str:
        return self.metric or (EXAMPLE_METRIC if self.is_example else LM_EVAL_METRIC)


class EvolveConfig(_Strict):
    """mergekit-evolve's configuration file."""

    genome: Genome
    tasks: Annotated[list[Task], Field(min_length=1)]
    limit: Annotated[StrictInt, Field(ge=1)] | None = None  # prompts per task (example skills: 100 when unset)
    num_fewshot: Annotated[StrictInt, Field(ge=0)] | None = None
    shuffle: StrictBool = False
    random_init: StrictBool = False
    apply_chat_template: StrictBool = True  # used where the tokenizer has a chat template
    fewshot_as_multiturn: StrictBool = True

    @model_validator(mode="after")
    def _supported(self):
        if self.shuffle:
            raise ValueError("shuffle: true is not supported (mergekit-evolve patches lm-eval for it); remove it")
        names = [t.name for t in self.tasks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"tasks: {repeated[0]!r} is listed twice; give each task once with its weight")
        return self

    @property
    def example_prompts(self) -> int:
        return self.limit or DEFAULT_EXAMPLE_PROMPTS


KEYS = {  # where -> the keys valid there, for did-you-mean
    "": list(EvolveConfig.model_fields),
    "genome": list(Genome.model_fields),
    "tasks": list(Task.model_fields),
}


def config_from_dict(data: Any, where: str = "config") -> EvolveConfig:
    """An EvolveConfig, or a RecipeError naming the YAML key of each problem (unknown keys included)."""
    return validated(
        EvolveConfig,
        data,
        where,
        what="evolve configuration",
        not_mapping="an evolve configuration is a mapping with the keys genome and tasks",
        unknown_key=_unknown_key,
        enum_message=f"not a method mergekit-evolve can search; valid: {', '.join(m.value for m in SearchMethod)}",
    )


def _unknown_key(loc: tuple) -> str:
    part = "tasks" if loc[0] == "tasks" else ("genome" if loc[0] == "genome" and len(loc) == 2 else "")
    return not_a_key(loc[-1], KEYS[part], "mergekit-evolve's configuration")


def load_config(path: str | Path) -> EvolveConfig:
    """An EvolveConfig from a YAML file (read as safely as a recipe: a regular file, bounded, UTF-8)."""
    where = short_path(path)
    return config_from_dict(parse_yaml(read_recipe_file(Path(path)), where), where)
