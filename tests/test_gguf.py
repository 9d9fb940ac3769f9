"""GGUF in and out: round trips per tensor type, what the `gguf` package's reader sees in files
written here, files written the way llama.cpp writes them, and the tokenizer both ways.

Error bounds and layouts are derived here from the GGUF block definitions (float64 numpy), and
names from the `gguf` package's own tensor-name map, never from the code under test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from format_models import bpe_tokenizer_json, f64, tiny_model  # noqa: E402

from mergekit_mlx.errors import ModelError  # noqa: E402
from mergekit_mlx.formats import open_model  # noqa: E402
from mergekit_mlx.formats.base import OutputTensor, WriteOptions  # noqa: E402
from mergekit_mlx.formats.gguf import (
    ARCHITECTURES,
    GGUFModel,
    GGUFWriter,
    add_tokenizer,
    can_dequantize,
    gguf_tensor,
    hf_names_for,
    rope_permutation,
)  # noqa: E402

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("gguf") / "base", seed=2)


def write_gguf(src_path: Path, out_dir: Path, fmt: str, order=None) -> Path:
    src = open_model(src_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = [OutputTensor(n, src.info(n).shape, mx.float32) for n in src.tensor_names()]
    w = GGUFWriter(out_dir, tensors, src.config, fmt, WriteOptions(tokenizer_dir=src.tokenizer_dir))
    for n in order or src.tensor_names():
        w.add(n, src.load(n))
    w.finish()
    return out_dir / "model.gguf"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute for Q (n_head heads) and K (n_kv_head heads)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# names and layout


def test_tensor_names_match_the_gguf_package_map(model):
    names = list(model.weights) + ["model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.k_norm.weight"]
    for model_type in ("llama", "qwen3"):
        spec = ARCHITECTURES[model_type]
        table = gguf.get_tensor_name_map(spec.arch, 2)
        for name in names:
            expected = table.get_name(name, try_suffixes=(".weight", ".bias"))
            if expected is None:
                continue
            assert gguf_tensor(spec, name, 2).name == expected
            assert hf_names_for(spec, expected, 2) == [name]
    assert gguf_tensor(ARCHITECTURES["llama"], "model.layers.0.self_attn.rotary_emb.inv_freq", 2) is None


@pytest.mark.parametrize("rows,heads", [(256, 4), (128, 2), (64, 8)])
def test_rope_permutation_is_the_llama_cpp_row_order(rows, heads):
    w = np.random.default_rng(rows).normal(size=(rows, 3))
    assert np.array_equal(w[rope_permutation(rows, heads)], llama_cpp_permute(w, heads))


# ---------------------------------------------------------------------------------------------
# round trips HF -> GGUF -> HF


def block_absmax(w: np.ndarray, block: int = 32) -> np.ndarray:
    g = np.abs(w).reshape(*w.shape[:-1], -1, block).max(-1, keepdims=True)
    return np.broadcast_to(g, (*w.shape[:-1], w.shape[-1] // block, block)).reshape(w.shape)


def error_bound(qtype: Q, w: np.ndarray) -> np.ndarray:
    """Largest |dequantized - w| each GGUF type allows (f16 block scales included)."""
    if qtype == Q.F32:
        return np.zeros_like(w)
    if qtype == Q.F16:
        return np.abs(w) * 2**-11 + 2**-24
    if qtype == Q.BF16:
        return np.abs(w) * 2**-8
    if qtype == Q.Q8_0:  # d = amax/127 in f16, codes round to nearest
        return block_absmax(w) * (0.5 / 127 + 2**-11) * 1.001
    if qtype == Q.Q4_0:  # d = -max/8 in f16, codes 0..15; the top code clips, so up to a full step
        return block_absmax(w) / 8 * (1 + 8 * 2**-11) * 1.001
    raise AssertionError(qtype)


# the type every tensor of the tiny model must have, per format (llama.cpp's converter rules)
def expected_type(fmt: str, gguf_tensor: str) -> Q:
    target = {
        "gguf-f16": Q.F16,
        "gguf-bf16": Q.BF16,
        "gguf-q8_0": Q.Q8_0,
        "gguf-q4_0": Q.Q4_0,
        "gguf-tq1_0": Q.TQ1_0,
        "gguf-tq2_0": Q.TQ2_0,
    }[fmt]
    if gguf_tensor.endswith("_norm.weight"):
        return Q.F32
    if gguf_tensor in ("token_embd.weight", "output.weight") and target in (Q.TQ1_0, Q.TQ2_0):
        return Q.F16
    if gguf_tensor == "output.weight" and target == Q.Q4_0:
        return Q.Q8_0
    return target


@pytest.mark.parametrize("fmt", ["gguf-f16", "gguf-bf16", "gguf-q8_0", "gguf-q4_0", "gguf-tq1_0", "gguf-tq2_0"])
def test_gguf_round_trip_is_within_the_type_error(model, tmp_path, fmt):
    path = write_gguf(model.path, tmp_path, fmt)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    back = GGUFModel(path)
    assert sorted(back.tensor_names()) == sorted(model.weights)
    for name, w in model.weights.items():
        qtype = types[gguf_tensor(ARCHITECTURES["llama"], name, 2).name]
        assert qtype == expected_type(fmt, gguf_tensor(ARCHITECTURES["llama"], name, 2).name), name
        got = f64(back.load(name))
        if qtype in (Q.TQ1_0, Q.TQ2_0):
            # absmean ternary per tensor (BitNet b1.58), stored exactly up to the f16 block scale
            s = np.abs(w).mean()
            codes = np.clip(np.round(w / s), -1, 1)
            tie = np.abs(np.abs(w) / s - 0.5) < 1e-4
            ok = (np.abs(got - codes * s) <= s * 2**-11) | tie
            assert ok.all(), name
        else:
            assert np.all(np.abs(got - w) <= error_bound(qtype, w)), name


def test_gguf_file_as_the_gguf_package_reads_it(model, tmp_path):
    path = write_gguf(model.path, tmp_path, "gguf-q8_0")
    r = gguf.GGUFReader(path)

    def field(key):
        return r.get_field(key).contents()

    cfg = model.config
    assert field("general.architecture") == "llama"
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert field("general.quantization_version") == gguf.GGML_QUANT_VERSION
    assert field("llama.block_count") == cfg["num_hidden_layers"]
    assert field("llama.context_length") == cfg["max_position_embeddings"]
    assert field("llama.embedding_length") == cfg["hidden_size"]
    assert field("llama.feed_forward_length") == cfg["intermediate_size"]
    assert field("llama.attention.head_count") == cfg["num_attention_heads"]
    assert field("llama.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert field("llama.rope.dimension_count") == cfg["hidden_size"] // cfg["num_attention_heads"]
    assert field("llama.vocab_size") == cfg["vocab_size"]
    assert field("llama.rope.freq_base") == pytest.approx(cfg["rope_theta"])
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])
    # the tokenizer, as llama.cpp reads a byte-level BPE vocabulary
    tj = json.loads(bpe_tokenizer_json(cfg["vocab_size"]))
    assert field("tokenizer.ggml.model") == "gpt2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == cfg["vocab_size"]
    assert all(tokens[i] == t for t, i in tj["model"]["vocab"].items())
    assert field("tokenizer.ggml.merges")[:3] == [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"][:3]]
    assert field("tokenizer.ggml.bos_token_id") == tj["model"]["vocab"]["<s>"]
    assert field("tokenizer.ggml.eos_token_id") == tj["model"]["vocab"]["</s>"]
    assert field("tokenizer.ggml.token_type")[tj["model"]["vocab"]["<s>"]] == gguf.TokenType.CONTROL
    # every tensor under llama.cpp's name, with its logical shape reversed (ggml order), aligned
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    expected = {table.get_name(n, try_suffixes=(".weight",)): w.shape for n, w in model.weights.items()}
    assert {t.name: tuple(reversed(t.shape.tolist())) for t in r.tensors} == expected
    assert all(t.data_offset % 32 == 0 for t in r.tensors)


def test_gguf_q_and_k_are_stored_in_llama_cpp_row_order(model, tmp_path):
    path = write_gguf(model.path, tmp_path, "gguf-f16")
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    cfg = model.config
    for hf, heads in (("self_attn.q_proj", cfg["num_attention_heads"]), ("self_attn.k_proj", cfg["num_key_value_heads"])):
        w = model.weights[f"model.layers.1.{hf}.weight"]
        t = stored[gguf_tensor(ARCHITECTURES["llama"], f"model.layers.1.{hf}.weight", 2).name]
        got = np.asarray(t.data, np.float64).reshape(w.shape)
        assert np.allclose(got, llama_cpp_permute(w, heads), rtol=2**-11, atol=2**-24)


def test_tensors_arriving_in_any_order_give_the_same_file(model, tmp_path):
    src = open_model(model.path)
    first = write_gguf(model.path, tmp_path / "a" / "m", "gguf-q4_0")
    second = write_gguf(model.path, tmp_path / "b" / "m", "gguf-q4_0", order=list(reversed(src.tensor_names())))
    assert first.read_bytes() == second.read_bytes()


def test_tied_embeddings_have_no_output_tensor(tmp_path):
    shapes_model = tiny_model(tmp_path / "t", seed=3, extra_config={"tie_word_embeddings": True})
    weights = {k: v for k, v in shapes_model.weights.items() if k != "lm_head.weight"}
    tied = tiny_model(tmp_path / "tied", weights=weights, extra_config={"tie_word_embeddings": True})
    path = write_gguf(tied.path, tmp_path / "g", "gguf-f16")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(path).tensors}
    assert GGUFModel(path).config["tie_word_embeddings"] is True


def test_llama3_rope_scaling_goes_out_as_rope_freqs_and_comes_back(tmp_path):
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    m = tiny_model(tmp_path / "m", seed=4, extra_config={"rope_scaling": rope, "rope_theta": 500000.0})
    path = write_gguf(m.path, tmp_path / "g", "gguf-f16")
    freqs = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight")
    # Llama 3's rule: low frequencies divided by factor, high kept, a smooth ramp between
    head_dim = m.config["hidden_size"] // m.config["num_attention_heads"]
    wavelen = 2 * np.pi * 500000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    expected = np.where(wavelen < 8192 / 4.0, 1.0, np.where(wavelen > 8192 / 1.0, 8.0, 1 / ((1 - smooth) / 8.0 + smooth)))
    assert np.allclose(np.asarray(freqs.data), expected, rtol=1e-6)
    assert GGUFModel(path).config["rope_scaling"] == rope


# ---------------------------------------------------------------------------------------------
# RoPE from either config style: transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`)


def llama_cpp_rope_freqs(head_dim: int, theta: float, factor: float, low: float, high: float, old_ctx: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, step by step (float32 frequencies,
    as its torch code has them)."""
    freqs = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    low_freq_wavelen, high_freq_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = np.float32(2 * np.pi) / freq
        if wavelen < high_freq_wavelen:
            out.append(1.0)
        elif wavelen > low_freq_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def two_styles(tmp_path: Path, model_type: str, theta: float, scaling: dict | None) -> tuple[Path, Path]:
    """The same tiny model twice: its config as transformers 4 writes it, and as transformers 5 does."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    t4 = {"model_type": model_type, "architectures": [arch], "rope_theta": theta, "rope_scaling": scaling}
    m4 = tiny_model(tmp_path / f"{model_type}-t4", seed=7, extra_config=t4)
    m5 = tiny_model(
        tmp_path / f"{model_type}-t5", weights=m4.weights, extra_config={"model_type": model_type, "architectures": [arch]}
    )
    config = json.loads((m5.path / "config.json").read_text())
    del config["rope_theta"]
    config["rope_parameters"] = {"rope_theta": theta, **(scaling or {"rope_type": "default"})}
    (m5.path / "config.json").write_text(json.dumps(config, indent=2))
    return m4.path, m5.path


def convert_to_gguf(src: Path, out: Path) -> Path:
    from mergekit_mlx.cli import main

    assert main(["convert", str(src), str(out), "--out-format", "gguf-f16"]) == 0
    return out


def gguf_fields(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if f.types and not k.startswith("GGUF.") and k != "general.name"}


LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize(
    "model_type, theta, scaling, expected",
    [
        ("qwen2", 1e6, None, {}),
        ("llama", 500000.0, LLAMA31_ROPE, {}),
        ("llama", 1e6, {"rope_type": "linear", "factor": 2.0}, {"rope.scaling.type": "linear", "rope.scaling.factor": 2.0}),
        (
            "qwen2",
            1e6,
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
            {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 128},
        ),
    ],
    ids=["qwen2-theta", "llama3.1", "linear", "yarn"],
)
def test_both_config_styles_give_the_same_gguf_rope(tmp_path, model_type, theta, scaling, expected):
    t4, t5 = two_styles(tmp_path, model_type, theta, scaling)
    g4, g5 = convert_to_gguf(t4, tmp_path / "t4.gguf"), convert_to_gguf(t5, tmp_path / "t5.gguf")
    fields = gguf_fields(g5)
    assert fields == gguf_fields(g4)
    assert fields[f"{model_type}.rope.freq_base"] == theta  # a float32 field; both thetas are exact in float32
    for key, value in expected.items():
        assert fields[f"{model_type}.{key}"] == pytest.approx(value)
    assert {k.split(".", 1)[1] for k in fields if ".rope.scaling." in k} == set(expected)

    def rope_freqs(path):
        return next((np.asarray(t.data) for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight"), None)

    f4, f5 = rope_freqs(g4), rope_freqs(g5)
    if scaling is None or scaling["rope_type"] != "llama3":
        assert f4 is None and f5 is None
        return
    assert f4 is not None and f5 is not None and np.array_equal(f4, f5)
    head_dim = 256 // 4  # tiny_model's hidden size / heads
    expected_freqs = llama_cpp_rope_freqs(head_dim, theta, 8.0, 1.0, 4.0, 8192)
    assert (
        1.0 in expected_freqs and 8.0 in expected_freqs and ((expected_freqs > 1) & (expected_freqs < 8)).any()
    )  # all three bands
    assert np.allclose(f5, expected_freqs, rtol=1e-6)
    assert GGUFModel(g5).config["rope_scaling"] == GGUFModel(g4).config["rope_scaling"] == LLAMA31_ROPE


@pytest.mark.parametrize(
    "config",
    [
        {"rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}},
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}},
        {
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            }
        },
        {"text_config": {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}}},
    ],
    ids=["transformers-4", "transformers-5", "per-attention-type", "text_config"],
)
def test_rope_settings_read_either_config_style(config):
    from mergekit_mlx.mlx_lm_config import rope_settings

    assert rope_settings(config) == (1e6, {"rope_type": "linear", "type": "linear", "factor": 2.0})


def test_rope_settings_default_rope():
    from mergekit_mlx.mlx_lm_config import rope_settings

    assert rope_settings({}) == (None, None)
    assert rope_settings({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}) == (1e6, None)
    assert rope_settings({"rope_theta": 1e6, "rope_scaling": None}) == (1e6, None)


# ---------------------------------------------------------------------------------------------
# files written the way llama.cpp writes them


def llama_cpp_style_file(path: Path, tensors: dict[str, tuple[np.ndarray, Q]], heads=4, kv_heads=2, hidden=256, layers=1):
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_context_length(1024)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(512)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_reader_undoes_the_llama_cpp_rope_permutation(tmp_path):
    rng = np.random.default_rng(5)
    q = rng.normal(size=(256, 256)).astype(np.float32)
    k = rng.normal(size=(128, 256)).astype(np.float32)
    llama_cpp_style_file(
        tmp_path / "m.gguf",
        {"blk.0.attn_q.weight": (llama_cpp_permute(q, 4), Q.F32), "blk.0.attn_k.weight": (llama_cpp_permute(k, 2), Q.F32)},
    )
    m = GGUFModel(tmp_path / "m.gguf")
    assert np.array_equal(np.array(m.load("model.layers.0.self_attn.q_proj.weight")), q)
    assert np.array_equal(np.array(m.load("model.layers.0.self_attn.k_proj.weight")), k)
    assert m.config["num_key_value_heads"] == 2 and m.config["rms_norm_eps"] == pytest.approx(1e-6)


DECODABLE = [
    t
    for t in Q
    if t not in (Q.F32, Q.F16) and t in gguf.GGML_QUANT_SIZES and 256 % gguf.GGML_QUANT_SIZES[t][0] == 0 and can_dequantize(t)
]


def test_the_installed_gguf_package_decodes_the_types_the_issue_names():
    names = {t.name for t in DECODABLE}
    wanted = {
        "BF16",
        "Q4_0",
        "Q4_1",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ2_S",
        "IQ3_XXS",
        "IQ3_S",
        "IQ1_S",
        "IQ1_M",
        "IQ4_NL",
        "IQ4_XS",
        "TQ1_0",
        "TQ2_0",
        "MXFP4",
    }
    assert wanted <= names


@pytest.mark.parametrize("qtype", DECODABLE, ids=lambda t: t.name)
def test_reader_loads_every_type_as_the_gguf_package_decodes_it(tmp_path, qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, (4, 256 // block * size), dtype=np.uint8)
    if qtype != Q.BF16:
        # keep f16 block scales finite and small: random bytes would often spell NaN or Inf
        raw = raw & np.uint8(0x3B)
    else:
        raw = (
            np.frombuffer(rng.normal(size=(4, 256)).astype(np.float32).tobytes(), np.uint16)[1::2]
            .reshape(4, 256)
            .copy()
            .view(np.uint8)
        )
    llama_cpp_style_file(
        tmp_path / "m.gguf", {"blk.0.ffn_up.weight": (raw, qtype), "blk.0.attn_k.weight": (np.tile(raw, (32, 1)), qtype)}
    )
    m = GGUFModel(tmp_path / "m.gguf")
    expected = gguf.quants.dequantize(raw, qtype).astype(np.float64)
    assert m.info("model.layers.0.mlp.up_proj.weight").shape == (4, 256)
    assert np.array_equal(f64(m.load("model.layers.0.mlp.up_proj.weight")), expected, equal_nan=True)
    k = gguf.quants.dequantize(np.tile(raw, (32, 1)), qtype).astype(np.float64)
    unpermuted = k[np.argsort(rope_permutation(128, 2))]
    assert np.array_equal(f64(m.load("model.layers.0.self_attn.k_proj.weight")), unpermuted, equal_nan=True)


def test_reader_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 8)
    with pytest.raises(ModelError, match="bad.gguf"):
        open_model(tmp_path / "bad.gguf")
    w = gguf.GGUFWriter(tmp_path / "bert.gguf", "bert")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="architecture 'bert'"):
        open_model(tmp_path / "bert.gguf")


# ---------------------------------------------------------------------------------------------
# tokenizers


def vocab_only_gguf(path: Path, tok_dir: Path, vocab_size: int) -> Path:
    """A GGUF whose tokenizer is only llama.cpp's vocabulary keys (no tokenizer.json copy)."""
    w = gguf.GGUFWriter(path, "llama")
    for k, v in (("block_count", 1), ("embedding_length", 256), ("attention.head_count", 4)):
        w.add_uint32(f"llama.{k}", v)
    add_tokenizer(w, tok_dir, vocab_size)
    del w.kv_data[0][gguf.Keys.Tokenizer.HF_JSON]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


TEXTS = ["the quick brown fox", " jumps over  the lazy dog!", "héllo wörld 123", "green\nhills"]


def test_byte_level_tokenizer_rebuilt_from_vocabulary_keys(model, tmp_path):
    from tokenizers import Tokenizer

    original = Tokenizer.from_file(str(model.path / "tokenizer.json"))
    m = GGUFModel(vocab_only_gguf(tmp_path / "v.gguf", model.path, model.config["vocab_size"]))
    rebuilt = Tokenizer.from_file(str(m.tokenizer_dir / "tokenizer.json"))
    for text in TEXTS:
        assert rebuilt.encode(text).ids == original.encode(text).ids, text
        assert rebuilt.decode(rebuilt.encode(text).ids) == text
    cfg = json.loads((m.tokenizer_dir / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<s>" and cfg["eos_token"] == "</s>"


def sentencepiece_style_tokenizer(path: Path) -> None:
    """A Llama-2-style tokenizer.json: BPE with byte fallback, spaces as U+2581, a prepended space."""
    from format_models import WORDS
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    rng = np.random.default_rng(1)
    tok.train_from_iterator([" ".join(rng.choice(WORDS, 10)) for _ in range(200)], trainer)
    tj = json.loads(tok.to_str())
    # as in Llama 2, the byte tokens are ordinary vocabulary entries, not added special tokens
    tj["added_tokens"] = [a for a in tj["added_tokens"] if not a["content"].startswith("<0x")]
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(tj))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def test_sentencepiece_style_tokenizer_goes_out_as_llama_vocabulary_and_back(tmp_path):
    from tokenizers import Tokenizer

    sentencepiece_style_tokenizer(tmp_path / "tok")
    original = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    path = vocab_only_gguf(tmp_path / "v.gguf", tmp_path / "tok", 0)
    r = gguf.GGUFReader(path)
    assert r.get_field("tokenizer.ggml.model").contents() == "llama"
    types = r.get_field("tokenizer.ggml.token_type").contents()
    assert types[original.token_to_id("<0x41>")] == gguf.TokenType.BYTE
    assert types[original.token_to_id("<unk>")] == gguf.TokenType.UNKNOWN
    rebuilt = Tokenizer.from_file(str(GGUFModel(path).tokenizer_dir / "tokenizer.json"))
    for text in TEXTS + ["€ unseen ✓"]:
        assert rebuilt.encode(text, add_special_tokens=False).ids == original.encode(text).ids, text
        assert rebuilt.decode(rebuilt.encode(text, add_special_tokens=False).ids) == original.decode(original.encode(text).ids)


def test_character_tokenizer_goes_out_as_llama_vocabulary_without_prefix_space(tmp_path):
    from tokenizers import Tokenizer, decoders, models, processors

    chars = ["<pad>", "<s>", "</s>", "<unk>"] + list(" abcdefghijklmnopqrstuvwxyz0123456789+=\n")
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(chars[:4])
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    )
    path = vocab_only_gguf(tmp_path / "v.gguf", tmp_path / "tok", 0)
    r = gguf.GGUFReader(path)
    assert r.get_field("tokenizer.ggml.model").contents() == "llama"
    assert r.get_field("tokenizer.ggml.add_space_prefix").contents() is False
    assert r.get_field("tokenizer.ggml.tokens").contents()[4] == "\u2581"  # SentencePiece's space
    rebuilt = Tokenizer.from_file(str(GGUFModel(path).tokenizer_dir / "tokenizer.json"))
    for text in ["12+34=46", "hello world\nok"]:
        assert rebuilt.encode(text).ids == tok.encode(text).ids, text
        assert rebuilt.decode(rebuilt.encode(text, add_special_tokens=False).ids) == text


def test_gguf_keeps_the_tokenizer_json_for_an_exact_rebuild(model, tmp_path):
    path = write_gguf(model.path, tmp_path, "gguf-f16")
    m = GGUFModel(path)
    assert (m.tokenizer_dir / "tokenizer.json").read_text() == (model.path / "tokenizer.json").read_text()


# ---------------------------------------------------------------------------------------------
# merging into GGUF


def test_merge_writes_gguf_output_and_convert_reads_it(model, tmp_path):
    from mergekit_mlx import merge

    rng = np.random.default_rng(6)
    other = tiny_model(tmp_path / "other", weights={k: v + rng.normal(0, 0.01, v.shape) for k, v in model.weights.items()})
    recipe = {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [
            {"model": str(model.path), "parameters": {"weight": 0.5}},
            {"model": str(other.path), "parameters": {"weight": 0.5}},
        ],
    }
    result = merge(recipe, tmp_path / "out", out_format="gguf-q8_0")
    files = sorted(p.name for p in Path(result.path).glob("*.gguf"))
    assert files == ["model.gguf"]
    back = open_model(result.path)
    w = 0.5 * model.weights["model.layers.0.mlp.up_proj.weight"] + 0.5 * other.weights["model.layers.0.mlp.up_proj.weight"]
    got = f64(back.load("model.layers.0.mlp.up_proj.weight"))
    assert np.all(np.abs(got - w) <= error_bound(Q.Q8_0, w) + 1e-7)


def test_the_gguf_out_formats_listed_for_the_registry_are_the_writers_own():
    from mergekit_mlx.formats import gguf as gguf_format
    from mergekit_mlx.formats.gguf import quants

    assert gguf_format.OUT_FORMATS == tuple(quants.OUT_TYPES)
    assert gguf_format.GGUFWriter.out_formats == gguf_format.OUT_FORMATS


def test_a_merge_to_safetensors_never_imports_the_gguf_package(family, tmp_path):
    """The gguf package is slow to import (a fifth of a second on a GPU host): only GGUF inputs and
    outputs load it."""
    import subprocess
    import sys

    import yaml

    recipe = tmp_path / "r.yml"
    recipe.write_text(
        yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in family]})
    )
    code = (
        "import sys; from mergekit_mlx.cli import main; "
        f"rc = main(['run', {str(recipe)!r}, {str(tmp_path / 'out')!r}, '--no-progress']); "
        "print(rc, 'gguf' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0", "False"], done.stdout + done.stderr
