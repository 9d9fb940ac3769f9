"""Command-line flags that several commands share, defined once: sizes, the device, progress, output."""

from __future__ import annotations

import argparse
import re

from .errors import RecipeError

SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "M": 1000**2,
    "MB": 1000**2,
    "G": 1000**3,
    "GB": 1000**3,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "T": 1000**4,
    "TB": 1000**4,
}


class Parser(argparse.ArgumentParser):
    """argparse whose errors take the command's error path: one paragraph naming the flag, exit 2."""

    def error(self, message: str):  # argparse's own prints usage and exits itself
        raise RecipeError(f"{self.prog}: {message} (`{self.prog} --help` lists the options)")


def parse_size(text: str) -> int:
    """'5G', '500MB', '1.5GiB' or a byte count; at least one byte."""
    m = re.fullmatch(r"\s*([0-9]{0,20}\.?[0-9]{1,20})\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a size (examples: 5G, 500M, 2GiB, 1000000)")
    size = int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a positive size (examples: 5G, 500M, 2GiB)")
    return size


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """--device and --no-progress: every command takes them."""
    p.add_argument("--device", choices=("cpu", "gpu"), help="MLX device (default: MLX's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of every command that writes a model."""
    from .formats import OUT_FORMATS

    p.add_argument("--out-format", default="hf", choices=OUT_FORMATS, help="output format (default hf safetensors)")
    p.add_argument("--group-size", type=int, help="quantization group size for mlx-* output formats")
    add_shard_size_argument(p)
    add_force_argument(p)


def add_shard_size_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-shard-size", type=parse_size, default="5G", help="largest output shard (default 5G)")


def add_force_argument(p: argparse.ArgumentParser) -> None:
    """--force: every command that writes an output through the output lifecycle."""
    p.add_argument(
        "--force", action="store_true", help="replace an earlier output of mergekit-mlx (never a folder or file it did not write)"
    )
