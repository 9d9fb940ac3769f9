"""The hand-off to mlx-lm reads both config styles: a model whose config transformers 5 wrote gives
the same logits in mlx-lm as the same weights with the transformers-4 config, through `to_mlx_lm()`
(in memory and written) and `mergekit-mlx eval`.

The transformers-5 configs are written by transformers' own config classes from the transformers-4
keys (`LlamaConfig(rope_theta=..., rope_scaling=...).to_dict()` moves them under `rope_parameters`),
so the two styles here do not come from the code under test. Skipped without transformers.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes
from tiny import save_model

from mergekit_mlx import merge
from mergekit_mlx.cli import main
from mergekit_mlx.mlx_lm_config import mlx_lm_config

transformers = pytest.importorskip("transformers")

TOKENS = mx.array([[3, 9, 4, 12, 5, 30, 7, 11, 6, 40, 8, 20, 10, 50, 13, 60, 3, 9, 4, 12]])  # 20 positions

COMMON = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
YARN_SCALING = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}

# transformers-4 configs (as the Hub holds them): RoPE base 1e6 (2e6 for mixtral, whose default in
# mlx-lm is 1e6), with a scaling block where the architecture has one in mlx-lm
ARCHITECTURES = {
    "llama": dict(COMMON, model_type="llama", architectures=["LlamaForCausalLM"], rope_scaling=LLAMA3_SCALING),
    "qwen2": dict(COMMON, model_type="qwen2", architectures=["Qwen2ForCausalLM"], rope_scaling=YARN_SCALING),
    "mistral": dict(COMMON, model_type="mistral", architectures=["MistralForCausalLM"], head_dim=8),
    "gemma2": dict(
        COMMON,
        model_type="gemma2",
        architectures=["Gemma2ForCausalLM"],
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=4,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        tie_word_embeddings=True,
    ),
    "mixtral": dict(
        COMMON,
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_theta=2e6,
    ),
    "qwen3_moe": dict(
        COMMON,
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
    ),
}


def transformers4(arch: str, theta: float | None = None, scaling: bool = True) -> dict:
    config = dict(ARCHITECTURES[arch])
    config["rope_theta"] = theta or config.get("rope_theta", 1e6)
    if not scaling:
        config.pop("rope_scaling", None)
    return config


def transformers5(config4: dict) -> dict:
    """The same config as transformers 5 writes it."""
    kwargs = {k: v for k, v in config4.items() if k != "model_type"}
    config = transformers.CONFIG_MAPPING[config4["model_type"]](**kwargs).to_dict()
    assert "rope_theta" not in config and "rope_scaling" not in config  # the style this file is about
    return {k: v for k, v in config.items() if v is not None and k != "transformers_version"}


def hf_weights(config: dict, seed: int) -> dict[str, np.ndarray]:
    """Random weights named as in a Hugging Face checkpoint (experts one by one)."""
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        value = np.array(value.astype(mx.float32))
        if ".switch_mlp." in name:  # mlx-lm stacks the experts; checkpoints keep one tensor each
            moe, _, proj = name.partition(".switch_mlp.")
            hf_proj = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"} if "block_sparse_moe" in moe else None
            for e in range(value.shape[0]):
                p = proj if hf_proj is None else hf_proj[proj.split(".")[0]] + ".weight"
                weights[f"{moe}.experts.{e}.{p}"] = value[e]
        else:
            weights[name] = value
    return weights


def model_dir(root, arch: str, config: dict, seed: int = 0):
    return save_model(root / arch, config, hf_weights(transformers4(arch), seed))


def one_model_recipe(path) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(path), "parameters": {"weight": 1.0}}], "dtype": "float32"}


def logits(model) -> np.ndarray:
    return np.array(model(TOKENS).astype(mx.float32))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_a_transformers5_config_gives_the_logits_of_its_transformers4_twin(arch, tmp_path):
    old = merge(one_model_recipe(model_dir(tmp_path / "t4", arch, transformers4(arch))))
    new = merge(one_model_recipe(model_dir(tmp_path / "t5", arch, transformers5(transformers4(arch)))))
    np.testing.assert_array_equal(logits(new.to_mlx_lm()[0]), logits(old.to_mlx_lm()[0]))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_a_written_merge_with_a_transformers5_config_loads_with_its_rope(arch, tmp_path):
    old = merge(one_model_recipe(model_dir(tmp_path / "t4", arch, transformers4(arch))), tmp_path / "old")
    new = merge(one_model_recipe(model_dir(tmp_path / "t5", arch, transformers5(transformers4(arch)))), tmp_path / "new")
    np.testing.assert_array_equal(logits(new.to_mlx_lm()[0]), logits(old.to_mlx_lm()[0]))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_the_rope_base_of_a_transformers5_config_is_the_one_used(arch, tmp_path):
    base_1e4 = merge(one_model_recipe(model_dir(tmp_path / "t4", arch, transformers4(arch, theta=1e4))))
    base_1e6 = merge(one_model_recipe(model_dir(tmp_path / "t5", arch, transformers5(transformers4(arch)))))
    assert np.abs(logits(base_1e6.to_mlx_lm()[0]) - logits(base_1e4.to_mlx_lm()[0])).max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_rope_scaling_of_a_transformers5_config_is_the_one_used(arch, tmp_path):
    unscaled = merge(one_model_recipe(model_dir(tmp_path / "t4", arch, transformers4(arch, scaling=False))))
    scaled = merge(one_model_recipe(model_dir(tmp_path / "t5", arch, transformers5(transformers4(arch)))))
    assert np.abs(logits(scaled.to_mlx_lm()[0]) - logits(unscaled.to_mlx_lm()[0])).max() > 1e-3


def test_the_written_config_keeps_the_transformers5_style(tmp_path):
    config5 = transformers5(transformers4("qwen3_moe"))
    merge(one_model_recipe(model_dir(tmp_path, "qwen3_moe", config5)), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "rope_theta" not in written and "num_experts" not in written
    assert written["rope_parameters"] == config5["rope_parameters"]
    assert written["num_local_experts"] == 4


@pytest.mark.parametrize("arch", ["qwen3_moe", "llama"])
def test_eval_scores_an_unmerged_model_with_a_transformers5_config(arch, tmp_path, capsys):
    path = model_dir(tmp_path, arch, transformers5(transformers4(arch)))
    assert main(["eval", str(path), "--n", "2", "--no-progress"]) == 0
    assert str(path) in capsys.readouterr().out


def test_keys_the_config_has_are_kept():
    config = {"model_type": "llama", "rope_theta": 5.0, "rope_parameters": {"rope_theta": 7.0, "rope_type": "default"}}
    assert mlx_lm_config(config)["rope_theta"] == 5.0
    assert config == {"model_type": "llama", "rope_theta": 5.0, "rope_parameters": {"rope_theta": 7.0, "rope_type": "default"}}


def test_a_transformers4_config_comes_back_unchanged():
    for arch in ARCHITECTURES:
        assert mlx_lm_config(transformers4(arch)) == transformers4(arch)


def test_a_nested_text_config_is_mapped():
    config = {"model_type": "llava", "text_config": {"model_type": "llama", "rope_parameters": {"rope_theta": 1e6}}}
    assert mlx_lm_config(config)["text_config"]["rope_theta"] == 1e6


def test_per_attention_type_rope_gives_the_global_and_the_local_base():
    config = transformers.Gemma3TextConfig(rope_theta=1e6, rope_local_base_freq=1e4).to_dict()
    assert "rope_theta" not in config
    mapped = mlx_lm_config(config)
    assert (mapped["rope_theta"], mapped["rope_local_base_freq"]) == (1e6, 1e4)


# transformers-5 configs that mlx-lm 0.32 cannot build without keys transformers 5 no longer writes
# (LFM2's `block_dim`; Apertus's `mlp_bias`, `post_norm`, `qk_norm`)
FIXED_BY_THE_MODEL_CLASS = {
    "lfm2": dict(COMMON, num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "full_attention"]),
    "apertus": COMMON,
}


@pytest.mark.parametrize("arch", sorted(FIXED_BY_THE_MODEL_CLASS))
def test_a_transformers5_config_without_keys_the_model_class_fixes_builds_and_runs_in_mlx_lm(arch):
    written = transformers.CONFIG_MAPPING[arch](**FIXED_BY_THE_MODEL_CLASS[arch]).to_dict()
    config = mlx_lm_config(written)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    out = logits(model)
    assert out.shape == (1, TOKENS.shape[1], 64) and np.isfinite(out).all()
    if arch == "lfm2":  # LFM2's blocks are as wide as the model
        assert config["block_dim"] == written["hidden_size"]
    else:  # what Apertus's model class always does
        assert (config["qk_norm"], config["post_norm"], config["mlp_bias"]) == (True, False, False)
