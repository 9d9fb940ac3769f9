// tie_count for CUDA: the shared body tie_count.inc with CUDA's prelude (spliced by mergekit_mlx/kernels.py).
// @header
// @splice cuda_prelude.h
// @splice common.h
// @body
// @splice cuda_indices.inc
// @splice tie_count.inc
