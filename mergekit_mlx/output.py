"""Writing a merge's output safely: a temporary sibling directory, resumable, renamed into place last.

The output is never half-written under its final name: shards get their final name only when
complete, the directory only when every shard, the index, config, tokenizer and card are written.
A state file records each finished shard's checksum so `--resume` keeps them and merges the rest.

What a failed run leaves behind: a validation error (recipe, inputs, output location, free space)
is raised before anything is written and leaves nothing; an error while merging or writing
(non-finite values, a value a method refuses, a full disk) removes `.NAME.partial`, since rerunning
the same command could not use it. Only an interruption (Ctrl-C, a kill, a power loss) leaves
`.NAME.partial` in place, for `--resume`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from .errors import MergeKitError, OutputError
from .options import MergeOptions
from .plan import Plan, human_bytes
from .writer import copy_tokenizer, file_sha256, make_writer

STATE_FILE = ".mergekit-mlx-state.json"
# how MLX words a failed file write (it raises RuntimeError without an errno)
MLX_WRITE_ERRORS = ("[write]", "[save_safetensors]", "[save]", "[save_gguf]")


def check_output_location(out: Path, plan: Plan, opts: MergeOptions) -> None:
    """Refuse an output that is an input, inside one or holding one, and an existing one without --force."""
    target = out.resolve()
    for ref, m in zip(plan.model_paths, plan.models):
        src = m.path.resolve()
        # a directory model may not hold the output; beside a .gguf file is fine, the file itself is not
        if target == src or (src.is_dir() and src in target.parents):
            raise OutputError(f"output {out} is (inside) the input model {ref}; choose another output directory")
        if target in src.parents:
            # --force would delete the input with the old output
            raise OutputError(f"output {out} contains the input model {ref}; choose another output directory")
    if out.exists() and not opts.force:
        hint = " (it is a finished merge: there is nothing to resume)" if opts.resume else ""
        raise OutputError(f"output {out} already exists{hint}; pass --force to replace it")
    if out.is_dir() and not _replaceable(out):
        # a typo such as `--force ~` must not delete a home directory
        raise OutputError(
            f"output {out} is a folder that holds something other than a model (no config.json or .gguf); "
            "--force replaces only models: remove it yourself, or choose another output directory"
        )


def _replaceable(directory: Path) -> bool:
    """An empty folder or a model (what a merge writes) may be replaced; anything else is the user's."""
    names = [p.name for p in directory.iterdir()]
    return not names or "config.json" in names or any(n.endswith(".gguf") for n in names)


def _partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def recipe_fingerprint(plan: Plan, opts: MergeOptions) -> str:
    """What a resumed run must share with the interrupted one: recipe, options and the input files."""
    files = sorted({str(i.file) for m in plan.models for i in (m.info(n) for n in m.tensor_names()) if i.file})
    inputs = []
    for f in files:
        try:
            st = os.stat(f)
            inputs.append([f, st.st_size, st.st_mtime_ns])
        except OSError:
            inputs.append([f, None, None])
    text = json.dumps(
        {
            "recipe": plan.recipe.model_dump(mode="json"),
            "seed": opts.random_seed,
            "shard": opts.out_shard_size,
            "format": opts.out_format,
            "group_size": opts.group_size,
            "inputs": inputs,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def finished_shards(tmp: Path, fingerprint: str) -> dict[str, str]:
    """Shards of an interrupted run that can be kept: same fingerprint, file present, checksum equal."""
    try:
        state = json.loads((tmp / STATE_FILE).read_text())
        shards = state["shards"] if state.get("fingerprint") == fingerprint else {}
        return {
            f: h
            for f, h in shards.items()
            if isinstance(f, str) and "/" not in f and not f.startswith(".") and (tmp / f).is_file() and file_sha256(tmp / f) == h
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # no state, or one cut short: start again


def check_free_space(out: Path, plan: Plan, opts: MergeOptions, tmp: Path, done: dict[str, str]) -> None:
    """Refuse to start a safetensors output that cannot fit on its device (the dry-run estimate)."""
    if opts.out_format != "hf":
        return  # quantized and GGUF sizes are not known exactly before writing
    need = plan.bytes_written - sum((tmp / f).stat().st_size for f in done)
    device = out.parent
    while not device.exists() and device != device.parent:
        device = device.parent  # the output's parents are created later, on the same device
    try:
        free = shutil.disk_usage(device).free
    except OSError:
        return
    if free < need:
        raise OutputError(
            f"not enough free space for {out}: this merge needs about {human_bytes(need)} "
            f"(the dry-run estimate of bytes written) and the device has {human_bytes(free)} free"
        )


def _write_failure(e: BaseException, out: Path, plan: Plan) -> Optional[OutputError]:
    """An OutputError for a failed write (disk full, no permission, I/O error), else None."""
    if isinstance(e, OSError):
        what = "no space left on the device" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
    elif isinstance(e, RuntimeError) and str(e).startswith(MLX_WRITE_ERRORS):
        what = str(e).rstrip(".")
    else:
        return None
    try:
        free = f"; the device has {human_bytes(shutil.disk_usage(out.parent).free)} free"
    except OSError:
        free = ""
    return OutputError(
        f"cannot write {out}: {what}. This merge needs about {human_bytes(plan.bytes_written)} of free space "
        f"(the dry-run estimate){free}. The partial output was removed."
    )


def verify_output(directory: Path, plan: Plan) -> None:
    """Read back what was written, headers only: every planned tensor, in its shape and dtype."""
    from .models import MLX_TO_SAFETENSORS, SafetensorsModel, read_config

    written = SafetensorsModel(directory, read_config(directory))
    for t in plan.outputs:
        info = written.info(t.name) if written.has(t.name) else None
        if info is None or info.shape != tuple(t.shape) or info.dtype != MLX_TO_SAFETENSORS[t.dtype]:
            got = "missing" if info is None else f"{list(info.shape)} {info.dtype}"
            raise OutputError(
                f"verifying {directory} failed: tensor {t.name} should be {list(t.shape)} "
                f"{MLX_TO_SAFETENSORS[t.dtype]}, found {got}; nothing was renamed into place"
            )


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # a kill mid-write leaves the previous state, never a torn one


def write_output(
    plan: Plan,
    out: Path,
    opts: MergeOptions,
    produce: Callable[[Callable[[str, mx.array], None], Callable[[str], bool]], None],
) -> Path:
    """Fill a temporary sibling of `out` through the format's writer, then rename it into place."""
    out = Path(os.path.abspath(out))  # "." or "x/" must still have a parent and a name
    tmp = _partial_dir(out)
    fingerprint = recipe_fingerprint(plan, opts)
    state_path = tmp / STATE_FILE
    done = finished_shards(tmp, fingerprint) if opts.resume and tmp.is_dir() else {}
    check_free_space(out, plan, opts, tmp, done)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not done and tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        for stale in tmp.glob("incomplete-*"):
            stale.unlink()
    except OSError as e:
        raise OutputError(f"cannot create the temporary output {tmp}: {e.strerror or e}") from None

    resumable = not opts.out_format.startswith("gguf")
    try:
        writer = make_writer(
            opts.out_format,
            tmp,
            plan.outputs,
            plan.config,
            max_shard_bytes=opts.out_shard_size,
            tokenizer_dir=_tokenizer_source_dir(plan),
            skip_shards=set(done) if resumable else None,
            group_size=opts.group_size,
        )
        wants = getattr(writer, "wants", lambda name: True)
        # shard files finished so far; safetensors-based outputs resume shard by shard, GGUF does not
        written = getattr(writer, "written", None) if resumable else None
        checksums = getattr(writer, "checksums", {})  # computed while writing, when the writer can

        def save_state() -> None:
            if written is not None:
                for f in written:
                    if f not in done:
                        done[f] = checksums.get(f) or file_sha256(tmp / f)
            _write_json_atomic(state_path, {"fingerprint": fingerprint, "shards": done})

        save_state()

        def write(name: str, array: mx.array) -> None:
            before = len(written) if written is not None else 0
            writer.add(name, array)
            if written is not None and len(written) != before:
                save_state()

        produce(write, wants)
        writer.finish()
        if opts.copy_tokenizer and opts.out_format in ("hf", "mlx-q4", "mlx-q8", "mlx-mxfp4", "bitnet"):
            write_tokenizer(plan, tmp)
        (tmp / "README.md").write_text(model_card(plan))
        if opts.out_format == "hf":
            verify_output(tmp, plan)
        state_path.unlink()
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        if opts.out_format.startswith("gguf") and out.suffix.lower() == ".gguf":
            os.replace(tmp / "model.gguf", out)  # OUT.gguf names the file itself
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except MergeKitError:
        shutil.rmtree(tmp, ignore_errors=True)  # a merge that failed cannot be resumed
        raise
    except (OSError, RuntimeError) as e:
        failure = _write_failure(e, out, plan)
        if failure is None:
            raise  # an unexpected error: keep the partial output, as after an interruption
        shutil.rmtree(tmp, ignore_errors=True)
        raise failure from None
    return out


def _tokenizer_source_dir(plan: Plan) -> Optional[Path]:
    if plan.tokenizer_model is None:
        return None
    return plan.models[plan.tokenizer_model].tokenizer_dir


def write_tokenizer(plan: Plan, out_dir: Path) -> None:
    """The tokenizer files: built by the vocabulary plan, or copied from the tokenizer's model."""
    if plan.vocab is not None:
        plan.vocab.save(out_dir)  # also applies the recipe's chat_template
        return
    src = _tokenizer_source_dir(plan)
    if src is not None:
        copy_tokenizer(src, out_dir)
    if plan.recipe.chat_template:
        from . import tokenizer

        tokenizer.apply_chat_template(out_dir, plan.recipe.chat_template, plan.models)


def model_card(plan: Plan) -> str:
    models = "\n".join(f"- {p}" for p in plan.model_paths)
    return (
        "---\nlibrary_name: mlx\ntags:\n- mergekit\n- mergekit-mlx\n- merge\n---\n"
        f"# Merged model\n\nThis model was made with mergekit-mlx using the **{plan.method.name}** merge method.\n\n"
        f"## Models merged\n\n{models}\n\n"
        f"## Configuration\n\nThe recipe that produced it:\n\n```yaml\n{plan.recipe.to_yaml()}\n```\n"
    )
