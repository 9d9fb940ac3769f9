"""Where the wall time of one merge goes: a timeline of a whole `mergekit-mlx run`, in process.

Marks the moments that matter (imports done, plan made, first and last input read, first and last
merge done, first and last tensor written, output renamed into place) by wrapping the pipeline's
methods, and prints them as seconds since the interpreter started.
Usage: python benchmarks/merge_timeline.py RECIPE OUT [--device gpu] [--write-threads N]
"""
from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

import mergekit_mlx  # noqa: E402,F401
from mergekit_mlx import merge as merge_fn  # noqa: E402

merge_mod = sys.modules["mergekit_mlx.merge"]
IMPORTED = time.perf_counter() - T0
marks: dict[str, list[float]] = {}
totals: dict[str, float] = {}  # seconds a thread spent in a state, summed
lock = threading.Lock()


def mark(name: str) -> None:
    t = time.perf_counter() - T0
    with lock:
        marks.setdefault(name, []).append(t)


def add_time(name: str, dt: float) -> None:
    with lock:
        totals[name] = totals.get(name, 0.0) + dt


def wrap(obj, attr: str, name: str, before: bool = False) -> None:
    fn = getattr(obj, attr)

    def wrapped(*a, **k):
        if before:
            mark(name + " (start)")
        out = fn(*a, **k)
        mark(name)
        return out

    setattr(obj, attr, wrapped)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("recipe")
    p.add_argument("out")
    p.add_argument("--device", default="gpu")
    p.add_argument("--write-threads", type=int, help="the writer's thread count (1: tensors written in turn)")
    a = p.parse_args()
    if a.write_threads:
        sys.modules["mergekit_mlx.writer"]._WRITE_THREADS = a.write_threads
    wrap(merge_mod, "make_plan", "plan made")
    wrap(merge_mod, "run_plan", "run_plan", before=True)
    wrap(merge_mod._Pipeline, "_load", "inputs read")
    wrap(merge_mod._Pipeline, "done", "output written")
    wrap(merge_mod.kernels, "first_use_checks", "first-use checks")
    output_mod = sys.modules["mergekit_mlx.output"]
    wrap(sys.modules["mergekit_mlx.writer"].SafetensorsWriter, "finish", "writer finished")
    wrap(output_mod, "verify_output", "output verified")
    writer_cls = sys.modules["mergekit_mlx.writer"].SafetensorsWriter
    add = writer_cls.add

    def timed_add(self, name, array):
        t = time.perf_counter()
        add(self, name, array)
        add_time("writer thread: writing", time.perf_counter() - t)

    writer_cls.add = timed_add
    cuda_wait = merge_mod.cuda_mem.wait

    def timed_cuda_wait(event):
        t = time.perf_counter()
        cuda_wait(event)
        add_time("writer thread: waiting for outputs to reach host memory", time.perf_counter() - t)

    merge_mod.cuda_mem.wait = timed_cuda_wait
    orig_init = merge_mod._Pipeline.__init__

    def init(self, *x, **k):
        orig_init(self, *x, **k)
        mark("pipeline ready (self-tests done)")
        work = self._work

        def traced_work():
            me = threading.get_ident()
            ev = merge_mod.mx.eval
            wait = self._wait

            def timed_eval(*arrays):
                t = time.perf_counter()
                ev(*arrays)
                if threading.get_ident() == me:
                    mark("merge evaluated")
                    add_time("merge thread: in mx.eval", time.perf_counter() - t)

            def timed_wait(ready):
                t = time.perf_counter()
                try:
                    return wait(ready)
                finally:
                    if threading.get_ident() == me:
                        add_time("merge thread: waiting for inputs", time.perf_counter() - t)

            self._wait = timed_wait

            merge_mod.mx.eval = timed_eval  # the module's mx is mlx.core: patched for all threads
            try:
                work()
            finally:
                merge_mod.mx.eval = ev

        self.jobs = [traced_work if j == work else j for j in self.jobs]

    merge_mod._Pipeline.__init__ = init
    merge_fn(a.recipe, a.out, device=a.device, force=True, progress=False, copy_tokenizer=False)
    end = time.perf_counter() - T0
    print(f"imports done                      {IMPORTED:6.3f} s")
    for name, ts in sorted(marks.items(), key=lambda kv: kv[1][0]):
        if len(ts) == 1:
            print(f"{name:33s} {ts[0]:6.3f} s")
        else:
            print(f"{name:33s} {ts[0]:6.3f} .. {ts[-1]:6.3f} s  ({len(ts)} times)")
    print(f"{'merge() returned':33s} {end:6.3f} s")
    for name, dt in totals.items():
        print(f"{name}: {dt:.3f} s in all")


if __name__ == "__main__":
    main()
