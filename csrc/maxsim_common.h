// Host-side pieces of the maxsim_score op shared by the C++ CPU kernel and the CUDA launcher (ATen only, any
// device): argument checks, the accumulation dtype and the empty-problem rule.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace cbd_fast {
namespace maxsim_common {

struct ScoreSizes {
  int64_t num_texts, text_len, num_images, image_len, dim;
};

// fp64 features are computed in fp64; fp32 and half-precision features accumulate in fp32.
inline at::ScalarType accumulation_type(at::ScalarType feature_type) {
  return feature_type == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_feature_type(at::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
}

inline void check_shape(const char* op, const char* name, const at::Tensor& x, at::IntArrayRef expected,
                        const char* shape_doc) {
  TORCH_CHECK(x.sizes() == expected, op, ": ", name, " must have shape ", shape_doc, " = ", expected, ", got ",
              x.sizes());
}

inline void check_on_device(const char* op, const char* name, const at::Tensor& x, const at::Device& device) {
  TORCH_CHECK(x.device() == device, op, ": ", name, " must be on ", device, " (text's device), got one on ",
              x.device());
}

// text[Bt,T,D] and image[Bi,V,D] of one float dtype, bool masks and floating token coefficients alpha[Bt,T],
// beta[Bi,V], all on text's device. The device kind and any size limits are the caller's to check.
inline ScoreSizes check_score_inputs(const char* op, const at::Tensor& text, const at::Tensor& image,
                                     const at::Tensor& text_mask, const at::Tensor& image_mask,
                                     const at::Tensor& alpha, const at::Tensor& beta) {
  TORCH_CHECK(text.dim() == 3, op, ": text must have shape [Bt, T, D], got ", text.sizes());
  TORCH_CHECK(image.dim() == 3, op, ": image must have shape [Bi, V, D], got ", image.sizes());
  TORCH_CHECK(image.size(2) == text.size(2), op, ": image must have shape [Bi, V, D] with D = ", text.size(2),
              " (the text's D), got ", image.sizes());
  TORCH_CHECK(is_feature_type(text.scalar_type()), op, ": text must be float32, float64, float16 or bfloat16, got ",
              text.scalar_type());
  TORCH_CHECK(image.scalar_type() == text.scalar_type(), op, ": image must have the text's dtype ",
              text.scalar_type(), ", got ", image.scalar_type());
  const ScoreSizes n{text.size(0), text.size(1), image.size(0), image.size(1), text.size(2)};
  TORCH_CHECK(text_mask.scalar_type() == at::kBool, op, ": text_mask must be bool, got ", text_mask.scalar_type());
  TORCH_CHECK(image_mask.scalar_type() == at::kBool, op, ": image_mask must be bool, got ",
              image_mask.scalar_type());
  TORCH_CHECK(at::isFloatingType(alpha.scalar_type()), op, ": alpha must be floating, got ", alpha.scalar_type());
  TORCH_CHECK(at::isFloatingType(beta.scalar_type()), op, ": beta must be floating, got ", beta.scalar_type());
  check_shape(op, "text_mask", text_mask, {n.num_texts, n.text_len}, "[Bt, T]");
  check_shape(op, "image_mask", image_mask, {n.num_images, n.image_len}, "[Bi, V]");
  check_shape(op, "alpha", alpha, {n.num_texts, n.text_len}, "[Bt, T]");
  check_shape(op, "beta", beta, {n.num_images, n.image_len}, "[Bi, V]");
  check_on_device(op, "image", image, text.device());
  check_on_device(op, "text_mask", text_mask, text.device());
  check_on_device(op, "image_mask", image_mask, text.device());
  check_on_device(op, "alpha", alpha, text.device());
  check_on_device(op, "beta", beta, text.device());
  return n;
}

// grad_score of maxsim_score_backward: floating [Bt, Bi] on text's device.
inline void check_grad_score(const char* op, const at::Tensor& grad_score, const ScoreSizes& n,
                             const at::Device& device) {
  TORCH_CHECK(at::isFloatingType(grad_score.scalar_type()), op, ": grad_score must be floating, got ",
              grad_score.scalar_type());
  check_shape(op, "grad_score", grad_score, {n.num_texts, n.num_images}, "[Bt, Bi]");
  check_on_device(op, "grad_score", grad_score, device);
}

// Without tokens or features every similarity is absent or 0, and so is every score and gradient.
inline bool is_empty_problem(const ScoreSizes& n) {
  return n.num_texts == 0 || n.num_images == 0 || n.text_len == 0 || n.image_len == 0 || n.dim == 0;
}

}  // namespace maxsim_common
}  // namespace cbd_fast
