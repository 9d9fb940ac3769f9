// Counter-based random numbers, shared by every backend. The same steps run in Python
// (mergekit_mlx/kernels.py) with MLX uint32 ops, so masks are bit-identical everywhere.
// Needs: uint32_t, INLINE (from the backend prelude).

INLINE uint32_t mk_mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Uniform in [0, 1): the top 24 bits of a two-round hash of (index, keys), times 2^-24 (exact).
INLINE float mk_uniform(uint32_t i, uint32_t k0, uint32_t k1) {
  uint32_t h = mk_mix32(i * 0x9e3779b9u + k0);
  h = mk_mix32(h ^ k1);
  return float(h >> 8) * 5.9604644775390625e-8f;
}

// Exact top-k membership: |x| bits above the threshold, or equal to it at a flat index <= cut;
// as one compare against t or t + 1 (t is the bit pattern of an |x|: at most 0x7fffffff)
INLINE bool mk_in_topk(uint32_t bits, uint32_t i, uint32_t t, uint32_t cut) {
  return bits >= t + (i > cut ? 1u : 0u);
}
