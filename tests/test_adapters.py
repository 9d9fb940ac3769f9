"""LoRA adapters as merge inputs: `model: BASE+ADAPTER` anywhere a recipe names a model.

The rule: a recipe that names `base+adapter` merges exactly as the same recipe naming a model directory
into which the adapter was merged first. The merged-first directories are written here by float64
numpy references of each kind's formula (PEFT LoRA, rsLoRA, DoRA, modules_to_save, rank_pattern,
lora_bias, embedding LoRA; mlx-lm LoRA, DoRA, full fine-tune), never by the code under test; where
peft or mlx-lm is installed, their own merges (`merge_and_unload`, the layers' `fuse`) are the reference.
Hostile adapters exit 2 naming the file or the YAML key, before any tensor is read and with nothing
written.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from test_hub import hub as fake_hub  # noqa: F401 - test_hub's fake Hub, as the fixture `fake_hub`
from tiny import llama_config, llama_weights, load_np, save_model

from mergekit_mlx import merge
from mergekit_mlx.adapters import AdaptedModel
from mergekit_mlx.cli import main as cli_main
from mergekit_mlx.formats.safetensors import SafetensorsModel

HIDDEN, INTER, VOCAB, KV = 32, 48, 64, 16  # tiny.llama_config's defaults: 4 heads, 2 kv heads of 8
RANK = 4


# ---- models and adapters written on the fly ------------------------------------------------------


def base_config() -> dict:
    return {**llama_config(), "attention_bias": True}  # q/k/v/o biases, for PEFT's lora_bias


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    """A float32 Llama base (with attention biases) and one fine-tune of it, as float64 arrays too."""
    root = tmp_path_factory.mktemp("adapters")
    rng = np.random.default_rng(7)
    cfg = base_config()
    base = llama_weights(cfg, rng)
    for n in range(cfg["num_hidden_layers"]):
        for proj, size in (("q", HIDDEN), ("k", KV), ("v", KV), ("o", HIDDEN)):
            base[f"model.layers.{n}.self_attn.{proj}_proj.bias"] = rng.normal(0, 0.1, (size,))
    ft = {k: v + rng.normal(0, 0.05, v.shape) for k, v in base.items()}
    save_model(root / "base", cfg, base)
    save_model(root / "ft", cfg, ft)
    return {"root": root, "base": root / "base", "ft": root / "ft", "weights": load_np(root / "base"), "config": cfg}


def f32(x: np.ndarray) -> np.ndarray:
    """What the adapter file holds (float32), back as float64 for the reference."""
    return x.astype(np.float32).astype(np.float64)


def write_adapter(path: Path, config: dict, tensors: dict[str, np.ndarray], weights_name: str) -> dict[str, np.ndarray]:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / weights_name), {k: mx.array(v.astype(np.float32)) for k, v in tensors.items()})
    return {k: f32(v) for k, v in tensors.items()}


def peft(path: Path, tensors: dict[str, np.ndarray], **config) -> dict[str, np.ndarray]:
    cfg = {"peft_type": "LORA", "r": RANK, "lora_alpha": 8, "use_rslora": False, "use_dora": False, **config}
    return write_adapter(path, cfg, {"base_model.model." + k: v for k, v in tensors.items()}, "adapter_model.safetensors")


def mlx_lm(path: Path, tensors: dict[str, np.ndarray], fine_tune_type: str, scale: float = 3.0) -> dict[str, np.ndarray]:
    cfg = {"fine_tune_type": fine_tune_type, "num_layers": 2, "lora_parameters": {"rank": RANK, "scale": scale, "dropout": 0.0}}
    return write_adapter(path, cfg, tensors, "adapters.safetensors")


def shape(name: str) -> tuple[int, int]:
    out = {
        "q_proj": HIDDEN,
        "k_proj": KV,
        "v_proj": KV,
        "o_proj": HIDDEN,
        "gate_proj": INTER,
        "up_proj": INTER,
        "down_proj": HIDDEN,
    }
    module = name.split(".")[-1]
    return out[module], (INTER if module == "down_proj" else HIDDEN)


MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"]


def row_norms(v: np.ndarray) -> np.ndarray:
    return np.sqrt((v * v).sum(axis=1))


# Each kind: write the adapter into `path`, return {tensor name: float64 weight after merging it}
# for the tensors it changes, computed from the published formula.


def peft_lora(path, w, rng, *, rslora=False, dora=False):
    t = {}
    for m in MODULES:
        out, inp = shape(m)
        t[m + ".lora_A.weight"] = rng.normal(0, 0.3, (RANK, inp))
        t[m + ".lora_B.weight"] = rng.normal(0, 0.3, (out, RANK))
        if dora:
            t[m + ".lora_magnitude_vector"] = rng.uniform(0.5, 2.0, (out,))
    t = {k[len("base_model.model.") :]: v for k, v in peft(path, t, use_rslora=rslora, use_dora=dora, lora_alpha=8).items()}
    scale = 8 / np.sqrt(RANK) if rslora else 8 / RANK
    ref = {}
    for m in MODULES:
        v = w[m + ".weight"] + scale * t[m + ".lora_B.weight"] @ t[m + ".lora_A.weight"]
        if dora:  # DoRA: the magnitude times each output row of W + sBA over its L2 norm
            v = t[m + ".lora_magnitude_vector"][:, None] * v / row_norms(v)[:, None]
        ref[m + ".weight"] = v
    return ref


def peft_fan_in_fan_out_dora(path, w, rng):
    # a weight stored (in, out), as GPT-2's Conv1D stores it: the update is (B A) transposed, and
    # DoRA's magnitude scales each output unit, a column here
    d = "model.layers.0.mlp.down_proj"  # read as in=32 rows, out=48 columns
    t = {
        d + ".lora_A.weight": rng.normal(0, 0.3, (RANK, HIDDEN)),
        d + ".lora_B.weight": rng.normal(0, 0.3, (INTER, RANK)),
        d + ".lora_magnitude_vector": rng.uniform(0.5, 2.0, (INTER,)),
    }
    t = {k[len("base_model.model.") :]: v for k, v in peft(path, t, fan_in_fan_out=True, use_dora=True).items()}
    v = w[d + ".weight"] + 2.0 * (t[d + ".lora_B.weight"] @ t[d + ".lora_A.weight"]).T
    column_norms = np.sqrt((v * v).sum(axis=0))
    return {d + ".weight": v * (t[d + ".lora_magnitude_vector"] / column_norms)[None, :]}


def peft_modules_to_save(path, w, rng):
    t = {
        "model.layers.0.self_attn.q_proj.lora_A.weight": rng.normal(0, 0.3, (RANK, HIDDEN)),
        "model.layers.0.self_attn.q_proj.lora_B.weight": rng.normal(0, 0.3, (HIDDEN, RANK)),
        "lm_head.weight": rng.normal(0, 0.5, (VOCAB, HIDDEN)),  # as PEFT saves modules_to_save
        "model.norm.modules_to_save.default.weight": rng.normal(1, 0.1, (HIDDEN,)),  # as older tools did
    }
    t = {k[len("base_model.model.") :]: v for k, v in peft(path, t, modules_to_save=["lm_head", "norm"]).items()}
    q = "model.layers.0.self_attn.q_proj"
    return {
        q + ".weight": w[q + ".weight"] + 2.0 * t[q + ".lora_B.weight"] @ t[q + ".lora_A.weight"],
        "lm_head.weight": t["lm_head.weight"],
        "model.norm.weight": t["model.norm.modules_to_save.default.weight"],
    }


def peft_rank_pattern(path, w, rng):
    # q_proj of layer 0 has rank 2 and alpha 3 by full name; every down_proj alpha 16 by suffix
    ranks = {MODULES[0]: 2, MODULES[1]: RANK, MODULES[2]: RANK}
    alphas = {MODULES[0]: 3, MODULES[1]: 8, MODULES[2]: 16}
    t = {}
    for m in MODULES:
        out, inp = shape(m)
        t[m + ".lora_A.weight"] = rng.normal(0, 0.3, (ranks[m], inp))
        t[m + ".lora_B.weight"] = rng.normal(0, 0.3, (out, ranks[m]))
    pattern = {"rank_pattern": {"^model.layers.0.self_attn.q_proj": 2}, "alpha_pattern": {"down_proj": 16, MODULES[0]: 3}}
    t = {k[len("base_model.model.") :]: v for k, v in peft(path, t, **pattern).items()}
    return {
        m + ".weight": w[m + ".weight"] + alphas[m] / ranks[m] * t[m + ".lora_B.weight"] @ t[m + ".lora_A.weight"]
        for m in MODULES
    }


def peft_bias_and_embedding(path, w, rng):
    q, e = "model.layers.1.self_attn.q_proj", "model.embed_tokens"
    t = {
        q + ".lora_A.weight": rng.normal(0, 0.3, (RANK, HIDDEN)),
        q + ".lora_B.weight": rng.normal(0, 0.3, (HIDDEN, RANK)),
        q + ".lora_B.bias": rng.normal(0, 0.3, (HIDDEN,)),
        e + ".lora_embedding_A": rng.normal(0, 0.3, (RANK, VOCAB)),
        e + ".lora_embedding_B": rng.normal(0, 0.3, (HIDDEN, RANK)),
    }
    t = {k[len("base_model.model.") :]: v for k, v in peft(path, t, lora_bias=True).items()}
    return {
        q + ".weight": w[q + ".weight"] + 2.0 * t[q + ".lora_B.weight"] @ t[q + ".lora_A.weight"],
        q + ".bias": w[q + ".bias"] + 2.0 * t[q + ".lora_B.bias"],
        # an embedding's update is (B A) transposed: one row per token
        e + ".weight": w[e + ".weight"] + 2.0 * (t[e + ".lora_embedding_B"] @ t[e + ".lora_embedding_A"]).T,
    }


def mlx_lora(path, w, rng, *, dora=False):
    t = {}
    for m in MODULES:
        out, inp = shape(m)
        t[m + ".lora_a"] = rng.normal(0, 0.3, (inp, RANK))  # mlx-lm: y = x W^T + scale (x a) b
        t[m + ".lora_b"] = rng.normal(0, 0.3, (RANK, out))
        if dora:
            t[m + ".m"] = rng.uniform(0.5, 2.0, (out,))
    e = "model.embed_tokens"  # an Embedding's a is (vocab, r) and b (r, dim): no transpose
    t[e + ".lora_a"] = rng.normal(0, 0.3, (VOCAB, RANK))
    t[e + ".lora_b"] = rng.normal(0, 0.3, (RANK, HIDDEN))
    if dora:
        t[e + ".m"] = rng.uniform(0.5, 2.0, (VOCAB,))
    t = mlx_lm(path, t, "dora" if dora else "lora", scale=3.0)
    ref = {m + ".weight": w[m + ".weight"] + 3.0 * (t[m + ".lora_a"] @ t[m + ".lora_b"]).T for m in MODULES}
    ref[e + ".weight"] = w[e + ".weight"] + 3.0 * t[e + ".lora_a"] @ t[e + ".lora_b"]
    if dora:
        ref = {k: t[k[: -len("weight")] + "m"][:, None] * v / row_norms(v)[:, None] for k, v in ref.items()}
    return ref


def mlx_full(path, w, rng):
    names = [
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.self_attn.q_proj.bias",
    ]
    return mlx_lm(path, {n: w[n] + rng.normal(0, 0.1, w[n].shape) for n in names}, "full")


KINDS = {
    "peft-lora": peft_lora,
    "peft-rslora": lambda p, w, rng: peft_lora(p, w, rng, rslora=True),
    "peft-dora": lambda p, w, rng: peft_lora(p, w, rng, dora=True),
    "peft-fan-in-fan-out-dora": peft_fan_in_fan_out_dora,
    "peft-modules-to-save": peft_modules_to_save,
    "peft-rank-pattern": peft_rank_pattern,
    "peft-bias-and-embedding": peft_bias_and_embedding,
    "mlx-lm-lora": mlx_lora,
    "mlx-lm-dora": lambda p, w, rng: mlx_lora(p, w, rng, dora=True),
    "mlx-lm-full": mlx_full,
}


def merged_first(family: dict, path: Path, changed: dict[str, np.ndarray]) -> Path:
    """The base with the adapter merged in by the reference: the directory a user would have made."""
    return save_model(path, family["config"], {**family["weights"], **changed})


def weights_of(result) -> dict[str, np.ndarray]:
    return {k: np.array(v.astype(mx.float32)).astype(np.float64) for k, v in result.weights.items()}


def assert_close(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=2e-6, err_msg=k)


def linear(a: str, b: str) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": a, "parameters": {"weight": 0.7}}, {"model": b, "parameters": {"weight": 0.3}}],
    }


# ---- the rule: an adapter in a recipe is the adapter merged first ---------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_recipe_naming_base_plus_adapter_merges_as_the_adapter_merged_first(family, tmp_path, kind):
    changed = KINDS[kind](tmp_path / "adapter", family["weights"], np.random.default_rng(1))
    assert any(not np.allclose(v, family["weights"][k]) for k, v in changed.items())
    reference = merged_first(family, tmp_path / "merged", changed)
    got = merge(linear(f"{family['base']}+{tmp_path / 'adapter'}", str(family["ft"])))
    want = merge(linear(str(reference), str(family["ft"])))
    assert_close(weights_of(got), weights_of(want))


def test_adapted_model_as_base_and_as_input_of_a_ties_merge(family, tmp_path):
    changed = peft_lora(tmp_path / "a", family["weights"], np.random.default_rng(2))
    changed_b = mlx_lora(tmp_path / "b", family["weights"], np.random.default_rng(3), dora=True)
    ref_a = merged_first(family, tmp_path / "ref-a", changed)
    ref_b = merged_first(family, tmp_path / "ref-b", changed_b)

    def ties(base: str, first: str, second: str) -> dict:
        models = [{"model": m, "parameters": {"weight": 0.5, "density": 0.6}} for m in (first, second)]
        return {"merge_method": "ties", "base_model": base, "models": models}

    base, ft = str(family["base"]), str(family["ft"])
    got = merge(ties(f"{base}+{tmp_path / 'a'}", f"{base}+{tmp_path / 'b'}", ft))
    want = merge(ties(str(ref_a), str(ref_b), ft))
    assert_close(weights_of(got), weights_of(want))


def test_adapted_model_in_slices_merges_as_the_adapter_merged_first(family, tmp_path):
    changed = mlx_lora(tmp_path / "a", family["weights"], np.random.default_rng(4))
    reference = merged_first(family, tmp_path / "ref", changed)

    def slices(first: str) -> dict:
        return {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": first, "layer_range": [1, 2]}]},
                {"sources": [{"model": str(family["ft"]), "layer_range": [0, 1]}]},
            ],
        }

    got = merge(slices(f"{family['base']}+{tmp_path / 'a'}"))
    assert_close(weights_of(got), weights_of(merge(slices(str(reference)))))


def test_mlx_lm_lora_on_stacked_experts_adds_b_a_per_expert(family, tmp_path):
    rng = np.random.default_rng(10)
    experts = "model.layers.1.mlp.switch_mlp.gate_proj"  # mlx-lm's SwitchLinear: one (out, in) weight per expert
    weights = {**family["weights"], experts + ".weight": rng.normal(0, 0.2, (3, INTER, HIDDEN))}
    base = save_model(tmp_path / "moe", family["config"], weights)
    t = mlx_lm(
        tmp_path / "a",
        {experts + ".lora_a": rng.normal(0, 0.3, (3, RANK, HIDDEN)), experts + ".lora_b": rng.normal(0, 0.3, (3, INTER, RANK))},
        "lora",
    )
    want = {
        **load_np(base),
        experts + ".weight": load_np(base)[experts + ".weight"] + 3.0 * t[experts + ".lora_b"] @ t[experts + ".lora_a"],
    }
    got = weights_of(merge({"merge_method": "passthrough", "models": [{"model": f"{base}+{tmp_path / 'a'}"}]}))
    assert_close(got, want)


def test_adapter_over_an_mlx_quantized_base_changes_its_dequantized_weights(family, tmp_path):
    from mergekit_mlx.convert import convert

    quantized = convert(family["base"], tmp_path / "q8", "mlx-q8")
    dequantized = weights_of(merge({"merge_method": "passthrough", "models": [{"model": str(quantized)}]}))
    changed = peft_lora(tmp_path / "a", dequantized, np.random.default_rng(5))
    got = weights_of(merge({"merge_method": "passthrough", "models": [{"model": f"{quantized}+{tmp_path / 'a'}"}]}))
    assert_close(got, {**dequantized, **changed})


def test_bfloat16_base_is_updated_in_float32_and_rounded_once(family, tmp_path):
    base = save_model(tmp_path / "bf16", family["config"], family["weights"], dtype="bfloat16")
    w = load_np(base)
    changed = peft_lora(tmp_path / "a", w, np.random.default_rng(6))
    result = merge({"merge_method": "passthrough", "models": [{"model": f"{base}+{tmp_path / 'a'}"}]})
    for k, want in changed.items():
        assert result.weights[k].dtype == mx.bfloat16
        rounded = np.array(mx.array(want.astype(np.float32)).astype(mx.bfloat16).astype(mx.float32))
        np.testing.assert_array_equal(np.array(result.weights[k].astype(mx.float32)), rounded, err_msg=k)


# ---- against the libraries that define the formats -------------------------------------------------


PEFT_VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "patterns": {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"model.layers.1.self_attn.q_proj": 5}},
    "modules-to-save-and-lora-bias": {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"], "lora_bias": True},
    "embedding": {"target_modules": ["q_proj", "embed_tokens"]},
}


@pytest.mark.parametrize("variant", list(PEFT_VARIANTS))
def test_applied_weights_equal_peft_merge_and_unload(family, tmp_path, variant):
    torch = pytest.importorskip("torch")
    peft_lib = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(family["base"]), dtype=torch.float32)
    options = {"target_modules": ["q_proj", "v_proj", "down_proj"], **PEFT_VARIANTS[variant]}
    # init_lora_weights=False: B random, not zero, so the update is not empty
    config = peft_lib.LoraConfig(r=RANK, lora_alpha=8, init_lora_weights=False, **options)
    wrapped = peft_lib.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name or "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.1)  # a trained magnitude, head and bias, not their initial values
    wrapped.save_pretrained(str(tmp_path / "adapter"))
    want = {k: v.double().numpy() for k, v in wrapped.merge_and_unload().state_dict().items()}

    got = weights_of(merge({"merge_method": "passthrough", "models": [{"model": f"{family['base']}+{tmp_path / 'adapter'}"}]}))
    changed = [k for k in got if not np.array_equal(got[k], family["weights"][k])]
    assert changed
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("dora, config_says_fan_in_fan_out", [(False, True), (True, True), (True, False)])
def test_applied_weights_equal_peft_merge_and_unload_on_gpt2_conv1d(tmp_path, dora, config_says_fan_in_fan_out):
    torch = pytest.importorskip("torch")
    peft_lib = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(tmp_path / "gpt2"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "gpt2"), dtype=torch.float32)
    # Conv1D stores its weight (in, out): PEFT's fan_in_fan_out transposes the update
    lora = peft_lib.LoraConfig(r=RANK, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=dora)
    wrapped = peft_lib.get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    wrapped.save_pretrained(str(tmp_path / "adapter"))
    want = {k: v.double().numpy() for k, v in wrapped.merge_and_unload().state_dict().items()}
    # PEFT sets fan_in_fan_out by the layer's type whatever the config says (with a warning): so do the shapes here
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({**config, "fan_in_fan_out": config_says_fan_in_fan_out})
    )

    got = weights_of(merge({"merge_method": "passthrough", "models": [{"model": f"{tmp_path / 'gpt2'}+{tmp_path / 'adapter'}"}]}))
    assert any("c_attn" in k for k in got)
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_applied_weights_equal_mlx_lm_fuse(family, tmp_path, fine_tune_type):
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    model, _ = load(str(family["base"]))
    model.freeze()
    params = {"rank": RANK, "scale": 2.5, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj", "model.embed_tokens"]}
    linear_to_lora_layers(model, 2, params, use_dora=fine_tune_type == "dora")
    mx.random.seed(0)
    trained = [
        (k, mx.random.normal(v.shape) * 0.2 + (v if k.endswith(".m") else 0))
        for k, v in tree_flatten(model.trainable_parameters())
    ]
    model.update(tree_unflatten(trained))
    out = tmp_path / "adapter"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (out / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": fine_tune_type, "num_layers": 2, "lora_parameters": params})
    )
    model.update_modules(tree_unflatten([(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]))
    want = {k: np.array(v.astype(mx.float32)).astype(np.float64) for k, v in tree_flatten(model.parameters())}

    got = weights_of(merge({"merge_method": "passthrough", "models": [{"model": f"{family['base']}+{out}"}]}))
    assert sorted(got) == sorted(want)
    assert any(not np.array_equal(got[k], family["weights"][k]) for k in got)
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


# ---- the reference: how `+` splits, where adapters come from ----------------------------------------


def test_existing_path_with_a_plus_is_a_model_not_an_adapter(family, tmp_path):
    odd = tmp_path / "c++model"
    odd.symlink_to(family["base"])
    got = weights_of(merge({"merge_method": "passthrough", "models": [{"model": str(odd)}]}))
    assert_close(got, family["weights"])


def test_adapter_relative_to_the_recipe_is_found(family, tmp_path):
    changed = peft_lora(tmp_path / "adapters" / "a", family["weights"], np.random.default_rng(8))
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": [{"model": f"{family['base']}+adapters/a"}]}))
    assert_close(weights_of(merge(recipe)), {**family["weights"], **changed})


def test_adapter_from_the_hub_is_fetched_as_its_config_and_safetensors_only(family, tmp_path, fake_hub):  # noqa: F811
    changed = peft_lora(tmp_path / "local-adapter", family["weights"], np.random.default_rng(9))
    fake_hub.add("org/adapter", tmp_path / "local-adapter", extra={"adapter_model.bin": b"\x80\x02 a pickle"})
    got = weights_of(merge({"merge_method": "passthrough", "models": [{"model": f"{family['base']}+org/adapter"}]}))
    assert_close(got, {**family["weights"], **changed})
    assert set(fake_hub.fetched()) == {"adapter_config.json", "adapter_model.safetensors"}


# ---- hostile and wrong adapters: exit 2, one paragraph, nothing written -----------------------------


def run_cli(capsys, tmp_path: Path, model: str, *flags: str) -> tuple[int, str]:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": [{"model": model}]}))
    rc = cli_main(["run", str(recipe), str(tmp_path / "out"), "--no-progress", *flags])
    return rc, capsys.readouterr().err


def assert_refused(rc: int, err: str, tmp_path: Path, *patterns: str) -> None:
    assert rc == 2, err
    assert err.startswith("mergekit-mlx: error: ") and "Traceback" not in err, err
    for p in patterns:
        assert re.search(p, err), f"{p!r} not in {err!r}"
    assert not os.path.lexists(tmp_path / "out") and not os.path.lexists(tmp_path / ".out.partial")


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Every input tensor read fails the test: a refusal must come from headers and configs alone."""

    def refuse(self, name):
        raise AssertionError(f"tensor {name} read before the adapter was refused")

    monkeypatch.setattr(SafetensorsModel, "load", refuse)


def test_adapter_for_another_hidden_size_is_refused_naming_tensor_and_shapes(family, tmp_path, capsys, no_tensor_reads):
    rng = np.random.default_rng(0)
    q = "model.layers.0.self_attn.q_proj"
    peft(tmp_path / "a", {q + ".lora_A.weight": rng.normal(size=(RANK, 40)), q + ".lora_B.weight": rng.normal(size=(40, RANK))})
    rc, err = run_cli(capsys, tmp_path, f"{family['base']}+{tmp_path / 'a'}")
    assert_refused(
        rc, err, tmp_path, r"models\[0\]\.model", re.escape(q + ".weight"), r"\[32, 32\]", r"\[40, 4\]", "another model"
    )


def test_adapter_for_another_architecture_is_refused_naming_the_missing_tensor(family, tmp_path, capsys, no_tensor_reads):
    rng = np.random.default_rng(0)
    m = "transformer.h.0.attn.c_attn"  # GPT-2's fused attention: no such module in a Llama
    peft(tmp_path / "a", {m + ".lora_A.weight": rng.normal(size=(RANK, 32)), m + ".lora_B.weight": rng.normal(size=(96, RANK))})
    rc, err = run_cli(capsys, tmp_path, f"{family['base']}+{tmp_path / 'a'}")
    assert_refused(rc, err, tmp_path, "c_attn", "another architecture", r"models\[0\]\.model")


def test_mlx_lm_adapter_for_a_deeper_model_is_refused(family, tmp_path, capsys, no_tensor_reads):
    m = "model.layers.5.self_attn.q_proj"
    mlx_lm(tmp_path / "a", {m + ".lora_a": np.zeros((HIDDEN, RANK)), m + ".lora_b": np.zeros((RANK, HIDDEN))}, "lora")
    rc, err = run_cli(capsys, tmp_path, f"{family['base']}+{tmp_path / 'a'}")
    assert_refused(rc, err, tmp_path, re.escape(m), "MLX-converted base")


def test_adapter_that_misses_a_hub_base_is_refused_before_any_weight_is_downloaded(family, tmp_path, capsys, fake_hub):  # noqa: F811
    shards = save_model(tmp_path / "sharded", family["config"], family["weights"], shards=2)  # with an index: names known
    fake_hub.add("org/base", shards)
    m = "model.layers.7.self_attn.q_proj"
    peft(tmp_path / "a", {m + ".lora_A.weight": np.zeros((RANK, HIDDEN)), m + ".lora_B.weight": np.zeros((HIDDEN, RANK))})
    rc, err = run_cli(capsys, tmp_path, f"org/base+{tmp_path / 'a'}")
    assert_refused(rc, err, tmp_path, re.escape(m), "org/base", "another architecture")
    assert "config.json" in fake_hub.fetched()
    assert not [f for f in fake_hub.fetched() if f.endswith(".safetensors")]


def test_adapter_without_its_safetensors_is_refused(family, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    rc, err = run_cli(capsys, tmp_path, f"{family['base']}+{tmp_path / 'a'}")
    assert_refused(rc, err, tmp_path, "no adapter_model.safetensors")


class _Trap:
    """Unpickling this creates a file: proof that a pickle was never unpickled if the file is absent."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_bin_only_adapter_is_refused_and_never_unpickled(family, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    marker = tmp_path / "unpickled"
    (tmp_path / "a" / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    rc, err = run_cli(capsys, tmp_path, f"{family['base']}+{tmp_path / 'a'}")
    assert_refused(rc, err, tmp_path, "adapter_model.bin", "pickle", "never loaded")
    assert not marker.exists()


@pytest.mark.parametrize("peft_type", ["IA3", "LOHA", "ADALORA"])
def test_adapter_of_another_peft_type_is_refused_naming_it(family, tmp_path, capsys, peft_type):
    peft(tmp_path / "a", {"model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((RANK, HIDDEN))}, peft_type=peft_type)
    rc, err = run_cli(capsys, tmp_path, f"{family['base']}+{tmp_path / 'a'}")
    assert_refused(rc, err, tmp_path, "adapter_config.json", f"peft_type is '{peft_type}'", "only LORA")


def test_unknown_mlx_lm_fine_tune_type_is_refused(family, tmp_path, capsys):
    mlx_lm(tmp_path / "a", {"x.lora_a": np.zeros((2, 2))}, "qlora")
    rc, err = run_cli(capsys, tmp_path, f"{family['base']}+{tmp_path / 'a'}")
    assert_refused(rc, err, tmp_path, "fine_tune_type is 'qlora'", "lora, dora, full")


def test_rank_that_disagrees_with_the_config_is_refused(family, tmp_path, capsys):
    q = "model.layers.0.self_attn.q_proj"
    peft(tmp_path / "a", {q + ".lora_A.weight": np.zeros((8, HIDDEN)), q + ".lora_B.weight": np.zeros((HIDDEN, 8))})
    rc, err = run_cli(capsys, tmp_path, f"{family['base']}+{tmp_path / 'a'}")
    assert_refused(rc, err, tmp_path, "rank 4", "disagree")


def test_malformed_adapter_config_is_refused_naming_the_file(family, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    rc, err = run_cli(capsys, tmp_path, f"{family['base']}+{tmp_path / 'a'}")
    assert_refused(rc, err, tmp_path, "adapter_config.json", "not valid JSON")


PEFT_OK = '"peft_type": "LORA", "r": 4, "lora_alpha": 8'
MLX_OK = '"fine_tune_type": "lora", "lora_parameters": {"rank": 4, "scale": 2.0}'


@pytest.mark.parametrize(
    "config, weights, pattern",
    [
        ('{"peft_type": "LORA", "r": "8"}', "adapter_model", "r must be a positive whole number"),
        ('{"peft_type": "LORA", "r": 0}', "adapter_model", "r must be a positive whole number"),
        ('{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}', "adapter_model", "lora_alpha must be a finite number"),
        ("{" + PEFT_OK + ', "use_dora": "yes"}', "adapter_model", "use_dora must be true or false"),
        ("{" + PEFT_OK + ', "rank_pattern": {"(q": 2}}', "adapter_model", "rank_pattern key .* not a valid regular expression"),
        ("{" + PEFT_OK + ', "target_parameters": ["mlp.experts"]}', "adapter_model", "target_parameters is set"),
        ('{"fine_tune_type": "lora", "lora_parameters": {"rank": 4}}', "adapters", "scale must be a finite number"),
        ("[1, 2]", "adapter_model", "must hold a JSON object"),
        ('{"base_model_name_or_path": "x"}', "adapter_model", "neither a PEFT adapter config"),
        ("{" + PEFT_OK + "}", "adapter_model", "is I32; adapter tensors must be"),
        ("{" + MLX_OK + "}", "adapters", "'q_proj.lora_a' .*not a lora adapter parameter|needs lora_a, lora_b"),
    ],
)
def test_malformed_adapter_is_refused_naming_what_is_wrong(family, tmp_path, capsys, no_tensor_reads, config, weights, pattern):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(config)
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": mx.zeros((RANK, HIDDEN), mx.int32)}
    if weights == "adapters":
        tensors = {"q_proj.lora_a": mx.zeros((HIDDEN, RANK))}
    mx.save_safetensors(str(tmp_path / "a" / f"{weights}.safetensors"), tensors)
    rc, err = run_cli(capsys, tmp_path, f"{family['base']}+{tmp_path / 'a'}")
    assert_refused(rc, err, tmp_path, pattern)


def test_adapter_weights_symlinked_out_of_the_adapter_are_refused(family, tmp_path, capsys):
    peft_lora(tmp_path / "elsewhere", family["weights"], np.random.default_rng(0))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text((tmp_path / "elsewhere" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_model.safetensors").symlink_to(tmp_path / "elsewhere" / "adapter_model.safetensors")
    rc, err = run_cli(capsys, tmp_path, f"{family['base']}+{tmp_path / 'a'}")
    assert_refused(rc, err, tmp_path, "outside the model directory", "adapter weights")


def test_adapter_that_is_a_fifo_is_refused_without_opening_it(family, tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo")
    rc, err = run_cli(capsys, tmp_path, f"{family['base']}+{tmp_path / 'fifo'}")
    assert_refused(rc, err, tmp_path, "an adapter must be a directory")


def test_reference_with_two_plus_signs_is_refused_naming_the_key(family, tmp_path, capsys):
    rc, err = run_cli(capsys, tmp_path, f"{family['base']}+a+b")
    assert_refused(rc, err, tmp_path, r"models\[0\]\.model", "MODEL\\+ADAPTER")


def test_missing_adapter_path_is_refused_naming_the_key(family, tmp_path, capsys):
    rc, err = run_cli(capsys, tmp_path, f"{family['base']}+{tmp_path / 'nowhere'}")
    assert_refused(rc, err, tmp_path, r"models\[0\]\.model", "adapter .* not found")


def test_output_inside_the_adapter_directory_is_refused(family, tmp_path, capsys):
    peft_lora(tmp_path / "a", family["weights"], np.random.default_rng(0))
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        yaml.safe_dump({"merge_method": "passthrough", "models": [{"model": f"{family['base']}+{tmp_path / 'a'}"}]})
    )
    rc = cli_main(["run", str(recipe), str(tmp_path / "a" / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "inside" in err and not (tmp_path / "a" / "out").exists(), err


# ---- dry run, the resume proof, memory --------------------------------------------------------------


def test_dry_run_prints_the_adapter_and_reads_no_tensor(family, tmp_path, capsys, no_tensor_reads):
    peft_lora(tmp_path / "a", family["weights"], np.random.default_rng(0), dora=True)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        yaml.safe_dump({"merge_method": "passthrough", "models": [{"model": f"{family['base']}+{tmp_path / 'a'}"}]})
    )
    assert cli_main(["run", str(recipe), str(tmp_path / "out"), "--dry-run"]) == 0
    assert re.search(r"\[0\] \S+\+\S+  hf \+ PEFT DoRA adapter \(3 tensors changed\)", capsys.readouterr().out)
    assert not os.path.lexists(tmp_path / "out")


def test_resume_proof_and_output_checks_cover_the_adapter_files(family, tmp_path):
    from mergekit_mlx.options import MergeOptions
    from mergekit_mlx.output import merge_job
    from mergekit_mlx.plan import make_plan
    from mergekit_mlx.recipe import load_recipe

    peft_lora(tmp_path / "a", family["weights"], np.random.default_rng(0))
    recipe = load_recipe({"merge_method": "passthrough", "models": [{"model": f"{family['base']}+{tmp_path / 'a'}"}]})
    job = merge_job(make_plan(recipe), MergeOptions())
    a = (tmp_path / "a").resolve()
    assert {str(a / "adapter_config.json"), str(a / "adapter_model.safetensors")} <= {
        str(Path(f).resolve()) for f in job.input_files
    }
    assert any(Path(p).resolve() == a for _, p in job.inputs)


def test_each_tensor_is_read_once_and_an_update_reads_only_its_own_adapter_tensors(family, tmp_path, monkeypatch):
    peft_lora(tmp_path / "a", family["weights"], np.random.default_rng(0))
    base_reads: list[str] = []
    adapter_reads: list[str] = []
    load, tensor = SafetensorsModel.load, AdaptedModel._tensor
    monkeypatch.setattr(SafetensorsModel, "load", lambda self, name: base_reads.append(name) or load(self, name))
    monkeypatch.setattr(AdaptedModel, "_tensor", lambda self, key: adapter_reads.append(key) or tensor(self, key))
    result = merge({"merge_method": "passthrough", "models": [{"model": f"{family['base']}+{tmp_path / 'a'}"}]})
    assert Counter(base_reads) == Counter(list(result.weights))  # every base tensor once, the adapted ones included
    keys = [f"base_model.model.{m}.lora_{x}.weight" for m in MODULES for x in "BA"]
    assert sorted(adapter_reads) == sorted(keys)  # each A and B once, nothing else of the adapter

    adapted = result.plan.models[0]
    base_reads.clear()
    adapter_reads.clear()
    out = adapted.load(MODULES[0] + ".weight")
    assert base_reads == [MODULES[0] + ".weight"] and sorted(adapter_reads) == sorted(keys[:2])
    assert out.shape == (HIDDEN, HIDDEN)
