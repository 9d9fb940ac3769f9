"""Numerical parity with mergekit 0.1.5: every merge method, run by both tools on tiny models.

    python benchmarks/parity.py                        # makes/uses a venv with torch + mergekit
    python benchmarks/parity.py --venv /path/to/venv   # a venv that already has mergekit 0.1.5
    python benchmarks/parity.py --only ties,sce --markdown benchmarks/PARITY.md

The venv (default ~/.cache/mergekit-mlx/parity-venv) gets `pip install torch==2.13.0 mergekit==0.1.5`
when it lacks mergekit. Tiny float32 Llama-shaped models are built in a work directory (a base,
three dense fine-tunes, three sparse ones that change 40% of the elements, and one fine-tune
with three extra tokens); each recipe runs through mergekit's `mergekit-yaml` command (all in one
Python process, `--cli` for one process per recipe) and through `mergekit_mlx.merge(...).save()`.

Per recipe it prints the max relative error over tensors, max|ours - mergekit| / max|mergekit|.
Deterministic methods pass within bf16 rounding (2**-8); random ones (DARE, DELLA) compare in
distribution: the fraction of elements the merge changes and the L1 norm of the merged task vector
must agree within 2%. Tokenizer recipes also compare the vocabularies and line rows up by token.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BF16_TOL = 2.0**-8
DIST_TOL = 0.02
DEFAULT_VENV = Path(os.environ.get("MERGEKIT_PARITY_VENV", Path.home() / ".cache" / "mergekit-mlx" / "parity-venv"))
PINS = ["torch==2.13.0", "mergekit==0.1.5"]

WORDS = ["hello", "world", "merge", "model", "the", "a", "is", "good", "mlx", "fast"]
EXTRA_WORD = "zeta"
EXTRA_SPECIALS = ["<|im_start|>", "<|im_end|>"]
EXT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Sum 2+2"},
]


# ---- tiny models ---------------------------------------------------------------------------


def llama_config(vocab: int, hidden=64, inter=128, layers=2, heads=4, kv_heads=2) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def llama_weights(cfg: dict, rng) -> dict[str, np.ndarray]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (v, h))}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for name, shape in [
            ("self_attn.q_proj", (h, h)),
            ("self_attn.k_proj", (kv, h)),
            ("self_attn.v_proj", (kv, h)),
            ("self_attn.o_proj", (h, h)),
            ("mlp.gate_proj", (i, h)),
            ("mlp.up_proj", (i, h)),
            ("mlp.down_proj", (h, i)),
        ]:
            w[p + name + ".weight"] = rng.normal(0, 0.2, shape)
        w[p + "input_layernorm.weight"] = 1 + rng.normal(0, 0.05, (h,))
        w[p + "post_attention_layernorm.weight"] = 1 + rng.normal(0, 0.05, (h,))
    w["model.norm.weight"] = 1 + rng.normal(0, 0.05, (h,))
    w["lm_head.weight"] = rng.normal(0, 0.5, (v, h))
    return w


def base_tokens() -> list[str]:
    tokens = ["<unk>", "<s>", "</s>"] + WORDS
    return tokens + [f"w{k}" for k in range(64 - len(tokens))]


def shuffled_order() -> np.ndarray:
    """A fixed permutation of the 64 base ids (special tokens stay put)."""
    rest = np.random.default_rng(7).permutation(np.arange(3, 64))
    return np.concatenate([np.arange(3), rest])


def write_tokenizer(
    path: Path, vocab: int, extra: bool = False, shuffled: bool = False, chat_template: str | None = None
) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokens = base_tokens()
    if shuffled:
        tokens = [tokens[i] for i in shuffled_order()]
    if extra:
        tokens.append(EXTRA_WORD)
    tok = Tokenizer(models.WordLevel({t: k for k, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if extra:
        from tokenizers import AddedToken

        tok.add_special_tokens([AddedToken(t, special=True) for t in EXTRA_SPECIALS])
    tok.save(str(path / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 128,
    }
    if chat_template:
        cfg["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))


def save_model(path: Path, cfg: dict, weights: dict, **tok) -> str:
    import mlx.core as mx

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    mx.save_safetensors(
        str(path / "model.safetensors"),
        {k: mx.array(v.astype(np.float32)) for k, v in weights.items()},
        metadata={"format": "pt"},
    )
    write_tokenizer(path, cfg["vocab_size"], **tok)
    return str(path)


def build_models(root: Path, seed: int = 0) -> dict[str, str]:
    """base; ft1..ft3 (dense task vectors); sp1..sp3 (40% of elements changed); ext, ext2 (3 extra
    tokens); shuf (the base's tokens under other ids, rows moved with them)."""
    rng = np.random.default_rng(seed)
    cfg = llama_config(64)
    base = llama_weights(cfg, rng)
    paths = {"base": save_model(root / "base", cfg, base)}
    for k in range(1, 4):
        ft = {n: v + rng.normal(0, 0.05, v.shape) for n, v in base.items()}
        paths[f"ft{k}"] = save_model(root / f"ft{k}", cfg, ft)
    for k in range(1, 4):
        sp = {n: np.where(rng.random(v.shape) < 0.4, v + rng.normal(0, 0.05, v.shape), v) for n, v in base.items()}
        paths[f"sp{k}"] = save_model(root / f"sp{k}", cfg, sp)
    ext_cfg = llama_config(64 + 1 + len(EXTRA_SPECIALS))
    new_rows = {
        n: rng.normal(0, 0.5, (ext_cfg["vocab_size"] - 64, cfg["hidden_size"]))
        for n in ("model.embed_tokens.weight", "lm_head.weight")
    }
    for name in ("ext", "ext2"):
        ext = {}
        for n, v in base.items():
            v = v + rng.normal(0, 0.05, v.shape)
            if n in new_rows:
                v = np.concatenate([v, new_rows[n] + rng.normal(0, 0.05, new_rows[n].shape)])
            ext[n] = v
        paths[name] = save_model(root / name, ext_cfg, ext, extra=True, chat_template=EXT_TEMPLATE)
    order = shuffled_order()
    shuf = {n: v + rng.normal(0, 0.05, v.shape) for n, v in base.items()}
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        shuf[n] = shuf[n][order]  # row k holds the token that now has id k
    paths["shuf"] = save_model(root / "shuf", cfg, shuf, shuffled=True)
    return paths


# ---- recipes -------------------------------------------------------------------------------


@dataclass
class Case:
    label: str
    recipe: dict
    # "exact"; "random" (compare in distribution); "threshold" (exact but for elements at a data-dependent
    # threshold: at most 0.1% of elements may differ); "deviation" (documented, reported only)
    kind: str = "exact"
    note: str = ""
    tokenizer: bool = False


def cases(m: dict[str, str]) -> list[Case]:
    def models(*names, **per):
        return [{"model": m[n], **({"parameters": per[n]} if n in per else {})} for n in names]

    f32 = {"dtype": "float32"}

    def ta(method, params=None, per=None, **kw):
        return {
            "merge_method": method,
            "base_model": m["base"],
            "models": models("ft1", "ft2", "ft3", **(per or {})),
            "parameters": params or {},
            **f32,
            **kw,
        }

    w3 = {"ft1": {"weight": 0.5}, "ft2": {"weight": 0.3}, "ft3": {"weight": 0.2}}
    out = [
        Case(
            "linear",
            {
                "merge_method": "linear",
                "models": models("base", "ft1", "ft2", base={"weight": 0.5}, ft1={"weight": 0.3}, ft2={"weight": 0.2}),
                **f32,
            },
        ),
        Case(
            "linear, normalize: false",
            {
                "merge_method": "linear",
                "models": models("ft1", "ft2", ft1={"weight": 0.7}, ft2={"weight": 0.6}),
                "parameters": {"normalize": False},
                **f32,
            },
        ),
        Case(
            "linear, bfloat16",
            {
                "merge_method": "linear",
                "models": models("base", "ft1", "ft2", base={"weight": 1}, ft1={"weight": 1}, ft2={"weight": 1}),
                "dtype": "bfloat16",
            },
            note="bf16 math in mergekit",
        ),
        Case(
            "task_arithmetic",
            ta("task_arithmetic", {"lambda": 0.8}, {"ft1": {"weight": 0.5}, "ft2": {"weight": 0.3}, "ft3": {"weight": -0.2}}),
        ),
        Case("ties", ta("ties", {"density": 0.5, "weight": 1.0})),
        Case(
            "ties, per-model density",
            ta(
                "ties",
                {"normalize": False},
                {
                    "ft1": {"weight": 0.6, "density": 0.3},
                    "ft2": {"weight": 0.3, "density": 0.7},
                    "ft3": {"weight": 0.4, "density": 0.5},
                },
            ),
        ),
        Case(
            "ties, bfloat16",
            ta("ties", {"density": 0.5, "weight": 1.0}, dtype="bfloat16"),
            "deviation",
            "mergekit rounds task vectors to bf16 before top-k, so many magnitudes tie at the threshold",
        ),
        Case("dare_ties", ta("dare_ties", {"density": 0.5, "weight": 0.5}), "random"),
        Case("dare_linear", ta("dare_linear", {"density": 0.3}, w3), "random"),
        Case("breadcrumbs", ta("breadcrumbs", {"density": 0.8, "gamma": 0.05}, w3)),
        Case("breadcrumbs_ties", ta("breadcrumbs_ties", {"density": 0.6, "gamma": 0.02, "weight": 0.5})),
        Case("della", ta("della", {"density": 0.5, "epsilon": 0.1, "weight": 1.0}), "random"),
        Case("della_linear", ta("della_linear", {"density": 0.6, "epsilon": 0.2}, w3), "random"),
        Case(
            "slerp",
            {
                "merge_method": "slerp",
                "base_model": m["base"],
                "models": models("base", "ft1"),
                "parameters": {
                    "t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.3}]
                },
                **f32,
            },
        ),
        Case(
            "passthrough (slices)",
            {
                "merge_method": "passthrough",
                "slices": [
                    {"sources": [{"model": m["ft1"], "layer_range": [0, 2]}]},
                    {"sources": [{"model": m["ft2"], "layer_range": [1, 2]}]},
                ],
                **f32,
            },
        ),
        Case(
            "nuslerp",
            {
                "merge_method": "nuslerp",
                "base_model": m["base"],
                "models": models("ft1", "ft2", ft1={"weight": 0.3}, ft2={"weight": 0.7}),
                **f32,
            },
        ),
        Case(
            "nuslerp, no base, per row",
            {
                "merge_method": "nuslerp",
                "models": models("ft1", "ft2", ft1={"weight": 1.0}, ft2={"weight": 2.0}),
                "parameters": {"nuslerp_flatten": False},
                **f32,
            },
        ),
        Case(
            "nuslerp, row_wise",
            {
                "merge_method": "nuslerp",
                "base_model": m["base"],
                "models": models("ft1", "ft2", ft1={"weight": -0.5}, ft2={"weight": 1.5}),
                "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                **f32,
            },
        ),
        Case(
            "nuslerp, bfloat16",
            {
                "merge_method": "nuslerp",
                "base_model": m["base"],
                "models": models("ft1", "ft2", ft1={"weight": 0.3}, ft2={"weight": 0.7}),
                "dtype": "bfloat16",
            },
            note="bf16 math in mergekit",
        ),
        Case(
            "multislerp, equal weights",
            {
                "merge_method": "multislerp",
                "base_model": m["base"],
                "models": models("ft1", "ft2", ft1={"weight": 1.0}, ft2={"weight": 1.0}),
                **f32,
            },
        ),
        Case(
            "multislerp, unequal weights",
            {
                "merge_method": "multislerp",
                "base_model": m["base"],
                "models": models("ft1", "ft2", "ft3", ft1={"weight": 0.6}, ft2={"weight": 0.3}, ft3={"weight": 0.1}),
                **f32,
            },
            "deviation",
            "mergekit's tangent sum is zero: it returns the chord mean",
        ),
        Case("karcher", {"merge_method": "karcher", "models": models("ft1", "ft2", "ft3"), **f32}),
        Case(
            "karcher, base as input",
            {
                "merge_method": "karcher",
                "base_model": m["base"],
                "models": models("ft1", "ft2"),
                "parameters": {"max_iter": 3, "tol": 1e-7},
                **f32,
            },
        ),
        Case(
            "model_stock", {"merge_method": "model_stock", "base_model": m["base"], "models": models("ft1", "ft2", "ft3"), **f32}
        ),
        Case(
            "model_stock, filter_wise",
            {
                "merge_method": "model_stock",
                "base_model": m["base"],
                "models": models("ft1", "ft2"),
                "parameters": {"filter_wise": True},
                **f32,
            },
        ),
        Case(
            "nearswap",
            {"merge_method": "nearswap", "base_model": m["base"], "models": models("ft1"), "parameters": {"t": 0.03}, **f32},
        ),
        Case("sce", {"merge_method": "sce", "base_model": m["base"], "models": models("ft1", "ft2", "ft3"), **f32}),
        Case(
            "sce, select_topk 0.3",
            {
                "merge_method": "sce",
                "base_model": m["base"],
                "models": models("sp1", "sp2", "sp3"),
                "parameters": {"select_topk": 0.3},
                **f32,
            },
        ),
        Case("ram", {"merge_method": "ram", "base_model": m["base"], "models": models("sp1", "sp2", "sp3"), **f32}),
        Case(
            "ramplus_tl",
            {
                "merge_method": "ramplus_tl",
                "base_model": m["base"],
                "models": models("sp1", "sp2", "sp3"),
                "parameters": {"r": 0.5, "alpha": 0.3},
                **f32,
            },
        ),
        Case(
            "arcee_fusion",
            {"merge_method": "arcee_fusion", "base_model": m["base"], "models": models("ft1"), **f32},
            "threshold",
            "mergekit's float32 KL loses ~1e-4 to cancellation, moving the threshold",
        ),
        # vocabularies: `ext` has one more word and two special tokens
        Case(
            "tokenizer_source: union",
            {
                "merge_method": "linear",
                "base_model": m["base"],
                "models": models("base", "ext", "ft1", base={"weight": 0.4}, ext={"weight": 0.4}, ft1={"weight": 0.2}),
                "tokenizer_source": "union",
                "chat_template": "chatml",
                **f32,
            },
            tokenizer=True,
        ),
        Case(
            "tokenizer_source: union, shared new tokens",
            {
                "merge_method": "ties",
                "base_model": m["base"],
                "models": models(
                    "ext",
                    "ext2",
                    "shuf",
                    ext={"weight": 1.0, "density": 0.5},
                    ext2={"weight": 0.5, "density": 0.7},
                    shuf={"weight": 0.5, "density": 0.5},
                ),
                "tokenizer_source": "union",
                "chat_template": "auto",
                **f32,
            },
            tokenizer=True,
        ),
        Case(
            "tokenizer_source: base, shuffled ids",
            {
                "merge_method": "linear",
                "models": models("base", "shuf", base={"weight": 0.5}, shuf={"weight": 0.5}),
                "tokenizer_source": "base",
                **f32,
            },
            tokenizer=True,
        ),
        Case(
            "tokenizer_source: base",
            {
                "merge_method": "task_arithmetic",
                "base_model": m["base"],
                "models": models("ext", "ft1", ext={"weight": 0.5}, ft1={"weight": 0.5}),
                "tokenizer_source": "base",
                **f32,
            },
            tokenizer=True,
        ),
        Case(
            "tokenizer_source: <model>",
            {
                "merge_method": "slerp",
                "base_model": m["base"],
                "models": models("base", "ext"),
                "parameters": {"t": 0.4},
                "tokenizer_source": m["ext"],
                **f32,
            },
            tokenizer=True,
        ),
        Case(
            "tokenizer: tokens + pad",
            {
                "merge_method": "ties",
                "base_model": m["base"],
                "models": models("ext", "ft1", ext={"weight": 1.0, "density": 0.6}, ft1={"weight": 1.0, "density": 0.6}),
                "tokenizer": {
                    "source": "union",
                    "pad_to_multiple_of": 16,
                    "tokens": {
                        "<|im_start|>": {"source": m["ext"]},
                        "<|im_end|>": {"source": {"kind": "zero"}},
                        "w7": {"source": {"kind": "model_token", "model": m["base"], "token": "hello"}, "force": True},
                        "<tool>": {"source": {"kind": "model_token", "model": m["ext"], "token_id": 3}},
                    },
                },
                "chat_template": "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}",
                **f32,
            },
            tokenizer=True,
        ),
    ]
    return out


# ---- running both tools --------------------------------------------------------------------

DRIVER = r"""
import json, sys, traceback
from mergekit.scripts.run_yaml import main
jobs = json.load(open(sys.argv[1]))
status = {}
for yml, out, seed in jobs:
    try:
        main.main([yml, out, "--random-seed", str(seed), "--quiet"], standalone_mode=False)
        status[out] = None
    except Exception as e:
        status[out] = f"{type(e).__name__}: {e}"
json.dump(status, open(sys.argv[2], "w"))
"""


def ensure_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import mergekit, torch"], capture_output=True).returncode == 0:
        return py
    print(f"creating {venv} with {' '.join(PINS)} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *PINS], check=True)
    return py


def run_mergekit(py: Path, jobs: list[tuple[str, str, int]], work: Path, cli: bool) -> dict[str, str | None]:
    if cli:
        status = {}
        exe = py.parent / "mergekit-yaml"
        for yml, out, seed in jobs:
            r = subprocess.run([str(exe), yml, out, "--random-seed", str(seed), "--quiet"], capture_output=True, text=True)
            status[out] = None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["failed"])[-1]
        return status
    (work / "driver.py").write_text(DRIVER)
    (work / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run(
        [str(py), str(work / "driver.py"), str(work / "jobs.json"), str(work / "status.json")], check=True, capture_output=True
    )
    return json.loads((work / "status.json").read_text())


def run_ours(yml: str, out: str, seed: int) -> str | None:
    from mergekit_mlx import merge
    from mergekit_mlx.errors import MergeKitError

    try:
        merge(yml, random_seed=seed).save(out, force=True)
        return None
    except MergeKitError as e:
        return f"{type(e).__name__}: {e}"


# ---- comparing -----------------------------------------------------------------------------


def load(path: str) -> dict[str, np.ndarray]:
    import mlx.core as mx

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        for k, v in mx.load(str(f)).items():
            out[k] = np.array(v.astype(mx.float32)).astype(np.float64)
    return out


def vocab_of(path: str) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab()


def compare(case: Case, ours: str, theirs: str, base: dict[str, np.ndarray]) -> dict:
    from mergekit_mlx.vocab import is_vocab_tensor

    a, b = load(ours), load(theirs)
    row = {"tensors": len(b)}
    if set(a) != set(b):
        row["problem"] = (
            f"tensor names differ: only ours {sorted(set(a) - set(b))[:3]}, only mergekit {sorted(set(b) - set(a))[:3]}"
        )
        return row
    if case.tokenizer:
        va, vb = vocab_of(ours), vocab_of(theirs)
        row["vocab"] = "same" if va == vb else ("same tokens" if set(va) == set(vb) else "DIFFERENT")
        if set(va) == set(vb) and va != vb:
            # line our rows up with mergekit's ids, token by token
            src = np.array([va[t] for t in vb])
            dst = np.array([vb[t] for t in vb])
            for name in a:
                if is_vocab_tensor(name) and a[name].shape == b[name].shape:
                    x = a[name].copy()
                    x[dst] = a[name][src]
                    a[name] = x
        ca = json.loads((Path(ours) / "config.json").read_text()).get("vocab_size")
        cb = json.loads((Path(theirs) / "config.json").read_text()).get("vocab_size")
        row["config vocab_size"] = f"{ca} / {cb}"
        row["config ok"] = ca == cb
        ta, tb = _template(ours), _template(theirs)
        if ta or tb:
            row["chat_template"] = "renders the same" if ta == tb else "DIFFERENT"
    errs = {}
    off = total = 0
    for name in b:
        if a[name].shape != b[name].shape:
            row["problem"] = f"{name}: shape {a[name].shape} here, {b[name].shape} in mergekit"
            return row
        scale = max(np.abs(b[name]).max(), 1e-30)
        diff = np.abs(a[name] - b[name])
        errs[name] = float(diff.max() / scale)
        off += int(np.count_nonzero(diff > BF16_TOL * scale))
        total += diff.size
    row["mismatch"] = off / total
    worst = max(errs, key=errs.get)
    row["max_rel_err"] = errs[worst]
    row["worst_tensor"] = worst
    if case.kind == "random":
        ka = kb = la = lb = n = 0
        for name in b:
            if name not in base or base[name].shape != b[name].shape:
                continue
            da, db = a[name] - base[name], b[name] - base[name]
            ka += np.count_nonzero(da)
            kb += np.count_nonzero(db)
            la += np.abs(da).sum()
            lb += np.abs(db).sum()
            n += da.size
        row["kept"] = (ka / n, kb / n)
        row["l1"] = (la, lb)
    return row


def _template(path: str) -> str | None:
    """The output tokenizer's chat template, rendered on a fixed conversation (as transformers does)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if not tok.chat_template:
        return None
    return tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)


def verdict(case: Case, row: dict) -> str:
    if "problem" in row or "error" in row:
        return "FAIL"
    if row.get("vocab") == "DIFFERENT" or row.get("chat_template") == "DIFFERENT" or row.get("config ok") is False:
        return "FAIL"
    if case.kind == "deviation":
        return "documented deviation"
    if case.kind == "threshold":
        return "pass (threshold)" if row["mismatch"] <= 1e-3 else "FAIL"
    if case.kind == "random":
        (ka, kb), (la, lb) = row["kept"], row["l1"]
        ok = abs(ka - kb) <= DIST_TOL * kb and abs(la - lb) <= DIST_TOL * lb
        return "pass (in distribution)" if ok else "FAIL"
    tol = BF16_TOL
    if "bfloat16" in str(case.recipe.get("dtype")):
        tol = 4 * BF16_TOL  # mergekit rounds every intermediate to bf16; here only the result
    return "pass" if row["max_rel_err"] <= tol else "FAIL"


def fmt_row(case: Case, row: dict) -> list[str]:
    method = case.recipe["merge_method"]
    err = row.get("max_rel_err")
    detail = []
    if row.get("mismatch") and case.kind != "random":
        detail.append(f"{row['mismatch']:.3%} of elements off by more than 2^-8")
    if "kept" in row:
        (ka, kb), (la, lb) = row["kept"], row["l1"]
        detail.append(f"changed {ka:.4f} vs {kb:.4f} ({(ka - kb) / kb:+.2%}); L1 {la:.2f} vs {lb:.2f} ({(la - lb) / lb:+.2%})")
    if "vocab" in row:
        detail.append(f"vocab {row['vocab']}; config vocab_size {row['config vocab_size']} (ours / mergekit)")
    if "chat_template" in row:
        detail.append(f"chat_template {row['chat_template']}")
    if case.note:
        detail.append(case.note)
    if "problem" in row:
        detail.append(row["problem"])
    if "error" in row:
        detail.append(row["error"])
    return [case.label, method, "-" if err is None else f"{err:.2e}", verdict(case, row), "; ".join(detail)]


def markdown(rows: list[list[str]]) -> str:
    head = ["recipe", "method", "max rel err", "verdict", "details"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="venv with torch + mergekit 0.1.5 (made if missing)")
    ap.add_argument("--work", type=Path, help="work directory to keep (default: a temporary one)")
    ap.add_argument("--only", help="comma-separated merge methods or labels to run")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--cli", action="store_true", help="one mergekit-yaml process per recipe")
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    py = ensure_venv(args.venv)
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="mergekit-parity-")
        work = Path(tmp.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    models = build_models(work / "models")
    todo = cases(models)
    if args.only:
        keys = {k.strip() for k in args.only.split(",")}
        todo = [c for c in todo if c.label in keys or c.recipe["merge_method"] in keys]

    import yaml

    jobs = []
    for i, c in enumerate(todo):
        yml = work / "recipes" / f"{i:02d}.yml"
        yml.parent.mkdir(parents=True, exist_ok=True)
        yml.write_text(yaml.safe_dump(c.recipe, sort_keys=False))
        jobs.append((str(yml), str(work / "mergekit" / f"{i:02d}"), args.seed))
    t0 = time.time()
    status = run_mergekit(py, jobs, work, args.cli)
    t_mk = time.time() - t0
    t0 = time.time()
    ours_status = [run_ours(yml, str(work / "mlx" / f"{i:02d}"), seed) for i, (yml, _, seed) in enumerate(jobs)]
    t_ours = time.time() - t0

    base = load(models["base"])
    rows = []
    for i, (c, (_yml, theirs, _)) in enumerate(zip(todo, jobs)):
        ours = str(work / "mlx" / f"{i:02d}")
        if status.get(theirs) or ours_status[i]:
            row = {"error": f"mergekit: {status.get(theirs) or 'ok'}; mergekit-mlx: {ours_status[i] or 'ok'}"}
        else:
            row = compare(c, ours, theirs, base)
        rows.append(fmt_row(c, row))
        print(" | ".join(rows[-1]), flush=True)

    table = markdown(rows)
    import mlx.core as mx

    header = (
        f"mergekit {_version(py, 'mergekit')} with torch {_version(py, 'torch')} (CPU) vs mergekit-mlx "
        f"(MLX {mx.__version__}, {mx.default_device()}); {platform.machine()} {platform.system()}, "
        f"{os.cpu_count()} cores; {len(todo)} recipes; mergekit {t_mk:.0f} s, mergekit-mlx {t_ours:.0f} s"
    )
    print("\n" + header + "\n\n" + table)
    if args.markdown:
        args.markdown.write_text(header + "\n\n" + table + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0 if all(r[3] != "FAIL" for r in rows) else 1


def _version(py: Path, pkg: str) -> str:
    r = subprocess.run(
        [str(py), "-c", f"import importlib.metadata as m; print(m.version('{pkg}'))"], capture_output=True, text=True
    )
    return r.stdout.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())
