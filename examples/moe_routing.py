"""Where the example MoE routes held-out prompts: per layer, the share of prompt tokens whose
router's first choice is each expert, for the add and the reverse prompts that `eval` scores.

    mergekit-mlx moe examples/configs/moe.yml out/moe
    python examples/moe_routing.py out/moe          # [--n 200]
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import mlx.nn as nn

from mergekit_mlx import mlx_lm_config
from mergekit_mlx.evaluate import held_out_examples


class RecordingRouter(nn.Module):
    """A router that keeps the first choice of every token it routes."""

    def __init__(self, gate: nn.Module, choices: list):
        super().__init__()
        self.gate = gate
        self.choices = choices

    def __call__(self, x: mx.array) -> mx.array:
        logits = self.gate(x)
        self.choices.append(mx.argmax(logits, axis=-1).reshape(-1))
        return logits


def routing(model, tokenizer, prompts: list[str]) -> list[list[float]]:
    """[layer][expert]: the share of the prompts' tokens routed first to each expert."""
    layers = model.layers
    records: list[list] = [[] for _ in layers]
    blocks = [getattr(layer, "block_sparse_moe", None) or layer.mlp for layer in layers]
    gates = [b.gate for b in blocks]
    for b, rec in zip(blocks, records):
        b.gate = RecordingRouter(b.gate, rec)
    try:
        for p in prompts:
            model(mx.array([tokenizer.encode(p)]))
    finally:
        for b, g in zip(blocks, gates):
            b.gate = g
    experts = gates[0].weight.shape[0]
    shares = []
    for rec in records:
        chosen = mx.concatenate(rec)
        shares.append([float((chosen == e).mean()) for e in range(experts)])
    return shares


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("moe", help="the MoE directory")
    p.add_argument("--n", type=int, default=200, help="held-out prompts per skill (default 200, as eval)")
    args = p.parse_args()
    model, tokenizer = mlx_lm_config.load(args.moe)
    print("| prompts | layer | to expert 0 (add) | to expert 1 (reverse) |")
    print("| --- | ---: | ---: | ---: |")
    for task in ("add", "reverse"):
        prompts = [ex.prompt for ex in held_out_examples(task, args.n)]
        for layer, share in enumerate(routing(model, tokenizer, prompts)):
            print(f"| {task} | {layer} | {share[0]:.3f} | {share[1]:.3f} |")


if __name__ == "__main__":
    main()
