"""`mergekit-mlx lora-merge RECIPE OUT`: several LoRA adapters of one base merged into one adapter.

The recipe (YAML; unknown keys refused):

    merge_method: ties        # linear | cat | svd | ties | ties_svd | dare_linear | dare_ties |
                              # dare_linear_svd | dare_ties_svd | magnitude_prune | magnitude_prune_svd
    adapters:
      - {adapter: path/or/hub-id, weight: 1.0}
      - {adapter: ..., weight: 0.5}
    density: 0.5              # the pruning methods: the fraction kept, in (0, 1]
    rank: 16                  # the *svd methods: the rank written (default: the inputs' largest)
    svd_clamp: 0.99           # the *svd methods: clip the factors to this quantile (PEFT's svd_clamp)
    majority_sign_method: total   # ties methods: total | frequency
    seed: 0                   # the DARE methods' random masks
    base_model: path/or/hub-id    # the adapters' base; needed for --out-format mlx
    out_format: peft          # peft | mlx (--out-format overrides)

The merge is PEFT's `add_weighted_adapter` (`adapters/combine.py` says what each method computes);
the adapters are PEFT or mlx-lm LoRA adapters, in any mix. OUT is written through the output
lifecycle every command shares (checks first, `.OUT.partial`, manifest, atomic rename, `--force`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from .adapters import Adapter, read_adapter
from .adapters.combine import (
    COMBINATIONS,
    CombinePlan,
    CombineSettings,
    MajoritySign,
    Space,
    combine_module,
    load_arrays,
    plan_combination,
)
from .adapters.write import AdapterFormat, AdapterSpec, AdapterWriter, lora_tensor_names
from .arguments import Parser, add_common_arguments, add_force_argument
from .device import use_device
from .errors import ModelError, RecipeError
from .formats import open_model
from .formats.files import read_json
from .names import text_stack
from .options import MergeOptions
from .output import OutputJob, check_output_location, write_model
from .plan import human_bytes, resolve_adapter_path, resolve_model_path
from .recipe import not_a_key, parse_yaml, read_recipe_file, short_path, validated

HELP = "merge several LoRA adapters of one base into one adapter (PEFT's add_weighted_adapter)"


class AdapterEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str
    weight: float = 1.0


class LoraMergeRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: str
    adapters: list[AdapterEntry] = Field(min_length=1)
    density: float | None = Field(None, gt=0, le=1)
    rank: StrictInt | None = Field(None, ge=1)
    svd_clamp: float | None = Field(None, ge=0, le=1)
    svd_full_matrices: StrictBool = True  # PEFT's: how U is computed, not what is kept (accepted, no effect)
    majority_sign_method: MajoritySign = MajoritySign.TOTAL
    seed: StrictInt = 0
    base_model: str | None = None
    out_format: AdapterFormat = AdapterFormat.PEFT

    @model_validator(mode="after")
    def _fits_the_method(self):
        c = COMBINATIONS.get(self.merge_method)
        if c is None:
            close = difflib.get_close_matches(self.merge_method, list(COMBINATIONS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"merge_method {self.merge_method!r} is not one lora-merge knows; {hint}valid: {', '.join(COMBINATIONS)}"
            )
        if c.uses_density and self.density is None:
            raise ValueError(f"{self.merge_method} prunes: give density, the fraction of each tensor kept, in (0, 1]")
        if not c.uses_density and self.density is not None:
            raise ValueError(f"density is only read by the pruning methods, not by {self.merge_method}")
        if c.space is not Space.DELTA and (self.rank is not None or self.svd_clamp is not None):
            raise ValueError(f"rank and svd_clamp are only read by the *svd methods, not by {self.merge_method}")
        return self


KEYS = {"": list(LoraMergeRecipe.model_fields), "adapters": list(AdapterEntry.model_fields)}


def recipe_from_dict(data: Any, where: str = "recipe") -> LoraMergeRecipe:
    """A LoraMergeRecipe, or a RecipeError naming the YAML key of each problem."""
    return validated(
        LoraMergeRecipe,
        data,
        where,
        what="lora-merge recipe",
        not_mapping="a lora-merge recipe is a mapping with the keys merge_method and adapters",
        unknown_key=lambda loc: not_a_key(loc[-1], KEYS["adapters" if loc[0] == "adapters" else ""], "a lora-merge recipe"),
    )


def load_recipe(recipe: str | Path | dict) -> tuple[LoraMergeRecipe, Path | None]:
    """The recipe and the directory its relative paths are read from."""
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe), None
    where = short_path(recipe)
    return recipe_from_dict(parse_yaml(read_recipe_file(Path(recipe)), where), where), Path(recipe).parent


@dataclass(frozen=True)
class LoraMerge:
    path: Path | None  # None after a dry run
    plan: CombinePlan
    out_format: AdapterFormat


def lora_merge(
    recipe: str | Path | dict,
    out: str | Path | None,
    out_format: AdapterFormat | None = None,
    *,
    force: bool = False,
    progress: bool = False,
    dry_run: bool = False,
) -> LoraMerge:
    """Merge the recipe's adapters into the adapter directory `out` (nothing is written with dry_run)."""
    r, recipe_dir = load_recipe(recipe)
    fmt = out_format or r.out_format
    where = [f"adapters[{i}].adapter" for i in range(len(r.adapters))]
    paths = [resolve_adapter_path(e.adapter, w, recipe_dir) for e, w in zip(r.adapters, where)]
    adapters = [read_adapter(p) for p in paths]
    base = _base_model(r, adapters, where)
    settings = CombineSettings(
        method=r.merge_method,
        weights=tuple(e.weight for e in r.adapters),
        density=r.density if r.density is not None else 1.0,
        rank=r.rank,
        svd_clamp=r.svd_clamp,
        majority_sign=r.majority_sign_method,
        seed=r.seed,
    )
    plan = plan_combination(adapters, settings, where)
    inputs = [(e.adapter, p) for e, p in zip(r.adapters, paths)]
    num_layers, stack = 0, None
    if fmt is AdapterFormat.MLX or r.base_model is not None:
        num_layers, stack = _check_base(plan, base, recipe_dir, inputs)
    spec = AdapterSpec(
        base_model=base or "", lora=tuple(m.lora_module for m in plan.modules), num_layers=num_layers, decoder_stack=stack
    )
    if dry_run:
        return LoraMerge(None, plan, fmt)
    if out is None:
        raise RecipeError("lora-merge needs OUT, the adapter directory to write; or pass --dry-run")
    out = Path(out).expanduser()
    check_output_location(out, inputs, force=force)

    job = OutputJob(
        tensors=plan.outputs,
        config={},
        inputs=inputs,
        input_files=sorted(str(a.weights_file) for a in adapters) + sorted(str(a.config_file) for a in adapters),
        fingerprint={"lora-merge": [str(p) for p in paths], "settings": repr(settings), "format": fmt.value},
        side_files=lambda d: (d / "lora_merge.json").write_text(json.dumps(_report(r, plan, fmt), indent=1) + "\n"),
        writer=lambda d: AdapterWriter(d, spec, fmt),
    )

    def produce(write: Callable[[str, mx.array], None], wants: Callable[[str], bool]) -> None:
        arrays = [load_arrays(a) for a in adapters]
        bar = _progress(len(plan.modules)) if progress else None
        try:
            for m in plan.modules:
                a, b = combine_module(m, plan, arrays)
                a_name, b_name, _ = lora_tensor_names(m.module)
                write(a_name, a.astype(plan.dtype))
                write(b_name, b.astype(plan.dtype))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    path = write_model(job, out, MergeOptions(force=force), produce)
    return LoraMerge(path, plan, fmt)


def _base_model(r: LoraMergeRecipe, adapters: list[Adapter], where: list[str]) -> str | None:
    """The recipe's base_model, else the one base every adapter names; adapters naming different bases
    are refused (name base_model to merge them anyway, their shapes are still checked)."""
    if r.base_model is not None:
        return r.base_model
    named = {}
    for a, w in zip(adapters, where):
        config = read_json(a.path, "adapter_config.json", "adapter config")
        base = config.get("base_model_name_or_path") or config.get("model")
        if isinstance(base, str) and base:
            named[w] = base
    if len(set(named.values())) > 1:
        listed = "; ".join(f"{w}: {b}" for w, b in named.items())
        raise ModelError(
            f"the adapters name different base models ({listed}); lora-merge merges adapters of one base. If they are "
            "the same model under two names, set base_model in the recipe"
        )
    return next(iter(named.values()), None)


def _check_base(plan: CombinePlan, base: str | None, recipe_dir: Path | None, inputs: list) -> tuple[int, str | None]:
    """Every module has the base's shape; the base's layer count and decoder stack (mlx-lm's keys)."""
    if base is None:
        raise RecipeError(
            "base_model: the adapters name no base model; an mlx-lm adapter is written for a base's layers, so set base_model"
        )
    path = resolve_model_path(base, "base_model", recipe_dir)
    inputs.append((base, path))
    model = open_model(path)
    names = set(model.tensor_names())
    for m in plan.modules:
        name = m.module + ".weight"
        want = (m.in_features, m.out_features) if m.embedding else (m.out_features, m.in_features)
        if name not in names:
            raise ModelError(f"base_model {base}: has no tensor {name}, which the adapters change; not their base")
        shape = tuple(model.info(name).shape)
        if shape not in (want, want[::-1]):
            raise ModelError(
                f"base_model {base}: {name} is {list(shape)}, the adapters change it as {list(want)}; not their base"
            )
    return model.num_layers, text_stack(model.tensor_names(), model.num_layers)


def _report(r: LoraMergeRecipe, plan: CombinePlan, fmt: AdapterFormat) -> dict:
    return {
        "tool": "mergekit-mlx lora-merge",
        "recipe": r.model_dump(mode="json"),
        "merged_as": plan.method,
        "format": fmt.value,
        "modules": {m.module: {"rank": m.rank, "shape": [m.out_features, m.in_features]} for m in plan.modules},
    }


def describe(result: LoraMerge) -> str:
    plan = result.plan
    ranks = sorted({m.rank for m in plan.modules})
    nbytes = sum(t.nbytes for t in plan.outputs)
    return "\n".join(
        [
            f"{plan.method}: {len(plan.settings.weights)} adapters, weights {list(plan.settings.weights)}",
            f"{len(plan.modules)} modules, rank {ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'}",
            f"{result.out_format.value} adapter, {human_bytes(nbytes)}",
        ]
    )


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="module", desc="merging adapters", dynamic_ncols=True)


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="mergekit-mlx lora-merge",
        description="Merge several LoRA adapters (PEFT or mlx-lm) of one base into one adapter, as PEFT's "
        "add_weighted_adapter does: linear, cat (exact), svd, ties, dare and magnitude_prune, and their svd variants.",
    )
    p.add_argument("recipe", help="the YAML recipe (merge_method, adapters with weights, density, rank)")
    p.add_argument("out", nargs="?", help="the adapter directory to write")
    p.add_argument(
        "--out-format",
        choices=[f.value for f in AdapterFormat],
        help="peft (adapter_model.safetensors) or mlx (mlx-lm's adapters.safetensors); default: the recipe's out_format, else peft",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be merged and stop")
    add_force_argument(p)
    add_common_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    with use_device(args.device):
        result = lora_merge(
            args.recipe,
            args.out,
            AdapterFormat(args.out_format) if args.out_format else None,
            force=args.force,
            progress=not args.no_progress,
            dry_run=args.dry_run,
        )
    print(describe(result))
    if result.path is not None:
        print(f"wrote {result.path}", file=sys.stderr)
    return 0
