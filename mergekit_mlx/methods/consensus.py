"""Consensus merging (Wang et al. 2024, arXiv 2405.07813): a task-arithmetic or TIES merge, then
only the elements that at least k task vectors find important ("TALL masks").

Semantics, parameter names and defaults follow mergekitty 0.3 (the fork of mergekit that ships
them): delta_i = x_i - base; the multi-task vector `mixed` is task arithmetic's (consensus_ta:
sum_i w_i delta_i, divided by sum_i w_i when `normalize`) or TIES' (consensus_ties: top-density
magnitudes of each delta, sign election, disjoint weighted mean when `normalize`); model i's TALL
mask is |delta_i| > lambda_i * |mixed - delta_i| (delta_i unweighted, unsparsified); an element
keeps `mixed` where at least k masks hold, else it stays at the base. The comparison is strict, as
mergekitty's (the paper writes >=, under which an element no model changed would count as important).

Defaults are mergekitty's: k = 1 and lambda = 1 (the paper recommends k = 2 and tunes lambda per
task on validation data); consensus_ta accepts density and rescale as mergekitty does and, as
there, does not sparsify. Where mergekitty differs, this module does the right thing:
- with `rescale`, mergekitty's magnitude sparsifier scales the task vector in place, so its TALL
  masks see the rescaled delta; here they see the task vector itself, as the paper defines them;
- mergekitty reads k from the first task model only; here every model must give the same k.
The merges run through the task-arithmetic family's fused merge (kernels.fused_task_merge).
"""

from __future__ import annotations

import mlx.core as mx

from .. import kernels
from .base import DENSITY, FINITE, MergeInputs, Method, Param, Range, float32

AT_LEAST = "an element is kept where at least k task vectors' TALL masks hold"
TALL = "model i's TALL mask is |delta_i| > lambda * |mixed - delta_i|"


def multi_task_vector(inputs: MergeInputs, deltas: list[mx.array], ties: bool) -> mx.array:
    """Task arithmetic's or TIES' merged task vector in float32 (the fused merge over a zero base,
    so that its output is the merged delta itself, not base + delta rounded)."""
    others = inputs.non_base
    s = inputs.shared
    return kernels.fused_task_merge(
        mx.zeros(deltas[0].shape, dtype=mx.float32),
        deltas,
        [inputs.per_input[i]["weight"] for i in others],
        sparsify=kernels.Sparsify.MAGNITUDE if ties else None,
        densities=[inputs.per_input[i]["density"] for i in others],
        rescale=s["rescale"] if ties else False,  # consensus_ta never sparsifies, so never rescales
        consensus=kernels.Consensus.SUM if ties else None,
        normalize=s["normalize"],
        lam=1.0,
        seed=inputs.seed,
        streams=[kernels.stream_id(inputs.name, inputs.input_ids[i] if inputs.input_ids else i) for i in others],
    )


def consensus_mask(deltas: list[mx.array], mixed: mx.array, lambdas: list[float], k: int) -> mx.array:
    """Where at least k of the TALL masks |delta_i| > lambda_i |mixed - delta_i| hold."""
    votes = sum((mx.abs(d) > lam * mx.abs(mixed - d)).astype(mx.int32) for d, lam in zip(deltas, lambdas))
    return votes >= k


def consensus_merge(inputs: MergeInputs, ties: bool) -> mx.array:
    base_in = inputs.tensors[inputs.base]
    others = inputs.non_base
    if not others:
        return base_in
    base = float32(base_in)
    deltas = [float32(inputs.tensors[i]) - base for i in others]
    mixed = multi_task_vector(inputs, deltas, ties)
    k = int(inputs.per_input[others[0]]["k"])
    keep = consensus_mask(deltas, mixed, [inputs.per_input[i]["lambda"] for i in others], k)
    return (base + mx.where(keep, mixed, 0.0)).astype(base_in.dtype)


def check(shared: dict, per_input: list[dict], base: int | None):
    task = [i for i in range(len(per_input)) if i != base]
    if not task:
        return None
    k = int(per_input[task[0]]["k"])
    for i in task[1:]:
        if int(per_input[i]["k"]) != k:
            return (
                i,
                f"k must be the same for every model (one consensus threshold), got {int(per_input[i]['k'])} here and {k} before",
            )
    if k > len(task):
        models = f"{len(task)} task model" + ("s" if len(task) != 1 else "")
        return None, (
            f"k is {k} but there are only {models}: no element could reach it and every tensor would stay at "
            f"the base; k counts the task models that must agree (0..{len(task)})"
        )
    return None


def _make(name: str, ties: bool, doc: str) -> Method:
    def merge(inputs: MergeInputs) -> mx.array:
        return consensus_merge(inputs, ties)

    return Method(
        name,
        merge,
        params=(
            Param("weight", float, "non_base", valid=FINITE),
            DENSITY,
            Param("normalize", bool, "shared", default=ties),
            Param("rescale", bool, "shared", default=False),
            Param("int8_mask", bool, "shared", default=False),  # a memory switch in mergekitty; masks here are never stored
            Param("k", int, "non_base", default=1, valid=Range(0), why=AT_LEAST),
            Param("lambda", float, "non_base", default=1.0, valid=Range(0), why=TALL),
        ),
        base="required",
        doc=doc,
        check=check,
        gpu_kernels=("select", "l1", "merge") if ties else (),
    )


METHODS = [
    _make(
        "consensus_ta",
        False,
        "Consensus Task Arithmetic: the task-arithmetic merge, kept only where at least k task vectors are "
        "important (|delta_i| > lambda_i |mixed - delta_i|); elsewhere the base. Defaults: mergekitty's.",
    ),
    _make(
        "consensus_ties",
        True,
        "Consensus TIES: the TIES merge, kept only where at least k task vectors are important "
        "(|delta_i| > lambda_i |mixed - delta_i|); elsewhere the base. Defaults: mergekitty's.",
    ),
]
