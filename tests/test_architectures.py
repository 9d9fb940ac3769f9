"""Architectures beyond the Llama layout, as pure-numpy tiny models: where their layers are, which
stacks slices cut, which tensors come from the first slice and which from the last, and a config
that counts the layers written.

Each expectation is built here from the inputs' own tensors, by the rule mergekit's architecture
tables state (pre_weights from the first slice, layers per layer_range, post_weights from the last).
"""

from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest
import tiny

from mergekit_mlx import merge

VOCAB, HIDDEN = 64, 32


def gpt2_model(rng: np.random.Generator, layers: int) -> tuple[dict, dict[str, np.ndarray]]:
    """GPT-2 as the Hub stores it: no `transformer.` prefix, Conv1D weights (in, out), tied head."""
    h = HIDDEN
    cfg = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_ctx": 64,
        "n_embd": h,
        "n_head": 4,
        "n_layer": layers,
        "n_positions": 64,
        "layer_norm_epsilon": 1e-5,
        "vocab_size": VOCAB,
    }
    w = {"wte.weight": rng.normal(0, 0.5, (VOCAB, h)), "wpe.weight": rng.normal(0, 0.1, (64, h))}
    for i in range(layers):
        p = f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            w[p + ln + ".weight"] = 1 + rng.normal(0, 0.05, (h,))
            w[p + ln + ".bias"] = rng.normal(0, 0.05, (h,))
        for name, shape in (
            ("attn.c_attn", (h, 3 * h)),
            ("attn.c_proj", (h, h)),
            ("mlp.c_fc", (h, 4 * h)),
            ("mlp.c_proj", (4 * h, h)),
        ):
            w[p + name + ".weight"] = rng.normal(0, 0.2, shape)
            w[p + name + ".bias"] = rng.normal(0, 0.05, (shape[1],))
    w["ln_f.weight"] = 1 + rng.normal(0, 0.05, (h,))
    w["ln_f.bias"] = rng.normal(0, 0.05, (h,))
    return cfg, w


def gpt_neox_model(rng: np.random.Generator, layers: int) -> tuple[dict, dict[str, np.ndarray]]:
    """GPT-NeoX: input embedding `gpt_neox.embed_in`, untied output head `embed_out`."""
    h = HIDDEN
    cfg = {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "hidden_size": h,
        "intermediate_size": 4 * h,
        "num_attention_heads": 4,
        "num_hidden_layers": layers,
        "max_position_embeddings": 64,
        "layer_norm_eps": 1e-5,
        "rotary_emb_base": 10000,
        "rotary_pct": 0.25,
        "use_parallel_residual": True,
        "tie_word_embeddings": False,
        "vocab_size": VOCAB,
    }
    w = {"gpt_neox.embed_in.weight": rng.normal(0, 0.5, (VOCAB, h))}
    for i in range(layers):
        p = f"gpt_neox.layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm"):
            w[p + ln + ".weight"] = 1 + rng.normal(0, 0.05, (h,))
            w[p + ln + ".bias"] = rng.normal(0, 0.05, (h,))
        for name, shape in (
            ("attention.query_key_value", (3 * h, h)),
            ("attention.dense", (h, h)),
            ("mlp.dense_h_to_4h", (4 * h, h)),
            ("mlp.dense_4h_to_h", (h, 4 * h)),
        ):
            w[p + name + ".weight"] = rng.normal(0, 0.2, shape)
            w[p + name + ".bias"] = rng.normal(0, 0.05, (shape[0],))
    w["gpt_neox.final_layer_norm.weight"] = 1 + rng.normal(0, 0.05, (h,))
    w["gpt_neox.final_layer_norm.bias"] = rng.normal(0, 0.05, (h,))
    w["embed_out.weight"] = rng.normal(0, 0.5, (VOCAB, h))
    return cfg, w


def llama_model_layout(rng: np.random.Generator, layers: int) -> tuple[dict, dict[str, np.ndarray]]:
    """`LlamaModel` as saved without its head: no `model.` prefix, no lm_head."""
    cfg = tiny.llama_config(layers=layers, hidden=HIDDEN, vocab=VOCAB)
    cfg["architectures"] = ["LlamaModel"]
    w = tiny.llama_weights(cfg, rng)
    w.pop("lm_head.weight")
    return cfg, {k.removeprefix("model."): v for k, v in w.items()}


def qwen2_vl_model(rng: np.random.Generator, layers: int, depth: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Qwen2-VL's layout with a vision tower deeper than the text decoder; a transformers-5 config
    (the text settings, layer_types among them, in text_config)."""
    h, v = HIDDEN, 16
    cfg = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "text_config": {
            "model_type": "qwen2_vl_text",
            "hidden_size": h,
            "num_hidden_layers": layers,
            "layer_types": [["full_attention", "sliding_attention"][i % 2] for i in range(layers)],
            "vocab_size": VOCAB,
        },
        "vision_config": {"depth": depth, "embed_dim": v},
        "vocab_size": VOCAB,
    }
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (VOCAB, h))}
    w["visual.patch_embed.proj.weight"] = rng.normal(0, 0.2, (v, 3, 2, 2, 2))
    for i in range(depth):
        w[f"visual.blocks.{i}.attn.qkv.weight"] = rng.normal(0, 0.2, (3 * v, v))
        w[f"visual.blocks.{i}.norm1.weight"] = 1 + rng.normal(0, 0.05, (v,))
    w["visual.merger.mlp.0.weight"] = rng.normal(0, 0.2, (h, v))
    for i in range(layers):
        w[f"model.layers.{i}.self_attn.q_proj.weight"] = rng.normal(0, 0.2, (h, h))
        w[f"model.layers.{i}.self_attn.q_proj.bias"] = rng.normal(0, 0.05, (h,))
        w[f"model.layers.{i}.input_layernorm.weight"] = 1 + rng.normal(0, 0.05, (h,))
    w["model.norm.weight"] = 1 + rng.normal(0, 0.05, (h,))
    w["lm_head.weight"] = rng.normal(0, 0.5, (VOCAB, h))
    return cfg, w


def save(root, name, model) -> tuple:
    cfg, w = model
    return tiny.save_model(root / name, cfg, w), w


def slices_recipe(*parts) -> dict:
    """A passthrough slice merge: parts are (path, start, end)."""
    return {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(p), "layer_range": [lo, hi]}]} for p, lo, hi in parts],
    }


def sliced(parts, prefix: str, pre: list[str], post: list[str], whole: list[str] = ()) -> dict[str, np.ndarray]:
    """The expected output of a passthrough slice merge. parts: (weights, start, end) per slice; layer
    tensors are `prefix + index + rest`; `pre` and `whole` come from the first slice's model, `post`
    from the last's."""
    out = {n: parts[0][0][n] for n in [*pre, *whole]}
    k = 0
    for w, lo, hi in parts:
        for i in range(lo, hi):
            for name, value in w.items():
                if name.startswith(f"{prefix}{i}."):
                    out[f"{prefix}{k}." + name[len(f"{prefix}{i}.") :]] = value
            k += 1
    out.update({n: parts[-1][0][n] for n in post})
    return out


def assert_written(out_dir, expected: dict[str, np.ndarray]) -> None:
    got = tiny.load_np(out_dir)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6, err_msg=name)


def config_of(out_dir) -> dict:
    return json.loads((out_dir / "config.json").read_text())


def forward(out_dir) -> None:
    """mlx-lm loads the output and runs it: finite logits over the vocabulary."""
    from mlx_lm.utils import load

    model, _ = load(str(out_dir))
    logits = model(mx.array([[1, 5, 7, 3]]))
    assert logits.shape == (1, 4, VOCAB)
    assert bool(mx.all(mx.isfinite(logits)).item())


# ---- GPT-2 as the Hub stores it ---------------------------------------------------------------


def test_gpt2_hub_layout_merges_with_linear(tmp_path):
    rng = np.random.default_rng(1)
    (a, wa), (b, wb) = save(tmp_path, "a", gpt2_model(rng, 3)), save(tmp_path, "b", gpt2_model(rng, 3))
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": 0.3}}, {"model": str(b), "parameters": {"weight": 0.7}}],
    }
    merge(recipe, tmp_path / "out")
    assert_written(tmp_path / "out", {n: 0.3 * wa[n] + 0.7 * wb[n] for n in wa})
    assert config_of(tmp_path / "out")["n_layer"] == 3
    forward(tmp_path / "out")


def test_gpt2_hub_layout_slices_take_embeddings_first_and_final_norm_last(tmp_path):
    rng = np.random.default_rng(2)
    (a, wa), (b, wb) = save(tmp_path, "a", gpt2_model(rng, 3)), save(tmp_path, "b", gpt2_model(rng, 3))
    merge(slices_recipe((a, 0, 2), (b, 1, 3)), tmp_path / "out")
    expected = sliced([(wa, 0, 2), (wb, 1, 3)], "h.", pre=["wte.weight", "wpe.weight"], post=["ln_f.weight", "ln_f.bias"])
    assert_written(tmp_path / "out", expected)
    config = config_of(tmp_path / "out")
    assert config["n_layer"] == 4 and "num_hidden_layers" not in config
    forward(tmp_path / "out")


# ---- LlamaModel: no `model.` prefix, no head ---------------------------------------------------


def test_llama_model_layout_merges_with_linear(tmp_path):
    rng = np.random.default_rng(3)
    (a, wa), (b, wb) = save(tmp_path, "a", llama_model_layout(rng, 2)), save(tmp_path, "b", llama_model_layout(rng, 2))
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 3.0}}],
    }
    merge(recipe, tmp_path / "out")
    assert_written(tmp_path / "out", {n: (wa[n] + 3 * wb[n]) / 4 for n in wa})
    assert config_of(tmp_path / "out")["num_hidden_layers"] == 2


def test_llama_model_layout_slices_its_layers(tmp_path):
    rng = np.random.default_rng(4)
    (a, wa), (b, wb) = save(tmp_path, "a", llama_model_layout(rng, 3)), save(tmp_path, "b", llama_model_layout(rng, 3))
    merge(slices_recipe((a, 0, 1), (b, 0, 3)), tmp_path / "out")
    expected = sliced([(wa, 0, 1), (wb, 0, 3)], "layers.", pre=["embed_tokens.weight"], post=["norm.weight"])
    assert_written(tmp_path / "out", expected)
    assert config_of(tmp_path / "out")["num_hidden_layers"] == 4


# ---- Qwen2-VL: a vision stack deeper than the text stack ---------------------------------------


def test_qwen2_vl_slices_cut_the_text_layers_and_keep_every_vision_block(tmp_path):
    rng = np.random.default_rng(5)
    (a, wa), (b, wb) = save(tmp_path, "a", qwen2_vl_model(rng, 2, 4)), save(tmp_path, "b", qwen2_vl_model(rng, 2, 4))
    merge(slices_recipe((a, 0, 2), (b, 1, 2)), tmp_path / "out")
    vision = [n for n in wa if n.startswith("visual.") and not n.startswith("visual.merger.")]
    expected = sliced(
        [(wa, 0, 2), (wb, 1, 2)],
        "model.layers.",
        pre=["model.embed_tokens.weight"],
        whole=vision,
        post=["visual.merger.mlp.0.weight", "model.norm.weight", "lm_head.weight"],
    )
    assert len([n for n in expected if n.startswith("visual.blocks.")]) == 8  # 4 blocks, none dropped
    assert_written(tmp_path / "out", expected)
    config = config_of(tmp_path / "out")
    # written as the input had it: the text settings in text_config, nothing added at the top
    assert "num_hidden_layers" not in config and "layer_types" not in config
    assert config["text_config"]["num_hidden_layers"] == 3
    assert config["text_config"]["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
    assert config["vision_config"]["depth"] == 4


def test_qwen2_vl_whole_model_merge_keeps_the_vision_blocks_past_the_text_layer_count(tmp_path):
    rng = np.random.default_rng(6)
    (a, wa), (b, wb) = save(tmp_path, "a", qwen2_vl_model(rng, 2, 4)), save(tmp_path, "b", qwen2_vl_model(rng, 2, 4))
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}],
    }
    merge(recipe, tmp_path / "out")
    assert_written(tmp_path / "out", {n: 0.5 * wa[n] + 0.5 * wb[n] for n in wa})


# ---- GPT-NeoX: an output head whose name says "embed" ------------------------------------------


def test_gpt_neox_slices_take_embed_in_from_the_first_and_embed_out_from_the_last(tmp_path):
    rng = np.random.default_rng(7)
    (a, wa), (b, wb) = save(tmp_path, "a", gpt_neox_model(rng, 2)), save(tmp_path, "b", gpt_neox_model(rng, 2))
    merge(slices_recipe((a, 0, 2), (b, 0, 2)), tmp_path / "out")
    got = tiny.load_np(tmp_path / "out")
    np.testing.assert_allclose(got["gpt_neox.embed_in.weight"], wa["gpt_neox.embed_in.weight"], rtol=1e-6)
    np.testing.assert_allclose(got["embed_out.weight"], wb["embed_out.weight"], rtol=1e-6)
    expected = sliced(
        [(wa, 0, 2), (wb, 0, 2)],
        "gpt_neox.layers.",
        pre=["gpt_neox.embed_in.weight"],
        post=["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "embed_out.weight"],
    )
    assert_written(tmp_path / "out", expected)
    assert config_of(tmp_path / "out")["num_hidden_layers"] == 4
    forward(tmp_path / "out")


# ---- per-layer lists in the config --------------------------------------------------------------


def test_slices_resize_layer_types_and_other_per_layer_lists_with_the_layers(tmp_path):
    rng = np.random.default_rng(8)
    cfg = tiny.llama_config(layers=4, hidden=HIDDEN, vocab=VOCAB)
    cfg["layer_types"] = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    cfg["no_rope_layers"] = [1, 0, 1, 1]
    cfg["hybrid_override_pattern"] = "M*M-"  # one character per layer (Nemotron-H)
    cfg["mlp_only_layers"] = [1, 3]  # layer indices, not one entry per layer
    cfg["sliding_window"] = 3
    cfg["eos_token_id"] = [2, 3, 4, 5]  # as long as the layer list, but no per-layer setting
    wa, wb = tiny.llama_weights(cfg, rng), tiny.llama_weights(cfg, rng)
    a, b = tiny.save_model(tmp_path / "a", cfg, wa), tiny.save_model(tmp_path / "b", cfg, wb)
    merge(slices_recipe((a, 0, 2), (b, 1, 4)), tmp_path / "out")
    taken = [0, 1, 1, 2, 3]  # layers 0-1 of a, then 1-3 of b
    expected = sliced(
        [(wa, 0, 2), (wb, 1, 4)], "model.layers.", pre=["model.embed_tokens.weight"], post=["model.norm.weight", "lm_head.weight"]
    )
    assert_written(tmp_path / "out", expected)
    config = config_of(tmp_path / "out")
    assert config["num_hidden_layers"] == len(taken)
    assert config["layer_types"] == [cfg["layer_types"][i] for i in taken]
    assert config["no_rope_layers"] == [cfg["no_rope_layers"][i] for i in taken]
    assert config["hybrid_override_pattern"] == "".join(cfg["hybrid_override_pattern"][i] for i in taken)
    assert config["mlp_only_layers"] == [j for j, i in enumerate(taken) if i in (1, 3)]
    assert config["eos_token_id"] == [2, 3, 4, 5]
    forward(tmp_path / "out")


@pytest.mark.parametrize("model", [gpt2_model, gpt_neox_model, llama_model_layout])
def test_the_output_config_counts_the_layers_its_tensors_hold(tmp_path, model):
    rng = np.random.default_rng(9)
    a, _ = save(tmp_path, "a", model(rng, 3))
    merge(slices_recipe((a, 0, 3), (a, 1, 2)), tmp_path / "out")
    names = tiny.load_np(tmp_path / "out")
    layers = {m.group(1) for m in (re.search(r"(?:^|\.)(?:layers|h)\.(\d+)\.", n) for n in names) if m}
    config = config_of(tmp_path / "out")
    assert config.get("n_layer", config.get("num_hidden_layers")) == len(layers) == 4
