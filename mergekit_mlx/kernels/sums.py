"""Accurate float32 sums: by levels of fixed-size blocks, in the order every backend shares."""

from __future__ import annotations

import mlx.core as mx


def block_sums(a: mx.array, block: int = 1024) -> mx.array:
    """Sums of consecutive `block`-element pieces of a flat float32 array (its length a multiple of
    block): each piece as 32 interleaved running sums, then those 32. The order every L1 sum of
    the CPU path and of the MLX graphs shares; on a CPU MLX vectorises it (one running sum per
    piece waits on an add's latency: benchmarks/RESULTS.md, section 8)."""
    lanes = 32 if block % 32 == 0 else 1
    return a.reshape(-1, block // lanes, lanes).sum(axis=1).sum(axis=-1)


def accurate_sum(a: mx.array, block: int = 1024) -> mx.array:
    """float32 sum by levels of `block`-element partial sums.

    MLX's CPU sum of millions of float32 values drifts by ~1e-3 relative (4M |N(0, 0.01)| values);
    summing in levels keeps the error near 1e-6, like the GPU's tree reductions.
    """
    a = a.reshape(-1).astype(mx.float32)
    while a.size > block:
        pad = (-a.size) % block
        if pad:
            a = mx.concatenate([a, mx.zeros((pad,), dtype=mx.float32)])
        a = block_sums(a, block)
    return a.sum()
