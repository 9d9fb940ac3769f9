"""Hub ids in recipes (`org/name`, `org/name@revision`), fetched by the real huggingface_hub client.

The client talks to a small HTTP server in the test (HF_ENDPOINT) that serves repositories laid out as
the Hub serves them: `GET /api/models/{repo}/revision/{rev}` (the commit), `GET /api/models/{repo}/tree/{commit}`
(the file list), `HEAD`/`GET /{repo}/resolve/{commit}/{file}` (metadata headers, then the bytes). Each
repo is a folder per commit built from tests/tiny.py models, with a pickle, a README and .gitattributes
beside them that must never be requested. The cache is a temporary HF_HOME. No network is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny import llama_config, llama_weights, load_np, save_model

from mergekit_mlx import merge
from mergekit_mlx.cli import main as cli_main
from mergekit_mlx.errors import ModelError, RecipeError

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants  # noqa: E402

UNNEEDED = {"pytorch_model.bin": b"\x80\x02 a pickle", "README.md": b"# a card\n", ".gitattributes": b"*.bin lfs\n"}


class FakeHub:
    """Repos as folders: root/{org}/{name}/{commit}/..., refs per repo; every request is logged."""

    def __init__(self, root: Path):
        self.root = root
        self.refs: dict[str, dict[str, str]] = {}
        self.gated: dict[str, str] = {}  # repo -> the token that may read its files
        self.stalled: set[str] = set()  # file names whose body stops after a few bytes and hangs
        self.requests: list[tuple[str, str]] = []
        self.url = ""

    def add(self, repo: str, model_dir: Path, ref: str = "main", extra: dict[str, bytes] | None = None) -> str:
        """Publish a model folder as a new commit of `repo`, pointed to by `ref`; returns the commit."""
        commit = hashlib.sha1(f"{repo}:{ref}:{len(self.requests)}:{model_dir}".encode()).hexdigest()
        dest = self.root / repo / commit
        shutil.copytree(model_dir, dest)
        for name, data in {**UNNEEDED, **(extra or {})}.items():
            (dest / name).write_bytes(data)
        self.refs.setdefault(repo, {})[ref] = commit
        return commit

    def fetched(self) -> list[str]:
        """The file names requested through /resolve/ (HEAD or GET)."""
        return [p.rsplit("/", 1)[-1] for _, p in self.requests if "/resolve/" in p]

    def commit_of(self, repo: str, rev: str) -> str | None:
        refs = self.refs.get(repo, {})
        return refs.get(rev) or (rev if rev in refs.values() else None)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self.serve(body=False)

            def do_GET(self):
                self.serve(body=True)

            def fail(self, status: int, code: str, repo: str | None = None):
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                if repo and repo in hub.refs:
                    self.send_header("X-Repo-Commit", hub.refs[repo].get("main", ""))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def send_json(self, data):
                raw = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def serve(self, body: bool):
                path = self.path.split("?", 1)[0]
                hub.requests.append((self.command, path))
                api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)", path)
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                repo = (api or resolve).group(1) if (api or resolve) else None
                if repo not in hub.refs:
                    return self.fail(404, "RepoNotFound")
                rev = (api.group(3) if api else resolve.group(2)).replace("%2F", "/")
                commit = hub.commit_of(repo, rev)
                if commit is None:
                    return self.fail(404, "RevisionNotFound", repo)
                folder = hub.root / repo / commit
                if api and api.group(2) == "revision":
                    return self.send_json(
                        {"id": repo, "sha": commit, "siblings": [{"rfilename": f.name} for f in folder.iterdir()]}
                    )
                if api:
                    return self.send_json(
                        [
                            {"type": "file", "path": f.name, "size": f.stat().st_size, "oid": _oid(f.read_bytes())}
                            for f in sorted(folder.iterdir())
                        ]
                    )
                if repo in hub.gated and self.headers.get("Authorization") != f"Bearer {hub.gated[repo]}":
                    return self.fail(401, "GatedRepo", repo)
                f = folder / resolve.group(3)
                if not f.is_file():
                    return self.fail(404, "EntryNotFound", repo)
                data = f.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{_oid(data)}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body and f.name in hub.stalled:  # a connection that stops answering mid-file
                    self.wfile.write(data[:64])
                    self.wfile.flush()
                    time.sleep(STALL_SECONDS)
                elif body:
                    self.wfile.write(data)

        return Handler


STALL_SECONDS = 3.0  # how long a stalled file hangs; the client gives up after READ_TIMEOUT


def _oid(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake Hub on 127.0.0.1, and huggingface_hub pointed at it with an empty cache and no token.
    huggingface_hub reads its environment once, at import: the variables are set and its constants
    patched alike (test_env_variables_alone_reach_the_client checks the variables in a fresh process)."""
    fake = FakeHub(tmp_path / "hub-server")
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    monkeypatch.chdir(tmp_path)  # a relative `org/name` folder would win over the Hub: there is none
    yield fake
    server.shutdown()
    server.server_close()


def tiny_model(path: Path, seed: int, shards: int = 2, **cfg) -> Path:
    config = llama_config(**cfg)
    return save_model(path, config, llama_weights(config, np.random.default_rng(seed)), shards=shards)


@pytest.fixture
def published(hub, tmp_path):
    """org/base, org/ft1 (sharded, with an index) and org/ft2 (one file, no index), each also kept locally."""
    local = {
        "org/base": tiny_model(tmp_path / "local" / "base", 0),
        "org/ft1": tiny_model(tmp_path / "local" / "ft1", 1),
        "org/ft2": tiny_model(tmp_path / "local" / "ft2", 2, shards=1),
    }
    for repo, path in local.items():
        hub.add(repo, path)
    return local


def linear(*models: str) -> dict:
    return {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]}


def as_numpy(result) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in result.weights.items()}


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def run_cli(capsys, tmp_path: Path, recipe: dict, *flags: str) -> tuple[int, str]:
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    rc = cli_main(["run", str(path), str(tmp_path / "out"), "--no-progress", *flags])
    return rc, capsys.readouterr().err


def assert_clean_error(rc: int, err: str, *patterns: str) -> None:
    assert rc == 2, err
    assert err.startswith("mergekit-mlx: error: ") and "Traceback" not in err, err
    for p in patterns:
        assert re.search(p, err), f"{p!r} not in {err!r}"


def test_recipe_of_hub_ids_merges_as_the_same_recipe_of_local_paths(published):
    from_hub = merge(linear("org/base", "org/ft1", "org/ft2"))
    from_disk = merge(linear(*(str(p) for p in published.values())))
    assert_same(as_numpy(from_hub), as_numpy(from_disk))


def test_a_mixture_of_experts_of_hub_ids_is_the_one_of_local_paths(published):
    from mergekit_mlx.moe import build_moe

    def moe(base: str, *experts: str) -> dict:
        return {
            "base_model": base,
            "gate_mode": "random",  # seeded; no tokenizer needed
            "experts_per_token": 2,
            "experts": [{"source_model": e} for e in experts],
        }

    local = [str(p) for p in published.values()]
    from_hub = build_moe(moe("org/base", "org/ft1", "org/ft2"), seed=3).weights
    from_disk = build_moe(moe(*local), seed=3).weights
    assert sorted(from_hub) == sorted(from_disk)
    for name in from_hub:
        assert np.array_equal(np.array(from_hub[name]), np.array(from_disk[name])), name


def test_the_merge_equals_an_independent_average_of_the_published_weights(published):
    result = as_numpy(merge(linear("org/base", "org/ft1", "org/ft2")))
    inputs = [load_np(p) for p in published.values()]
    for k, v in result.items():
        np.testing.assert_allclose(v, sum(w[k] for w in inputs) / 3, rtol=1e-6, atol=1e-7, err_msg=k)


def test_downloads_land_in_the_hf_cache_as_snapshots(published, tmp_path):
    result = merge(linear("org/base", "org/ft1"))
    for model in result.plan.models:
        assert model.path.parent.name == "snapshots"
        assert model.path.is_relative_to(tmp_path / "hf-home" / "hub" / "models--org--base") or model.path.is_relative_to(
            tmp_path / "hf-home" / "hub" / "models--org--ft1"
        )


def test_revision_after_the_at_sign_is_honoured(hub, published, tmp_path):
    older = tiny_model(tmp_path / "local" / "base-v1", 10)
    commit = hub.add("org/base", older, ref="v1")
    for ref in ("org/base@v1", f"org/base@{commit}"):
        got = as_numpy(merge(linear(ref, "org/ft1")))
        want = as_numpy(merge(linear(str(older), str(published["org/ft1"]))))
        assert_same(got, want)
    latest = as_numpy(merge(linear("org/base", "org/ft1")))
    assert not np.array_equal(latest["model.norm.weight"], got["model.norm.weight"])


def test_only_config_index_weights_and_tokenizer_files_are_requested(hub, published):
    merge(linear("org/base", "org/ft1", "org/ft2"))
    fetched = set(hub.fetched())
    assert not fetched & set(UNNEEDED), fetched
    assert not any(f.endswith((".bin", ".pt", ".pth", ".ckpt", ".md")) for f in fetched)
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= fetched
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors"} <= fetched


def test_every_config_and_index_is_fetched_before_any_weight(hub, published):
    merge(linear("org/base", "org/ft1", "org/ft2"))
    order = [(m, p) for m, p in hub.requests if "/resolve/" in p]
    first_weight = next(i for i, (_, p) in enumerate(order) if p.endswith(".safetensors"))
    small = {p for _, p in order[:first_weight]}
    for repo in ("org/base", "org/ft1", "org/ft2"):
        assert any(p.startswith(f"/{repo}/") and p.endswith("/config.json") for p in small), repo
    assert any(p.startswith("/org/ft1/") and p.endswith("/model.safetensors.index.json") for p in small)


def test_layer_range_past_a_hub_model_is_refused_before_any_weight_is_requested(hub, published, capsys, tmp_path):
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "org/ft1", "layer_range": [0, 5]}]}],
    }
    rc, err = run_cli(capsys, tmp_path, recipe)
    assert_clean_error(rc, err, r"slices\[0\]\.sources\[0\]\.layer_range", r"2 layers")
    assert hub.fetched() and not any(f.endswith(".safetensors") for f in hub.fetched())


def test_architecture_mismatch_between_hub_models_is_refused_before_any_weight_is_requested(hub, published, tmp_path):
    other = tiny_model(tmp_path / "local" / "mistral", 3)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(config, architectures=["MistralForCausalLM"], model_type="mistral")))
    hub.add("org/mistral", other)
    with pytest.raises(ModelError, match="different architectures"):
        merge(linear("org/base", "org/mistral"))
    assert not any(f.endswith(".safetensors") for f in hub.fetched())


def test_bad_parameter_is_refused_before_anything_is_requested(hub, published):
    recipe = linear("org/base", "org/ft1")
    recipe["models"][1]["parameters"] = {"weigth": 1.0}
    with pytest.raises(RecipeError, match="weigth"):
        merge(recipe)
    assert hub.requests == []


def test_repo_that_does_not_exist_exits_2_naming_the_key_and_the_id(hub, published, capsys, tmp_path):
    rc, err = run_cli(capsys, tmp_path, linear("org/base", "org/missing"))
    assert_clean_error(rc, err, r"models\[1\]\.model", "org/missing")


def test_unknown_revision_exits_2_naming_it(hub, published, capsys, tmp_path):
    rc, err = run_cli(capsys, tmp_path, linear("org/base", "org/ft1@no-such-branch"))
    assert_clean_error(rc, err, r"models\[1\]\.model", "org/ft1", "no-such-branch")


def test_gated_repo_without_a_token_exits_2_saying_to_set_hf_token(hub, published, capsys, tmp_path):
    hub.add("org/gated", published["org/ft1"])
    hub.gated["org/gated"] = "hf_secret"
    rc, err = run_cli(capsys, tmp_path, linear("org/base", "org/gated"))
    assert_clean_error(rc, err, r"models\[1\]\.model", "org/gated", "HF_TOKEN", "licence")


def test_gated_repo_is_read_with_hf_token(hub, published, monkeypatch):
    hub.add("org/gated", published["org/ft1"])
    hub.gated["org/gated"] = "hf_secret"
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    got = as_numpy(merge(linear("org/base", "org/gated")))
    assert_same(got, as_numpy(merge(linear(str(published["org/base"]), str(published["org/ft1"])))))


def test_offline_with_a_model_not_in_the_cache_exits_2_saying_offline(hub, published, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    rc, err = run_cli(capsys, tmp_path, linear("org/base", "org/ft1"))
    assert_clean_error(rc, err, r"models\[0\]\.model", "org/base", "HF_HUB_OFFLINE", "cache")
    assert hub.requests == []


def test_cached_model_merges_offline_without_a_request(hub, published, monkeypatch):
    online = as_numpy(merge(linear("org/base", "org/ft1@main")))
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert_same(as_numpy(merge(linear("org/base", "org/ft1@main"))), online)
    assert hub.requests == []


def test_local_folder_of_the_same_name_wins_over_the_hub(hub, published, tmp_path):
    tiny_model(tmp_path / "org" / "ft1", 7)  # ./org/ft1, relative to the working directory
    got = as_numpy(merge(linear("org/ft1", str(published["org/base"]))))
    want = as_numpy(merge(linear(str(tmp_path / "org" / "ft1"), str(published["org/base"]))))
    assert_same(got, want)
    assert hub.requests == []


@pytest.mark.parametrize("ref", ["org/na--me", "a/b/c", "org/name@", "org/.hidden"])
def test_reference_that_is_neither_a_path_nor_a_hub_id_is_not_looked_up(hub, published, ref):
    with pytest.raises(RecipeError, match="not found"):
        merge(linear("org/base", ref))
    assert not any(ref.split("@")[0] in p for _, p in hub.requests)


def test_index_naming_a_pattern_or_a_pickle_is_refused_before_a_weight_is_requested(hub, published, tmp_path):
    bad = tmp_path / "local" / "bad"
    shutil.copytree(published["org/ft1"], bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "*"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    hub.add("org/bad", bad)
    with pytest.raises(ModelError, match=r"models\[1\]\.model.*org/bad.*plain \*\.safetensors"):
        merge(linear("org/base", "org/bad"))
    assert not any(f.endswith((".safetensors", ".bin")) for f in hub.fetched())


def test_convert_reads_a_hub_id(hub, published, tmp_path):
    out = tmp_path / "converted"
    assert cli_main(["convert", "org/ft1", str(out), "--no-progress"]) == 0
    assert_same(load_np(out), load_np(published["org/ft1"]))


@pytest.mark.slow
def test_env_variables_alone_reach_the_client(hub, published, tmp_path):
    """In a fresh process huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE itself."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(linear("org/base", "org/ft2")))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

    def cli(*extra_env: tuple[str, str]) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "mergekit_mlx", "run", str(recipe), str(tmp_path / "out"), "--no-progress", "--force"]
        return subprocess.run(args, env={**env, **dict(extra_env)}, capture_output=True, text=True, timeout=120)

    offline = cli(("HF_HUB_OFFLINE", "1"))
    assert offline.returncode == 2 and "HF_HUB_OFFLINE" in offline.stderr, offline.stderr
    online = cli()
    assert online.returncode == 0, online.stderr
    assert_same(load_np(tmp_path / "out"), {k: np.array(v) for k, v in merge(linear("org/base", "org/ft2")).weights.items()})
    assert cli(("HF_HUB_OFFLINE", "1")).returncode == 0


def test_a_download_that_stops_answering_exits_2_and_the_same_command_then_finishes(
    hub, published, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.3)
    shard = next(f.name for f in published["org/ft2"].glob("*.safetensors"))
    hub.stalled.add(shard)
    recipe = linear("org/base", "org/ft2")
    rc, err = run_cli(capsys, tmp_path, recipe, "--no-progress")
    assert_clean_error(rc, err, r"models\[1\]\.model", "org/ft2", "Timeout", "run again continues")
    assert not (tmp_path / "out").exists()
    hub.stalled.clear()  # the connection is back: the same command completes
    rc, err = run_cli(capsys, tmp_path, recipe, "--no-progress")
    assert rc == 0, err
    assert_same(load_np(tmp_path / "out"), as_numpy(merge(recipe)))


def test_no_progress_silences_the_download_bar_too(hub, published, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", False)

    def download(model: str, *flags: str) -> str:  # a model not in the cache yet: its weights are downloaded
        (tmp_path / f"{model[4:]}.yml").write_text(yaml.safe_dump(linear(model)))
        assert cli_main(["run", str(tmp_path / f"{model[4:]}.yml"), str(tmp_path / model[4:]), *flags]) == 0
        return capsys.readouterr().err

    assert "%|" in download("org/ft1")  # the download bar, by default
    assert "%|" not in download("org/ft2", "--no-progress")
