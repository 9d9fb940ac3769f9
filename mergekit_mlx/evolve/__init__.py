"""Merge search in memory: mergekit-evolve's configuration, CMA-ES, no candidate written to disk.

The flow, one direction: config.py (the YAML) -> genome.py (a genotype -> a merge recipe) ->
inputs.py (the input models read once, held in memory when they fit) -> merge() in memory ->
`to_mlx_lm()` -> fitness.py (example skills, lm-eval tasks) -> search.py (CMA-ES, checkpoint,
log, plot) -> the best recipe, and the best model through the output lifecycle. command.py is
`mergekit-mlx evolve`.
"""

from .config import EvolveConfig, config_from_dict, load_config
from .search import SearchOptions, SearchResult, search

__all__ = ["EvolveConfig", "SearchOptions", "SearchResult", "config_from_dict", "load_config", "search"]
