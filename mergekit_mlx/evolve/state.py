"""The search folder: what a search writes, how it is checkpointed, and what may be replaced.

OUT holds `state.json` (the checkpoint: settings, fingerprint, input hashes and every candidate of
every generation, with its genotype), `candidates.jsonl` (one line per candidate: generation,
parameters, scores, fitness, seconds), `best.yml` (the best recipe so far), `fitness.png` and, when
the search ends, `model/` (the best merge, written through the output lifecycle). Every file is
written to a temporary name and renamed into place, so a kill leaves the previous checkpoint whole.
The checkpoint is written after each generation; a killed search loses the generation it was in.

The optimiser's state is not serialised: it is the seed and the history. A resumed search replays
the recorded generations through a fresh optimiser with the same seed (no candidate is merged or
scored again), which gives the state it had, and goes on from there. (On another machine, whose
linear algebra may round differently, the replay warns when it draws other samples than recorded.)

OUT is refused when it holds anything else than these files; a search's files are replaced only
with `force` (the model, through the lifecycle's own rules, only once the new search has one). One
search at a time per folder: OUT is locked while a search runs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import OutputError

TOOL = "mergekit-mlx evolve"
STATE = "state.json"
LOG = "candidates.jsonl"
BEST = "best.yml"
PLOT = "fitness.png"
MODEL = "model"
FILES = (STATE, LOG, BEST, PLOT)
# besides FILES: the model and what the output lifecycle keeps beside it while writing it
OTHER_NAMES = (MODEL, f".{MODEL}.partial")


def write_atomically(path: Path, data: bytes) -> None:
    """Write `path` through a temporary sibling renamed over it: never a torn file."""
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_state(out: Path) -> dict[str, Any] | None:
    """The checkpoint in OUT, or None when there is none; an unreadable one is an error."""
    path = out / STATE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OutputError(f"{path}: cannot read the search's checkpoint ({e}); start over with --force") from None
    if not isinstance(state, dict) or state.get("tool") != TOOL:
        raise OutputError(f"{path} was not written by {TOOL}; choose another output folder")
    return state


def ours(name: str) -> bool:
    return (
        name in FILES or name in OTHER_NAMES or (name.startswith(".") and name.endswith(".tmp")) or name.startswith(f".{MODEL}.")
    )


class SearchFolder:
    """OUT, checked and locked for one search (see the module's docstring)."""

    def __init__(self, out: Path, *, resume: bool, force: bool):
        """Check OUT and read the checkpoint to resume; nothing is created or changed yet (`open`)."""
        self.out = Path(os.path.abspath(os.path.expanduser(out)))
        self.fd = -1
        self.resume = resume
        self._check(resume, force)
        self.state = read_state(self.out) if resume else None
        self.read = json.dumps(self.state)  # the checkpoint as read, for `open` to check it is still the same
        if resume and self.state is None:
            raise OutputError(f"{self.out} holds no search to resume; run without --resume to start one")

    def open(self) -> None:
        """Create and lock OUT once the search is checked; a fresh search removes an earlier one's
        files (--force; its model stays until the new search writes its own)."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock()
        if self.resume and json.dumps(read_state(self.out)) != self.read:
            raise OutputError(f"the search in {self.out} changed while this one started; run the command again")
        if not self.resume:
            for name in FILES:
                try:
                    os.unlink(self.out / name)
                except FileNotFoundError:
                    pass

    def _check(self, resume: bool, force: bool) -> None:
        out = self.out
        if not os.path.lexists(out):
            return
        st = os.lstat(out)
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"output {out} exists and is not a folder; choose another output location")
        names = os.listdir(out)
        foreign = sorted(n for n in names if not ours(n))
        if foreign:
            raise OutputError(
                f"output {out} holds files that mergekit-mlx evolve did not write ({', '.join(foreign[:3])}); "
                "choose another output folder"
            )
        if not names:
            return
        state = read_state(out)
        if state is None:
            if resume:
                raise OutputError(f"{out} holds no search to resume; run without --resume to start one")
            if not force:
                raise OutputError(f"output {out} already exists; pass --force to replace it")
            return
        if resume:
            return
        if not force:
            done = sum(len(g) for g in state.get("generations", []))
            what = "a finished search" if state.get("finished") else f"an interrupted search ({done} candidates scored)"
            raise OutputError(
                f"output {out} holds {what}; pass --resume to continue it (a larger --max-fevals extends a finished one) "
                "or --force to start over"
            )

    def _lock(self) -> None:
        self.fd = os.open(self.out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(self.fd)
                self.fd = -1
                raise OutputError(
                    f"another search is running in {self.out}; wait for it, or choose another output folder"
                ) from None
            # a filesystem without locks: search anyway, unguarded

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def save(self, state: dict[str, Any], log_lines: list[str]) -> None:
        """The checkpoint, then the log it holds (each atomically)."""
        self.state = state
        write_atomically(self.out / STATE, json.dumps(state).encode())
        write_atomically(self.out / LOG, "".join(line + "\n" for line in log_lines).encode())

    def write_best(self, text: str) -> None:
        write_atomically(self.out / BEST, text.encode())

    def write_plot(self, png: bytes) -> None:
        write_atomically(self.out / PLOT, png)
