// One counting pass of the CPU's exact magnitude selection (mergekit_mlx/cpu_kernels.py,
// select_many). Per tensor m, over elements [s, e): the number of |x_m - base| bit patterns above
// its bracket [lo_m, hi_m], and the patterns inside the bracket in index order (at most cap; past
// that the tensor is left to the full partition), counted per chunk of `chunk` elements.
// Defines: T, KM, HAS_BASE, MK_MODELS (the names x0.. of the tensors).
// @splice cpu_prelude.h
extern "C" void mk_select_count(const T* base, const T* const* xs, const uint32_t* bracket, uint64_t s,
                                uint64_t e, uint64_t chunk, uint32_t* const* vals, uint64_t cap,
                                uint64_t* above, uint64_t* per_chunk) {
  MK_MODELS
  (void)x0;
  const uint64_t nchunks = (e - s + chunk - 1) / chunk;
  uint64_t n_in_of[KM];
  for (int m = 0; m < KM; ++m) {
    n_in_of[m] = 0;
    above[m] = 0;
  }
  for (uint64_t c = 0; c < nchunks; ++c) {  // chunk by chunk, each tensor in turn: the base's chunk stays in cache
    const uint64_t cs = s + c * chunk;
    const uint64_t ce = cs + chunk < e ? cs + chunk : e;
    for (int m = 0; m < KM; ++m) {
      const T* __restrict x = xs[m];
      const uint32_t lo = bracket[2 * m];
      const uint32_t width = bracket[2 * m + 1] - lo;
      uint32_t* __restrict out = vals[m];
      uint64_t n_above = 0;
      uint64_t n_in = n_in_of[m];
      const uint64_t before = n_in;
      // sixteen elements at a time: their patterns and counts in vector code, then, where any
      // lies inside (a few in a hundred elements do), the inside ones stored without a branch
      for (uint64_t i0 = cs; i0 < ce; i0 += 16) {
        const uint32_t len = ce - i0 < 16 ? (uint32_t)(ce - i0) : 16u;
        uint32_t bits[16];
        uint32_t up = 0;
        uint32_t hits = 0;
        for (uint32_t j = 0; j < len; ++j) {
          const float d = HAS_BASE ? mk_tof(x[i0 + j]) - mk_tof(base[i0 + j]) : mk_tof(x[i0 + j]);
          bits[j] = mk_as_u32(d) & 0x7fffffffu;
          up += bits[j] > lo + width ? 1u : 0u;  // lo + width is hi: no wrap
          hits += bits[j] - lo <= width ? 1u : 0u;  // wraps below lo: one compare tests lo <= bits <= hi
        }
        n_above += up;
        if (hits == 0) {
          continue;
        }
        if (n_in + 16 <= cap) {
          for (uint32_t j = 0; j < len; ++j) {
            out[n_in] = bits[j];
            n_in += bits[j] - lo <= width ? 1u : 0u;
          }
        } else {
          for (uint32_t j = 0; j < len; ++j) {
            if (bits[j] - lo <= width) {
              if (n_in < cap) {
                out[n_in] = bits[j];
              }
              ++n_in;
            }
          }
        }
      }
      per_chunk[m * nchunks + c] = n_in - before;
      n_in_of[m] = n_in;
      above[m] += n_above;
    }
  }
}
