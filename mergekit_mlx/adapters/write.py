"""Writing a LoRA adapter, as PEFT or as mlx-lm saves one: the `Writer` the output lifecycle fills.

The writer is told the adapter's modules up front (`AdapterSpec`) and then gets tensors under neutral
names (`lora_tensor_names`): per module `<module>.lora_A` (r, in) and `<module>.lora_B` (out, r) with
dW = B·A (an embedding's dW is (B·A).T, as PEFT has it), `<module>.lora_B.bias` (out,) for a bias
change, and whole tensors under the checkpoint's own names. Ranks may differ per module and are read
from what arrives, so a rank chosen while computing (`--sv-epsilon`) needs no second pass.

  PEFT    adapter_config.json (peft_type LORA, task_type CAUSAL_LM, r = the largest rank, lora_alpha = r,
          rank_pattern/alpha_pattern = the rank of every module with another, so every scale is 1;
          target_modules and modules_to_save by their last name part, as mergekit lists them) and
          adapter_model.safetensors: `base_model.model.<module>.lora_A.weight`, `.lora_B.weight`,
          `.lora_B.bias` (with lora_bias), an embedding's `.lora_embedding_A` (r, vocab) and
          `.lora_embedding_B` (dim, r), whole tensors as `base_model.model.<name>`.
  mlx-lm  adapter_config.json as `mlx_lm.lora` writes it (fine_tune_type lora, num_layers, lora_parameters
          {rank, scale 1.0, dropout 0.0, keys}) and adapters.safetensors: `<module>.lora_a` (in, r) and
          `.lora_b` (r, out). mlx-lm gives every adapted module the one rank of lora_parameters, so
          smaller factors are padded with zeros to the largest rank: the product is the same, exactly.
          `keys` are module names relative to a decoder layer (applied to the last `num_layers` layers)
          or whole names of top-level modules (lm_head); a module of those without factors in the
          file keeps mlx-lm's zero B, so it adds nothing. No whole tensors, no biases.

Tensors are kept until `finish` (an adapter is small next to its model; whole embeddings are the
exception) and written as one safetensors file with the config beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import mlx.core as mx

from ..formats.base import Writer
from ..names import LAYER_PATTERN

CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MLX_WEIGHTS = "adapters.safetensors"
PEFT_PREFIX = "base_model.model."


class AdapterFormat(Enum):
    PEFT = "peft"
    MLX = "mlx"


@dataclass(frozen=True)
class LoraModule:
    name: str  # the module, as the base's checkpoint names it without ".weight"
    in_features: int  # an embedding: its vocabulary
    out_features: int  # an embedding: its dimension
    embedding: bool = False


@dataclass(frozen=True)
class AdapterSpec:
    base_model: str  # base_model_name_or_path (PEFT) / model (mlx-lm)
    lora: tuple[LoraModule, ...]
    whole: tuple[str, ...] = ()  # PEFT modules_to_save: full module names or their last part
    num_layers: int = 0  # the base's decoder layers
    decoder_stack: str | None = None  # "model.layers.": mlx-lm's keys are names relative to a layer of it
    lora_bias: bool = False  # some module's bias changes (PEFT lora_bias)


def lora_tensor_names(module: str) -> tuple[str, str, str]:
    """The neutral names of a module's A, B and bias change, as the writer takes them."""
    return f"{module}.lora_A", f"{module}.lora_B", f"{module}.lora_B.bias"


class AdapterWriter(Writer):
    """An adapter directory in one `AdapterFormat` (see the module docstring)."""

    def __init__(self, out_dir: Path, spec: AdapterSpec, fmt: AdapterFormat):
        self.out_dir = out_dir
        self.spec = spec
        self.fmt = fmt
        self.modules = {m.name: m for m in spec.lora}
        self.parts = {n: (m.name, i) for m in spec.lora for i, n in enumerate(lora_tensor_names(m.name))}
        self.factors: dict[str, dict[int, mx.array]] = {}  # module -> 0: A, 1: B, 2: bias
        self.whole: dict[str, mx.array] = {}

    def add(self, name: str, array: mx.array) -> None:
        mx.eval(array)
        if name in self.parts:
            module, part = self.parts[name]
            self.factors.setdefault(module, {})[part] = array
        elif self.fmt is AdapterFormat.MLX:
            raise ValueError(f"an mlx-lm adapter holds no whole tensors, got {name}")
        else:
            self.whole[name] = array

    def ranks(self) -> dict[str, int]:
        """module -> rank, of the modules whose factors arrived."""
        return {m: parts[0].shape[0] for m, parts in self.factors.items() if 0 in parts}

    def finish(self) -> None:
        incomplete = [m for m, parts in self.factors.items() if (0 in parts) != (1 in parts)]
        if incomplete:
            raise RuntimeError(f"adapter module {incomplete[0]} got only one of its two factors")
        if self.fmt is AdapterFormat.PEFT:
            tensors, config = self._peft()
            weights, metadata = PEFT_WEIGHTS, {"format": "pt"}
        else:
            tensors, config = self._mlx()
            weights, metadata = MLX_WEIGHTS, {"format": "mlx"}
        mx.save_safetensors(str(self.out_dir / weights), tensors, metadata=metadata)
        (self.out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    def _peft(self) -> tuple[dict[str, mx.array], dict]:
        tensors: dict[str, mx.array] = {}
        for module, parts in self.factors.items():
            m = self.modules[module]
            key = PEFT_PREFIX + module
            if 0 in parts:
                a_key, b_key = (".lora_embedding_A", ".lora_embedding_B") if m.embedding else (".lora_A.weight", ".lora_B.weight")
                tensors[key + a_key], tensors[key + b_key] = parts[0], parts[1]
            if 2 in parts:
                tensors[key + ".lora_B.bias"] = parts[2]
        tensors.update({PEFT_PREFIX + n: a for n, a in self.whole.items()})
        return tensors, peft_config(self.spec, self.ranks())

    def _mlx(self) -> tuple[dict[str, mx.array], dict]:
        ranks = self.ranks()
        rank = max(ranks.values(), default=1)
        tensors: dict[str, mx.array] = {}
        for module, r in ranks.items():
            a, b = self.factors[module][0], self.factors[module][1]
            # mlx-lm: dW = lora_b.T @ lora_a.T (a linear), lora_a @ lora_b (an embedding's (vocab, dim))
            lora_a, lora_b = a.T, b.T
            if r < rank:  # zero columns of A.T and rows of B.T add nothing to the product
                lora_a = mx.concatenate([lora_a, mx.zeros((lora_a.shape[0], rank - r), lora_a.dtype)], axis=1)
                lora_b = mx.concatenate([lora_b, mx.zeros((rank - r, lora_b.shape[1]), lora_b.dtype)], axis=0)
            tensors[module + ".lora_a"], tensors[module + ".lora_b"] = mx.contiguous(lora_a), mx.contiguous(lora_b)
        return tensors, mlx_config(self.spec, ranks)


def peft_config(spec: AdapterSpec, ranks: dict[str, int]) -> dict:
    """adapter_config.json of a PEFT LoRA adapter with these module ranks (mergekit's keys)."""
    r = max(ranks.values(), default=1)
    pattern = {m: k for m, k in ranks.items() if k != r}
    config = {
        "base_model_name_or_path": spec.base_model,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks} or {m.name.rsplit(".", 1)[-1] for m in spec.lora}),
        "modules_to_save": list(spec.whole) or None,
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "inference_mode": True,
    }
    if spec.lora_bias:
        config["lora_bias"] = True
    return config


def mlx_config(spec: AdapterSpec, ranks: dict[str, int]) -> dict:
    """adapter_config.json as mlx_lm.lora writes it, for factors of these modules padded to one rank."""
    keys: set[str] = set()
    first = spec.num_layers
    for module in ranks or {m.name: 0 for m in spec.lora}:
        m = LAYER_PATTERN.match(module + ".weight")
        if m and m.group(1) == spec.decoder_stack:
            keys.add(m.group(3).removeprefix(".").removesuffix(".weight"))
            first = min(first, int(m.group(2)))
        else:
            keys.add(module)  # a top-level module (lm_head), matched by its whole name
    return {
        "model": spec.base_model,
        "fine_tune_type": "lora",
        "num_layers": spec.num_layers - first,
        "lora_parameters": {"rank": max(ranks.values(), default=1), "scale": 1.0, "dropout": 0.0, "keys": sorted(keys)},
    }
