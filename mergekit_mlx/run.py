"""`mergekit-mlx run RECIPE OUT`: merge models as a recipe says (also `mergekit-mlx RECIPE OUT`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .arguments import Parser, add_common_arguments, add_output_arguments, parse_size
from .errors import RecipeError

HELP = "merge models as a recipe says"


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="mergekit-mlx run",
        description="Merge models as a mergekit YAML recipe says. Under mlx.launch every process writes its share of "
        "the output shards into OUT (a folder they all see), byte-identical to one process's output.",
    )
    p.add_argument("recipe", help="merge recipe (mergekit YAML)")
    p.add_argument("out", nargs="?", help="output directory (or .gguf file for gguf formats)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (tensors, bytes, peak memory) and stop")
    p.add_argument("--random-seed", type=int, default=0, help="seed of the DARE/DELLA masks (default 0)")
    p.add_argument(
        "--copy-tokenizer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the tokenizer into the output (default on)",
    )
    p.add_argument("--allow-crimes", action="store_true", help="merge models of different architectures")
    p.add_argument("--allow-nonfinite", action="store_true", help="merge although an input holds NaN or Inf")
    p.add_argument("--no-kernels", action="store_true", help="use the plain MLX path instead of custom kernels")
    p.add_argument(
        "--batch-size", type=parse_size, default=None, help="bytes of tensors in flight (default 512M on the CPU, 2G on a GPU)"
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted merge, keeping its finished shards")
    add_output_arguments(p)
    add_common_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from .distributed import world
    from .hub import download_progress
    from .merge import merge
    from .options import MergeOptions
    from .plan import make_plan
    from .recipe import load_recipe

    args = parser().parse_intermixed_args(argv)  # OUT may follow the options
    ranks = world()  # several processes under mlx.launch: each writes its share of the shards
    opts = MergeOptions(
        random_seed=args.random_seed,
        out_shard_size=args.out_shard_size,
        batch_bytes=args.batch_size,
        device=args.device,
        copy_tokenizer=args.copy_tokenizer,
        allow_crimes=args.allow_crimes,
        allow_nonfinite=args.allow_nonfinite,
        use_kernels=not args.no_kernels,
        out_format=args.out_format,
        group_size=args.group_size,
        force=args.force,
        resume=args.resume,
        progress=not args.no_progress and ranks.rank == 0,
    ).resolved()
    with download_progress(not args.no_progress):  # Hub weights, if the recipe names Hub ids
        if args.dry_run:
            plan = make_plan(load_recipe(Path(args.recipe)), recipe_dir=Path(args.recipe).parent, allow_crimes=args.allow_crimes)
            if ranks.rank == 0:
                print(plan.describe(opts.out_shard_size, opts.batch_bytes))
            return 0
        if not args.out:
            raise RecipeError("mergekit-mlx run needs OUT, the output directory (or .gguf file) to write; or pass --dry-run")
        start = time.perf_counter()
        result = merge(Path(args.recipe), args.out, opts, world=ranks)  # always a file, whatever its suffix
    took = time.perf_counter() - start
    plan = result.plan
    if ranks.rank != 0:
        return 0
    print(
        f"wrote {result.path} ({len(plan.tasks)} tensors, {plan.bytes_written / 1e9:.2f} GB) in {took:.1f} s"
        + (f" by {ranks.size} processes" if ranks.size > 1 else ""),
        file=sys.stderr,
    )
    return 0
