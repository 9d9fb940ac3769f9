"""LoRA extraction: a fine-tune seen as its base plus, per weight, a low-rank update B·A.

What mergekit-extract-lora (mergekit 0.1.5) does is the specification, module by module:

  linear weights      the task vector dW = FINETUNED - BASE (here in float32) factored as B·A of rank at
                      most R by a truncated SVD: B = U·sqrt(S), A = sqrt(S)·Vh (`distribute_scale`), or
                      B = U, A = S·Vh; `sv_epsilon` > 0 keeps only singular values above it (an absolute
                      threshold, as mergekit's); a module smaller than R keeps its full rank.
  embeddings, heads   saved whole (PEFT `modules_to_save`), unless `embed_lora`: then an input embedding
                      is factored like a linear map (PEFT's lora_embedding_A/B) and a head like a linear.
  other modules       (norms: 1-D; fused 3-D experts) saved whole, unless `skip_undecomposable`.
  `modules_to_save`   named modules (a full name or its last part) saved whole; `include`/`exclude`
                      regexes choose which modules are extracted at all.

Deliberately unlike mergekit: dW is computed in float32 (mergekit subtracts in the models' dtype, so
a bf16 task vector is rounded before its SVD); a module saved whole without being named (an embedding,
a norm) is saved only when it differs from the base, and a linear module whose task vector is zero gets
no factors (either way the adapter computes the same); a changed bias of a factored module is kept as
PEFT's `lora_B.bias` with `lora_bias: true` (mergekit writes the tensor but not the flag, so PEFT drops
it; PEFT applies it, but cannot merge_and_unload it into a target that has no bias of its own).

The truncated SVD (exact, or randomized: the default, as accurate within 1e-3 and faster, measured in
benchmarks/RESULTS.md 11) is `svd.py`'s. One tensor at a time: memory holds one task vector and the
adapter being written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import mlx.core as mx

from .. import dtypes
from ..errors import ModelError, RecipeError, short_repr
from ..formats.base import ModelSource, OutputTensor
from ..names import is_before_layers, is_output_head, layer_index, layer_stack, text_stack
from .svd import SvdSettings, low_rank, relative_error, tensor_seed
from .write import AdapterFormat, AdapterSpec, LoraModule, lora_tensor_names


class ModuleKind(Enum):
    LORA = "lora"  # a linear map factored as B·A
    LORA_EMBEDDING = "lora_embedding"  # an input embedding factored (PEFT's lora_embedding_A/B)
    WHOLE = "whole"  # saved whole from the fine-tune (PEFT modules_to_save)


@dataclass(frozen=True)
class ExtractOptions:
    rank: int
    embed_lora: bool = False
    modules_to_save: tuple[str, ...] = ()
    include: tuple[str, ...] = ()  # regexes: extract only modules matching one
    exclude: tuple[str, ...] = ()  # regexes: never extract modules matching one
    skip_undecomposable: bool = False
    dtype: mx.Dtype | None = None  # of the written tensors; None: the fine-tune's
    svd: SvdSettings = SvdSettings()
    seed: int = 0  # randomized SVD: the sketch of each tensor is keyed by seed and tensor name


# ---------------- which modules, and how ----------------


@dataclass(frozen=True)
class ModuleTask:
    module: str  # "model.layers.0.self_attn.q_proj"
    kind: ModuleKind
    shape: tuple[int, ...]  # of its weight
    tensors: tuple[str, ...]  # WHOLE: every tensor of the module; else its weight
    bias: str | None = None  # LORA: a bias whose task vector is kept (PEFT lora_B.bias)
    rank: int = 0  # LORA*: the largest rank it may get

    @property
    def out_in(self) -> tuple[int, int]:
        """(out, in) of the map factored: an embedding (vocab, dim) is factored as its transpose."""
        return (self.shape[1], self.shape[0]) if self.kind is ModuleKind.LORA_EMBEDDING else (self.shape[0], self.shape[1])


@dataclass(frozen=True)
class ExtractionPlan:
    tasks: tuple[ModuleTask, ...]
    skipped: dict[str, str]  # module -> why it is not in the adapter
    options: ExtractOptions
    spec: AdapterSpec
    outputs: tuple[OutputTensor, ...]  # every tensor the writer gets, factors at their largest rank

    @property
    def lora(self) -> list[ModuleTask]:
        return [t for t in self.tasks if t.kind is not ModuleKind.WHOLE]

    @property
    def whole(self) -> list[ModuleTask]:
        return [t for t in self.tasks if t.kind is ModuleKind.WHOLE]

    def dtype(self, name: str) -> mx.Dtype:
        return next(o.dtype for o in self.outputs if o.name == name)


def plan_extraction(
    ft: ModelSource,
    base: ModelSource,
    opts: ExtractOptions,
    out_format: AdapterFormat,
    *,
    base_model: str,
    ft_label: str = "FINETUNED",
    base_label: str = "BASE",
) -> ExtractionPlan:
    """Which module is factored, saved whole or left out, checked before anything is written: the two
    models must hold the same tensors in the same shapes (a larger vocabulary only in an embedding or
    head saved whole, as mergekit does), and an mlx-lm adapter can hold only factors of decoder layers."""
    check_options(opts)
    names = ft.tensor_names()
    missing = [n for n in names if not base.has(n)]
    extra = [n for n in base.tensor_names() if not ft.has(n)]
    if missing or extra:
        which = f"{ft_label} has {short_repr(missing[:3])} that {base_label} lacks" if missing else ""
        which += ("; " if which else "") + (f"{base_label} has {short_repr(extra[:3])} that {ft_label} lacks" if extra else "")
        raise ModelError(f"the two models hold different tensors ({which}); extract-lora needs a fine-tune of the base")
    modules: dict[str, list[str]] = {}
    for n in names:
        modules.setdefault(n.rsplit(".", 1)[0] if "." in n else n, []).append(n)

    explicit = set(opts.modules_to_save)
    unmatched = [m for m in explicit if not any(mod == m or mod.rsplit(".", 1)[-1] == m for mod in modules)]
    if unmatched:
        raise RecipeError(
            f"--save-module {short_repr(unmatched[0])} names no module of {ft_label} (a full module name or its last part)"
        )
    if explicit and out_format is AdapterFormat.MLX:
        raise RecipeError(
            "--save-module: an mlx-lm adapter (fine_tune_type lora) holds only LoRA factors, no whole modules; "
            "use --out-format peft"
        )

    tasks: list[ModuleTask] = []
    skipped: dict[str, str] = {}
    implicit_whole: list[ModuleTask] = []
    for module, tensors in modules.items():
        weight = module + ".weight"
        if weight not in tensors:
            skipped[module] = "no weight tensor"
            continue
        shape, base_shape = ft.info(weight).shape, base.info(weight).shape
        head_or_embedding = (
            len(shape) == 2 and layer_index(weight) is None and (is_output_head(weight) or is_before_layers(weight))
        )
        for n in tensors:
            if ft.info(n).shape != base.info(n).shape and not (head_or_embedding and n == weight and shape[1:] == base_shape[1:]):
                raise ModelError(
                    f"tensor {n} is {list(ft.info(n).shape)} in {ft_label} but {list(base.info(n).shape)} in {base_label}; "
                    "extract-lora needs a fine-tune of the base (same architecture and sizes)"
                )
        last = module.rsplit(".", 1)[-1]
        whole = ModuleTask(module, ModuleKind.WHOLE, tuple(shape), tuple(tensors))
        if module in explicit or last in explicit:
            tasks.append(whole)
            continue
        excluded = any(re.search(r, module) for r in opts.exclude)
        if head_or_embedding and not excluded and (not opts.embed_lora or shape != base_shape):
            implicit_whole.append(whole)  # mergekit: embeddings go to modules_to_save unless --embed-lora
            continue
        if excluded or (opts.include and not any(re.search(r, module) for r in opts.include)):
            skipped[module] = "excluded by --exclude-regex" if excluded else "not matched by --include-regex"
            continue
        if len(shape) != 2:
            if opts.skip_undecomposable:
                skipped[module] = "not a matrix (--skip-undecomposable)"
            else:
                implicit_whole.append(whole)
            continue
        kind = ModuleKind.LORA_EMBEDDING if is_before_layers(weight) and not is_output_head(weight) else ModuleKind.LORA
        bias = module + ".bias" if module + ".bias" in tensors else None
        others = [n for n in tensors if n not in (weight, bias)]
        if others:
            raise ModelError(f"module {module} holds {short_repr(others[:3])} besides its weight and bias; it cannot be factored")
        tasks.append(ModuleTask(module, kind, tuple(shape), (weight,), bias, rank=min(opts.rank, *shape)))

    # implicit whole modules and biases go into the adapter only when the fine-tune changed them
    for t in implicit_whole:
        if any(not _same(ft, base, n) for n in t.tensors):
            tasks.append(t)
        else:
            skipped[t.module] = "unchanged"
    for i, t in enumerate(tasks):
        if t.bias is not None and _same(ft, base, t.bias):
            tasks[i] = ModuleTask(t.module, t.kind, t.shape, t.tensors, None, t.rank)

    lora = [t for t in tasks if t.kind is not ModuleKind.WHOLE]
    if not tasks:
        raise RecipeError(
            f"nothing to extract: no module of {ft_label} is selected and changed (see --include-regex/--exclude-regex)"
        )
    if lora and opts.rank > max(min(t.shape) for t in lora):
        largest = max(min(t.shape) for t in lora)
        raise RecipeError(
            f"--rank {opts.rank} is larger than any module allows (the largest rank here is {largest}, min(out, in))"
        )

    stack = text_stack(names, base.num_layers)
    spec = AdapterSpec(
        base_model=base_model,
        lora=tuple(LoraModule(t.module, *reversed(t.out_in), embedding=t.kind is ModuleKind.LORA_EMBEDDING) for t in lora),
        whole=_whole_names([t.module for t in tasks if t.kind is ModuleKind.WHOLE], explicit),
        num_layers=base.num_layers,
        decoder_stack=stack,
        lora_bias=any(t.bias is not None for t in lora),
    )
    if out_format is AdapterFormat.MLX:
        _check_mlx(tasks, stack)
    outputs = []
    for t in tasks:
        if t.kind is ModuleKind.WHOLE:
            outputs += [OutputTensor(n, ft.info(n).shape, opts.dtype or _dtype(ft, n)) for n in t.tensors]
            continue
        a, b, bias = lora_tensor_names(t.module)
        rows, cols = t.out_in
        dtype = opts.dtype or _dtype(ft, t.tensors[0])
        outputs += [OutputTensor(a, (t.rank, cols), dtype), OutputTensor(b, (rows, t.rank), dtype)]
        if t.bias is not None:
            outputs.append(OutputTensor(bias, (rows,), opts.dtype or _dtype(ft, t.bias)))
    return ExtractionPlan(tuple(tasks), skipped, opts, spec, tuple(outputs))


def check_options(opts: ExtractOptions) -> None:
    """Refuse options that cannot work, naming the flag (before any model is opened)."""
    if not isinstance(opts.rank, int) or isinstance(opts.rank, bool) or opts.rank < 1:
        raise RecipeError(f"--rank must be a whole number of at least 1, got {short_repr(opts.rank)}")
    svd = opts.svd
    if not (isinstance(svd.sv_epsilon, (int, float)) and math.isfinite(svd.sv_epsilon) and svd.sv_epsilon >= 0):
        raise RecipeError(f"--sv-epsilon must be a finite number >= 0, got {short_repr(svd.sv_epsilon)}")
    if svd.oversample < 0 or svd.power_iterations < 0 or not svd.tolerance >= 0:
        raise RecipeError("--oversample, --power-iterations and --svd-tolerance must be >= 0")
    for flag, patterns in (("--include-regex", opts.include), ("--exclude-regex", opts.exclude)):
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise RecipeError(f"{flag} {short_repr(p)} is not a regular expression ({e})") from None


def _same(ft: ModelSource, base: ModelSource, name: str) -> bool:
    a, b = ft.load(name), base.load(name)
    if a.shape != b.shape:
        return False
    same = mx.array_equal(a.astype(mx.float32), b.astype(mx.float32)).item()
    ft.release()
    base.release()
    return bool(same)


def _dtype(model: ModelSource, name: str) -> mx.Dtype:
    code = model.info(name).dtype
    return dtypes.weight_dtype(code) or mx.float32


def _whole_names(modules: list[str], explicit: set[str]) -> tuple[str, ...]:
    """modules_to_save as mergekit lists them: a name the user gave as given, else the module's last part."""
    out: list[str] = []
    for m in modules:
        last = m.rsplit(".", 1)[-1]
        name = m if m in explicit else last
        if name not in out:
            out.append(name)
    return tuple(out)


def _check_mlx(tasks: list[ModuleTask], stack: str | None) -> None:
    """An mlx-lm adapter holds LoRA factors only: of the decoder layers' modules (named relative to a
    layer) or of top-level ones; no whole tensors, no bias."""
    whole = [t.module for t in tasks if t.kind is ModuleKind.WHOLE]
    if whole:
        raise RecipeError(
            f"an mlx-lm adapter (fine_tune_type lora) cannot hold whole modules, and the fine-tune changed {short_repr(whole[:4])} "
            f"({len(whole)} modules) that mergekit saves whole: use --out-format peft, or --embed-lora (embeddings as factors), "
            "--skip-undecomposable (leave norms out) or --exclude-regex"
        )
    biased = [t.module for t in tasks if t.bias is not None]
    if biased:
        raise RecipeError(
            f"an mlx-lm adapter cannot hold bias changes, and the fine-tune changed the bias of {short_repr(biased[:3])} "
            f"({len(biased)} modules): use --out-format peft, or --exclude-regex to leave these modules out"
        )
    for t in tasks:
        in_stack = layer_stack(t.module + ".weight")
        if in_stack is not None and in_stack != stack:
            raise RecipeError(
                f"module {t.module} is in the stack {in_stack!r}, but mlx-lm applies adapter keys to the decoder layers "
                f"({stack!r}) and to top-level modules only: use --out-format peft, or --exclude-regex"
            )


# ---------------- running a plan ----------------


@dataclass(frozen=True)
class ModuleResult:
    module: str
    kind: ModuleKind
    shape: tuple[int, ...]
    rank: int  # kept (0 for a zero task vector); for WHOLE, 0
    relative_error: float | None  # ||dW - B·A|| / ||dW|| as written; None for WHOLE


def extract(
    plan: ExtractionPlan,
    ft: ModelSource,
    base: ModelSource,
    write: Callable[[str, mx.array], None],
    *,
    done: Callable[[ModuleTask], None] | None = None,
) -> list[ModuleResult]:
    """Compute every module of the plan, one at a time, handing each tensor to `write` (the names
    `write.lora_tensor_names` gives, whole tensors under their own names)."""
    opts = plan.options
    results = []
    for t in plan.tasks:
        if t.kind is ModuleKind.WHOLE:
            for n in t.tensors:
                array = ft.load(n).astype(plan.dtype(n))
                mx.eval(array)
                write(n, array)
            results.append(ModuleResult(t.module, t.kind, t.shape, 0, None))
        else:
            results.append(_extract_one(t, plan, ft, base, write, opts))
        ft.release()
        base.release()
        if done is not None:
            done(t)
    return results


def _extract_one(t: ModuleTask, plan: ExtractionPlan, ft, base, write, opts: ExtractOptions) -> ModuleResult:
    weight = t.tensors[0]
    delta = ft.load(weight).astype(mx.float32) - base.load(weight).astype(mx.float32)
    if t.kind is ModuleKind.LORA_EMBEDDING:
        delta = delta.T  # (dim, vocab): PEFT factors an embedding's transpose
    mx.eval(delta)
    a_name, b_name, bias_name = lora_tensor_names(t.module)
    if not mx.any(delta != 0).item():
        rank, error = 0, 0.0  # unchanged: no factors (the adapter computes the same without them)
    else:
        f = low_rank(delta, t.rank, opts.svd, seed=tensor_seed(opts.seed, weight))
        a, b = f.a.astype(plan.dtype(a_name)), f.b.astype(plan.dtype(b_name))
        mx.eval(a, b)
        rank = a.shape[0]
        error = relative_error(delta, a, b)
        if rank:
            write(a_name, a)
            write(b_name, b)
    if t.bias is not None:
        bias = (ft.load(t.bias).astype(mx.float32) - base.load(t.bias).astype(mx.float32)).astype(plan.dtype(bias_name))
        mx.eval(bias)
        write(bias_name, bias)
    return ModuleResult(t.module, t.kind, t.shape, rank, error)
