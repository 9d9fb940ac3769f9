"""The search: CMA-ES over a genome; every candidate merged in memory, handed to mlx-lm and scored.

Per candidate: genotype -> recipe (genome.py) -> `merge(recipe, models=inputs)` on inputs read
once (inputs.py) -> `to_mlx_lm()` -> the fitness (fitness.py). Nothing is written per candidate.
After each generation the checkpoint, the log, the best recipe and the plot are written (state.py);
at the end the best recipe is merged once more and written through the output lifecycle.

The budget (`max_fevals`) is exact: the last generation may be cut short, its candidates scored and
logged but not told to the optimiser (a resume with a larger budget completes it and goes on).

Under `mlx.launch` (a `World` of several processes) each generation's candidates are dealt to the
ranks (every size-th candidate to each), every rank merges and scores its own on inputs it holds
itself, and the records are gathered on rank 0, which alone runs the optimiser and writes OUT: the
same candidates, scores, log and best recipe as one process for the same seed.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import distributed
from ..device import use_device
from ..distributed import ALONE, World
from ..errors import ModelError, RecipeError, RunInterrupted, warn_once
from ..formats import open_model
from ..merge import MergeResult, merge
from ..options import MergeOptions
from ..output import check_output_location, hash_files
from ..plan import Plan, make_plan, resolve_model_path
from ..recipe import Recipe
from .config import EvolveConfig, SearchMethod, load_config
from .fitness import Scorer
from .genome import GenomeSpace
from .inputs import hold_inputs
from .plot import fitness_png
from .state import MODEL, TOOL, SearchFolder

DEFAULT_SIGMA0 = 1 / 6  # mergekit-evolve's
DEFAULT_MAX_FEVALS = 100  # mergekit-evolve's
DEFAULT_EVAL_BATCH = 64
MIN_POPSIZE = 4  # with fewer, CMA-ES recombines one candidate and its covariance update divides by zero
FAILED_COST = 1e30  # what the optimiser is told for a candidate that could not be merged (it ranks last)

# settings a resumed search must share with the one it continues (None: the recorded value)
SETTINGS = {"seed": "--seed", "popsize": "--popsize", "sigma0": "--sigma0", "random_seed": "--random-seed"}


@dataclass(frozen=True)
class SearchOptions:
    max_fevals: int = DEFAULT_MAX_FEVALS  # candidates scored, in all (a resume may raise it)
    popsize: int | None = None  # None: CMA-ES's default, 4 + floor(3 ln n) for n parameters
    sigma0: float | None = None  # None: 1/6
    seed: int | None = None  # None: 0; the optimiser's samples (and random_init's start)
    random_seed: int | None = None  # None: 0; the DARE masks of every candidate (`run --random-seed`)
    memory_limit: int | None = None  # bytes for the inputs held in memory; None: 3/4 of what is available
    eval_batch_size: int = DEFAULT_EVAL_BATCH  # lm-eval's batch size
    task_search_paths: tuple[Path, ...] = ()
    device: str | None = None
    use_kernels: bool = True
    allow_crimes: bool = False
    resume: bool = False
    force: bool = False
    progress: bool = False

    def check(self) -> None:
        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not whole(self.max_fevals) or self.max_fevals < 1:
            raise RecipeError(f"--max-fevals: must be a positive whole number of candidates, got {self.max_fevals!r}")
        if self.popsize is not None and (not whole(self.popsize) or self.popsize < MIN_POPSIZE):
            raise RecipeError(
                f"--popsize: CMA-ES needs at least {MIN_POPSIZE} candidates per generation (two to recombine), got {self.popsize!r}"
            )
        if self.sigma0 is not None and not (
            isinstance(self.sigma0, (int, float)) and math.isfinite(self.sigma0) and self.sigma0 > 0
        ):
            raise RecipeError(f"--sigma0: must be a positive number, got {self.sigma0!r}")
        for name in ("seed", "random_seed"):
            v = getattr(self, name)
            if v is not None and (not whole(v) or not 0 <= v < 2**32):
                raise RecipeError(f"{SETTINGS[name]}: must be a whole number from 0 to 2**32 - 1, got {v!r}")
        if not whole(self.eval_batch_size) or self.eval_batch_size < 1:
            raise RecipeError(f"--eval-batch-size: must be a positive whole number, got {self.eval_batch_size!r}")
        if self.memory_limit is not None and (not whole(self.memory_limit) or self.memory_limit < 1):
            raise RecipeError(f"--memory-limit: must be a positive number of bytes, got {self.memory_limit!r}")
        if self.resume and self.force:
            raise RecipeError("--resume and --force: choose one (continue the search, or start over)")


@dataclass
class SearchResult:
    best_recipe: Recipe
    best_fitness: float
    best_scores: dict[str, float]
    best: MergeResult  # the best candidate merged in memory (the model written to `model_path`)
    out: Path
    model_path: Path
    evaluations: int
    generations: int
    inputs: str  # held in memory or streamed, and why
    stopped: str  # why the search ended
    settings: dict[str, Any] = field(default_factory=dict)


def search(
    config: EvolveConfig | str | Path,
    out: str | Path,
    options: SearchOptions | None = None,
    *,
    config_dir: Path | None = None,
    world: World | None = None,
) -> SearchResult | None:
    """Run (or, with options.resume, continue) a search into the folder `out`; see the module's docstring.

    With a `world` of several processes (`distributed.world()` under mlx.launch) every rank calls
    this with the same arguments; rank 0 returns the result, the other ranks None."""
    opts = options or SearchOptions()
    opts.check()
    if not isinstance(config, EvolveConfig):
        config_dir = Path(config).parent
        config = load_config(config)
    w = world or ALONE
    with use_device(opts.device):
        if w.rank != 0:
            return _score_for_rank_0(config, config_dir, opts, w)
        folder = SearchFolder(Path(out), resume=opts.resume, force=opts.force) if w.alone else None
        try:
            if w.alone:
                return _Search(config, config_dir, opts, folder).run()
            # rank 0: the folder, the optimiser and the checkpoint; its failures are every rank's
            folder = distributed.together(w, lambda: SearchFolder(Path(out), resume=opts.resume, force=opts.force))
            searcher = distributed.together(w, lambda: _Search(config, config_dir, opts, folder, w))
            distributed.agree(w, lambda: searcher.settings)  # the other ranks' evaluators need them
            distributed.agree(w, lambda: None)  # ... which they make now
            keeps = f"{folder.out} keeps the generations finished: rerun the same command with --resume to go on"
            try:
                with distributed.stop_on_sigterm(w, keeps):
                    return distributed.together(w, searcher.run)
            except RunInterrupted as e:
                raise RunInterrupted(f"{e}; {keeps}") from None
        finally:
            if folder is not None:
                folder.close()


def _score_for_rank_0(config: EvolveConfig, config_dir: Path | None, opts: SearchOptions, w: World) -> None:
    """A rank other than 0: merge and score the candidates dealt to it, generation after generation,
    until rank 0 says the search is over."""
    distributed.agree(w, lambda: None)  # rank 0 checks OUT
    distributed.agree(w, lambda: None)  # rank 0 reads the checkpoint
    settings = distributed.agree(w, lambda: None)[0]  # and tells the settings
    evaluator = distributed.together(w, lambda: _Evaluator.open(config, config_dir, opts, settings["random_seed"]))
    with distributed.stop_on_sigterm(w, "rank 0's OUT keeps the generations finished: rerun with --resume"):
        while True:
            generation = distributed.agree(w, lambda: None)[0]
            if generation is None:
                break
            mine = distributed.deal_items(generation["todo"], w)
            g, run_index = generation["generation"], generation["run"]
            distributed.agree(w, lambda: [evaluator.candidate(g, i, np.array(x), run_index) for i, x in mine])  # noqa: B023
        distributed.agree(w, lambda: None)  # rank 0 writes the best model


def absolute_reference(ref: str, config_dir: Path | None) -> str:
    """A model reference as the recipes name it: a local path made absolute (the best recipe then
    works from any folder), as a recipe's paths are found (as written, else beside the config); a
    Hub id as written."""
    candidates = [Path(ref).expanduser()]
    if config_dir is not None and not Path(ref).is_absolute():
        candidates.append(config_dir / ref)
    for c in candidates:
        if c.exists():
            return os.path.abspath(c)
    return ref


def open_genome(config: EvolveConfig, config_dir: Path | None, allow_crimes: bool) -> tuple[GenomeSpace, Plan]:
    """The genome's parameter space, and the plan of its starting point (every input opened and the
    whole recipe checked, before any tensor is read)."""
    g = config.genome
    refs = tuple(absolute_reference(r, config_dir) for r in g.models)
    base = absolute_reference(g.base_model, config_dir) if g.base_model else None
    first = open_model(resolve_model_path(refs[0], "genome.models[0]", None))
    layers = first.num_layers
    if g.layer_granularity and layers % g.layer_granularity:
        raise RecipeError(
            f"genome.layer_granularity: {g.layer_granularity} does not divide the {layers} layers of {g.models[0]}; "
            f"use a divisor of {layers} (or 0 for one set of parameters for all layers)"
        )
    tokenizer = g.tokenizer_source
    if tokenizer is not None and tokenizer not in ("base", "union"):
        tokenizer = absolute_reference(tokenizer, config_dir)
    genome = g.model_copy(update={"tokenizer_source": tokenizer})
    space = GenomeSpace(genome, layers, refs, base)
    return space, make_plan(space.recipe(space.initial()), allow_crimes=allow_crimes)


class _Evaluator:
    """Merges and scores genotypes on inputs held once: the part of a search that every rank runs."""

    def __init__(self, config: EvolveConfig, space: GenomeSpace, plan: Plan, opts: SearchOptions, random_seed: int):
        self.space = space
        self.merge_options = MergeOptions(
            random_seed=random_seed,
            device=opts.device,
            use_kernels=opts.use_kernels,
            allow_crimes=opts.allow_crimes,
        ).resolved()
        self.scorer = Scorer(config, opts.task_search_paths, opts.eval_batch_size)  # lm-eval's tasks found, or named
        sources = dict(zip(plan.model_paths, plan.models))
        self.models, self.inputs_note = hold_inputs(
            sources, plan.bytes_written, self.merge_options.batch_bytes, opts.memory_limit
        )

    @classmethod
    def open(cls, config: EvolveConfig, config_dir: Path | None, opts: SearchOptions, random_seed: int) -> _Evaluator:
        space, plan = open_genome(config, config_dir, opts.allow_crimes)
        return cls(config, space, plan, opts, random_seed)

    def candidate(self, g: int, i: int, x: np.ndarray, run_index: int) -> dict[str, Any]:
        """Merge, hand to mlx-lm and score one genotype; a candidate that cannot be merged (weights
        summing to zero under normalize, NaN) is recorded with its error and ranks last."""
        record: dict[str, Any] = {"generation": g, "candidate": i, "run": run_index}
        record["parameters"] = self.space.describe(x)
        start = time.perf_counter()
        try:
            result = merge(self.space.recipe(x), options=self.merge_options, models=self.models)
            model, tokenizer = result.to_mlx_lm()
        except (RecipeError, ModelError) as e:
            record.update(fitness=None, scores={}, error=str(e), seconds={"merge": time.perf_counter() - start, "score": 0.0})
            record["x"] = [float(v) for v in x]
            return record
        merged = time.perf_counter()
        scores = {k: v if math.isfinite(v) else None for k, v in self.scorer.scores(model, tokenizer).items()}
        fitness = self.scorer.fitness(scores) if None not in scores.values() else math.nan
        del model, tokenizer, result
        record.update(
            fitness=fitness if math.isfinite(fitness) else None,
            scores=scores,
            error=None if math.isfinite(fitness) else "a metric is not a number",
            seconds={"merge": merged - start, "score": time.perf_counter() - merged},
        )
        record["x"] = [float(v) for v in x]
        return record


class _Search:
    def __init__(
        self, config: EvolveConfig, config_dir: Path | None, opts: SearchOptions, folder: SearchFolder, world: World = ALONE
    ):
        self.config, self.opts, self.folder, self.world = config, opts, folder, world
        self.space, plan = open_genome(config, config_dir, opts.allow_crimes)
        inputs = [(ref, p) for ref, m in zip(plan.model_paths, plan.models) for p in _input_paths(m)]
        check_output_location(folder.out / MODEL, inputs, force=True)  # before the search, not after it
        files = sorted({str(i.file) for m in plan.models for i in (m.info(n) for n in m.tensor_names()) if i.file})
        self.settings = self._settings()
        self.fingerprint = {
            "config": config.model_dump(mode="json"),
            "models": list(plan.model_paths),
            "dimension": self.space.dimension,
            **self.settings,
        }
        digests = hash_files(files)
        self.state = self._start_state(digests)
        self.evaluator = _Evaluator(config, self.space, plan, opts, self.settings["random_seed"])
        self.merge_options, self.models, self.inputs_note = (
            self.evaluator.merge_options,
            self.evaluator.models,
            self.evaluator.inputs_note,
        )
        folder.open()

    # ---- settings and checkpoint ----

    def _settings(self) -> dict[str, Any]:
        """The optimiser's settings: given, or recorded by the search being resumed, or the defaults."""
        recorded = (self.folder.state or {}).get("settings", {}) if self.opts.resume else {}
        given = {name: getattr(self.opts, name) for name in SETTINGS}
        for name, value in given.items():
            if value is not None and name in recorded and recorded[name] != value:
                raise RecipeError(
                    f"{SETTINGS[name]}: the search in {self.folder.out} ran with {recorded[name]!r}, not {value!r}; "
                    f"resume it with the same value (or leave the flag out), or start over with --force"
                )
        defaults = {
            "seed": 0,
            "popsize": 4 + math.floor(3 * math.log(self.space.dimension)),
            "sigma0": DEFAULT_SIGMA0,
            "random_seed": 0,
        }
        return {name: given[name] if given[name] is not None else recorded.get(name, defaults[name]) for name in SETTINGS}

    def _start_state(self, digests: dict[str, str]) -> dict[str, Any]:
        state = self.folder.state
        if state is not None:
            if state.get("fingerprint") != self.fingerprint:
                before = state.get("fingerprint") or {}
                changed = sorted(k for k in self.fingerprint if before.get(k) != self.fingerprint[k])
                raise RecipeError(
                    f"{self.folder.out}: the search there was started with another {', '.join(changed) or 'setup'}; "
                    "resume it with the same configuration and models, or start over with --force"
                )
            if state.get("inputs") != digests:
                changed = [f for f in digests if (state.get("inputs") or {}).get(f) != digests[f]]
                raise ModelError(
                    f"{changed[0] if changed else 'the inputs'}: changed since the search in {self.folder.out} started, so its "
                    "scores no longer describe these models; start over with --force"
                )
            state["runs"].append({"pid": os.getpid(), "started": time.time(), "at_candidate": _count(state)})
            state["finished"] = False
            return state
        return {
            "tool": TOOL,
            "version": 1,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "inputs": digests,
            "labels": self.space.labels(),
            "generations": [],
            "runs": [{"pid": os.getpid(), "started": time.time(), "at_candidate": 0}],
            "finished": False,
        }

    def _checkpoint(self) -> None:
        lines = [json.dumps(c) for g in self.state["generations"] for c in g]
        self.folder.save(self.state, lines)
        best = self._best()
        if best is not None:
            self.folder.write_best(self._best_yaml(best))
        fits = [[c["fitness"] if c["fitness"] is not None else math.nan for c in g] for g in self.state["generations"]]
        title = f"{self.config.genome.merge_method.value}: {_count(self.state)} candidates, popsize {self.settings['popsize']}"
        self.folder.write_plot(fitness_png(fits, title))

    def _best(self) -> dict | None:
        scored = [c for g in self.state["generations"] for c in g if c["fitness"] is not None]
        return max(scored, key=lambda c: c["fitness"], default=None)  # the first of equals

    def _best_yaml(self, best: dict) -> str:
        recipe = self.space.recipe(np.array(best["x"]))
        seed = self.settings["random_seed"]
        scores = ", ".join(f"{k} {v:.4f}" for k, v in best["scores"].items())
        flag = f" --random-seed {seed}" if seed and self.config.genome.merge_method is SearchMethod.DARE_TIES else ""
        return (
            f"# the best of {_count(self.state)} candidates of {TOOL} (generation {best['generation']}, candidate "
            f"{best['candidate']}): fitness {best['fitness']:.6g} ({scores})\n"
            f"# mergekit-mlx run best.yml OUT{flag}   merges it again, bit for bit\n" + recipe.to_yaml() + "\n"
        )

    # ---- the loop ----

    def run(self) -> SearchResult:
        from cmaes import CMA

        popsize, opts = self.settings["popsize"], self.opts
        rng = np.random.default_rng(self.settings["seed"]) if self.config.random_init else None
        optimizer = CMA(
            mean=self.space.initial(rng), sigma=self.settings["sigma0"], seed=self.settings["seed"], population_size=popsize
        )
        generations = self.state["generations"]
        pending: list[np.ndarray] | None = None
        for cands in generations:  # the optimiser's state, replayed from the history
            asked = [optimizer.ask() for _ in range(popsize)]
            if not all(np.array_equal(a, c["x"]) for a, c in zip(asked, cands)):
                # another machine's linear algebra rounds differently: the recorded candidates are told
                # as they were, and the samples drawn from here on differ slightly from an unbroken run
                warn_once("evolve-replay", f"replaying the search in {self.folder.out} drew other samples than it recorded")
            if len(cands) == popsize:
                optimizer.tell([(np.array(c["x"]), _cost(c)) for c in cands])
            else:
                pending = asked  # the last generation, cut short by the previous budget
        done = _count(self.state)
        bar = _progress_bar(opts, done)
        started, scored_here = time.perf_counter(), 0
        stopped = f"budget of {opts.max_fevals} candidates"
        run_index = len(self.state["runs"]) - 1
        try:
            while done < opts.max_fevals:
                if pending is not None:
                    xs, cands, pending = pending, generations[-1], None
                else:
                    if optimizer.should_stop():
                        stopped = "CMA-ES stopped (cmaes' should_stop: the search converged)"
                        break
                    xs, cands = [optimizer.ask() for _ in range(popsize)], []
                    generations.append(cands)
                g = len(generations) - 1
                todo = [(i, xs[i]) for i in range(len(cands), min(popsize, len(cands) + opts.max_fevals - done))]
                for record in self._score(g, todo, run_index):
                    cands.append(record)
                    done += 1
                    scored_here += 1
                    if bar is not None:
                        rate = scored_here / max(time.perf_counter() - started, 1e-9) * 60
                        best = self._best()
                        shown = f"{best['fitness']:.4f}" if best else "-"
                        bar.set_postfix_str(f"generation {g}, best {shown}, {rate:.1f} candidates/min")
                        bar.update(1)
                if len(cands) == popsize:
                    optimizer.tell([(np.array(c["x"]), _cost(c)) for c in cands])
                self._checkpoint()
                if bar is not None:
                    ok = [c["fitness"] for c in cands if c["fitness"] is not None]
                    best = self._best()
                    bar.write(
                        f"generation {g}: best {max(ok, default=math.nan):.4f}, mean {np.mean(ok) if ok else math.nan:.4f}; "
                        f"best so far {best['fitness'] if best else math.nan:.4f}"
                    )
        finally:
            if bar is not None:
                bar.close()
        if not self.world.alone:
            distributed.agree(self.world, lambda: None)  # no more generations: the other ranks wait for the end
        return self._finish(stopped)

    def _score(self, g: int, todo: list[tuple[int, np.ndarray]], run_index: int):
        """The records of these candidates (index, genotype), in order: scored here one by one, or
        under mlx.launch dealt to the ranks and gathered."""
        if self.world.alone:
            for i, x in todo:
                yield self.evaluator.candidate(g, i, x, run_index)
            return
        sent = [(i, [float(v) for v in x]) for i, x in todo]  # floats survive JSON exactly
        distributed.agree(self.world, lambda: {"generation": g, "run": run_index, "todo": sent})
        mine = distributed.deal_items(sent, self.world)
        gathered = distributed.agree(
            self.world, lambda: [self.evaluator.candidate(g, i, np.array(x), run_index) for i, x in mine]
        )
        yield from sorted((r for records in gathered for r in records), key=lambda r: r["candidate"])

    def _finish(self, stopped: str) -> SearchResult:
        best = self._best()
        if best is None:
            self._checkpoint()
            errors = [c["error"] for g in self.state["generations"] for c in g if c.get("error")]
            raise RecipeError(f"no candidate could be merged and scored ({errors[0] if errors else 'none was evaluated'})")
        recipe = self.space.recipe(np.array(best["x"]))
        result = merge(recipe, options=self.merge_options, models=self.models)
        model_path = result.save(self.folder.out / MODEL, force=True)
        self.state["finished"] = True
        self.state["stopped"] = stopped
        self._checkpoint()
        return SearchResult(
            best_recipe=recipe,
            best_fitness=best["fitness"],
            best_scores=dict(best["scores"]),
            best=result,
            out=self.folder.out,
            model_path=model_path,
            evaluations=_count(self.state),
            generations=len(self.state["generations"]),
            inputs=self.inputs_note,
            stopped=stopped,
            settings=dict(self.settings),
        )


def _count(state: dict) -> int:
    return sum(len(g) for g in state["generations"])


def _cost(candidate: dict) -> float:
    return -candidate["fitness"] if candidate["fitness"] is not None else FAILED_COST


def _input_paths(model) -> list[Path]:
    paths = getattr(model, "input_paths", None)
    return paths() if paths is not None else [model.path]


def _progress_bar(opts: SearchOptions, done: int):
    if not opts.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=opts.max_fevals, initial=done, unit="candidate", desc="evolve", dynamic_ncols=True)
