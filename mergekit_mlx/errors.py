"""The two kinds of user-facing failure: a bad recipe, and a bad input model.

Each message names the YAML key or the file and says what would be valid; the CLI prints it as
one paragraph and exits non-zero, without a traceback.
"""


class MergeKitError(Exception):
    """Base of every error meant for the user rather than for a developer."""


class RecipeError(MergeKitError):
    """The recipe (YAML, dict or Recipe) is invalid; the message names the key."""


class ModelError(MergeKitError):
    """An input model (directory, file, header, tensor) is missing or malformed."""


class OutputError(MergeKitError):
    """The output location cannot be written as asked (exists, inside an input, no space)."""
