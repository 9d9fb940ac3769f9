// CUDA spellings of the names the shared kernel bodies (*.inc) use.
#define INLINE __device__ __forceinline__
#define AS_U32(f) __float_as_uint(f)
#define FABS(x) fabsf(x)
// explicit rounding: no contraction into fma, the same results as the CPU's separate ops
#define FMUL(a, b) __fmul_rn((a), (b))
#define FADD(a, b) __fadd_rn((a), (b))
#define FDIV(a, b) __fdiv_rn((a), (b))
#define LOADF(p, i) static_cast<float>((p)[i])
#define STORE_T(p, i, v) ((p)[i] = static_cast<T>(v))
#define SHARED __shared__
#define SHARED_ATOMIC __shared__ unsigned int
#define SH_ADD(a, v) atomicAdd(&(a), (v))
#define SH_STORE(a, v) ((a) = (v))
#define SH_LOAD(a) (a)
#define G_ADD(a, v) atomicAdd(&(a), (v))
#define G_STORE(a, v) ((a) = (v))
#define BARRIER() __syncthreads()
INLINE float mk_warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
#define SIMD_SUM(x) mk_warp_sum(x)
#define UNROLL _Pragma("unroll")
