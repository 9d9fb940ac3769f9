"""Several processes, one merge or one search, on MLX's distributed runtime (`mlx.launch`).

This module knows who the processes are and how they talk; what they do is decided by the output
lifecycle (output.py: each rank writes its own shards, rank 0 the rest) and by the search
(evolve/search.py: each rank scores its share of a generation). No scheduler of our own: the
processes are started by `mlx.launch` (ring over TCP, MPI, NCCL on NVIDIA, JACCL) and talk only
through `mx.distributed.all_gather`, of JSON texts carried as uint8 arrays.

Every exchange is an agreement (`agree`): each rank runs its step, then every rank learns every
rank's outcome. A step that failed on one rank raises on every rank: the failing rank's own error
there, the same error class naming that rank elsewhere. A rank that is gone (killed, crashed)
makes the exchange fail on the others (the ring backend reports the lost connection at once),
which raises `RunInterrupted`: the run stops, and what it finished is kept for `--resume`. Where
the ranks share a folder (a merge's `.NAME.partial`), they wait for each other on heartbeats there
before an exchange (`Heartbeat`): asleep rather than polling inside MLX's collective, and a rank
that hangs without dying (or dies under a backend that does not notice, NCCL) stops the others
after MERGEKIT_MLX_RANK_TIMEOUT seconds. A search's ranks share no folder and wait in MLX's
collective.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

import mlx.core as mx
import numpy as np

from .errors import MergeKitError, ModelError, OutputError, RecipeError, RunInterrupted, warn_once

# the environment each launcher sets -> the backend it started (mlx.launch's ring, nccl and jaccl
# set MLX_RANK with their own variables; mpirun sets its own)
LAUNCHERS = (
    ("MLX_HOSTFILE", "ring"),
    ("NCCL_HOST_IP", "nccl"),
    ("MLX_JACCL_COORDINATOR", "jaccl"),
    ("OMPI_COMM_WORLD_SIZE", "mpi"),
    ("PMI_SIZE", "mpi"),
)
# errors a rank's failure is raised as on the other ranks (by class name); others: RunInterrupted
SHARED_ERRORS = {cls.__name__: cls for cls in (RecipeError, ModelError, OutputError, RunInterrupted)}
PEER_STOPPED = "stopped"  # the outcome of a rank that stopped because another one failed
AGREED = "mergekit_mlx_agreed"  # set on an exception every rank raised at the same exchange
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """The processes of one run: this one's rank, how many there are, and how they talk."""

    rank: int = 0
    size: int = 1
    backend: str = ""  # "" when this process runs alone
    group: Any = None  # mx.distributed.Group, when size > 1

    @property
    def alone(self) -> bool:
        return self.size == 1

    def describe(self, rank: int | None = None) -> str:
        return f"rank {self.rank if rank is None else rank} of {self.size}"


ALONE = World()


@cache
def world() -> World:
    """This process's world: several ranks when started by `mlx.launch` (or mpirun), else ALONE.

    Joining the others is done once per process; an mlx.launch environment that MLX cannot join
    (a port in use, a host that cannot be reached) is a RunInterrupted error. MPI's variables are
    also set by job schedulers for programs that are not MPI jobs: where MLX cannot start MPI,
    this process runs alone (with a warning)."""
    backend = next((name for var, name in LAUNCHERS if os.environ.get(var)), None)
    if backend is None:
        return ALONE
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except (RuntimeError, ValueError) as e:
        if backend == "mpi":
            warn_once("mpi", f"MPI's environment is set but MLX cannot start MPI ({e}); this process runs alone")
            return ALONE
        raise RunInterrupted(
            f"this process was started by a launcher for MLX's {backend} backend (mlx.launch) but could not join the "
            f"others: {e}. Check the hosts and ports given to mlx.launch, or run without it"
        ) from None
    if group.size() == 1:
        return ALONE
    return World(rank=group.rank(), size=group.size(), backend=backend, group=group)


def gather_json(w: World, value: Any) -> list[Any]:
    """Every rank's `value` (JSON-able), in rank order, on every rank."""
    if w.alone:
        return [value]
    data = np.frombuffer(json.dumps(value, separators=(",", ":")).encode(), dtype=np.uint8)
    # NCCL gathers device arrays; the other backends run on the CPU
    stream = mx.gpu if w.backend == "nccl" else mx.cpu
    try:
        lengths = mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int32), group=w.group, stream=stream)
        longest = int(mx.max(lengths).item())
        padded = np.zeros(max(longest, 1), dtype=np.uint8)
        padded[: len(data)] = data
        gathered = mx.distributed.all_gather(mx.array(padded), group=w.group, stream=stream)
        mx.eval(gathered)
    except RuntimeError as e:
        lost = RunInterrupted(
            f"{w.describe()}: another process of this run is gone ({e}; MLX's {w.backend} backend); the run stopped"
        )
        setattr(lost, AGREED, True)  # every rank still running meets the same loss
        raise lost from None
    rows = np.array(gathered).reshape(w.size, -1)
    return [json.loads(rows[r, : int(n)].tobytes().decode()) for r, n in enumerate(np.array(lengths).tolist())]


class PeerStopped(Exception):
    """Raised inside a rank's step when another rank has left its failure marker (`FailureWatch`)."""


def agree(
    w: World,
    step: Callable[[], Any],
    *,
    on_failure: Callable[[BaseException], None] | None = None,
    before_exchange: Callable[[], None] | None = None,
) -> list[Any]:
    """Run `step` here, then learn every rank's outcome: the values of all steps, in rank order.

    When a step failed anywhere, every rank raises: the failing rank its own exception, the
    others that rank's error class (a MergeKitError of errors.py, else RunInterrupted) with a
    message naming the rank. `on_failure(e)` runs before the exchange when this rank's step
    failed (to tell the others early: `mark_failure`); `before_exchange()` before the exchange (to
    wait without polling: `Heartbeat.arrived`). Interrupts (Ctrl-C) are not caught. A step may hold
    exchanges of its own; when one of those failed, every rank knows it already and this exchange
    is skipped."""
    own: Exception | None = None
    try:
        outcome = {"ok": True, "value": step()}
    except Exception as e:
        if getattr(e, AGREED, False):
            raise
        own = e
        outcome = _failure(e)
        if on_failure is not None and not isinstance(e, PeerStopped):
            on_failure(e)
    if before_exchange is not None:
        before_exchange()
    outcomes = gather_json(w, outcome)
    failed = [(r, o) for r, o in enumerate(outcomes) if not o["ok"] and o["type"] != PEER_STOPPED]
    if not failed and own is None:
        return [o["value"] for o in outcomes]
    if not failed:  # a marker that no rank's outcome explains
        error: Exception = RunInterrupted(f"{w.describe()}: stopped because another process reported a failure")
    elif failed[0][0] == w.rank and own is not None:
        error = own
    else:
        rank, o = failed[0]
        cls = SHARED_ERRORS.get(o["type"], RunInterrupted)
        error = cls(f"{w.describe(rank)} (pid {o.get('pid')} on {o.get('host')}) failed: {o['message']}")
    setattr(error, AGREED, True)
    raise error


def _failure(e: Exception) -> dict:
    """A failed step's outcome, as the other ranks learn it."""
    if isinstance(e, PeerStopped):
        return {"ok": False, "type": PEER_STOPPED, "message": ""}
    if isinstance(e, MergeKitError):
        kind, message = type(e).__name__, str(e)
    else:
        kind, message = "unexpected", f"unexpected {type(e).__name__}: {e}"
    return {"ok": False, "type": kind, "message": message, "host": socket.gethostname(), "pid": os.getpid()}


def settle(w: World, error: BaseException) -> None:
    """After an error every rank raised at the same exchange (`agree`), wait until every rank has
    cleaned up after it: mlx.launch stops all processes as soon as one of them ends with an error.
    Nothing to wait for after an error of this rank alone, or when a rank is gone."""
    if w.alone or not getattr(error, AGREED, False):
        return
    try:
        gather_json(w, None)
    except RunInterrupted:
        pass


def together(w: World, step: Callable[[], T]) -> T:
    """Run `step` here and return its value (kept on this rank); a failure anywhere is every
    rank's, as in `agree` (the other ranks pass a step of their own, often `lambda: None`)."""
    kept: list[T] = []
    agree(w, lambda: kept.append(step()))
    return kept[0]


def deal_shards(sizes: Sequence[tuple[str, int]], size: int) -> list[list[str]]:
    """Shards (name, bytes), in order, dealt to `size` ranks as contiguous runs of about equal bytes.

    Contiguous, so that a rank reads a contiguous part of each input (output shards follow the
    layers); shard i goes to the rank whose share of the bytes holds the middle of shard i."""
    dealt: list[list[str]] = [[] for _ in range(size)]
    total = sum(b for _, b in sizes)
    before = 0
    for i, (name, nbytes) in enumerate(sizes):
        if total > 0:
            rank = int((2 * before + nbytes) * size // (2 * total))
        else:
            rank = i * size // len(sizes)
        dealt[min(rank, size - 1)].append(name)
        before += nbytes
    return dealt


def deal_items(items: Sequence[Any], w: World) -> list[Any]:
    """This rank's share of `items` (every size-th, starting at its rank): a generation's candidates."""
    return list(items[w.rank :: w.size])


# ---------------- telling the others early: failure markers in a shared folder ----------------

FAILURE_MARKER = ".mergekit-mlx-failed.rank{rank}"


def mark_failure(folder: os.PathLike, w: World, error: BaseException) -> None:
    """Leave a marker that this rank failed in `folder` (shared by the ranks), so that the others
    stop at their next check instead of finishing their work first. Best effort."""
    try:
        path = os.path.join(folder, FAILURE_MARKER.format(rank=w.rank))
        with open(path, "w") as f:
            f.write(f"{type(error).__name__}: {error}\n")
    except OSError:
        pass


class FailureWatch:
    """`check()` raises PeerStopped once another rank has left its failure marker in `folder`;
    it looks at most every `interval` seconds (a check costs one stat per rank)."""

    def __init__(self, folder: os.PathLike, w: World, interval: float = 0.5):
        self.paths = [os.path.join(folder, FAILURE_MARKER.format(rank=r)) for r in range(w.size) if r != w.rank]
        self.interval = interval
        self.last = time.monotonic()

    def check(self) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        if any(os.path.exists(p) for p in self.paths):
            raise PeerStopped


HEARTBEAT = ".mergekit-mlx-alive.rank{rank}"
BEAT_SECONDS = 1.0
DEFAULT_RANK_TIMEOUT = 120.0  # seconds without a heartbeat after which a rank counts as gone


def rank_timeout() -> float:
    """Seconds a rank may go without a heartbeat (MERGEKIT_MLX_RANK_TIMEOUT, default 120)."""
    try:
        value = float(os.environ.get("MERGEKIT_MLX_RANK_TIMEOUT", DEFAULT_RANK_TIMEOUT))
    except ValueError:
        return DEFAULT_RANK_TIMEOUT
    return value if value > 0 else DEFAULT_RANK_TIMEOUT


class Heartbeat:
    """Each rank's pulse in a folder the ranks share: a thread rewrites this rank's counter every
    second, with the number of the exchange it waits at.

    `arrived()` waits, sleeping, until every other rank waits at the same exchange (or has left
    its failure marker), instead of waiting inside MLX's all_gather: the ring backend polls there
    (about half a core here) and a rank that hangs without dying (stopped, deadlocked; or dead
    under a backend that does not notice) would keep it waiting for ever. A rank whose counter has
    not moved for `timeout` seconds is taken as gone: RunInterrupted."""

    def __init__(self, folder: os.PathLike, w: World, timeout: float | None = None):
        self.folder, self.w = folder, w
        self.timeout = rank_timeout() if timeout is None else timeout
        self.beat, self.exchange = 0, -1  # -1: working, not waiting at an exchange
        self.stopped = threading.Event()
        path = os.path.join(folder, HEARTBEAT.format(rank=w.rank))
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._write()
        self.thread = threading.Thread(target=self._run, name="mergekit-mlx-heartbeat", daemon=True)
        self.thread.start()

    def _write(self) -> None:
        self.beat += 1
        try:
            os.pwrite(self.fd, f"{self.beat:020d} {self.exchange:020d} {os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass  # a full or failing disk fails the merge itself; the others then see its marker

    def _run(self) -> None:
        while not self.stopped.wait(BEAT_SECONDS):
            self._write()

    def arrived(self) -> None:
        """This rank waits at its next exchange: return once every rank does (or one failed)."""
        self.exchange += 1
        self._write()
        peers = [r for r in range(self.w.size) if r != self.w.rank]
        seen = {r: (None, time.monotonic()) for r in peers}  # rank -> (last content, when it changed)
        while True:
            waiting = []
            for r in peers:
                if os.path.exists(os.path.join(self.folder, FAILURE_MARKER.format(rank=r))):
                    return  # the exchange brings its error
                content = _read_small(os.path.join(self.folder, HEARTBEAT.format(rank=r)))
                if content != seen[r][0]:
                    seen[r] = (content, time.monotonic())
                at, pid, host = _parse_beat(content)
                if at is not None and at >= self.exchange:
                    continue
                if host == socket.gethostname() and not _alive(pid):
                    raise RunInterrupted(
                        f"{self.w.describe()}: {self.w.describe(r)} (pid {pid} on {host}) is gone; the run stopped"
                    )
                if time.monotonic() - seen[r][1] > self.timeout:
                    raise RunInterrupted(
                        f"{self.w.describe()}: {self.w.describe(r)} has given no sign of life for {self.timeout:.0f} s "
                        "(stopped, hung or gone; MERGEKIT_MLX_RANK_TIMEOUT sets this wait); the run stopped"
                    )
                waiting.append(r)
            if not waiting:
                return
            time.sleep(0.25)

    def close(self) -> None:
        """Stop beating (before the exchange that follows `arrived`, so that no beat comes after it)."""
        if self.fd < 0:
            return
        self.stopped.set()
        self.thread.join()
        os.close(self.fd)
        self.fd = -1


def _read_small(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read(128)
    except OSError:
        return None


def _parse_beat(content: str | None) -> tuple[int | None, int | None, str | None]:
    """(exchange, pid, host) of a heartbeat's text; Nones for one read while it was written."""
    try:
        _, exchange, pid, host = content.split()
        return int(exchange), int(pid), host
    except (AttributeError, ValueError):
        return None, None, None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # another user's process of that number: alive as far as we can tell
    try:  # Linux: a killed process stays a zombie until its parent (the launcher) reaps it
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


@contextmanager
def stop_on_sigterm(w: World, what: str) -> Iterator[None]:
    """While the ranks work, SIGTERM (mlx.launch stops every process once one has ended with an
    error or was killed) raises RunInterrupted here instead of ending the process silently."""
    if w.alone or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stopped(signum, frame) -> None:
        raise RunInterrupted(
            f"{w.describe()}: stopped by SIGTERM (mlx.launch stops every process when one of them ends with an error or "
            f"is killed: see its message above); {what}"
        )

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
