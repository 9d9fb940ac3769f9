"""Time each kernel against the plain MLX graph it replaces and against the memory floor.

    python benchmarks/kernels_bench.py --elements 67108864        # on the default device
    python benchmarks/kernels_bench.py --elements 4194304 --cpu   # force the CPU

floor = bytes the operation must move at least once / measured copy bandwidth (a bf16 x*2 pass).
"kernels" is the dispatching path (GPU kernels, or the compiled fallback on the CPU); "plain MLX"
is what the kernel replaces: mx.sort for the threshold, the kernels-off graph for the rest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
from ties_profile import family, ties_batch  # noqa: E402

from mergekit_mlx import kernels  # noqa: E402
from mergekit_mlx.kernels import bitlinear, gpu, selection_gpu, sources, task_merge, task_merge_gpu  # noqa: E402
from mergekit_mlx.kernels.task_plan import Sparsify, TaskMerge, plain_divisor  # noqa: E402


def timed(fn, reps: int) -> float:
    mx.eval(fn())  # warm-up: compiles kernels, runs the first-use checks
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def with_kernels(flag: bool, fn):
    def run():
        with kernels.use_kernels(flag):
            return fn()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elements", type=int, default=1 << 24)
    ap.add_argument("--models", type=int, default=3, help="task models in the merges")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--skip-sort", action="store_true", help="skip the mx.sort baseline (slow on a CPU)")
    ap.add_argument("--stages", action="store_true", help="GPU: time the selection's stages and merge variants")
    args = ap.parse_args()
    if args.cpu:
        mx.set_default_device(mx.cpu)
    n, K, reps = args.elements, args.models, args.reps

    key = mx.random.key(0)
    ks = mx.random.split(key, K + 2)
    x32 = mx.random.normal((n,), key=ks[0])
    base = mx.random.normal((n,), key=ks[1]).astype(mx.bfloat16)
    others = [(base.astype(mx.float32) + 0.01 * mx.random.normal((n,), key=ks[2 + i])).astype(mx.bfloat16) for i in range(K)]
    mx.eval(x32, base, *others)

    # one copy, and eight per evaluation (so one sync does not hide a GPU's bandwidth): the faster
    copy_s = min(timed(lambda: base * 2, reps), timed(lambda: [base * (2 + i) for i in range(8)], reps) / 8)
    bw = 4 * n / copy_s  # bytes read + written by a bf16 copy
    sync_s = timed(lambda: base[:1] * 2, reps)
    print(f"device: {mx.default_device()}  backend: {kernels.backend()}  elements: {n:,}  models: {K}")
    print(f"copy bandwidth (bf16 x*2, read+write): {bw / 1e9:.1f} GB/s; one tiny op + eval: {sync_s * 1e3:.3f} ms")
    print("times are per call and include one evaluation (a sync), as in a merge of one tensor\n")

    rows = []

    def row(name, fast, plain, floor_bytes, plain_name="kernels off"):
        floor = floor_bytes / bw
        rows.append((name, fast, plain, plain_name, floor))

    k = n // 2
    sort_s = float("nan") if args.skip_sort else timed(lambda: mx.sort(mx.abs(x32))[n - k], max(1, reps // 2))
    row("magnitude_threshold fp32", timed(lambda: kernels.magnitude_threshold(x32, k), reps), sort_s, 4 * n, "mx.sort")
    row(
        "magnitude_threshold fp32 (fallback)",
        timed(with_kernels(False, lambda: kernels.magnitude_threshold(x32, k)), reps),
        sort_s,
        4 * n,
        "mx.sort",
    )
    row(
        "topk_mask bf16",
        timed(lambda: kernels.topk_mask(others[0], k), reps),
        timed(with_kernels(False, lambda: kernels.topk_mask(others[0], k)), reps),
        2 * n + n,
    )
    row(
        "keep_mask",
        timed(lambda: kernels.random_mask(1, 2, (n,), 0.3), reps),
        timed(with_kernels(False, lambda: kernels.random_mask(1, 2, (n,), 0.3)), reps),
        n,
    )

    merge_bytes = 2 * n * (K + 2)  # read base + K models, write one, bf16
    configs = {
        "task_arithmetic": dict(sparsify=None, consensus=None, normalize=False, rescale=False),
        "ties (density 0.5)": dict(sparsify="magnitude", consensus="sum", normalize=True, rescale=False),
        "dare_ties (density 0.5)": dict(sparsify="random", consensus="sum", normalize=False, rescale=True),
        "dare_linear (density 0.5)": dict(sparsify="random", consensus=None, normalize=False, rescale=True),
    }
    for name, cfg in configs.items():

        def merge(cfg=cfg):
            return kernels.fused_task_merge(base, others, [1.0 / K] * K, densities=[0.5] * K, lam=1.0, seed=1, **cfg)

        row(f"fused {name}", timed(merge, reps), timed(with_kernels(False, merge), reps), merge_bytes)

    def select(gpu_flag):
        def run():
            backend = gpu.backend() if gpu_flag else None
            plans, _ = task_merge.plan_models(base, others, Sparsify.MAGNITUDE, [0.5] * K, False, 1, list(range(K)), backend)
            return [a for p in plans for a in (p.t, p.cut)]

        return run

    row(f"ties selection only ({K} models)", timed(select(True), reps), timed(select(False), reps), 2 * n * (K + 1))

    backend = gpu.backend()
    if backend is not None:  # the merge pass alone, on a selection made beforehand
        plans, sel_rows = task_merge.plan_models(base, others, Sparsify.MAGNITUDE, [0.5] * K, False, 1, list(range(K)), backend)
        mx.eval(sel_rows)
        job = TaskMerge(base, tuple(others), (1.0 / K,) * K, True, True, 1.0, plain_divisor([1.0 / K] * K))

        def merge_pass():
            return task_merge_gpu.merge(backend, job, plans, sel_rows)

        plain_merge = timed(
            lambda: kernels.fused_task_merge(
                base,
                others,
                [1.0 / K] * K,
                densities=[1.0] * K,
                lam=1.0,
                sparsify=None,
                consensus="sum",
                normalize=True,
                rescale=False,
            ),
            reps,
        )
        row(
            "ties merge pass only (selection done)",
            timed(merge_pass, reps),
            plain_merge,
            merge_bytes,
            "compiled graph, no sparsification",
        )

        one = timed(
            lambda: kernels.fused_task_merge(
                base, others, [1.0 / K] * K, densities=[0.5] * K, lam=1.0, seed=1, **configs["ties (density 0.5)"]
            ),
            reps,
        )
        second = family(n, K, seed=1)  # the batches alternate between two families: nothing carried in L2
        row(
            "fused ties, 8 tensors per evaluation (per tensor)",
            timed(lambda: ties_batch(base, others, second=second)[0], reps) / 8,
            one,
            merge_bytes,
            "one tensor per evaluation",
        )
        row(
            "fused ties, 8 tensors pipelined (per tensor)",
            timed(lambda: ties_batch(base, others, pipelined=True, second=second)[0], reps) / 8,
            one,
            merge_bytes,
            "one tensor per evaluation",
        )

    out_f, in_f = 14336, 4096
    t, s = bitlinear.quantize_absmean(mx.random.normal((out_f, in_f), key=ks[0]))
    packed = bitlinear.pack_ternary(t)
    xv = mx.random.normal((1, in_f), key=ks[1]).astype(mx.bfloat16)
    s = s.astype(mx.bfloat16)
    mx.eval(packed, xv, s)
    row(
        f"bitnet matvec {out_f}x{in_f}",
        timed(lambda: bitlinear.bitnet_matmul(xv, packed, s, out_f), reps),
        timed(with_kernels(False, lambda: bitlinear.bitnet_matmul(xv, packed, s, out_f)), reps),
        packed.size,
    )

    if args.stages and gpu.backend() is not None:
        stages(base, others, x32, n, reps, bw)

    print("| operation | kernels (ms) | plain MLX (ms) | speed-up | floor (ms) | x floor |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, fast, plain, plain_name, floor in rows:
        print(
            f"| {name} | {fast * 1e3:.2f} | {plain * 1e3:.2f} ({plain_name}) | {plain / fast:.1f}x | "
            f"{floor * 1e3:.3f} | {fast / floor:.1f} |"
        )
    print("\nkernel first-use checks:", kernels.kernel_status() or "none (CPU path)")


def stages(base, others, x32, n, reps, bw):
    """Where the time of a selection and a merge goes, stage by stage (each stage evaluated alone;
    'x8' rows launch eight and evaluate once, so they show the GPU time without the sync)."""
    backend = gpu.backend()
    ms = lambda fn: timed(fn, reps) * 1e3  # noqa: E731
    print("stage timings (ms):")
    cases = {"3 bf16 task vectors": (base, others), "bf16 tensor": (None, [others[0]]), "fp32 tensor": (None, [x32])}
    for name, (b, xs) in cases.items():
        flats = [a.reshape(-1) for a in ([b] if b is not None else []) + xs]
        hb = b is not None
        ks = [n // 2] * len(xs)
        s, chunks, up = selection_gpu.select_params(n, ks)
        srt = selection_gpu.select_sample(backend, flats, hb, s, up)
        mx.eval(srt)
        counts = selection_gpu.select_count(backend, flats, hb, chunks, srt, up)
        mx.eval(counts)
        res, _ = selection_gpu.select_resolve(backend, flats, hb, srt, up, counts)
        mx.eval(res)
        status = [res.tolist()[8 * m : 8 * m + 8] for m in range(len(xs))]
        t_sample = ms(lambda: selection_gpu.select_sample(backend, flats, hb, s, up))
        t_pass = ms(lambda: selection_gpu.select_count(backend, flats, hb, chunks, srt, up)[1])
        t_pass8 = ms(lambda: [selection_gpu.select_count(backend, flats, hb, chunks, srt, up)[1] for _ in range(8)]) / 8
        t_res = ms(lambda: selection_gpu.select_resolve(backend, flats, hb, srt, up, counts)[0])
        t_launch = ms(lambda: selection_gpu.select_launch(backend, flats, hb, ks)[0])

        def readback():
            r = selection_gpu.select_launch(backend, flats, hb, ks)[0]
            mx.eval(r)
            r.tolist()
            return r

        t_read = ms(readback)
        t_all = ms(lambda: [a for sel in selection_gpu.select(backend, xs, b, ks)[0] for a in (sel.t, sel.cut)])
        print(f"  {name}: status/t/cut/lo/hi/count/rank {status}")
        print(
            f"    sample+sort {t_sample:.3f} | pass {t_pass:.3f} (x8: {t_pass8:.3f} each, "
            f"{2 * len(flats) * n / t_pass8 / 1e6:.0f} GB/s if bf16) | resolve {t_res:.3f} | "
            f"stages 1-3 {t_launch:.3f} | + readback {t_read:.3f} | whole selection {t_all:.3f}"
        )
    K = len(others)
    plans, sel_rows = task_merge.plan_models(base, others, Sparsify.MAGNITUDE, [0.5] * K, False, 1, list(range(K)), backend)
    mx.eval(sel_rows)
    job = TaskMerge(base, tuple(others), (1.0 / K,) * K, True, True, 1.0, plain_divisor([1.0 / K] * K))
    merge_bytes = 2 * n * (K + 2)
    groups_before = task_merge_gpu.MERGE_GROUPS
    try:
        for g in (1, 2, 4, 8):
            task_merge_gpu.MERGE_GROUPS = g  # read at each launch (the grid); the kernel is the same
            one = ms(lambda: task_merge_gpu.merge(backend, job, plans, sel_rows))
            eight = ms(lambda: [task_merge_gpu.merge(backend, job, plans, sel_rows) for _ in range(8)]) / 8
            print(
                f"  merge, {g} groups of 8 per thread: {one:.3f} per call, {eight:.3f} each of 8 "
                f"({merge_bytes / eight / 1e6:.0f} GB/s)"
            )
    finally:
        task_merge_gpu.MERGE_GROUPS = groups_before
    header, _ = sources.kernel_source("task_merge", backend)
    indices = sources.kernel_root().joinpath("cuda_indices.inc").read_text()
    body = (
        sources.model_macros(K, True)
        + indices
        + """
  const uint32_t n = up[0];
  const uint32_t groups = n / 8u;
  for (uint32_t g = GID; g < groups; g += NTHREADS) {
    float b[8];
    float xs[KM][8];
    BLOAD8(8u * g, b);
    UNROLL for (int m = 0; m < KM; ++m) {
      XLOAD8(m, 8u * g, xs[m]);
    }
    float r[8];
    UNROLL for (int j = 0; j < 8; ++j) {
      r[j] = b[j] + xs[0][j] + xs[1][j] + xs[2][j];
    }
    MK_STORE8(out, 8u * g, r);
  }
"""
    )
    if backend != "cuda":
        return
    kern = mx.fast.cuda_kernel(
        name="mk_bw_probe",
        input_names=["base"] + [f"x{m}" for m in range(K)] + ["up"],
        output_names=["out"],
        source=body,
        header=header,
    )
    up = mx.array([n], dtype=mx.uint32)
    for g in (1, 4):

        def probe(g=g):
            return kern(
                inputs=[base] + others + [up],
                template=[("T", mx.bfloat16), ("KM", K)],
                grid=(gpu.stride_grid(n // 8, g), 1, 1),
                threadgroup=(256, 1, 1),
                output_shapes=[(n,)],
                output_dtypes=[mx.bfloat16],
            )[0]

        eight = ms(lambda: [probe() for _ in range(8)]) / 8
        print(
            f"  bandwidth probe (4 bf16 in, 1 out, {g} groups/thread): {ms(probe):.3f} per call, {eight:.3f} each "
            f"of 8 ({merge_bytes / eight / 1e6:.0f} GB/s)"
        )
    # the device's copy bandwidth: 16 bytes per thread and step, read once and written once
    copy = mx.fast.cuda_kernel(
        name="mk_copy_probe",
        input_names=["src", "up"],
        output_names=["out"],
        source="""
  const uint32_t n16 = up[0];
  const uint32_t gid = blockIdx.x * blockDim.x + threadIdx.x;
  for (uint32_t i = gid; i < n16; i += gridDim.x * blockDim.x) {
    reinterpret_cast<uint4*>(out)[i] = reinterpret_cast<const uint4*>(src)[i];
  }
""",
    )
    big = mx.concatenate([base, *others])  # (K + 1) n bf16
    n16 = big.size // 8
    up16 = mx.array([n16], dtype=mx.uint32)
    for per in (1, 4):

        def copy_call(per=per):
            return copy(
                inputs=[big, up16],
                grid=(gpu.stride_grid(n16, per), 1, 1),
                threadgroup=(256, 1, 1),
                output_shapes=[(big.size,)],
                output_dtypes=[mx.bfloat16],
            )[0]

        each = ms(lambda: [copy_call() for _ in range(8)]) / 8
        dev_bw = 4 * big.size / (each / 1e3)
        print(
            f"  copy kernel (16 bytes a thread and step, {per} per thread): {each:.3f} ms each of 8 for "
            f"{2 * big.size / 1e6:.0f} MB: {dev_bw / 1e9:.0f} GB/s read+write; the merge's floor at that "
            f"bandwidth {merge_bytes / dev_bw * 1e3:.3f} ms"
        )
    print(f"  MLX copy floor for the merge: {merge_bytes / bw * 1e3:.3f} ms\n")


if __name__ == "__main__":
    main()
