"""The output lifecycle every writing command shares: `run`, `convert` and `MergeResult.save`.

- `--force` replaces only an earlier output of mergekit-mlx: a directory holding exactly the files
  its manifest lists, a GGUF file carrying the tool's marker, or an empty directory. Never a plain
  file, a symlink, a folder with anything else in it, or anything holding an input.
- The temporary `.OUT.partial` is locked: a second run on the same OUT refuses at once, naming the
  first process, and touches nothing.
- `--resume` keeps finished shards only when every input file has the bytes it had (SHA-256).
- A real full disk (a tmpfs, an ext4 image) is a clean error that leaves no `.OUT.partial`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import tiny
import yaml

from mergekit_mlx import merge, output
from mergekit_mlx.cli import main as cli_main
from mergekit_mlx.digest import file_identity
from mergekit_mlx.errors import MergeKitError, OutputError
from mergekit_mlx.options import MergeOptions
from mergekit_mlx.output import MANIFEST, STATE_FILE, open_partial

REPO = Path(__file__).resolve().parent.parent


def recipe_file(tmp_path: Path, family, name: str = "recipe.yml", density: float = 0.5) -> Path:
    base, *fts = family
    recipe = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": density}} for p in fts],
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def run(capsys, *argv) -> tuple[int, str]:
    rc = cli_main([*map(str, argv), "--no-progress"])
    return rc, capsys.readouterr().err


def snapshot(path: Path) -> dict[str, object]:
    """Every entry under path (path itself included): kind, and bytes or link target."""
    out: dict[str, object] = {}
    for p in [path, *sorted(path.rglob("*"))] if path.is_dir() and not path.is_symlink() else [path]:
        key = str(p.relative_to(path.parent))
        if p.is_symlink():
            out[key] = ("link", os.readlink(p))
        elif p.is_dir():
            out[key] = ("dir",)
        elif p.is_file():
            out[key] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[key] = ("other", p.lstat().st_mode)
    return out


def partial_of(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def assert_error(rc: int, err: str, *patterns: str) -> None:
    assert rc == 2, err
    assert err.startswith("mergekit-mlx: error: ") and "Traceback" not in err, err
    assert err.count("\n") == 1, f"not one paragraph: {err!r}"
    for p in patterns:
        assert re.search(p, err), f"{p!r} not in {err!r}"


# ---------------- what --force may replace ----------------


def test_an_output_lists_every_file_it_holds_in_its_manifest(family, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "run", recipe_file(tmp_path, family), out)[0] == 0
    manifest = json.loads((out / MANIFEST).read_text())
    on_disk = {p.name: p.stat().st_size for p in out.iterdir() if p.name != MANIFEST}
    assert manifest["tool"] == "mergekit-mlx" and manifest["files"] == on_disk
    assert "config.json" in on_disk and "model.safetensors" in on_disk


def test_force_replaces_an_earlier_output_of_this_tool(family, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "run", recipe_file(tmp_path, family), out)[0] == 0
    first = snapshot(out)
    rc, err = run(capsys, "run", recipe_file(tmp_path, family, "other.yml", density=0.3), out, "--force")
    assert rc == 0, err
    assert snapshot(out) != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "something was left beside the output"


def test_force_replaces_an_empty_folder(family, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert run(capsys, "run", recipe_file(tmp_path, family), out, "--force")[0] == 0
    assert (out / "model.safetensors").is_file()


def _user_folder_with_config(out: Path) -> None:
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "thesis.tex").write_text("years of work")


def _user_folder_with_gguf(out: Path) -> None:
    out.mkdir()
    (out / "model.gguf").write_bytes(b"GGUF not ours")
    (out / "notes.txt").write_text("mine")


def _our_output_plus_a_user_file(out: Path) -> None:
    (out / "notes.txt").write_text("mine, added after the merge")


def _our_output_with_a_changed_file(out: Path) -> None:
    (out / "README.md").write_text("my own model card, longer than the one the tool wrote " * 20)


def _our_output_with_a_subfolder(out: Path) -> None:
    (out / "eval").mkdir()
    (out / "eval" / "scores.json").write_text("{}")


def _plain_file(out: Path) -> None:
    out.write_text("a file of the user's")


def _symlink_to_our_output(out: Path) -> None:
    real = out.parent / "real-output"
    os.rename(out, real)
    out.symlink_to(real)


def _fifo(out: Path) -> None:
    os.mkfifo(out)


NOT_OURS = {
    "folder-with-a-config": (_user_folder_with_config, False, "without a valid .mergekit-mlx-output.json"),
    "folder-with-a-gguf": (_user_folder_with_gguf, False, "without a valid .mergekit-mlx-output.json"),
    "our-output-plus-a-user-file": (
        _our_output_plus_a_user_file,
        True,
        r"holds files that mergekit-mlx did not write there \(notes.txt\)",
    ),
    "our-output-with-a-changed-file": (_our_output_with_a_changed_file, True, "README.md, which was changed"),
    "our-output-with-a-subfolder": (_our_output_with_a_subfolder, True, r"did not write there \(eval\)"),
    "plain-file": (_plain_file, False, "is a file that mergekit-mlx did not write"),
    "symlink-to-our-output": (_symlink_to_our_output, True, "is a symbolic link"),
    "fifo": (_fifo, False, "is not a regular file or directory"),
}


@pytest.mark.parametrize("case", list(NOT_OURS))
def test_force_never_replaces_what_this_tool_did_not_write(family, tmp_path, capsys, case):
    make, after_a_merge, message = NOT_OURS[case]
    out = tmp_path / "out"
    recipe = recipe_file(tmp_path, family)
    if after_a_merge:
        assert run(capsys, "run", recipe, out)[0] == 0
    make(out)
    before = snapshot(tmp_path)
    rc, err = run(capsys, "run", recipe, out, "--force")
    assert_error(rc, err, re.escape(str(out)), message, "--force replaces only an output that mergekit-mlx wrote")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["folder-with-a-config", "our-output-plus-a-user-file", "plain-file"])
def test_convert_force_keeps_the_same_rules(family, tmp_path, capsys, case):
    make, after_a_merge, message = NOT_OURS[case]
    out = tmp_path / "out"
    if after_a_merge:
        assert run(capsys, "convert", family[1], out)[0] == 0
    make(out)
    before = snapshot(tmp_path)
    rc, err = run(capsys, "convert", family[1], out, "--force")
    assert_error(rc, err, message)
    assert snapshot(tmp_path) == before


def test_convert_never_replaces_its_own_input_or_a_folder_holding_it(family, tmp_path, capsys):
    models = tmp_path / "models"
    tiny.make_family(models)
    before = snapshot(models)
    for out in (models / "ft1", models):
        rc, err = run(capsys, "convert", models / "ft1", out, "--force")
        assert_error(rc, err, "the input model")
    rc, err = run(capsys, "convert", models / "ft1", models / "base", "--force")  # another model: not ours either
    assert_error(rc, err, "not an output of mergekit-mlx")
    rc, err = run(capsys, "convert", models / "ft1", models / "ft1" / "inside", "--force")
    assert_error(rc, err, r"is \(inside\) the input model")
    assert snapshot(models) == before


def test_convert_replaces_its_own_earlier_output_and_takes_the_common_flags(family, tmp_path, capsys):
    out = tmp_path / "converted"
    common = ["--device", "cpu", "--out-shard-size", "20K"]
    assert run(capsys, "convert", family[1], out, *common)[0] == 0
    rc, err = run(capsys, "convert", family[2], out, "--force", *common)
    assert rc == 0, err
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert tiny.load_np(out).keys() == tiny.load_np(family[2]).keys()
    for name, value in tiny.load_np(out).items():
        assert (value == tiny.load_np(family[2])[name]).all()


def test_a_gguf_file_is_replaced_only_when_this_tool_made_it(family, tmp_path, capsys):
    ours = tmp_path / "ours.gguf"
    assert run(capsys, "convert", family[1], ours, "--out-format", "gguf-f16")[0] == 0
    rc, err = run(capsys, "convert", family[2], ours, "--out-format", "gguf-f16", "--force")
    assert rc == 0, err
    theirs = tmp_path / "theirs.gguf"
    theirs.write_bytes(ours.read_bytes().replace(b"mergekit_mlx.output", b"somebody_else.tool!"))
    before = snapshot(tmp_path)
    rc, err = run(capsys, "convert", family[2], theirs, "--out-format", "gguf-f16", "--force")
    assert_error(rc, err, "is a file that mergekit-mlx did not write")
    assert snapshot(tmp_path) == before


def _recipe_dict(family) -> dict:
    base, *fts = family
    return {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in family]}


def test_save_with_force_never_replaces_an_input_model(tmp_path):
    models = tmp_path / "models"
    family = tiny.make_family(models)
    before = snapshot(models)
    result = merge(_recipe_dict(family))
    for target in (family[1], models, family[1] / "inside"):
        with pytest.raises(OutputError, match="input model"):
            result.save(target, force=True)
    assert snapshot(models) == before


def test_save_with_force_never_replaces_a_folder_of_user_files(family, tmp_path):
    result = merge(_recipe_dict(family))
    home = tmp_path / "home"
    _user_folder_with_config(home)
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match="--force replaces only an output that mergekit-mlx wrote"):
        result.save(home, force=True)
    assert snapshot(tmp_path) == before
    result.save(tmp_path / "saved")
    result.save(tmp_path / "saved", force=True)  # its own earlier output
    assert (tmp_path / "saved" / MANIFEST).is_file()


def test_a_temporary_output_this_tool_did_not_make_is_never_touched(family, tmp_path, capsys):
    out = tmp_path / "out"
    partial = partial_of(out)
    partial.mkdir()
    (partial / "mine.txt").write_text("a user's folder that happens to have this name")
    recipe = recipe_file(tmp_path, family)
    before = snapshot(tmp_path)
    for extra in ([], ["--force"], ["--resume"]):
        rc, err = run(capsys, "run", recipe, out, *extra)
        assert_error(rc, err, re.escape(str(partial)), "not written by mergekit-mlx")
        assert snapshot(tmp_path) == before


# ---------------- one run per output ----------------


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from mergekit_mlx.output import open_partial
held = open_partial(Path(sys.argv[1]))
held.save_state(pid=__import__("os").getpid(), host="here")
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_a_second_run_on_the_same_output_refuses_at_once_naming_the_first(family, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        recipe = recipe_file(tmp_path, family)
        before = snapshot(tmp_path)
        start = time.monotonic()
        for extra in ([], ["--resume"], ["--force"]):
            rc, err = run(capsys, "run", recipe, out, *extra)
            assert_error(rc, err, f"another mergekit-mlx process \\(pid {holder.pid} on here\\) is writing")
        rc, err = run(capsys, "convert", family[1], out)
        assert_error(rc, err, f"pid {holder.pid}")
        assert time.monotonic() - start < 30, "the second run waited instead of refusing"
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed, as after a crash): its temporary output is taken over
    rc, err = run(capsys, "run", recipe_file(tmp_path, family), out)
    assert rc == 0, err
    assert not partial_of(out).exists()


def test_the_lock_is_released_when_a_run_fails(family, tmp_path, capsys):
    out = tmp_path / "out"
    held = open_partial(out)
    held.remove()
    held = open_partial(out)  # free again
    held.remove()
    assert not partial_of(out).exists()


# ---------------- resume proves its inputs ----------------


def test_an_input_keeps_its_identity_while_it_is_only_read(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x" * 4096)
    before = file_identity(f)
    assert f.read_bytes() == b"x" * 4096
    (tmp_path / "link.safetensors").symlink_to(f)
    assert file_identity(f) == before == file_identity(tmp_path / "link.safetensors")  # a link names its target


def test_an_input_rewritten_with_its_old_times_has_another_identity(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x" * 4096)
    st = f.stat()
    before = file_identity(f)
    time.sleep(0.02)  # past the filesystem's clock tick
    f.write_bytes(b"y" * 4096)  # other bytes, the same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old modification time
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert file_identity(f) != before  # its change time moved, and no user can set that back


def test_an_input_replaced_by_a_copy_with_its_old_times_has_another_identity(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x" * 4096)
    before = file_identity(f)
    copy = tmp_path / "download.tmp"
    shutil.copy2(f, copy)  # the same bytes and times, as a re-download that keeps the times would be
    os.replace(copy, f)
    assert f.read_bytes() == b"x" * 4096
    assert file_identity(f) != before  # another file (inode): a resume merges everything again


def test_a_resume_of_a_run_that_recorded_content_hashes_merges_everything_again(tmp_path):
    """An earlier version recorded the inputs' XXH3-128 hashes: nothing to compare an identity with."""
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x" * 4096)
    partial = open_partial(tmp_path / "out")
    try:
        shard = partial.path / "model-00001-of-00002.safetensors"
        shard.write_bytes(b"s" * 64)
        state = {"fingerprint": "fp", "shards": {shard.name: "0" * 32}, "inputs": {str(f): "ab" * 16}}
        (partial.path / STATE_FILE).write_text(json.dumps(state))
        kept, now, why = output._kept_shards(partial, "fp", [str(f)])
    finally:
        partial.close()
    assert kept == {} and now is None
    assert "content hashes (an earlier mergekit-mlx)" in why


def test_a_merge_records_its_inputs_identities_before_it_reads_them(tmp_path, monkeypatch):
    """The proof costs one stat per input file, taken when the temporary output starts: no input is
    read twice, in the merge or in a resume."""
    models = tiny.make_family(tmp_path / "family", layers=2, hidden=64, inter=128, vocab=256)
    recipe = recipe_file(tmp_path, models)
    states = []
    real_save = output.PartialOutput.save_state

    def save_state(self, **changes):
        states.append(dict(changes))
        real_save(self, **changes)

    monkeypatch.setattr(output.PartialOutput, "save_state", save_state)
    opts = MergeOptions(out_shard_size=40_000, progress=False, copy_tokenizer=False)
    merge(recipe, tmp_path / "out", opts)
    first = next(s for s in states if s)  # (the state starts empty)
    assert "inputs" in first and "shards" not in first  # first, before any shard is finished
    inputs = sorted(str(f) for m in models for f in Path(m).glob("*.safetensors"))
    assert first["inputs"] == {f: file_identity(f) for f in inputs}


@pytest.fixture(scope="module")
def larger_family(tmp_path_factory) -> list[Path]:
    """About 18 MB a model: a merge into 1 MB shards takes long enough to be killed halfway."""
    return tiny.make_family(tmp_path_factory.mktemp("larger-lifecycle"), layers=6, hidden=256, inter=512, vocab=2048)


def _killed_halfway(recipe: Path, out: Path, shards: list[str]) -> dict:
    """Start a merge, SIGKILL it once its state records finished shards and the inputs' identities."""
    state = partial_of(out) / STATE_FILE
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergekit_mlx", "run", str(recipe), str(out), "--no-progress", *shards],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    recorded: dict = {}
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            recorded = json.loads(state.read_text())  # replaced atomically: always whole
        except (OSError, ValueError):
            recorded = {}
        if recorded.get("shards") and recorded.get("inputs"):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the merge ended before it recorded a shard; the model is too small"
    return recorded


@pytest.mark.slow
def test_resume_merges_everything_again_when_an_input_was_replaced_by_same_size_bytes(larger_family, tmp_path, capsys):
    family = [tmp_path / p.name for p in larger_family]
    for src, dst in zip(larger_family, family):
        subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    recipe = recipe_file(tmp_path, family)
    shards = ["--out-shard-size", "1M", "--batch-size", "1M"]
    out = tmp_path / "out"
    recorded = _killed_halfway(recipe, out, shards)
    assert recorded["shards"]

    # the fine-tune is replaced in place by other bytes of the same size, with its old timestamps
    victim = family[1] / "model.safetensors"
    st = victim.stat()
    other = (family[2] / "model.safetensors").read_bytes()
    assert len(other) == st.st_size and other != victim.read_bytes()
    victim.write_bytes(other)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns

    rc, err = run(capsys, "run", recipe, out, "--resume", *shards)
    assert rc == 0, err
    assert "not resuming" in err and "has changed since the interrupted run" in err
    rc, err = run(capsys, "run", recipe, tmp_path / "reference", *shards)
    assert rc == 0, err
    ours = {k.split("/", 1)[1]: v for k, v in snapshot(out).items() if "/" in k}
    reference = {k.split("/", 1)[1]: v for k, v in snapshot(tmp_path / "reference").items() if "/" in k}
    assert ours == reference


# ---------------- a real full disk ----------------


@contextmanager
def mounted(kind: str, where: Path, size_kb: int):
    """A small filesystem of its own at `where`: a tmpfs, or an ext4 image on a loop device."""
    where.mkdir()
    if kind == "tmpfs":
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)]
    else:
        image = where.parent / "disk.img"
        with open(image, "wb") as f:
            f.truncate(size_kb * 1024)
        made = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], capture_output=True, text=True)
        if made.returncode:
            pytest.skip(f"cannot make an ext4 image here: {made.stderr.strip() or made.returncode}")
        cmd = ["mount", "-o", "loop", str(image), str(where)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if done.returncode:
        pytest.skip(f"mounting a {kind} is not permitted here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(disk: Path, leave: int) -> None:
    """Fill the filesystem until about `leave` bytes stay free."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    if free > leave:
        with open(disk / "ballast", "wb") as f:
            f.write(b"\0" * (free - leave))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
@pytest.mark.parametrize("out_format", ["hf", "mlx-q8", "gguf-f16"])
def test_a_full_disk_is_a_clean_error_and_leaves_nothing(larger_family, tmp_path, capsys, kind, out_format):
    recipe = recipe_file(tmp_path, larger_family)
    need = sum(v.size * 4 for v in tiny.load_np(larger_family[0]).values())  # float32, counted independently
    with mounted(kind, tmp_path / "disk", 32 * 1024) as disk:
        # the free space passes the up-front check (the tensors' bytes), then headers, tokenizer and
        # card fill the disk up; formats whose size is not known up front get a few MB
        _fill(disk, need + 4096 if out_format == "hf" else 3 * 1000**2)
        before = snapshot(disk)
        rc, err = run(capsys, "run", recipe, disk / "out", "--out-format", out_format, "--out-shard-size", "4M")
        if out_format == "hf" and rc == 2 and "not enough free space" in err:
            pytest.skip("the filesystem reported less free space than it was filled to")
        assert_error(rc, err, "cannot write .*out", "no space left on the device", "partial output was removed")
        assert snapshot(disk) == before, "a failed write left something behind"


@pytest.mark.slow
def test_a_full_disk_while_shards_are_written_side_by_side_is_a_clean_error(larger_family, tmp_path, capsys, monkeypatch):
    """Several shards written at once by threads of their own (as on a host with cores to spare):
    the first lane to find the disk full stops the others, and nothing is left behind."""
    from mergekit_mlx.formats import safetensors as writer

    monkeypatch.setattr(writer, "_DIRECT", False)
    monkeypatch.setattr(writer, "_WRITE_LANES", 3)
    recipe = recipe_file(tmp_path, larger_family)
    need = sum(v.size * 4 for v in tiny.load_np(larger_family[0]).values())
    with mounted("tmpfs", tmp_path / "disk", 32 * 1024) as disk:
        _fill(disk, need // 2)  # the up-front check is told the space is there; half of it is
        before = snapshot(disk)
        monkeypatch.setattr("mergekit_mlx.output._check_free_space", lambda out, job, opts: None)
        rc, err = run(capsys, "run", recipe, disk / "out", "--out-shard-size", "2M")
        assert_error(rc, err, "cannot write .*out", "no space left on the device", "partial output was removed")
        assert snapshot(disk) == before, "a failed write left something behind"


def test_an_interrupted_merge_written_side_by_side_resumes_to_the_same_bytes(larger_family, tmp_path, capsys, monkeypatch):
    """Shards written side by side finish window by window: an interruption keeps the finished
    windows' shards, and --resume writes the rest, byte for byte the uninterrupted output."""
    from mergekit_mlx.formats import safetensors as writer
    from mergekit_mlx.formats.safetensors import SafetensorsWriter

    monkeypatch.setattr(writer, "_DIRECT", False)
    monkeypatch.setattr(writer, "_WRITE_LANES", 3)
    recipe = recipe_file(tmp_path, larger_family)
    shards = ["--out-shard-size", "2M", "--batch-size", "2M"]
    assert run(capsys, "run", recipe, tmp_path / "reference", *shards)[0] == 0
    real = SafetensorsWriter._write

    def interrupted(self, i, arrays):  # Ctrl-C once the first window's three shards are finished
        if len(self.written) >= 3:
            raise KeyboardInterrupt
        real(self, i, arrays)

    monkeypatch.setattr(SafetensorsWriter, "_write", interrupted)
    out = tmp_path / "out"
    rc, err = run(capsys, "run", recipe, out, *shards)
    assert rc == 130 and "--resume" in err
    state = json.loads((partial_of(out) / STATE_FILE).read_text())
    assert len(state["shards"]) == 3
    monkeypatch.setattr(SafetensorsWriter, "_write", real)
    rc, err = run(capsys, "run", recipe, out, "--resume", *shards)
    assert rc == 0, err
    assert snapshot(out) == {k.replace("reference", "out", 1): v for k, v in snapshot(tmp_path / "reference").items()}


@pytest.mark.slow
def test_a_full_disk_during_convert_is_a_clean_error(larger_family, tmp_path, capsys):
    with mounted("tmpfs", tmp_path / "disk", 3 * 1024) as disk:  # the q8 model needs about 5 MB
        before = snapshot(disk)
        rc, err = run(capsys, "convert", larger_family[1], disk / "out", "--out-format", "mlx-q8")
        assert_error(rc, err, "no space left on the device")
        assert snapshot(disk) == before


def test_a_temporary_output_left_by_a_run_killed_while_committing_is_taken_over(family, tmp_path, capsys):
    """Killed between deleting its state and the rename: `.OUT.partial` holds a finished output
    with its manifest; the next run recognises it as its own and replaces it."""
    recipe = recipe_file(tmp_path, family)
    assert run(capsys, "run", recipe, tmp_path / "finished")[0] == 0
    os.rename(tmp_path / "finished", partial_of(tmp_path / "out"))
    rc, err = run(capsys, "run", recipe, tmp_path / "out")
    assert rc == 0, err
    assert (tmp_path / "out" / MANIFEST).is_file() and not partial_of(tmp_path / "out").exists()


def test_replacing_an_output_never_leaves_the_output_path_empty(family, tmp_path, capsys):
    """The earlier output and the new one swap places in one step (where the system can), and the
    earlier one is then removed: no second name is left beside the output."""
    out = tmp_path / "out"
    recipe = recipe_file(tmp_path, family)
    assert run(capsys, "run", recipe, out)[0] == 0
    before = os.stat(out).st_ino
    assert run(capsys, "run", recipe_file(tmp_path, family, "b.yml", density=0.3), out, "--force")[0] == 0
    assert os.stat(out).st_ino != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.yml", "out", "recipe.yml"]


def test_a_float16_overflow_is_named_as_such_not_blamed_on_the_weights(tmp_path, capsys):
    """Finite inputs whose weighted sum passes float16's largest value (65504): the error says the
    output dtype overflowed and what to set, and nothing is written."""
    a, b = tiny.make_family(tmp_path / "fam", n_finetunes=1)
    for model in (a, b):
        weights = tiny.load_np(model)
        weights["model.norm.weight"][:] = 40000.0  # each fits float16; their sum does not
        for f in model.glob("*.safetensors"):
            f.unlink()
        tiny.save_model(model, json.loads((model / "config.json").read_text()), weights, tokenizer=False)
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "out_dtype": "float16",
                "parameters": {"normalize": False},
                "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in (a, b)],
            }
        )
    )
    rc, err = run(capsys, "run", recipe, tmp_path / "out")
    assert_error(rc, err, "model.norm.weight", "beyond float16's range", "out_dtype")
    assert not (tmp_path / "out").exists() and not partial_of(tmp_path / "out").exists()


@pytest.mark.slow
def test_an_input_truncated_during_the_merge_is_named_and_nothing_is_left(larger_family, tmp_path):
    """The fault is real: after the first tensor is written, one input file is cut to a tenth."""
    family = [tmp_path / p.name for p in larger_family]
    for src, dst in zip(larger_family, family):
        subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    victim = family[2] / "model.safetensors"
    cut = []

    def truncate_after_first_write(name, task, seconds):
        if name == "write" and not cut:
            with open(victim, "r+b") as f:
                f.truncate(victim.stat().st_size // 10)
            cut.append(task.out.name)

    recipe = {
        "merge_method": "ties",
        "base_model": str(family[0]),
        "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in family[1:]],
    }
    out = tmp_path / "out"
    with pytest.raises(MergeKitError) as e:
        merge(recipe, out, on_event=truncate_after_first_write, batch_bytes=1 << 20, out_shard_size=1 << 20)
    assert cut, "the merge ended before its first write"
    assert str(victim) in str(e.value) and "truncated" in str(e.value), str(e.value)
    assert not out.exists() and not partial_of(out).exists()
