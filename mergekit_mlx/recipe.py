"""The merge recipe: mergekit's YAML schema as pydantic models, loaded safely, resolved per tensor.

Parameter values follow mergekit exactly: a scalar; a list of numbers (a gradient interpolated
across the layers of a slice); a list of `{filter, value}` (the first whose filter is a substring of
the tensor name wins); and the scopes source > slice > top level, first non-empty value wins.
"""

from __future__ import annotations

import difflib
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from .dtypes import FLOAT_NAMES
from .errors import RecipeError

Scalar = Union[bool, int, float, str]  # noqa: UP007 (runtime aliases that pydantic reads)

PATH_MAX = 4096  # Linux's limits on a path and on one of its parts (macOS: 1024 and 255)
NAME_MAX = 255


def check_model_reference(ref: str) -> str:
    """A model reference as written in a recipe: a path or a Hugging Face id, non-empty and of a
    length a file system can hold (longer ones fail in the OS with ENAMETOOLONG)."""
    if not ref.strip():
        raise ValueError("must name a model (a path or a Hugging Face id), got an empty string")
    if "\x00" in ref:
        raise ValueError("contains a NUL character, which no path can hold")
    longest = max(len(part.encode()) for part in ref.split("/"))
    if len(ref.encode()) > PATH_MAX or longest > NAME_MAX:
        raise ValueError(
            f"is {len(ref)} characters long (longest part {longest}); a path holds at most {PATH_MAX} bytes, "
            f"each part between slashes at most {NAME_MAX}"
        )
    return ref


ModelRef = Annotated[str, AfterValidator(check_model_reference)]
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
MAX_PAD_MULTIPLE = 1024  # vocabularies are padded to multiples such as 8, 64 or 128


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: Scalar | list[Scalar]
    filter: str | None = None


Setting = Union[Scalar, list[Scalar], Conditional, list[Conditional]]  # noqa: UP007
Parameters = Optional[dict[str, Setting]]  # noqa: UP045


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputModel(_Strict):
    model: ModelRef
    parameters: Parameters = None


class InputSlice(_Strict):
    model: ModelRef
    layer_range: tuple[StrictInt, StrictInt]  # strict: `true` is not layer 1
    parameters: Parameters = None


class OutputSlice(_Strict):
    sources: list[InputSlice]
    base_model: ModelRef | None = None
    residual_weight: FiniteFloat | None = None
    parameters: Parameters = None

    @field_validator("sources")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("a slice needs at least one source")
        return v


class TokenSource(_Strict):
    # mergekit's per-token embedding sources: a model, a `kind: zero`, or a model + token
    kind: str | None = None
    source: Any | None = None
    force: bool = False


class TokenizerConfig(_Strict):
    source: str | dict | None = "union"
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: Annotated[StrictInt, Field(ge=1, le=MAX_PAD_MULTIPLE)] | None = None


class Recipe(_Strict):
    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    base_model: ModelRef | None = None
    parameters: Parameters = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: ModelRef | None = None  # 'union', 'base' or a model
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    name: str | None = None  # mergekit-moe/-evolve share the file format; kept for the model card

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
        if v is not None and v not in FLOAT_NAMES:
            raise ValueError(f"{v!r} is not a known dtype; valid: {', '.join(FLOAT_NAMES)}")
        return v

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True, mode="json"), sort_keys=False).rstrip()

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, base first, each once, in order of appearance."""
        seen: list[str] = []
        for m in (
            [self.base_model]
            + [m.model for m in self.models or []]
            + [s.model for sl in self.slices or [] for s in sl.sources]
            + [sl.base_model for sl in self.slices or []]
        ):
            if m and m not in seen:
                seen.append(m)
        return seen


MAX_YAML_NODES = 200_000  # after alias expansion; a real recipe has a few hundred
MAX_RECIPE_BYTES = 16 * 1000**2  # a real recipe is a few KB; evolve's generated ones a few hundred
MAX_INT_DIGITS = 100  # Python refuses to read ints over 4300 digits; no recipe number needs 100
INT_TAG = "tag:yaml.org,2002:int"


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
    elif node.tag == INT_TAG and len(node.value) > MAX_INT_DIGITS:
        raise RecipeError(
            f"line {node.start_mark.line + 1}: an integer of {len(node.value)} digits; numbers in a recipe "
            f"have at most {MAX_INT_DIGITS} digits"
        )


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
    except (ValueError, OverflowError) as e:  # e.g. a timestamp such as 2024-13-45
        raise RecipeError(f"{where}: a value in the recipe cannot be read ({e})") from None
    except RecursionError:
        raise RecipeError(f"{where}: the recipe nests too deeply to be a merge recipe") from None


def format_location(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (
            part in ("function-after[_nonempty(), list[InputSlice]]",)
            or "[" in str(part)
            or part
            in (
                "bool",
                "int",
                "float",
                "str",
                "list[bool]",
                "Conditional",
                "list[Conditional]",
                "list[union[bool,int,float,str]]",
            )
        ):
            continue  # pydantic's union-branch labels are noise for a YAML user
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


SchemaT = TypeVar("SchemaT", bound=BaseModel)


def validated(
    schema: type[SchemaT],
    data: Any,
    where: str,
    *,
    what: str,
    not_mapping: str,
    unknown_key: Callable[[tuple], str] | None = None,
    enum_message: str | None = None,
) -> SchemaT:
    """`schema` validated from a YAML document's `data`, or one RecipeError for the file `where`
    naming the YAML key of each problem (the first 8): every YAML schema of the package (recipes,
    lora-merge, evolve and MoE configurations) reports its problems this way. `unknown_key(loc)`
    words a key the schema does not know; `enum_message` a value outside a choice."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: {not_mapping}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors()[:8]:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = unknown_key(err["loc"]) if unknown_key else "is not a recipe key mergekit knows (check the spelling)"
            elif err["type"] == "enum" and enum_message:
                msg = enum_message
            lines.append(f"  {format_location(err['loc'])}: {msg}")
        raise RecipeError(f"{where}: invalid {what}\n" + "\n".join(dict.fromkeys(lines))) from None


def not_a_key(key: Any, valid: Sequence[str], of: str) -> str:
    """The message for an unknown `key` of `of`, with the closest valid key when one is close."""
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.7)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"not a key of {of}; {hint}(valid here: {', '.join(valid)})"


def recipe_from_dict(data: Any, where: str = "recipe") -> Recipe:
    return validated(
        Recipe,
        data,
        where,
        what="recipe",
        not_mapping="a recipe must be a mapping with keys such as merge_method, models, base_model",
    )


def load_recipe(recipe: str | Path | dict | Recipe) -> Recipe:
    """A Recipe from a YAML file path, a YAML string, a dict, or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    if isinstance(recipe, Path) or (isinstance(recipe, str) and "\n" not in recipe and recipe.endswith((".yml", ".yaml"))):
        where = short_path(recipe)
        return recipe_from_dict(parse_yaml(read_recipe_file(Path(recipe)), where), where)
    return recipe_from_dict(parse_yaml(str(recipe)))


def short_path(path: str | Path, limit: int = 200) -> str:
    """A path for a message: whole when short, else its start and end (a 5000-character path is not
    a useful message)."""
    text = str(path)
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 2 :]} ({len(text)} characters)"


def read_recipe_file(path: Path) -> str:
    """A recipe file's text: a regular file (a FIFO or a device would block or never end) of at most
    MAX_RECIPE_BYTES, in UTF-8."""
    where = short_path(path)
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting for one
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise RecipeError(f"{where}: cannot read the recipe ({e.strerror}); give the path of a YAML file") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise RecipeError(f"{where}: cannot read the recipe ({kind}); give the path of a YAML file")
        if info.st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{where}: the recipe is {info.st_size} bytes; a merge recipe is at most {MAX_RECIPE_BYTES} bytes")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"{where}: cannot read the recipe ({e.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{where}: the recipe is larger than {MAX_RECIPE_BYTES} bytes, the most a merge recipe may be")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecipeError(
            f"{where}: the recipe is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save it as UTF-8"
        ) from None


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
            value = (1 - frac) * values[i0] + frac * values[i1]
            return validate(round(value) if kind is int else value)  # a gradient of counts, rounded
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(tensor_name, cond.value, t, kind)
        return None
    raise RecipeError(f"unexpected parameter value {setting!r}")


def setting_values(setting: Any) -> Iterator[tuple[str, Any]]:
    """Every value a setting holds, with its YAML path below the parameter's key: '' for a scalar,
    '[2]' for a gradient's third point, '[0].value' for a filter's value."""
    if isinstance(setting, Conditional):
        for suffix, v in setting_values(setting.value):
            yield ".value" + suffix, v
    elif isinstance(setting, list):
        for i, element in enumerate(setting):
            for suffix, v in setting_values(element):
                yield f"[{i}]" + suffix, v
    else:
        yield "", setting


def parameter_scopes(recipe: Recipe) -> Iterator[tuple[str, Parameters]]:
    """Every `parameters:` block of a recipe with its YAML path."""
    yield "parameters", recipe.parameters
    for i, m in enumerate(recipe.models or []):
        yield f"models[{i}].parameters", m.parameters
    for i, sl in enumerate(recipe.slices or []):
        yield f"slices[{i}].parameters", sl.parameters
        for j, src in enumerate(sl.sources):
            yield f"slices[{i}].sources[{j}].parameters", src.parameters


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
