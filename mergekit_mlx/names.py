"""Tensor names: which decoder layer a tensor belongs to, and the same tensor in another layer.

Names only, no files: the planner (slices, layer ranges) and the formats (which matrices a
format compresses) both read them here.
"""

from __future__ import annotations

import re

# "model.layers.12.mlp.up_proj.weight" -> ("model.layers.", 12, ".mlp.up_proj.weight")
LAYER_PATTERN = re.compile(r"^(.*?\.(?:layers|h|blocks)\.)(\d{1,9})(\..+)$")  # 9 digits: a 5000-digit index is no layer


def layer_index(name: str) -> int | None:
    """The decoder-layer index a tensor belongs to, or None for embeddings, final norm, head."""
    m = LAYER_PATTERN.match(name)
    return int(m.group(2)) if m else None


def with_layer_index(name: str, index: int) -> str:
    """The same tensor in layer `index` (a name with no layer index is returned as it is)."""
    m = LAYER_PATTERN.match(name)
    if not m:
        return name
    return f"{m.group(1)}{index}{m.group(3)}"
