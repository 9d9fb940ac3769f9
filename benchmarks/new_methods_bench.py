"""Timing of the merge methods issue 25 added, beside task_arithmetic and ties, on the 0.85B family.

Each method merges the family (base + two fine-tunes, bf16, random weights; `make_family.py` builds
it, or `--family` names one) in its own `mergekit-mlx run` process, whose wall time, CPU time and
peak RSS are recorded (the fastest of `--repeat`), inputs in the page cache as in `bench.py`.
Recipes use each method's defaults (weights 1; ties, consensus_ties and pcb density 0.5). A method
not registered in this checkout is skipped with a line saying so.

The SVD methods and WUDI cost far more than a pass over the bytes on a CPU, so a subset can be
timed, and says so in the table: `--first-layers K` merges the first K decoder layers (a `slices`
recipe; the embeddings, final norm and head are merged too), `--plain-embeddings` gives the
embeddings and head the mean task vector (`decompose: false`) in the four subspace methods, and
`--wudi-iter-num N` runs N Adam steps instead of 400 (a step costs the same every time, so the
precomputation plus N steps is measured; the table shows the iterations run).

    python benchmarks/new_methods_bench.py --family /tmp/family                     # CPU, everything
    python benchmarks/new_methods_bench.py --family /tmp/family --first-layers 1 --wudi-iter-num 2
    python benchmarks/new_methods_bench.py --device gpu --warmup                    # on a GPU
    python benchmarks/new_methods_bench.py --family /tmp/family --single-matrices   # per matrix, in-process

`--single-matrices` takes layer 0's task vectors of a few matrices (`--tensors`) and, in this process,
times iso_c, iso_cts and tsv_m on each as a merge runs them, and again with LAPACK's float64 SVD in
place of methods/subspace.py's (the reference), with the relative difference of the two results,
and WUDI's precomputation and seconds per Adam step on `--device`; with the tensors' counts in the
model that gives the whole-model cost of each.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_family_in_child, machine_description, read_into_cache, run_child, tool_command  # noqa: E402
from make_family import Shape, add_shape_arguments, shape_from_args  # noqa: E402

BASELINES = ("task_arithmetic", "ties")
NEW = ("consensus_ta", "consensus_ties", "magmax", "pcb", "iso_c", "iso_cts", "tsv_m", "wudi")
SUBSPACE = ("iso_c", "iso_cts", "tsv_m", "wudi")  # the methods with a `decompose` parameter

# per method: (shared parameters, per-model parameters) of the benchmark's recipe
SETTINGS: dict[str, tuple[dict, dict]] = {
    "task_arithmetic": ({}, {"weight": 1.0}),
    "ties": ({}, {"weight": 1.0, "density": 0.5}),
    "consensus_ta": ({}, {"weight": 1.0}),
    "consensus_ties": ({}, {"weight": 1.0, "density": 0.5}),
    "magmax": ({}, {}),
    "pcb": ({"density": 0.5, "weight": 1.0}, {}),
    "iso_c": ({}, {}),
    "iso_cts": ({}, {}),
    "tsv_m": ({}, {}),
    "wudi": ({}, {}),
}


@dataclass
class Row:
    method: str
    wall: float | None = None
    cpu: float | None = None
    rss: int | None = None
    note: str = ""


def registered_methods() -> set[str]:
    """The merge methods of this checkout, asked of a child (this process stays small)."""
    code = "import json; from mergekit_mlx.methods import all_methods; print(json.dumps(sorted(all_methods())))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def recipe(method: str, base: Path, fts: list[Path], args: argparse.Namespace) -> dict:
    shared, per_model = (dict(x) for x in SETTINGS[method])
    if method == "wudi" and args.wudi_iter_num is not None:
        shared["iter_num"] = args.wudi_iter_num
    if args.plain_embeddings and method in SUBSPACE:
        shared["decompose"] = [
            {"filter": "embed_tokens", "value": False},
            {"filter": "lm_head", "value": False},
            {"value": True},
        ]
    r: dict = {"merge_method": method, "base_model": str(base), "dtype": "bfloat16"}
    if shared:
        r["parameters"] = shared
    models = [(base, {})] + [(ft, per_model) for ft in fts]
    if args.first_layers:
        span = [0, args.first_layers]
        r["slices"] = [
            {"sources": [{"model": str(p), "layer_range": span, **({"parameters": pm} if pm else {})} for p, pm in models]}
        ]
    else:
        r["models"] = [{"model": str(p), **({"parameters": pm} if pm else {})} for p, pm in models[1:]]
    return r


def subset_description(args: argparse.Namespace, shape: Shape) -> str:
    parts = [f"first {args.first_layers} of {shape.layers} layers" if args.first_layers else f"all {shape.layers} layers"]
    parts.append("embeddings and head as mean task vectors in the subspace methods" if args.plain_embeddings else "")
    if args.wudi_iter_num is not None:
        parts.append(f"wudi {args.wudi_iter_num} Adam steps (default 400)")
    return "; ".join(p for p in parts if p)


def single_matrices(root: Path, names: list[str], device: str, wudi_steps: int) -> None:
    """Per matrix: the subspace methods' time and error against LAPACK's float64 SVD, WUDI's step time."""
    import contextlib
    import time

    import mlx.core as mx
    import numpy as np

    from mergekit_mlx.methods import isotropic, subspace, tsv
    from mergekit_mlx.methods.wudi import wudi_descent

    def lapack_svd(x):
        """The reference: LAPACK's float64 SVD, numerically zero directions zeroed as thin_svd does."""
        u, s, vh = np.linalg.svd(x.astype(np.float64), full_matrices=False)
        r = subspace.numerical_rank(s)
        u[:, r:] = 0.0
        s[r:] = 0.0
        return u, s, vh

    @contextlib.contextmanager
    def reference_svd():
        modules = (subspace, isotropic, tsv)
        saved = [m.thin_svd for m in modules]
        for m in modules:
            m.thin_svd = lapack_svd
        try:
            yield
        finally:
            for m, f in zip(modules, saved):
                m.thin_svd = f

    if device == "gpu":
        mx.set_default_device(mx.gpu)
    models = [mx.load(str(next((root / d).glob("*.safetensors")))) for d in ("base", "ft1", "ft2")]
    counts = json.loads((root / "family.json").read_text())
    methods = {
        "iso_c": isotropic.iso_c_matrix,
        "iso_cts": lambda tvs: isotropic.iso_cts_matrix(tvs, 0.8),
        "tsv_m": tsv.tsv_matrix,
    }
    print("| tensor | shape | method | s | with LAPACK's float64 SVD, s | relative difference |")
    print("|---|---|---|---:|---:|---:|")
    for name in names:
        key = f"model.layers.0.{name}.weight" if "embed" not in name and "lm_head" not in name else f"{name}.weight"
        base = models[0][key].astype(mx.float32)
        tvs32 = [np.array(m[key].astype(mx.float32) - base) for m in models[1:]]
        for method, f in methods.items():
            start = time.perf_counter()
            got = f(tvs32)
            seconds = time.perf_counter() - start
            with reference_svd():
                start = time.perf_counter()
                want = f(tvs32)
                reference_seconds = time.perf_counter() - start
            error = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)
            print(
                f"| {key} | {tuple(base.shape)} | {method} | {seconds:.2f} | {reference_seconds:.2f} | {error:.1e} |",
                flush=True,
            )
        stacked = mx.array(np.stack(tvs32))
        mx.eval(stacked)
        start = time.perf_counter()
        wudi_descent(stacked, 0, 1e-5)
        setup = time.perf_counter() - start
        start = time.perf_counter()
        wudi_descent(stacked, wudi_steps, 1e-5)
        per_step = (time.perf_counter() - start - setup) / wudi_steps
        print(
            f"| {key} | {tuple(base.shape)} | wudi ({device}) | {setup:.2f} + {per_step:.2f} per step "
            f"({setup + 400 * per_step:.0f} s at 400 steps) | - |",
            flush=True,
        )
    print(f"(family: {counts['layers']} layers; each layer has one of each decoder matrix)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mergekit-mlx-bench"), help="family cache, recipes, outputs, logs")
    p.add_argument("--family", type=Path, help="an existing family directory (base/, ft1/, ft2/) to use")
    p.add_argument("--methods", default=",".join(BASELINES + NEW), help="comma-separated (default: baselines and all new)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per method; the fastest counts")
    p.add_argument("--warmup", action="store_true", help="one untimed run of each method first")
    p.add_argument("--first-layers", type=int, default=0, help="merge only the first K decoder layers (0: all)")
    p.add_argument("--plain-embeddings", action="store_true", help="embeddings/head as mean task vectors in subspace methods")
    p.add_argument("--wudi-iter-num", type=int, help="WUDI's Adam steps (default: the method's 400)")
    p.add_argument("--mlx-arg", action="append", default=[], help="extra argument for mergekit-mlx run (repeatable)")
    p.add_argument(
        "--single-matrices", action="store_true", help="per-matrix timings and errors against LAPACK float64, in-process"
    )
    p.add_argument(
        "--tensors",
        default="self_attn.k_proj,self_attn.q_proj,mlp.gate_proj,mlp.down_proj",
        help="layer-0 matrices for --single-matrices (comma-separated; 'model.embed_tokens', 'lm_head' allowed)",
    )
    add_shape_arguments(p)
    args = p.parse_args()
    shape: Shape = shape_from_args(args)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in SETTINGS:
            p.error(f"--methods: {m!r} is not one of {', '.join(SETTINGS)}")

    root = args.family or args.workdir / f"family-h{shape.hidden}-l{shape.layers}-i{shape.intermediate}-v{shape.vocab}"
    if not args.family:
        build_family_in_child(root, shape)
    else:
        shape = Shape(**json.loads((root / "family.json").read_text()))
    print(f"family: {root} ({shape.parameters / 1e9:.2f}B parameters per model)", flush=True)
    if args.single_matrices:
        print(f"machine: {machine_description(args.device)}", flush=True)
        single_matrices(root, [t for t in args.tensors.split(",") if t], args.device, args.wudi_iter_num or 3)
        return
    base, *fts = [root / "base", root / "ft1", root / "ft2"]
    work = args.workdir / "new-methods"
    work.mkdir(parents=True, exist_ok=True)
    inputs = [f for d in (base, *fts) for f in d.glob("*.safetensors")]
    known = registered_methods()
    print(f"machine: {machine_description(args.device)}", flush=True)

    rows: list[Row] = []
    for method in methods:
        row = Row(method)
        rows.append(row)
        if method not in known:
            row.note = "not registered in this checkout: skipped"
            print(f"  {method:16s} {row.note}", flush=True)
            continue
        rp = work / f"{method}.json"  # JSON is YAML: the recipe loader reads it
        rp.write_text(json.dumps(recipe(method, base, fts, args), indent=1))
        out = work / f"out-{method}"
        log = work / f"{method}.log"
        cmd = tool_command("mlx", rp, out, args, None)
        walls = []
        for i in range(int(args.warmup) + args.repeat):
            shutil.rmtree(out, ignore_errors=True)
            read_into_cache(inputs)
            wall, rss, cpu, code = run_child(cmd, log)
            if code != 0:
                row.note = f"failed (exit {code}), see {log}"
                break
            if i >= int(args.warmup):
                walls.append(wall)
                if row.wall is None or wall < row.wall:
                    row.wall, row.cpu, row.rss = wall, cpu, rss
        shutil.rmtree(out, ignore_errors=True)
        every = f"  (runs: {' '.join(f'{w:.1f}' for w in walls)})" if len(walls) > 1 else ""
        shown = f"{row.wall:8.1f} s  cpu {row.cpu:8.1f} s  {row.rss / 1e9:5.2f} GB{every}" if row.wall else row.note
        print(f"  {method:16s} {shown}", flush=True)

    print()
    print(f"Machine: {machine_description(args.device)}; MLX device: {args.device}")
    print(
        f"Family: {shape.parameters / 1e9:.2f}B parameters per model (hidden {shape.hidden}, {shape.layers} layers, "
        f"intermediate {shape.intermediate}, vocab {shape.vocab}), base + 2 fine-tunes, bf16, inputs in the page cache"
    )
    print(f"Merged: {subset_description(args, shape)}")
    print()
    print("| method | wall s | CPU s | peak RSS GB | vs task_arithmetic | note |")
    print("|---|---:|---:|---:|---:|---|")
    ta = next((r for r in rows if r.method == "task_arithmetic" and r.wall), None)
    for r in rows:
        if r.wall is None:
            print(f"| {r.method} | - | - | - | - | {r.note} |")
            continue
        ratio = f"{r.wall / ta.wall:.1f}x" if ta else "-"
        print(f"| {r.method} | {r.wall:.1f} | {r.cpu:.1f} | {r.rss / 1e9:.2f} | {ratio} | {r.note} |")


if __name__ == "__main__":
    main()
