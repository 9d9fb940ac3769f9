"""The task-arithmetic family: one function, two switches (how to sparsify, how to agree on signs).

    task_arithmetic    no sparsification,        no sign consensus
    ties               magnitude top-k,          sum consensus, normalize by default
    dare_linear        random (DARE),            no consensus, L1 rescale by default
    dare_ties          random (DARE),            sum consensus, L1 rescale by default
    breadcrumbs        magnitude minus outliers, no consensus
    breadcrumbs_ties   magnitude minus outliers, sum consensus
    della_linear       rank-weighted random,     no consensus, L1 rescale by default
    della              rank-weighted random,     sum consensus, normalize and rescale by default

Semantics follow mergekit 0.1.5: delta_i = x_i - base; sparsify each delta (rescaled to keep its
L1 norm when `rescale`); multiply by weight_i; with sum consensus keep, per element, only the deltas
whose sign matches the sign of the weighted sum; add (divided by the kept weights when `normalize`)
times `lambda` to the base. Magnitude ties are broken by the lowest flat index; random masks come from
a counter-based generator keyed by (seed, tensor name, model), so a seed gives the same merge on
every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import mlx.core as mx

from .. import kernels
from ..errors import RecipeError
from .base import DENSITY, FINITE, FRACTION, MergeInputs, Method, Param, Range, float32

RESCALE_EPS = 1e-7


class Sparsification(str, Enum):
    """How each task vector is sparsified (mergekit's SparsificationMethod). The first two run inside
    the fused merge (kernels.Sparsify has the same values); the others are passes of their own here."""

    MAGNITUDE = "magnitude"  # TIES: the top-density magnitudes
    RANDOM = "random"  # DARE: kept with probability density
    MAGNITUDE_OUTLIERS = "magnitude_outliers"  # breadcrumbs: drop the smallest and the gamma largest
    DELLA = "della"  # DELLA: keep probability rising with magnitude rank


FUSED = (None, Sparsification.MAGNITUDE, Sparsification.RANDOM)
SUM = kernels.Consensus.SUM  # TIES' sign election


@dataclass(frozen=True)
class Family:
    name: str
    sparsify: Sparsification | None  # None: the whole task vector
    consensus: kernels.Consensus | None  # None: no sign election
    normalize: bool
    rescale: bool
    doc: str


FAMILY = (
    Family("task_arithmetic", None, None, False, False, "Adds the weighted task vectors to the base."),
    Family("ties", Sparsification.MAGNITUDE, SUM, True, False, "TIES: top-density magnitudes, sign election, disjoint mean."),
    Family("dare_linear", Sparsification.RANDOM, None, False, True, "DARE: random drop with probability 1-density, L1 rescale."),
    Family("dare_ties", Sparsification.RANDOM, SUM, False, True, "DARE drop + TIES sign election."),
    Family("breadcrumbs", Sparsification.MAGNITUDE_OUTLIERS, None, False, False, "Drops the smallest and the gamma largest."),
    Family("breadcrumbs_ties", Sparsification.MAGNITUDE_OUTLIERS, SUM, False, False, "Breadcrumbs + TIES sign election."),
    Family("della_linear", Sparsification.DELLA, None, False, True, "DELLA: keep probability rises with magnitude rank."),
    Family("della", Sparsification.DELLA, SUM, True, True, "DELLA + TIES sign election."),
)


def rescale_l1(delta: mx.array, kept: mx.array) -> mx.array:
    """Scale the kept part so its L1 norm equals the original's (unless either is ~0)."""
    # blocked sums: a plain float32 sum of millions of values drifts ~1e-3 on the CPU
    before = kernels.accurate_sum(mx.abs(delta))
    after = kernels.accurate_sum(mx.abs(kept))
    ok = (before >= RESCALE_EPS) & (after >= RESCALE_EPS)
    return kept * mx.where(ok, before / mx.where(ok, after, 1.0), 1.0)


def della_probabilities(delta: mx.array, density: float, epsilon: float) -> mx.array:
    """Per-row keep probabilities density-eps .. density+eps, rising linearly with |delta| rank."""
    rows = delta.reshape(1, -1) if delta.ndim < 2 else delta.reshape(delta.shape[0], -1)
    n = rows.shape[1]
    ranks = mx.argsort(mx.argsort(mx.abs(rows), axis=1), axis=1).astype(mx.float32)
    # ranks run 0..n-1 in every row, so (rank - min) / (max - min) is rank / (n - 1); one column -> 0
    rank_norm = ranks / (n - 1) if n > 1 else mx.zeros_like(ranks)
    return ((density - epsilon) + rank_norm * (2 * epsilon)).reshape(delta.shape)


def sparsify(delta: mx.array, how: Sparsification, p: dict, rescale: bool, seed: int, stream: int) -> mx.array:
    """Breadcrumbs' and DELLA's sparsifiers (rescaled to keep the L1 norm when `rescale`)."""
    density = p["density"]
    if density >= 1:
        return delta
    n = delta.size
    # plain magnitude and random sparsification run inside kernels.fused_task_merge
    if how is Sparsification.MAGNITUDE_OUTLIERS:
        target = int(density * n)
        n_top = int(p["gamma"] * n)
        n_bot = max(0, n - target - n_top)
        # ascending ranks [n_bot, n_bot + target): the top (n - n_bot) minus the top (n - n_bot - target)
        mask = kernels.topk_mask(delta, n - n_bot) & ~kernels.topk_mask(delta, n - n_bot - target)
    elif how is Sparsification.DELLA:
        if density <= 0:
            return mx.zeros_like(delta)
        eps = p["epsilon"]
        if density + eps >= 1 or density - eps <= 0:
            raise RecipeError(
                f"parameters.epsilon: density +/- epsilon must lie in (0, 1); got density {density:g}, epsilon {eps:g}"
            )
        mask = kernels.random_mask(seed, stream, delta.shape, della_probabilities(delta, density, eps))
    else:
        raise ValueError(how)
    kept = mx.where(mask, delta, 0.0)
    return rescale_l1(delta, kept) if rescale else kept


def task_merge(inputs: MergeInputs, family: Family) -> mx.array:
    base = inputs.tensors[inputs.base]
    others = inputs.non_base
    if not others:
        return base
    s = inputs.shared
    weights = [inputs.per_input[i]["weight"] for i in others]
    if family.sparsify in FUSED:
        # one fused pass over all inputs: a custom kernel on a GPU, a compiled graph on the CPU
        return kernels.fused_task_merge(
            base,
            [inputs.tensors[i] for i in others],
            weights,
            sparsify=family.sparsify and kernels.Sparsify(family.sparsify.value),
            densities=[inputs.per_input[i]["density"] for i in others],
            rescale=s["rescale"],
            consensus=family.consensus,
            normalize=s["normalize"],
            lam=s["lambda"],
            seed=inputs.seed,
            streams=[_stream(inputs, i) for i in others],
        )
    b = float32(base)
    deltas = [
        sparsify(
            float32(inputs.tensors[i]) - b, family.sparsify, inputs.per_input[i], s["rescale"], inputs.seed, _stream(inputs, i)
        )
        * w
        for i, w in zip(others, weights)
    ]
    if family.consensus is SUM:
        majority = mx.where(sum(deltas) >= 0, 1.0, -1.0)
        masks = [mx.sign(d) == majority for d in deltas]
        mixed = sum(mx.where(m, d, 0.0) for m, d in zip(masks, deltas))
        divisor = sum(mx.where(m, w, 0.0) for m, w in zip(masks, weights))
        divisor = mx.where(divisor == 0, 1.0, divisor)
    else:
        mixed = sum(deltas)
        total = sum(weights)
        divisor = total if abs(total) >= 1e-8 else 1.0
    if s["normalize"]:
        mixed = mixed / divisor
    if s["lambda"] != 1:
        mixed = mixed * s["lambda"]
    return (b + mixed).astype(base.dtype)


def _stream(inputs: MergeInputs, i: int) -> int:
    model = inputs.input_ids[i] if inputs.input_ids else i
    return kernels.stream_id(inputs.name, model)


def _make(f: Family) -> Method:
    params = [
        Param("weight", float, "non_base", valid=FINITE),
        DENSITY,
        Param("normalize", bool, "shared", default=f.normalize),
        Param("rescale", bool, "shared", default=f.rescale),
        Param("lambda", float, "shared", default=1.0, valid=FINITE),
        Param("int8_mask", bool, "shared", default=False),  # a memory switch in mergekit; masks here are never stored
    ]
    if f.sparsify is Sparsification.MAGNITUDE_OUTLIERS:
        params.append(
            Param("gamma", float, "non_base", default=0.01, valid=FRACTION, why="the fraction of largest magnitudes dropped")
        )
    if f.sparsify is Sparsification.DELLA:
        # keep probabilities run from density - epsilon to density + epsilon, which must stay inside (0, 1)
        params.append(
            Param(
                "epsilon",
                float,
                "non_base",
                default=0.15,
                valid=Range(0, 0.5, hi_open=True),
                why="keep probabilities run from density - epsilon to density + epsilon, inside (0, 1)",
            )
        )

    def merge(inputs: MergeInputs) -> mx.array:
        return task_merge(inputs, f)

    def check(shared: dict, per_input: list[dict], base: int | None):
        for i, p in enumerate(per_input):
            if i == base or p["density"] >= 1:
                continue  # density 1 keeps the whole task vector: gamma and epsilon do not apply
            if f.sparsify is Sparsification.DELLA and not (0 < p["density"] - p["epsilon"] and p["density"] + p["epsilon"] < 1):
                return i, f"density +/- epsilon must lie in (0, 1); got density {p['density']:g}, epsilon {p['epsilon']:g}"
            if f.sparsify is Sparsification.MAGNITUDE_OUTLIERS and p["density"] + p["gamma"] > 1:
                return i, (
                    f"density + gamma must be at most 1 (keep the density fraction below the gamma fraction of largest "
                    f"magnitudes); got density {p['density']:g}, gamma {p['gamma']:g}"
                )
        return None

    return Method(
        f.name,
        merge,
        params=tuple(params),
        base="required",
        random=f.sparsify in (Sparsification.RANDOM, Sparsification.DELLA),
        propagates_nonfinite=f.sparsify is None and f.consensus is None,
        working_copies=0 if f.sparsify is None else None,  # task_arithmetic: one compiled loop
        doc=f.doc,
        check=check,
        gpu_kernels=() if f.sparsify is None else ("uniform", "select", "l1", "merge"),
    )


METHODS = [_make(f) for f in FAMILY]
