"""An adapter applied to its base model, lazily, one tensor at a time.

`apply_adapter(base, adapter, where)` is the base model (any format `open_model` reads) seen with the
adapter merged in: a `ModelSource` whose `load(name)` computes W + scale·B·A (and DoRA's magnitude,
a replaced tensor, a LoRA bias) for the tensors the adapter changes, in float32, rounded once to the
base tensor's dtype, and hands every other tensor through from the base untouched. Nothing merged is
kept or written: the merge pipeline asks for one tensor when it merges it, as for any input.

Every check needs headers only, so it runs when the recipe is planned, before any tensor is read: each
tensor the adapter changes must exist in the base (under the same name, or the name without its first
part, as transformers' `transformer.`/`model.` prefix may be missing from a checkpoint), and the update's
shape must be the base tensor's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import mlx.core as mx

from .. import dtypes
from ..errors import ModelError, short_repr
from ..formats.base import ModelSource, TensorInfo
from ..names import is_output_head
from .read import Adapter, AdapterKind, Layout, Update


def adapter_targets(adapter: Adapter, base_names: Iterable[str], base_label: str, where: str) -> dict[str, Update]:
    """Base tensor name -> the update that changes it; a tensor the base has not is a ModelError (the
    adapter belongs to another architecture). Names only: this runs also before a Hub base's
    weights are downloaded."""
    names = set(base_names)
    out: dict[str, Update] = {}
    for target, update in adapter.updates.items():
        name = target if target in names else target.partition(".")[2]
        if name not in names:
            hint = (
                " (mlx-lm names a few tensors differently from the checkpoint, e.g. stacked MoE experts: apply it to an "
                "MLX-converted base)"
                if adapter.kind is AdapterKind.MLX_LM
                else ""
            )
            raise ModelError(
                f"{where}: adapter {adapter.weights_file} changes {target!r} (from {short_repr(update.keys[0])}), which "
                f"{base_label} does not have: the adapter was made for another architecture{hint}"
            )
        if name in out:
            raise ModelError(f"{where}: adapter {adapter.weights_file} changes {name!r} twice")
        out[name] = update
    return out


def apply_adapter(base: ModelSource, adapter: Adapter, where: str) -> AdaptedModel:
    """The base with the adapter applied per tensor (see the module's doc); `where` is the recipe key."""
    return AdaptedModel(base, adapter, where)


class AdaptedModel(ModelSource):
    """A base model with an adapter applied as each tensor is loaded."""

    def __init__(self, base: ModelSource, adapter: Adapter, where: str):
        self.base = base
        self.adapter = adapter
        self.updates = adapter_targets(adapter, base.tensor_names(), str(base.path), where)
        infos = {}
        for name in base.tensor_names():
            info = base.info(name)
            if name in self.updates:
                self.updates[name] = _checked(self.updates[name], name, info, adapter, where)
                # no offset: the stored bytes are not the tensor, so nothing reads them past load()
                info = TensorInfo(name, info.shape, info.dtype, info.file)
            infos[name] = info
        super().__init__(base.path, base.config, infos)
        self.side_files = base.side_files
        self.format = f"{base.format} + {adapter.describe()}"
        self.parallel_reads = base.parallel_reads
        if getattr(base, "file_span", None) is not None:  # the GPU's direct reads, for the tensors passed through
            self.file_span = base.file_span
        self._local = threading.local()

    @property
    def tokenizer_dir(self) -> Path | None:
        return self.base.tokenizer_dir

    def input_paths(self) -> list[Path]:
        a = self.adapter
        return [*self.base.input_paths(), a.path, a.config_file, a.weights_file]

    def load(self, name: str) -> mx.array:
        update = self.updates.get(name)
        if update is None:
            return self.base.load(name)
        f32 = mx.float32
        w = (self._tensor(update.replace) if update.replace else self.base.load(name)).astype(f32)
        if update.left is not None:
            delta = self._tensor(update.left).astype(f32) @ self._tensor(update.right).astype(f32)
            w = w + update.scale * (delta.swapaxes(-1, -2) if update.transposed else delta)
        if update.magnitude is not None:
            norm = mx.linalg.norm(w, axis=1 - update.magnitude_axis, keepdims=True)
            m = self._tensor(update.magnitude).astype(f32)
            w = (m[:, None] if update.magnitude_axis == 0 else m[None, :]) / norm * w
        if update.add is not None:
            w = w + update.scale * self._tensor(update.add).astype(f32)
        return w.astype(dtypes.mlx_dtype(self.info(name).dtype))

    def _tensor(self, key: str) -> mx.array:
        """An adapter tensor, lazily (MLX ties a lazy array to its thread: each thread opens the file)."""
        arrays = getattr(self._local, "arrays", None)
        if arrays is None or key not in arrays:
            try:
                # the format named: a Hub cache's real file is a blob without the .safetensors suffix
                arrays = self._local.arrays = mx.load(str(self.adapter.weights_file), format="safetensors", stream=mx.cpu)
            except (RuntimeError, ValueError) as e:  # changed since its header was checked
                raise ModelError(f"{self.adapter.weights_file}: MLX cannot read it ({e})") from None
            if key not in arrays:
                raise ModelError(f"{self.adapter.weights_file}: tensor {key!r} is in its header but MLX did not load it")
        return arrays.pop(key)  # handed out, not kept: each is used by one tensor's update

    def release(self) -> None:
        self.base.release()
        self._local = threading.local()


def _checked(update: Update, name: str, info: TensorInfo, adapter: Adapter, where: str) -> Update:
    """The update, its shapes proven to fit the base tensor, its orientation settled by them where
    the adapter leaves it open (see `Layout`)."""
    shapes = {k: adapter.tensors[k].shape for k in update.keys}
    want = tuple(info.shape)

    def refuse(detail: str) -> ModelError:
        got = ", ".join(f"{k} {list(s)}" for k, s in shapes.items())
        return ModelError(
            f"{where}: adapter {adapter.weights_file} does not fit {name!r} of the base, which is {list(want)} "
            f"({detail}; adapter tensors: {got}): the adapter was made for another model or size"
        )

    if info.dtype not in dtypes.WEIGHT_CODES:
        raise refuse(f"the base tensor is {info.dtype}, not a float weight")
    if update.replace and shapes[update.replace] != want:
        vocab = " (a resized vocabulary is not supported: resize the base first)" if _is_embedding(name) else ""
        raise refuse(f"its whole tensor {short_repr(update.replace)} has another shape{vocab}")
    if update.add and shapes[update.add] != want:
        raise refuse("its bias has another shape")
    if update.left is not None:
        left, right = shapes[update.left], shapes[update.right]
        if len(left) != len(want) or len(right) != len(want) or left[:-2] != right[:-2] or left[-1] != right[-2]:
            raise refuse("its low-rank factors do not multiply to a tensor of that rank")
        product = (*left[:-1], right[-1])
        swapped = (*product[:-2], product[-1], product[-2])
        transposed = update.transposed
        fits = [t for t, shape in ((True, swapped), (False, product)) if shape == want]
        if update.layout is Layout.MLX_MATRIX and len(fits) == 1:  # a Linear or an Embedding: whichever fits
            transposed = fits[0]
        elif update.layout is Layout.MLX_MATRIX and fits:  # square: the module's name says which
            transposed = not _is_embedding(name)
        elif update.layout is Layout.PEFT_LINEAR and fits and transposed not in fits:  # a Linear or a Conv1D
            transposed = fits[0]
        if (swapped if transposed else product) != want:
            raise refuse(f"its low-rank update is {list(swapped if transposed else product)}")
        update = replace(update, transposed=transposed)
    if update.magnitude and (len(want) != 2 or shapes[update.magnitude] != (want[update.magnitude_axis],)):
        raise refuse("its DoRA magnitude vector has another length than the base has output rows")
    return update


def _is_embedding(name: str) -> bool:
    """A token or position embedding (mlx-lm makes these nn.Embedding, whose LoRA is not transposed)."""
    module = name.rsplit(".", 2)[-2] if name.count(".") else name
    return not is_output_head(name) and ("embed" in module or module in ("wte", "wpe"))
