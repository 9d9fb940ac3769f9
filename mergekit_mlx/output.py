"""The one output lifecycle: every command that writes a model goes through it.

Checks first, before an input tensor is read: the output is no input, lies in none and holds none;
an existing output is replaced only with `force`, and only when this tool wrote it (a directory
holding exactly the files its manifest lists, or a GGUF file carrying this tool's marker); never a
plain file, a symlink, or a folder with anything else in it.

Then a temporary sibling `.NAME.partial`, locked (an advisory lock on the directory, so a second
run on the same output refuses at once and names the first), is filled through the format's writer.
Shards get their final names only when complete; the manifest is written last and the directory is
renamed into place only when everything is written, so nothing half-written looks complete. A
replaced output is moved aside first and then emptied of the files its manifest lists, nothing else.

Under `mlx.launch` (a `World` of several processes: distributed.py) the same lifecycle holds across
the ranks: rank 0 checks, locks and commits, every rank writes its share of the shards into the one
`.NAME.partial` (on a filesystem they share), and the directory is renamed into place only after
every rank reported its shards (`_write_across_ranks`).

What a failed run leaves behind: a validation error leaves nothing; an error while merging or
writing (non-finite values, a full disk) removes `.NAME.partial`, since rerunning the same command
could not use it; only an interruption (Ctrl-C, a kill, a power loss) leaves it, for `--resume`.
A resume keeps finished shards only when the recipe and options are the same, every input file is
the one the interrupted run read (its identity: size, modification and change times, inode; see
digest.py) and every kept shard has the bytes recorded when it was finished (its content hash).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from . import distributed
from .chat_template import apply_chat_template
from .digest import file_digest, file_identity, is_identity
from .distributed import World
from .dtypes import safetensors_code
from .errors import MergeKitError, OutputError, RunInterrupted, warn_once
from .formats import make_writer, writer_class
from .formats.base import OutputTensor, Writer
from .formats.files import copy_side_files
from .options import MergeOptions
from .plan import Plan, human_bytes

MANIFEST = ".mergekit-mlx-output.json"  # in every output directory: the files this tool wrote there
STATE_FILE = ".mergekit-mlx-state.json"  # in `.NAME.partial`: owner, fingerprint, input identities, shards
RANK_STATE = ".mergekit-mlx-state.rank{rank}.json"  # beside it, in a distributed merge: what rank N > 0 finished
GGUF_MARKER = b"mergekit_mlx.output"  # a GGUF metadata key this tool writes into every GGUF it makes
GGUF_MARKER_SPAN = 1 << 16  # bytes of a GGUF file searched for the marker (it is written among the first keys)
# how MLX words a failed file write (it raises RuntimeError without an errno)
MLX_WRITE_ERRORS = ("[write]", "[save_safetensors]", "[save]", "[save_gguf]")
NAME_MAX = 255
PATH_MAX = 4096

Produce = Callable[[Callable[[str, mx.array], None], Callable[[str], bool]], None]


def partial_dir(out: Path) -> Path:
    """The temporary sibling an output is written in."""
    return out.parent / f".{out.name}.partial"


def check_output_location(out: Path, inputs: Sequence[tuple[str, Path]], *, force: bool, resume: bool = False) -> None:
    """Refuse an output that cannot be written as asked, before any input tensor is read.

    `inputs` are (name the user gave, path) of every input model."""
    out = _absolute(out)
    target = out.resolve()
    for ref, src in inputs:
        src = Path(src).resolve()
        # a directory model may not hold the output; beside a .gguf file is fine, the file itself is not
        if target == src or (src.is_dir() and src in target.parents):
            raise OutputError(f"output {out} is (inside) the input model {ref}; choose another output location")
        if target in src.parents:
            # replacing the output would delete the input with it
            raise OutputError(f"output {out} contains the input model {ref}; choose another output location")
    partial = partial_dir(out)
    if os.path.lexists(partial) and not _is_our_partial(partial):
        raise OutputError(
            f"{partial} exists and was not written by mergekit-mlx (it is where this output would be "
            "written first); remove or rename it, or choose another output location"
        )
    if not os.path.lexists(out):
        return
    if not force:
        hint = " (it is a finished output: there is nothing to resume)" if resume else ""
        raise OutputError(f"output {out} already exists{hint}; pass --force to replace it (force=True in Python)")
    why = _not_ours(out)
    if why:
        raise OutputError(
            f"output {out} {why}; --force replaces only an output that mergekit-mlx wrote (a directory with "
            f"its {MANIFEST} and nothing else, or a GGUF file it made) or an empty directory: remove it "
            "yourself, or choose another output location"
        )


def _absolute(out: Path) -> Path:
    """The output as an absolute path ("." and "x/" still have a parent and a name), checked for length."""
    text = os.fsencode(str(out))
    if not text:
        raise OutputError("the output path is empty; name a directory (or a .gguf file) to create")
    absolute = Path(os.path.abspath(os.path.expanduser(out)))  # "~/x" quoted past the shell is still home
    if len(os.fsencode(str(absolute))) + len(".partial") + 2 > PATH_MAX:
        raise OutputError(f"output path {str(out)[:80]}... is too long ({len(text)} bytes); choose a shorter one")
    for part in absolute.parts:
        if len(os.fsencode(part)) + len("..partial") > NAME_MAX:
            raise OutputError(
                f"output {str(out)[:80]}...: the name {part[:40]}... is {len(os.fsencode(part))} bytes; a file "
                f"name may have at most {NAME_MAX - len('..partial')} here (its temporary sibling adds 9)"
            )
    if absolute == Path(absolute.anchor):
        raise OutputError(f"output {out} is the root of the filesystem; name a directory to create")
    return absolute


def _not_ours(out: Path) -> str | None:
    """Why `out` may not be replaced, or None when this tool wrote it (or it is an empty directory)."""
    try:
        st = os.lstat(out)
    except OSError as e:
        return f"cannot be inspected ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if stat.S_ISREG(st.st_mode):
        return None if _is_our_gguf(out) else "is a file that mergekit-mlx did not write"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a regular file or directory"
    try:
        names = set(os.listdir(out))
    except OSError as e:
        return f"cannot be listed ({e.strerror})"
    if not names:
        return None
    listed = _manifest_files(out)
    if listed is None:
        return f"is a folder without a valid {MANIFEST} (not an output of mergekit-mlx)"
    extra = sorted(names - set(listed) - {MANIFEST})
    if extra:
        return f"holds files that mergekit-mlx did not write there ({', '.join(extra[:3])})"
    for name, size in listed.items():
        try:
            st = os.lstat(out / name)
        except FileNotFoundError:
            continue  # a file the user removed: nothing of theirs is lost
        except OSError as e:
            return f"has {name}, which cannot be inspected ({e.strerror})"
        if not stat.S_ISREG(st.st_mode):
            return f"has {name}, which is no longer the regular file mergekit-mlx wrote"
        if st.st_size != size:
            return f"has {name}, which was changed since mergekit-mlx wrote it"
    return None


def _manifest_files(directory: Path) -> dict[str, int] | None:
    """name -> size of the files an output directory's manifest lists, or None without a valid one."""
    path = directory / MANIFEST
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode) or os.lstat(path).st_size > 1 << 20:
            return None
        data = json.loads(path.read_bytes().decode("utf-8"))
        files = data["files"] if data.get("tool") == "mergekit-mlx" else None
        if not isinstance(files, dict):
            return None
        ok = all(
            isinstance(n, str) and _plain_name(n) and n != MANIFEST and isinstance(s, int) and not isinstance(s, bool)
            for n, s in files.items()
        )
        return files if ok else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _is_our_gguf(path: Path) -> bool:
    """A GGUF file with this tool's marker among its first metadata keys."""
    try:
        with open(path, "rb") as f:
            head = f.read(GGUF_MARKER_SPAN)
    except OSError:
        return False
    return head[:4] == b"GGUF" and GGUF_MARKER in head


def _is_our_partial(partial: Path) -> bool:
    """A temporary output this tool made: a real directory, empty or holding its state file or manifest."""
    try:
        st = os.lstat(partial)
        if not stat.S_ISDIR(st.st_mode):
            return False
        names = os.listdir(partial)
    except OSError:
        return False
    # a run killed while committing leaves its manifest (and no state): still ours
    return not names or STATE_FILE in names or MANIFEST in names


# ---------------- the temporary output: lock, state, resume ----------------


def prove_inputs(files: Sequence[str], record: Callable[[dict[str, str]], None]) -> None:
    """Hand the input files' identities (`identify_files`) to `record` before the merge reads them,
    so that a later `--resume` can prove its inputs are the files this run read."""
    try:
        record(identify_files(files))
    except OSError:
        # an unreadable input fails the merge itself, with a better message; a state that cannot be
        # written leaves the interrupted run unprovable, so a resume starts over
        pass


def identify_files(files: Sequence[str]) -> dict[str, str]:
    """file -> its identity (`digest.file_identity`)."""
    return {f: file_identity(f) for f in files}


def hash_files(files: Sequence[str]) -> dict[str, str]:
    """file -> digest of its bytes (`digest.new_digest`)."""
    return {f: file_digest(Path(f)) for f in files}


@dataclass
class PartialOutput:
    """`.NAME.partial` while this process holds its lock."""

    out: Path
    path: Path
    fd: int
    state: dict = field(default_factory=dict)
    state_name: str = STATE_FILE  # another rank of a distributed merge keeps its own (RANK_STATE)
    lock: threading.Lock = field(default_factory=threading.Lock)
    filling: bool = True  # False once it is being renamed into place or removed: no more state

    def save_state(self, **changes) -> None:
        with self.lock:
            if not self.filling:
                return  # a late update (a shard's record) after the output was finished or removed
            self.state.update(changes)
            tmp = self.path / (self.state_name + ".tmp")
            tmp.write_text(json.dumps(self.state))
            os.replace(tmp, self.path / self.state_name)  # a kill mid-write leaves the previous state, never a torn one

    def finished(self) -> None:
        """No state is written from now on."""
        with self.lock:
            self.filling = False

    def remove(self) -> None:
        """Delete the temporary output (it is ours: we hold its lock) and let the lock go."""
        self.finished()
        _empty_dir(self.path)
        try:
            os.rmdir(self.path)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _empty_dir(directory: Path) -> None:
    for entry in os.scandir(directory):
        p = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except OSError:
                pass


def open_partial(out: Path) -> PartialOutput:
    """Create or take over `.NAME.partial` and lock it; refuse when another process holds it."""
    partial = partial_dir(out)
    for _ in range(5):
        try:
            os.mkdir(partial)
        except FileExistsError:
            pass
        except OSError as e:
            raise OutputError(f"cannot create the temporary output {partial}: {e.strerror or e}") from None
        try:
            fd = os.open(partial, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue  # removed between the two calls by the process that finished with it
        except OSError:
            raise OutputError(
                f"{partial} is not a directory that mergekit-mlx made; remove it, or choose another output"
            ) from None
        failure = _lock(fd, partial, out)
        if failure is not None:
            os.close(fd)
            if failure not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(f"cannot lock the temporary output {partial}: {os.strerror(failure)}")
            raise OutputError(
                f"another mergekit-mlx process{_owner(partial)} is writing {out} (it holds {partial}); wait for it "
                "to finish or stop it, or choose another output"
            )
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(partial))
        except OSError:
            same = False
        if not same:  # renamed into place or removed by its owner while we waited: start again
            os.close(fd)
            continue
        if not _is_our_partial(partial):
            os.close(fd)
            raise OutputError(f"{partial} holds files that mergekit-mlx did not write; remove it, or choose another output")
        return PartialOutput(out, partial, fd)
    raise OutputError(f"cannot take over the temporary output {partial}: other processes keep changing it")


def _lock(fd: int, partial: Path, out: Path) -> int | None:
    """Take the exclusive lock without waiting; the errno when that failed, None when it is held."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return e.errno
        # a filesystem without locks (some network mounts): write anyway, unguarded
        warn_once(f"no-lock:{partial.parent}", f"{partial.parent} has no file locks; a second run on {out} would not be stopped")
    return None


def _owner(partial: Path) -> str:
    try:
        state = json.loads((partial / STATE_FILE).read_text())
        return f" (pid {int(state['pid'])} on {str(state.get('host', '?'))[:64]})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _start_partial(partial: PartialOutput, tmp: Path, done: dict, state: dict) -> None:
    """Empty the temporary output `tmp` of all but the kept shards `done` (an earlier run's files,
    all ours) and record this run's state in it; a failure removes it and is the output's error."""
    try:
        for entry in os.scandir(tmp):
            if entry.name not in done:
                (shutil.rmtree if entry.is_dir(follow_symlinks=False) else os.unlink)(entry.path)
        partial.state = {"tool": "mergekit-mlx", "pid": os.getpid(), "host": socket.gethostname(), **state, "shards": dict(done)}
        partial.save_state()
    except OSError as e:
        partial.remove()
        raise OutputError(f"cannot write the temporary output {tmp}: {e.strerror or e}") from None


def _kept_shards(partial: PartialOutput, fingerprint: str, files: list[str]) -> tuple[dict[str, str], dict[str, str] | None, str]:
    """Shards of an interrupted run that may be kept, the inputs' identities now, and why none are kept."""
    if not (partial.path / STATE_FILE).exists():
        return {}, None, ""  # no interrupted run: nothing to resume, nothing to say
    try:
        state = json.loads((partial.path / STATE_FILE).read_text())
        shards, inputs = state["shards"], state.get("inputs")
        if state.get("fingerprint") != fingerprint:
            return {}, None, "the recipe or the options differ from the interrupted run's"
        # a distributed merge's other ranks recorded their shards, and identified their inputs, beside it
        rank_shards, rank_inputs = _rank_records(partial.path, fingerprint)
        shards = {**rank_shards, **shards}
        inputs = {**rank_inputs, **inputs} if isinstance(inputs, dict) else (rank_inputs or None)
        if not shards:
            return {}, None, ""
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}, None, "its state file is missing or cut short"
    if not isinstance(inputs, dict) or sorted(inputs) != sorted(files):
        # (another set of input files changes the fingerprint: here some rank had not recorded its own)
        return {}, None, "the interrupted run had not recorded all its inputs"
    if not all(is_identity(v) for v in inputs.values()):
        return {}, None, "the interrupted run recorded its inputs' content hashes (an earlier mergekit-mlx), not their identities"
    try:
        now = identify_files(files)
    except OSError:
        return {}, None, "an input cannot be read"
    changed = [f for f in files if now[f] != inputs[f]]
    if changed:
        return {}, now, f"{changed[0]} has changed since the interrupted run ({len(changed)} input file(s) differ)"
    kept = {
        f: h
        for f, h in shards.items()
        if isinstance(f, str)
        and _plain_name(f)
        and not f.startswith(".")
        and (partial.path / f).is_file()
        and file_digest(partial.path / f) == h
    }
    return kept, now, ""


def _rank_records(directory: Path, fingerprint: str) -> tuple[dict[str, str], dict[str, str]]:
    """The shards that the other ranks of an interrupted distributed merge recorded, and the input
    files they identified (their states of the same fingerprint)."""
    shards: dict[str, str] = {}
    inputs: dict[str, str] = {}
    for path in sorted(directory.glob(RANK_STATE.format(rank="*"))):
        try:
            state = json.loads(path.read_text())
            if state.get("fingerprint") == fingerprint and isinstance(state.get("shards"), dict):
                shards.update(state["shards"])
                inputs.update(state.get("inputs") or {})
        except (OSError, ValueError, TypeError, AttributeError):
            continue  # a rank killed while writing it: its shards are merged again
    return shards, inputs


# ---------------- the lifecycle ----------------


@dataclass(frozen=True)
class OutputJob:
    """What one command asks to be written: tensors, config, inputs, and the files beside the weights."""

    tensors: list[OutputTensor]
    config: dict
    inputs: Sequence[tuple[str, Path]]  # (name the user gave, path) of every input model
    input_files: list[str]  # every file a tensor is read from (for the resume proof)
    fingerprint: dict  # what a resumed run must share with the interrupted one, besides the inputs
    tokenizer_dir: Path | None = None  # the model whose tokenizer a GGUF output embeds
    side_files: Callable[[Path], None] | None = None  # writes tokenizer files, card, ... into a directory
    verify: Callable[[Path], None] | None = None  # reads back a written hf directory
    # a writer outside the --out-format table (an adapter's), made for the temporary directory: its
    # output is a directory, never resumed, its size not checked up front
    writer: Callable[[Path], Writer] | None = None
    # the input files an output tensor is read from: a rank of a distributed merge identifies only
    # those of its own tensors (None: rank 0 identifies every input file)
    files_of: Callable[[str], Sequence[str]] | None = None


def write_model(job: OutputJob, out: Path, opts: MergeOptions, produce: Produce, world: World | None = None) -> Path:
    """Write a model through the lifecycle (see the module's docstring); returns the output path.
    With a `world` of several processes, each writes its share of the shards (`_write_across_ranks`)."""
    if world is not None and not world.alone:
        return _write_across_ranks(job, out, opts, produce, world)
    out = _absolute(out)
    fingerprint = _fingerprint(job, opts)
    fmt = writer_class(opts.out_format) if job.writer is None else None
    single_file = fmt is not None and fmt.single_file and out.suffix.lower() == Path(fmt.file_name).suffix
    resumable = fmt is not None and fmt.resumable
    partial = _claim_output(out, job, opts, check_space=fmt is not None)
    try:
        return _fill_and_commit(job, out, opts, produce, partial, fingerprint, single_file, resumable)
    finally:
        partial.close()


def _claim_output(out: Path, job: OutputJob, opts: MergeOptions, check_space: bool) -> PartialOutput:
    """Before anything is written: the output's place checked (and its free space, for a format
    whose size is known up front), its parent folders made, and its `.NAME.partial` taken, locked."""
    check_output_location(out, job.inputs, force=opts.force, resume=opts.resume)
    if check_space:
        _check_free_space(out, job, opts)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out.parent}: {e.strerror or e}") from None
    return open_partial(out)


def _fill_and_commit(job, out, opts, produce, partial: PartialOutput, fingerprint, single_file, resumable) -> Path:
    tmp = partial.path
    done: dict[str, str] = {}
    digests: dict[str, str] | None = None
    if opts.resume and resumable:
        done, digests, why = _kept_shards(partial, fingerprint, job.input_files)
        if why:
            print(f"mergekit-mlx: not resuming: {why}; merging everything again", file=sys.stderr)
    _start_partial(partial, tmp, done, {"fingerprint": fingerprint, "inputs": digests})
    try:
        if job.writer is not None:
            writer = job.writer(tmp)
        else:
            writer = _writer(job, tmp, opts, skip=set(done) if resumable else None)
        wants = getattr(writer, "wants", lambda name: True)
        shards = len(getattr(writer, "files", ())) if resumable else 0
        if digests is None and shards > 1:
            # (one shard is finished only at the end: nothing a resume could keep, nothing to prove)
            prove_inputs(list(job.input_files), lambda ids: partial.save_state(inputs=ids))
        # safetensors-based outputs resume shard by shard, GGUF does not
        produce(_ShardWrites(writer, tmp, done, partial.save_state if resumable else None), wants)
        writer.finish()
        if job.side_files is not None and not single_file:
            job.side_files(tmp)
        if job.verify is not None and writer.verifiable:
            job.verify(tmp)
        partial.finished()
        os.unlink(tmp / STATE_FILE)
        if single_file:
            _commit_file(tmp / writer.file_name, out, opts.force)
            partial.remove()
        else:
            _write_manifest(tmp)
            _commit_dir(partial, out, opts.force)
    except MergeKitError:
        partial.remove()  # a merge that failed cannot be resumed
        raise
    except (OSError, RuntimeError) as e:
        failure = _write_failure(e, out, job)
        if failure is None:
            raise  # an unexpected error: keep the partial output, as after an interruption
        partial.remove()
        raise failure from None
    return out


# ---------------- the lifecycle across the ranks of a distributed merge ----------------


def _write_across_ranks(job: OutputJob, out: Path, opts: MergeOptions, produce: Produce, world: World) -> Path:
    """write_model on the ranks of `world` (mlx.launch): one output, as one process writes it.

    Rank 0 checks the output, takes `.NAME.partial` and its lock, keeps what a resume may keep and
    tells the others. Every rank lays the shards out as one process would (the writer's layout from
    the plan), takes its contiguous run of the shards not finished yet (`distributed.deal_shards`),
    merges only their tensors (so reads only their inputs), writes them into the same
    `.NAME.partial` (the ranks share its filesystem: checked by a token rank 0 leaves there) and
    records them, with the identities of the input files they read, in its own state file; its
    heartbeat there lets the others see it is alive (`distributed.Heartbeat`). Once every rank
    reported its shards, rank 0 writes the index, config, tokenizer and card, verifies, and renames
    the directory into place; then every rank returns. A rank's error is every rank's error
    (`distributed.agree`): a recipe or input error removes `.NAME.partial`, as for one process; a
    rank lost (killed, crashed, silent for the rank timeout) keeps it, with every shard finished so
    far, for `--resume` (with any number of processes)."""
    fmt = writer_class(opts.out_format) if job.writer is None else None
    if fmt is None or not fmt.resumable:
        raise OutputError(
            f"--out-format {opts.out_format}: this output is one file written by one process; several processes "
            "(mlx.launch) split a merge by its safetensors shards (hf, the mlx-q formats, bitnet): run it without mlx.launch"
        )
    out = _absolute(out)
    tmp = partial_dir(out)
    fingerprint = _fingerprint(job, opts)
    rank0 = world.rank == 0
    partial = PartialOutput(out, tmp, -1, state_name=RANK_STATE.format(rank=world.rank))
    heartbeat: distributed.Heartbeat | None = None

    def start() -> dict:
        """Rank 0: the checks, the lock, the shards a resume keeps, a clean state."""
        nonlocal partial
        if not rank0:
            return {}
        partial = _claim_output(out, job, opts, check_space=True)
        done, digests, why = _kept_shards(partial, fingerprint, job.input_files) if opts.resume else ({}, None, "")
        if why:
            print(f"mergekit-mlx: not resuming: {why}; merging everything again", file=sys.stderr)
        token = os.urandom(16).hex()
        # an earlier run's files go (other ranks' states and markers too)
        _start_partial(partial, tmp, done, {"ranks": world.size, "token": token, "fingerprint": fingerprint, "inputs": digests})
        return {"done": done, "proven": digests is not None, "token": token}

    def check_shared() -> None:
        """Every rank sees the `.NAME.partial` rank 0 made (its token), or the ranks stop here."""
        if not rank0 and _state_token(tmp) != shared["token"]:
            raise OutputError(
                f"{tmp}: {world.describe()} on {socket.gethostname()} does not see the temporary output that rank 0 "
                "made there; the processes of a distributed merge must share the output's filesystem (one host, or a "
                "network filesystem mounted at the same path on every host)"
            )

    def fill() -> dict[str, str]:
        """Every rank: its shards, merged and written; returns them (name -> digest)."""
        nonlocal heartbeat
        heartbeat = distributed.Heartbeat(tmp, world)  # while the ranks work, each sees the others are alive
        done = shared["done"]
        layout = _writer(job, tmp, opts, skip=set(done))
        todo = [(f, sum(t.nbytes for t in shard)) for f, shard in zip(layout.files, layout.shards) if f not in done]
        mine = set(distributed.deal_shards(todo, world.size)[world.rank])
        writer = _writer(job, tmp, opts, skip=set(layout.files) - mine)
        recorded = dict(done) if rank0 else {}
        if not rank0:
            partial.state = {
                "tool": "mergekit-mlx",
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "rank": world.rank,
                "fingerprint": fingerprint,
                "shards": {},
            }
            partial.save_state()
        if not shared["proven"] and len(layout.files) > 1:  # (a resume's inputs were identified by rank 0)
            prove_inputs(_files_to_prove(job, writer, rank0), lambda ids: partial.save_state(inputs=ids))
        watch = distributed.FailureWatch(tmp, world)
        # another rank failed: this one stops at its next tensor rather than after its shards
        produce(_ShardWrites(writer, tmp, recorded, partial.save_state, before=watch.check), writer.wants)
        if rank0:
            writer.finish()  # its shards, the index and the config
        else:
            writer.close_shards()
        for f in writer.written:  # the last shard is closed last, without a running checksum
            if f not in recorded:
                recorded[f] = file_digest(tmp / f)
        partial.save_state(shards=dict(recorded))
        return {f: recorded[f] for f in writer.written}

    def commit() -> None:
        """Rank 0, once every rank has written its shards: the rest, verified, renamed into place."""
        if not rank0:
            return
        shards = dict(shared["done"])
        for written in finished:
            shards.update(written)
        partial.save_state(shards=shards)  # one record of every shard, should the commit fail
        for entry in os.scandir(tmp):
            if entry.name.startswith((".mergekit-mlx-state.rank", ".mergekit-mlx-failed.rank", ".mergekit-mlx-alive.rank")):
                os.unlink(entry.path)
        if job.side_files is not None:
            job.side_files(tmp)
        if job.verify is not None and writer_class(opts.out_format).verifiable:
            job.verify(tmp)
        partial.finished()
        os.unlink(tmp / STATE_FILE)
        _write_manifest(tmp)
        _commit_dir(partial, out, opts.force)

    def arrive() -> None:
        """Wait for the other ranks asleep, not in MLX's all_gather; no beat after this."""
        if heartbeat is not None:
            try:
                heartbeat.arrived()
            finally:
                heartbeat.close()

    keeps = f"{tmp} keeps the shards finished so far: rerun the same command with --resume (with any number of processes) to finish it"
    try:
        with distributed.stop_on_sigterm(world, keeps):
            shared = distributed.agree(world, start)[0]
            distributed.agree(world, check_shared)
            marked = lambda e: distributed.mark_failure(tmp, world, e)  # noqa: E731 - the others stop early
            finished = distributed.agree(world, _as_write_failure(fill, out, job), on_failure=marked, before_exchange=arrive)
            distributed.agree(world, _as_write_failure(commit, out, job))
    except RunInterrupted as e:
        distributed.settle(world, e)
        raise RunInterrupted(f"{e}; {keeps}") from None
    except MergeKitError as e:
        if rank0 and partial.fd >= 0:
            partial.remove()  # a merge that failed cannot be resumed (as for one process)
        distributed.settle(world, e)  # no rank ends (and has mlx.launch stop the others) before that
        raise
    finally:
        if heartbeat is not None:
            heartbeat.close()
        partial.close()
    return out


class _ShardWrites:
    """The `write(name, array)` a producer calls: the tensor to the writer, and each shard the
    writer finishes recorded (name -> digest, into `done`) with `save_state(shards=...)`, for a
    resume. It may be called from several threads for tensors of different lanes, when the writer
    writes shards side by side: `lanes`, `lane`, `position` and `takes_device_tensors` are the
    writer's (pipeline.run_plan)."""

    def __init__(
        self,
        writer: Writer,
        directory: Path,
        done: dict[str, str],
        save_state: Callable[..., None] | None,
        before: Callable[[], None] | None = None,
    ):
        self.writer, self.directory, self.done, self.save_state, self.before = writer, directory, done, save_state, before
        self.lanes = getattr(writer, "lanes", 1)
        self.takes_device_tensors = getattr(writer, "takes_device_tensors", False)
        self.lock = threading.Lock()

    def lane(self, name: str) -> int:
        return self.writer.lane(name)

    def position(self, name: str):
        return self.writer.position(name)

    def __call__(self, name: str, array: mx.array) -> None:
        if self.before is not None:
            self.before()
        self.writer.add(name, array)
        if self.save_state is None:
            return
        with self.lock:
            new = [f for f in self.writer.written if f not in self.done]
            for f in new:
                self.done[f] = self.writer.checksums.get(f) or file_digest(self.directory / f)
            if new:
                self.save_state(shards=dict(self.done))


def _files_to_prove(job: OutputJob, writer: Writer, rank0: bool) -> list[str]:
    """The input files a rank identifies for the resume proof: those its own tensors are read from (it
    reads them anyway); rank 0 also those no output tensor reads. Together: every input file."""
    if job.files_of is None:
        return list(job.input_files) if rank0 else []
    mine = {f for t in job.tensors if writer.wants(t.name) for f in job.files_of(t.name)}
    if rank0:
        read = {f for t in job.tensors for f in job.files_of(t.name)}
        mine |= set(job.input_files) - read
    return sorted(mine)


def _as_write_failure(step: Callable[[], object], out: Path, job: OutputJob) -> Callable[[], object]:
    """`step`, with a failed write (disk full, no permission) raised as the OutputError that names it."""

    def run():
        try:
            return step()
        except (OSError, RuntimeError) as e:
            failure = _write_failure(e, out, job)
            if failure is None:
                raise
            raise failure from None

    return run


def _writer(job: OutputJob, directory: Path, opts: MergeOptions, skip: set[str] | None) -> Writer:
    """The writer of the output format `opts` names, skipping the shards `skip` (None: a format that
    does not resume shard by shard)."""
    return make_writer(
        opts.out_format,
        directory,
        job.tensors,
        job.config,
        max_shard_bytes=opts.out_shard_size,
        tokenizer_dir=job.tokenizer_dir,
        skip_shards=skip,
        group_size=opts.group_size,
    )


def _state_token(directory: Path) -> str | None:
    """The token rank 0 left in the state of `.NAME.partial` (None when it cannot be read from here)."""
    try:
        return json.loads((directory / STATE_FILE).read_text()).get("token")
    except (OSError, ValueError, AttributeError):
        return None


def _fingerprint(job: OutputJob, opts: MergeOptions) -> str:
    text = json.dumps(
        {
            **job.fingerprint,
            "shard": opts.out_shard_size,
            "format": opts.out_format,
            "group_size": opts.group_size,
            "inputs": sorted(job.input_files),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _write_manifest(directory: Path) -> None:
    files = {e.name: e.stat(follow_symlinks=False).st_size for e in os.scandir(directory) if e.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"tool": "mergekit-mlx", "files": files}, indent=1, sort_keys=True) + "\n")


def _recheck_before_commit(out: Path, force: bool) -> None:
    """The output may have appeared while merging (another run, the user): the same rules again."""
    if not os.path.lexists(out):
        return
    why = "already exists" if not force else _not_ours(out)
    if why:
        raise OutputError(
            f"output {out} {why} (it appeared while merging); nothing was replaced; --force replaces only an "
            "output that mergekit-mlx wrote"
        )


def _commit_dir(partial: PartialOutput, out: Path, force: bool) -> None:
    _recheck_before_commit(out, force)
    replacing = os.path.lexists(out) and os.path.isdir(out) and not os.path.islink(out) and os.listdir(out)
    if replacing and _exchange(partial.path, out):
        # one step: OUT is the new output and `.NAME.partial` the previous one, never neither
        partial.close()
        _remove_our_output(partial.path)
        partial.path = out
        return
    # a non-empty directory, or one of our GGUF files replaced by a directory, is moved aside first;
    # an empty directory is replaced by the rename itself
    aside = _move_aside(out) if replacing or (os.path.lexists(out) and not os.path.isdir(out)) else None
    try:
        os.replace(partial.path, out)
    except OSError:
        if aside is not None:
            os.rename(aside, out)  # put the previous output back
        raise
    partial.path = out
    partial.close()
    if aside is not None:
        _remove_our_output(aside)


def _move_aside(out: Path) -> Path:
    aside = out.parent / f".{out.name}.replaced-{os.getpid()}"
    os.rename(out, aside)
    return aside


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 with RENAME_EXCHANGE); False where the system
    or the filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _commit_file(written: Path, out: Path, force: bool) -> None:
    _recheck_before_commit(out, force)
    if os.path.isdir(out) and not os.path.islink(out):
        aside = _move_aside(out)
        os.replace(written, out)
        _remove_our_output(aside)
    else:
        os.replace(written, out)  # over one of our GGUF files, atomically


def _remove_our_output(path: Path) -> None:
    """Delete a previous output moved aside: only the files its manifest lists, then the folder if empty."""
    if os.path.isfile(path) and not os.path.islink(path):
        os.unlink(path)  # one of our GGUF files (checked before it was moved)
        return
    for name in [*(_manifest_files(path) or {}), MANIFEST]:
        try:
            os.unlink(path / name)
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError:
        pass  # something else is in it now: it stays, under its aside name


def _check_free_space(out: Path, job: OutputJob, opts: MergeOptions) -> None:
    """Refuse to start a safetensors output that cannot fit on its device (the dry-run estimate)."""
    if not writer_class(opts.out_format).known_size or opts.resume:
        return  # quantized and GGUF sizes are not known exactly before writing; a resume keeps shards
    need = sum(t.nbytes for t in job.tensors)
    device = out.parent
    while not device.exists() and device != device.parent:
        device = device.parent  # the output's parents are created later, on the same device
    try:
        free = shutil.disk_usage(device).free
    except OSError:
        return
    if free < need:
        raise OutputError(
            f"not enough free space for {out}: this needs about {human_bytes(need)} "
            f"(the dry-run estimate of bytes written) and the device has {human_bytes(free)} free"
        )


def _write_failure(e: BaseException, out: Path, job: OutputJob) -> OutputError | None:
    """An OutputError for a failed write (disk full, no permission, I/O error), else None."""
    if isinstance(e, OSError):
        what = "no space left on the device" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
        if e.filename and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            what = f"{what} ({e.filename})"
    elif isinstance(e, RuntimeError) and str(e).startswith(MLX_WRITE_ERRORS):
        what = str(e).rstrip(".")
    else:
        return None
    try:
        free = f"; the device has {human_bytes(shutil.disk_usage(out.parent).free)} free"
    except OSError:
        free = ""
    need = sum(t.nbytes for t in job.tensors)
    return OutputError(
        f"cannot write {out}: {what}. This needs about {human_bytes(need)} of free space "
        f"(the dry-run estimate){free}. The partial output was removed."
    )


# ---------------- a merge's output ----------------


def merge_job(plan: Plan, opts: MergeOptions) -> OutputJob:
    """The output job of a merge plan: its tensors, config, tokenizer and card."""
    inputs = [(ref, p) for ref, m in zip(plan.model_paths, plan.models) for p in m.input_paths()]
    files = {str(i.file) for m in plan.models for i in (m.info(n) for n in m.tensor_names()) if i.file}
    # and the files an input names itself: a GGUF file read whole, an adapter's config and weights
    files = sorted(files | {str(p) for _, p in inputs if Path(p).is_file()})
    read_from = {t.out.name: sorted({str(f) for m, n in t.inputs if (f := plan.models[m].info(n).file)}) for t in plan.tasks}

    def side_files(directory: Path) -> None:
        if opts.copy_tokenizer and writer_class(opts.out_format).copies_tokenizer:
            write_tokenizer(plan, directory)
        (directory / "README.md").write_text(model_card(plan))

    return OutputJob(
        tensors=plan.outputs,
        config=plan.config,
        inputs=inputs,
        input_files=files,
        fingerprint={"recipe": plan.recipe.model_dump(mode="json"), "seed": opts.random_seed},
        tokenizer_dir=_tokenizer_source_dir(plan),
        side_files=side_files,
        verify=lambda directory: verify_output(directory, plan),
        files_of=lambda name: read_from.get(name, ()),
    )


def write_output(plan: Plan, out: Path, opts: MergeOptions, produce: Produce, world: World | None = None) -> Path:
    """Write a merge's output through the lifecycle (by every rank of `world`, when it has several)."""
    return write_model(merge_job(plan, opts), out, opts, produce, world)


def verify_output(directory: Path, plan: Plan) -> None:
    """Read back what was written, headers only: every planned tensor, in its shape and dtype."""
    from .formats.files import read_config
    from .formats.safetensors import SafetensorsModel

    written = SafetensorsModel(directory, read_config(directory))
    for t in plan.outputs:
        info = written.info(t.name) if written.has(t.name) else None
        if info is None or info.shape != tuple(t.shape) or info.dtype != safetensors_code(t.dtype):
            got = "missing" if info is None else f"{list(info.shape)} {info.dtype}"
            raise OutputError(
                f"verifying {directory} failed: tensor {t.name} should be {list(t.shape)} "
                f"{safetensors_code(t.dtype)}, found {got}; nothing was renamed into place"
            )


def _tokenizer_source_dir(plan: Plan) -> Path | None:
    if plan.tokenizer_model is None:
        return None
    return plan.models[plan.tokenizer_model].tokenizer_dir


def write_tokenizer(plan: Plan, out_dir: Path) -> None:
    """The tokenizer files: built by the vocabulary plan, or copied from the tokenizer's model."""
    if plan.vocab is not None:
        plan.vocab.save(out_dir)  # also applies the recipe's chat_template
        return
    src = _tokenizer_source_dir(plan)
    if src is not None:
        copy_side_files(src, out_dir)
    if plan.recipe.chat_template:
        apply_chat_template(out_dir, plan.recipe.chat_template, plan.models)


def model_card(plan: Plan) -> str:
    models = "\n".join(f"- {p}" for p in plan.model_paths)
    return (
        "---\nlibrary_name: mlx\ntags:\n- mergekit\n- mergekit-mlx\n- merge\n---\n"
        f"# Merged model\n\nThis model was made with mergekit-mlx using the **{plan.method.name}** merge method.\n\n"
        f"## Models merged\n\n{models}\n\n"
        f"## Configuration\n\nThe recipe that produced it:\n\n```yaml\n{plan.recipe.to_yaml()}\n```\n"
    )
