// radix_hist for CUDA: the shared body radix_hist.inc with CUDA's prelude (spliced by mergekit_mlx/kernels.py).
// @header
// @splice cuda_prelude.h
// @splice common.h
// @body
// @splice cuda_indices.inc
// @splice radix_hist.inc
