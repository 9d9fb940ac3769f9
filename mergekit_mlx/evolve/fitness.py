"""A candidate's fitness: the sum over the configuration's tasks of weight x metric, on a model in memory.

Example tasks (`example:add`, `example:reverse`) score exact-match accuracy of greedy decoding on
prompts of the held-out split that `mergekit-mlx eval` never scores (evaluate.search_examples), so
a search is judged afterwards on prompts it did not see. Any other task is an lm-eval-harness task
(found in `--task-search-path` folders, else among lm-eval's own), run through lm-eval's Python API
with mlx-lm's model wrapper over the model in memory; lm-eval is imported only then.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..errors import RecipeError
from ..evaluate import exact_match, search_examples
from .config import EvolveConfig


class Scorer:
    """Scores models on the configuration's tasks; built once per search (prompts drawn, lm-eval's
    tasks found and checked before the first candidate)."""

    def __init__(self, config: EvolveConfig, task_search_paths: Sequence[Path] = (), eval_batch_size: int = 64):
        self.config = config
        self.prompts = {t.name: search_examples(t.skill, config.example_prompts) for t in config.tasks if t.is_example}
        lm_eval_tasks = [(i, t) for i, t in enumerate(config.tasks) if not t.is_example]
        self.lm_eval = None
        if lm_eval_tasks:
            try:
                from .lm_eval_tasks import LmEvalTasks
            except ImportError as e:
                i, t = lm_eval_tasks[0]
                raise RecipeError(
                    f"tasks[{i}].name: {t.name!r} is an lm-eval task, and lm-eval cannot be imported ({e}); "
                    "install it with pip install 'mergekit-mlx[evolve]', or use the example tasks (example:add, example:reverse)"
                ) from None
            self.lm_eval = LmEvalTasks(config, lm_eval_tasks, task_search_paths, eval_batch_size)

    def scores(self, model, tokenizer) -> dict[str, float]:
        """Each task's metric, by task name."""
        out = {name: exact_match(model, tokenizer, exs) for name, exs in self.prompts.items()}
        if self.lm_eval is not None:
            out.update(self.lm_eval.scores(model, tokenizer))
        return {t.name: out[t.name] for t in self.config.tasks}

    def fitness(self, scores: dict[str, float]) -> float:
        """The weighted sum the search maximises (NaN when a metric is not a number)."""
        total = sum(t.weight * scores[t.name] for t in self.config.tasks)
        return total if math.isfinite(total) else math.nan
