"""Candidates per minute: `mergekit-mlx evolve` (in memory) against the loop mergekit-evolve runs per
candidate (merge to disk, load, score), on the same candidates and tasks, in the same run.

1. in memory: `mergekit-mlx evolve` itself (CMA-ES; inputs read once; each candidate merged in
   memory, handed to mlx-lm with to_mlx_lm() and scored); its log gives each candidate's genotype;
2. to disk with mergekit-mlx: each of those candidates' recipes merged to a folder through the
   output lifecycle (`merge(recipe, out)`, what `mergekit-mlx run` does), loaded with mlx-lm, scored,
   deleted;
3. to disk with mergekit (when importable): the same recipes, as mergekit-evolve writes them
   (dtype bfloat16, int8_mask), through mergekit's `run_merge` in this process (as mergekit-evolve's
   merge actor calls it), loaded with mlx-lm, scored, deleted.

Every loop scores with the same scorer (the example skills, mlx-lm greedy decoding), so the
difference is the merge and the round trip through the disk; mergekit-evolve itself would score
with lm-eval on transformers or vLLM. The family is random-weight (benchmarks/make_family.py) with
the example models' character tokenizer copied in; its scores are near zero and only the time counts.

    python benchmarks/evolve_bench.py /tmp/evofam --hidden 512 --layers 8 --intermediate 1408 --heads 8 --kv-heads 4
    python benchmarks/evolve_bench.py /tmp/family            # the 0.85B family (5 GB)
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_family import add_shape_arguments, build_family, shape_from_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def family(root: Path, shape) -> list[Path]:
    dirs = build_family(root, shape, quiet=True)
    for d in dirs:  # a tokenizer to score with: the example's (44 character tokens, inside any vocabulary)
        for f in TOKENIZER_FILES:
            shutil.copyfile(ROOT / "examples" / "models" / "base" / f, d / f)
    return dirs


def in_memory(config: dict, out: Path, candidates: int, popsize: int) -> tuple[list[dict], float]:
    from mergekit_mlx.evolve import SearchOptions, config_from_dict, search

    start = time.perf_counter()
    search(config_from_dict(config), out, SearchOptions(max_fevals=candidates, popsize=popsize, seed=0, force=True))
    wall = time.perf_counter() - start
    return [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()], wall


def to_disk(recipes: list, scorer, write) -> list[tuple[float, float, dict]]:
    """(seconds to write and load, seconds to score, scores) per recipe: `write(recipe, folder)`,
    mlx-lm loads the folder, the model is scored, the folder deleted."""
    import mlx.core as mx

    from mergekit_mlx import mlx_lm_config

    out = []
    for recipe in recipes:
        folder = Path(tempfile.mkdtemp(prefix="evolve-bench-", dir="/tmp")) / "merged"
        start = time.perf_counter()
        write(recipe, folder)
        model, tokenizer = mlx_lm_config.load(folder)
        mx.eval(model.parameters())  # mlx-lm loads lazily: the read from disk belongs to this phase
        loaded = time.perf_counter()
        scores = scorer.scores(model, tokenizer)
        out.append((loaded - start, time.perf_counter() - loaded, scores))
        shutil.rmtree(folder.parent)
    return out


def write_mergekit_mlx(recipe, folder: Path) -> None:
    from mergekit_mlx import merge

    merge(recipe, folder)


def write_mergekit(recipe, folder: Path) -> None:
    """The recipe as mergekit-evolve hands it to run_merge: dtype bfloat16 and int8_mask, with
    mergekit-evolve's merge options (on a CUDA machine its default `--merge-cuda`: merging on the GPU,
    inputs read to it, low CPU memory; one shard)."""
    import torch
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    data = recipe.model_dump(exclude_none=True, mode="json")
    data["dtype"] = "bfloat16"
    data.setdefault("parameters", {})["int8_mask"] = True
    cuda = torch.cuda.is_available()
    options = MergeOptions(
        cuda=cuda,
        low_cpu_memory=cuda,
        read_to_gpu=cuda,
        out_shard_size=1_000_000_000_000,
        copy_tokenizer=True,
        safe_serialization=True,
        quiet=True,
    )
    run_merge(MergeConfiguration.model_validate(data), str(folder), options)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="folder of the family (built there, or reused)")
    p.add_argument("--candidates", type=int, default=12, help="candidates per loop (default 12)")
    p.add_argument("--popsize", type=int, default=4, help="CMA-ES population of the in-memory search (default 4)")
    p.add_argument("--limit", type=int, default=16, help="search prompts per example skill (default 16)")
    p.add_argument("--no-mergekit", action="store_true", help="leave out the mergekit loop")
    add_shape_arguments(p)
    args = p.parse_args()
    shape = shape_from_args(args)
    base, *fts = family(args.root, shape)
    config = {
        "genome": {"models": [str(f) for f in fts], "merge_method": "ties", "base_model": str(base), "layer_granularity": 0},
        "tasks": [{"name": "example:add", "weight": 0.5}, {"name": "example:reverse", "weight": 0.5}],
        "limit": args.limit,
    }
    from mergekit_mlx.evolve import config_from_dict
    from mergekit_mlx.evolve.fitness import Scorer
    from mergekit_mlx.evolve.search import open_genome

    with tempfile.TemporaryDirectory(prefix="evolve-bench-", dir="/tmp") as tmp:
        logged, wall = in_memory(config, Path(tmp) / "search", args.candidates, args.popsize)
    space, _ = open_genome(config_from_dict(config), None, False)
    import numpy as np

    recipes = [space.recipe(np.array(c["x"])) for c in logged]
    scorer = Scorer(config_from_dict(config))
    # (loop, [(seconds to a model in mlx-lm, seconds to score)], check)
    rows = [
        (
            "mergekit-mlx evolve: merge in memory, to_mlx_lm, score",
            [(c["seconds"]["merge"], c["seconds"]["score"]) for c in logged],
            "",
        )
    ]
    disk = to_disk(recipes, scorer, write_mergekit_mlx)
    same = sum(s == c["scores"] for (_, _, s), c in zip(disk, logged))
    rows.append(
        ("mergekit-mlx run to disk, mlx-lm load, score", [(a, b) for a, b, _ in disk], f"{same}/{len(disk)} scores equal")
    )
    if not args.no_mergekit:
        try:
            import mergekit  # noqa: F401
        except ImportError:
            print("(mergekit is not importable: its loop is left out)")
        else:
            mk = to_disk(recipes, scorer, write_mergekit)
            same = sum(s == c["scores"] for (_, _, s), c in zip(mk, logged))
            rows.append(
                ("mergekit run_merge to disk, mlx-lm load, score", [(a, b) for a, b, _ in mk], f"{same}/{len(mk)} scores equal")
            )

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"family: {shape.parameters / 1e6:.0f}M parameters per model, bf16, base + {len(fts)} fine-tunes ({args.root})")
    print(f"machine: {platform.machine()}, {platform.processor() or platform.system()}; commit {commit}")
    print(f"candidates: {len(logged)} per loop (ties, a weight and a density per model), {args.limit} prompts per skill")
    print(f"in-memory search, wall time with setup (inputs read once, checkpoints, plots, best model written): {wall:.1f} s")
    print("medians over the candidates after the first (which also pays imports and first-use checks)\n")
    print(
        "| loop per candidate | to a model in mlx-lm, s | scoring, s | total, s | candidates/min | total vs in memory | to a model vs in memory | check |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")

    def medians(times: list[tuple[float, float]]) -> tuple[float, float, float]:
        rest = times[1:] or times
        return tuple(statistics.median(v) for v in ([a for a, _ in rest], [b for _, b in rest], [a + b for a, b in rest]))

    ref = medians(rows[0][1])
    for name, times, check in rows:
        model, score, total = medians(times)
        print(
            f"| {name} | {model:.3f} | {score:.3f} | {total:.3f} | {60 / total:.1f} | {total / ref[2]:.2f}x | "
            f"{model / ref[0]:.1f}x | {check} |"
        )


if __name__ == "__main__":
    main()
