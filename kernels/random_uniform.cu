// random_uniform for CUDA: the shared body random_uniform.inc with CUDA's prelude (spliced by mergekit_mlx/kernels.py).
// @header
// @splice cuda_prelude.h
// @splice common.h
// @body
// @splice cuda_indices.inc
// @splice random_uniform.inc
