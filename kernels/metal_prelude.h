// Metal spellings of the names the shared kernel bodies (*.inc) use.
// Each macro is #undef'd first because MLX's own headers are included before this one.
#include <metal_stdlib>
using namespace metal;

#undef INLINE
#define INLINE inline
#undef AS_U32
#define AS_U32(f) as_type<uint>(f)
#undef AS_F32
#define AS_F32(u) as_type<float>(u)
#undef FABS
#define FABS(x) metal::fabs(x)
#undef FMUL
#define FMUL(a, b) ((a) * (b))
#undef FADD
#define FADD(a, b) ((a) + (b))
#undef FDIV
#define FDIV(a, b) ((a) / (b))
#undef DIV_FAST
#define DIV_FAST(a, b, ok) FDIV((a), (b))
#undef LOADF
#define LOADF(p, i) static_cast<float>((p)[i])
#undef STORE_T
#define STORE_T(p, i, v) ((p)[i] = static_cast<T>(v))
#undef SHARED
#define SHARED threadgroup
#undef SHARED_ATOMIC
#define SHARED_ATOMIC threadgroup atomic_uint
#undef SH_ADD
#define SH_ADD(a, v) atomic_fetch_add_explicit(&(a), (v), memory_order_relaxed)
#undef SH_STORE
#define SH_STORE(a, v) atomic_store_explicit(&(a), (v), memory_order_relaxed)
#undef SH_LOAD
#define SH_LOAD(a) atomic_load_explicit(&(a), memory_order_relaxed)
// global outputs of kernels built with atomic_outputs=True are device atomic<uint>
#undef G_ADD
#define G_ADD(a, v) atomic_fetch_add_explicit(&(a), (v), memory_order_relaxed)
#undef G_STORE
#define G_STORE(a, v) atomic_store_explicit(&(a), (v), memory_order_relaxed)
#undef BARRIER
#define BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#undef SIMD_SUM
#define SIMD_SUM(x) simd_sum(x)
// a simdgroup is 32 lanes on Apple GPUs: each lane's bit, a barrier among them, a population count
#undef SIMD_BALLOT
#define SIMD_BALLOT(p) static_cast<uint32_t>(static_cast<simd_vote::vote_t>(simd_ballot(p)))
#undef SIMD_SYNC
#define SIMD_SYNC() simdgroup_barrier(mem_flags::mem_threadgroup)
#undef POPCOUNT
#define POPCOUNT(x) popcount(x)
#undef UNROLL
#define UNROLL _Pragma("clang loop unroll(full)")
// eight consecutive elements: plain loads (Apple GPUs coalesce them; no alignment needed)
#undef MK_ALIGNED16
#define MK_ALIGNED16(p) true
#undef MK_LOAD8
#define MK_LOAD8(p, i, o) \
  for (uint mk_j = 0; mk_j < 8u; ++mk_j) { \
    (o)[mk_j] = static_cast<float>((p)[(i) + mk_j]); \
  }
#undef MK_STORE8
#define MK_STORE8(p, i, v) \
  for (uint mk_j = 0; mk_j < 8u; ++mk_j) { \
    (p)[(i) + mk_j] = static_cast<T>((v)[mk_j]); \
  }
