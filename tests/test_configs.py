"""Every shipped recipe in configs/ runs on the example models and gives a model mlx-lm can use."""

from pathlib import Path

import pytest

from mergekit_mlx import merge
from mergekit_mlx.methods import all_methods

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yml"))


def test_there_is_one_recipe_per_method():
    assert {c.stem for c in CONFIGS} == set(all_methods())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_recipe_merges_and_the_result_generates(config, monkeypatch):
    from mlx_lm import generate

    monkeypatch.chdir(ROOT)  # recipes name the example models relative to the repository root
    result = merge(config)
    assert result.plan.method.name == config.stem
    model, tokenizer = result.to_mlx_lm()
    assert isinstance(generate(model, tokenizer, prompt="12+34=", max_tokens=4), str)
