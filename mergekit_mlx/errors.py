"""The user-facing failures (a bad recipe, a bad input model, an output that cannot be written),
and the one-time warnings of a fallback.

Each error message names the YAML key or the file and says what would be valid; the CLI prints it
as one paragraph and exits non-zero, without a traceback.
"""

import warnings

_warned: set[str] = set()


def warn_once(key: str, msg: str) -> None:
    """A RuntimeWarning the first time `key` comes up in this process (a kernel or a native loop
    that fell back), pointing at the caller's caller."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


class MergeKitError(Exception):
    """Base of every error meant for the user rather than for a developer."""


class RecipeError(MergeKitError):
    """The recipe (YAML, dict or Recipe) is invalid; the message names the key."""


class ModelError(MergeKitError):
    """An input model (directory, file, header, tensor) is missing or malformed."""


class OutputError(MergeKitError):
    """The output location cannot be written as asked (exists, inside an input, no space)."""


class RunInterrupted(MergeKitError):
    """The run stopped before it finished, through no fault of the recipe or the inputs (a process
    of a distributed run was lost or stopped); what it finished is kept for `--resume`."""


def short_repr(value, limit: int = 80) -> str:
    """An untrusted value as an error message shows it: a long list as its length, any text cut at `limit`."""
    text = repr(value) if not isinstance(value, list) or len(value) <= 16 else f"[{len(value)} values]"
    return text if len(text) <= limit else text[:limit] + "..."
