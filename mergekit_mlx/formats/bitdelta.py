"""BitDelta: a fine-tune stored as its base plus one sign bit per weight and one scale per matrix.

A BitDelta directory (written by `mergekit-mlx convert FT OUT --bitdelta-base BASE`) holds:
  config.json     the fine-tune's config plus "quantization_config": {"quant_method": "bitdelta",
                  "base_model": "<path of BASE>"} (a relative path is relative to the directory)
  *.safetensors   for each compressed matrix W (the 2-D weights of the decoder layers):
                    "<W>.sign"         uint8 (*rows, ceil(cols / 8)): bit j of byte k is 1 where
                                       (fine-tune - base)[..., 8k + j] > 0 (least significant bit first)
                    "<W>.delta_scale"  float32 (1,): mean |fine-tune - base| over the matrix
                  every other tensor in full, under its own name
  tokenizer files of the fine-tune
Reading it back gives base + delta_scale * (+1 where the bit is set, -1 elsewhere).

The writer side is `bitdelta_tensors`: what `mergekit-mlx convert --bitdelta-base` writes, as
output tensors and a way to compute each from the fine-tune and its base.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from .. import dtypes
from ..errors import ModelError, RecipeError
from ..names import layer_index
from .base import ModelSource, Opener, OutputTensor, TensorInfo, strip_quantization
from .safetensors import open_checked


def recognises(path: Path, config: dict | None) -> bool:
    """A directory whose config says `quantization_config.quant_method: bitdelta`."""
    qc = config.get("quantization_config") if config is not None else None
    return isinstance(qc, dict) and qc.get("quant_method") == "bitdelta"


def open_input(path: Path, config: dict, open_model: Opener) -> ModelSource:
    return BitDeltaModel(path, config, open_model)


SIGN_SUFFIX, SCALE_SUFFIX = ".sign", ".delta_scale"


def pack_signs(delta: mx.array) -> mx.array:
    """Sign bits of delta (1 where > 0) packed 8 per byte along the last axis, LSB first."""
    cols = delta.shape[-1]
    bits = (delta > 0).astype(mx.uint8)
    pad = -cols % 8
    if pad:
        bits = mx.concatenate([bits, mx.zeros((*bits.shape[:-1], pad), mx.uint8)], axis=-1)
    bits = bits.reshape(*bits.shape[:-1], -1, 8)
    weights = mx.array([1 << j for j in range(8)], mx.uint8)
    return (bits * weights).sum(axis=-1).astype(mx.uint8)


def unpack_signs(packed: mx.array, cols: int) -> mx.array:
    """+1/-1 (float32) of shape (*rows, cols) from pack_signs output."""
    shifts = mx.arange(8, dtype=mx.uint8)
    bits = (packed[..., None] >> shifts) & 1
    bits = bits.reshape(*packed.shape[:-1], -1)[..., :cols]
    return bits.astype(mx.float32) * 2 - 1


class BitDeltaModel(ModelSource):
    """A BitDelta directory, seen as the fine-tune it approximates (base + scaled signs)."""

    format = "bitdelta"

    def __init__(self, path: Path, config: dict, open_model: Opener):
        self._raw = open_checked(path, config)
        ref = str(config["quantization_config"].get("base_model") or "")
        base_path = Path(ref).expanduser()
        if not base_path.is_absolute():
            base_path = path / base_path
        if not ref or not base_path.exists():
            raise ModelError(
                f"{path}/config.json: BitDelta base model {ref!r} not found; set quantization_config.base_model "
                "to the base model's path"
            )
        self.base = open_model(base_path)
        raw_names = set(self._raw.tensor_names())
        infos: dict[str, TensorInfo] = {}
        self._compressed: set[str] = set()
        for name in self._raw.tensor_names():
            if name.endswith(SCALE_SUFFIX):
                continue
            if name.endswith(SIGN_SUFFIX):
                logical = name[: -len(SIGN_SUFFIX)]
                if logical + SCALE_SUFFIX not in raw_names or not self.base.has(logical):
                    raise ModelError(f"{path}: {name!r} needs {logical + SCALE_SUFFIX!r} and a base tensor {logical!r}")
                b = self.base.info(logical)
                if self._raw.info(name).shape != (*b.shape[:-1], (b.shape[-1] + 7) // 8):
                    raise ModelError(
                        f"{path}: {name!r} has shape {list(self._raw.info(name).shape)}, which does not fit base shape {list(b.shape)}"
                    )
                infos[logical] = TensorInfo(
                    logical, b.shape, b.dtype if b.dtype in dtypes.WEIGHT_CODES else "F32", self._raw.info(name).file
                )
                self._compressed.add(logical)
            else:
                infos[name] = self._raw.info(name)
        super().__init__(path, strip_quantization(config), infos)

    def load(self, name: str) -> mx.array:
        if name not in self._compressed:
            return self._raw.load(name)
        info = self.info(name)
        base = self.base.load(name).astype(mx.float32)
        scale = self._raw.load(name + SCALE_SUFFIX).astype(mx.float32).reshape(())
        signs = unpack_signs(self._raw.load(name + SIGN_SUFFIX), info.shape[-1])
        return (base + scale * signs).astype(dtypes.mlx_dtype(info.dtype))

    def release(self) -> None:
        self._raw.release()
        self.base.release()


def bitdelta_tensors(
    ft: ModelSource, base: ModelSource, tensors: list[OutputTensor], config: dict, full: Callable[[str], mx.array]
) -> tuple[list[OutputTensor], dict, Callable[[str], mx.array]]:
    """The BitDelta form of the fine-tune `ft` against `base`: its output tensors, its config, and a
    function computing each tensor. `tensors`/`config`/`full` are the fine-tune written in full;
    every decoder-layer matrix that base has in the same shape becomes a sign tensor and a scale."""
    compressed = {
        t.name
        for t in tensors
        if t.name.endswith(".weight")
        and len(t.shape) == 2
        and layer_index(t.name) is not None
        and base.has(t.name)
        and base.info(t.name).shape == t.shape
    }
    if not compressed:
        raise RecipeError(f"--bitdelta-base {base.path}: no decoder-layer matrix of {ft.path} has the same name and shape in it")
    out: list[OutputTensor] = []
    for t in tensors:
        if t.name in compressed:
            out.append(OutputTensor(t.name + SIGN_SUFFIX, (*t.shape[:-1], (t.shape[-1] + 7) // 8), mx.uint8))
            out.append(OutputTensor(t.name + SCALE_SUFFIX, (1,), mx.float32))
        else:
            out.append(t)
    config["quantization_config"] = {"quant_method": "bitdelta", "base_model": str(base.path.resolve())}
    deltas: dict[str, tuple[mx.array, mx.array]] = {}

    def produce(name: str) -> mx.array:
        for suffix in (SIGN_SUFFIX, SCALE_SUFFIX):
            if name.endswith(suffix) and name[: -len(suffix)] in compressed:
                weight = name[: -len(suffix)]
                if weight not in deltas:
                    delta = ft.load(weight).astype(mx.float32) - base.load(weight).astype(mx.float32)
                    deltas.clear()  # the sign and scale of one matrix are asked for one after the other
                    deltas[weight] = (pack_signs(delta), mx.mean(mx.abs(delta)).reshape(1))
                return deltas[weight][0 if suffix == SIGN_SUFFIX else 1]
        return full(name)

    return out, config, produce
