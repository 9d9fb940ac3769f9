// The first level of the L1 sums of the CPU (the DARE/DELLA rescale; mergekit_mlx/cpu_kernels.py):
// per 1024-element block and task model m, the 32 interleaved running sums of |d_m| and of the
// kept |d_m| (d_m = x_m - base; lane l adds elements l, l + 32, ... in order), the order in which
// MLX's CPU sums `a.reshape(-1, 32, 32).sum(axis=1)`. Elements past n add nothing.
// Defines: T, KM, MODES (per model: 2 exact top-k by (t, cut), 3 random keep with p), MK_MODELS.
// Inputs: f (float32) = per model [weight, scale, p]; u (uint32) = per model [t, cut, k0, k1].
// Output: lanes (blocks, KM, 2, 32), float32: blocks [b0, b1) of n elements, block b at row b - b0.
// @splice cpu_prelude.h
// @splice common.h
extern "C" void mk_l1_lanes(const T* base, const T* const* xs, const float* f, const uint32_t* u, float* lanes,
                            uint64_t n, uint64_t b0, uint64_t b1) {
  static constexpr int mode[KM] = {MODES};
  MK_MODELS
  for (uint64_t blk = b0; blk < b1; ++blk) {
    UNROLL for (int m = 0; m < KM; ++m) {
      const T* __restrict x = xs[m];
      const float pk = f[3 * m + 2];
      const uint32_t tt = u[4 * m];
      const uint32_t cut = u[4 * m + 1];
      const uint32_t k0 = u[4 * m + 2];
      const uint32_t k1 = u[4 * m + 3];
      float acc[32];
      float kacc[32];
      for (int l = 0; l < 32; ++l) {
        acc[l] = 0.0f;
        kacc[l] = 0.0f;
      }
      for (uint64_t r = 0; r < 32; ++r) {
        const uint64_t i0 = blk * 1024 + r * 32;
        if (i0 >= n) {
          break;
        }
        const uint64_t len = n - i0 < 32 ? n - i0 : 32;
        for (uint64_t l = 0; l < len; ++l) {
          const uint32_t i = (uint32_t)(i0 + l);
          const float a = FABS(mk_tof(x[i0 + l]) - mk_tof(base[i0 + l]));
          const bool keep = mode[m] == 2 ? mk_in_topk(AS_U32(a), i, tt, cut) : mk_uniform(i, k0, k1) < pk;
          acc[l] = FADD(acc[l], a);
          kacc[l] = FADD(kacc[l], FMUL(a, keep ? 1.0f : 0.0f));  // a * 0 for a dropped element, as numpy
        }
      }
      float* row = lanes + ((blk - b0) * KM + m) * 64;
      for (int l = 0; l < 32; ++l) {
        row[l] = acc[l];
        row[32 + l] = kacc[l];
      }
    }
  }
}
