// The fused merge on the CPU (mergekit_mlx/cpu_kernels.py, task_merge): the GPUs' per-element
// body (task_merge_element.inc) in one loop over the elements that the compiler vectorises (each
// model's mode is a compile-time constant, so no branch is left and SPARSE is not needed).
// Defines: T (uint16_t, bfloat16's bits, or float), KM, MODES (per model: 0 keep, 1 drop, 2 exact
// top-k by (t, cut), 3 random keep with p), CONSENSUS, NORMALIZE, MK_MODELS (the names x0..).
// Inputs: f (float32) = per model [weight, scale, p], then [lambda, divisor];
// u (uint32) = per model [t, cut, k0, k1]. Output: out, elements [lo, hi).
// @splice cpu_prelude.h
// @splice common.h
extern "C" void mk_task_merge(const T* base, const T* const* xs, const float* f, const uint32_t* u, T* out,
                              uint64_t lo, uint64_t hi) {
  static constexpr uint32_t mode[KM] = {MODES};
  constexpr int SPARSE = 0;  // the modes decide at compile time
  MK_MODELS
  float wt[KM];
  float sc[KM];
  float pk[KM];
  uint32_t tt[KM];
  uint32_t cut[KM];
  uint32_t k0[KM];
  uint32_t k1[KM];
  for (int m = 0; m < KM; ++m) {
    wt[m] = f[3 * m];
    sc[m] = f[3 * m + 1];
    pk[m] = f[3 * m + 2];
    tt[m] = u[4 * m];
    cut[m] = u[4 * m + 1];
    k0[m] = u[4 * m + 2];
    k1[m] = u[4 * m + 3];
  }
  const float lam = f[3 * KM];
  const float div0 = f[3 * KM + 1];
  const T* __restrict b_in = base;
  T* __restrict o = out;
#define MK_B b
#define MK_X(m) XF(m, e)
#define MK_TOPK(m, d, i) mk_in_topk(AS_U32(FABS(d)), (i), tt[m], cut[m])
#define MK_DIV(a, b) FDIV((a), (b))
  for (uint64_t e = lo; e < hi; ++e) {
    const uint32_t i = (uint32_t)e;
    const float b = mk_tof(b_in[e]);
    // @splice task_merge_element.inc
    STORE_T(o, e, merged);
  }
}
