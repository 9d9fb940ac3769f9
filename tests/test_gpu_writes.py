"""Outputs copied from an NVIDIA GPU's memory by the writer (mergekit_mlx/kernels/gpu_writes.py), as
far as a machine without a GPU can check it: the safetensors writer takes an output piece by piece
from a stand-in that fills one buffer again for every piece (the page-locked buffers do), and
writes the same file with the same checksum; the address kernel (compiled for the CPU) writes where
its input lies. On an NVIDIA GPU (benchmarks/gpu_check.sh runs -m gpu) a whole merge is written
both ways and compared."""

import errno
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from cuda_emulation import needs_clang, run_on_cpu

from mergekit_mlx import MergeOptions, merge
from mergekit_mlx.digest import new_digest
from mergekit_mlx.formats.base import OutputTensor, WriteOptions
from mergekit_mlx.formats.safetensors import SafetensorsWriter
from mergekit_mlx.kernels import cuda_compile as cuda_jit
from mergekit_mlx.kernels import gpu_writes
from mergekit_mlx.kernels.sources import kernel_source


class HostDeviceTensor:
    """Stands in for gpu_writes.DeviceTensor: an array's bytes handed out in pieces of `piece`
    bytes through two buffers, the next piece filling the buffer of the one before the current
    (as the copy engine fills the page-locked buffers), after `before_refill`; a refilled buffer is
    first overwritten with garbage, so a writer that still read an earlier piece would notice."""

    def __init__(self, array: mx.array, piece: int):
        self.array, self.piece = array, piece
        self.dtype, self.shape, self.nbytes = array.dtype, tuple(array.shape), array.nbytes
        self.handed = 0
        self.ended = False

    def pieces(self, before_refill=None):
        data = bytes(memoryview(mx.contiguous(self.array)).cast("B")) if self.nbytes else b""
        starts = list(range(0, len(data), self.piece))
        bufs = [bytearray(self.piece), bytearray(self.piece)]

        def fill(j):
            bufs[j % 2][:] = b"\xa5" * self.piece
            chunk = data[starts[j] : starts[j] + self.piece]
            bufs[j % 2][: len(chunk)] = chunk

        try:
            if starts:
                fill(0)
            for j, start in enumerate(starts):
                if j + 1 < len(starts):
                    if j > 0 and before_refill is not None:
                        before_refill()
                    fill(j + 1)
                self.handed += 1
                yield memoryview(bufs[j % 2])[: min(self.piece, len(data) - start)]
        finally:
            self.ended = True  # the real one waits here for the copy still in flight


def _tensors(rng):
    return {
        "model.embed_tokens.weight": mx.array(rng.normal(size=(64, 48)).astype(np.float32)).astype(mx.bfloat16),
        "model.layers.0.mlp.up_proj.weight": mx.array(rng.normal(size=(96, 48)).astype(np.float32)),
        "model.layers.0.input_layernorm.weight": mx.array(rng.normal(size=(48,)).astype(np.float16)),
        "model.layers.0.self_attn.q_proj.weight": mx.array(rng.normal(size=(48, 48)).astype(np.float32)).T,
        "model.norm.weight": mx.zeros((0, 4), dtype=mx.float32),
    }


def _write(directory, arrays, shard_bytes, wrap=None):
    directory.mkdir()
    planned = [OutputTensor(n, tuple(a.shape), a.dtype) for n, a in arrays.items()]
    writer = SafetensorsWriter(directory, planned, {"architectures": ["LlamaForCausalLM"]}, options=WriteOptions(shard_bytes))
    for name, a in arrays.items():
        writer.add(name, wrap(a) if wrap else a)
    writer.finish()
    return writer


@pytest.mark.parametrize("piece", [7, 4096, 1 << 20])
def test_the_writer_takes_an_output_piece_by_piece_and_writes_the_same_file(tmp_path, piece):
    """Pieces of any size (a tail, one piece, many) give the files and shard checksums of the arrays."""
    arrays = _tensors(np.random.default_rng(0))
    shard_bytes = 12_000  # several shards, so that checksums are computed for all but the last
    plain = _write(tmp_path / "arrays", arrays, shard_bytes)
    handed = []

    def wrap(a):
        handed.append(HostDeviceTensor(a, piece))
        return handed[-1]

    pieces = _write(tmp_path / "pieces", arrays, shard_bytes, wrap)
    assert len(plain.files) > 1 and plain.checksums
    assert sorted(p.name for p in (tmp_path / "pieces").iterdir()) == sorted(p.name for p in (tmp_path / "arrays").iterdir())
    for f in (tmp_path / "arrays").iterdir():
        assert (tmp_path / "pieces" / f.name).read_bytes() == f.read_bytes(), f.name
    assert pieces.checksums == plain.checksums
    assert [t.handed for t in handed] == [-(-t.nbytes // piece) for t in handed]  # every piece was asked for


def test_a_full_disk_mid_output_stops_the_copies_of_that_output(tmp_path):
    """A write that fails part-way (a real full tmpfs) raises, and the output's pieces end there: the
    copy still in flight is waited for before its buffers and the output's memory can go."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); needs root")
    try:
        # 24 MB: more than the 16 MB a writer around the page cache gathers before it writes (2 cores)
        big = mx.array(np.random.default_rng(3).normal(size=(2048, 3072)).astype(np.float32))
        handed = HostDeviceTensor(big, 1 << 20)
        out = disk / "out"
        out.mkdir()
        planned = [OutputTensor("model.embed_tokens.weight", tuple(big.shape), big.dtype)]
        writer = SafetensorsWriter(out, planned, {}, options=WriteOptions(1 << 30))
        with pytest.raises(OSError) as failed:
            writer.add("model.embed_tokens.weight", handed)
            writer.finish()
        assert failed.value.errno == errno.ENOSPC
        assert handed.ended and 0 < handed.handed < big.nbytes >> 20
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_pieces_and_arrays_mix_in_one_shard_in_order(tmp_path):
    """A shard may get arrays (hashed on a thread of its own) and then pieces (hashed at once):
    its checksum is that of its bytes in order."""
    arrays = _tensors(np.random.default_rng(1))
    plain = _write(tmp_path / "arrays", arrays, 1 << 30)
    count = iter(range(100))
    mixed = _write(tmp_path / "mixed", arrays, 1 << 30, lambda a: HostDeviceTensor(a, 1000) if next(count) % 2 else a)
    path = tmp_path / "mixed" / plain.files[0]
    assert path.read_bytes() == (tmp_path / "arrays" / plain.files[0]).read_bytes()
    assert mixed.checksums == plain.checksums


def test_only_the_plain_safetensors_writer_takes_outputs_in_device_memory():
    """The quantizing writers compute on MLX arrays; the plain writer copies bytes."""
    from mergekit_mlx.formats import bitnet, mlx_quant
    from mergekit_mlx.formats.base import Writer

    assert SafetensorsWriter.takes_device_tensors
    assert not mlx_quant.QuantizedWriter.takes_device_tensors
    assert not bitnet.BitNetWriter.takes_device_tensors
    assert not Writer.takes_device_tensors


@pytest.mark.parametrize(("out_format", "takes"), [("hf", True), ("mlx-q4", False)])
def test_a_merge_offers_its_writer_outputs_in_device_memory_only_for_plain_safetensors(
    family, tmp_path, monkeypatch, out_format, takes
):
    """What run_plan is given to write with says whether it copies outputs from device memory."""
    merge_module = sys.modules["mergekit_mlx.merge"]  # the package's `merge` is the function
    seen = []
    real = merge_module.run_plan

    def recording(plan, opts, write, wants, *a, **k):
        seen.append(getattr(write, "takes_device_tensors", False))
        return real(plan, opts, write, wants, *a, **k)

    monkeypatch.setattr(merge_module, "run_plan", recording)
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(family, [0.5, 0.25, 0.25])],
    }
    merge(recipe, tmp_path / "out", MergeOptions(out_format=out_format))
    assert seen == [takes]


def test_the_digest_of_pieces_is_the_digest_of_the_bytes():
    data = np.random.default_rng(2).integers(0, 256, size=100_003, dtype=np.uint8).tobytes()
    whole = new_digest()
    whole.update(data)
    arrays = {"x": mx.array(np.frombuffer(data, dtype=np.uint8))}
    t = HostDeviceTensor(arrays["x"], 4096)
    pieces = new_digest()
    for p in t.pieces():
        pieces.update(p)
    assert pieces.hexdigest() == whole.hexdigest()


EMU = r"""
#include <initializer_list>
#include <cstdio>
#include <cstring>
struct dim3 { unsigned int x = 1, y = 1, z = 1; };
dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
"""

EMU_MAIN = r"""
int main() {
  static unsigned char bytes[64];
  for (int offset : {0, 3, 16}) {
    uint64_t address[1] = {0};
    blockIdx.x = 0; threadIdx.x = 1;  // any thread but the first writes nothing
    KERNEL(bytes + offset, address);
    if (address[0] != 0) { printf("a second thread wrote\n"); return 1; }
    threadIdx.x = 0;
    KERNEL(bytes + offset, address);
    if (address[0] != (uint64_t)(bytes + offset)) { printf("wrong address at offset %d\n", offset); return 1; }
  }
  return 0;
}
"""


@needs_clang
def test_the_address_kernel_writes_where_its_input_starts(tmp_path):
    """The translation unit cuda_jit compiles, built for the CPU: the one thread writes the input's address."""
    header, body = kernel_source("device_address", "cuda")
    unit = cuda_jit.wrap_source("mk_address", header, body, [("x", mx.uint8)], [("address", mx.uint64)], [])
    run_on_cpu(tmp_path, unit, "mk_address", EMU, EMU_MAIN)


def test_outputs_stay_mlx_arrays_off_an_nvidia_gpu():
    """Only an NVIDIA GPU as MLX's default device hands outputs over in device memory."""
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        assert not gpu_writes.enabled()
    finally:
        mx.set_default_device(previous)


ON_CUDA = hasattr(mx, "cuda") and mx.cuda.is_available() and mx.default_device() == mx.gpu


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="needs an NVIDIA GPU as MLX's default device")
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_a_merge_written_from_device_memory_is_the_merge_written_through_mlx(family, tmp_path, monkeypatch, method):
    """On an NVIDIA GPU: the self-test passes, and every shard's bytes are those MLX's host view writes."""
    base, *fts = family
    if method == "ties":
        recipe = {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": 0.6, "density": 0.5}} for p in fts],
        }
    else:
        recipe = {
            "merge_method": "linear",
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(family, [0.5, 0.25, 0.25])],
        }
    assert gpu_writes.enabled()
    handed = []
    real = gpu_writes.device_tensors
    monkeypatch.setattr(gpu_writes, "device_tensors", lambda arrays: handed.extend(arrays) or real(arrays))
    opts = MergeOptions(out_shard_size=40_000)  # several shards, written side by side where there are lanes
    merge(recipe, tmp_path / "direct", opts)
    assert handed, "no output was handed over in device memory"
    monkeypatch.setenv(gpu_writes.ENV_OFF, "1")
    merge(recipe, tmp_path / "mlx", opts)
    names = sorted(os.listdir(tmp_path / "mlx"))
    assert names == sorted(os.listdir(tmp_path / "direct")) and any(n.endswith(".safetensors") for n in names)
    for n in names:
        assert (tmp_path / "direct" / n).read_bytes() == (tmp_path / "mlx" / n).read_bytes(), n


def test_each_thread_keeps_its_own_two_page_locked_buffers_per_size():
    """Reads and writes on a thread share its buffers of a size (one copy at a time per thread);
    another thread, or another size, gets buffers of its own, each allocated once."""
    import threading

    from mergekit_mlx.kernels.cuda_memory import Driver

    drv = object.__new__(Driver)  # no CUDA driver here: the bookkeeping alone, with a counting allocator
    drv.local = threading.local()
    allocated = []
    drv.pinned = lambda size: allocated.append(size) or len(allocated)
    first = drv.thread_buffers(4 << 20)
    assert drv.thread_buffers(4 << 20) == first and len(set(first)) == 2
    other_size = drv.thread_buffers(1 << 20)
    elsewhere = []
    t = threading.Thread(target=lambda: elsewhere.append(drv.thread_buffers(4 << 20)))
    t.start()
    t.join()
    assert len({*first, *other_size, *elsewhere[0]}) == 6
    assert sorted(allocated) == sorted([4 << 20] * 4 + [1 << 20] * 2)
