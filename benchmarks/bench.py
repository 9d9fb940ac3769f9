"""Side-by-side merge benchmark: mergekit-mlx against mergekit 0.1.5 on the same recipes.

Builds (or reuses) a Llama-shaped family — a base and two fine-tunes, bf16, random weights, the
0.85B reference shape unless told otherwise — writes one recipe per method, reads the inputs
once so they sit in the page cache, then runs each tool on each recipe as a subprocess and
records its wall time and peak RSS. The floor is the time to move the bytes at all: (bytes read
+ bytes written) over the copy bandwidth measured here (the best of a one- and an all-core
memcpy), so "of floor" is floor time / wall time (1.0 would be memory speed).

    python benchmarks/bench.py                              # CPU, every method, both tools
    python benchmarks/bench.py --methods ties --tools mlx   # one method, mergekit-mlx only
    python benchmarks/bench.py --device gpu                 # MLX on the GPU (mergekit with --cuda)
    python benchmarks/bench.py --hidden 4096 --layers 32 --intermediate 11008 --methods ties --tools mlx

mergekit is looked for as --mergekit, then /tmp/mkvenv/bin/mergekit-yaml, then mergekit-yaml on
PATH; when none is found the table says so and lists mergekit-mlx alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_family import Shape, add_shape_arguments, shape_from_args  # noqa: E402

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp")


def recipe(method: str, base: Path, fts: list[Path]) -> str:
    """The benchmark's recipe for a method, in mergekit's YAML (both tools read the same file)."""
    ft1, ft2 = fts[0], fts[1]
    if method == "linear":
        return (
            f"merge_method: linear\ndtype: bfloat16\nmodels:\n"
            f"  - model: {base}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {ft1}\n    parameters: {{weight: 0.3}}\n"
            f"  - model: {ft2}\n    parameters: {{weight: 0.2}}\n"
        )
    if method == "slerp":
        return (
            f"merge_method: slerp\ndtype: bfloat16\nbase_model: {base}\nparameters: {{t: 0.4}}\n"
            f"models:\n  - model: {base}\n  - model: {ft1}\n"
        )
    density = "" if method == "task_arithmetic" else ", density: 0.5"
    return (
        f"merge_method: {method}\ndtype: bfloat16\nbase_model: {base}\nmodels:\n"
        f"  - model: {ft1}\n    parameters: {{weight: 0.6{density}}}\n"
        f"  - model: {ft2}\n    parameters: {{weight: 0.4{density}}}\n"
    )


def inputs_of(method: str, base: Path, fts: list[Path]) -> list[Path]:
    return [base, fts[0]] if method == "slerp" else [base, *fts[:2]]


def model_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


# ----------------------------------------------------------------------------- the machine


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 3) -> float:
    """Bytes copied per second by a large memcpy, the best of one thread and one per core.

    Measured in a child process: a child's peak RSS counts its parent's at the fork, so the
    parent of the timed runs must stay small.
    """
    code = f"""
import os, threading, time
import numpy as np
n = {nbytes}
src = np.ones(n, dtype=np.uint8); dst = np.zeros(n, dtype=np.uint8)
best = 0.0
for threads in sorted({{1, os.cpu_count() or 1}}):
    step = -(-n // threads)
    for _ in range({repeats}):
        t0 = time.perf_counter()
        ws = [threading.Thread(target=np.copyto, args=(dst[a:a + step], src[a:a + step])) for a in range(0, n, step)]
        [w.start() for w in ws]; [w.join() for w in ws]
        best = max(best, n / (time.perf_counter() - t0))
print(best)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def read_into_cache(paths: list[Path]) -> float:
    """Read every file once (so later runs find them in the page cache); returns the read GB/s."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    total, start = 0, time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total / (time.perf_counter() - start) / 1e9


def interpreter_of(script: str) -> str:
    """The Python a console script runs under (its #! line), else this one."""
    try:
        with open(script, "rb") as f:
            first = f.readline().decode(errors="replace").strip()
    except OSError:
        return sys.executable
    python = first[2:].split()[0] if first.startswith("#!") and len(first) > 2 else ""
    return python if python and Path(python).exists() else sys.executable


def compile_bytecode(pythons: list[str]) -> float:
    """Compile the bytecode of every package these interpreters import from, and of mergekit_mlx,
    as `pip install` leaves an installed package; returns the seconds it took. Without it, a
    machine that sets PYTHONDONTWRITEBYTECODE=1 and installs with --no-compile has every run
    compile each module it imports (0.8-0.9 s of a GPU merge, benchmarks/RESULTS.md 21)."""
    start = time.perf_counter()
    where = "import sysconfig as s; print(*{s.get_path('purelib'), s.get_path('platlib')}, sep=chr(10))"
    ours = "import importlib.util as u; print(*u.find_spec('mergekit_mlx').submodule_search_locations, sep=chr(10))"
    for python in dict.fromkeys(pythons):
        dirs = subprocess.run([python, "-c", where], capture_output=True, text=True).stdout.split("\n")
        if python == sys.executable:
            dirs += subprocess.run([python, "-c", ours], capture_output=True, text=True).stdout.split("\n")
        dirs = [d for d in dict.fromkeys(dirs) if d and Path(d).is_dir()]
        # a failure to compile some file (an example in a package's tests) leaves it as it was
        subprocess.run([python, "-m", "compileall", "-q", "-j", "0", *dirs], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def machine_description(device: str) -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = f"{os.cpu_count()}-core {platform.machine()} CPU, {mem:.0f} GiB"
    if device == "gpu":
        try:
            gpu = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                .stdout.strip()
                .splitlines()[0]
            )
            return f"{gpu} GPU; host: {cpu}"
        except (OSError, IndexError, subprocess.SubprocessError):
            return f"GPU (nvidia-smi unavailable); host: {cpu}"
    return cpu


def build_family_in_child(root: Path, shape: Shape) -> None:
    """Build (or find) the family in a child process: this one must stay small (see copy_bandwidth)."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import make_family as f; "
        f"f.build_family(__import__('pathlib').Path({str(root)!r}), f.Shape(**{shape.__dict__!r}))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- running


@dataclass
class Run:
    method: str
    tool: str
    wall: float | None = None
    rss: int | None = None  # bytes
    cpu: float | None = None  # user + system seconds of the child
    note: str = ""


def run_child(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, int, float, int]:
    """Run cmd; returns (wall seconds, peak RSS bytes, CPU seconds of the child, exit code)."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime, proc.returncode


def find_mergekit(explicit: str | None) -> str | None:
    for c in (explicit, "/tmp/mkvenv/bin/mergekit-yaml", shutil.which("mergekit-yaml")):
        if c and Path(c).exists():
            return c
    return None


def tool_command(tool: str, recipe_path: Path, out: Path, args: argparse.Namespace, mergekit: str | None) -> list[str]:
    if tool == "mergekit":
        cmd = [mergekit, str(recipe_path), str(out), "--no-copy-tokenizer", "--random-seed", "0", "--quiet"]
        return cmd + (["--cuda"] if args.device == "gpu" else [])
    cmd = [
        sys.executable,
        "-m",
        "mergekit_mlx",
        "run",
        str(recipe_path),
        str(out),
        "--force",
        "--no-progress",
        "--no-copy-tokenizer",
        "--random-seed",
        "0",
        "--device",
        args.device,
    ]
    return cmd + args.mlx_arg


def compare_outputs(a: Path, b: Path) -> str:
    """The two outputs' largest difference, computed in a child (to keep this process small)."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench; print(bench.output_difference({str(a)!r}, {str(b)!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else f"compare failed: {out.stderr.strip()[-200:]}"


def output_difference(a: str, b: str, limit: int = 8) -> str:
    """Largest |a - b| relative to max |a| over a few tensors (bf16 rounding is ~4e-3)."""
    import mlx.core as mx

    a, b = Path(a), Path(b)

    fa = sorted(a.glob("*.safetensors"))
    fb = sorted(b.glob("*.safetensors"))
    ta = {k: v for f in fa for k, v in mx.load(str(f)).items()}
    tb = {k: v for f in fb for k, v in mx.load(str(f)).items()}
    names = sorted(set(ta) & set(tb))
    if len(names) != len(ta) or len(names) != len(tb):
        return f"tensor sets differ ({len(ta)} vs {len(tb)})"
    step = max(1, len(names) // limit)
    worst = 0.0
    for n in names[::step]:
        x, y = ta[n].astype(mx.float32), tb[n].astype(mx.float32)
        scale = max(mx.max(mx.abs(x)).item(), 1e-12)
        worst = max(worst, mx.max(mx.abs(x - y)).item() / scale)
    return f"max rel diff {worst:.1e}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/mergekit-mlx-bench"),
        help="family cache, recipes, outputs and logs (default /tmp/mergekit-mlx-bench)",
    )
    p.add_argument("--family", type=Path, help="an existing family directory (base/, ft1/, ft2/) to use")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--tools", default="mergekit,mlx", help="comma-separated: mergekit, mlx")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--mergekit", help="path of mergekit-yaml (default /tmp/mkvenv/bin/mergekit-yaml or PATH)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per tool and method; the fastest counts")
    p.add_argument("--warmup", action="store_true", help="one untimed run of each tool and method first")
    p.add_argument("--compare", action="store_true", help="compare the two tools' outputs (a few tensors)")
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="leave the tools' bytecode as it is (by default it is compiled first, as pip install does)",
    )
    p.add_argument("--mlx-arg", action="append", default=[], help="extra argument for mergekit-mlx run (repeatable)")
    add_shape_arguments(p)
    args = p.parse_args()
    shape: Shape = shape_from_args(args)
    methods = [m for m in args.methods.split(",") if m]
    tools = [t for t in args.tools.split(",") if t]
    for m in methods:
        if m not in METHODS:
            p.error(f"--methods: {m!r} is not one of {', '.join(METHODS)}")

    root = args.family or args.workdir / (f"family-h{shape.hidden}-l{shape.layers}-i{shape.intermediate}-v{shape.vocab}")
    print(f"family: {root} ({shape.parameters / 1e9:.2f}B parameters per model)", flush=True)
    if not args.family:
        build_family_in_child(root, shape)
    base, *fts = [root / "base", root / "ft1", root / "ft2"]
    work = args.workdir / "runs"
    work.mkdir(parents=True, exist_ok=True)

    mergekit = find_mergekit(args.mergekit) if "mergekit" in tools else None
    notes = []
    if "mergekit" in tools and mergekit is None:
        notes.append("mergekit is not installed (no mergekit-yaml found): its rows are skipped")
        tools = [t for t in tools if t != "mergekit"]

    bw = copy_bandwidth()
    read_gbs = read_into_cache([f for d in (base, *fts) for f in d.glob("*.safetensors")])
    print(f"machine: {machine_description(args.device)}", flush=True)
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s; page-cache read {read_gbs:.1f} GB/s", flush=True)
    if args.no_compile:
        print(f"bytecode left as it is (sys.flags.dont_write_bytecode={sys.flags.dont_write_bytecode})", flush=True)
    else:
        pythons = [sys.executable] + ([interpreter_of(mergekit)] if mergekit else [])
        print(f"bytecode of both tools' packages compiled in {compile_bytecode(pythons):.1f} s", flush=True)

    runs: list[Run] = []
    sizes: dict[str, tuple[int, int]] = {}
    for method in methods:
        rp = work / f"{method}.yml"
        rp.write_text(recipe(method, base, fts))
        inputs = [f for d in inputs_of(method, base, fts) for f in d.glob("*.safetensors")]
        read = sum(f.stat().st_size for f in inputs)
        sizes[method] = (read, model_bytes(base))
        outs = {}
        for tool in tools:
            out = work / f"out-{tool}-{method}"
            log = work / f"{tool}-{method}.log"
            cmd = tool_command(tool, rp, out, args, mergekit)
            r = Run(method, tool)
            walls = []
            for i in range(int(args.warmup) + args.repeat):
                shutil.rmtree(out, ignore_errors=True)
                read_into_cache(inputs)  # the page cache here is reclaimed proactively: refill it per run
                # every run starts with no dirty pages: an earlier output still being written back
                # (the other tool's, kept for --compare) would throttle this run's writes
                os.sync()
                wall, rss, cpu, code = run_child(cmd, log)
                if code != 0:
                    r.note = f"failed (exit {code}), see {log}"
                    break
                if i >= int(args.warmup):
                    walls.append(wall)
                if i >= int(args.warmup) and (r.wall is None or wall < r.wall):
                    r.wall, r.rss, r.cpu = wall, rss, cpu
            every = f"  (runs: {' '.join(f'{w:.2f}' for w in walls)})" if len(walls) > 1 else ""
            print(
                f"  {method:16s} {tool:9s} "
                + (f"{r.wall:7.2f} s  {r.rss / 1e9:5.2f} GB  cpu {r.cpu:6.2f} s{every}" if r.wall else r.note),
                flush=True,
            )
            runs.append(r)
            outs[tool] = out
        if args.compare and len(outs) == 2 and all(r.wall for r in runs[-2:]):
            runs[-1].note = compare_outputs(outs["mergekit"], outs["mlx"])
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)

    print()
    print(f"Machine: {machine_description(args.device)}; MLX device: {args.device}")
    print(
        f"Family: {shape.parameters / 1e9:.2f}B parameters per model (hidden {shape.hidden}, {shape.layers} layers, "
        f"intermediate {shape.intermediate}, vocab {shape.vocab}), bf16, inputs in the page cache"
    )
    print(f"Copy bandwidth: {bw / 1e9:.1f} GB/s (floor = (bytes read + bytes written) / copy bandwidth)")
    for n in notes:
        print(f"Note: {n}")
    print()
    print("| method | tool | wall s | CPU s | peak RSS GB | GB/s | of floor | speed-up vs mergekit | RSS vs mergekit | note |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    ref = {r.method: r for r in runs if r.tool == "mergekit" and r.wall}
    for r in runs:
        read, written = sizes[r.method]
        if r.wall is None:
            print(f"| {r.method} | {r.tool} | - | - | - | - | - | - | - | {r.note} |")
            continue
        moved = read + written
        floor = moved / bw
        mk = ref.get(r.method)
        speed = f"{mk.wall / r.wall:.1f}x" if mk else "-"
        rss = f"{100 * r.rss / mk.rss:.0f}%" if mk else "-"
        name = "mergekit 0.1.5" if r.tool == "mergekit" else "mergekit-mlx"
        print(
            f"| {r.method} | {name} | {r.wall:.2f} | {r.cpu:.1f} | {r.rss / 1e9:.2f} | {moved / r.wall / 1e9:.2f} | "
            f"{floor / r.wall:.2f} | {speed} | {rss} | {r.note} |"
        )


if __name__ == "__main__":
    main()
