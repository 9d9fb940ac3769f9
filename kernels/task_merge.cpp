// The fused merge on the CPU (mergekit_mlx/cpu_kernels.py, task_merge): the per-element
// operations of kernels/task_merge.inc in the same order, in one loop over the elements that the
// compiler vectorises (each model's mode is a compile-time constant, so no branch is left).
// Defines: T (uint16_t, bfloat16's bits, or float), KM, MODES (per model: 0 keep, 1 drop, 2 exact
// top-k by (t, cut), 3 random keep with p), CONSENSUS, NORMALIZE, MK_MODELS (the names x0..).
// Inputs: f (float32) = per model [weight, scale, p], then [lambda, divisor];
// u (uint32) = per model [t, cut, k0, k1]. Output: out, elements [lo, hi).
// @splice cpu_prelude.h
// @splice common.h
extern "C" void mk_task_merge(const T* base, const T* const* xs, const float* f, const uint32_t* u, T* out,
                              uint64_t lo, uint64_t hi) {
  static constexpr int mode[KM] = {MODES};
  MK_MODELS
  float wt[KM];
  float wt0[KM];
  float sc[KM];
  float pk[KM];
  uint32_t tt[KM];
  uint32_t cut[KM];
  uint32_t k0[KM];
  uint32_t k1[KM];
  for (int m = 0; m < KM; ++m) {
    wt[m] = f[3 * m];
    wt0[m] = FMUL(wt[m], 0.0f);
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
  for (uint64_t e = lo; e < hi; ++e) {
    const uint32_t i = (uint32_t)e;
    const float b = mk_tof(b_in[e]);
    float wd[KM];
    UNROLL for (int m = 0; m < KM; ++m) {
      const float d = XF(m, e) - b;
      float v = d;
      if (mode[m] == 1) {
        v = 0.0f;
      } else if (mode[m] >= 2) {
        const bool keep = mode[m] == 2 ? mk_in_topk(AS_U32(FABS(d)), i, tt[m], cut[m])
                                       : mk_uniform(i, k0[m], k1[m]) < pk[m];
        v = FMUL(d, keep ? sc[m] : 0.0f);  // d * 0 for a dropped element
      }
      wd[m] = FMUL(v, wt[m]);
    }
    float mixed = wd[0];
    float divisor = div0;
    if (CONSENSUS) {
      float total = wd[0];
      UNROLL for (int m = 1; m < KM; ++m) {
        total = FADD(total, wd[m]);
      }
      const float majority = total >= 0.0f ? 1.0f : -1.0f;
      UNROLL for (int m = 0; m < KM; ++m) {
        const bool agree = FMUL(wd[m], majority) > 0.0f;  // same sign, non-zero
        const float term = FMUL(wd[m], agree ? 1.0f : 0.0f);
        const float wterm = agree ? wt[m] : wt0[m];
        mixed = (m == 0) ? term : FADD(mixed, term);
        divisor = (m == 0) ? wterm : FADD(divisor, wterm);
      }
      if (divisor == 0.0f) {
        divisor = 1.0f;
      }
    } else {
      UNROLL for (int m = 1; m < KM; ++m) {
        mixed = FADD(mixed, wd[m]);
      }
    }
    if (NORMALIZE) {
      mixed = FDIV(mixed, divisor);
    }
    mixed = FMUL(mixed, lam);
    STORE_T(o, e, FADD(b, mixed));
  }
}
