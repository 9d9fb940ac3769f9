// CPU spellings of the names the shared pieces (common.h) and the CPU loops (*.cpp) use, for the
// C++ the system's compiler builds (mergekit_mlx/cpu_native.py). float32 arithmetic as written
// (built with -ffp-contract=off: no fused multiply-adds), so the results are bit for bit those of
// numpy and of MLX's CPU graphs.
#include <stdint.h>
#include <string.h>
#include <math.h>

#define INLINE static inline __attribute__((always_inline))
INLINE uint32_t mk_as_u32(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
INLINE float mk_as_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
#define AS_U32(f) mk_as_u32(f)
#define AS_F32(u) mk_as_f32(u)
#define FABS(x) fabsf(x)
#define FMUL(a, b) ((a) * (b))
#define FADD(a, b) ((a) + (b))
#define FDIV(a, b) ((a) / (b))
#define UNROLL _Pragma("GCC unroll 16")
// bfloat16 travels as its uint16_t bits: widened by a 16-bit shift, rounded to nearest even
// (every NaN to 0x7fc0), as MLX converts
INLINE float mk_tof(uint16_t h) { return mk_as_f32((uint32_t)h << 16); }
INLINE float mk_tof(float f) { return f; }
INLINE void mk_store(uint16_t* p, float v) {
  const uint32_t u = mk_as_u32(v);
  *p = v != v ? (uint16_t)0x7fc0u : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
INLINE void mk_store(float* p, float v) { *p = v; }
#define LOADF(p, i) mk_tof((p)[i])
#define STORE_T(p, i, v) mk_store(&(p)[i], (v))
