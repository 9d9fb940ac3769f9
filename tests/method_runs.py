"""One merge method on small arrays, its parameters defaulted as the planner fills them: the
method-level tests (test_methods_extra, test_methods_beyond, test_methods_spectral) share this."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mergekit_mlx.methods import MergeInputs, get_method

NAME = "model.layers.0.mlp.up_proj.weight"  # an output tensor's name (random streams are drawn from it)


def make(n=3, seed=0, scale=0.1, shape=(12, 20)):
    """A base and n-1 fine-tunes (base + small noise), float32."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, shape).astype(np.float32)
    return [base] + [(base + rng.normal(0, scale, shape)).astype(np.float32) for _ in range(n - 1)]


def run(method, arrays, shared=None, per_input=None, base=0, seed=0, dtype=None):
    """The method on these arrays (cast to `dtype` if given); float64 out. The output keeps the
    inputs' shape and dtype."""
    m = get_method(method)
    shared = dict(shared or {})
    per_input = [dict(d) for d in (per_input or [{} for _ in arrays])]
    for p in m.params:
        if p.scope == "shared":
            shared.setdefault(p.name, p.default)
            continue
        for i, d in enumerate(per_input):
            if not (p.scope == "non_base" and i == base):
                d.setdefault(p.name, p.default)
    tensors = [mx.array(a) for a in arrays]
    if dtype is not None:
        tensors = [t.astype(dtype) for t in tensors]
    inputs = MergeInputs(tensors, base, shared, per_input, name=NAME, seed=seed, input_ids=list(range(len(arrays))))
    out = m.merge(inputs)
    assert out.shape == tensors[0].shape
    assert out.dtype == tensors[0].dtype
    return np.array(out if out.dtype == mx.float64 else out.astype(mx.float32)).astype(np.float64)
