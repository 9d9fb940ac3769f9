"""`mergekit-mlx evolve CONFIG OUT`: search merge parameters with CMA-ES, every candidate in memory.

CONFIG is mergekit-evolve's YAML (`genome`, `tasks`); OUT a folder that receives the checkpoint
(state.json), the log of every candidate (candidates.jsonl), the best recipe (best.yml), the plot
(fitness.png) and, at the end, the best model (model/).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..arguments import Parser, add_common_arguments, parse_size
from ..distributed import world
from .search import DEFAULT_EVAL_BATCH, DEFAULT_MAX_FEVALS, SearchOptions, search
from .state import BEST, LOG, PLOT, STATE

HELP = "search merge parameters with CMA-ES (mergekit-evolve's config), candidates merged in memory"


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="mergekit-mlx evolve",
        description="Search merge parameters with CMA-ES from a mergekit-evolve configuration, every candidate merged "
        "in memory and scored; OUT receives the checkpoint, the log of every candidate, the best recipe, the plot and "
        "the best model. Under mlx.launch each generation's candidates are spread over the processes.",
    )
    p.add_argument("config", help="mergekit-evolve configuration (YAML: genome, tasks)")
    p.add_argument("out", help="folder for the checkpoint, the log, the best recipe, the plot and the best model")
    p.add_argument(
        "--max-fevals", type=int, default=DEFAULT_MAX_FEVALS, help=f"candidates to score in all (default {DEFAULT_MAX_FEVALS})"
    )
    p.add_argument("--popsize", type=int, help="candidates per generation (default: CMA-ES's, 4 + 3 ln(parameters))")
    p.add_argument("--sigma0", type=float, help="initial step size of CMA-ES (default 1/6, as mergekit-evolve)")
    p.add_argument(
        "--seed", type=int, help="seed of the search: the same seed, config and models find the same best recipe (default 0)"
    )
    p.add_argument("--random-seed", type=int, help="seed of the DARE masks of every candidate, as in `run` (default 0)")
    p.add_argument(
        "--task-search-path", action="append", default=[], metavar="DIR", help="folder of lm-eval task YAML files (repeatable)"
    )
    p.add_argument(
        "--eval-batch-size", type=int, default=DEFAULT_EVAL_BATCH, help=f"lm-eval's batch size (default {DEFAULT_EVAL_BATCH})"
    )
    p.add_argument(
        "--memory-limit",
        type=parse_size,
        help="memory for the inputs held once plus one candidate (default 3/4 of the memory available); inputs that do not "
        "fit are read from disk for every candidate",
    )
    p.add_argument("--resume", action="store_true", help="continue the search in OUT where its checkpoint stopped")
    p.add_argument("--force", action="store_true", help="start over in an OUT holding an earlier search")
    p.add_argument("--allow-crimes", action="store_true", help="merge models of different architectures")
    p.add_argument("--no-kernels", action="store_true", help="use the plain MLX path instead of custom kernels")
    add_common_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    opts = SearchOptions(
        max_fevals=args.max_fevals,
        popsize=args.popsize,
        sigma0=args.sigma0,
        seed=args.seed,
        random_seed=args.random_seed,
        memory_limit=args.memory_limit,
        eval_batch_size=args.eval_batch_size,
        task_search_paths=tuple(Path(p) for p in args.task_search_path),
        device=args.device,
        use_kernels=not args.no_kernels,
        allow_crimes=args.allow_crimes,
        resume=args.resume,
        force=args.force,
        progress=not args.no_progress and world().rank == 0,
    )
    start = time.perf_counter()
    result = search(Path(args.config), Path(args.out), opts, world=world())  # world: the processes of mlx.launch
    took = time.perf_counter() - start
    if result is None:  # another rank than 0 of a distributed search: rank 0 reports
        return 0
    out = result.out
    scores = ", ".join(f"{k} {v:.4f}" for k, v in result.best_scores.items())
    print(f"{result.evaluations} candidates in {result.generations} generations ({result.stopped}); {took:.1f} s in this run")
    print(result.inputs)
    print(f"best fitness {result.best_fitness:.4f} ({scores})")
    print(f"best recipe:   {out / BEST}   (mergekit-mlx run {out / BEST} OUT merges it again, bit for bit)")
    print(f"best model:    {result.model_path}")
    print(f"every candidate: {out / LOG}; plot: {out / PLOT}; checkpoint: {out / STATE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
