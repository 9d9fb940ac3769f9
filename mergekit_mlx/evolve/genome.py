"""A genotype (a flat vector the optimiser moves) -> a merge recipe, as mergekit-evolve maps it.

The vector is an array of shape (layer groups, models, parameter sets, parameters), flattened in
row-major order: one group per `layer_granularity` layers (one group when 0), one parameter set per
filter plus one for every other tensor, and the method's parameters (weight first; density for
TIES/DARE; t for slerp). Weights are taken as absolute values unless `allow_negative_weights`, and
densities as absolute values clamped to [DENSITY_FLOOR, 1].

Differences from mergekit-evolve, each for a recipe `mergekit-mlx run` accepts as written: values
are rounded to DECIMALS places (the candidate is the rounded recipe, so its YAML reproduces it
exactly); the recipe keeps the inputs' dtype (mergekit-evolve writes `dtype: bfloat16`); no
`int8_mask` (masks are never stored here) and no `normalize` for slerp, which has none; a density
is at least DENSITY_FLOOR (the planner refuses 0, which would keep nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..recipe import Recipe, recipe_from_dict
from .config import GENE_PARAMETERS, Genome, SearchMethod

DECIMALS = 6
DENSITY_FLOOR = 0.01


@dataclass(frozen=True)
class GenomeSpace:
    """A genome over models of `num_layers` layers; `refs` are the references the recipes name
    (the genome's models, then its base model when it is not one of them)."""

    genome: Genome
    num_layers: int
    models: tuple[str, ...]  # the genome's models, as the recipes name them
    base_model: str | None

    @property
    def groups(self) -> int:
        g = self.genome.layer_granularity
        return self.num_layers // g if g > 0 else 1

    @property
    def parameter_sets(self) -> list[str | None]:
        """The filters, then None for every tensor no filter matches."""
        return [*(self.genome.filters or []), None]

    @property
    def parameters(self) -> tuple[str, ...]:
        return GENE_PARAMETERS[self.genome.merge_method]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.groups, len(self.models), len(self.parameter_sets), len(self.parameters))

    @property
    def dimension(self) -> int:
        return math.prod(self.shape)

    def initial(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """mergekit-evolve's start: every weight 1/models and every density 1; or, given a random
        generator (`random_init`), uniform in [0, 1)."""
        if rng is not None:
            return rng.random(self.dimension)
        x = np.zeros(self.shape)
        x[..., 0] = 1 / len(self.models)
        x[..., 1:] = 1.0
        return x.reshape(-1)

    def labels(self) -> list[str]:
        """A name per element of the vector: `group/model.parameter[filter]`."""
        out = []
        for g in range(self.groups):
            for m in self.models:
                for f in self.parameter_sets:
                    for p in self.parameters:
                        out.append(f"{g}/{_short(m)}.{p}" + (f"[{f}]" if f else ""))
        return out

    def describe(self, x: np.ndarray) -> dict[str, Any]:
        """The parameters a genotype gives, by label (`labels`), as its recipe uses them; for slerp the
        two models of each layer group and t."""
        if self.genome.merge_method is SearchMethod.SLERP:
            out: dict[str, Any] = {}
            for g, sl in enumerate(self._slerp_slices(np.asarray(x, dtype=np.float64).reshape(self.shape)[..., 0])):
                out[f"{g}/models"] = [_short(s["model"]) for s in sl["sources"]]
                out[f"{g}/t"] = sl["parameters"]["t"]
            return out
        values = self.values(x)
        stacked = np.stack([values[p] for p in self.parameters], axis=-1).reshape(-1)
        return dict(zip(self.labels(), (float(v) for v in stacked)))

    def values(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The vector as parameter values (absolute, clamped, rounded), by parameter name; each an
        array of shape (groups, models, parameter sets)."""
        x = np.asarray(x, dtype=np.float64).reshape(self.shape)
        out = {}
        for i, p in enumerate(self.parameters):
            v = x[..., i]
            if p == "density":
                v = np.clip(np.abs(v), DENSITY_FLOOR, 1.0)
            elif not self.genome.allow_negative_weights:
                v = np.abs(v)
            out[p] = np.round(v, DECIMALS) + 0.0  # + 0.0: no -0.0 in a recipe
        return out

    def recipe(self, x: np.ndarray) -> Recipe:
        """The merge recipe of a genotype."""
        g = self.genome
        data: dict[str, Any] = {"merge_method": g.merge_method.value}
        if g.merge_method is SearchMethod.SLERP:  # from the raw values, as mergekit-evolve does
            data["slices"] = self._slerp_slices(np.asarray(x, dtype=np.float64).reshape(self.shape)[..., 0])
        elif g.smooth:
            data["models"] = self._smooth_models(self.values(x))
        else:
            data["slices"] = self._slices(self.values(x))
        if self.base_model is not None and g.merge_method is not SearchMethod.SLERP:
            data["base_model"] = self.base_model
        if g.normalized is not None:
            data["parameters"] = {"normalize": g.normalized}
        if g.tokenizer_source is not None:
            data["tokenizer_source"] = g.tokenizer_source
        return recipe_from_dict(data, "candidate recipe")

    def _layer_range(self, group: int) -> list[int]:
        step = self.genome.layer_granularity or self.num_layers
        return [group * step, (group + 1) * step]

    def _setting(self, values: dict[str, np.ndarray], index: tuple) -> dict[str, Any]:
        """The parameters of one source: a value per parameter, or a `{filter, value}` list."""
        sets = self.parameter_sets
        out: dict[str, Any] = {}
        for p, v in values.items():
            if len(sets) == 1:
                out[p] = _plain(v[index][0])
            else:
                out[p] = [{"filter": f, "value": _plain(v[index][k])} for k, f in enumerate(sets)]
        return out

    def _slices(self, values: dict[str, np.ndarray]) -> list[dict]:
        slices = []
        for g in range(self.groups):
            sources = [
                {"model": m, "layer_range": self._layer_range(g), "parameters": self._setting(values, (g, i))}
                for i, m in enumerate(self.models)
            ]
            if self.base_model is not None and self.base_model not in self.models:
                sources.append({"model": self.base_model, "layer_range": self._layer_range(g)})
            slices.append({"sources": sources})
        return slices

    def _smooth_models(self, values: dict[str, np.ndarray]) -> list[dict]:
        """One entry per model, each parameter a gradient over the layer groups (a scalar for one)."""
        models = []
        for i, m in enumerate(self.models):
            params: dict[str, Any] = {}
            for p, v in values.items():
                per_set = [_plain(v[:, i, k]) for k in range(len(self.parameter_sets))]
                if len(per_set) == 1:
                    params[p] = per_set[0]
                else:
                    params[p] = [{"filter": f, "value": val} for f, val in zip(self.parameter_sets, per_set)]
            models.append({"model": m, "parameters": params})
        if self.base_model is not None and self.base_model not in self.models:
            models.append({"model": self.base_model})
        return models

    def _slerp_slices(self, weights: np.ndarray) -> list[dict]:
        """Per layer group the two models of highest value: the first is the slice's base, and t is
        the second's softmax share of the two (mergekit-evolve's rule)."""
        slices = []
        for g in range(self.groups):
            scores = weights[g, :, 0]
            order = sorted(range(len(self.models)), key=lambda i: (-scores[i], i))[:2]  # ties: the earlier model
            top = scores[order]
            share = np.exp(top - top.max())
            t = round(float(share[1] / share.sum()), DECIMALS)
            slices.append(
                {
                    "sources": [{"model": self.models[i], "layer_range": self._layer_range(g)} for i in order],
                    "base_model": self.models[order[0]],
                    "parameters": {"t": t},
                }
            )
        return slices


def _plain(v: Any) -> Any:
    """A numpy scalar or vector as YAML-ready floats; a one-element vector as its element."""
    if isinstance(v, np.ndarray):
        items = [float(e) for e in v.reshape(-1)]
        return items[0] if len(items) == 1 else items
    return float(v)


def _short(ref: str) -> str:
    return ref.rstrip("/").rsplit("/", 1)[-1]
