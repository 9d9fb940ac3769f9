"""`mergekit-mlx lora-merge RECIPE OUT`: several LoRA adapters of one base merged into one adapter,
with PEFT's `add_weighted_adapter` as the specification.

The rules, each checked against float64 numpy written here from the adapters' own tensors:
- cat is exact: the written B·A is Σ w_i·s_i·B_i·A_i, ranks add up (PEFT and mlx-lm inputs mixed);
- linear is PEFT's product of sums: (Σ sqrt|w s| B_i)(Σ sign(w s) sqrt|w s| A_i);
- ties / magnitude_prune on the factors, and the *svd methods on dW, as PEFT's merge_utils define them;
  the svd variants' B·A is the best rank-r approximation (Eckart–Young) of the combined dW;
- DARE masks are the seed's: the same seed gives the same adapter, another seed another;
- with peft installed: PEFT's own add_weighted_adapter + merge_and_unload gives the weights our
  adapter gives (linear, cat, svd, ties, magnitude_prune, ties_svd); the PEFT output loads in
  PeftModel.from_pretrained, the mlx output in mlx-lm;
- hostile recipes and inputs exit 2 in one paragraph with nothing written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file
from tiny import llama_config, llama_weights, load_np, save_model

from mergekit_mlx.cli import main as cli_main
from mergekit_mlx.lora_merge import lora_merge

PREFIX = "base_model.model."
MODULES = {  # module -> (out, in) of the tiny Llama (hidden 32, kv heads 2 of 8 dims)
    "model.layers.0.self_attn.q_proj": (32, 32),
    "model.layers.0.self_attn.v_proj": (16, 32),
    "model.layers.1.mlp.down_proj": (32, 48),
}


# ---------------- adapters written on the fly ----------------


def peft_adapter(path: Path, rng, r: int, alpha: float, rslora: bool = False, modules=MODULES, base="tiny-base") -> dict:
    """A PEFT LoRA adapter; returns module -> (A, B, scale) in float64."""
    path.mkdir(parents=True)
    tensors, factors = {}, {}
    for m, (out, inp) in modules.items():
        a, b = rng.normal(0, 0.3, (r, inp)).astype(np.float32), rng.normal(0, 0.3, (out, r)).astype(np.float32)
        tensors[f"{PREFIX}{m}.lora_A.weight"], tensors[f"{PREFIX}{m}.lora_B.weight"] = a, b
        factors[m] = (a.astype(np.float64), b.astype(np.float64), alpha / (np.sqrt(r) if rslora else r))
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "base_model_name_or_path": base,
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return factors


def mlx_adapter(path: Path, rng, r: int, scale: float) -> dict:
    """An mlx-lm LoRA adapter (lora_a (in, r), lora_b (r, out)); returns module -> (A, B, scale) as PEFT orients them."""
    path.mkdir(parents=True)
    tensors, factors = {}, {}
    for m, (out, inp) in MODULES.items():
        a, b = rng.normal(0, 0.3, (r, inp)).astype(np.float32), rng.normal(0, 0.3, (out, r)).astype(np.float32)
        tensors[f"{m}.lora_a"], tensors[f"{m}.lora_b"] = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
        factors[m] = (a.astype(np.float64), b.astype(np.float64), scale)
    save_file(tensors, str(path / "adapters.safetensors"))
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": r, "scale": scale}, "model": "tiny-base"}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return factors


def merge(tmp_path: Path, method: str, adapters: list[tuple[Path, float]], name: str = "out", **keys) -> Path:
    recipe = {"merge_method": method, "adapters": [{"adapter": str(p), "weight": w} for p, w in adapters], **keys}
    out = tmp_path / name
    lora_merge(recipe, out)
    return out


def written(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """module -> (A, B, scale) of a written PEFT adapter, float64, the scale from its config."""
    config = json.loads((out / "adapter_config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(out / "adapter_model.safetensors")).items()}
    result = {}
    for k in w:
        if k.endswith(".lora_A.weight"):
            m = k[len(PREFIX) : -len(".lora_A.weight")]
            r = w[k].shape[0]
            alpha = next((v for p, v in config["alpha_pattern"].items() if m.endswith(p)), config["lora_alpha"])
            result[m] = (w[k], w[PREFIX + m + ".lora_B.weight"], alpha / r)
    return result


def delta(f: tuple) -> np.ndarray:
    a, b, s = f
    return s * b @ a


def close(got: np.ndarray, want: np.ndarray, rel: float = 1e-5) -> None:
    scale = max(np.abs(want).max(), 1e-30)
    np.testing.assert_allclose(got, want, atol=rel * scale, rtol=0)


def peft_ties(xs: list[np.ndarray], weights: list[float], density: float, total: bool = True) -> np.ndarray:
    """PEFT's merge_utils.ties, written again in float64: top-k by magnitude per tensor, majority sign of
    the unweighted pruned tensors, the weighted agreeing values summed over their count."""
    pruned = []
    for x in xs:
        k = int(density * x.size)
        keep = np.zeros(x.size, bool)
        keep[np.argsort(-np.abs(x).reshape(-1), kind="stable")[:k]] = True
        pruned.append(np.where(keep.reshape(x.shape), x, 0.0))
    t = np.stack(pruned)
    votes = t.sum(0) if total else np.sign(t).sum(0)
    agree = np.sign(t) == np.where(votes >= 0, 1.0, -1.0)
    w = np.array(weights).reshape(-1, *([1] * x.ndim))
    return (t * w * agree).sum(0) / np.maximum(agree.sum(0), 1)


def best_rank(x: np.ndarray, r: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(x)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> dict:
    """Two PEFT adapters (rank 4, alpha 8; rank 2, rsLoRA alpha 3) and an mlx-lm one (rank 4, scale 2.5)."""
    root = tmp_path_factory.mktemp("adapters")
    rng = np.random.default_rng(3)
    return {
        "p4": (root / "p4", peft_adapter(root / "p4", rng, 4, 8.0)),
        "p2": (root / "p2", peft_adapter(root / "p2", rng, 2, 3.0, rslora=True)),
        "m4": (root / "m4", mlx_adapter(root / "m4", rng, 4, 2.5)),
    }


# ---------------- the methods, against float64 references ----------------


def test_cat_is_exactly_the_weighted_sum_of_updates_and_ranks_add_up(three, tmp_path):
    weights = {"p4": 1.0, "p2": -0.7, "m4": 0.4}
    out = merge(tmp_path, "cat", [(three[k][0], w) for k, w in weights.items()])
    got = written(out)
    assert set(got) == set(MODULES)
    for m in MODULES:
        want = sum(w * delta(three[k][1][m]) for k, w in weights.items())
        assert got[m][0].shape[0] == 4 + 2 + 4
        close(delta(got[m]), want)


def test_linear_is_peft_product_of_square_root_weighted_sums(three, tmp_path):
    weights = {"p4": 0.8, "m4": -0.5}
    out = merge(tmp_path, "linear", [(three[k][0], w) for k, w in weights.items()])
    got = written(out)
    for m in MODULES:
        a_sum, b_sum = 0.0, 0.0
        for k, w in weights.items():
            a, b, s = three[k][1][m]
            root = np.sqrt(abs(w * s))
            a_sum, b_sum = a_sum + np.sign(w * s) * root * a, b_sum + root * b
        close(delta(got[m]), b_sum @ a_sum)


def test_linear_refuses_adapters_of_different_ranks(three, tmp_path, capsys):
    rc, err = run_cli(tmp_path, capsys, {"merge_method": "linear", "adapters": adapters_of(three, "p4", "p2")})
    assert_refused(rc, err, r"same rank.*cat.*svd")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("total", [True, False])
def test_ties_prunes_and_elects_signs_on_each_factor_as_peft(three, tmp_path, total):
    weights = {"p4": 1.0, "m4": 0.6}
    method = "total" if total else "frequency"
    out = merge(tmp_path, "ties", [(three[k][0], w) for k, w in weights.items()], density=0.5, majority_sign_method=method)
    got = written(out)
    for m in MODULES:
        fs = [three[k][1][m] for k in weights]
        ws = [w * f[2] for w, f in zip(weights.values(), fs)]
        a = peft_ties([f[0] for f in fs], [np.sign(w) * np.sqrt(abs(w)) for w in ws], 0.5, total)
        b = peft_ties([f[1] for f in fs], [np.sqrt(abs(w)) for w in ws], 0.5, total)
        close(got[m][0], a)
        close(got[m][1], b)


def test_magnitude_prune_keeps_the_largest_fraction_of_each_factor(three, tmp_path):
    out = merge(tmp_path, "magnitude_prune", [(three["p4"][0], 1.0), (three["m4"][0], 2.0)], density=0.25)
    got = written(out)
    for m in MODULES:
        fs = [three["p4"][1][m], three["m4"][1][m]]
        ws = [1.0 * fs[0][2], 2.0 * fs[1][2]]
        for side in (0, 1):
            want = 0.0
            for f, w in zip(fs, ws):
                x = f[side]
                k = int(0.25 * x.size)
                threshold = np.sort(np.abs(x).reshape(-1))[-k]
                want = want + np.where(np.abs(x) >= threshold, x, 0.0) * np.sqrt(w)  # all weights positive
            close(got[m][side], want)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_svd_is_the_best_rank_r_approximation_of_the_weighted_sum(three, tmp_path, rank):
    weights = {"p4": 1.0, "p2": 0.5, "m4": -0.3}
    out = merge(tmp_path, "svd", [(three[k][0], w) for k, w in weights.items()], rank=rank)
    got = written(out)
    for m in MODULES:
        want = sum(w * delta(three[k][1][m]) for k, w in weights.items())
        assert got[m][0].shape[0] == rank
        err = np.linalg.norm(want - delta(got[m]))
        s = np.linalg.svd(want, compute_uv=False)
        optimal = np.sqrt(np.sum(s[rank:] ** 2))
        assert err <= optimal + 1e-4 * np.linalg.norm(want), (m, err, optimal)
        close(delta(got[m]), best_rank(want, rank), 1e-4)


def test_svd_rank_defaults_to_the_largest_input_rank_and_puts_s_in_b(three, tmp_path):
    out = merge(tmp_path, "svd", [(three["p4"][0], 1.0), (three["p2"][0], 1.0)])
    for a, _, s in written(out).values():
        assert a.shape[0] == 4 and s == 1.0
        np.testing.assert_allclose(a @ a.T, np.eye(4), atol=1e-5)  # A = Vh: orthonormal rows, as PEFT splits


def test_ties_svd_is_peft_ties_of_the_updates_then_truncated(three, tmp_path):
    weights = {"p4": 1.0, "p2": 0.5, "m4": 0.8}
    out = merge(tmp_path, "ties_svd", [(three[k][0], w) for k, w in weights.items()], density=0.3, rank=3)
    got = written(out)
    for m in MODULES:
        combined = peft_ties([delta(three[k][1][m]) for k in weights], list(weights.values()), 0.3)
        close(delta(got[m]), best_rank(combined, 3), 1e-4)


def test_svd_clamp_clips_both_factors_at_the_quantile_of_their_values(three, tmp_path):
    out = merge(tmp_path, "svd", [(three["p4"][0], 1.0), (three["m4"][0], 1.0)], rank=4, svd_clamp=0.9)
    ref = merge(tmp_path, "svd", [(three["p4"][0], 1.0), (three["m4"][0], 1.0)], name="ref", rank=4)
    got, unclipped = written(out), written(ref)
    for m in MODULES:
        a, b, _ = unclipped[m]
        high = np.quantile(np.concatenate([b.reshape(-1), a.reshape(-1)]), 0.9)
        close(got[m][0], np.clip(a, -high, high))
        close(got[m][1], np.clip(b, -high, high))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_masks_are_the_seeds(three, tmp_path, method):
    pair = [(three["p4"][0], 1.0), (three["m4"][0], 0.5)]
    one = written(merge(tmp_path, method, pair, name="one", density=0.5, seed=7))
    again = written(merge(tmp_path, method, pair, name="again", density=0.5, seed=7))
    other = written(merge(tmp_path, method, pair, name="other", density=0.5, seed=8))
    for m in MODULES:
        np.testing.assert_array_equal(one[m][0], again[m][0])
        assert not np.array_equal(delta(one[m]), delta(other[m]))


def test_dare_linear_keeps_each_factor_element_from_a_subset_rescaled_by_density(three, tmp_path):
    out = written(merge(tmp_path, "dare_linear", [(three["p4"][0], 1.0), (three["m4"][0], 0.5)], density=0.5, seed=1))
    m = "model.layers.0.self_attn.q_proj"
    (a1, _, s1), (a2, _, s2) = three["p4"][1][m], three["m4"][1][m]
    x1, x2 = np.sqrt(s1) * a1 / 0.5, np.sqrt(0.5 * s2) * a2 / 0.5
    options = np.stack([np.zeros_like(x1), x1, x2, x1 + x2])  # each element: which of the two survived
    assert np.all(np.min(np.abs(options - out[m][0]), axis=0) <= 1e-5 * np.abs(options).max())


# ---------------- the outputs ----------------


def test_mlx_output_loads_in_mlx_lm_and_adds_the_merged_update(three, tmp_path):
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm import load

    cfg = llama_config()
    base = save_model(tmp_path / "base", cfg, llama_weights(cfg, np.random.default_rng(0)))
    weights = {"p4": 1.0, "p2": 0.5}
    recipe = {
        "merge_method": "cat",
        "adapters": [{"adapter": str(three[k][0]), "weight": w} for k, w in weights.items()],
        "base_model": str(base),
        "out_format": "mlx",
    }
    out = tmp_path / "mlx"
    lora_merge(recipe, out)
    model, _ = load(str(base), adapter_path=str(out))
    model(mx.array([[1, 5, 7]]))
    model.update_modules(tree_unflatten([(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]))
    fused, want = dict(tree_flatten(model.parameters())), load_np(base)
    for m in MODULES:
        want[m + ".weight"] = want[m + ".weight"] + sum(w * delta(three[k][1][m]) for k, w in weights.items())
    for n, w in want.items():
        np.testing.assert_allclose(np.array(fused[n], np.float64), w, atol=2e-6, err_msg=n)


PEFT_METHODS = [
    ("linear", {}),
    ("cat", {}),
    ("svd", {}),
    ("svd", {"rank": 2}),
    ("ties", {"density": 0.5}),
    ("magnitude_prune", {"density": 0.5}),
    ("ties_svd", {"density": 0.5}),
    ("magnitude_prune_svd", {"density": 0.3, "rank": 3}),
]


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    """A tiny Llama and two adapters of it trained by nothing: PEFT's random init (init_lora_weights=False)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("peft")
    cfg = llama_config()
    base = save_model(root / "base", cfg, llama_weights(cfg, np.random.default_rng(1)))
    torch.manual_seed(0)
    for name, r, alpha, targets in (("a", 4, 8, ["q_proj", "v_proj"]), ("b", 4, 16, ["q_proj", "down_proj"])):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        peft.get_peft_model(model, config).save_pretrained(str(root / name))
    return base, root / "a", root / "b"


@pytest.mark.parametrize("method,keys", PEFT_METHODS, ids=[f"{m}{k}" for m, k in PEFT_METHODS])
def test_peft_add_weighted_adapter_merges_to_the_weights_our_adapter_gives(peft_pair, tmp_path, method, keys):
    import peft
    import torch
    import transformers

    base, a, b = peft_pair
    weights = [1.0, 0.6]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, str(a), adapter_name="a")
    model.load_adapter(str(b), adapter_name="b")
    model.add_weighted_adapter(
        ["a", "b"], weights, "m", combination_type=method, svd_rank=keys.get("rank"), density=keys.get("density")
    )
    model.set_adapter("m")
    theirs = {k: v.double().numpy() for k, v in model.merge_and_unload().state_dict().items()}
    out = merge(tmp_path, method, [(a, weights[0]), (b, weights[1])], **keys)
    ours = load_np(base)
    for m, f in written(out).items():
        ours[m + ".weight"] = ours[m + ".weight"] + delta(f)
    changed = 0
    for n, w in ours.items():
        moved = np.abs(theirs[n] - load_np(base)[n]).max()
        changed += moved > 0
        np.testing.assert_allclose(theirs[n], w, atol=1e-5 * max(moved, 1e-3), err_msg=n)
    assert changed == 6  # q_proj and v_proj / down_proj of two layers
    loaded = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(out)
    )
    again = {k: v.double().numpy() for k, v in loaded.merge_and_unload().state_dict().items()}
    for n, w in ours.items():
        np.testing.assert_allclose(again[n], w, atol=1e-6, err_msg=n)


# ---------------- hostile recipes and inputs ----------------


def adapters_of(three, *keys) -> list[dict]:
    return [{"adapter": str(three[k][0]), "weight": 1.0} for k in keys]


def run_cli(tmp_path: Path, capsys, recipe: dict, *flags) -> tuple[int, str]:
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    rc = cli_main(["lora-merge", str(path), str(tmp_path / "out"), "--no-progress", *flags])
    return rc, capsys.readouterr().err


def assert_refused(rc: int, err: str, pattern: str) -> None:
    assert rc == 2, err
    assert err.startswith("mergekit-mlx: error: ") and "Traceback" not in err, err
    assert re.search(pattern, err, re.S), f"{pattern!r} not in {err!r}"


def test_cli_writes_the_adapter_and_a_dry_run_writes_nothing(three, tmp_path, capsys):
    recipe = {"merge_method": "cat", "adapters": adapters_of(three, "p4", "m4")}
    rc, err = run_cli(tmp_path, capsys, recipe, "--dry-run")
    assert rc == 0 and not (tmp_path / "out").exists(), err
    rc, err = run_cli(tmp_path, capsys, recipe)
    assert rc == 0, err
    assert {"adapter_config.json", "adapter_model.safetensors", "lora_merge.json"} <= {
        p.name for p in (tmp_path / "out").iterdir()
    }


def test_unknown_key_is_refused_naming_it(three, tmp_path, capsys):
    rc, err = run_cli(tmp_path, capsys, {"merge_method": "cat", "adapters": adapters_of(three, "p4"), "densty": 0.5})
    assert_refused(rc, err, r"densty.*did you mean 'density'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "keys,pattern",
    [
        ({"merge_method": "svd", "rank": 0}, r"rank"),
        ({"merge_method": "ties"}, r"give density"),
        ({"merge_method": "tie", "density": 0.5}, r"did you mean 'ties'"),
        ({"merge_method": "cat", "rank": 4}, r"only read by the \*svd methods"),
    ],
)
def test_invalid_settings_are_refused_naming_the_key(three, tmp_path, capsys, keys, pattern):
    rc, err = run_cli(tmp_path, capsys, {**keys, "adapters": adapters_of(three, "p4", "m4")})
    assert_refused(rc, err, pattern)
    assert not (tmp_path / "out").exists()


def test_dora_adapter_is_refused(three, tmp_path, capsys):
    dora = tmp_path / "dora"
    dora.mkdir()
    tensors = {k: v for k, v in load_file(str(three["p4"][0] / "adapter_model.safetensors")).items()}
    for m, (out, _) in MODULES.items():
        tensors[f"{PREFIX}{m}.lora_magnitude_vector"] = np.ones(out, np.float32)
    save_file(tensors, str(dora / "adapter_model.safetensors"))
    config = json.loads((three["p4"][0] / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    recipe = {"merge_method": "cat", "adapters": [{"adapter": str(dora)}, *adapters_of(three, "p4")]}
    rc, err = run_cli(tmp_path, capsys, recipe)
    assert_refused(rc, err, r"DoRA")
    assert not (tmp_path / "out").exists()


def test_adapters_of_different_shapes_or_bases_are_refused(three, tmp_path, capsys):
    rng = np.random.default_rng(9)
    wide = {"model.layers.0.self_attn.q_proj": (32, 64)}
    peft_adapter(tmp_path / "wide", rng, 4, 8.0, modules=wide)
    recipe = {"merge_method": "cat", "adapters": [{"adapter": str(tmp_path / "wide")}, *adapters_of(three, "p4")]}
    rc, err = run_cli(tmp_path, capsys, recipe)
    assert_refused(rc, err, r"q_proj has another shape.*not adapters of one base")
    peft_adapter(tmp_path / "other", rng, 4, 8.0, base="another-base")
    recipe = {"merge_method": "cat", "adapters": [{"adapter": str(tmp_path / "other")}, *adapters_of(three, "p4")]}
    rc, err = run_cli(tmp_path, capsys, recipe)
    assert_refused(rc, err, r"different base models.*another-base")
    assert not (tmp_path / "out").exists()
