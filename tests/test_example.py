"""The embedded example: shipped models load and score, the eval command works, training runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from mergekit_mlx import evaluate

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models"
NAMES = ["base", "add", "reverse"]


@pytest.fixture(scope="module")
def loaded():
    from mlx_lm import load

    return {name: load(str(MODELS / name)) for name in NAMES}


def test_shipped_models_are_hugging_face_llama_directories():
    for name in NAMES:
        d = MODELS / name
        config = json.loads((d / "config.json").read_text())
        assert config["model_type"] == "llama"
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert config["torch_dtype"] == "float16"
        with safe_open(str(d / "model.safetensors"), "numpy") as f:
            assert f.metadata() == {"format": "pt"}
            keys = set(f.keys())
            assert {"model.embed_tokens.weight", "model.norm.weight"} <= keys
            for i in range(config["num_hidden_layers"]):
                for part in [
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.o_proj",
                    "mlp.gate_proj",
                    "mlp.up_proj",
                    "mlp.down_proj",
                ]:
                    assert f"model.layers.{i}.{part}.weight" in keys
            assert all(f.get_tensor(k).dtype == np.float16 for k in keys)
        assert ("lm_head.weight" in keys) != config["tie_word_embeddings"]


def test_shipped_weights_are_small():
    total = sum(p.stat().st_size for p in MODELS.rglob("*.safetensors"))
    assert total < 6_000_000


def test_shipped_tokenizer_loads_with_transformers_and_round_trips():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODELS / "base"))
    text = "reverse abc=cba 12+34=46"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert len(ids) == len(text) + 1  # one token per character
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_fine_tunes_share_the_base_architecture_and_differ_from_it():
    from safetensors.numpy import load_file

    base = load_file(str(MODELS / "base" / "model.safetensors"))
    for name in ["add", "reverse"]:
        tuned = load_file(str(MODELS / name / "model.safetensors"))
        assert tuned.keys() == base.keys()
        assert all(tuned[k].shape == base[k].shape for k in base)
        assert any(not np.array_equal(tuned[k], base[k]) for k in base)


def test_held_out_prompts_never_come_from_the_training_stream():
    for task in evaluate.TASKS:
        held = evaluate.held_out_examples(task, 50, seed=0)
        assert len({ex.prompt for ex in held}) == 50
        assert all(evaluate.is_held_out(ex.prompt) for ex in held)
        stream = evaluate.examples(task, seed=0, held_out=False)
        training = {next(stream).prompt for _ in range(2000)}
        assert not training & {ex.prompt for ex in held}


def test_examples_are_correct_and_deterministic():
    held = evaluate.held_out_examples("add", 20, seed=3)
    assert held == evaluate.held_out_examples("add", 20, seed=3)
    for ex in held:
        a, b = ex.prompt.rstrip("=").split("+")
        assert int(ex.answer) == int(a) + int(b)
    for ex in evaluate.held_out_examples("reverse", 20, seed=3):
        word = ex.prompt.removeprefix("reverse ").rstrip("=")
        assert ex.answer == "".join(reversed(word))


@pytest.mark.slow
def test_each_fine_tune_beats_the_base_on_its_own_skill(loaded):
    base_model, base_tok = loaded["base"]
    for task in ["add", "reverse"]:
        model, tok = loaded[task]
        tuned = evaluate.evaluate(model, tok, task, n=48)
        assert tuned > evaluate.evaluate(base_model, base_tok, task, n=48)
        assert tuned >= 0.8


@pytest.mark.slow
def test_task_arithmetic_of_the_fine_tunes_beats_each_fine_tune(loaded):
    # the example's claim, with the merge done here in float64 numpy: base + both task vectors
    import mlx.core as mx
    from mlx_lm import load
    from safetensors.numpy import load_file

    weights = {n: {k: v.astype(np.float64) for k, v in load_file(str(MODELS / n / "model.safetensors")).items()} for n in NAMES}
    base = weights["base"]
    merged = {k: base[k] + (weights["add"][k] - base[k]) + (weights["reverse"][k] - base[k]) for k in base}
    model, tok = load(str(MODELS / "base"))
    model.load_weights([(k, mx.array(v.astype(np.float32))) for k, v in merged.items()])
    # 200 held-out prompts per skill, as the README's table: fewer leave a few points of noise
    merge_avg = np.mean([evaluate.evaluate(model, tok, t, n=200) for t in evaluate.TASKS])
    for name in ["add", "reverse"]:
        m, t = loaded[name]
        tuned_avg = np.mean([evaluate.evaluate(m, t, task, n=200) for task in evaluate.TASKS])
        assert merge_avg > tuned_avg


class CharTokenizer:
    def encode(self, text, add_special_tokens=True):
        return list(text)


def test_evaluate_counts_exact_matches(monkeypatch):
    # a stand-in generator: the right answer for even-indexed prompts, a wrong one otherwise
    held = evaluate.held_out_examples("add", 10, seed=0)
    outputs = {ex.prompt: (f" {ex.answer}" if i % 2 == 0 else ex.answer + "0") for i, ex in enumerate(held)}
    monkeypatch.setattr(evaluate, "greedy_complete", lambda model, tok, prompts, max_tokens: [outputs[p] for p in prompts])
    assert evaluate.evaluate(None, CharTokenizer(), "add", n=10, seed=0) == 0.5


def test_format_table_lists_each_model_with_its_average():
    rows = [evaluate.Row("m1", {"add": 0.5, "reverse": 1.0}), evaluate.Row("m2", {"add": 0.25, "reverse": 0.0})]
    lines = evaluate.format_table(rows).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["model", "add", "reverse", "average"]
    assert [c.strip() for c in lines[2].strip("|").split("|")] == ["m1", "0.500", "1.000", "0.750"]
    assert [c.strip() for c in lines[3].strip("|").split("|")] == ["m2", "0.250", "0.000", "0.125"]


def test_eval_command_prints_a_row_per_model_and_task(capsys):
    code = evaluate.main([str(MODELS / "base"), str(MODELS / "add"), "--task", "add", "--n", "8"])
    out = capsys.readouterr().out
    assert code == 0
    header = out.splitlines()[0]
    assert "add" in header and "reverse" not in header
    assert str(MODELS / "base") in out and str(MODELS / "add") in out


def test_eval_command_names_a_missing_model_directory(tmp_path, capsys):
    from mergekit_mlx.cli import main

    code = main(["eval", str(tmp_path / "nothing"), "--n", "4"])
    assert code == 2
    assert str(tmp_path / "nothing") in capsys.readouterr().err


@pytest.mark.slow
def test_a_short_training_run_writes_loadable_models(tmp_path):
    from mlx_lm import load
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import train
    finally:
        sys.path.pop(0)
    args = [
        "--out",
        str(tmp_path),
        "--hidden",
        "32",
        "--layers",
        "1",
        "--intermediate",
        "64",
        "--heads",
        "2",
        "--batch",
        "8",
        "--base-steps",
        "6",
        "--ft-steps",
        "3",
        "--eval-n",
        "0",
    ]
    assert train.main(args) == 0
    for name in NAMES:
        model, tok = load(str(tmp_path / name))
        assert model.args.hidden_size == 32
        AutoTokenizer.from_pretrained(str(tmp_path / name))
        assert isinstance(evaluate.evaluate(model, tok, "reverse", n=4), float)
