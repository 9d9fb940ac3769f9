"""A whole merge on the GPU against the same merge on the CPU, through the command line.

Builds a small bf16 family (make_family.py), runs `mergekit-mlx run` for several methods with
`--device gpu` and `--device cpu`, and compares the outputs tensor by tensor: how many elements
differ and by how much. Magnitude selections (ties, breadcrumbs_ties) must be bit-identical; the
others may differ by one bf16 rounding. It also checks the output lifecycle on the
GPU host: `--force` replaces the earlier output, and the output holds its manifest.

    python3 benchmarks/gpu_merge_check.py [--workdir /tmp/gpu-merge-check]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_family import Shape, build_family  # noqa: E402

METHODS = {
    "ties": {"weight": 0.5, "density": 0.5},
    "dare_ties": {"weight": 0.5, "density": 0.5},
    "della": {"weight": 0.5, "density": 0.5, "epsilon": 0.1},
    "breadcrumbs_ties": {"weight": 0.5, "density": 0.8, "gamma": 0.01},
    "task_arithmetic": {"weight": 0.5},
    "linear": {"weight": 0.5},
}


# selections by magnitude and sign elections are exact on every backend; rescaled DARE/DELLA
# weights and sums may differ by one bf16 rounding (as gpu_agreement.py allows)
EXACT = ("ties", "breadcrumbs_ties")


def recipe(family: Path, method: str) -> dict:
    models = [{"model": str(family / name), "parameters": METHODS[method]} for name in ("ft1", "ft2")]
    if method == "linear":
        return {"merge_method": method, "dtype": "bfloat16", "models": models}
    return {"merge_method": method, "base_model": str(family / "base"), "dtype": "bfloat16", "models": models}


def run(recipe_path: Path, out: Path, device: str, *extra: str) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mergekit_mlx", "run", str(recipe_path), str(out), "--no-progress", "--device", device, *extra],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"{recipe_path.stem} on {device} failed: {done.stderr.strip()}")
    return time.perf_counter() - start


def compare(a: Path, b: Path) -> tuple[int, int, float, bool]:
    """(elements that differ, elements in all, largest absolute difference, every difference within
    one bf16 rounding of the larger value)."""
    differ = total = 0
    largest = 0.0
    rounding = True
    wa = {}
    for f in sorted(a.glob("*.safetensors")):
        wa.update(mx.load(str(f)))
    wb = {}
    for f in sorted(b.glob("*.safetensors")):
        wb.update(mx.load(str(f)))
    assert wa.keys() == wb.keys()
    for name in wa:
        x, y = wa[name].astype(mx.float32), wb[name].astype(mx.float32)
        d = mx.abs(x - y)
        differ += int(mx.sum(d > 0).item())
        total += x.size
        largest = max(largest, float(mx.max(d).item()))
        rounding &= bool(mx.all(d <= mx.maximum(mx.abs(x), mx.abs(y)) * 2.0**-7).item())
    return differ, total, largest, rounding


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gpu-merge-check"))
    args = p.parse_args()
    if not mx.is_available(mx.gpu):
        raise SystemExit("no GPU backend in this MLX build")
    family = args.workdir / "family"
    build_family(family, Shape(hidden=1024, layers=4, intermediate=2816, vocab=8192, heads=8, kv_heads=4), quiet=True)
    rows, status = [], 0
    for method in METHODS:
        recipe_path = args.workdir / f"{method}.yml"
        recipe_path.write_text(yaml.safe_dump(recipe(family, method)))
        gpu, cpu = args.workdir / f"{method}-gpu", args.workdir / f"{method}-cpu"
        for d in (gpu, cpu):
            shutil.rmtree(d, ignore_errors=True)
        t_gpu = run(recipe_path, gpu, "gpu")
        t_cpu = run(recipe_path, cpu, "cpu")
        differ, total, largest, rounding = compare(gpu, cpu)
        ok = differ == 0 if method in EXACT else rounding
        status |= not ok
        rows.append(f"| {method} | {t_gpu:.2f} | {t_cpu:.2f} | {differ} of {total} | {largest:.3g} | {'ok' if ok else 'FAIL'} |")
    again = run(args.workdir / "ties.yml", args.workdir / "ties-gpu", "gpu", "--force")
    manifest = json.loads((args.workdir / "ties-gpu" / ".mergekit-mlx-output.json").read_text())
    print("| method | GPU s | CPU s | elements differing | largest difference | agreement |")
    print("|---|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    print(f"ties again with --force on the GPU: {again:.2f} s, manifest lists {len(manifest['files'])} files")
    sys.exit(status)


if __name__ == "__main__":
    main()
