"""Build the shipped CUDA cubins: every kernel source a cache holds, compiled for each architecture.

A merge on a GPU writes each kernel source it compiled beside its cubin in the cache
(`cuda_compile.cubin`). This compiles those sources again for every architecture asked for, with
NVRTC alone (no device of that architecture is needed, nor any device), into one archive per
architecture, `kernels/prebuilt/cuda-<arch>.zip`, which `cuda_compile.prebuilt` reads. The archives
are rebuilt whole and written through a temporary file renamed into place; members are sorted and
dated the same every time, so the same sources and NVRTC give the same bytes.

    python -m mergekit_mlx.kernels.prebuild --sources ~/.cache/mergekit-mlx/cuda --arch sm_90a --arch sm_80

`--add` keeps the members the archives hold already and adds those of the sources given.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .cuda_compile import CompileError, Nvrtc, find_nvrtc, prebuilt_dir, prebuilt_member

# data-centre and desktop GPUs that MLX's CUDA 13 wheel runs on: A100, A10/RTX 30, L4/L40/RTX 40,
# H100/H200, B200, RTX 50 and DGX Spark (the 'a' targets are what `device_arch` asks for on sm_90+)
DEFAULT_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120a", "sm_121a")
ZIP_DATE = (2026, 1, 1, 0, 0, 0)


def read_sources(folders: list[Path]) -> list[str]:
    """The distinct kernel sources (`*.cu`) of the folders, in a stable order."""
    found = set()
    for folder in folders:
        for path in sorted(folder.glob("*.cu")):
            if path.is_file() and not path.is_symlink():
                found.add(path.read_text())
    return sorted(found)


def build_archive(nv: Nvrtc, sources: list[str], arch: str, out_dir: Path, threads: int, add: bool = False) -> tuple[int, int]:
    """Compile `sources` for `arch` into out_dir/cuda-<arch>.zip: (members written, bytes). With
    `add`, the archive's members whose sources are not given are kept (a new kernel joins the
    shipped ones without the merges that recorded them being run again)."""
    target = out_dir / f"cuda-{arch}.zip"
    kept: dict[str, bytes] = {}
    if add and target.is_file():
        with zipfile.ZipFile(target) as z:
            kept = {name: z.read(name) for name in z.namelist()}

    def one(source: str) -> tuple[str, bytes]:
        return prebuilt_member(source, arch), nv.compile(source, arch)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        members = sorted({**kept, **dict(pool.map(one, sources))}.items())
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
            for name, data in members:
                z.writestr(zipfile.ZipInfo(name, ZIP_DATE), data, compress_type=zipfile.ZIP_DEFLATED)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return len(members), target.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mergekit_mlx.kernels.prebuild", description=__doc__.splitlines()[0])
    p.add_argument("--sources", type=Path, action="append", required=True, help="a cache folder of *.cu sources (repeatable)")
    p.add_argument("--arch", action="append", help=f"NVRTC target (repeatable; default {' '.join(DEFAULT_ARCHS)})")
    p.add_argument("--out", type=Path, default=None, help="folder of the archives (default: the package's kernels/prebuilt)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--add", action="store_true", help="keep the archives' other members (add the sources' cubins to them)")
    args = p.parse_args(argv)
    try:
        nv = find_nvrtc()
    except (CompileError, OSError) as e:
        print(f"prebuild: {e}", file=sys.stderr)
        return 2
    sources = read_sources(args.sources)
    if not sources:
        print(f"prebuild: no *.cu sources in {', '.join(map(str, args.sources))}", file=sys.stderr)
        return 2
    out = args.out or prebuilt_dir()
    status = 0
    for arch in args.arch or DEFAULT_ARCHS:
        try:
            count, size = build_archive(nv, sources, arch, out, max(1, args.threads), add=args.add)
        except CompileError as e:  # an architecture this NVRTC does not know: the others still build
            print(f"{arch}: not built: {str(e).splitlines()[0]}", file=sys.stderr)
            status = 1
            continue
        except zipfile.BadZipFile as e:  # --add, and the archive there is not one: it is left as it is
            print(f"prebuild: {out / f'cuda-{arch}.zip'}: not a zip archive ({e}); not changed", file=sys.stderr)
            return 2
        print(f"{arch}: {count} cubins, {size / 1e6:.2f} MB (NVRTC {nv.version})")
    return status


if __name__ == "__main__":
    sys.exit(main())
