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
  for (int m = 0; m < KM; ++m) {
    const T* x = xs[m];
    const uint32_t lo = bracket[2 * m];
    const uint32_t width = bracket[2 * m + 1] - lo;
    uint32_t* out = vals[m];
    uint64_t n_above = 0;
    uint64_t n_in = 0;
    for (uint64_t c = 0; c < nchunks; ++c) {
      const uint64_t cs = s + c * chunk;
      const uint64_t ce = cs + chunk < e ? cs + chunk : e;
      const uint64_t before = n_in;
      for (uint64_t i = cs; i < ce; ++i) {
        const float d = HAS_BASE ? mk_tof(x[i]) - mk_tof(base[i]) : mk_tof(x[i]);
        const uint32_t bits = mk_as_u32(d) & 0x7fffffffu;
        n_above += bits > lo + width ? 1u : 0u;  // lo + width is hi: no wrap
        if (bits - lo <= width) {  // wraps below lo: one compare tests lo <= bits <= hi
          if (n_in < cap) {
            out[n_in] = bits;
          }
          ++n_in;
        }
      }
      per_chunk[m * nchunks + c] = n_in - before;
    }
    above[m] = n_above;
  }
}
