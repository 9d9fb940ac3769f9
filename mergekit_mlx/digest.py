"""What tells files apart for `--resume`: the shards written by content, the inputs read by identity.

A shard's digest is XXH3-128 of its bytes: not cryptographic, chosen for speed (benchmarks/RESULTS.md);
it tells a shard cut short by a power loss from the one recorded. An input's identity is its size,
modification and change times and inode, taken in one stat when the merge starts: an input edited,
replaced or re-downloaded since has another change time or inode (neither can be set back by a user,
unlike the modification time; one only touched or chmod-ed counts as changed too, and a resume then
merges everything again, which is safe). Taking it costs one stat, where hashing every input slowed
each merge and made a resume read every input again first (benchmarks/RESULTS.md 21). Whoever can
edit the inputs on purpose could change the merge anyway.
"""

from __future__ import annotations

import os
from pathlib import Path

import xxhash


def file_identity(path: str | Path) -> str:
    """The identity of the file a path names (links followed): size, modification and change times
    (ns), inode. OSError when it cannot be read."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def is_identity(recorded: object) -> bool:
    """Whether a value read from a resume state is a `file_identity` (earlier versions recorded
    the inputs' content digests, 32 hex digits)."""
    return isinstance(recorded, str) and recorded.count(":") == 3


def new_digest():
    """A fresh hash object (update/hexdigest) of the resume digest."""
    return xxhash.xxh3_128()


def file_digest(path: Path) -> str:
    """The digest of a file's bytes, read in 16 MiB blocks."""
    h = new_digest()
    buf = bytearray(1 << 24)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
