// tie_count for Metal: the shared body tie_count.inc with Metal's prelude (spliced by mergekit_mlx/kernels.py).
// @header
// @splice metal_prelude.h
// @splice common.h
// @body
// @splice metal_indices.inc
// @splice tie_count.inc
