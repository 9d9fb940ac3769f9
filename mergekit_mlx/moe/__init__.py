"""Mixtures of experts from dense models of one base (mergekit-moe's job), gates computed with MLX.

config.py         mergekit-moe's YAML as pydantic models (unknown keys refused)
architectures.py  the layouts written (Mixtral, Qwen2-MoE, Qwen3-MoE) and how one is chosen
gates.py          router weights: hidden states (mlx-lm's model of the base), embeddings, random
build.py          inputs checked, tensors listed, gates computed, tensors streamed out (`build_moe`)
command.py        `mergekit-mlx moe CONFIG OUT`
"""

from .build import MoEPlan, MoEResult, build_moe, plan_moe
from .config import Expert, GateMode, MoEConfig, load_moe_config

__all__ = ["Expert", "GateMode", "MoEConfig", "MoEPlan", "MoEResult", "build_moe", "load_moe_config", "plan_moe"]
