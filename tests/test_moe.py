"""`mergekit-mlx moe CONFIG OUT`: a mixture of experts from dense models, as mergekit-moe builds it.

The rules, each checked against references computed here (float64 numpy from the models' own
tensors, or transformers' forward pass), never values taken from the code under test:
- every expert tensor is its source tensor bit for bit; attention, norms and embeddings are the base's;
  a tied base gets an explicit head equal to its embedding;
- cheap_embed gates are the normalised difference of normalised sums of prompt embeddings;
  hidden gates the normalised difference of mean last-token states entering each layer;
- random and uniform_random gates are seeded;
- with every expert (and the base) one dense model, the MoE's logits are the dense model's;
- the outputs (Mixtral, Qwen2-MoE, Qwen3-MoE) load in mlx-lm and in transformers, with the same logits;
- mergekit-moe's own output, where it is installed, has the same experts and gates within tolerance;
- a refused configuration exits 2 naming its key, with nothing written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file
from tiny import WORDS, llama_config, llama_weights, load_np, save_model

from mergekit_mlx.cli import main as cli_main
from mergekit_mlx.moe import build_moe
from mergekit_mlx.output import MANIFEST

PROMPTS = {  # word prompts of the tiny tokenizer (whitespace-split words)
    "a": ["hello world", "the model is good"],
    "b": ["merge a fast mlx", "mlx is fast"],
    "c": ["world world hello", "a good merge"],
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    """A float32 Llama base and three fine-tunes of it (every tensor moved), 2 layers."""
    root = tmp_path_factory.mktemp("moe_llama")
    rng = np.random.default_rng(3)
    cfg = llama_config()
    base = llama_weights(cfg, rng)
    out = {"base": save_model(root / "base", cfg, base)}
    for k in ("a", "b", "c"):
        out[k] = save_model(root / k, cfg, {n: v + rng.normal(0, 0.05, v.shape) for n, v in base.items()})
    return out


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> dict[str, Path]:
    """A Llama base with tied embeddings (no lm_head in the file) and two fine-tunes."""
    root = tmp_path_factory.mktemp("moe_tied")
    rng = np.random.default_rng(4)
    cfg = llama_config(tie=True)
    base = llama_weights(cfg, rng)
    out = {"base": save_model(root / "base", cfg, base)}
    for k in ("a", "b"):
        out[k] = save_model(root / k, cfg, {n: v + rng.normal(0, 0.05, v.shape) for n, v in base.items()})
    return out


def moe_config(base, experts: dict, **top) -> dict:
    return {
        "base_model": str(base),
        "experts": [{"source_model": str(p), "positive_prompts": PROMPTS[k]} for k, p in experts.items()],
        **top,
    }


def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def token_ids(path: Path, prompts: list[str]) -> list[list[int]]:
    tok = hf_tokenizer(path)
    return [tok((tok.bos_token or "") + p, add_special_tokens=False)["input_ids"] for p in prompts]


def unit64(v: np.ndarray) -> np.ndarray:
    return v / max(np.linalg.norm(v), 1e-8)


# ---------------- the tensors ----------------


def test_expert_tensors_are_the_source_tensors_bit_for_bit(llama, tmp_path):
    out = tmp_path / "moe"
    build_moe(moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]}), out)
    got = load_file(str(out / "model.safetensors"))
    srcs = {k: load_file(str(llama[k] / "model.safetensors")) for k in ("base", "a", "b")}
    for layer in range(2):
        for e, k in enumerate(("a", "b")):
            for proj, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                mine = got[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"]
                src = srcs[k][f"model.layers.{layer}.mlp.{proj}.weight"]
                assert mine.dtype == src.dtype and mine.tobytes() == src.tobytes()
    for name, src in srcs["base"].items():
        if ".mlp." not in name:
            assert got[name].tobytes() == src.tobytes(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 2 and config["num_experts_per_tok"] == 2
    assert (out / "mergekit_moe_config.yml").is_file() and (out / MANIFEST).is_file()


def test_a_tied_base_gets_its_embedding_as_an_explicit_head(tied, tmp_path):
    out = tmp_path / "moe"
    build_moe(moe_config(tied["base"], {"a": tied["a"], "b": tied["b"]}, gate_mode="random"), out)
    got = load_file(str(out / "model.safetensors"))
    assert got["lm_head.weight"].tobytes() == got["model.embed_tokens.weight"].tobytes()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_dtype_casts_every_tensor_and_nothing_else_changes(llama):
    result = build_moe(moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]}, dtype="bfloat16"))
    src = load_file(str(llama["a"] / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"]
    mine = result.weights["model.layers.1.block_sparse_moe.experts.0.w3.weight"]
    assert mine.dtype == mx.bfloat16
    assert np.array_equal(np.array(mine.astype(mx.float32)), np.array(mx.array(src).astype(mx.bfloat16).astype(mx.float32)))
    assert result.config["torch_dtype"] == "bfloat16"


def test_without_a_dtype_anywhere_tensors_keep_theirs_and_routers_take_mergekit_moes(llama, tmp_path):
    undeclared = {}
    for k in ("base", "a", "b"):
        undeclared[k] = save_model(tmp_path / k, llama_config(), load_np(llama[k]), dtype="bfloat16")
        cfg = json.loads((undeclared[k] / "config.json").read_text())
        del cfg["torch_dtype"]
        (undeclared[k] / "config.json").write_text(json.dumps(cfg))
    for mode, router in (("hidden", mx.bfloat16), ("cheap_embed", mx.float32)):
        result = build_moe(moe_config(undeclared["base"], {"a": undeclared["a"], "b": undeclared["b"]}, gate_mode=mode))
        assert result.weights["model.layers.0.block_sparse_moe.gate.weight"].dtype == router
        assert result.weights["model.layers.0.block_sparse_moe.experts.0.w1.weight"].dtype == mx.bfloat16
        assert result.config["torch_dtype"] == "bfloat16"


def test_noise_is_seeded_and_residual_scale_multiplies_down_proj(llama):
    cfg = moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]})
    cfg["experts"][0].update(noise_scale=0.01, residual_scale=0.5)
    first, again = build_moe(cfg, seed=7), build_moe(cfg, seed=7)
    name = "model.layers.0.block_sparse_moe.experts.0.w2.weight"
    assert np.array_equal(np.array(first.weights[name]), np.array(again.weights[name]))
    src = load_np(llama["a"])["model.layers.0.mlp.down_proj.weight"]
    noise = np.array(first.weights[name], dtype=np.float64) / 0.5 - src
    assert abs(noise.std() - 0.01) < 0.002 and abs(noise.mean()) < 0.002
    # the unnoised expert is untouched
    other = np.array(first.weights["model.layers.0.block_sparse_moe.experts.1.w2.weight"])
    assert np.array_equal(other, load_file(str(llama["b"] / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"])


# ---------------- the gates ----------------


def test_cheap_embed_gates_match_a_float64_reference(llama):
    cfg = moe_config(llama["base"], {"a": llama["a"], "b": llama["b"], "c": llama["c"]}, gate_mode="cheap_embed")
    cfg["experts"][1]["negative_prompts"] = ["good model"]
    result = build_moe(cfg)
    embed = load_np(llama["base"])["model.embed_tokens.weight"]

    def direction(prompts):
        ids = [t for p in token_ids(llama["base"], prompts) for t in p]
        return unit64(embed[ids].sum(axis=0))

    for e, key in enumerate(("a", "b", "c")):
        want = direction(PROMPTS[key])
        if key == "b":
            want = want - direction(["good model"])
        want = unit64(want)
        for layer in range(2):
            got = np.array(result.weights[f"model.layers.{layer}.block_sparse_moe.gate.weight"], dtype=np.float64)[e]
            np.testing.assert_allclose(got, want, atol=2e-6)


def test_hidden_gates_match_transformers_states(llama):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    cfg = moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]})
    cfg["experts"][0]["negative_prompts"] = ["a fast merge"]
    result = build_moe(cfg)
    model = AutoModelForCausalLM.from_pretrained(str(llama["base"]), dtype=torch.float64)

    def mean_state(prompts):  # (layers, hidden): the state entering each layer at the last token
        states = []
        for ids in token_ids(llama["base"], prompts):
            with torch.no_grad():
                hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[:-1]
            states.append(np.stack([h[0, -1].numpy() for h in hs]))
        return np.mean(states, axis=0)

    for e, key in enumerate(("a", "b")):
        want = mean_state(PROMPTS[key])
        if key == "a":
            want = want - mean_state(["a fast merge"])
        for layer in range(2):
            got = np.array(result.weights[f"model.layers.{layer}.block_sparse_moe.gate.weight"], dtype=np.float64)[e]
            np.testing.assert_allclose(got, unit64(want[layer]), atol=1e-5)


def test_hidden_avg_gates_average_each_prompts_own_states_and_hidden_last_is_hidden(llama):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llama["base"]), dtype=torch.float64)
    experts = {"a": llama["a"], "b": llama["b"]}
    avg = build_moe(moe_config(llama["base"], experts, gate_mode="hidden_avg"))
    for e, key in enumerate(("a", "b")):
        states = []
        for ids in token_ids(llama["base"], PROMPTS[key]):
            with torch.no_grad():
                hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[:-1]
            states.append(np.stack([h[0].numpy().mean(axis=0) for h in hs]))
        want = np.mean(states, axis=0)
        for layer in range(2):
            got = np.array(avg.weights[f"model.layers.{layer}.block_sparse_moe.gate.weight"], dtype=np.float64)[e]
            np.testing.assert_allclose(got, unit64(want[layer]), atol=1e-5)
    last = build_moe(moe_config(llama["base"], experts, gate_mode="hidden_last"))
    hidden = build_moe(moe_config(llama["base"], experts, gate_mode="hidden"))
    name = "model.layers.1.block_sparse_moe.gate.weight"
    assert np.array_equal(np.array(last.weights[name]), np.array(hidden.weights[name]))


def test_hidden_gates_do_not_depend_on_how_prompts_are_batched(llama):
    from mergekit_mlx.formats import open_model
    from mergekit_mlx.moe.gates import prompt_states, states_model

    model = states_model(open_model(llama["base"]))
    prompts = token_ids(llama["base"], PROMPTS["a"] + PROMPTS["b"] + ["hello"])
    for average in (False, True):
        together = np.array(prompt_states(model, prompts, average=average))
        alone = np.stack([np.array(prompt_states(model, [p], average=average))[0] for p in prompts])
        in_pairs = np.array(prompt_states(model, prompts, pack_tokens=12, average=average))
        np.testing.assert_allclose(together, alone, atol=1e-5)
        np.testing.assert_allclose(in_pairs, alone, atol=1e-5)


def test_hidden_states_with_numpys_products_are_mlxs(llama):
    from mergekit_mlx.formats import open_model
    from mergekit_mlx.moe.gates import prompt_states, states_model

    prompts = token_ids(llama["base"], PROMPTS["a"] + PROMPTS["b"])
    base = open_model(llama["base"])
    host = np.array(prompt_states(states_model(base, host_products=True), prompts))
    mlx = np.array(prompt_states(states_model(base, host_products=False), prompts))
    np.testing.assert_allclose(host, mlx, atol=1e-5)


def test_a_bfloat16_base_keeps_its_weights_and_computes_states_in_float32(llama, tmp_path):
    from mergekit_mlx.formats import open_model
    from mergekit_mlx.moe.gates import prompt_states, states_model

    path = save_model(tmp_path / "bf16", llama_config(), load_np(llama["base"]), dtype="bfloat16")
    prompts = token_ids(path, PROMPTS["a"] + PROMPTS["c"])
    model = states_model(open_model(path), host_products=False)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16
    kept = np.array(prompt_states(model, prompts))
    model.set_dtype(mx.float32)  # the same weights widened up front
    np.testing.assert_array_equal(kept, np.array(prompt_states(model, prompts)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_numpys_products_read_the_weights_exactly(tmp_path, dtype):
    from mergekit_mlx.formats import open_model
    from mergekit_mlx.moe.gates import HostProducts

    path = save_model(tmp_path / dtype, llama_config(), llama_weights(llama_config(), np.random.default_rng(1)), dtype=dtype)
    model = open_model(path)
    products = HostProducts(model)
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert np.array_equal(products.weight(name), np.array(model.load(name).astype(mx.float32)))


def test_the_example_moe_routes_each_skill_to_its_fine_tune():
    import sys

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "examples"))
    from moe_routing import routing

    from mergekit_mlx.evaluate import held_out_examples

    config = yaml.safe_load((root / "examples/configs/moe.yml").read_text())
    for key in ("base_model",):
        config[key] = str(root / config[key])
    for e in config["experts"]:
        e["source_model"] = str(root / e["source_model"])
    model, tokenizer = build_moe(config).to_mlx_lm()
    for task, expert in (("add", 0), ("reverse", 1)):
        prompts = [ex.prompt for ex in held_out_examples(task, 40)]
        for share in routing(model, tokenizer, prompts):
            assert share[expert] > 0.75, (task, share)


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_random_gates_are_seeded(llama, mode):
    cfg = moe_config(llama["base"], {"a": llama["a"], "b": llama["b"], "c": llama["c"]}, gate_mode=mode)
    for e in cfg["experts"]:
        del e["positive_prompts"]  # random gates read no prompts
    name = "model.layers.1.block_sparse_moe.gate.weight"
    g1, g2, g3 = (np.array(build_moe(cfg, seed=s).weights[name]) for s in (1, 1, 2))
    assert np.array_equal(g1, g2) and not np.array_equal(g1, g3)
    assert g1.shape == (3, 32)
    if mode == "uniform_random":
        assert np.abs(g1).max() <= 1 / math.sqrt(32)


# ---------------- running the output ----------------


def dense_logits(path: Path, ids: list[int]) -> np.ndarray:
    from mergekit_mlx import mlx_lm_config

    model, _ = mlx_lm_config.load(path)
    return np.array(model(mx.array([ids])), dtype=np.float64)


def assert_mlx_lm_and_transformers_agree(path: Path) -> None:
    """The model at `path` gives the same logits in mlx-lm and in transformers."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    ids = token_ids(path, ["merge the good model"])[0]
    theirs = AutoModelForCausalLM.from_pretrained(str(path))(torch.tensor([ids])).logits.detach().double().numpy()
    np.testing.assert_allclose(dense_logits(path, ids), theirs, atol=1e-4)


def test_identical_experts_give_the_dense_models_logits(llama):
    cfg = moe_config(llama["a"], {"a": llama["a"], "b": llama["a"], "c": llama["a"]})
    model, tokenizer = build_moe(cfg, allow_all_same=True).to_mlx_lm()
    ids = token_ids(llama["a"], ["hello world the model is good"])[0]
    got = np.array(model(mx.array([ids])), dtype=np.float64)
    np.testing.assert_allclose(got, dense_logits(llama["a"], ids), atol=1e-5)


def test_the_output_generates_in_mlx_lm_and_transformers_agrees(llama, tmp_path):
    pytest.importorskip("torch")
    from mlx_lm import generate

    out = tmp_path / "moe"
    build_moe(moe_config(llama["base"], {"a": llama["a"], "b": llama["b"], "c": llama["c"]}), out)
    from mergekit_mlx import mlx_lm_config

    model, tokenizer = mlx_lm_config.load(out)
    assert isinstance(generate(model, tokenizer, "hello world", max_tokens=3), str)
    assert_mlx_lm_and_transformers_agree(out)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_outputs_load_in_mlx_lm_and_transformers_alike(arch, tmp_path):
    pytest.importorskip("torch")
    import arch_models

    fam = arch_models.build_family(arch, tmp_path / "family")
    cfg = {
        "base_model": str(fam.paths[0]),
        "experts": [
            {"source_model": str(fam.paths[1]), "positive_prompts": PROMPTS["a"]},
            {"source_model": str(fam.paths[2]), "positive_prompts": PROMPTS["b"]},
        ],
        "experts_per_token": 1,
    }
    if arch == "qwen2":  # Qwen2-MoE: one shared expert, gated by its own prompts
        cfg["shared_experts"] = [{"source_model": str(fam.paths[0]), "positive_prompts": PROMPTS["c"]}]
    out = tmp_path / "moe"
    result = build_moe(cfg, out)
    want = {"qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}[arch]
    assert result.config["model_type"] == want
    got = load_file(str(out / "model.safetensors"))
    src = load_file(str(fam.paths[2] / "model.safetensors"))
    assert got["model.layers.3.mlp.experts.1.up_proj.weight"].tobytes() == src["model.layers.3.mlp.up_proj.weight"].tobytes()
    if arch == "qwen2":
        assert got["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 32)
    assert_mlx_lm_and_transformers_agree(out)


def test_a_llama_base_makes_a_qwen2_moe_with_zero_attention_biases(llama, tmp_path):
    pytest.importorskip("torch")
    cfg = moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]}, architecture="qwen")
    cfg["shared_experts"] = [{"source_model": str(llama["c"]), "positive_prompts": PROMPTS["c"]}]
    out = tmp_path / "moe"
    assert build_moe(cfg, out).config["model_type"] == "qwen2_moe"
    got = load_file(str(out / "model.safetensors"))
    assert not got["model.layers.1.self_attn.k_proj.bias"].any() and got["model.layers.1.self_attn.k_proj.bias"].shape == (16,)
    c = load_file(str(llama["c"] / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    assert got["model.layers.1.mlp.shared_expert.down_proj.weight"].tobytes() == c.tobytes()
    assert_mlx_lm_and_transformers_agree(out)


def test_tokenizer_source_and_chat_template_shape_the_written_tokenizer(llama, tmp_path):
    import shutil

    source = Path(shutil.copytree(llama["c"], tmp_path / "tok"))
    settings = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 77}))
    cfg = moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]}, gate_mode="random", chat_template="chatml")
    cfg["tokenizer_source"] = str(source)
    out = tmp_path / "moe"
    build_moe(cfg, out)
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 77
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()


def test_qwen3_moe_of_identical_experts_gives_the_dense_models_logits(tmp_path):
    import arch_models

    fam = arch_models.build_family("qwen3", tmp_path / "family")
    ft = str(fam.paths[1])
    cfg = {
        "base_model": ft,
        "gate_mode": "cheap_embed",
        "experts": [{"source_model": ft, "positive_prompts": PROMPTS[k]} for k in ("a", "b", "c")],
    }
    model, _ = build_moe(cfg, allow_all_same=True).to_mlx_lm()
    ids = token_ids(fam.paths[1], ["hello world the model is good"])[0]
    np.testing.assert_allclose(np.array(model(mx.array([ids])), dtype=np.float64), dense_logits(fam.paths[1], ids), atol=1e-5)


# ---------------- inputs in other formats ----------------


def test_an_mlx_quantized_expert_is_copied_as_its_reader_dequantizes_it(llama, tmp_path):
    from mergekit_mlx.formats import open_model

    q = tmp_path / "a-q8"
    assert cli_main(["convert", str(llama["a"]), str(q), "--out-format", "mlx-q8", "--no-progress"]) == 0
    result = build_moe(moe_config(llama["base"], {"a": q, "b": llama["b"]}))
    want = np.array(open_model(q).load("model.layers.1.mlp.gate_proj.weight"))
    got = np.array(result.weights["model.layers.1.block_sparse_moe.experts.0.w1.weight"])
    assert got.tobytes() == want.tobytes()


def test_a_gguf_expert_is_copied_as_its_reader_reads_it(llama, tmp_path):
    from mergekit_mlx.formats import open_model

    g = tmp_path / "b.gguf"
    assert cli_main(["convert", str(llama["b"]), str(g), "--out-format", "gguf-f16", "--no-progress"]) == 0
    result = build_moe(moe_config(llama["base"], {"a": llama["a"], "b": g}))
    want = np.array(open_model(g).load("model.layers.0.mlp.down_proj.weight").astype(mx.float32))
    got = result.weights["model.layers.0.block_sparse_moe.experts.1.w2.weight"]
    assert got.dtype == mx.float32 and np.array_equal(np.array(got), want)  # cast to the base's float32, nothing else


def test_a_model_plus_adapter_expert_is_the_adapter_merged_into_its_model(llama, tmp_path):
    rng = np.random.default_rng(9)
    a_mat, b_mat = rng.normal(0, 0.3, (4, 32)).astype(np.float32), rng.normal(0, 0.3, (48, 4)).astype(np.float32)
    adapter = tmp_path / "lora"
    adapter.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["up_proj"], "use_rslora": False}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.1.mlp.up_proj."
    mx.save_safetensors(
        str(adapter / "adapter_model.safetensors"),
        {prefix + "lora_A.weight": mx.array(a_mat), prefix + "lora_B.weight": mx.array(b_mat)},
    )
    cfg = moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]})
    cfg["experts"][1]["source_model"] = f"{llama['b']}+{adapter}"
    result = build_moe(cfg)
    w = load_np(llama["b"])["model.layers.1.mlp.up_proj.weight"]
    want = w + (8 / 4) * b_mat.astype(np.float64) @ a_mat.astype(np.float64)
    got = np.array(result.weights["model.layers.1.block_sparse_moe.experts.1.w3.weight"], dtype=np.float64)
    np.testing.assert_allclose(got, want, atol=1e-5)
    untouched = result.weights["model.layers.0.block_sparse_moe.experts.1.w3.weight"]
    assert np.array_equal(
        np.array(untouched), load_file(str(llama["b"] / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    )


# ---------------- mergekit-moe's own output ----------------


def all_tensors(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def their_expert(theirs: dict, arch: str, layer: int, e: int, proj: str, width: int) -> np.ndarray:
    """Expert e's projection in mergekit-moe's output: fused per layer under transformers 5, else one tensor each."""
    fused = f"model.layers.{layer}.mlp.experts."
    if fused + "gate_up_proj" in theirs:
        if proj == "down_proj":
            return theirs[fused + "down_proj"][e]
        gate_up = theirs[fused + "gate_up_proj"][e]
        return gate_up[:width] if proj == "gate_proj" else gate_up[width:]
    if arch == "mixtral":
        w = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[proj]
        return theirs[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"]
    return theirs[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,mode",
    [("llama", "cheap_embed"), ("llama", "hidden"), ("qwen2", "cheap_embed"), ("qwen3", "cheap_embed"), ("qwen3", "hidden")],
)
def test_mergekit_moe_writes_the_same_experts_and_gates(llama, tmp_path, arch, mode):
    """Mixtral from Llama, Qwen2-MoE (a shared expert) from Qwen2, Qwen3-MoE from Qwen3, as mergekit-moe writes them."""
    pytest.importorskip("torch")
    pytest.importorskip("mergekit.moe")
    import subprocess
    import sys

    import arch_models

    if arch == "llama":
        base, a, b, shared = llama["base"], llama["a"], llama["b"], llama["c"]
    else:
        base, a, b = arch_models.build_family(arch, tmp_path / "family").paths
        shared = base
    cfg = moe_config(base, {"a": a, "b": b}, gate_mode=mode)
    cfg["experts"][1]["negative_prompts"] = ["hello world"]
    if arch == "qwen2":
        cfg["shared_experts"] = [{"source_model": str(shared), "positive_prompts": PROMPTS["c"]}]
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(cfg))
    script = "import sys; from mergekit.scripts.moe import main; sys.exit(main())"
    run = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "theirs")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    result = build_moe(path, tmp_path / "ours")
    layout = result.plan.architecture
    theirs, ours = all_tensors(tmp_path / "theirs"), all_tensors(tmp_path / "ours")
    width = result.config.get("moe_intermediate_size", result.config.get("intermediate_size"))
    layers = result.plan.layers
    # mergekit-moe computes hidden states in bfloat16, this tool in float32
    tolerance = 1e-5 if mode == "cheap_embed" else 2e-2
    for layer in range(layers):
        for e in range(2):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                mine = ours[layout.expert(layer, e, proj)]
                assert mine.tobytes() == their_expert(theirs, layout.model_type.split("_")[0], layer, e, proj, width).tobytes()
        gate = theirs.get(
            f"model.layers.{layer}.mlp.gate.weight", theirs.get(f"model.layers.{layer}.block_sparse_moe.gate.weight")
        )
        np.testing.assert_allclose(ours[layout.router(layer)], gate, atol=tolerance)
    for name, value in theirs.items():  # everything else (attention, norms, shared expert, its gate) by name
        if name in ours and "gate.weight" not in name and "shared_expert_gate" not in name:
            assert ours[name].tobytes() == value.tobytes(), name
        elif "shared_expert_gate" in name:
            np.testing.assert_allclose(ours[name], value, atol=tolerance)


# ---------------- refusals ----------------


def run_cli(tmp_path, cfg: dict, *extra) -> tuple[int, str, Path]:
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli_main(["moe", str(path), str(out), "--no-progress", *extra])
    return code, err.getvalue(), out


def refusal(tmp_path, cfg, *extra) -> str:
    code, err, out = run_cli(tmp_path, cfg, *extra)
    assert code == 2 and not out.exists() and not (tmp_path / ".out.partial").exists()
    return err


def test_an_unknown_key_is_refused_with_a_suggestion(llama, tmp_path):
    cfg = moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]}, experts_per_tokn=2)
    err = refusal(tmp_path, cfg)
    assert "experts_per_tokn" in err and "experts_per_token" in err


def test_an_unknown_key_of_an_expert_is_refused(llama, tmp_path):
    cfg = moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]})
    cfg["experts"][0]["positive_prompt"] = ["x"]
    assert "experts[0].positive_prompt" in refusal(tmp_path, cfg)


def test_more_experts_per_token_than_experts_is_refused(llama, tmp_path):
    cfg = moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]}, experts_per_token=3)
    assert "experts_per_token" in refusal(tmp_path, cfg)


def test_an_expert_without_prompts_is_refused_for_hidden_gates(llama, tmp_path):
    cfg = moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]})
    del cfg["experts"][1]["positive_prompts"]
    assert "experts[1].positive_prompts" in refusal(tmp_path, cfg)


def test_the_same_prompts_for_every_expert_are_refused(llama, tmp_path):
    cfg = moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]})
    cfg["experts"][1]["positive_prompts"] = PROMPTS["a"]
    assert "experts: the positive and negative prompts" in refusal(tmp_path, cfg)


def test_every_expert_the_same_model_is_refused_without_the_flag(llama, tmp_path):
    cfg = moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]})
    cfg["experts"][1]["source_model"] = str(llama["a"]) + "/"  # another spelling of the same directory
    assert "--i-understand-this-is-not-useful-without-training" in refusal(tmp_path, cfg)


def test_shared_experts_with_a_mixtral_architecture_are_refused(llama, tmp_path):
    cfg = moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]}, architecture="mixtral")
    cfg["shared_experts"] = [{"source_model": str(llama["c"]), "positive_prompts": PROMPTS["c"]}]
    err = refusal(tmp_path, cfg)
    assert "architecture" in err and "shared" in err


def test_an_ungated_shared_expert_is_refused_as_deepseek(llama, tmp_path):
    cfg = moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]})
    cfg["shared_experts"] = [{"source_model": str(llama["c"])}]
    assert "DeepSeek" in refusal(tmp_path, cfg)


def test_an_unknown_architecture_or_gate_mode_is_refused(llama, tmp_path):
    assert "architecture" in refusal(tmp_path, moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]}, architecture="gpt"))
    assert "gate_mode" in refusal(tmp_path, moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]}, gate_mode="hiden"))


def test_a_missing_expert_model_is_refused(llama, tmp_path):
    cfg = moe_config(llama["base"], {"a": llama["a"], "b": tmp_path / "nowhere"})
    assert "experts[1].source_model" in refusal(tmp_path, cfg)


def test_an_expert_of_another_shape_is_refused(llama, tmp_path):
    other = save_model(
        tmp_path / "wide", llama_config(hidden=64), llama_weights(llama_config(hidden=64), np.random.default_rng(0))
    )
    cfg = moe_config(llama["base"], {"a": llama["a"], "b": other})
    assert "experts[1]" in refusal(tmp_path, cfg)


def test_a_base_without_an_attention_tensor_is_refused(llama, tmp_path):
    weights = load_np(llama["base"])
    del weights["model.layers.1.self_attn.v_proj.weight"]
    broken = save_model(tmp_path / "broken", llama_config(), weights)
    err = refusal(tmp_path, moe_config(broken, {"a": llama["a"], "b": llama["b"]}))
    assert "model.layers.1.self_attn.v_proj.weight" in err


def test_a_base_with_scaled_rope_is_built_with_a_warning_that_mlx_lm_ignores_it(llama, tmp_path, capsys):
    cfg = dict(llama_config(), rope_scaling={"rope_type": "linear", "factor": 2.0})
    scaled = save_model(tmp_path / "scaled", cfg, load_np(llama["base"]))
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(moe_config(scaled, {"a": llama["a"], "b": llama["b"]})))
    assert cli_main(["moe", str(path), "--dry-run"]) == 0
    assert "warning: the base scales RoPE (linear), which mlx-lm 0.32's mixtral does not" in capsys.readouterr().out


def test_an_existing_folder_is_not_replaced_even_with_force(llama, tmp_path):
    cfg = moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    code, err, out = run_cli(tmp_path, cfg, "--force")
    assert code == 2 and (out / "mine.txt").read_text() == "keep" and "mergekit-mlx" in err


def test_an_earlier_moe_is_replaced_only_with_force(llama, tmp_path):
    cfg = moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]}, gate_mode="random")
    code, _, out = run_cli(tmp_path, cfg)
    assert code == 0 and (out / MANIFEST).is_file()
    code, err, _ = run_cli(tmp_path, cfg, "--random-seed", "1")
    assert code == 2 and "--force" in err
    code, _, _ = run_cli(tmp_path, cfg, "--random-seed", "1", "--force")
    assert code == 0 and (out / MANIFEST).is_file()


def test_dry_run_describes_and_writes_nothing(llama, tmp_path, capsys):
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(moe_config(llama["base"], {"a": llama["a"], "b": llama["b"]})))
    assert cli_main(["moe", str(path), str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "Mixtral" in text and "2 routed" in text and not (tmp_path / "out").exists()


def test_words_are_known_to_the_tiny_tokenizer():
    # the prompts above tokenize without unknown tokens, so the gates differ between experts
    assert all(w in WORDS for ps in PROMPTS.values() for p in ps for w in p.split())
