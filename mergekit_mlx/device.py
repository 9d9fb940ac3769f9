"""Choosing the MLX device for one command or call, and putting the previous default back after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx

from .errors import RecipeError

DEVICES = ("cpu", "gpu")


def check_device(name: str | None) -> None:
    """Refuse a device this MLX install cannot run on, naming the flag and what would work."""
    if name is None:
        return
    if name not in DEVICES:
        raise RecipeError(f"--device {name!r} is not known; valid: {', '.join(DEVICES)}")
    if name == "gpu" and not mx.is_available(mx.gpu):
        raise RecipeError(
            "--device gpu: this MLX install has no GPU backend (on Linux, mlx[cuda13] brings the NVIDIA one; "
            "on a Mac, plain mlx the Metal one); use --device cpu, or leave --device out"
        )


@contextmanager
def use_device(name: str | None) -> Iterator[None]:
    """MLX's default device is `name` inside the block (unchanged for None) and as before after it."""
    check_device(name)
    if name is None:
        yield
        return
    previous = mx.default_device()
    mx.set_default_device(mx.gpu if name == "gpu" else mx.cpu)
    try:
        yield
    finally:
        mx.set_default_device(previous)
