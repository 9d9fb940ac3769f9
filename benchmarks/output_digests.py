"""The SHA-256 of every file each shipped recipe writes, in several output formats, as JSON.

Run it before and after a change that must not change behaviour (a refactor) and compare:

    python benchmarks/output_digests.py > before.json
    ... change the code ...
    python benchmarks/output_digests.py > after.json && diff before.json after.json

The manifest is left out (it lists the files, so it follows from them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from mergekit_mlx.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("hf", "mlx-q4", "gguf-q8_0", "bitnet")


def digests(directory: Path) -> dict[str, str]:
    files = [directory] if directory.is_file() else sorted(p for p in directory.iterdir() if p.is_file())
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.name != ".mergekit-mlx-output.json"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="+", default=list(FORMATS))
    args = p.parse_args()
    recipes = sorted((ROOT / "configs").glob("*.yml")) + sorted((ROOT / "examples" / "configs").glob("*.yml"))
    out: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="digests-") as tmp:
        for recipe in recipes:
            for fmt in args.formats if recipe.parent.name == "configs" and recipe.parent.parent == ROOT else ["hf"]:
                target = Path(tmp) / f"{recipe.parent.parent.name}-{recipe.stem}-{fmt}"
                rc = cli_main(["run", str(recipe), str(target), "--out-format", fmt, "--no-progress"])
                key = f"{recipe.relative_to(ROOT)} {fmt}"
                out[key] = digests(target) if rc == 0 else {"exit": str(rc)}
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
