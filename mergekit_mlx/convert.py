"""`mergekit-mlx convert IN OUT --out-format F`: change a model's format without merging.

IN is anything a recipe may name (Hugging Face or MLX directory, MLX-quantized directory, BitNet
checkpoint, GGUF file, BitDelta directory); OUT is written in any --out-format, one tensor at a time,
into a temporary sibling that is renamed into place at the end. For gguf-* formats OUT may be a
`.gguf` file name; otherwise it is a directory.

With `--bitdelta-base BASE`, IN is stored as BitDelta against BASE: for every matrix of the decoder
layers only the sign of (IN - BASE) and one scale, mean |IN - BASE|, are kept (about 1 bit per
weight); everything else is kept in full. The layout is described in `quantized.py`, whose reader
applies it back, so a BitDelta directory can be a model in a recipe or converted back to full
weights with `mergekit-mlx convert DELTA_DIR OUT`.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional, Union

import mlx.core as mx

from .errors import OutputError, RecipeError
from .models import ModelSource, layer_index, open_model
from .quantized import CODE_DTYPES, SCALE_SUFFIX, SIGN_SUFFIX, pack_signs
from .writer import DEFAULT_SHARD_BYTES, OUT_FORMATS, OutputTensor, copy_tokenizer, make_writer, torch_dtype_name

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
Produce = Callable[[str], mx.array]


def convert(
    in_path: Union[str, Path],
    out_path: Union[str, Path],
    out_format: str = "hf",
    *,
    group_size: Optional[int] = None,
    bitdelta_base: Union[str, Path, None] = None,
    out_dtype: Optional[str] = None,
    out_shard_size: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
) -> Path:
    """Write the model at in_path to out_path in out_format (or as BitDelta against bitdelta_base)."""
    if out_format not in OUT_FORMATS:
        raise RecipeError(f"--out-format {out_format!r} is not known; valid: {', '.join(OUT_FORMATS)}")
    if out_dtype is not None and out_dtype not in DTYPES:
        raise RecipeError(f"--out-dtype {out_dtype!r} is not one of {', '.join(DTYPES)}")
    src = open_model(in_path)
    out = Path(out_path).expanduser()
    _check_output(out, [src.path] + ([Path(bitdelta_base)] if bitdelta_base else []), force)
    dtype = DTYPES[out_dtype] if out_dtype else None
    if bitdelta_base is not None:
        if out_format != "hf":
            raise RecipeError("--bitdelta-base writes its own safetensors layout; leave --out-format at hf")
        tensors, config, produce = bitdelta_plan(src, open_model(bitdelta_base), dtype)
    else:
        tensors, config, produce = plain_plan(src, dtype)
    single_file = out_format.startswith("gguf-") and out.suffix.lower() == ".gguf"
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        writer = make_writer(
            out_format, tmp, tensors, config, max_shard_bytes=out_shard_size, tokenizer_dir=src.tokenizer_dir, group_size=group_size
        )
        release = getattr(src, "release", lambda: None)
        for t in tensors:
            array = produce(t.name)
            mx.eval(array)  # one tensor at a time: never a graph over the whole model
            writer.add(t.name, array)
            del array
            release()  # a reader's cached lazy arrays keep their data once evaluated
        writer.finish()
        if not out_format.startswith("gguf-") and src.tokenizer_dir is not None:
            copy_tokenizer(src.tokenizer_dir, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    if single_file:
        os.replace(tmp / "model.gguf", out)
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    return out


def _check_output(out: Path, inputs: list[Path], force: bool) -> None:
    target = out.resolve()
    for src in inputs:
        src = src.resolve()
        if target == src or (src.is_dir() and src in target.parents):
            raise OutputError(f"output {out} is (inside) the input {src}; choose another output path")
    if out.exists() and not force:
        raise OutputError(f"output {out} already exists; pass --force to replace it")


def plain_plan(src: ModelSource, dtype: Optional[mx.Dtype]) -> tuple[list[OutputTensor], dict, Produce]:
    """Every tensor of src, in its loaded dtype or cast to dtype (floating tensors only)."""
    tensors = []
    for name in src.tensor_names():
        info = src.info(name)
        own = CODE_DTYPES.get(info.dtype)
        tensors.append(OutputTensor(name, info.shape, dtype if (dtype and own) else (own or _mx_dtype(info.dtype))))
    config = copy.deepcopy(src.config)
    if dtype is not None:
        config["torch_dtype"] = torch_dtype_name(dtype)
    wanted = {t.name: t.dtype for t in tensors}
    return tensors, config, lambda name: src.load(name).astype(wanted[name])


def _mx_dtype(code: str) -> mx.Dtype:
    from .models import SAFETENSORS_DTYPES

    dt = SAFETENSORS_DTYPES[code][1]
    if dt is None:
        raise RecipeError(f"tensor dtype {code} cannot be converted")
    return dt


def bitdelta_plan(ft: ModelSource, base: ModelSource, dtype: Optional[mx.Dtype]) -> tuple[list[OutputTensor], dict, Produce]:
    """Tensors and config of the BitDelta form of ft against base (see the module docstring)."""
    tensors, config, full = plain_plan(ft, dtype)
    compressed = {
        t.name
        for t in tensors
        if t.name.endswith(".weight")
        and len(t.shape) == 2
        and layer_index(t.name) is not None
        and base.has(t.name)
        and base.info(t.name).shape == t.shape
    }
    if not compressed:
        raise RecipeError(f"--bitdelta-base {base.path}: no decoder-layer matrix of {ft.path} has the same name and shape in it")
    out: list[OutputTensor] = []
    for t in tensors:
        if t.name in compressed:
            out.append(OutputTensor(t.name + SIGN_SUFFIX, (*t.shape[:-1], (t.shape[-1] + 7) // 8), mx.uint8))
            out.append(OutputTensor(t.name + SCALE_SUFFIX, (1,), mx.float32))
        else:
            out.append(t)
    config["quantization_config"] = {"quant_method": "bitdelta", "base_model": str(base.path.resolve())}
    deltas: dict[str, tuple[mx.array, mx.array]] = {}

    def produce(name: str) -> mx.array:
        for suffix in (SIGN_SUFFIX, SCALE_SUFFIX):
            if name.endswith(suffix) and name[: -len(suffix)] in compressed:
                weight = name[: -len(suffix)]
                if weight not in deltas:
                    delta = ft.load(weight).astype(mx.float32) - base.load(weight).astype(mx.float32)
                    deltas.clear()  # the sign and scale of one matrix are asked for one after the other
                    deltas[weight] = (pack_signs(delta), mx.mean(mx.abs(delta)).reshape(1))
                return deltas[weight][0 if suffix == SIGN_SUFFIX else 1]
        return full(name)

    return out, config, produce


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="mergekit-mlx convert",
        description="Convert a model between formats (HF, MLX-quantized, GGUF, BitNet) without merging, "
        "or compress a fine-tune against its base as BitDelta.",
    )
    p.add_argument("input", help="model directory, MLX-quantized/BitNet/BitDelta directory, or .gguf file")
    p.add_argument("out", help="output directory (a .gguf file name for gguf-* formats)")
    p.add_argument("--out-format", default="hf", choices=OUT_FORMATS, help="output format (default hf safetensors)")
    p.add_argument("--group-size", type=int, help="quantization group size for mlx-* formats")
    p.add_argument("--out-dtype", choices=tuple(DTYPES), help="cast floating tensors (hf, mlx-* and bitnet outputs)")
    p.add_argument("--bitdelta-base", help="store the input as BitDelta (1-bit signs + a scale per matrix) against this base")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    out = convert(
        args.input,
        args.out,
        args.out_format,
        group_size=args.group_size,
        bitdelta_base=args.bitdelta_base,
        out_dtype=args.out_dtype,
        force=args.force,
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0
