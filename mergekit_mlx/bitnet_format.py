"""BitNet b1.58 checkpoints: read packed ternary weights, write merged models in that layout.

Layout (Hugging Face `quant_method: bitnet`, the one mlx-lm's BitLinear loads): a linear layer `p`
stores `p.weight` as uint8 of shape (ceil(out/4), in) and `p.weight_scale` of shape (1,).
Byte (r, c) holds four 2-bit codes; code k (bits 2k..2k+1) is output row k * ceil(out/4) + r,
and a code u means the ternary value u - 1. The real weight is
    ternary * weight_scale   for `linear_class: autobitlinear`
    ternary / weight_scale   for `linear_class: bitlinear` (the default, and what this writer emits).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .errors import ModelError
from .models import ModelSource, SafetensorsModel, TensorInfo
from .writer import DEFAULT_SHARD_BYTES, OutputTensor, SafetensorsWriter

try:  # the kernels module owns the packing math; this is the same layout until it is present
    from .bitnet import pack_ternary, unpack_ternary
except ImportError:  # pragma: no cover - depends on which modules have landed

    def pack_ternary(codes: mx.array) -> mx.array:
        """int ternary (out, in) -> uint8 (ceil(out/4), in), four codes per byte along the rows."""
        out = codes.shape[0]
        rows = (out + 3) // 4
        u = (codes.astype(mx.int32) + 1).astype(mx.uint8)
        if rows * 4 != out:
            u = mx.concatenate([u, mx.ones((rows * 4 - out, *u.shape[1:]), mx.uint8)])  # pad with zeros (code 1)
        u = u.reshape(4, rows, *u.shape[1:])
        return u[0] | (u[1] << 2) | (u[2] << 4) | (u[3] << 6)

    def unpack_ternary(packed: mx.array, out_features: Optional[int] = None) -> mx.array:
        """uint8 (rows, in) -> int8 ternary (out_features or 4*rows, in)."""
        shifts = mx.array([0, 2, 4, 6], mx.uint8).reshape(4, *([1] * packed.ndim))
        codes = (packed[None] >> shifts) & 3
        codes = codes.reshape(4 * packed.shape[0], *packed.shape[1:]).astype(mx.int8) - 1
        return codes if out_features is None else codes[:out_features]


ABSMEAN_EPS = 1e-5  # floor of the scale, as BitNet b1.58's reference quantiser clamps it


def ternarize(w: mx.array) -> tuple[mx.array, mx.array]:
    """Absmean ternary quantisation of one tensor: (codes in {-1, 0, 1} as int8, scale as float32).

    The tensor is approximated by codes * scale, with scale = max(mean |w|, 1e-5).
    """
    w32 = w.astype(mx.float32)
    scale = mx.maximum(mx.mean(mx.abs(w32)), ABSMEAN_EPS)
    codes = mx.clip(mx.round(w32 / scale), -1, 1).astype(mx.int8)
    return codes, scale


def open_bitnet(path: Path, config: dict) -> Optional[ModelSource]:
    """A reader for a `quant_method: bitnet` directory, or None when its weights are not packed."""
    raw = SafetensorsModel(path, config)
    packed = [n for n in raw.tensor_names() if n.endswith(".weight") and raw.info(n).dtype == "U8"]
    if not packed:
        return None  # online-quantised checkpoints keep full-precision weights
    return BitNetModel(raw, config)


def _strip(config: dict) -> dict:
    out = copy.deepcopy(config)
    out.pop("quantization_config", None)
    out.pop("quantization", None)
    return out


class BitNetModel(ModelSource):
    """A packed BitNet b1.58 checkpoint, seen as the full-precision model it encodes."""

    format = "bitnet"

    def __init__(self, raw: SafetensorsModel, config: dict):
        qc = config.get("quantization_config") or {}
        linear_class = qc.get("linear_class", "bitlinear")
        if linear_class not in ("bitlinear", "autobitlinear"):
            raise ModelError(f"{raw.path}/config.json: quantization_config.linear_class {linear_class!r} is not 'bitlinear' or 'autobitlinear'")
        self.multiply = linear_class == "autobitlinear"
        self._raw = raw
        default = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(str(config.get("torch_dtype")), "BF16")
        names = set(raw.tensor_names())
        infos: dict[str, TensorInfo] = {}
        self._packed: set[str] = set()
        for name in raw.tensor_names():
            info = raw.info(name)
            if name.endswith(".weight_scale") and name[: -len("_scale")] in names:
                continue
            if name.endswith(".weight") and info.dtype == "U8":
                scale_name = name + "_scale"
                if scale_name not in names:
                    raise ModelError(f"{info.file}: packed ternary tensor {name!r} has no {scale_name!r}")
                scale = raw.info(scale_name)
                if len(info.shape) != 2 or scale.shape not in ((), (1,)):
                    raise ModelError(f"{info.file}: {name!r} must be 2-D uint8 with a one-element {scale_name!r}, got {list(info.shape)} and {list(scale.shape)}")
                dtype = scale.dtype if scale.dtype in ("BF16", "F16", "F32") else default
                infos[name] = TensorInfo(name, (4 * info.shape[0], info.shape[1]), dtype, info.file)
                self._packed.add(name)
            else:
                infos[name] = info
        super().__init__(raw.path, _strip(config), infos)

    def load(self, name: str) -> mx.array:
        if name not in self._packed:
            return self._raw.load(name)
        codes = unpack_ternary(self._raw.load(name)).astype(mx.float32)
        scale = self._raw.load(name + "_scale").astype(mx.float32).reshape(())
        w = codes * scale if self.multiply else codes / scale
        return w.astype({"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32}[self.info(name).dtype])

    def release(self) -> None:
        self._raw.release()


def bitnet_linear_layers(tensors: list[OutputTensor], config: dict) -> set[str]:
    """Weights to ternarise: every 2-D `.weight` of a linear layer inside the decoder layers.

    Embeddings, norms and the output head stay in full precision (as in BitNet b1.58), and every
    linear layer left out is listed in `modules_to_not_convert` so mlx-lm keeps it a plain Linear.
    """
    from .models import layer_index
    from .quantized import quantizable_modules

    modules = quantizable_modules(config)
    chosen = set()
    for t in tensors:
        if not t.name.endswith(".weight") or len(t.shape) != 2 or layer_index(t.name) is None:
            continue
        layer = t.name[: -len(".weight")]
        if modules is not None and layer in modules:
            if modules[layer] and "embed" not in layer:
                chosen.add(t.name)
        elif "norm" not in layer.rsplit(".", 1)[-1] and "embed" not in layer:
            chosen.add(t.name)
    return chosen


def linear_layers_left_out(tensors: list[OutputTensor], chosen: set[str], config: dict) -> list[str]:
    """Paths of linear layers (for mlx-lm: nn.Linear modules) that were not ternarised."""
    import mlx.nn as nn

    try:
        from mlx.utils import tree_flatten
        from mlx_lm.utils import _get_classes

        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))
        paths = [p for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module) if isinstance(m, nn.Linear)]
    except Exception:  # no mlx-lm class: every 2-D weight not ternarised, minus embeddings
        paths = [t.name[: -len(".weight")] for t in tensors if t.name.endswith(".weight") and len(t.shape) == 2 and "embed" not in t.name]
    return sorted(p for p in paths if f"{p}.weight" not in chosen)


class BitNetWriter(SafetensorsWriter):
    """`bitnet` output: absmean ternary linear layers, packed, with `weight_scale` and a quantization_config."""

    def __init__(
        self,
        out_dir: Path,
        tensors: list[OutputTensor],
        config: dict,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        skip_shards: Optional[set[str]] = None,
    ):
        config = _strip(config)
        self.ternary = bitnet_linear_layers(tensors, config)
        self.parts_of: dict[str, list[OutputTensor]] = {}
        for t in tensors:
            if t.name in self.ternary:
                self.parts_of[t.name] = [
                    OutputTensor(t.name, ((t.shape[0] + 3) // 4, t.shape[1]), mx.uint8),
                    OutputTensor(t.name + "_scale", (1,), t.dtype),
                ]
        parts = [p for t in tensors for p in self.parts_of.get(t.name, [t])]
        config["quantization_config"] = {
            "quant_method": "bitnet",
            "linear_class": "bitlinear",
            "quantization_mode": "offline",
            "modules_to_not_convert": linear_layers_left_out(tensors, self.ternary, config),
        }
        super().__init__(out_dir, parts, config, max_shard_bytes, skip_shards)

    def add(self, name: str, array: mx.array) -> None:
        parts = self.parts_of.get(name)
        if parts is None:
            super().add(name, array)
            return
        codes, scale = ternarize(array)
        super().add(parts[0].name, pack_ternary(codes))
        # bitlinear divides by weight_scale, so the stored value is the inverse of the absmean scale
        super().add(parts[1].name, (1.0 / scale).reshape(1).astype(parts[1].dtype))
