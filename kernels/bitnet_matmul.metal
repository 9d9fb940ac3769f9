// bitnet_matmul for Metal: the shared body bitnet_matmul.inc with Metal's prelude (spliced by mergekit_mlx/kernels.py).
// @header
// @splice metal_prelude.h
// @splice common.h
// @body
// @splice metal_indices.inc
// @splice bitnet_matmul.inc
