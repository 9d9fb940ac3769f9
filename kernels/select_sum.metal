// select_sum for Metal: the shared body select_sum.inc with Metal's prelude (spliced by mergekit_mlx/kernels.py).
// @header
// @splice metal_prelude.h
// @splice common.h
// @body
// @splice metal_indices.inc
// @splice select_sum.inc
