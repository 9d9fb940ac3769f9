"""Tiny models of many real architectures, with the config.json transformers 5 writes, merged and
loaded in mlx-lm.

For each architecture transformers' own config class writes the config (`save_pretrained`, so the
file is exactly what the Hub would hold: `rope_parameters`, `layer_types`, renamed MoE keys). mlx-lm's
model class for that config gives random weights, which are saved under the checkpoint names its
`sanitize` reads back (checked here for every architecture), as a base and two fine-tunes. Then:

- a ties merge, in memory (`merge(recipe).to_mlx_lm()`) and through `mergekit-mlx run`, checked
  against a float64 numpy TIES written here from mergekit's definition, on a couple of tensors;
- a passthrough slice merge (layers 0-1 of one fine-tune, 1-3 of the other: 5 of 4), with the layers checked
  tensor by tensor against their sources and the written config counting the layers written;
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
from mlx.utils import tree_flatten

from mergekit_mlx import MergeResult, merge
from mergekit_mlx.cli import main
from mergekit_mlx.mlx_lm_config import load as load_written
from mergekit_mlx.mlx_lm_config import mlx_lm_config

transformers = pytest.importorskip("transformers")
mlx_lm_utils = pytest.importorskip("mlx_lm.utils")

VOCAB, LAYERS = 64, 4
TOKENS = mx.array([[1, 5, 9, 3, 12, 7, 30, 2]])

DECODER = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
IDS = {"bos_token_id": 1, "eos_token_id": 2, "vocab_size": VOCAB}

# model_type -> the arguments given to transformers' config class for it
ARCHITECTURES = {
    "llama": DECODER,
    "mistral": DECODER,
    "qwen2": DECODER,
    "qwen3": DECODER,
    "gemma": DECODER,
    "gemma2": dict(DECODER, sliding_window=4),
    "gemma3_text": dict(DECODER, sliding_window=4, sliding_window_pattern=2),
    "phi": dict(DECODER, num_key_value_heads=4),
    "phi3": DECODER,
    "olmo2": DECODER,
    "olmo3": DECODER,
    "starcoder2": DECODER,
    "stablelm": DECODER,
    "cohere": DECODER,
    "granite": DECODER,
    "glm4": DECODER,
    "internlm3": DECODER,
    "helium": DECODER,
    "smollm3": DECODER,
    "mixtral": dict(DECODER, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1),
    "gpt_neox": dict(IDS, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4),
    "gpt2": dict(IDS, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=128),
}


def hf_name(arch: str, name: str) -> str:
    """The checkpoint name of an mlx-lm parameter (the inverse of the model's `sanitize`)."""
    if arch == "gpt2":
        return name.removeprefix("model.")
    if arch == "gpt_neox":
        name = name.removeprefix("model.")
        return name if name.startswith("embed_out.") else "gpt_neox." + re.sub(r"^h\.", "layers.", name)
    return name


def hf_weights(arch: str, model) -> dict[str, np.ndarray]:
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        value = np.array(value.astype(mx.float32))
        if ".switch_mlp." in name:  # mlx-lm stacks the experts; checkpoints keep one tensor per expert
            moe, _, proj = name.partition(".switch_mlp.")
            proj = proj.split(".")[0]
            if arch == "mixtral":
                proj = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[proj]
            for e in range(value.shape[0]):
                weights[f"{moe}.experts.{e}.{proj}.weight"] = value[e]
        elif arch == "gpt2" and re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", name):
            weights[hf_name(arch, name)] = value.T  # Conv1D: (in, out) in the checkpoint
        else:
            weights[hf_name(arch, name)] = value
    return weights


def save(path: Path, config, weights: dict[str, np.ndarray]) -> Path:
    config.save_pretrained(path)  # config.json as transformers writes it
    mx.save_safetensors(str(path / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()}, metadata={"format": "pt"})
    tiny.write_tokenizer(path, VOCAB)
    return path


_FAMILIES: dict[str, tuple[list[Path], list[dict[str, np.ndarray]]]] = {}


def family(arch: str, root: Path):
    """A base and two fine-tunes (base + small random deltas) of one architecture, written once."""
    if arch not in _FAMILIES:
        config = transformers.CONFIG_MAPPING[arch](**ARCHITECTURES[arch])
        config.save_pretrained(root / "probe")
        written = json.loads((root / "probe" / "config.json").read_text())
        mx.random.seed(0)
        model_class, args_class = mlx_lm_utils._get_classes(mlx_lm_config(written))
        model = model_class(args_class.from_dict(mlx_lm_config(written)))
        base = hf_weights(arch, model)
        # the names are ones mlx-lm reads back: sanitize gives exactly the model's parameters
        back = model.sanitize({k: mx.array(v) for k, v in base.items()}) if hasattr(model, "sanitize") else base
        assert sorted(back) == sorted(k for k, _ in tree_flatten(model.parameters()))
        rng = np.random.default_rng(1)
        variants = [base] + [{k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in base.items()} for _ in range(2)]
        paths = [save(root / name, config, w) for name, w in zip(("base", "ft1", "ft2"), variants)]
        _FAMILIES[arch] = paths, [{k: v.astype(np.float64) for k, v in w.items()} for w in variants]
    return _FAMILIES[arch]


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch_family(request, tmp_path_factory):
    arch = request.param
    return arch, *family(arch, tmp_path_factory.mktemp(arch))


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
    return config["n_layer"] if "n_layer" in config else config["num_hidden_layers"]


def check_layer_types(config: dict, source: dict) -> None:
    """`layer_types`, where the architecture has it, follows the layers taken."""
    config, source = config.get("text_config", config), source.get("text_config", source)
    if "layer_types" in source:
        taken = [i for _, lo, hi in SLICES for i in range(lo, hi)]
        assert config["layer_types"] == [source["layer_types"][i] for i in taken]


# ---- tests --------------------------------------------------------------------------------------


def test_ties_merge_matches_a_float64_reference_and_loads_in_mlx_lm(arch_family, tmp_path):
    arch, paths, variants = arch_family
    recipe = ties_recipe(paths)
    in_memory = merge(recipe)
    written = run_cli(recipe, tmp_path)
    got_written = tiny.load_np(written)
    assert sorted(got_written) == sorted(variants[0])
    for name in reference_tensors(variants[0]):
        expected = ties_reference(variants[0][name], [variants[1][name], variants[2][name]])
        np.testing.assert_allclose(np.array(in_memory.weights[name]), expected, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got_written[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
    config = json.loads((written / "config.json").read_text())
    assert written_layers(config) == LAYERS == len(layer_indices(got_written))
    a = logits(in_memory.to_mlx_lm()[0])
    b = logits(MergeResult(in_memory.plan, path=written).to_mlx_lm()[0])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits(load_written(written)[0]), b, rtol=0, atol=0)


def test_passthrough_slices_write_the_layers_they_take_and_load_in_mlx_lm(arch_family, tmp_path):
    arch, paths, variants = arch_family
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
    config = json.loads((written / "config.json").read_text())
    assert written_layers(config) == n == written_layers(in_memory.config)
    check_layer_types(config, json.loads((paths[0] / "config.json").read_text()))
    a = logits(in_memory.to_mlx_lm()[0])
    b = logits(MergeResult(in_memory.plan, path=written).to_mlx_lm()[0])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    model, _ = load_written(written)
    assert len(model.layers) == n
