// CUDA spellings of the names the shared kernel bodies (*.inc) use.
// Each macro is #undef'd first because MLX's own headers are included before this one.
#undef INLINE
#define INLINE __device__ __forceinline__
#undef AS_U32
#define AS_U32(f) __float_as_uint(f)
#undef AS_F32
#define AS_F32(u) __uint_as_float(u)
#undef FABS
#define FABS(x) fabsf(x)
// explicit rounding: no contraction into fma, the same results as the CPU's separate ops
#undef FMUL
#define FMUL(a, b) __fmul_rn((a), (b))
#undef FADD
#define FADD(a, b) __fadd_rn((a), (b))
#undef FDIV
#define FDIV(a, b) __fdiv_rn((a), (b))
// a / b rounded to nearest as __fdiv_rn gives it, without its slow-path branch: the same steps as
// its fast path (approximate reciprocal, one Newton step, quotient, remainder, correction), which
// are exact while a is zero or both have magnitudes in [2^-62, 2^63); `ok` is cleared otherwise
INLINE float mk_div_fast(float a, float b, bool& ok) {
#ifdef __CUDA_ARCH__
  float r;  // the approximate reciprocal alone (MUFU.RCP); b is normal wherever it is used
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(b));
#else
  float r = 1.0f / b;  // a host compiler (the CPU emulation): any reciprocal within an ulp will do
#endif
  r = __fmaf_rn(r, __fmaf_rn(-b, r, 1.0f), r);
  const float q = __fmul_rn(a, r);
  const float q1 = __fmaf_rn(r, __fmaf_rn(-b, q, a), q);
  const uint32_t ea = (__float_as_uint(a) >> 23) & 0xffu;
  const uint32_t eb = (__float_as_uint(b) >> 23) & 0xffu;
  ok = ok && eb - 65u <= 124u && (a == 0.0f || ea - 65u <= 124u);
  return a == 0.0f ? __fmul_rn(a, b) : q1;  // a signed zero: 0 / b keeps the sign rule of 0 * b
}
#undef DIV_FAST
#define DIV_FAST(a, b, ok) mk_div_fast((a), (b), (ok))
#undef LOADF
#define LOADF(p, i) static_cast<float>((p)[i])
#undef STORE_T
#define STORE_T(p, i, v) ((p)[i] = static_cast<T>(v))
#undef SHARED
#define SHARED __shared__
#undef SHARED_ATOMIC
#define SHARED_ATOMIC __shared__ unsigned int
#undef SH_ADD
#define SH_ADD(a, v) atomicAdd(&(a), (v))
#undef SH_STORE
#define SH_STORE(a, v) ((a) = (v))
#undef SH_LOAD
#define SH_LOAD(a) (a)
#undef G_ADD
#define G_ADD(a, v) atomicAdd(&(a), (v))
#undef G_STORE
#define G_STORE(a, v) ((a) = (v))
#undef BARRIER
#define BARRIER() __syncthreads()
INLINE float mk_warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
#undef SIMD_SUM
#define SIMD_SUM(x) mk_warp_sum(x)
// a simdgroup is a warp of 32 lanes: each lane's bit, a barrier among them, a population count
#undef SIMD_BALLOT
#define SIMD_BALLOT(p) __ballot_sync(0xffffffffu, (p))
#undef SIMD_SYNC
#define SIMD_SYNC() __syncwarp()
#undef POPCOUNT
#define POPCOUNT(x) ((uint32_t)__popc(x))
#undef UNROLL
#define UNROLL _Pragma("unroll")
// eight consecutive elements in one or two 16-byte transactions (p + i 16-byte aligned)
template <typename U>
struct alignas(16) mk_vec8 {
  U v[8];
};
template <typename U>
INLINE void mk_load8(const U* p, uint32_t i, float* o) {
  const mk_vec8<U> t = *reinterpret_cast<const mk_vec8<U>*>(p + i);
  UNROLL for (int j = 0; j < 8; ++j) {
    o[j] = static_cast<float>(t.v[j]);
  }
}
// bf16 to float is the 16 bits moved up: one shift or mask per element, two elements a word
// (the conversion operator would also permute bytes for every odd element)
struct alignas(16) mk_words4 {
  uint32_t w[4];
};
INLINE void mk_load8(const __nv_bfloat16* p, uint32_t i, float* o) {
  const mk_words4 t = *reinterpret_cast<const mk_words4*>(p + i);
  UNROLL for (int j = 0; j < 4; ++j) {
    o[2 * j] = AS_F32(t.w[j] << 16);
    o[2 * j + 1] = AS_F32(t.w[j] & 0xffff0000u);
  }
}
template <typename U>
INLINE void mk_store8(U* p, uint32_t i, const float* v) {
  mk_vec8<U> t;
  UNROLL for (int j = 0; j < 8; ++j) {
    t.v[j] = static_cast<U>(v[j]);
  }
  *reinterpret_cast<mk_vec8<U>*>(p + i) = t;
}
#undef MK_ALIGNED16
#define MK_ALIGNED16(p) ((reinterpret_cast<unsigned long long>(p) & 15ull) == 0ull)
#undef MK_LOAD8
#define MK_LOAD8(p, i, o) mk_load8((p), (i), (o))
#undef MK_STORE8
#define MK_STORE8(p, i, v) mk_store8((p), (i), (v))
