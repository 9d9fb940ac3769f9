"""The kernel sources: one file per kernel and backend (`.metal`, `.cu`, `.cpp`), with
`// @splice FILE` lines replaced by FILE's text (the shared bodies and preludes); and where their
compiled forms are cached.

The sources live in the repository's top-level `kernels/` folder (not a Python package: an
importable `kernels` there would shadow the PyPI package of that name, which transformers imports)
and ship in the wheel as data of this package, in `mergekit_mlx/kernels/_sources/`."""

from __future__ import annotations

import os
from pathlib import Path

EXTENSIONS = {"metal": "metal", "cuda": "cu", "cpu": "cpp"}


def cache_root() -> Path:
    """Where compiled kernels live: $MERGEKIT_MLX_CACHE, default ~/.cache/mergekit-mlx."""
    root = os.environ.get("MERGEKIT_MLX_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mergekit-mlx")
    return Path(root)


def kernel_root() -> Path:
    """The folder of the kernel sources: the wheel's package data, or kernels/ of a source checkout."""
    here = Path(__file__).resolve().parent
    shipped = here / "_sources"
    return shipped if shipped.is_dir() else here.parent.parent / "kernels"


def expand(fname: str) -> str:
    """The text of kernels/<fname> with its splices resolved."""
    out = []
    for line in kernel_root().joinpath(fname).read_text().splitlines():
        if line.strip().startswith("// @splice "):
            out.append(expand(line.strip()[len("// @splice ") :].strip()))
        else:
            out.append(line)
    return "\n".join(out)


def kernel_source(name: str, backend_name: str) -> tuple[str, str]:
    """(header, body) of kernels/<name>.metal or .cu (split at `// @body`) with its splices resolved."""
    text = expand(f"{name}.{EXTENSIONS.get(backend_name, 'cu')}")
    head, _, body = text.partition("// @body")
    return head.replace("// @header", ""), body


def model_macros(km: int, has_base: bool) -> str:
    """Loads of the base and of model m (m a compile-time index after unrolling):
    BASEF(i) and XF(m, i) one float; BLOAD8(i, o) and XLOAD8(m, i, o) eight floats from i
    (i a multiple of 8, with INPUTS_ALIGNED true on every input: 16-byte loads on CUDA)."""
    chain = f"LOADF(x{km - 1}, i)"
    for m in range(km - 2, -1, -1):
        chain = f"((m) == {m} ? LOADF(x{m}, i) : {chain})"
    load8 = f"MK_LOAD8(x{km - 1}, i, o);"
    for m in range(km - 2, -1, -1):
        load8 = f"if ((m) == {m}) {{ MK_LOAD8(x{m}, i, o); }} else {{ {load8} }}"
    names = (["base"] if has_base else []) + [f"x{m}" for m in range(km)]
    lines = [
        f"#define BASEF(i) {'LOADF(base, i)' if has_base else '0.0f'}",
        f"#define XF(m, i) {chain}",
        f"#define XLOAD8(m, i, o) {{ {load8} }}",
        "#define BLOAD8(i, o) "
        + ("{ MK_LOAD8(base, i, o); }" if has_base else "{ for (int mk_b = 0; mk_b < 8; ++mk_b) { (o)[mk_b] = 0.0f; } }"),
        "#define INPUTS_ALIGNED (" + " && ".join(f"MK_ALIGNED16({a})" for a in names) + ")",
    ]
    return "\n".join(lines) + "\n"
