"""slerp's norms and dot product on the CPU: one numpy pass instead of MLX's sequential sums.

MLX's float32 sum of a long vector is a chain of dependent adds (slow, and its rounding error
grows with the length: benchmarks/RESULTS.md, section 8, has the figures); slerp
needs three of them. This pass widens both tensors chunk by chunk and takes |v0|^2, |v1|^2 and
v0.v1 as BLAS dot products of float32 chunks, added up in float64: faster for all three than
one of MLX's sums, accurate to a few parts in a million. The combination ca * v0 + cb * v1 stays
MLX's compiled graph (faster there than numpy's passes).

Inputs are flat numpy views of evaluated MLX arrays (zero-copy), bfloat16 as its uint16 bits,
widened as MLX converts it (the bits shifted 16 places up).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from .host import CHUNK, Scratch, host, in_halves, quiet, scratch, supported, widen


def host_sums_apply(v0: mx.array, v1: mx.array) -> bool:
    """The numpy pass applies: the CPU is MLX's default device (on a GPU the MLX graph runs there),
    the tensors have one shape and numpy reads their dtypes (bfloat16, float32)."""
    return mx.default_device() == mx.cpu and v0.shape == v1.shape and supported(v0, v1)


def _chunk(a: np.ndarray, b: np.ndarray, s: int, e: int, sc: Scratch) -> tuple[np.ndarray, np.ndarray]:
    """float32 values of elements [s, e) of both inputs, both in one order: for two bf16 inputs
    and an even count, the even positions' values then the odd ones' (a shift and a mask of each
    32-bit word of two bf16: faster than numpy's uint16 -> uint32 cast), else position order."""
    if a.dtype == b.dtype == np.uint16 and (e - s) % 2 == 0:
        return _split(a, s, e, sc("slerp0", np.uint32, e - s)), _split(b, s, e, sc("slerp1", np.uint32, e - s))
    return _f32(a, s, e, sc, "slerp0"), _f32(b, s, e, sc, "slerp1")


def _split(src: np.ndarray, s: int, e: int, buf: np.ndarray) -> np.ndarray:
    """bf16 bits [s, e) (s and e even) as float32: even positions in buf's first half, odd in its second."""
    words = src[s:e].view(np.uint32)  # little-endian: element s + 2i in the low half of word i
    h = (e - s) // 2
    np.left_shift(words, 16, out=buf[:h])
    np.bitwise_and(words, np.uint32(0xFFFF0000), out=buf[h:])
    return buf.view(np.float32)


def _f32(src: np.ndarray, s: int, e: int, sc: Scratch, name: str) -> np.ndarray:
    """Elements [s, e) of a host view as float32: float32 inputs as they are, bf16 widened."""
    if src.dtype == np.float32:
        return src[s:e]
    return widen(src[s:e], sc(name, np.uint32, e - s))


@quiet
def host_sums(v0: mx.array, v1: mx.array) -> tuple[float, float, float]:
    """(v0.v0, v1.v1, v0.v1) over the whole tensors as float32 values: per-chunk float32 dot
    products, accumulated in float64. Non-finite when an input holds NaN/Inf or a square overflows."""
    a, b = host(v0), host(v1)

    def part(lo: int, hi: int) -> tuple[float, float, float]:
        sc = scratch()
        s00 = s11 = s01 = 0.0
        for s in range(lo, hi, CHUNK):
            x, y = _chunk(a, b, s, min(hi, s + CHUNK), sc)  # one order for both: the sums do not change
            s00 += float(np.dot(x, x))
            s11 += float(np.dot(y, y))
            s01 += float(np.dot(x, y))
        return s00, s11, s01

    parts = in_halves(a.size, part)
    return tuple(math.fsum(p[i] for p in parts) for i in range(3))
