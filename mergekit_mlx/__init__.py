"""mergekit-mlx: merge language models with MLX, from mergekit's YAML recipes."""

from .errors import MergeKitError, ModelError, OutputError, RecipeError
from .merge import MergeResult, merge
from .options import MergeOptions
from .recipe import Recipe, load_recipe

__all__ = [
    "MergeKitError",
    "MergeOptions",
    "MergeResult",
    "ModelError",
    "OutputError",
    "Recipe",
    "RecipeError",
    "load_recipe",
    "merge",
]
__version__ = "0.1.0"
