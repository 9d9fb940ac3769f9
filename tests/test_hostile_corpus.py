"""A corpus of hostile and faulty situations, checked against the rules of issue "Trust".

Every case builds its situation in its own tmp dir (tiny models copied from session fixtures), runs
the tool as a user would — `mergekit-mlx ...` in this process, or `python -m mergekit_mlx ...` in a
subprocess with a timeout where a hang is possible (FIFOs, /dev/zero, absurd iteration counts) — and
then checks the same rules generically:

1. no traceback; an error exits with status 2 and prints one paragraph to stderr starting
   `mergekit-mlx: error:` that names the culprit (a regex per case);
2. nothing that existed before the run was deleted or changed (outside OUT, and only when the run
   was allowed to succeed);
3. no secret marker (a file outside the model directories, /proc/self/environ) ends up in any file
   the run wrote;
4. no hang (subprocess timeout);
5. nonsense is refused (the expected exit status is 2);
6. no `.OUT.partial` is left behind by a failed run (one that existed before may stay);
7. a full disk ends in a clean exit 2.

Legitimate situations are in the corpus too (expected exit 0): the rules must not be kept by
refusing everything. The cases say what a user has the right to expect, not what the code does today.

Set HOSTILE_REPORT=/path/file.jsonl to get one JSON line per case (id, class, outcome, problems).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
import tiny
import yaml

from mergekit_mlx.cli import main as cli_main
from mergekit_mlx.errors import MergeKitError

REPO = Path(__file__).resolve().parent.parent
SECRET = "HOSTILE-SECRET-c0ffee-7f3a9c"
SECRET_ENV = "MERGEKIT_HOSTILE_SECRET"
os.environ.setdefault(SECRET_ENV, SECRET)  # children inherit it: /proc/self/environ holds the marker
SUB_TIMEOUT = 60
INPROC_TIMEOUT = 90
MEDIUM_SHARDS = ["--out-shard-size", "256K", "--batch-size", "256K"]


# ---------------------------------------------------------------- session fixtures


@pytest.fixture(scope="session")
def medium_family(tmp_path_factory) -> list[Path]:
    """About 11 MB a model: a merge writes 40-odd 256 KB shards, long enough to stop or kill midway."""
    return tiny.make_family(tmp_path_factory.mktemp("hostile-medium"), layers=4, hidden=256, inter=512, vocab=1024)


# ---------------------------------------------------------------- the context of one case


class SetupFailed(Exception):
    """The situation could not be built (reported as a failure of the case, with this message)."""


class Ctx:
    """One case's tmp dir: copies of base, ft1, ft2, a secret outside every model, OUT."""

    def __init__(self, root: Path, family: list[Path], medium: Callable[[], list[Path]], monkeypatch):
        self.root = root
        self.monkeypatch = monkeypatch
        self._medium = medium
        self.base, self.ft1, self.ft2 = (self.clone(src, root / name) for src, name in zip(family, ("base", "ft1", "ft2")))
        self.secret_dir = root / "secret"
        self.secret_dir.mkdir()
        self.out = root / "out"
        self.cleanups: list[Callable[[], None]] = []
        self.after: list[Callable[[Ctx, Outcome], list[str]]] = []
        self.exclude: list[Path] = []  # paths whose pre-existing contents this case lets change
        self.culprit_values: dict[str, str] = {}  # values filled into a case's culprit regex ({pid})

    @staticmethod
    def clone(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst, symlinks=True)
        return dst

    def medium(self) -> list[Path]:
        return [self.clone(p, self.root / f"m-{p.name}") for p in self._medium()]

    def recipe(self, data: dict | str | bytes, name: str = "recipe.yml") -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return path

    def secret(self, name: str, content: str | bytes | None = None) -> Path:
        path = self.secret_dir / name
        if content is None:
            content = f"{SECRET}\n"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path


@dataclass
class Outcome:
    rc: int | None  # None: a traceback (exc) or a hang (timeout)
    err: str
    exc: str | None = None  # the traceback of an exception that escaped
    timeout: bool = False

    def observed(self) -> str:
        if self.timeout:
            return "HANG (killed after the timeout)"
        if self.exc:
            return f"TRACEBACK {self.exc.strip().splitlines()[-1]}"
        text = self.err.strip()
        if "Traceback (most recent call last)" in text:
            return f"rc={self.rc} TRACEBACK {text.splitlines()[-1]}"
        for line in text.splitlines():
            if "error" in line.lower():
                return f"rc={self.rc} {line}"
        return f"rc={self.rc} {text.splitlines()[0] if text else '(no stderr)'}"


# ---------------------------------------------------------------- actions: how the tool is run


@dataclass
class Cli:
    argv: list[str]
    sub: bool = False
    env: dict = field(default_factory=dict)
    cwd: Path | None = None
    timeout: float = SUB_TIMEOUT


@dataclass
class Api:
    fn: Callable[[], Any]


@dataclass
class Custom:
    fn: Callable[[], Outcome]


class _Alarm(BaseException):
    pass


@contextlib.contextmanager
def watchdog(seconds: float):
    """Best effort against an in-process hang (works while Python code runs)."""

    def fire(*_):
        raise _Alarm(f"still running after {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_inproc(argv: list[str], capsys, cwd: Path | None = None) -> Outcome:
    capsys.readouterr()
    old_cwd = os.getcwd()
    rc, exc = None, None
    try:
        if cwd is not None:
            os.chdir(cwd)
        with watchdog(INPROC_TIMEOUT):
            rc = cli_main(list(map(str, argv)))
    except SystemExit as e:  # what a user sees: the exit status, and a string code printed
        if isinstance(e.code, str):
            sys.stderr.write(e.code + "\n")
            rc = 1
        else:
            rc = 0 if e.code is None else e.code
    except _Alarm:
        os.chdir(old_cwd)
        return Outcome(None, capsys.readouterr().err, timeout=True)
    except BaseException:  # noqa: BLE001 - anything else escaping main is a traceback for the user
        exc = traceback.format_exc()
    finally:
        os.chdir(old_cwd)
    return Outcome(rc, capsys.readouterr().err, exc=exc)


def run_sub(argv: list[str], env: dict, cwd: Path | None, timeout: float) -> Outcome:
    full_env = dict(os.environ, **{SECRET_ENV: SECRET}, **env)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mergekit_mlx", *map(str, argv)],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            cwd=cwd or REPO,
            env=full_env,
        )
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return Outcome(None, err, timeout=True)
    return Outcome(proc.returncode, proc.stderr)


def run_api(fn: Callable[[], Any]) -> Outcome:
    try:
        with watchdog(INPROC_TIMEOUT):
            fn()
    except _Alarm:
        return Outcome(None, "", timeout=True)
    except MergeKitError as e:
        return Outcome(2, f"mergekit-mlx: error: {e}")
    except BaseException:  # noqa: BLE001
        return Outcome(None, "", exc=traceback.format_exc())
    return Outcome(0, "")


# ---------------------------------------------------------------- snapshots of the tmp dir


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[Path, tuple]:
    """Every path under root, without following links and without opening FIFOs."""
    snap: dict[Path, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                snap[p] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                snap[p] = ("file", sha(p))
            elif stat.S_ISDIR(st.st_mode):
                snap[p] = ("dir",)
            elif stat.S_ISFIFO(st.st_mode):
                snap[p] = ("fifo",)
            else:
                snap[p] = ("other",)
    return snap


def partial_of(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def under(p: Path, top: Path) -> bool:
    return p == top or top in p.parents


# ---------------------------------------------------------------- the case table


@dataclass
class Case:
    id: str
    cls: str
    setup: Callable[[Ctx], Cli | Api | Custom]
    expect: tuple = (2,)
    culprit: str | None = None  # regex the error paragraph must match (when the exit status is 2)
    check: Callable[[Ctx], list[str]] | None = None  # more checks after a success


CASES: list[Case] = []


def case(id: str, cls: str, setup, expect: int | tuple = 2, culprit: str | None = None, check=None) -> None:
    assert id not in {c.id for c in CASES}, id
    CASES.append(Case(id, cls, setup, expect if isinstance(expect, tuple) else (expect,), culprit, check))


def run(c: Ctx, recipe: Path, *flags: str, out: Path | None = None, sub: bool = False, **kw) -> Cli:
    return Cli(["run", str(recipe), str(c.out if out is None else out), "--no-progress", *flags], sub=sub, **kw)


def linear(models: list[Path], weights: list | None = None) -> dict:
    weights = weights or [1.0 / len(models)] * len(models)
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights)]}


def method(
    c: Ctx,
    name: str,
    shared: dict | None = None,
    per: dict | None = None,
    models: list | None = None,
    base: bool = True,
    base_in_models: bool = False,
) -> dict:
    models = [c.ft1, c.ft2] if models is None else models
    if base_in_models:
        models = [c.base] + models
    r: dict = {"merge_method": name, "models": [{"model": str(m), **({"parameters": dict(per)} if per else {})} for m in models]}
    if base:
        r["base_model"] = str(c.base)
    if shared:
        r["parameters"] = shared
    return r


def rec(build: Callable[[Ctx], dict | str | bytes], *flags: str, sub: bool = False):
    """A setup that writes the recipe build(c) returns and runs it into OUT."""
    return lambda c: run(c, c.recipe(build(c)), *flags, sub=sub)


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text())
    new = change(data)
    path.write_text(json.dumps(data if new is None else new))


def fifo(path: Path) -> Path:
    if path.exists() or path.is_symlink():
        path.unlink()
    os.mkfifo(path)
    return path


def relink(path: Path, target: str | Path) -> Path:
    if path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target)
    return path


def loads_as_model(directory: Path) -> list[str]:
    if not (directory / "config.json").is_file():
        return [f"the output {directory} has no config.json"]
    if not list(directory.glob("*.safetensors")) and not list(directory.glob("*.gguf")):
        return [f"the output {directory} has no weights"]
    return []


def out_is_model(c: Ctx) -> list[str]:
    return loads_as_model(c.out)


# ================================================================ recipe text and YAML

R = "recipe"


def _valid(c: Ctx) -> dict:
    return linear([c.base, c.ft1])


case("recipe-empty-file", R, rec(lambda c: ""), culprit=r"recipe\.yml")
case("recipe-only-a-comment", R, rec(lambda c: "# nothing here\n"), culprit=r"recipe\.yml")
case("recipe-top-level-list", R, rec(lambda c: "- merge_method: linear\n- models: []\n"), culprit=r"recipe\.yml")
case("recipe-top-level-scalar", R, rec(lambda c: "linear\n"), culprit=r"recipe\.yml")
case("recipe-binary-garbage", R, rec(lambda c: bytes(range(256)) * 8), culprit=r"recipe\.yml")
case("recipe-invalid-utf8", R, rec(lambda c: b"merge_method: linear\nmodels:\n  - model: \xff\xfe\xfd\n"), culprit=r"recipe\.yml")
case("recipe-utf8-bom-works", R, rec(lambda c: "\ufeff" + yaml.safe_dump(_valid(c))), expect=0, check=out_is_model)
case("recipe-tab-indentation", R, rec(lambda c: "merge_method: linear\nmodels:\n\t- model: x\n"), culprit=r"recipe\.yml")
case("recipe-unclosed-flow-list", R, rec(lambda c: "merge_method: linear\nmodels: [\n"), culprit=r"recipe\.yml")
case("recipe-is-a-directory", R, lambda c: run(c, (c.root / "dir.yml").mkdir() or c.root / "dir.yml"), culprit=r"dir\.yml")
case("recipe-missing", R, lambda c: run(c, c.root / "nope.yml"), culprit=r"nope\.yml")
case("recipe-fifo", R, lambda c: run(c, fifo(c.root / "recipe.yml"), sub=True), culprit=r"recipe\.yml")
case("recipe-symlink-to-dev-zero", R, lambda c: run(c, relink(c.root / "zero.yml", "/dev/zero"), sub=True), culprit=r"zero\.yml")
case(
    "recipe-no-merge-method",
    R,
    rec(lambda c: {k: v for k, v in _valid(c).items() if k != "merge_method"}),
    culprit="merge_method",
)
case("recipe-merge-method-list", R, rec(lambda c: dict(_valid(c), merge_method=["ties"])), culprit="merge_method")
case("recipe-merge-method-empty", R, rec(lambda c: dict(_valid(c), merge_method="")), culprit="merge_method")
case(
    "recipe-models-and-slices",
    R,
    rec(lambda c: dict(_valid(c), slices=[{"sources": [{"model": str(c.base), "layer_range": [0, 2]}]}])),
    culprit="slices",
)
case("recipe-models-empty", R, rec(lambda c: dict(_valid(c), models=[])), culprit="models")
case("recipe-models-a-string", R, rec(lambda c: dict(_valid(c), models=str(c.base))), culprit="models")
case(
    "recipe-model-entries-bare-strings",
    R,
    rec(lambda c: dict(_valid(c), models=[str(c.base), str(c.ft1)])),
    culprit=r"models\[0\]",
)
case(
    "recipe-model-key-missing",
    R,
    rec(
        lambda c: dict(_valid(c), models=[{"parameters": {"weight": 1.0}}, {"model": str(c.ft1), "parameters": {"weight": 1.0}}])
    ),
    culprit=r"models\[0\]",
)
case(
    "recipe-model-null",
    R,
    rec(
        lambda c: dict(
            _valid(c),
            models=[{"model": None, "parameters": {"weight": 1.0}}, {"model": str(c.ft1), "parameters": {"weight": 1.0}}],
        )
    ),
    culprit=r"models\[0\]\.model",
)
case(
    "recipe-model-a-number",
    R,
    rec(
        lambda c: dict(
            _valid(c), models=[{"model": 42, "parameters": {"weight": 1.0}}, {"model": str(c.ft1), "parameters": {"weight": 1.0}}]
        )
    ),
    culprit=r"models\[0\]\.model",
)
case("recipe-top-parameters-a-list", R, rec(lambda c: dict(_valid(c), parameters=[1, 2])), culprit="parameters")
case("recipe-dtype-unknown", R, rec(lambda c: dict(_valid(c), dtype="float8")), culprit="dtype")
case("recipe-out-dtype-unknown", R, rec(lambda c: dict(_valid(c), out_dtype="int4")), culprit="out_dtype")
case(
    "recipe-nested-misspelt-key",
    R,
    rec(
        lambda c: dict(
            _valid(c),
            models=[{"model": str(c.base), "paramters": {"weight": 0.5}}, {"model": str(c.ft1), "parameters": {"weight": 0.5}}],
        )
    ),
    culprit="paramters",
)
case(
    "recipe-nested-duplicate-key",
    R,
    rec(
        lambda c: (
            f"merge_method: linear\nmodels:\n  - model: {c.base}\n    parameters:\n      weight: 0.5\n      weight: 0.9\n"
            f"  - model: {c.ft1}\n    parameters:\n      weight: 0.5\n"
        )
    ),
    culprit="weight",
)
case("recipe-slices-empty", R, rec(lambda c: {"merge_method": "passthrough", "slices": []}), culprit="slices")
case(
    "recipe-slice-without-sources",
    R,
    rec(lambda c: {"merge_method": "passthrough", "slices": [{"sources": []}]}),
    culprit=r"slices\[0\]",
)


def _passthrough(c: Ctx, layer_range) -> dict:
    return {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(c.base), "layer_range": layer_range}]}]}


case("recipe-layer-range-floats", R, rec(lambda c: _passthrough(c, [0.5, 1.5])), culprit="layer_range")
case("recipe-layer-range-three-numbers", R, rec(lambda c: _passthrough(c, [0, 1, 2])), culprit="layer_range")
case("recipe-layer-range-strings", R, rec(lambda c: _passthrough(c, ["a", "b"])), culprit="layer_range")
case(
    "recipe-tokenizer-source-unknown",
    R,
    rec(lambda c: dict(_valid(c), tokenizer_source="no-such-model-anywhere")),
    culprit="tokenizer_source",
)
case(
    "recipe-chat-template-broken-jinja",
    R,
    rec(lambda c: dict(_valid(c), chat_template="{% if %}{{ messages ")),
    culprit="chat_template",
)
case(
    "recipe-filter-not-a-string",
    R,
    rec(lambda c: linear([c.base, c.ft1], [[{"filter": 3, "value": 0.5}], 0.5])),
    culprit="weight|filter",
)
case("recipe-filter-without-value", R, rec(lambda c: linear([c.base, c.ft1], [[{"filter": "mlp"}], 0.5])), culprit="weight|value")
case("recipe-gradient-empty-list", R, rec(lambda c: linear([c.base, c.ft1], [[], 0.5])), culprit="weight")
case(
    "recipe-yaml-dot-nan-weight",
    R,
    rec(
        lambda c: (
            f"merge_method: linear\nmodels:\n  - model: {c.base}\n    parameters: {{weight: .nan}}\n"
            f"  - model: {c.ft1}\n    parameters: {{weight: 0.5}}\n"
        )
    ),
    culprit="weight",
)
case(
    "recipe-weight-1e999-string",
    R,
    rec(
        lambda c: (
            f"merge_method: linear\nmodels:\n  - model: {c.base}\n    parameters: {{weight: 1e999}}\n"
            f"  - model: {c.ft1}\n    parameters: {{weight: 0.5}}\n"
        )
    ),
    culprit="weight",
)
case(
    "recipe-weight-yes",
    R,
    rec(
        lambda c: (
            f"merge_method: linear\nmodels:\n  - model: {c.base}\n    parameters: {{weight: yes}}\n"
            f"  - model: {c.ft1}\n    parameters: {{weight: 0.5}}\n"
        )
    ),
    culprit="weight",
)
case("recipe-valid-control", R, rec(_valid), expect=0, check=out_is_model)
case(
    "recipe-mergekit-yaml-form-control",
    R,
    lambda c: Cli([str(c.recipe(_valid(c))), str(c.out), "--no-progress"]),
    expect=0,
    check=out_is_model,
)

# ================================================================ parameters and ranges per method

P = "params"


def m(name: str, shared=None, per=None, **kw):
    return rec(lambda c: method(c, name, shared, per, **kw))


case("ties-density-2", P, m("ties", per={"weight": 1.0, "density": 2.0}), culprit="density")
case("dare_ties-density-negative", P, m("dare_ties", per={"weight": 1.0, "density": -0.1}), culprit="density")
case("dare_linear-density-0-with-rescale", P, m("dare_linear", per={"weight": 1.0, "density": 0.0}), culprit="density")
case("sce-select_topk-negative", P, m("sce", shared={"select_topk": -0.5}), culprit="select_topk")
case("sce-select_topk-1.5", P, m("sce", shared={"select_topk": 1.5}), culprit="select_topk")
case("slerp-t-2", P, rec(lambda c: method(c, "slerp", {"t": 2.0}, models=[c.base, c.ft1])), culprit=r"\bt\b")
case("slerp-t-nan", P, rec(lambda c: method(c, "slerp", {"t": float("nan")}, models=[c.base, c.ft1])), culprit=r"\bt\b")
case("slerp-t-missing", P, rec(lambda c: method(c, "slerp", None, models=[c.base, c.ft1])), culprit=r"\bt\b")
case(
    "della_linear-epsilon-negative", P, m("della_linear", per={"weight": 1.0, "density": 0.5, "epsilon": -0.1}), culprit="epsilon"
)
case("breadcrumbs-gamma-negative", P, m("breadcrumbs", per={"weight": 1.0, "density": 0.8, "gamma": -0.1}), culprit="gamma")
case(
    "breadcrumbs-density-plus-gamma-above-1",
    P,
    m("breadcrumbs", per={"weight": 1.0, "density": 0.9, "gamma": 0.5}),
    culprit="gamma|density",
)
case("ties-lambda-inf", P, m("ties", shared={"lambda": float("inf")}, per={"weight": 1.0, "density": 0.5}), culprit="lambda")
case("karcher-max_iter-0", P, m("karcher", shared={"max_iter": 0}, base=False), culprit="max_iter")
case("karcher-max_iter-negative", P, m("karcher", shared={"max_iter": -5}, base=False), culprit="max_iter")
case("karcher-max_iter-2.5", P, m("karcher", shared={"max_iter": 2.5}, base=False), culprit="max_iter")
case(
    "karcher-absurd-iterations-negative-tol",
    P,
    lambda c: run(c, c.recipe(method(c, "karcher", {"max_iter": 1_000_000_000, "tol": -1}, base=False)), sub=True),
    culprit="tol|max_iter",
)
case("karcher-tol-nan", P, m("karcher", shared={"tol": float("nan")}, base=False), culprit="tol")
case("ramplus_tl-r-negative", P, m("ramplus_tl", shared={"r": -0.1}), culprit=r"\br\b")
case("ramplus_tl-alpha-negative", P, m("ramplus_tl", shared={"alpha": -1.0}), culprit="alpha")
case("ram-epsilon-negative", P, m("ram", shared={"epsilon": -1.0}), culprit="epsilon")
case("multislerp-eps-negative", P, m("multislerp", shared={"eps": -1.0}, per={"weight": 0.5}), culprit="eps")
case(
    "multislerp-weight-negative",
    P,
    rec(
        lambda c: dict(
            method(c, "multislerp"),
            models=[{"model": str(c.ft1), "parameters": {"weight": -1.0}}, {"model": str(c.ft2), "parameters": {"weight": 0.5}}],
        )
    ),
    culprit="weight",
)
case("linear-weights-all-zero", P, rec(lambda c: linear([c.base, c.ft1], [0.0, 0.0])), culprit="weight")
case("linear-weights-sum-to-zero", P, rec(lambda c: linear([c.base, c.ft1], [1.0, -1.0])), culprit="weight")
case("nuslerp-weights-both-zero", P, m("nuslerp", per={"weight": 0.0}), culprit="weight")
case(
    "slerp-three-models", P, rec(lambda c: method(c, "slerp", {"t": 0.5}, models=[c.base, c.ft1, c.ft2])), culprit="models|slerp"
)
case(
    "slerp-without-base",
    P,
    rec(lambda c: method(c, "slerp", {"t": 0.5}, models=[c.ft1, c.ft2], base=False)),
    culprit="base_model",
)
case("ties-without-base", P, m("ties", per={"weight": 1.0, "density": 0.5}, base=False), culprit="base_model")
case("model_stock-too-few-models", P, rec(lambda c: method(c, "model_stock", models=[c.ft1])), culprit="models|model_stock")
case(
    "passthrough-two-sources-in-a-slice",
    P,
    rec(
        lambda c: {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(c.base), "layer_range": [0, 2]}, {"model": str(c.ft1), "layer_range": [0, 2]}]}
            ],
        }
    ),
    culprit="sources|passthrough",
)
case(
    "arcee_fusion-three-models", P, rec(lambda c: method(c, "arcee_fusion", models=[c.ft1, c.ft2])), culprit="models|arcee_fusion"
)
case(
    "nuslerp-one-model-besides-base",
    P,
    rec(lambda c: method(c, "nuslerp", per={"weight": 0.5}, models=[c.ft1])),
    culprit="models|nuslerp",
)
case(
    "slerp-with-density",
    P,
    rec(lambda c: method(c, "slerp", {"t": 0.5, "density": 0.5}, models=[c.base, c.ft1])),
    culprit="density",
)
case("linear-gradient-with-nan", P, rec(lambda c: linear([c.base, c.ft1], [[0.5, float("nan")], 0.5])), culprit="weight")
case(
    "ties-int8_mask-maybe", P, m("ties", shared={"int8_mask": "maybe"}, per={"weight": 1.0, "density": 0.5}), culprit="int8_mask"
)
case("model_stock-filter_wise-3", P, m("model_stock", shared={"filter_wise": 3}), culprit="filter_wise")
case("ties-density-gradient-out-of-range", P, m("ties", per={"weight": 1.0, "density": [0.5, 3.0]}), culprit="density")
case(
    "ties-filtered-density-out-of-range",
    P,
    m("ties", per={"weight": 1.0, "density": [{"filter": "mlp", "value": 5.0}, {"value": 0.5}]}),
    culprit="density",
)
case("nearswap-t-negative", P, rec(lambda c: method(c, "nearswap", {"t": -0.5}, models=[c.ft1])), culprit=r"\bt\b")
case(
    "linear-weight-missing",
    P,
    rec(lambda c: {"merge_method": "linear", "models": [{"model": str(c.base)}, {"model": str(c.ft1)}]}),
    culprit="weight",
)
case("ties-weight-true", P, m("ties", per={"weight": True, "density": 0.5}), culprit="weight")
case("ties-control", P, m("ties", per={"weight": 1.0, "density": 0.5}), expect=0, check=out_is_model)
case("della-control", P, m("della", per={"weight": 1.0, "density": 0.6, "epsilon": 0.15}), expect=0, check=out_is_model)
case("karcher-control", P, m("karcher", shared={"max_iter": 10, "tol": 1e-5}, base=False), expect=0, check=out_is_model)

# ================================================================ model references

M = "refs"


def hf_cache(c: Ctx, hub: Path, repo_id: str, src: Path) -> Path:
    """src laid out as the Hugging Face hub cache stores it: snapshot files are links into ../../blobs."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot_dir = repo / "snapshots" / "0123456789abcdef"
    snapshot_dir.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    for f in src.iterdir():
        blob = repo / "blobs" / sha(f)
        shutil.copy(f, blob)
        (snapshot_dir / f.name).symlink_to(Path("../../blobs") / blob.name)
    return snapshot_dir


def _hf_repo_id(c: Ctx) -> Cli:
    hub = c.root / "hf" / "hub"
    hf_cache(c, hub, "org/tiny-ft", c.ft1)
    recipe = c.recipe(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(c.base), "parameters": {"weight": 0.5}},
                {"model": "org/tiny-ft", "parameters": {"weight": 0.5}},
            ],
        }
    )
    return run(c, recipe, sub=True, env={"HF_HOME": str(c.root / "hf"), "HF_HUB_CACHE": str(hub)})


def _hf_missing(c: Ctx) -> Cli:
    (c.root / "hf" / "hub").mkdir(parents=True)
    recipe = c.recipe(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(c.base), "parameters": {"weight": 0.5}},
                {"model": "org-x/not-cached", "parameters": {"weight": 0.5}},
            ],
        }
    )
    return run(c, recipe, sub=True, env={"HF_HOME": str(c.root / "hf"), "HF_HUB_CACHE": str(c.root / "hf" / "hub")}, timeout=40)


def _recipe_relative(c: Ctx) -> Cli:
    r = {
        "merge_method": "linear",
        "models": [{"model": "../base", "parameters": {"weight": 0.5}}, {"model": "../ft1", "parameters": {"weight": 0.5}}],
    }
    (c.secret_dir / "deeper").mkdir()  # ../base from here does not exist: only the recipe's folder resolves it
    return run(c, c.recipe(r, "recipes/relative.yml"), cwd=c.secret_dir / "deeper")


def _unicode_path(c: Ctx) -> Cli:
    odd = c.clone(c.ft1, c.root / "my models" / "ft ü ✓")
    return run(c, c.recipe(linear([c.base, odd])))


case("model-missing", M, rec(lambda c: linear([c.base, c.root / "no-such-model"])), culprit=r"models\[1\]\.model")
case("same-model-trailing-slash", M, rec(lambda c: linear([c.ft1, str(c.ft1) + "/"])), culprit=r"models\[1\]")
case("same-model-via-symlink", M, rec(lambda c: linear([c.ft1, relink(c.root / "alias", c.ft1)])), culprit=r"models\[1\]")
case("same-model-via-dotdot", M, rec(lambda c: linear([c.ft1, f"{c.root}/ft2/../ft1"])), culprit=r"models\[1\]")
case(
    "same-model-twice-besides-base",
    M,
    rec(lambda c: method(c, "ties", per={"weight": 1.0, "density": 0.5}, models=[c.ft1, f"{c.ft1}/"])),
    culprit=r"models\[1\]",
)
case("models-relative-to-the-recipe-control", M, _recipe_relative, expect=0, check=out_is_model)
case("base-not-listed-in-models-control", M, m("ties", per={"weight": 1.0, "density": 0.5}), expect=0, check=out_is_model)
case(
    "model-is-a-plain-file", M, rec(lambda c: linear([c.base, c.secret("notes.txt", "hello")])), culprit=r"models\[1\]|notes\.txt"
)
case(
    "model-is-an-empty-dir",
    M,
    rec(lambda c: linear([c.base, (c.root / "empty").mkdir() or c.root / "empty"])),
    culprit=r"models\[1\]|empty",
)
case("model-hf-id-not-in-cache", M, _hf_missing, culprit="org-x/not-cached")
case(
    "model-hf-cache-snapshot-path-control",
    M,
    rec(lambda c: linear([c.base, hf_cache(c, c.root / "hub", "org/tiny", c.ft1)])),
    expect=0,
    check=out_is_model,
)
case("model-hf-cache-repo-id-control", M, _hf_repo_id, expect=0, check=out_is_model)
case("model-path-with-spaces-and-unicode-control", M, _unicode_path, expect=0, check=out_is_model)
case(
    "tokenizer-source-path-missing",
    M,
    rec(lambda c: dict(linear([c.base, c.ft1]), tokenizer_source=str(c.root / "gone"))),
    culprit="tokenizer_source",
)
case(
    "base-model-missing",
    M,
    rec(lambda c: dict(method(c, "ties", per={"weight": 1.0, "density": 0.5}), base_model=str(c.root / "gone"))),
    culprit="base_model",
)
case("model-symlink-loop", M, rec(lambda c: linear([c.base, relink(c.root / "loop", c.root / "loop")])), culprit=r"models\[1\]")
case("model-empty-string", M, rec(lambda c: linear([c.base, ""])), culprit=r"models\[1\]")


def _same_base_other_spelling(c: Ctx) -> Cli:
    consistent = method(c, "ties", per={"weight": 1.0, "density": 0.5}, models=[c.base, c.ft1, c.ft2])
    respelt = dict(consistent, base_model=f"{c.base}/")
    ref = c.root / "reference"
    problem = run_inproc_quiet(["run", str(c.recipe(consistent, "consistent.yml")), str(ref), "--no-progress"])
    if problem:
        raise SetupFailed(f"the reference merge failed: {problem}")

    def same(c: Ctx, o: Outcome) -> list[str]:
        if o.rc != 0:
            return []
        got = {p.name: sha(p) for p in c.out.glob("*.safetensors")}
        want = {p.name: sha(p) for p in ref.glob("*.safetensors")}
        return [] if got == want else ["base_model spelt 'base/' was merged as a third model, not as the base listed in models"]

    c.after.append(same)
    return run(c, c.recipe(respelt))


case("base-listed-in-models-under-another-spelling-control", M, _same_base_other_spelling, expect=0, check=out_is_model)
case(
    "model-dir-is-a-symlink-control",
    M,
    rec(lambda c: linear([c.base, relink(c.root / "alias", c.ft1)])),
    expect=0,
    check=out_is_model,
)
case(
    "chat-template-names-proc-environ",
    M,
    rec(lambda c: dict(_valid(c), chat_template="/proc/self/environ"), sub=True),
    expect=(0, 2),
    culprit="chat_template",
)
case(
    "chat-template-names-a-file-outside",
    M,
    rec(lambda c: dict(_valid(c), chat_template=str(c.secret("tmpl.jinja", "{{ '" + SECRET + "' }}")))),
    expect=(0, 2),
    culprit="chat_template",
)

# ================================================================ input model directories and files

I = "inputs"


def inp(change: Callable[[Ctx], Any], build: Callable[[Ctx], dict] | None = None, sub: bool = False):
    """Change the inputs, then merge base and ft1 linearly (or as build(c) says)."""

    def setup(c: Ctx) -> Cli:
        change(c)
        return run(c, c.recipe((build or _valid)(c)), sub=sub)

    return setup


def _layers(c: Ctx, n, models=None):
    for mdl in models or [c.ft1]:
        edit_json(mdl / "config.json", lambda cfg: cfg.update(num_hidden_layers=n))


def _deep_json(c: Ctx):
    (c.ft1 / "config.json").write_text("[" * 200_000 + "]" * 200_000)


def _outside_config(c: Ctx):
    cfg = json.loads((c.ft1 / "config.json").read_text())
    cfg["secret_note"] = SECRET
    relink(c.ft1 / "config.json", c.secret("config.json", json.dumps(cfg)))


def _base_outside_config(c: Ctx):
    cfg = json.loads((c.base / "config.json").read_text())
    cfg["secret_note"] = SECRET
    relink(c.base / "config.json", c.secret("config.json", json.dumps(cfg)))


def shard(model: Path, shards: int = 2) -> Path:
    cfg = json.loads((model / "config.json").read_text())
    weights = tiny.load_np(model)
    (model / "model.safetensors").unlink()
    tiny.save_model(model, cfg, weights, shards=shards, tokenizer=False)
    return model


def _index(c: Ctx, change):
    shard(c.ft1)
    edit_json(c.ft1 / "model.safetensors.index.json", change)


def _index_missing_shard(c: Ctx):
    shard(c.ft1)
    (c.ft1 / "model-00002-of-00002.safetensors").unlink()


def _index_extra_tensor(idx):
    idx["weight_map"]["model.fake.weight"] = "model-00001-of-00002.safetensors"


def _shard_fifo(c: Ctx):
    shard(c.ft1)
    fifo(c.ft1 / "model-00002-of-00002.safetensors")


def _same_tensor_twice(c: Ctx):
    w = {k: mx.array(v.astype(np.float32)) for k, v in tiny.load_np(c.ft1).items()}
    names = sorted(w)
    (c.ft1 / "model.safetensors").unlink()
    mx.save_safetensors(
        str(c.ft1 / "part-a.safetensors"), {k: w[k] for k in names[: len(names) // 2] + ["model.embed_tokens.weight"]}
    )
    mx.save_safetensors(
        str(c.ft1 / "part-b.safetensors"), {k: w[k] for k in names[len(names) // 2 :] + ["model.embed_tokens.weight"]}
    )


def _raw_header(c: Ctx, header: bytes, data: bytes = b""):
    (c.ft1 / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)


def _bf16(c: Ctx):
    cfg = json.loads((c.ft1 / "config.json").read_text())
    w = tiny.load_np(c.ft1)
    (c.ft1 / "model.safetensors").unlink()
    tiny.save_model(c.ft1, cfg, w, dtype="bfloat16", tokenizer=False)


def _weights_link_inside(c: Ctx):
    (c.ft1 / "store").mkdir()
    (c.ft1 / "model.safetensors").rename(c.ft1 / "store" / "weights.bin.safetensors")
    relink(c.ft1 / "model.safetensors", "store/weights.bin.safetensors")


SIDE_FILES = [
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "added_tokens.json",
]


def side_content(c: Ctx, name: str) -> str | bytes:
    """A plausible side file of that name that carries the secret marker."""
    if name == "tokenizer.json":
        tok = json.loads((c.base / "tokenizer.json").read_text())
        vocab = tok["model"]["vocab"]
        idx = vocab.pop("w10")
        vocab[SECRET] = idx
        return json.dumps(tok)
    if name == "tokenizer_config.json":
        cfg = json.loads((c.base / "tokenizer_config.json").read_text())
        return json.dumps(dict(cfg, secret_note=SECRET))
    if name == "special_tokens_map.json":
        return json.dumps({"bos_token": "<s>", "eos_token": "</s>", "secret_note": SECRET})
    if name == "generation_config.json":
        return json.dumps({"bos_token_id": 1, "eos_token_id": 2, "secret_note": SECRET})
    if name == "added_tokens.json":
        return json.dumps({SECRET: 63})
    if name == "vocab.json":
        return json.dumps({SECRET: 0, "<s>": 1, "</s>": 2})
    if name == "merges.txt":
        return f"#version: 0.2\nh e\n# {SECRET}\n"
    if name == "chat_template.jinja":
        return "{{ '" + SECRET + "' }}{% for m in messages %}{{ m.content }}{% endfor %}"
    return b"\x0a\x0b" + SECRET.encode() + b"\x00" * 32  # tokenizer.model: any bytes


def _side_out(name: str, model: str = "base"):
    def change(c: Ctx):
        target = c.secret(name, side_content(c, name))
        relink(getattr(c, model) / name, target)

    return change


def _side_environ(name: str):
    return lambda c: relink(c.base / name, "/proc/self/environ")


def _side_fifo(name: str):
    return lambda c: fifo(c.base / name)


def _side_inside(c: Ctx):
    (c.base / "tok").mkdir()
    (c.base / "tokenizer_config.json").rename(c.base / "tok" / "tokenizer_config.json")
    relink(c.base / "tokenizer_config.json", "tok/tokenizer_config.json")


def _side_dir(c: Ctx):
    (c.base / "tokenizer.json").unlink()
    (c.base / "tokenizer.json").mkdir()


def quantize_model(src: Path, dst: Path, bits: int = 4, group: int = 32, block: dict | None = None) -> Path:
    """src as an MLX affine-quantized directory (mlx-lm layout: .weight codes, .scales, .biases)."""
    dst.mkdir()
    arrays = {}
    for name, v in tiny.load_np(src).items():
        a = mx.array(v.astype(np.float32))
        if v.ndim == 2 and v.shape[-1] % group == 0:
            q, s, b = mx.quantize(a, group_size=group, bits=bits)
            stem = name[: -len("weight")]
            arrays.update({name: q, stem + "scales": s, stem + "biases": b})
        else:
            arrays[name] = a
    mx.save_safetensors(str(dst / "model.safetensors"), arrays, metadata={"format": "mlx"})
    cfg = json.loads((src / "config.json").read_text())
    qb = block or {"group_size": group, "bits": bits}
    cfg.update(quantization=qb, quantization_config=qb)
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dst / f)
    return dst


def _quant(block=None, scales_bad=False):
    def build(c: Ctx) -> dict:
        q = quantize_model(c.ft1, c.root / "ft1-q4", block=block)
        if scales_bad:
            w = mx.load(str(q / "model.safetensors"))
            w["model.layers.0.self_attn.q_proj.scales"] = w["model.layers.0.self_attn.q_proj.scales"][:16]
            mx.save_safetensors(str(q / "model.safetensors"), w)
        return linear([c.base, q])

    return build


def _quant_block_on_plain(block: dict):
    def change(c: Ctx):
        edit_json(c.ft1 / "config.json", lambda cfg: cfg.update(quantization=block))

    return change


def _gguf_file(content: bytes):
    def build(c: Ctx) -> dict:
        path = c.root / "bad.gguf"
        path.write_bytes(content)
        return linear([c.base, path])

    return build


def _gguf_control(c: Ctx) -> Cli:
    out = run_inproc_quiet(["convert", str(c.ft1), str(c.root / "ft1.gguf"), "--out-format", "gguf-f16"])
    if out:
        raise SetupFailed(f"could not build the GGUF input with `mergekit-mlx convert`: {out}")
    return run(c, c.recipe(linear([c.base, c.root / "ft1.gguf"])))


def run_inproc_quiet(argv: list[str]) -> str:
    """Run the tool in this process for a setup step; '' when it worked, else what went wrong."""
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = cli_main(argv)
    except BaseException as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "" if rc == 0 else f"rc={rc}: {err.getvalue().strip()[:300]}"


def _bin_beside_safetensors(c: Ctx):
    import pickle

    marker = c.root / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (c.ft1 / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    c.after.append(lambda c, o: ["a pickle was loaded (the marker file exists)"] if marker.exists() else [])


case("config-missing", I, inp(lambda c: (c.ft1 / "config.json").unlink()), culprit=r"config\.json")
case("config-not-json", I, inp(lambda c: (c.ft1 / "config.json").write_text("{architectures: llama")), culprit=r"config\.json")
case("config-a-json-list", I, inp(lambda c: (c.ft1 / "config.json").write_text("[1, 2]")), culprit=r"config\.json")
case("config-num-layers-below-tensors", I, inp(lambda c: _layers(c, 1)), culprit="num_hidden_layers")
case("config-num-layers-below-tensors-everywhere", I, inp(lambda c: _layers(c, 1, [c.base, c.ft1])), culprit="num_hidden_layers")
case("config-num-layers-a-string", I, inp(lambda c: _layers(c, "two")), culprit="num_hidden_layers")
case("config-num-layers-negative", I, inp(lambda c: _layers(c, -2)), culprit="num_hidden_layers")
case(
    "config-hidden-size-lies",
    I,
    inp(lambda c: edit_json(c.ft1 / "config.json", lambda cfg: cfg.update(hidden_size=64))),
    culprit="hidden_size|config\\.json",
)
case("config-fifo", I, inp(lambda c: fifo(c.ft1 / "config.json"), sub=True), culprit=r"config\.json")
case(
    "config-symlink-to-proc-environ",
    I,
    inp(lambda c: relink(c.ft1 / "config.json", "/proc/self/environ"), sub=True),
    culprit=r"config\.json",
)
case("config-nested-200000-deep", I, inp(_deep_json), culprit=r"config\.json")
case(
    "config-is-a-directory",
    I,
    inp(lambda c: ((c.ft1 / "config.json").unlink(), (c.ft1 / "config.json").mkdir())),
    culprit=r"config\.json",
)
case("config-symlink-out-of-the-model", I, inp(_outside_config), culprit=r"config\.json")
case("base-config-symlink-out-of-the-model", I, inp(_base_outside_config), culprit=r"config\.json")
case("index-names-a-missing-shard", I, inp(_index_missing_shard), culprit=r"model-00002-of-00002|index")
case("index-weight-map-empty", I, inp(lambda c: _index(c, lambda idx: idx.update(weight_map={}))), culprit=r"index\.json")
case("index-lists-an-absent-tensor", I, inp(lambda c: _index(c, _index_extra_tensor)), culprit=r"model\.fake\.weight")
case(
    "index-not-json",
    I,
    inp(lambda c: (shard(c.ft1), (c.ft1 / "model.safetensors.index.json").write_text("{oops"))),
    culprit=r"index\.json",
)
case(
    "index-fifo", I, inp(lambda c: (shard(c.ft1), fifo(c.ft1 / "model.safetensors.index.json")), sub=True), culprit=r"index\.json"
)
case("shard-fifo", I, inp(_shard_fifo, sub=True), culprit=r"model-00002-of-00002\.safetensors")
case("weights-fifo", I, inp(lambda c: fifo(c.ft1 / "model.safetensors"), sub=True), culprit=r"model\.safetensors")
case(
    "weights-symlink-to-dev-zero",
    I,
    inp(lambda c: relink(c.ft1 / "model.safetensors", "/dev/zero"), sub=True),
    culprit=r"model\.safetensors",
)
case("two-files-define-the-same-tensor", I, inp(_same_tensor_twice), culprit=r"model\.embed_tokens\.weight")
case("header-empty-object", I, inp(lambda c: _raw_header(c, b"{}")), culprit=r"model\.safetensors|models\[1\]")
case("weights-zero-bytes", I, inp(lambda c: (c.ft1 / "model.safetensors").write_bytes(b"")), culprit=r"model\.safetensors")
case(
    "header-metadata-only",
    I,
    inp(lambda c: _raw_header(c, b'{"__metadata__": {"format": "pt"}}')),
    culprit=r"model\.safetensors|models\[1\]",
)
case("bf16-beside-f32-control", I, inp(_bf16), expect=0, check=out_is_model)
case("weights-symlink-inside-the-model-control", I, inp(_weights_link_inside), expect=0, check=out_is_model)
for _name in SIDE_FILES:
    case(f"side-{_name}-symlink-out-of-the-model", I, inp(_side_out(_name)), culprit=_name.replace(".", r"\."))
for _name in ["tokenizer.model", "generation_config.json", "chat_template.jinja"]:
    case(f"side-{_name}-symlink-to-proc-environ", I, inp(_side_environ(_name), sub=True), culprit=_name.replace(".", r"\."))
for _name in ["tokenizer.json", "special_tokens_map.json"]:
    case(f"side-{_name}-fifo", I, inp(_side_fifo(_name), sub=True), culprit=_name.replace(".", r"\."))
case(
    "side-symlink-in-a-fine-tune-with-union-tokenizer",
    I,
    inp(_side_out("special_tokens_map.json", "ft1"), lambda c: dict(_valid(c), tokenizer_source="union")),
    culprit=r"special_tokens_map\.json",
)
case(
    "side-symlink-inside-the-model-control",
    I,
    inp(_side_inside),
    expect=0,
    check=lambda c: (
        out_is_model(c) + ([] if (c.out / "tokenizer_config.json").is_file() else ["tokenizer_config.json was not copied"])
    ),
)
case("side-tokenizer.json-is-a-directory", I, inp(_side_dir), culprit=r"tokenizer\.json")
case("quantization-block-bits-99", I, inp(_quant_block_on_plain({"group_size": 32, "bits": 99})), culprit="bits|quantization")
case(
    "quantization-block-group-size-0",
    I,
    inp(_quant_block_on_plain({"group_size": 0, "bits": 4})),
    culprit="group_size|quantization",
)
case("quantized-scales-wrong-shape", I, rec(_quant(scales_bad=True)), culprit=r"q_proj")
case("quantized-block-lies-about-bits", I, rec(_quant(block={"group_size": 32, "bits": 8})), culprit="bits|quantization")
case("quantized-input-control", I, rec(_quant()), expect=0, check=out_is_model)
case("gguf-empty-file", I, rec(_gguf_file(b"")), culprit=r"bad\.gguf")
case("gguf-magic-only", I, rec(_gguf_file(b"GGUF")), culprit=r"bad\.gguf")
case("gguf-version-99", I, rec(_gguf_file(b"GGUF" + struct.pack("<IQQ", 99, 0, 0))), culprit=r"bad\.gguf")
case("gguf-fifo", I, lambda c: run(c, c.recipe(linear([c.base, fifo(c.root / "pipe.gguf")])), sub=True), culprit=r"pipe\.gguf")
case("gguf-input-control", I, _gguf_control, expect=0, check=out_is_model)
case("pickle-beside-safetensors-control", I, inp(_bin_beside_safetensors), expect=0, check=out_is_model)


def _two_hop(c: Ctx):
    target = c.secret("tokenizer.model", side_content(c, "tokenizer.model"))
    relink(c.base / "hop.model", target)
    relink(c.base / "tokenizer.model", "hop.model")


def _dir_link_out(c: Ctx):
    (c.secret_dir / "tok").mkdir()
    (c.secret_dir / "tok" / "special_tokens_map.json").write_text(side_content(c, "special_tokens_map.json"))
    relink(c.base / "tok", c.secret_dir / "tok")
    relink(c.base / "special_tokens_map.json", "tok/special_tokens_map.json")


case("side-two-hop-symlink-out-of-the-model", I, inp(_two_hop), culprit=r"tokenizer\.model|hop\.model")
case("side-symlink-through-a-linked-folder", I, inp(_dir_link_out), culprit=r"special_tokens_map\.json")
case(
    "side-symlink-to-another-models-file",
    I,
    inp(
        lambda c: relink(
            c.base / "generation_config.json", c.secret("generation_config.json", side_content(c, "generation_config.json"))
        )
    ),
    culprit=r"generation_config\.json",
)

# ================================================================ output locations and --force

O = "output"


def _prev_output(c: Ctx, out: Path | None = None, *flags: str) -> Path:
    out = out or c.out
    problem = run_inproc_quiet(["run", str(c.recipe(_valid(c), "previous.yml")), str(out), "--no-progress", *flags])
    if problem:
        raise SetupFailed(f"the previous merge did not work: {problem}")
    return out


def _user_folder(c: Ctx, *files: str) -> Path:
    c.out.mkdir()
    for f in files:
        (c.out / f).write_text(json.dumps({"mine": True}) if f.endswith(".json") else f"my {f}\n")
    return c.out


def out_case(id, prepare, *flags, out=None, expect=2, culprit=r"\bout\b", sub=False, check=None):
    def setup(c: Ctx) -> Cli:
        prepare(c)
        target = out(c) if out else c.out
        if isinstance(target, Path):
            c.out = target
        return run(c, c.recipe(_valid(c)), *flags, out=target, sub=sub)

    case(id, O, setup, expect=expect, culprit=culprit, check=check)


out_case("out-is-an-existing-plain-file", lambda c: c.out.write_text("my notes\n"))
out_case("out-is-a-plain-file-force", lambda c: c.out.write_text("my notes\n"), "--force")
out_case("out-user-folder-with-config-json-force", lambda c: _user_folder(c, "config.json", "notes.txt"), "--force")
out_case("out-user-folder-with-gguf-force", lambda c: _user_folder(c, "my-model.gguf", "notes.txt"), "--force")
out_case("out-user-folder-only-config-json-force", lambda c: _user_folder(c, "config.json"), "--force")
out_case("out-previous-output-force-control", _prev_output, "--force", expect=0, check=out_is_model)
out_case(
    "out-previous-output-plus-user-file-force", lambda c: (_prev_output(c), (c.out / "notes.txt").write_text("mine\n")), "--force"
)
out_case("out-is-an-input-force", lambda c: None, "--force", out=lambda c: c.ft1, culprit="ft1")
out_case(
    "out-symlink-to-an-input-force",
    lambda c: relink(c.root / "link", c.ft1),
    "--force",
    out=lambda c: c.root / "link",
    culprit="ft1|link",
)
out_case("out-contains-an-input-force", lambda c: None, "--force", out=lambda c: c.root, culprit="ft1|base|input")
out_case("out-inside-an-input", lambda c: None, out=lambda c: c.ft1 / "merged", culprit="ft1")
out_case(
    "out-parent-is-a-plain-file",
    lambda c: c.secret("file.txt", "x"),
    out=lambda c: c.secret_dir / "file.txt" / "out",
    culprit=r"file\.txt",
)
out_case("out-parent-is-a-fifo", lambda c: fifo(c.root / "pipe"), out=lambda c: c.root / "pipe" / "out", culprit="pipe", sub=True)
out_case("out-is-a-fifo-force", lambda c: fifo(c.out), "--force", sub=True)
out_case(
    "out-symlink-to-user-folder-force",
    lambda c: (_user_folder(c, "config.json", "notes.txt"), c.out.rename(c.root / "mine"), relink(c.out, c.root / "mine")),
    "--force",
)
out_case("out-dangling-symlink", lambda c: relink(c.out, c.root / "nowhere"))
out_case(
    "out-stale-partial-holding-user-files",
    lambda c: ((c.root / ".out.partial").mkdir(), (c.root / ".out.partial" / "notes.txt").write_text("mine")),
    culprit=r"\.out\.partial",
)
out_case(
    "out-user-gguf-file-force",
    lambda c: c.secret("user.gguf", b"GGUF" + b"\x03\x00\x00\x00" + b"my own model bytes" * 10),
    "--force",
    "--out-format",
    "gguf-f16",
    out=lambda c: c.secret_dir / "user.gguf",
    culprit=r"user\.gguf",
)
out_case(
    "out-previous-gguf-output-force-control",
    lambda c: _prev_output(c, c.root / "prev.gguf", "--out-format", "gguf-f16"),
    "--force",
    "--out-format",
    "gguf-f16",
    out=lambda c: c.root / "prev.gguf",
    expect=0,
    check=lambda c: [] if (c.root / "prev.gguf").is_file() else ["prev.gguf is missing"],
)
out_case(
    "out-deep-new-parents-control",
    lambda c: None,
    out=lambda c: c.root / "a" / "b" / "c" / "out",
    expect=0,
    check=lambda c: loads_as_model(c.root / "a" / "b" / "c" / "out"),
)
out_case("out-is-the-recipe-file-force", lambda c: None, "--force", out=lambda c: c.root / "recipe.yml", culprit=r"recipe\.yml")
out_case("out-empty-string", lambda c: None, out=lambda c: "", culprit=r"output|OUT|\bout\b")


def _out_dot(c: Ctx) -> Cli:
    home = _user_folder(c, "notes.txt", "config.json")
    return Cli(["run", str(c.recipe(_valid(c))), ".", "--force", "--no-progress"], cwd=home)


case("out-dot-in-a-user-folder-force", O, _out_dot, culprit=r"output|'\.'|\"\.\"")

# ================================================================ convert

V = "convert"


def conv(c: Ctx, src: Path, out: Path, *flags: str, sub: bool = False) -> Cli:
    c.out = out
    return Cli(["convert", str(src), str(out), *flags], sub=sub)


case("convert-out-is-the-input-force", V, lambda c: conv(c, c.ft1, c.ft1, "--force"), culprit="ft1")
case(
    "convert-out-symlink-to-the-input-force",
    V,
    lambda c: conv(c, c.ft1, relink(c.root / "link", c.ft1), "--force"),
    culprit="ft1|link",
)
case("convert-out-contains-the-input-force", V, lambda c: conv(c, c.ft1, c.root, "--force"), culprit="ft1|input")
case("convert-out-inside-the-input", V, lambda c: conv(c, c.ft1, c.ft1 / "q"), culprit="ft1")
case(
    "convert-out-user-folder-force",
    V,
    lambda c: conv(c, c.ft1, _user_folder(c, "config.json", "notes.txt"), "--force"),
    culprit=r"\bout\b",
)
case(
    "convert-out-plain-file-force",
    V,
    lambda c: (c.out.write_text("mine\n"), conv(c, c.ft1, c.out, "--force"))[1],
    culprit=r"\bout\b",
)
case(
    "convert-out-user-gguf-force",
    V,
    lambda c: conv(c, c.ft1, c.secret("user.gguf", b"GGUF\x03\x00\x00\x00mine" * 8), "--out-format", "gguf-f16", "--force"),
    culprit=r"user\.gguf",
)
case("convert-existing-out-without-force", V, lambda c: conv(c, c.ft1, _user_folder(c, "notes.txt")), culprit=r"\bout\b")
case("convert-input-missing", V, lambda c: conv(c, c.root / "gone", c.out), culprit="gone")
case("convert-input-gguf-fifo", V, lambda c: conv(c, fifo(c.root / "pipe.gguf"), c.out, sub=True), culprit=r"pipe\.gguf")
case("convert-unknown-format", V, lambda c: conv(c, c.ft1, c.out, "--out-format", "mlx-q3"), culprit="--out-format")
case(
    "convert-side-symlink-out-of-the-model",
    V,
    lambda c: (_side_out("tokenizer.model", "ft1")(c), conv(c, c.ft1, c.out))[1],
    culprit=r"tokenizer\.model",
)
case(
    "convert-side-symlink-to-proc-environ",
    V,
    lambda c: (relink(c.ft1 / "generation_config.json", "/proc/self/environ"), conv(c, c.ft1, c.out, sub=True))[1],
    culprit=r"generation_config\.json",
)
case(
    "convert-group-size-0",
    V,
    lambda c: conv(c, c.ft1, c.out, "--out-format", "mlx-q4", "--group-size", "0"),
    culprit="--group-size",
)
case(
    "convert-group-size-7",
    V,
    lambda c: conv(c, c.ft1, c.out, "--out-format", "mlx-q4", "--group-size", "7"),
    culprit="--group-size",
)
case(
    "convert-bitdelta-base-missing",
    V,
    lambda c: conv(c, c.ft1, c.out, "--bitdelta-base", str(c.root / "gone")),
    culprit="--bitdelta-base|gone",
)
case(
    "convert-stale-partial-holding-user-files",
    V,
    lambda c: (
        (c.root / ".out.partial").mkdir(),
        (c.root / ".out.partial" / "notes.txt").write_text("mine"),
        conv(c, c.ft1, c.out),
    )[-1],
    culprit=r"\.out\.partial",
)
case(
    "convert-truncated-input",
    V,
    lambda c: (
        (c.ft1 / "model.safetensors").write_bytes((c.ft1 / "model.safetensors").read_bytes()[:-100]),
        conv(c, c.ft1, c.out),
    )[1],
    culprit=r"model\.safetensors",
)
case(
    "convert-to-mlx-q4-control",
    V,
    lambda c: conv(c, c.ft1, c.out, "--out-format", "mlx-q4", "--group-size", "32"),
    expect=0,
    check=out_is_model,
)
case(
    "convert-previous-output-force-control",
    V,
    lambda c: (run_inproc_quiet(["convert", str(c.ft1), str(c.out)]), conv(c, c.ft1, c.out, "--force"))[1],
    expect=0,
    check=out_is_model,
)

# ================================================================ the Python API

A = "api"


def _mem(c: Ctx):
    from mergekit_mlx import merge

    return merge(_valid(c))


def api(fn: Callable[[Ctx], Callable[[], Any]]):
    return lambda c: Api(fn(c))


def _save_twice(c: Ctx):
    def go():
        r = _mem(c)
        r.save(c.out)
        r.save(c.out, force=True)

    return go


def _saved_on_disk(c: Ctx):
    from mergekit_mlx import merge

    def go():
        r = merge(_valid(c), c.root / "written")
        r.save(c.out)

    return go


def _to_mlx_lm(c: Ctx):
    def go():
        _model, tok = _mem(c).to_mlx_lm()
        assert tok.encode("hello world")

    return go


def _merge_to(c: Ctx, recipe: dict, out: Path, **kw):
    from mergekit_mlx import merge

    return lambda: merge(recipe, out, **kw)


case("api-save-force-over-an-input", A, api(lambda c: lambda: _mem(c).save(c.ft1, force=True)), culprit="ft1")
case(
    "api-save-force-over-a-user-folder",
    A,
    api(lambda c: (_user_folder(c, "notes.txt"), lambda: _mem(c).save(c.out, force=True))[1]),
    culprit=r"\bout\b",
)
case(
    "api-save-force-over-a-user-folder-with-config",
    A,
    api(lambda c: (_user_folder(c, "config.json", "notes.txt"), lambda: _mem(c).save(c.out, force=True))[1]),
    culprit=r"\bout\b",
)
case(
    "api-save-force-over-a-plain-file",
    A,
    api(lambda c: (c.out.write_text("mine\n"), lambda: _mem(c).save(c.out, force=True))[1]),
    culprit=r"\bout\b",
)
case(
    "api-save-force-over-the-parent-of-an-input",
    A,
    api(lambda c: lambda: _mem(c).save(c.root, force=True)),
    culprit="ft1|base|input",
)
case(
    "api-save-force-over-a-symlink-to-an-input",
    A,
    api(lambda c: (relink(c.root / "link", c.ft1), lambda: _mem(c).save(c.root / "link", force=True))[1]),
    culprit="ft1|link",
)
case(
    "api-save-stale-partial-holding-user-files",
    A,
    api(
        lambda c: (
            (c.root / ".out.partial").mkdir(),
            (c.root / ".out.partial" / "notes.txt").write_text("mine"),
            lambda: _mem(c).save(c.out),
        )[-1]
    ),
    culprit=r"\.out\.partial",
)
case(
    "api-save-with-a-side-file-symlink-out",
    A,
    api(lambda c: (_side_out("tokenizer.model")(c), lambda: _mem(c).save(c.out))[1]),
    culprit=r"tokenizer\.model",
)
case("api-save-twice-control", A, api(_save_twice), expect=0, check=out_is_model)
case("api-save-after-a-disk-merge", A, api(_saved_on_disk), culprit="written|disk|already")
case("api-to-mlx-lm-control", A, api(_to_mlx_lm), expect=0)
case(
    "api-merge-method-a-number",
    A,
    api(lambda c: lambda: _merge_to(c, dict(_valid(c), merge_method=3), c.out)()),
    culprit="merge_method",
)
case(
    "api-merge-nan-weight", A, api(lambda c: _merge_to(c, linear([c.base, c.ft1], [0.5, float("nan")]), c.out)), culprit="weight"
)
case("api-merge-out-path-is-an-input-force", A, api(lambda c: _merge_to(c, _valid(c), c.ft1, force=True)), culprit="ft1")
case("api-merge-out-shard-size-0", A, api(lambda c: _merge_to(c, _valid(c), c.out, out_shard_size=0)), culprit="out_shard_size")
case(
    "api-merge-over-a-user-gguf-force",
    A,
    api(
        lambda c: _merge_to(
            c, _valid(c), c.secret("user.gguf", b"GGUF\x03\x00\x00\x00mine" * 8), force=True, out_format="gguf-f16"
        )
    ),
    culprit=r"user\.gguf",
)

# ================================================================ CLI flags and their values

F = "flags"


def flags(*fl: str, sub: bool = False, build=_valid):
    return lambda c: run(c, c.recipe(build(c)), *fl, sub=sub)


case("group-size-0", F, flags("--out-format", "mlx-q4", "--group-size", "0"), culprit="--group-size")
case("group-size-negative", F, flags("--out-format", "mlx-q4", "--group-size", "-32"), culprit="--group-size")
case("group-size-7", F, flags("--out-format", "mlx-q4", "--group-size", "7"), culprit="--group-size")
case("group-size-0-with-hf-output", F, flags("--group-size", "0"), culprit="--group-size")
case("group-size-2-to-the-40", F, flags("--out-format", "mlx-q4", "--group-size", str(2**40)), culprit="--group-size")
case("out-shard-size-0", F, flags("--out-shard-size", "0"), culprit="--out-shard-size")
case("out-shard-size-5Q", F, flags("--out-shard-size", "5Q"), culprit="--out-shard-size")
case("out-shard-size-negative", F, flags("--out-shard-size=-1"), culprit="--out-shard-size")
case("out-shard-size-nan", F, flags("--out-shard-size", "nan"), culprit="--out-shard-size")
case("out-shard-size-1-byte-control", F, flags("--out-shard-size", "1"), expect=0, check=out_is_model)
case("batch-size-0", F, flags("--batch-size", "0", sub=True), culprit="--batch-size")
case("batch-size-nan", F, flags("--batch-size", "nan"), culprit="--batch-size")
case("batch-size-1-byte-control", F, flags("--batch-size", "1", sub=True), expect=0, check=out_is_model)
case(
    "random-seed-2-to-the-80",
    F,
    flags("--random-seed", str(2**80), build=lambda c: method(c, "dare_ties", per={"weight": 1.0, "density": 0.5})),
    expect=(0, 2),
    culprit="--random-seed",
)
case("random-seed-not-a-number", F, flags("--random-seed", "abc"), culprit="--random-seed")
case("device-tpu", F, flags("--device", "tpu"), culprit="--device")
case("out-format-unknown", F, flags("--out-format", "safetensors-q2"), culprit="--out-format")
case("unknown-flag", F, flags("--frce"), culprit="--frce")
case("no-out-given", F, lambda c: Cli(["run", str(c.recipe(_valid(c))), "--no-progress"]), culprit=r"output|OUT|\bout\b")
case("resume-with-nothing-to-resume", F, flags("--resume"), expect=(0, 2), culprit="--resume|partial")
case(
    "dry-run-with-a-missing-model",
    F,
    lambda c: Cli(["run", str(c.recipe(linear([c.base, c.root / "gone"]))), "--dry-run"]),
    culprit=r"models\[1\]",
)
case(
    "dry-run-control",
    F,
    lambda c: Cli(["run", str(c.recipe(_valid(c))), str(c.out), "--dry-run"]),
    expect=0,
    check=lambda c: [f"--dry-run wrote {c.out}"] if c.out.exists() else [],
)
case(
    "base-without-tokenizer-control",
    F,
    lambda c: ([(c.base / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")], run(c, c.recipe(_valid(c))))[1],
    expect=0,
    check=out_is_model,
)
case("eval-missing-model", F, lambda c: Cli(["eval", str(c.root / "gone")]), culprit="gone")
case("eval-n-negative", F, lambda c: Cli(["eval", str(c.ft1), "--n", "-5"]), culprit="--n")

# ================================================================ resume and locks

S = "resume"


def _medium_recipe(c: Ctx) -> tuple[Path, list[Path]]:
    fam = c.medium()
    return c.recipe(method(c, "ties", per={"weight": 1.0, "density": 0.5}, models=fam[1:]) | {"base_model": str(fam[0])}), fam


def _start(c: Ctx, recipe: Path, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergekit_mlx", "run", str(recipe), str(out), "--no-progress", *MEDIUM_SHARDS],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def stop():
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait(timeout=30)

    c.cleanups.append(stop)
    return proc


def _wait_for_shards(proc: subprocess.Popen, partial: Path, n: int = 2) -> None:
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if partial.is_dir() and len(list(partial.glob("*.safetensors"))) >= n:
            return
        time.sleep(0.001)
    err = proc.stderr.read().decode(errors="replace") if proc.poll() is not None and proc.stderr else ""
    raise SetupFailed(f"the first merge ended (rc={proc.poll()}) before {n} shards were written: {err.strip()[-300:]}")


def _interrupted(c: Ctx) -> tuple[Path, list[Path]]:
    """A medium merge into OUT killed (SIGKILL) midway: `.out.partial` holds some shards."""
    recipe, fam = _medium_recipe(c)
    proc = _start(c, recipe, c.out)
    _wait_for_shards(proc, partial_of(c.out), 3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    if c.out.exists() or not partial_of(c.out).is_dir():
        raise SetupFailed("the killed merge left no partial output to resume")
    c.exclude.append(partial_of(c.out))  # the tool's own temporary output: resuming may use or drop it
    return recipe, fam


def _same_as_fresh(recipe: Path) -> Callable[[Ctx, Outcome], list[str]]:
    def check(c: Ctx, o: Outcome) -> list[str]:
        if o.rc != 0:
            return []
        ref = c.root / "reference"
        problem = run_inproc_quiet(["run", str(recipe), str(ref), "--no-progress", *MEDIUM_SHARDS])
        if problem:
            return [f"the reference merge failed: {problem}"]
        got = {str(p.relative_to(c.out)): sha(p) for p in c.out.rglob("*") if p.is_file()}
        want = {str(p.relative_to(ref)): sha(p) for p in ref.rglob("*") if p.is_file()}
        bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        return (
            [f"the resumed output differs from a fresh merge of the current inputs in {bad[:5]} (old and new data mixed)"]
            if bad
            else []
        )

    return check


def _resume(c: Ctx, recipe: Path) -> Cli:
    c.after.append(_same_as_fresh(recipe))
    return Cli(["run", str(recipe), str(c.out), "--resume", "--no-progress", *MEDIUM_SHARDS])


def _swap_same_size_old_mtime(c: Ctx) -> Cli:
    recipe, fam = _interrupted(c)
    f = fam[1] / "model.safetensors"
    st = os.stat(f)
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    values = np.frombuffer(bytes(data[8 + n :]), dtype=np.float32) * np.float32(1.5)
    with open(f, "r+b") as fh:  # same inode, same size, other bytes
        fh.seek(8 + n)
        fh.write(values.tobytes())
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    return _resume(c, recipe)


def _corrupt_state(c: Ctx) -> Cli:
    recipe, _ = _interrupted(c)
    for p in partial_of(c.out).iterdir():
        if p.suffix == ".json" and p.name.startswith("."):
            p.write_text("{ garbage")
    return _resume(c, recipe)


def _truncate_a_shard(c: Ctx) -> Cli:
    recipe, _ = _interrupted(c)
    first = min(partial_of(c.out).glob("*.safetensors"))
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    return _resume(c, recipe)


def _second_run(c: Ctx) -> Cli:
    recipe, _ = _medium_recipe(c)
    proc = _start(c, recipe, c.out)
    _wait_for_shards(proc, partial_of(c.out), 1)
    os.kill(proc.pid, signal.SIGSTOP)
    c.exclude += [partial_of(c.out), c.out]  # the first run's

    def first_run_finishes(c: Ctx, o: Outcome) -> list[str]:
        os.kill(proc.pid, signal.SIGCONT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            return ["the first merge did not finish after the second one"]
        err = proc.stderr.read().decode(errors="replace")
        if proc.returncode != 0:
            return [f"the first merge failed after the second one ran: rc={proc.returncode} {err.strip()[-300:]}"]
        return loads_as_model(c.out)

    c.after.append(first_run_finishes)
    c.culprit_values = {"pid": str(proc.pid)}
    return Cli(["run", str(recipe), str(c.out), "--no-progress", *MEDIUM_SHARDS], sub=True)


case("second-run-on-the-same-out-while-the-first-runs", S, _second_run, culprit="{pid}")
case(
    "resume-after-an-input-changed-same-size-old-mtime",
    S,
    _swap_same_size_old_mtime,
    expect=(0, 2),
    culprit="ft1|changed|model\\.safetensors",
)
case("resume-with-a-corrupt-state-file", S, _corrupt_state, expect=(0, 2), culprit=r"state|partial")
case("resume-with-a-truncated-finished-shard", S, _truncate_a_shard, expect=(0, 2), culprit=r"safetensors|partial")
case("resume-after-sigkill-control", S, lambda c: _resume(c, _interrupted(c)[0]), expect=0, check=out_is_model)
case(
    "resume-on-a-finished-out",
    S,
    lambda c: (_prev_output(c), run(c, c.recipe(_valid(c)), "--resume"))[1],
    culprit="already exists",
)

# ================================================================ disk faults

D = "disk"


def mount_tmpfs(c: Ctx, size: str, ro: bool = False) -> Path:
    where = c.root / "small"
    where.mkdir()
    opts = f"size={size}" + (",ro" if ro else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); the full-disk cases need root")
    c.cleanups.append(lambda: subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True))
    return where


def disk(size: str, *fl: str, medium: bool = False, convert: bool = False, ro: bool = False, gguf_file: bool = False):
    def setup(c: Ctx) -> Cli:
        where = mount_tmpfs(c, size, ro)
        c.out = where / ("out.gguf" if gguf_file else "out")
        if medium:
            recipe, fam = _medium_recipe(c)
        else:
            recipe, fam = c.recipe(_valid(c)), [c.base, c.ft1]
        if convert:
            return Cli(["convert", str(fam[1]), str(c.out), *fl])
        return run(c, recipe, *fl)

    return setup


DISK_CULPRIT = r"space|full|out"
case("disk-200k-tmpfs-medium-merge", D, disk("200k", medium=True), culprit=DISK_CULPRIT)
case("disk-80k-tmpfs-small-shards", D, disk("80k", "--out-shard-size", "10K", "--batch-size", "10K"), culprit=DISK_CULPRIT)
case("disk-64k-tmpfs-one-shard", D, disk("64k"), culprit=DISK_CULPRIT)
case("disk-96k-tmpfs-tight", D, disk("96k"), expect=(0, 2), culprit=DISK_CULPRIT, check=lambda c: loads_as_model(c.out))
case("disk-200k-tmpfs-convert", D, disk("200k", medium=True, convert=True), culprit=DISK_CULPRIT)
case(
    "disk-200k-tmpfs-gguf-file",
    D,
    disk("200k", "--out-format", "gguf-f16", medium=True, gguf_file=True),
    culprit=DISK_CULPRIT + r"|out\.gguf",
)
case("disk-200k-tmpfs-mlx-q8", D, disk("200k", "--out-format", "mlx-q8", medium=True), culprit=DISK_CULPRIT)
case("disk-read-only-filesystem", D, disk("1m", ro=True), culprit=r"out|read-only")


# ================================================================ the test


def _paragraph_problems(err: str, culprit: str | None) -> list[str]:
    import re

    problems = []
    text = err.strip()
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("mergekit-mlx: error:")]
    if not starts:
        problems.append("stderr has no line starting 'mergekit-mlx: error:'")
        paragraph = text
    else:
        if len(starts) > 1:
            problems.append("more than one error printed")
        rest = lines[starts[0] :]
        if any(not line.strip() for line in rest):
            problems.append("the error is more than one paragraph")
        if starts[0] != 0 and any("usage:" in line for line in lines[: starts[0]]):
            problems.append("a usage text precedes the error")
        paragraph = "\n".join(rest)
    if culprit and not re.search(culprit, paragraph):
        problems.append(f"the error does not name the culprit (/{culprit}/)")
    return problems


SLOW_CLASSES = ("resume", "disk")  # processes killed mid-merge, mounted filesystems


@pytest.mark.parametrize(
    "spec",
    [pytest.param(c, marks=pytest.mark.slow) if c.cls in SLOW_CLASSES else c for c in CASES],
    ids=[f"{c.cls}:{c.id}" for c in CASES],
)
def test_hostile(spec: Case, family, medium_family, tmp_path, capsys, monkeypatch):
    c = Ctx(tmp_path, family, lambda: medium_family, monkeypatch)
    outcome: Outcome | None = None
    problems: list[str] = []
    try:
        try:
            action = spec.setup(c)
        except SetupFailed as e:
            pytest.fail(f"[{spec.cls}] {spec.id}: SETUP FAILED: {e}")
        before = snapshot(tmp_path)
        out_existed = os.path.lexists(c.out)
        if isinstance(action, Cli):
            if action.sub:
                outcome = run_sub(action.argv, action.env, action.cwd, action.timeout)
            else:
                outcome = run_inproc(action.argv, capsys, action.cwd)
        elif isinstance(action, Api):
            outcome = run_api(action.fn)
        else:
            outcome = action.fn()
        out_left = os.path.lexists(c.out) and not any(under(c.out, a) for a in c.exclude)
        for hook in c.after:
            problems += hook(c, outcome)
    finally:
        for cleanup in reversed(c.cleanups):
            with contextlib.suppress(Exception):
                cleanup()

    # rule 1 and 4: how it ended
    if outcome.timeout:
        problems.insert(0, f"hang: still running after the timeout ({SUB_TIMEOUT} s)")
    elif outcome.exc:
        problems.insert(0, "an exception escaped (a traceback for the user)")
    elif "Traceback (most recent call last)" in outcome.err:
        problems.insert(0, "a traceback on stderr")
    if outcome.rc not in spec.expect and not outcome.timeout and not outcome.exc:
        problems.append(f"exit status {outcome.rc}, expected {' or '.join(map(str, spec.expect))}")
    if outcome.rc == 2:
        culprit = spec.culprit.format(**c.culprit_values) if spec.culprit else None
        problems += _paragraph_problems(outcome.err, culprit)
    succeeded = outcome.rc == 0 and 0 in spec.expect

    # rule 2: nothing that existed was changed or deleted (OUT may change in a success)
    after = snapshot(tmp_path)
    allowed = list(c.exclude) + ([c.out, partial_of(c.out)] if succeeded else [])
    changed = [p for p, v in before.items() if after.get(p) != v and not any(under(p, a) for a in allowed)]
    if changed:
        problems.append(f"pre-existing data changed or deleted: {[str(p.relative_to(tmp_path)) for p in changed[:6]]}")

    # rule 6: no partial output left (one that existed before may stay)
    new_partials = [p for p in after if p.name.endswith(".partial") and p.name.startswith(".") and p not in before]
    if new_partials:
        problems.append(f"temporary output left behind: {[str(p.relative_to(tmp_path)) for p in new_partials]}")
    if outcome.rc != 0 and out_left and not out_existed:
        problems.append(f"a failed run left an output at {c.out}")

    # rule 3: no secret in anything the run wrote
    for p, v in after.items():
        if v[0] == "file" and before.get(p) != v:
            with contextlib.suppress(OSError):
                if SECRET.encode() in p.read_bytes():
                    problems.append(f"the secret marker leaked into {p.relative_to(tmp_path)}")

    if succeeded and spec.check:
        problems += spec.check(c)

    record = {"id": spec.id, "class": spec.cls, "rc": outcome.rc, "observed": outcome.observed(), "problems": problems}
    if os.environ.get("HOSTILE_REPORT"):
        with open(os.environ["HOSTILE_REPORT"], "a") as fh:
            fh.write(json.dumps(record) + "\n")
    if problems:
        detail = outcome.exc or outcome.err
        pytest.fail(
            f"[{spec.cls}] {spec.id}: OBSERVED {outcome.observed()}\n  - "
            + "\n  - ".join(problems)
            + f"\n--- output ---\n{detail.strip()[-2500:]}",
            pytrace=False,
        )


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 110
    assert len({c.cls for c in CASES}) >= 10
