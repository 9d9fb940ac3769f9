"""MLX-quantized model directories (mlx-q4, mlx-q8, mlx-mxfp4): read them dequantized, write them with `mx.quantize`.

Layout (the one mlx-lm writes and loads): a quantized layer `p` is stored as `p.weight` (uint32,
the last axis packed `32 // bits` codes per word), `p.scales` and, in affine mode only, `p.biases`,
one per `group_size` inputs; config.json carries
`"quantization": {"group_size": g, "bits": b, "mode": m}` (and the same under
`"quantization_config"`), with per-layer overrides keyed by layer path.
A reader presents such a model as an unquantized one: `p.weight` in its logical shape,
dequantized only when loaded, and `.scales`/`.biases` hidden.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from .. import dtypes
from ..errors import ModelError, RecipeError, short_repr
from .base import ModelSource, Opener, OutputTensor, TensorInfo, WriteOptions, strip_quantization
from .safetensors import SafetensorsModel, SafetensorsWriter, open_checked

# --out-format -> (mode, bits, default group size); the defaults are mlx-lm's
QUANT_FORMATS = {
    "mlx-q4": ("affine", 4, 64),
    "mlx-q8": ("affine", 8, 64),
    "mlx-mxfp4": ("mxfp4", 4, 32),
}
# group sizes and bits mx.quantize accepts per mode (its table of quantization modes), and its defaults
GROUP_SIZES = {"affine": (32, 64, 128), "mxfp4": (32,), "mxfp8": (32,), "nvfp4": (16,)}
MODE_BITS = {"affine": (1, 2, 3, 4, 5, 6, 8), "mxfp4": (4,), "mxfp8": (8,), "nvfp4": (4,)}
MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}  # (group_size, bits)
PART_SUFFIXES = (".scales", ".biases", ".global_scale")
FOREIGN_QUANT_MARKERS = (".qweight", ".qzeros", ".weight_scale_inv", ".weight_packed", ".absmax")


def recognises(path: Path, config: dict | None) -> bool:
    """A directory whose config declares quantization (BitNet and BitDelta are tried before)."""
    return config is not None and ("quantization" in config or "quantization_config" in config)


def open_input(path: Path, config: dict, open_model: Opener) -> ModelSource:
    """The dequantizing reader, or a plain one where the config declares quantization but the
    weights are plain; weights quantized by another tool are a ModelError."""
    qc = config.get("quantization_config")
    raw = open_checked(path, config)
    if config.get("quantization") is not None:  # MLX's own key: checked even where no tensor uses it
        quantization_params(quantization_block(config, path)[1], f"{path}/config.json: quantization")
    names = raw.tensor_names()
    if any(n.endswith(".scales") for n in names):
        return MLXQuantizedModel(raw, config)
    foreign = next((n for n in names if n.endswith(FOREIGN_QUANT_MARKERS)), None)
    if foreign is not None:
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
        raise ModelError(
            f"{path}: weights are quantized with {method!r} (tensor {foreign!r}), which mergekit-mlx cannot read; "
            "readable quantized inputs are MLX-quantized directories (affine, mxfp4, mxfp8, nvfp4), BitNet b1.58 "
            "packed checkpoints and GGUF files"
        )
    return raw  # a config block with unquantized weights: read it as a plain model


def quantization_block(config: dict, where: Path) -> tuple[str, dict]:
    """(key, block) of the config's MLX quantization settings: `quantization`, as mlx-lm reads it,
    else `quantization_config`; anything but an object there is a ModelError naming the key."""
    key = "quantization" if "quantization" in config else "quantization_config"
    block = config.get(key)
    if not isinstance(block, dict):
        raise ModelError(
            f"{where}/config.json: '{key}' must be an object like "
            f'{{"group_size": 64, "bits": 4, "mode": "affine"}}, got {short_repr(block)}'
        )
    return key, block


def quantization_params(params: dict, where: str) -> dict:
    """mode, bits and group_size of one quantization entry, each checked against what mx.quantize takes."""
    mode = params.get("mode", "affine")
    if not isinstance(mode, str) or mode not in GROUP_SIZES:
        raise ModelError(f"{where}.mode: {short_repr(mode)} is not a quantization mode; valid: {', '.join(GROUP_SIZES)}")
    default_group, default_bits = MODE_DEFAULTS[mode]
    checked = {"mode": mode}
    for key, default, valid in (("bits", default_bits, MODE_BITS[mode]), ("group_size", default_group, GROUP_SIZES[mode])):
        value = params.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value not in valid:
            raise ModelError(
                f"{where}.{key}: {short_repr(value)} is not valid for mode {mode!r}; valid: {', '.join(map(str, valid))}"
            )
        checked[key] = value
    return checked


def _layer_params(block: dict, key: str, layer: str, defaults: dict, where: Path) -> dict:
    """The quantization of one layer: its own entry in the block (keyed by layer path) or the block's."""
    own = block.get(layer)
    if own is None or own is True:
        return dict(defaults)
    if isinstance(own, dict):
        return quantization_params(own, f"{where}/config.json: {key}[{layer!r}]")
    raise ModelError(
        f"{where}/config.json: {key}[{layer!r}] is {short_repr(own)}, but the layer has quantized tensors; a per-layer "
        'entry must be an object like {"group_size": 64, "bits": 4} (or true)'
    )


class MLXQuantizedModel(ModelSource):
    """An MLX-quantized directory, seen as the unquantized model (dequantized tensor by tensor)."""

    format = "mlx-quantized"

    def __init__(self, raw: SafetensorsModel, config: dict):
        self._raw = raw
        self._params: dict[str, dict] = {}
        default_code = dtypes.declared_weight_code(config)
        raw_names = set(raw.tensor_names())
        key, block = quantization_block(config, raw.path)
        defaults = quantization_params(block, f"{raw.path}/config.json: {key}")
        infos: dict[str, TensorInfo] = {}
        for name in raw.tensor_names():
            layer = name.rsplit(".", 1)[0]
            if name.endswith(PART_SUFFIXES) and f"{layer}.weight" in raw_names and f"{layer}.scales" in raw_names:
                continue  # a quantization part of layer.weight
            info = raw.info(name)
            if name.endswith(".weight") and f"{layer}.scales" in raw_names:
                params = _layer_params(block, key, layer, defaults, raw.path)
                scales = raw.info(f"{layer}.scales")
                cols = info.shape[-1] * 32
                if info.dtype != "U32" or cols % params["bits"]:
                    raise ModelError(
                        f"{info.file}: quantized tensor {name!r} must be uint32 with packed columns, got {info.dtype} {list(info.shape)}"
                    )
                in_dims = cols // params["bits"]
                if in_dims % params["group_size"] or scales.shape[-1] != in_dims // params["group_size"]:
                    raise ModelError(
                        f"{info.file}: {name!r} unpacks to {in_dims} columns at {params['bits']} bits, which does not fit "
                        f"{scales.shape[-1]} scales of group size {params['group_size']} (config 'quantization' says {params})"
                    )
                parts = [scales] + ([raw.info(f"{layer}.biases")] if f"{layer}.biases" in raw_names else [])
                for part in parts:
                    if part.shape[:-1] != info.shape[:-1]:
                        raise ModelError(
                            f"{part.file}: {part.name!r} has shape {list(part.shape)}, which does not fit {name!r} "
                            f"{list(info.shape)} (one row of groups per weight row)"
                        )
                if len(parts) == 2 and parts[1].shape != scales.shape:
                    raise ModelError(
                        f"{parts[1].file}: {parts[1].name!r} has shape {list(parts[1].shape)}, {scales.name!r} {list(scales.shape)}; they must match"
                    )
                params["biases"] = f"{layer}.biases" in raw_names
                params["global_scale"] = f"{layer}.global_scale" in raw_names
                if params["mode"] == "affine" and not params["biases"]:
                    raise ModelError(f"{info.file}: affine-quantized {name!r} has no {layer}.biases")
                code = scales.dtype if scales.dtype in dtypes.WEIGHT_CODES else default_code
                self._params[name] = params
                info = TensorInfo(name, (*info.shape[:-1], in_dims), code, info.file)
            infos[name] = info
        super().__init__(raw.path, strip_quantization(config), infos)
        self.quantization = config.get("quantization", config.get("quantization_config"))

    def load(self, name: str) -> mx.array:
        params = self._params.get(name)
        if params is None:
            return self._raw.load(name)
        layer = name[: -len(".weight")]
        return mx.dequantize(
            self._raw.load(name),
            self._raw.load(f"{layer}.scales"),
            self._raw.load(f"{layer}.biases") if params["biases"] else None,
            group_size=params["group_size"],
            bits=params["bits"],
            mode=params["mode"],
            global_scale=self._raw.load(f"{layer}.global_scale") if params["global_scale"] else None,
            dtype=dtypes.mlx_dtype(self.info(name).dtype),
        )

    def release(self) -> None:
        self._raw.release()


def mlx_lm_leaves(config: dict) -> tuple[Any, dict[str, Any]] | None:
    """The mlx-lm model this config describes and its leaf modules by path, or None if mlx-lm has
    no class for it. Building it costs nothing: its parameters are lazy and never evaluated."""
    try:
        from mlx import nn
        from mlx.utils import tree_flatten
        from mlx_lm.utils import _get_classes

        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))
        return model, dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    except Exception:  # noqa: BLE001 - any config mlx-lm cannot build; callers fall back to tensor shapes
        return None


def quantizable_modules(config: dict) -> dict[str, bool] | None:
    """For each leaf module of the mlx-lm model: would mlx-lm quantize it? None if there is no model."""
    built = mlx_lm_leaves(config)
    if built is None:
        return None
    model, leaves = built
    predicate = getattr(model, "quant_predicate", None)
    return {
        path: hasattr(module, "to_quantized") and (predicate is None or predicate(path, module) is not False)
        for path, module in leaves.items()
    }


def is_quantizable(name: str, shape: tuple[int, ...], group_size: int, modules: dict[str, bool] | None) -> bool:
    """A 2-D+ `.weight` of a layer mlx-lm would quantize, whose rows split into whole groups."""
    if not name.endswith(".weight") or len(shape) < 2 or shape[-1] % group_size:
        return False
    layer = name[: -len(".weight")]
    if modules is not None and layer in modules:
        return modules[layer]
    return "norm" not in layer.rsplit(".", 1)[-1]


def quantized_parts(t: OutputTensor, mode: str, bits: int, group_size: int) -> list[OutputTensor]:
    """The tensors `mx.quantize` turns one weight into, with their shapes and dtypes."""
    layer = t.name[: -len(".weight")]
    lead, cols = t.shape[:-1], t.shape[-1]
    groups = (*lead, cols // group_size)
    scale_dtype = t.dtype if mode == "affine" else mx.uint8
    parts = [OutputTensor(t.name, (*lead, cols * bits // 32), mx.uint32), OutputTensor(f"{layer}.scales", groups, scale_dtype)]
    if mode == "affine":
        parts.append(OutputTensor(f"{layer}.biases", groups, scale_dtype))
    return parts


class QuantizedWriter(SafetensorsWriter):
    """MLX-quantized output (mlx-q4, mlx-q8, mlx-mxfp4): each quantizable weight through `mx.quantize`."""

    out_formats = tuple(QUANT_FORMATS)
    known_size = False  # the quantized layers are chosen by mlx-lm's model class, not by the plan
    verifiable = False
    side_by_side = False  # `add` quantizes with MLX: one thread
    takes_device_tensors = False  # it quantizes MLX arrays

    def __init__(
        self,
        out_dir: Path,
        tensors: list[OutputTensor],
        config: dict,
        out_format: str,
        options: WriteOptions = WriteOptions(),
    ):
        if out_format not in QUANT_FORMATS:
            raise RecipeError(f"--out-format {out_format!r} is not an MLX-quantized format; valid: {', '.join(QUANT_FORMATS)}")
        self.mode, self.bits, default_group = QUANT_FORMATS[out_format]
        self.group_size = options.group_size or default_group
        if self.group_size not in GROUP_SIZES[self.mode]:
            raise RecipeError(
                f"--group-size {self.group_size} is not valid for {out_format}; valid: "
                f"{', '.join(map(str, GROUP_SIZES[self.mode]))}"
            )
        config = strip_quantization(config)
        modules = quantizable_modules(config)
        self.quantized = {
            t.name for t in tensors if dtypes.is_weight(t.dtype) and is_quantizable(t.name, t.shape, self.group_size, modules)
        }
        self.parts_of = {
            t.name: quantized_parts(t, self.mode, self.bits, self.group_size) for t in tensors if t.name in self.quantized
        }
        parts = [p for t in tensors for p in self.parts_of.get(t.name, [t])]
        block = {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}
        config["quantization"] = dict(block)
        config["quantization_config"] = dict(block)
        super().__init__(out_dir, parts, config, out_format, options)

    def wants(self, name: str) -> bool:
        return any(
            super(QuantizedWriter, self).wants(p.name) for p in self.parts_of.get(name, [OutputTensor(name, (), mx.float32)])
        )

    def add(self, name: str, array: mx.array) -> None:
        parts = self.parts_of.get(name)
        if parts is None:
            super().add(name, array)
            return
        if not self.wants(name):
            return
        for part, value in zip(parts, mx.quantize(array, group_size=self.group_size, bits=self.bits, mode=self.mode)):
            super().add(part.name, value)
