"""Every kernel source compiles for syntax with clang, wrapped the way MLX wraps it; the CUDA
sources also run on the CPU through an emulation header.

Metal cannot run here, so each kernels/<name>.metal (with its splices resolved, exactly as the
loader builds it) is wrapped in the kernel signature `mx.fast.metal_kernel` generates and compiled
as C++ against a small header that declares the Metal built-ins the bodies use (address-space
qualifiers, atomics, barriers, simd_sum, as_type). The CUDA sources get the same treatment against
a header with the CUDA built-ins, as `mx.fast.cuda_kernel` wraps them. This catches misspelt
names, backend names used in the wrong file, type errors and template errors; Metal results are
verified only on Apple Silicon (the first-use check compares them with the CPU fallback).

The shared bodies (*.inc) are the same text in both backends, so their logic is checked once, by
running the CUDA build on the CPU: threads of a block are OS threads meeting at a barrier, and the
dispatch code in mergekit_mlx/kernels/ drives them as it drives a GPU (see the section below).

CI needs clang: `apt-get install clang` (Debian/Ubuntu). Without it these tests skip.
"""

import shutil
import subprocess

import pytest

from mergekit_mlx.kernels.sources import kernel_root, kernel_source, model_macros

CLANG = shutil.which("clang++") or shutil.which("clang")

METAL_SHIM = r"""
// Declarations of the Metal built-ins used by kernels/*.metal, for a C++ syntax check.
#pragma once
#define kernel
#define device
#define threadgroup
#define constant
#define thread
typedef unsigned int uint;
typedef unsigned int uint32_t;
typedef unsigned char uint8_t;
struct uint3 { uint x, y, z; };
struct bfloat16_t { bfloat16_t(float); operator float() const; };
struct half { half(float); operator float() const; };
namespace metal {
enum memory_order { memory_order_relaxed };
enum class mem_flags { mem_none, mem_device, mem_threadgroup };
template <class V> struct atomic { V value; };
typedef atomic<uint> atomic_uint;
uint atomic_fetch_add_explicit(atomic<uint>* a, uint v, memory_order o);
void atomic_store_explicit(atomic<uint>* a, uint v, memory_order o);
uint atomic_load_explicit(atomic<uint>* a, memory_order o);
void threadgroup_barrier(mem_flags f);
float fabs(float x);
float simd_sum(float x);
struct simd_vote {
  typedef unsigned long long vote_t;
  explicit operator vote_t() const;
};
simd_vote simd_ballot(bool p);
void simdgroup_barrier(mem_flags f);
uint popcount(uint x);
template <class To, class From> To as_type(From x);
}  // namespace metal
"""

CUDA_SHIM = r"""
// Declarations of the CUDA built-ins used by kernels/*.cu, for a C++ syntax check.
#pragma once
#define __device__
#define __forceinline__ inline
#define __global__
#define __shared__ static
typedef unsigned int uint32_t;
typedef unsigned char uint8_t;
struct dim3 { unsigned int x, y, z; };
extern dim3 blockIdx, blockDim, threadIdx, gridDim;
struct __nv_bfloat16 { __nv_bfloat16(); __nv_bfloat16(float); operator float() const; };
struct __half { __half(); __half(float); operator float() const; };
unsigned int atomicAdd(unsigned int* a, unsigned int v);
void __syncthreads();
float __shfl_xor_sync(unsigned int mask, float v, int lane);
unsigned int __ballot_sync(unsigned int mask, int p);
void __syncwarp(unsigned int mask = 0xffffffffu);
int __popc(unsigned int x);
float __fmul_rn(float a, float b);
float __fadd_rn(float a, float b);
float __fdiv_rn(float a, float b);
float __fmaf_rn(float a, float b, float c);
unsigned int __float_as_uint(float x);
float __uint_as_float(unsigned int x);
float fabsf(float x);
"""

# name -> instantiations: (models, has_base, inputs, outputs, templates, atomic outputs)
# dtype names are MLX's: "T" marks the input/output dtype of the instantiation.
U32, F32, U8 = "uint32", "float32", "uint8"
KERNELS = {
    "random_uniform": [(0, False, [("up", U32)], [("out", F32)], [], False)],
    "radix_hist": [
        (3, True, [("up", U32)], [("hist", U32)], [("KM", 3), ("SHIFT", 20), ("BITS", 11)], True),
        (1, False, [("up", U32)], [("hist", U32)], [("KM", 1), ("SHIFT", 0), ("BITS", 9)], True),
    ],
    "l1_sums": [
        (2, True, [("up", U32), ("sel", U32), ("scl", F32), ("gate", U32)], [("part", F32)], [("KM", 2), ("TG", 256)], False)
    ],
    "task_merge": [
        (
            3,
            True,
            [("up", U32), ("sel", U32), ("scl", F32), ("gate", U32)],
            [("out", "T")],
            [("T", "T"), ("KM", 3), ("CONSENSUS", True), ("NORMALIZE", True), ("SPARSE", 0), ("UNIFORM", False)],
            False,
        ),
        (
            2,
            True,
            [("up", U32), ("sel", U32), ("scl", F32), ("gate", U32)],
            [("out", "T")],
            [("T", "T"), ("KM", 2), ("CONSENSUS", True), ("NORMALIZE", True), ("SPARSE", 2), ("UNIFORM", True)],
            False,
        ),
        (
            1,
            True,
            [("up", U32), ("sel", U32), ("scl", F32), ("gate", U32)],
            [("out", "T")],
            [("T", "T"), ("KM", 1), ("CONSENSUS", False), ("NORMALIZE", False), ("SPARSE", 3), ("UNIFORM", True)],
            False,
        ),
    ],
    "select_sample": [
        (3, True, [("up", U32)], [("smp", U32)], [("KM", 3)], False),
        (1, False, [("up", U32)], [("smp", U32)], [("KM", 1)], False),
    ],
    "select_pass": [
        (3, True, [("srt", U32), ("up", U32)], [("tab", U32)], [("KM", 3), ("G", 256), ("TG", 256)], False),
        (1, False, [("srt", U32), ("up", U32)], [("tab", U32)], [("KM", 1), ("G", 256), ("TG", 256)], False),
    ],
    "select_sum": [(0, False, [("tab", U32), ("up", U32)], [("tot", U32)], [("R", 16)], True)],
    "select_resolve": [
        (
            3,
            True,
            [("srt", U32), ("up", U32), ("tab", U32), ("tot", U32)],
            [("res", U32), ("tc", U32)],
            [("KM", 3), ("G", 256), ("TG", 256)],
            False,
        ),
        (
            1,
            False,
            [("srt", U32), ("up", U32), ("tab", U32), ("tot", U32)],
            [("res", U32), ("tc", U32)],
            [("KM", 1), ("G", 256), ("TG", 256)],
            False,
        ),
    ],
    "select_collect": [
        (2, True, [("up", U32), ("tab", U32)], [("kb", U32), ("ki", U32)], [("KM", 2)], False),
        (1, False, [("up", U32), ("tab", U32)], [("kb", U32), ("ki", U32)], [("KM", 1)], False),
    ],
    "tie_count": [
        (2, True, [("up", U32)], [("counts", U32)], [("KM", 2), ("CHUNK", 4096)], False),
        (1, False, [("up", U32)], [("counts", U32)], [("KM", 1), ("CHUNK", 4096)], False),
    ],
    "bitnet_matmul": [
        (
            0,
            False,
            [("x", "T"), ("w", U8), ("scale", "T")],
            [("out", "T")],
            [("T", "T"), ("IN", 64), ("OUT", 30), ("R", 8), ("ROWS", 2), ("INVERT", True)],
            False,
        ),
    ],
    "weighted_sum": [
        (3, False, [("coef", F32), ("up", U32)], [("out", "T")], [("T", "T"), ("KM", 3), ("ACC", False)], False),
        (2, True, [("coef", F32), ("up", U32)], [("out", "T")], [("T", "T"), ("KM", 2), ("ACC", True)], False),
    ],
}

METAL_TYPES = {U32: "uint32_t", F32: "float", U8: "uint8_t", "T": "bfloat16_t"}
CUDA_TYPES = {U32: "uint32_t", F32: "float", U8: "uint8_t", "T": "__nv_bfloat16"}
METAL_ATTRS = [
    "thread_position_in_grid",
    "threads_per_grid",
    "thread_position_in_threadgroup",
    "threads_per_threadgroup",
    "threadgroup_position_in_grid",
    "threadgroups_per_grid",
]


def _names(km, has_base, inputs):
    return [("base", "T")] * has_base + [(f"x{m}", "T") for m in range(km)] + inputs


def metal_unit(name, inst):
    km, has_base, inputs, outputs, templates, atomic = inst
    header, body = kernel_source(name, "metal")
    if km:
        body = model_macros(km, has_base) + body
    params = [f"const device {METAL_TYPES[t]}* {n} [[buffer({i})]]" for i, (n, t) in enumerate(_names(km, has_base, inputs))]
    for j, (n, t) in enumerate(outputs):
        ty = f"atomic<{METAL_TYPES[t]}>" if atomic else METAL_TYPES[t]
        params.append(f"device {ty}* {n} [[buffer({len(params) + j})]]")
    params += [f"uint3 {a} [[{a}]]" for a in METAL_ATTRS if a in body]
    tparams = ", ".join(("typename " if v == "T" else ("bool " if isinstance(v, bool) else "int ")) + k for k, v in templates)
    targs = ", ".join("bfloat16_t" if v == "T" else (str(v).lower() if isinstance(v, bool) else str(v)) for _, v in templates)
    fn = f"mk_{name}"
    src = header + "\n"
    if templates:
        src += f"template <{tparams}>\n"
    src += f"[[kernel]] void {fn}(\n  " + ",\n  ".join(params) + ") {\n" + body + "\n}\n"
    if templates:
        src += f"template decltype({fn}<{targs}>) {fn}<{targs}>;\n"
    return src


def cuda_unit(name, inst):
    """The translation unit mergekit_mlx/kernels/cuda_compile.py compiles at run time for this instantiation."""
    import mlx.core as mx

    from mergekit_mlx.kernels.cuda_compile import wrap_source

    dtypes = {U32: mx.uint32, F32: mx.float32, U8: mx.uint8, "T": mx.bfloat16}
    km, has_base, inputs, outputs, templates, atomic = inst
    header, body = kernel_source(name, "cuda")
    if km:
        body = model_macros(km, has_base) + body
    return wrap_source(
        f"mk_{name}",
        header,
        body,
        [(n, dtypes[t]) for n, t in _names(km, has_base, inputs)],
        [(n, dtypes[t]) for n, t in outputs],
        [(k, mx.bfloat16 if v == "T" else v) for k, v in templates],
    )


def _compile(tmp_path, shim_name, shim, unit, include_dir_file=None):
    (tmp_path / shim_name).write_text(shim)
    if include_dir_file:
        (tmp_path / include_dir_file).write_text(f'#include "{shim_name}"\n')
    src = tmp_path / "unit.cpp"
    src.write_text(f'#include "{shim_name}"\n' + unit)
    cmd = [
        CLANG,
        "-x",
        "c++",
        "-std=c++17",
        "-fsyntax-only",
        "-Wno-unknown-attributes",
        "-Wno-unused",
        "-I",
        str(tmp_path),
        str(src),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + "\n--- source ---\n" + unit


# CUDA-only sources, with why there is no Metal twin (checked in the test file named)
CUDA_ONLY = {
    "device_copy": "stages file bytes in discrete GPU memory; tests/test_gpu_reads.py",
    "device_address": "finds outputs in discrete GPU memory for the writer; tests/test_gpu_writes.py",
}


def test_every_source_has_a_check_and_both_backends():
    root = kernel_root()
    metal = {p.name[: -len(".metal")] for p in root.iterdir() if p.name.endswith(".metal")}
    cuda = {p.name[: -len(".cu")] for p in root.iterdir() if p.name.endswith(".cu")}
    assert metal == set(KERNELS) and cuda == set(KERNELS) | set(CUDA_ONLY)


@pytest.mark.skipif(CLANG is None, reason="clang not found (Debian/Ubuntu: apt-get install clang)")
@pytest.mark.parametrize("name,i", [(n, i) for n, insts in KERNELS.items() for i in range(len(insts))])
def test_metal_source_syntax(tmp_path, name, i):
    _compile(tmp_path, "metal_shim.h", METAL_SHIM, metal_unit(name, KERNELS[name][i]), include_dir_file="metal_stdlib")


@pytest.mark.skipif(CLANG is None, reason="clang not found (Debian/Ubuntu: apt-get install clang)")
@pytest.mark.parametrize("name,i", [(n, i) for n, insts in KERNELS.items() for i in range(len(insts))])
def test_cuda_source_syntax(tmp_path, name, i):
    for h in ("cuda_fp16.h", "cuda_bf16.h"):  # the headers cuda_compile's prelude includes
        (tmp_path / h).write_text('#include "cuda_shim.h"\n')
    _compile(tmp_path, "cuda_shim.h", CUDA_SHIM, cuda_unit(name, KERNELS[name][i]))


@pytest.mark.skipif(CLANG is None, reason="clang not found (Debian/Ubuntu: apt-get install clang)")
def test_the_check_rejects_a_cuda_name_in_metal(tmp_path):
    unit = metal_unit("random_uniform", KERNELS["random_uniform"][0]).replace("out[i] =", "out[blockIdx.x] =")
    with pytest.raises(AssertionError):
        _compile(tmp_path, "metal_shim.h", METAL_SHIM, unit, include_dir_file="metal_stdlib")


# ----------------------------------------------------------------------------- the CUDA sources, run on the CPU
#
# The same generated CUDA functions, compiled for the CPU against an emulation header: each block's
# threads are OS threads meeting at a barrier for __syncthreads, __shared__ arrays are statics (one
# block runs at a time), atomics are the compiler's. With `_kernel` pointed at this emulator and the
# module told it is on a CUDA device, the real dispatch code (sampling, selection paths, fallbacks,
# merges) runs end to end here, and its results must equal the CPU fallback's bit for bit.

EMU_SHIM = r"""
#pragma once
#include <cstdint>
#include <cstring>
#define __device__
#define __forceinline__ inline
#define __global__
#define __shared__ static
struct dim3 { unsigned int x = 1, y = 1, z = 1; };
extern thread_local dim3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
void __syncthreads();
extern "C" int mk_emu_main(int argc, char** argv, void (*kernel)(void**), int n_in, int n_out);
inline unsigned int atomicAdd(unsigned int* a, unsigned int v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline unsigned int __float_as_uint(float x) { unsigned int u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned int u) { float x; std::memcpy(&x, &u, 4); return x; }
float __shfl_xor_sync(unsigned int mask, float v, int lane);
unsigned int __ballot_sync(unsigned int mask, int p);
void __syncwarp(unsigned int mask = 0xffffffffu);
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline float fabsf(float x) { return __builtin_fabsf(x); }
struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) {  // round to nearest even, as MLX's CPU astype
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) { bits = uint16_t((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    bits = uint16_t(u >> 16);
  }
  operator float() const { return __uint_as_float(uint32_t(bits) << 16); }
};
"""

# compiled once per session: the launcher (files in and out, one OS thread per thread of a block)
EMU_HARNESS = r"""
#include <barrier>
#include <cstdio>
#include <memory>
#include <cstdlib>
#include <thread>
#include <vector>
struct dim3 { unsigned int x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
static std::barrier<>* bar = nullptr;
void __syncthreads() { bar->arrive_and_wait(); }
// a warp: its lanes (consecutive threads of 32) meet at their own barrier; a ballot's bits go
// through a slot per lane between two meetings
struct Warp {
  std::barrier<>* meet;
  unsigned int bits[32];
};
static std::vector<Warp> warps;
void __syncwarp(unsigned int) { warps[threadIdx.x / 32].meet->arrive_and_wait(); }
unsigned int __ballot_sync(unsigned int, int p) {
  Warp& w = warps[threadIdx.x / 32];
  w.bits[threadIdx.x % 32] = p ? 1u : 0u;
  w.meet->arrive_and_wait();
  unsigned int r = 0;
  for (unsigned int l = 0; l < 32; ++l) r |= w.bits[l] << l;
  w.meet->arrive_and_wait();
  return r;
}
// argv: folder, blocks, threads, misalign bytes; files in0.. (inputs), out0.. (sized, pre-filled)
extern "C" int mk_emu_main(int argc, char** argv, void (*kernel)(void**), int n_in, int n_out) {
  const char* dir = argv[1];
  gridDim.x = (unsigned)atoi(argv[2]);
  blockDim.x = (unsigned)atoi(argv[3]);
  const size_t shift = (size_t)atoi(argv[4]);
  std::vector<void*> ptrs(n_in + n_out);
  std::vector<size_t> sizes(n_in + n_out);
  char path[4096];
  for (int i = 0; i < n_in + n_out; ++i) {
    if (i < n_in) snprintf(path, sizeof path, "%s/in%d", dir, i);
    else snprintf(path, sizeof path, "%s/out%d", dir, i - n_in);
    FILE* f = fopen(path, "rb");
    fseek(f, 0, SEEK_END);
    sizes[i] = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    char* buf = (char*)malloc(sizes[i] + shift + 1);  // exact: a sanitizer build sees any overrun
    ptrs[i] = buf + (i < n_in ? shift : 0);
    if (fread(ptrs[i], 1, sizes[i], f) != sizes[i]) return 2;
    fclose(f);
  }
  // the blocks run one after another (shared arrays are statics), each thread of a block a thread
  std::barrier<> b((std::ptrdiff_t)blockDim.x);
  bar = &b;
  std::vector<std::unique_ptr<std::barrier<>>> meets;
  for (unsigned w = 0; w * 32 < blockDim.x; ++w) {
    const unsigned lanes = blockDim.x - w * 32 < 32 ? blockDim.x - w * 32 : 32;
    meets.emplace_back(new std::barrier<>((std::ptrdiff_t)lanes));
    warps.push_back(Warp{meets.back().get(), {}});
  }
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < blockDim.x; ++t) {
    ts.emplace_back([&, t] {
      threadIdx.x = t;
      for (unsigned g = 0; g < gridDim.x; ++g) {
        blockIdx.x = g;
        kernel(ptrs.data());
        b.arrive_and_wait();  // the block is done before the next one reuses its shared arrays
      }
    });
  }
  for (auto& th : ts) th.join();
  for (int j = 0; j < n_out; ++j) {
    snprintf(path, sizeof path, "%s/out%d", dir, j);
    FILE* f = fopen(path, "wb");
    fwrite(ptrs[n_in + j], 1, sizes[n_in + j], f);
    fclose(f);
  }
  return 0;
}
"""

EMU_TYPES = {
    "float32": "float",
    "bfloat16": "__nv_bfloat16",
    "uint32": "uint32_t",
    "uint8": "uint8_t",
    "int32": "int32_t",
    "bool": "bool",
}


def _dtype_name(dt):
    return str(dt).split(".")[-1]


class EmulatedKernel:
    """Stands in for mx.fast.cuda_kernel's callable: compiles (cached) and runs on the CPU."""

    def __init__(self, root, name, km, has_base, inputs, outputs, misalign):
        self.root, self.name, self.km, self.has_base = root, name, km, has_base
        self.input_names = (["base"] if has_base else []) + [f"x{m}" for m in range(km)] + list(inputs)
        self.output_names, self.misalign = list(outputs), misalign

    def _binary(self, in_types, out_types, template):
        import hashlib

        header, body = kernel_source(self.name, "cuda")
        if self.km:
            body = model_macros(self.km, self.has_base) + body
        consts = ""
        for k, v in template:
            if isinstance(v, bool):
                consts += f"  constexpr bool {k} = {str(v).lower()};\n"
            elif isinstance(v, int):
                consts += f"  constexpr int {k} = {v};\n"
            else:
                consts += f"  using {k} = {EMU_TYPES[_dtype_name(v)]};\n"
        params = [f"const {t}* {n}" for n, t in zip(self.input_names, in_types)]
        params += [f"{t}* {n}" for n, t in zip(self.output_names, out_types)]
        n_in, n_out = len(in_types), len(out_types)
        args = [f"({t}*)ptrs[{i}]" for i, t in enumerate(in_types)]
        args += [f"({t}*)ptrs[{n_in + j}]" for j, t in enumerate(out_types)]
        main = (
            f"static void launch(void** ptrs) {{ mk_kernel({', '.join(args)}); }}\n"
            f"int main(int argc, char** argv) {{ return mk_emu_main(argc, argv, launch, {n_in}, {n_out}); }}\n"
        )
        src = (
            '#include "emu_shim.h"\n'
            + header
            + "\n__global__ void mk_kernel(\n  "
            + ",\n  ".join(params)
            + ") {\n"
            + consts
            + body
            + "\n}\n"
            + main
        )
        exe = self.root / ("k" + hashlib.sha1(src.encode()).hexdigest()[:16])
        import os

        sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer"] if os.environ.get("MK_EMU_ASAN") else []
        exe = exe.with_name(exe.name + ("a" if sanitize else ""))
        harness = self.root / ("harness_asan.o" if sanitize else "harness.o")
        if not harness.exists():
            (self.root / "emu_shim.h").write_text(EMU_SHIM)
            (self.root / "harness.cpp").write_text(EMU_HARNESS)
            res = subprocess.run(
                [
                    CLANG,
                    "-x",
                    "c++",
                    "-std=c++20",
                    "-O1",
                    "-pthread",
                    *sanitize,
                    "-c",
                    str(self.root / "harness.cpp"),
                    "-o",
                    str(harness),
                ],
                capture_output=True,
                text=True,
            )
            assert res.returncode == 0, res.stderr[-4000:]
        if not exe.exists():
            cpp = exe.with_suffix(".cpp")
            cpp.write_text(src)
            res = subprocess.run(
                [
                    CLANG,
                    "-x",
                    "c++",
                    "-std=c++17",
                    "-O1",
                    "-ffp-contract=off",
                    "-Wno-unused",
                    *sanitize,
                    "-I",
                    str(self.root),
                    str(cpp),
                    "-x",
                    "none",
                    str(harness),
                    "-pthread",
                    "-o",
                    str(exe),
                ],
                capture_output=True,
                text=True,
            )
            assert res.returncode == 0, res.stderr[-4000:]
        return exe

    def __call__(self, inputs, output_shapes, output_dtypes, grid, threadgroup, template=(), init_value=None, **_):
        import tempfile

        import mlx.core as mx
        import numpy as np

        arrays = [mx.array(a) if not isinstance(a, mx.array) else a for a in inputs]
        in_types = [EMU_TYPES[_dtype_name(a.dtype)] for a in arrays]
        out_types = [EMU_TYPES[_dtype_name(d)] for d in output_dtypes]
        exe = self._binary(in_types, out_types, list(template))
        with tempfile.TemporaryDirectory(dir=self.root) as d:
            for i, a in enumerate(arrays):
                a = a.reshape(-1)
                raw = np.array(a.view(mx.uint16)) if a.dtype == mx.bfloat16 else np.array(a)
                raw.tofile(f"{d}/in{i}")
            sizes = []
            for j, (shape, dt) in enumerate(zip(output_shapes, output_dtypes)):
                count = int(np.prod(shape)) if len(shape) else 1
                nbytes = count * (2 if dt == mx.bfloat16 else np.dtype(_dtype_name(dt)).itemsize)
                fill = b"\0" if init_value is not None else b"\xcd"  # unwritten outputs show up
                with open(f"{d}/out{j}", "wb") as f:
                    f.write(fill * nbytes)
                sizes.append(count)
            tx, gx = threadgroup[0], grid[0]
            blocks = -(-gx // tx)
            res = subprocess.run([str(exe), d, str(blocks), str(min(tx, gx)), str(self.misalign)], capture_output=True, text=True)
            assert res.returncode == 0, res.stderr
            outs = []
            for j, (shape, dt) in enumerate(zip(output_shapes, output_dtypes)):
                if dt == mx.bfloat16:
                    a = mx.array(np.fromfile(f"{d}/out{j}", dtype=np.uint16)).view(mx.bfloat16)
                else:
                    a = mx.array(np.fromfile(f"{d}/out{j}", dtype=_dtype_name(dt)))
                outs.append(a.reshape(shape))
        return outs


@pytest.fixture
def emulated_cuda(monkeypatch, tmp_path_factory):
    """The kernels module dispatching to the emulated CUDA kernels; yields a setter for misalignment."""
    from mergekit_mlx.kernels import gpu

    root = tmp_path_factory.getbasetemp() / "emu"
    root.mkdir(exist_ok=True)
    state = {"misalign": 0, "on": True}

    def fake_kernel(name, backend_name, km=0, has_base=False, atomic=False, inputs=(), outputs=("out",)):
        return EmulatedKernel(root, name, km, has_base, inputs, outputs, state["misalign"])

    # the first-use checks have a test of their own: here they count as passed (trusted)
    with gpu.substitute(fake_kernel, lambda: "cuda" if state["on"] else None, trusted=True):
        yield state


needs_clang = pytest.mark.skipif(CLANG is None, reason="clang not found (Debian/Ubuntu: apt-get install clang)")


def np_selection(x, base, k):
    """(t, cut) by the documented rule, from a full sort: t the bits of the k-th largest float32
    |x - base|; cut the flat index of the last tie at t that is kept, n - 1 when all are kept."""
    import numpy as np

    a = np.abs(np.asarray(x, np.float32).reshape(-1) - (0 if base is None else np.asarray(base, np.float32).reshape(-1)))
    bits = a.astype(np.float32).view(np.uint32).astype(np.int64)
    order = np.lexsort((np.arange(bits.size), -bits))
    t = bits[order[k - 1]]
    need = k - int((bits > t).sum())
    ties = np.flatnonzero(bits == t)
    return int(t), int(bits.size - 1 if need == ties.size else ties[need - 1])


def emu_family(n=12297, dtype="bfloat16"):
    """A base and three task models with many exact ties (bf16 deltas), one equal to the base in places."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(5)
    base = rng.standard_normal(n).astype(np.float32)
    others = [base + 0.01 * rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    others[2][::3] = base[::3]
    to = (lambda a: mx.array(a).astype(mx.bfloat16)) if dtype == "bfloat16" else mx.array
    return to(base), [to(o) for o in others]


@needs_clang
@pytest.mark.parametrize("override,tg", [(None, 256), ("between", 256), ("outside", 256), (None, 64)])
def test_emulated_selection_paths_are_exact(emulated_cuda, override, tg, monkeypatch):
    """tg = 64: threadgroups of 64, so the tie scan crosses several tiles of a 2048-element chunk."""
    import mlx.core as mx
    import numpy as np

    from mergekit_mlx.kernels import gpu, selection_gpu

    monkeypatch.setattr(gpu, "TG", tg)
    base, others = emu_family()
    n = base.size
    ks = [1, n // 3, n - 5]
    sels, rows = selection_gpu.select("cuda", others, base, ks, override)
    b = np.array(base.astype(mx.float32))
    want = [np_selection(np.array(o.astype(mx.float32)), b, k) for o, k in zip(others, ks)]
    assert [(int(s.t.item()), int(s.cut.item())) for s in sels] == want
    assert np.array(rows).reshape(-1, 2).tolist() == [list(w) for w in want]
    x = others[0].astype(mx.float32) * 3.0  # no base; float32 with ties
    sels, rows = selection_gpu.select("cuda", [x], None, [n // 2], override)
    assert (int(sels[0].t.item()), int(sels[0].cut.item())) == np_selection(np.array(x), None, n // 2)


@needs_clang
def test_emulated_count_totals_add_every_row_and_column(emulated_cuda):
    """select_sum over a table of several row blocks (16 rows) and column blocks (256 columns),
    the last of each partial, mostly nonzero counts: the column sums."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(5)
    rows, w = 37, 600
    tab = (rng.integers(1, 1000, size=(rows, w)) * (rng.random((rows, w)) < 0.7)).astype(np.uint32)
    from mergekit_mlx.kernels import selection_gpu

    got = selection_gpu.select_totals("cuda", mx.array(tab.reshape(-1)), rows, w)
    assert np.array(got).tolist() == tab.sum(axis=0).tolist()


@needs_clang
def test_emulated_threshold_and_topk_mask(emulated_cuda):
    import mlx.core as mx
    import numpy as np

    from mergekit_mlx import kernels as K

    x = mx.array(np.random.default_rng(2).standard_normal(9001).astype(np.float32)).astype(mx.bfloat16)
    xf = np.array(x.astype(mx.float32))
    for k in (1, 90, 4500, 9000):
        t, cut = np_selection(xf, None, k)
        assert K.magnitude_threshold(x, k).item() == np.uint32(t).view(np.float32)
        bits = np.abs(xf).view(np.uint32).astype(np.int64)
        want = (bits > t) | ((bits == t) & (np.arange(xf.size) <= cut))
        np.testing.assert_array_equal(np.array(K.topk_mask(x, k)), want)


@needs_clang
@pytest.mark.parametrize("misalign", [0, 2])
def test_emulated_fused_merges_equal_the_fallback(emulated_cuda, misalign):
    """Every method through the emulated kernels against the CPU fallback: TIES bit-identical;
    with an L1 rescale (summed in another order) within one bf16 rounding. misalign=2 shifts
    every input by one bf16 element, so the kernels take their unaligned (scalar) loads."""
    import mlx.core as mx
    import numpy as np

    from mergekit_mlx import kernels as K

    emulated_cuda["misalign"] = misalign
    base, others = emu_family()
    methods = {
        "ties": ("magnitude", "sum", True, False),
        "ties + rescale": ("magnitude", "sum", True, True),
        "dare_ties": ("random", "sum", False, True),
        "dare_linear": ("random", None, False, True),
        "magnitude, no consensus": ("magnitude", None, False, False),
    }
    for name, (sp, cons, norm, resc) in methods.items():
        results = []
        for on in (True, False):
            emulated_cuda["on"] = on
            out = K.fused_task_merge(
                base,
                others,
                [0.5, 0.3, -0.2],
                sparsify=sp,
                densities=[0.3, 0.5, 0.9],
                rescale=resc,
                consensus=cons,
                normalize=norm,
                lam=0.9,
                seed=3,
            )
            results.append(np.array(out.astype(mx.float32)))
        emulated_cuda["on"] = True
        got, ref = results
        if resc:
            assert np.all(np.abs(got - ref) <= np.abs(ref) * 2.0**-7), name
        else:
            np.testing.assert_array_equal(got, ref, err_msg=name)
    assert all(K.kernel_status().values())  # no kernel failed and fell back


@needs_clang
def test_emulated_first_use_checks_pass(emulated_cuda):
    from mergekit_mlx import kernels as K

    for what in ("uniform", "select", "l1", "merge"):
        assert K.GPU_GROUPS[what].check("cuda"), what


@needs_clang
def test_emulated_ties_with_five_models(emulated_cuda):
    """More tensors than one selection launch takes (three): two launches, one merge."""
    import mlx.core as mx
    import numpy as np

    from mergekit_mlx import kernels as K

    base, others = emu_family(n=9000)
    others = others + [(o.astype(mx.float32) * 1.5).astype(mx.bfloat16) for o in others[:2]]
    results = []
    for on in (True, False):
        emulated_cuda["on"] = on
        out = K.fused_task_merge(
            base,
            others,
            [0.3, 0.2, 0.2, 0.2, 0.1],
            sparsify="magnitude",
            densities=[0.2, 0.4, 0.5, 0.6, 0.8],
            rescale=False,
            consensus="sum",
            normalize=True,
            lam=1.0,
        )
        results.append(np.array(out.astype(mx.float32)))
    emulated_cuda["on"] = True
    np.testing.assert_array_equal(*results)


@needs_clang
@pytest.mark.parametrize("override", [None, "between"])
def test_emulated_ties_launched_together_equal_one_at_a_time(emulated_cuda, override, monkeypatch):
    """Several TIES merges launched before any is evaluated, their gates read back at once, then
    finished: each equals the CPU fallback bit for bit (also when a selection must be finished)."""
    import mlx.core as mx
    import numpy as np

    from mergekit_mlx import kernels as K
    from mergekit_mlx.kernels import selection_gpu, task_merge, task_merge_gpu
    from mergekit_mlx.kernels.task_plan import Keep, TaskMerge

    fams = [emu_family(n=n) for n in (9000, 12297)]
    weights, dens = [0.5, 0.3, 0.2], [0.3, 0.5, 0.7]
    started = []
    with selection_gpu.force_path(override):
        for base, others in fams:
            plans, _ = task_merge.plan_models(base, others, None, dens, False, 0, [0, 1, 2], None)
            for p in plans:
                p.mode = Keep.MAGNITUDE
            ks = [int(d * base.size) for d in dens]
            args = ("cuda", TaskMerge(base, tuple(others), tuple(weights), True, True, 1.0, 1.0), plans, [0, 1, 2], ks)
            started.append((args, *task_merge_gpu.ties_start(*args)))
        mx.eval([s[1] for s in started], [s[2] for s in started])
        words = mx.concatenate([s[2] for s in started]).tolist()
        w = len(words) // len(started)
        got = [task_merge_gpu.ties_finish(*a, o, words[j * w : (j + 1) * w], g) for j, (a, o, _, g) in enumerate(started)]
    emulated_cuda["on"] = False
    for (base, others), out in zip(fams, got):
        want = K.fused_task_merge(
            base, others, weights, sparsify="magnitude", densities=dens, rescale=False, consensus="sum", normalize=True, lam=1.0
        )
        np.testing.assert_array_equal(np.array(out.astype(mx.float32)), np.array(want.astype(mx.float32)))
    emulated_cuda["on"] = True


@needs_clang
@pytest.mark.parametrize("override", [None, "between", "outside"])
def test_emulated_ties_with_deferred_gate_checks(emulated_cuda, override, monkeypatch):
    """Under deferred_gate_checks a TIES merge hands its gate to the caller instead of reading it
    back: where the gate says final the output is the result (bit-identical to the CPU fallback);
    where it does not, the caller merges again outside the context and gets the result."""
    import mlx.core as mx
    import numpy as np

    from mergekit_mlx import kernels as K
    from mergekit_mlx.kernels import selection_gpu, task_merge_gpu

    base, others = emu_family()
    kw = dict(sparsify="magnitude", densities=[0.3, 1.0, 0.6], rescale=False, consensus="sum", normalize=True, lam=1.0)
    with selection_gpu.force_path(override):
        with task_merge_gpu.deferred_gate_checks() as gates:
            out = K.fused_task_merge(base, others, [0.5, 0.3, 0.2], **kw)
        assert len(gates) == 1
        mx.eval(out, gates)
        final = task_merge_gpu.gates_final(gates)
        assert final == (override is None)
        if not final:
            out = K.fused_task_merge(base, others, [0.5, 0.3, 0.2], **kw)
        calls = []
        together = K.evaluate_together([lambda: calls.append(1) or (K.fused_task_merge(base, others, [0.5, 0.3, 0.2], **kw),)])
    assert len(calls) == (1 if override is None else 2)  # merged again where the gate was not final
    np.testing.assert_array_equal(np.array(together[0][0].astype(mx.float32)), np.array(out.astype(mx.float32)))
    emulated_cuda["on"] = False
    want = K.fused_task_merge(base, others, [0.5, 0.3, 0.2], **kw)
    emulated_cuda["on"] = True
    np.testing.assert_array_equal(np.array(out.astype(mx.float32)), np.array(want.astype(mx.float32)))


@needs_clang
@pytest.mark.parametrize("override", ["between", "outside"])
def test_emulated_ties_when_the_counting_pass_does_not_settle(emulated_cuda, override, monkeypatch):
    """The merge launched behind the selection skips its work when a selection is not final; the
    selection is then finished (collecting pass or radix select) and the merge runs again."""
    import mlx.core as mx
    import numpy as np

    from mergekit_mlx import kernels as K
    from mergekit_mlx.kernels import selection_gpu

    base, others = emu_family()
    results = []
    for on in (True, False):
        emulated_cuda["on"] = on
        with selection_gpu.force_path(override):
            out = K.fused_task_merge(
                base,
                others,
                [0.5, 0.3, 0.2],
                sparsify="magnitude",
                densities=[0.3, 1.0, 0.6],
                rescale=False,
                consensus="sum",
                normalize=True,
                lam=1.0,
            )
        results.append(np.array(out.astype(mx.float32)))
    emulated_cuda["on"] = True
    np.testing.assert_array_equal(*results)


@needs_clang
@pytest.mark.parametrize("n", [1, 2, 3, 9, 2049])
def test_emulated_tiny_tensors(emulated_cuda, n):
    """Sizes below one sample, one vector of eight and one chunk: the same results as the fallback."""
    import mlx.core as mx
    import numpy as np

    from mergekit_mlx import kernels as K

    rng = np.random.default_rng(n)
    x = mx.array(rng.standard_normal(n).astype(np.float32))
    base, others = (
        mx.array(rng.standard_normal(n).astype(np.float32)).astype(mx.bfloat16),
        [mx.array(rng.standard_normal(n).astype(np.float32)).astype(mx.bfloat16) for _ in range(2)],
    )
    got, want = [], []
    for on, out in ((True, got), (False, want)):
        emulated_cuda["on"] = on
        for k in sorted({1, max(1, n // 2), n}):
            out.append(K.magnitude_threshold(x, k).item())
            out.append(np.array(K.topk_mask(x, k)).tolist())
        out.append(
            np.array(
                K.fused_task_merge(
                    base,
                    others,
                    [0.6, 0.4],
                    sparsify="magnitude",
                    densities=[0.5, 0.7],
                    rescale=False,
                    consensus="sum",
                    normalize=True,
                    lam=1.0,
                ).astype(mx.float32)
            ).tolist()
        )
    emulated_cuda["on"] = True
    assert got == want


def test_a_passed_first_use_check_is_remembered_on_the_machine(monkeypatch, tmp_path):
    """CUDA: a kernel group's passed first-use check is kept on disk under a key of everything it
    depends on; a later process with the same key skips it, MERGEKIT_MLX_RECHECK runs it again,
    and a failed check is never remembered."""
    import warnings

    from mergekit_mlx.kernels import cuda_compile, gpu

    monkeypatch.setenv("MERGEKIT_MLX_CACHE", str(tmp_path))
    monkeypatch.delenv("MERGEKIT_MLX_RECHECK", raising=False)
    monkeypatch.setattr(cuda_compile, "_verdict_key", lambda: "key1")
    calls = []
    outcome = {"ok": False}
    group = gpu.Group("probe", lambda backend: calls.append(backend) or outcome["ok"])
    warnings.simplefilter("ignore")

    def new_process():
        gpu.forget_checks()

    try:
        new_process()
        assert group.call("cuda", lambda: 1) is None and len(calls) == 1  # failed: fallback
        new_process()
        outcome["ok"] = True
        assert group.call("cuda", lambda: 2) == 2 and len(calls) == 2  # the failure was not kept
        new_process()
        assert group.call("cuda", lambda: 3) == 3 and len(calls) == 2  # remembered: not run
        new_process()
        monkeypatch.setenv("MERGEKIT_MLX_RECHECK", "1")
        assert group.call("cuda", lambda: 4) == 4 and len(calls) == 3
        monkeypatch.delenv("MERGEKIT_MLX_RECHECK")
        new_process()
        monkeypatch.setattr(cuda_compile, "_verdict_key", lambda: "key2")  # other sources, MLX or device
        assert group.call("cuda", lambda: 5) == 5 and len(calls) == 4
    finally:
        gpu.GROUPS.pop("probe")
        new_process()


def test_kernel_parameter_arrays_cached_by_one_thread_work_in_another():
    """Merges run on several threads; the small parameter arrays the GPU dispatch caches must not
    be lazy arrays tied to the thread that made them (MLX: "no Stream in current thread")."""
    import threading

    from mergekit_mlx.kernels import gpu

    gpu.ones_f32.cache_clear()
    gpu.const_u32.cache_clear()
    made = []
    t = threading.Thread(target=lambda: made.extend([gpu.ones_f32(3), gpu.const_u32((1, 2, 3))]))
    t.start()
    t.join()
    assert gpu.ones_f32(3) is made[0] and gpu.const_u32((1, 2, 3)) is made[1]
    assert (made[0] + 1).tolist() == [2.0, 2.0, 2.0] and (made[1] + 1).tolist() == [2, 3, 4]


def test_cuda_kernels_fall_back_to_mlx_jit_when_nvrtc_cannot_compile(monkeypatch):
    """Where NVRTC or the CUDA headers are missing (or a compile fails) a kernel is launched through
    MLX's own JIT with the same arguments, and the compile is not retried on every call."""
    import mlx.core as mx

    from mergekit_mlx.kernels import cuda_compile as cuda_jit

    def no_compiler():
        raise cuda_jit.CompileError("NVRTC or the CUDA headers were not found")

    monkeypatch.setattr(cuda_jit, "compiler", no_compiler)
    calls = []
    kern = cuda_jit.CachedKernel(
        "mk_probe", ["x"], ["out"], "", "out[0] = x[0];", fallback=lambda **kw: calls.append(kw) or ["from MLX's JIT"]
    )
    x = mx.array([1.0])
    for _ in range(2):
        got = kern(
            inputs=[x],
            output_shapes=[(1,)],
            output_dtypes=[mx.float32],
            grid=(1, 1, 1),
            threadgroup=(1, 1, 1),
            template=[("T", mx.float32)],
        )
        assert got == ["from MLX's JIT"]
    assert len(calls) == 2 and calls[0]["template"] == [("T", mx.float32)] and calls[0]["inputs"] == [x]
    assert kern.failed and "NVRTC" in kern.failed


class RecordingNvrtc:
    """NVRTC's stand-in: a 'cubin' that names its architecture and source, and a log of compiles."""

    version = "13.0"

    def __init__(self):
        self.compiled = []

    def compile(self, source: str, arch: str, name: str = "kernel.cu") -> bytes:
        self.compiled.append((arch, source))
        return b"\x7fELF" + arch.encode() + b":" + source.encode()


def shipped_archive(folder, arch: str, members: dict[str, bytes]):
    import zipfile

    from mergekit_mlx.kernels import cuda_compile

    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"cuda-{arch}.zip", "w") as z:
        for source, data in members.items():
            z.writestr(cuda_compile.prebuilt_member(source, arch), data)


def test_a_shipped_cubin_is_launched_without_compiling_and_other_sources_compile_and_are_recorded(tmp_path, monkeypatch):
    from mergekit_mlx.kernels import cuda_compile

    nv = RecordingNvrtc()
    monkeypatch.setenv("MERGEKIT_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cuda_compile, "compiler", lambda: (nv, "sm_90a"))
    monkeypatch.setattr(cuda_compile, "prebuilt_dir", lambda: tmp_path / "prebuilt")
    cuda_compile._archive.cache_clear()
    shipped = b"\x7fELF shipped"
    shipped_archive(tmp_path / "prebuilt", "sm_90a", {"shipped source": shipped, "not a cubin": b"garbage"})
    shipped_archive(tmp_path / "prebuilt", "sm_80", {"other arch": b"\x7fELF sm_80"})
    try:
        assert cuda_compile.cubin("shipped source") == shipped
        assert nv.compiled == []
        # a member that is no ELF file, a source shipped only for another architecture, and a
        # source nobody shipped all compile here, and each source is kept beside its cubin
        for source in ("not a cubin", "other arch", "new source"):
            assert cuda_compile.cubin(source) == b"\x7fELFsm_90a:" + source.encode()
        assert [s for _, s in nv.compiled] == ["not a cubin", "other arch", "new source"]
        recorded = sorted(p.read_text() for p in (tmp_path / "cache" / "cuda").glob("*.cu"))
        assert recorded == ["new source", "not a cubin", "other arch"]
        for cu in (tmp_path / "cache" / "cuda").glob("*.cu"):
            assert cu.with_suffix(".cubin").read_bytes() == b"\x7fELFsm_90a:" + cu.read_bytes()
    finally:
        cuda_compile._archive.cache_clear()


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120a", "sm_121a"])
def test_the_shipped_cubins_hold_what_a_first_ties_or_linear_merge_launches(arch):
    """A change to a kernel's source, its prelude or its instantiation misses the shipped cubins,
    and a first merge compiles again: rebuild them (benchmarks/gpu_prebuild.py on a GPU host)."""
    import zipfile

    import mlx.core as mx

    from mergekit_mlx.kernels import cuda_compile, gpu, task_merge_gpu, weighted_sums
    from mergekit_mlx.kernels.task_plan import Keep

    launches = task_merge_gpu.launches(mx.bfloat16, mx.bfloat16, [Keep.MAGNITUDE] * 2, True, True, False)
    launches += weighted_sums.launches([mx.bfloat16] * 3, mx.bfloat16)
    with zipfile.ZipFile(cuda_compile.prebuilt_dir() / f"cuda-{arch}.zip") as z:
        shipped = set(z.namelist())
    for spec in launches:
        assert cuda_compile.prebuilt_member(gpu.cuda_translation_unit(spec), arch) in shipped, spec.name
    # and the kernels of every GPU merge's reads and writes
    from mergekit_mlx.kernels import gpu_reads, gpu_writes

    for kernel, instance in [
        (gpu_reads.COPY, ((mx.uint64,), (mx.uint8,), ())),
        (gpu_writes.ADDRESS, ((mx.uint8,), (mx.uint64,), ())),
    ]:
        assert cuda_compile.prebuilt_member(kernel.source(*instance)[1], arch) in shipped, kernel.tag


def test_prebuild_compiles_every_recorded_source_for_each_arch_into_the_same_bytes(tmp_path):
    import zipfile

    from mergekit_mlx.kernels import cuda_compile, prebuild

    sources = tmp_path / "cache"
    sources.mkdir()
    for i, text in enumerate(["kernel a", "kernel b", "kernel a"]):  # the same source under two keys
        (sources / f"{i}.cu").write_text(text)
    (sources / "x.cubin").write_bytes(b"\x7fELF")  # cubins of the cache are not sources
    found = prebuild.read_sources([sources])
    assert found == ["kernel a", "kernel b"]
    archives = []
    for out in (tmp_path / "one", tmp_path / "two"):
        for arch in ("sm_80", "sm_90a"):
            assert prebuild.build_archive(RecordingNvrtc(), found, arch, out, threads=2)[0] == 2
        archives.append([(out / f"cuda-{a}.zip").read_bytes() for a in ("sm_80", "sm_90a")])
    assert archives[0] == archives[1]
    with zipfile.ZipFile(tmp_path / "one" / "cuda-sm_90a.zip") as z:
        for text in found:
            assert z.read(cuda_compile.prebuilt_member(text, "sm_90a")) == b"\x7fELFsm_90a:" + text.encode()
    assert not list((tmp_path / "one").glob(".tmp-*"))


def test_prebuild_add_keeps_the_archives_members_and_adds_the_new_sources(tmp_path):
    import zipfile

    from mergekit_mlx.kernels import cuda_compile, prebuild

    nv = RecordingNvrtc()
    prebuild.build_archive(nv, ["kernel a", "kernel b"], "sm_90a", tmp_path, threads=1)
    assert prebuild.build_archive(nv, ["kernel c"], "sm_90a", tmp_path, threads=1, add=True)[0] == 3
    assert nv.compiled[-1] == ("sm_90a", "kernel c")  # only the new source is compiled again
    with zipfile.ZipFile(tmp_path / "cuda-sm_90a.zip") as z:
        assert sorted(z.namelist()) == sorted(
            cuda_compile.prebuilt_member(t, "sm_90a") for t in ("kernel a", "kernel b", "kernel c")
        )
    prebuild.build_archive(nv, ["kernel c"], "sm_90a", tmp_path, threads=1)  # without add: only what is given
    with zipfile.ZipFile(tmp_path / "cuda-sm_90a.zip") as z:
        assert z.namelist() == [cuda_compile.prebuilt_member("kernel c", "sm_90a")]


def test_prebuild_add_to_a_file_that_is_no_archive_exits_2_and_leaves_it(tmp_path, monkeypatch, capsys):
    from mergekit_mlx.kernels import prebuild

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.cu").write_text("kernel a")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cuda-sm_90a.zip").write_bytes(b"not a zip")
    monkeypatch.setattr(prebuild, "find_nvrtc", lambda: RecordingNvrtc())
    argv = ["--sources", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--arch", "sm_90a", "--add"]
    assert prebuild.main(argv) == 2
    assert "cuda-sm_90a.zip" in capsys.readouterr().err
    assert (tmp_path / "out" / "cuda-sm_90a.zip").read_bytes() == b"not a zip"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cuda-sm_90a.zip"]


def test_prebuild_without_nvrtc_exits_2_naming_what_is_missing(tmp_path, monkeypatch, capsys):
    from mergekit_mlx.kernels import cuda_compile, prebuild

    monkeypatch.setattr(cuda_compile, "_find_nvrtc", lambda: None)
    assert prebuild.main(["--sources", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "NVRTC" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cuda_translation_unit_has_the_custom_kernel_signature():
    import mlx.core as mx

    from mergekit_mlx.kernels.cuda_compile import wrap_source

    src = wrap_source(
        "mk_k",
        "// header\n",
        "out[0] = x[0];",
        [("x", mx.bfloat16), ("up", mx.uint32)],
        [("out", mx.float32)],
        [("KM", 3), ("ON", True), ("T", mx.bfloat16)],
    )
    assert "#include <cuda_bf16.h>" in src and "mlx/backend" not in src
    assert ('extern "C" __global__ void mk_k(\n    const __nv_bfloat16* x,\n    const uint32_t* up,\n    float* out) {') in src
    assert "constexpr int KM = 3;" in src and "constexpr bool ON = true;" in src and "using T = __nv_bfloat16;" in src
