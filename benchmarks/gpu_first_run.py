"""A merge's first process on a machine against warm ones: whole processes, caches empty, then filled.

The first process on a machine finds no compiled kernel anywhere: not ours (CUDA cubins, native
CPU loops and first-use verdicts under $MERGEKIT_MLX_CACHE), not MLX's (its CUDA JIT's modules
under $MLX_PTX_CACHE_DIR, default $TMPDIR/mlx/<version>/ptx; its CPU compiled graphs under
$TMPDIR/mlx/<version>/cpu), not the CUDA driver's ($CUDA_CACHE_PATH). Every run here gets all
four pointed into a folder of its own: a first run a new, empty one; a warm run the one the last
first run filled. Nothing outside those folders is moved or written, so there is nothing to put
back, whatever happens; the folders are removed at the end (--keep keeps them). Inputs are read
into the page cache before the runs, so both columns are page-cache warm.

Each run is a whole process (`gpu_first_run.py --child`) that merges through
`mergekit_mlx.merge` (what `mergekit-mlx run` calls) and records when it got where: Python up,
mergekit_mlx imported, plan made, first-use checks (each group), first inputs read, first tensor
merged, first and last tensor written. After it the caches tell what was compiled and when the
last of it was written. The first and the warm outputs are compared file by file (SHA-256).

    python3 benchmarks/gpu_first_run.py --device gpu                         # 0.85B family; ties, linear, dare_ties
    python3 benchmarks/gpu_first_run.py --device cpu --hidden 256 --layers 2 --intermediate 512 --vocab 1024 --repeat 1
"""

from __future__ import annotations

import time

_STARTED = time.time()  # a child's first moment (its imports come after)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
METHODS = ("ties", "linear", "dare_ties")
# the environment of a run: every cache a first run fills, by the variable that places it
CACHE_VARS = {
    "MERGEKIT_MLX_CACHE": "mergekit-mlx",  # our cubins, native CPU loops, first-use verdicts
    "MLX_PTX_CACHE_DIR": "mlx-ptx",  # MLX's CUDA JIT (gathers, compiled graphs, fast.cuda_kernel)
    "TMPDIR": "tmp",  # MLX's CPU compiled graphs ($TMPDIR/mlx/<version>/cpu), and its ptx default
    "CUDA_CACHE_PATH": "cuda-driver",  # the driver's cache of PTX compiled to the device
}


# ----------------------------------------------------------------------------- the child: one merge


def child(args: argparse.Namespace) -> None:
    """Merge `args.recipe` into `args.out` and write the timeline (seconds since t0) to `args.events`."""
    t0 = args.t0
    marks: dict[str, float] = {"python up": _STARTED - t0}
    checks: list[dict] = []
    counts = {"read": 0, "merge": 0, "write": 0}

    def mark(name: str) -> None:
        marks.setdefault(name, time.time() - t0)  # the first time only

    import importlib

    import mlx.core as mx

    import mergekit_mlx
    from mergekit_mlx import kernels
    from mergekit_mlx.kernels import gpu

    merge_module = importlib.import_module("mergekit_mlx.merge")  # the module (the package's `merge` is the function)

    mark("mergekit_mlx imported")
    make_plan = merge_module.make_plan

    def timed_plan(*a, **kw):
        plan = make_plan(*a, **kw)
        mark("plan made")
        return plan

    merge_module.make_plan = timed_plan
    first_use_checks = kernels.first_use_checks

    def timed_checks(groups):
        mark("checks started")
        first_use_checks(groups)
        mark("checks done")

    kernels.first_use_checks = timed_checks  # the pipeline calls it through the package
    for name, group in gpu.GROUPS.items():

        def timed(backend, name=name, check=group.check):
            start = time.time()
            ok = check(backend)
            checks.append({"group": name, "start": start - t0, "seconds": time.time() - start, "passed": bool(ok)})
            return ok

        group.check = timed

    def on_event(what: str, task, seconds: float) -> None:
        if what not in counts:  # ("host": a GPU output's copy to host memory)
            return
        counts[what] += 1
        mark({"read": "first inputs read", "merge": "first tensor merged", "write": "first tensor written"}[what])
        if what == "write":
            marks["last tensor written"] = time.time() - t0

    opts = mergekit_mlx.MergeOptions(device=args.device, copy_tokenizer=False, progress=False, random_seed=0)
    mergekit_mlx.merge(Path(args.recipe), Path(args.out), opts, on_event=on_event)
    mark("merge returned")
    info = {
        "marks": marks,
        "checks": checks,
        "counts": counts,
        "backend": kernels.backend(),
        "kernel_status": kernels.kernel_status(),
        "mlx": mx.__version__,
    }
    Path(args.events).write_text(json.dumps(info))


# ----------------------------------------------------------------------------- the parent: runs and tables


@dataclass
class Run:
    method: str
    first: bool  # caches empty at its start
    wall: float = 0.0  # seconds, the whole process
    events: dict = field(default_factory=dict)
    caches: dict = field(default_factory=dict)  # what the caches held after it: name -> (files, last written, s after start)
    error: str = ""


def cache_inventory(root: Path, t0: float) -> dict[str, tuple[int, float | None]]:
    """Files in each cache of a run's folder, and when the last was written (seconds after t0)."""
    kinds = {
        "our CUDA kernels (cubins)": (root / "mergekit-mlx" / "cuda", "*.cubin"),
        "first-use verdicts kept": (root / "mergekit-mlx" / "cuda" / "verified", "*"),
        "our native CPU loops": (root / "mergekit-mlx" / "cpu", "*.so"),
        "MLX CUDA JIT modules": (root / "mlx-ptx", "*"),
        "MLX CPU compiled graphs": (root / "tmp" / "mlx", "*/cpu/*.so"),
        "CUDA driver cache files": (root / "cuda-driver", "**/*"),
    }
    out = {}
    for name, (folder, pattern) in kinds.items():
        files = [f for f in folder.glob(pattern) if f.is_file()] if folder.is_dir() else []
        last = max((f.stat().st_mtime for f in files), default=None)
        out[name] = (len(files), None if last is None else last - t0)
    return out


def default_mlx_caches() -> int:
    """Files in MLX's default caches outside the runs' folders (a run should add none)."""
    base = Path(tempfile.gettempdir()) / "mlx"
    return sum(1 for f in base.glob("*/*/*") if f.is_file()) if base.is_dir() else 0


def run_once(method: str, recipe: Path, out: Path, root: Path, device: str, first: bool, code: Path = REPO) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    for var, sub in CACHE_VARS.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(root / sub)
    env["PYTHONPATH"] = str(code) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    events = root / f"events-{method}.json"
    events.unlink(missing_ok=True)
    log = root / f"log-{method}.txt"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(recipe),
        str(out),
        "--device",
        device,
        "--events",
        str(events),
    ]
    t0 = time.time()
    with open(log, "w") as f:
        code = subprocess.run(cmd + ["--t0", repr(t0)], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    run = Run(method, first, wall=time.time() - t0, caches=cache_inventory(root, t0))
    if code != 0 or not events.exists():
        lines = log.read_text().strip().splitlines()
        run.error = f"exit {code}: {lines[-1] if lines else ''} ({log})".replace("|", "/")
    else:
        run.events = json.loads(events.read_text())
    return run


def commit_of(tree: Path) -> str:
    try:
        got = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "commit unknown"
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "mergekit_mlx", "kernels"], capture_output=True, text=True
    )
    return (
        f"commit {got.stdout.strip()}{' + changes' if dirty.stdout.strip() else ''}" if got.returncode == 0 else "commit unknown"
    )


def digests(out: Path) -> dict[str, str]:
    result = {}
    for f in sorted(out.glob("*.safetensors")):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(64 << 20):
                h.update(chunk)
        result[f.name] = h.hexdigest()
    return result


def median_run(runs: list[Run]) -> Run:
    ok = sorted((r for r in runs if not r.error), key=lambda r: r.wall)
    return ok[(len(ok) - 1) // 2] if ok else runs[0]


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def timeline(first: Run, warm: Run) -> list[str]:
    """Markdown rows: when each run got where (seconds after its process was started)."""
    rows = ["| step | first run (s) | warm run (s) |", "|---|---:|---:|"]
    marks_f, marks_w = first.events.get("marks", {}), warm.events.get("marks", {})
    for name in [
        "python up",
        "mergekit_mlx imported",
        "plan made",
        "checks started",
        "checks done",
        "first inputs read",
        "first tensor merged",
        "first tensor written",
        "last tensor written",
        "merge returned",
    ]:
        rows.append(f"| {name} | {fmt(marks_f.get(name))} | {fmt(marks_w.get(name))} |")
    rows.append(f"| process exited | {first.wall:.2f} | {warm.wall:.2f} |")
    warm_checks = {c["group"]: c for c in warm.events.get("checks", [])}
    for c in first.events.get("checks", []):
        w = warm_checks.get(c["group"])
        verdict = "passed" if c["passed"] else "FAILED"
        rows.append(
            f"| check '{c['group']}' ({verdict}), seconds | {c['seconds']:.2f} | {'skipped (kept)' if w is None else fmt(w['seconds'])} |"
        )
    for name, (n, last) in first.caches.items():
        n_w, _ = warm.caches.get(name, (0, None))
        if n or n_w:
            when = "" if last is None else f", last at {last:.2f} s"
            rows.append(f"| {name}: files after the run | {n}{when} | {n_w} |")
    return rows


def main() -> None:
    sys.path.insert(0, str(HERE))
    import bench  # the family, recipes and page-cache reads of the side-by-side bench (imports MLX: parent only)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default {','.join(METHODS)})")
    p.add_argument("--repeat", type=int, default=3, help="first runs, and warm runs, per method (default 3)")
    p.add_argument(
        "--work", type=Path, default=None, help="folder for the family, outputs and caches (default: a new temporary one)"
    )
    p.add_argument("--family", type=Path, default=None, help="where the family is (or is built; default WORK/family)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (family, caches, logs)")
    p.add_argument(
        "--code",
        type=Path,
        default=REPO,
        help="the tree whose mergekit_mlx runs (default this one; another commit's, for a before/after)",
    )
    bench.add_shape_arguments(p)
    args = p.parse_args()
    made_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="mk-first-run-")) if made_work else args.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        measure(args, bench, work)
    finally:  # the runs' caches and outputs go, whatever happened (the family stays in a given --work)
        if args.keep:
            print(f"\nkept {work}")
        elif made_work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for d in [*work.glob("run-*"), *work.glob("out-*")]:
                shutil.rmtree(d, ignore_errors=True)


def measure(args: argparse.Namespace, bench, work: Path) -> None:
    shape = bench.shape_from_args(args)
    family = args.family or work / "family"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    print(f"machine: {bench.machine_description(args.device)}; Python {sys.version.split()[0]}")
    print(f"code: {args.code.resolve()} ({commit_of(args.code)})")
    print(f"family: {shape.parameters / 1e9:.2f}B parameters per model, {family}")
    bench.build_family_in_child(family, shape)
    dirs = [family / "base"] + [family / f"ft{i + 1}" for i in range(shape.fine_tunes)]
    speed = bench.read_into_cache([f for d in dirs for f in d.glob("*.safetensors")])
    print(f"inputs read into the page cache at {speed:.1f} GB/s")
    env_set = {k: v for k, v in os.environ.items() if k.startswith(("MERGEKIT_MLX_", "MLX_"))}
    if env_set:
        print(f"environment: {env_set} (the cache variables are set per run)")
    before = default_mlx_caches()
    results: dict[str, tuple[list[Run], list[Run], str]] = {}
    for method in methods:
        rp = work / f"{method}.yaml"
        rp.write_text(bench.recipe(method, dirs[0], dirs[1:]))
        firsts, warms, root = [], [], None
        for r in range(args.repeat):
            if root is not None:
                shutil.rmtree(root, ignore_errors=True)
            root = work / f"run-{method}-{r}"
            shutil.rmtree(root, ignore_errors=True)
            firsts.append(run_once(method, rp, work / f"out-{method}-first", root, args.device, True, args.code))
            print(f"  {method}: first run {r + 1}: {firsts[-1].wall:.2f} s {firsts[-1].error}", flush=True)
        for r in range(args.repeat):  # in the caches the last first run filled
            warms.append(run_once(method, rp, work / f"out-{method}-warm", root, args.device, False, args.code))
            print(f"  {method}: warm run {r + 1}: {warms[-1].wall:.2f} s {warms[-1].error}", flush=True)
        a, b = digests(work / f"out-{method}-first"), digests(work / f"out-{method}-warm")
        same = "identical" if a and a == b else ("no output" if not a or not b else "DIFFERENT")
        results[method] = (firsts, warms, same)
        for d in [root, *work.glob(f"out-{method}-*")]:
            shutil.rmtree(d, ignore_errors=True)
    after = default_mlx_caches()
    report(args, results)
    if after > before:
        print(f"\nWARNING: MLX wrote {after - before} files into its default caches ({tempfile.gettempdir()}/mlx): not cold runs")


def report(args: argparse.Namespace, results: dict[str, tuple[list[Run], list[Run], str]]) -> None:
    print(f"\n## First run against warm runs ({args.device}, {args.repeat} + {args.repeat} processes per method)\n")
    print("| method | first run (s): median (min-max) | warm (s): min / median | first / warm median | outputs first vs warm |")
    print("|---|---:|---:|---:|---|")
    for method, (firsts, warms, same) in results.items():
        f = [r.wall for r in firsts if not r.error]
        w = [r.wall for r in warms if not r.error]
        if not f or not w:
            print(f"| {method} | failed: {next((r.error for r in firsts + warms if r.error), 'see logs')} | | | |")
            continue
        fm, wm = statistics.median(f), statistics.median(w)
        print(f"| {method} | {fm:.2f} ({min(f):.2f}-{max(f):.2f}) | {min(w):.2f} / {wm:.2f} | {fm / wm:.2f}x | {same} |")
    for method, (firsts, warms, _) in results.items():
        first, warm = median_run(firsts), median_run(warms)
        if first.error or warm.error:
            continue
        print(
            f"\n### {method}: the median first run and the median warm run, step by step (backend {first.events.get('backend')})\n"
        )
        print("\n".join(timeline(first, warm)))
        status = first.events.get("kernel_status")
        if status:
            print(f"\nkernel groups after the first run: {status}")


if __name__ == "__main__":
    if "--child" in sys.argv:
        cp = argparse.ArgumentParser()
        cp.add_argument("--child", action="store_true")
        cp.add_argument("recipe")
        cp.add_argument("out")
        cp.add_argument("--device", required=True)
        cp.add_argument("--events", required=True)
        cp.add_argument("--t0", type=float, required=True)
        child(cp.parse_args())
    else:
        main()
