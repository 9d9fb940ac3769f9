"""Every kernel source compiles for syntax with clang, wrapped the way MLX wraps it.

Metal cannot run here, so each kernels/<name>.metal (with its splices resolved, exactly as the
loader builds it) is wrapped in the kernel signature `mx.fast.metal_kernel` generates and compiled
as C++ against a small header that declares the Metal built-ins the bodies use (address-space
qualifiers, atomics, barriers, simd_sum, as_type). The CUDA sources get the same treatment against
a header with the CUDA built-ins, as `mx.fast.cuda_kernel` wraps them. This catches misspelt
names, backend names used in the wrong file, type errors and template errors; Metal results are
verified only on Apple Silicon (the first-use check compares them with the CPU fallback).

CI needs clang: `apt-get install clang` (Debian/Ubuntu). Without it these tests skip.
"""

import shutil
import subprocess
from importlib.resources import files

import pytest

from mergekit_mlx.kernels import _model_macros, kernel_source

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
struct __nv_bfloat16 { __nv_bfloat16(float); operator float() const; };
unsigned int atomicAdd(unsigned int* a, unsigned int v);
void __syncthreads();
float __shfl_xor_sync(unsigned int mask, float v, int lane);
float __fmul_rn(float a, float b);
float __fadd_rn(float a, float b);
float __fdiv_rn(float a, float b);
unsigned int __float_as_uint(float x);
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
    "l1_sums": [(2, True, [("up", U32), ("fp", F32)], [("part", F32)], [("KM", 2), ("TG", 256)], False)],
    "task_merge": [
        (3, True, [("up", U32), ("fp", F32)], [("out", "T")],
         [("T", "T"), ("KM", 3), ("CONSENSUS", True), ("NORMALIZE", True)], False),
        (1, True, [("up", U32), ("fp", F32)], [("out", "T")],
         [("T", "T"), ("KM", 1), ("CONSENSUS", False), ("NORMALIZE", False)], False),
    ],
    "tie_count": [
        (2, True, [("up", U32)], [("counts", U32)], [("KM", 2), ("CHUNK", 4096)], False),
        (1, False, [("up", U32)], [("counts", U32)], [("KM", 1), ("CHUNK", 4096)], False),
    ],
    "bitnet_matmul": [
        (0, False, [("x", "T"), ("w", U8), ("scale", "T")], [("out", "T")],
         [("T", "T"), ("IN", 64), ("OUT", 30), ("R", 8), ("ROWS", 2), ("INVERT", True)], False),
    ],
}

METAL_TYPES = {U32: "uint32_t", F32: "float", U8: "uint8_t", "T": "bfloat16_t"}
CUDA_TYPES = {U32: "uint32_t", F32: "float", U8: "uint8_t", "T": "__nv_bfloat16"}
METAL_ATTRS = ["thread_position_in_grid", "threads_per_grid", "thread_position_in_threadgroup",
               "threads_per_threadgroup", "threadgroup_position_in_grid", "threadgroups_per_grid"]


def _names(km, has_base, inputs):
    return [("base", "T")] * has_base + [(f"x{m}", "T") for m in range(km)] + inputs


def metal_unit(name, inst):
    km, has_base, inputs, outputs, templates, atomic = inst
    header, body = kernel_source(name, "metal")
    if km:
        body = _model_macros(km, has_base, "metal") + body
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
    km, has_base, inputs, outputs, templates, atomic = inst
    header, body = kernel_source(name, "cuda")
    if km:
        body = _model_macros(km, has_base, "cuda") + body
    params = [f"const {CUDA_TYPES[t]}* {n}" for n, t in _names(km, has_base, inputs)]
    params += [f"{CUDA_TYPES[t]}* {n}" for n, t in outputs]
    consts = ""
    for k, v in templates:
        if v == "T":
            consts += f"  using {k} = __nv_bfloat16;\n"
        elif isinstance(v, bool):
            consts += f"  constexpr bool {k} = {str(v).lower()};\n"
        else:
            consts += f"  constexpr int {k} = {v};\n"
    return header + f"\n__global__ void mk_{name}(\n  " + ",\n  ".join(params) + ") {\n" + consts + body + "\n}\n"


def _compile(tmp_path, shim_name, shim, unit, include_dir_file=None):
    (tmp_path / shim_name).write_text(shim)
    if include_dir_file:
        (tmp_path / include_dir_file).write_text(f'#include "{shim_name}"\n')
    src = tmp_path / "unit.cpp"
    src.write_text(f'#include "{shim_name}"\n' + unit)
    cmd = [CLANG, "-x", "c++", "-std=c++17", "-fsyntax-only", "-Wno-unknown-attributes",
           "-Wno-unused", "-I", str(tmp_path), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + "\n--- source ---\n" + unit


def test_every_source_has_a_check_and_both_backends():
    root = files("mergekit_mlx._kernels")
    metal = {p.name[: -len(".metal")] for p in root.iterdir() if p.name.endswith(".metal")}
    cuda = {p.name[: -len(".cu")] for p in root.iterdir() if p.name.endswith(".cu")}
    assert metal == cuda == set(KERNELS)


@pytest.mark.skipif(CLANG is None, reason="clang not found (Debian/Ubuntu: apt-get install clang)")
@pytest.mark.parametrize("name,i", [(n, i) for n, insts in KERNELS.items() for i in range(len(insts))])
def test_metal_source_syntax(tmp_path, name, i):
    _compile(tmp_path, "metal_shim.h", METAL_SHIM, metal_unit(name, KERNELS[name][i]), include_dir_file="metal_stdlib")


@pytest.mark.skipif(CLANG is None, reason="clang not found (Debian/Ubuntu: apt-get install clang)")
@pytest.mark.parametrize("name,i", [(n, i) for n, insts in KERNELS.items() for i in range(len(insts))])
def test_cuda_source_syntax(tmp_path, name, i):
    _compile(tmp_path, "cuda_shim.h", CUDA_SHIM, cuda_unit(name, KERNELS[name][i]))


@pytest.mark.skipif(CLANG is None, reason="clang not found (Debian/Ubuntu: apt-get install clang)")
def test_the_check_rejects_a_cuda_name_in_metal(tmp_path):
    unit = metal_unit("random_uniform", KERNELS["random_uniform"][0]).replace("out[i] =", "out[blockIdx.x] =")
    with pytest.raises(AssertionError):
        _compile(tmp_path, "metal_shim.h", METAL_SHIM, unit, include_dir_file="metal_stdlib")
