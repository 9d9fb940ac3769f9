// task_merge for CUDA: the shared body task_merge.inc with CUDA's prelude (spliced by mergekit_mlx/kernels.py).
// @header
// @splice cuda_prelude.h
// @splice common.h
// @body
// @splice cuda_indices.inc
// @splice task_merge.inc
