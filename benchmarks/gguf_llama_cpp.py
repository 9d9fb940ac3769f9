"""Do this project's GGUF exports load and compute right in llama.cpp?

For each architecture the GGUF exporter claims (the keys of
`mergekit_mlx.formats.gguf.architectures.ARCHITECTURES`, or `--arch`), in both config styles
(transformers 5 as written, transformers 4 as rewritten by tests/arch_models.py):

1. builds the tiny random family of tests/arch_models.py (a base and two fine-tunes, float32), with
   a byte-level BPE tokenizer of 320 tokens (llama.cpp needs a vocabulary type it knows); MoE models
   route every token to every expert here, so that a near-tie in a router, which float16 rounding
   can flip, does not pass for a wrong file (a wrong expert order still gives experts wrong weights);
2. merges it with a TIES recipe through the command line, three times: `--out-format hf`
   (safetensors), `gguf-f16` and `gguf-q8_0`;
3. loads each GGUF in llama.cpp (llama-cpp-python, in a child process, so that an abort in
   llama.cpp is a failed row and not a dead script; its log is kept and its error lines reported),
   evaluates a fixed sequence of 12 tokens and reads the logits of every position;
4. compares them, in float32, with the logits of the safetensors output in mlx-lm and in
   transformers (torch, CPU), the definition of each architecture, which decides when the two differ
   (mlx-lm 0.32's Gemma 2 has no sliding window): the largest absolute difference, how many
   positions share the argmax. They agree within 1 % of the largest |logit|; a wrong layout or
   metadata value is off by about the size of the logits themselves. The q8_0 file is compared with
   transformers (else mlx-lm) on the very weights the file holds (read back, step 5), within 10 %:
   llama.cpp also rounds the activations to 8 bits in q8_0 products, which alone moves these tiny
   random models' logits by several percent (compare llama.cpp on the same weights stored as f16);
5. reads each GGUF back with this project's reader (`mergekit-mlx convert FILE.gguf DIR`): every
   tensor of the f16 file equals the safetensors output's, exactly or rounded to float16, and mlx-lm
   runs the read-back directory (its config rebuilt from the GGUF metadata) with the logits it gives
   the safetensors output, within 1 %.

Prints the problems found, then, last, a Markdown table. Exits 1 when any check fails for an
architecture the exporter claims, 2 when llama-cpp-python is missing.

    python benchmarks/gguf_llama_cpp.py                  # every claimed architecture, both styles
    python benchmarks/gguf_llama_cpp.py --arch llama,qwen3 --style transformers4
    python benchmarks/gguf_llama_cpp.py --arch all       # every tiny architecture, claimed or not
    python benchmarks/gguf_llama_cpp.py --keep /tmp/g    # keep models, files and llama.cpp logs
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import arch_models  # noqa: E402
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from format_models import bpe_tokenizer_json  # noqa: E402
from tiny import load_np  # noqa: E402

from mergekit_mlx.mlx_lm_config import load as load_mlx_lm  # noqa: E402

FALLBACK = ["llama", "mistral", "qwen2", "qwen3"]
VOCAB = 320  # 256 byte tokens, 2 special tokens, merges
TOKENS = [0, 17, 45, 100, 203, 260, 7, 311, 66, 259, 2, 290]
TOLERANCE = {"gguf-f16": 0.01, "gguf-q8_0": 0.10}  # of the largest |logit|
ERROR_LINE = re.compile(r"error|fail|unknown|invalid|unsupported|missing|not found|assert|abort|wrong|exception", re.I)

LLAMA_CPP_CHILD = r"""
import sys
import numpy as np
import llama_cpp
path, out, tokens = sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3].split(",")]
llm = llama_cpp.Llama(model_path=path, logits_all=True, n_ctx=64, verbose=True)
llm.eval(tokens)
np.save(out, np.array(llm.scores[: len(tokens)], dtype=np.float32))
"""


@dataclass
class Row:
    name: str
    style: str
    claimed: bool
    scale: float = 1.0  # the largest |logit| of the safetensors output
    loads: bool = False
    f16_mlx_lm: float | None = None  # llama.cpp's f16 logits against mlx-lm's
    f16_transformers: float | None = None  # ... and against transformers'
    same_argmax: tuple[int, int] | None = None
    q8_loads: bool = False
    q8_diff: float | None = None  # against the reference on the weights the q8_0 file holds
    round_trip: str = "-"
    problems: list[str] = field(default_factory=list)

    def within(self, diff: float | None, fmt: str) -> bool:
        return diff is not None and diff <= TOLERANCE[fmt] * self.scale

    def differs(self, what: str, diff: float) -> str:
        return f"{what} differ by up to {diff:.3g} (largest |logit| {self.scale:.3g})"

    @property
    def failed(self) -> bool:
        return self.claimed and bool(self.problems)


# ---- inputs -------------------------------------------------------------------------------------


def claimed_architectures() -> tuple[list[str], str | None]:
    """The model_types the GGUF exporter claims, and a note when its table could not be read."""
    try:
        from mergekit_mlx.formats.gguf.architectures import ARCHITECTURES
    except Exception as e:  # the exporter's table is being written; say so and check the usual four
        return FALLBACK, f"mergekit_mlx.formats.gguf.architectures did not import ({type(e).__name__}: {e}); checking {FALLBACK}"
    return sorted(ARCHITECTURES), None


def selected(arch: str | None, claimed: list[str]) -> list[str]:
    """Tiny-model names to check: a model_type selects itself and its variants ("llama+rope_llama3")."""
    if arch == "all":
        return list(arch_models.ARCHITECTURES)
    wanted = arch.split(",") if arch else claimed
    names = [n for n in arch_models.ARCHITECTURES if n in wanted or arch_models.model_type(n) in wanted]
    for w in wanted:
        if w not in names and not any(arch_models.model_type(n) == w for n in names):
            print(f"{w}: no tiny model of this architecture in tests/arch_models.py, not checked")
    return names


def every_expert(name: str) -> dict:
    """Config overrides routing each token to every expert of an MoE architecture."""
    args = arch_models.ARCHITECTURES[name]
    experts = args.get("num_local_experts", args.get("num_experts"))
    return {"num_experts_per_tok": experts} if experts and "num_experts_per_tok" in args else {}


def write_tokenizer(path: Path, vocab: int) -> None:
    (path / "tokenizer.json").write_text(bpe_tokenizer_json(vocab))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"})
    )


def ties_recipe(paths: list[Path]) -> dict:
    base, ft1, ft2 = map(str, paths)
    return {
        "merge_method": "ties",
        "base_model": base,
        "models": [
            {"model": ft1, "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": ft2, "parameters": {"weight": 0.6, "density": 0.5}},
        ],
        "dtype": "float32",
    }


# ---- running things -----------------------------------------------------------------------------


def mergekit(*args: str) -> str | None:
    """Run the mergekit-mlx command line; None on success, else its last lines of output."""
    # --force: the outputs are this script's own, from an earlier run with --keep
    done = subprocess.run(
        [sys.executable, "-m", "mergekit_mlx", *args, "--no-progress", "--force"], capture_output=True, text=True
    )
    if done.returncode == 0:
        return None
    return " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])


def llama_cpp_logits(path: Path, log: Path) -> tuple[np.ndarray | None, str | None]:
    """llama.cpp's logits for TOKENS (positions x vocabulary), or None and its error lines."""
    out = path.with_suffix(".logits.npy")
    done = subprocess.run(
        [sys.executable, "-c", LLAMA_CPP_CHILD, str(path), str(out), ",".join(map(str, TOKENS))], capture_output=True, text=True
    )
    log.write_text(done.stdout + done.stderr)
    if done.returncode == 0:
        return np.load(out), None
    lines = [ln.strip() for ln in (done.stdout + done.stderr).splitlines() if ERROR_LINE.search(ln)]
    return None, " | ".join(dict.fromkeys(lines[-6:])) or f"exit status {done.returncode}, no error line (log: {log})"


def mlx_lm_logits(path: Path) -> np.ndarray:
    model, _ = load_mlx_lm(path)
    return np.array(model(mx.array([TOKENS]))[0].astype(mx.float32))


def transformers_logits(path: Path) -> np.ndarray | None:
    """transformers' float32 logits on the CPU; None without torch and transformers."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].float().numpy()


def reference_logits(path: Path) -> np.ndarray:
    """transformers' logits where it runs, else mlx-lm's."""
    got = transformers_logits(path)
    return got if got is not None else mlx_lm_logits(path)


def read_back(gguf_file: Path, back: Path) -> str | None:
    """`mergekit-mlx convert FILE.gguf DIR`; None on success, else what went wrong."""
    err = mergekit("convert", str(gguf_file), str(back))
    return f"read back: convert failed: {err}" if err else None


def tensors_match(want: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> str | None:
    """None when every tensor came back as it was or rounded to float16 (llama.cpp keeps norms and
    other 1-D tensors in float32; Gemma's norms, stored as 1 + w, come back within float32 rounding)."""
    if sorted(want) != sorted(got):
        return f"tensor names differ: missing {sorted(set(want) - set(got))[:3]}, extra {sorted(set(got) - set(want))[:3]}"
    off = {}
    for k, w in want.items():
        as_f16 = w.astype(np.float16).astype(np.float64)
        f32_rounding = np.abs(got[k] - w) <= 2 * np.finfo(np.float32).eps * (1 + np.abs(w))
        if not (np.array_equal(got[k], as_f16) or f32_rounding.all()):
            off[k] = float(np.abs(got[k] - w).max())
    if off:
        return f"{len(off)} tensors off by more than float16 rounding, e.g. {min(off)} by {off[min(off)]:.3g}"
    return None


# ---- the checks ---------------------------------------------------------------------------------


def check(name: str, style: str, claimed: bool, work: Path) -> Row:
    row = Row(name, style, claimed)
    fam = arch_models.build_family(
        name, work / "family", style, vocab=VOCAB, write_tokenizer=write_tokenizer, overrides=every_expert(name)
    )
    recipe = work / "recipe.yml"
    recipe.write_text(json.dumps(ties_recipe(fam.paths)))  # JSON is YAML
    hf = work / "hf"
    if err := mergekit("run", str(recipe), str(hf), "--out-format", "hf"):
        row.problems.append(f"merge to safetensors failed: {err}")
        return row
    mlx_ref = mlx_lm_logits(hf)
    try:
        tf_ref = transformers_logits(hf)
    except Exception as e:  # an architecture this transformers does not run: mlx-lm's logits decide
        print(f"{name} ({style}): note: transformers does not run the safetensors output ({type(e).__name__}: {e})")
        tf_ref = None
    row.scale = max(float(np.abs(tf_ref if tf_ref is not None else mlx_ref).max()), 1e-6)
    if tf_ref is not None and not row.within(float(np.abs(mlx_ref - tf_ref).max()), "gguf-f16"):
        print(
            f"{name} ({style}): note: " + row.differs("mlx-lm's and transformers' logits", float(np.abs(mlx_ref - tf_ref).max()))
        )
    for fmt in ("gguf-f16", "gguf-q8_0"):
        out = work / f"{fmt}.gguf"
        if err := mergekit("run", str(recipe), str(out), "--out-format", fmt):
            row.problems.append(f"{fmt}: export failed: {err}")
            continue
        logits, err = llama_cpp_logits(out, work / f"{fmt}.llama_cpp.log")
        if logits is None:
            row.problems.append(f"{fmt}: llama.cpp does not load it: {err}")
        elif logits.shape != mlx_ref.shape:
            row.problems.append(f"{fmt}: llama.cpp's logits have shape {logits.shape}, the reference's {mlx_ref.shape}")
            logits = None
        back = work / f"{fmt}.back"
        if err := read_back(out, back):
            row.problems.append(f"{fmt}: {err}")
            back = None
        if fmt == "gguf-f16":
            check_f16(row, logits, mlx_ref, tf_ref)
            row.round_trip = check_round_trip(row, hf, back, mlx_ref)
        else:
            check_q8_0(row, logits, hf, back, work / "q8_0.weights")
    return row


def check_f16(row: Row, logits: np.ndarray | None, mlx_ref: np.ndarray, tf_ref: np.ndarray | None) -> None:
    row.loads = logits is not None
    if not row.loads:
        return
    ref = tf_ref if tf_ref is not None else mlx_ref
    row.f16_mlx_lm = float(np.abs(logits - mlx_ref).max())
    row.f16_transformers = None if tf_ref is None else float(np.abs(logits - tf_ref).max())
    row.same_argmax = int((logits.argmax(-1) == ref.argmax(-1)).sum()), len(TOKENS)
    diff = row.f16_transformers if tf_ref is not None else row.f16_mlx_lm
    if not row.within(diff, "gguf-f16"):
        reference = "transformers'" if tf_ref is not None else "mlx-lm's"
        row.problems.append("gguf-f16: " + row.differs(f"llama.cpp's logits and {reference}", diff))


def check_round_trip(row: Row, hf: Path, back: Path | None, mlx_ref: np.ndarray) -> str:
    """The round-trip cell of the f16 file; a failed part is also added to the row's problems."""
    if back is None:
        return "**convert failed**"
    if mismatch := tensors_match(load_np(hf), load_np(back)):
        row.problems.append(f"gguf-f16: read back: {mismatch}")
        return f"**{mismatch}**"
    try:
        diff = float(np.abs(mlx_lm_logits(back) - mlx_ref).max())
    except Exception as e:
        row.problems.append(f"gguf-f16: read back: mlx-lm fails on the read-back directory: {type(e).__name__}: {e}")
        return f"tensors match; **mlx-lm fails: {type(e).__name__}: {e}**"
    if not row.within(diff, "gguf-f16"):
        row.problems.append(
            "gguf-f16: read back: " + row.differs("mlx-lm's logits of the read-back model and of the original", diff)
        )
        return f"tensors match; **logits differ by {diff:.2g}**"
    return f"tensors match; logits agree (Δ {diff:.2g})"


def check_q8_0(row: Row, logits: np.ndarray | None, hf: Path, back: Path | None, weights: Path) -> None:
    """llama.cpp's q8_0 logits against the reference run on the file's own weights: the read-back
    tensors under the safetensors output's config (so a config read-back problem does not count)."""
    row.q8_loads = logits is not None
    if logits is None or back is None:
        return
    shutil.rmtree(weights, ignore_errors=True)
    shutil.copytree(hf, weights)
    for f in weights.glob("*.safetensors"):
        f.unlink()
    for f in back.glob("*.safetensors"):
        shutil.copy(f, weights / f.name)
    try:
        ref = reference_logits(weights)
    except Exception as e:
        row.problems.append(f"gguf-q8_0: the reference does not run on the file's weights: {type(e).__name__}: {e}")
        return
    row.q8_diff = float(np.abs(logits - ref).max())
    if not row.within(row.q8_diff, "gguf-q8_0"):
        row.problems.append(
            "gguf-q8_0: " + row.differs("llama.cpp's logits and the reference's on the same weights", row.q8_diff)
        )


# ---- report -------------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    def diff(d: float | None, r: Row, fmt: str) -> str:
        return "-" if d is None else f"{d:.2g}" + ("" if r.within(d, fmt) else " **disagree**")

    lines = [
        "| arch | config style | loads in llama.cpp | max \\|Δlogit\\| vs mlx-lm (f16) | vs transformers (f16) "
        "| same argmax | q8_0 loads (max \\|Δlogit\\|) | round trip |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        arch = r.name if r.claimed else f"{r.name} (not claimed)"
        argmax = "-" if r.same_argmax is None else f"{r.same_argmax[0]}/{r.same_argmax[1]}"
        loads = "yes" if r.loads else "**no**"
        q8 = ("yes" if r.q8_loads else "**no**") + ("" if r.q8_diff is None else f" ({diff(r.q8_diff, r, 'gguf-q8_0')})")
        mlx_lm = "-" if r.f16_mlx_lm is None else f"{r.f16_mlx_lm:.2g} of {r.scale:.2g}"
        lines.append(
            f"| {arch} | {r.style} | {loads} | {mlx_lm} | {diff(r.f16_transformers, r, 'gguf-f16')} | {argmax} | {q8} | {r.round_trip} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", help="comma-separated model_types or tiny-model names (default: those the exporter claims); 'all'")
    p.add_argument("--style", choices=(*arch_models.STYLES, "both"), default="both", help="config style of the inputs")
    p.add_argument("--keep", type=Path, help="keep the models, GGUF files and llama.cpp logs under this folder")
    args = p.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed (pip install llama-cpp-python)", file=sys.stderr)
        return 2
    claimed, note = claimed_architectures()
    print(f"llama-cpp-python {llama_cpp.__version__}; " + (note or f"the GGUF exporter claims {', '.join(claimed)}"))
    styles = arch_models.STYLES if args.style == "both" else (args.style,)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gguf-llama-cpp-") as tmp:
        root = args.keep or Path(tmp)
        for name in selected(args.arch, claimed):
            for style in styles:
                work = root / name.replace("+", "-") / style
                work.mkdir(parents=True, exist_ok=True)
                row = check(name, style, arch_models.model_type(name) in claimed, work)
                for problem in row.problems:
                    print(f"{name} ({style}): {problem}")
                rows.append(row)
    print()
    print(table(rows))
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
