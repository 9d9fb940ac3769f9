"""The merge kernel's branch-free division (kernels/cuda_prelude.h, mk_div_fast) against CUDA's
__fdiv_rn, on an NVIDIA GPU: every float32 numerator for a set of divisors (the sums of weights a
TIES merge divides by), then 2^32 random (numerator, divisor) pairs over the whole range the fast
path accepts. Prints the pairs compared and how many differ (must be 0).

    python benchmarks/gpu_div_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from mergekit_mlx import kernel_sources, kernels  # noqa: E402

SOURCE = """
  const uint32_t gid = blockIdx.x * blockDim.x + threadIdx.x;
  const uint32_t nth = gridDim.x * blockDim.x;
  const uint32_t mode = prm[0];
  const float fixed = __uint_as_float(prm[1]);
  uint32_t checked = 0u, differ = 0u;
  for (uint32_t k = 0u; k < (uint32_t)(0x100000000ull / nth); ++k) {
    const uint32_t u = gid + k * nth;
    float a = __uint_as_float(u);
    float b = fixed;
    if (mode == 1u) {  // random pairs: both from a hash of u, exponents spread over the fast range
      uint32_t h = u * 0x9e3779b9u + 0x7f4a7c15u;
      h ^= h >> 16; h *= 0x7feb352du; h ^= h >> 15; h *= 0x846ca68bu; h ^= h >> 16;
      uint32_t g = h * 0x85ebca6bu + 0x27d4eb2fu;
      g ^= g >> 16; g *= 0x7feb352du; g ^= g >> 15; g *= 0x846ca68bu; g ^= g >> 16;
      a = __uint_as_float((h & 0x807fffffu) | ((60u + (h >> 8) % 136u) << 23));
      b = __uint_as_float((g & 0x807fffffu) | ((60u + (g >> 8) % 136u) << 23));
    }
    bool ok = true;
    const float q = mk_div_fast(a, b, ok);
    if (ok) {
      checked += 1u;
      differ += (__float_as_uint(q) != __float_as_uint(__fdiv_rn(a, b))) ? 1u : 0u;
    }
  }
  atomicAdd(&out[0], checked);
  atomicAdd(&out[1], differ);
"""


def main() -> None:
    header = kernel_sources.kernel_root().joinpath("cuda_prelude.h").read_text()
    kern = mx.fast.cuda_kernel(name="mk_div_check", input_names=["prm"], output_names=["out"], source=SOURCE,
                               header=header)

    def run(mode: int, divisor: float) -> tuple[int, int]:
        prm = mx.array([mode, kernels._f32_bits(divisor)], dtype=mx.uint32)
        out = kern(inputs=[prm], grid=(1 << 22, 1, 1), threadgroup=(256, 1, 1),
                   output_shapes=[(2,)], output_dtypes=[mx.uint32], init_value=0)[0]
        checked, differ = out.tolist()
        return checked, differ

    total = bad = 0
    for d in (1.0, 2.0, 3.0, 1.5, 2.5, 0.3, 0.6, 0.9, 1.0 / 3, 2.0 / 3, 0.7, 1.2, 7.0, 0.01, 100.0, -0.5, -1.7):
        c, x = run(0, d)
        total, bad = total + c, bad + x
        print(f"divisor {d:g}: every numerator in the fast range, {c:,} compared, {x} differ")
    c, x = run(1, 0.0)
    total, bad = total + c, bad + x
    print(f"random pairs: {c:,} compared, {x} differ")
    print(f"division check: {total:,} compared, {bad} differ: {'ok' if bad == 0 else 'FAILED'}")
    sys.exit(0 if bad == 0 else 1)


if __name__ == "__main__":
    main()
