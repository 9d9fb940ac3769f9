"""Recipes, parameters and run options are untrusted: every bad one is refused before anything is read.

Each case is run through the command line, as a user would: the exit code is 2, stderr is one
paragraph that starts `mergekit-mlx: error:` and names the file, the YAML key or the flag, there
is no traceback, and no output (nor its `.NAME.partial` sibling) appears. Many recipes here name
models that do not exist: the check under test must fire before a model is even looked up.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
import yaml

from mergekit_mlx import merge
from mergekit_mlx.cli import main as cli_main
from mergekit_mlx.errors import RecipeError
from mergekit_mlx.methods import all_methods
from mergekit_mlx.options import MergeOptions
from mergekit_mlx.plan import make_plan
from mergekit_mlx.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
INF, NAN = float("inf"), float("nan")


def write(tmp_path: Path, recipe, name: str = "recipe.yml") -> Path:
    path = tmp_path / name
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return path


def run(capsys, recipe: Path, out: Path, *flags: str) -> tuple[int, str]:
    rc = cli_main(["run", str(recipe), str(out), "--no-progress", *flags])
    return rc, capsys.readouterr().err


def assert_refused(rc: int, err: str, out: Path, *patterns: str) -> None:
    assert rc == 2, err
    assert err.startswith("mergekit-mlx: error: "), err
    assert "Traceback" not in err, err
    assert "\n\n" not in err.strip(), "the message is more than one paragraph"
    for p in patterns:
        assert re.search(p, err), f"{p!r} not in {err!r}"
    assert not out.exists(), "a refused run left an output"
    assert not (out.parent / f".{out.name}.partial").exists(), "a refused run left its temporary output"


def ties(base, *others, **params) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5, **params}} for m in others],
    }


# ---------------- the recipe file ----------------


def test_recipe_file_that_is_missing_is_named(tmp_path, capsys):
    rc, err = run(capsys, tmp_path / "nothing.yml", tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(str(tmp_path / "nothing.yml")), "cannot read the recipe", "No such file")


def test_recipe_that_is_a_directory_is_named(tmp_path, capsys):
    (tmp_path / "dir.yml").mkdir()
    rc, err = run(capsys, tmp_path / "dir.yml", tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(str(tmp_path / "dir.yml")), "a directory", "YAML file")


def test_recipe_that_is_not_utf8_names_the_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "latin1.yml"
    recipe.write_bytes(b"merge_method: linear\nmodels:\n  - model: caf\xe9\n")
    rc, err = run(capsys, recipe, tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(str(recipe)), "not UTF-8", "0xe9 on line 3")


@pytest.mark.parametrize(
    "make",
    [
        lambda d: d / ("a" * 5000 + ".yml"),  # longer than PATH_MAX
        lambda d: d / ("b" * 300 + ".yml"),  # one name longer than NAME_MAX
    ],
    ids=["5000-char-path", "300-char-name"],
)
def test_recipe_path_too_long_for_the_file_system_is_a_short_clean_error(tmp_path, capsys, make):
    rc, err = run(capsys, make(tmp_path), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", "cannot read the recipe", "File name too long")
    assert len(err) < 600, "the message repeats the whole path"


def test_recipe_larger_than_any_recipe_is_refused_unread(tmp_path, capsys):
    recipe = tmp_path / "huge.yml"
    with open(recipe, "wb") as f:
        f.truncate(10**10)  # sparse: 10 GB that reading would take minutes
    rc, err = run(capsys, recipe, tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(str(recipe)), "a merge recipe is at most")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_recipe_that_is_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "fifo.yml"
    os.mkfifo(fifo)
    proc = subprocess.run(
        [sys.executable, "-m", "mergekit_mlx", "run", str(fifo), str(tmp_path / "out"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert_refused(proc.returncode, proc.stderr, tmp_path / "out", re.escape(str(fifo)), "not a regular file")


# ---------------- numbers and booleans in the YAML ----------------


def test_integer_too_long_for_python_is_refused_naming_its_line(tmp_path, capsys):
    text = f"merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n    parameters: {{weight: {'1' * 5001}}}\n"
    rc, err = run(capsys, write(tmp_path, text), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", "line 5: an integer of 5001 digits")


@pytest.mark.parametrize(
    "yaml_value, problem",
    [
        ("1e999", "must be a finite number, got inf"),
        ("-.inf", "must be a finite number, got -inf"),
        (".nan", "must be a finite number, got nan"),
        ("'nan'", "must be a finite number, got nan"),
        ("'1e999'", "must be a finite number, got inf"),
        ("true", "must be a number, got True"),
        ("half", "must be a number, got 'half'"),
        ("{a: 1}", r"is not a recipe key|Input should be"),
    ],
)
def test_density_that_is_not_a_finite_number_is_refused_naming_the_key(tmp_path, capsys, yaml_value, problem):
    text = f"merge_method: ties\nbase_model: b\nmodels:\n  - model: m\n    parameters: {{weight: 1, density: {yaml_value}}}\n"
    rc, err = run(capsys, write(tmp_path, text), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", r"models\[0\]\.parameters\.density", problem)


@pytest.mark.parametrize("yaml_value", ["1", "0", "'yes'", "'true'", "0.5"])
def test_boolean_parameter_takes_only_true_or_false(tmp_path, capsys, yaml_value):
    text = f"merge_method: ties\nbase_model: b\nparameters: {{normalize: {yaml_value}}}\nmodels:\n  - model: m\n    parameters: {{weight: 1}}\n"
    rc, err = run(capsys, write(tmp_path, text), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", r"parameters\.normalize: must be true or false")


@pytest.mark.parametrize(
    "setting, key",
    [
        ([0.5, 1.5], r"density\[1\]"),
        ([0.5, NAN, 0.5], r"density\[1\]"),
        ([{"filter": "mlp", "value": 0.5}, {"value": -0.5}], r"density\[1\]\.value"),
        ([{"filter": "mlp", "value": [0.2, INF]}], r"density\[0\]\.value\[1\]"),
    ],
    ids=["gradient-point", "gradient-nan", "filter-value", "filter-gradient"],
)
def test_every_point_of_a_gradient_and_every_filter_value_is_checked(tmp_path, capsys, setting, key):
    recipe = ties("b", "m")
    recipe["models"][0]["parameters"]["density"] = setting
    rc, err = run(capsys, write(tmp_path, recipe), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", r"models\[0\]\.parameters\." + key)


def test_numeric_strings_are_read_as_numbers_as_mergekit_reads_them(family, tmp_path, capsys):
    recipe = ties(*family)
    recipe["models"][0]["parameters"]["density"] = "0.5"
    assert cli_main(["run", str(write(tmp_path, recipe)), "--dry-run"]) == 0


def test_layer_range_takes_whole_numbers_only(tmp_path, capsys):
    text = "merge_method: passthrough\nslices:\n  - sources:\n      - model: m\n        layer_range: [0, true]\n"
    rc, err = run(capsys, write(tmp_path, text), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", r"slices\[0\]\.sources\[0\]\.layer_range")


@pytest.mark.parametrize("pad", [0, -8, 10**6, True])
def test_pad_to_multiple_of_is_a_small_positive_integer(tmp_path, capsys, pad):
    recipe = dict(ties("b", "m"), tokenizer={"source": "union", "pad_to_multiple_of": pad})
    rc, err = run(capsys, write(tmp_path, recipe), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", r"tokenizer\.pad_to_multiple_of")


# ---------------- model references ----------------


@pytest.mark.parametrize(
    "ref, problem",
    [
        ("", "must name a model"),
        ("   ", "must name a model"),
        ("x" * 5000, "is 5000 characters long"),
        ("models/" + "y" * 300, "each part between slashes at most 255"),
        ("a\0b", "NUL"),
    ],
    ids=["empty", "blank", "5000-chars", "300-char-part", "nul"],
)
@pytest.mark.parametrize("key", ["models[1].model", "base_model"])
def test_model_reference_that_cannot_name_a_model_is_refused(tmp_path, capsys, ref, problem, key):
    recipe = ties("b", "m1", "m2")
    if key == "base_model":
        recipe["base_model"] = ref
    else:
        recipe["models"][1]["model"] = ref
    rc, err = run(capsys, write(tmp_path, recipe), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(key), problem)
    assert len(err) < 600, "the message repeats the whole reference"


# ---------------- parameter ranges, method by method ----------------

# The valid values of every numeric parameter of every method, written down independently of the
# code: (method, parameter) -> (values refused, values accepted). The ends follow from the math:
# a density is a fraction kept (0 would keep nothing; mergekit fails on it), select_topk 0 would
# keep nothing and silently return the base, karcher's tol must be > 0 or its loop never ends, ...
RANGES = {
    **{
        (m, "weight"): ([INF, -INF, NAN], [-1.0, 0.0, 2.5])
        for m in (
            "linear",
            "task_arithmetic",
            "ties",
            "dare_linear",
            "dare_ties",
            "breadcrumbs",
            "breadcrumbs_ties",
            "della_linear",
            "della",
        )
    },
    **{
        (m, "density"): ([0.0, -0.01, 1.01, NAN], [1e-3, 0.3, 1.0])
        for m in (
            "task_arithmetic",
            "ties",
            "dare_linear",
            "dare_ties",
            "breadcrumbs",
            "breadcrumbs_ties",
            "della_linear",
            "della",
        )
    },
    **{
        (m, "lambda"): ([INF, NAN], [-1.0, 0.0, 1.5])
        for m in (
            "task_arithmetic",
            "ties",
            "dare_linear",
            "dare_ties",
            "breadcrumbs",
            "breadcrumbs_ties",
            "della_linear",
            "della",
        )
    },
    **{(m, "gamma"): ([-0.01, 1.01], [0.0, 0.01, 1.0]) for m in ("breadcrumbs", "breadcrumbs_ties")},
    **{(m, "epsilon"): ([-0.01, 0.5, 0.6], [0.0, 0.15, 0.49]) for m in ("della_linear", "della")},
    ("passthrough", "scale"): ([INF, NAN], [-1.0, 0.0, 2.0]),
    ("slerp", "t"): ([-0.01, 1.01, NAN], [0.0, 0.5, 1.0]),
    ("nearswap", "t"): ([0.0, -1.0, INF], [1e-6, 0.5, 100.0]),
    ("nuslerp", "weight"): ([-0.5, INF], [0.0, 0.5, 3.0]),
    ("multislerp", "weight"): ([-0.5, INF], [0.0, 0.5, 3.0]),
    ("multislerp", "eps"): ([0.0, -1e-8, 0.1], [1e-12, 1e-8, 1e-2]),
    ("karcher", "max_iter"): ([0, -1, 1001, 10**12, 2.5], [1, 10, 1000]),
    ("karcher", "tol"): ([0.0, -1.0, 0.1], [1e-12, 1e-5, 1e-2]),
    ("sce", "select_topk"): ([0.0, -0.5, 1.01], [1e-3, 0.5, 1.0]),
    ("ram", "epsilon"): ([-1e-5, 1.0], [0.0, 1e-5, 0.5]),
    ("ramplus_tl", "epsilon"): ([0.0, -1e-5, 1.0], [1e-8, 1e-5, 0.5]),
    ("ramplus_tl", "r"): ([-0.1, 10.5, NAN], [0.0, 0.1, 10.0]),
    ("ramplus_tl", "alpha"): ([-0.1, 10.5, INF], [0.0, 0.2, 10.0]),
    **{(m, "weight"): ([INF, -INF, NAN], [-1.0, 0.0, 2.5]) for m in ("consensus_ta", "consensus_ties")},
    **{(m, "density"): ([0.0, -0.01, 1.01, NAN], [1e-3, 0.3, 1.0]) for m in ("consensus_ta", "consensus_ties")},
    **{(m, "k"): ([-1, 2.5, INF], [0, 1]) for m in ("consensus_ta", "consensus_ties")},
    **{(m, "lambda"): ([-0.1, INF, NAN], [0.0, 0.5, 3.0]) for m in ("consensus_ta", "consensus_ties")},
    ("magmax", "scaling_factor"): ([INF, NAN], [-1.0, 0.0, 0.5, 2.0]),
    ("pcb", "density"): ([0.0, -0.1, 1.01, NAN], [1e-3, 0.5, 1.0]),
    ("pcb", "weight"): ([INF, -INF, NAN], [-1.0, 0.0, 1.5]),
    ("iso_c", "scaling_factor"): ([INF, NAN], [-1.0, 0.0, 1.0, 2.5]),
    ("iso_cts", "scaling_factor"): ([INF, NAN], [-1.0, 0.0, 1.0, 2.5]),
    ("iso_cts", "common_space_fraction"): ([-0.01, 1.01, NAN], [0.0, 0.8, 1.0]),
    ("tsv_m", "weight"): ([INF, -INF, NAN], [-1.0, 0.0, 2.5]),
    ("tsv_m", "alpha"): ([INF, NAN], [-1.0, 0.0, 1.0, 2.5]),
    ("wudi", "iter_num"): ([-1, 100_001, 2.5, 10**12], [0, 400, 100_000]),
    ("wudi", "learning_rate"): ([0.0, -1e-5, 1.5, NAN], [1e-8, 1e-5, 1.0]),
}


def test_every_numeric_parameter_of_every_method_has_a_range_and_a_row_here():
    declared = set()
    for m in all_methods().values():
        for p in m.params:
            if p.kind is not bool:
                assert p.valid is not None, f"{m.name}.{p.name} declares no range"
                declared.add((m.name, p.name))
    assert declared == set(RANGES), "a parameter was added or removed: give it a range and a row in RANGES"


def test_every_boolean_parameter_defaults_to_a_boolean():
    for m in all_methods().values():
        for p in m.params:
            if p.kind is bool:
                assert isinstance(p.default, bool), f"{m.name}.{p.name}"


def recipe_setting(method: str, name: str, value, models) -> dict:
    """A recipe of `method` over `models` (base first) that sets `name` to `value` where it belongs."""
    m = all_methods()[method]
    param = m.param(name)
    base, *others = models
    count = max(m.min_inputs - (m.base != "none"), 1) if m.max_inputs is None else m.max_inputs - 1
    others = (others * 3)[:count] if method != "passthrough" else []
    params = {p.name: 0.5 for p in m.params if p.required}
    recipe: dict = {"merge_method": method, "base_model": str(base), "parameters": dict(params)}
    if method == "passthrough":
        recipe = {"merge_method": method, "models": [{"model": str(base), "parameters": {name: value}}]}
        return recipe
    recipe["models"] = [{"model": str(o), "parameters": dict(params)} for o in others]
    if param.scope == "shared":
        recipe["parameters"][name] = value
    else:
        recipe["models"][0]["parameters"][name] = value
    return recipe


CASES = [(m, p, v) for (m, p), (bad, _) in sorted(RANGES.items()) for v in bad]


@pytest.mark.parametrize("method, name, value", CASES, ids=[f"{m}-{p}={v}" for m, p, v in CASES])
def test_out_of_range_parameter_is_refused_before_any_model_is_looked_up(tmp_path, capsys, method, name, value):
    recipe = recipe_setting(method, name, value, [tmp_path / "no-base", tmp_path / "no-a", tmp_path / "no-b"])
    rc, err = run(capsys, write(tmp_path, recipe), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", rf"parameters\.{name}: must be")
    assert "not found" not in err


GOOD = [(m, p, v) for (m, p), (_, good) in sorted(RANGES.items()) for v in good]


@pytest.mark.parametrize("method, name, value", GOOD, ids=[f"{m}-{p}={v}" for m, p, v in GOOD])
def test_in_range_parameter_is_accepted(family4, method, name, value):
    recipe = recipe_setting(method, name, value, family4)
    if method in ("della", "della_linear") and name == "density":
        recipe["parameters"]["epsilon"] = 0.0  # any density in (0, 1] then keeps density +/- epsilon inside (0, 1)
    plan = make_plan(load_recipe(recipe))
    assert plan.tasks


def test_karcher_with_a_negative_tol_and_a_huge_max_iter_is_refused_at_once(tmp_path, capsys):
    recipe = {"merge_method": "karcher", "parameters": {"tol": -1, "max_iter": 10**9}, "models": [{"model": "a"}, {"model": "b"}]}
    rc, err = run(capsys, write(tmp_path, recipe), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", r"parameters\.(tol|max_iter): must be in")


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda r: r["models"][0]["parameters"].update(density=0.9, gamma=0.5),
            r"models\[0\]\.parameters: density \+ gamma must be at most 1",
        ),
        (
            lambda r: r["models"][0]["parameters"].update(density=0.2, epsilon=0.3),
            r"models\[0\]\.parameters: density \+/- epsilon must lie in \(0, 1\)",
        ),
    ],
    ids=["breadcrumbs-density-plus-gamma", "della-density-minus-epsilon"],
)
def test_parameters_that_cannot_work_together_are_refused_naming_the_model(family, tmp_path, capsys, change, message):
    recipe = ties(*family)
    recipe["merge_method"] = "breadcrumbs" if "gamma" in message else "della"
    change(recipe)
    rc, err = run(capsys, write(tmp_path, recipe), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", message)


def test_a_parameter_this_method_does_not_take_is_refused(tmp_path, capsys):
    recipe = {"merge_method": "slerp", "base_model": "b", "parameters": {"t": 0.5, "density": 0.5}, "models": [{"model": "m"}]}
    rc, err = run(capsys, write(tmp_path, recipe), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", r"parameters\.density: not a parameter of slerp, but of .*ties", "slerp takes: t")


def test_nuslerp_weights_that_are_both_zero_are_refused_before_reading(family, tmp_path, capsys):
    base, a, b = family
    recipe = {
        "merge_method": "nuslerp",
        "models": [{"model": str(a), "parameters": {"weight": 0}}, {"model": str(b), "parameters": {"weight": 0}}],
    }
    rc, err = run(capsys, write(tmp_path, recipe), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", r"parameters: the two weights sum to 0")


def test_multislerp_weights_that_are_all_zero_are_refused_before_reading(family, tmp_path, capsys):
    base, a, b = family
    recipe = {
        "merge_method": "multislerp",
        "models": [{"model": str(a), "parameters": {"weight": 0}}, {"model": str(b), "parameters": {"weight": 0}}],
    }
    rc, err = run(capsys, write(tmp_path, recipe), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", r"parameters: the weights sum to 0")


# ---------------- the same model twice ----------------


def spellings(model: Path, tmp_path: Path) -> dict:
    link = tmp_path / "link-to-model"
    link.symlink_to(model, target_is_directory=True)
    rel = os.path.relpath(model, tmp_path)
    return {
        "trailing-slash": (rel, rel + "/"),
        "dot-slash": (rel, "./" + rel),
        "absolute": (rel, str(model)),
        "symlink": (str(model), str(link)),
    }


@pytest.mark.parametrize("spelling", ["trailing-slash", "dot-slash", "absolute", "symlink"])
def test_the_same_model_twice_in_models_is_refused_under_any_spelling(family, tmp_path, capsys, spelling):
    first, second = spellings(family[1], tmp_path)[spelling]
    recipe = ties(family[0], first, second)
    rc, err = run(capsys, write(tmp_path, recipe), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", r"models\[1\]\.model: .* is already models\[0\]", "list each model once")


@pytest.mark.parametrize("spelling", ["trailing-slash", "symlink"])
def test_the_same_model_twice_in_one_slice_is_refused(family, tmp_path, capsys, spelling):
    first, second = spellings(family[1], tmp_path)[spelling]
    recipe = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {"model": first, "layer_range": [0, 2], "parameters": {"weight": 1}},
                    {"model": second, "layer_range": [0, 2], "parameters": {"weight": 1}},
                ]
            }
        ],
    }
    rc, err = run(capsys, write(tmp_path, recipe), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", r"slices\[0\]\.sources\[1\]\.model: .* is already slices\[0\]\.sources\[0\]")


def test_the_same_model_in_different_slices_is_a_frankenmerge_and_accepted(family, tmp_path):
    first, second = spellings(family[1], tmp_path)["symlink"]
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": first, "layer_range": [0, 2]}]},
            {"sources": [{"model": second, "layer_range": [0, 2]}]},
        ],
    }
    assert make_plan(load_recipe(recipe), recipe_dir=tmp_path).out_layers == 4


def test_the_base_model_listed_among_the_models_under_another_spelling_is_one_input(family, tmp_path):
    base, a, _ = family
    recipe = ties(str(base) + "/", a)
    recipe["models"].insert(0, {"model": str(base), "parameters": {"weight": 1.0}})
    plan = make_plan(load_recipe(recipe))
    assert {len(t.inputs) for t in plan.tasks} == {2}


# ---------------- the model's own config ----------------


@pytest.mark.parametrize("value", ["two", 0, -2, 2.0, True])
def test_config_layer_count_that_is_not_a_positive_integer_is_refused(family, tmp_path, capsys, value):
    model = shutil.copytree(family[1], tmp_path / "odd-config")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=value)))
    recipe = {"merge_method": "linear", "models": [{"model": str(model), "parameters": {"weight": 1.0}}]}
    rc, err = run(capsys, write(tmp_path, recipe), tmp_path / "out")
    assert_refused(rc, err, tmp_path / "out", re.escape(str(model / "config.json")), "num_hidden_layers")


def test_config_counting_fewer_layers_than_the_tensors_hold_is_refused(family, tmp_path, capsys):
    short = shutil.copytree(family[1], tmp_path / "short-config")
    cfg = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=1)))
    recipe = {"merge_method": "linear", "models": [{"model": str(short), "parameters": {"weight": 1.0}}]}
    rc, err = run(capsys, write(tmp_path, recipe), tmp_path / "out")
    assert_refused(
        rc, err, tmp_path / "out", re.escape(str(short / "config.json")), "num_hidden_layers is 1", "belongs to layer 1"
    )


# ---------------- run options ----------------


@pytest.mark.parametrize(
    "options, flag",
    [
        ({"out_format": "mlx-q4", "group_size": 0}, "--group-size"),  # silently 64 before; mx.quantize(0) kills the process
        ({"out_format": "mlx-q4", "group_size": 48}, "--group-size"),
        ({"out_format": "mlx-mxfp4", "group_size": 64}, "--group-size"),
        ({"group_size": 64}, "--group-size"),  # hf output: no groups to size
        ({"out_shard_size": 0}, "--out-shard-size"),
        ({"batch_bytes": 0}, "--batch-size"),
        ({"random_seed": -1}, "--random-seed"),
        ({"random_seed": 2**64}, "--random-seed"),
        ({"random_seed": True}, "--random-seed"),
        ({"device": "tpu"}, "--device"),
        ({"out_format": "onnx"}, "--out-format"),
    ],
    ids=[
        "group-0",
        "group-48",
        "mxfp4-group-64",
        "group-on-hf",
        "shard-0",
        "batch-0",
        "seed-negative",
        "seed-2**64",
        "seed-bool",
        "device",
        "format",
    ],
)
def test_run_option_that_cannot_work_is_refused_naming_the_flag_before_reading(family, tmp_path, options, flag):
    recipe = write(tmp_path, ties(*family))
    with pytest.raises(RecipeError, match=re.escape(flag)):
        merge(recipe, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / ".out.partial").exists()


# what each MLX output format asks mx.quantize for: (mode, bits)
QUANT_MODES = {"mlx-q4": ("affine", 4), "mlx-q8": ("affine", 8), "mlx-mxfp4": ("mxfp4", 4)}


@pytest.mark.parametrize("out_format", sorted(QUANT_MODES))
@pytest.mark.parametrize("group_size", [16, 32, 64, 128, 256])
def test_group_sizes_accepted_are_exactly_those_mx_quantize_accepts(out_format, group_size):
    mode, bits = QUANT_MODES[out_format]
    try:
        mx.eval(mx.quantize(mx.ones((4, 512)), group_size=group_size, bits=bits, mode=mode))
        quantizes = True
    except ValueError:
        quantizes = False
    try:
        MergeOptions(out_format=out_format, group_size=group_size).check()
        accepted = True
    except RecipeError:
        accepted = False
    assert accepted == quantizes


def test_default_options_pass_the_check():
    MergeOptions().check()
    assert math.isfinite(MergeOptions().resolved().batch_bytes)
