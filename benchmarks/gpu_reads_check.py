"""Direct reads into GPU memory against MLX's load, on an NVIDIA GPU: same outputs, and how long.

For each method, runs `mergekit-mlx run` on the GPU with inputs read by MLX's load
(MERGEKIT_MLX_NO_DIRECT_READS=1) and read straight into device memory (the default on CUDA),
alternating, `--repeat` times each, inputs in the page cache; then compares the two outputs tensor
by tensor (they must be bit-identical: the same bytes reach the same merge) and prints a table.
Usage: python benchmarks/gpu_reads_check.py FAMILY_DIR [--methods linear,ties] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def tensors(d: Path) -> dict[str, tuple[str, bytes]]:
    """name -> (dtype code, raw bytes) of every tensor in an output directory."""
    from mergekit_mlx.formats.safetensors import read_safetensors_header

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        raw = f.read_bytes()
        for k, info in read_safetensors_header(f)[0].items():
            out[k] = (info.dtype, raw[info.offset : info.offset + info.nbytes])
    return out


def identical(a: Path, b: Path) -> str:
    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        return "different tensor names"
    bad = [k for k in ta if ta[k] != tb[k]]
    return f"{len(ta)} tensors bit-identical" if not bad else f"{len(bad)} of {len(ta)} tensors differ, e.g. {bad[0]}"


def main() -> None:
    if sys.argv[1:2] == ["--compare"]:
        print(identical(Path(sys.argv[2]), Path(sys.argv[3])))
        return
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("family", type=Path)
    p.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties,slerp")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu-reads-check"))
    a = p.parse_args()
    base, *fts = [a.family / "base", a.family / "ft1", a.family / "ft2"]
    a.work.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(device="gpu", mlx_arg=[])
    rows = []
    for method in a.methods.split(","):
        rp = a.work / f"{method}.yml"
        rp.write_text(bench.recipe(method, base, fts))
        inputs = [f for d in bench.inputs_of(method, base, fts) for f in d.glob("*.safetensors")]
        times: dict[str, list[float]] = {"mlx load": [], "direct": []}
        rss: dict[str, int] = {}
        outs = {}
        for _ in range(a.repeat):
            for way in times:
                env = dict(os.environ)
                if way == "mlx load":
                    env["MERGEKIT_MLX_NO_DIRECT_READS"] = "1"
                out = outs[way] = a.work / f"out-{method}-{way.replace(' ', '-')}"
                shutil.rmtree(out, ignore_errors=True)
                bench.read_into_cache(inputs)
                log = a.work / f"{method}-{way.replace(' ', '-')}.log"
                wall, peak, _, code = bench.run_child(bench.tool_command("mlx", rp, out, args, None), log, env)
                if code != 0:
                    print(open(log).read()[-3000:])
                    raise SystemExit(f"{method} ({way}) failed with exit {code}")
                if "fallback" in open(log).read():
                    print(f"warning: {method} ({way}) fell back from a GPU kernel: {log}")
                times[way].append(wall)
                rss[way] = max(rss.get(way, 0), peak)
        # compared in a child: a child forked from a large parent would report the parent's RSS
        same = subprocess.run(
            [sys.executable, __file__, "--compare", str(outs["mlx load"]), str(outs["direct"])], capture_output=True, text=True
        ).stdout.strip()
        rows.append((method, times, rss, same))
        print(method, json.dumps({k: [round(t, 2) for t in v] for k, v in times.items()}), same, flush=True)
    print("\n| method | MLX's load: wall s | direct reads: wall s | peak RSS GB (load / direct) | outputs |")
    print("|---|---:|---:|---:|---|")
    for method, times, rss, same in rows:
        fmt = lambda v: f"{min(v):.2f}-{max(v):.2f}"  # noqa: E731
        print(
            f"| {method} | {fmt(times['mlx load'])} | {fmt(times['direct'])} | "
            f"{rss['mlx load'] / 1e9:.2f} / {rss['direct'] / 1e9:.2f} | {same} |"
        )


if __name__ == "__main__":
    main()
