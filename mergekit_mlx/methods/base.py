"""What every merge method is: a pure function over lazy arrays, plus a table of its parameters.

A method never sees files, shards, devices or YAML. The planner resolves each parameter for each
output tensor (filters, gradients, defaults) and hands the method a `MergeInputs`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import mlx.core as mx

REQUIRED = object()  # sentinel: the parameter has no default

# Which inputs a parameter applies to, as in mergekit:
#   shared    one value for the whole tensor (e.g. normalize, lambda, t)
#   input     one value per input model, the base included (e.g. linear's weight)
#   non_base  one value per input model other than the base (e.g. ties' weight, density)
Scope = Literal["shared", "input", "non_base"]


@dataclass(frozen=True)
class Range:
    """The values a numeric parameter may take: an interval of finite numbers, each end open or closed."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    def __str__(self) -> str:
        left = "(" if self.lo_open or self.lo == -math.inf else "["
        right = ")" if self.hi_open or self.hi == math.inf else "]"
        lo = "-inf" if self.lo == -math.inf else f"{self.lo:g}"
        hi = "inf" if self.hi == math.inf else f"{self.hi:g}"
        return f"{left}{lo}, {hi}{right}"


FINITE = Range()  # any finite number (a weight may be negative: task negation)
FRACTION = Range(0, 1)


@dataclass(frozen=True)
class Param:
    name: str
    kind: Any  # float, int, bool, or Optional[float] (a number that may be left unset)
    scope: Scope
    default: Any = REQUIRED
    # the valid values of a numeric parameter; every numeric parameter has one (a test holds it)
    valid: Range | None = None
    why: str = ""  # one line: why the range is what it is (shown in errors)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def numeric(self) -> bool:
        return self.kind is not bool

    def problem(self, value: Any) -> str | None:
        """Why `value` cannot be this parameter's value, or None. Booleans only where a boolean is
        meant; numbers (or numeric strings, as mergekit's YAML allows) finite and in `valid`."""
        if not self.numeric:
            return None if isinstance(value, bool) else f"must be true or false, got {show(value)}"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return f"must be a number, got {show(value)}"
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                return f"must be a number, got {show(value)}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if self.kind is int and isinstance(value, float):
            if not value.is_integer():
                return f"must be a whole number, got {value:g}"
        rng = self.valid if self.valid is not None else FINITE
        if value not in rng:
            return f"must be in {rng}, got {show(value)}" + (f" ({self.why})" if self.why else "")
        return None


def show(value: Any, limit: int = 40) -> str:
    """A value for an error message, short whatever its size (an int of 5000 digits has no str)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"{'-' if value < 0 else ''}a number of about {int(value.bit_length() * 0.30103)} digits"
    if isinstance(value, float):
        return f"{value:g}"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# the task-arithmetic family's per-model density (ties, dare_*, breadcrumbs*, della*, consensus_*);
# 0 would keep nothing: mergekit's magnitude cut asserts k > 0 and its DARE rescale divides by it
DENSITY = Param(
    "density",
    float,
    "non_base",
    default=1.0,
    valid=Range(0, 1, lo_open=True),
    why="the fraction of the task vector kept; to leave a model out, remove it",
)


@dataclass
class MergeInputs:
    """Everything a method gets for one output tensor."""

    tensors: list[mx.array]  # one per input, base included, all the same shape
    base: int | None  # index of the base model in `tensors`, None when there is none
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
    max_inputs: int | None = None
    random: bool = False  # uses the run's seed
    # every input element reaches the output arithmetically, so a NaN/Inf input shows in the output
    propagates_nonfinite: bool = False
    # tensor-sized float32 copies the merge holds besides its inputs and output (fused or chunked
    # implementations: 0); None: assume an unfused graph, one per input plus two
    working_copies: int | None = None
    doc: str = ""
    # check(shared, per_input, base) -> (input position or None for shared, message) when the resolved
    # parameters of one tensor cannot work together; the planner calls it before any tensor is read
    check: Callable[[dict[str, Any], list[dict[str, Any]], int | None], tuple[int | None, str] | None] | None = None
    # GPU kernel groups (kernels.GPU_GROUPS) the merge may call: their first-use checks run before
    # the merge threads start (a check computes its CPU reference under mx.stream(mx.cpu), which
    # switches MLX's process-wide default device)
    gpu_kernels: tuple[str, ...] = ()

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


def float32(x: mx.array) -> mx.array:
    """Merges compute in float32 (float64 stays float64) and round once on output."""
    return x if x.dtype in (mx.float32, mx.float64) else x.astype(mx.float32)
