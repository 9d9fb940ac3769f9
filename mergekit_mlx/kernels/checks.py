"""The one "check once, warn, fall back" mechanism of every fast path here.

A fast path (a GPU kernel group, a native CPU loop, reading straight into GPU memory) proves itself
on first use against its reference; until it has, and after it failed, the caller takes the
reference path. A failure warns once. A verdict may also be kept on disk (`Remembered`), so a
later process on the same machine, with the same sources and tools, skips the check.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

from ..errors import warn_once

K = TypeVar("K", bound=Hashable)


class Remembered(Protocol):
    """Verdicts kept between processes (cuda_compile's disk verdicts)."""

    def verified(self, what: str) -> bool: ...

    def mark_verified(self, what: str) -> None: ...


class FirstUse(Generic[K]):
    """Per key: None until checked, then whether the fast path may run.

    `label(key)` names the fast path in the warning ("the cuda 'select' kernel"), `reference` what it
    is checked against, `fallback` what runs instead ("the fallback", "numpy").
    """

    def __init__(
        self, label: Callable[[K], str], fallback: str, reference: str | None = None, warn_key: Callable[[K], str] = str
    ):
        self.label, self.fallback, self.warn_key = label, fallback, warn_key
        self.reference = reference or fallback
        self.verdicts: dict[K, bool] = {}
        self.lock = threading.Lock()

    def passed(self, key: K, check: Callable[[], bool], remembered: Remembered | None = None, what: str | None = None) -> bool:
        """Run `check` on the key's first use (or take a verdict remembered on disk); True when the
        fast path may run."""
        got = self.verdicts.get(key)
        if got is not None:
            return got
        if remembered is not None and remembered.verified(what):
            self.verdicts[key] = True  # passed on this machine with these very sources: not run again
            return True
        try:
            ok = bool(check())
            reason = f"disagrees with {self.reference}"
        except Exception as e:  # noqa: BLE001 - a compile error, a launch failure: not this one
            ok = False
            reason = f"failed ({type(e).__name__}: {e})"
        self.verdicts[key] = ok
        if ok and remembered is not None:
            remembered.mark_verified(what)
        if not ok:
            warn_once(self.warn_key(key), f"mergekit-mlx: {self.label(key)} {reason}; using {self.fallback}")
        return ok

    def failed(self, key: K, error: BaseException) -> None:
        """The fast path raised after it had passed: never again in this process."""
        self.verdicts[key] = False
        warn_once(
            self.warn_key(key) + "!",
            f"mergekit-mlx: {self.label(key)} failed ({type(error).__name__}: {error}); using {self.fallback}",
        )

    def status(self) -> dict[K, bool]:
        return dict(self.verdicts)

    def forget(self) -> None:
        """Tests: as in a new process."""
        self.verdicts.clear()
