// select_resolve for Metal: the shared body select_resolve.inc with Metal's prelude (spliced by mergekit_mlx/kernels.py).
// @header
// @splice metal_prelude.h
// @splice common.h
// @body
// @splice metal_indices.inc
// @splice select_resolve.inc
