"""Untrusted input files: every file of an input model is proven safe before it is read or copied.

A model directory's files may be symlinks, FIFOs, devices, huge, or swapped while being read. Here
each one is resolved and checked (a regular file whose real location is the model directory, a
folder in it, or the blobs of a Hugging Face cache snapshot; at most a size limit where it is read
whole) and then read or copied from the descriptor that was checked. Any failure is a ModelError
naming the file and what would be valid. The side files (tokenizer, generation config) a model may
have are listed here: exactly these are read, copied or handed to a tokenizer loader.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ModelError, short_repr

MAX_SIDE_FILE_BYTES = 1 << 30  # a config, index or tokenizer file read whole: far above any real one
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# the files of a model directory besides config and weights that are read, copied or handed to a
# tokenizer loader: exactly these, each checked by `model_file` when the model is opened
SIDE_FILES = TOKENIZER_FILES + ("generation_config.json",)


def _allowed_roots(directory: Path) -> list[Path]:
    """Where a model directory's files may really live: the directory itself, and for a Hugging Face
    cache snapshot (whose files are symlinks into the repository's blobs) that blobs folder."""
    root = directory.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def model_file(directory: Path, name: str, what: str, max_bytes: int | None = None, where: Path | None = None) -> Path:
    """The real path of file `name` of a model directory, once it is proven safe to read.

    Every file of an input model is untrusted: it must be a regular file (not a FIFO, device, socket
    or directory, which would block or never end), whose real location after symlinks is the model
    directory or a folder in it (or the blobs folder of a Hugging Face cache snapshot), and, where it is read
    whole into memory, at most `max_bytes` long. Anything else is a ModelError naming the file (or
    `where`, the file that listed it) and what would be valid.
    """
    directory = Path(directory)
    f = directory / name
    label = f"{what} {name!r}" if where is not None and where != f else what
    where = where or f
    try:
        real = f.resolve(strict=True)
        st = real.stat()
    except (OSError, RuntimeError) as e:  # missing, a dangling or looping symlink, unreadable
        raise ModelError(f"{where}: cannot read {label} ({getattr(e, 'strerror', None) or e})") from None
    if not any(real.is_relative_to(r) for r in _allowed_roots(directory)):
        raise ModelError(
            f"{where}: {label} resolves to {real}, outside the model directory {directory}; a model's files must "
            "live in the model directory (copy the file there, or name the directory that holds it)"
        )
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(
            f"{where}: cannot read {label} (not a regular file): a model's files must be regular files; "
            "a FIFO, device, socket or directory is never read"
        )
    if max_bytes is not None and st.st_size > max_bytes:
        raise ModelError(f"{where}: {label} is {st.st_size} bytes, more than the {max_bytes} such a file may have")
    return real


def open_model_file(directory: Path, name: str, what: str, max_bytes: int = MAX_SIDE_FILE_BYTES) -> BinaryIO:
    """`model_file`, opened for reading: the descriptor itself is checked again (a regular file,
    not a symlink swapped in since), so what is read is what was checked."""
    real = model_file(directory, name, what, max_bytes)
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ModelError(f"{directory / name}: cannot read {what} ({e.strerror or e})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
        os.close(fd)
        raise ModelError(
            f"{directory / name}: {what} changed while it was read; it must be a regular file inside the model directory"
        )
    return os.fdopen(fd, "rb")


def read_model_file(directory: Path, name: str, what: str, max_bytes: int = MAX_SIDE_FILE_BYTES) -> bytes:
    """The bytes of a checked model file (see `model_file`), never more than max_bytes."""
    data = bytearray()
    with open_model_file(directory, name, what, max_bytes) as f:
        try:
            # in chunks, not f.read(max_bytes + 1), which would allocate the limit up front; the
            # limit holds also for a file that grows, or a /proc-like one whose size reads 0
            while len(data) <= max_bytes and (chunk := f.read(min(1 << 24, max_bytes + 1 - len(data)))):
                data += chunk
        except OSError as e:
            raise ModelError(f"{directory / name}: cannot read {what} ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise ModelError(f"{directory / name}: {what} is more than the {max_bytes} bytes such a file may have")
    return bytes(data)


def check_side_files(directory: Path) -> dict[str, Path]:
    """The side files (`SIDE_FILES`) a model directory has, each checked by `model_file`; a name
    that is there but unsafe (a symlink out, a FIFO, a dangling link, too large) is a ModelError."""
    found = {}
    for name in SIDE_FILES:
        if os.path.lexists(directory / name):
            what = "tokenizer file" if name in TOKENIZER_FILES else "generation config"
            found[name] = model_file(directory, name, what, MAX_SIDE_FILE_BYTES)
    return found


def copy_side_files(directory: Path, out_dir: Path, names: tuple[str, ...] = SIDE_FILES) -> list[str]:
    """Copy those of `names` a model directory has into out_dir, each checked again as it is opened
    and copied from the descriptor that was checked (no gap for a symlink swapped in between)."""
    copied = []
    for name in names:
        if not os.path.lexists(directory / name):
            continue
        what = "tokenizer file" if name in TOKENIZER_FILES else name
        with open_model_file(directory, name, what) as f, open(Path(out_dir) / name, "wb") as out:
            shutil.copyfileobj(f, out)
        copied.append(name)
    return copied


def read_json(directory: Path, name: str, what: str) -> Any:
    """A JSON file of a model directory, parsed; any way it can be unsafe or unreadable is a ModelError naming it."""
    path = directory / name
    data = read_model_file(directory, name, what)
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelError(f"{path}: {what} is not valid JSON ({short_repr(str(e), 200)})") from None


def read_config(path: Path) -> dict:
    """A model directory's config.json, which must hold a JSON object."""
    cfg_path = path / "config.json"
    if not os.path.lexists(cfg_path):
        raise ModelError(f"{path}: no config.json (a model directory needs one)")
    config = read_json(path, "config.json", "config.json")
    if not isinstance(config, dict):
        raise ModelError(f"{cfg_path}: must hold a JSON object")
    return config
