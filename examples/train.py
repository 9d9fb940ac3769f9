"""Train the embedded example: a tiny Llama base model and two fine-tunes of it, one skill each.

The base learns a small synthetic language (simple sentences and counting) and sees some examples
of both skills (two-digit addition, reversing a word), so it knows their formats but is unreliable
at them. Each fine-tune then trains the base briefly, at a tenth of its learning rate, on one skill;
the rest of its data is language and the base's own answers on the other skill's prompts (learning
without forgetting). Its task vector (fine-tune minus base) thus stays small and leaves the other
skill alone, which is what lets a task-arithmetic or TIES merge add both skills.

    python examples/train.py --out examples/models      # the shipped models (see examples/README.md)
    python examples/train.py --out /tmp/m --base-steps 20 --ft-steps 5 --eval-n 0   # seconds

Everything is seeded: the same arguments on the same MLX version and BLAS give the same weights.
On Linux the mlx[cpu] wheel multiplies matrices with a reference BLAS, about 20x slower than
OpenBLAS; preloading one (LD_PRELOAD=.../libopenblas.so.0) turns an hour into minutes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.llama import Model, ModelArgs
from mlx_lm.utils import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from mergekit_mlx.evaluate import LETTERS, TASKS, evaluate, examples, greedy_complete  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list(" .+=0123456789" + LETTERS)
VOCAB = SPECIALS + CHARS
PAD, BOS, EOS = 0, 1, 2
MAX_LEN = 32  # longest training sequence, tokens

# --- the synthetic language -------------------------------------------------------------------

NOUNS = "cat dog bird fox cow fish frog bee owl pig hen rat".split()
ADJECTIVES = "red big small blue old green fast happy shy tall".split()
VERBS = "sees likes chases finds eats helps meets calls".split()


def sentence(rng: random.Random) -> str:
    subject = [rng.choice(["the", "a"])] + ([rng.choice(ADJECTIVES)] if rng.random() < 0.5 else []) + [rng.choice(NOUNS)]
    return " ".join(subject + [rng.choice(VERBS), rng.choice(["the", "a"]), rng.choice(NOUNS)]) + "."


def counting(rng: random.Random) -> str:
    start = rng.randrange(200)
    return " ".join(str(start + i) for i in range(rng.randint(3, 6)))


def language_stream(seed: int):
    """Unconditional text: (prompt, completion) with an empty prompt, so every token is trained."""
    rng = random.Random(f"language:{seed}")
    while True:
        text = sentence(rng) if rng.random() < 0.7 else counting(rng)
        yield "", text


def skill_stream(task: str, seed: int):
    """Training-split examples of one skill; the loss covers only the answer."""
    for ex in examples(task, seed, held_out=False):
        yield ex.prompt, ex.answer


def base_answers(model: nn.Module, tokenizer, tasks: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, the model's own greedy answer) on `n` training prompts of each task."""
    pairs = []
    for task in tasks:
        stream = examples(task, seed, held_out=False)
        prompts = [next(stream).prompt for _ in range(n)]
        answers = greedy_complete(model, tokenizer, prompts, max_tokens=10)
        pairs += [(p, ans.strip()) for p, ans in zip(prompts, answers)]
    return pairs


def cycle(pairs: list[tuple[str, str]], seed: int):
    rng = random.Random(f"replay:{seed}")
    while True:
        yield rng.choice(pairs)


def mixture(streams: list, weights: list[float], seed: int):
    rng = random.Random(f"mixture:{seed}")
    while True:
        yield next(rng.choices(streams, weights)[0])


# --- tokenizer --------------------------------------------------------------------------------


def encode(text: str) -> list[int]:
    return [VOCAB.index(c) for c in text]


def save_tokenizer(out: Path) -> None:
    """A character-level tokenizer that transformers' AutoTokenizer and mlx_lm.load read offline."""
    from tokenizers import Tokenizer, decoders, models, processors

    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    # BPE with no merges splits text into single characters
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)])
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MAX_LEN * 2,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": True,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# --- model ------------------------------------------------------------------------------------


def model_args(hidden: int, layers: int, intermediate: int, heads: int) -> ModelArgs:
    return ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        rms_norm_eps=1e-5,
        vocab_size=len(VOCAB),
        max_position_embeddings=MAX_LEN * 2,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )


def hf_config(args: ModelArgs) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "head_dim": args.hidden_size // args.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_position_embeddings,
        "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": args.tie_word_embeddings,
        "vocab_size": args.vocab_size,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "initializer_range": 0.02,
        "torch_dtype": "float16",
    }


def round_to_fp16(model: nn.Module) -> None:
    # the shipped weights are float16: fine-tunes start from exactly the base that is shipped
    model.update(tree_map(lambda p: p.astype(mx.float16).astype(mx.float32), model.parameters()))
    mx.eval(model.parameters())


def save_model(model: nn.Module, args: ModelArgs, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(mx.float16) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(args), indent=2) + "\n")
    save_tokenizer(out)


# --- training ---------------------------------------------------------------------------------


def make_batch(pairs: list[tuple[str, str]]) -> tuple[mx.array, mx.array, mx.array]:
    """Inputs, targets and a loss mask that is 1 on the completion and its end-of-sequence token."""
    seqs, masks = [], []
    for prompt, completion in pairs:
        p, c = [BOS] + encode(prompt), encode(completion) + [EOS]
        seqs.append((p + c)[: MAX_LEN + 1])
        masks.append(([0] * len(p) + [1] * len(c))[: MAX_LEN + 1])
    width = -(-(max(len(s) for s in seqs) - 1) // 8) * 8 + 1  # inputs a multiple of 8 long: few compiled shapes
    seqs = [s + [PAD] * (width - len(s)) for s in seqs]
    masks = [m + [0] * (width - len(m)) for m in masks]
    tokens, mask = mx.array(seqs), mx.array(masks, dtype=mx.float32)
    return tokens[:, :-1], tokens[:, 1:], mask[:, 1:]


def train(model: nn.Module, stream, steps: int, batch: int, lr: float, warmup: int, log_every: int, label: str) -> None:
    schedule = optim.join_schedules(
        [optim.linear_schedule(lr / 10, lr, max(warmup, 1)), optim.cosine_decay(lr, max(steps - warmup, 1), lr / 10)],
        [max(warmup, 1)],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.0)

    def loss_fn(model, inputs, targets, mask):
        logits = model(inputs)
        losses = nn.losses.cross_entropy(logits, targets, reduction="none")
        return (losses * mask).sum() / mask.sum()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, targets, mask):
        loss, grads = loss_and_grad(model, inputs, targets, mask)
        optimizer.update(model, grads)
        return loss

    start, running = time.perf_counter(), 0.0
    for i in range(1, steps + 1):
        inputs, targets, mask = make_batch([next(stream) for _ in range(batch)])
        loss = step(inputs, targets, mask)
        mx.eval(state, loss)
        running += loss.item()
        if i % log_every == 0 or i == steps:
            n = log_every if i % log_every == 0 else i % log_every
            print(f"[{label}] step {i}/{steps}  loss {running / n:.3f}  {time.perf_counter() - start:.0f} s", flush=True)
            running = 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "models", help="output folder (one sub-folder per model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--base-steps", type=int, default=1500)
    p.add_argument("--base-lr", type=float, default=1e-3)
    p.add_argument(
        "--base-skill-share",
        type=float,
        nargs=len(TASKS),
        default=[0.12, 0.16],
        metavar="SHARE",
        help=f"share of each skill ({', '.join(TASKS)}) in the base's data; the rest is language",
    )
    p.add_argument("--ft-steps", type=int, default=500)
    p.add_argument("--ft-lr", type=float, default=1e-4)
    p.add_argument(
        "--ft-skill-share",
        type=float,
        default=0.5,
        help="share of the skill in a fine-tune's data; the rest is half language, half replayed base answers",
    )
    p.add_argument(
        "--ft-replay-prompts",
        type=int,
        default=1024,
        help="prompts of each other skill whose base answers a fine-tune replays (0: replay language only)",
    )
    p.add_argument(
        "--eval-n", type=int, default=200, help="held-out prompts per skill for the scores printed at the end (0: skip)"
    )
    a = p.parse_args(argv)

    mx.random.seed(a.seed)
    args = model_args(a.hidden, a.layers, a.intermediate, a.heads)
    model = Model(args)
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"model: {n_params:,} parameters, {a.layers} layers, hidden {a.hidden}, vocab {len(VOCAB)}")
    log_every = max(1, min(100, a.base_steps // 10))

    start = time.perf_counter()
    shares = a.base_skill_share
    base_stream = mixture(
        [language_stream(a.seed)] + [skill_stream(t, a.seed) for t in TASKS], [1 - sum(shares), *shares], a.seed
    )
    train(model, base_stream, a.base_steps, a.batch, a.base_lr, a.base_steps // 20, log_every, "base")
    round_to_fp16(model)
    save_model(model, args, a.out / "base")
    base_weights = dict(tree_flatten(model.parameters()))

    tokenizer = load_tokenizer(a.out / "base")
    for k, task in enumerate(TASKS):
        seed = a.seed + 1 + k
        model.load_weights(list(base_weights.items()))
        # what the base answers on the other skills' training prompts, replayed so the fine-tune keeps it
        others = [t for t in TASKS if t != task]
        replay = base_answers(model, tokenizer, others, a.ft_replay_prompts, seed) if a.ft_replay_prompts else []
        streams = [skill_stream(task, seed), language_stream(seed)] + ([cycle(replay, seed)] if replay else [])
        rest = 1 - a.ft_skill_share
        weights = [a.ft_skill_share] + ([rest / 2, rest / 2] if replay else [rest])
        train(model, mixture(streams, weights, seed), a.ft_steps, a.batch, a.ft_lr, a.ft_steps // 10, log_every, task)
        save_model(model, args, a.out / task)
    print(f"trained in {time.perf_counter() - start:.0f} s; models in {a.out}")

    if a.eval_n:
        from mlx_lm import load

        for name in ["base", *TASKS]:
            m, tok = load(str(a.out / name))
            scores = {t: evaluate(m, tok, t, a.eval_n) for t in TASKS}
            print(name, " ".join(f"{t}={s:.3f}" for t, s in scores.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
