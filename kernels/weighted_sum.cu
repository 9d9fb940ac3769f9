// weighted_sum for CUDA: the shared body weighted_sum.inc with CUDA's prelude (spliced by mergekit_mlx/kernels/sources.py).
// @header
// @splice cuda_prelude.h
// @body
// @splice cuda_indices.inc
// @splice weighted_sum.inc
