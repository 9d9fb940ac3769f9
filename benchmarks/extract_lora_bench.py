"""LoRA extraction benchmark: `mergekit-mlx extract-lora` against mergekit-extract-lora 0.1.5, same run.

Builds (or reuses) a Llama-shaped family with one fine-tune (`make_family.py`; the 0.85B reference
shape unless told otherwise), reads it once into the page cache, then runs each tool at rank 32 as a
subprocess and records its wall time, CPU time and peak RSS. Each adapter written is then measured
the same way, in float64 numpy from the files: per factored module the relative reconstruction error
||dW - B·A|| / ||dW||, dW from the two models' tensors; and on the first and last layer, the excess
over the Eckart–Young optimum (numpy's SVD of dW).

    python benchmarks/extract_lora_bench.py                       # 0.85B family, both tools (about 5 GB of disk)
    python benchmarks/extract_lora_bench.py --task-rank 64        # long-tailed task vectors instead of noise
    python benchmarks/extract_lora_bench.py --small               # 4 layers of 1024: a quick check
    python benchmarks/extract_lora_bench.py --svd exact randomized --tools mlx
    python benchmarks/extract_lora_bench.py --svd-shapes          # randomized against exact SVD on 2048x2048, 5632x2048

mergekit-extract-lora is looked for as --mergekit, then beside this Python, then on PATH; without it
the table lists mergekit-mlx alone. --svd-shapes times one truncated SVD per matrix in this process:
MLX's exact (Gram eigendecomposition) and randomized ones against torch.linalg.svd (what mergekit
calls), each error against numpy's float64 optimum, on four spectra from flat noise to low rank.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_family_in_child, machine_description, read_into_cache, run_child  # noqa: E402
from make_family import Shape, add_shape_arguments, shape_from_args  # noqa: E402

SMALL = {"hidden": 1024, "layers": 4, "intermediate": 2816, "vocab": 8000, "heads": 8, "kv_heads": 2}
PREFIX = "base_model.model."


def find_mergekit(explicit: str | None) -> str | None:
    beside = Path(sys.executable).parent / "mergekit-extract-lora"
    for c in (explicit, str(beside), shutil.which("mergekit-extract-lora")):
        if c and Path(c).exists():
            return c
    return None


@dataclass
class Run:
    tool: str
    svd: str
    wall: float | None = None
    cpu: float | None = None
    rss: int | None = None
    errors: dict | None = None
    note: str = ""


def load_model(d: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def as64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def measure(adapter: Path, ft: dict, base: dict, optimum_layers: set[int], rank: int) -> dict:
    """Relative errors of every factored module of a PEFT adapter, and excess over the optimum on some layers."""
    w = mx.load(str(adapter / "adapter_model.safetensors"))
    errors, excess = {}, {}
    for key in w:
        if not key.endswith((".lora_A.weight", ".lora_embedding_A")):
            continue
        embedding = key.endswith(".lora_embedding_A")
        module = key[len(PREFIX) :].removesuffix(".lora_A.weight").removesuffix(".lora_embedding_A")
        b = w[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
        product = as64(b) @ as64(w[key])
        d = as64(ft[module + ".weight"]) - as64(base[module + ".weight"])
        d = d.T if embedding else d
        errors[module] = float(np.linalg.norm(d - product) / np.linalg.norm(d))
        layer = module.split(".layers.")[1].split(".")[0] if ".layers." in module else None
        if layer is not None and int(layer) in optimum_layers:
            s = np.linalg.svd(d, compute_uv=False)
            excess[module] = errors[module] - float(np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2)))
    values = list(errors.values())
    return {
        "modules": len(values),
        "mean": float(np.mean(values)),
        "max": float(np.max(values)),
        "excess_mean": float(np.mean(list(excess.values()))) if excess else None,
        "excess_max": float(np.max(list(excess.values()))) if excess else None,
        "adapter_bytes": sum(f.stat().st_size for f in adapter.iterdir() if f.is_file()),
    }


def family_bench(args: argparse.Namespace) -> None:
    shape = shape_from_args(args)
    root = Path(args.family or f"/tmp/extract-family-{shape.hidden}x{shape.layers}-r{shape.task_rank}")
    print(f"family: {shape.parameters / 1e9:.2f}B parameters per model in {root}", flush=True)
    build_family_in_child(root, shape)
    base, ft = root / "base", root / "ft1"
    read_into_cache([*base.glob("*.safetensors"), *ft.glob("*.safetensors")])
    mergekit = find_mergekit(args.mergekit) if "mergekit" in args.tools else None
    work = Path(args.work or root / "runs")
    work.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    for rep in range(args.repeat):
        for tool in args.tools:
            for svd in args.svd if tool == "mlx" else ["exact"]:
                out = work / f"{tool}-{svd}"
                if out.exists():
                    shutil.rmtree(out)
                if tool == "mlx":
                    cmd = [sys.executable, "-m", "mergekit_mlx", "extract-lora", str(ft), str(base), str(out)]
                    cmd += ["--rank", str(args.rank), "--svd", svd, "--no-progress"]
                    cmd += ["--device", args.device] if args.device else []
                elif mergekit is None:
                    runs.append(Run(tool, "torch.linalg.svd", note="mergekit-extract-lora not found"))
                    continue
                else:
                    cmd = [mergekit, "--model", str(ft), "--base-model", str(base), "--out-path", str(out)]
                    cmd += ["--max-rank", str(args.rank)] + (["--cuda"] if args.device == "gpu" else [])
                wall, rss, cpu, rc = run_child(cmd, work / f"{tool}-{svd}.log")
                run = Run(tool, svd if tool == "mlx" else "torch.linalg.svd", wall, cpu, rss)
                if rc != 0:
                    run.note = f"exit {rc}: see {work / f'{tool}-{svd}.log'}"
                runs.append(run)
                print(f"  [{rep + 1}/{args.repeat}] {tool} {svd}: {wall:.1f} s (exit {rc})", flush=True)
    # measured after every run: a child's peak RSS counts this process's at the fork, so it stays small until here
    ftw, basew = load_model(ft), load_model(base)
    for run in runs[-len(runs) // args.repeat :]:
        out = work / f"{run.tool}-{'exact' if run.tool == 'mergekit' else run.svd}"
        if run.wall is not None and not run.note:
            run.errors = measure(out, ftw, basew, {0, shape.layers - 1}, args.rank)
    report(runs, shape, args)


def report(runs: list[Run], shape: Shape, args: argparse.Namespace) -> None:
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.tool, r.svd), []).append(r)
    ref = min((r.wall for r in groups.get(("mergekit", "torch.linalg.svd"), []) if r.wall and not r.note), default=None)
    print()
    print(
        f"{machine_description(args.device or 'cpu')}; family {shape.parameters / 1e9:.2f}B "
        f"(hidden {shape.hidden}, {shape.layers} layers, intermediate {shape.intermediate}, task vectors "
        f"{'noise' if not shape.task_rank else f'rank {shape.task_rank} + noise'}), rank {args.rank}, best of {args.repeat}"
    )
    print()
    print(
        "| tool | SVD | wall s | CPU s | peak RSS | vs mergekit | rel. error mean | max | excess over optimum (first/last layer) mean | max | adapter |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (tool, svd), rs in groups.items():
        ok = [r for r in rs if r.wall is not None and not r.note]
        if not ok:
            print(f"| {tool} | {svd} | - | - | - | - | - | - | - | - | {rs[-1].note} |")
            continue
        r = min(ok, key=lambda r: r.wall)
        e = next((x.errors for x in rs if x.errors), {})
        ratio = f"{ref / r.wall:.2f}x" if ref else "-"
        ex = f"{e['excess_mean']:.1e} | {e['excess_max']:.1e}" if e.get("excess_mean") is not None else "- | -"
        print(
            f"| {r.tool} | {r.svd} | {r.wall:.1f} | {r.cpu:.1f} | {r.rss / 1e9:.2f} GB | {ratio} | "
            f"{e.get('mean', float('nan')):.4f} | {e.get('max', float('nan')):.4f} | {ex} | "
            f"{e.get('adapter_bytes', 0) / 1e6:.0f} MB |"
        )


# ----------------------------------------------------------------------------- one SVD at a time


def spectrum_matrix(rows: int, cols: int, spectrum: str, rng: np.random.Generator) -> np.ndarray:
    if spectrum == "flat":
        return (0.002 * rng.standard_normal((rows, cols))).astype(np.float32)
    k = min(rows, cols)
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    i = np.arange(1, k + 1)
    s = {"i^-1/2": i**-0.5, "i^-1": i**-1.0, "rank 16 + 1% noise": (i <= 16).astype(float)}[spectrum]
    w = (u * s) @ v.T
    if spectrum.startswith("rank"):
        w += 0.01 * np.linalg.norm(w) / np.sqrt(rows * cols) * rng.standard_normal((rows, cols))
    return (0.01 * w).astype(np.float32)


def svd_shapes(args: argparse.Namespace) -> None:
    from mergekit_mlx.adapters.svd import SvdMethod, SvdSettings, low_rank

    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    r = args.rank
    print(f"{machine_description('cpu')}; rank {r}; best of {args.repeat} timings; errors ||dW - BA|| / ||dW||")
    print()
    print(
        "| shape | spectrum | optimum | exact: s | exact: error - optimum | randomized: s | randomized: error - optimum | torch.linalg.svd s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for shape in ((2048, 2048), (5632, 2048)):
        for spectrum in ("flat", "i^-1/2", "i^-1", "rank 16 + 1% noise"):
            w = spectrum_matrix(*shape, spectrum, rng)
            s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
            optimum = float(np.sqrt(np.sum(s[r:] ** 2) / np.sum(s**2)))
            row = [f"{shape[0]}x{shape[1]}", spectrum, f"{optimum:.4f}"]
            d = mx.array(w)
            for method in (SvdMethod.EXACT, SvdMethod.RANDOMIZED):
                times = []
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    f = low_rank(d, r, SvdSettings(method))
                    mx.eval(f.a, f.b)
                    times.append(time.perf_counter() - start)
                err = np.linalg.norm(w - np.array(f.b, np.float64) @ np.array(f.a, np.float64)) / np.linalg.norm(w)
                row += [f"{min(times):.2f}", f"{err - optimum:+.1e}"]
            if torch is not None:
                t = torch.from_numpy(w)
                times = []
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    torch.linalg.svd(t, full_matrices=False)
                    times.append(time.perf_counter() - start)
                row.append(f"{min(times):.2f}")
            else:
                row.append("-")
            print("| " + " | ".join(row) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p)
    p.set_defaults(fine_tunes=1)
    p.add_argument("--small", action="store_true", help="hidden 1024, 4 layers, intermediate 2816, vocab 8000")
    p.add_argument("--family", help="family directory (default /tmp/extract-family-...)")
    p.add_argument("--work", help="where the adapters are written (default FAMILY/runs)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--tools", nargs="+", default=["mlx", "mergekit"], choices=["mlx", "mergekit"])
    p.add_argument("--svd", nargs="+", default=["randomized"], choices=["randomized", "exact"], help="mergekit-mlx's SVDs to run")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "gpu"])
    p.add_argument("--mergekit", help="path of mergekit-extract-lora")
    p.add_argument("--svd-shapes", action="store_true", help="time single SVDs instead of whole extractions")
    args = p.parse_args()
    if args.small:
        for k, v in SMALL.items():
            setattr(args, k, v)
    if args.svd_shapes:
        svd_shapes(args)
    else:
        family_bench(args)


if __name__ == "__main__":
    main()
