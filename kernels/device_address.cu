// Where an MLX array's bytes lie in device memory: one thread writes the address of its input.
// The writer then copies the bytes to host memory with the copy engine (mergekit_mlx/kernels/
// gpu_writes.py) instead of asking MLX for a host view, which moves the array into unified memory.
// CUDA only: on an Apple GPU the host reads the GPU's memory directly.
// Inputs: x (uint8, any length). Output: address (uint64, one element).
// @header
// @body
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    address[0] = reinterpret_cast<uint64_t>(x);
  }
