"""`mergekit-mlx example`: the whole job on the shipped example, in one command.

Merges the two example fine-tunes onto their base with a shipped recipe, scores base, fine-tunes and
merge on both example skills (held-out prompts), prints the table, and generates from the merge
with mlx-lm.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .arguments import Parser

HELP = "merge, score and sample the shipped example models"

DEFAULT_RECIPE = "examples/configs/ties.yml"


def main(argv: list[str] | None = None) -> int:
    from . import evaluate
    from .merge import merge

    parser = Parser(prog="mergekit-mlx example", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"recipe to run (default {DEFAULT_RECIPE})")
    parser.add_argument("--out", default="out/example", help="where the merge is written (default out/example)")
    parser.add_argument("--n", type=int, default=200, help="held-out prompts per skill (default 200)")
    args = parser.parse_args(argv)

    if not Path(args.recipe).exists():
        print(f"mergekit-mlx example: {args.recipe} not found; run it from the repository's root", file=sys.stderr)
        return 2
    start = time.perf_counter()
    result = merge(args.recipe, args.out, force=True)
    took = time.perf_counter() - start
    plan = result.plan
    print(f"merged {len(plan.model_paths)} models with {plan.method.name} into {args.out} in {took:.1f} s\n")

    models = [str(m.path) for m in plan.models] + [args.out]
    rows = evaluate.evaluate_models(models, evaluate.TASKS, args.n)
    print(evaluate.format_table(rows))
    print(f"(exact-match accuracy on {args.n} held-out prompts per skill)\n")

    from mlx_lm import generate, load

    model, tokenizer = load(args.out)
    for task in evaluate.TASKS:
        for example in evaluate.held_out_examples(task, 3, seed=1):
            text = generate(model, tokenizer, prompt=example.prompt, max_tokens=16)
            got = text.splitlines()[0] if text else ""
            mark = "right" if got.strip() == example.answer else f"expected {example.answer}"
            print(f"merge> {example.prompt}{got}   ({mark})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
