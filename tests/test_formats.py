"""Formats in and out: MLX-quantized directories, BitNet b1.58 packing, BitDelta, the convert command,
and a recipe that merges a GGUF file with an MLX-quantized directory.

Reference values are computed here in float64 numpy from the format definitions, never taken from
the code under test. GGUF has its own file, tests/test_gguf.py; both build their tiny models with
tests/format_models.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from format_models import f64, tiny_model  # noqa: E402

from mergekit_mlx.convert import convert  # noqa: E402
from mergekit_mlx.convert import main as convert_main
from mergekit_mlx.errors import ModelError, RecipeError  # noqa: E402
from mergekit_mlx.formats import open_model  # noqa: E402
from mergekit_mlx.formats.base import OutputTensor, WriteOptions  # noqa: E402
from mergekit_mlx.formats.bitdelta import pack_signs, unpack_signs  # noqa: E402
from mergekit_mlx.formats.bitnet import BitNetModel, BitNetWriter  # noqa: E402
from mergekit_mlx.formats.mlx_quant import MLXQuantizedModel, QuantizedWriter  # noqa: E402
from mergekit_mlx.kernels.bitlinear import pack_ternary, unpack_ternary  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    return tiny_model(root / "base", seed=0)


def write_all(writer_cls, src, out: Path, *args, **kw):
    out.mkdir(parents=True, exist_ok=True)
    tensors = [OutputTensor(n, src.info(n).shape, mx.float32) for n in src.tensor_names()]
    w = writer_cls(out, tensors, src.config, *args, **kw)
    for n in src.tensor_names():
        w.add(n, src.load(n))
    w.finish()
    return w


# ---------------------------------------------------------------------------------------------
# MLX-quantized


def affine_error_bound(w: np.ndarray, group: int, bits: int) -> np.ndarray:
    """Largest error of affine quantisation per element: one step of its group's range.

    (Half a step if the grid ran from min to max; mx.quantize shifts it so the edge of larger
    magnitude is exact, which can cost up to another half step.)
    """
    g = w.reshape(*w.shape[:-1], -1, group)
    step = (g.max(-1, keepdims=True) - g.min(-1, keepdims=True)) / (2**bits - 1)
    return np.broadcast_to(step, g.shape).reshape(w.shape)


@pytest.mark.parametrize("fmt,bits,group", [("mlx-q4", 4, 64), ("mlx-q8", 8, 64), ("mlx-q4", 4, 32)])
def test_mlx_quantized_round_trip_is_within_affine_error(model, tmp_path, fmt, bits, group):
    src = open_model(model.path)
    write_all(QuantizedWriter, src, tmp_path / "q", fmt, WriteOptions(group_size=group))
    q = open_model(tmp_path / "q")
    assert isinstance(q, MLXQuantizedModel)
    assert sorted(q.tensor_names()) == sorted(model.weights)
    for name, ref in model.weights.items():
        got = f64(q.load(name))
        assert got.shape == ref.shape
        if ref.ndim == 2:
            assert np.all(np.abs(got - ref) <= affine_error_bound(ref, group, bits) * 1.001 + 1e-6), name
        else:
            assert np.array_equal(got, ref.astype(np.float32)), name  # norms are not quantized


def test_mlx_quantized_config_is_mlx_lm_style(model, tmp_path):
    src = open_model(model.path)
    write_all(QuantizedWriter, src, tmp_path / "q", "mlx-q4", WriteOptions(group_size=32))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert cfg["quantization_config"] == cfg["quantization"]
    raw = mx.load(str(tmp_path / "q" / "model.safetensors"))
    w = raw["model.layers.0.mlp.up_proj.weight"]
    assert w.dtype == mx.uint32 and w.shape == (model.config["intermediate_size"], model.config["hidden_size"] * 4 // 32)
    assert raw["model.layers.0.mlp.up_proj.scales"].shape == (
        model.config["intermediate_size"],
        model.config["hidden_size"] // 32,
    )
    assert "model.norm.scales" not in raw and raw["model.norm.weight"].dtype == mx.float32


def test_mlx_mxfp4_output_uses_shared_exponent_scales(model, tmp_path):
    src = open_model(model.path)
    write_all(QuantizedWriter, src, tmp_path / "q", "mlx-mxfp4")
    raw = mx.load(str(tmp_path / "q" / "model.safetensors"))
    assert raw["model.layers.0.self_attn.q_proj.scales"].dtype == mx.uint8
    assert "model.layers.0.self_attn.q_proj.biases" not in raw
    got = f64(open_model(tmp_path / "q").load("model.layers.0.self_attn.q_proj.weight"))
    ref = model.weights["model.layers.0.self_attn.q_proj.weight"]
    # e2m1 keeps 1 mantissa bit: within a group, error is at most a quarter of the group's max |w|
    group_max = np.abs(ref.reshape(ref.shape[0], -1, 32)).max(-1, keepdims=True)
    assert np.all(np.abs(got - ref).reshape(ref.shape[0], -1, 32) <= group_max / 4 + 1e-6)


def test_mlx_quantized_group_size_must_suit_the_mode(model, tmp_path):
    src = open_model(model.path)
    tensors = [OutputTensor(n, src.info(n).shape, mx.float32) for n in src.tensor_names()]
    with pytest.raises(RecipeError, match="group-size"):
        QuantizedWriter(tmp_path, tensors, src.config, "mlx-mxfp4", WriteOptions(group_size=64))


def test_mlx_quantized_output_loads_and_generates_in_mlx_lm(model, tmp_path):
    from mlx_lm import generate, load

    convert(model.path, tmp_path / "q4", "mlx-q4")
    m, tok = load(str(tmp_path / "q4"))
    assert type(m.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    text = generate(m, tok, prompt="the quick", max_tokens=4)
    assert isinstance(text, str) and len(tok.encode(text, add_special_tokens=False)) >= 1


@pytest.mark.parametrize(
    "mode,bits,group",
    [
        ("affine", 2, 32),
        ("affine", 3, 64),
        ("affine", 5, 64),
        ("affine", 6, 128),
        ("mxfp4", 4, 32),
        ("mxfp8", 8, 32),
        ("nvfp4", 4, 16),
    ],
)
def test_mlx_quantized_reader_reads_every_mode(tmp_path, mode, bits, group):
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.1, (8, 128)).astype(np.float32)
    parts = mx.quantize(mx.array(w), group_size=group, bits=bits, mode=mode)
    arrays = {"model.layers.0.mlp.up_proj.weight": parts[0], "model.layers.0.mlp.up_proj.scales": parts[1]}
    if mode == "affine":
        arrays["model.layers.0.mlp.up_proj.biases"] = parts[2]
    arrays["model.norm.weight"] = mx.ones((128,))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), arrays, metadata={"format": "mlx"})
    block = {"group_size": group, "bits": bits, "mode": mode}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization": block, "num_hidden_layers": 1}))
    q = open_model(tmp_path)
    assert sorted(q.tensor_names()) == ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
    assert q.info("model.layers.0.mlp.up_proj.weight").shape == (8, 128)
    assert "quantization" not in q.config
    got = f64(q.load("model.layers.0.mlp.up_proj.weight"))
    # the format's own decoder is the definition of what the packed bytes mean
    expected = f64(mx.dequantize(*parts[:2], parts[2] if mode == "affine" else None, group_size=group, bits=bits, mode=mode))
    assert np.array_equal(got, expected)
    rel = np.abs(got - w).max() / np.abs(w).max()
    assert rel < {2: 0.7, 3: 0.3, 4: 0.3, 5: 0.1, 6: 0.05, 8: 0.1}[bits]


def test_mlx_quantized_reader_names_inconsistent_config(tmp_path):
    parts = mx.quantize(mx.zeros((8, 128)), group_size=64, bits=4)
    arrays = {"a.weight": parts[0], "a.scales": parts[1], "a.biases": parts[2]}
    mx.save_safetensors(str(tmp_path / "model.safetensors"), arrays, metadata={"format": "mlx"})
    (tmp_path / "config.json").write_text(json.dumps({"quantization": {"group_size": 64, "bits": 8}}))
    with pytest.raises(ModelError, match="a.weight"):
        open_model(tmp_path)


# ---------------------------------------------------------------------------------------------
# BitNet b1.58


def hf_pack_reference(codes: np.ndarray) -> np.ndarray:
    """The Hugging Face / mlx-lm layout: byte (r, c) holds rows r, r+R, r+2R, r+3R in bits 0-1, 2-3, 4-5, 6-7
    as code = ternary + 1; bits of rows past the last are zero."""
    out = codes.shape[0]
    rows = -(-out // 4)
    u = np.zeros((rows * 4, codes.shape[1]), np.int64)
    u[:out] = codes + 1
    return sum((u[k * rows : (k + 1) * rows] << (2 * k)) for k in range(4)).astype(np.uint8)


@pytest.mark.parametrize("out_features", [8, 12, 10])
def test_ternary_pack_then_unpack_is_exact(out_features):
    codes = np.random.default_rng(out_features).integers(-1, 2, (out_features, 24))
    packed = pack_ternary(mx.array(codes.astype(np.int8)))
    assert np.array_equal(np.array(packed), hf_pack_reference(codes))
    back = np.array(unpack_ternary(packed, out_features))
    assert np.array_equal(back, codes)


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
def test_bitnet_reader_applies_weight_scale_by_linear_class(tmp_path, linear_class):
    rng = np.random.default_rng(3)
    codes = rng.integers(-1, 2, (16, 32))
    scale = 0.37
    mx.save_safetensors(
        str(tmp_path / "model.safetensors"),
        {
            "model.layers.0.mlp.up_proj.weight": mx.array(hf_pack_reference(codes)),
            "model.layers.0.mlp.up_proj.weight_scale": mx.array([scale], mx.bfloat16),
            "model.norm.weight": mx.ones((32,), mx.bfloat16),
        },
        metadata={"format": "pt"},
    )
    cfg = {
        "model_type": "bitnet",
        "num_hidden_layers": 1,
        "quantization_config": {"quant_method": "bitnet", "linear_class": linear_class},
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = open_model(tmp_path)
    assert isinstance(m, BitNetModel)
    assert m.tensor_names() == ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
    s = float(np.float32(mx.array(scale, mx.bfloat16).astype(mx.float32)))
    expected = codes * s if linear_class == "autobitlinear" else codes / s
    got = f64(m.load("model.layers.0.mlp.up_proj.weight"))
    assert m.info("model.layers.0.mlp.up_proj.weight").dtype == "BF16"
    assert np.allclose(got, expected, rtol=2**-8, atol=0)


def absmean_reference(w: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """BitNet b1.58: codes round(w / s) clipped to [-1, 1] with s = mean|w|; also where a code is
    a near tie (|w| / s within 1e-4 of 0.5), which a float32 mean may round either way."""
    s = max(np.abs(w).mean(), 1e-5)
    return np.clip(np.round(w / s), -1, 1), s, np.abs(np.abs(w) / s - 0.5) < 1e-4


def assert_ternary_close(got: np.ndarray, w: np.ndarray) -> None:
    codes, s, tie = absmean_reference(w)
    scale = np.abs(got).max()
    assert abs(scale - s) <= 1e-4 * s  # one scale per tensor, float32-accumulated mean
    assert np.all((np.round(got / scale) == codes) | tie)


def test_bitnet_writer_ternarises_decoder_linears_only(model, tmp_path):
    src = open_model(model.path)
    write_all(BitNetWriter, src, tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "bitnet" and qc["linear_class"] == "bitlinear"
    assert qc["modules_to_not_convert"] == ["lm_head"]
    raw = mx.load(str(tmp_path / "b" / "model.safetensors"))
    assert raw["model.layers.1.mlp.down_proj.weight"].dtype == mx.uint8
    assert raw["model.embed_tokens.weight"].dtype == mx.float32 and raw["lm_head.weight"].dtype == mx.float32
    back = open_model(tmp_path / "b")
    for name, ref in model.weights.items():
        got = f64(back.load(name))
        if name.startswith("model.layers.") and ref.ndim == 2:
            assert_ternary_close(got, ref)
        else:
            assert np.array_equal(got, ref.astype(np.float32)), name


def test_bitnet_output_loads_in_mlx_lm_and_generates_with_portable_bitlinear(model, tmp_path):
    from mlx_lm import generate, load

    from mergekit_mlx.kernels.bitlinear import use_portable_bitlinear

    convert(model.path, tmp_path / "b", "bitnet")
    m, tok = load(str(tmp_path / "b"))
    layer = m.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "BitLinear" and layer.invert_weight_scales
    assert type(m.lm_head).__name__ == "Linear"
    w = model.weights["model.layers.0.self_attn.q_proj.weight"]
    codes, _, tie = absmean_reference(w)
    packed = np.array(layer.weight)
    assert packed.shape == (w.shape[0] // 4, w.shape[1])
    assert np.all((packed == hf_pack_reference(codes.astype(np.int64))) | tie.reshape(4, -1, w.shape[1]).any(0))
    assert use_portable_bitlinear(m) == 2 * 7  # mlx-lm's own BitLinear runs on Metal only
    text = generate(m, tok, prompt="the quick", max_tokens=4)
    assert len(tok.encode(text, add_special_tokens=False)) >= 1


# ---------------------------------------------------------------------------------------------
# BitDelta


def test_sign_bits_are_packed_lsb_first():
    delta = np.random.default_rng(4).normal(size=(3, 21))
    packed = np.array(pack_signs(mx.array(delta.astype(np.float32))))
    assert np.array_equal(packed, np.packbits(delta > 0, axis=-1, bitorder="little"))
    assert np.array_equal(np.array(unpack_signs(mx.array(packed), 21)), np.where(delta > 0, 1.0, -1.0))


def test_bitdelta_stores_signs_and_one_scale_and_reads_back(model, tmp_path):
    rng = np.random.default_rng(9)
    ft_weights = {k: v + rng.normal(0, 0.01, v.shape) for k, v in model.weights.items()}
    ft = tiny_model(tmp_path / "ft", weights=ft_weights)
    out = convert(ft.path, tmp_path / "delta", bitdelta_base=model.path)
    raw = mx.load(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.gate_proj.weight"
    assert raw[name + ".sign"].dtype == mx.uint8 and raw[name + ".sign"].shape == (
        ft_weights[name].shape[0],
        ft_weights[name].shape[1] // 8,
    )
    assert raw[name + ".delta_scale"].shape == (1,)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitdelta"
    back = open_model(out)
    for n, w in ft_weights.items():
        got = f64(back.load(n))
        w32 = w.astype(np.float32).astype(np.float64)
        if n.startswith("model.layers.") and w.ndim == 2:
            base = model.weights[n].astype(np.float32).astype(np.float64)
            delta = w32 - base
            expected = base + np.abs(delta).mean() * np.where(delta > 0, 1.0, -1.0)
            assert np.allclose(got, expected, rtol=0, atol=1e-6), n
            # one bit per weight keeps the direction of the fine-tune: closer to it than the base is
            assert np.linalg.norm(got - w32) < np.linalg.norm(base - w32)
        else:
            assert np.array_equal(got, w32), n


# ---------------------------------------------------------------------------------------------
# convert command and merging across formats


def test_convert_cli_writes_a_single_gguf_file_and_converts_back(model, tmp_path):
    assert convert_main([str(model.path), str(tmp_path / "m.gguf"), "--out-format", "gguf-f16"]) == 0
    assert (tmp_path / "m.gguf").is_file()
    assert convert_main([str(tmp_path / "m.gguf"), str(tmp_path / "hf"), "--out-dtype", "float32"]) == 0
    back = open_model(tmp_path / "hf")
    for name, ref in model.weights.items():
        assert np.allclose(f64(back.load(name)), ref, rtol=2**-11, atol=1e-7), name
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_convert_refuses_existing_output_without_force(model, tmp_path):
    from mergekit_mlx.errors import OutputError

    (tmp_path / "x").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        convert(model.path, tmp_path / "x", "mlx-q8")


def test_recipe_merges_a_gguf_q8_file_with_an_mlx_q4_directory(model, tmp_path):
    from mlx_lm import generate

    from mergekit_mlx import merge

    rng = np.random.default_rng(11)
    other = tiny_model(tmp_path / "other", weights={k: v + rng.normal(0, 0.02, v.shape) for k, v in model.weights.items()})
    convert(model.path, tmp_path / "a.gguf", "gguf-q8_0")
    convert(other.path, tmp_path / "b-q4", "mlx-q4")
    recipe = {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [
            {"model": str(tmp_path / "a.gguf"), "parameters": {"weight": 0.25}},
            {"model": str(tmp_path / "b-q4"), "parameters": {"weight": 0.75}},
        ],
    }
    result = merge(recipe)
    a, b = open_model(tmp_path / "a.gguf"), open_model(tmp_path / "b-q4")
    for name in model.weights:
        expected = 0.25 * f64(a.load(name)) + 0.75 * f64(b.load(name))
        assert np.allclose(f64(result.weights[name]), expected, rtol=1e-5, atol=1e-6), name
    m, tok = result.to_mlx_lm()
    text = generate(m, tok, prompt="the quick", max_tokens=4)
    assert len(tok.encode(text, add_special_tokens=False)) >= 1
