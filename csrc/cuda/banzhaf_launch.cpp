// Torch-facing side of the CUDA Banzhaf pass (banzhaf_cuda.cu): argument checks, exp weights, per-draw
// coefficients, the fixed slicing of the draws, and the post-processing shared with the C++ kernels of
// csrc/cpu/banzhaf_cpu.cpp (1/K scaling, msr strata, masking, result dtypes).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <limits>
#include <string>
#include <utility>

#include "../banzhaf_common.h"
#include "../ops.h"

namespace cbd_fast {

namespace banzhaf_cuda {
// Keep in sync with banzhaf_cuda.cu.
enum Pass : int { kPairedForward = 0, kPairedBackward = 1, kMsrSums = 2, kMsrBackward = 3 };
enum TokenType : int { kNoTokens = -1, kFloatTokens = 0, kHalfTokens = 1, kBFloat16Tokens = 2, kDoubleTokens = 3 };
}  // namespace banzhaf_cuda

// banzhaf_cuda.cu
int64_t banzhaf_cuda_max_text_tokens();
int64_t banzhaf_cuda_max_image_tokens();
bool banzhaf_cuda_similarity_in_smem(int pass, bool use_double, int64_t text_len, int64_t image_len,
                                     bool from_tokens, int64_t width);
cudaError_t launch_banzhaf_pair_similarity(const void* text, const void* image, int token_type, bool use_double,
                                           int64_t batch, int64_t text_len, int64_t image_len, int64_t dim,
                                           void* sim, void* sim_t, cudaStream_t stream);
cudaError_t launch_banzhaf_pass(int pass, bool use_double, int token_type, const void* sim, const void* sim_t,
                                const void* text_tokens, const void* image_tokens, int64_t dim,
                                const bool* text_valid, const bool* image_valid, const double* text_w,
                                const double* image_w, const double* coef_pairs, const double* coef_pairs_t,
                                const double* coef_text, const double* coef_image, int64_t batch, int64_t text_len,
                                int64_t image_len, int64_t num_samples, uint64_t seed, int64_t slices,
                                int64_t width, double* partial, cudaStream_t stream);
cudaError_t launch_banzhaf_reduce_slices(const double* partial, int64_t batch, int64_t slices, int64_t width,
                                         double* out, cudaStream_t stream);

namespace {

using banzhaf_cuda::kDoubleTokens;
using banzhaf_cuda::kMsrBackward;
using banzhaf_cuda::kMsrSums;
using banzhaf_cuda::kNoTokens;
using banzhaf_cuda::kPairedBackward;
using banzhaf_cuda::kPairedForward;

// Draw slicing: a function of (B, K, width) only, never of the device, so results are the same on every GPU.
// About 1024 CTAs (two waves of 4 CTAs per SM on a 132-SM H100; B=128 gives 8 slices of 128 draws at K=1024), at
// least 16 draws per CTA, and a bounded partial-sum buffer.
constexpr int64_t kTargetCtas = 1024;
constexpr int64_t kMinDrawsPerSlice = 16;
constexpr int64_t kMaxPartialBytes = int64_t(512) << 20;

using banzhaf_common::inverse_count;
using banzhaf_common::kMaxWeightSpan;
using banzhaf_common::masked_result;
using banzhaf_common::msr_estimates;
using banzhaf_common::MsrStrata;
using banzhaf_common::result_dtype;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

enum class Estimator { kPaired, kMsr };

Estimator parse_estimator(const char* op, c10::string_view name) {
  if (name == "paired") return Estimator::kPaired;
  if (name == "msr") return Estimator::kMsr;
  TORCH_CHECK(name != "exact", op, ": estimator='exact' (enumeration of all 2^n coalitions, a test oracle) has no ",
              "CUDA kernel; run it on CPU tensors");
  TORCH_CHECK(false, op, ": estimator must be 'paired', 'msr' or 'exact', got '", std::string(name), "'");
}

// The game of every pair as the kernels read it: contiguous device tensors.
struct CudaGame {
  int64_t batch = 0, text_len = 0, image_len = 0, num_samples = 0, dim = 0;
  uint64_t seed = 0;
  bool use_double = false;  // similarity (and maxima) in double: fp64 inputs
  int token_type = kNoTokens;
  at::Tensor sim;                         // [B,T,V] float or double (undefined for from-tokens games)
  at::Tensor text_tokens, image_tokens;   // [B,T,D], [B,V,D] (from-tokens games)
  at::Tensor text_valid, image_valid;     // bool [B,T], [B,V]
  at::Tensor text_w, image_w;             // double [B,T], [B,V]: exp(logit − max over valid), 0 on invalid tokens
  Estimator estimator = Estimator::kPaired;
};

void check_device(const char* op, const char* name, const at::Tensor& x, const at::Device& device) {
  TORCH_CHECK(x.device() == device, op, ": ", name, " must be on ", device, " like the other inputs, got ",
              x.device());
}

// Shapes, dtypes, devices and the CUDA kernels' limits of the mask and weight arguments.
void check_game_arguments(const char* op, const at::Device& device, int64_t batch, int64_t text_len,
                          int64_t image_len, const at::Tensor& text_mask, const at::Tensor& image_mask,
                          const at::Tensor& text_weight, const at::Tensor& image_weight, int64_t num_samples) {
  TORCH_CHECK(device.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, got ", device);
  TORCH_CHECK(text_mask.scalar_type() == at::kBool && text_mask.sizes() == at::IntArrayRef({batch, text_len}), op,
              ": text_mask must be bool [B,T] = [", batch, ",", text_len, "], got ", text_mask.scalar_type(), " ",
              text_mask.sizes());
  TORCH_CHECK(image_mask.scalar_type() == at::kBool && image_mask.sizes() == at::IntArrayRef({batch, image_len}),
              op, ": image_mask must be bool [B,V] = [", batch, ",", image_len, "], got ", image_mask.scalar_type(),
              " ", image_mask.sizes());
  TORCH_CHECK(at::isFloatingType(text_weight.scalar_type()) &&
                  text_weight.sizes() == at::IntArrayRef({batch, text_len}),
              op, ": text_weight must be floating [B,T] = [", batch, ",", text_len, "], got ",
              text_weight.scalar_type(), " ", text_weight.sizes());
  TORCH_CHECK(at::isFloatingType(image_weight.scalar_type()) &&
                  image_weight.sizes() == at::IntArrayRef({batch, image_len}),
              op, ": image_weight must be floating [B,V] = [", batch, ",", image_len, "], got ",
              image_weight.scalar_type(), " ", image_weight.sizes());
  check_device(op, "text_mask", text_mask, device);
  check_device(op, "image_mask", image_mask, device);
  check_device(op, "text_weight", text_weight, device);
  check_device(op, "image_weight", image_weight, device);
  TORCH_CHECK(text_len <= banzhaf_cuda_max_text_tokens() && image_len <= banzhaf_cuda_max_image_tokens(), op,
              ": the CUDA kernel supports T <= ", banzhaf_cuda_max_text_tokens(), " text tokens and V <= ",
              banzhaf_cuda_max_image_tokens(), " image tokens per pair, got T=", text_len, ", V=", image_len,
              " (run larger games on CPU tensors)");
  TORCH_CHECK(num_samples > 0 && num_samples < (int64_t(1) << 32), op,
              ": num_samples must be in [1, 2^32), got ", num_samples);
  TORCH_CHECK(batch < (int64_t(1) << 32), op, ": batch must be < 2^32, got ", batch);
}

// exp(logit − max over the valid tokens of the pair) in double, 0 on invalid tokens (as the C++ kernels), and
// the largest span max − min of the valid logits over the pairs (a 0-dim tensor).
std::pair<at::Tensor, at::Tensor> shifted_exp_weights(const at::Tensor& logits, const at::Tensor& valid) {
  const auto as_double = logits.to(at::kDouble);
  const auto invalid = valid.logical_not();
  const auto masked = as_double.masked_fill(invalid, kNegInf);
  const auto shift = std::get<0>(masked.max(1, /*keepdim=*/true)).clamp_min(-1e300);
  const auto low = std::get<0>(as_double.masked_fill(invalid, 1e300).min(1, /*keepdim=*/true));
  auto span = at::where(valid.any(1, /*keepdim=*/true), shift - low, at::zeros({}, shift.options())).max();
  return {(masked - shift).exp().masked_fill(invalid, 0.0).contiguous(), span};
}

// Exp weights, after the finiteness and span checks of the C++ kernels (one device-to-host copy for all of them).
// `finite_inputs` is a 0-dim bool tensor: the similarity (or token features) are finite.
void set_weights(const char* op, CudaGame& game, const at::Tensor& finite_inputs, const char* inputs_name,
                 const at::Tensor& text_weight, const at::Tensor& image_weight) {
  const auto text_finite = at::isfinite(text_weight).logical_or(game.text_valid.logical_not()).all();
  const auto image_finite = at::isfinite(image_weight).logical_or(game.image_valid.logical_not()).all();
  auto [text_w, text_span] = shifted_exp_weights(text_weight, game.text_valid);
  auto [image_w, image_span] = shifted_exp_weights(image_weight, game.image_valid);
  const auto flags = at::stack({finite_inputs.to(at::kDouble), text_finite.to(at::kDouble),
                                image_finite.to(at::kDouble), text_span, image_span})
                         .cpu();
  const double* f = flags.data_ptr<double>();
  TORCH_CHECK(f[0] != 0.0, op, ": ", inputs_name, " must be finite");
  TORCH_CHECK(f[1] != 0.0, op, ": text_weight must be finite on valid tokens");
  TORCH_CHECK(f[2] != 0.0, op, ": image_weight must be finite on valid tokens");
  TORCH_CHECK(f[3] <= kMaxWeightSpan, op, ": the valid text_weight logits of a pair span ", f[3], " > ",
              kMaxWeightSpan, "; beyond that the leave-one-out sums lose precision (bound the logits, e.g. with a ",
              "scaled tanh)");
  TORCH_CHECK(f[4] <= kMaxWeightSpan, op, ": the valid image_weight logits of a pair span ", f[4], " > ",
              kMaxWeightSpan, "; beyond that the leave-one-out sums lose precision (bound the logits, e.g. with a ",
              "scaled tanh)");
  game.text_w = text_w;
  game.image_w = image_w;
}

CudaGame make_sim_game(const char* op, const at::Tensor& sim, const at::Tensor& text_mask,
                       const at::Tensor& image_mask, const at::Tensor& text_weight, const at::Tensor& image_weight,
                       int64_t num_samples, int64_t seed, c10::string_view estimator) {
  TORCH_CHECK(sim.dim() == 3, op, ": sim must be [B,T,V], got ", sim.sizes());
  TORCH_CHECK(at::isFloatingType(sim.scalar_type()), op, ": sim must be floating, got ", sim.scalar_type());
  CudaGame game;
  game.estimator = parse_estimator(op, estimator);
  game.batch = sim.size(0);
  game.text_len = sim.size(1);
  game.image_len = sim.size(2);
  check_game_arguments(op, sim.device(), game.batch, game.text_len, game.image_len, text_mask, image_mask,
                       text_weight, image_weight, num_samples);
  game.num_samples = num_samples;
  game.seed = static_cast<uint64_t>(seed);
  game.use_double = sim.scalar_type() == at::kDouble;
  game.sim = sim.to(game.use_double ? at::kDouble : at::kFloat).contiguous();
  game.text_valid = text_mask.contiguous();
  game.image_valid = image_mask.contiguous();
  if (sim.numel() > 0) set_weights(op, game, at::isfinite(sim).all(), "sim", text_weight, image_weight);
  return game;
}

int64_t choose_slices(int64_t batch, int64_t num_samples, int64_t width) {
  int64_t slices = (kTargetCtas + batch - 1) / batch;
  slices = std::min(slices, (num_samples + kMinDrawsPerSlice - 1) / kMinDrawsPerSlice);
  slices = std::min(slices, kMaxPartialBytes / (batch * width * int64_t(sizeof(double))));
  slices = std::max<int64_t>(slices, 1);
  const int64_t draws_per_slice = (num_samples + slices - 1) / slices;
  return (num_samples + draws_per_slice - 1) / draws_per_slice;  // no empty slices
}

// Coefficient inputs of the backward passes (undefined where a pass does not read them).
struct Coefficients {
  at::Tensor pairs, pairs_t, text, image;
};

const double* data_or_null(const at::Tensor& x) { return x.defined() ? x.data_ptr<double>() : nullptr; }

// Runs one pass over every (pair, slice) work item and reduces the slices in order: [B, width] double.
at::Tensor run_pass(const CudaGame& game, int pass, int64_t width, const Coefficients& coef = {}) {
  const int64_t slices = choose_slices(game.batch, game.num_samples, width);
  TORCH_CHECK(game.batch * slices <= std::numeric_limits<int32_t>::max(), "banzhaf_interaction: batch ",
              game.batch, " is too large for one CUDA launch");
  TORCH_CHECK(width <= std::numeric_limits<int32_t>::max(), "banzhaf_interaction: game too large");
  const auto options = game.text_w.options();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool from_tokens = game.token_type != kNoTokens;
  const bool staged = banzhaf_cuda_similarity_in_smem(pass, game.use_double, game.text_len, game.image_len,
                                                      from_tokens, width);
  at::Tensor sim = game.sim, sim_t;
  int token_type = game.token_type;
  if (from_tokens && !staged) {
    // The similarity does not fit in shared memory: compute it once per pair into a scratch buffer.
    const auto sim_options = options.dtype(game.use_double ? at::kDouble : at::kFloat);
    sim = at::empty({game.batch, game.text_len, game.image_len}, sim_options);
    sim_t = at::empty({game.batch, game.image_len, game.text_len}, sim_options);
    C10_CUDA_CHECK(launch_banzhaf_pair_similarity(game.text_tokens.data_ptr(), game.image_tokens.data_ptr(),
                                                  game.token_type, game.use_double, game.batch, game.text_len,
                                                  game.image_len, game.dim, sim.data_ptr(), sim_t.data_ptr(),
                                                  stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    token_type = kNoTokens;
  } else if (!from_tokens && !staged) {
    sim_t = sim.transpose(1, 2).contiguous();  // the column scans read simᵀ from global memory
  }
  auto partial = at::empty({game.batch, slices, width}, options);
  C10_CUDA_CHECK(launch_banzhaf_pass(
      pass, game.use_double, token_type, sim.defined() ? sim.data_ptr() : nullptr,
      sim_t.defined() ? sim_t.data_ptr() : nullptr,
      token_type != kNoTokens ? game.text_tokens.data_ptr() : nullptr,
      token_type != kNoTokens ? game.image_tokens.data_ptr() : nullptr, game.dim,
      game.text_valid.data_ptr<bool>(), game.image_valid.data_ptr<bool>(), game.text_w.data_ptr<double>(),
      game.image_w.data_ptr<double>(), data_or_null(coef.pairs), data_or_null(coef.pairs_t),
      data_or_null(coef.text), data_or_null(coef.image), game.batch, game.text_len, game.image_len,
      game.num_samples, game.seed, slices, width, partial.data_ptr<double>(), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto total = at::empty({game.batch, width}, options);
  C10_CUDA_CHECK(launch_banzhaf_reduce_slices(partial.data_ptr<double>(), game.batch, slices, width,
                                              total.data_ptr<double>(), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return total;
}

// ---------------------------------------------------------------------------------------------------------------
// paired

Tensor3 paired_forward(const CudaGame& game) {
  const int64_t B = game.batch, T = game.text_len, V = game.image_len, TV = T * V;
  // [interaction | text value | image value] summed over the draws, times ½ (v = ½(f + g)) and 1/K.
  auto total = run_pass(game, kPairedForward, TV + T + V);
  total.mul_(0.5 / static_cast<double>(game.num_samples));
  return {total.narrow(1, 0, TV).reshape({B, T, V}), total.narrow(1, TV, T), total.narrow(1, TV + T, V)};
}

// [grad via the text half (T,V) | grad via the image half (V,T) | dL/dw text | dL/dw image] → gradients w.r.t.
// sim and the weight logits (dL/d logit = w · dL/dw).
Tensor3 split_backward_total(const CudaGame& game, const at::Tensor& total) {
  const int64_t B = game.batch, T = game.text_len, V = game.image_len, TV = T * V;
  auto grad_sim = total.narrow(1, 0, TV).reshape({B, T, V}) +
                  total.narrow(1, TV, TV).reshape({B, V, T}).transpose(1, 2);
  return {grad_sim, total.narrow(1, 2 * TV, T) * game.text_w, total.narrow(1, 2 * TV + T, V) * game.image_w};
}

Tensor3 paired_backward(const CudaGame& game, const at::Tensor& grad_interaction, const at::Tensor& grad_text_value,
                        const at::Tensor& grad_image_value) {
  const int64_t T = game.text_len, V = game.image_len, TV = T * V;
  // Coefficients of each draw's terms: dL/d(estimate) · ½ / K.
  const double scale = 0.5 / static_cast<double>(game.num_samples);
  Coefficients coef;
  coef.pairs = (grad_interaction * scale).contiguous();
  coef.pairs_t = coef.pairs.transpose(1, 2).contiguous();
  coef.text = (grad_text_value * scale).contiguous();
  coef.image = (grad_image_value * scale).contiguous();
  return split_backward_total(game, run_pass(game, kPairedBackward, 2 * TV + T + V, coef));
}

// ---------------------------------------------------------------------------------------------------------------
// msr: one value per draw; strata sums over (i in A?) x (j in C?)

// The strata of every (i, j) and token from one msr pass: [Σv for i∈A, j∈C | i∈A | j∈C | all] then the counts.
MsrStrata msr_strata(const CudaGame& game) {
  const int64_t stride = game.text_len * game.image_len + game.text_len + game.image_len + 1;
  const auto total = run_pass(game, kMsrSums, 2 * stride);
  return banzhaf_common::msr_strata(total.narrow(1, 0, stride), total.narrow(1, stride, stride), game.batch,
                                    game.text_len, game.image_len);
}

Tensor3 msr_forward(const CudaGame& game) { return msr_estimates(msr_strata(game)); }

Tensor3 msr_backward(const CudaGame& game, const at::Tensor& grad_interaction, const at::Tensor& grad_text_value,
                     const at::Tensor& grad_image_value) {
  const int64_t T = game.text_len, V = game.image_len, TV = T * V;
  const MsrStrata st = msr_strata(game);
  // dL/dv_k = Σ_{i,j} g[i,j]·(±1/N_stratum) for the stratum (i,j) falls in at draw k, plus the value terms.
  const auto& gi = grad_interaction;
  auto w11 = gi * inverse_count(st.n11), w10 = -gi * inverse_count(st.n10);
  auto w01 = -gi * inverse_count(st.n01), w00 = gi * inverse_count(st.n00);
  const auto& gt = grad_text_value;
  const auto& gv = grad_image_value;
  Coefficients coef;
  // [B, 4, V, T] indexed by 2·[i∈A] + [j∈C]; transposed so a thread per text row reads consecutive addresses.
  coef.pairs = at::stack({w00, w01, w10, w11}, 1).transpose(2, 3).contiguous();
  coef.text = at::stack({-gt * inverse_count(st.nt0), gt * inverse_count(st.nt1)}, 1).contiguous();   // [B,2,T]
  coef.image = at::stack({-gv * inverse_count(st.nv0), gv * inverse_count(st.nv1)}, 1).contiguous();  // [B,2,V]
  return split_backward_total(game, run_pass(game, kMsrBackward, 2 * TV + T + V, coef));
}

// ---------------------------------------------------------------------------------------------------------------

Tensor3 forward(const CudaGame& game, at::ScalarType dtype) {
  const auto options = game.text_valid.options().dtype(dtype);
  if (game.batch == 0 || game.text_len == 0 || game.image_len == 0) {  // no pairs or no players: all zero
    return {at::zeros({game.batch, game.text_len, game.image_len}, options),
            at::zeros({game.batch, game.text_len}, options), at::zeros({game.batch, game.image_len}, options)};
  }
  auto [interaction, text_value, image_value] =
      game.estimator == Estimator::kMsr ? msr_forward(game) : paired_forward(game);
  const auto pair_mask = game.text_valid.unsqueeze(2).logical_and(game.image_valid.unsqueeze(1));
  return {masked_result(interaction, pair_mask, dtype), masked_result(text_value, game.text_valid, dtype),
          masked_result(image_value, game.image_valid, dtype)};
}

int token_type_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return banzhaf_cuda::kFloatTokens;
    case at::kHalf:
      return banzhaf_cuda::kHalfTokens;
    case at::kBFloat16:
      return banzhaf_cuda::kBFloat16Tokens;
    case at::kDouble:
      return kDoubleTokens;
    default:
      TORCH_CHECK(false, "banzhaf_interaction_from_tokens: text and image must be float32, float64, float16 or ",
                  "bfloat16, got ", t);
  }
}

}  // namespace

Tensor3 banzhaf_interaction_cuda(const at::Tensor& sim, const at::Tensor& text_mask, const at::Tensor& image_mask,
                                 const at::Tensor& text_weight, const at::Tensor& image_weight, int64_t num_samples,
                                 int64_t seed, c10::string_view estimator) {
  constexpr const char* op = "banzhaf_interaction";
  const c10::cuda::CUDAGuard guard(sim.device());
  const CudaGame game =
      make_sim_game(op, sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator);
  return forward(game, result_dtype(sim.scalar_type()));
}

Tensor3 banzhaf_interaction_backward_cuda(const at::Tensor& grad_interaction, const at::Tensor& grad_text_value,
                                          const at::Tensor& grad_image_value, const at::Tensor& sim,
                                          const at::Tensor& text_mask, const at::Tensor& image_mask,
                                          const at::Tensor& text_weight, const at::Tensor& image_weight,
                                          int64_t num_samples, int64_t seed, c10::string_view estimator) {
  constexpr const char* op = "banzhaf_interaction_backward";
  const c10::cuda::CUDAGuard guard(sim.device());
  const CudaGame game =
      make_sim_game(op, sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator);
  banzhaf_common::check_output_gradients(op, grad_interaction, grad_text_value, grad_image_value, sim, text_mask,
                                         image_mask);
  if (sim.numel() == 0) {
    return {at::zeros_like(sim), at::zeros_like(text_weight), at::zeros_like(image_weight)};
  }
  // Gradients of masked-out outputs do not flow.
  const auto pair_mask = game.text_valid.unsqueeze(2).logical_and(game.image_valid.unsqueeze(1));
  const auto zero = at::zeros({}, game.text_w.options());
  const auto gi = at::where(pair_mask, grad_interaction.to(at::kDouble), zero);
  const auto gt = at::where(game.text_valid, grad_text_value.to(at::kDouble), zero);
  const auto gv = at::where(game.image_valid, grad_image_value.to(at::kDouble), zero);
  auto [grad_sim, grad_tw, grad_iw] =
      game.estimator == Estimator::kMsr ? msr_backward(game, gi, gt, gv) : paired_backward(game, gi, gt, gv);
  return {grad_sim.to(sim.scalar_type()), grad_tw.to(text_weight.scalar_type()),
          grad_iw.to(image_weight.scalar_type())};
}

Tensor3 banzhaf_interaction_from_tokens_cuda(const at::Tensor& text, const at::Tensor& image,
                                             const at::Tensor& text_mask, const at::Tensor& image_mask,
                                             const at::Tensor& text_weight, const at::Tensor& image_weight,
                                             int64_t num_samples, int64_t seed, c10::string_view estimator) {
  constexpr const char* op = "banzhaf_interaction_from_tokens";
  TORCH_CHECK(text.dim() == 3 && image.dim() == 3, op, ": text must be [B,T,D] and image [B,V,D], got ",
              text.sizes(), " and ", image.sizes());
  TORCH_CHECK(text.size(0) == image.size(0) && text.size(2) == image.size(2), op,
              ": text [B,T,D] and image [B,V,D] must agree in B and D, got ", text.sizes(), " and ", image.sizes());
  TORCH_CHECK(text.scalar_type() == image.scalar_type(), op, ": text and image must have one dtype, got ",
              text.scalar_type(), " and ", image.scalar_type());
  check_device(op, "image", image, text.device());
  const c10::cuda::CUDAGuard guard(text.device());
  CudaGame game;
  game.estimator = parse_estimator(op, estimator);
  game.batch = text.size(0);
  game.text_len = text.size(1);
  game.image_len = image.size(1);
  game.dim = text.size(2);
  check_game_arguments(op, text.device(), game.batch, game.text_len, game.image_len, text_mask, image_mask,
                       text_weight, image_weight, num_samples);
  TORCH_CHECK(game.dim <= std::numeric_limits<int32_t>::max(), op, ": feature dimension D too large");
  game.token_type = token_type_of(text.scalar_type());
  game.num_samples = num_samples;
  game.seed = static_cast<uint64_t>(seed);
  game.use_double = text.scalar_type() == at::kDouble;
  game.text_tokens = text.contiguous();
  game.image_tokens = image.contiguous();
  game.text_valid = text_mask.contiguous();
  game.image_valid = image_mask.contiguous();
  const bool empty = game.batch == 0 || game.text_len == 0 || game.image_len == 0;
  if (!empty) {
    set_weights(op, game, at::isfinite(text).all().logical_and(at::isfinite(image).all()), "text and image",
                text_weight, image_weight);
  }
  return forward(game, result_dtype(text.scalar_type()));
}

}  // namespace cbd_fast
