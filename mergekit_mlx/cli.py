"""The `mergekit-mlx` command: run (merge a recipe), eval (score models), convert (change format)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

from .arguments import Parser, add_common_arguments, add_output_arguments, parse_size
from .errors import MergeKitError, RecipeError

def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="merge recipe (mergekit YAML)")
    p.add_argument("out", nargs="?", help="output directory (or .gguf file for gguf formats)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (tensors, bytes, peak memory) and stop")
    p.add_argument("--random-seed", type=int, default=0, help="seed of the DARE/DELLA masks (default 0)")
    p.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="write the tokenizer into the output (default on)")
    p.add_argument("--allow-crimes", action="store_true", help="merge models of different architectures")
    p.add_argument("--allow-nonfinite", action="store_true", help="merge although an input holds NaN or Inf")
    p.add_argument("--no-kernels", action="store_true", help="use the plain MLX path instead of custom kernels")
    p.add_argument("--batch-size", type=parse_size, default=None,
                   help="bytes of tensors in flight (default 512M on the CPU, 2G on a GPU)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted merge, keeping its finished shards")
    add_output_arguments(p)
    add_common_arguments(p)


def run(args: argparse.Namespace) -> int:
    from .merge import merge
    from .options import MergeOptions
    from .plan import make_plan
    from .recipe import load_recipe

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
        progress=not args.no_progress,
    ).resolved()
    if args.dry_run:
        plan = make_plan(load_recipe(Path(args.recipe)), recipe_dir=Path(args.recipe).parent, allow_crimes=args.allow_crimes)
        print(plan.describe(opts.out_shard_size, opts.batch_bytes))
        return 0
    if not args.out:
        raise RecipeError("mergekit-mlx run needs OUT, the output directory (or .gguf file) to write; or pass --dry-run")
    start = time.perf_counter()
    result = merge(Path(args.recipe), args.out, opts)  # always a file, whatever its suffix
    took = time.perf_counter() - start
    plan = result.plan
    print(
        f"wrote {result.path} ({len(plan.tasks)} tensors, {plan.bytes_written / 1e9:.2f} GB) in {took:.1f} s",
        file=sys.stderr,
    )
    global _merged
    _merged = True
    return 0


_merged = False  # a `run` finished: its output is complete and in place


def entry() -> None:
    """The console command: main(), then, after a merge, an exit without the interpreter's
    teardown. The output is closed and renamed by then; what is skipped is freeing every object and
    MLX's and the GPU driver's shutdown, about a tenth of a second of a GPU merge on an H200 host."""
    code = main()
    if _merged:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `mergekit-mlx recipe.yml out` works like mergekit-yaml
    if argv and argv[0].endswith((".yml", ".yaml")):
        argv = ["run"] + argv
    parser = Parser(prog="mergekit-mlx", description="Merge language models with MLX.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(sub.add_parser("run", help="merge models as a recipe says"))
    sub.add_parser("eval", help="score models on the example skills", add_help=False)
    sub.add_parser("convert", help="convert a model between formats without merging", add_help=False)
    sub.add_parser("example", help="merge, score and sample the shipped example models", add_help=False)
    try:
        if argv and argv[0] in ("eval", "convert", "example"):
            command, rest = argv[0], argv[1:]
        else:
            args = parser.parse_args(argv)
            command, rest = args.command, None
        if command == "eval":
            from .evaluate import main as eval_main

            return eval_main(rest) or 0
        if command == "example":
            from .example import main as example_main

            return example_main(rest) or 0
        if command == "convert":
            from .convert import main as convert_main

            return convert_main(rest) or 0
        return run(args)
    except MergeKitError as e:
        return _error(str(e))
    except KeyboardInterrupt:
        print("mergekit-mlx: interrupted; rerun the same command with --resume to continue", file=sys.stderr)
        return 130
    except OSError as e:  # a file the checks did not foresee: still named, still one paragraph
        where = f"{e.filename}: " if e.filename else ""
        return _error(f"{where}{e.strerror or e}")
    except MemoryError:
        return _error("out of memory; lower --batch-size, or merge on a machine with more memory")
    except Exception as e:
        if os.environ.get("MERGEKIT_MLX_DEBUG"):
            raise
        return _error(
            f"unexpected {type(e).__name__}: {_one_line(str(e))}. This is a bug in mergekit-mlx: please report it "
            "with the command and recipe (set MERGEKIT_MLX_DEBUG=1 to see where it happened)"
        )


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _error(message: str) -> int:
    print(f"mergekit-mlx: error: {_one_line(message, 4000)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    entry()
