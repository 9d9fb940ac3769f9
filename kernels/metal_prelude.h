// Metal spellings of the names the shared kernel bodies (*.inc) use.
#include <metal_stdlib>
using namespace metal;

#define INLINE inline
#define AS_U32(f) as_type<uint>(f)
#define FABS(x) metal::fabs(x)
#define FMUL(a, b) ((a) * (b))
#define FADD(a, b) ((a) + (b))
#define FDIV(a, b) ((a) / (b))
#define LOADF(p, i) static_cast<float>((p)[i])
#define STORE_T(p, i, v) ((p)[i] = static_cast<T>(v))
#define SHARED threadgroup
#define SHARED_ATOMIC threadgroup atomic_uint
#define SH_ADD(a, v) atomic_fetch_add_explicit(&(a), (v), memory_order_relaxed)
#define SH_STORE(a, v) atomic_store_explicit(&(a), (v), memory_order_relaxed)
#define SH_LOAD(a) atomic_load_explicit(&(a), memory_order_relaxed)
// global outputs of kernels built with atomic_outputs=True are device atomic<uint>
#define G_ADD(a, v) atomic_fetch_add_explicit(&(a), (v), memory_order_relaxed)
#define G_STORE(a, v) atomic_store_explicit(&(a), (v), memory_order_relaxed)
#define BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define SIMD_SUM(x) simd_sum(x)
#define UNROLL _Pragma("clang loop unroll(full)")
