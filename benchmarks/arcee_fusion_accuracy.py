"""arcee_fusion's choices against its formula evaluated in float64: how many elements each
implementation gives to the other side.

The case class of issue 25: float32 models, fine-tune deltas about 30% of the weights (`scale`:
every weight moved by 30% of itself; `sparse`: 30% of the weights moved by 30% of the weights'
spread), tensors below the 1e6 elements beyond which the quartiles are sampled (so every count
is exact). Columns: mergekit 0.1.5's importance (torch, float32; left out when not importable),
the formula summed as written in MLX float32 (what this project did before), and this project's
arcee_fusion. Prints a Markdown table.

    python benchmarks/arcee_fusion_accuracy.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np

from mergekit_mlx.methods import MergeInputs, get_method

SHAPES = ((1024, 976), (2048, 480), (4096, 240))


def case(shape: tuple[int, int], kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    if kind == "scale":
        other = base * (1 + 0.3 * rng.standard_normal(shape))
    else:
        other = np.where(rng.random(shape) < 0.3, base + 0.006 * rng.standard_normal(shape), base)
    return base, other.astype(np.float32)


def choose(scores: np.ndarray) -> np.ndarray:
    """scores >= median + 1.5 IQR, each quartile the order statistic at floor(q (n - 1))."""
    flat = np.sort(scores.ravel())
    q1, median, q3 = (flat[int(q * (flat.size - 1))] for q in (0.25, 0.5, 0.75))
    return scores >= median + 1.5 * (q3 - q1)


def float64_choice(other: np.ndarray, base: np.ndarray) -> np.ndarray:
    o, b = other.astype(np.float64), base.astype(np.float64)

    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(o) + 1e-8, softmax(b) + 1e-8
    return choose(np.abs(o - b) * np.sum(p * np.log(p / q), axis=-1, keepdims=True))


def plain_float32_choice(other: np.ndarray, base: np.ndarray) -> np.ndarray:
    o, b = mx.array(other), mx.array(base)
    p, q = mx.softmax(o, axis=-1) + 1e-8, mx.softmax(b, axis=-1) + 1e-8
    return choose(np.array(mx.abs(o - b) * mx.sum(p * mx.log(p / q), axis=-1, keepdims=True)))


def mergekit_choice(other: np.ndarray, base: np.ndarray) -> np.ndarray | None:
    try:
        import torch
        from mergekit.merge_methods.arcee_fusion import _compute_importance
    except ImportError:
        return None
    return choose(_compute_importance(torch.from_numpy(other), torch.from_numpy(base)).numpy())


def our_choice(other: np.ndarray, base: np.ndarray) -> np.ndarray:
    inputs = MergeInputs([mx.array(base), mx.array(other)], 0, {}, [{}, {}], name="w", input_ids=[0, 1])
    out = np.array(get_method("arcee_fusion").merge(inputs))
    return (out == other) & (other != base)


def missed(choice: np.ndarray | None, truth: np.ndarray, changed: np.ndarray) -> str:
    """Elements the other model changed that `choice` assigns otherwise than the float64 formula."""
    return "-" if choice is None else f"{int(((choice & changed) != (truth & changed)).sum()):,}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="cases per shape and kind")
    args = ap.parse_args()
    print(f"MLX {mx.__version__}, device {mx.default_device()}")
    print("| case | elements | chosen (float64) | mergekit 0.1.5 | plain float32 sum (MLX) | mergekit-mlx |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    start = time.perf_counter()
    for kind in ("scale", "sparse"):
        for shape in SHAPES:
            for seed in range(args.seeds):
                base, other = case(shape, kind, seed)
                changed = other != base
                truth = float64_choice(other, base)

                choices = (mergekit_choice(other, base), plain_float32_choice(other, base), our_choice(other, base))
                row = [missed(c, truth, changed) for c in choices]
                name = f"{kind} {shape[0]}x{shape[1]} seed {seed}"
                print(f"| {name} | {base.size:,} | {int((truth & changed).sum()):,} | " + " | ".join(row) + " |")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
