"""Running a plan: read inputs lazily, merge tensor by tensor, evaluate in batches, stream out.

`merge(recipe)` keeps the result in memory (for `to_mlx_lm()` or `save()`); `merge(recipe, out)`
streams it to disk through a temporary sibling directory that is renamed into place only when
everything is written, so an interrupted merge never leaves an output that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import mlx.core as mx

from . import kernels
from .errors import ModelError, OutputError
from .methods import MergeInputs
from .plan import Plan, TensorTask, make_plan
from .recipe import Recipe, load_recipe
from .writer import DEFAULT_SHARD_BYTES, copy_tokenizer, make_writer, write_config

DEFAULT_BATCH_BYTES = 512 * 1000**2
STATE_FILE = ".mergekit-mlx-state.json"


@dataclass
class MergeOptions:
    random_seed: int = 0
    out_shard_size: int = DEFAULT_SHARD_BYTES
    batch_bytes: int = DEFAULT_BATCH_BYTES
    device: Optional[str] = None  # "cpu" or "gpu"; None keeps MLX's default
    copy_tokenizer: bool = True
    allow_crimes: bool = False
    allow_nonfinite: bool = False
    use_kernels: bool = True
    out_format: str = "hf"
    group_size: Optional[int] = None
    force: bool = False
    resume: bool = False
    progress: bool = False


@dataclass
class MergeResult:
    plan: Plan
    weights: Optional[dict[str, mx.array]] = None  # in memory, when no output path was given
    path: Optional[Path] = None  # the written model, when one was
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> dict:
        return self.plan.config

    def save(self, out_path: Union[str, Path], *, out_shard_size: int = DEFAULT_SHARD_BYTES, force: bool = False) -> Path:
        """Write the in-memory merge as a model directory (the same layout `mergekit-mlx run` writes)."""
        if self.weights is None:
            raise OutputError("this result was written to disk already; copy its directory instead")
        if Path(out_path).exists() and not force:
            raise OutputError(f"output {out_path} already exists; pass force=True to replace it")
        opts = MergeOptions(out_shard_size=out_shard_size, force=force)
        tasks = self.plan.tasks
        weights = self.weights

        def produce(write: Callable[[str, mx.array], None], wants: Callable[[str], bool]) -> None:
            for t in tasks:
                write(t.out.name, weights[t.out.name])

        return _write_output(self.plan, Path(out_path), opts, produce)

    def to_mlx_lm(self):
        """(model, tokenizer) for mlx-lm's generate, built from memory without writing the merge."""
        from mlx_lm.utils import _get_classes, load_tokenizer

        if self.path is not None:
            from mlx_lm import load

            return load(str(self.path))
        config = dict(self.plan.config)
        model_class, args_class = _get_classes(config=config)
        model = model_class(args_class.from_dict(config))
        weights = dict(self.weights)
        if hasattr(model, "sanitize"):
            weights = model.sanitize(weights)
        model.load_weights(list(weights.items()), strict=True)
        model.eval()
        with tempfile.TemporaryDirectory(prefix="mergekit-mlx-tok-") as tmp:
            _write_tokenizer(self.plan, Path(tmp))
            write_config(Path(tmp), config)
            tokenizer = load_tokenizer(Path(tmp), eos_token_ids=config.get("eos_token_id"))
        return model, tokenizer


def merge(
    recipe: Union[str, Path, dict, Recipe],
    out_path: Union[str, Path, None] = None,
    options: Optional[MergeOptions] = None,
    **kwargs: Any,
) -> MergeResult:
    """Merge as the recipe says. With out_path the model is streamed to disk; else kept in memory."""
    opts = options or MergeOptions(**kwargs)
    recipe_dir = Path(recipe).parent if isinstance(recipe, (str, Path)) and str(recipe).endswith((".yml", ".yaml")) else None
    r = load_recipe(recipe)
    if opts.device:
        mx.set_default_device(mx.gpu if opts.device == "gpu" else mx.cpu)
    kernels.set_kernels_enabled(opts.use_kernels)
    plan = make_plan(r, recipe_dir=recipe_dir, allow_crimes=opts.allow_crimes)
    if out_path is not None:
        out = Path(out_path)
        check_output_location(out, plan, opts)
        path = _write_output(plan, out, opts, lambda write, wants: run_plan(plan, opts, write, wants))
        return MergeResult(plan, path=path)
    weights: dict[str, mx.array] = {}
    run_plan(plan, opts, weights.__setitem__, lambda name: True)
    return MergeResult(plan, weights=weights)


def check_output_location(out: Path, plan: Plan, opts: MergeOptions) -> None:
    """Refuse an output that is an input or inside one, and an existing one without --force."""
    target = out.resolve()
    for ref, m in zip(plan.model_paths, plan.models):
        src = m.path.resolve()
        src_dir = src if src.is_dir() else src.parent
        if target == src_dir or src_dir in target.parents or (src.is_file() and target == src):
            raise OutputError(f"output {out} is (inside) the input model {ref}; choose another output directory")
    if out.exists() and not (opts.force or opts.resume):
        raise OutputError(f"output {out} already exists; pass --force to replace it")


def _partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def recipe_fingerprint(plan: Plan, opts: MergeOptions) -> str:
    text = json.dumps(
        {
            "recipe": plan.recipe.model_dump(mode="json"),
            "seed": opts.random_seed,
            "shard": opts.out_shard_size,
            "format": opts.out_format,
            "group_size": opts.group_size,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _write_output(
    plan: Plan,
    out: Path,
    opts: MergeOptions,
    produce: Callable[[Callable[[str, mx.array], None], Callable[[str], bool]], None],
) -> Path:
    """Fill a temporary sibling of `out` through the format's writer, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_dir(out)
    fingerprint = recipe_fingerprint(plan, opts)
    state_path = tmp / STATE_FILE
    done: dict[str, str] = {}
    if opts.resume and state_path.exists():
        try:
            state = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError):
            state = {}
        if state.get("fingerprint") == fingerprint:
            done = {f: h for f, h in state.get("shards", {}).items() if (tmp / f).exists() and _sha256(tmp / f) == h}
    if not done and tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    for stale in tmp.glob("incomplete-*"):
        stale.unlink()

    writer = make_writer(
        opts.out_format,
        tmp,
        plan.outputs,
        plan.config,
        max_shard_bytes=opts.out_shard_size,
        tokenizer_dir=_tokenizer_source_dir(plan),
        skip_shards=set(done) if opts.out_format == "hf" else None,
        group_size=opts.group_size,
    )
    wants = getattr(writer, "wants", lambda name: True)
    written = getattr(writer, "written", None)

    def save_state() -> None:
        if written is not None:
            for f in written:
                if f not in done:
                    done[f] = _sha256(tmp / f)
        state_path.write_text(json.dumps({"fingerprint": fingerprint, "shards": done}))

    save_state()

    def write(name: str, array: mx.array) -> None:
        before = len(written) if written is not None else 0
        writer.add(name, array)
        if written is not None and len(written) != before:
            save_state()

    try:
        produce(write, wants)
        writer.finish()
        if opts.copy_tokenizer and opts.out_format in ("hf", "mlx-q4", "mlx-q8", "mlx-mxfp4", "bitnet"):
            _write_tokenizer(plan, tmp)
        (tmp / "README.md").write_text(model_card(plan))
        state_path.unlink()
    except OSError as e:
        if e.errno == 28:  # ENOSPC
            shutil.rmtree(tmp, ignore_errors=True)
            need = plan.bytes_written
            raise OutputError(
                f"no space left on the device while writing {out}; this merge needs about "
                f"{need / 1e9:.2f} GB of free space (the partial output was removed)"
            ) from None
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)
    return out


def _tokenizer_source_dir(plan: Plan) -> Optional[Path]:
    if plan.tokenizer_model is None:
        return None
    return plan.models[plan.tokenizer_model].tokenizer_dir


def _write_tokenizer(plan: Plan, out_dir: Path) -> None:
    r = plan.recipe
    if r.tokenizer is not None or r.tokenizer_source == "union":
        from . import tokenizer

        vocab = tokenizer.plan_vocab(r, plan.models, plan.base)
        if vocab is not None:
            vocab.save(out_dir)
    else:
        src = _tokenizer_source_dir(plan)
        if src is not None:
            copy_tokenizer(src, out_dir)
    if r.chat_template:
        from . import tokenizer

        tokenizer.apply_chat_template(out_dir, r.chat_template, plan.models)


def model_card(plan: Plan) -> str:
    models = "\n".join(f"- {p}" for p in plan.model_paths)
    return (
        "---\nlibrary_name: mlx\ntags:\n- mergekit\n- mergekit-mlx\n- merge\n---\n"
        f"# Merged model\n\nThis model was made with mergekit-mlx using the **{plan.method.name}** merge method.\n\n"
        f"## Models merged\n\n{models}\n\n"
        f"## Configuration\n\nThe recipe that produced it:\n\n```yaml\n{plan.recipe.to_yaml()}\n```\n"
    )


def run_plan(
    plan: Plan,
    opts: MergeOptions,
    write: Callable[[str, mx.array], None],
    wants: Callable[[str], bool],
) -> None:
    """Merge every task, evaluating outputs in batches of about opts.batch_bytes, in plan order."""
    vocab = None
    r = plan.recipe
    if r.tokenizer is not None or r.tokenizer_source == "union":
        from . import tokenizer

        vocab = tokenizer.plan_vocab(r, plan.models, plan.base)
    bar = _progress(plan, opts)
    batch: list[tuple[TensorTask, mx.array, mx.array]] = []
    batch_bytes = 0

    def flush() -> None:
        nonlocal batch, batch_bytes
        if not batch:
            return
        mx.eval(*[x for _, out, ok in batch for x in (out, ok)])
        for task, out, ok in batch:
            if not ok.item():
                _report_nonfinite(plan, task, opts)
            write(task.out.name, out)
            if bar is not None:
                bar.update(task.out.nbytes)
        batch, batch_bytes = [], 0

    for task in plan.tasks:
        if not wants(task.out.name):
            if bar is not None:
                bar.update(task.out.nbytes)
            continue
        out = merge_task(plan, task, opts, vocab)
        ok = mx.all(mx.isfinite(out)) if mx.issubdtype(out.dtype, mx.floating) else mx.array(True)
        batch.append((task, out, ok))
        batch_bytes += task.out.nbytes + task.in_bytes
        if batch_bytes >= opts.batch_bytes:
            flush()
    flush()
    if bar is not None:
        bar.close()
    for m in plan.models:
        if hasattr(m, "release"):
            m.release()


def merge_task(plan: Plan, task: TensorTask, opts: MergeOptions, vocab=None) -> mx.array:
    """The lazy graph of one output tensor."""
    tensors = [plan.models[m].load(n) for m, n in task.inputs]
    ids = [m for m, _ in task.inputs]
    if task.vocab:
        if vocab is not None:
            tensors = vocab.align(task.out.name, tensors, ids)
        elif len({t.shape for t in tensors}) > 1:
            from . import tokenizer

            tensors = tokenizer.rectify_embeddings(task.out.name, tensors, task.base)
    inputs = MergeInputs(
        tensors=tensors,
        base=task.base,
        shared=task.shared,
        per_input=task.per_input,
        name=task.out.name,
        seed=opts.random_seed,
        input_ids=ids,
    )
    out = plan.method.merge(inputs)
    if tuple(out.shape) != task.out.shape:
        task.out = type(task.out)(task.out.name, tuple(out.shape), task.out.dtype)
    return out.astype(task.out.dtype) if out.dtype != task.out.dtype else out


def _report_nonfinite(plan: Plan, task: TensorTask, opts: MergeOptions) -> None:
    bad_inputs = [
        f"{plan.model_paths[m]} ({n})"
        for m, n in task.inputs
        if mx.issubdtype(plan.models[m].load(n).dtype, mx.floating)
        and not mx.all(mx.isfinite(plan.models[m].load(n))).item()
    ]
    if bad_inputs and opts.allow_nonfinite:
        return
    if bad_inputs:
        raise ModelError(
            f"tensor {task.out.name}: NaN or Inf in the input {', '.join(bad_inputs)}; "
            "the merge stopped (pass --allow-nonfinite to merge anyway)"
        )
    raise ModelError(
        f"tensor {task.out.name}: the merge produced NaN or Inf although no input has any; "
        "check the recipe's weights (e.g. a normalisation dividing by a sum near zero)"
    )


def _progress(plan: Plan, opts: MergeOptions):
    if not opts.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=plan.bytes_written, unit="B", unit_scale=True, unit_divisor=1000, desc="merging", dynamic_ncols=True)
