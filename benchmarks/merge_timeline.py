"""Where a whole merge process's time goes: a timeline of every stage, tensor by tensor.

Each run is a whole process (`merge_timeline.py --child`) that merges through `mergekit_mlx.merge`
(what `mergekit-mlx run` calls) and records when it got where (Python up, mergekit_mlx imported,
plan made, first-use checks done, shards closed, side files written, verified, state file removed,
manifest written, committed, merge returned) and every pipeline event: each task's inputs read (per reader), merged,
handed to the writer (GPU: found in device memory, or on their way to host memory), written (per
writing thread; on a GPU this includes copying them from device memory), with its bytes; and the
time spent hashing shards for the resume state. The parent prints, per run:

- the steps, in seconds since the process was started;
- per stage: its first start and last end, the seconds its threads were busy, bytes and GB/s;
- a chart of GB read, merged, moved to the host and written in each slice of the run.

`--settings` compares ways of running the same merge, each a comma-separated list of KEY=VALUE,
settings separated by ';' ("" is the code as it is): `lanes=N` writes up to N shards side by side
(`formats/safetensors.py`, 1: one after another), `batch=4G` is the budget of bytes in flight,
`per_eval=N` evaluates up to N tasks together on a GPU, `cache=N` limits MLX's cache of freed
buffers to N bytes, `chunk=1M` reads inputs into GPU memory in pieces of that size
(`kernels/gpu_reads.py`), `writes=mlx` moves outputs to host memory through MLX's host view instead
of the writers copying them from device memory (`kernels/gpu_writes.py`). The outputs of all settings are compared (the same bytes). Inputs are
read into the page cache before the runs; `--sync` flushes dirty pages (an earlier run's output) to
disk before each run, untimed.

    python3 benchmarks/merge_timeline.py --family /dev/shm/fam7b --device gpu --settings "lanes=1;" --repeat 2
    python benchmarks/merge_timeline.py --family /tmp/family --device cpu --method ties
"""

from __future__ import annotations

import time

_STARTED = time.time()  # a child's first moment (its imports come after)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STAGES = ("read", "merge", "merge: staged inputs", "merge: evaluate", "merge: release inputs", "host", "write", "hash")


# ----------------------------------------------------------------------------- the child: one merge


def child(args: argparse.Namespace) -> None:
    t0 = args.t0
    marks: dict[str, float] = {"python up": _STARTED - t0}
    events: list[tuple[str, str, float, float, int, int]] = []  # stage, tensor, end, seconds, bytes, thread id
    lock = threading.Lock()

    def mark(name: str) -> None:
        marks.setdefault(name, time.time() - t0)

    import importlib

    import mergekit_mlx
    from mergekit_mlx import output, pipeline
    from mergekit_mlx.formats import safetensors
    from mergekit_mlx.kernels import staging

    merge_module = importlib.import_module("mergekit_mlx.merge")
    mark("mergekit_mlx imported")
    setting = dict(kv.split("=", 1) for kv in args.setting.split(",") if kv)
    if "lanes" in setting:
        safetensors._WRITE_LANES = int(setting["lanes"])
    if "per_eval" in setting:
        pipeline.GPU_TASKS_PER_EVAL = int(setting["per_eval"])
    if "chunk" in setting:  # bytes per pread and copy when reading into GPU memory (kernels/gpu_reads.py)
        from mergekit_mlx.arguments import parse_size
        from mergekit_mlx.kernels import gpu_reads

        gpu_reads.CHUNK = parse_size(setting["chunk"])
    if setting.get("writes") == "mlx":  # outputs to host memory through MLX's host view (kernels/gpu_writes.py)
        from mergekit_mlx.kernels import gpu_writes

        os.environ[gpu_writes.ENV_OFF] = "1"
    if "cache" in setting:  # MLX's cache of freed buffers, in bytes (0: none is kept for reuse)
        import mlx.core as mx

        mx.set_cache_limit(int(setting["cache"]))

    def wrap(owner, name: str, before: str | None, after: str):
        real = getattr(owner, name)

        def timed(*a, **kw):
            if before:
                mark(before)
            result = real(*a, **kw)
            mark(after)
            return result

        setattr(owner, name, timed)

    wrap(merge_module, "make_plan", None, "plan made")
    wrap(mergekit_mlx.kernels, "first_use_checks", None, "checks done")
    wrap(safetensors.SafetensorsWriter, "finish", "shards closing", "shards closed")
    wrap(output, "verify_output", "side files written", "verified")
    wrap(output, "_write_manifest", "manifest writing", "manifest written")
    wrap(output, "_commit_dir", "committing", "committed")
    wrap(output.PartialOutput, "finished", "state closing", "state closed")

    class TimedOs:  # the output module's `os`, its unlinks timed (the state file's, before the manifest)
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def unlink(path, *a, **kw):
            state = Path(path).name == output.STATE_FILE
            if state:
                mark("state file removing")
            os.unlink(path, *a, **kw)
            if state:
                mark("state file removed")

    output.os = TimedOs()

    real_digest = safetensors.new_digest

    class TimedDigest:  # the background hash of a shard, timed
        def __init__(self):
            self.h = real_digest()

        def update(self, data) -> None:
            start = time.time()
            self.h.update(data)
            with lock:
                events.append(("hash", "", time.time() - t0, time.time() - start, len(data), threading.get_native_id()))

        def hexdigest(self) -> str:
            return self.h.hexdigest()

    safetensors.new_digest = TimedDigest

    def timed_part(stage: str, fn):  # a part of the merge thread's work, as an event of its own
        def run(*a, **kw):
            start = time.time()
            try:
                return fn(*a, **kw)
            finally:
                with lock:
                    events.append((stage, "", time.time() - t0, time.time() - start, 0, threading.get_native_id()))

        return run

    mergekit_mlx.kernels.evaluate_together = timed_part("merge: evaluate", mergekit_mlx.kernels.evaluate_together)
    staging.Staging.arrays = staticmethod(timed_part("merge: staged inputs", staging.Staging.arrays))
    staging.Staging.release = timed_part("merge: release inputs", staging.Staging.release)
    readers: dict[str, int] = {}  # tensor -> read events so far (a task's inputs may come from several readers)
    tasks: dict[str, int] = {}  # tensor -> its input bytes

    def on_event(what: str, task, seconds: float) -> None:
        now = time.time() - t0
        nbytes = {"read": 0, "merge": task.in_bytes, "host": task.out.nbytes, "write": task.out.nbytes}[what]
        with lock:
            if what == "read":
                readers[task.out.name] = readers.get(task.out.name, 0) + 1
            events.append((what, task.out.name, now, seconds, nbytes, threading.get_native_id()))
            if what == "read":
                tasks[task.out.name] = task.in_bytes

    opts = mergekit_mlx.MergeOptions(device=args.device, copy_tokenizer=False, progress=False, random_seed=0, force=True)
    if "batch" in setting:
        from mergekit_mlx.arguments import parse_size

        opts.batch_bytes = parse_size(setting["batch"])
    mergekit_mlx.merge(Path(args.recipe), Path(args.out), opts, on_event=on_event)
    mark("merge returned")
    # a task's input bytes, shared among the reader events that loaded them
    events = [(s, n, end, sec, tasks[n] // readers[n] if s == "read" else b, th) for s, n, end, sec, b, th in events]
    lanes = getattr(safetensors, "_WRITE_LANES", 1)
    main_id = threading.get_native_id()
    info = {"marks": marks, "events": events, "lanes": lanes, "cpu": cpu_by_role(events, main_id)}
    Path(args.events).write_text(json.dumps(info))


def cpu_by_role(events: list, main_id: int) -> dict[str, float]:
    """CPU seconds of this process's threads so far, by what each did: the stages of the events
    seen on it (a pipeline thread runs one job in a merge), the main thread, or its own name."""
    roles: dict[int, set[str]] = {}
    for stage, *_, thread in events:
        roles.setdefault(thread, set()).add(stage)
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        tid = int(task.name)
        if tid == main_id:
            role = "main thread (imports, plan, checks; writing with one lane)"
        elif tid in roles:
            role = "+".join(sorted(roles[tid]))
        else:
            role = "other: " + stat[stat.index("(") + 1 : stat.rindex(")")]
            if seconds >= 0.05:  # a busy thread that reported no event (MLX's own threads): one row each
                role += f" (thread {tid})"
        out[role] = out.get(role, 0.0) + seconds
    return out


# ----------------------------------------------------------------------------- the parent: runs and tables


def run_once(recipe: Path, out: Path, device: str, setting: str, events: Path, sync: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    if sync:
        os.sync()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(recipe), str(out), "--device", device]
    cmd += ["--events", str(events), "--setting", setting]
    t0 = time.time()
    done = subprocess.run(cmd + ["--t0", repr(t0)], capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if done.returncode != 0:
        print(f"  the merge failed (exit {done.returncode}):\n{done.stderr[-3000:]}", flush=True)
        return {}
    info = json.loads(events.read_text())
    info["marks"]["process exited"] = wall
    info["wall"] = wall
    return info


def stage_rows(info: dict) -> list[str]:
    """Per stage: first start, last end, busy seconds (all threads), threads, GB, GB/s over its span."""
    rows = [
        "| stage | first start s | last end s | span s | busy s (threads) | GB | GB/s over span |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for stage in STAGES:
        evs = [e for e in info["events"] if e[0] == stage]
        if not evs:
            continue
        first = min(e[2] - e[3] for e in evs)
        last = max(e[2] for e in evs)
        busy = sum(e[3] for e in evs)
        nbytes = sum(e[4] for e in evs)
        threads = len({e[5] for e in evs})
        span = max(last - first, 1e-9)
        rows.append(
            f"| {stage} | {first:.2f} | {last:.2f} | {span:.2f} | {busy:.2f} ({threads}) | {nbytes / 1e9:.2f} | "
            f"{nbytes / span / 1e9:.1f} |"
        )
    return rows


def chart(info: dict, slice_s: float) -> list[str]:
    """GB of each stage done in each slice of the run (an event's bytes spread over its seconds)."""
    evs = [e for e in info["events"] if e[0] in STAGES and e[4]]
    if not evs:
        return []
    start = min(e[2] - e[3] for e in evs)
    end = max(e[2] for e in evs)
    n = max(1, int((end - start) / slice_s) + 1)
    bins = {s: [0.0] * n for s in STAGES}
    for stage, _, stop, seconds, nbytes, _ in evs:
        begin = stop - seconds
        for k in range(int((begin - start) / slice_s), min(n, int((stop - start) / slice_s) + 1)):
            lo, hi = start + k * slice_s, start + (k + 1) * slice_s
            overlap = min(hi, stop) - max(lo, begin)
            share = overlap / seconds if seconds > 0 else (1.0 if lo <= stop < hi else 0.0)
            bins[stage][k] += nbytes * max(0.0, share) / 1e9
    used = [s for s in STAGES if any(bins[s])]
    rows = ["| from s | " + " | ".join(f"{s} GB" for s in used) + " |", "|---:|" + "---:|" * len(used)]
    for k in range(n):
        rows.append(f"| {start + k * slice_s:.2f} | " + " | ".join(f"{bins[s][k]:.2f}" for s in used) + " |")
    return rows


def step_rows(runs: dict[str, dict]) -> list[str]:
    names = [
        "python up",
        "mergekit_mlx imported",
        "plan made",
        "checks done",
        "shards closing",
        "shards closed",
        "side files written",
        "verified",
        "state closing",
        "state closed",
        "state file removing",
        "state file removed",
        "manifest writing",
        "manifest written",
        "committing",
        "committed",
        "merge returned",
        "process exited",
    ]
    rows = ["| step (s since start) | " + " | ".join(runs) + " |", "|---|" + "---:|" * len(runs)]
    for name in names:
        rows.append(f"| {name} | " + " | ".join(f"{r['marks'].get(name, float('nan')):.2f}" for r in runs.values()) + " |")
    for label, stage, pick in (("first input read", "read", min), ("last tensor written", "write", max)):
        vals = []
        for r in runs.values():
            evs = [e[2] - (e[3] if pick is min else 0) for e in r["events"] if e[0] == stage]
            vals.append(f"{pick(evs):.2f}" if evs else "-")
        rows.append(f"| {label} | " + " | ".join(vals) + " |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs=2, metavar=("RECIPE", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--events", help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    p.add_argument("--family", type=Path, help="a family directory (base/, ft1/, ft2/: benchmarks/make_family.py)")
    p.add_argument("--method", default="ties", help="a method of bench.py's recipes (default ties)")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--settings", default="", help="settings to compare, ';'-separated (see above; default: the code's)")
    p.add_argument("--setting", default="", help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=1, help="runs of each setting; the fastest is shown (default 1)")
    p.add_argument("--slice", type=float, default=0.25, help="seconds per row of the chart (default 0.25)")
    p.add_argument(
        "--work", type=Path, default=Path("/tmp"), help="outputs and records go in a new folder inside (default %(default)s)"
    )
    p.add_argument("--sync", action="store_true", help="flush dirty pages to disk before each run (untimed)")
    args = p.parse_args()
    if args.child:
        args.recipe, args.out = args.child
        child(args)
        sys.stdout.flush()
        os._exit(0)  # as `mergekit-mlx run` ends a merge: no interpreter teardown (mergekit_mlx/cli.py)
    if args.family is None:
        p.error("--family is needed")
    args.work.mkdir(parents=True, exist_ok=True)
    args.work = Path(tempfile.mkdtemp(prefix="merge-timeline-", dir=args.work))  # ours alone, removed at the end
    try:
        compare(args)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)


def compare(args: argparse.Namespace) -> None:
    """Run every setting (`--settings`) `--repeat` times in `args.work` and print the tables."""
    sys.path.insert(0, str(HERE))
    import bench

    base, ft1, ft2 = (args.family / n for n in ("base", "ft1", "ft2"))
    recipe = args.work / f"{args.method}.yml"
    recipe.write_text(bench.recipe(args.method, base, [ft1, ft2]))
    inputs = [f for d in bench.inputs_of(args.method, base, [ft1, ft2]) for f in d.glob("*.safetensors")]
    print(f"machine: {bench.machine_description(args.device)}; family {args.family}; {args.method}", flush=True)
    settings = args.settings.split(";")
    best: dict[str, dict] = {}
    digests: dict[str, dict[str, str]] = {}
    for k, setting in enumerate(settings):
        name = setting or "as it is"
        out = args.work / f"out-{k}"
        for _ in range(args.repeat):
            bench.read_into_cache(inputs)
            info = run_once(recipe, out, args.device, setting, args.work / "events.json", args.sync)
            if not info:
                break
            print(f"  {name}: {info['wall']:.2f} s", flush=True)
            if name not in best or info["wall"] < best[name]["wall"]:
                best[name] = info
        from mergekit_mlx.digest import file_digest

        if name in best:
            digests[name] = {f.name: file_digest(f) for f in sorted(out.glob("*.safetensors"))}
        shutil.rmtree(out, ignore_errors=True)
    for name, info in best.items():
        print(f"\n### {name} (shard lanes at most {info['lanes']}), {info['wall']:.2f} s\n")
        print("\n".join(stage_rows(info)))
        print("\n| threads (what they did) | CPU s |\n|---|---:|")
        for role, seconds in sorted(info["cpu"].items(), key=lambda kv: -kv[1]):
            if seconds >= 0.01:
                print(f"| {role} | {seconds:.2f} |")
        print(f"| all | {sum(info['cpu'].values()):.2f} |")
        print()
        print("\n".join(chart(info, args.slice)))
    print("\n### steps, fastest run of each setting\n")
    print("\n".join(step_rows(best)))
    same = len({json.dumps(d, sort_keys=True) for d in digests.values()}) == 1
    if digests:
        print(f"\noutputs {'identical' if same else 'DIFFERENT'} across settings ({len(next(iter(digests.values())))} shards)")


if __name__ == "__main__":
    main()
