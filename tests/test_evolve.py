"""`mergekit-mlx evolve`: mergekit-evolve's configuration, CMA-ES over merge parameters, every
candidate merged in memory and scored; checkpointed per generation, resumed after a kill."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from mergekit_mlx import cli, evaluate
from mergekit_mlx.evolve import SearchOptions, config_from_dict, search
from mergekit_mlx.evolve.config import Genome
from mergekit_mlx.evolve.genome import DENSITY_FLOOR, GenomeSpace

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models"
PROMPTS = 6  # search prompts per skill: enough to tell candidates apart, quick to score


def example_config(**changes) -> dict:
    config = {
        "genome": {
            "models": [str(MODELS / "add"), str(MODELS / "reverse")],
            "merge_method": "ties",
            "base_model": str(MODELS / "base"),
            "layer_granularity": 1,
        },
        "tasks": [{"name": "example:add", "weight": 0.5}, {"name": "example:reverse", "weight": 0.5}],
        "limit": PROMPTS,
    }
    config.update(changes)
    return config


# one search the tests share: 4 generations of 4 candidates
SEED, POPSIZE, BUDGET = 5, 4, 16


def options(**changes) -> SearchOptions:
    return SearchOptions(**{"max_fevals": BUDGET, "popsize": POPSIZE, "seed": SEED, **changes})


def candidates(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("evolve") / "search"
    return search(config_from_dict(example_config()), out, options())


def test_a_fixed_seed_finds_the_same_best_recipe_twice(reference, tmp_path):
    again = search(config_from_dict(example_config()), tmp_path / "again", options())
    assert (again.out / "best.yml").read_text() == (reference.out / "best.yml").read_text()
    first, second = candidates(reference.out), candidates(again.out)
    assert [(c["x"], c["fitness"]) for c in first] == [(c["x"], c["fitness"]) for c in second]
    assert len(first) == BUDGET and {c["generation"] for c in first} == set(range(BUDGET // POPSIZE))


def test_every_candidate_is_logged_with_parameters_scores_and_seconds(reference):
    for c in candidates(reference.out):
        assert set(c["scores"]) == {"example:add", "example:reverse"}
        assert c["fitness"] == pytest.approx(0.5 * c["scores"]["example:add"] + 0.5 * c["scores"]["example:reverse"])
        assert all(v * PROMPTS == round(v * PROMPTS) for v in c["scores"].values())  # exact-match fractions
        assert set(c["parameters"]) == {f"{g}/{m}.{p}" for g in (0, 1) for m in ("add", "reverse") for p in ("weight", "density")}
        assert c["seconds"]["merge"] > 0 and c["seconds"]["score"] > 0
    assert (reference.out / "fitness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_best_recipe_rerun_with_run_equals_the_in_memory_best_bit_for_bit(reference, tmp_path, capsys):
    assert cli.main(["run", str(reference.out / "best.yml"), str(tmp_path / "rerun"), "--no-progress"]) == 0
    rerun = mx.load(str(tmp_path / "rerun" / "model.safetensors"))
    saved = mx.load(str(reference.model_path / "model.safetensors"))
    assert set(rerun) == set(reference.best.weights) == set(saved)
    for name, x in reference.best.weights.items():
        assert rerun[name].dtype == x.dtype == saved[name].dtype
        assert mx.array_equal(rerun[name], x).item() and mx.array_equal(saved[name], x).item(), name


def test_the_best_is_the_highest_fitness_logged_and_its_recipe_is_written(reference):
    logged = candidates(reference.out)
    top = max(c["fitness"] for c in logged)
    assert reference.best_fitness == top
    first = next(c for c in logged if c["fitness"] == top)  # the first of equals
    written = yaml.safe_load((reference.out / "best.yml").read_text())
    sources = written["slices"][1]["sources"]
    assert sources[0]["parameters"]["weight"] == first["parameters"]["1/add.weight"]
    assert sources[1]["parameters"]["density"] == first["parameters"]["1/reverse.density"]


@pytest.mark.slow
def test_a_killed_search_resumes_where_its_checkpoint_stopped(reference, tmp_path):
    """SIGKILL a search once it has checkpointed a generation; --resume finishes it without scoring
    the checkpointed candidates again, and the whole search is the uninterrupted one."""
    config = tmp_path / "evolve.yml"
    config.write_text(yaml.safe_dump(example_config()))
    out = tmp_path / "search"
    command = [sys.executable, "-m", "mergekit_mlx", "evolve", str(config), str(out), "--no-progress"]
    flags = ["--max-fevals", str(BUDGET), "--popsize", str(POPSIZE), "--seed", str(SEED)]
    proc = subprocess.Popen(command + flags, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads((out / "state.json").read_text())["generations"]:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the search ended before it was killed"
    killed = json.loads((out / "state.json").read_text())
    kept = sum(len(g) for g in killed["generations"])
    assert 0 < kept < BUDGET and not killed["finished"]
    assert not (out / "model").exists()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = cli.main(["evolve", str(config), str(out), "--resume", "--no-progress", "--max-fevals", str(BUDGET)])
    assert code == 0
    assert not [w for w in caught if "replaying" in str(w.message)]  # the replay drew the recorded samples
    resumed = candidates(out)
    state = json.loads((out / "state.json").read_text())
    assert len(state["runs"]) == 2 and state["runs"][1]["at_candidate"] == kept and state["finished"]
    # continued, not restarted: the checkpointed candidates are the first process's, unchanged
    assert [c["run"] for c in resumed] == [0] * kept + [1] * (BUDGET - kept)
    assert resumed[:kept] == [c for g in killed["generations"] for c in g]
    # and the search is the one that was never interrupted
    uninterrupted = candidates(reference.out)
    assert [(c["x"], c["fitness"]) for c in resumed] == [(c["x"], c["fitness"]) for c in uninterrupted]
    assert (out / "best.yml").read_text() == (reference.out / "best.yml").read_text()


def test_a_larger_budget_extends_a_finished_search_and_completes_its_cut_generation(tmp_path):
    out = tmp_path / "search"
    search(config_from_dict(example_config()), out, options(max_fevals=6))  # a generation and a half
    assert [len(g) for g in json.loads((out / "state.json").read_text())["generations"]] == [4, 2]
    search(config_from_dict(example_config()), out, options(max_fevals=8, resume=True))
    assert [c["run"] for c in candidates(out)] == [0] * 6 + [1] * 2
    whole = search(config_from_dict(example_config()), tmp_path / "whole", options(max_fevals=8))
    assert [c["x"] for c in candidates(out)] == [c["x"] for c in candidates(whole.out)]


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"genome": {**example_config()["genome"], "layer_granularty": 1}}, "genome.layer_granularty"),
        ({"tasks": [{"name": "example:add", "wieght": 1.0}]}, "tasks[0].wieght"),
        ({"generations": 3}, "generations"),
    ],
)
def test_unknown_config_keys_are_refused_with_exit_2_naming_the_key(tmp_path, capsys, change, key):
    config = tmp_path / "evolve.yml"
    config.write_text(yaml.safe_dump(example_config(**change)))
    assert cli.main(["evolve", str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert key in err and "not a key of mergekit-evolve's configuration" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_misspelt_key_gets_a_suggestion(tmp_path, capsys):
    config = tmp_path / "evolve.yml"
    config.write_text(yaml.safe_dump(example_config(genome={**example_config()["genome"], "layer_granularty": 1})))
    cli.main(["evolve", str(config), str(tmp_path / "out")])
    assert "did you mean 'layer_granularity'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("genome", "message"),
    [
        ({"merge_method": "ties", "base_model": None}, "needs a base_model"),
        ({"merge_method": "della"}, "not a method mergekit-evolve can search"),
        ({"merge_method": "slerp", "smooth": True, "base_model": None}, "smooth is not supported"),
        ({"layer_granularity": -1}, "greater than or equal to 0"),
    ],
)
def test_an_impossible_genome_is_refused_before_a_model_is_read(tmp_path, capsys, genome, message):
    config = tmp_path / "evolve.yml"
    config.write_text(yaml.safe_dump(example_config(genome={**example_config()["genome"], **genome})))
    assert cli.main(["evolve", str(config), str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_a_layer_granularity_that_does_not_divide_the_layers_is_named(tmp_path, capsys):
    config = tmp_path / "evolve.yml"
    config.write_text(yaml.safe_dump(example_config(genome={**example_config()["genome"], "layer_granularity": 3})))
    assert cli.main(["evolve", str(config), str(tmp_path / "out")]) == 2
    assert "genome.layer_granularity: 3 does not divide the 2 layers" in capsys.readouterr().err


def test_an_earlier_search_is_continued_or_replaced_only_when_asked(reference, tmp_path, capsys):
    config = tmp_path / "evolve.yml"
    config.write_text(yaml.safe_dump(example_config()))
    assert cli.main(["evolve", str(config), str(reference.out)]) == 2
    assert "holds a finished search; pass --resume" in capsys.readouterr().err
    assert cli.main(["evolve", str(config), str(tmp_path / "none"), "--resume"]) == 2
    assert "no search to resume" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert cli.main(["evolve", str(config), str(tmp_path / "mine"), "--force"]) == 2
    assert "did not write (notes.txt)" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_resume_refuses_other_settings(reference, tmp_path, capsys):
    config = tmp_path / "evolve.yml"
    config.write_text(yaml.safe_dump(example_config()))
    assert cli.main(["evolve", str(config), str(reference.out), "--resume", "--seed", str(SEED + 1)]) == 2
    assert f"--seed: the search in {reference.out} ran with {SEED}" in capsys.readouterr().err


def test_search_prompts_are_held_out_and_never_the_evaluation_prompts():
    for task in evaluate.TASKS:
        scored = {ex.prompt for ex in evaluate.held_out_examples(task, evaluate.EVALUATION_PROMPTS, seed=0)}
        searched = evaluate.search_examples(task, 500)
        assert len({ex.prompt for ex in searched}) == 500
        assert all(evaluate.is_held_out(ex.prompt) for ex in searched)
        assert not scored & {ex.prompt for ex in searched}


# ---- genotype -> recipe, against values computed here ----


def space(**genome) -> GenomeSpace:
    g = Genome(**{"models": ["a", "b"], "merge_method": "ties", "base_model": "base", **genome})
    return GenomeSpace(g, 4, ("a", "b"), "base")


def test_a_genotype_is_groups_by_models_by_filters_by_parameters():
    s = space(layer_granularity=2, filters=["mlp"])
    assert s.shape == (2, 2, 2, 2)
    x = np.arange(16, dtype=np.float64) / 20 - 0.4  # negatives, zero, small and large values
    recipe = s.recipe(x).model_dump(exclude_none=True)
    v = x.reshape(2, 2, 2, 2)
    for g, sl in enumerate(recipe["slices"]):
        assert [src["model"] for src in sl["sources"]] == ["a", "b", "base"]
        for m, src in enumerate(sl["sources"][:2]):
            assert src["layer_range"] == (2 * g, 2 * g + 2)
            weights, densities = src["parameters"]["weight"], src["parameters"]["density"]
            assert [w.get("filter") for w in weights] == ["mlp", None]  # None: every other tensor
            assert [w["value"] for w in weights] == [round(abs(v[g, m, k, 0]), 6) for k in range(2)]
            assert [d["value"] for d in densities] == [min(max(round(abs(v[g, m, k, 1]), 6), DENSITY_FLOOR), 1) for k in range(2)]
    assert recipe["parameters"] == {"normalize": True}  # mergekit-evolve's default for ties


def test_negative_weights_are_kept_only_when_allowed():
    x = np.array([-0.3, 0.5, 0.2, 0.5])
    assert space().recipe(x).slices[0].sources[0].parameters["weight"] == 0.3
    assert space(allow_negative_weights=True).recipe(x).slices[0].sources[0].parameters["weight"] == -0.3


def test_smooth_gives_each_parameter_a_gradient_over_the_layer_groups():
    s = space(layer_granularity=1, smooth=True, merge_method="task_arithmetic")
    x = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])  # (4 groups, 2 models, 1 set, 1 parameter)
    recipe = s.recipe(x)
    assert [m.parameters["weight"] for m in recipe.models[:2]] == [[0.1, 0.3, 0.5, 0.7], [0.2, 0.4, 0.6, 0.8]]
    assert recipe.models[2].model == "base" and recipe.parameters == {"normalize": False}


def test_slerp_takes_the_two_highest_models_and_t_from_their_softmax():
    g = Genome(models=["a", "b", "c"], merge_method="slerp")
    s = GenomeSpace(g, 2, ("a", "b", "c"), None)
    recipe = s.recipe(np.array([0.2, 0.9, 0.5]))
    sl = recipe.slices[0]
    assert [src.model for src in sl.sources] == ["b", "c"] and sl.base_model == "b"
    assert sl.parameters["t"] == round(math.exp(0.5) / (math.exp(0.9) + math.exp(0.5)), 6)
    assert recipe.parameters is None  # slerp has no normalize


def test_the_starting_point_is_mergekit_evolves():
    x = space(layer_granularity=2).initial().reshape(2, 2, 1, 2)
    assert np.all(x[..., 0] == 0.5) and np.all(x[..., 1] == 1.0)


# ---- lm-eval-harness through mlx-lm's model wrapper, in memory ----


def lm_eval_task(folder: Path, examples: list[evaluate.Example]) -> None:
    """A generate-until task over a local JSON-lines file: no Hub, no network."""
    data = folder / "toy_add.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n" for e in examples))
    task = {
        "task": "toy_add",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 5, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / "toy_add.yaml").write_text(yaml.safe_dump(task))


def test_an_lm_eval_task_from_local_files_scores_candidates_in_memory(tmp_path):
    pytest.importorskip("lm_eval")
    examples = evaluate.held_out_examples("add", 12, seed=9)
    lm_eval_task(tmp_path, examples)
    config = example_config(tasks=[{"name": "toy_add", "metric": "exact_match,none"}], limit=None)
    result = search(config_from_dict(config), tmp_path / "out", options(max_fevals=2, task_search_paths=(tmp_path,)))
    model, tokenizer = result.best.to_mlx_lm()
    # the same prompts decoded greedily here, without lm-eval
    assert result.best_scores["toy_add"] == evaluate.exact_match(model, tokenizer, examples)
    assert all(set(c["scores"]) == {"toy_add"} for c in candidates(result.out))


def test_an_lm_eval_metric_that_the_task_does_not_report_is_named(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    lm_eval_task(tmp_path, evaluate.held_out_examples("add", 4, seed=9))
    config = tmp_path / "evolve.yml"
    config.write_text(yaml.safe_dump(example_config(tasks=[{"name": "toy_add"}])))  # acc,none by default
    code = cli.main(["evolve", str(config), str(tmp_path / "out"), "--task-search-path", str(tmp_path), "--max-fevals", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "tasks[0].metric: lm-eval reports no 'acc,none' for toy_add; it reports: exact_match,none" in err


def test_an_unknown_lm_eval_task_is_named_before_a_candidate_is_merged(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    lm_eval_task(tmp_path, evaluate.held_out_examples("add", 4, seed=9))
    config = tmp_path / "evolve.yml"
    config.write_text(yaml.safe_dump(example_config(tasks=[{"name": "toy_ad", "metric": "exact_match,none"}])))
    code = cli.main(["evolve", str(config), str(tmp_path / "out"), "--task-search-path", str(tmp_path)])
    assert code == 2
    assert "tasks[0].name: no lm-eval task 'toy_ad'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "candidates.jsonl").exists()


# ---- inputs read once ----


def test_inputs_held_in_memory_merge_bit_for_bit_as_read_from_disk(reference):
    from mergekit_mlx import merge
    from mergekit_mlx.evolve.inputs import HeldModel
    from mergekit_mlx.plan import make_plan

    recipe = reference.best_recipe
    plan = make_plan(recipe)
    held = {ref: HeldModel(m) for ref, m in zip(plan.model_paths, plan.models)}
    from_memory = merge(recipe, models=held).weights
    from_disk = merge(recipe).weights
    assert all(mx.array_equal(from_memory[k], from_disk[k]).item() for k in from_disk)
    assert held[str(MODELS / "add")].load("model.norm.weight").dtype == mx.float16


def test_inputs_that_do_not_fit_the_memory_limit_are_streamed_with_the_same_result(reference, tmp_path):
    streamed = search(config_from_dict(example_config()), tmp_path / "streamed", options(max_fevals=4, memory_limit=2_000_000))
    assert streamed.inputs.startswith("inputs streamed from disk")
    assert [c["fitness"] for c in candidates(streamed.out)] == [c["fitness"] for c in candidates(reference.out)[:4]]


def test_a_candidate_larger_than_the_memory_limit_is_refused_before_the_search(tmp_path, capsys):
    config = tmp_path / "evolve.yml"
    config.write_text(yaml.safe_dump(example_config()))
    assert cli.main(["evolve", str(config), str(tmp_path / "out"), "--memory-limit", "100K"]) == 2
    assert "must fit in memory to be scored" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_population_too_small_for_cma_es_is_refused(tmp_path, capsys):
    config = tmp_path / "evolve.yml"
    config.write_text(yaml.safe_dump(example_config()))
    assert cli.main(["evolve", str(config), str(tmp_path / "out"), "--popsize", "3"]) == 2
    assert "--popsize: CMA-ES needs at least 4 candidates per generation" in capsys.readouterr().err


def test_the_command_is_listed(capsys):
    assert cli.main(["--help"]) == 0
    assert "evolve" in capsys.readouterr().out
    assert os.path.exists(ROOT / "examples" / "evolve" / "ties.yml")
