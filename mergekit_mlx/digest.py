"""The content digest that tells files apart for `--resume`: shards written, inputs read.

XXH3-128: not cryptographic, chosen for speed (benchmarks/RESULTS.md). It tells a re-downloaded or
edited file from the one recorded, which is what a resume must prove; whoever can edit the inputs
on purpose could change the merge anyway.
"""

from __future__ import annotations

from pathlib import Path

import xxhash


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
