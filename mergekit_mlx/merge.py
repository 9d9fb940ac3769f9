"""The public API: `merge(recipe)` -> MergeResult (weights in memory, `.save`, `.to_mlx_lm`).

`merge(recipe)` keeps the result in memory (for `to_mlx_lm()` or `save()`); `merge(recipe, out)`
streams it to disk through a temporary sibling directory that is renamed into place only when
everything is written, so an interrupted merge never leaves an output that looks complete.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from . import distributed, kernels, mlx_lm_config
from .device import use_device
from .distributed import World
from .errors import OutputError
from .formats import DEFAULT_SHARD_BYTES
from .formats.base import ModelSource
from .formats.safetensors import write_config
from .options import MergeOptions
from .output import write_output, write_tokenizer
from .pipeline import OnEvent, run_plan
from .plan import Plan, make_plan
from .recipe import Recipe, load_recipe


@dataclass
class MergeResult:
    plan: Plan
    weights: dict[str, mx.array] | None = None  # in memory, when no output path was given
    path: Path | None = None  # the written model, when one was
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> dict:
        return self.plan.config

    def save(self, out_path: str | Path, *, out_shard_size: int = DEFAULT_SHARD_BYTES, force: bool = False) -> Path:
        """Write the in-memory merge as a model directory (the same layout `mergekit-mlx run` writes),
        through the same output checks: `force` replaces only an earlier output of this tool."""
        if self.weights is None:
            raise OutputError("this result was written to disk already; copy its directory instead")
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
            model, tokenizer = mlx_lm_config.load(self.path)  # transformers-5 keys mapped in memory
            if (self.path / "config.json").exists() and "bitnet" in json.dumps(
                json.loads((self.path / "config.json").read_text()).get("quantization_config", {})
            ):
                from .kernels.bitlinear import use_portable_bitlinear

                use_portable_bitlinear(model)  # mlx-lm's own BitLinear runs only on Metal
            return model, tokenizer
        config = dict(self.plan.config)
        model_config = mlx_lm_config.mlx_lm_config(config)  # the keys mlx-lm reads; `config` keeps its style
        model_class, args_class = _get_classes(config=model_config)
        model = model_class(args_class.from_dict(model_config))
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
    recipe: str | Path | dict | Recipe,
    out_path: str | Path | None = None,
    options: MergeOptions | None = None,
    on_event: OnEvent | None = None,
    models: dict[str, ModelSource] | None = None,
    world: World | None = None,
    **kwargs: Any,
) -> MergeResult:
    """Merge as the recipe says. With out_path the model is streamed to disk; else kept in memory.
    `on_event(name, task, seconds)` hears the pipeline's stages (see pipeline.run_plan). `models`
    maps model references of the recipe to inputs opened already (a search reads its inputs once).
    `world` (`distributed.world()` under mlx.launch): the processes that write out_path together,
    each its share of the shards; every one of them calls merge() with the same arguments."""
    opts = options or MergeOptions(**kwargs)
    opts.check()  # the flags named before anything else, the device included
    with use_device(opts.device), kernels.use_kernels(opts.use_kernels):
        return _merge(recipe, out_path, opts.resolved(), on_event, models, world)


def _merge(
    recipe: str | Path | dict | Recipe,
    out_path: str | Path | None,
    opts: MergeOptions,
    on_event: OnEvent | None = None,
    models: dict[str, ModelSource] | None = None,
    world: World | None = None,
) -> MergeResult:
    recipe_dir = Path(recipe).parent if isinstance(recipe, (str, Path)) and str(recipe).endswith((".yml", ".yaml")) else None

    def planned() -> Plan:
        return make_plan(load_recipe(recipe), recipe_dir=recipe_dir, allow_crimes=opts.allow_crimes, models=models)

    if out_path is not None and world is not None and not world.alone:
        plan = distributed.together(world, planned)  # a rank that cannot plan (an input it cannot see) stops all
    else:
        plan = planned()
    if out_path is not None:
        out = Path(out_path)
        path = write_output(plan, out, opts, lambda write, wants: run_plan(plan, opts, write, wants, on_event), world)
        return MergeResult(plan, path=path)
    weights: dict[str, mx.array] = {}
    run_plan(plan, opts, weights.__setitem__, lambda name: True, on_event, to_host=False)  # for mlx-lm on this device
    return MergeResult(plan, weights=weights)
