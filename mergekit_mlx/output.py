"""Writing a merge's output safely: a temporary sibling directory, resumable, renamed into place last.

The output is never half-written under its final name: shards get their final name only when
complete, the directory only when every shard, the index, config, tokenizer and card are written.
A state file records each finished shard's checksum so `--resume` keeps them and merges the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from .errors import OutputError
from .options import MergeOptions
from .plan import Plan
from .writer import copy_tokenizer, make_writer

STATE_FILE = ".mergekit-mlx-state.json"


def check_output_location(out: Path, plan: Plan, opts: MergeOptions) -> None:
    """Refuse an output that is an input or inside one, and an existing one without --force."""
    target = out.resolve()
    for ref, m in zip(plan.model_paths, plan.models):
        src = m.path.resolve()
        src_dir = src if src.is_dir() else src.parent
        if target == src_dir or src_dir in target.parents or (src.is_file() and target == src):
            raise OutputError(f"output {out} is (inside) the input model {ref}; choose another output directory")
    if out.exists() and not (opts.force or opts.resume):
        raise OutputError(f"output {out} already exists; pass --force to replace it")


def _partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def recipe_fingerprint(plan: Plan, opts: MergeOptions) -> str:
    text = json.dumps(
        {
            "recipe": plan.recipe.model_dump(mode="json"),
            "seed": opts.random_seed,
            "shard": opts.out_shard_size,
            "format": opts.out_format,
            "group_size": opts.group_size,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def write_output(
    plan: Plan,
    out: Path,
    opts: MergeOptions,
    produce: Callable[[Callable[[str, mx.array], None], Callable[[str], bool]], None],
) -> Path:
    """Fill a temporary sibling of `out` through the format's writer, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_dir(out)
    fingerprint = recipe_fingerprint(plan, opts)
    state_path = tmp / STATE_FILE
    done: dict[str, str] = {}
    if opts.resume and state_path.exists():
        try:
            state = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError):
            state = {}
        if state.get("fingerprint") == fingerprint:
            done = {f: h for f, h in state.get("shards", {}).items() if (tmp / f).exists() and _sha256(tmp / f) == h}
    if not done and tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    for stale in tmp.glob("incomplete-*"):
        stale.unlink()

    writer = make_writer(
        opts.out_format,
        tmp,
        plan.outputs,
        plan.config,
        max_shard_bytes=opts.out_shard_size,
        tokenizer_dir=_tokenizer_source_dir(plan),
        skip_shards=set(done) if opts.out_format == "hf" else None,
        group_size=opts.group_size,
    )
    wants = getattr(writer, "wants", lambda name: True)
    written = getattr(writer, "written", None)

    def save_state() -> None:
        if written is not None:
            for f in written:
                if f not in done:
                    done[f] = _sha256(tmp / f)
        state_path.write_text(json.dumps({"fingerprint": fingerprint, "shards": done}))

    save_state()

    def write(name: str, array: mx.array) -> None:
        before = len(written) if written is not None else 0
        writer.add(name, array)
        if written is not None and len(written) != before:
            save_state()

    try:
        produce(write, wants)
        writer.finish()
        if opts.copy_tokenizer and opts.out_format in ("hf", "mlx-q4", "mlx-q8", "mlx-mxfp4", "bitnet"):
            write_tokenizer(plan, tmp)
        (tmp / "README.md").write_text(model_card(plan))
        state_path.unlink()
    except OSError as e:
        if e.errno == 28:  # ENOSPC
            shutil.rmtree(tmp, ignore_errors=True)
            need = plan.bytes_written
            raise OutputError(
                f"no space left on the device while writing {out}; this merge needs about "
                f"{need / 1e9:.2f} GB of free space (the partial output was removed)"
            ) from None
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)
    return out


def _tokenizer_source_dir(plan: Plan) -> Optional[Path]:
    if plan.tokenizer_model is None:
        return None
    return plan.models[plan.tokenizer_model].tokenizer_dir


def write_tokenizer(plan: Plan, out_dir: Path) -> None:
    r = plan.recipe
    if r.tokenizer is not None or r.tokenizer_source == "union":
        from . import tokenizer

        vocab = tokenizer.plan_vocab(r, plan.models, plan.base)
        if vocab is not None:
            vocab.save(out_dir)
    else:
        src = _tokenizer_source_dir(plan)
        if src is not None:
            copy_tokenizer(src, out_dir)
    if r.chat_template:
        from . import tokenizer

        tokenizer.apply_chat_template(out_dir, r.chat_template, plan.models)


def model_card(plan: Plan) -> str:
    models = "\n".join(f"- {p}" for p in plan.model_paths)
    return (
        "---\nlibrary_name: mlx\ntags:\n- mergekit\n- mergekit-mlx\n- merge\n---\n"
        f"# Merged model\n\nThis model was made with mergekit-mlx using the **{plan.method.name}** merge method.\n\n"
        f"## Models merged\n\n{models}\n\n"
        f"## Configuration\n\nThe recipe that produced it:\n\n```yaml\n{plan.recipe.to_yaml()}\n```\n"
    )
