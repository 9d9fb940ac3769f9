"""BitNet b1.58 checkpoints: read packed ternary weights, write merged models in that layout.

Layout (Hugging Face `quant_method: bitnet`, the one mlx-lm's BitLinear loads): a linear layer `p`
stores `p.weight` as uint8 of shape (ceil(out/4), in) and `p.weight_scale` of shape (1,).
Byte (r, c) holds four 2-bit codes; code k (bits 2k..2k+1) is output row k * ceil(out/4) + r,
and a code u means the ternary value u - 1. The real weight is
    ternary * weight_scale   for `linear_class: autobitlinear`
    ternary / weight_scale   for `linear_class: bitlinear` (the default, and what this writer emits).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from .. import dtypes
from ..errors import ModelError
from ..kernels.bitlinear import dequantize, pack_ternary, quantize_absmean
from ..names import layer_index
from .base import ModelSource, Opener, OutputTensor, TensorInfo, WriteOptions, strip_quantization
from .mlx_quant import mlx_lm_leaves
from .safetensors import SafetensorsModel, SafetensorsWriter, open_checked


def recognises(path: Path, config: dict | None) -> bool:
    """A directory whose config says `quantization_config.quant_method: bitnet`."""
    qc = config.get("quantization_config") if config is not None else None
    return isinstance(qc, dict) and qc.get("quant_method") == "bitnet"


def open_input(path: Path, config: dict, open_model: Opener) -> ModelSource:
    """The ternary reader, or a plain one for an online-quantised checkpoint (full-precision weights)."""
    raw = open_checked(path, config)
    packed = [n for n in raw.tensor_names() if n.endswith(".weight") and raw.info(n).dtype == "U8"]
    if not packed:
        return raw  # online-quantised checkpoints keep full-precision weights
    return BitNetModel(raw, config)


class BitNetModel(ModelSource):
    """A packed BitNet b1.58 checkpoint, seen as the full-precision model it encodes."""

    format = "bitnet"

    def __init__(self, raw: SafetensorsModel, config: dict):
        qc = config.get("quantization_config") or {}
        linear_class = qc.get("linear_class", "bitlinear")
        if linear_class not in ("bitlinear", "autobitlinear"):
            raise ModelError(
                f"{raw.path}/config.json: quantization_config.linear_class {linear_class!r} is not 'bitlinear' or 'autobitlinear'"
            )
        self.multiply = linear_class == "autobitlinear"
        self._raw = raw
        default = dtypes.declared_weight_code(config)
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
                    raise ModelError(
                        f"{info.file}: {name!r} must be 2-D uint8 with a one-element {scale_name!r}, got {list(info.shape)} and {list(scale.shape)}"
                    )
                dtype = scale.dtype if scale.dtype in dtypes.WEIGHT_CODES else default
                infos[name] = TensorInfo(name, (4 * info.shape[0], info.shape[1]), dtype, info.file)
                self._packed.add(name)
            else:
                infos[name] = info
        super().__init__(raw.path, strip_quantization(config), infos)

    def load(self, name: str) -> mx.array:
        if name not in self._packed:
            return self._raw.load(name)
        info = self.info(name)
        return dequantize(
            self._raw.load(name), self._raw.load(name + "_scale"), info.shape[0], not self.multiply, dtypes.mlx_dtype(info.dtype)
        )

    def release(self) -> None:
        self._raw.release()


def bitnet_linear_layers(tensors: list[OutputTensor], config: dict) -> tuple[set[str], list[str]]:
    """(weights to ternarise, paths of the linear layers left in full precision).

    Every linear layer inside the decoder layers is ternarised; embeddings, norms and the output
    head stay in full precision (as in BitNet b1.58). The linear layers left out go into
    `modules_to_not_convert`, because mlx-lm turns every other nn.Linear into a BitLinear.
    """
    from mlx import nn

    names = {t.name for t in tensors}
    built = mlx_lm_leaves(config)
    if built is not None:
        linears = {path for path, module in built[1].items() if isinstance(module, nn.Linear)}
    else:  # no mlx-lm class: every 2-D weight that is not an embedding or a norm
        linears = {
            t.name[: -len(".weight")]
            for t in tensors
            if t.name.endswith(".weight")
            and len(t.shape) == 2
            and "embed" not in t.name
            and "norm" not in t.name.rsplit(".", 2)[-2]
        }
    chosen = {f"{p}.weight" for p in linears if layer_index(p + ".weight") is not None and f"{p}.weight" in names}
    return chosen, sorted(p for p in linears if f"{p}.weight" not in chosen)


class BitNetWriter(SafetensorsWriter):
    """`bitnet` output: absmean ternary linear layers, packed, with `weight_scale` and a quantization_config."""

    out_formats = ("bitnet",)
    known_size = False  # the ternary layers are chosen by mlx-lm's model class, not by the plan
    verifiable = False
    side_by_side = False  # `add` quantizes with MLX: one thread
    takes_device_tensors = False  # it quantizes MLX arrays

    def __init__(
        self,
        out_dir: Path,
        tensors: list[OutputTensor],
        config: dict,
        out_format: str = "bitnet",
        options: WriteOptions = WriteOptions(),
    ):
        config = strip_quantization(config)
        self.ternary, left_out = bitnet_linear_layers(tensors, config)
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
            "modules_to_not_convert": left_out,
        }
        super().__init__(out_dir, parts, config, out_format, options)

    def add(self, name: str, array: mx.array) -> None:
        parts = self.parts_of.get(name)
        if parts is None:
            super().add(name, array)
            return
        # bitlinear divides by weight_scale: the stored value is the inverse of the absmean scale
        codes, inverse = quantize_absmean(array)
        super().add(parts[0].name, pack_ternary(codes))
        super().add(parts[1].name, inverse.astype(parts[1].dtype))
