"""Reading a LoRA adapter directory: what it changes in its base model, from its config and headers.

Two kinds, told apart by their adapter_config.json:

  PEFT    `peft_type: LORA`, `r`, `lora_alpha`, `use_rslora`, `use_dora`, `rank_pattern`/`alpha_pattern`,
          `fan_in_fan_out`, `modules_to_save`; weights in adapter_model.safetensors under
          `base_model.model.<module>.lora_A.weight` (r, in), `.lora_B.weight` (out, r), DoRA's
          `.lora_magnitude_vector` (out,), `.lora_B.bias` (`lora_bias`), embeddings'
          `.lora_embedding_A` (r, vocab) / `.lora_embedding_B` (dim, r), and whole tensors that replace
          the base's (`modules_to_save`, an embedding's `base_layer`).
  mlx-lm  `fine_tune_type: lora | dora | full`, `lora_parameters: {rank, scale, ...}`; weights in
          adapters.safetensors under the model's own names: `<module>.lora_a` (in, r), `.lora_b` (r, out),
          DoRA's `.m` (out,); a full fine-tune stores whole tensors.

Nothing here reads tensor data: `read_adapter` returns every change as an `Update` per tensor (which
adapter tensors, how they combine, the scale), checked against the adapter's own config (ranks, keys,
dtypes). Whether the changes fit a base model is `apply.py`'s business. Every file is untrusted and
read through formats/files.py's checks; a pickle (.bin, .pt, .npz) is never opened.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from .. import dtypes
from ..errors import ModelError, short_repr
from ..formats.base import TensorInfo
from ..formats.files import model_file, read_json
from ..formats.safetensors import read_safetensors_header

CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MLX_WEIGHTS = "adapters.safetensors"
PICKLES = ("adapter_model.bin", "adapters.npz", "adapter_model.pt", "adapter_model.pth")
PEFT_PREFIX = "base_model.model."
MAX_PATTERN_CHARS = 1000  # a rank_pattern/alpha_pattern key is a module name or a short regex


class AdapterKind(Enum):
    PEFT = "PEFT"
    MLX_LM = "mlx-lm"


class Layout(Enum):
    """How a low-rank update's product `left @ right` lies in the base tensor it changes."""

    # PEFT on a Linear: B A is (out, in) as the weight is; on a Conv1D (GPT-2), stored (in, out), it is
    # transposed (fan_in_fan_out, which PEFT corrects by layer type, so the shapes decide where they can)
    PEFT_LINEAR = "peft-linear"
    PEFT_EMBEDDING = "peft-embedding"  # (B A) transposed: one row per token
    # mlx-lm's a @ b: (in, out) for a Linear (transposed into the weight), (vocab, dim) for an Embedding
    MLX_MATRIX = "mlx-matrix"
    MLX_SWITCH = "mlx-switch"  # stacked experts: b @ a is (experts, out, in) as the weight is


@dataclass(frozen=True)
class Update:
    """How an adapter changes one tensor of its base (`target`, as the adapter names it):

        W  = the adapter's `replace` tensor if there is one, else the base's
        W += scale * left @ right          (last two axes swapped when `transposed`; see Layout)
        W  = m / ||W|| * W                  (DoRA: the magnitude m, one per output row of the layer,
                                             over the L2 norm of that output's weights)
        W += scale * add                    (PEFT's lora_bias, on a bias vector)

    `transposed` is what the adapter states (PEFT's fan_in_fan_out); `apply.py` settles it against
    the base's shape. `keys` are the adapter tensors behind the update, for messages."""

    target: str
    keys: tuple[str, ...]
    replace: str | None = None
    left: str | None = None
    right: str | None = None
    layout: Layout | None = None
    transposed: bool = False
    scale: float = 1.0
    magnitude: str | None = None
    add: str | None = None

    @property
    def magnitude_axis(self) -> int:
        """The axis of the stored weight the DoRA magnitude runs along: its output units."""
        return 1 if self.layout is Layout.PEFT_LINEAR and self.transposed else 0


@dataclass(frozen=True)
class Adapter:
    path: Path  # the adapter directory
    kind: AdapterKind
    method: str  # "LoRA", "rsLoRA", "DoRA", "full fine-tune": what a plan prints
    weights_file: Path  # checked, real path
    tensors: dict[str, TensorInfo]  # the weights file's header
    updates: dict[str, Update]  # target (adapter's name for a base tensor) -> how it changes

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    def describe(self) -> str:
        return f"{self.kind.value} {self.method} adapter ({len(self.updates)} tensors changed)"


def read_adapter(path: Path) -> Adapter:
    """An adapter directory, its config and weights header checked; a ModelError names what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(
            f"{path}: an adapter must be a directory holding {CONFIG_FILE} and {PEFT_WEIGHTS} (PEFT) or {MLX_WEIGHTS} (mlx-lm)"
        )
    if not os.path.lexists(path / CONFIG_FILE):
        raise ModelError(
            f"{path}: no {CONFIG_FILE}; an adapter directory holds {CONFIG_FILE} and {PEFT_WEIGHTS} (PEFT) or {MLX_WEIGHTS} (mlx-lm)"
        )
    config = read_json(path, CONFIG_FILE, "adapter config")
    if not isinstance(config, dict):
        raise ModelError(f"{path / CONFIG_FILE}: must hold a JSON object")
    if "peft_type" in config:
        return _read_peft(path, config)
    if "fine_tune_type" in config or "lora_parameters" in config:
        return _read_mlx_lm(path, config)
    raise ModelError(
        f"{path / CONFIG_FILE}: neither a PEFT adapter config (it has no 'peft_type') nor an mlx-lm one "
        "(no 'fine_tune_type' or 'lora_parameters')"
    )


def _weights(path: Path, name: str) -> tuple[Path, dict[str, TensorInfo]]:
    """The checked weights file of an adapter and its header; a pickle beside it is named, never read."""
    if not os.path.lexists(path / name):
        pickles = [p for p in PICKLES if os.path.lexists(path / p)]
        has = f"; it has {', '.join(pickles)}, which is never loaded (a pickle can run code when it is loaded)" if pickles else ""
        raise ModelError(
            f"{path}: no {name}, the adapter's weights{has}; only safetensors adapters are read (PEFT's "
            "save_pretrained writes them by default; mlx-lm's own adapters are safetensors)"
        )
    real = model_file(path, name, "adapter weights")
    infos, _ = read_safetensors_header(real)
    for key, info in infos.items():
        if info.dtype not in dtypes.WEIGHT_CODES:
            raise ModelError(
                f"{real}: tensor {short_repr(key)} is {info.dtype}; adapter tensors must be {', '.join(dtypes.WEIGHT_CODES)}"
            )
    return real, infos


def _number(config: dict, key: str, where: Path, default: Any = None, *, integer: bool = False, positive: bool = False):
    value = config.get(key, default)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not math.isfinite(value) or (positive and value <= 0):
        kind = "a positive whole number" if integer and positive else "a finite number"
        raise ModelError(f"{where}: {key} must be {kind}, got {short_repr(value)}")
    return value


def _flag(config: dict, key: str, where: Path) -> bool:
    value = config.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ModelError(f"{where}: {key} must be true or false, got {short_repr(value)}")
    return value


# ---- PEFT ----------------------------------------------------------------------------------------

# PEFT LoRA options that change what the adapter computes in ways a merged weight cannot hold (or
# that this reader does not implement): refused when set, naming the option
PEFT_REFUSED = {
    "target_parameters": "LoRA on bare parameters (MoE experts)",
    "trainable_token_indices": "trainable token rows",
    "layer_replication": "replicated layers",
    "use_qalora": "QALoRA's pooled inputs",
    "alora_invocation_tokens": "activated LoRA, which applies only after its invocation tokens",
    "arrow_config": "Arrow routing between several LoRAs",
    "use_bdlora": "block-diagonal LoRA",
}
PEFT_LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "emb_A",
    ".lora_embedding_B": "emb_B",
    ".lora_magnitude_vector": "m",
    ".lora_magnitude_vector.weight": "m",
}
# what PEFT puts inside a module's name for a whole tensor: an embedding's base layer, a modules_to_save copy
PEFT_WRAPPERS = re.compile(r"\.(base_layer|modules_to_save\.default|modules_to_save)(?=\.(weight|bias)$)")


def _read_peft(path: Path, config: dict) -> Adapter:
    where = path / CONFIG_FILE
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ModelError(
            f"{where}: peft_type is {short_repr(peft_type)}; only LORA adapters (LoRA, rsLoRA, DoRA) can be applied "
            "in a merge (IA3, LOHA, LOKR, ADALORA and prompt-learning adapters are not)"
        )
    for key, what in PEFT_REFUSED.items():
        if config.get(key) not in (None, False, [], {}, ""):
            raise ModelError(f"{where}: {key} is set ({what}); such an adapter cannot be applied here")
    r = _number(config, "r", where, 8, integer=True, positive=True)
    alpha = _number(config, "lora_alpha", where, 8)
    rslora = _flag(config, "use_rslora", where)
    dora = _flag(config, "use_dora", where)
    fan_in_fan_out = _flag(config, "fan_in_fan_out", where)
    ranks = _patterns(config, "rank_pattern", where, integer=True)
    alphas = _patterns(config, "alpha_pattern", where, integer=False)
    weights_file, infos = _weights(path, PEFT_WEIGHTS)

    modules: dict[str, dict[str, str]] = {}  # module -> role -> key
    replaced: dict[str, str] = {}  # target tensor -> key
    for key in infos:
        name = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in PEFT_LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            modules.setdefault(name[: -len(suffix)], {})[PEFT_LORA_SUFFIXES[suffix]] = key
        elif name.endswith((".weight", ".bias")) and "lora_" not in name:
            target = PEFT_WRAPPERS.sub("", name)
            if target in replaced:
                raise ModelError(f"{weights_file}: {short_repr(replaced[target])} and {short_repr(key)} both replace {target!r}")
            replaced[target] = key
        else:
            raise ModelError(f"{weights_file}: tensor {short_repr(key)} is not a LoRA tensor this reader knows")

    updates: dict[str, Update] = {t: Update(t, (k,), replace=k) for t, k in replaced.items()}
    for module, roles in modules.items():
        embedding = "emb_A" in roles or "emb_B" in roles
        a, b = (roles.get("emb_A"), roles.get("emb_B")) if embedding else (roles.get("A"), roles.get("B"))
        if a is None or b is None or (embedding and ("A" in roles or "B" in roles)):
            raise ModelError(f"{weights_file}: module {module!r} needs both its A and its B matrix, got {sorted(roles.values())}")
        if "m" in roles and not dora:
            raise ModelError(
                f"{weights_file}: module {module!r} has a DoRA magnitude vector, but {CONFIG_FILE} says use_dora false"
            )
        if dora and "m" not in roles and not embedding:
            raise ModelError(f"{weights_file}: {CONFIG_FILE} says use_dora, but module {module!r} has no lora_magnitude_vector")
        if embedding and "m" in roles:
            raise ModelError(f"{weights_file}: module {module!r}: DoRA on an embedding is not supported")
        rank = _pattern_value(ranks, module, r)
        scale_alpha = _pattern_value(alphas, module, alpha)
        got = infos[a].shape[0] if len(infos[a].shape) == 2 else None
        if got != rank or len(infos[b].shape) != 2 or infos[b].shape[1] != rank:
            raise ModelError(
                f"{weights_file}: module {module!r} has A {list(infos[a].shape)} and B {list(infos[b].shape)}, but "
                f"{CONFIG_FILE} gives it rank {rank} (r / rank_pattern): the adapter and its config disagree"
            )
        scale = scale_alpha / math.sqrt(rank) if rslora else scale_alpha / rank
        target = module + ".weight"
        base_key = replaced.pop(target, None)
        updates.pop(target, None)
        keys = tuple(k for k in (base_key, a, b, roles.get("m")) if k)
        updates[target] = Update(
            target,
            keys,
            replace=base_key,
            left=b,
            right=a,
            layout=Layout.PEFT_EMBEDDING if embedding else Layout.PEFT_LINEAR,
            transposed=embedding or fan_in_fan_out,
            scale=scale,
            magnitude=roles.get("m"),
        )
        if "bias" in roles:
            bias = module + ".bias"
            if bias in updates:
                raise ModelError(f"{weights_file}: module {module!r} has a lora_B bias and a whole bias tensor")
            updates[bias] = Update(bias, (roles["bias"],), add=roles["bias"], scale=scale)
    method = "DoRA" if dora else "rsLoRA" if rslora else "LoRA"
    return Adapter(path, AdapterKind.PEFT, method, weights_file, infos, updates)


def _patterns(config: dict, key: str, where: Path, integer: bool) -> dict[re.Pattern, float]:
    """A rank_pattern/alpha_pattern: PEFT matches each key as a regex against the end of a module's
    name (after a dot); the first key that matches wins."""
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise ModelError(f"{where}: {key} must be an object of module name -> value, got {short_repr(value)}")
    out = {}
    for pattern, v in value.items():
        _number(value, pattern, where / key, integer=integer, positive=True)
        if len(pattern) > MAX_PATTERN_CHARS:
            raise ModelError(f"{where}: {key} key {short_repr(pattern)} is longer than {MAX_PATTERN_CHARS} characters")
        try:
            out[re.compile(rf"(.*\.)?({pattern})$")] = v
        except re.error as e:
            raise ModelError(f"{where}: {key} key {short_repr(pattern)} is not a valid regular expression ({e})") from None
    return out


def _pattern_value(patterns: dict[re.Pattern, float], module: str, default: float) -> float:
    return next((v for p, v in patterns.items() if p.match(module)), default)


# ---- mlx-lm --------------------------------------------------------------------------------------

MLX_FINE_TUNE_TYPES = ("lora", "dora", "full")


def _read_mlx_lm(path: Path, config: dict) -> Adapter:
    where = path / CONFIG_FILE
    kind = config.get("fine_tune_type", "lora")  # mlx-lm's own default when the key is missing
    if kind not in MLX_FINE_TUNE_TYPES:
        raise ModelError(
            f"{where}: fine_tune_type is {short_repr(kind)}; mlx-lm adapters are one of {', '.join(MLX_FINE_TUNE_TYPES)}"
        )
    weights_file, infos = _weights(path, MLX_WEIGHTS)
    if kind == "full":
        updates = {k: Update(k, (k,), replace=k) for k in infos}
        return Adapter(path, AdapterKind.MLX_LM, "full fine-tune", weights_file, infos, updates)

    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise ModelError(f"{where}: lora_parameters must be an object with rank and scale, got {short_repr(params)}")
    rank = _number(params, "rank", where / "lora_parameters", integer=True, positive=True)
    scale = _number(params, "scale", where / "lora_parameters")
    leaves = ("lora_a", "lora_b", "m") if kind == "dora" else ("lora_a", "lora_b")
    modules: dict[str, dict[str, str]] = {}
    for key in infos:
        module, _, leaf = key.rpartition(".")
        if leaf not in leaves or not module:
            raise ModelError(
                f"{weights_file}: tensor {short_repr(key)} is not a {kind} adapter parameter (those end in {', '.join(leaves)})"
            )
        modules.setdefault(module, {})[leaf] = key
    updates = {}
    for module, roles in modules.items():
        if set(roles) != set(leaves):
            raise ModelError(f"{weights_file}: module {module!r} needs {', '.join(leaves)}, got {', '.join(sorted(roles))}")
        a, b = infos[roles["lora_a"]].shape, infos[roles["lora_b"]].shape
        # Linear/Embedding: a (in|vocab, r), b (r, out|dim); SwitchLinear (experts): a (E, r, in), b (E, out, r)
        switch = len(a) == 3
        ok = len(a) == len(b) in (2, 3) and (a[1] == rank == b[2] if switch else a[1] == rank == b[0])
        if not ok:
            raise ModelError(
                f"{weights_file}: module {module!r} has lora_a {list(a)} and lora_b {list(b)}, which are not of "
                f"rank {rank} (lora_parameters.rank)"
            )
        target = module + ".weight"
        updates[target] = Update(
            target,
            tuple(roles[k] for k in leaves),
            left=roles["lora_b"] if switch else roles["lora_a"],
            right=roles["lora_a"] if switch else roles["lora_b"],
            layout=Layout.MLX_SWITCH if switch else Layout.MLX_MATRIX,
            transposed=not switch,
            scale=scale,
            magnitude=roles.get("m"),
        )
    return Adapter(path, AdapterKind.MLX_LM, "DoRA" if kind == "dora" else "LoRA", weights_file, infos, updates)
