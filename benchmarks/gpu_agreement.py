"""CPU against GPU on the same inputs: thresholds, top-k masks and DARE masks bit-identical, merged
tensors within one bf16 rounding. Run on a machine with an MLX GPU backend; exits 1 on a mismatch.

    python benchmarks/gpu_agreement.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mergekit_mlx import kernels  # noqa: E402
from mergekit_mlx.kernels import bitlinear, gpu, selection, selection_gpu  # noqa: E402


def on(device, fn):
    mx.set_default_device(device)
    try:
        out = fn()
        mx.eval(out)
        return out
    finally:
        mx.set_default_device(mx.gpu)


def as_np(x):
    return np.array(x.astype(mx.float32)) if x.dtype == mx.bfloat16 else np.array(x)


def main() -> int:
    if not (mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())):
        print("no GPU backend in this MLX build")
        return 1
    mx.set_default_device(mx.gpu)
    print(f"backend: {kernels.backend()}")
    rows, ok = [], True

    def record(name, good, detail):
        nonlocal ok
        ok &= bool(good)
        rows.append((name, "ok" if good else "MISMATCH", detail))

    n = 1 << 22
    key = mx.random.key(7)
    ks = mx.random.split(key, 6)
    base = mx.random.normal((n,), key=ks[0]).astype(mx.bfloat16)
    others = [(base.astype(mx.float32) + 0.01 * mx.random.normal((n,), key=ks[1 + i])).astype(mx.bfloat16) for i in range(3)]
    x32 = mx.random.normal((n,), key=ks[4])
    mx.eval(base, *others, x32)

    for name, x in (("fp32", x32), ("bf16 task vector", others[0] - base)):
        for k in (1, n // 100, n // 2, n - 1):
            g = on(mx.gpu, lambda: kernels.magnitude_threshold(x, k))
            c = on(mx.cpu, lambda: kernels.magnitude_threshold(x, k))
            record(f"threshold {name} k={k}", g.item() == c.item(), f"{g.item():.6g}")
            gm = on(mx.gpu, lambda: kernels.topk_mask(x, k))
            cm = on(mx.cpu, lambda: kernels.topk_mask(x, k))
            record(f"topk_mask {name} k={k}", mx.array_equal(gm, cm).item(), f"{int(gm.sum().item())} kept")

    # the selection's other paths on purpose: k-th strictly between splitters (a collecting pass),
    # and a bracket that misses (the radix fallback)
    backend = gpu.backend()
    for override in ("between", "outside"):
        g = selection_gpu.select(backend, others, base, [n // 100, n // 2, n - 7], override)[0]
        with mx.stream(mx.cpu):
            b32 = base.astype(mx.float32)
            c = [selection.select_fallback(selection.delta_bits(o, b32), k) for o, k in zip(others, [n // 100, n // 2, n - 7])]
            same = all(int(a.t.item()) == int(b.t.item()) and int(a.cut.item()) == int(b.cut.item()) for a, b in zip(g, c))
        record(f"selection forced '{override}', 3 task vectors", same, "t and cut per model")

    for p in (0.1, 0.5, 0.9):
        g = on(mx.gpu, lambda: kernels.random_mask(42, kernels.stream_id("w", 1), (n,), p))
        c = on(mx.cpu, lambda: kernels.random_mask(42, kernels.stream_id("w", 1), (n,), p))
        record(f"DARE keep_mask p={p}", mx.array_equal(g, c).item(), f"{g.mean().item():.4f} kept")

    configs = {
        "task_arithmetic": dict(sparsify=None, consensus=None, normalize=False, rescale=False),
        "ties": dict(sparsify="magnitude", consensus="sum", normalize=True, rescale=False),
        "ties + rescale": dict(sparsify="magnitude", consensus="sum", normalize=True, rescale=True),
        "dare_ties": dict(sparsify="random", consensus="sum", normalize=False, rescale=True),
        "dare_linear": dict(sparsify="random", consensus=None, normalize=False, rescale=True),
    }
    for name, cfg in configs.items():

        def merge(cfg=cfg):
            return kernels.fused_task_merge(base, others, [0.5, 0.3, -0.2], densities=[0.3, 0.5, 1.0], lam=1.0, seed=3, **cfg)

        g, c = as_np(on(mx.gpu, merge)), as_np(on(mx.cpu, merge))
        diff = np.abs(g.astype(np.float64) - c)
        # one bf16 unit in the last place of the result; where base + delta cancels, float32
        # rounding of the delta (|base| * 2^-20 at most, from the order of the L1 sums) is visible
        allowed = np.maximum(np.abs(g), np.abs(c)) * 2.0**-7 + np.abs(as_np(base)) * 2.0**-20
        differ = float((g != c).mean())
        record(
            f"fused {name} (bf16)",
            bool(np.all(diff <= allowed)),
            f"{differ:.2e} of elements differ, by at most one bf16 rounding",
        )

    t, s = bitlinear.quantize_absmean(mx.random.normal((1000, 512), key=ks[5]))
    packed = bitlinear.pack_ternary(t)
    xv = mx.random.normal((2, 512), key=ks[0])
    g = on(mx.gpu, lambda: bitlinear.bitnet_matmul(xv, packed, s, 1000))
    c = on(mx.cpu, lambda: bitlinear.bitnet_matmul(xv, packed, s, 1000))
    record("bitnet matvec fp32", mx.allclose(g, c, rtol=1e-4, atol=1e-4).item(), f"max |diff| {mx.abs(g - c).max().item():.2e}")

    print("| check | result | detail |")
    print("|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("\nkernel first-use checks:", kernels.kernel_status())
    return 0 if ok and all(kernels.kernel_status().values()) else 1


if __name__ == "__main__":
    sys.exit(main())
