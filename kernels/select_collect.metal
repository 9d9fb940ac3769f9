// select_collect for Metal: the shared body select_collect.inc with Metal's prelude (spliced by mergekit_mlx/kernels.py).
// @header
// @splice metal_prelude.h
// @splice common.h
// @body
// @splice metal_indices.inc
// @splice select_collect.inc
