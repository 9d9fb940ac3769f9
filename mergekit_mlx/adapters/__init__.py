"""LoRA adapters, PEFT's and mlx-lm's, as merge inputs (`model: BASE+ADAPTER` in a recipe).

  read.py   an adapter directory: its config and weights header, as one `Update` per tensor it changes
  apply.py  a base model with an adapter applied lazily per tensor (`apply_adapter`): a `ModelSource`

The planner splits a recipe's `BASE+ADAPTER`, opens BASE with `formats.open_model` (any format) and
wraps it here; nothing downstream knows an adapter was involved.
"""

from .apply import AdaptedModel, adapter_targets, apply_adapter
from .read import Adapter, AdapterKind, Update, read_adapter

__all__ = ["Adapter", "AdapterKind", "AdaptedModel", "Update", "adapter_targets", "apply_adapter", "read_adapter"]
