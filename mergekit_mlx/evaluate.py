"""Score models on the example skills: exact-match accuracy of greedy mlx-lm generation.

The skills are the ones the embedded example models were fine-tuned on (see examples/README.md).
Each prompt belongs to the training or the held-out split by a hash of its text, so the score
counts only prompts that no training run saw.

    mergekit-mlx eval examples/models/base examples/models/add --task add --n 200
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import mlx.nn as nn

from . import mlx_lm_config
from .arguments import Parser, add_common_arguments
from .device import use_device
from .errors import ModelError
from .formats import open_model

HELP = "score models on the example skills"


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def _addition(rng: random.Random) -> Example:
    # operands up to two digits: multi-digit addition with carries, learnable in minutes on a CPU
    a, b = rng.randrange(100), rng.randrange(100)
    return Example(f"{a}+{b}=", str(a + b))


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _reversal(rng: random.Random) -> Example:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
    return Example(f"reverse {word}=", word[::-1])


# task name -> function drawing one random example
GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "add": _addition,
    "reverse": _reversal,
}
TASKS: tuple[str, ...] = tuple(GENERATORS)

HELD_OUT_EVERY = 8  # one prompt in eight (by hash) is held out from training


def is_held_out(prompt: str) -> bool:
    """Whether `prompt` belongs to the held-out split; a hash, so it is the same on every run."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return digest[0] % HELD_OUT_EVERY == 0


def examples(task: str, seed: int | str, held_out: bool) -> Iterator[Example]:
    """An endless stream of random examples of `task` from one split (training or held-out)."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{seed}")
    draw = GENERATORS[task]
    while True:
        ex = draw(rng)
        if is_held_out(ex.prompt) == held_out:
            yield ex


def held_out_examples(task: str, n: int, seed: int = 0) -> list[Example]:
    """`n` distinct held-out examples of `task`, the same list for the same seed."""
    seen: dict[str, Example] = {}
    for ex in examples(task, seed, held_out=True):
        seen.setdefault(ex.prompt, ex)
        if len(seen) == n:
            break
    return list(seen.values())


EVALUATION_PROMPTS = 200  # the held-out prompts `eval` and `example` score by default (seed 0)


def search_examples(task: str, n: int, seed: int = 0) -> list[Example]:
    """`n` distinct prompts for a search's fitness: from the held-out split (no training run saw
    them), never one of the first EVALUATION_PROMPTS held-out prompts of seed 0 that `eval` scores,
    so a search is judged on prompts it was never scored on."""
    scored = {ex.prompt for ex in held_out_examples(task, EVALUATION_PROMPTS, seed=0)}
    seen: dict[str, Example] = {}
    for ex in examples(task, seed=f"search:{seed}", held_out=True):
        if ex.prompt not in scored:
            seen.setdefault(ex.prompt, ex)
            if len(seen) == n:
                break
    return list(seen.values())


def greedy_complete(model: nn.Module, tokenizer, prompts: Sequence[str], max_tokens: int = 8) -> list[str]:
    """Greedy continuations of `prompts`, all decoded in one batch, stopped at end-of-sequence."""
    from mlx_lm import batch_generate

    tokens = [tokenizer.encode(p) for p in prompts]
    out = batch_generate(
        model,
        tokenizer,
        tokens,
        max_tokens=max_tokens,
        completion_batch_size=len(tokens),
        prefill_batch_size=len(tokens),
    )
    return out.texts


def evaluate(model: nn.Module, tokenizer, task: str, n: int = 200, seed: int = 0) -> float:
    """Exact-match accuracy of `model` on `n` held-out prompts of `task` (greedy decoding)."""
    return exact_match(model, tokenizer, held_out_examples(task, n, seed))


def exact_match(model: nn.Module, tokenizer, exs: Sequence[Example]) -> float:
    """The fraction of `exs` whose greedy continuation is exactly the answer (surrounding spaces aside)."""
    longest = max(len(tokenizer.encode(ex.answer, add_special_tokens=False)) for ex in exs)
    texts = greedy_complete(model, tokenizer, [ex.prompt for ex in exs], max_tokens=longest + 2)
    hits = sum(text.strip() == ex.answer for text, ex in zip(texts, exs))
    return hits / len(exs)


ModelSpec = Union[str, Path, tuple]  # noqa: UP007 (a runtime alias) - a directory, or (name, model, tokenizer)


@dataclass
class Row:
    model: str
    scores: dict[str, float]  # task -> accuracy

    @property
    def average(self) -> float:
        return sum(self.scores.values()) / len(self.scores)


def _load(spec: ModelSpec) -> tuple[str, nn.Module, object]:
    if isinstance(spec, tuple):
        return spec
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a model directory (no config.json)")
    open_model(path)  # every file mlx-lm will read is checked first (regular, inside the directory)
    model, tokenizer = mlx_lm_config.load(path)  # transformers-5 configs read as mlx-lm 0.32 expects
    return str(spec), model, tokenizer


def evaluate_models(models: Sequence[ModelSpec], tasks: Sequence[str] = TASKS, n: int = 200, seed: int = 0) -> list[Row]:
    """One row per model: its accuracy on each task. A model is a directory or (name, model, tokenizer)."""
    unknown = [t for t in tasks if t not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; valid tasks: {', '.join(TASKS)}")
    rows = []
    for spec in models:
        name, model, tokenizer = _load(spec)
        rows.append(Row(name, {t: evaluate(model, tokenizer, t, n, seed) for t in tasks}))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table: one row per model, one column per task, then the average."""
    tasks = list(rows[0].scores) if rows else []
    header = ["model", *tasks, "average"]
    body = [[r.model, *(f"{r.scores[t]:.3f}" for t in tasks), f"{r.average:.3f}"] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(header), rule, *(fmt(line) for line in body)])


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        prog="mergekit-mlx eval",
        description="Exact-match accuracy of models on the example skills (held-out prompts, greedy decoding).",
    )
    parser.add_argument("models", nargs="+", metavar="MODEL", help="model directories (Hugging Face or MLX layout)")
    parser.add_argument("--task", action="append", choices=TASKS, help="skill to score (repeatable; default: all)")
    parser.add_argument("--n", type=int, default=200, help="held-out prompts per skill (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="which held-out prompts are drawn (default: 0)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    tasks = args.task or list(TASKS)
    start = time.perf_counter()
    with use_device(args.device):
        rows = evaluate_models(args.models, tasks, args.n, args.seed)  # a ModelError exits 2 (cli.main)
    print(format_table(rows))
    print(f"({args.n} held-out prompts per skill, {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
