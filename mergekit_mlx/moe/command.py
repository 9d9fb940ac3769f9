"""`mergekit-mlx moe CONFIG OUT`: a mixture of experts from dense models, as mergekit-moe builds it."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..arguments import Parser, add_common_arguments, add_force_argument, add_shard_size_argument
from ..device import use_device
from ..errors import RecipeError
from .build import ALL_SAME_FLAG, build_moe

HELP = "build a mixture of experts from dense models (mergekit-moe's configuration)"


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="mergekit-mlx moe",
        description="Build a mixture-of-experts model (Mixtral, Qwen2-MoE or Qwen3-MoE) from dense models of one base, "
        "reading mergekit-moe's YAML: attention and embeddings from base_model, each expert's MLPs from its model, "
        "routers from the prompts' hidden states (gate_mode hidden), their embeddings (cheap_embed) or at random.",
    )
    p.add_argument("config", help="mergekit-moe configuration (YAML)")
    p.add_argument("out", nargs="?", help="output directory")
    p.add_argument("--dry-run", action="store_true", help="print what would be built (layout, experts, tensors, bytes) and stop")
    p.add_argument("--random-seed", type=int, default=0, help="seed of random gates and of the experts' noise (default 0)")
    p.add_argument(
        ALL_SAME_FLAG, dest="allow_all_same", action="store_true", help="build it although every expert is the same model"
    )
    add_shard_size_argument(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted build, keeping its finished shards")
    add_force_argument(p)
    add_common_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    if not args.dry_run and not args.out:
        raise RecipeError("mergekit-mlx moe needs OUT, the output directory to write; or pass --dry-run")
    if not 0 <= args.random_seed < 2**63:
        raise RecipeError(f"--random-seed {args.random_seed}: a seed is a whole number from 0 to 2**63 - 1")
    start = time.perf_counter()
    with use_device(args.device):
        result = build_moe(
            Path(args.config),
            args.out,
            seed=args.random_seed,
            allow_all_same=args.allow_all_same,
            force=args.force,
            resume=args.resume,
            out_shard_size=args.out_shard_size,
            progress=not args.no_progress,
            dry_run=args.dry_run,
        )
    if args.dry_run:
        print(result.plan.describe())
        return 0
    took = time.perf_counter() - start
    plan = result.plan
    print(
        f"wrote {result.path} ({plan.architecture.name}, {len(plan.experts)} experts, {len(plan.tensors)} tensors, "
        f"{plan.bytes_written / 1e9:.2f} GB) in {took:.1f} s",
        file=sys.stderr,
    )
    return 0
