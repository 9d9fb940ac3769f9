"""The switches of a merge run, shared by the Python API and the command line."""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx

from .device import DEVICES
from .errors import RecipeError
from .formats import DEFAULT_SHARD_BYTES, OUT_FORMATS
from .formats.mlx_quant import GROUP_SIZES, QUANT_FORMATS

DEFAULT_BATCH_BYTES = 512 * 1000**2  # on the CPU
# on a GPU host more reads run side by side (the measurement: benchmarks/RESULTS.md, settings)
DEFAULT_GPU_BATCH_BYTES = 2 * 1000**3
MAX_SEED = 2**64 - 1  # the random streams are keyed by a 64-bit seed
# each option: its command-line flag (the Python API's name is the field's)
FLAGS = {
    "random_seed": "--random-seed",
    "out_shard_size": "--out-shard-size",
    "batch_bytes": "--batch-size",
    "device": "--device",
    "out_format": "--out-format",
    "group_size": "--group-size",
}
SWITCHES = ("copy_tokenizer", "allow_crimes", "allow_nonfinite", "use_kernels", "force", "resume", "progress")


@dataclass
class MergeOptions:
    random_seed: int = 0
    out_shard_size: int = DEFAULT_SHARD_BYTES
    batch_bytes: int | None = None  # bytes in flight; None: by device (DEFAULT_*BATCH_BYTES)
    device: str | None = None  # "cpu" or "gpu"; None keeps MLX's default
    copy_tokenizer: bool = True
    allow_crimes: bool = False
    allow_nonfinite: bool = False
    use_kernels: bool = True
    out_format: str = "hf"
    group_size: int | None = None
    force: bool = False
    resume: bool = False
    progress: bool = False

    def check(self) -> None:
        """Raise RecipeError naming the flag of the first option that cannot work; nothing is read
        or written before this passes (merge() and `mergekit-mlx run` call it first)."""

        def bad(field: str, message: str) -> RecipeError:
            return RecipeError(f"{FLAGS[field]} ({field}): {message}")

        def whole(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not whole(self.random_seed) or not 0 <= self.random_seed <= MAX_SEED:
            raise bad("random_seed", f"must be a whole number from 0 to 2**64 - 1, got {_show(self.random_seed)}")
        if not whole(self.out_shard_size) or self.out_shard_size < 1:
            raise bad("out_shard_size", f"must be a positive number of bytes (e.g. 5G), got {_show(self.out_shard_size)}")
        if self.batch_bytes is not None and (not whole(self.batch_bytes) or self.batch_bytes < 1):
            raise bad("batch_bytes", f"must be a positive number of bytes (e.g. 512M), got {_show(self.batch_bytes)}")
        if self.device is not None and self.device not in DEVICES:
            raise bad("device", f"must be one of {', '.join(DEVICES)}, got {_show(self.device)}")
        if self.out_format not in OUT_FORMATS:
            raise bad("out_format", f"{_show(self.out_format)} is not an output format; valid: {', '.join(OUT_FORMATS)}")
        if self.group_size is not None:
            if self.out_format not in QUANT_FORMATS:
                raise bad(
                    "group_size",
                    f"applies only to the MLX-quantized formats ({', '.join(QUANT_FORMATS)}), not to {self.out_format}",
                )
            valid = GROUP_SIZES[QUANT_FORMATS[self.out_format][0]]
            if not whole(self.group_size) or self.group_size not in valid:
                raise bad(
                    "group_size",
                    f"{_show(self.group_size)} is not a group size of {self.out_format}; valid: {', '.join(map(str, valid))}",
                )
        for name in SWITCHES:
            if not isinstance(getattr(self, name), bool):
                raise RecipeError(f"{name}: must be True or False, got {_show(getattr(self, name))}")

    def resolved(self) -> MergeOptions:
        """These options, checked, with the defaults that depend on the device filled in."""
        self.check()
        if self.batch_bytes is not None:
            return self
        gpu = self.device == "gpu" or (self.device is None and mx.default_device().type == mx.DeviceType.gpu)
        return replace(self, batch_bytes=DEFAULT_GPU_BATCH_BYTES if gpu else DEFAULT_BATCH_BYTES)


def _show(value) -> str:
    text = repr(value) if not (isinstance(value, int) and value.bit_length() > 64) else f"a number of {value.bit_length()} bits"
    return text if len(text) <= 40 else text[:40] + "..."
