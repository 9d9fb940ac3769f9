// task_merge for Metal: the shared body task_merge.inc with Metal's prelude (spliced by mergekit_mlx/kernels.py).
// @header
// @splice metal_prelude.h
// @splice common.h
// @body
// @splice metal_indices.inc
// @splice task_merge.inc
