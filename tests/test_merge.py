"""End to end: recipe -> plan -> merged model directory -> mlx-lm, and the in-memory hand-off."""

import json
import subprocess
import sys
import threading

import mlx.core as mx
import numpy as np
import pytest
import tiny

from mergekit_mlx import merge
from mergekit_mlx.cli import main as cli_main
from mergekit_mlx.errors import ModelError, OutputError, RecipeError


def ties_recipe(paths, density=0.5):
    base, *fts = paths
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": density}} for p in fts],
    }


def test_linear_merge_writes_the_weighted_average_of_every_tensor(family, tmp_path):
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(family, [0.5, 0.25, 0.25])],
    }
    merge(recipe, tmp_path / "out")
    got = tiny.load_np(tmp_path / "out")
    ins = [tiny.load_np(p) for p in family]
    assert set(got) == set(ins[0])
    for name in got:
        ref = 0.5 * ins[0][name] + 0.25 * ins[1][name] + 0.25 * ins[2][name]
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-6, err_msg=name)


def test_several_readers_per_model_write_the_same_merge(family, tmp_path, monkeypatch):
    """A GPU host reads each model with several threads (each its own lazy arrays); the output
    is the same as with one reader per model."""
    from mergekit_mlx import pipeline as merge_mod

    merge(ties_recipe(family), tmp_path / "one")
    monkeypatch.setattr(merge_mod, "_readers_per_group", lambda *a: 3)
    merge(ties_recipe(family), tmp_path / "three")
    one, three = tiny.load_np(tmp_path / "one"), tiny.load_np(tmp_path / "three")
    assert set(one) == set(three)
    for name in one:
        np.testing.assert_array_equal(one[name], three[name], err_msg=name)


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_tasks_evaluated_together_write_the_same_merge(family, tmp_path, monkeypatch, method):
    """A GPU merge thread evaluates several loaded tasks at once; the output is the same as one by one."""
    from mergekit_mlx import pipeline as merge_mod

    recipe = (
        ties_recipe(family)
        if method == "ties"
        else {
            "merge_method": "linear",
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(family, [0.5, 0.25, 0.25])],
        }
    )
    merge(recipe, tmp_path / "one")
    monkeypatch.setattr(merge_mod, "CPU_TASKS_PER_EVAL", 5)
    monkeypatch.setattr(merge_mod, "_worker_count", lambda: 1)
    merge(recipe, tmp_path / "five")
    one, five = tiny.load_np(tmp_path / "one"), tiny.load_np(tmp_path / "five")
    assert set(one) == set(five)
    for name in one:
        np.testing.assert_array_equal(one[name], five[name], err_msg=name)


def test_gpu_kernel_checks_run_before_the_merge_threads_start(family, tmp_path, monkeypatch):
    """A first-use check switches MLX's process-wide default device while it computes its CPU
    reference, so the checks a method needs run before any reader or merge thread exists."""
    from mergekit_mlx import kernels

    order = []
    monkeypatch.setattr(kernels, "first_use_checks", lambda groups: order.append(("checks", tuple(groups))))
    merge(ties_recipe(family), tmp_path / "out", on_event=lambda name, task, seconds: order.append((name,)))
    assert order[0] == ("checks", ("uniform", "select", "l1", "merge"))
    assert {e for e in order[1:]} - {("host",)} == {("read",), ("merge",), ("write",)}  # "host": on a GPU


def test_output_directory_is_a_complete_hf_model(family, tmp_path):
    out = tmp_path / "out"
    merge(ties_recipe(family), out)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= files
    assert "ties" in (out / "README.md").read_text() and "merge_method: ties" in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".*partial*")), "temporary directory left behind"


def test_output_loads_in_mlx_lm_and_generates(family, tmp_path):
    from mlx_lm import generate, load

    merge(ties_recipe(family), tmp_path / "out")
    model, tokenizer = load(str(tmp_path / "out"))
    text = generate(model, tokenizer, prompt="hello world", max_tokens=4)
    assert isinstance(text, str) and text


def test_in_memory_hand_off_gives_the_same_logits_as_the_saved_model(family, tmp_path):
    from mlx_lm import load

    result = merge(ties_recipe(family))
    model, tokenizer = result.to_mlx_lm()
    result.save(tmp_path / "saved")
    model2, _ = load(str(tmp_path / "saved"))
    tokens = mx.array([tokenizer.encode("hello world merge")])
    np.testing.assert_array_equal(np.array(model(tokens)), np.array(model2(tokens)))


def test_shards_and_index_when_output_exceeds_shard_size(family, tmp_path):
    out = tmp_path / "out"
    merge(ties_recipe(family), out, out_shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == set(tiny.load_np(family[0]))
    assert index["metadata"]["total_size"] == sum(v.size * 4 for v in tiny.load_np(out).values())


def test_tensors_written_by_several_threads_give_identical_shards(family, tmp_path, monkeypatch):
    """Where cores are spare a big tensor is written in slices by several threads (and the
    shards' checksums hashed on a thread of their own): the files are byte for byte the same."""
    from mergekit_mlx.formats import safetensors as writer

    merge(ties_recipe(family), tmp_path / "one", out_shard_size=20_000)
    monkeypatch.setattr(writer, "_DIRECT", False)  # few cores here: shard data would go around the page cache
    monkeypatch.setattr(writer, "_WRITE_THREADS", 3)
    monkeypatch.setattr(writer, "_PARALLEL_WRITE_MIN", 1000)
    merge(ties_recipe(family), tmp_path / "three", out_shard_size=20_000)
    files = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    assert len(files) > 1 and files == sorted(p.name for p in (tmp_path / "three").glob("*.safetensors"))
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "three" / f).read_bytes(), f


def test_shards_written_side_by_side_are_the_files_written_one_after_another(family, tmp_path, monkeypatch):
    """Where writes go through the page cache and cores are spare, the shards of a window are
    written side by side, each by a thread of its own (one file takes one write at a time); each
    shard's file, the index and the config are byte for byte those of shards written in turn."""
    from mergekit_mlx.formats import safetensors as writer

    merge(ties_recipe(family), tmp_path / "in-turn", out_shard_size=20_000)
    monkeypatch.setattr(writer, "_DIRECT", False)
    monkeypatch.setattr(writer, "_WRITE_LANES", 3)
    appends: list[tuple[str, int]] = []  # (shard file, thread), in the order tensors were appended
    real_append = writer._ShardFile.append

    def append(self, name, array):
        appends.append((self.path.name, threading.get_ident()))
        real_append(self, name, array)

    monkeypatch.setattr(writer._ShardFile, "append", append)
    merge(ties_recipe(family), tmp_path / "side-by-side", out_shard_size=20_000)

    files = sorted(p.name for p in (tmp_path / "in-turn").iterdir() if p.name != ".mergekit-mlx-output.json")
    assert len([f for f in files if f.endswith(".safetensors")]) >= 4
    assert files == sorted(p.name for p in (tmp_path / "side-by-side").iterdir() if p.name != ".mergekit-mlx-output.json")
    for f in files:
        assert (tmp_path / "in-turn" / f).read_bytes() == (tmp_path / "side-by-side" / f).read_bytes(), f
    # the first three shards were open together, each written by one thread
    order = [f for f, _ in appends]
    first3 = sorted({f for f in order})[:3]
    last_of_first = max(k for k, f in enumerate(order) if f == first3[0])
    assert all(f in order[:last_of_first] for f in first3[1:]), "the first window's shards were not filled together"
    assert all(len({t for f2, t in appends if f2 == f}) == 1 for f in set(order))


def test_sharded_input_with_index_is_read(family4, tmp_path):
    recipe = {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in family4[:2]]}
    merge(recipe, tmp_path / "out")
    got, a, b = tiny.load_np(tmp_path / "out"), tiny.load_np(family4[0]), tiny.load_np(family4[1])
    for name in got:
        np.testing.assert_allclose(got[name], (a[name] + b[name]) / 2, rtol=1e-5, atol=1e-6)


def test_passthrough_slices_stack_layer_ranges_by_identity(family4, tmp_path):
    base, ft1 = family4[0], family4[1]
    recipe = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": str(base), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(ft1), "layer_range": [1, 4]}]},
        ],
    }
    out = tmp_path / "frank"
    merge(recipe, out)
    got, a, b = tiny.load_np(out), tiny.load_np(base), tiny.load_np(ft1)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    for name in a:
        if ".layers." not in name:
            continue
        layer = int(name.split(".")[2])
        suffix = name.split(f".{layer}.", 1)[1]
        if layer < 3:
            np.testing.assert_array_equal(got[name], a[name])
        for out_layer, in_layer in [(3, 1), (4, 2), (5, 3)]:
            if layer == in_layer:
                np.testing.assert_array_equal(got[f"model.layers.{out_layer}.{suffix}"], b[name])
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    np.testing.assert_array_equal(got["lm_head.weight"], b["lm_head.weight"])
    from mlx_lm import load

    load(str(out))  # the frankenmerge is a loadable 6-layer model


def test_gradient_parameter_is_interpolated_across_layers(family4, tmp_path):
    base, ft1 = family4[0], family4[1]
    recipe = {
        "merge_method": "slerp",
        "base_model": str(base),
        "dtype": "float32",
        "slices": [{"sources": [{"model": str(base), "layer_range": [0, 4]}, {"model": str(ft1), "layer_range": [0, 4]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.0}]},
    }
    merge(recipe, tmp_path / "out")
    got, a, b = tiny.load_np(tmp_path / "out"), tiny.load_np(base), tiny.load_np(ft1)
    for layer in range(4):
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        t = layer / 3
        # slerp at t: at t=0 the base, at t=1 the other model, in between close to lerp (small angle)
        if layer == 0:
            np.testing.assert_allclose(got[name], a[name], rtol=1e-5, atol=1e-6)
        elif layer == 3:
            np.testing.assert_allclose(got[name], b[name], rtol=1e-5, atol=1e-6)
        else:
            lerp = (1 - t) * a[name] + t * b[name]
            assert np.abs(got[name] - lerp).max() < 0.05 * np.abs(b[name] - a[name]).max() + 1e-3
        mlp = f"model.layers.{layer}.mlp.up_proj.weight"
        np.testing.assert_allclose(got[mlp], a[mlp], rtol=1e-5, atol=1e-6)


def test_per_model_filter_applies_to_that_model_only(family, tmp_path):
    base, ft1, ft2 = family
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(ft1), "parameters": {"weight": [{"filter": "mlp", "value": 0.0}, {"value": 1.0}]}},
            {"model": str(ft2), "parameters": {"weight": 0.5}},
        ],
    }
    merge(recipe, tmp_path / "out")
    got, a, b, c = (tiny.load_np(p) for p in (tmp_path / "out", base, ft1, ft2))
    for name in got:
        w1 = 0.0 if "mlp" in name else 1.0
        ref = a[name] + w1 * (b[name] - a[name]) + 0.5 * (c[name] - a[name])
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-5, err_msg=name)


def test_out_dtype_sets_tensor_dtype_and_config(family, tmp_path):
    recipe = dict(ties_recipe(family), dtype="float32", out_dtype="bfloat16")
    merge(recipe, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    assert all(v.dtype == mx.bfloat16 for v in mx.load(str(tmp_path / "out" / "model.safetensors")).values())


def test_same_seed_reproduces_dare(family, tmp_path):
    recipe = dict(ties_recipe(family), merge_method="dare_ties")
    merge(recipe, tmp_path / "a", random_seed=5)
    merge(recipe, tmp_path / "b", random_seed=5)
    merge(recipe, tmp_path / "c", random_seed=6)
    a, b, c = (tiny.load_np(tmp_path / x) for x in "abc")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


# ---------------- validation before any tensor is read ----------------


def test_missing_model_names_the_yaml_key(family, tmp_path):
    recipe = ties_recipe(family)
    recipe["models"][1]["model"] = str(tmp_path / "nope")
    with pytest.raises(RecipeError, match=r"models\[1\]\.model: model .*nope.* not found"):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_required_parameter_names_it(family, tmp_path):
    recipe = ties_recipe(family)
    del recipe["models"][0]["parameters"]["weight"]
    with pytest.raises(RecipeError, match=r"models\[0\]\.parameters\.weight: required"):
        merge(recipe)


def test_unknown_method_lists_known_ones(family):
    with pytest.raises(RecipeError, match="known: .*linear.*ties"):
        merge(dict(ties_recipe(family), merge_method="tiez"))


def test_method_needing_a_base_says_so(family):
    recipe = ties_recipe(family)
    del recipe["base_model"]
    with pytest.raises(RecipeError, match="base_model: merge_method 'ties' needs a base model"):
        merge(recipe)


def test_layer_range_out_of_bounds_names_the_slice(family):
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(family[0]), "layer_range": [0, 5]}]}]}
    with pytest.raises(RecipeError, match=r"slices\[0\]\.sources\[0\]\.layer_range: \[0, 5\] does not fit"):
        merge(recipe)


def test_model_without_config_is_an_input_error(family, tmp_path):
    (tmp_path / "empty").mkdir()
    recipe = ties_recipe([family[0], tmp_path / "empty"])
    with pytest.raises(ModelError, match="no config.json"):
        merge(recipe)


def test_existing_output_needs_force(family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OutputError, match="already exists; pass --force"):
        merge(ties_recipe(family), out)
    merge(ties_recipe(family), out, force=True)
    assert (out / "model.safetensors").exists()


def test_output_inside_an_input_model_is_refused(family):
    with pytest.raises(OutputError, match="inside"):
        merge(ties_recipe(family), family[1] / "merged")


# ---------------- command line ----------------


def write_recipe(path, recipe):
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_dry_run_prints_the_plan_and_writes_nothing(family, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yml", ties_recipe(family))
    assert cli_main(["run", str(recipe), str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "bytes read" in text and "estimated peak memory" in text and "model.layers.1.mlp.up_proj.weight" in text
    assert not (tmp_path / "out").exists()


def test_cli_bad_recipe_exits_2_with_one_message(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", dict(ties_recipe(family), merge_method="nope"))
    proc = subprocess.run(
        [sys.executable, "-m", "mergekit_mlx", "run", str(recipe), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "merge_method: 'nope' is not a known method" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_console_command_exits_at_once_after_a_merge_and_normally_otherwise(family, tmp_path, monkeypatch):
    """After `run` the output is complete, so the command skips the interpreter's teardown
    (os._exit with main's code); other commands and failures exit through sys.exit."""
    from mergekit_mlx import cli

    recipe = write_recipe(
        tmp_path / "r.yml", {"merge_method": "linear", "models": [{"model": str(family[0]), "parameters": {"weight": 1.0}}]}
    )
    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setattr(sys, "argv", ["mergekit-mlx", "run", str(recipe), str(tmp_path / "out"), "--no-progress"])
    with pytest.raises(SystemExit):
        cli.entry()
    assert exits == [0] and (tmp_path / "out" / "config.json").is_file()
    monkeypatch.setattr(sys, "argv", ["mergekit-mlx", "run", str(tmp_path / "missing.yml"), str(tmp_path / "o2")])
    with pytest.raises(SystemExit) as e:
        cli.entry()
    assert e.value.code == 2 and exits == [0]


def test_cli_run_writes_the_model(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", ties_recipe(family))
    assert cli_main(["run", str(recipe), str(tmp_path / "out"), "--no-progress", "--out-shard-size", "1M"]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_clashing_parameters_are_refused_before_merging(family, tmp_path):
    recipe = dict(ties_recipe(family, density=0.1), merge_method="della")
    recipe["models"][0]["parameters"]["epsilon"] = 0.2
    with pytest.raises(RecipeError, match=r"models\[0\]\.parameters: density \+/- epsilon"):
        merge(recipe, tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_model_saved_by_mlx_without_metadata_is_read(family, tmp_path):
    import shutil

    src = tmp_path / "mlxsaved"
    shutil.copytree(family[1], src)
    arrays = mx.load(str(src / "model.safetensors"))
    mx.save_safetensors(str(src / "model.safetensors"), arrays)  # header gets "__metadata__": null
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(family[0]), "parameters": {"weight": 1.0}}, {"model": str(src), "parameters": {"weight": 1.0}}],
    }
    merge(recipe, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_gguf_output_named_dot_gguf_is_a_single_file(family, tmp_path):
    from gguf import GGUFReader

    out = tmp_path / "merged.gguf"
    merge(ties_recipe(family), out, out_format="gguf-f16")
    assert out.is_file()
    names = {t.name for t in GGUFReader(str(out)).tensors}
    assert "token_embd.weight" in names and "blk.1.ffn_up.weight" in names
    assert not list(tmp_path.glob(".*partial*"))


def test_bitnet_output_generates_through_the_result(family, tmp_path):
    from mlx_lm import generate

    result = merge(ties_recipe(family), tmp_path / "bitnet", out_format="bitnet")
    model, tokenizer = result.to_mlx_lm()
    assert isinstance(generate(model, tokenizer, prompt="hello", max_tokens=3), str)


@pytest.mark.parametrize("key,value", [("density", 1.5), ("density", -0.1)])
def test_density_outside_zero_one_is_refused(family, key, value):
    recipe = ties_recipe(family)
    recipe["models"][1]["parameters"][key] = value
    with pytest.raises(RecipeError, match=rf"models\[1\]\.parameters\.{key}: must be in \(0, 1\]"):
        merge(recipe)


def test_linear_weights_summing_to_zero_are_refused_before_merging(family, tmp_path):
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(family[0]), "parameters": {"weight": 1.0}},
            {"model": str(family[1]), "parameters": {"weight": -1.0}},
        ],
    }
    with pytest.raises(RecipeError, match="parameters: the weights sum to 0"):
        merge(recipe, tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_nuslerp_with_one_model_besides_the_base_is_refused_at_plan_time(family4):
    recipe = {
        "merge_method": "nuslerp",
        "base_model": str(family4[0]),
        "models": [{"model": str(family4[1]), "parameters": {"weight": 1.0}}],
    }
    with pytest.raises(RecipeError, match="exactly two models besides the base model, got 1"):
        from mergekit_mlx.plan import make_plan
        from mergekit_mlx.recipe import load_recipe

        make_plan(load_recipe(recipe))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32, mx.float64])
def test_all_finite_finds_every_nan_and_inf_pattern(dtype):
    from mergekit_mlx.pipeline import all_finite

    bits = {mx.bfloat16: 16, mx.float16: 16, mx.float32: 32, mx.float64: 64}[dtype]
    exp, man = {mx.bfloat16: (8, 7), mx.float16: (5, 10), mx.float32: (8, 23), mx.float64: (11, 52)}[dtype]
    uint = {16: np.uint16, 32: np.uint32, 64: np.uint64}[bits]
    inf = ((1 << exp) - 1) << man
    sign = 1 << (bits - 1)
    finite = [0, sign, 1, sign | 1, inf - 1, sign | (inf - 1), 1 << man]  # zeros, subnormals, the largest
    special = [inf, sign | inf, inf | 1, inf | (1 << (man - 1)), sign | inf | 1, (1 << bits) - 1]
    with mx.stream(mx.cpu):
        for pattern in finite:
            x = mx.array(np.array([pattern, 0, sign], dtype=uint)).view(dtype)
            assert all_finite(x).item(), hex(pattern)
        for pattern in special:
            x = mx.array(np.array([0, pattern, 1], dtype=uint)).view(dtype)
            assert not all_finite(x).item(), hex(pattern)


@pytest.mark.parametrize("direct", [True, False])
def test_shards_written_around_the_page_cache_read_back_exactly(tmp_path, monkeypatch, direct):
    """Shard data written with O_DIRECT through a small staging buffer (tensors larger than it,
    a tail that is not a whole block) reads back as written; without direct I/O (a filesystem
    that refuses it) the page-cache path writes the same file contents."""
    from mergekit_mlx.formats import safetensors as W

    monkeypatch.setattr(W, "_DIRECT", direct)
    monkeypatch.setattr(W, "_STAGE", 3 * W._BLOCK)
    rng = np.random.default_rng(0)
    arrays = {
        "a": rng.standard_normal((37, 129)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float32),
        "c": rng.standard_normal((3, 4099)).astype(np.float32),
    }
    specs = [W.OutputTensor(k, v.shape, mx.float32) for k, v in arrays.items()]
    w = W.SafetensorsWriter(tmp_path, specs, {"model_type": "llama"}, "hf", W.WriteOptions(max_shard_bytes=60_000))
    for k, v in arrays.items():
        w.add(k, mx.array(v))
    w.finish()
    got = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        got.update({k: np.array(v) for k, v in mx.load(str(f)).items()})
        head = int.from_bytes(f.read_bytes()[:8], "little")
        assert (8 + head) % W._BLOCK == 0  # the data starts on a block boundary
    assert set(got) == set(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)


def test_tensors_in_flight_default_by_device_unless_given():
    from mergekit_mlx.options import DEFAULT_BATCH_BYTES, DEFAULT_GPU_BATCH_BYTES, MergeOptions

    assert MergeOptions(device="cpu").resolved().batch_bytes == DEFAULT_BATCH_BYTES == 512 * 1000**2
    assert MergeOptions(device="gpu").resolved().batch_bytes == DEFAULT_GPU_BATCH_BYTES == 2 * 1000**3
    assert MergeOptions(device="gpu", batch_bytes=1234).resolved().batch_bytes == 1234


def test_direct_writes_refused_by_the_filesystem_fall_back_to_the_page_cache(tmp_path, monkeypatch):
    """Some filesystems open a file with O_DIRECT but refuse the writes (EINVAL): the shard is
    written through the page cache instead, with the same contents."""
    import errno
    import fcntl
    import os

    from mergekit_mlx.formats import safetensors as W

    monkeypatch.setattr(W, "_DIRECT", True)
    monkeypatch.setattr(W, "_STAGE", 2 * W._BLOCK)
    real_pwrite, refused = os.pwrite, []

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(W.os, "pwrite", pwrite)
    data = np.random.default_rng(1).standard_normal((5, 1000)).astype(np.float32)
    w = W.SafetensorsWriter(tmp_path, [W.OutputTensor("x", data.shape, mx.float32)], {"model_type": "llama"})
    w.add("x", mx.array(data))
    w.finish()
    assert refused  # the direct write was tried and refused
    np.testing.assert_array_equal(np.array(mx.load(str(tmp_path / "model.safetensors"))["x"]), data)


def test_every_command_is_a_module_with_its_own_parser_listed_once(capsys):
    """The commands' table: each module has HELP and main(argv); --help of each exits 0."""
    import importlib

    from mergekit_mlx import cli

    for name, module in cli.COMMANDS.items():
        m = importlib.import_module(module)
        assert isinstance(m.HELP, str) and callable(m.main)
        assert cli.main([name, "--help"]) == 0
        assert f"mergekit-mlx {name}" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in cli.COMMANDS)
    assert cli.main(["frobnicate"]) == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
