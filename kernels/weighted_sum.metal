// weighted_sum for Metal: the shared body weighted_sum.inc with Metal's prelude (spliced by mergekit_mlx/kernels/sources.py).
// @header
// @splice metal_prelude.h
// @body
// @splice metal_indices.inc
// @splice weighted_sum.inc
