"""BitNet b1.58 ternary weights: absmean quantisation, 2-bit packing, and a portable BitLinear.

Packed layout (Hugging Face `transformers` BitNet and mlx-lm's `BitLinear`): a weight W of shape
(out, in) with values in {-1, 0, 1} is stored as uint8 of shape (R, in), R = ceil(out / 4); byte
(r, j) holds in bits 2q..2q+1 the code W[q * R + r, j] + 1. Bits of rows past `out` are zero.

Scale convention: `weight_scale` = 1 / mean(|W_float|) (what absmean quantisation multiplies by),
and the layer divides by it (`invert_weight_scales=True`, Hugging Face's `bitlinear`); with
`invert_weight_scales=False` (`autobitlinear`) the layer multiplies instead.

mlx-lm's own `BitLinear` runs only on Metal; `BitLinear` here has the same parameters and runs on
every backend: a CUDA or Metal matrix-vector kernel for small batches, and unpack + matmul otherwise.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from . import gpu

_KERNEL_MAX_ROWS = 16  # larger batches (prompt processing) unpack once and use a dense matmul


def quantize_absmean(w: mx.array, eps: float = 1e-5) -> tuple[mx.array, mx.array]:
    """(ternary int8 of w's shape, weight_scale float32 of shape (1,)): round(w * s) clipped to [-1, 1]
    with s = 1 / max(mean |w|, eps)."""
    w32 = w.astype(mx.float32)
    scale = 1.0 / mx.maximum(mx.mean(mx.abs(w32)), eps)
    ternary = mx.clip(mx.round(w32 * scale), -1, 1).astype(mx.int8)
    return ternary, scale.reshape(1)


def pack_ternary(ternary: mx.array) -> mx.array:
    """Pack an (out, in) array of -1/0/1 into (ceil(out / 4), in) uint8, four codes per byte."""
    if ternary.ndim != 2:
        raise ValueError(f"pack_ternary expects a 2-D weight, got shape {ternary.shape}")
    out_f, in_f = ternary.shape
    rows = -(-out_f // 4)
    codes = (ternary.astype(mx.int16) + 1).astype(mx.uint8)
    pad = 4 * rows - out_f
    if pad:
        codes = mx.concatenate([codes, mx.zeros((pad, in_f), dtype=mx.uint8)])
    c = codes.reshape(4, rows, in_f)
    return c[0] | (c[1] << 2) | (c[2] << 4) | (c[3] << 6)


def unpack_ternary(packed: mx.array, out_features: int) -> mx.array:
    """Inverse of pack_ternary: (out_features, in) int8 with values -1, 0, 1."""
    planes = [(packed >> (2 * q)) & 3 for q in range(4)]
    codes = mx.concatenate(planes, axis=0)[:out_features]
    return codes.astype(mx.int8) - 1


def dequantize(
    packed: mx.array, weight_scale: mx.array, out_features: int, invert_weight_scales: bool = True, dtype: mx.Dtype = mx.float32
) -> mx.array:
    """The float weight the packed one stands for: ternary / scale (or * scale)."""
    w = unpack_ternary(packed, out_features).astype(mx.float32)
    s = weight_scale.astype(mx.float32).reshape(())
    return (w / s if invert_weight_scales else w * s).astype(dtype)


def bitnet_matmul(
    x: mx.array, packed: mx.array, weight_scale: mx.array, out_features: int, invert_weight_scales: bool = True
) -> mx.array:
    """x @ W^T scaled, with W the packed ternary weight; x of shape (..., in); result in x's dtype."""
    in_f = packed.shape[1]
    lead = x.shape[:-1]
    rows = 1
    for s in lead:
        rows *= s
    backend = gpu.backend()
    if backend is not None and rows <= _KERNEL_MAX_ROWS:
        y = GPU.call(
            backend, lambda: _gpu_bitnet(backend, x.reshape(rows, in_f), packed, weight_scale, out_features, invert_weight_scales)
        )
        if y is not None:
            return y.reshape(*lead, out_features)
    return _matmul_fallback(x, packed, weight_scale, out_features, invert_weight_scales)


def _matmul_fallback(x, packed, weight_scale, out_features, invert):
    w = unpack_ternary(packed, out_features).astype(x.dtype)
    y = (x @ w.T).astype(mx.float32)
    s = weight_scale.astype(mx.float32).reshape(())
    return (y / s if invert else y * s).astype(x.dtype)


def _gpu_bitnet(backend, x2, packed, weight_scale, out_features, invert):
    rows, in_f = x2.shape
    r = packed.shape[0]
    kern = gpu.kernel("bitnet_matmul", backend, inputs=("x", "w", "scale"))
    scale = weight_scale.astype(x2.dtype).reshape(1)
    return kern(
        inputs=[x2, packed, scale],
        template=[("T", x2.dtype), ("IN", in_f), ("OUT", out_features), ("R", r), ("ROWS", rows), ("INVERT", bool(invert))],
        grid=(32 * rows * r, 1, 1),
        threadgroup=(128, 1, 1),
        output_shapes=[(rows, out_features)],
        output_dtypes=[x2.dtype],
    )[0]


def _check_bitnet(backend: str) -> bool:
    key = mx.random.key(3)
    k1, k2 = mx.random.split(key)
    w = mx.random.normal((70, 96), key=k1)
    t, s = quantize_absmean(w)
    packed = pack_ternary(t)
    x = mx.random.normal((3, 96), key=k2)
    got = _gpu_bitnet(backend, x, packed, s, 70, True)
    with mx.stream(mx.cpu):
        ref = _matmul_fallback(x, packed, s, 70, True)
        mx.eval(ref)
    return bool(mx.allclose(got, ref, rtol=1e-4, atol=1e-4).item())


GPU = gpu.Group("bitnet", _check_bitnet)


class BitLinear(nn.Module):
    """A drop-in for mlx-lm's BitLinear (same parameter names and shapes) that runs on any backend."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, invert_weight_scales: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.invert_weight_scales = invert_weight_scales
        self.weight = mx.zeros(((out_features + 3) // 4, in_features), dtype=mx.uint8)
        self.weight_scale = mx.array([1.0])
        if bias:
            self.bias = mx.zeros((out_features,))

    def __call__(self, x: mx.array) -> mx.array:
        y = bitnet_matmul(x, self.weight, self.weight_scale, self.out_features, self.invert_weight_scales)
        if "bias" in self:
            y = y + self.bias
        return y


def use_portable_bitlinear(model: nn.Module) -> int:
    """Replace every mlx-lm BitLinear in `model` by BitLinear above, keeping its arrays; returns the count."""
    swaps = []
    for name, module in model.named_modules():
        if type(module).__name__ == "BitLinear" and not isinstance(module, BitLinear):
            bias = getattr(module, "bias", None)
            layer = BitLinear(
                module.in_features,
                module.out_features,
                bias=bias is not None,
                invert_weight_scales=bool(getattr(module, "invert_weight_scales", False)),
            )
            layer.weight = module.weight
            layer.weight_scale = module.weight_scale
            if bias is not None:
                layer.bias = bias
            swaps.append((name, layer))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)
