"""Reliability: bad input fails early and clearly, output is never half-written, interruptions resume.

Every class of bad input is built here, in the test, and run through the command line: the exit
code is 2, the message is one paragraph naming the file or YAML key (never a traceback), and no
output directory appears — nor a `.NAME.partial` one. What a failed run leaves behind:

- a validation failure (recipe, input files, output location, free space) leaves nothing;
- a failure while merging or writing (non-finite values, a full disk) removes `.NAME.partial`;
- only an interruption (Ctrl-C, SIGKILL, power loss) leaves `.NAME.partial`, which
  `--resume` turns into the same bytes an uninterrupted run writes.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import tiny
import yaml

from mergekit_mlx import merge
from mergekit_mlx.cli import main as cli_main
from mergekit_mlx.formats import open_model
from mergekit_mlx.formats.safetensors import SafetensorsWriter
from mergekit_mlx.methods import all_methods

REPO = Path(__file__).resolve().parent.parent


# ---------------- helpers ----------------


def linear_recipe(paths, weights=None):
    weights = weights or [1.0 / len(paths)] * len(paths)
    return {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, weights)]}


def ties_recipe(paths, density=0.5):
    base, *fts = paths
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": density}} for p in fts],
    }


def write_recipe(tmp_path: Path, recipe, name: str = "recipe.yml") -> Path:
    path = tmp_path / name
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return path


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run `mergekit-mlx run ...` in this process; any exception but a clean exit fails the test."""
    rc = cli_main(["run", *map(str, argv), "--no-progress"])
    return rc, capsys.readouterr().err


def cli_subprocess(*argv: str, timeout: float = 60) -> tuple[int, str]:
    """Run `python -m mergekit_mlx run ...` as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "mergekit_mlx", "run", *map(str, argv), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    return proc.returncode, proc.stderr


def partial_of(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def assert_refused(rc: int, err: str, out: Path, *patterns: str) -> None:
    assert rc == 2, err
    assert err.startswith("mergekit-mlx: error: "), err
    assert "Traceback" not in err, err
    for p in patterns:
        assert re.search(p, err), f"{p!r} not in {err!r}"
    assert not out.exists(), "a failed merge left an output directory"
    assert not partial_of(out).exists(), "a failed merge left its temporary output"


def clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite(model: Path, change) -> Path:
    """Re-save a model directory after `change(weights)` edits its numpy weights in place."""
    weights = tiny.load_np(model)
    cfg = json.loads((model / "config.json").read_text())
    change(weights)
    for f in model.glob("*.safetensors"):
        f.unlink()
    tiny.save_model(model, cfg, weights, tokenizer=False)
    return model


def raw_safetensors(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def dry_run_bytes_written(capsys, recipe: Path) -> str:
    """The 'bytes written' figure `--dry-run` prints, e.g. '57.6 KB'."""
    assert cli_main(["run", str(recipe), "--dry-run"]) == 0
    return re.search(r"bytes written: (\S+ \S+) in", capsys.readouterr().out).group(1)


# ---------------- recipe and model validation, before any tensor is read ----------------


def test_missing_model_path_names_the_yaml_key(family, tmp_path):
    recipe = write_recipe(tmp_path, linear_recipe([family[0], tmp_path / "no-such-model"]))
    rc, err = cli_subprocess(recipe, tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", r"models\[1\]\.model: model '.*no-such-model' not found")


def test_missing_tensor_names_the_tensor_and_the_model(family, tmp_path, capsys):
    ft = rewrite(clone(family[1], tmp_path / "ft-missing"), lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    recipe = write_recipe(tmp_path, linear_recipe([family[0], ft]))
    rc, err = cli(capsys, recipe, tmp_path / "out")
    assert_refused(
        rc, err, tmp_path / "out", re.escape(str(ft)), r"models\[1\]", "has no tensor 'model.layers.1.mlp.up_proj.weight'"
    )


def test_shape_mismatch_names_the_tensor_and_both_shapes(family, tmp_path, capsys):
    def shrink(w):
        w["model.layers.0.mlp.up_proj.weight"] = w["model.layers.0.mlp.up_proj.weight"][:40]

    ft = rewrite(clone(family[1], tmp_path / "ft-shape"), shrink)
    recipe = write_recipe(tmp_path, linear_recipe([family[0], ft]))
    rc, err = cli(capsys, recipe, tmp_path / "out")
    assert_refused(
        rc, err, tmp_path / "out", "tensor model.layers.0.mlp.up_proj.weight: shapes differ", r"\[48, 32\]", r"\[40, 32\]"
    )


def test_different_architectures_are_refused_unless_allow_crimes(family, tmp_path, capsys):
    other = clone(family[1], tmp_path / "mistral")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, architectures=["MistralForCausalLM"], model_type="mistral")))
    recipe = write_recipe(tmp_path, linear_recipe([family[0], other]))
    rc, err = cli(capsys, recipe, tmp_path / "out")
    assert_refused(
        rc, err, tmp_path / "out", "different architectures", "LlamaForCausalLM", "MistralForCausalLM", "--allow-crimes"
    )
    rc, err = cli(capsys, recipe, tmp_path / "out", "--allow-crimes")
    assert rc == 0, err
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda r: r["models"][0]["parameters"].update(weight="heavy"),
            r"models\[0\]\.parameters\.weight: must be a number, got 'heavy'",
        ),
        (
            lambda r: r["models"][1]["parameters"].update(weight=float("nan")),
            r"models\[1\]\.parameters\.weight: must be a finite number, got nan",
        ),
        (
            lambda r: r["models"][1]["parameters"].update(density=float("inf")),
            r"models\[1\]\.parameters\.density: must be a finite number, got inf",
        ),
        (lambda r: r.update(parameters={"normalize": "sometimes"}), r"parameters\.normalize: must be true or false"),
        (
            lambda r: (
                r.update(merge_method="della", parameters={"epsilon": 0.3}) or r["models"][0]["parameters"].update(density=0.2)
            ),
            r"models\[0\]\.parameters: density \+/- epsilon must lie in \(0, 1\)",
        ),
        (
            lambda r: r["models"][0]["parameters"].update(densty=0.3),
            r"models\[0\]\.parameters\.densty: not a parameter of ties; did you mean 'density'\?",
        ),
        (lambda r: r["models"].append(dict(r["models"][0])), r"models\[2\]\.model: .* is already models\[0\]"),
    ],
    ids=["not-a-number", "nan-weight", "inf-density", "not-a-boolean", "clashing-pair", "misspelt-name", "model-twice"],
)
def test_bad_parameter_values_name_the_key(family, tmp_path, capsys, change, message):
    recipe = ties_recipe(family)
    change(recipe)
    rc, err = cli(capsys, write_recipe(tmp_path, recipe), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", message)


def test_unknown_method_lists_the_known_ones(family, tmp_path):
    recipe = write_recipe(tmp_path, dict(ties_recipe(family), merge_method="tiez"))
    rc, err = cli_subprocess(recipe, tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", "merge_method: 'tiez' is not a known method; known: ", *sorted(all_methods()))


@pytest.mark.parametrize("layer_range", [[0, 5], [-1, 1], [1, 1], [2, 1]])
def test_layer_range_out_of_bounds_names_the_slice(family, tmp_path, capsys, layer_range):
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(family[0]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(family[1]), "layer_range": layer_range}]},
        ],
    }
    rc, err = cli(capsys, write_recipe(tmp_path, recipe), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(f"slices[1].sources[0].layer_range: {layer_range}"), "which has 2 layers")


def test_yaml_unknown_key_is_named(family, tmp_path):
    recipe = write_recipe(tmp_path, dict(ties_recipe(family), merge_methd="ties"))
    rc, err = cli_subprocess(recipe, tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", "merge_methd: is not a recipe key")


def test_yaml_alias_bomb_is_refused_quickly(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10^9 nodes expanded
    lines += ["merge_method: linear", "models: *a8"]
    start = time.perf_counter()
    rc, err = cli(capsys, write_recipe(tmp_path, "\n".join(lines) + "\n"), tmp_path / "out")
    assert time.perf_counter() - start < 5
    assert_refused(rc, err, tmp_path / "out", "expands to more than .* YAML nodes")


@pytest.mark.parametrize("style", ["flow", "block"])
def test_yaml_nested_too_deeply_is_refused(tmp_path, capsys, style):
    if style == "flow":
        nested = "[" * 100_000 + "]" * 100_000
    else:
        nested = "\n" + "".join(" " * (2 * i) + "-\n" for i in range(1500))
    start = time.perf_counter()
    rc, err = cli(capsys, write_recipe(tmp_path, "merge_method: linear\nmodels: " + nested + "\n"), tmp_path / "out")
    assert time.perf_counter() - start < 5
    assert_refused(rc, err, tmp_path / "out", "nests too deeply")


def test_yaml_duplicate_key_is_refused_with_its_line(family, tmp_path, capsys):
    text = yaml.safe_dump(linear_recipe(family)) + "merge_method: ties\n"
    rc, err = cli(capsys, write_recipe(tmp_path, text), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", "recipe.yml: line \\d+: key 'merge_method' appears twice")


def test_yaml_python_tags_are_never_executed(tmp_path, capsys):
    marker = tmp_path / "executed"
    text = f"merge_method: !!python/object/apply:os.system ['touch {marker}']\nmodels: []\n"
    rc, err = cli(capsys, write_recipe(tmp_path, text), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", "not valid YAML", "could not determine a constructor")
    assert not marker.exists()


def test_pytorch_bin_only_model_is_refused_with_the_conversion_hint(family, tmp_path, capsys):
    model = tmp_path / "torch-model"
    model.mkdir()
    shutil.copy(family[1] / "config.json", model / "config.json")
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling this would create `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (model / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    rc, err = cli(capsys, write_recipe(tmp_path, linear_recipe([family[0], model])), tmp_path / "out")
    assert_refused(
        rc,
        err,
        tmp_path / "out",
        re.escape(str(model)),
        "pytorch_model.bin",
        "pickle",
        "never loaded",
        "convert them to safetensors",
        "safe_serialization=True",
    )
    assert not marker.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_config_that_is_a_named_pipe_does_not_hang(family, tmp_path, capsys):
    model = clone(family[1], tmp_path / "piped")
    (model / "config.json").unlink()
    os.mkfifo(model / "config.json")  # reading it would block for ever
    rc, err = cli(capsys, write_recipe(tmp_path, linear_recipe([family[0], model])), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", "config.json: cannot read config.json \\(not a regular file\\)")


# ---------------- the output location ----------------


def test_output_equal_to_an_input_is_refused_and_the_input_untouched(family, tmp_path, capsys):
    model = clone(family[1], tmp_path / "ft")
    before = tree_digest(model)
    recipe = write_recipe(tmp_path, linear_recipe([family[0], model]))
    rc, err = cli(capsys, recipe, model, "--force")
    assert rc == 2 and "is (inside) the input model" in err and "Traceback" not in err
    assert tree_digest(model) == before and not partial_of(model).exists()


def test_output_inside_an_input_is_refused(family, tmp_path, capsys):
    model = clone(family[1], tmp_path / "ft")
    rc, err = cli(capsys, write_recipe(tmp_path, linear_recipe([family[0], model])), model / "merged")
    assert_refused(rc, err, model / "merged", "is \\(inside\\) the input model")


def test_output_holding_an_input_is_refused_even_with_force(family, tmp_path, capsys):
    models = tmp_path / "models"
    model = clone(family[1], models / "ft")
    before = tree_digest(model)
    rc, err = cli(capsys, write_recipe(tmp_path, linear_recipe([family[0], model])), models, "--force")
    assert rc == 2 and "contains the input model" in err
    assert tree_digest(model) == before, "--force must never delete an input"


def test_existing_output_is_kept_without_force_and_resume_does_not_replace_it(family, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    recipe = write_recipe(tmp_path, linear_recipe(family))
    for extra in ([], ["--resume"]):
        rc, err = cli(capsys, recipe, out, *extra)
        assert rc == 2 and "already exists" in err and "--force" in err
        assert (out / "keep.txt").read_text() == "mine" and not partial_of(out).exists()


def test_force_replaces_a_model_but_never_a_folder_of_other_files(family, tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    recipe = write_recipe(tmp_path, linear_recipe(family))
    rc, err = cli(capsys, recipe, home, "--force")
    assert rc == 2 and "not an output of mergekit-mlx" in err
    assert (home / "notes.txt").read_text() == "mine" and not partial_of(home).exists()
    assert cli(capsys, recipe, tmp_path / "merged")[0] == 0
    assert cli(capsys, recipe, tmp_path / "merged", "--force")[0] == 0  # a previous merge is replaced


# ---------------- hostile safetensors files ----------------


def _valid_bytes(family) -> bytes:
    return (family[1] / "model.safetensors").read_bytes()


F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
LYING_HEADERS = {
    "offsets-past-the-end": ({"w": F32_4}, b"\0" * 8, None, "point outside the file's 8 data bytes"),
    "overlapping": (
        {"a": F32_4, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
        b"\0" * 24,
        None,
        "'a' and 'b' overlap",
    ),
    "absurd-shape": (
        {"w": {"dtype": "F32", "shape": [2**40, 2**40, 2**40], "data_offsets": [0, 16]}},
        b"\0" * 16,
        None,
        "needs more bytes than the file holds",
    ),
    "size-not-matching-shape": (
        {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}},
        b"\0" * 16,
        None,
        "needs 12 bytes",
    ),
    "bad-dtype": ({"w": {"dtype": "F33", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, None, "unknown dtype 'F33'"),
    "negative-dim": ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16, None, "non-negative integers"),
    "header-length-past-the-file": ({"w": F32_4}, b"\0" * 16, 10**6, "header claims 1000000 bytes but the file has"),
    "absurd-header-length": ({"w": F32_4}, b"\0" * 16, 2**63, "header claims .* bytes but the file has"),
    "header-not-json": (b"\x89PNG\r\n\x1a\n garbage", b"", None, "header is not valid JSON"),
    "duplicate-tensor-name": (
        b'{"w": ' + json.dumps(F32_4).encode() + b', "w": ' + json.dumps(F32_4).encode() + b"}",
        b"\0" * 16,
        None,
        "key 'w' appears twice",
    ),
    "nan-in-header": (
        b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "x": NaN}}',
        b"\0" * 16,
        None,
        "NaN is not JSON",
    ),
    "metadata-not-strings": (
        {"__metadata__": {"format": 1}, "w": F32_4},
        b"\0" * 16,
        None,
        "__metadata__ must be an object of strings",
    ),
}


@pytest.mark.parametrize("case", list(LYING_HEADERS))
def test_lying_safetensors_header_is_refused_naming_the_file(family, tmp_path, capsys, case):
    header, data, length, message = LYING_HEADERS[case]
    model = clone(family[1], tmp_path / "lying")
    raw_safetensors(model / "model.safetensors", header, data, length)
    rc, err = cli(capsys, write_recipe(tmp_path, linear_recipe([family[0], model])), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(str(model / "model.safetensors")), message)


@pytest.mark.parametrize("cut", ["in-the-data", "in-the-header", "in-the-length"])
def test_truncated_safetensors_file_is_refused(family, tmp_path, capsys, cut):
    model = clone(family[1], tmp_path / "cut")
    data = _valid_bytes(family)
    (header_len,) = struct.unpack("<Q", data[:8])
    keep = {"in-the-data": len(data) - 100, "in-the-header": 8 + header_len // 2, "in-the-length": 5}[cut]
    (model / "model.safetensors").write_bytes(data[:keep])
    rc, err = cli(capsys, write_recipe(tmp_path, linear_recipe([family[0], model])), tmp_path / "out")
    assert_refused(
        rc, err, tmp_path / "out", re.escape(str(model / "model.safetensors")), "truncated|outside the file|not a safetensors"
    )


def test_lying_header_is_refused_from_the_command_line(family, tmp_path):
    model = clone(family[1], tmp_path / "lying")
    raw_safetensors(model / "model.safetensors", {"w": F32_4}, b"\0" * 8)
    rc, err = cli_subprocess(write_recipe(tmp_path, linear_recipe([family[0], model])), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", "point outside the file")


# ---------------- index files pointing outside the model ----------------


@pytest.fixture
def sharded(family, tmp_path) -> Path:
    """A copy of a fine-tune stored as two shards with an index, as large models are."""
    model = tmp_path / "sharded"
    tiny.save_model(
        model, json.loads((family[1] / "config.json").read_text()), tiny.load_np(family[1]), shards=2, tokenizer=False
    )
    return model


def point_index(model: Path, target: str) -> None:
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = target
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("where", ["parent", "absolute", "subdirectory"])
def test_index_entry_outside_the_model_directory_is_refused(family, sharded, tmp_path, capsys, where):
    outside = shutil.copy(family[2] / "model.safetensors", tmp_path / "outside.safetensors")  # a real, readable file
    target = {"parent": "../outside.safetensors", "absolute": str(outside), "subdirectory": "sub/model.safetensors"}[where]
    point_index(sharded, target)
    rc, err = cli(capsys, write_recipe(tmp_path, linear_recipe([family[0], sharded])), tmp_path / "out")
    assert_refused(
        rc,
        err,
        tmp_path / "out",
        re.escape(str(sharded / "model.safetensors.index.json")),
        "must be a file name inside the model directory",
    )


def test_index_entry_that_is_a_symlink_out_of_the_model_is_refused(family, sharded, tmp_path, capsys):
    outside = shutil.copy(family[2] / "model.safetensors", tmp_path / "outside.safetensors")
    (sharded / "innocent.safetensors").symlink_to(outside)
    point_index(sharded, "innocent.safetensors")
    rc, err = cli(capsys, write_recipe(tmp_path, linear_recipe([family[0], sharded])), tmp_path / "out")
    assert_refused(
        rc,
        err,
        tmp_path / "out",
        re.escape(str(sharded / "model.safetensors.index.json")),
        "innocent.safetensors' resolves to .*outside.safetensors, outside the model directory",
    )


def test_weight_file_that_is_a_symlink_out_of_the_model_is_refused(family, tmp_path, capsys):
    model = clone(family[1], tmp_path / "linked")
    outside = (model / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (model / "model.safetensors").symlink_to(outside)
    rc, err = cli(capsys, write_recipe(tmp_path, linear_recipe([family[0], model])), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", "resolves to .*elsewhere.safetensors, outside the model directory")


def test_hugging_face_cache_snapshot_symlinks_are_accepted(family, tmp_path):
    """The hub cache stores snapshot files as symlinks into the repository's blobs: that is inside."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in family[1].iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    model = open_model(snapshot)
    assert sorted(model.tensor_names()) == sorted(tiny.load_np(family[1]))


def test_index_that_is_not_an_object_is_refused(family, sharded, tmp_path, capsys):
    (sharded / "model.safetensors.index.json").write_text("[1, 2, 3]")
    rc, err = cli(capsys, write_recipe(tmp_path, linear_recipe([family[0], sharded])), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", "needs a non-empty 'weight_map' object")


# ---------------- hostile GGUF files ----------------


def gguf_string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def gguf_kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gguf_string(key.encode()) + struct.pack("<I", vtype) + payload


def gguf_tensor(name: str, dims: tuple[int, ...], offset: int) -> bytes:  # an F32 tensor's info
    return gguf_string(name.encode()) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, 0, offset)


def hostile_gguf(path: Path, case: str) -> Path:
    """A llama GGUF with two F32 tensors, and one lie in it."""
    kvs = [gguf_kv("general.architecture", 8, gguf_string(b"llama"))]
    kvs += [
        gguf_kv(f"llama.{k}", 4, struct.pack("<I", v))
        for k, v in [("block_count", 1), ("embedding_length", 8), ("attention.head_count", 2)]
    ]
    infos = [gguf_tensor("token_embd.weight", (8, 4), 0), gguf_tensor("output_norm.weight", (8,), 128)]
    n_tensors, n_kv, data = len(infos), len(kvs), b"\0" * 160
    if case == "more-tensors-than-listed":
        n_tensors += 3
    elif case == "more-metadata-than-listed":
        n_kv += 2
    elif case == "offset-past-the-end":
        infos[1] = gguf_tensor("output_norm.weight", (8,), 10**6)
    elif case == "absurd-shape":
        infos[0] = gguf_tensor("token_embd.weight", (2**40, 2**40), 0)
    elif case == "absurd-array-count":
        kvs.append(gguf_kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 0, 2**60)))
        n_kv += 1
    elif case == "truncated":
        data = data[:100]
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + b"".join(kvs) + b"".join(infos)
    path.write_bytes(head + b"\0" * (-len(head) % 32) + data)
    return path


GGUF_LIES = {
    # what a reader meets after a wrong count depends on the bytes that follow; any clear refusal will do
    "more-tensors-than-listed": ": GGUF ",
    "more-metadata-than-listed": ": GGUF ",
    "offset-past-the-end": "tensor 'output_norm.weight' .* lies past the end of the file",
    "absurd-shape": "tensor 'token_embd.weight' claims shape \\[1099511627776, 1099511627776\\], larger than the file",
    "absurd-array-count": "claims an array of 1152921504606846976 items",
    "truncated": "tensor 'token_embd.weight' \\(128 bytes at data offset 0\\) lies past the end of the file",
}


def test_the_hostile_gguf_baseline_reads(tmp_path):
    model = open_model(hostile_gguf(tmp_path / "fine.gguf", "none"))
    assert sorted(model.tensor_names()) == ["model.embed_tokens.weight", "model.norm.weight"]


@pytest.mark.parametrize("case", list(GGUF_LIES))
def test_lying_gguf_file_is_refused_naming_the_file(family, tmp_path, capsys, case):
    bad = hostile_gguf(tmp_path / "bad.gguf", case)
    start = time.perf_counter()
    rc, err = cli(capsys, write_recipe(tmp_path, linear_recipe([family[0], bad])), tmp_path / "out")
    assert time.perf_counter() - start < 10
    assert_refused(rc, err, tmp_path / "out", re.escape(str(bad)), GGUF_LIES[case])


def test_gguf_array_count_that_hung_the_reader_is_refused_from_the_command_line(family, tmp_path):
    bad = hostile_gguf(tmp_path / "bad.gguf", "absurd-array-count")
    rc, err = cli_subprocess(write_recipe(tmp_path, linear_recipe([family[0], bad])), tmp_path / "out", timeout=30)
    assert_refused(rc, err, tmp_path / "out", re.escape(str(bad)), "claims an array of")


# ---------------- non-finite values ----------------

BAD_TENSOR = "model.layers.1.mlp.down_proj.weight"


def with_nonfinite(family, tmp_path, value) -> Path:
    def poison(w):
        w[BAD_TENSOR][3, 5] = value

    return rewrite(clone(family[1], tmp_path / "poisoned"), poison)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_input_stops_the_merge_naming_tensor_and_model(family, tmp_path, capsys, value):
    bad = with_nonfinite(family, tmp_path, value)
    recipe = write_recipe(tmp_path, linear_recipe([family[0], bad]))
    # small shards: some are finished when the bad tensor is met, and must be cleaned up
    rc, err = cli(capsys, recipe, tmp_path / "out", "--out-shard-size", "10K", "--batch-size", "10K")
    assert_refused(
        rc,
        err,
        tmp_path / "out",
        f"tensor {BAD_TENSOR}: NaN or Inf in the input {re.escape(str(bad))} \\({BAD_TENSOR}\\)",
        "--allow-nonfinite",
    )


def test_nonfinite_input_from_the_command_line(family, tmp_path):
    bad = with_nonfinite(family, tmp_path, float("nan"))
    rc, err = cli_subprocess(write_recipe(tmp_path, linear_recipe([family[0], bad])), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", BAD_TENSOR, re.escape(str(bad)))


def test_allow_nonfinite_merges_and_keeps_nan_only_where_an_input_had_it(family, tmp_path, capsys):
    bad = with_nonfinite(family, tmp_path, float("nan"))
    rc, err = cli(capsys, write_recipe(tmp_path, linear_recipe([family[0], bad])), tmp_path / "out", "--allow-nonfinite")
    assert rc == 0, err
    got, a, b = tiny.load_np(tmp_path / "out"), tiny.load_np(family[0]), tiny.load_np(bad)
    for name in got:
        ref = 0.5 * a[name] + 0.5 * b[name]
        np.testing.assert_array_equal(np.isfinite(got[name]), np.isfinite(ref), err_msg=name)
        np.testing.assert_allclose(got[name][np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-5, atol=1e-6)
    assert int(np.isnan(got[BAD_TENSOR]).sum()) == 1


def test_nonfinite_input_is_reported_even_when_the_method_drops_it(family, tmp_path, capsys):
    bad = with_nonfinite(family, tmp_path, float("nan"))
    rc, err = cli(capsys, write_recipe(tmp_path, ties_recipe([family[0], bad, family[2]])), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", f"tensor {BAD_TENSOR}: NaN or Inf in the input {re.escape(str(bad))}")


def test_a_merge_producing_nan_from_finite_inputs_is_stopped_even_with_allow_nonfinite(family, tmp_path, capsys, monkeypatch):
    executor = importlib.import_module("mergekit_mlx.pipeline")
    real = executor.merge_task

    def faulty(plan, task, opts, vocab=None, tensors=None, *rest, **kw):  # a method bug: NaN out of finite inputs
        out, ok = real(plan, task, opts, vocab, tensors, *rest, **kw)
        if task.out.name == BAD_TENSOR:
            out = out * mx.array(float("nan"))
            ok = mx.all(mx.isfinite(out))
        return out, ok

    monkeypatch.setattr(executor, "merge_task", faulty)
    rc, err = cli(
        capsys,
        write_recipe(tmp_path, linear_recipe(family)),
        tmp_path / "out",
        "--allow-nonfinite",
        "--out-shard-size",
        "10K",
        "--batch-size",
        "10K",
    )
    assert_refused(rc, err, tmp_path / "out", f"tensor {BAD_TENSOR}: the merge produced NaN or Inf although no input has any")


@pytest.fixture(scope="module")
def degenerate(tmp_path_factory) -> dict[str, Path]:
    """Finite inputs that are edge cases for the math: identical models, zero tensors, opposite signs."""
    root = tmp_path_factory.mktemp("degenerate")
    cfg = tiny.llama_config(layers=2)
    w = tiny.llama_weights(cfg, np.random.default_rng(3))
    variants = {"a": w, "a2": w, "a3": w, "neg": {k: -v for k, v in w.items()}}
    variants.update({z: {k: np.zeros_like(v) for k, v in w.items()} for z in ("z", "z2", "z3")})
    return {name: tiny.save_model(root / name, cfg, weights, tokenizer=False) for name, weights in variants.items()}


DEGENERATE_CASES = {
    "identical": ["a", "a2", "a3"],
    "zero-task-vectors": ["z", "z2", "z3"],
    "zero-base": ["z", "a", "a2"],
    "opposite": ["a", "neg", "a2"],
}


@pytest.mark.parametrize("case", list(DEGENERATE_CASES))
@pytest.mark.parametrize("method", sorted(all_methods()))
def test_no_method_writes_nan_from_finite_degenerate_inputs(degenerate, method, case):
    m = all_methods()[method]
    paths = [degenerate[n] for n in DEGENERATE_CASES[case][: min(m.max_inputs or 3, 3)]]
    if method == "passthrough":
        paths = paths[:1]
    shared, per_model = {}, {}
    for p in m.params:  # every required parameter set, plus a density that really sparsifies
        if p.required or p.name == "density":
            value = {"weight": 1.0, "density": 0.5}.get(p.name, {bool: True, int: 1}.get(p.kind, 0.5))
            (shared if p.scope == "shared" else per_model)[p.name] = value
    recipe = {"merge_method": method, "models": [{"model": str(p), "parameters": per_model} for p in paths], "parameters": shared}
    if m.base != "none":
        recipe["base_model"] = str(paths[0])
    result = merge(recipe)
    for name, value in result.weights.items():
        assert bool(mx.all(mx.isfinite(value)).item()), f"{method} on {case}: {name} is not finite"


def test_gguf_output_is_written_and_leaves_no_partial_directory(family, tmp_path, capsys):
    """Regression: the resume bookkeeping took the GGUF writer's tensor names for shard files."""
    rc, err = cli(capsys, write_recipe(tmp_path, linear_recipe(family)), tmp_path / "out", "--out-format", "gguf-f16")
    assert rc == 0, err
    assert len(open_model(tmp_path / "out").tensor_names()) == len(tiny.load_np(family[0]))
    assert not partial_of(tmp_path / "out").exists()


def test_output_is_verified_before_it_is_renamed_into_place(family, tmp_path, capsys, monkeypatch):
    real = SafetensorsWriter._write

    def loses_a_tensor(self, i, arrays):  # a writer bug: one tensor never reaches the file
        arrays.pop(BAD_TENSOR, None)
        real(self, i, arrays)

    monkeypatch.setattr(SafetensorsWriter, "_write", loses_a_tensor)
    rc, err = cli(capsys, write_recipe(tmp_path, linear_recipe(family)), tmp_path / "out", "--out-shard-size", "10K")
    assert_refused(
        rc, err, tmp_path / "out", f"verifying .* failed: tensor {BAD_TENSOR} should be \\[32, 48\\] F32, found missing"
    )


# ---------------- a full disk ----------------


def test_disk_full_while_writing_removes_the_partial_output_and_says_the_space_needed(family, tmp_path, capsys, monkeypatch):
    recipe = write_recipe(tmp_path, linear_recipe(family))
    need = dry_run_bytes_written(capsys, recipe)
    total = sum(v.size * 4 for v in tiny.load_np(family[0]).values())  # float32 tensors, counted independently
    assert need == f"{total / 1000:.1f} KB"
    real = SafetensorsWriter._write
    written = []

    def fills_up(self, i, arrays):  # the first shard fits, the second finds the disk full
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(i)
        real(self, i, arrays)

    monkeypatch.setattr(SafetensorsWriter, "_write", fills_up)
    rc, err = cli(capsys, recipe, tmp_path / "out", "--out-shard-size", "20K")
    assert written, "the first shard should have been written before the disk filled up"
    assert_refused(rc, err, tmp_path / "out", "no space left on the device", f"needs about {need}", "partial output was removed")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_write_failure_on_a_full_device_is_a_clean_error(family, tmp_path, capsys, monkeypatch):
    """A real failed write (/dev/full) while a shard streams out, not a simulated one."""
    import builtins

    import mergekit_mlx.formats.safetensors as writer

    def to_full(path, mode="r", *args, **kw):  # the shard file lands on a device that is full
        return builtins.open("/dev/full" if str(path).endswith(".safetensors") and "w" in mode else path, mode, *args, **kw)

    monkeypatch.setattr(writer, "open", to_full, raising=False)
    rc, err = cli(capsys, write_recipe(tmp_path, linear_recipe(family)), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", "cannot write .*out: no space left on the device", "needs about .* of free space")


def test_too_little_free_space_is_refused_before_merging(family, tmp_path, capsys, monkeypatch):
    import mergekit_mlx.output as output

    recipe = write_recipe(tmp_path, linear_recipe(family))
    need = dry_run_bytes_written(capsys, recipe)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(output.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 500, 500))
    out = tmp_path / "new" / "folders" / "out"  # parents that do not exist yet are on the same device
    rc, err = cli(capsys, recipe, out)
    assert_refused(rc, err, out, f"needs about {need}", "has 500 B free")
    assert not (tmp_path / "new").exists()


# ---------------- interruption and resume ----------------


def shard_stats(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.glob("model-*-of-*.safetensors")}


def test_ctrl_c_keeps_the_partial_output_and_resume_finishes_it_identically(family, tmp_path, capsys, monkeypatch):
    recipe = write_recipe(tmp_path, ties_recipe(family))
    shards = ["--out-shard-size", "10K", "--batch-size", "10K"]
    assert cli(capsys, recipe, tmp_path / "reference", *shards)[0] == 0
    real = SafetensorsWriter._write

    def interrupted(self, i, arrays):
        if len(self.written) == 2:
            raise KeyboardInterrupt
        real(self, i, arrays)

    monkeypatch.setattr(SafetensorsWriter, "_write", interrupted)
    out = tmp_path / "out"
    rc, err = cli(capsys, recipe, out, *shards)
    assert rc == 130 and "--resume" in err
    assert not out.exists() and len(shard_stats(partial_of(out))) == 2
    kept = shard_stats(partial_of(out))

    # a rerun with a recipe error is refused before anything is touched: the finished shards stay
    typo = write_recipe(tmp_path, dict(ties_recipe(family), merge_method="tiez"), "typo.yml")
    assert cli(capsys, typo, out, "--resume", *shards)[0] == 2
    assert shard_stats(partial_of(out)) == kept

    monkeypatch.setattr(SafetensorsWriter, "_write", real)
    rc, err = cli(capsys, recipe, out, "--resume", *shards)
    assert rc == 0, err
    assert tree_digest(out) == tree_digest(tmp_path / "reference")
    assert {k: shard_stats(out)[k] for k in kept} == kept, "resume rewrote shards that were already finished"
    assert not partial_of(out).exists()


def test_resume_after_a_different_recipe_starts_over(family, tmp_path, capsys, monkeypatch):
    recipe = write_recipe(tmp_path, ties_recipe(family))
    shards = ["--out-shard-size", "10K", "--batch-size", "10K"]
    real = SafetensorsWriter._write

    def interrupted(self, i, arrays):
        if len(self.written) == 2:
            raise KeyboardInterrupt
        real(self, i, arrays)

    monkeypatch.setattr(SafetensorsWriter, "_write", interrupted)
    assert cli(capsys, recipe, tmp_path / "out", *shards)[0] == 130
    monkeypatch.setattr(SafetensorsWriter, "_write", real)
    other = write_recipe(tmp_path, ties_recipe(family, density=0.3), "other.yml")
    assert cli(capsys, other, tmp_path / "out", "--resume", *shards)[0] == 0
    assert cli(capsys, other, tmp_path / "reference", *shards)[0] == 0
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "reference")


@pytest.fixture(scope="module")
def larger_family(tmp_path_factory) -> list[Path]:
    """Big enough (about 18 MB a model) that a merge writes 20-odd 1 MB shards over about a second."""
    return tiny.make_family(tmp_path_factory.mktemp("larger"), layers=6, hidden=256, inter=512, vocab=2048)


@pytest.mark.slow
def test_sigkill_mid_merge_then_resume_gives_the_same_bytes(larger_family, tmp_path):
    recipe = write_recipe(tmp_path, ties_recipe(larger_family))
    shards = ["--out-shard-size", "1M", "--batch-size", "1M"]
    rc, err = cli_subprocess(recipe, tmp_path / "reference", *shards)
    assert rc == 0, err
    total = len(shard_stats(tmp_path / "reference"))
    assert total >= 10

    out = tmp_path / "out"
    state = partial_of(out) / ".mergekit-mlx-state.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergekit_mlx", "run", str(recipe), str(out), "--no-progress", *shards],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    recorded = {}
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            state_now = json.loads(state.read_text())  # replaced atomically: always whole
            # a shard is kept by a resume once the inputs' identities are recorded too
            recorded = state_now["shards"] if state_now.get("inputs") else {}
        except (OSError, ValueError, KeyError):
            recorded = {}
        if recorded:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the merge ended before a shard was recorded; the model is too small"
    assert not out.exists()
    kept = {name: stat for name, stat in shard_stats(partial_of(out)).items() if name in recorded}
    assert 1 <= len(kept) < total

    rc, err = cli_subprocess(recipe, out, "--resume", *shards)
    assert rc == 0, err
    assert tree_digest(out) == tree_digest(tmp_path / "reference")
    assert {k: shard_stats(out)[k] for k in kept} == kept, "resume rewrote shards that were already finished"
    assert not partial_of(out).exists()
