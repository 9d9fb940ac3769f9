"""Several LoRA adapters of one base merged into one adapter, in adapter space, with PEFT's
`LoraModel.add_weighted_adapter` (peft 0.21) as the specification.

Each module an adapter changes holds dW_i = s_i·B_i·A_i (A (r, in), B (out, r); s_i the adapter's
scale: alpha/r, alpha/sqrt(r) with rsLoRA, mlx-lm's `scale`). Per module, over the adapters that change
it, with the recipe's weights w_i (`Space`):

  CONCAT   cat: A = the w_i·s_i·A_i stacked along the rank, B = the B_i side by side, so
           B·A = Σ w_i·dW_i exactly and the ranks add up.
  FACTORS  linear, ties, dare_linear, dare_ties, magnitude_prune: `weighted_merge` of the A_i with
           weights sign(w_i·s_i)·sqrt|w_i·s_i| and, apart, of the B_i with sqrt|w_i·s_i| (equal ranks).
           B·A is then a product of sums, not Σ w_i·dW_i (PEFT calls linear "a very rough approximation").
  DELTA    svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd: `weighted_merge` of the
           dW_i with weights w_i, factored by truncated SVD at `rank`: B = U·S, A = Vh (PEFT's split),
           both clipped to ±(the `svd_clamp` quantile of their values) when that is set.

The written adapter's scale is 1 (lora_alpha = r), so its B·A is the merged update itself. One adapter
alone is merged as `linear` whatever the method, as PEFT does. DoRA adapters are refused (PEFT refuses
them too: a magnitude vector does not add), and so are whole tensors (modules_to_save), LoRA biases,
mlx-lm full fine-tunes and stacked experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import mlx.core as mx
import numpy as np

from ..errors import ModelError, RecipeError
from ..formats.base import OutputTensor
from .read import Adapter, Layout, Update
from .svd import SvdMethod, SvdSettings, low_rank, tensor_seed
from .write import LoraModule, lora_tensor_names


class Space(Enum):
    CONCAT = "concat"
    FACTORS = "factors"
    DELTA = "delta"


class Sparsify(Enum):
    NONE = "none"
    MAGNITUDE = "magnitude"  # keep the int(density·n) largest |x|
    RANDOM = "random"  # DARE: keep each element with probability density, divide by density


class MajoritySign(Enum):
    TOTAL = "total"  # the sign of Σ x_i
    FREQUENCY = "frequency"  # the sign of Σ sign(x_i)


@dataclass(frozen=True)
class Combination:
    space: Space
    sparsify: Sparsify = Sparsify.NONE
    ties: bool = False  # keep per element only the inputs of the majority sign, averaged over their count

    @property
    def uses_density(self) -> bool:
        return self.sparsify is not Sparsify.NONE


COMBINATIONS = {  # PEFT's combination_type -> what it does
    "linear": Combination(Space.FACTORS),
    "cat": Combination(Space.CONCAT),
    "ties": Combination(Space.FACTORS, Sparsify.MAGNITUDE, ties=True),
    "dare_linear": Combination(Space.FACTORS, Sparsify.RANDOM),
    "dare_ties": Combination(Space.FACTORS, Sparsify.RANDOM, ties=True),
    "magnitude_prune": Combination(Space.FACTORS, Sparsify.MAGNITUDE),
    "svd": Combination(Space.DELTA),
    "ties_svd": Combination(Space.DELTA, Sparsify.MAGNITUDE, ties=True),
    "dare_linear_svd": Combination(Space.DELTA, Sparsify.RANDOM),
    "dare_ties_svd": Combination(Space.DELTA, Sparsify.RANDOM, ties=True),
    "magnitude_prune_svd": Combination(Space.DELTA, Sparsify.MAGNITUDE),
}


@dataclass(frozen=True)
class CombineSettings:
    method: str  # a key of COMBINATIONS
    weights: tuple[float, ...]  # one per adapter
    density: float = 1.0  # the pruning methods: the fraction kept, in (0, 1]
    rank: int | None = None  # DELTA: the written rank (None: the largest rank of the inputs)
    svd_clamp: float | None = None  # DELTA: clip the factors to this quantile of their values
    majority_sign: MajoritySign = MajoritySign.TOTAL
    seed: int = 0  # the random (DARE) masks

    @property
    def combination(self) -> Combination:
        return COMBINATIONS[self.method]


# ---------------- the math: pure functions of arrays ----------------


def magnitude_mask(x: mx.array, density: float) -> mx.array:
    """True for the int(density·n) elements of largest magnitude (ties at the threshold all kept)."""
    k = int(density * x.size)
    if k >= x.size:
        return mx.ones(x.shape, dtype=mx.bool_)
    if k == 0:
        return mx.zeros(x.shape, dtype=mx.bool_)
    flat = mx.abs(x).reshape(-1)
    threshold = mx.partition(flat, x.size - k)[x.size - k]  # the k-th largest
    return mx.abs(x) >= threshold


def sparsify(x: mx.array, how: Sparsify, density: float, seed: int) -> mx.array:
    if how is Sparsify.NONE or density >= 1:  # PEFT prunes nothing at density 1
        return x
    if how is Sparsify.MAGNITUDE:
        return mx.where(magnitude_mask(x, density), x, mx.zeros_like(x))
    keep = mx.random.bernoulli(density, x.shape, key=mx.random.key(seed))
    return mx.where(keep, x, mx.zeros_like(x)) / density


def weighted_merge(
    xs: list[mx.array], weights: list[float], c: Combination, settings: CombineSettings, seeds: list[int]
) -> mx.array:
    """PEFT's task arithmetic / ties / dare / magnitude_prune of same-shaped tensors, in float32."""
    pruned = mx.stack([sparsify(x.astype(mx.float32), c.sparsify, settings.density, s) for x, s in zip(xs, seeds)])
    w = mx.array(weights, dtype=mx.float32).reshape((-1,) + (1,) * (pruned.ndim - 1))
    weighted = pruned * w
    if not c.ties:
        return weighted.sum(axis=0)
    # the majority sign is taken over the unweighted, pruned tensors (PEFT's calculate_majority_sign_mask)
    signs = mx.sign(pruned)
    votes = pruned.sum(axis=0) if settings.majority_sign is MajoritySign.TOTAL else signs.sum(axis=0)
    agree = signs == mx.where(votes >= 0, 1.0, -1.0)
    kept = mx.where(agree, weighted, mx.zeros_like(weighted)).sum(axis=0)
    return kept / mx.maximum(agree.astype(mx.float32).sum(axis=0), 1.0)


def svd_factors(delta: mx.array, rank: int, clamp: float | None) -> tuple[mx.array, mx.array]:
    """(A, B) with B·A the best rank-`rank` approximation of delta: B = U·S, A = Vh, as PEFT splits them."""
    f = low_rank(delta, rank, SvdSettings(method=SvdMethod.EXACT, distribute_scale=False))  # b = U, a = S·Vh
    s = f.singular_values
    a = f.a / mx.where(s > 0, s, 1.0)[:, None]
    b = f.b * s[None, :]
    missing = rank - s.shape[0]  # only sv_epsilon drops values, and it is 0 here; kept for the written shapes
    if missing > 0:
        a = mx.concatenate([a, mx.zeros((missing, a.shape[1]), a.dtype)], axis=0)
        b = mx.concatenate([b, mx.zeros((b.shape[0], missing), b.dtype)], axis=1)
    if clamp is not None:
        values = np.concatenate([np.asarray(b).reshape(-1), np.asarray(a).reshape(-1)])
        high = float(np.quantile(values, clamp))  # torch.quantile's default (linear) interpolation
        a, b = mx.clip(a, -high, high), mx.clip(b, -high, high)
    return a, b


# ---------------- the plan: which modules, from which adapters, at which rank ----------------


@dataclass(frozen=True)
class Part:
    """One adapter's update of a module, in PEFT's orientation: dW = scale · B·A, A (r, in), B (out, r)."""

    adapter: int  # index into the recipe's adapters
    a_key: str
    b_key: str
    a_transposed: bool  # mlx-lm stores lora_a (in, r) and lora_b (r, out): both transposed
    rank: int
    scale: float


@dataclass(frozen=True)
class ModuleMerge:
    module: str
    out_features: int
    in_features: int
    embedding: bool
    parts: tuple[Part, ...]
    rank: int  # of the written factors

    @property
    def lora_module(self) -> LoraModule:
        return LoraModule(self.module, self.in_features, self.out_features, self.embedding)


@dataclass(frozen=True)
class CombinePlan:
    settings: CombineSettings
    method: str  # as merged: `linear` for one adapter
    modules: tuple[ModuleMerge, ...]
    dtype: mx.Dtype

    @property
    def outputs(self) -> list[OutputTensor]:
        out = []
        for m in self.modules:
            a, b, _ = lora_tensor_names(m.module)
            out += [OutputTensor(a, (m.rank, m.in_features), self.dtype), OutputTensor(b, (m.out_features, m.rank), self.dtype)]
        return out


def plan_combination(adapters: list[Adapter], settings: CombineSettings, labels: list[str]) -> CombinePlan:
    """Every module of every adapter, checked to be mergeable (same shape in each adapter that has it;
    equal ranks for the factor methods); a ModelError or RecipeError names the adapter and module."""
    method = "linear" if len(adapters) == 1 else settings.method
    space = COMBINATIONS[method].space
    modules: dict[str, list[tuple[Part, int, int, bool]]] = {}
    for i, (adapter, label) in enumerate(zip(adapters, labels)):
        for target, update in adapter.updates.items():
            part, out_f, in_f, embedding = _part(i, adapter, label, update)
            modules.setdefault(target.removesuffix(".weight"), []).append((part, out_f, in_f, embedding))
    merges = []
    for module, parts in modules.items():
        shapes = {(o, n) for _, o, n, _ in parts}
        if len(shapes) > 1:
            which = ", ".join(f"{labels[p.adapter]} {[o, n]}" for p, o, n, _ in parts)
            raise ModelError(
                f"adapters[*]: module {module} has another shape in each adapter ({which} as (out, in)): "
                "these are not adapters of one base"
            )
        ranks = [p.rank for p, *_ in parts]
        if space is Space.FACTORS and len(set(ranks)) > 1:
            raise RecipeError(
                f"merge_method: {method} merges the LoRA factors themselves, so every adapter must have the same rank, "
                f"but module {module} has ranks {ranks}; use cat (exact, ranks add up) or svd (re-factored at `rank`)"
            )
        out_f, in_f = next(iter(shapes))
        if space is Space.CONCAT:
            rank = sum(ranks)
        elif space is Space.FACTORS:
            rank = ranks[0]
        else:
            rank = min(settings.rank or max(max(a_ranks(a)) for a in adapters), out_f, in_f)
        merges.append(ModuleMerge(module, out_f, in_f, any(e for *_, e in parts), tuple(p for p, *_ in parts), rank))
    if not merges:
        raise ModelError(f"{labels[0]}: the adapters change no module")
    first = adapters[0]
    dtype = first.tensors[merges[0].parts[0].a_key].dtype
    return CombinePlan(settings, method, tuple(merges), _mx_dtype(dtype))


def a_ranks(adapter: Adapter) -> list[int]:
    """The ranks of an adapter's modules (PEFT's r and rank_pattern, mlx-lm's rank)."""
    return [
        adapter.tensors[u.right].shape[0] if u.layout is not Layout.MLX_MATRIX else adapter.tensors[u.left].shape[1]
        for u in adapter.updates.values()
        if u.left
    ] or [1]


def _part(i: int, adapter: Adapter, label: str, update: Update) -> tuple[Part, int, int, bool]:
    def refuse(what: str) -> ModelError:
        return ModelError(
            f"{label} ({adapter.path}): {what}; lora-merge merges LoRA factors only (PEFT's add_weighted_adapter refuses it too)"
        )

    if update.magnitude is not None or adapter.method == "DoRA":
        raise refuse("a DoRA adapter (its magnitude vectors do not add up across adapters)")
    if update.replace is not None:
        raise refuse(f"it replaces {update.target} whole (modules_to_save or a full fine-tune)")
    if update.add is not None:
        raise refuse(f"it changes the bias {update.target} (lora_bias)")
    shapes = adapter.tensors
    if update.layout is Layout.MLX_MATRIX:
        a_in, r = shapes[update.left].shape  # lora_a (in, r), lora_b (r, out)
        out_f = shapes[update.right].shape[1]
        module = update.target.removesuffix(".weight").rsplit(".", 1)[-1]
        embedding = "embed" in module or module in ("wte", "wpe")
        part = Part(i, update.left, update.right, True, r, update.scale)
        return part, out_f, a_in, embedding
    if update.layout in (Layout.PEFT_LINEAR, Layout.PEFT_EMBEDDING):
        r, in_f = shapes[update.right].shape  # A (r, in), B (out, r)
        out_f = shapes[update.left].shape[0]
        part = Part(i, update.right, update.left, False, r, update.scale)
        return part, out_f, in_f, update.layout is Layout.PEFT_EMBEDDING
    raise refuse(f"{update.target} is a stacked-experts (SwitchLinear) update")


def _mx_dtype(code: str) -> mx.Dtype:
    return {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}.get(code, mx.float32)


# ---------------- running a plan ----------------


def combine_module(m: ModuleMerge, plan: CombinePlan, arrays: list[dict[str, mx.array]]) -> tuple[mx.array, mx.array]:
    """The merged (A, B) of one module, in float32."""
    settings, c = plan.settings, COMBINATIONS[plan.method]
    weights = [settings.weights[p.adapter] for p in m.parts]
    factors = [_factors(p, arrays[p.adapter]) for p in m.parts]
    if c.space is Space.CONCAT:
        a = mx.concatenate([w * p.scale * a for w, p, (a, _) in zip(weights, m.parts, factors)], axis=0)
        return a, mx.concatenate([b for _, b in factors], axis=1)
    seeds = [tensor_seed(settings.seed, f"{m.module}#{p.adapter}") for p in m.parts]
    if c.space is Space.FACTORS:
        roots = [math.sqrt(abs(w * p.scale)) for w, p in zip(weights, m.parts)]
        signs = [1.0 if w * p.scale >= 0 else -1.0 for w, p in zip(weights, m.parts)]
        a = weighted_merge([a for a, _ in factors], [r * s for r, s in zip(roots, signs)], c, settings, seeds)
        b = weighted_merge([b for _, b in factors], roots, c, settings, [s + 1 for s in seeds])
        return a, b
    deltas = [p.scale * (b @ a) for p, (a, b) in zip(m.parts, factors)]
    return svd_factors(weighted_merge(deltas, weights, c, settings, seeds), m.rank, settings.svd_clamp)


def _factors(p: Part, arrays: dict[str, mx.array]) -> tuple[mx.array, mx.array]:
    a, b = arrays[p.a_key].astype(mx.float32), arrays[p.b_key].astype(mx.float32)
    return (a.T, b.T) if p.a_transposed else (a, b)


def load_arrays(adapter: Adapter) -> dict[str, mx.array]:
    """An adapter's tensors (an adapter is small beside its model; its header was checked by read_adapter)."""
    return mx.load(str(adapter.weights_file), format="safetensors", stream=mx.cpu)
