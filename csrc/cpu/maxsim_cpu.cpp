// All-pairs fine-grained score (MaxSim / WTI, DESIGN §5), CPU.
//
// Forward: the similarities of a block of texts against a block of images are computed into a small tile
// (never the whole Bt×Bi×T×V tensor), then reduced per pair to the row maxima (best image token of each text
// token) and column maxima (best text token of each image token) with their arg-max, from which the score
// follows. Backward routes the score gradient through the stored arg-max entries.
//
// Determinism: every similarity is one dot product summed over D in index order by a single thread, so its
// value does not depend on the tile partition or the thread count, and every output element (score, max,
// gradient row) is reduced in a fixed order by the one thread that owns it. Results are bitwise identical
// for any torch.set_num_threads and for any batch composition. (A BLAS gemm would be faster, but its
// summation order changes with the matrix shape and the thread count.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "../ops.h"

// The hot loops are compiled twice, for AVX2 and for the baseline ISA, and the loader picks one per machine.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__ELF__)
#define CBD_FAST_AVX2_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CBD_FAST_AVX2_CLONES
#endif

namespace cbd_fast {

namespace {

// ---------------------------------------------------------------------------------------------------------
// Argument checks and token coefficients
// ---------------------------------------------------------------------------------------------------------

enum class Reduction { kWti, kSum, kMean };

Reduction parse_reduction(c10::string_view reduction, const char* op) {
  if (reduction == "wti") return Reduction::kWti;
  if (reduction == "sum") return Reduction::kSum;
  if (reduction == "mean") return Reduction::kMean;
  TORCH_CHECK(false, op, ": reduction must be 'wti', 'sum' or 'mean', got '", std::string(reduction), "'");
}

// Features of fp32/fp64 are computed in their dtype; half-precision features accumulate in fp32.
at::ScalarType accumulation_type(at::ScalarType feature_type) {
  return feature_type == at::kDouble ? at::kDouble : at::kFloat;
}

bool is_float_type(at::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
}

struct MaxSimSizes {
  int64_t num_texts, text_len, num_images, image_len, dim;
};

void check_cpu(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", x.device());
}

void check_shape(const char* op, const char* name, const at::Tensor& x, at::IntArrayRef expected,
                 const char* shape_doc) {
  TORCH_CHECK(x.sizes() == expected, op, ": ", name, " must have shape ", shape_doc, " = ", expected, ", got ",
              x.sizes());
}

// The inputs shared by the forward and the backward: text[Bt,T,D], image[Bi,V,D] of one float dtype, bool
// masks and float weight logits of the token shapes, all on the CPU.
MaxSimSizes check_maxsim_inputs(const char* op, const at::Tensor& text, const at::Tensor& image,
                                const at::Tensor& text_mask, const at::Tensor& image_mask,
                                const at::Tensor& text_weight, const at::Tensor& image_weight) {
  TORCH_CHECK(text.dim() == 3, op, ": text must have shape [Bt, T, D], got ", text.sizes());
  TORCH_CHECK(image.dim() == 3, op, ": image must have shape [Bi, V, D], got ", image.sizes());
  TORCH_CHECK(image.size(2) == text.size(2), op, ": image must have shape [Bi, V, D] with D = ", text.size(2),
              " (the text's D), got ", image.sizes());
  TORCH_CHECK(is_float_type(text.scalar_type()), op, ": text must be float32, float64, float16 or bfloat16, got ",
              text.scalar_type());
  TORCH_CHECK(image.scalar_type() == text.scalar_type(), op, ": image must have the text's dtype ",
              text.scalar_type(), ", got ", image.scalar_type());
  const MaxSimSizes sizes{text.size(0), text.size(1), image.size(0), image.size(1), text.size(2)};
  TORCH_CHECK(text_mask.scalar_type() == at::kBool, op, ": text_mask must be bool, got ", text_mask.scalar_type());
  TORCH_CHECK(image_mask.scalar_type() == at::kBool, op, ": image_mask must be bool, got ",
              image_mask.scalar_type());
  check_shape(op, "text_mask", text_mask, {sizes.num_texts, sizes.text_len}, "[Bt, T]");
  check_shape(op, "image_mask", image_mask, {sizes.num_images, sizes.image_len}, "[Bi, V]");
  TORCH_CHECK(is_float_type(text_weight.scalar_type()), op, ": text_weight must be floating, got ",
              text_weight.scalar_type());
  TORCH_CHECK(is_float_type(image_weight.scalar_type()), op, ": image_weight must be floating, got ",
              image_weight.scalar_type());
  check_shape(op, "text_weight", text_weight, {sizes.num_texts, sizes.text_len}, "[Bt, T]");
  check_shape(op, "image_weight", image_weight, {sizes.num_images, sizes.image_len}, "[Bi, V]");
  check_cpu(op, "text", text);
  check_cpu(op, "image", image);
  check_cpu(op, "text_mask", text_mask);
  check_cpu(op, "image_mask", image_mask);
  check_cpu(op, "text_weight", text_weight);
  check_cpu(op, "image_weight", image_weight);
  return sizes;
}

// Normalised token weights [B, L] in acc_t (α or β of DESIGN §5), 0 on invalid tokens and on rows without a
// valid token: softmax of the logits over the valid tokens ("wti"), 1 ("sum") or 1/L_valid ("mean").
template <typename acc_t>
at::Tensor token_coefficients(const at::Tensor& weight, const at::Tensor& mask, Reduction reduction) {
  const at::Tensor logits = weight.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const at::Tensor valid = mask.contiguous();
  at::Tensor coefficients = at::zeros(logits.sizes(), logits.options());
  const int64_t rows = logits.size(0), len = logits.size(1);
  const acc_t* w = logits.data_ptr<acc_t>();
  const bool* m = valid.data_ptr<bool>();
  acc_t* out = coefficients.data_ptr<acc_t>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const acc_t* w_row = w + row * len;
      const bool* m_row = m + row * len;
      acc_t* out_row = out + row * len;
      int64_t num_valid = 0;
      acc_t max_logit = -std::numeric_limits<acc_t>::infinity();
      for (int64_t i = 0; i < len; ++i) {
        if (!m_row[i]) continue;
        ++num_valid;
        max_logit = std::max(max_logit, w_row[i]);
      }
      if (num_valid == 0) continue;
      if (reduction == Reduction::kWti) {
        acc_t total = 0;
        for (int64_t i = 0; i < len; ++i) {
          if (!m_row[i]) continue;
          out_row[i] = std::exp(w_row[i] - max_logit);  // shifted by the max so exp cannot overflow
          total += out_row[i];
        }
        for (int64_t i = 0; i < len; ++i) out_row[i] /= total;
      } else {
        const acc_t value = reduction == Reduction::kSum ? acc_t(1) : acc_t(1) / static_cast<acc_t>(num_valid);
        for (int64_t i = 0; i < len; ++i) out_row[i] = m_row[i] ? value : acc_t(0);
      }
    }
  });
  return coefficients;
}

// True for the rows of a [B, L] mask that have at least one valid token.
at::Tensor any_valid(const at::Tensor& mask) { return mask.any(1).contiguous(); }

// ---------------------------------------------------------------------------------------------------------
// Similarity tiles
// ---------------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct Simd {
  typedef scalar_t Vec __attribute__((vector_size(32)));
  static constexpr int64_t kLanes = 32 / sizeof(scalar_t);
  static constexpr int64_t kPanelWidth = 2 * kLanes;  // columns of one micro-kernel call (two vectors)
};

constexpr int kRowsPerBlock = 4;  // rows of one micro-kernel call: 4 rows × 2 vectors = 8 accumulators

// out[i, 0:kPanelWidth] = Σ_d x[i, d] · yt[d, 0:kPanelWidth] for i < kRows, summed over d in index order with
// one accumulator per output element. x rows are x_stride apart, yt rows yt_stride apart (any alignment).
template <typename scalar_t, int kRows>
C10_ALWAYS_INLINE void similarity_micro_kernel(const scalar_t* x, int64_t x_stride, const scalar_t* yt,
                                               int64_t yt_stride, int64_t depth, scalar_t* out, int64_t out_stride) {
  using Vec = typename Simd<scalar_t>::Vec;
  constexpr int64_t kLanes = Simd<scalar_t>::kLanes;
  Vec acc[kRows][2] = {};
  for (int64_t d = 0; d < depth; ++d) {
    Vec y0, y1;
    std::memcpy(&y0, yt + d * yt_stride, sizeof(Vec));
    std::memcpy(&y1, yt + d * yt_stride + kLanes, sizeof(Vec));
    for (int i = 0; i < kRows; ++i) {
      const scalar_t xi = x[i * x_stride + d];
      acc[i][0] += xi * y0;
      acc[i][1] += xi * y1;
    }
  }
  for (int i = 0; i < kRows; ++i) {
    std::memcpy(out + i * out_stride, &acc[i][0], sizeof(Vec));
    std::memcpy(out + i * out_stride + kLanes, &acc[i][1], sizeof(Vec));
  }
}

// The remaining rows of a column panel (fewer than kRowsPerBlock), in one micro-kernel call of that height.
template <typename scalar_t, int kRows>
C10_ALWAYS_INLINE void similarity_remainder(int64_t remaining, const scalar_t* x, int64_t depth, const scalar_t* yt,
                                            int64_t yt_stride, scalar_t* tile, int64_t tile_stride) {
  if constexpr (kRows > 0) {
    if (remaining == kRows) {
      similarity_micro_kernel<scalar_t, kRows>(x, depth, yt, yt_stride, depth, tile, tile_stride);
    } else {
      similarity_remainder<scalar_t, kRows - 1>(remaining, x, depth, yt, yt_stride, tile, tile_stride);
    }
  }
}

// tile[r, c] = ⟨x[r], column c of yt⟩ for r < rows, c < cols rounded up to the panel width.
// x: [rows, depth] row-major; yt: [depth, yt_stride], readable up to column cols + kPanelWidth - 1;
// tile: [rows, tile_stride] with tile_stride >= cols rounded up to the panel width.
template <typename scalar_t>
C10_ALWAYS_INLINE void similarity_tile_impl(const scalar_t* x, int64_t rows, int64_t depth, const scalar_t* yt,
                                            int64_t yt_stride, int64_t cols, scalar_t* tile, int64_t tile_stride) {
  constexpr int64_t kPanelWidth = Simd<scalar_t>::kPanelWidth;
  // Columns outermost: one panel of yt (depth × kPanelWidth) stays in L1 while every row block passes by.
  for (int64_t c = 0; c < cols; c += kPanelWidth) {
    int64_t r = 0;
    for (; r + kRowsPerBlock <= rows; r += kRowsPerBlock) {
      similarity_micro_kernel<scalar_t, kRowsPerBlock>(x + r * depth, depth, yt + c, yt_stride, depth,
                                                       tile + r * tile_stride + c, tile_stride);
    }
    similarity_remainder<scalar_t, kRowsPerBlock - 1>(rows - r, x + r * depth, depth, yt + c, yt_stride,
                                                      tile + r * tile_stride + c, tile_stride);
  }
}

CBD_FAST_AVX2_CLONES void similarity_tile(const float* x, int64_t rows, int64_t depth, const float* yt,
                                          int64_t yt_stride, int64_t cols, float* tile, int64_t tile_stride) {
  similarity_tile_impl(x, rows, depth, yt, yt_stride, cols, tile, tile_stride);
}

CBD_FAST_AVX2_CLONES void similarity_tile(const double* x, int64_t rows, int64_t depth, const double* yt,
                                          int64_t yt_stride, int64_t cols, double* tile, int64_t tile_stride) {
  similarity_tile_impl(x, rows, depth, yt, yt_stride, cols, tile, tile_stride);
}

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Similarity entries per tile (256 KiB in fp32): the tile stays in L2 between the products and the maxima.
// A tile always holds whole pairs, so a single pair larger than this gets a tile of its own.
constexpr int64_t kTileElements = int64_t(1) << 16;

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

template <typename acc_t>
struct ForwardOutputs {
  acc_t* score;              // [Bt, Bi]
  int32_t* text_argmax;      // [Bt, Bi, T]
  int32_t* image_argmax;     // [Bt, Bi, V]
  acc_t* text_max;           // [Bt, Bi, T]
  acc_t* image_max;          // [Bt, Bi, V]
};

struct TokenInfo {
  const bool* text_mask;       // [Bt, T]
  const bool* image_mask;      // [Bi, V]
  const bool* text_nonempty;   // [Bt]
  const bool* image_nonempty;  // [Bi]
};

// Maxima of one pair from its T×V block of a similarity tile (row t at block + t * stride), and its score.
// Ties go to the lowest index; entries of invalid tokens, and all entries of a pair with an empty side, are
// 0 with arg-max -1, and such a pair scores 0.
template <typename acc_t>
void reduce_pair(const acc_t* block, int64_t stride, int64_t a, int64_t b, const MaxSimSizes& n,
                 const TokenInfo& tokens, const acc_t* alpha, const acc_t* beta, const ForwardOutputs<acc_t>& out) {
  const int64_t T = n.text_len, V = n.image_len;
  const int64_t pair = a * n.num_images + b;
  acc_t* text_max = out.text_max + pair * T;
  int32_t* text_argmax = out.text_argmax + pair * T;
  acc_t* image_max = out.image_max + pair * V;
  int32_t* image_argmax = out.image_argmax + pair * V;
  std::fill(text_max, text_max + T, acc_t(0));
  std::fill(text_argmax, text_argmax + T, -1);
  std::fill(image_max, image_max + V, acc_t(0));
  std::fill(image_argmax, image_argmax + V, -1);
  out.score[pair] = 0;
  if (!tokens.text_nonempty[a] || !tokens.image_nonempty[b]) return;

  const bool* text_valid = tokens.text_mask + a * T;
  const bool* image_valid = tokens.image_mask + b * V;
  for (int64_t t = 0; t < T; ++t) {
    if (!text_valid[t]) continue;
    const acc_t* row = block + t * stride;
    // Row max over valid image tokens (strict > keeps the first maximum).
    int32_t best_u = -1;
    acc_t best = 0;
    for (int64_t u = 0; u < V; ++u) {
      if (image_valid[u] && (best_u < 0 || row[u] > best)) {
        best = row[u];
        best_u = static_cast<int32_t>(u);
      }
    }
    text_max[t] = best;
    text_argmax[t] = best_u;
    // Column maxima over the valid text tokens seen so far (rows in increasing t; strict > keeps the first).
    for (int64_t u = 0; u < V; ++u) {
      if (image_valid[u] && (image_argmax[u] < 0 || row[u] > image_max[u])) {
        image_max[u] = row[u];
        image_argmax[u] = static_cast<int32_t>(t);
      }
    }
  }
  const acc_t* alpha_a = alpha + a * T;
  const acc_t* beta_b = beta + b * V;
  acc_t text_term = 0, image_term = 0;
  for (int64_t t = 0; t < T; ++t) text_term += alpha_a[t] * text_max[t];
  for (int64_t u = 0; u < V; ++u) image_term += beta_b[u] * image_max[u];
  out.score[pair] = acc_t(0.5) * (text_term + image_term);
}

template <typename acc_t>
void maxsim_forward_kernel(const at::Tensor& text, const at::Tensor& image, const MaxSimSizes& n,
                           const TokenInfo& tokens, const acc_t* alpha, const acc_t* beta,
                           const ForwardOutputs<acc_t>& out) {
  const int64_t T = n.text_len, V = n.image_len, D = n.dim;
  constexpr int64_t kPanelWidth = Simd<acc_t>::kPanelWidth;
  // Image tokens transposed to [D, Bi*V] (+ one zero panel, read past the last column by the micro-kernel)
  // so that a micro-kernel loads contiguous vectors of image tokens.
  const int64_t image_cols = n.num_images * V;
  const int64_t yt_stride = image_cols + kPanelWidth;
  at::Tensor image_t = at::zeros({D, yt_stride}, text.options());
  image_t.narrow(1, 0, image_cols).copy_(image.reshape({image_cols, D}).t());
  const acc_t* x = text.data_ptr<acc_t>();
  const acc_t* yt = image_t.data_ptr<acc_t>();

  // Tiles of whole pairs: up to kTileElements similarities, images first so small text blocks see many images.
  const int64_t pair_elements = std::max<int64_t>(T * V, 1);
  const int64_t images_per_tile = std::clamp<int64_t>(kTileElements / pair_elements, 1, n.num_images);
  const int64_t texts_per_tile =
      std::clamp<int64_t>(kTileElements / (pair_elements * images_per_tile), 1, n.num_texts);
  const int64_t text_blocks = (n.num_texts + texts_per_tile - 1) / texts_per_tile;
  const int64_t image_blocks = (n.num_images + images_per_tile - 1) / images_per_tile;

  // One tile buffer per thread, allocated here (through the torch allocator, so memory profiles see it).
  const int64_t tile_capacity = texts_per_tile * T * round_up(images_per_tile * V, kPanelWidth);
  at::Tensor tiles = at::empty({at::get_num_threads(), tile_capacity}, text.options());

  at::parallel_for(0, text_blocks * image_blocks, 1, [&](int64_t begin, int64_t end) {
    acc_t* tile = tiles.data_ptr<acc_t>() + at::get_thread_num() * tile_capacity;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t a0 = (item / image_blocks) * texts_per_tile;
      const int64_t a1 = std::min(a0 + texts_per_tile, n.num_texts);
      const int64_t b0 = (item % image_blocks) * images_per_tile;
      const int64_t b1 = std::min(b0 + images_per_tile, n.num_images);
      const int64_t rows = (a1 - a0) * T, cols = (b1 - b0) * V;
      const int64_t tile_stride = round_up(cols, kPanelWidth);
      similarity_tile(x + a0 * T * D, rows, D, yt + b0 * V, yt_stride, cols, tile, tile_stride);
      for (int64_t a = a0; a < a1; ++a) {
        for (int64_t b = b0; b < b1; ++b) {
          const acc_t* block = tile + (a - a0) * T * tile_stride + (b - b0) * V;
          reduce_pair(block, tile_stride, a, b, n, tokens, alpha, beta, out);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

template <typename acc_t>
struct BackwardArgs {
  MaxSimSizes n;
  TokenInfo tokens;
  bool with_weight_grads;
  const acc_t* grad_score;   // [Bt, Bi]
  const acc_t* text;         // [Bt, T, D]
  const acc_t* image;        // [Bi, V, D]
  const acc_t* alpha;        // [Bt, T]
  const acc_t* beta;         // [Bi, V]
  const int32_t* text_argmax;   // [Bt, Bi, T]
  const int32_t* image_argmax;  // [Bt, Bi, V]
  const acc_t* text_max;     // [Bt, Bi, T]
  const acc_t* image_max;    // [Bt, Bi, V]
  acc_t* grad_text;          // [Bt, T, D]
  acc_t* grad_image;         // [Bi, V, D]
  acc_t* grad_text_weight;   // [Bt, T]
  acc_t* grad_image_weight;  // [Bi, V]
};

// out[0:len] += scale · in[0:len]
template <typename acc_t>
C10_ALWAYS_INLINE void add_scaled(acc_t* __restrict__ out, acc_t scale, const acc_t* __restrict__ in, int64_t len) {
  for (int64_t d = 0; d < len; ++d) out[d] += scale * in[d];
}

// Gradients owned by text a: grad_text[a] and grad_text_weight[a], summed over images b in order.
// ∂s[a,b]/∂X[a,t] = ½ α_a[t] Y[b, argmax_u] (text term) and ½ β_b[u] Y[b,u] for the u whose column max is t
// (image term); ∂s/∂wt[a,t] = ½ α_a[t] (r[t] − Σ_t' α_a[t'] r[t']) under "wti" (softmax Jacobian).
template <typename acc_t>
C10_ALWAYS_INLINE void text_grads_impl(const BackwardArgs<acc_t>& g, int64_t a) {
  const int64_t T = g.n.text_len, V = g.n.image_len, D = g.n.dim, Bi = g.n.num_images;
  if (!g.tokens.text_nonempty[a]) return;
  const acc_t* alpha_a = g.alpha + a * T;
  acc_t* grad_x = g.grad_text + a * T * D;
  for (int64_t b = 0; b < Bi; ++b) {
    if (!g.tokens.image_nonempty[b]) continue;
    const int64_t pair = a * Bi + b;
    const acc_t half_grad = acc_t(0.5) * g.grad_score[pair];
    const acc_t* y_b = g.image + b * V * D;
    const int32_t* text_argmax = g.text_argmax + pair * T;
    const int32_t* image_argmax = g.image_argmax + pair * V;
    const acc_t* beta_b = g.beta + b * V;
    for (int64_t t = 0; t < T; ++t) {
      if (text_argmax[t] >= 0) add_scaled(grad_x + t * D, half_grad * alpha_a[t], y_b + text_argmax[t] * D, D);
    }
    for (int64_t u = 0; u < V; ++u) {
      if (image_argmax[u] >= 0) add_scaled(grad_x + image_argmax[u] * D, half_grad * beta_b[u], y_b + u * D, D);
    }
    if (g.with_weight_grads) {
      const acc_t* r = g.text_max + pair * T;
      acc_t text_term = 0;
      for (int64_t t = 0; t < T; ++t) text_term += alpha_a[t] * r[t];
      acc_t* grad_w = g.grad_text_weight + a * T;
      for (int64_t t = 0; t < T; ++t) grad_w[t] += half_grad * alpha_a[t] * (r[t] - text_term);
    }
  }
}

// The mirror image of text_grads_impl: gradients owned by image b, summed over texts a in order.
template <typename acc_t>
C10_ALWAYS_INLINE void image_grads_impl(const BackwardArgs<acc_t>& g, int64_t b) {
  const int64_t T = g.n.text_len, V = g.n.image_len, D = g.n.dim, Bi = g.n.num_images;
  if (!g.tokens.image_nonempty[b]) return;
  const acc_t* beta_b = g.beta + b * V;
  acc_t* grad_y = g.grad_image + b * V * D;
  for (int64_t a = 0; a < g.n.num_texts; ++a) {
    if (!g.tokens.text_nonempty[a]) continue;
    const int64_t pair = a * Bi + b;
    const acc_t half_grad = acc_t(0.5) * g.grad_score[pair];
    const acc_t* x_a = g.text + a * T * D;
    const int32_t* text_argmax = g.text_argmax + pair * T;
    const int32_t* image_argmax = g.image_argmax + pair * V;
    const acc_t* alpha_a = g.alpha + a * T;
    for (int64_t t = 0; t < T; ++t) {
      if (text_argmax[t] >= 0) add_scaled(grad_y + text_argmax[t] * D, half_grad * alpha_a[t], x_a + t * D, D);
    }
    for (int64_t u = 0; u < V; ++u) {
      if (image_argmax[u] >= 0) add_scaled(grad_y + u * D, half_grad * beta_b[u], x_a + image_argmax[u] * D, D);
    }
    if (g.with_weight_grads) {
      const acc_t* c = g.image_max + pair * V;
      acc_t image_term = 0;
      for (int64_t u = 0; u < V; ++u) image_term += beta_b[u] * c[u];
      acc_t* grad_w = g.grad_image_weight + b * V;
      for (int64_t u = 0; u < V; ++u) grad_w[u] += half_grad * beta_b[u] * (c[u] - image_term);
    }
  }
}

CBD_FAST_AVX2_CLONES void text_grads(const BackwardArgs<float>& g, int64_t a) { text_grads_impl(g, a); }
CBD_FAST_AVX2_CLONES void text_grads(const BackwardArgs<double>& g, int64_t a) { text_grads_impl(g, a); }
CBD_FAST_AVX2_CLONES void image_grads(const BackwardArgs<float>& g, int64_t b) { image_grads_impl(g, b); }
CBD_FAST_AVX2_CLONES void image_grads(const BackwardArgs<double>& g, int64_t b) { image_grads_impl(g, b); }

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------------------

Tensor5 maxsim_forward_cpu(const at::Tensor& text, const at::Tensor& image, const at::Tensor& text_mask,
                           const at::Tensor& image_mask, const at::Tensor& text_weight,
                           const at::Tensor& image_weight, c10::string_view reduction) {
  constexpr const char* op = "maxsim_forward";
  const MaxSimSizes n = check_maxsim_inputs(op, text, image, text_mask, image_mask, text_weight, image_weight);
  const Reduction mode = parse_reduction(reduction, op);
  const at::ScalarType acc_type = accumulation_type(text.scalar_type());
  const at::TensorOptions acc_options = text.options().dtype(acc_type);
  at::Tensor score = at::empty({n.num_texts, n.num_images}, acc_options);
  at::Tensor text_argmax = at::empty({n.num_texts, n.num_images, n.text_len}, text.options().dtype(at::kInt));
  at::Tensor image_argmax = at::empty({n.num_texts, n.num_images, n.image_len}, text.options().dtype(at::kInt));
  at::Tensor text_max = at::empty({n.num_texts, n.num_images, n.text_len}, acc_options);
  at::Tensor image_max = at::empty({n.num_texts, n.num_images, n.image_len}, acc_options);
  if (score.numel() == 0) return {score, text_argmax, image_argmax, text_max, image_max};

  const at::Tensor text_valid = text_mask.contiguous(), image_valid = image_mask.contiguous();
  const at::Tensor text_nonempty = any_valid(text_valid), image_nonempty = any_valid(image_valid);
  const TokenInfo tokens{text_valid.data_ptr<bool>(), image_valid.data_ptr<bool>(),
                         text_nonempty.data_ptr<bool>(), image_nonempty.data_ptr<bool>()};
  AT_DISPATCH_FLOATING_TYPES(acc_type, "maxsim_forward_cpu", [&] {
    const at::Tensor alpha = token_coefficients<scalar_t>(text_weight, text_valid, mode);
    const at::Tensor beta = token_coefficients<scalar_t>(image_weight, image_valid, mode);
    const ForwardOutputs<scalar_t> out{score.data_ptr<scalar_t>(), text_argmax.data_ptr<int32_t>(),
                                       image_argmax.data_ptr<int32_t>(), text_max.data_ptr<scalar_t>(),
                                       image_max.data_ptr<scalar_t>()};
    maxsim_forward_kernel<scalar_t>(text.to(acc_type).contiguous(), image.to(acc_type).contiguous(), n, tokens,
                                    alpha.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(), out);
  });
  return {score, text_argmax, image_argmax, text_max, image_max};
}

Tensor4 maxsim_backward_cpu(const at::Tensor& grad_score, const at::Tensor& text, const at::Tensor& image,
                            const at::Tensor& text_mask, const at::Tensor& image_mask,
                            const at::Tensor& text_weight, const at::Tensor& image_weight,
                            c10::string_view reduction, const at::Tensor& text_argmax,
                            const at::Tensor& image_argmax, const at::Tensor& text_max,
                            const at::Tensor& image_max) {
  constexpr const char* op = "maxsim_backward";
  const MaxSimSizes n = check_maxsim_inputs(op, text, image, text_mask, image_mask, text_weight, image_weight);
  const Reduction mode = parse_reduction(reduction, op);
  const at::ScalarType acc_type = accumulation_type(text.scalar_type());
  const int64_t Bt = n.num_texts, Bi = n.num_images, T = n.text_len, V = n.image_len;
  TORCH_CHECK(is_float_type(grad_score.scalar_type()), op, ": grad_score must be floating, got ",
              grad_score.scalar_type());
  check_shape(op, "grad_score", grad_score, {Bt, Bi}, "[Bt, Bi]");
  check_shape(op, "text_argmax", text_argmax, {Bt, Bi, T}, "[Bt, Bi, T]");
  check_shape(op, "image_argmax", image_argmax, {Bt, Bi, V}, "[Bt, Bi, V]");
  check_shape(op, "text_max", text_max, {Bt, Bi, T}, "[Bt, Bi, T]");
  check_shape(op, "image_max", image_max, {Bt, Bi, V}, "[Bt, Bi, V]");
  TORCH_CHECK(text_argmax.scalar_type() == at::kInt && image_argmax.scalar_type() == at::kInt, op,
              ": text_argmax and image_argmax must be int32 (as returned by maxsim_forward), got ",
              text_argmax.scalar_type(), " and ", image_argmax.scalar_type());
  TORCH_CHECK(text_max.scalar_type() == acc_type && image_max.scalar_type() == acc_type, op,
              ": text_max and image_max must be ", acc_type, " (as returned by maxsim_forward), got ",
              text_max.scalar_type(), " and ", image_max.scalar_type());
  for (const auto& [name, x] : {std::pair<const char*, const at::Tensor&>{"grad_score", grad_score},
                                {"text_argmax", text_argmax}, {"image_argmax", image_argmax},
                                {"text_max", text_max}, {"image_max", image_max}}) {
    check_cpu(op, name, x);
  }

  const at::TensorOptions acc_options = text.options().dtype(acc_type);
  at::Tensor grad_text = at::zeros(text.sizes(), acc_options);
  at::Tensor grad_image = at::zeros(image.sizes(), acc_options);
  at::Tensor grad_text_weight = at::zeros(text_weight.sizes(), acc_options);
  at::Tensor grad_image_weight = at::zeros(image_weight.sizes(), acc_options);
  if (grad_score.numel() > 0) {
    const at::Tensor text_valid = text_mask.contiguous(), image_valid = image_mask.contiguous();
    const at::Tensor text_nonempty = any_valid(text_valid), image_nonempty = any_valid(image_valid);
    const TokenInfo tokens{text_valid.data_ptr<bool>(), image_valid.data_ptr<bool>(),
                           text_nonempty.data_ptr<bool>(), image_nonempty.data_ptr<bool>()};
    const at::Tensor text_argmax_c = text_argmax.contiguous(), image_argmax_c = image_argmax.contiguous();
    const at::Tensor text_max_c = text_max.contiguous(), image_max_c = image_max.contiguous();
    const at::Tensor grad_score_c = grad_score.to(acc_type).contiguous();
    const at::Tensor x = text.to(acc_type).contiguous(), y = image.to(acc_type).contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc_type, "maxsim_backward_cpu", [&] {
      const at::Tensor alpha = token_coefficients<scalar_t>(text_weight, text_valid, mode);
      const at::Tensor beta = token_coefficients<scalar_t>(image_weight, image_valid, mode);
      const BackwardArgs<scalar_t> args{n,
                                        tokens,
                                        mode == Reduction::kWti,
                                        grad_score_c.data_ptr<scalar_t>(),
                                        x.data_ptr<scalar_t>(),
                                        y.data_ptr<scalar_t>(),
                                        alpha.data_ptr<scalar_t>(),
                                        beta.data_ptr<scalar_t>(),
                                        text_argmax_c.data_ptr<int32_t>(),
                                        image_argmax_c.data_ptr<int32_t>(),
                                        text_max_c.data_ptr<scalar_t>(),
                                        image_max_c.data_ptr<scalar_t>(),
                                        grad_text.data_ptr<scalar_t>(),
                                        grad_image.data_ptr<scalar_t>(),
                                        grad_text_weight.data_ptr<scalar_t>(),
                                        grad_image_weight.data_ptr<scalar_t>()};
      // Two passes, each output row owned by one thread: no atomics, a fixed summation order.
      at::parallel_for(0, Bt, 1, [&](int64_t begin, int64_t end) {
        for (int64_t a = begin; a < end; ++a) text_grads(args, a);
      });
      at::parallel_for(0, Bi, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) image_grads(args, b);
      });
    });
  }
  return {grad_text.to(text.scalar_type()), grad_image.to(image.scalar_type()),
          grad_text_weight.to(text_weight.scalar_type()), grad_image_weight.to(image_weight.scalar_type())};
}

}  // namespace cbd_fast
