"""Building the MoE: the inputs opened and checked, the output's tensors listed, the gates computed,
then the tensors streamed one at a time (through the output lifecycle, or into memory).

Nothing is read before the configuration, every input's headers and the output location are
checked. Expert tensors are read one at a time and written as read: bit for bit the source tensor
(as its reader gives it; a GGUF or MLX-quantized expert dequantized), cast only when `dtype` asks
for another dtype, changed only by the expert's own `noise_scale` (seeded) and `residual_scale`.
Memory stays bounded by one output shard plus, for `hidden` gates, the base as loaded (on the CPU,
its embeddings and one weight at a time, in float32; see gates.py).

Which tensor comes from where (mergekit-moe's rule): attention, norms, embeddings and the head from
the base; each layer's MLP of expert E from expert E's same layer; routers from the gates.
"""

from __future__ import annotations

import hashlib
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import mlx.core as mx

from ..adapters import apply_adapter, read_adapter
from ..chat_template import apply_chat_template, resolve_chat_template
from ..dtypes import is_weight, named, safetensors_code, set_config_dtype, weight_dtype
from ..errors import ModelError, OutputError, RecipeError
from ..formats import DEFAULT_SHARD_BYTES, open_model
from ..formats.base import ModelSource, OutputTensor
from ..formats.files import copy_side_files
from ..formats.safetensors import SafetensorsModel, write_config
from ..mlx_lm_config import mlx_lm_config
from ..options import MergeOptions
from ..output import OutputJob, check_output_location, write_model
from ..plan import human_bytes, resolve_adapter_path, resolve_model_path, split_reference
from .architectures import IGNORED_TENSORS, PROJECTIONS, MoEArchitecture, select_architecture
from .config import CONFIG_FILE, Expert, MoEConfig, load_moe_config
from .gates import compute_gates, degenerate_layers

MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.")
ALL_SAME_FLAG = "--i-understand-this-is-not-useful-without-training"


class Role(Enum):
    COPY = "copy"  # a source tensor, cast/noised/scaled as the expert says
    ZERO_BIAS = "zero bias"  # an attention bias the layout needs and the base lacks
    ROUTER = "router"  # the routed experts' gate vectors of one layer
    SHARED_ROUTER = "shared router"  # the shared expert's gate vector of one layer


@dataclass(frozen=True)
class MoETensor:
    """One output tensor and where it comes from."""

    out: OutputTensor
    role: Role
    model: int = -1  # index into MoEPlan.models (COPY)
    source: str = ""  # the tensor read (COPY)
    layer: int = -1  # ROUTER, SHARED_ROUTER
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass
class MoEPlan:
    config: MoEConfig
    config_text: str  # the configuration as given, kept in the output
    architecture: MoEArchitecture
    models: list[ModelSource]  # each input once: the base first
    refs: list[str]  # the reference each was named by
    base: int
    experts: list[int]  # index into models of each routed expert
    shared: list[int]  # of each shared expert
    tensors: list[MoETensor]
    out_config: dict
    layers: int
    hidden: int
    gate_dtype: mx.Dtype
    tokenizer_dir: Path | None
    gated: list[Expert] = field(default_factory=list)  # the experts with a gate vector: routed, then shared

    @property
    def outputs(self) -> list[OutputTensor]:
        return [t.out for t in self.tensors]

    @property
    def bytes_written(self) -> int:
        return sum(t.out.nbytes for t in self.tensors)

    def input_paths(self) -> list[tuple[str, Path]]:
        return [(ref, p) for ref, m in zip(self.refs, self.models) for p in m.input_paths()]

    def describe(self) -> str:
        c = self.config
        a = self.architecture
        moe_width = self.out_config.get("moe_intermediate_size", self.out_config.get("intermediate_size"))
        lines = [
            f"architecture: {a.name} ({a.class_name}), {self.layers} layers, hidden size {self.hidden}",
            f"experts: {len(self.experts)} routed (MLP width {moe_width}), {c.experts_per_token} per token"
            + (f", {len(self.shared)} shared" if self.shared else ""),
            f"gate_mode: {c.gate_mode.value}",
            *(f"  expert {i}: {self.refs[m]}" for i, m in enumerate(self.experts)),
            *(f"  shared expert: {self.refs[m]}" for m in self.shared),
            f"base (attention, norms, embeddings): {self.refs[self.base]}",
            f"tensors written: {len(self.tensors)}, {human_bytes(self.bytes_written)}",
        ]
        rope = a.rope_warning(self.out_config)
        if rope:
            lines.append(f"warning: {rope}")
        if c.gate_mode.runs_the_base:
            base = self.models[self.base]
            held = human_bytes(sum(base.info(n).nbytes for n in base.tensor_names()))
            lines.append(
                f"hidden states: the base as loaded ({held}) on a GPU; on the CPU its embeddings and one weight at a time"
            )
        return "\n".join(lines)


# ---------------- opening and checking the inputs ----------------


def _identity(paths: list[Path]) -> tuple:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((st.st_dev, st.st_ino))
        except OSError:
            out.append(str(p.resolve()))
    return tuple(out)


def _resolve(ref: str, where: str, config_dir: Path | None) -> list[Path]:
    model, adapter = split_reference(ref, where, config_dir)
    path = resolve_model_path(model, where, config_dir)
    return [path] if adapter is None else [path, resolve_adapter_path(adapter, where, config_dir)]


def _open(paths: list[Path], where: str) -> ModelSource:
    model = open_model(paths[0])
    return model if len(paths) == 1 else apply_adapter(model, read_adapter(paths[1]), where)


def _hidden(model: ModelSource, where: str) -> int:
    h = model.config.get("hidden_size")
    if not isinstance(h, int) or isinstance(h, bool) or h < 1:
        if model.has("model.embed_tokens.weight"):
            return model.info("model.embed_tokens.weight").shape[-1]
        raise ModelError(f"{where} ({model.path}): config.json has no hidden_size")
    return h


def _mlp_width(model: ModelSource, layers: int, hidden: int, where: str) -> int:
    """The MLP width of a dense model, checked in every layer: gate/up (width, hidden), down (hidden, width)."""
    width = None
    for layer in range(layers):
        for p in PROJECTIONS:
            name = f"model.layers.{layer}.mlp.{p}.weight"
            if not model.has(name):
                raise ModelError(
                    f"{where} ({model.path}): has no tensor {name}; an expert must be a dense model with "
                    f"gate_proj/up_proj/down_proj MLPs in each of the base's {layers} layers"
                )
            if model.has(name.replace(".weight", ".bias")):
                raise ModelError(f"{where} ({model.path}): {name} has a bias, which no MoE layout written here holds")
            shape = model.info(name).shape
            w = shape[0] if p != "down_proj" else shape[-1]
            expected = (w, hidden) if p != "down_proj" else (hidden, w)
            if len(shape) != 2 or tuple(shape) != expected or (width is not None and w != width):
                raise ModelError(
                    f"{where} ({model.path}): {name} is {list(shape)}; the base's hidden size is {hidden} and the "
                    f"MLP width {width if width is not None else w} in every layer"
                )
            width = w
    assert width is not None
    return width


def plan_moe(
    config: MoEConfig, config_text: str = "", config_dir: Path | None = None, *, allow_all_same: bool = False
) -> MoEPlan:
    """Open and check every input (headers only) and list the output's tensors; nothing is computed."""
    models: list[ModelSource] = []
    refs: list[str] = []
    index_of: dict[tuple, int] = {}

    def model_index(where: str, ref: str) -> int:
        paths = _resolve(ref, where, config_dir)
        key = _identity(paths)
        if key not in index_of:
            index_of[key] = len(models)
            models.append(_open(paths, where))
            refs.append(ref)
        return index_of[key]

    base = model_index("base_model", config.base_model)
    experts = [model_index(f"experts[{i}].source_model", e.source_model) for i, e in enumerate(config.experts)]
    shared = [model_index(f"shared_experts[{i}].source_model", e.source_model) for i, e in enumerate(config.shared)]
    if len(experts) > 1 and len(set(experts)) == 1 and not allow_all_same:
        raise RecipeError(
            "experts: every expert is the same model, which makes a larger model with the same output; to build it "
            f"anyway (to train it afterwards), pass {ALL_SAME_FLAG} (allow_all_same=True in Python)"
        )
    types = []
    for m, where in [(base, "base_model")] + [(m, "experts") for m in experts + shared]:
        t = models[m].config.get("model_type")
        if not isinstance(t, str):
            raise ModelError(f"{where} ({models[m].path}): config.json has no model_type")
        types.append(t)
    arch = select_architecture(config, types)

    b = models[base]
    layers = b.num_layers
    hidden = _hidden(b, "base_model")
    heads = b.config.get("num_attention_heads")
    if not arch.head_dim_free and isinstance(heads, int) and b.config.get("head_dim") not in (None, hidden // heads):
        raise ModelError(
            f"base_model ({b.path}): head_dim {b.config['head_dim']} is not hidden_size / num_attention_heads "
            f"({hidden // heads}), which {arch.name} assumes (mlx-lm's {arch.model_type} has no head_dim)"
        )
    for m, where in [(m, f"experts[{i}]") for i, m in enumerate(experts)] + [(m, "shared_experts[0]") for m in shared]:
        if models[m].num_layers != layers or _hidden(models[m], where) != hidden:
            raise ModelError(
                f"{where}.source_model ({models[m].path}): {models[m].num_layers} layers of hidden size "
                f"{_hidden(models[m], where)}; the base has {layers} of {hidden}"
            )
    widths = {_mlp_width(models[m], layers, hidden, f"experts[{i}].source_model") for i, m in enumerate(experts)}
    if len(widths) > 1:
        raise ModelError(f"experts: the experts' MLP widths differ ({sorted(widths)}); a MoE layer has one expert width")
    moe_width = widths.pop()
    shared_width = _mlp_width(models[shared[0]], layers, hidden, "shared_experts[0].source_model") if shared else None

    out_dtype = named(config.dtype) if config.dtype else _declared_dtype(b.config)
    embed_code = b.info("model.embed_tokens.weight").dtype if b.has("model.embed_tokens.weight") else "F32"
    # with no dtype named anywhere, the routers keep the dtype mergekit-moe computes them in
    gate_dtype = out_dtype or (mx.bfloat16 if config.gate_mode.runs_the_base else mx.float32)

    def tensor(name: str, shape, dtype_code: str) -> OutputTensor:
        source = weight_dtype(dtype_code) or mx.float32
        return OutputTensor(name, tuple(shape), out_dtype if out_dtype is not None and is_weight(source) else source)

    by_layer: dict[int, list[str]] = {}
    top: list[str] = []
    for name in b.tensor_names():
        if MLP.match(name) or IGNORED_TENSORS.fullmatch(name):
            continue
        if not arch.holds_base_tensor(name):
            raise ModelError(
                f"base_model ({b.path}): tensor {name} has no place in a {arch.name} model; choose another "
                "architecture, or a base without it"
            )
        m = re.match(r"model\.layers\.(\d+)\.", name)
        (by_layer.setdefault(int(m.group(1)), []) if m else top).append(name)
    needed = ["model.embed_tokens.weight", "model.norm.weight"] + [n for i in range(layers) for n in arch.required_base(i)]
    missing = [n for n in needed if not b.has(n)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelError(f"base_model ({b.path}): has no tensor {missing[0]}{more}, which a {arch.name} model needs")

    tensors: list[MoETensor] = []

    def copy(model: int, name: str, out_name: str, expert: Expert | None = None, residual: bool = False) -> None:
        info = models[model].info(name)
        tensors.append(
            MoETensor(
                tensor(out_name, info.shape, info.dtype),
                Role.COPY,
                model=model,
                source=name,
                noise_scale=expert.noise_scale if expert else None,
                residual_scale=expert.residual_scale if expert and residual else None,
            )
        )

    copy(base, "model.embed_tokens.weight", "model.embed_tokens.weight")
    for layer in range(layers):
        names = by_layer.get(layer, [])
        for name in names:
            copy(base, name, name)
        if arch.attention_biases:
            for p in "qkv":
                bias = f"model.layers.{layer}.self_attn.{p}_proj.bias"
                if bias not in names:
                    rows = b.info(bias.replace(".bias", ".weight")).shape[0]
                    code = b.info(bias.replace(".bias", ".weight")).dtype
                    tensors.append(MoETensor(tensor(bias, (rows,), code), Role.ZERO_BIAS))
        tensors.append(MoETensor(OutputTensor(arch.router(layer), (len(experts), hidden), gate_dtype), Role.ROUTER, layer=layer))
        if shared:
            tensors.append(
                MoETensor(OutputTensor(arch.shared_router(layer), (1, hidden), gate_dtype), Role.SHARED_ROUTER, layer=layer)
            )
        for e, (m, expert) in enumerate(zip(experts, config.experts)):
            for p in PROJECTIONS:
                copy(m, f"model.layers.{layer}.mlp.{p}.weight", arch.expert(layer, e, p), expert, residual=p == "down_proj")
        for m, expert in zip(shared, config.shared):
            for p in PROJECTIONS:
                copy(m, f"model.layers.{layer}.mlp.{p}.weight", arch.shared_expert(layer, p), expert, residual=p == "down_proj")
    for name in top:
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            copy(base, name, name)
    # the head: the base's own, or its embedding when the base ties them (written either way)
    copy(base, "lm_head.weight" if "lm_head.weight" in top else "model.embed_tokens.weight", "lm_head.weight")

    out_config = arch.config(b.config, len(experts), config.experts_per_token, moe_width, shared_width)
    out_config["hidden_size"] = hidden
    out_config["num_hidden_layers"] = layers
    set_config_dtype(out_config, out_dtype or weight_dtype(embed_code) or mx.float32)
    tokenizer_dir = b.tokenizer_dir
    if config.tokenizer_source:
        tokenizer_dir = models[model_index("tokenizer_source", config.tokenizer_source)].tokenizer_dir
        if tokenizer_dir is None:
            raise ModelError(f"tokenizer_source ({config.tokenizer_source}): has no tokenizer files")
    resolve_chat_template(config.chat_template, models)  # a bad template stops the build here
    gated = list(config.experts) + list(config.shared)  # a layout with a shared expert gates it (select_architecture)
    return MoEPlan(
        config=config,
        config_text=config_text,
        architecture=arch,
        models=models,
        refs=refs,
        base=base,
        experts=experts,
        shared=shared,
        tensors=tensors,
        out_config=out_config,
        layers=layers,
        hidden=hidden,
        gate_dtype=gate_dtype,
        tokenizer_dir=tokenizer_dir,
        gated=gated,
    )


def _declared_dtype(config: dict) -> mx.Dtype | None:
    """The weights' dtype a config names (transformers 4's torch_dtype or 5's dtype), if any."""
    for key in ("torch_dtype", "dtype"):
        d = named(str(config.get(key, "")))
        if d is not None and is_weight(d):
            return d
    return None


# ---------------- producing the tensors ----------------


def noise_key(seed: int, name: str) -> mx.array:
    """The random key of one tensor's noise: the seed and the output tensor's name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return mx.random.key(int.from_bytes(digest[:8], "little") >> 1)


def produce_tensor(plan: MoEPlan, t: MoETensor, gates: mx.array, seed: int) -> mx.array:
    """One output tensor's value (lazy)."""
    if t.role is Role.ROUTER:
        return gates[t.layer, : len(plan.experts)].astype(t.out.dtype)
    if t.role is Role.SHARED_ROUTER:
        return gates[t.layer, len(plan.experts) :].astype(t.out.dtype)
    if t.role is Role.ZERO_BIAS:
        return mx.zeros(t.out.shape, t.out.dtype)
    x = plan.models[t.model].load(t.source)
    if t.noise_scale is None and t.residual_scale is None:
        return x if x.dtype == t.out.dtype else x.astype(t.out.dtype)
    y = x.astype(mx.float32)
    if t.noise_scale is not None:  # mergekit-moe: noise first, then the residual scale
        y = y + mx.random.normal(y.shape, key=noise_key(seed, t.out.name)) * t.noise_scale
    if t.residual_scale is not None:
        y = y * t.residual_scale
    # rounded to the source's dtype first, as mergekit-moe computes in it, then to the output's
    return y.astype(x.dtype).astype(t.out.dtype)


# ---------------- the result ----------------


@dataclass
class MoEResult:
    plan: MoEPlan
    gates: mx.array | None  # (layers, gated experts, hidden) float32; None after a dry run
    weights: dict[str, mx.array] | None = None  # in memory, when no output path was given
    path: Path | None = None

    @property
    def config(self) -> dict:
        return self.plan.out_config

    @property
    def architecture(self) -> str:
        return self.plan.architecture.name

    def save(self, out_path: str | Path, *, out_shard_size: int = DEFAULT_SHARD_BYTES, force: bool = False) -> Path:
        """Write the in-memory MoE as a model directory, through the output lifecycle."""
        if self.weights is None:
            raise OutputError("this MoE was written to disk already (or was a dry run); copy its directory instead")
        weights = self.weights
        opts = MergeOptions(out_shard_size=out_shard_size, force=force)

        def produce(write: Callable[[str, mx.array], None], wants: Callable[[str], bool]) -> None:
            for t in self.plan.tensors:
                write(t.out.name, weights[t.out.name])

        return write_model(moe_job(self.plan, seed=None), Path(out_path).expanduser(), opts, produce)

    def to_mlx_lm(self):
        """(model, tokenizer) for mlx-lm, built from memory (or loaded from the written directory)."""
        from mlx_lm.utils import _get_classes, load_tokenizer

        from .. import mlx_lm_config as lm

        if self.path is not None:
            return lm.load(self.path)
        if self.weights is None:
            raise OutputError("a dry run has no model")
        config = mlx_lm_config(self.plan.out_config)
        model_class, args_class = _get_classes(config=config)
        model = model_class(args_class.from_dict(config))
        weights = model.sanitize(dict(self.weights)) if hasattr(model, "sanitize") else dict(self.weights)
        model.load_weights(list(weights.items()), strict=True)
        model.eval()
        with tempfile.TemporaryDirectory(prefix="mergekit-mlx-moe-") as tmp:
            write_side_files(self.plan, Path(tmp))
            write_config(Path(tmp), self.plan.out_config)
            tokenizer = load_tokenizer(Path(tmp), eos_token_ids=self.plan.out_config.get("eos_token_id"))
        return model, tokenizer


def write_side_files(plan: MoEPlan, directory: Path) -> None:
    """Tokenizer files (with the configuration's chat template), the configuration and a card."""
    if plan.tokenizer_dir is not None:
        copy_side_files(plan.tokenizer_dir, directory)
    if plan.config.chat_template:
        apply_chat_template(directory, plan.config.chat_template, plan.models)
    (directory / CONFIG_FILE).write_text(plan.config_text)
    (directory / "README.md").write_text(model_card(plan))


def model_card(plan: MoEPlan) -> str:
    experts = "\n".join(f"- {plan.refs[m]}" for m in plan.experts + plan.shared)
    return (
        "---\nlibrary_name: mlx\ntags:\n- mergekit\n- mergekit-mlx\n- moe\n---\n"
        f"# Mixture of experts\n\nThis {plan.architecture.name} model was made with mergekit-mlx moe from "
        f"{plan.refs[plan.base]} (attention, norms, embeddings) and these experts, gates by "
        f"`{plan.config.gate_mode.value}`:\n\n{experts}\n\n"
        f"## Configuration\n\n```yaml\n{plan.config_text.rstrip()}\n```\n"
    )


def verify_written(plan: MoEPlan, directory: Path) -> None:
    """Read back the written headers: every planned tensor, in its shape and dtype."""
    written = SafetensorsModel(directory, plan.out_config)
    for t in plan.outputs:
        info = written.info(t.name) if written.has(t.name) else None
        if info is None or info.shape != tuple(t.shape) or info.dtype != safetensors_code(t.dtype):
            got = "missing" if info is None else f"{list(info.shape)} {info.dtype}"
            raise OutputError(f"verifying {directory} failed: tensor {t.name} should be {list(t.shape)}, found {got}")


def moe_job(plan: MoEPlan, seed: int | None) -> OutputJob:
    inputs = plan.input_paths()
    files = {str(i.file) for m in plan.models for i in map(m.info, m.tensor_names()) if i.file}
    files |= {str(p) for _, p in inputs if Path(p).is_file()}
    return OutputJob(
        tensors=plan.outputs,
        config=plan.out_config,
        inputs=inputs,
        input_files=sorted(files),
        fingerprint={"moe": plan.config_text, "seed": seed},
        side_files=lambda directory: write_side_files(plan, directory),
        verify=lambda directory: verify_written(plan, directory),
    )


def _progress(plan: MoEPlan):
    from tqdm import tqdm

    return tqdm(total=plan.bytes_written, unit="B", unit_scale=True, unit_divisor=1000, desc="moe", dynamic_ncols=True)


def build_moe(
    config: str | Path | dict | MoEConfig,
    out: str | Path | None = None,
    *,
    seed: int = 0,
    allow_all_same: bool = False,
    force: bool = False,
    resume: bool = False,
    out_shard_size: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
    dry_run: bool = False,
) -> MoEResult:
    """Build the MoE a mergekit-moe configuration describes. With `out` it is streamed to disk through
    the output lifecycle; without, kept in memory (`.to_mlx_lm()`, `.save()`). `seed` keys the random
    gate modes and the experts' noise. MLX's default device computes the gates (see device.use_device)."""
    cfg, config_dir, text = load_moe_config(config)
    if out is not None and not dry_run:  # checked before any input is opened
        check_output_location(Path(out).expanduser(), [], force=force, resume=resume)
    plan = plan_moe(cfg, text, config_dir, allow_all_same=allow_all_same)
    if dry_run:
        return MoEResult(plan, None)
    if out is not None:
        check_output_location(Path(out).expanduser(), plan.input_paths(), force=force, resume=resume)
    b = plan.models[plan.base]
    if progress and cfg.gate_mode.reads_prompts:
        prompts = sum(len(e.positive_prompts or []) + len(e.negative_prompts or []) for e in plan.gated)
        print(f"moe: {cfg.gate_mode.value} gates from {prompts} prompts", file=sys.stderr, flush=True)
    gates = compute_gates(cfg.gate_mode, plan.gated, b, b.tokenizer_dir, plan.layers, plan.hidden, seed)
    rope = plan.architecture.rope_warning(plan.out_config)
    if rope:
        print(f"mergekit-mlx moe: warning: {rope}", file=sys.stderr)
    bad = degenerate_layers(gates) if len(plan.gated) > 1 and cfg.gate_mode.reads_prompts else []
    if bad:
        which = "every layer has" if len(bad) == plan.layers else f"layer(s) {', '.join(map(str, bad))}:"
        print(f"mergekit-mlx moe: warning: {which} nearly parallel gate vectors; the prompts may be too similar", file=sys.stderr)

    def produce(write: Callable[[str, mx.array], None], wants: Callable[[str], bool]) -> None:
        bar = _progress(plan) if progress else None
        try:
            for t in plan.tensors:
                if wants(t.out.name):
                    write(t.out.name, produce_tensor(plan, t, gates, seed))
                if bar is not None:
                    bar.update(t.out.nbytes)
        finally:
            if bar is not None:
                bar.close()

    if out is None:
        weights: dict[str, mx.array] = {}
        produce(lambda name, a: (mx.eval(a), weights.__setitem__(name, a)), lambda name: True)
        return MoEResult(plan, gates, weights=weights)
    opts = MergeOptions(out_shard_size=out_shard_size, force=force, resume=resume)
    path = write_model(moe_job(plan, seed), Path(out).expanduser(), opts, produce)
    return MoEResult(plan, gates, path=path)
