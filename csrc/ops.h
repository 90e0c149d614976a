// Kernel entry points of cbd_fast, one group per op; registered for their dispatch keys in ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

namespace cbd_fast {

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// coalitions: fill bool text_in[K,B,T] and image_in[K,B,V] with the Philox stream of DESIGN §4.2.
void fill_coalitions_cpu(at::Tensor& text_in, at::Tensor& image_in, int64_t seed);
void fill_coalitions_cuda(at::Tensor& text_in, at::Tensor& image_in, int64_t seed);

// banzhaf_interaction: (interaction[B,T,V], text_value[B,T], image_value[B,V]) from sim[B,T,V].
Tensor3 banzhaf_interaction_cpu(const at::Tensor& sim, const at::Tensor& text_mask, const at::Tensor& image_mask,
                                const at::Tensor& text_weight, const at::Tensor& image_weight, int64_t num_samples,
                                int64_t seed, c10::string_view estimator);
// Returns (grad_sim, grad_text_weight, grad_image_weight).
Tensor3 banzhaf_interaction_backward_cpu(const at::Tensor& grad_interaction, const at::Tensor& grad_text_value,
                                         const at::Tensor& grad_image_value, const at::Tensor& sim,
                                         const at::Tensor& text_mask, const at::Tensor& image_mask,
                                         const at::Tensor& text_weight, const at::Tensor& image_weight,
                                         int64_t num_samples, int64_t seed, c10::string_view estimator);
// CUDA kernels of the two ops above (estimators paired and msr; T <= 256, V <= 576), and the CUDA-only fused op
// banzhaf_interaction_from_tokens: the same pass on sim[b] = text[b] @ image[b]^T (text[B,T,D], image[B,V,D]),
// computed inside the kernel (fp32 accumulation for half inputs).
Tensor3 banzhaf_interaction_cuda(const at::Tensor& sim, const at::Tensor& text_mask, const at::Tensor& image_mask,
                                 const at::Tensor& text_weight, const at::Tensor& image_weight, int64_t num_samples,
                                 int64_t seed, c10::string_view estimator);
Tensor3 banzhaf_interaction_backward_cuda(const at::Tensor& grad_interaction, const at::Tensor& grad_text_value,
                                          const at::Tensor& grad_image_value, const at::Tensor& sim,
                                          const at::Tensor& text_mask, const at::Tensor& image_mask,
                                          const at::Tensor& text_weight, const at::Tensor& image_weight,
                                          int64_t num_samples, int64_t seed, c10::string_view estimator);
Tensor3 banzhaf_interaction_from_tokens_cuda(const at::Tensor& text, const at::Tensor& image,
                                             const at::Tensor& text_mask, const at::Tensor& image_mask,
                                             const at::Tensor& text_weight, const at::Tensor& image_weight,
                                             int64_t num_samples, int64_t seed, c10::string_view estimator);

// maxsim_score: score[Bt,Bi] of DESIGN §5 from the token coefficients alpha[Bt,T], beta[Bi,V] (computed by the
// caller, 0 on invalid tokens); memory O(Bt*Bi), nothing kept for the backward. The backward recomputes the maxima
// and returns (grad_text, grad_image, grad_alpha, grad_beta), in float32 for half-precision features.
at::Tensor maxsim_score_cpu(const at::Tensor& text, const at::Tensor& image, const at::Tensor& text_mask,
                            const at::Tensor& image_mask, const at::Tensor& alpha, const at::Tensor& beta);
Tensor4 maxsim_score_backward_cpu(const at::Tensor& grad_score, const at::Tensor& text, const at::Tensor& image,
                                  const at::Tensor& text_mask, const at::Tensor& image_mask, const at::Tensor& alpha,
                                  const at::Tensor& beta);
at::Tensor maxsim_score_cuda(const at::Tensor& text, const at::Tensor& image, const at::Tensor& text_mask,
                             const at::Tensor& image_mask, const at::Tensor& alpha, const at::Tensor& beta);
Tensor4 maxsim_score_backward_cuda(const at::Tensor& grad_score, const at::Tensor& text, const at::Tensor& image,
                                   const at::Tensor& text_mask, const at::Tensor& image_mask,
                                   const at::Tensor& alpha, const at::Tensor& beta);

}  // namespace cbd_fast
