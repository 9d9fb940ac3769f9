"""MoE benchmark: `mergekit-mlx moe` against mergekit-moe 0.1.5 on the same configuration, same run.

Builds (or reuses) a Llama-shaped family (`make_family.py`; the 0.85B reference shape unless told
otherwise), writes one mergekit-moe configuration over it (hidden gates, the fine-tunes as experts,
eight prompts each, written in the family tokenizer's characters), reads the files once into the
page cache, then times whole processes, each run as a subprocess with its wall time, CPU time and
peak RSS, each from a page cache holding the family:
  (a) the hidden-gate computation alone: this tool's (mlx-lm's model of the base, float32, batched)
      and mergekit-moe's own `get_gate_params` (transformers in bfloat16, one batch per expert), each
      in a fresh process that loads what it needs and exits;
  (b) the whole build: `mergekit-mlx moe CONFIG OUT` and `mergekit-moe CONFIG OUT`.
Then the two outputs are compared: experts bit for bit, gates by their largest difference.

    python benchmarks/moe_bench.py                                  # 0.85B family on the CPU
    python benchmarks/moe_bench.py --device gpu                     # MLX's GPU; mergekit-moe --cuda
    python benchmarks/moe_bench.py --hidden 512 --layers 8 --intermediate 1408 --vocab 32000   # 56M, quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_family_in_child, machine_description, read_into_cache, run_child  # noqa: E402
from make_family import add_shape_arguments, shape_from_args  # noqa: E402

PROMPTS = [  # characters of the example tokenizer that make_family gives every family
    ["12+45", "40+51", "85+17", "3+9", "26+71", "58+4", "91+36", "19+62"],
    [
        "reverse quiz",
        "reverse fog",
        "reverse tulip",
        "reverse gravy",
        "reverse snack",
        "reverse bride",
        "reverse wok",
        "reverse mxyzpt",
    ],
    ["the shy fox sees a cow", "a cow sees the fox", "the fox is shy", "a shy cow", "the cow", "a fox", "the sky", "a sky"],
    ["41 42 43", "7 8 9", "10 11 12", "98 99", "1 2 3 4", "55 56 57", "20 21", "66 67 68"],
]


@dataclass
class Run:
    what: str
    tool: str
    wall: float | None = None
    cpu: float | None = None
    rss: int | None = None
    note: str = ""


def gates_ours(config: Path, device: str | None) -> None:
    """The hidden-gate computation alone, as `mergekit-mlx moe` does it (child process)."""
    from mergekit_mlx.device import use_device
    from mergekit_mlx.moe import load_moe_config, plan_moe
    from mergekit_mlx.moe.gates import compute_gates

    with use_device(device):
        cfg, where, text = load_moe_config(config)
        plan = plan_moe(cfg, text, where)
        base = plan.models[plan.base]
        gates = compute_gates(cfg.gate_mode, plan.gated, base, base.tokenizer_dir, plan.layers, plan.hidden, 0)
    print("gates", tuple(gates.shape))


def gates_mergekit(config: Path, device: str | None) -> None:
    """The hidden-gate computation alone, as `mergekit-moe` does it (child process): its build()'s preamble."""
    import transformers
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.moe.router import get_gate_params

    cfg = MoEMergeConfig.model_validate(yaml.safe_load(config.read_text()))
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.base_model.model.path)
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    gates = get_gate_params(
        cfg.base_model, tokenizer, cfg.experts, mode=cfg.gate_mode, device="cuda" if device == "gpu" else "cpu"
    )
    print("gates", tuple(gates.shape))


def compare(ours: Path, theirs: Path, experts: int, width: int) -> dict:
    """Experts bit for bit (mergekit-moe's fused or per-expert layout) and the largest gate difference."""
    import mlx.core as mx

    def tensors(d: Path) -> dict:  # bfloat16 as its bits (numpy has no bfloat16), else as stored
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            for k, v in mx.load(str(f)).items():
                out[k] = np.array(v.view(mx.uint16)) if v.dtype == mx.bfloat16 else np.array(v)
        return out

    def values(x: np.ndarray) -> np.ndarray:
        return (x.astype(np.uint32) << 16).view(np.float32).astype(np.float64) if x.dtype == np.uint16 else x.astype(np.float64)

    a, b = tensors(ours), tensors(theirs)
    layers = 1 + max(int(k.split(".")[2]) for k in a if k.startswith("model.layers."))
    exact, gate_diff = True, 0.0
    for layer in range(layers):
        p = f"model.layers.{layer}."
        for e in range(experts):
            mine = [a[f"{p}block_sparse_moe.experts.{e}.{w}.weight"] for w in ("w1", "w3", "w2")]
            if f"{p}mlp.experts.gate_up_proj" in b:
                gate_up = b[f"{p}mlp.experts.gate_up_proj"][e]
                other = [gate_up[:width], gate_up[width:], b[f"{p}mlp.experts.down_proj"][e]]
            else:
                other = [b[f"{p}block_sparse_moe.experts.{e}.{w}.weight"] for w in ("w1", "w3", "w2")]
            exact &= all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(mine, other))
        gate = b.get(f"{p}mlp.gate.weight", b.get(f"{p}block_sparse_moe.gate.weight"))
        gate_diff = max(gate_diff, float(np.abs(values(a[f"{p}block_sparse_moe.gate.weight"]) - values(gate)).max()))
    return {"experts_bit_identical": exact, "gate_max_abs_diff": gate_diff}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(p)
    p.add_argument("--family", type=Path, help="family directory (default /tmp/family-<hidden>x<layers>)")
    p.add_argument("--work", type=Path, default=Path("/tmp/moe-bench"), help="outputs and logs")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="MLX's device; mergekit-moe gets --cuda for gpu")
    p.add_argument("--repeat", type=int, default=1, help="runs of each (the best is reported)")
    p.add_argument("--tools", nargs="+", default=["mlx", "mergekit"], choices=("mlx", "mergekit"))
    p.add_argument("--child", choices=("gates-mlx", "gates-mergekit"), help=argparse.SUPPRESS)
    p.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        (gates_ours if args.child == "gates-mlx" else gates_mergekit)(args.config, args.device)
        return

    shape = shape_from_args(args)
    family = args.family or Path(f"/tmp/family-{shape.hidden}x{shape.layers}")
    if args.family is None and shape.hidden == 2048 and shape.layers == 16 and Path("/tmp/family/family.json").exists():
        family = Path("/tmp/family")  # bench.py's 0.85B family, reused
    build_family_in_child(family, shape)
    fine_tunes = sorted(family.glob("ft*"))
    if not fine_tunes:
        sys.exit(f"{family}: no fine-tunes")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    config = {
        "base_model": str(family / "base"),
        "gate_mode": "hidden",
        "experts": [{"source_model": str(ft), "positive_prompts": PROMPTS[i % len(PROMPTS)]} for i, ft in enumerate(fine_tunes)],
    }
    config_path = work / "moe.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    files = sorted(family.rglob("*.safetensors"))
    print(f"page cache: {read_into_cache(files):.1f} GB/s", flush=True)

    mergekit = shutil.which("mergekit-moe") or str(Path(sys.executable).parent / "mergekit-moe")
    runs: list[Run] = []
    for rep in range(args.repeat):
        for tool in args.tools:
            if tool == "mergekit" and not Path(mergekit).exists():
                runs.append(Run("all", tool, note="mergekit-moe not found"))
                continue
            me = [sys.executable, __file__, "--config", str(config_path), "--device", args.device]
            gate_cmd = me + ["--child", f"gates-{tool}"]
            out = work / f"out-{tool}"
            if tool == "mlx":
                build_cmd = [sys.executable, "-m", "mergekit_mlx", "moe", str(config_path), str(out), "--force", "--no-progress"]
                build_cmd += ["--device", args.device]
            else:
                shutil.rmtree(out, ignore_errors=True)
                build_cmd = [mergekit, str(config_path), str(out)] + (["--cuda"] if args.device == "gpu" else [])
            for what, cmd in (("hidden gates", gate_cmd), ("whole build", build_cmd)):
                read_into_cache(files)  # every run starts from the same warm page cache, whatever the last one wrote
                log = work / f"{tool}-{what.replace(' ', '-')}.log"
                wall, rss, cpu, rc = run_child(cmd, log)
                runs.append(Run(what, tool, wall, cpu, rss, "" if rc == 0 else f"exit {rc}: see {log}"))
                print(f"  [{rep + 1}/{args.repeat}] {tool} {what}: {wall:.1f} s, {rss / 1e9:.2f} GB (exit {rc})", flush=True)
    agreement = None
    if all((work / f"out-{t}" / "config.json").exists() for t in ("mlx", "mergekit")):
        agreement = compare(work / "out-mlx", work / "out-mergekit", len(fine_tunes), shape.intermediate)

    print()
    print(
        f"{machine_description(args.device)}; family {shape.parameters / 1e9:.2f}B (hidden {shape.hidden}, "
        f"{shape.layers} layers, intermediate {shape.intermediate}), {len(fine_tunes)} experts of 8 prompts, "
        f"gate_mode hidden, best of {args.repeat}"
    )
    print()
    print("| what | tool | wall s | CPU s | peak RSS | mergekit-moe / this tool |")
    print("|---|---|---|---|---|---|")
    for what in ("hidden gates", "whole build"):
        best = {}
        for tool in args.tools:
            ok = [r for r in runs if r.what == what and r.tool == tool and not r.note]
            best[tool] = min(ok, key=lambda r: r.wall) if ok else None
        for tool, r in best.items():
            if r is None:
                note = next((x.note for x in runs if x.tool == tool and x.note), "failed")
                print(f"| {what} | {tool} | - | - | - | {note} |")
                continue
            ref = best.get("mergekit")
            ratio = f"{ref.wall / r.wall:.2f}x" if ref is not None and tool == "mlx" else "-"
            print(f"| {what} | {tool} | {r.wall:.1f} | {r.cpu:.1f} | {r.rss / 1e9:.2f} GB | {ratio} |")
    if agreement is not None:
        print()
        print(f"outputs: {json.dumps(agreement)}")


if __name__ == "__main__":
    main()
