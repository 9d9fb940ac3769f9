"""Output tokenizers and vocabulary rows (tokenizer_source, the tokenizer block, chat templates).

Tiny WordLevel/BPE tokenizers are built with the `tokenizers` library; every expected row is
worked out here token by token from the rules mergekit 0.1.5 follows, in float64 numpy.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mergekit_mlx.chat_template import CHAT_TEMPLATES, apply_chat_template, resolve_chat_template
from mergekit_mlx.errors import ModelError, RecipeError
from mergekit_mlx.formats import open_model
from mergekit_mlx.recipe import recipe_from_dict
from mergekit_mlx.vocab import is_vocab_tensor, plan_vocab, rectify_embeddings

HIDDEN = 4
WORDS = ["<unk>", "<s>", "</s>", "hello", "world", "merge", "model", "fast"]


def write_model(
    path: Path, tokens: list[str], rows: int | None = None, specials=(), seed=0, chat_template=None, config_vocab=None
) -> tuple[Path, np.ndarray]:
    """A model directory whose embedding row i belongs to token id i; returns (path, embedding)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if specials:
        tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    if chat_template:
        cfg["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    rows = rows or len(tokens) + len(specials)
    (path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "num_hidden_layers": 1,
                "vocab_size": config_vocab or rows,
            }
        )
    )
    emb = np.random.default_rng(seed).normal(0, 1, (rows, HIDDEN)).astype(np.float32)
    mx.save_safetensors(
        str(path / "model.safetensors"),
        {
            "model.embed_tokens.weight": mx.array(emb),
            "lm_head.weight": mx.array(emb * 2),
            "model.layers.0.input_layernorm.weight": mx.ones((HIDDEN,)),
        },
        metadata={"format": "pt"},
    )
    return path, emb.astype(np.float64)


def setup(tmp_path, recipe_extra, models):
    """Recipe + sources in recipe order (base first), as the planner hands them over."""
    recipe = recipe_from_dict({"merge_method": "linear", "models": [{"model": str(p)} for p in models], **recipe_extra})
    sources = [open_model(r) for r in recipe.referenced_models()]
    base = 0 if recipe.base_model else None
    return recipe, sources, base


def aligned(plan, sources, ids, name="model.embed_tokens.weight"):
    tensors = [sources[i].load(name) for i in ids]
    return [np.array(t).astype(np.float64) for t in plan.align(name, tensors, ids)]


@pytest.fixture
def family(tmp_path):
    """base (WORDS); ext (WORDS + 'zeta' + special '<|im_end|>'); shuf (WORDS under other ids)."""
    base = write_model(tmp_path / "base", WORDS, seed=1)
    ext = write_model(tmp_path / "ext", WORDS + ["zeta"], specials=["<|im_end|>"], seed=2)
    order = [0, 1, 2, 6, 3, 7, 5, 4]
    shuf = write_model(tmp_path / "shuf", [WORDS[i] for i in order], seed=3)
    return {"base": base, "ext": ext, "shuf": shuf, "order": order}


# ---------------- which tensors, and when ----------------


@pytest.mark.parametrize(
    "name,expected",
    [
        ("model.embed_tokens.weight", True),
        ("lm_head.weight", True),
        ("transformer.wte.weight", True),
        ("gpt_neox.embed_in.weight", True),
        ("embed_out.weight", True),
        ("output.weight", True),
        ("model.language_model.embed_tokens.weight", True),
        ("lm_head.bias", True),
        ("transformer.wpe.weight", False),
        ("model.layers.0.mlp.up_proj.weight", False),
        ("bert.embeddings.position_embeddings.weight", False),
        ("model.norm.weight", False),
    ],
)
def test_vocab_tensor_names(name, expected):
    assert is_vocab_tensor(name) is expected


def test_no_tokenizer_setting_means_no_plan(tmp_path, family):
    recipe, sources, base = setup(tmp_path, {"base_model": str(family["base"][0])}, [family["base"][0], family["ext"][0]])
    assert plan_vocab(recipe, sources, base) is None


# ---------------- union ----------------


def test_union_appends_other_models_tokens_after_the_base(tmp_path, family):
    (b, eb), (e, ee) = family["base"], family["ext"]
    recipe, sources, base = setup(tmp_path, {"base_model": str(b), "tokenizer_source": "union"}, [b, e])
    plan = plan_vocab(recipe, sources, base)
    for i, t in enumerate(WORDS):
        assert plan.vocab[t] == i
    assert set(plan.vocab) == set(WORDS) | {"zeta", "<|im_end|>"}
    assert plan.vocab_size == len(WORDS) + 2
    out_base, out_ext = aligned(plan, sources, [0, 1])
    own_ext = {t: i for i, t in enumerate(WORDS + ["zeta", "<|im_end|>"])}
    for t, i in plan.vocab.items():
        np.testing.assert_array_equal(out_ext[i], ee[own_ext[t]])  # ext has every token
        # the base lacks the new tokens: they come from the only model that has them
        np.testing.assert_array_equal(out_base[i], eb[i] if t in WORDS else ee[own_ext[t]])


def test_union_token_in_several_models_but_not_the_base_is_their_mean(tmp_path, family):
    (b, _), (e, ee) = family["base"], family["ext"]
    e2, ee2 = write_model(tmp_path / "ext2", WORDS + ["zeta"], specials=["<|im_end|>"], seed=4)
    recipe, sources, base = setup(tmp_path, {"base_model": str(b), "tokenizer_source": "union"}, [b, e, e2])
    plan = plan_vocab(recipe, sources, base)
    out_base, _, _ = aligned(plan, sources, [0, 1, 2])
    z = plan.vocab["zeta"]
    np.testing.assert_allclose(out_base[z], (ee[len(WORDS)] + ee2[len(WORDS)]) / 2, rtol=1e-6)


def test_union_without_base_model_averages_over_models_missing_the_token(tmp_path, family):
    (b, _), (e, ee) = family["base"], family["ext"]
    e2, ee2 = write_model(tmp_path / "ext2", WORDS + ["zeta"], seed=5)
    recipe, sources, base = setup(tmp_path, {"tokenizer_source": "union"}, [b, e, e2])
    assert base is None
    plan = plan_vocab(recipe, sources, base)
    out_first, _, _ = aligned(plan, sources, [0, 1, 2])
    np.testing.assert_allclose(out_first[plan.vocab["zeta"]], (ee[len(WORDS)] + ee2[len(WORDS)]) / 2, rtol=1e-6)


def test_ids_past_a_models_vocab_size_are_not_its_tokens(tmp_path, family):
    b, _ = family["base"]
    # 'zeta' has id 8 in the tokenizer, but the model's config says 8 tokens: it is padding, not a token
    e, _ = write_model(tmp_path / "ext8", WORDS + ["zeta"], rows=9, config_vocab=8, seed=6)
    recipe, sources, base = setup(tmp_path, {"base_model": str(b), "tokenizer_source": "union"}, [b, e])
    plan = plan_vocab(recipe, sources, base)
    assert "zeta" not in plan.vocab and plan.vocab_size == len(WORDS)


# ---------------- base and model sources ----------------


def test_base_source_moves_rows_by_token_and_drops_other_tokens(tmp_path, family):
    (b, eb), (e, ee), (s, es) = family["base"], family["ext"], family["shuf"]
    order = family["order"]
    recipe, sources, base = setup(tmp_path, {"base_model": str(b), "tokenizer_source": "base"}, [b, e, s])
    plan = plan_vocab(recipe, sources, base)
    assert plan.vocab == {t: i for i, t in enumerate(WORDS)}
    out_base, out_ext, out_shuf = aligned(plan, sources, [0, 1, 2])
    np.testing.assert_array_equal(out_base, eb)
    np.testing.assert_array_equal(out_ext, ee[: len(WORDS)])
    for new_id, word_id in enumerate(order):  # shuf's row new_id holds WORDS[order[new_id]]
        np.testing.assert_array_equal(out_shuf[word_id], es[new_id])


def test_same_vocabulary_everywhere_returns_the_inputs_unchanged(tmp_path, family):
    ((b, _),) = [family["base"]]
    b2, _ = write_model(tmp_path / "b2", WORDS, seed=7)
    recipe, sources, base = setup(tmp_path, {"base_model": str(b), "tokenizer_source": "base"}, [b, b2])
    plan = plan_vocab(recipe, sources, base)
    tensors = [sources[i].load("lm_head.weight") for i in (0, 1)]
    out = plan.align("lm_head.weight", tensors, [0, 1])
    assert all(o is t for o, t in zip(out, tensors))


def test_model_source_takes_that_models_tokenizer(tmp_path, family):
    (b, eb), (e, ee) = family["base"], family["ext"]
    recipe, sources, base = setup(tmp_path, {"base_model": str(b), "tokenizer_source": str(e)}, [b, e])
    plan = plan_vocab(recipe, sources, base)
    assert plan.vocab == {t: i for i, t in enumerate(WORDS + ["zeta", "<|im_end|>"])}
    out_base, out_ext = aligned(plan, sources, [0, 1], "lm_head.weight")
    np.testing.assert_array_equal(out_ext, 2 * ee)
    np.testing.assert_array_equal(out_base[: len(WORDS)], 2 * eb)
    np.testing.assert_array_equal(out_base[len(WORDS) :], 2 * ee[len(WORDS) :])


def test_base_tokenizer_is_stripped_of_ids_past_vocab_size(tmp_path):
    from tokenizers import Tokenizer, models

    d = tmp_path / "bpe"
    d.mkdir()
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "bc": 5}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "c"), ("b", "c")]))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "vocab_size": 5}))
    mx.save_safetensors(
        str(d / "model.safetensors"), {"model.embed_tokens.weight": mx.zeros((6, HIDDEN))}, metadata={"format": "pt"}
    )
    recipe, sources, base = setup(tmp_path, {"base_model": str(d), "tokenizer_source": "base"}, [d])
    plan = plan_vocab(recipe, sources, base)
    assert plan.vocab == {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4}
    assert plan.tokenizer("abc")["input_ids"] == [4]


# ---------------- the tokenizer block ----------------


def test_token_sources_zero_model_token_and_force(tmp_path, family):
    (b, eb), (e, ee) = family["base"], family["ext"]
    block = {
        "source": "union",
        "tokens": {
            "<|im_end|>": {"source": {"kind": "zero"}},  # in ext only, but configured: zero for the base
            "fast": {"source": {"kind": "model_token", "model": str(e), "token": "hello"}, "force": True},
            "<new>": {"source": {"kind": "model_token", "model": str(b), "token_id": 2}},
            "<none>": {},  # in no model, no source: zero
        },
    }
    recipe, sources, base = setup(tmp_path, {"base_model": str(b), "tokenizer": block}, [b, e])
    plan = plan_vocab(recipe, sources, base)
    out_base, out_ext = aligned(plan, sources, [0, 1])
    v = plan.vocab
    np.testing.assert_array_equal(out_base[v["<|im_end|>"]], np.zeros(HIDDEN))
    np.testing.assert_array_equal(out_ext[v["<|im_end|>"]], ee[len(WORDS) + 1])  # ext keeps its own row
    for out in (out_base, out_ext):  # forced: every model gets ext's "hello" row
        np.testing.assert_array_equal(out[v["fast"]], ee[WORDS.index("hello")])
        np.testing.assert_array_equal(out[v["<new>"]], eb[2])
        np.testing.assert_array_equal(out[v["<none>"]], np.zeros(HIDDEN))


def test_pad_to_multiple_of_fills_with_each_models_mean_row(tmp_path, family):
    (b, eb), (e, ee) = family["base"], family["ext"]
    recipe, sources, base = setup(
        tmp_path, {"base_model": str(b), "tokenizer": {"source": "base", "pad_to_multiple_of": 16}}, [b, e]
    )
    plan = plan_vocab(recipe, sources, base)
    assert plan.vocab_size == 16 and plan.token_rows == len(WORDS)
    out_base, out_ext = aligned(plan, sources, [0, 1])
    np.testing.assert_allclose(out_base[len(WORDS) :], np.tile(eb.mean(0), (8, 1)), rtol=1e-6)
    np.testing.assert_allclose(out_ext[len(WORDS) :], np.tile(ee[: len(WORDS)].mean(0), (8, 1)), rtol=1e-6)
    config = {"vocab_size": 8}
    plan.update_config(config)
    assert config["vocab_size"] == 16


def test_token_source_must_be_one_of_the_models(tmp_path, family):
    (b, _), (e, _) = family["base"], family["ext"]
    block = {"tokens": {"zeta": {"source": str(tmp_path / "elsewhere")}}}
    recipe, sources, base = setup(tmp_path, {"base_model": str(b), "tokenizer": block}, [b, e])
    with pytest.raises(RecipeError, match="not one of the recipe's models"):
        plan_vocab(recipe, sources, base)


def test_token_id_out_of_range_is_a_recipe_error(tmp_path, family):
    (b, _), (e, _) = family["base"], family["ext"]
    block = {"tokens": {"<x>": {"source": {"kind": "model_token", "model": str(b), "token_id": 99}}}}
    recipe, sources, base = setup(tmp_path, {"base_model": str(b), "tokenizer": block}, [b, e])
    plan = plan_vocab(recipe, sources, base)
    with pytest.raises(RecipeError, match="token_id: 99 is out of range"):
        aligned(plan, sources, [0, 1])


def test_save_writes_a_loadable_tokenizer_with_the_template(tmp_path, family):
    from transformers import AutoTokenizer

    (b, _), (e, _) = family["base"], family["ext"]
    recipe, sources, base = setup(
        tmp_path, {"base_model": str(b), "tokenizer_source": "union", "chat_template": "chatml"}, [b, e]
    )
    plan = plan_vocab(recipe, sources, base)
    plan.save(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok.get_vocab() == plan.vocab
    assert tok.chat_template == CHAT_TEMPLATES["chatml"]


# ---------------- chat templates ----------------


def render(template, messages, **kw):
    import jinja2  # installed with transformers

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders them
    env.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(ValueError(m))
    return env.from_string(template).render(messages=messages, bos_token="<s>", eos_token="</s>", **kw)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@pytest.mark.parametrize(
    "name,expected",
    [
        (
            "chatml",
            (
                "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>assistant\n"
            ),
        ),
        (
            "llama3",
            (
                "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
                "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"
            ),
        ),
        ("mistral", "<s> [INST] Be brief.\n\nHi [/INST] Hello</s>"),
        ("alpaca", "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello"),
        ("exaone", "[|system|]Be brief.[|endofturn|]\n[|user|]Hi\n[|assistant|]Hello[|endofturn|]\n[|assistant|]"),
    ],
)
def test_builtin_templates_render_their_format(name, expected):
    assert render(resolve_chat_template(name), CHAT, add_generation_prompt=True) == expected


def test_alpaca_generation_prompt_after_a_question():
    out = render(CHAT_TEMPLATES["alpaca"], [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert out == "### Instruction:\nHi\n\n### Response:\n"


def test_auto_template_is_the_one_most_models_share(tmp_path):
    a = "{% for m in messages %}A{{ m['content'] }}{% endfor %}"
    c = "{% for m in messages %}C{{ m['content'] }}{% endfor %}"
    paths = [write_model(tmp_path / f"m{i}", WORDS, chat_template=t)[0] for i, t in enumerate([a, c, c, None])]
    sources = [open_model(p) for p in paths]
    assert resolve_chat_template("auto", sources) == c
    assert resolve_chat_template("auto", sources[3:]) is None


def test_literal_template_is_kept_and_bad_names_are_recipe_errors():
    literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(literal) == literal
    with pytest.raises(RecipeError, match="chatml"):
        resolve_chat_template("vicuna")
    with pytest.raises(RecipeError):
        resolve_chat_template("{{ x }}")  # too short to be a template


def test_apply_chat_template_replaces_the_copied_one(tmp_path):
    from transformers import AutoTokenizer

    src, _ = write_model(tmp_path / "m", WORDS, chat_template="{% for m in messages %}old{% endfor %}")
    out = tmp_path / "out"
    out.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_text((src / f).read_text())
    apply_chat_template(out, "llama3", [open_model(src)])
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == CHAT_TEMPLATES["llama3"]
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())


# ---------------- without a tokenizer setting ----------------


def test_rectify_same_sizes_is_a_no_op():
    x = [mx.zeros((8, HIDDEN)), mx.ones((8, HIDDEN))]
    assert rectify_embeddings("model.embed_tokens.weight", x, 0) is x


def test_rectify_different_sizes_is_an_error_naming_the_fix():
    x = [mx.zeros((8, HIDDEN)), mx.ones((10, HIDDEN))]
    with pytest.raises(ModelError, match="tokenizer_source"):
        rectify_embeddings("model.embed_tokens.weight", x, 0)


def test_rectify_truncate_keeps_the_common_rows():
    rows = np.arange(40, dtype=np.float32).reshape(10, HIDDEN)
    out = rectify_embeddings("lm_head.weight", [mx.array(rows[:8]), mx.array(rows)], 0, truncate=True)
    assert [o.shape for o in out] == [(8, HIDDEN), (8, HIDDEN)]
    np.testing.assert_array_equal(np.array(out[1]), rows[:8])


# ---------------- end to end ----------------


def test_union_merge_end_to_end(tmp_path, family):
    from mergekit_mlx import merge

    (b, eb), (e, ee) = family["base"], family["ext"]
    recipe = {
        "merge_method": "linear",
        "base_model": str(b),
        "tokenizer_source": "union",
        "dtype": "float32",
        "models": [{"model": str(b), "parameters": {"weight": 0.25}}, {"model": str(e), "parameters": {"weight": 0.75}}],
    }
    result = merge(recipe)
    out = np.array(result.weights["model.embed_tokens.weight"]).astype(np.float64)
    n = len(WORDS)
    np.testing.assert_allclose(out[:n], 0.25 * eb + 0.75 * ee[:n], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[n:], ee[n:], rtol=1e-6, atol=1e-6)  # the base's rows of new tokens are ext's
