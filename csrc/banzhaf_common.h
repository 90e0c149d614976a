// Host-side pieces of the Banzhaf op shared by the C++ CPU kernel and the CUDA launcher (ATen only, any device):
// the weight-span bound, the msr estimator's strata arithmetic, and the masking / dtype of the results.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace cbd_fast {
namespace banzhaf_common {

// Leave-one-out sums subtract one token's weight from a total; with weights exp(logit) that keeps ~1e-4 relative
// precision in double only while the valid logits of a pair span at most 27 (e^27 ≈ 2^39). Wider spans are refused.
constexpr double kMaxWeightSpan = 27.0;

// msr: the four strata of every (i, j) — i in A or not × j in C or not — as (sum of v, count) over the draws, and
// the two strata of every single token.
struct MsrStrata {
  at::Tensor s11, s10, s01, s00, n11, n10, n01, n00, st1, st0, nt1, nt0, sv1, sv0, nv1, nv0;
};

// From the per-pair sums and counts [B, T·V + T + V + 1] laid out as [i∈A and j∈C | i∈A | j∈C | all draws].
inline MsrStrata msr_strata(const at::Tensor& sums, const at::Tensor& counts, int64_t B, int64_t T, int64_t V) {
  const int64_t TV = T * V;
  auto split = [&](const at::Tensor& x) {
    return std::make_tuple(x.narrow(1, 0, TV).reshape({B, T, V}), x.narrow(1, TV, T).reshape({B, T, 1}),
                           x.narrow(1, TV + T, V).reshape({B, 1, V}), x.narrow(1, TV + T + V, 1).reshape({B, 1, 1}));
  };
  auto [s_tv, s_t, s_v, s_all] = split(sums);
  auto [n_tv, n_t, n_v, n_all] = split(counts);
  MsrStrata st;
  st.s11 = s_tv, st.s10 = s_t - s_tv, st.s01 = s_v - s_tv, st.s00 = s_all - s_t - s_v + s_tv;
  st.n11 = n_tv, st.n10 = n_t - n_tv, st.n01 = n_v - n_tv, st.n00 = n_all - n_t - n_v + n_tv;
  st.st1 = s_t.reshape({B, T}), st.st0 = s_all.reshape({B, 1}) - s_t.reshape({B, T});
  st.nt1 = n_t.reshape({B, T}), st.nt0 = n_all.reshape({B, 1}) - n_t.reshape({B, T});
  st.sv1 = s_v.reshape({B, V}), st.sv0 = s_all.reshape({B, 1}) - s_v.reshape({B, V});
  st.nv1 = n_v.reshape({B, V}), st.nv0 = n_all.reshape({B, 1}) - n_v.reshape({B, V});
  return st;
}

inline at::Tensor stratum_mean(const at::Tensor& sum, const at::Tensor& count) {  // empty strata count as 0
  return at::where(count > 0, sum / count.clamp_min(1), at::zeros({}, sum.options()));
}

inline at::Tensor inverse_count(const at::Tensor& count) {
  return at::where(count > 0, 1.0 / count.clamp_min(1), at::zeros({}, count.options()));
}

// (interaction [B,T,V], text_value [B,T], image_value [B,V]): signed combinations of the stratum means.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> msr_estimates(const MsrStrata& st) {
  auto interaction = stratum_mean(st.s11, st.n11) - stratum_mean(st.s10, st.n10) - stratum_mean(st.s01, st.n01) +
                     stratum_mean(st.s00, st.n00);
  auto text_value = stratum_mean(st.st1, st.nt1) - stratum_mean(st.st0, st.nt0);
  auto image_value = stratum_mean(st.sv1, st.nv1) - stratum_mean(st.sv0, st.nv0);
  return {interaction, text_value, image_value};
}

// The output gradients given to banzhaf_interaction_backward, checked after the forward's arguments: floating, of
// the outputs' shapes (interaction [B,T,V] like sim, text_value [B,T], image_value [B,V] like the masks), on sim's
// device.
inline void check_output_gradients(const char* op, const at::Tensor& grad_interaction,
                                   const at::Tensor& grad_text_value, const at::Tensor& grad_image_value,
                                   const at::Tensor& sim, const at::Tensor& text_mask, const at::Tensor& image_mask) {
  auto check = [&](const char* name, const at::Tensor& grad, const at::Tensor& like, const char* shape_doc) {
    TORCH_CHECK(at::isFloatingType(grad.scalar_type()), op, ": ", name, " must be floating, got ",
                grad.scalar_type());
    TORCH_CHECK(grad.sizes() == like.sizes(), op, ": ", name, " must have shape ", shape_doc, " = ", like.sizes(),
                ", got ", grad.sizes());
    TORCH_CHECK(grad.device() == sim.device(), op, ": ", name, " must be on ", sim.device(),
                " (sim's device), got one on ", grad.device());
  };
  check("grad_interaction", grad_interaction, sim, "[B,T,V]");
  check("grad_text_value", grad_text_value, text_mask, "[B,T]");
  check("grad_image_value", grad_image_value, image_mask, "[B,V]");
}

// x where mask, else 0, in dtype.
inline at::Tensor masked_result(const at::Tensor& x, const at::Tensor& mask, at::ScalarType dtype) {
  return at::where(mask, x, at::zeros({}, x.options())).to(dtype);
}

// Estimates of half-precision inputs are returned in float32.
inline at::ScalarType result_dtype(at::ScalarType t) {
  return (t == at::kFloat || t == at::kDouble) ? t : at::kFloat;
}

}  // namespace banzhaf_common
}  // namespace cbd_fast
