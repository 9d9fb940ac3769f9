// Whether a tensor holds a NaN or an Inf, in one pass over its bits (mergekit_mlx/kernels/finite_cpu.py):
// with the sign cleared, NaN and Inf are the patterns at or above +Inf's. The largest such
// pattern is kept (a max the compiler turns into vector code), compared once at the end.
// Defines: T (the unsigned integer of the float's width), ABS (its bits but the sign), INF (+Inf).
// @splice cpu_prelude.h
extern "C" void mk_nonfinite(const T* __restrict x, uint64_t n, uint64_t* out) {
  T worst = 0;
  for (uint64_t i = 0; i < n; ++i) {
    const T a = (T)(x[i] & (T)ABS);
    worst = a > worst ? a : worst;
  }
  *out = worst >= (T)INF ? 1u : 0u;
}
