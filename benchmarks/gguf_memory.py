"""Peak memory of writing a GGUF file: streaming (this project) against holding the model (naive).

Builds a Llama-shaped bf16 model much larger than any one of its tensors, then, each in a fresh
process, measures peak RSS (ru_maxrss) of:
  imports    importing mlx, gguf and mergekit_mlx and opening the model (the floor of any run)
  streaming  `mergekit_mlx.convert(model, out.gguf, out_format)`: header first, tensor by tensor
  naive      every tensor loaded and quantized, then handed to the gguf package's writer at once
and prints them next to the model's size and its largest tensor.

    python benchmarks/gguf_memory.py                       # 0.54B parameters, gguf-q8_0
    python benchmarks/gguf_memory.py --layers 16 --format gguf-f16
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import resource, sys, time, json
from pathlib import Path
mode, model, out, fmt = sys.argv[1:5]
import gguf, mlx.core as mx, numpy as np
from mergekit_mlx.formats import open_model
from mergekit_mlx.convert import convert
src = open_model(model)
t = time.perf_counter()
if mode == "streaming":
    convert(model, out, fmt)
elif mode == "naive":
    from mergekit_mlx.formats.gguf import OUT_TYPES, gguf_name, permuted_heads, rope_permutation, tensor_type
    target = OUT_TYPES[fmt][0]
    w = gguf.GGUFWriter(out, "llama")
    for name in src.tensor_names():
        a = src.load(name).astype(mx.float32)
        heads = permuted_heads(name, src.config)
        if heads:
            a = a[mx.array(rope_permutation(a.shape[0], heads))]
        gname = gguf_name(name)
        qtype = tensor_type(gname, a.shape, target)
        data = gguf.quants.quantize(np.array(a), qtype)
        w.add_tensor(gname, data, raw_dtype=qtype)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
took = time.perf_counter() - t
def peak_rss():
    # VmHWM is this process image's own peak; ru_maxrss on Linux also counts the forking parent
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({"peak_rss": peak_rss(), "seconds": took}))
"""


def build_model(path: Path, hidden: int, layers: int, inter: int, vocab: int, heads: int, kv_heads: int) -> tuple[int, int]:
    """Write a bf16 Llama-shaped model with random weights; returns (total bytes, largest tensor bytes)."""
    import mlx.core as mx

    path.mkdir(parents=True)
    hd = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (heads * hd, hidden),
                p + "self_attn.k_proj.weight": (kv_heads * hd, hidden),
                p + "self_attn.v_proj.weight": (kv_heads * hd, hidden),
                p + "self_attn.o_proj.weight": (hidden, heads * hd),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
            }
        )
    arrays = {n: (mx.random.normal(s) * 0.02).astype(mx.bfloat16) for n, s in shapes.items()}
    mx.save_safetensors(str(path / "model.safetensors"), arrays, metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config))
    sizes = [2 * int(a.size) for a in arrays.values()]
    return sum(sizes), max(sizes)


def measure(mode: str, model: Path, out: Path, fmt: str) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, mode, str(model), str(out), fmt], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--format", default="gguf-q8_0")
    ap.add_argument("--no-naive", action="store_true", help="skip the whole-model baseline")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gguf-memory-"))
    try:
        total, largest = build_model(root / "model", args.hidden, args.layers, args.inter, args.vocab, args.heads, args.kv_heads)
        rows = [("imports", measure("imports", root / "model", root / "unused.gguf", args.format))]
        rows.append(("streaming", measure("streaming", root / "model", root / "streaming.gguf", args.format)))
        if not args.no_naive:
            rows.append(("naive", measure("naive", root / "model", root / "naive.gguf", args.format)))
        out_size = (root / "streaming.gguf").stat().st_size
        gb = 1e9
        print(
            f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: {total / gb:.2f} GB bf16, "
            f"largest tensor {largest / gb:.3f} GB (bf16), {2 * largest / gb:.3f} GB as float32; "
            f"{args.format} file {out_size / gb:.2f} GB"
        )
        floor = rows[0][1]["peak_rss"]
        print(f"{'run':<10} {'peak RSS':>10} {'above imports':>14} {'x largest f32':>14} {'seconds':>8}")
        for name, r in rows:
            above = r["peak_rss"] - floor
            print(
                f"{name:<10} {r['peak_rss'] / gb:>8.2f} GB {above / gb:>11.2f} GB {above / (2 * largest):>14.2f} {r['seconds']:>8.1f}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
