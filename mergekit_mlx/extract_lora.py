"""`mergekit-mlx extract-lora FINETUNED BASE OUT --rank R`: a fine-tune as a LoRA adapter of its base.

mergekit-extract-lora's job (its options under the same names where they exist): per linear weight
the best rank-R approximation of the task vector FINETUNED - BASE, embeddings and norms saved whole
or left out as mergekit does (`adapters/extract.py` says which and where this differs), written as a
PEFT adapter or as an mlx-lm adapter (`adapters/write.py`) through the output lifecycle every command
shares (checks first, `.OUT.partial`, manifest, atomic rename, `--force` rules, lock).

Either model may be anything a recipe may name (a Hugging Face or MLX directory, MLX-quantized, GGUF,
BitNet, BitDelta, a Hub id). The relative reconstruction error ||dW - B·A|| / ||dW|| of every module
is printed as a short table and kept in OUT/extraction.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import mlx.core as mx

from .adapters import apply_adapter, read_adapter
from .adapters.extract import (
    ExtractionPlan,
    ExtractOptions,
    ModuleKind,
    ModuleResult,
    ModuleTask,
    check_options,
    extract,
    plan_extraction,
)
from .adapters.svd import SvdMethod, SvdSettings
from .adapters.write import AdapterFormat, AdapterWriter
from .arguments import Parser, add_common_arguments, add_force_argument
from .device import use_device
from .dtypes import WEIGHT_NAMES, named, torch_dtype_name
from .errors import RecipeError
from .formats import open_model
from .formats.base import ModelSource
from .options import MergeOptions
from .output import OutputJob, check_output_location, write_model
from .plan import human_bytes, resolve_adapter_path, resolve_model_path, split_reference

HELP = "extract a LoRA adapter (PEFT or mlx-lm) from a fine-tune and its base"
REPORT_FILE = "extraction.json"


@dataclass(frozen=True)
class Extraction:
    path: Path | None  # None after a dry run
    plan: ExtractionPlan
    results: list[ModuleResult]
    seconds: float


def extract_lora(
    finetuned: str | Path,
    base: str | Path,
    out: str | Path | None,
    options: ExtractOptions,
    out_format: AdapterFormat = AdapterFormat.PEFT,
    *,
    force: bool = False,
    progress: bool = False,
    dry_run: bool = False,
) -> Extraction:
    """Extract the adapter of `finetuned` against `base` into `out` (nothing is written with dry_run)."""
    start = time.perf_counter()
    check_options(options)
    ft_paths = _resolve(str(finetuned), "FINETUNED")
    base_paths = _resolve(str(base), "BASE")
    if [p.resolve() for p in ft_paths] == [p.resolve() for p in base_paths]:
        raise RecipeError(
            f"FINETUNED and BASE are the same model ({ft_paths[0]}); name the fine-tune and the model it was tuned from"
        )
    inputs = [(str(finetuned), p) for p in ft_paths] + [(str(base), p) for p in base_paths]
    if not dry_run:
        if out is None:
            raise RecipeError("extract-lora needs OUT, the adapter directory to write; or pass --dry-run")
        check_output_location(Path(out).expanduser(), inputs, force=force)
    ft, base_model = _open(ft_paths, "FINETUNED"), _open(base_paths, "BASE")
    inputs = [(str(finetuned), p) for p in ft.input_paths()] + [(str(base), p) for p in base_model.input_paths()]
    plan = plan_extraction(ft, base_model, options, out_format, base_model=str(base))
    if dry_run:
        return Extraction(None, plan, [], time.perf_counter() - start)

    results: list[ModuleResult] = []
    files = {str(i.file) for m in (ft, base_model) for i in map(m.info, m.tensor_names()) if i.file}
    files = sorted(files | {str(p) for _, p in inputs if p.is_file()})  # a GGUF file, an adapter's files

    def side_files(directory: Path) -> None:
        (directory / REPORT_FILE).write_text(
            json.dumps(report(plan, results, str(finetuned), str(base), out_format), indent=1) + "\n"
        )

    job = OutputJob(
        tensors=list(plan.outputs),
        config={},
        inputs=inputs,
        input_files=files,
        fingerprint={"extract-lora": [str(p) for _, p in inputs], "options": repr(options), "format": out_format.value},
        side_files=side_files,
        writer=lambda directory: AdapterWriter(directory, plan.spec, out_format),
    )

    def produce(write: Callable[[str, mx.array], None], wants: Callable[[str], bool]) -> None:
        bar = _progress(plan, ft) if progress else None
        done = (lambda t: bar.update(_bytes_read(t, ft))) if bar is not None else None
        try:
            results.extend(extract(plan, ft, base_model, write, done=done))
        finally:
            if bar is not None:
                bar.close()

    path = write_model(job, Path(out).expanduser(), MergeOptions(force=force), produce)
    return Extraction(path, plan, results, time.perf_counter() - start)


def _resolve(ref: str, where: str) -> list[Path]:
    """A model reference as a recipe takes it: a path or Hub id, or MODEL+ADAPTER (mergekit's syntax):
    the model's path, and the adapter's after it."""
    model, adapter = split_reference(ref, where, None)
    path = resolve_model_path(model, where, None)  # a Hub id is fetched as in a recipe
    return [path] if adapter is None else [path, resolve_adapter_path(adapter, where, None)]


def _open(paths: list[Path], where: str) -> ModelSource:
    model = open_model(paths[0])
    return model if len(paths) == 1 else apply_adapter(model, read_adapter(paths[1]), where)


def _bytes_read(t: ModuleTask, ft: ModelSource) -> int:
    return sum(ft.info(n).nbytes for n in t.tensors)


def _progress(plan: ExtractionPlan, ft: ModelSource):
    from tqdm import tqdm

    total = sum(_bytes_read(t, ft) for t in plan.tasks)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="extracting", dynamic_ncols=True)


def report(plan: ExtractionPlan, results: list[ModuleResult], finetuned: str, base: str, out_format: AdapterFormat) -> dict:
    """What extraction.json holds: the inputs, the options and every module's rank and error."""
    o = plan.options
    opts = {f.name: getattr(o, f.name) for f in fields(o)}  # (asdict would deep-copy the dtype, which it cannot)
    opts["dtype"] = torch_dtype_name(o.dtype) if o.dtype else None
    opts["svd"] = {**asdict(o.svd), "method": o.svd.method.value}
    return {
        "tool": "mergekit-mlx extract-lora",
        "finetuned": finetuned,
        "base": base,
        "format": out_format.value,
        "options": opts,
        "modules": {
            r.module: {"kind": r.kind.value, "shape": list(r.shape), "rank": r.rank, "relative_error": r.relative_error}
            for r in results
        },
        "skipped": plan.skipped,
    }


def describe(plan: ExtractionPlan) -> str:
    """The dry run's text: what is factored at which rank, what is saved whole, what is left out."""
    by_kind: dict[str, list[ModuleTask]] = defaultdict(list)
    for t in plan.lora:
        by_kind[t.module.rsplit(".", 1)[-1]].append(t)
    o = plan.options
    lines = [
        f"rank {o.rank}, {o.svd.method.value} SVD" + (f", sv-epsilon {o.svd.sv_epsilon}" if o.svd.sv_epsilon else ""),
        f"factored: {len(plan.lora)} modules",
        *(f"  {k}: {len(ts)} x {list(ts[0].shape)} at rank <= {ts[0].rank}" for k, ts in by_kind.items()),
        f"saved whole (modules_to_save): {_by_last_part([t.module for t in plan.whole]) or 'none'}",
        f"left out: {len(plan.skipped)} modules"
        + (f" ({', '.join(sorted({f'{why}: {n}' for why, n in _count(plan.skipped).items()}))})" if plan.skipped else ""),
        f"bytes written: at most {human_bytes(sum(t.nbytes for t in plan.outputs))}",
    ]
    return "\n".join(lines)


def _by_last_part(modules: list[str]) -> str:
    counts: dict[str, int] = defaultdict(int)
    for m in modules:
        counts[m.rsplit(".", 1)[-1]] += 1
    return ", ".join(f"{k} x {n}" if n > 1 else k for k, n in counts.items())


def _count(skipped: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for why in skipped.values():
        out[why] += 1
    return out


def error_table(results: list[ModuleResult]) -> str:
    """One row per kind of module (its last name part): count, ranks, mean and largest relative error."""
    rows: dict[str, list[ModuleResult]] = defaultdict(list)
    for r in results:
        if r.kind is not ModuleKind.WHOLE:
            rows[r.module.rsplit(".", 1)[-1]].append(r)
    lines = ["| module | count | rank | mean rel. error | max rel. error |", "|---|---|---|---|---|"]
    for kind, rs in rows.items():
        ranks = sorted({r.rank for r in rs})
        rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        errors = [r.relative_error for r in rs if r.relative_error is not None]
        lines.append(f"| {kind} | {len(rs)} | {rank} | {sum(errors) / len(errors):.4f} | {max(errors):.4f} |")
    whole = [r.module for r in results if r.kind is ModuleKind.WHOLE]
    if whole:
        lines.append(f"saved whole: {len(whole)} modules ({', '.join(sorted({m.rsplit('.', 1)[-1] for m in whole}))})")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="mergekit-mlx extract-lora",
        description="Extract a LoRA adapter from a fine-tuned model and its base (mergekit-extract-lora's job): "
        "per linear weight the best rank-R approximation of the task vector, written as a PEFT or an mlx-lm adapter.",
    )
    p.add_argument("finetuned", help="the fine-tuned model (directory, .gguf file, Hub id, or MODEL+ADAPTER)")
    p.add_argument("base", help="the model it was tuned from")
    p.add_argument("out", nargs="?", help="the adapter directory to write")
    p.add_argument("--rank", "--max-rank", type=int, default=128, help="the largest rank of a module's factors (default 128)")
    p.add_argument(
        "--out-format",
        choices=[f.value for f in AdapterFormat],
        default=AdapterFormat.PEFT.value,
        help="peft (adapter_model.safetensors) or mlx (mlx-lm's adapters.safetensors); default peft",
    )
    p.add_argument("--sv-epsilon", type=float, default=0.0, help="keep only singular values above this (absolute, as mergekit)")
    p.add_argument(
        "--svd",
        choices=[m.value for m in SvdMethod],
        default=SvdMethod.RANDOMIZED.value,
        help="randomized (Halko et al., power iterations until converged; default) or exact",
    )
    p.add_argument("--oversample", type=int, default=10, help="randomized SVD: extra sketch columns (default 10)")
    p.add_argument("--power-iterations", type=int, default=16, help="randomized SVD: the most power iterations (default 16)")
    p.add_argument(
        "--svd-tolerance",
        type=float,
        default=1e-4,
        help="randomized SVD: stop once an iteration improves the relative error by less (default 1e-4)",
    )
    p.add_argument("--seed", type=int, default=0, help="randomized SVD: seed of the sketches (default 0)")
    p.add_argument(
        "--distribute-scale",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="B = U sqrt(S), A = sqrt(S) Vh (default), or B = U, A = S Vh",
    )
    p.add_argument("--embed-lora", action="store_true", help="factor embeddings too, instead of saving them whole")
    p.add_argument(
        "--save-module",
        dest="modules_to_save",
        action="append",
        default=[],
        metavar="NAME",
        help="save this module whole (a full name or its last part; repeatable; PEFT only)",
    )
    p.add_argument("-i", "--include-regex", action="append", default=[], help="extract only modules matching one (repeatable)")
    p.add_argument("-e", "--exclude-regex", action="append", default=[], help="never extract modules matching one (repeatable)")
    p.add_argument("--skip-undecomposable", action="store_true", help="leave out modules that are not matrices (norms)")
    p.add_argument("--dtype", choices=WEIGHT_NAMES, help="dtype of the written tensors (default: the fine-tune's)")
    p.add_argument("--dry-run", action="store_true", help="print what would be extracted and stop")
    add_force_argument(p)
    add_common_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    svd = SvdSettings(
        method=SvdMethod(args.svd),
        sv_epsilon=args.sv_epsilon,
        distribute_scale=args.distribute_scale,
        oversample=args.oversample,
        power_iterations=args.power_iterations,
        tolerance=args.svd_tolerance,
    )
    options = ExtractOptions(
        rank=args.rank,
        embed_lora=args.embed_lora,
        modules_to_save=tuple(args.modules_to_save),
        include=tuple(args.include_regex),
        exclude=tuple(args.exclude_regex),
        skip_undecomposable=args.skip_undecomposable,
        dtype=named(args.dtype) if args.dtype else None,
        svd=svd,
        seed=args.seed,
    )
    with use_device(args.device):
        result = extract_lora(
            args.finetuned,
            args.base,
            args.out,
            options,
            AdapterFormat(args.out_format),
            force=args.force,
            progress=not args.no_progress,
            dry_run=args.dry_run,
        )
    if result.path is None:
        print(describe(result.plan))
        return 0
    print(error_table(result.results))
    print(f"wrote {result.path} ({len(result.plan.lora)} modules factored) in {result.seconds:.1f} s", file=sys.stderr)
    return 0
