"""The merge recipe: mergekit's YAML schema as pydantic models, loaded safely, resolved per tensor.

Parameter values follow mergekit exactly: a scalar; a list of numbers (a gradient interpolated
across the layers of a slice); a list of `{filter, value}` (the first whose filter is a substring of
the tensor name wins); and the scopes source > slice > top level, first non-empty value wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, field_validator, model_validator

from .errors import RecipeError

Scalar = Union[bool, int, float, str]


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: Union[Scalar, list[Scalar]]
    filter: Optional[str] = None


Setting = Union[Scalar, list[Scalar], Conditional, list[Conditional]]
Parameters = Optional[dict[str, Setting]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputModel(_Strict):
    model: str
    parameters: Parameters = None


class InputSlice(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters = None


class OutputSlice(_Strict):
    sources: list[InputSlice]
    base_model: Optional[str] = None
    residual_weight: Optional[float] = None
    parameters: Parameters = None

    @field_validator("sources")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("a slice needs at least one source")
        return v


class TokenSource(_Strict):
    # mergekit's per-token embedding sources: a model, a `kind: zero`, or a model + token
    kind: Optional[str] = None
    source: Optional[Any] = None
    force: bool = False


class TokenizerConfig(_Strict):
    source: Union[str, dict, None] = "union"
    tokens: Optional[dict[str, Any]] = None
    pad_to_multiple_of: Optional[int] = None


class Recipe(_Strict):
    merge_method: str
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    base_model: Optional[str] = None
    parameters: Parameters = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerConfig] = None
    chat_template: Optional[str] = None
    name: Optional[str] = None  # mergekit-moe/-evolve share the file format; kept for the model card

    @model_validator(mode="after")
    def _one_of_models_or_slices(self):
        if bool(self.models) == bool(self.slices):
            raise ValueError("exactly one of 'models' or 'slices' must be given (and not empty)")
        if self.tokenizer_source and self.tokenizer:
            raise ValueError("give either 'tokenizer_source' or a 'tokenizer' block, not both")
        return self

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, v):
        if v is not None and v not in DTYPES:
            raise ValueError(f"{v!r} is not a known dtype; valid: {', '.join(DTYPES)}")
        return v

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True, mode="json"), sort_keys=False).rstrip()

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, base first, each once, in order of appearance."""
        seen: list[str] = []
        for m in [self.base_model] + [m.model for m in self.models or []] + [
            s.model for sl in self.slices or [] for s in sl.sources
        ] + [sl.base_model for sl in self.slices or []]:
            if m and m not in seen:
                seen.append(m)
        return seen


DTYPES = ("float32", "float16", "bfloat16", "float64")

MAX_YAML_NODES = 200_000  # after alias expansion; a real recipe has a few hundred


def _count_nodes(node: yaml.Node, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise RecipeError(
            f"recipe expands to more than {MAX_YAML_NODES} YAML nodes (through anchors/aliases); refusing to load it"
        )
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            _count_nodes(child, budget)
    elif isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value != "<<":
                if k.value in seen:  # YAML would keep the last silently
                    raise RecipeError(f"line {k.start_mark.line + 1}: key {k.value!r} appears twice in the same mapping")
                seen.add(k.value)
            _count_nodes(k, budget)
            _count_nodes(v, budget)


MAX_FLOW_DEPTH = 64  # nested [ ] / { }; PyYAML's scanner slows quadratically with depth


def _flow_depth(text: str) -> int:
    depth = deepest = 0
    for c in text:
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth = max(depth - 1, 0)
    return deepest


def parse_yaml(text: str, where: str = "recipe") -> Any:
    """Safe YAML: no Python objects, and no alias bombs (expanded size is bounded before building)."""
    if _flow_depth(text) > MAX_FLOW_DEPTH:
        raise RecipeError(f"{where}: the recipe nests too deeply to be a merge recipe")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            raise RecipeError(f"{where}: the recipe is empty")
        try:
            _count_nodes(node, [MAX_YAML_NODES])
        except RecipeError as e:
            raise RecipeError(f"{where}: {e}") from None
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: not valid YAML ({e})") from None
    except RecursionError:
        raise RecipeError(f"{where}: the recipe nests too deeply to be a merge recipe") from None


def format_location(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_nonempty(), list[InputSlice]]",) or "[" in str(part) or part in (
            "bool", "int", "float", "str", "list[bool]", "Conditional", "list[Conditional]",
            "list[union[bool,int,float,str]]",
        ):
            continue  # pydantic's union-branch labels are noise for a YAML user
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def recipe_from_dict(data: Any, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe must be a mapping with keys such as merge_method, models, base_model")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors()[:8]:
            loc = format_location(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "is not a recipe key mergekit knows (check the spelling)"
            lines.append(f"  {loc}: {msg}")
        raise RecipeError(f"{where}: invalid recipe\n" + "\n".join(dict.fromkeys(lines))) from None


def load_recipe(recipe: Union[str, Path, dict, Recipe]) -> Recipe:
    """A Recipe from a YAML file path, a YAML string, a dict, or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    if isinstance(recipe, Path) or (isinstance(recipe, str) and "\n" not in recipe and recipe.endswith((".yml", ".yaml"))):
        path = Path(recipe)
        try:
            text = path.read_text()
        except OSError as e:
            raise RecipeError(f"{path}: cannot read the recipe ({e.strerror})") from None
        return recipe_from_dict(parse_yaml(text, str(path)), str(path))
    return recipe_from_dict(parse_yaml(str(recipe)))


# ---- per-tensor parameter resolution --------------------------------------------------------


def evaluate_setting(tensor_name: str, setting: Any, t: float, kind: Any) -> Any:
    """One setting's value for a tensor at gradient position t, or None when no filter matches."""
    validate = _adapter(kind).validate_python
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return validate(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            values = [validate(e) for e in setting]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return validate((1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(tensor_name, cond.value, t, kind)
        return None
    raise RecipeError(f"unexpected parameter value {setting!r}")


_ADAPTERS: dict[Any, TypeAdapter] = {}


def _adapter(kind: Any) -> TypeAdapter:
    if kind not in _ADAPTERS:
        _ADAPTERS[kind] = TypeAdapter(kind)
    return _ADAPTERS[kind]


def resolve(
    name: str,
    kind: Any,
    scopes: list[Parameters],
    tensor_name: str,
    t: float,
) -> Any:
    """First non-None value of a parameter over scopes in precedence order; None if none sets it."""
    for scope in scopes:
        if scope and name in scope:
            try:
                value = evaluate_setting(tensor_name, scope[name], t, kind)
            except ValidationError as e:
                got = repr(scope[name])
                got = got if len(got) <= 80 else got[:80] + "..."
                raise RecipeError(f"parameters.{name}: {e.errors()[0]['msg']} (got {got})") from None
            if value is not None:
                return value
    return None
