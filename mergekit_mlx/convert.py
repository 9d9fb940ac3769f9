"""`mergekit-mlx convert IN OUT --out-format F`: change a model's format without merging.

IN is anything a recipe may name (Hugging Face or MLX directory, MLX-quantized directory, BitNet
checkpoint, GGUF file, BitDelta directory); OUT is written in any --out-format, one tensor at a time,
into a temporary sibling that is renamed into place at the end. For gguf-* formats OUT may be a
`.gguf` file name; otherwise it is a directory.

With `--bitdelta-base BASE`, IN is stored as BitDelta against BASE: for every matrix of the decoder
layers only the sign of (IN - BASE) and one scale, mean |IN - BASE|, are kept (about 1 bit per
weight); everything else is kept in full. The layout is described in `formats/bitdelta.py`, whose reader
applies it back, so a BitDelta directory can be a model in a recipe or converted back to full
weights with `mergekit-mlx convert DELTA_DIR OUT`.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from .arguments import Parser, add_common_arguments, add_output_arguments
from .device import use_device
from .dtypes import WEIGHT_NAMES, mlx_dtype, named, set_config_dtype, weight_dtype
from .errors import RecipeError
from .formats import DEFAULT_SHARD_BYTES, OUT_FORMATS, open_model
from .formats.base import ModelSource, OutputTensor
from .formats.bitdelta import bitdelta_tensors
from .formats.files import copy_side_files
from .hub import download_progress
from .options import MergeOptions
from .output import OutputJob, check_output_location, write_model
from .plan import resolve_model_path

HELP = "convert a model between formats without merging"

Produce = Callable[[str], mx.array]


def convert(
    in_path: str | Path,
    out_path: str | Path,
    out_format: str = "hf",
    *,
    group_size: int | None = None,
    bitdelta_base: str | Path | None = None,
    out_dtype: str | None = None,
    out_shard_size: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Write the model at in_path to out_path in out_format (or as BitDelta against bitdelta_base),
    through the same output lifecycle as a merge (checks, lock, temporary sibling, manifest)."""
    if out_format not in OUT_FORMATS:
        raise RecipeError(f"--out-format {out_format!r} is not known; valid: {', '.join(OUT_FORMATS)}")
    if out_dtype is not None and out_dtype not in WEIGHT_NAMES:
        raise RecipeError(f"--out-dtype {out_dtype!r} is not one of {', '.join(WEIGHT_NAMES)}")
    if bitdelta_base is not None and out_format != "hf":
        raise RecipeError("--bitdelta-base writes its own safetensors layout; leave --out-format at hf")
    opts = MergeOptions(out_shard_size=out_shard_size, out_format=out_format, group_size=group_size, force=force)
    opts.check()
    src = open_model(resolve_model_path(str(in_path), "IN", None))  # a path, or a Hub id as in a recipe
    inputs = [(str(in_path), src.path)]
    base = None
    if bitdelta_base is not None:
        base = open_model(resolve_model_path(str(bitdelta_base), "--bitdelta-base", None))
        inputs.append((str(bitdelta_base), base.path))
    out = Path(out_path).expanduser()
    check_output_location(out, inputs, force=force)
    dtype = named(out_dtype) if out_dtype else None
    if base is not None:
        tensors, config, produce_one = bitdelta_plan(src, base, dtype)
    else:
        tensors, config, produce_one = plain_plan(src, dtype)
    files = sorted({str(i.file) for m in (src, base) if m is not None for i in map(m.info, m.tensor_names()) if i.file})
    tokenizer_dir = src.tokenizer_dir

    def side_files(directory: Path) -> None:
        if tokenizer_dir is not None:
            copy_side_files(tokenizer_dir, directory)

    job = OutputJob(
        tensors=tensors,
        config=config,
        inputs=inputs,
        input_files=files or [str(src.path)],
        fingerprint={"convert": [str(p) for _, p in inputs], "out_dtype": out_dtype},
        tokenizer_dir=tokenizer_dir,
        side_files=side_files,
    )

    def produce(write: Callable[[str, mx.array], None], wants: Callable[[str], bool]) -> None:
        release = getattr(src, "release", lambda: None)
        bar = _progress(tensors) if progress else None
        try:
            for t in tensors:
                if wants(t.name):
                    array = produce_one(t.name)
                    mx.eval(array)  # one tensor at a time: never a graph over the whole model
                    write(t.name, array)
                    del array
                    release()  # a reader's cached lazy arrays keep their data once evaluated
                if bar is not None:
                    bar.update(t.nbytes)
        finally:
            if bar is not None:
                bar.close()

    return write_model(job, out, opts, produce)


def _progress(tensors: list[OutputTensor]):
    from tqdm import tqdm

    total = sum(t.nbytes for t in tensors)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="converting", dynamic_ncols=True)


def plain_plan(src: ModelSource, dtype: mx.Dtype | None) -> tuple[list[OutputTensor], dict, Produce]:
    """Every tensor of src, in its loaded dtype or cast to dtype (floating tensors only)."""
    tensors = []
    for name in src.tensor_names():
        info = src.info(name)
        own = weight_dtype(info.dtype)
        tensors.append(OutputTensor(name, info.shape, dtype if (dtype and own) else (own or _mx_dtype(info.dtype))))
    config = copy.deepcopy(src.config)
    if dtype is not None:
        set_config_dtype(config, dtype)
    wanted = {t.name: t.dtype for t in tensors}
    return tensors, config, lambda name: src.load(name).astype(wanted[name])


def _mx_dtype(code: str) -> mx.Dtype:
    dt = mlx_dtype(code)
    if dt is None:
        raise RecipeError(f"tensor dtype {code} cannot be converted")
    return dt


def bitdelta_plan(ft: ModelSource, base: ModelSource, dtype: mx.Dtype | None) -> tuple[list[OutputTensor], dict, Produce]:
    """Tensors and config of the BitDelta form of ft against base (see the module docstring)."""
    tensors, config, full = plain_plan(ft, dtype)
    return bitdelta_tensors(ft, base, tensors, config, full)


def main(argv: list[str] | None = None) -> int:
    p = Parser(
        prog="mergekit-mlx convert",
        description="Convert a model between formats (HF, MLX-quantized, GGUF, BitNet) without merging, "
        "or compress a fine-tune against its base as BitDelta.",
    )
    p.add_argument("input", help="model directory, MLX-quantized/BitNet/BitDelta directory, or .gguf file")
    p.add_argument("out", help="output directory (a .gguf file name for gguf-* formats)")
    p.add_argument("--out-dtype", choices=WEIGHT_NAMES, help="cast floating tensors (hf, mlx-* and bitnet outputs)")
    p.add_argument("--bitdelta-base", help="store the input as BitDelta (1-bit signs + a scale per matrix) against this base")
    add_output_arguments(p)
    add_common_arguments(p)
    args = p.parse_args(argv)
    with use_device(args.device), download_progress(not args.no_progress):
        out = convert(
            args.input,
            args.out,
            args.out_format,
            group_size=args.group_size,
            bitdelta_base=args.bitdelta_base,
            out_dtype=args.out_dtype,
            out_shard_size=args.out_shard_size,
            force=args.force,
            progress=not args.no_progress,
        )
    print(f"wrote {out}", file=sys.stderr)
    return 0
