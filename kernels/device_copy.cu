// Bytes from a raw device pointer into an MLX array: the last step of reading a tensor straight
// into an NVIDIA GPU's memory (mergekit_mlx/gpu_reads.py): 16 bytes per thread and step, then the
// last few one by one. CUDA only: an Apple GPU shares memory with the CPU, so MLX's own load
// already puts the bytes where the GPU reads them and there is nothing to stage.
// Inputs: src (uint64) = [pointer, byte count]. Output: out (uint8, byte count).
// @header
// @body
  const uint64_t gid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
  const uint64_t nthreads = gridDim.x * (uint64_t)blockDim.x;
  const uint8_t* s = reinterpret_cast<const uint8_t*>(src[0]);
  const uint64_t nb = src[1];
  const uint64_t n16 = nb >> 4;
  for (uint64_t i = gid; i < n16; i += nthreads) {
    reinterpret_cast<uint4*>(out)[i] = reinterpret_cast<const uint4*>(s)[i];
  }
  if (gid < (nb & 15u)) {
    out[(n16 << 4) + gid] = s[(n16 << 4) + gid];
  }
