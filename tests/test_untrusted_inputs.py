"""Every file read from an input model directory is untrusted.

A model directory may come from anywhere (a download, a shared disk, a colleague). Whatever it
holds, a merge, a conversion or the Python API must never read a file outside it, nor block on a
FIFO, nor read a huge file whole: each such file is a clear error naming it, raised when the model
is opened (before any output exists), never a copy of the file into the merged model. What holds:

- config.json, the index, weight shards, GGUF files and every tokenizer side file (the tokenizer
  files, generation_config.json, chat templates) are regular files whose real location, after
  symlinks, is the model directory itself, or the blobs folder of a Hugging Face cache snapshot;
- files read whole (configs, indexes, tokenizer files) have a size limit;
- a chat template that is not UTF-8 text is refused when the plan is made;
- an MLX-quantized model's `quantization` block holds only what mx.quantize accepts.

Each case is built here and run through the command line in this process: exit code 2, one
`mergekit-mlx: error:` paragraph naming the file, no traceback, no output and no `.OUT.partial`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import tiny
import yaml

from mergekit_mlx import merge
from mergekit_mlx.cli import main as cli_main
from mergekit_mlx.errors import ModelError
from mergekit_mlx.formats import open_model
from mergekit_mlx.formats.files import SIDE_FILES, copy_side_files, model_file

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-HF_TOKEN=hf_do_not_leak_me"
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")


# ---------------- helpers ----------------


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return tiny.make_family(tmp_path_factory.mktemp("untrusted"), n_finetunes=1)


def clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def linear_recipe(paths, **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in paths], **extra}


def write_recipe(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run(capsys, *argv) -> tuple[int, str]:
    rc = cli_main([*map(str, argv), "--no-progress"] if argv[0] == "run" else list(map(str, argv)))
    return rc, capsys.readouterr().err


def assert_refused(rc: int, err: str, out: Path, *patterns: str) -> None:
    assert rc == 2, err
    assert err.startswith("mergekit-mlx: error: "), err
    assert "Traceback" not in err, err
    for p in patterns:
        assert re.search(p, err), f"{p!r} not in {err!r}"
    assert not out.exists(), "a refused run left an output"
    assert not (out.parent / f".{out.name}.partial").exists(), "a refused run left its temporary output"


def assert_secret_nowhere(root: Path, but: Path = None) -> None:
    """No regular file under root holds the secret, except the secret file itself."""
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink() and f != but:
            assert SECRET.encode() not in f.read_bytes(), f"the secret leaked into {f}"


def secret_file(tmp_path: Path) -> Path:
    f = tmp_path / "elsewhere" / "id_rsa"
    f.parent.mkdir(exist_ok=True)
    f.write_text(json.dumps({"chat_template": SECRET, "secret": SECRET}))
    return f


def link_out(model: Path, name: str, target: Path) -> None:
    (model / name).unlink(missing_ok=True)
    (model / name).symlink_to(target)


# ---------------- the one check: model_file ----------------


def test_a_regular_file_inside_the_directory_is_its_own_real_path(family):
    assert model_file(family[0], "config.json", "config.json") == (family[0] / "config.json").resolve()


def test_a_symlink_that_stays_inside_the_directory_is_accepted(family, tmp_path):
    model = clone(family[1], tmp_path / "m")
    (model / "tokenizer_config.json").rename(model / "real_config.json")
    (model / "tokenizer_config.json").symlink_to("real_config.json")
    assert model_file(model, "tokenizer_config.json", "tokenizer file") == (model / "real_config.json").resolve()


def test_a_symlink_into_a_folder_of_the_directory_is_accepted(family, tmp_path):
    model = clone(family[1], tmp_path / "m")
    (model / "store").mkdir()
    (model / "tokenizer.json").rename(model / "store" / "tokenizer.json")
    (model / "tokenizer.json").symlink_to("store/tokenizer.json")
    assert model_file(model, "tokenizer.json", "tokenizer file") == (model / "store" / "tokenizer.json").resolve()


def test_a_symlink_through_a_linked_folder_out_of_the_directory_is_refused(family, tmp_path):
    model = clone(family[1], tmp_path / "m")
    secret = secret_file(tmp_path)
    (model / "store").symlink_to(secret.parent)
    link_out(model, "tokenizer.model", Path("store") / secret.name)
    with pytest.raises(ModelError, match=r"tokenizer.model: tokenizer file resolves to .*id_rsa, outside the model directory"):
        open_model(model)


def test_a_symlink_out_of_the_directory_names_the_file_and_the_rule(family, tmp_path):
    model = clone(family[1], tmp_path / "m")
    link_out(model, "vocab.json", secret_file(tmp_path))
    with pytest.raises(ModelError, match=r"vocab.json: tokenizer file resolves to .*id_rsa, outside the model directory"):
        model_file(model, "vocab.json", "tokenizer file")


def test_a_directory_in_place_of_a_file_is_not_a_regular_file(family, tmp_path):
    model = clone(family[1], tmp_path / "m")
    (model / "merges.txt").mkdir()
    with pytest.raises(ModelError, match=r"merges.txt: cannot read tokenizer file \(not a regular file\)"):
        model_file(model, "merges.txt", "tokenizer file")


def test_a_dangling_symlink_is_refused(family, tmp_path):
    model = clone(family[1], tmp_path / "m")
    (model / "added_tokens.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(ModelError, match=r"added_tokens.json: cannot read tokenizer file"):
        model_file(model, "added_tokens.json", "tokenizer file")


def test_a_file_past_the_size_limit_is_refused_without_reading_it(family, tmp_path):
    model = clone(family[1], tmp_path / "m")
    with open(model / "special_tokens_map.json", "wb") as f:
        f.truncate(1 << 31)  # sparse: 2 GiB that take no disk
    with pytest.raises(ModelError, match=r"special_tokens_map.json: tokenizer file is 2147483648 bytes, more than"):
        open_model(model)


def test_a_config_past_the_size_limit_is_refused(family, tmp_path, capsys):
    model = clone(family[1], tmp_path / "m")
    with open(model / "config.json", "ab") as f:
        f.truncate(1 << 31)
    rc, err = run(capsys, "run", write_recipe(tmp_path, linear_recipe([family[0], model])), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(str(model / "config.json")), "more than the 1073741824")


# ---------------- side files: refused when the model is opened, never copied ----------------


@pytest.mark.parametrize("name", SIDE_FILES)
def test_a_side_file_linked_out_of_the_model_is_refused_and_never_copied(family, tmp_path, capsys, name):
    model = clone(family[0], tmp_path / "base")
    secret = secret_file(tmp_path)
    link_out(model, name, secret)
    out = tmp_path / "out"
    rc, err = run(capsys, "run", write_recipe(tmp_path, linear_recipe([model, family[1]])), out)
    assert_refused(rc, err, out, re.escape(str(model / name)), "outside the model directory")
    assert_secret_nowhere(tmp_path, but=secret)
    assert SECRET not in err


@pytest.mark.parametrize("name", ["tokenizer.model", "generation_config.json", "chat_template.jinja"])
def test_a_side_file_linked_to_proc_environ_is_refused(family, tmp_path, capsys, monkeypatch, name):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    model = clone(family[0], tmp_path / "base")
    link_out(model, name, Path("/proc/self/environ"))
    rc, err = run(capsys, "run", write_recipe(tmp_path, linear_recipe([model, family[1]])), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(str(model / name)), "outside the model directory")


@pytest.mark.parametrize("name", ["tokenizer.json", "vocab.json", "chat_template.json"])
def test_a_side_file_of_a_model_whose_tokenizer_is_not_used_is_refused_too(family, tmp_path, capsys, name):
    """The second model's tokenizer is never copied, but the model is refused when opened all the same."""
    model = clone(family[1], tmp_path / "ft")
    link_out(model, name, secret_file(tmp_path))
    rc, err = run(capsys, "run", write_recipe(tmp_path, linear_recipe([family[0], model])), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(str(model / name)))


def test_a_union_tokenizer_never_reads_a_file_linked_out(family, tmp_path, capsys):
    model = clone(family[1], tmp_path / "ft")
    link_out(model, "tokenizer.json", secret_file(tmp_path))
    recipe = linear_recipe([family[0], model], tokenizer_source="union")
    rc, err = run(capsys, "run", write_recipe(tmp_path, recipe), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(str(model / "tokenizer.json")), "outside the model directory")


@needs_fifo
@pytest.mark.parametrize("name", ["tokenizer_config.json", "chat_template.jinja", "generation_config.json"])
def test_a_side_file_that_is_a_fifo_does_not_hang(family, tmp_path, name):
    model = clone(family[0], tmp_path / "base")
    (model / name).unlink(missing_ok=True)
    os.mkfifo(model / name)  # reading it would block for ever
    recipe = write_recipe(tmp_path, linear_recipe([model, family[1]]))
    proc = subprocess.run(
        [sys.executable, "-m", "mergekit_mlx", "run", str(recipe), str(tmp_path / "out"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert_refused(proc.returncode, proc.stderr, tmp_path / "out", re.escape(str(model / name)), r"not a regular file")


def test_copy_tokenizer_refuses_a_file_linked_out_after_the_model_was_opened(family, tmp_path):
    """The copy checks again as it opens each file: a link swapped in late is still refused."""
    model = clone(family[0], tmp_path / "base")
    out = tmp_path / "copy"
    out.mkdir()
    link_out(model, "merges.txt", secret_file(tmp_path))
    with pytest.raises(ModelError, match=r"merges.txt: tokenizer file resolves to .*outside the model directory"):
        copy_side_files(model, out)
    assert_secret_nowhere(out)


def test_copy_tokenizer_copies_the_bytes_of_regular_files(family, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    assert copy_side_files(family[0], out) == ["tokenizer.json", "tokenizer_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (family[0] / name).read_bytes()


# ---------------- the Python API and convert ----------------


def test_the_python_api_refuses_a_side_file_linked_out(family, tmp_path):
    model = clone(family[0], tmp_path / "base")
    link_out(model, "special_tokens_map.json", secret_file(tmp_path))
    with pytest.raises(ModelError, match=re.escape(str(model / "special_tokens_map.json"))):
        merge(linear_recipe([model, family[1]]))


def test_the_python_api_result_never_holds_a_link_swapped_in_after_planning(family, tmp_path):
    model = clone(family[0], tmp_path / "base")
    result = merge(linear_recipe([model, family[1]]))
    secret = secret_file(tmp_path)
    link_out(model, "generation_config.json", secret)
    with pytest.raises(ModelError, match="outside the model directory"):
        result.save(tmp_path / "saved")
    assert not (tmp_path / "saved").exists() and not (tmp_path / ".saved.partial").exists()
    with pytest.raises(ModelError, match="outside the model directory"):
        result.to_mlx_lm()
    assert_secret_nowhere(tmp_path, but=secret)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model", "generation_config.json"])
def test_convert_refuses_a_side_file_linked_out(family, tmp_path, capsys, name):
    model = clone(family[0], tmp_path / "base")
    secret = secret_file(tmp_path)
    link_out(model, name, secret)
    rc, err = run(capsys, "convert", model, tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(str(model / name)), "outside the model directory")
    assert_secret_nowhere(tmp_path, but=secret)


# ---------------- Hugging Face cache snapshots keep working ----------------


def test_a_hugging_face_cache_snapshot_with_tokenizer_links_into_blobs_merges(family, tmp_path, capsys):
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in family[0].iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    out = tmp_path / "out"
    rc, err = run(capsys, "run", write_recipe(tmp_path, linear_recipe([snapshot, family[1]])), out)
    assert rc == 0, err
    assert (out / "tokenizer.json").read_bytes() == (family[0] / "tokenizer.json").read_bytes()
    assert not (out / "tokenizer.json").is_symlink()


def test_a_snapshot_link_to_another_repository_is_refused(family, tmp_path):
    hub = tmp_path / "hub"
    snapshot = hub / "models--org--tiny" / "snapshots" / "0123abc"
    clone(family[0], snapshot)
    other = hub / "models--evil--x" / "blobs"
    other.mkdir(parents=True)
    (other / "vocab").write_text(SECRET)
    (snapshot / "vocab.json").symlink_to(Path("../../../models--evil--x/blobs/vocab"))
    with pytest.raises(ModelError, match="vocab.json: tokenizer file resolves to .*outside the model directory"):
        open_model(snapshot)


# ---------------- weights and GGUF files ----------------


@needs_fifo
def test_a_gguf_path_that_is_a_fifo_is_refused(family, tmp_path, capsys):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    rc, err = run(capsys, "run", write_recipe(tmp_path, linear_recipe([fifo, family[1]])), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(str(fifo)), "not a regular file")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_device_named_as_a_model_is_refused(family, tmp_path, capsys):
    rc, err = run(capsys, "convert", "/dev/zero", tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", "/dev/zero: not a regular file or a directory")


@needs_fifo
def test_a_gguf_fifo_inside_a_directory_is_refused(tmp_path):
    model = tmp_path / "ggufdir"
    model.mkdir()
    os.mkfifo(model / "model.gguf")
    with pytest.raises(ModelError, match=r"model.gguf: cannot read GGUF file \(not a regular file\)"):
        open_model(model)


def test_a_gguf_linked_out_of_its_directory_is_refused(tmp_path):
    model = tmp_path / "ggufdir"
    model.mkdir()
    (tmp_path / "elsewhere.gguf").write_bytes(b"GGUF" + bytes(20))
    (model / "model.gguf").symlink_to(tmp_path / "elsewhere.gguf")
    with pytest.raises(ModelError, match=r"model.gguf: GGUF file resolves to .*outside the model directory"):
        open_model(model)


@needs_fifo
def test_a_weight_shard_that_is_a_fifo_is_refused(family, tmp_path):
    model = clone(family[1], tmp_path / "m")
    os.mkfifo(model / "extra.safetensors")
    with pytest.raises(ModelError, match=r"extra.safetensors: cannot read weight file \(not a regular file\)"):
        open_model(model)


def test_an_index_linked_out_of_the_model_is_refused(family, tmp_path):
    model = clone(family[1], tmp_path / "m")
    (tmp_path / "index.json").write_text(json.dumps({"weight_map": {"a": "model.safetensors"}}))
    (model / "model.safetensors.index.json").symlink_to(tmp_path / "index.json")
    with pytest.raises(ModelError, match=r"model.safetensors.index.json: the index resolves to .*outside the model directory"):
        open_model(model)


def test_an_index_that_lists_a_tensor_no_shard_holds_is_refused(family, tmp_path):
    model = clone(family[1], tmp_path / "m")
    names = list(mx.load(str(model / "model.safetensors")))
    weight_map = {n: "model.safetensors" for n in names + ["model.fake.weight"]}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(
        ModelError, match=r"index.json: lists tensor 'model.fake.weight' in model.safetensors, which does not hold it"
    ):
        open_model(model)


def test_a_config_linked_out_of_the_model_is_refused(family, tmp_path):
    model = clone(family[1], tmp_path / "m")
    link_out(model, "config.json", family[0] / "config.json")
    with pytest.raises(ModelError, match=r"config.json: config.json resolves to .*outside the model directory"):
        open_model(model)


# ---------------- chat templates ----------------


def test_a_chat_template_jinja_that_is_not_utf8_is_refused_at_plan_time(family, tmp_path, capsys):
    model = clone(family[0], tmp_path / "base")
    (model / "chat_template.jinja").write_bytes(b"{{ messages }}\xff\xfe not text")
    rc, err = run(capsys, "run", write_recipe(tmp_path, linear_recipe([model, family[1]])), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(str(model / "chat_template.jinja")), "not UTF-8")


@pytest.mark.parametrize("source", ["base", "union"])
def test_a_chat_template_that_is_not_utf8_is_refused_before_a_tokenizer_is_built(family, tmp_path, capsys, source):
    model = clone(family[0], tmp_path / "base")
    (model / "chat_template.jinja").write_bytes(b"{{ messages }}\xff")
    recipe = linear_recipe([model, family[1]], tokenizer_source=source)
    rc, err = run(capsys, "run", write_recipe(tmp_path, recipe), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(str(model / "chat_template.jinja")), "not UTF-8")


def test_a_tokenizer_config_template_that_is_not_utf8_is_refused_with_chat_template_auto(family, tmp_path, capsys):
    model = clone(family[1], tmp_path / "ft")
    (model / "tokenizer_config.json").write_bytes(b'{"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": "\xff\xfe"}')
    recipe = linear_recipe([family[0], model], chat_template="auto")
    rc, err = run(capsys, "run", write_recipe(tmp_path, recipe), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(str(model / "tokenizer_config.json")), "not UTF-8")


def test_a_recipe_chat_template_that_is_not_valid_jinja_is_refused_at_plan_time(family, tmp_path, capsys):
    recipe = linear_recipe(family, chat_template="{% if %}{{ messages['content'] ")
    rc, err = run(capsys, "run", write_recipe(tmp_path, recipe), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", r"chat_template: not a valid Jinja template \(line 1: ")


def test_a_utf8_chat_template_is_copied_as_it_is(family, tmp_path, capsys):
    model = clone(family[0], tmp_path / "base")
    template = "{% for m in messages %}{{ m['content'] }} — ü{% endfor %}"
    (model / "chat_template.jinja").write_text(template, encoding="utf-8")
    rc, err = run(capsys, "run", write_recipe(tmp_path, linear_recipe([model, family[1]])), tmp_path / "out")
    assert rc == 0, err
    assert (tmp_path / "out" / "chat_template.jinja").read_text(encoding="utf-8") == template


# ---------------- MLX-quantized inputs: the quantization block ----------------


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """An MLX-quantized (affine, 4 bits, group size 32) copy of a tiny model."""
    root = tmp_path_factory.mktemp("quantized")
    src = tiny.make_family(root / "src", n_finetunes=0)[0]
    cfg = json.loads((src / "config.json").read_text())
    arrays = {}
    for name, value in tiny.load_np(src).items():
        a = mx.array(value.astype(np.float32))
        if name.endswith(".weight") and a.ndim == 2 and "norm" not in name and a.shape[-1] % 32 == 0:
            w, scales, biases = mx.quantize(a, group_size=32, bits=4)
            layer = name[: -len(".weight")]
            arrays.update({name: w, f"{layer}.scales": scales, f"{layer}.biases": biases})
        else:
            arrays[name] = a
    out = root / "q"
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), arrays, metadata={"format": "mlx"})
    cfg["quantization"] = {"group_size": 32, "bits": 4, "mode": "affine"}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def with_quantization(quantized: Path, tmp_path: Path, block) -> Path:
    model = clone(quantized, tmp_path / "q")
    cfg = json.loads((model / "config.json").read_text())
    cfg["quantization"] = block
    (model / "config.json").write_text(json.dumps(cfg))
    return model


def test_a_well_formed_quantization_block_opens(quantized):
    assert open_model(quantized).format == "mlx-quantized"


@pytest.mark.parametrize(
    "block, key",
    [
        ({"group_size": 32, "bits": 0}, r"quantization\.bits: 0 is not valid for mode 'affine'; valid: 1, 2, 3, 4, 5, 6, 8"),
        ({"group_size": 32, "bits": 3.5}, r"quantization\.bits: 3\.5 is not valid"),
        ({"group_size": 32, "bits": "4"}, r"quantization\.bits: '4' is not valid"),
        ({"group_size": 32, "bits": True}, r"quantization\.bits: True is not valid"),
        ({"group_size": 32, "bits": 7}, r"quantization\.bits: 7 is not valid"),
        ({"group_size": 0, "bits": 4}, r"quantization\.group_size: 0 is not valid for mode 'affine'; valid: 32, 64, 128"),
        ({"group_size": -32, "bits": 4}, r"quantization\.group_size: -32 is not valid"),
        ({"group_size": 32.0, "bits": 4}, r"quantization\.group_size: 32\.0 is not valid"),
        (
            {"group_size": 32, "bits": 4, "mode": ["affine"]},
            r"quantization\.mode: \['affine'\] is not a quantization mode; valid: affine, mxfp4",
        ),
        ({"group_size": 32, "bits": 4, "mode": "fp3"}, r"quantization\.mode: 'fp3' is not a quantization mode"),
        ({"group_size": 32, "bits": 8, "mode": "mxfp4"}, r"quantization\.bits: 8 is not valid for mode 'mxfp4'; valid: 4"),
        ([32, 4], r"'quantization' must be an object like"),
        ("affine", r"'quantization' must be an object like"),
    ],
)
def test_a_malformed_quantization_block_names_config_json_and_the_key(quantized, tmp_path, capsys, block, key):
    model = with_quantization(quantized, tmp_path, block)
    rc, err = run(capsys, "convert", model, tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(str(model / "config.json")), key)


@pytest.mark.parametrize(
    "entry, key",
    [
        ({"group_size": 32, "bits": 9}, r"\['model.layers.0.mlp.up_proj'\]\.bits: 9 is not valid"),
        ({"group_size": 16, "bits": 4}, r"\['model.layers.0.mlp.up_proj'\]\.group_size: 16 is not valid"),
        ([32, 4], r"\['model.layers.0.mlp.up_proj'\] is \[32, 4\], but the layer has quantized tensors"),
        (False, r"\['model.layers.0.mlp.up_proj'\] is False, but the layer has quantized tensors"),
    ],
)
def test_a_malformed_per_layer_quantization_entry_names_the_layer(quantized, tmp_path, capsys, entry, key):
    model = with_quantization(quantized, tmp_path, {"group_size": 32, "bits": 4, "model.layers.0.mlp.up_proj": entry})
    rc, err = run(capsys, "convert", model, tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(str(model / "config.json")), r"quantization" + key)


def test_a_per_layer_entry_that_matches_its_tensors_is_read(quantized, tmp_path):
    model = with_quantization(
        quantized, tmp_path, {"group_size": 32, "bits": 4, "model.layers.0.mlp.up_proj": {"group_size": 32, "bits": 4}}
    )
    name = "model.layers.0.mlp.up_proj.weight"
    original = tiny.load_np(quantized.parent / "src" / "base")[name]
    loaded = np.array(open_model(model).load(name).astype(mx.float32))
    assert loaded.shape == original.shape
    assert np.abs(loaded - original).max() < 0.5 * np.abs(original).max()  # 4-bit affine: coarse, but the same matrix


def test_a_malformed_quantization_block_is_refused_even_on_unquantized_weights(family, tmp_path, capsys):
    model = clone(family[1], tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(cfg, quantization={"group_size": 32, "bits": 99})))
    rc, err = run(capsys, "run", write_recipe(tmp_path, linear_recipe([family[0], model])), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(str(model / "config.json")), r"quantization\.bits: 99 is not valid")


def test_scales_that_do_not_fit_their_weight_are_refused_when_opened(quantized, tmp_path):
    model = clone(quantized, tmp_path / "q")
    arrays = mx.load(str(model / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.scales"
    arrays[name] = arrays[name][:16]
    mx.save_safetensors(str(model / "model.safetensors"), arrays, metadata={"format": "mlx"})
    with pytest.raises(ModelError, match=r"'model.layers.0.self_attn.q_proj.scales' has shape \[16, 1\], which does not fit"):
        open_model(model)
