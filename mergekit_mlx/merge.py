"""Running a plan: read inputs lazily, merge tensor by tensor, evaluate in batches, stream out.

`merge(recipe)` keeps the result in memory (for `to_mlx_lm()` or `save()`); `merge(recipe, out)`
streams it to disk through a temporary sibling directory that is renamed into place only when
everything is written, so an interrupted merge never leaves an output that looks complete.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import mlx.core as mx

from . import kernels
from .errors import ModelError, OutputError
from .methods import MergeInputs
from .options import MergeOptions
from .output import check_output_location, write_output, write_tokenizer
from .plan import Plan, TensorTask, make_plan
from .recipe import Recipe, load_recipe
from .writer import DEFAULT_SHARD_BYTES, write_config


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

        return write_output(self.plan, Path(out_path), opts, produce)

    def to_mlx_lm(self):
        """(model, tokenizer) for mlx-lm's generate, built from memory without writing the merge."""
        from mlx_lm.utils import _get_classes, load_tokenizer

        if self.path is not None:
            from mlx_lm import load

            model, tokenizer = load(str(self.path))
            if (self.path / "config.json").exists() and "bitnet" in json.dumps(
                json.loads((self.path / "config.json").read_text()).get("quantization_config", {})
            ):
                from .bitnet import use_portable_bitlinear

                use_portable_bitlinear(model)  # mlx-lm's own BitLinear runs only on Metal
            return model, tokenizer
        config = dict(self.plan.config)
        model_class, args_class = _get_classes(config=config)
        model = model_class(args_class.from_dict(config))
        weights = dict(self.weights)
        if hasattr(model, "sanitize"):
            weights = model.sanitize(weights)
        model.load_weights(list(weights.items()), strict=True)
        model.eval()
        with tempfile.TemporaryDirectory(prefix="mergekit-mlx-tok-") as tmp:
            write_tokenizer(self.plan, Path(tmp))
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
        path = write_output(plan, out, opts, lambda write, wants: run_plan(plan, opts, write, wants))
        return MergeResult(plan, path=path)
    weights: dict[str, mx.array] = {}
    run_plan(plan, opts, weights.__setitem__, lambda name: True)
    return MergeResult(plan, weights=weights)


def run_plan(
    plan: Plan,
    opts: MergeOptions,
    write: Callable[[str, mx.array], None],
    wants: Callable[[str], bool],
) -> None:
    """Merge every task, evaluating outputs in batches of about opts.batch_bytes, in plan order."""
    vocab = plan.vocab
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
        out, ok = merge_task(plan, task, opts, vocab)
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


def merge_task(plan: Plan, task: TensorTask, opts: MergeOptions, vocab=None) -> tuple[mx.array, mx.array]:
    """The lazy graph of one output tensor, and of a flag: no NaN/Inf in it (nor in inputs it may drop)."""
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
    out = out.astype(task.out.dtype) if out.dtype != task.out.dtype else out
    # a method that drops elements (top-k, random masks) could hide a NaN input: check its inputs too
    watched = [out] if plan.method.propagates_nonfinite else [out, *tensors]
    flags = [mx.all(mx.isfinite(x)) for x in watched if mx.issubdtype(x.dtype, mx.floating)]
    ok = mx.all(mx.stack(flags)) if flags else mx.array(True)
    return out, ok


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
