"""What proving a resume's inputs costs during a merge and before a resume.

A merge whose output has several shards records its input files' identities (one stat each,
digest.file_identity) before it reads them, so that `--resume` can prove the inputs are the files
it read; a resume takes them again before it keeps a shard. Until 2026-12 the proof hashed every
input file (XXH3-128) on a thread beside the merge, and a resume hashed them all again first. This
script measures, on a family built by make_family.py:

- the identities of the inputs, and what hashing them would take (page cache warm);
- the whole merge with the proof (several shards) against the same merge into one shard (no proof);
- a merge killed halfway, then its `--resume` (which proves the inputs and merges the rest).

    python benchmarks/make_family.py /tmp/family
    python benchmarks/resume_proof.py /tmp/family [--repeat 3] [--method ties]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from mergekit_mlx.output import STATE_FILE, hash_files, identify_files


def recipe(family: Path, method: str) -> dict:
    fts = sorted(p for p in family.iterdir() if p.is_dir() and p.name.startswith("ft"))
    params = {"weight": 0.5, "density": 0.5} if method != "task_arithmetic" else {"weight": 0.5}
    return {
        "merge_method": method,
        "base_model": str(family / "base"),
        "dtype": "bfloat16",
        "models": [{"model": str(p), "parameters": params} for p in fts],
    }


def input_files(family: Path) -> list[str]:
    return sorted(str(f) for d in family.iterdir() if d.is_dir() for f in d.glob("*.safetensors"))


def merge_seconds(recipe_path: Path, out: Path, shard: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "mergekit_mlx", "run", str(recipe_path), str(out), "--no-progress", "--out-shard-size", shard],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def killed_then_resumed(recipe_path: Path, out: Path, shard: str) -> tuple[int, int, float]:
    """(shards kept, shards in all, seconds the resume took)."""
    shutil.rmtree(out, ignore_errors=True)
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [sys.executable, "-m", "mergekit_mlx", "run", str(recipe_path), str(out), "--no-progress", "--out-shard-size", shard]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kept = 0
    while proc.poll() is None:
        try:
            state = json.loads((partial / STATE_FILE).read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("inputs") and len(state.get("shards", {})) >= 2:
            proc.send_signal(signal.SIGKILL)
            kept = len(state["shards"])
            break
        time.sleep(0.01)
    proc.wait()
    start = time.perf_counter()
    done = subprocess.run(cmd + ["--resume"], check=True, capture_output=True, text=True)
    took = time.perf_counter() - start
    if "not resuming" in done.stderr:
        raise SystemExit(f"the resume started over: {done.stderr.strip()}")
    return kept, len(list(out.glob("model-*.safetensors"))), took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("family", type=Path)
    p.add_argument("--method", default="ties")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--shard", default="400M", help="shard size of the merges with a proof (several shards)")
    args = p.parse_args()
    files = input_files(args.family)
    total = sum(Path(f).stat().st_size for f in files)
    with tempfile.TemporaryDirectory(prefix="resume-proof-", dir=args.family.parent) as tmp:
        tmp = Path(tmp)
        recipe_path = tmp / "recipe.yml"
        recipe_path.write_text(yaml.safe_dump(recipe(args.family, args.method)))
        identities, hashes, one, several = [], [], [], []
        for _ in range(args.repeat):
            start = time.perf_counter()
            identify_files(files)
            identities.append(time.perf_counter() - start)
            start = time.perf_counter()
            hash_files(files)
            hashes.append(time.perf_counter() - start)
            one.append(merge_seconds(recipe_path, tmp / "one", "100G"))
            several.append(merge_seconds(recipe_path, tmp / "several", args.shard))
        kept, shards, resume = killed_then_resumed(recipe_path, tmp / "resumed", args.shard)

    def fmt(xs: list[float]) -> str:
        return f"{min(xs):.2f} / {statistics.median(xs):.2f} / {max(xs):.2f}"

    print(f"inputs: {len(files)} files, {total / 1e9:.2f} GB; {args.method}; {args.repeat} runs (min / median / max s)")
    print("| what | seconds |")
    print("|---|---:|")
    print(f"| the input files' identities (the proof) | {min(identities) * 1e3:.2f} ms (fastest) |")
    print(
        f"| XXH3-128 of every input file, one thread (the proof until 2026-12) | {fmt(hashes)} ({total / 1e9 / min(hashes):.2f} GB/s) |"
    )
    print(f"| merge into one shard (no proof) | {fmt(one)} |")
    print(f"| merge into {args.shard} shards (inputs proven) | {fmt(several)} |")
    print(f"| resume after a kill with {kept} of {shards} shards kept (proof + the rest) | {resume:.2f} |")


if __name__ == "__main__":
    main()
