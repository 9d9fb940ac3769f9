"""The counter-based random generator: uniforms that are a pure function of (seed, stream, index).

The rule (every backend follows it): a counter-based hash of (seed, stream, flat element index) to
32 bits; the uniform is the top 24 bits times 2**-24, so it is exact in float32 and the same on the
CPU, Metal and CUDA (kernels/common.h holds the same constants as `HASH`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import gpu
from .host import Scratch

_MASK32 = 0xFFFFFFFF
_U24 = 1.0 / 16777216.0  # 2**-24, exact in float32


def _mix32_np(h: np.ndarray, tmp: np.ndarray, m1: np.uint32, m2: np.uint32) -> None:
    """The kernels' 32-bit finaliser, in place."""
    np.right_shift(h, 16, out=tmp)
    np.bitwise_xor(h, tmp, out=h)
    np.multiply(h, m1, out=h)
    np.right_shift(h, 15, out=tmp)
    np.bitwise_xor(h, tmp, out=h)
    np.multiply(h, m2, out=h)
    np.right_shift(h, 16, out=tmp)
    np.bitwise_xor(h, tmp, out=h)


@dataclass
class Hash:
    """The generator on the host, for numpy chunks: u = top 24 bits of mix(mix(i * golden + k0) ^ k1)
    times 2**-24. `u < p` is tested as `(h >> 8) < ceil(p * 2**24)`: exact, as u is m * 2**-24
    for an integer m."""

    golden: int
    m1: int
    m2: int

    def mask_into(self, s: int, e: int, keys: tuple[int, int], p: float, sc: Scratch, out: np.ndarray) -> None:
        """out = the random mask (u < p) of elements [s, e) of the stream with these keys."""
        c = e - s
        bound = min(max(math.ceil(float(np.float32(p)) * 16777216.0), 0), 1 << 24)
        if bound == 1 << 24:  # every top-24-bit value lies below p
            out.fill(True)
            return
        h = sc("h", np.uint32, c)
        # (s + i) * golden + k0 = i * golden + (s * golden + k0), all mod 2**32
        np.add(sc.iota_times(c, self.golden), np.uint32((s * self.golden + keys[0]) & 0xFFFFFFFF), out=h)
        tmp = sc("htmp", np.uint32, c)
        m1, m2 = np.uint32(self.m1), np.uint32(self.m2)
        _mix32_np(h, tmp, m1, m2)
        np.bitwise_xor(h, np.uint32(keys[1]), out=h)
        _mix32_np(h, tmp, m1, m2)
        np.less(h, np.uint32(bound << 8), out=out)  # (h >> 8) < bound, as h < bound * 256


HASH = Hash(0x9E3779B9, 0x7FEB352D, 0x846CA68B)  # kernels/common.h's constants, the one copy here
_GOLDEN, _M1, _M2 = HASH.golden, HASH.m1, HASH.m2


def _mix32(x: int) -> int:
    """The 32-bit finaliser used everywhere (host side; the same steps as the kernels)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _M1) & _MASK32
    x ^= x >> 15
    x = (x * _M2) & _MASK32
    x ^= x >> 16
    return x


def stream_id(*parts: str | int) -> int:
    """A stable 32-bit FNV-1a hash of the parts, e.g. stream_id(tensor_name, model_index)."""
    h = 0x811C9DC5
    data = "\x1f".join(str(p) for p in parts).encode("utf-8")
    for byte in data:
        h ^= byte
        h = (h * 0x01000193) & _MASK32
    return h


def stream_keys(seed: int, stream: int) -> tuple[int, int]:
    """Two 32-bit keys of (seed, stream); a seed of any size folds in through its high word."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    lo, hi = seed & _MASK32, seed >> 32
    k0 = _mix32(lo ^ _mix32((int(stream) & _MASK32) ^ _GOLDEN))
    k1 = _mix32(k0 ^ _mix32(hi ^ 0x85EBCA6B))
    return k0, k1


def u32(v: int) -> mx.array:
    return mx.array(v & _MASK32, dtype=mx.uint32)


def mix32_mx(x: mx.array) -> mx.array:
    x = x ^ (x >> 16)
    x = x * u32(_M1)
    x = x ^ (x >> 15)
    x = x * u32(_M2)
    return x ^ (x >> 16)


def uniform_of_index(idx: mx.array, keys: mx.array) -> mx.array:
    """float32 uniforms in [0, 1) for uint32 flat indices and keys = [k0, k1] (uint32)."""
    h = mix32_mx(idx * u32(_GOLDEN) + keys[0])
    h = mix32_mx(h ^ keys[1])
    return (h >> 8).astype(mx.float32) * _U24


uniform_compiled = mx.compile(uniform_of_index, shapeless=True)


def keys_array(seed: int, stream: int) -> mx.array:
    return mx.array(list(stream_keys(seed, stream)), dtype=mx.uint32)


def random_uniform(seed: int, stream: int, shape: Sequence[int]) -> mx.array:
    """float32 uniforms in [0, 1), a pure function of (seed, stream, flat element index)."""
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    gpu.check_size(n)
    if n == 0:
        return mx.zeros(shape, dtype=mx.float32)
    backend = gpu.backend()
    if backend is not None:
        out = GPU.call(backend, lambda: _gpu_uniform(backend, seed, stream, n))
        if out is not None:
            return out.reshape(shape)
    idx = mx.arange(n, dtype=mx.uint32)
    return uniform_compiled(idx, keys_array(seed, stream)).reshape(shape)


def random_mask(seed: int, stream: int, shape: Sequence[int], p: float | mx.array) -> mx.array:
    """bool mask of the elements kept by chance: random_uniform(seed, stream, shape) < p (p a float or an array broadcast to shape)."""
    u = random_uniform(seed, stream, shape)
    if isinstance(p, mx.array):
        return u < p.astype(mx.float32)
    return u < mx.array(float(p), dtype=mx.float32)


UNIFORM_LAUNCH = gpu.Launch("random_uniform", 0, False, ("up",), ("out",), (mx.uint32,), (mx.float32,))


def _gpu_uniform(backend: str, seed: int, stream: int, n: int) -> mx.array:
    k0, k1 = stream_keys(seed, stream)
    up = mx.array([n, k0, k1], dtype=mx.uint32)
    return UNIFORM_LAUNCH(backend, [up], grid=(gpu.stride_grid(n), 1, 1), threadgroup=(gpu.TG, 1, 1), output_shapes=[(n,)])[0]


def _check_uniform(backend: str) -> bool:
    n = 5003
    got = _gpu_uniform(backend, 12345, 678, n)
    mx.eval(got)
    with mx.stream(mx.cpu):  # the plain graph: integer steps and an exact conversion, as compiled
        ref = uniform_of_index(mx.arange(n, dtype=mx.uint32), keys_array(12345, 678))
        return bool(mx.array_equal(got, ref).item())


GPU = gpu.Group("uniform", _check_uniform, lambda: [UNIFORM_LAUNCH])
