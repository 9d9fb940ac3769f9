"""The planner: from a recipe and the input headers to an ordered list of per-tensor tasks.

Everything that can be checked without reading tensor data is checked here — paths, methods,
parameters and their ranges, layer ranges, missing tensors, shapes — so a merge fails before its
first tensor is read. The planner knows nothing about the math of a method.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from .adapters import adapter_targets, apply_adapter, read_adapter
from .chat_template import check_chat_templates
from .dtypes import mlx_dtype, named, set_config_dtype, torch_dtype_name
from .errors import ModelError, RecipeError
from .formats import open_model
from .formats.base import ModelSource, OutputTensor, strip_quantization
from .formats.safetensors import plan_shards
from .hub import fetch_adapter, fetch_model, index_only_model, parse_hub_id
from .methods import Method, get_method
from .names import is_before_layers, is_decoder_stack, layer_index, layer_stack, layer_stacks, text_stack, with_layer_index
from .recipe import Parameters, Recipe, parameter_scopes, resolve, setting_values, short_path
from .vocab import is_vocab_tensor, plan_vocab


@dataclass
class Source:
    """One input of a slice: a model, its first layer, its parameters and where they sit in the YAML."""

    model: int  # index into Plan.models
    first_layer: int
    parameters: Parameters
    where: str  # YAML location of this source, e.g. "models[1]" or "slices[0].sources[2]"


@dataclass
class SliceSpec:
    sources: list[Source]
    num_layers: int
    base: int | None  # model index of this slice's base model
    parameters: Parameters
    where: str


@dataclass
class TensorTask:
    out: OutputTensor
    inputs: list[tuple[int, str]]  # (model index, tensor name in that model)
    base: int | None  # position of the base model within `inputs`
    shared: dict[str, Any]
    per_input: list[dict[str, Any]]
    in_bytes: int
    vocab: bool = False  # rows are vocabulary entries (embeddings, lm_head)


@dataclass
class Plan:
    recipe: Recipe
    method: Method
    model_paths: list[str]
    models: list[ModelSource]
    base: int | None
    tasks: list[TensorTask]
    config: dict
    out_dtype: mx.Dtype | None
    out_layers: int
    tokenizer_model: int | None  # the model whose tokenizer is copied (None: a vocabulary plan builds one)
    vocab: Any | None = None  # vocab.VocabPlan when the recipe sets tokenizer_source or tokenizer
    notes: list[str] = field(default_factory=list)

    @property
    def outputs(self) -> list[OutputTensor]:
        return [t.out for t in self.tasks]

    @property
    def bytes_read(self) -> int:
        return sum(t.in_bytes for t in self.tasks)

    @property
    def bytes_written(self) -> int:
        return sum(t.out.nbytes for t in self.tasks)

    def peak_estimate(self, shard_bytes: int, batch_bytes: int) -> int:
        """Bytes held at once: the largest task's inputs + float32 working copies, a batch, a shard."""
        worst = max((t.in_bytes + (len(t.inputs) + 2) * 4 * math.prod(t.out.shape) for t in self.tasks), default=0)
        shard = max((sum(x.nbytes for x in s) for s in plan_shards(self.outputs, shard_bytes)), default=0)
        return worst + min(batch_bytes, self.bytes_written) + shard

    def describe(self, shard_bytes: int, batch_bytes: int) -> str:
        lines = [
            f"merge_method: {self.method.name}",
            "models:",
            *(
                f"  [{i}] {p}{'  (base)' if i == self.base else ''}  {self.models[i].format}, "
                f"{len(self.models[i].tensor_names())} tensors"
                for i, p in enumerate(self.model_paths)
            ),
            f"output: {len(self.tasks)} tensors, {self.out_layers} layers, dtype "
            f"{torch_dtype_name(self.out_dtype) if self.out_dtype else 'as input'}",
            f"bytes read:    {human_bytes(self.bytes_read)}",
            f"bytes written: {human_bytes(self.bytes_written)} in {len(plan_shards(self.outputs, shard_bytes))} shard(s)",
            f"estimated peak memory: {human_bytes(self.peak_estimate(shard_bytes, batch_bytes))}",
            *self.notes,
            "tensors:",
        ]
        for t in self.tasks:
            srcs = ", ".join(f"[{m}]{'' if n == t.out.name else ' ' + n}" for m, n in t.inputs)
            lines.append(f"  {t.out.name} {list(t.out.shape)} <- {srcs}")
        return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def split_reference(ref: str, where: str, recipe_dir: Path | None) -> tuple[str, str | None]:
    """A recipe's model reference as (model, adapter or None): mergekit's `MODEL+ADAPTER`, split at
    its one `+` (mergekit's `ModelReference.parse`: more than one is an error). A local path that
    exists is a model as written, `+` and all (mergekit would split it)."""
    if "+" not in ref or _local_model_path(ref, where, recipe_dir) is not None:
        return ref, None
    parts = ref.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise RecipeError(
            f"{where}: {short_path(ref)!r} is neither a path that exists nor MODEL+ADAPTER (one '+' between a model "
            "and a LoRA adapter, each a path or a Hub id)"
        )
    return parts[0], parts[1]


def resolve_adapter_path(ref: str, where: str, recipe_dir: Path | None) -> Path:
    """The adapter of `MODEL+ADAPTER` as a local directory: a path as written or relative to the
    recipe, else a Hub id whose config and safetensors are fetched (see hub.py)."""
    return _local_or_hub(ref, where, recipe_dir, "adapter", lambda hub_id: fetch_adapter(hub_id, where))


def resolve_model_path(ref: str, where: str, recipe_dir: Path | None, *, weights: bool = True) -> Path:
    """A recipe's model reference as a local path: as written or relative to the recipe (a path that
    exists always wins), else a Hub id `org/name[@revision]` fetched into the Hugging Face cache; with
    weights=False only its config, index and tokenizer files (see hub.py)."""
    return _local_or_hub(ref, where, recipe_dir, "model", lambda hub_id: fetch_model(hub_id, where, weights=weights))


def _local_or_hub(ref: str, where: str, recipe_dir: Path | None, kind: str, fetch: Callable[[Any], Path]) -> Path:
    local = _local_model_path(ref, where, recipe_dir)
    if local is not None:
        return local
    hub_id = parse_hub_id(ref)
    if hub_id is None:
        raise RecipeError(
            f"{where}: {kind} {short_path(ref)!r} not found (no such path, and not a Hub id 'org/name' or 'org/name@revision')"
        )
    return fetch(hub_id)


def _local_model_path(ref: str, where: str, recipe_dir: Path | None) -> Path | None:
    shown = short_path(ref)
    try:
        candidates = [Path(ref).expanduser()]
        if recipe_dir is not None and not Path(ref).is_absolute():
            candidates.append(recipe_dir / ref)
        for c in candidates:
            if c.exists():
                return c
    except OSError as e:  # e.g. ENAMETOOLONG once joined to the recipe's directory
        raise RecipeError(f"{where}: cannot look up model {shown!r} ({e.strerror})") from None
    return None


def _check_before_download(
    recipe: Recipe, refs: list[str], where_of: dict[str, str], recipe_dir: Path | None, allow_crimes: bool
) -> None:
    """With Hub models in the recipe: the config, index and tokenizer files of every one are fetched
    first and the recipe checked against them (layer counts, architectures, layer ranges), so a wrong
    recipe fails before any weight is downloaded."""
    parts = {r: split_reference(r, where_of[r], recipe_dir) for r in refs}

    def on_hub(part: str | None, ref: str) -> bool:
        return part is not None and _local_model_path(part, where_of[ref], recipe_dir) is None and parse_hub_id(part) is not None

    if not any(on_hub(p, r) for r in refs for p in parts[r]):
        return
    sources: list[ModelSource] = []
    first_of: dict[tuple, int] = {}
    index_of: dict[str, int] = {}
    for i, ref in enumerate(refs):
        model, adapter = parts[ref]
        path = resolve_model_path(model, where_of[ref], recipe_dir, weights=False)
        key = _model_identity(path)
        if adapter is not None:  # fetched whole now (it is small), and its tensor names checked
            adapter_path = resolve_adapter_path(adapter, where_of[ref], recipe_dir)
            key = (key, _model_identity(adapter_path))
        if key not in first_of:
            first_of[key] = i
            source = index_only_model(path) if on_hub(model, ref) else open_model(path)
            _check_layer_count(source)
            if adapter is not None and source.tensor_names():  # a Hub model without an index: names unknown yet
                adapter_targets(read_adapter(adapter_path), source.tensor_names(), model, where_of[ref])
        index_of[ref] = first_of[key]
        sources.append(sources[first_of[key]] if first_of[key] != i else source)
    _check_architectures(sources, refs, allow_crimes)
    _slices(recipe, index_of, sources)


def _model_identity(path: Path) -> tuple:
    """What makes two spellings of a model path the same model: the file system object they name
    (`m`, `m/`, `./m`, `/abs/m`, a symlink to m, a differently cased name on macOS)."""
    try:
        st = path.stat()
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def _slices(recipe: Recipe, index_of: dict[str, int], models: list[ModelSource]) -> list[SliceSpec]:
    base = index_of.get(recipe.base_model) if recipe.base_model else None
    if recipe.models:
        _no_repeats([(index_of[m.model], m.model) for m in recipe.models], "models")
        sources = [Source(index_of[m.model], 0, m.parameters, f"models[{i}]") for i, m in enumerate(recipe.models)]
        n = [models[s.model].num_layers for s in sources]
        if base is not None and base not in [s.model for s in sources]:
            sources.append(Source(base, 0, None, "base_model"))
            n.append(models[base].num_layers)
        if len(set(n)) != 1:
            detail = ", ".join(f"{s.where}: {k}" for s, k in zip(sources, n))
            raise ModelError(
                f"models: all models must have the same number of layers to merge whole models ({detail}); "
                "use 'slices' with layer_range to merge parts"
            )
        return [SliceSpec(sources, n[0], base, None, "models")]

    out = []
    for si, sl in enumerate(recipe.slices):
        where = f"slices[{si}]"
        _no_repeats([(index_of[src.model], src.model) for src in sl.sources], f"{where}.sources")
        sources = []
        lengths = []
        for j, src in enumerate(sl.sources):
            swhere = f"{where}.sources[{j}]"
            m = index_of[src.model]
            lo, hi = src.layer_range
            total = models[m].num_layers
            if not 0 <= lo < hi <= total:
                raise RecipeError(
                    f"{swhere}.layer_range: [{lo}, {hi}] does not fit {src.model}, which has {total} layers "
                    f"(valid: 0 <= start < end <= {total})"
                )
            sources.append(Source(m, lo, src.parameters, swhere))
            lengths.append(hi - lo)
        if len(set(lengths)) != 1:
            raise RecipeError(f"{where}.sources: every source of a slice must span the same number of layers, got {lengths}")
        slice_base = index_of[sl.base_model] if sl.base_model else base
        if slice_base is not None and slice_base not in [s.model for s in sources]:
            if sl.base_model or len(sources) > 1 or recipe.merge_method != "passthrough":
                name = sl.base_model or recipe.base_model
                key = f"{where}.base_model" if sl.base_model else "base_model"
                raise RecipeError(f"{key}: {name!r} must also be one of the sources of {where}")
            slice_base = None
        out.append(SliceSpec(sources, lengths[0], slice_base, sl.parameters, where))
    return out


def _no_repeats(models: list[tuple[int, str]], where: str) -> None:
    """Each input of a merge once, however its path is spelled: a repeated model has no
    well-defined weight or base role. (`models` holds (model index, reference as written).)"""
    indices = [i for i, _ in models]
    for j, (i, ref) in enumerate(models):
        if i in indices[:j]:
            k = indices.index(i)
            first = models[k][1]
            same = "" if first == ref else f" ({short_path(first)!r}: the same model under another path)"
            raise RecipeError(f"{where}[{j}].model: {short_path(ref)!r} is already {where}[{k}]{same}; list each model once")


def _resolve_params(
    method: Method,
    recipe: Recipe,
    sl: SliceSpec,
    inputs: list[tuple[int, str]],
    out_name: str,
    t: float,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    shared_scopes = [sl.parameters, recipe.parameters]
    shared: dict[str, Any] = {}
    per_input: list[dict[str, Any]] = [{} for _ in inputs]
    for p in method.params:
        if p.scope == "shared":
            value = resolve(p.name, p.kind, shared_scopes, out_name, t)
            shared[p.name] = _finish(p, value, "parameters", out_name)
            continue
        for i, ((m, in_name), src) in enumerate(zip(inputs, sl.sources)):
            if p.scope == "non_base" and m == sl.base:
                continue
            value = resolve(p.name, p.kind, [src.parameters] + shared_scopes, in_name, t)
            per_input[i][p.name] = _finish(p, value, f"{src.where}.parameters", in_name)
    if method.check is not None:
        base_pos = next((i for i, (m, _) in enumerate(inputs) if m == sl.base), None)
        problem = method.check(shared, per_input, base_pos)
        if problem:
            where, message = problem
            key = "parameters" if where is None else f"{sl.sources[where].where}.parameters"
            raise RecipeError(f"{key}: {message} (for tensor {out_name})")
    return shared, per_input


def _finish(p, value, where: str, tensor: str) -> Any:
    if value is None:
        if p.required:
            raise RecipeError(
                f"{where}.{p.name}: required by this merge method but not set (for tensor {tensor}); "
                f"set it on the model or in the top-level parameters"
            )
        return p.default
    problem = p.problem(value)  # _check_parameter_values saw every value written; this one may be interpolated
    if problem:
        raise RecipeError(f"{where}.{p.name}: {problem} (for tensor {tensor})")
    return value


def _check_parameter_values(recipe: Recipe, method: Method) -> None:
    """Every value the recipe writes for a parameter of this method, checked before any model is
    opened: each point of a gradient and each filter's value, by the parameter's type and range."""
    params = {p.name: p for p in method.params}
    for where, scope in parameter_scopes(recipe):
        for name, setting in (scope or {}).items():
            if name not in params:
                continue
            for suffix, value in setting_values(setting):
                problem = params[name].problem(value)
                if problem:
                    raise RecipeError(f"{where}.{name}{suffix}: {problem}")


def _check_parameter_names(recipe: Recipe, method: Method) -> None:
    """Every parameter the recipe sets must be one this method takes: a name it ignores would be a
    setting silently without effect (a typo, or a parameter of another method left behind)."""
    import difflib

    from .methods import all_methods

    mine = [p.name for p in method.params]
    takes = f"{method.name} takes: {', '.join(mine) or 'no parameters'}"
    for where, params in parameter_scopes(recipe):
        for name in params or {}:
            if name in mine:
                continue
            close = difflib.get_close_matches(name, mine, n=1, cutoff=0.8)
            if close:
                raise RecipeError(f"{where}.{name}: not a parameter of {method.name}; did you mean {close[0]!r}? ({takes})")
            others = sorted(m.name for m in all_methods().values() if any(p.name == name for p in m.params))
            of = f", but of {', '.join(others[:4])}{', ...' if len(others) > 4 else ''}" if others else ""
            raise RecipeError(f"{where}.{name}: not a parameter of {method.name}{of}; remove it ({takes})")


def _check_architectures(models: list[ModelSource], paths: list[str], allow_crimes: bool) -> None:
    kinds = {}
    for m, p in zip(models, paths):
        arch = m.config.get("architectures")
        arch = arch[0] if isinstance(arch, list) and arch else arch or m.config.get("model_type")
        kinds.setdefault(str(arch), []).append(p)
    if len(kinds) > 1 and not allow_crimes:
        detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in kinds.items())
        raise ModelError(f"models have different architectures ({detail}); pass --allow-crimes to merge them anyway")


def make_plan(
    recipe: Recipe,
    *,
    recipe_dir: Path | None = None,
    allow_crimes: bool = False,
    models: dict[str, ModelSource] | None = None,
) -> Plan:
    method = get_method(recipe.merge_method)
    _check_parameter_names(recipe, method)
    _check_parameter_values(recipe, method)
    refs = recipe.referenced_models()
    where_of = _first_locations(recipe)
    if not models:  # Hub models: checked against their configs before the weights are downloaded
        _check_before_download(recipe, refs, where_of, recipe_dir, allow_crimes)
    sources: list[ModelSource] = []
    # every spelling of one model maps to the index of its first: `sources` stays aligned with `refs`
    # (plan_vocab relies on it), and a model opened once is shared
    first_of: dict[tuple, int] = {}
    index_of: dict[str, int] = {}
    bases: dict[tuple, ModelSource] = {}  # models opened, by identity: the base of several adapters once
    for i, ref in enumerate(refs):
        if models and ref in models:
            key: tuple = ("given", id(models[ref]))
            source = models[ref]
        else:
            model, adapter = split_reference(ref, where_of[ref], recipe_dir)
            path = resolve_model_path(model, where_of[ref], recipe_dir)
            key = _model_identity(path)
            adapter_path = None if adapter is None else resolve_adapter_path(adapter, where_of[ref], recipe_dir)
            if adapter_path is not None:
                key = (key, _model_identity(adapter_path))
            if key in first_of:
                source = sources[first_of[key]]
            else:
                source = _open_input(path, adapter_path, where_of[ref], bases)
        if key not in first_of:
            first_of[key] = i
            _check_layer_count(source)
            _check_hidden_size(source)
        index_of[ref] = first_of[key]
        sources.append(source)
    _check_architectures(sources, refs, allow_crimes)
    base = index_of.get(recipe.base_model) if recipe.base_model else None
    if method.base == "required" and base is None and not any(s.base_model for s in recipe.slices or []):
        raise RecipeError(f"base_model: merge_method {method.name!r} needs a base model; add 'base_model: <path>'")

    slices = _slices(recipe, index_of, sources)
    for sl in slices:
        n = len(sl.sources)
        if n < method.min_inputs or (method.max_inputs is not None and n > method.max_inputs):
            most = "" if method.max_inputs is None else f" and at most {method.max_inputs}"
            raise RecipeError(f"{sl.where}: {method.name} needs at least {method.min_inputs}{most} input model(s), got {n}")
        if method.base == "required" and sl.base is None:
            raise RecipeError(f"{sl.where}: merge_method {method.name!r} needs a base model in every slice")

    out_dtype = named(recipe.out_dtype or recipe.dtype or "")
    tasks: list[TensorTask] = []
    out_layer = 0

    def add_task(sl: SliceSpec, out_name: str, in_names: list[str], t: float) -> None:
        inputs = [(s.model, n) for s, n in zip(sl.sources, in_names)]
        shapes = []
        dtype = None
        in_bytes = 0
        for (m, n), s in zip(inputs, sl.sources):
            if not sources[m].has(n):
                raise ModelError(f"{refs[m]} ({s.where}): has no tensor {n!r}, which the merge needs")
            info = sources[m].info(n)
            shapes.append(info.shape)
            in_bytes += info.nbytes
            if dtype is None or (m == sl.base):
                dtype = info.dtype
        vocab = _is_vocab(out_name)
        if len(set(shapes)) != 1 and not vocab:
            detail = ", ".join(f"{refs[m]}: {list(sh)}" for (m, _), sh in zip(inputs, shapes))
            raise ModelError(f"tensor {out_name}: shapes differ between models ({detail})")
        ref = inputs[[m for m, _ in inputs].index(sl.base)] if sl.base in [m for m, _ in inputs] else inputs[0]
        shape = sources[ref[0]].info(ref[1]).shape
        st_dtype = mlx_dtype(dtype)
        is_float = st_dtype is not None and mx.issubdtype(st_dtype, mx.floating)
        odt = out_dtype if (out_dtype is not None and is_float) else st_dtype
        shared, per_input = _resolve_params(method, recipe, sl, inputs, out_name, t)
        base_pos = [m for m, _ in inputs].index(sl.base) if sl.base in [m for m, _ in inputs] else None
        tasks.append(TensorTask(OutputTensor(out_name, tuple(shape), odt), inputs, base_pos, shared, per_input, in_bytes, vocab))

    def reference(sl: SliceSpec) -> int:
        return sl.base if sl.base is not None else sl.sources[0].model

    def decoder(m: int) -> str | None:
        return text_stack(sources[m].tensor_names(), sources[m].num_layers)

    # slices cut the text decoder's stack; the tensors outside it come from the first slice (input
    # embeddings, other stacks such as a vision tower, whole) or from the last (final norm, heads)
    first_ref, first_text = sources[reference(slices[0])], decoder(reference(slices[0]))
    last_ref = sources[reference(slices[-1])]
    pre = [n for n in first_ref.tensor_names() if layer_index(n) is None and is_before_layers(n)]
    post = [n for n in last_ref.tensor_names() if layer_index(n) is None and not is_before_layers(n)]
    other_stacks = {p: k for p, k in layer_stacks(first_ref.tensor_names()).items() if p != first_text}

    for name in pre:
        add_task(slices[0], name, [name] * len(slices[0].sources), 0.0)
    for name in first_ref.tensor_names():
        if layer_stack(name) in other_stacks:  # a gradient runs over the stack's own layers
            k = other_stacks[layer_stack(name)]
            add_task(slices[0], name, [name] * len(slices[0].sources), layer_index(name) / (k - 1) if k > 1 else 1.0)
    taken: list[tuple[int, int]] = []  # (model, layer) of each output layer: the config's lists follow
    for sl in slices:
        ref_model = sources[reference(sl)]
        ref_text = decoder(reference(sl))
        ref_first = next(s.first_layer for s in sl.sources if s.model == reference(sl))
        by_layer: dict[int, list[str]] = {}
        for n in ref_model.tensor_names():
            if layer_stack(n) == ref_text:
                by_layer.setdefault(layer_index(n), []).append(n)
        for j in range(sl.num_layers):
            t = j / (sl.num_layers - 1) if sl.num_layers > 1 else 1.0
            names = by_layer.get(ref_first + j)
            if not names:
                stack = f"in its stack {ref_text!r}" if ref_text else "(no tensor name carries a layer index)"
                raise ModelError(f"{sl.where}: layer {ref_first + j} of {refs[reference(sl)]} has no tensors {stack}")
            taken.append((reference(sl), ref_first + j))
            for n in names:
                add_task(
                    sl,
                    with_layer_index(n, out_layer),
                    [with_layer_index(n, s.first_layer + j) for s in sl.sources],
                    t,
                )
            out_layer += 1
    for name in post:
        add_task(slices[-1], name, [name] * len(slices[-1].sources), 0.0)

    names = [t.out.name for t in tasks]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise RecipeError(f"the recipe produces tensor(s) {dup[:3]} more than once")

    config_source = base if base is not None else reference(slices[0])
    config = strip_quantization(sources[config_source].config)
    _set_layers(config, sources[config_source], [(sources[m].config, i) for m, i in taken])
    if out_dtype is not None:
        set_config_dtype(config, out_dtype)

    vocab = None
    if recipe.tokenizer is not None or recipe.tokenizer_source is not None:
        vocab = plan_vocab(recipe, sources, base)
    if vocab is not None:
        vocab.update_config(config)
        for task in tasks:
            if task.vocab:
                task.out = OutputTensor(task.out.name, (vocab.vocab_size, *task.out.shape[1:]), task.out.dtype)
    tokenizer_model = _tokenizer_model(recipe, index_of, base, reference(slices[0]))
    check_chat_templates(recipe.chat_template, sources, tokenizer_model)  # a bad template stops the run now
    plan = Plan(recipe, method, refs, sources, base, tasks, config, out_dtype, out_layer, tokenizer_model, vocab)
    return plan


def _open_input(path: Path, adapter: Path | None, where: str, bases: dict[tuple, ModelSource]) -> ModelSource:
    """A model, with its adapter applied when it has one. A base is shared by its adapters when its
    reader allows reads from several threads (they are separate inputs, read side by side)."""
    key = _model_identity(path)
    base = bases.get(key)
    if base is None or not base.parallel_reads:
        base = bases[key] = open_model(path)
    return base if adapter is None else apply_adapter(base, read_adapter(adapter), where)


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _check_layer_count(model: ModelSource) -> None:
    """A config that counts fewer layers than the tensors carry would drop the rest silently."""
    where = model.path / "config.json" if model.path.is_dir() else model.path
    text = model.config.get("text_config") if isinstance(model.config.get("text_config"), dict) else {}
    for cfg, prefix in ((model.config, ""), (text, "text_config.")):
        for k in LAYER_COUNT_KEYS:
            v = cfg.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ModelError(f"{short_path(where)}: {prefix}{k} must be a positive whole number of layers, got {v!r:.40}")
    n = model.num_layers
    # per stack (the name up to the index): a vision tower may have more layers than the text config counts
    stacks: dict[str, tuple[int, str]] = {}
    for name in model.tensor_names():
        prefix = layer_stack(name)
        if prefix is not None:
            stacks[prefix] = max(stacks.get(prefix, (-1, "")), (layer_index(name), name))
    if not stacks:
        return
    # the text decoder ("model.layers.", "h.", ...) must fit; another stack may exceed n only beside one that fits
    over = {prefix: top for prefix, top in stacks.items() if top[0] >= n}
    decoder = [top for prefix, top in over.items() if is_decoder_stack(prefix)]
    if not decoder and len(over) < len(stacks):
        return
    highest, name = max(decoder or over.values())
    key = next(
        (
            f"{prefix}{k}"
            for cfg, prefix in ((model.config, ""), (text, "text_config."))
            for k in LAYER_COUNT_KEYS
            if cfg.get(k) == n
        ),
        "its layer count",
    )
    raise ModelError(
        f"{short_path(where)}: {key} is {n}, but tensor {name!r} belongs to layer {highest}; the config must "
        f"count every layer ({key} = {highest + 1} or more), or the layers above {n - 1} would be left out"
    )


def _check_hidden_size(model: ModelSource) -> None:
    """A config whose hidden_size is not its own embedding's width describes another model: refuse
    it rather than write or check against it (Llama-style names only, where the two must agree)."""
    name = "model.embed_tokens.weight"
    hidden = model.config.get("hidden_size")
    if not model.has(name) or not isinstance(hidden, int) or isinstance(hidden, bool):
        return
    if any(k in model.config for k in ("embedding_size", "word_embed_proj_dim", "embed_dim")):
        return  # architectures whose embedding has a width of its own
    shape = model.info(name).shape
    if len(shape) == 2 and shape[1] != hidden:
        where = model.path / "config.json" if model.path.is_dir() else model.path
        raise ModelError(
            f"{short_path(where)}: hidden_size is {hidden}, but the model's {name} is {list(shape)} "
            f"(hidden size {shape[1]}); the config belongs to another model"
        )


# per-layer settings of a config: a list with one entry per layer, under a key that says so or is in
# the table (any list of that length would also take `eos_token_id: [1, 2]` in a two-layer model),
# or a string with one character per layer (Nemotron-H's pattern)
PER_LAYER_KEY = re.compile(r"layer|block|types|pattern")
PER_LAYER_KEYS = ("intermediate_size", "num_kv_heads", "num_query_heads", "ffn_multipliers", "sliding_window")
PER_LAYER_STRINGS = ("hybrid_override_pattern",)
NOT_PER_LAYER = re.compile(r"^(vision|audio|image|video|speech)_|token_id")  # another part's layers, token ids
# lists of layer indices (Qwen-MoE's dense layers, LFM2's attention layers): renumbered, not resized
LAYER_INDEX_KEYS = ("mlp_only_layers", "full_attn_idxs", "attn_layer_indices")


def _set_layers(config: dict, model: ModelSource, taken: list[tuple[dict, int]]) -> None:
    """The output config counts the layers taken ((source config, source layer) per output layer),
    and its per-layer lists hold their entries in output order: at the top level and in text_config,
    wherever the input had them (transformers 4 and 5 styles both stay as they are)."""
    parts = [("", config)]
    if isinstance(config.get("text_config"), dict):
        parts.append(("text_config", config["text_config"]))
    counted = False
    for part, cfg in parts:
        count_key = next((k for k in LAYER_COUNT_KEYS if k in cfg), None)
        old = cfg[count_key] if count_key else model.num_layers
        for key, value in list(cfg.items()):
            if NOT_PER_LAYER.search(key) or not (isinstance(value, list) or key in PER_LAYER_STRINGS):
                continue
            if key in LAYER_INDEX_KEYS and isinstance(value, list):
                cfg[key] = [j for j, (src, i) in enumerate(taken) if i in _entries(src, part, key, value)]
            elif len(value) == old and (PER_LAYER_KEY.search(key) or key in PER_LAYER_KEYS):
                entries = [_entries(src, part, key, value) for src, _ in taken]
                if any(i >= len(e) for e, (_, i) in zip(entries, taken)):
                    where = f"{part}.{key}" if part else key
                    raise ModelError(f"config {where}: has {old} entries, one per layer, but a slice takes a layer past them")
                entries = [e[i] for e, (_, i) in zip(entries, taken)]
                cfg[key] = "".join(entries) if isinstance(value, str) else entries
        if count_key:
            cfg[count_key] = len(taken)
            counted = True
    if not counted:
        config["num_hidden_layers"] = len(taken)


def _entries(source_config: dict, part: str, key: str, fallback: list | str) -> list | str:
    """A per-layer list as the model a layer comes from has it (the output config's own otherwise)."""
    cfg = source_config.get(part) if part else source_config
    value = cfg.get(key) if isinstance(cfg, dict) else None
    return value if isinstance(value, type(fallback)) else fallback


def _tokenizer_model(recipe: Recipe, index_of: dict[str, int], base: int | None, first: int) -> int | None:
    """The model whose tokenizer files are copied as they are; None when a vocabulary plan builds one."""
    src = recipe.tokenizer_source
    if recipe.tokenizer is None and src in (None, "base"):
        return base if base is not None else first
    return index_of.get(src) if isinstance(src, str) else None


def _first_locations(recipe: Recipe) -> dict[str, str]:
    where: dict[str, str] = {}
    if recipe.base_model:
        where.setdefault(recipe.base_model, "base_model")
    for i, m in enumerate(recipe.models or []):
        where.setdefault(m.model, f"models[{i}].model")
    for i, sl in enumerate(recipe.slices or []):
        for j, s in enumerate(sl.sources):
            where.setdefault(s.model, f"slices[{i}].sources[{j}].model")
        if sl.base_model:
            where.setdefault(sl.base_model, f"slices[{i}].base_model")
    return where


def _is_vocab(name: str) -> bool:
    """Tensors whose rows are vocabulary entries: token embeddings and the output head."""
    return is_vocab_tensor(name)
