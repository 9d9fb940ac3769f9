"""The switches of a merge run, shared by the Python API and the command line."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import mlx.core as mx

from .writer import DEFAULT_SHARD_BYTES

DEFAULT_BATCH_BYTES = 512 * 1000**2  # on the CPU
# on a GPU host more reads run side by side: a 7B-shape ties merge on an H200 host took 11.4 s
# with 512 MB in flight and 9.4 s with 2 GB (4 GB: 9.6 s)
DEFAULT_GPU_BATCH_BYTES = 2 * 1000**3


@dataclass
class MergeOptions:
    random_seed: int = 0
    out_shard_size: int = DEFAULT_SHARD_BYTES
    batch_bytes: Optional[int] = None  # bytes in flight; None: by device (DEFAULT_*BATCH_BYTES)
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

    def resolved(self) -> "MergeOptions":
        """These options with the defaults that depend on the device filled in."""
        if self.batch_bytes is not None:
            return self
        gpu = self.device == "gpu" or (self.device is None and mx.default_device().type == mx.DeviceType.gpu)
        return replace(self, batch_bytes=DEFAULT_GPU_BATCH_BYTES if gpu else DEFAULT_BATCH_BYTES)
