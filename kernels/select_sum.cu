// select_sum for CUDA: the shared body select_sum.inc with CUDA's prelude (spliced by mergekit_mlx/kernels.py).
// @header
// @splice cuda_prelude.h
// @splice common.h
// @body
// @splice cuda_indices.inc
// @splice select_sum.inc
