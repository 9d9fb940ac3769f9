"""Scaling of one merge over processes: `mergekit-mlx run` alone, then under `mlx.launch` with N ranks.

Builds (or reuses) the 0.85B family (make_family.py), writes one recipe per method (bench.py's),
and in the same run merges it with 1 process and with each N of --processes under mlx.launch (each
rank its contiguous share of the output shards), inputs in the page cache before every run. Reports
the best wall time of --repeat runs, the ratio to one process, and whether every file of the output
is byte-identical to the one-process output (it must be).

    python benchmarks/distributed_bench.py --processes 1,2                     # CPU, ring backend
    python benchmarks/distributed_bench.py --processes 1,2,4,8 --device gpu    # a multi-GPU host: nccl
    python benchmarks/distributed_bench.py --methods linear,ties --out-shard-size 100M

On a GPU host the ranks use the nccl backend, and rank r gets the GPU r (CUDA_VISIBLE_DEVICES, as
mlx.launch sets it); on the CPU they use the ring backend over 127.0.0.1, and the ranks share the
cores, so more processes than cores cannot help. Each N runs twice: under mlx.launch, and started
directly with the environment mlx.launch gives each rank (`--launchers`): mlx.launch 0.32.4 itself
keeps about one core busy while its processes run (its output-forwarding threads poll a pipe that
is always writable), which on a small CPU is a cost of the launcher, not of the merge.

`--cores-per-process K` pins every process (the one-process baseline too) to K cores of its own and
starts the ranks directly: each rank then has what one process has, as on hosts or GPUs of their own.

    python benchmarks/distributed_bench.py --processes 1,2 --cores-per-process 1   # a 2-core CPU
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_family_in_child, inputs_of, machine_description, read_into_cache, recipe, run_child  # noqa: E402
from make_family import add_shape_arguments, model_names, shape_from_args  # noqa: E402


def launcher() -> str:
    path = Path(sys.executable).parent / "mlx.launch"
    found = str(path) if path.exists() else shutil.which("mlx.launch")
    if found is None:
        sys.exit("mlx.launch not found beside this Python or on PATH (it comes with the mlx package)")
    return found


def free_port(span: int) -> int:
    """A port p with p .. p + span - 1 free on 127.0.0.1 now (mlx.launch's ring listens on them)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span >= 65535:
            continue
        try:
            held = []
            for p in range(port, port + span):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    sys.exit("no run of free ports on 127.0.0.1 for mlx.launch")


def merge_command(recipe_path: Path, out: Path, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "mergekit_mlx", "run", str(recipe_path), str(out), "--no-progress"]
    return command + ["--out-shard-size", args.out_shard_size, "--device", args.device]


def launch_command(n: int, merge: list[str], args: argparse.Namespace) -> list[str]:
    backend = "nccl" if args.device == "gpu" else "ring"
    launch = [launcher(), "--backend", backend, "-n", str(n)]
    if backend == "ring":
        launch += ["--starting-port", str(free_port(n))]
    return launch + ["--"] + merge


def rank_environments(n: int, args: argparse.Namespace, workdir: Path) -> list[dict[str, str]]:
    """What mlx.launch puts in each rank's environment (its launch_ring / launch_nccl)."""
    base = dict(os.environ)
    if n == 1:
        return [base]
    if args.device == "gpu":
        port = free_port(1)
        common = {"NCCL_HOST_IP": "127.0.0.1", "NCCL_PORT": str(port), "MLX_WORLD_SIZE": str(n)}
        return [{**base, **common, "MLX_RANK": str(r), "CUDA_VISIBLE_DEVICES": str(r)} for r in range(n)]
    first = free_port(n)
    hostfile = workdir / f"hosts-{n}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{first + r}"] for r in range(n)]))
    return [{**base, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)} for r in range(n)]


def run_ranks(n: int, merge: list[str], args: argparse.Namespace, log: Path) -> tuple[float, float, int]:
    """n ranks started directly; (wall seconds until the last exits, their CPU seconds, worst exit status)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as out:
        start = time.perf_counter()
        procs = [
            subprocess.Popen(merge, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=pin(r, args.cores_per_process))
            for r, env in enumerate(rank_environments(n, args, log.parent))
        ]
        codes = [p.wait() for p in procs]
        wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu, max(codes, key=abs)


def pin(rank: int, cores: int | None):
    """A preexec_fn keeping a process on its own `cores` cores (rank r: cores r*K .. r*K+K-1)."""
    if not cores:
        return None
    return lambda: os.sched_setaffinity(0, range(rank * cores, (rank + 1) * cores))


def same_files(a: Path, b: Path) -> bool:
    names = sorted(os.listdir(a))
    if names != sorted(os.listdir(b)):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mergekit-mlx-dist-bench"), help="recipes, outputs, logs")
    p.add_argument("--family", type=Path, help="an existing family directory (base/, ft1/, ft2/); default: built in workdir")
    p.add_argument("--processes", default="1,2", help="comma-separated process counts (1 is always run, as the baseline)")
    p.add_argument("--methods", default="ties", help="comma-separated, from bench.py's methods")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--out-shard-size", default="200M", help="output shard size: the unit dealt to the ranks (default 200M)")
    p.add_argument("--repeat", type=int, default=2, help="timed runs per setting; the best is reported (default 2)")
    p.add_argument(
        "--launchers", default="mlx.launch,direct", help="how N > 1 ranks start: mlx.launch, direct (its environment), or both"
    )
    p.add_argument("--cores-per-process", type=int, help="pin each process to this many cores of its own (direct starts only)")
    add_shape_arguments(p)
    args = p.parse_args()
    if args.cores_per_process:
        args.launchers = "direct"  # mlx.launch cannot pin its processes
        most = max(int(c) for c in args.processes.split(","))
        if most * args.cores_per_process > (os.cpu_count() or 1):
            sys.exit(f"{most} processes of {args.cores_per_process} cores need {most * args.cores_per_process} cores")

    shape = shape_from_args(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    root = args.family or args.workdir / "family"
    build_family_in_child(root, shape)
    base, *fts = [root / n for n in model_names(shape)]
    counts = sorted({1, *(int(c) for c in args.processes.split(","))})

    settings = [(1, "one process" + (f" on {args.cores_per_process} core(s)" if args.cores_per_process else ""))] + [
        (n, how) for n in counts if n > 1 for how in args.launchers.split(",")
    ]
    rows = []
    for method in args.methods.split(","):
        recipe_path = args.workdir / f"{method}.yml"
        recipe_path.write_text(recipe(method, base, fts))
        inputs = [f for d in inputs_of(method, base, fts) for f in sorted(d.glob("*.safetensors"))]
        reference = args.workdir / f"{method}-1"
        baseline = None
        for n, how in settings:
            out = args.workdir / f"{method}-{n}"
            best = None
            for i in range(args.repeat):
                shutil.rmtree(out, ignore_errors=True)
                read_into_cache(inputs)
                log = args.workdir / f"{method}-{n}-{how}-{i}.log"
                merge = merge_command(recipe_path, out, args)
                if how == "direct" or args.cores_per_process:
                    wall, cpu, code = run_ranks(n, merge, args, log)
                else:
                    wall, _, cpu, code = run_child(merge if n == 1 else launch_command(n, merge, args), log)
                if code != 0 or not out.is_dir():  # (mlx.launch exits 0 even when a rank failed)
                    sys.exit(f"{method} with {n} process(es) ({how}) failed; see {log}")
                best = wall if best is None else min(best, wall)
                print(f"{method}, {n} process(es), {how}, run {i + 1}: {wall:.2f} s wall, {cpu:.1f} s CPU", flush=True)
            baseline = baseline or best
            identical = "reference" if n == 1 else ("yes" if same_files(out, reference) else "NO")
            pinned = f", {args.cores_per_process} core(s) each" if args.cores_per_process and n > 1 else ""
            rows.append((method, n, how + pinned, best, baseline / best, identical))
            if n != 1:
                shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(reference, ignore_errors=True)

    print()
    print(f"Machine: {machine_description(args.device)}; {time.strftime('%Y-%m-%d')}")
    print(
        f"Family: {shape.parameters / 1e9:.2f}B parameters (hidden {shape.hidden}, {shape.layers} layers), bf16, inputs in the "
        f"page cache; output shards of {args.out_shard_size}; best of {args.repeat}"
    )
    print()
    print("| method | processes | started by | wall s | speed-up vs 1 process | output byte-identical |")
    print("|---|---|---|---|---|---|")
    for method, n, how, wall, ratio, identical in rows:
        print(f"| {method} | {n} | {how} | {wall:.2f} | {ratio:.2f}x | {identical} |")


if __name__ == "__main__":
    main()
