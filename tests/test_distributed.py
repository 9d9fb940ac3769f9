"""Merges and searches on several processes (MLX's distributed runtime, ring backend over 127.0.0.1).

The specification is one process: a merge written by 2 or 3 ranks is the same bytes, file for file,
as the merge one process writes; a search spread over 2 ranks scores the same candidates, logs the
same records and finds the same best recipe. A rank that is killed stops the run with exit status 2
and a message, and `--resume` finishes what it left; a rank's recipe or input error is every rank's.
Every process is started with a timeout, so a hang fails the test instead of the run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_evolve import example_config

from mergekit_mlx import cli, distributed
from mergekit_mlx.distributed import World, deal_shards
from mergekit_mlx.errors import OutputError
from mergekit_mlx.evolve import SearchOptions, config_from_dict, search
from mergekit_mlx.options import MergeOptions
from mergekit_mlx.output import write_output
from mergekit_mlx.plan import make_plan
from mergekit_mlx.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models"
TIMEOUT = 120  # seconds a group of ranks may take before the test fails (they take a few)
SHARD = "100K"  # the example models' merge (864 KB) in 9 shards


def free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module", autouse=True)
def loopback():
    try:
        free_ports(1)
    except OSError as e:
        pytest.skip(f"the ring backend needs the loopback address and it cannot be bound here: {e}")


def recipe_file(tmp_path: Path, models: dict[str, Path] | None = None) -> Path:
    """dare_ties: random masks keyed by the seed and the tensor name, so a rank merges a tensor as
    one process does only if nothing else feeds the masks."""
    models = models or {"add": MODELS / "add", "reverse": MODELS / "reverse"}
    recipe = {
        "merge_method": "dare_ties",
        "base_model": str(MODELS / "base"),
        "models": [
            {"model": str(path), "parameters": {"weight": w, "density": d}}
            for (name, path), w, d in zip(models.items(), (0.6, 0.4), (0.5, 0.7))
        ],
        "dtype": "bfloat16",
    }
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def ranks(
    n: int, tmp_path: Path, argv: list[str], *, driver: Path | None = None, env: dict | None = None, cwd=None, only_rank_0=False
):
    """Start n ranks as mlx.launch does (MLX_RANK, MLX_HOSTFILE of the ring backend); (exit status,
    stderr) of each, in rank order (`only_rank_0`: rank 0's, the others killed once it ended)."""
    hostfile = tmp_path / f"hosts-{n}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
    program = [sys.executable, str(driver)] if driver else [sys.executable, "-m", "mergekit_mlx"]
    base = {k: v for k, v in os.environ.items() if k not in {var for var, _ in distributed.LAUNCHERS}}
    procs = [
        subprocess.Popen(
            program + argv,
            env={**base, **(env or {}), "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)},
            cwd=(cwd or {}).get(r, ROOT),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(n)
    ]
    results = []
    try:
        for p in procs[:1] if only_rank_0 else procs:
            _, err = p.communicate(timeout=TIMEOUT)
            results.append((p.returncode, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{n} ranks did not finish in {TIMEOUT} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file of an output directory (the manifest included) and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, Path]:
    """The recipe and the directory one process writes from it."""
    tmp = tmp_path_factory.mktemp("one")
    recipe = recipe_file(tmp)
    assert cli.main(["run", str(recipe), str(tmp / "out"), "--out-shard-size", SHARD, "--random-seed", "7", "--no-progress"]) == 0
    assert len(list((tmp / "out").glob("model-*-of-*.safetensors"))) > 3  # several shards to deal
    return recipe, tmp / "out"


# ---------------- the processes ----------------


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in {var for var, _ in distributed.LAUNCHERS}}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_a_process_without_a_launcher_runs_alone_and_one_mlx_cannot_join_is_an_error():
    code = "from mergekit_mlx import distributed as d; print(d.world().size)"
    assert run_python(code, {}).stdout.split() == ["1"]
    # MPI's variables, which job schedulers set for programs that are not MPI jobs: alone, with a warning
    mpi = run_python(code, {"PMI_SIZE": "2"})
    assert mpi.stdout.split() == ["1"] and "this process runs alone" in mpi.stderr
    # mlx.launch's ring variables that MLX cannot use: the command's error, exit status 2
    ring = run_python(
        "from mergekit_mlx.cli import main; raise SystemExit(main(['run', 'x.yml', 'out']))",
        {"MLX_RANK": "0", "MLX_HOSTFILE": "/nonexistent"},
    )
    assert ring.returncode == 2 and "could not join the others" in ring.stderr


# ---------------- the shard split ----------------


def test_shards_are_dealt_as_contiguous_runs_balanced_by_bytes():
    sizes = [("a", 10), ("b", 10), ("c", 10), ("d", 10), ("e", 30), ("f", 5), ("g", 5)]
    for n in (1, 2, 3, 5, 9):
        dealt = deal_shards(sizes, n)
        assert len(dealt) == n
        assert [s for run in dealt for s in run] == [s for s, _ in sizes]  # every shard once, in order
        total, largest = sum(b for _, b in sizes), max(b for _, b in sizes)
        for run in dealt:
            assert abs(sum(dict(sizes)[s] for s in run) - total / n) <= largest
    assert deal_shards([("x", 0), ("y", 0)], 2) == [["x"], ["y"]]


# ---------------- merges ----------------


@pytest.mark.slow
def test_two_ranks_write_the_bytes_one_process_writes(one_process, tmp_path):
    recipe, reference = one_process
    out = tmp_path / "out"
    argv = ["run", str(recipe), str(out), "--out-shard-size", SHARD, "--random-seed", "7", "--no-progress"]
    results = ranks(2, tmp_path, argv)
    assert [rc for rc, _ in results] == [0, 0], results
    assert files_of(out) == files_of(reference)
    assert not (tmp_path / ".out.partial").exists()


LAUNCH = {"cwd": ROOT, "capture_output": True, "text": True, "timeout": TIMEOUT, "stdin": subprocess.DEVNULL}


def launch_command(n: int, command: list[str]) -> list[str]:
    """`command` on n local processes under mlx.launch (ring backend; its ports from a free one on)."""
    launcher = Path(sys.executable).parent / "mlx.launch"
    if not launcher.exists():
        pytest.skip("mlx.launch is not installed beside this Python")
    port = free_ports(1)[0]
    return [str(launcher), "--backend", "ring", "-n", str(n), "--starting-port", str(port), "--", *command]


@pytest.mark.slow
def test_three_ranks_under_mlx_launch_write_the_bytes_one_process_writes(one_process, tmp_path):
    recipe, reference = one_process
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mergekit_mlx", "run", str(recipe), str(out), "--out-shard-size", SHARD]
    done = subprocess.run(launch_command(3, command + ["--random-seed", "7", "--no-progress"]), **LAUNCH)
    assert "by 3 processes" in done.stderr, done.stderr
    assert files_of(out) == files_of(reference)


KILLER = """
import json, os, signal, sys, time
from mergekit_mlx.formats import safetensors
close = safetensors.SafetensorsWriter._close

def proven(directory):  # this rank has recorded the identities of its inputs (the resume proof)
    try:
        return bool(json.loads((directory / ".mergekit-mlx-state.rank1.json").read_text()).get("inputs"))
    except (OSError, ValueError):
        return False

def close_then_die(self, i):  # rank 1 is killed once it has finished a shard and recorded its inputs
    close(self, i)
    if os.environ["MLX_RANK"] == "1":
        deadline = time.monotonic() + 10
        while not proven(self.out_dir) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)

safetensors.SafetensorsWriter._close = close_then_die
from mergekit_mlx.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_killed_rank_stops_the_run_and_resume_finishes_it_byte_identically(one_process, tmp_path, capsys):
    recipe, reference = one_process
    driver = tmp_path / "killer.py"
    driver.write_text(KILLER)
    out = tmp_path / "out"
    argv = ["run", str(recipe), str(out), "--out-shard-size", SHARD, "--random-seed", "7", "--no-progress"]
    (rc0, err0), (rc1, _) = ranks(2, tmp_path, argv, driver=driver)
    assert rc1 == -9 and rc0 == 2
    message = err0.strip().splitlines()[-1]
    assert message.startswith("mergekit-mlx: error: rank 0 of 2: rank 1 of 2 (pid ") and " is gone" in message
    assert "--resume" in message and str(tmp_path / ".out.partial") in message
    assert not out.exists()
    kept = sorted(p.name for p in (tmp_path / ".out.partial").glob("model-*"))
    assert kept  # rank 0's shards at least

    assert cli.main(argv + ["--resume"]) == 0  # one process finishes what two began
    assert "not resuming" not in capsys.readouterr().err  # every rank had proven its inputs: shards kept
    assert files_of(out) == files_of(reference)
    assert not (tmp_path / ".out.partial").exists()


@pytest.mark.slow
def test_each_rank_proves_only_the_input_files_its_shards_read(tmp_path):
    import numpy as np
    from tiny import llama_config, llama_weights, save_model

    cfg = llama_config(layers=4, hidden=64, inter=96, vocab=64)
    rng = np.random.default_rng(0)
    base = llama_weights(cfg, rng)  # in the architecture's order: embeddings, layers 0-3, norm, head
    sharded = [save_model(tmp_path / "base", cfg, base, shards=4)]  # every input in 4 files, a layer or so each
    for k in (1, 2):
        tuned = {n: v + rng.normal(0, 0.05, v.shape) for n, v in base.items()}
        sharded.append(save_model(tmp_path / f"ft{k}", cfg, tuned, shards=4))
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(sharded[0]),
                "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in sharded[1:]],
                "dtype": "float32",
            }
        )
    )
    driver = tmp_path / "killer.py"
    driver.write_text(KILLER)
    out = tmp_path / "out"
    argv = ["run", str(recipe), str(out), "--out-shard-size", "40K", "--no-progress"]
    (rc0, _), (rc1, _) = ranks(2, tmp_path, argv, driver=driver)
    assert (rc0, rc1) == (2, -9)
    partial = tmp_path / ".out.partial"
    proven = [
        set(json.loads((partial / name).read_text())["inputs"])
        for name in (".mergekit-mlx-state.json", ".mergekit-mlx-state.rank1.json")
    ]
    every = {str(f) for m in sharded for f in m.glob("*.safetensors")}
    assert proven[0] | proven[1] == every
    assert proven[1] < every  # rank 1 read (and identified) only the files of its layers

    assert cli.main(argv + ["--resume"]) == 0
    assert cli.main(["run", str(recipe), str(tmp_path / "one"), "--out-shard-size", "40K", "--no-progress"]) == 0
    assert files_of(out) == files_of(tmp_path / "one")


@pytest.mark.slow
def test_a_rank_that_hangs_stops_the_others_after_the_rank_timeout(one_process, tmp_path):
    recipe, reference = one_process
    driver = tmp_path / "stopper.py"
    driver.write_text(KILLER.replace("signal.SIGKILL", "signal.SIGSTOP"))  # alive, but never heard from again
    out = tmp_path / "out"
    argv = ["run", str(recipe), str(out), "--out-shard-size", SHARD, "--random-seed", "7", "--no-progress"]
    env = {"MERGEKIT_MLX_RANK_TIMEOUT": "2"}
    [(rc0, err0)] = ranks(2, tmp_path, argv, driver=driver, env=env, only_rank_0=True)
    assert rc0 == 2
    message = err0.strip().splitlines()[-1]
    assert "rank 1 of 2 has given no sign of life for 2 s" in message and "--resume" in message
    state = json.loads((tmp_path / ".out.partial" / ".mergekit-mlx-state.json").read_text())  # rank 0's record
    kept = {name: (tmp_path / ".out.partial" / name).stat().st_mtime_ns for name in state["shards"]}
    results = ranks(2, tmp_path, argv + ["--resume"])  # two ranks again, dealt the shards left
    assert [rc for rc, _ in results] == [0, 0], results
    assert all("not resuming" not in err for _, err in results)
    assert kept and all((out / name).stat().st_mtime_ns == t for name, t in kept.items())  # kept, not merged again
    assert files_of(out) == files_of(reference)


@pytest.mark.slow
def test_an_input_error_on_one_rank_is_every_ranks_error_and_leaves_nothing(one_process, tmp_path):
    import mlx.core as mx

    recipe, reference = one_process
    index = json.loads((reference / "model.safetensors.index.json").read_text())
    last_shard = sorted(set(index["weight_map"].values()))[-1]
    poisoned = next(name for name, f in index["weight_map"].items() if f == last_shard)  # merged by rank 1
    bad = tmp_path / "reverse"
    bad.mkdir()
    for f in (MODELS / "reverse").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = mx.load(str(bad / "model.safetensors"))
    weights[poisoned] = mx.full(weights[poisoned].shape, float("nan"), dtype=weights[poisoned].dtype)
    mx.save_safetensors(str(bad / "model.safetensors"), weights, metadata={"format": "pt"})
    recipe = recipe_file(tmp_path, {"add": MODELS / "add", "reverse": bad})
    out = tmp_path / "out"
    argv = ["run", str(recipe), str(out), "--out-shard-size", SHARD, "--no-progress"]
    (rc0, err0), (rc1, err1) = ranks(2, tmp_path, argv)
    assert (rc0, rc1) == (2, 2)
    assert f"tensor {poisoned}: NaN or Inf in the input" in err1
    assert "rank 1 of 2" in err0 and f"tensor {poisoned}: NaN or Inf in the input" in err0
    assert not out.exists() and not (tmp_path / ".out.partial").exists()  # as one process: nothing to resume

    # under mlx.launch, which stops every process once one has ended with an error, the same
    done = subprocess.run(launch_command(2, [sys.executable, "-m", "mergekit_mlx", *argv]), **LAUNCH)
    assert "rank 1 of 2 (pid" in done.stderr and f"tensor {poisoned}: NaN or Inf in the input" in done.stderr
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


@pytest.mark.slow
def test_ranks_that_do_not_share_the_output_folder_are_refused(one_process, tmp_path):
    recipe, _ = one_process
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # a relative OUT from another working directory stands for a host that sees another filesystem
    argv = ["run", str(recipe), "out", "--out-shard-size", SHARD, "--no-progress"]
    (rc0, err0), (rc1, err1) = ranks(2, tmp_path, argv, cwd={0: tmp_path, 1: elsewhere})
    assert (rc0, rc1) == (2, 2)
    assert "must share the output's filesystem" in err1 and "rank 1 of 2" in err0
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    assert list(elsewhere.iterdir()) == []


@pytest.mark.slow
def test_an_input_one_rank_cannot_see_is_every_ranks_error_before_anything_is_written(tmp_path):
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    (here / "reverse").symlink_to(MODELS / "reverse")
    # a relative model path: found from rank 0's working directory, not from rank 1's
    recipe = recipe_file(tmp_path, {"add": MODELS / "add", "reverse": Path("reverse")})
    argv = ["run", str(recipe), str(tmp_path / "out"), "--no-progress"]
    (rc0, err0), (rc1, err1) = ranks(2, tmp_path, argv, cwd={0: here, 1: there})
    assert (rc0, rc1) == (2, 2)
    assert "models[1].model: model 'reverse' not found" in err1
    assert "rank 1 of 2" in err0 and "models[1].model: model 'reverse' not found" in err0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "hosts-2.json", "recipe.yml", "there"]


def test_an_output_of_one_file_is_refused_on_several_ranks(tmp_path):
    plan = make_plan(load_recipe(recipe_file(tmp_path)))
    with pytest.raises(OutputError, match="one file written by one process"):  # before any exchange
        write_output(plan, tmp_path / "out.gguf", MergeOptions(out_format="gguf-f16"), lambda *_: None, World(rank=0, size=2))
    assert not list(tmp_path.glob("*out*"))


# ---------------- searches ----------------

SEARCH = example_config(limit=4)  # the example search of test_evolve, 4 prompts a skill


FLAGS = ["--max-fevals", "6", "--popsize", "4", "--seed", "3"]  # a generation and a cut one


def records(out: Path) -> list[dict]:
    """The search's log, without the seconds each candidate took."""
    lines = (out / "candidates.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


@pytest.fixture(scope="module")
def one_search(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    config = tmp / "evolve.yml"
    config.write_text(yaml.safe_dump(SEARCH))
    return config, search(config_from_dict(SEARCH), tmp / "one", SearchOptions(max_fevals=6, popsize=4, seed=3))


@pytest.mark.slow
def test_a_search_on_two_ranks_finds_what_one_process_finds(one_search, tmp_path):
    config, one = one_search
    results = ranks(2, tmp_path, ["evolve", str(config), str(tmp_path / "two"), "--no-progress", *FLAGS])
    assert [rc for rc, _ in results] == [0, 0], results
    assert len(records(tmp_path / "two")) == 6
    assert records(tmp_path / "two") == records(one.out)
    assert (tmp_path / "two" / "best.yml").read_bytes() == (one.out / "best.yml").read_bytes()
    assert files_of(tmp_path / "two" / "model") == files_of(one.model_path)
    two = json.loads((tmp_path / "two" / "state.json").read_text())
    assert two["settings"] == one.settings and two["finished"]


SEARCH_KILLER = """
import importlib, os, signal, sys
search = importlib.import_module("mergekit_mlx.evolve.search")  # the module, not the function

score = search._Evaluator.candidate

def score_or_die(self, g, i, x, run_index):  # rank 1 is killed in the second generation
    if g == 1 and os.environ["MLX_RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return score(self, g, i, x, run_index)

search._Evaluator.candidate = score_or_die
from mergekit_mlx.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_search_that_loses_a_rank_stops_and_resumes_from_its_checkpoint(one_search, tmp_path):
    config, one = one_search
    driver = tmp_path / "killer.py"
    driver.write_text(SEARCH_KILLER)
    out = tmp_path / "two"
    (rc0, err0), (rc1, _) = ranks(2, tmp_path, ["evolve", str(config), str(out), "--no-progress", *FLAGS], driver=driver)
    assert rc1 == -9 and rc0 == 2
    message = err0.strip().splitlines()[-1]
    assert "another process of this run is gone" in message and "--resume" in message
    assert len(records(out)) == 4 and not (out / "model").exists()  # the first generation, checkpointed

    assert cli.main(["evolve", str(config), str(out), "--no-progress", "--resume", *FLAGS]) == 0  # one process goes on
    assert records(out) == [{**r, "run": 0 if r["generation"] == 0 else 1} for r in records(one.out)]
    assert (out / "best.yml").read_bytes() == (one.out / "best.yml").read_bytes()
