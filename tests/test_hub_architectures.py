"""Tiny models of many real architectures, in both config styles the Hub holds, merged and loaded
in mlx-lm.

tests/arch_models.py builds each architecture: transformers' own config class writes config.json
(transformers 5: `rope_parameters`, `layer_types`, renamed MoE keys), rewritten for the second style
the way transformers 4 wrote it (`rope_theta`, `rope_scaling`, `torch_dtype`, the old key names);
mlx-lm's model class gives random weights, saved under the checkpoint names its `sanitize` reads back,
as a base and two fine-tunes. For every architecture and both styles:

- the transformers-4 rewrite reads back in transformers 5 as the config it came from (transformers'
  own compatibility code is the judge of the rewrite);
- a ties merge, in memory (`merge(recipe).to_mlx_lm()`) and through `mergekit-mlx run`, checked
  against a float64 numpy TIES written here from mergekit's definition, on a couple of tensors;
- the written config is the base's, in its style: every key kept with its value (the dtype set to
  the recipe's), none added;
- a passthrough slice merge (layers 0-1 of one fine-tune, 1-3 of the other: 5 of 4), with the layers
  checked tensor by tensor against their sources and the written config counting the layers written;
- every output loaded in mlx-lm and run: finite logits, the same in memory and from disk.

Skipped without transformers (the pure-numpy fixtures in test_architectures.py need no torch).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import tiny
from arch_models import (
    ARCHITECTURES,
    LAYERS,
    STYLES,
    VOCAB,
    Family,
    build_family,
    config_style,
    transformers4_config,
    transformers5_config,
)

from mergekit_mlx import MergeResult, merge
from mergekit_mlx.cli import main
from mergekit_mlx.mlx_lm_config import load as load_written

transformers = pytest.importorskip("transformers")
pytest.importorskip("mlx_lm.utils")

TOKENS = mx.array([[1, 5, 9, 3, 12, 7, 30, 2]])

_FAMILIES: dict[tuple[str, str], Family] = {}


def family(name: str, style: str, tmp_path_factory) -> Family:
    """The family of one architecture in one config style, built once per session."""
    if (name, style) not in _FAMILIES:
        _FAMILIES[name, style] = build_family(name, tmp_path_factory.mktemp(f"{name}-{style}"), style)
    return _FAMILIES[name, style]


@pytest.fixture(params=[(n, s) for n in sorted(ARCHITECTURES) for s in STYLES], ids=lambda p: f"{p[0]}-{p[1]}")
def arch_family(request, tmp_path_factory):
    name, style = request.param
    fam = family(name, style, tmp_path_factory)
    return name, style, fam.paths, fam.weights


# ---- references ---------------------------------------------------------------------------------

WEIGHTS, DENSITY = (1.0, 0.6), 0.5


def ties_reference(base: np.ndarray, finetunes: list[np.ndarray]) -> np.ndarray:
    """TIES as mergekit defines it: each task vector keeps its int(density * n) largest magnitudes,
    is weighted, signs elected by the sum, and the agreeing ones averaged by their weights."""
    deltas = []
    for ft in finetunes:
        tv = (ft - base).ravel()
        keep = np.zeros(tv.size, bool)
        keep[np.argsort(-np.abs(tv), kind="stable")[: int(DENSITY * tv.size)]] = True
        deltas.append(np.where(keep, tv, 0.0))
    weights = np.array(WEIGHTS)[:, None]
    weighted = np.stack(deltas) * weights
    agree = np.sign(weighted) == np.sign(weighted.sum(0))
    divisor = (weights * agree).sum(0)
    divisor[np.abs(divisor) < 1e-8] = 1.0
    return base + ((weighted * agree).sum(0) / divisor).reshape(base.shape)


def ties_recipe(paths) -> dict:
    base, ft1, ft2 = map(str, paths)
    return {
        "merge_method": "ties",
        "base_model": base,
        "models": [
            {"model": ft1, "parameters": {"weight": WEIGHTS[0], "density": DENSITY}},
            {"model": ft2, "parameters": {"weight": WEIGHTS[1], "density": DENSITY}},
        ],
        "dtype": "float32",
    }


SLICES = ((1, 0, 2), (2, 1, 4))  # (variant, start, end): layers 0-1 of ft1, then 1-3 of ft2: 5 layers


def slice_recipe(paths) -> dict:
    return {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(paths[v]), "layer_range": [lo, hi]}]} for v, lo, hi in SLICES],
        "dtype": "float32",
    }


LAYER = re.compile(r"^(.*?\b(?:layers|h))\.(\d+)\.(.*)$")


def layer_indices(names) -> set[int]:
    return {int(m.group(2)) for m in map(LAYER.match, names) if m and not m.group(1).startswith("visual")}


def reference_tensors(weights: dict[str, np.ndarray]) -> list[str]:
    """A couple of tensors to check: one projection of a middle layer and the input embedding."""
    layer = sorted(n for n in weights if (m := LAYER.match(n)) and m.group(2) == "1" and weights[n].ndim == 2)
    embed = sorted(n for n in weights if "embed" in n and "out" not in n and weights[n].ndim == 2)
    return [layer[0], *(embed or [next(n for n in weights if n.endswith("wte.weight"))])[:1]]


# ---- helpers ------------------------------------------------------------------------------------


def run_cli(recipe: dict, tmp_path: Path) -> Path:
    (tmp_path / "recipe.yml").write_text(json.dumps(recipe))  # JSON is YAML
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "recipe.yml"), str(out), "--no-progress"]) == 0
    return out


def logits(model) -> np.ndarray:
    out = model(TOKENS)
    assert out.shape == (1, TOKENS.shape[1], VOCAB)
    out = np.array(out.astype(mx.float32))
    assert np.isfinite(out).all()
    return out


def written_layers(config: dict) -> int:
    config = config.get("text_config", config)
    return next(config[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config)


DTYPE_KEYS = ("torch_dtype", "dtype")


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def check_config_kept(config: dict, source: dict, changed: tuple[str, ...] = ()) -> None:
    """Every key of the source config is in the written one with its value, but for the dtype (the
    recipe's float32) and the keys in `changed`; the style stays the source's."""
    assert config_style(config) == config_style(source)
    for key, value in source.items():
        if key in DTYPE_KEYS:
            assert config[key] == "float32", key
        elif key not in changed:
            assert config.get(key, "absent") == value, key


def check_layer_types(config: dict, source: dict) -> None:
    """`layer_types`, where the architecture has it, follows the layers taken."""
    config, source = config.get("text_config", config), source.get("text_config", source)
    if "layer_types" in source:
        taken = [i for _, lo, hi in SLICES for i in range(lo, hi)]
        assert config["layer_types"] == [source["layer_types"][i] for i in taken]


# ---- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_the_transformers4_style_reads_back_in_transformers5_as_the_config_it_came_from(name, tmp_path):
    t5 = transformers5_config(name)
    t4 = transformers4_config(t5, name)
    assert "rope_parameters" not in t4 and "dtype" not in t4 and t4["torch_dtype"] == "float32"
    (tmp_path / "config.json").write_text(json.dumps(t4))
    back = json.loads(transformers.AutoConfig.from_pretrained(tmp_path).to_json_string(use_diff=True))
    if back.get("rope_parameters"):
        back["rope_parameters"].pop("type", None)  # transformers 5 keeps the old "type" key beside "rope_type"
    for key in set(t5) - {"transformers_version"}:
        assert back.get(key, "absent") == t5[key], key


def test_ties_merge_matches_a_float64_reference_and_loads_in_mlx_lm(arch_family, tmp_path):
    arch, style, paths, variants = arch_family
    recipe = ties_recipe(paths)
    in_memory = merge(recipe)
    written = run_cli(recipe, tmp_path)
    got_written = tiny.load_np(written)
    assert sorted(got_written) == sorted(variants[0])
    for name in reference_tensors(variants[0]):
        expected = ties_reference(variants[0][name], [variants[1][name], variants[2][name]])
        np.testing.assert_allclose(np.array(in_memory.weights[name]), expected, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got_written[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
    config = read_config(written)
    assert written_layers(config) == LAYERS == len(layer_indices(got_written))
    check_config_kept(config, read_config(paths[0]))
    a = logits(in_memory.to_mlx_lm()[0])
    b = logits(MergeResult(in_memory.plan, path=written).to_mlx_lm()[0])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits(load_written(written)[0]), b, rtol=0, atol=0)


def test_the_written_config_adds_no_key_to_its_input(arch_family, tmp_path):
    arch, style, paths, variants = arch_family
    written = run_cli(ties_recipe(paths), tmp_path)
    assert sorted(read_config(written)) == sorted(read_config(paths[0]))


def test_passthrough_slices_write_the_layers_they_take_and_load_in_mlx_lm(arch_family, tmp_path):
    arch, style, paths, variants = arch_family
    recipe = slice_recipe(paths)
    in_memory = merge(recipe)
    written = run_cli(recipe, tmp_path)
    got = tiny.load_np(written)
    n = sum(hi - lo for _, lo, hi in SLICES)
    assert layer_indices(got) == set(range(n))
    k = 0
    for v, lo, hi in SLICES:  # each output layer is its source layer, tensor by tensor
        for i in range(lo, hi):
            for name, value in variants[v].items():
                m = LAYER.match(name)
                if m and int(m.group(2)) == i:
                    out_name = f"{m.group(1)}.{k}.{m.group(3)}"
                    np.testing.assert_array_equal(got[out_name], value.astype(np.float32), err_msg=out_name)
                    np.testing.assert_array_equal(np.array(in_memory.weights[out_name]), got[out_name], err_msg=out_name)
            k += 1
    config, source = read_config(written), read_config(paths[0])
    assert written_layers(config) == n == written_layers(in_memory.config)
    check_layer_types(config, source)
    check_config_kept(config, source, changed=("num_hidden_layers", "n_layer", "num_layers", "layer_types", "no_rope_layers"))
    a = logits(in_memory.to_mlx_lm()[0])
    b = logits(MergeResult(in_memory.plan, path=written).to_mlx_lm()[0])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    model, _ = load_written(written)
    assert len(model.layers) == n
