// bitnet_matmul for CUDA: the shared body bitnet_matmul.inc with CUDA's prelude (spliced by mergekit_mlx/kernels.py).
// @header
// @splice cuda_prelude.h
// @splice common.h
// @body
// @splice cuda_indices.inc
// @splice bitnet_matmul.inc
