"""What every merge method is: a pure function over lazy arrays, plus a table of its parameters.

A method never sees files, shards, devices or YAML. The planner resolves each parameter for each
output tensor (filters, gradients, defaults) and hands the method a `MergeInputs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import mlx.core as mx

REQUIRED = object()  # sentinel: the parameter has no default

# Which inputs a parameter applies to, as in mergekit:
#   shared    one value for the whole tensor (e.g. normalize, lambda, t)
#   input     one value per input model, the base included (e.g. linear's weight)
#   non_base  one value per input model other than the base (e.g. ties' weight, density)
Scope = Literal["shared", "input", "non_base"]


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # float, int, bool or str
    scope: Scope
    default: Any = REQUIRED
    # check(value) returns an error string when the value is out of range, else None
    check: Optional[Callable[[Any], Optional[str]]] = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass
class MergeInputs:
    """Everything a method gets for one output tensor."""

    tensors: list[mx.array]  # one per input, base included, all the same shape
    base: Optional[int]  # index of the base model in `tensors`, None when there is none
    shared: dict[str, Any]  # resolved shared parameters
    per_input: list[dict[str, Any]]  # resolved per-input parameters, aligned with `tensors`
    name: str = ""  # output tensor name (for messages and random streams)
    seed: int = 0  # random seed of the run (for DARE/DELLA masks)
    input_ids: list[int] = field(default_factory=list)  # stable model index of each input

    def param(self, i: int, key: str) -> Any:
        return self.per_input[i][key]

    @property
    def non_base(self) -> list[int]:
        return [i for i in range(len(self.tensors)) if i != self.base]


@dataclass(frozen=True)
class Method:
    name: str
    merge: Callable[[MergeInputs], mx.array]
    params: tuple[Param, ...] = ()
    base: Literal["required", "optional", "none"] = "optional"
    min_inputs: int = 1
    max_inputs: Optional[int] = None
    random: bool = False  # uses the run's seed
    # every input element reaches the output arithmetically, so a NaN/Inf input shows in the output
    propagates_nonfinite: bool = False
    # tensor-sized float32 copies the merge holds besides its inputs and output (fused or chunked
    # implementations: 0); None: assume an unfused graph, one per input plus two
    working_copies: Optional[int] = None
    doc: str = ""
    # check(shared, per_input, base) -> (input position or None for shared, message) when the resolved
    # parameters of one tensor cannot work together; the planner calls it before any tensor is read
    check: Optional[Callable[[dict[str, Any], list[dict[str, Any]], Optional[int]], Optional[tuple[Optional[int], str]]]] = None
    # GPU kernel groups (kernels._SELF_CHECKS) the merge may call: their first-use checks run before
    # the merge threads start (a check computes its CPU reference under mx.stream(mx.cpu), which
    # switches MLX's process-wide default device)
    gpu_kernels: tuple[str, ...] = ()

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


def in_range(lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open=False, hi_open=False):
    """A `Param.check` for a numeric interval, e.g. in_range(0, 1) for a density."""

    def check(v: Any) -> Optional[str]:
        bad = (
            (lo is not None and (v <= lo if lo_open else v < lo))
            or (hi is not None and (v >= hi if hi_open else v > hi))
        )
        if bad:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            lo_s = "-inf" if lo is None else f"{lo:g}"
            hi_s = "inf" if hi is None else f"{hi:g}"
            return f"must be in {left}{lo_s}, {hi_s}{right}, got {v}"
        return None

    return check


def float32(x: mx.array) -> mx.array:
    """Merges compute in float32 (float64 stays float64) and round once on output."""
    return x if x.dtype in (mx.float32, mx.float64) else x.astype(mx.float32)
