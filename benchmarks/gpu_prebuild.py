"""Build the shipped CUDA cubins on a GPU machine: run every kernel a merge can ask for, then
compile the sources it recorded for every architecture (`python -m mergekit_mlx.kernels.prebuild`).

Every recipe of configs/ merges a small family on the GPU, its inputs in bfloat16, float16 and
float32, and the task-arithmetic family and linear also with one to four fine-tunes (the kernels
are instantiated per input count and dtype), all with a fresh kernel cache; the sources that cache
then holds are compiled for each architecture into `--out` (default: the package's
kernels/prebuilt). Nothing else is written outside `--work`.

    python3 benchmarks/gpu_prebuild.py --work /tmp/prebuild --out "$OUT/prebuilt"
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

# methods whose kernels take every model at once (instantiated per input count)
MANY_INPUTS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
)
EXAMPLE = {"examples/models/base": "base", "examples/models/add": "ft1", "examples/models/reverse": "ft2"}


def families(work: Path) -> dict[str, Path]:
    """bf16 (make_family), and float16 and float32 copies of it."""
    import mlx.core as mx
    from make_family import Shape, build_family

    bf16 = work / "bf16"
    shape = Shape(hidden=256, layers=2, intermediate=512, vocab=1024, heads=4, kv_heads=2, fine_tunes=4)
    build_family(bf16, shape, quiet=True)
    out = {"bfloat16": bf16}
    for name, dtype in (("float16", mx.float16), ("float32", mx.float32)):
        root = work / name
        for model in sorted(p for p in bf16.iterdir() if p.is_dir()):
            (root / model.name).mkdir(parents=True, exist_ok=True)
            for f in model.iterdir():
                if f.suffix == ".safetensors":
                    weights = {k: v.astype(dtype) for k, v in mx.load(str(f)).items()}
                    mx.save_safetensors(str(root / model.name / f.name), weights, metadata={"format": "pt"})
                elif f.is_file():
                    (root / model.name / f.name).write_bytes(f.read_bytes())
        out[name] = root
    return out


def rename(node, family: Path):
    if isinstance(node, dict):
        return {k: rename(v, family) for k, v in node.items()}
    if isinstance(node, list):
        return [rename(v, family) for v in node]
    if isinstance(node, str) and node in EXAMPLE:
        return str(family / EXAMPLE[node])
    return node


def recipes(family: Path) -> list[tuple[str, dict]]:
    out = []
    for path in sorted((REPO / "configs").glob("*.yml")):
        recipe = rename(yaml.safe_load(path.read_text()), family)
        out.append((path.stem, recipe))
        if path.stem in MANY_INPUTS and recipe.get("models"):
            for count in (1, 3, 4):
                r = copy.deepcopy(recipe)
                others = [m for m in r["models"] if m["model"] != r.get("base_model")]
                base = [m for m in r["models"] if m["model"] == r.get("base_model")]
                extra = [dict(copy.deepcopy(others[-1]), model=str(family / f"ft{i}")) for i in range(1, count + 1)]
                r["models"] = base + extra
                out.append((f"{path.stem} x{count}", r))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu-prebuild"))
    p.add_argument("--out", type=Path, default=None, help="folder of the archives (default: the package's)")
    p.add_argument("--arch", action="append", help="NVRTC targets (default: prebuild's list)")
    args = p.parse_args()
    cache = args.work / "cache"
    os.environ["MERGEKIT_MLX_CACHE"] = str(cache)  # fresh: every source a merge needs is compiled, so recorded
    import mlx.core as mx

    from mergekit_mlx import merge
    from mergekit_mlx.kernels import prebuild

    if mx.default_device() != mx.gpu:
        sys.exit("gpu_prebuild: needs a GPU (MLX's default device is the CPU)")
    start = time.perf_counter()
    failed = 0
    for dtype, family in families(args.work).items():
        for name, recipe in recipes(family):
            variants = [recipe] + ([dict(recipe, dtype="float32"), dict(recipe, dtype="float16")] if dtype == "bfloat16" else [])
            for r in variants:
                try:
                    result = merge(r, use_kernels=True)
                    mx.eval(list(result.weights.values()))
                except Exception as e:  # noqa: BLE001 - a recipe this family cannot run is reported, not fatal
                    failed += 1
                    print(f"{dtype} {name} {r.get('dtype', '')}: {type(e).__name__}: {str(e)[:200]}")
    sources = sorted(cache.glob("cuda/*.cu"))
    print(f"merges done in {time.perf_counter() - start:.1f} s ({failed} failed); {len(sources)} kernel sources recorded")
    argv = ["--sources", str(cache / "cuda")] + (["--out", str(args.out)] if args.out else [])
    for a in args.arch or []:
        argv += ["--arch", a]
    t = time.perf_counter()
    status = prebuild.main(argv)
    print(f"prebuild: {time.perf_counter() - t:.1f} s, status {status}")


if __name__ == "__main__":
    main()
