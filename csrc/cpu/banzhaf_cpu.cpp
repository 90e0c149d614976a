// Fused Monte Carlo Banzhaf estimates (DESIGN §3-§4) and their gradient, C++ CPU.
//
// One work item = one pair and a fixed slice of its draws; each draw costs O(T·V) (top-two maxima per row,
// partial sums per column) instead of the O((T·V)²) of evaluating four values per token pair. Work items write
// partial sums that are reduced in a fixed order, so results do not depend on the thread count. Everything is
// computed in double: the "leave one token out" sums subtract a token's share from a total, which is exact
// enough in double but not in float for skewed token weights.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../banzhaf_common.h"
#include "../ops.h"
#include "../philox.h"

namespace cbd_fast {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr int64_t kMaxExactPlayers = 20;
constexpr int64_t kMaxTokens = 4096;  // per-draw scratch is O(T + V); this bounds the partial-sum buffers
constexpr int64_t kTargetWorkItems = 64;

using banzhaf_common::inverse_count;
using banzhaf_common::kMaxWeightSpan;
using banzhaf_common::masked_result;
using banzhaf_common::msr_estimates;
using banzhaf_common::msr_strata;
using banzhaf_common::MsrStrata;
using banzhaf_common::result_dtype;

enum class Estimator { kPaired, kMsr, kExact };

Estimator parse_estimator(c10::string_view name) {
  if (name == "paired") return Estimator::kPaired;
  if (name == "msr") return Estimator::kMsr;
  if (name == "exact") return Estimator::kExact;
  TORCH_CHECK(false, "banzhaf_interaction: estimator must be 'paired', 'msr' or 'exact', got '", std::string(name),
              "'");
}

// Inputs of all pairs, converted once: sim and its transpose in double, exp-weights (0 on invalid tokens).
struct Game {
  int64_t batch, text_len, image_len;
  at::Tensor sim, sim_t, text_w, image_w, text_valid, image_valid;
  std::vector<int64_t> num_draws;  // per pair: K, or 2^n for the exact enumeration
  Estimator estimator;
  uint64_t seed;
};

at::Tensor exp_weights(const at::Tensor& logits, const at::Tensor& valid, const char* name) {
  // exp(logit - max over valid): the game only sees weight ratios, so the shift is free and avoids overflow.
  auto as_double = logits.to(at::kDouble);
  TORCH_CHECK(at::isfinite(as_double).logical_or(valid.logical_not()).all().item<bool>(),
              "banzhaf_interaction: ", name, " must be finite on valid tokens");
  auto masked = as_double.masked_fill(valid.logical_not(), kNegInf);
  auto shift = std::get<0>(masked.max(1, /*keepdim=*/true)).clamp_min(-1e300);
  auto low = std::get<0>(as_double.masked_fill(valid.logical_not(), 1e300).min(1, /*keepdim=*/true));
  const double span = at::where(valid.any(1, /*keepdim=*/true), shift - low, at::zeros({}, shift.options()))
                          .max().item<double>();
  TORCH_CHECK(span <= kMaxWeightSpan, "banzhaf_interaction: the valid ", name, " logits of a pair span ", span,
              " > ", kMaxWeightSpan, "; beyond that the leave-one-out sums lose precision (bound the logits, e.g. ",
              "with a scaled tanh)");
  return (masked - shift).exp().masked_fill(valid.logical_not(), 0.0).contiguous();
}

void check_inputs(const at::Tensor& sim, const at::Tensor& text_mask, const at::Tensor& image_mask,
                  const at::Tensor& text_weight, const at::Tensor& image_weight) {
  TORCH_CHECK(sim.dim() == 3, "banzhaf_interaction: sim must be [B,T,V], got ", sim.sizes());
  TORCH_CHECK(at::isFloatingType(sim.scalar_type()), "banzhaf_interaction: sim must be floating, got ",
              sim.scalar_type());
  const int64_t batch = sim.size(0), text_len = sim.size(1), image_len = sim.size(2);
  TORCH_CHECK(text_mask.scalar_type() == at::kBool && text_mask.sizes() == at::IntArrayRef({batch, text_len}),
              "banzhaf_interaction: text_mask must be bool [B,T] = [", batch, ",", text_len, "]");
  TORCH_CHECK(image_mask.scalar_type() == at::kBool && image_mask.sizes() == at::IntArrayRef({batch, image_len}),
              "banzhaf_interaction: image_mask must be bool [B,V] = [", batch, ",", image_len, "]");
  TORCH_CHECK(at::isFloatingType(text_weight.scalar_type()) &&
                  text_weight.sizes() == at::IntArrayRef({batch, text_len}),
              "banzhaf_interaction: text_weight must be floating [B,T]");
  TORCH_CHECK(at::isFloatingType(image_weight.scalar_type()) &&
                  image_weight.sizes() == at::IntArrayRef({batch, image_len}),
              "banzhaf_interaction: image_weight must be floating [B,V]");
  TORCH_CHECK(text_len <= kMaxTokens && image_len <= kMaxTokens, "banzhaf_interaction: the CPU kernel supports ",
              "T, V <= ", kMaxTokens, " tokens, got T=", text_len, ", V=", image_len);
  TORCH_CHECK(batch < (int64_t(1) << 32), "banzhaf_interaction: batch must be < 2^32");
}

Game make_game(const at::Tensor& sim, const at::Tensor& text_mask, const at::Tensor& image_mask,
               const at::Tensor& text_weight, const at::Tensor& image_weight, int64_t num_samples, int64_t seed,
               c10::string_view estimator) {
  check_inputs(sim, text_mask, image_mask, text_weight, image_weight);
  Game game;
  game.batch = sim.size(0);
  game.text_len = sim.size(1);
  game.image_len = sim.size(2);
  game.estimator = parse_estimator(estimator);
  game.seed = static_cast<uint64_t>(seed);
  game.sim = sim.to(at::kDouble).contiguous();
  game.sim_t = game.sim.transpose(1, 2).contiguous();
  game.text_valid = text_mask.contiguous();
  game.image_valid = image_mask.contiguous();
  TORCH_CHECK(at::isfinite(game.sim).all().item<bool>(), "banzhaf_interaction: sim must be finite");
  game.text_w = exp_weights(text_weight, game.text_valid, "text_weight");
  game.image_w = exp_weights(image_weight, game.image_valid, "image_weight");
  game.num_draws.assign(game.batch, num_samples);
  if (game.estimator == Estimator::kExact) {
    auto players = (game.text_valid.sum(1) + game.image_valid.sum(1)).to(at::kLong).contiguous();
    const int64_t* n = players.data_ptr<int64_t>();
    for (int64_t b = 0; b < game.batch; ++b) {
      TORCH_CHECK(n[b] <= kMaxExactPlayers, "banzhaf_interaction: estimator='exact' enumerates 2^n coalitions and ",
                  "supports n <= ", kMaxExactPlayers, " players per pair; pair ", b, " has n=", n[b]);
      game.num_draws[b] = int64_t(1) << n[b];
    }
  } else {
    TORCH_CHECK(num_samples > 0, "banzhaf_interaction: num_samples must be positive, got ", num_samples);
    TORCH_CHECK(num_samples < (int64_t(1) << 32), "banzhaf_interaction: num_samples must be < 2^32");
  }
  return game;
}

// Fixed decomposition of each pair's draws into slices; depends on the problem only, never on the thread count.
struct Slicing {
  int64_t slices_per_pair, draws_per_slice;
};

Slicing make_slicing(const Game& game) {
  const int64_t max_draws = *std::max_element(game.num_draws.begin(), game.num_draws.end());
  const int64_t slices = std::clamp<int64_t>((kTargetWorkItems + game.batch - 1) / game.batch, 1, max_draws);
  return {slices, (max_draws + slices - 1) / slices};
}

// Membership of draw k of pair b: Philox bits (paired, msr) or bits of k by player rank (exact); always & valid.
struct CoalitionSampler {
  const Game& game;
  int64_t pair;
  const bool* text_valid;
  const bool* image_valid;
  std::vector<uint32_t> words;

  CoalitionSampler(const Game& g, int64_t b)
      : game(g), pair(b), text_valid(g.text_valid.data_ptr<bool>() + b * g.text_len),
        image_valid(g.image_valid.data_ptr<bool>() + b * g.image_len),
        words((std::max(g.text_len, g.image_len) + 127) / 128 * 4) {}

  void draw(int64_t k, uint8_t* text_in, uint8_t* image_in) {
    if (game.estimator == Estimator::kExact) {
      int64_t rank = 0;
      for (int64_t t = 0; t < game.text_len; ++t) text_in[t] = text_valid[t] ? ((k >> rank++) & 1) : 0;
      for (int64_t u = 0; u < game.image_len; ++u) image_in[u] = image_valid[u] ? ((k >> rank++) & 1) : 0;
      return;
    }
    coalition_words(game.seed, k, pair, kTextSide, game.text_len, words.data());
    for (int64_t t = 0; t < game.text_len; ++t) text_in[t] = text_valid[t] && coalition_bit(words.data(), t);
    coalition_words(game.seed, k, pair, kImageSide, game.image_len, words.data());
    for (int64_t u = 0; u < game.image_len; ++u) image_in[u] = image_valid[u] && coalition_bit(words.data(), u);
  }
};

// One half of the game for one draw: rows are the players whose weighted mean is taken (text tokens for the text
// half), columns the players maxed over. With A = row members, C = column members, the half value is
//   f(A, C) = Σ_{r∈A} w_r max_{c∈C} S[r,c] / Σ_{r∈A} w_r        (0 when A or C is empty).
// The image half is the same computation on Sᵀ with the roles swapped.
struct HalfGame {
  int64_t rows, cols;
  const double* sim;  // [rows, cols]
  const double* w;    // [rows]
  const bool* row_valid;
  const bool* col_valid;
  const uint8_t* row_in;
  const uint8_t* col_in;

  // Per-draw state.
  std::vector<double> top1, top2, sum_with, sum_without;
  std::vector<int64_t> top1_index, top2_index;
  double sum_full = 0, total_w = 0;
  int64_t row_count = 0, col_count = 0;

  HalfGame(int64_t r, int64_t c)
      : rows(r), cols(c), top1(r), top2(r), sum_with(c), sum_without(c), top1_index(r), top2_index(r) {}

  bool col_out_empty(int64_t c) const { return col_count - col_in[c] == 0; }  // C ∖ c = ∅
  bool row_out_empty(int64_t r) const { return row_count - row_in[r] == 0; }  // A ∖ r = ∅

  // max over C ∪ {c} of row r (ties to the lowest index) and the column it comes from.
  double max_with(int64_t r, int64_t c, int64_t* from) const {
    const double s = sim[r * cols + c];
    const bool c_wins = s > top1[r] || (s == top1[r] && c < top1_index[r]);
    *from = c_wins ? c : top1_index[r];
    return c_wins ? s : top1[r];
  }
  // max over C ∖ {c} of row r; only meaningful when C ∖ c is not empty.
  double max_without(int64_t r, int64_t c, int64_t* from) const {
    const bool drop_top = c == top1_index[r];
    *from = drop_top ? top2_index[r] : top1_index[r];
    return drop_top ? top2[r] : top1[r];
  }

  // Top-two maxima per row over C and the column partial sums over A: O(rows·cols).
  void prepare() {
    col_count = 0;
    for (int64_t c = 0; c < cols; ++c) col_count += col_in[c];
    row_count = 0;
    total_w = 0;
    sum_full = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const double* s = sim + r * cols;
      double m1 = kNegInf, m2 = kNegInf;
      int64_t i1 = -1, i2 = -1;
      for (int64_t c = 0; c < cols; ++c) {
        if (!col_in[c]) continue;
        // The first members fill the slots whatever their values, so an index is never left at -1.
        if (i1 < 0 || s[c] > m1) {
          m2 = m1, i2 = i1, m1 = s[c], i1 = c;
        } else if (i2 < 0 || s[c] > m2) {
          m2 = s[c], i2 = c;
        }
      }
      top1[r] = m1, top2[r] = m2, top1_index[r] = i1, top2_index[r] = i2;
      if (row_in[r]) {
        ++row_count;
        total_w += w[r];
        if (col_count > 0) sum_full += w[r] * m1;
      }
    }
    std::fill(sum_with.begin(), sum_with.end(), 0.0);
    std::fill(sum_without.begin(), sum_without.end(), 0.0);
    int64_t from;
    for (int64_t r = 0; r < rows; ++r) {
      if (!row_in[r]) continue;
      for (int64_t c = 0; c < cols; ++c) {
        sum_with[c] += w[r] * max_with(r, c, &from);
        if (!col_out_empty(c)) sum_without[c] += w[r] * max_without(r, c, &from);
      }
    }
  }

  // Adds this draw's second differences (out[r*out_rs + c*out_cs]), row effects f(A'∪r, C) − f(A', C) and column
  // effects f(A, C∪c) − f(A, C∖c), for valid rows and columns.
  void accumulate(double* out, int64_t out_rs, int64_t out_cs, double* row_effect, double* col_effect) const {
    for (int64_t r = 0; r < rows; ++r) {
      if (!row_valid[r]) continue;
      const double join_w = row_in[r] ? 0.0 : w[r], member_w = row_in[r] ? w[r] : 0.0;
      // Reciprocals once per row: the inner loop then multiplies instead of dividing.
      const double inv_with = 1.0 / (total_w + join_w);
      const bool a_out_empty = row_out_empty(r);
      const double inv_without = a_out_empty ? 0.0 : 1.0 / (total_w - member_w);
      int64_t from;
      for (int64_t c = 0; c < cols; ++c) {
        if (!col_valid[c]) continue;
        const double m_with = max_with(r, c, &from);
        double sd = (sum_with[c] + join_w * m_with) * inv_with - (sum_with[c] - member_w * m_with) * inv_without;
        if (!col_out_empty(c)) {
          const double m_without = max_without(r, c, &from);
          sd -= (sum_without[c] + join_w * m_without) * inv_with -
                (sum_without[c] - member_w * m_without) * inv_without;
        }
        out[r * out_rs + c * out_cs] += sd;
      }
      if (col_count > 0) {
        row_effect[r] += (sum_full + join_w * top1[r]) * inv_with - (sum_full - member_w * top1[r]) * inv_without;
      }
    }
    if (row_count == 0) return;
    for (int64_t c = 0; c < cols; ++c) {
      if (!col_valid[c]) continue;
      col_effect[c] += (sum_with[c] - (col_out_empty(c) ? 0.0 : sum_without[c])) / total_w;
    }
  }

  // Gradient of Σ_{r,c} coef_sd[r,c]·sd(r,c) + Σ_r coef_row[r]·row_effect(r) + Σ_c coef_col[c]·col_effect(c)
  // for this draw: adds dL/dS into grad_sim[r*gs_rs + c*gs_cs] and dL/dw into grad_w[r].
  // Pass 1 differentiates every term w.r.t. its own row's entries and collects the adjoints of the shared column
  // sums; pass 2 pushes those through the sums to every member row.
  void backward(const double* coef_sd, int64_t cf_rs, int64_t cf_cs, const double* coef_row, const double* coef_col,
                double* grad_sim, int64_t gs_rs, int64_t gs_cs, double* grad_w, std::vector<double>& g_with,
                std::vector<double>& g_without) const {
    std::fill(g_with.begin(), g_with.end(), 0.0);
    std::fill(g_without.begin(), g_without.end(), 0.0);
    double g_full = 0, g_total = 0;
    auto add_grad = [&](int64_t r, int64_t c, double g) { grad_sim[r * gs_rs + c * gs_cs] += g; };
    for (int64_t r = 0; r < rows; ++r) {
      if (!row_valid[r]) continue;
      const bool member = row_in[r];
      const double join_w = member ? 0.0 : w[r], member_w = member ? w[r] : 0.0;
      // 1/W(A'∪r) and 1/W(A') (0 when A' is empty: those terms vanish, so the products below need no branch).
      const double inv_with = 1.0 / (total_w + join_w);
      const double inv_without = row_out_empty(r) ? 0.0 : 1.0 / (total_w - member_w);
      double g_total_r = 0, g_own_w = 0;  // dL/dW_A and dL/dw_r through the row's own join_w / member_w
      for (int64_t c = 0; c < cols; ++c) {
        if (!col_valid[c]) continue;
        const double g = coef_sd[r * cf_rs + c * cf_cs];
        if (g == 0.0) continue;
        int64_t from_with, from_without;
        const double m_with = max_with(r, c, &from_with);
        // +g·f11 − g·f01 with f11 = (sum_with + join_w m_with)/W(A'∪r), f01 = (sum_with − member_w m_with)/W(A')
        const double f11 = (sum_with[c] + join_w * m_with) * inv_with;
        const double f01 = (sum_with[c] - member_w * m_with) * inv_without;
        g_with[c] += g * (inv_with - inv_without);
        g_total_r += g * (f01 * inv_without - f11 * inv_with);
        g_own_w += member ? g * (m_with - f01) * inv_without : g * (m_with - f11) * inv_with;
        add_grad(r, from_with, g * (join_w * inv_with + member_w * inv_without));
        if (!col_out_empty(c)) {
          // −g·f10 + g·f00, the same with max over C∖c and the column sums without c
          const double m_without = max_without(r, c, &from_without);
          const double f10 = (sum_without[c] + join_w * m_without) * inv_with;
          const double f00 = (sum_without[c] - member_w * m_without) * inv_without;
          g_without[c] -= g * (inv_with - inv_without);
          g_total_r -= g * (f00 * inv_without - f10 * inv_with);
          g_own_w -= member ? g * (m_without - f00) * inv_without : g * (m_without - f10) * inv_with;
          add_grad(r, from_without, -g * (join_w * inv_with + member_w * inv_without));
        }
      }
      const double gr = coef_row[r];
      if (gr != 0.0 && col_count > 0) {
        // row effect = (sum_full + join_w top1)/W(A'∪r) − (sum_full − member_w top1)/W(A')
        const double f1 = (sum_full + join_w * top1[r]) * inv_with;
        const double f0 = (sum_full - member_w * top1[r]) * inv_without;
        g_full += gr * (inv_with - inv_without);
        g_total_r += gr * (f0 * inv_without - f1 * inv_with);
        g_own_w += member ? gr * (top1[r] - f0) * inv_without : gr * (top1[r] - f1) * inv_with;
        add_grad(r, top1_index[r], gr * (join_w * inv_with + member_w * inv_without));
      }
      g_total += g_total_r;
      grad_w[r] += g_own_w;
    }
    if (row_count > 0) {  // column effect = (sum_with − [sum_without]) / total_w
      for (int64_t c = 0; c < cols; ++c) {
        const double gc = coef_col[c];
        if (!col_valid[c] || gc == 0.0) continue;
        const bool c_out_empty = col_out_empty(c);
        g_with[c] += gc / total_w;
        if (!c_out_empty) g_without[c] -= gc / total_w;
        g_total -= gc * (sum_with[c] - (c_out_empty ? 0.0 : sum_without[c])) / (total_w * total_w);
      }
    }
    // Pass 2: the column sums and W_A are sums over the member rows.
    for (int64_t r = 0; r < rows; ++r) {
      if (!row_in[r]) continue;
      double g_w = g_total;
      int64_t from;
      for (int64_t c = 0; c < cols; ++c) {
        const double m_with = max_with(r, c, &from);
        if (g_with[c] != 0.0) {
          g_w += g_with[c] * m_with;
          add_grad(r, from, g_with[c] * w[r]);
        }
        if (g_without[c] != 0.0 && !col_out_empty(c)) {
          const double m_without = max_without(r, c, &from);
          g_w += g_without[c] * m_without;
          add_grad(r, from, g_without[c] * w[r]);
        }
      }
      if (g_full != 0.0 && col_count > 0) {
        g_w += g_full * top1[r];
        add_grad(r, top1_index[r], g_full * w[r]);
      }
      grad_w[r] += g_w;
    }
  }

  // Half value f(A, C) of the draw (after prepare()).
  double value() const { return (row_count > 0 && col_count > 0) ? sum_full / total_w : 0.0; }

  // Gradient of coef·f(A, C).
  void value_backward(double coef, double* grad_sim, int64_t gs_rs, int64_t gs_cs, double* grad_w) const {
    if (coef == 0.0 || row_count == 0 || col_count == 0) return;
    const double f = sum_full / total_w;
    for (int64_t r = 0; r < rows; ++r) {
      if (!row_in[r]) continue;
      grad_sim[r * gs_rs + top1_index[r] * gs_cs] += coef * w[r] / total_w;
      grad_w[r] += coef * (top1[r] - f) / total_w;
    }
  }
};

// Both halves of the game of one pair, bound to the draw buffers.
struct PairGame {
  std::vector<uint8_t> text_in, image_in;
  HalfGame text_half, image_half;

  PairGame(const Game& g, int64_t b) : text_in(g.text_len), image_in(g.image_len),
        text_half(g.text_len, g.image_len), image_half(g.image_len, g.text_len) {
    const int64_t tv = g.text_len * g.image_len;
    text_half.sim = g.sim.data_ptr<double>() + b * tv;
    text_half.w = g.text_w.data_ptr<double>() + b * g.text_len;
    text_half.row_valid = g.text_valid.data_ptr<bool>() + b * g.text_len;
    text_half.col_valid = g.image_valid.data_ptr<bool>() + b * g.image_len;
    text_half.row_in = text_in.data();
    text_half.col_in = image_in.data();
    image_half.sim = g.sim_t.data_ptr<double>() + b * tv;
    image_half.w = g.image_w.data_ptr<double>() + b * g.image_len;
    image_half.row_valid = text_half.col_valid;
    image_half.col_valid = text_half.row_valid;
    image_half.row_in = image_in.data();
    image_half.col_in = text_in.data();
  }

  void prepare() {
    text_half.prepare();
    image_half.prepare();
  }
};

// Runs fn(pair_game, sampler, first_draw, end_draw, acc) on every (pair, draw slice) work item in parallel, each
// with its own zeroed row `acc` of `width` doubles; returns the rows summed over the slices of each pair in slice
// order: [B, width]. The only reduction across threads, so results do not depend on the thread count.
template <typename Fn>
at::Tensor reduce_over_slices(const Game& game, int64_t width, const Fn& fn) {
  const Slicing slicing = make_slicing(game);
  auto partial = at::zeros({game.batch, slicing.slices_per_pair, width}, at::kDouble);
  double* partial_ptr = partial.data_ptr<double>();
  at::parallel_for(0, game.batch * slicing.slices_per_pair, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / slicing.slices_per_pair, slice = item % slicing.slices_per_pair;
      const int64_t k0 = std::min(slice * slicing.draws_per_slice, game.num_draws[b]);
      const int64_t k1 = std::min(k0 + slicing.draws_per_slice, game.num_draws[b]);
      PairGame pg(game, b);
      CoalitionSampler sampler(game, b);
      fn(pg, sampler, k0, k1, partial_ptr + item * width);
    }
  });
  return partial.sum(1);
}

// ½ (v = ½(f + g)) times the 1/K of the Monte Carlo mean, per pair: [B, 1].
at::Tensor half_over_draws(const Game& game) {
  auto scale = at::empty({game.batch, 1}, at::kDouble);
  for (int64_t b = 0; b < game.batch; ++b) scale.data_ptr<double>()[b] = 0.5 / static_cast<double>(game.num_draws[b]);
  return scale;
}

// ---------------------------------------------------------------------------------------------------------------
// paired / exact

Tensor3 paired_forward(const Game& game) {
  const int64_t B = game.batch, T = game.text_len, V = game.image_len, TV = T * V;
  // one row per work item: [interaction | text value | image value]
  auto total = reduce_over_slices(game, TV + T + V, [&](PairGame& pg, CoalitionSampler& sampler, int64_t k0,
                                                          int64_t k1, double* acc) {
    double *text_acc = acc + TV, *image_acc = acc + TV + T;
    for (int64_t k = k0; k < k1; ++k) {
      sampler.draw(k, pg.text_in.data(), pg.image_in.data());
      pg.prepare();
      pg.text_half.accumulate(acc, V, 1, text_acc, image_acc);
      pg.image_half.accumulate(acc, 1, V, image_acc, text_acc);
    }
  });
  total.mul_(half_over_draws(game));
  return {total.narrow(1, 0, TV).reshape({B, T, V}), total.narrow(1, TV, T), total.narrow(1, TV + T, V)};
}

Tensor3 paired_backward(const Game& game, const at::Tensor& grad_interaction, const at::Tensor& grad_text_value,
                        const at::Tensor& grad_image_value) {
  const int64_t B = game.batch, T = game.text_len, V = game.image_len, TV = T * V;
  // Coefficients of each draw's terms: dL/d(estimate) · ½ / K.
  const auto scale = half_over_draws(game);
  auto coef_sd = (grad_interaction.to(at::kDouble) * scale.view({B, 1, 1})).contiguous();
  auto coef_text = (grad_text_value.to(at::kDouble) * scale).contiguous();
  auto coef_image = (grad_image_value.to(at::kDouble) * scale).contiguous();
  // one row per work item: [grad sim | dL/dw text | dL/dw image]
  auto total = reduce_over_slices(game, TV + T + V, [&](PairGame& pg, CoalitionSampler& sampler, int64_t k0,
                                                          int64_t k1, double* acc) {
    const int64_t b = sampler.pair;
    std::vector<double> g_with(std::max(T, V)), g_without(std::max(T, V));
    const double* cs = coef_sd.data_ptr<double>() + b * TV;
    const double* ct = coef_text.data_ptr<double>() + b * T;
    const double* ci = coef_image.data_ptr<double>() + b * V;
    for (int64_t k = k0; k < k1; ++k) {
      sampler.draw(k, pg.text_in.data(), pg.image_in.data());
      pg.prepare();
      // text half: rows = text; its row effects feed text values, its column effects image values.
      pg.text_half.backward(cs, V, 1, ct, ci, acc, V, 1, acc + TV, g_with, g_without);
      pg.image_half.backward(cs, 1, V, ci, ct, acc, 1, V, acc + TV + T, g_with, g_without);
    }
  });
  // dL/d(logit) = w · dL/dw.
  return {total.narrow(1, 0, TV).reshape({B, T, V}), total.narrow(1, TV, T) * game.text_w,
          total.narrow(1, TV + T, V) * game.image_w};
}

// ---------------------------------------------------------------------------------------------------------------
// msr: one value per draw; strata sums over (i in A?) x (j in C?).

// Sums of v_k over draws with i ∈ A and j ∈ C (tv), i ∈ A (t), j ∈ C (v), all (1); and their counts.
struct MsrSums {
  at::Tensor sums, counts;  // [B, T·V + T + V + 1] each
};

MsrSums msr_sums(const Game& game) {
  const int64_t T = game.text_len, V = game.image_len, TV = T * V;
  const int64_t stride = TV + T + V + 1;
  // one row per work item: [sums | counts]
  auto total = reduce_over_slices(game, 2 * stride, [&](PairGame& pg, CoalitionSampler& sampler, int64_t k0,
                                                          int64_t k1, double* acc) {
    double *s = acc, *n = acc + stride;
    for (int64_t k = k0; k < k1; ++k) {
      sampler.draw(k, pg.text_in.data(), pg.image_in.data());
      pg.prepare();
      const double v = 0.5 * (pg.text_half.value() + pg.image_half.value());
      for (int64_t i = 0; i < T; ++i) {
        if (!pg.text_in[i]) continue;
        for (int64_t j = 0; j < V; ++j) {
          if (pg.image_in[j]) s[i * V + j] += v, n[i * V + j] += 1;
        }
        s[TV + i] += v, n[TV + i] += 1;
      }
      for (int64_t j = 0; j < V; ++j) {
        if (pg.image_in[j]) s[TV + T + j] += v, n[TV + T + j] += 1;
      }
      s[TV + T + V] += v, n[TV + T + V] += 1;
    }
  });
  return {total.narrow(1, 0, stride).contiguous(), total.narrow(1, stride, stride).contiguous()};
}

Tensor3 msr_forward(const Game& game) {
  const MsrSums m = msr_sums(game);
  return msr_estimates(msr_strata(m.sums, m.counts, game.batch, game.text_len, game.image_len));
}

Tensor3 msr_backward(const Game& game, const at::Tensor& grad_interaction, const at::Tensor& grad_text_value,
                     const at::Tensor& grad_image_value) {
  const int64_t B = game.batch, T = game.text_len, V = game.image_len, TV = T * V;
  const MsrSums m = msr_sums(game);
  const MsrStrata st = msr_strata(m.sums, m.counts, B, T, V);
  // dL/dv_k = Σ_{i,j} g[i,j]·(±1/N_stratum) for the stratum (i,j) falls in at draw k, plus the value terms.
  auto gi = grad_interaction.to(at::kDouble);
  auto w11 = (gi * inverse_count(st.n11)).contiguous(), w10 = (-gi * inverse_count(st.n10)).contiguous();
  auto w01 = (-gi * inverse_count(st.n01)).contiguous(), w00 = (gi * inverse_count(st.n00)).contiguous();
  auto gt = grad_text_value.to(at::kDouble), gv = grad_image_value.to(at::kDouble);
  auto wt1 = (gt * inverse_count(st.nt1)).contiguous(), wt0 = (-gt * inverse_count(st.nt0)).contiguous();
  auto wv1 = (gv * inverse_count(st.nv1)).contiguous(), wv0 = (-gv * inverse_count(st.nv0)).contiguous();
  auto total = reduce_over_slices(game, TV + T + V, [&](PairGame& pg, CoalitionSampler& sampler, int64_t k0,
                                                          int64_t k1, double* acc) {
    const int64_t b = sampler.pair;
    const double *p11 = w11.data_ptr<double>() + b * TV, *p10 = w10.data_ptr<double>() + b * TV;
    const double *p01 = w01.data_ptr<double>() + b * TV, *p00 = w00.data_ptr<double>() + b * TV;
    const double *pt1 = wt1.data_ptr<double>() + b * T, *pt0 = wt0.data_ptr<double>() + b * T;
    const double *pv1 = wv1.data_ptr<double>() + b * V, *pv0 = wv0.data_ptr<double>() + b * V;
    for (int64_t k = k0; k < k1; ++k) {
      sampler.draw(k, pg.text_in.data(), pg.image_in.data());
      pg.prepare();
      double coef = 0;
      for (int64_t i = 0; i < T; ++i) {
        const bool in_a = pg.text_in[i];
        const double* row_in_c = (in_a ? p11 : p01) + i * V;
        const double* row_out_c = (in_a ? p10 : p00) + i * V;
        for (int64_t j = 0; j < V; ++j) coef += pg.image_in[j] ? row_in_c[j] : row_out_c[j];
        coef += in_a ? pt1[i] : pt0[i];
      }
      for (int64_t j = 0; j < V; ++j) coef += pg.image_in[j] ? pv1[j] : pv0[j];
      pg.text_half.value_backward(0.5 * coef, acc, V, 1, acc + TV);
      pg.image_half.value_backward(0.5 * coef, acc, 1, V, acc + TV + T);
    }
  });
  return {total.narrow(1, 0, TV).reshape({B, T, V}), total.narrow(1, TV, T) * game.text_w,
          total.narrow(1, TV + T, V) * game.image_w};
}

}  // namespace

Tensor3 banzhaf_interaction_cpu(const at::Tensor& sim, const at::Tensor& text_mask, const at::Tensor& image_mask,
                                const at::Tensor& text_weight, const at::Tensor& image_weight, int64_t num_samples,
                                int64_t seed, c10::string_view estimator) {
  const Game game = make_game(sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator);
  auto [interaction, text_value, image_value] =
      game.estimator == Estimator::kMsr ? msr_forward(game) : paired_forward(game);
  const auto dtype = result_dtype(sim.scalar_type());
  auto pair_mask = game.text_valid.unsqueeze(2).logical_and(game.image_valid.unsqueeze(1));
  return {masked_result(interaction, pair_mask, dtype), masked_result(text_value, game.text_valid, dtype),
          masked_result(image_value, game.image_valid, dtype)};
}

Tensor3 banzhaf_interaction_backward_cpu(const at::Tensor& grad_interaction, const at::Tensor& grad_text_value,
                                         const at::Tensor& grad_image_value, const at::Tensor& sim,
                                         const at::Tensor& text_mask, const at::Tensor& image_mask,
                                         const at::Tensor& text_weight, const at::Tensor& image_weight,
                                         int64_t num_samples, int64_t seed, c10::string_view estimator) {
  const Game game = make_game(sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator);
  TORCH_CHECK(grad_interaction.sizes() == sim.sizes(), "banzhaf_interaction_backward: grad_interaction must be ",
              sim.sizes());
  TORCH_CHECK(grad_text_value.sizes() == text_mask.sizes() && grad_image_value.sizes() == image_mask.sizes(),
              "banzhaf_interaction_backward: value gradients must be [B,T] and [B,V]");
  // Gradients of masked-out outputs do not flow.
  auto pair_mask = game.text_valid.unsqueeze(2).logical_and(game.image_valid.unsqueeze(1));
  auto zero = at::zeros({}, grad_interaction.options().dtype(at::kDouble));
  auto gi = at::where(pair_mask, grad_interaction.to(at::kDouble), zero);
  auto gt = at::where(game.text_valid, grad_text_value.to(at::kDouble), zero);
  auto gv = at::where(game.image_valid, grad_image_value.to(at::kDouble), zero);
  auto [grad_sim, grad_tw, grad_iw] =
      game.estimator == Estimator::kMsr ? msr_backward(game, gi, gt, gv) : paired_backward(game, gi, gt, gv);
  return {grad_sim.to(sim.scalar_type()), grad_tw.to(text_weight.scalar_type()),
          grad_iw.to(image_weight.scalar_type())};
}

}  // namespace cbd_fast
