// Torch-facing launchers of the CUDA all-pairs fine-grained score (kernels in maxsim_cuda.cu, which stays free of
// torch headers): argument checks, dtype conversions, output allocation, stream and device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "../maxsim_common.h"
#include "../ops.h"

namespace cbd_fast {

// Defined in maxsim_cuda.cu. dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16.
int64_t maxsim_pair_index_width(int64_t text_len, int64_t image_len);
cudaError_t launch_maxsim_score(int dtype, const void* text, const void* image, const bool* text_mask,
                                const bool* image_mask, const void* alpha, const void* beta, void* score,
                                int64_t num_texts, int64_t text_len, int64_t num_images, int64_t image_len,
                                int64_t dim, cudaStream_t stream);
cudaError_t launch_maxsim_score_backward(int dtype, const void* grad_score, const void* text, const void* image,
                                         const bool* text_mask, const bool* image_mask, const void* alpha,
                                         const void* beta, int16_t* pair_index, void* pair_max, void* grad_text,
                                         void* grad_image, void* grad_alpha, void* grad_beta, int64_t num_texts,
                                         int64_t text_len, int64_t num_images, int64_t image_len, int64_t dim,
                                         cudaStream_t stream);

namespace {

using maxsim_common::accumulation_type;
using maxsim_common::is_empty_problem;
using maxsim_common::ScoreSizes;

// Limits of the CUDA kernels (shared-memory plan and int16 token indices).
constexpr int64_t kMaxTextLen = 256, kMaxImageLen = 576, kMaxDim = 1024;

int feature_dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return 0;
    case at::kDouble:
      return 1;
    case at::kHalf:
      return 2;
    case at::kBFloat16:
      return 3;
    default:
      return -1;
  }
}

// The shared checks (maxsim_common.h), then: on a CUDA device, T, V, D within the kernel limits.
ScoreSizes check_score_inputs(const char* op, const at::Tensor& text, const at::Tensor& image,
                              const at::Tensor& text_mask, const at::Tensor& image_mask, const at::Tensor& alpha,
                              const at::Tensor& beta) {
  const ScoreSizes n = maxsim_common::check_score_inputs(op, text, image, text_mask, image_mask, alpha, beta);
  TORCH_CHECK(text.is_cuda(), op, ": text must be a CUDA tensor, got one on ", text.device());
  TORCH_CHECK(n.text_len <= kMaxTextLen, op, ": the CUDA kernel supports at most ", kMaxTextLen,
              " text tokens per text, got T = ", n.text_len, " (text shape ", text.sizes(), ")");
  TORCH_CHECK(n.image_len <= kMaxImageLen, op, ": the CUDA kernel supports at most ", kMaxImageLen,
              " image tokens per image, got V = ", n.image_len, " (image shape ", image.sizes(), ")");
  TORCH_CHECK(n.dim <= kMaxDim, op, ": the CUDA kernel supports a feature dimension of at most ", kMaxDim,
              ", got D = ", n.dim);
  constexpr int64_t kMaxItems = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(n.num_texts <= kMaxItems && n.num_images <= kMaxItems, op, ": at most ", kMaxItems,
              " texts and images, got Bt = ", n.num_texts, ", Bi = ", n.num_images);
  return n;
}

}  // namespace

at::Tensor maxsim_score_cuda(const at::Tensor& text, const at::Tensor& image, const at::Tensor& text_mask,
                             const at::Tensor& image_mask, const at::Tensor& alpha, const at::Tensor& beta) {
  constexpr const char* op = "maxsim_score";
  const ScoreSizes n = check_score_inputs(op, text, image, text_mask, image_mask, alpha, beta);
  const c10::cuda::CUDAGuard guard(text.device());
  const at::ScalarType acc_type = accumulation_type(text.scalar_type());
  const at::TensorOptions acc_options = text.options().dtype(acc_type);
  // Without tokens or features every similarity is absent or 0, and so is every score.
  if (is_empty_problem(n)) return at::zeros({n.num_texts, n.num_images}, acc_options);

  at::Tensor score = at::empty({n.num_texts, n.num_images}, acc_options);
  const at::Tensor x = text.contiguous(), y = image.contiguous();
  const at::Tensor text_valid = text_mask.contiguous(), image_valid = image_mask.contiguous();
  const at::Tensor alpha_c = alpha.to(acc_type).contiguous(), beta_c = beta.to(acc_type).contiguous();
  C10_CUDA_CHECK(launch_maxsim_score(feature_dtype_code(text.scalar_type()), x.const_data_ptr(), y.const_data_ptr(),
                                     text_valid.const_data_ptr<bool>(), image_valid.const_data_ptr<bool>(),
                                     alpha_c.const_data_ptr(), beta_c.const_data_ptr(), score.mutable_data_ptr(),
                                     n.num_texts, n.text_len, n.num_images, n.image_len, n.dim,
                                     c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return score;
}

Tensor4 maxsim_score_backward_cuda(const at::Tensor& grad_score, const at::Tensor& text, const at::Tensor& image,
                                   const at::Tensor& text_mask, const at::Tensor& image_mask,
                                   const at::Tensor& alpha, const at::Tensor& beta) {
  constexpr const char* op = "maxsim_score_backward";
  const ScoreSizes n = check_score_inputs(op, text, image, text_mask, image_mask, alpha, beta);
  maxsim_common::check_grad_score(op, grad_score, n, text.device());
  const c10::cuda::CUDAGuard guard(text.device());
  const at::ScalarType acc_type = accumulation_type(text.scalar_type());
  const at::TensorOptions acc_options = text.options().dtype(acc_type);
  // Gradients in the accumulation dtype: float32 for half-precision features, else the features' dtype.
  if (is_empty_problem(n)) {
    return {at::zeros(text.sizes(), acc_options), at::zeros(image.sizes(), acc_options),
            at::zeros({n.num_texts, n.text_len}, acc_options), at::zeros({n.num_images, n.image_len}, acc_options)};
  }

  // Every element of the gradients is written by the gather kernels.
  at::Tensor grad_text = at::empty(text.sizes(), acc_options);
  at::Tensor grad_image = at::empty(image.sizes(), acc_options);
  at::Tensor grad_alpha = at::empty({n.num_texts, n.text_len}, acc_options);
  at::Tensor grad_beta = at::empty({n.num_images, n.image_len}, acc_options);
  // Per-pair arg-maxima, maxima and inverse maps, O(Bt·Bi·(T+V)), alive for this call only.
  const int64_t num_pairs = n.num_texts * n.num_images;
  at::Tensor pair_index =
      at::empty({num_pairs, maxsim_pair_index_width(n.text_len, n.image_len)}, text.options().dtype(at::kShort));
  at::Tensor pair_max = at::empty({num_pairs, n.text_len + n.image_len}, acc_options);

  const at::Tensor grad_score_c = grad_score.to(acc_type).contiguous();
  const at::Tensor x = text.contiguous(), y = image.contiguous();
  const at::Tensor text_valid = text_mask.contiguous(), image_valid = image_mask.contiguous();
  const at::Tensor alpha_c = alpha.to(acc_type).contiguous(), beta_c = beta.to(acc_type).contiguous();
  C10_CUDA_CHECK(launch_maxsim_score_backward(
      feature_dtype_code(text.scalar_type()), grad_score_c.const_data_ptr(), x.const_data_ptr(), y.const_data_ptr(),
      text_valid.const_data_ptr<bool>(), image_valid.const_data_ptr<bool>(), alpha_c.const_data_ptr(),
      beta_c.const_data_ptr(), pair_index.mutable_data_ptr<int16_t>(), pair_max.mutable_data_ptr(),
      grad_text.mutable_data_ptr(), grad_image.mutable_data_ptr(), grad_alpha.mutable_data_ptr(),
      grad_beta.mutable_data_ptr(), n.num_texts, n.text_len, n.num_images, n.image_len, n.dim,
      c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_text, grad_image, grad_alpha, grad_beta};
}

}  // namespace cbd_fast
