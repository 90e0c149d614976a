// Coalition masks from the shared Philox stream (DESIGN §4.2), CUDA: one thread per (draw, pair, 128-token chunk).
#include <cstdint>

#include "../philox.h"

namespace cbd_fast {

__global__ void fill_coalitions_kernel(bool* __restrict__ out, int64_t num_rows, int64_t batch, int64_t len,
                                       int64_t chunks_per_row, uint32_t side, uint64_t seed) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= num_rows * chunks_per_row) return;
  const int64_t row = tid / chunks_per_row;  // row = draw * batch + pair
  const int64_t chunk = tid % chunks_per_row;
  const PhiloxWords r =
      philox4x32_10(static_cast<uint32_t>(row / batch), static_cast<uint32_t>(row % batch), side,
                    static_cast<uint32_t>(chunk), static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  bool* dst = out + row * len;
  const int64_t first = chunk * 128;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    for (int bit = 0; bit < 32; ++bit) {
      const int64_t token = first + w * 32 + bit;
      if (token < len) dst[token] = (r.w[w] >> bit) & 1u;
    }
  }
}

void launch_fill_coalitions(bool* out, int64_t num_samples, int64_t batch, int64_t len, uint32_t side, uint64_t seed,
                            cudaStream_t stream) {
  const int64_t chunks_per_row = (len + 127) / 128;
  const int64_t total = num_samples * batch * chunks_per_row;
  if (total == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  fill_coalitions_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(out, num_samples * batch, batch, len,
                                                                                  chunks_per_row, side, seed);
}

}  // namespace cbd_fast
