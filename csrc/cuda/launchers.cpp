// Thin torch-facing launchers for the CUDA kernels; the .cu files stay free of torch headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../coalitions_common.h"
#include "../ops.h"
#include "../philox.h"

namespace cbd_fast {

void launch_fill_coalitions(bool* out, int64_t num_samples, int64_t batch, int64_t len, uint32_t side, uint64_t seed,
                            cudaStream_t stream);

void fill_coalitions_cuda(at::Tensor& text_in, at::Tensor& image_in, int64_t seed) {
  coalitions_common::check_outputs(text_in, image_in);
  const c10::cuda::CUDAGuard guard(text_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto useed = static_cast<uint64_t>(seed);
  launch_fill_coalitions(text_in.data_ptr<bool>(), text_in.size(0), text_in.size(1), text_in.size(2), kTextSide,
                         useed, stream);
  launch_fill_coalitions(image_in.data_ptr<bool>(), image_in.size(0), image_in.size(1), image_in.size(2), kImageSide,
                         useed, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cbd_fast
