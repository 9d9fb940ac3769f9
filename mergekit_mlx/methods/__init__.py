"""The registry of merge methods: every module in this package lists its methods in `METHODS`."""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import RecipeError
from .base import REQUIRED, MergeInputs, Method, Param, Range

__all__ = ["REQUIRED", "MergeInputs", "Method", "Param", "Range", "all_methods", "get_method"]

_REGISTRY: dict[str, Method] = {}


def all_methods() -> dict[str, Method]:
    if not _REGISTRY:
        for info in pkgutil.iter_modules(__path__):
            if info.name == "base":
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            for method in getattr(module, "METHODS", ()):
                if method.name in _REGISTRY:
                    raise RuntimeError(f"merge method {method.name!r} is defined twice")
                _REGISTRY[method.name] = method
    return _REGISTRY


def get_method(name: str) -> Method:
    methods = all_methods()
    if name not in methods:
        shown = name if len(name) <= 60 else name[:60] + "..."
        raise RecipeError(f"merge_method: {shown!r} is not a known method; known: {', '.join(sorted(methods))}")
    return methods[name]
