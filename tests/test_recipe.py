"""The recipe: mergekit's schema, safe YAML, parameter resolution (filters, gradients, scopes)."""

import pytest

from mergekit_mlx.errors import RecipeError
from mergekit_mlx.recipe import Conditional, evaluate_setting, load_recipe, parse_yaml, resolve


def test_models_form_parses_like_mergekit():
    r = load_recipe(
        """
merge_method: ties
base_model: base
models:
  - model: a
    parameters: {weight: 0.5, density: [0.2, 0.8]}
  - model: b
parameters: {normalize: true}
dtype: bfloat16
"""
    )
    assert r.merge_method == "ties"
    assert r.models[0].parameters["density"] == [0.2, 0.8]
    assert r.referenced_models() == ["base", "a", "b"]


def test_exactly_one_of_models_and_slices():
    with pytest.raises(RecipeError, match="exactly one of 'models' or 'slices'"):
        load_recipe({"merge_method": "linear"})


def test_unknown_key_is_named():
    with pytest.raises(RecipeError, match=r"models\[0\]\.weigth: is not a recipe key"):
        load_recipe({"merge_method": "linear", "models": [{"model": "a", "weigth": 1}]})


def test_bad_dtype_names_key_and_valid_values():
    with pytest.raises(RecipeError, match="dtype: 'fp8' is not a known dtype; valid: float32"):
        load_recipe({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "fp8"})


def test_layer_range_must_be_two_integers():
    with pytest.raises(RecipeError, match=r"slices\[0\]\.sources\[0\]\.layer_range"):
        load_recipe({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0]}]}]})


def test_yaml_alias_bomb_is_refused_before_expansion():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i, name in enumerate("bcdefgh"):
        prev = "abcdefg"[i]
        bomb += f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
    with pytest.raises(RecipeError, match="more than .* YAML nodes"):
        parse_yaml(bomb)


def test_yaml_python_tags_are_refused():
    with pytest.raises(RecipeError, match="not valid YAML"):
        parse_yaml("merge_method: !!python/object/apply:os.system ['true']")


def test_scalar_setting():
    assert evaluate_setting("x", 0.5, 0.3, float) == 0.5


def test_gradient_interpolates_linearly_across_the_slice():
    # mergekit: scaled = t*(n-1), i0 = floor, frac between neighbours
    grad = [0.0, 1.0, 0.5]
    assert evaluate_setting("x", grad, 0.0, float) == 0.0
    assert evaluate_setting("x", grad, 0.25, float) == pytest.approx(0.5)
    assert evaluate_setting("x", grad, 0.5, float) == pytest.approx(1.0)
    assert evaluate_setting("x", grad, 0.75, float) == pytest.approx(0.75)
    assert evaluate_setting("x", grad, 1.0, float) == pytest.approx(0.5)


def test_boolean_gradient_selects_without_interpolating():
    assert evaluate_setting("x", [True, False], 0.4, bool) is True
    assert evaluate_setting("x", [True, False], 1.0, bool) is False


def test_first_matching_filter_wins_and_is_a_substring_match():
    setting = [
        Conditional(filter="self_attn", value=0.1),
        Conditional(filter="proj", value=0.2),
        Conditional(value=0.9),
    ]
    assert evaluate_setting("model.layers.0.self_attn.q_proj.weight", setting, 0, float) == 0.1
    assert evaluate_setting("model.layers.0.mlp.up_proj.weight", setting, 0, float) == 0.2
    assert evaluate_setting("model.norm.weight", setting, 0, float) == 0.9


def test_filter_value_may_be_a_gradient():
    setting = [Conditional(filter="mlp", value=[0.0, 1.0])]
    assert evaluate_setting("layers.1.mlp.w", setting, 0.25, float) == pytest.approx(0.25)


def test_no_matching_filter_falls_through_to_the_next_scope():
    scopes = [{"t": [Conditional(filter="mlp", value=0.3)]}, {"t": 0.7}]
    assert resolve("t", float, scopes, "self_attn.q", 0) == 0.7
    assert resolve("t", float, scopes, "mlp.up", 0) == 0.3


def test_numeric_strings_are_coerced_like_mergekit():
    assert evaluate_setting("x", "1e-2", 0, float) == pytest.approx(0.01)


def test_wrong_parameter_type_names_the_parameter():
    with pytest.raises(RecipeError, match="parameters.density"):
        resolve("density", float, [{"density": "lots"}], "x", 0)
