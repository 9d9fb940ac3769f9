"""GGUF for every architecture the export claims, in both config styles: written, read back as the
Hugging Face model it encodes, and run in mlx-lm.

For each architecture of tests/arch_models.py that the GGUF export claims, a tiny model (config as
transformers 5 writes it, and as transformers 4 did) is converted to `gguf-f16`, then:

- every tensor name in the file is the one the `gguf` package's own map gives for the checkpoint
  name (the map, not the code under test, is the reference), and the metadata holds the shape;
- the file read back gives every checkpoint tensor under its own name, equal to the source within
  float16 rounding (llama.cpp's layout changes undone: rotary row order, 1 + w norms, transposes,
  fused-QKV order, stacked experts);
- converted back to safetensors, the config rebuilt from the metadata loads in mlx-lm and computes
  the source's logits within float16 rounding.

That llama.cpp itself loads these files and computes the same logits is checked by
benchmarks/gguf_llama_cpp.py (llama.cpp is not a test dependency). Skipped without transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest

from mergekit_mlx.cli import main
from mergekit_mlx.formats.gguf import ARCHITECTURES, GGUFModel
from mergekit_mlx.mlx_lm_config import load as load_mlx_lm
from mergekit_mlx.mlx_lm_config import rope_settings

pytest.importorskip("transformers")
arch_models = pytest.importorskip("arch_models")

TOKENS = mx.array([[1, 5, 9, 3, 12, 7, 30, 2]])
CLAIMED = sorted(n for n in arch_models.ARCHITECTURES if arch_models.model_type(n) in ARCHITECTURES)
# checkpoint tensors a GGUF does not hold: llama.cpp's Gemma and Command-R always tie the head
NOT_HELD = {"gemma": ("lm_head.weight",), "gemma2": ("lm_head.weight",), "cohere": ("lm_head.weight",)}
# checkpoint tensors llama.cpp's converter splits: GraniteMoE's stacked experts, each one's gate rows then its up rows
SPLIT = {"block_sparse_moe.input_linear.weight": ("ffn_gate_exps", "ffn_up_exps")}


def test_every_architecture_of_the_fixtures_that_llama_cpp_runs_is_claimed():
    assert len(CLAIMED) >= 20, CLAIMED


_BASES: dict[tuple[str, str], Path] = {}


def base_model(name: str, style: str, root: Path) -> Path:
    if (name, style) not in _BASES:
        _BASES[name, style] = arch_models.build_family(name, root / f"{name}-{style}", style).paths[0]
    return _BASES[name, style]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-archs")


def logits(model) -> np.ndarray:
    return np.array(model(TOKENS).astype(mx.float32))


@pytest.mark.parametrize("style", arch_models.STYLES)
@pytest.mark.parametrize("name", CLAIMED)
def test_gguf_round_trip_keeps_names_values_and_logits(name, style, root, tmp_path):
    kind = arch_models.model_type(name)
    spec = ARCHITECTURES[kind]
    src = base_model(name, style, root)
    weights = {k: np.array(v) for k, v in mx.load(str(src / "model.safetensors")).items()}
    config = json.loads((src / "config.json").read_text())
    out = tmp_path / "gguf"
    assert main(["convert", str(src), str(out), "--out-format", "gguf-f16", "--no-progress"]) == 0

    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.get_field("general.architecture").contents() == spec.name
    blocks = next(config[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config)
    assert reader.get_field(f"{spec.name}.block_count").contents() == blocks
    table = gguf.get_tensor_name_map(spec.arch, blocks)
    stored = {t.name: t for t in reader.tensors}
    for hf, value in weights.items():
        if hf.endswith(NOT_HELD.get(kind, ())):
            continue
        split = next((stems for suffix, stems in SPLIT.items() if hf.endswith(suffix)), None)
        if split:
            block = hf.split(".")[2]
            for stem, part in zip(split, np.split(value, len(split), axis=-2)):
                got = np.array(stored[f"blk.{block}.{stem}.weight"].data, np.float32).reshape(part.shape)
                np.testing.assert_array_equal(got, part.astype(np.float16).astype(np.float32), err_msg=(hf, stem))
            continue
        per_expert = hf.split(".experts.")
        mapped = hf if len(per_expert) == 1 else per_expert[0] + ".experts." + per_expert[1].split(".", 1)[1]
        expected = table.get_name(mapped, try_suffixes=(".weight", ".bias"))
        assert expected in stored, (hf, expected)

    back = GGUFModel(out / "model.gguf")
    names = set(back.tensor_names())
    for hf, value in weights.items():
        if hf.endswith(NOT_HELD.get(kind, ())):
            continue
        assert hf in names, hf
        got = np.array(back.load(hf).astype(mx.float32))
        stored_as = value if value.ndim == 1 else value.astype(np.float16)  # norms and biases stay float32
        np.testing.assert_allclose(got, stored_as.astype(np.float32), rtol=0, atol=1e-6, err_msg=hf)

    theta, scaling = rope_settings(config)  # RoPE read back as written (Llama 3's from rope_freqs and its parameters)
    assert rope_settings(back.config) == (theta or 10000.0, scaling), back.config

    hf_out = tmp_path / "hf"
    assert main(["convert", str(out / "model.gguf"), str(hf_out), "--no-progress"]) == 0
    expected, _ = load_mlx_lm(src)
    got, _ = load_mlx_lm(hf_out)
    np.testing.assert_allclose(logits(got), logits(expected), rtol=0, atol=0.02 * max(1.0, np.abs(logits(expected)).max()))


def test_an_architecture_llama_cpp_does_not_run_is_refused_before_anything_is_written(root, tmp_path):
    src = base_model("helium", "transformers5", root)
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--out-format", "gguf-q8_0", "--no-progress"]) == 2
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize(
    "name, change, says",
    [
        ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob is False"),
        ("gemma2", {"query_pre_attn_scalar": 100}, "query_pre_attn_scalar is 100"),
        ("phi3", {"rope_scaling": {"type": "longrope", "long_factor": [1.0] * 4, "short_factor": [1.0] * 4}}, "'longrope'"),
        ("olmoe", {"num_key_value_heads": 2}, "num_key_value_heads is 2"),
        ("olmoe", {"norm_topk_prob": True}, "norm_topk_prob is True"),
        ("exaone4", {"sliding_window": 4, "sliding_window_pattern": "LLLG"}, "64 layers only"),
    ],
)
def test_configs_llama_cpp_would_compute_differently_are_refused(name, change, says, root, tmp_path, capsys):
    src = base_model(name, "transformers4", root)
    model = tmp_path / "model"
    model.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            shutil.copy(f, model / f.name)
    config = json.loads((src / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **change}))
    out = tmp_path / "out"
    assert main(["convert", str(model), str(out), "--out-format", "gguf-f16", "--no-progress"]) == 2
    assert says in capsys.readouterr().err
    assert not out.exists()


def test_a_slice_merge_to_gguf_writes_the_sliding_layers_it_takes(root, tmp_path):
    # layers 0-3 of a Gemma 3 whose every 2nd layer is full, then layers 1-2 again: 6 layers
    src = base_model("gemma3_text", "transformers5", root)
    types = json.loads((src / "config.json").read_text())["layer_types"]
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(src), "layer_range": r}]} for r in ([0, 4], [1, 3])],
        "dtype": "float32",
    }
    (tmp_path / "recipe.yml").write_text(json.dumps(recipe))
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "recipe.yml"), str(out), "--out-format", "gguf-f16", "--no-progress"]) == 0
    reader = gguf.GGUFReader(out / "model.gguf")
    taken = types[0:4] + types[1:3]
    assert reader.get_field("gemma3.block_count").contents() == 6
    assert reader.get_field("gemma3.attention.sliding_window_pattern").contents() == [t == "sliding_attention" for t in taken]
    assert GGUFModel(out / "model.gguf").config["layer_types"] == taken
