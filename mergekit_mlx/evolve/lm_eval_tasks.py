"""lm-eval-harness tasks scored on a model in memory, through lm-eval's Python API.

mlx-lm ships lm-eval's model interface for MLX (`mlx_lm.evaluate.MLXLM`), but it loads a model from
a path; `InMemoryMLXLM` is the same wrapper over a model and tokenizer already built (a candidate
from `MergeResult.to_mlx_lm()`), so nothing is written or loaded per candidate. This module imports
lm-eval (and, through it, torch): it is imported only when a configuration names an lm-eval task.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import math
from collections.abc import Sequence
from pathlib import Path

import lm_eval
import lm_eval.tasks
from lm_eval.api.model import LM
from mlx_lm.evaluate import MLXLM

from ..errors import RecipeError
from .config import EvolveConfig, Task


class InMemoryMLXLM(MLXLM):
    """mlx-lm's lm-eval model over a model and tokenizer in memory (MLXLM itself loads a path)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_tokens: int | None = None, use_chat_template: bool = False):
        LM.__init__(self)
        # the attributes MLXLM.__init__ sets after loading (mlx-lm 0.32), which its methods read
        self._model = model
        self.tokenizer = tokenizer
        self._max_tokens = max_tokens
        self._batch_size = batch_size
        self.use_chat_template = use_chat_template
        self._sampler = None  # greedy


def task_manager(names: Sequence[str], search_paths: Sequence[Path]) -> lm_eval.tasks.TaskManager:
    """A TaskManager that knows every name: the search paths alone when they hold them all (indexing
    lm-eval's own few thousand tasks takes seconds), else with lm-eval's tasks too."""
    paths = [str(p) for p in search_paths]
    if paths:
        manager = lm_eval.tasks.TaskManager(include_path=paths, include_defaults=False)
        if all(n in manager.all_tasks for n in names):
            return manager
    return lm_eval.tasks.TaskManager(include_path=paths or None)


class LmEvalTasks:
    """The lm-eval tasks of a configuration, found and checked once, scored per candidate."""

    def __init__(self, config: EvolveConfig, tasks: list[tuple[int, Task]], search_paths: Sequence[Path], batch_size: int):
        self.config = config
        self.tasks = tasks  # (index in config.tasks, task)
        self.batch_size = batch_size
        names = [t.name for _, t in tasks]
        self.manager = task_manager(names, search_paths)
        known = self.manager.all_tasks
        for i, t in tasks:
            if t.name not in known:
                close = difflib.get_close_matches(t.name, known, n=1, cutoff=0.7)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                where = f"in {', '.join(map(str, search_paths))} or " if search_paths else ""
                raise RecipeError(
                    f"tasks[{i}].name: no lm-eval task {t.name!r} {where}among lm-eval's own tasks{hint} "
                    "(--task-search-path names a folder of task YAML files)"
                )

    def scores(self, model, tokenizer) -> dict[str, float]:
        """Each task's metric for this model, by task name; a metric lm-eval does not report is a
        RecipeError naming the task's `metric` key and the metrics it does report."""
        chat = self.config.apply_chat_template and getattr(tokenizer, "chat_template", None) is not None
        lm = InMemoryMLXLM(model, tokenizer, batch_size=self.batch_size, use_chat_template=chat)
        quiet = io.StringIO()  # lm-eval's and mlx-lm's progress bars and prints, per candidate
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=sorted({t.name for _, t in self.tasks}),
                task_manager=self.manager,
                num_fewshot=self.config.num_fewshot,
                limit=self.config.limit,
                apply_chat_template=chat,
                fewshot_as_multiturn=chat and self.config.fewshot_as_multiturn,
                log_samples=False,
                verbosity="ERROR",
            )
        out = {}
        for i, t in self.tasks:
            reported = (results or {}).get("results", {}).get(t.name, {})
            value = reported.get(t.metric_name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                metrics = [k for k in reported if "," in k and "_stderr," not in k]  # lm-eval's "metric,filter" keys
                raise RecipeError(
                    f"tasks[{i}].metric: lm-eval reports no {t.metric_name!r} for {t.name}; it reports: "
                    f"{', '.join(metrics) or 'nothing'}"
                )
            out[t.name] = float(value) if math.isfinite(value) else math.nan
        return out
