"""The switches of a merge run, shared by the Python API and the command line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .writer import DEFAULT_SHARD_BYTES

DEFAULT_BATCH_BYTES = 512 * 1000**2


@dataclass
class MergeOptions:
    random_seed: int = 0
    out_shard_size: int = DEFAULT_SHARD_BYTES
    batch_bytes: int = DEFAULT_BATCH_BYTES
    device: Optional[str] = None  # "cpu" or "gpu"; None keeps MLX's default
    copy_tokenizer: bool = True
    allow_crimes: bool = False
    allow_nonfinite: bool = False
    use_kernels: bool = True
    out_format: str = "hf"
    group_size: Optional[int] = None
    force: bool = False
    resume: bool = False
    progress: bool = False
