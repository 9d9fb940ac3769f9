"""Build a Llama-shaped model family for benchmarks: a base and fine-tunes, bf16, random weights.

The fine-tunes are the base plus small random task vectors (a tenth of the weights' scale), so
sign elections, magnitude top-k and slerp angles behave as they do on real fine-tunes. Those task
vectors are full-rank noise (a flat singular spectrum); with `--task-rank N` each matrix's task vector
is instead a rank-N product with decaying weights plus a tenth of its energy as noise, the long-tailed
spectrum LoRA extraction meets in real fine-tunes (same scale). The
default shape is the 0.85B reference family (hidden 2048, 16 layers, intermediate 5632, vocab
32000, 16 heads, 4 KV heads). A family is cached: a directory that holds a finished one is reused.

    python benchmarks/make_family.py /tmp/family            # base, ft1, ft2
    python benchmarks/make_family.py /tmp/fam7b --hidden 4096 --layers 32 --intermediate 11008
    python benchmarks/make_family.py /tmp/famlr --fine-tunes 1 --task-rank 64
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx

DONE_FILE = "family.json"


@dataclass(frozen=True)
class Shape:
    hidden: int = 2048
    layers: int = 16
    intermediate: int = 5632
    vocab: int = 32000
    heads: int = 16
    kv_heads: int = 4
    fine_tunes: int = 2
    shard_bytes: int = 5 * 1000**3  # Hugging Face's default max_shard_size
    seed: int = 0
    task_rank: int = 0  # 0: noise task vectors; N: rank-N products with decaying weights plus noise

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, v = self.hidden, self.intermediate, self.vocab
        kv = self.kv_heads * (h // self.heads)
        out = [("model.embed_tokens.weight", (v, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
        return out

    @property
    def parameters(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        }


def model_names(shape: Shape) -> list[str]:
    return ["base"] + [f"ft{i + 1}" for i in range(shape.fine_tunes)]


def family_ready(root: Path, shape: Shape) -> bool:
    f = root / DONE_FILE
    # a family written before a Shape field existed has that field's default
    return f.exists() and {**asdict(Shape()), **json.loads(f.read_text())} == asdict(shape)


def _shards(shape: Shape) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, size = [[]], 0
    for name, s in shape.tensors():
        n = math.prod(s) * 2
        if shards[-1] and size + n > shape.shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, s))
        size += n
    return shards


def build_family(root: Path, shape: Shape = Shape(), quiet: bool = False) -> list[Path]:
    """Write (or reuse) the family under root/base, root/ft1, ...; returns the model directories."""
    dirs = [root / n for n in model_names(shape)]
    if family_ready(root, shape):
        return dirs
    (root / DONE_FILE).unlink(missing_ok=True)
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.safetensors*"):
            old.unlink()
        (d / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
    shards = _shards(shape)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    key = mx.random.key(shape.seed)
    for si, (shard, fname) in enumerate(zip(shards, files)):
        arrays: list[dict[str, mx.array]] = [{} for _ in dirs]
        for name, s in shard:
            key, k0, *ks = mx.random.split(key, 2 + shape.fine_tunes)
            if len(s) == 1:  # norms: around one
                base = 1.0 + 0.05 * mx.random.normal(s, key=k0)
            else:
                base = 0.02 * mx.random.normal(s, key=k0)
            arrays[0][name] = base.astype(mx.bfloat16)
            for j, k in enumerate(ks):
                arrays[j + 1][name] = (base + 0.002 * task_vector(s, shape.task_rank, k)).astype(mx.bfloat16)
            mx.eval(*(a[name] for a in arrays))
        for d, a in zip(dirs, arrays):
            mx.save_safetensors(str(d / fname), a, metadata={"format": "pt"})
        if not quiet:
            print(f"  wrote shard {si + 1}/{len(shards)} of {len(dirs)} models", flush=True)
        del arrays
    if len(files) > 1:
        index = {
            "metadata": {"total_size": shape.parameters * 2},
            "weight_map": {name: files[i] for i, shard in enumerate(shards) for name, _ in shard},
        }
        for d in dirs:
            (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (root / DONE_FILE).write_text(json.dumps(asdict(shape)))
    return dirs


def task_vector(s: tuple[int, ...], rank: int, key: mx.array) -> mx.array:
    """Unit-RMS noise, or for a matrix with rank > 0: sum_i w_i x_i y_i^T (Gaussian x_i, y_i, weights
    w_i = i^-1/2) holding 90% of the energy plus noise holding 10%, scaled to unit RMS."""
    if rank <= 0 or len(s) != 2:
        return mx.random.normal(s, key=key)  # the family as it always was
    k0, k1, k2 = mx.random.split(key, 3)
    noise = mx.random.normal(s, key=k0)
    weights = mx.arange(1, rank + 1, dtype=mx.float32) ** -0.5
    product = (mx.random.normal((s[0], rank), key=k1) * weights) @ mx.random.normal((rank, s[1]), key=k2)
    product = product / mx.sqrt(mx.mean(mx.square(product), axis=-1, keepdims=True).mean())
    return math.sqrt(0.9) * product + math.sqrt(0.1) * noise


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    d = Shape()
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--intermediate", type=int, default=d.intermediate)
    p.add_argument("--vocab", type=int, default=d.vocab)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--fine-tunes", type=int, default=d.fine_tunes)
    p.add_argument("--task-rank", type=int, default=d.task_rank, help="task vectors of rank N plus noise (default 0: noise)")


def shape_from_args(args: argparse.Namespace) -> Shape:
    return Shape(
        args.hidden,
        args.layers,
        args.intermediate,
        args.vocab,
        args.heads,
        args.kv_heads,
        args.fine_tunes,
        task_rank=getattr(args, "task_rank", 0),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="directory that receives base/, ft1/, ...")
    add_shape_arguments(p)
    args = p.parse_args()
    shape = shape_from_args(args)
    print(f"{shape.parameters / 1e9:.2f}B parameters per model, {len(model_names(shape))} models")
    for d in build_family(args.root, shape):
        print(d)


if __name__ == "__main__":
    main()
