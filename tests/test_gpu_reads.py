"""Inputs read straight into an NVIDIA GPU's memory (mergekit_mlx/kernels/gpu_reads.py), as far as a
machine without a GPU can check it: the byte spans it reads, the copy kernel's index arithmetic
(compiled for the CPU), and the pipeline's hand-over of staged inputs (a stand-in reader that
stages into host memory). benchmarks/gpu_check.sh runs the real thing on a GPU."""

import sys
import threading

import mlx.core as mx
import numpy as np
import pytest
import tiny
from cuda_emulation import needs_clang, run_on_cpu

from mergekit_mlx import merge
from mergekit_mlx.dtypes import mlx_dtype
from mergekit_mlx.formats import open_model
from mergekit_mlx.kernels import cuda_compile as cuda_jit
from mergekit_mlx.kernels import gpu_reads
from mergekit_mlx.kernels.sources import kernel_source


def test_file_span_points_at_each_tensors_bytes(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "a.f32": mx.array(rng.normal(size=(3, 5)).astype(np.float32)),
        "b.bf16": mx.array(rng.normal(size=(7,)).astype(np.float32)).astype(mx.bfloat16),
        "c.f16": mx.array(rng.normal(size=(2, 2)).astype(np.float16)),
        "d.i32": mx.array(rng.integers(-5, 5, size=(9,)).astype(np.int32)),
        "e.bool": mx.array(rng.integers(0, 2, size=(5,)).astype(bool)),
        "f.empty": mx.zeros((0, 4), dtype=mx.float32),
    }
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    mx.save_safetensors(str(d / "model.safetensors"), arrays)
    model = open_model(d)
    raw = (d / "model.safetensors").read_bytes()
    for name, a in arrays.items():
        path, offset, nbytes = model.file_span(name)
        assert path == d / "model.safetensors"
        assert nbytes == a.nbytes
        want = np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).tobytes()
        assert raw[offset : offset + nbytes] == want, name


EMU = r"""
#include <initializer_list>
#include <cstdio>
#include <cstdlib>
#include <cstring>
struct uint4 { unsigned int x, y, z, w; };
struct dim3 { unsigned int x = 1, y = 1, z = 1; };
dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
"""

EMU_MAIN = r"""
int main() {
  const unsigned long long sizes[] = {1, 15, 16, 17, 33, 4101, 100003, 1 << 20};
  for (unsigned long long nb : sizes) {
    for (unsigned threads : {256u, 1024u}) {  // fewer threads than 16-byte words: the loop strides
      unsigned char* src = (unsigned char*)aligned_alloc(256, (nb + 255) / 256 * 256);
      unsigned char* out = (unsigned char*)aligned_alloc(256, (nb + 255) / 256 * 256);
      for (unsigned long long i = 0; i < nb; ++i) { src[i] = (unsigned char)(i * 131 + 7); out[i] = 0xcd; }
      uint64_t params[2] = {(uint64_t)src, (uint64_t)nb};
      blockDim.x = 256;
      gridDim.x = threads / 256;
      for (unsigned g = 0; g < gridDim.x; ++g)
        for (unsigned t = 0; t < blockDim.x; ++t) {
          blockIdx.x = g; threadIdx.x = t;
          KERNEL(params, out);
        }
      if (memcmp(src, out, nb) != 0) { printf("mismatch at %llu bytes, %u threads\n", nb, threads); return 1; }
      free(src); free(out);
    }
  }
  return 0;
}
"""


@needs_clang
def test_the_copy_kernel_copies_every_byte(tmp_path):
    """The translation unit cuda_jit compiles, built for the CPU with blocks and threads run one by
    one: every size (whole 16-byte words, a tail, both) is copied exactly."""
    header, body = kernel_source("device_copy", "cuda")
    unit = cuda_jit.wrap_source("mk_copy", header, body, [("src", mx.uint64)], [("out", mx.uint8)], [])
    run_on_cpu(tmp_path, unit, "mk_copy", EMU, EMU_MAIN)


class HostStaged(gpu_reads.Staged):
    """Staged bytes kept in host memory; array() makes them an MLX array as the copy kernel would."""

    data: bytes = b""

    def array(self):
        if self.nbytes == 0:
            return mx.zeros(self.shape, self.dtype)
        return mx.view(mx.array(np.frombuffer(self.data, dtype=np.uint8)), self.dtype).reshape(self.shape)


class HostReader:
    """Stands in for gpu_reads.Reader: stages what file_span points at, counts hand-backs."""

    def __init__(self):
        self.staged, self.released = [], []
        self.lock = threading.Lock()  # several reader threads stage at once

    def stage(self, model, name):
        if not hasattr(model, "file_span"):
            return None
        path, offset, nbytes = model.file_span(name)
        with self.lock:
            ptr = len(self.staged) + 1
            self.staged.append(ptr)
        with open(path, "rb") as f:
            f.seek(offset)
            s = HostStaged(ptr, nbytes, model.info(name).shape, mlx_dtype(model.info(name).dtype))
            s.data = f.read(nbytes)
        return s

    def release(self, staged):
        with self.lock:
            self.released += [s.ptr for s in staged if isinstance(s, gpu_reads.Staged) and s.nbytes]

    def close(self):
        self.closed = True


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_staged_inputs_merge_as_loaded_ones_and_go_back_once(family, tmp_path, monkeypatch, method):
    sys.modules["mergekit_mlx.pipeline"]
    base, *fts = family
    if method == "ties":
        recipe = {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in fts],
        }
    else:
        recipe = {
            "merge_method": "linear",
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(family, [0.5, 0.25, 0.25])],
        }
    merge(recipe, tmp_path / "loaded")
    reader = HostReader()
    monkeypatch.setattr(gpu_reads, "reader", lambda keep: reader)
    merge(recipe, tmp_path / "staged")
    loaded, staged = tiny.load_np(tmp_path / "loaded"), tiny.load_np(tmp_path / "staged")
    assert set(loaded) == set(staged)
    for name in loaded:
        np.testing.assert_array_equal(loaded[name], staged[name], err_msg=name)
    assert reader.staged, "the stand-in reader staged nothing"
    assert sorted(reader.released) == sorted(reader.staged)
    assert reader.closed  # the pool's memory goes back after the merge


def test_no_direct_reads_off_an_nvidia_gpu():
    """Only an NVIDIA GPU as MLX's default device reads this way (the CPU here; Apple GPUs neither)."""
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        assert gpu_reads.reader(1 << 20) is None
    finally:
        mx.set_default_device(previous)


def test_a_failed_read_hands_back_every_staged_input(family, tmp_path, monkeypatch):
    """A read that fails part-way stops the merge with the error, writes no output, and every
    input already staged (waiting to be merged, or read for a task not complete) goes back."""
    from mergekit_mlx.errors import ModelError

    sys.modules["mergekit_mlx.pipeline"]

    class FailingReader(HostReader):
        def stage(self, model, name):
            with self.lock:
                fail = len(self.staged) >= 20
            if fail:
                raise ModelError(f"{model.path}: cannot read (disk gone)")
            return super().stage(model, name)

    reader = FailingReader()
    monkeypatch.setattr(gpu_reads, "reader", lambda keep: reader)
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(family, [0.5, 0.25, 0.25])],
    }
    with pytest.raises(ModelError, match="disk gone"):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert len(reader.staged) >= 20 and sorted(reader.released) == sorted(reader.staged)


def test_a_failed_merge_hands_back_its_staged_inputs(family, tmp_path, monkeypatch):
    """A merge that raises (here: the method) still hands back the device memory of the inputs it
    was given, and of everything read after it."""
    pipeline = sys.modules["mergekit_mlx.pipeline"]
    reader = HostReader()
    monkeypatch.setattr(gpu_reads, "reader", lambda keep: reader)
    calls = []
    real = pipeline.merge_task

    def failing(plan, task, *a, **k):
        calls.append(task)
        if len(calls) == 5:
            raise RuntimeError("the merge failed")
        return real(plan, task, *a, **k)

    monkeypatch.setattr(pipeline, "merge_task", failing)
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(family, [0.5, 0.25, 0.25])],
    }
    with pytest.raises(RuntimeError, match="the merge failed"):
        merge(recipe, tmp_path / "out")
    assert reader.staged and sorted(reader.released) == sorted(reader.staged)
