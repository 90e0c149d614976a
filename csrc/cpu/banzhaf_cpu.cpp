// Fused Monte Carlo Banzhaf estimates (DESIGN §3-§4) and their gradient, C++ CPU.
//
// One work item = one pair and a fixed slice of its draws; each draw costs O(T·V) (top-two maxima per row, column
// sums over the row members) instead of the O((T·V)²) of evaluating four values per token pair. Work items write
// partial sums that are reduced in a fixed order, so results do not depend on the thread count.
//
// Precision. Each half of the game is a weighted mean over row members A of the row maxima over column members C
// (DESIGN §3; rows are text tokens in the text half, image tokens in the image half). For row r and column c of a
// draw, with A' = A ∖ r, the paired second difference is computed as
//     sd(r, c) = w_r / W(A'∪r) · ( δ_r(c) − Σ_{t∈A'} w_t δ_t(c) / W(A') ),
//     δ_t(c) = max over C∪c of row t − max over C∖c of row t   (≥ 0; the second max is 0 when C∖c = ∅),
// a weighted difference of maxima rather than a difference of four O(1) game values, so float32 keeps its relative
// precision. The leave-one-out sums over A' are exact: every member but the heaviest one (r*) weighs at most half of
// W(A), so removing its share from a sum loses at most a bit, and the sums without r* are accumulated on their own.
// float32 therefore matches the float64 reference to ~1e-7 (relative to the largest estimate) over the whole weight
// span (tests: spans 0, 12, 20, 27); per-row quantities (weights, normalisers, row effects) are float64.
//
// SIMD. The per-draw loops use 32-byte GCC vectors (8 floats or 4 doubles) and are compiled twice, for AVX2 (without
// FMA, so no multiply-add is fused) and for the baseline instruction set; both run the same IEEE operations in the
// same order and agree bit for bit. float64 sims are computed in float64, all others in float32; per-draw terms are
// summed in that type over kFlushDraws draws, then added to float64 partial sums.
//
// Branches. Whether a token is in a draw's coalition is a coin flip, which no branch predictor guesses: a branch on
// membership mispredicts about every other time. So per-token terms are selected by multiplying with 0 or 1 (exact
// for the finite values involved) and member lists are compacted without a branch per token (as_one, members_of);
// at the default training size (B = 32, T = 22, V = 17, K = 64) that made the forward 1.8× faster with the same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../banzhaf_common.h"
#include "../ops.h"
#include "../philox.h"
#include "cpu_isa.h"
#include "interrupt.h"

namespace cbd_fast {
namespace {

using cpu_isa::Isa;

constexpr int64_t kMaxExactPlayers = 20;
constexpr int64_t kMaxTokens = 4096;  // per-draw scratch is O(T + V); this bounds the partial-sum buffers
constexpr int64_t kTargetWorkItems = 64;
constexpr int kVectorBytes = 32;    // one AVX2 register; two SSE2 registers in the portable version
constexpr int64_t kFlushDraws = 16;  // draws summed in the compute type before they join the float64 sums

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

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// ---------------------------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------------------------

// Inputs of all pairs, converted once: sim in the compute type, exp-weights in float64 (0 on invalid tokens).
struct Game {
  int64_t batch, text_len, image_len;
  at::Tensor sim;  // [B, T, V]: float64 for float64 sims, float32 otherwise
  at::Tensor text_w, image_w, text_valid, image_valid;
  std::vector<int64_t> num_draws;  // per pair: K, or 2^n for the exact enumeration
  Estimator estimator;
  uint64_t seed;
};

at::Tensor exp_weights(const at::Tensor& logits, const at::Tensor& valid, const char* name) {
  // exp(logit - max over valid): the game only sees weight ratios, so the shift is free and avoids overflow.
  auto as_double = logits.to(at::kDouble);
  TORCH_CHECK(at::isfinite(as_double).logical_or(valid.logical_not()).all().item<bool>(),
              "banzhaf_interaction: ", name, " must be finite on valid tokens");
  auto masked = as_double.masked_fill(valid.logical_not(), -std::numeric_limits<double>::infinity());
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
  TORCH_CHECK(batch >= 1 && text_len >= 1 && image_len >= 1, "banzhaf_interaction: sim must have B, T, V >= 1, got ",
              "shape ", sim.sizes());
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
  game.sim = sim.to(sim.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
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

// 1.0 or 0.0: a coin-flip membership selects a term by an exact multiplication, which no branch predictor has to
// guess (x·1 = x, x·0 = 0 for the finite x it is applied to).
C10_ALWAYS_INLINE double as_one(bool member) { return static_cast<double>(member); }

// The indices i < n with in[i] set, in increasing order, written without a branch per index (see as_one).
C10_ALWAYS_INLINE void members_of(const uint8_t* in, int64_t n, std::vector<int64_t>& out) {
  out.resize(n);
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    out[count] = i;
    count += in[i] != 0;
  }
  out.resize(count);
}

// ---------------------------------------------------------------------------------------------------------------
// Vectors
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
struct Simd {
  using Vec = typename cpu_isa::Vec<T, kVectorBytes>::type;
  using IndexT = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;  // lanes as wide as T's: masks fit
  using Index = typename cpu_isa::Vec<IndexT, kVectorBytes>::type;
  static constexpr int64_t kLanes = cpu_isa::Vec<T, kVectorBytes>::kLanes;

  static C10_ALWAYS_INLINE Vec load(const T* p) {
    Vec v;
    std::memcpy(&v, p, sizeof(Vec));
    return v;
  }
  static C10_ALWAYS_INLINE void store(T* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }
  static C10_ALWAYS_INLINE Vec splat(T x) { return Vec{} + x; }
  static C10_ALWAYS_INLINE Index splat_index(int64_t i) { return Index{} + static_cast<IndexT>(i); }
  static C10_ALWAYS_INLINE Index lanes() {
    Index index{};
    for (int64_t lane = 0; lane < kLanes; ++lane) index[lane] = static_cast<IndexT>(lane);
    return index;
  }
  // Lanes summed in index order (the same order in every version).
  static C10_ALWAYS_INLINE T sum(Vec v) {
    T total = v[0];
    for (int64_t lane = 1; lane < kLanes; ++lane) total += v[lane];
    return total;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// One pair, laid out for the vector loops
// ---------------------------------------------------------------------------------------------------------------

// sim and its transpose with rows padded to whole vectors (zeros past the end), and the weights in both types.
template <typename T>
struct PairLayout {
  int64_t text_len, image_len, text_stride, image_stride;
  std::vector<T> sim, sim_t;          // [T][image_stride], [V][text_stride]
  std::vector<T> text_w, image_w;     // [text_stride], [image_stride]
  const double *text_wd, *image_wd;   // [T], [V]
  const bool *text_valid, *image_valid;

  PairLayout(const Game& g, int64_t b)
      : text_len(g.text_len), image_len(g.image_len), text_stride(round_up(g.text_len, Simd<T>::kLanes)),
        image_stride(round_up(g.image_len, Simd<T>::kLanes)), sim(text_len * image_stride, T(0)),
        sim_t(image_len * text_stride, T(0)), text_w(text_stride, T(0)), image_w(image_stride, T(0)),
        text_wd(g.text_w.data_ptr<double>() + b * g.text_len), image_wd(g.image_w.data_ptr<double>() + b * g.image_len),
        text_valid(g.text_valid.data_ptr<bool>() + b * g.text_len),
        image_valid(g.image_valid.data_ptr<bool>() + b * g.image_len) {
    lay_out(g.sim.data_ptr<T>() + b * text_len * image_len, sim.data(), sim_t.data());
    for (int64_t t = 0; t < text_len; ++t) text_w[t] = static_cast<T>(text_wd[t]);
    for (int64_t u = 0; u < image_len; ++u) image_w[u] = static_cast<T>(image_wd[u]);
  }

  // A [T, V] matrix into its padded layout and its padded transpose.
  void lay_out(const T* matrix, T* rows, T* columns) const {
    for (int64_t t = 0; t < text_len; ++t) {
      for (int64_t u = 0; u < image_len; ++u) {
        rows[t * image_stride + u] = matrix[t * image_len + u];
        columns[u * text_stride + t] = matrix[t * image_len + u];
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// One half of the game for one draw
// ---------------------------------------------------------------------------------------------------------------

// Rows are the players whose weighted mean is taken (text tokens in the text half), columns the players maxed over.
// With A = row members and C = column members the half value is
//   f(A, C) = Σ_{r∈A} w_r max_{c∈C} S[r,c] / Σ_{r∈A} w_r      (0 when A or C is empty);
// the image half is the same computation on Sᵀ with the roles swapped.
template <typename T>
struct HalfGame {
  using V = Simd<T>;
  using Vec = typename V::Vec;
  using Index = typename V::Index;
  using IndexT = typename V::IndexT;
  static constexpr int64_t kLanes = V::kLanes;

  int64_t rows, cols, row_stride, col_stride;  // row_stride: of sim rows (cols padded); col_stride: of sim_t rows
  const T* sim;     // [rows][row_stride]
  const T* sim_t;   // [cols][col_stride]
  const T* w;       // [col_stride]: row weights, 0 on invalid rows and padding
  const double* wd; // [rows]
  const bool* row_valid;
  const bool* col_valid;
  const uint8_t* row_in;
  const uint8_t* col_in;

  // Per draw (prepare()).
  std::vector<int64_t> member_rows, member_cols;
  std::vector<T> top1, top2;          // [col_stride]: max over C of each row, and max over C without its arg-max
  std::vector<IndexT> first, second;  // [col_stride]: their columns (lowest index on ties)
  std::vector<T> alpha, h;            // [rows]: sd = alpha·δ − h·D_sel
  std::vector<double> g_d, h_d, w_out, w_with;  // [rows]: g, h, W(A'), W(A'∪r)
  std::vector<T> d_excl, d_full;      // [row_stride]: Σ w_t δ_t(c) over A ∖ r*, and over A
  std::vector<T> w_loo;               // [col_stride]: w with 0 at r* during prepare(), else w
  int64_t heaviest = -1;              // r*: the member of largest weight
  double total_w = 0, total_w_excl = 0, top_sum = 0, top_sum_excl = 0;

  HalfGame(int64_t rows_, int64_t cols_, int64_t row_stride_, int64_t col_stride_, const T* sim_, const T* sim_t_,
           const T* w_, const double* wd_, const bool* row_valid_, const bool* col_valid_, const uint8_t* row_in_,
           const uint8_t* col_in_)
      : rows(rows_), cols(cols_), row_stride(row_stride_), col_stride(col_stride_), sim(sim_), sim_t(sim_t_), w(w_),
        wd(wd_), row_valid(row_valid_), col_valid(col_valid_), row_in(row_in_), col_in(col_in_), top1(col_stride),
        top2(col_stride), first(col_stride), second(col_stride), alpha(rows), h(rows), g_d(rows), h_d(rows),
        w_out(rows), w_with(rows), d_excl(row_stride), d_full(row_stride), w_loo(w_, w_ + col_stride) {}

  bool no_columns() const { return member_cols.empty(); }

  // δ_r on the columns [c, c + kLanes): max over C∪c − max over C∖c of row r, 0 for C∖c = ∅ (C = ∅: S[r,c]).
  C10_ALWAYS_INLINE Vec delta(int64_t r, int64_t c, Index column) const {
    const Vec s = V::load(sim + r * row_stride + c);
    if (no_columns()) return s;
    const Vec over = s - top1[r];
    const Vec gain = over > T(0) ? over : Vec{};
    return column == first[r] ? V::splat(top1[r] - top2[r]) : gain;
  }

  // Σ_{A∖r} w_t max_C S[t,·] and W(A∖r) are top_sum_without(r) and w_out[r].
  double top_sum_without(int64_t r) const {
    if (r == heaviest) return top_sum_excl;
    return top_sum - wd[r] * static_cast<double>(top1[r]) * as_one(row_in[r]);
  }

  // Members, top-two maxima of every row over C (and the column of the second with kSecond), weights and
  // normalisers of every row, column sums of δ over the members.
  template <bool kSecond>
  C10_ALWAYS_INLINE void prepare() {
    members_of(row_in, rows, member_rows);
    members_of(col_in, cols, member_cols);
    if (!no_columns()) {
      // Columns in increasing order, rows in vector lanes: strict > keeps the lowest index of a tie.
      constexpr T kNegInf = -std::numeric_limits<T>::infinity();
      for (int64_t r0 = 0; r0 < col_stride; r0 += kLanes) {
        Vec m1 = V::splat(kNegInf), m2 = V::splat(kNegInf);
        Index i1 = V::splat_index(-1), i2 = V::splat_index(-1);
        for (const int64_t c : member_cols) {
          const Vec x = V::load(sim_t + c * col_stride + r0);
          const auto above1 = x > m1;
          const auto above2 = x > m2;
          const Index column = V::splat_index(c);
          if constexpr (kSecond) i2 = above1 ? i1 : (above2 ? column : i2);
          m2 = above1 ? m1 : (above2 ? x : m2);
          i1 = above1 ? column : i1;
          m1 = above1 ? x : m1;
        }
        V::store(top1.data() + r0, m1);
        V::store(top2.data() + r0, m2);
        std::memcpy(first.data() + r0, &i1, sizeof(Index));
        if constexpr (kSecond) std::memcpy(second.data() + r0, &i2, sizeof(Index));
      }
      // C = {c}: removing c leaves nothing, whose "max" enters f as 0 (f(A, ∅) = 0).
      if (member_cols.size() == 1) std::fill(top2.begin(), top2.end(), T(0));
    }
    heaviest = -1;
    double heaviest_w = -1.0;  // every member weighs > 0; strict > keeps the first of equal weights
    for (const int64_t r : member_rows) {
      const bool heavier = wd[r] > heaviest_w;
      heaviest = heavier ? r : heaviest;
      heaviest_w = heavier ? wd[r] : heaviest_w;
    }
    total_w_excl = top_sum_excl = 0;
    for (const int64_t r : member_rows) {  // r* adds an exact 0
      const double other = as_one(r != heaviest);
      total_w_excl += wd[r] * other;
      if (!no_columns()) top_sum_excl += wd[r] * static_cast<double>(top1[r]) * other;
    }
    total_w = heaviest < 0 ? 0.0 : total_w_excl + wd[heaviest];
    top_sum = heaviest < 0 || no_columns() ? 0.0 : top_sum_excl + wd[heaviest] * static_cast<double>(top1[heaviest]);
    const int64_t num_members = static_cast<int64_t>(member_rows.size());
    for (int64_t r = 0; r < rows; ++r) {
      if (!row_valid[r]) {
        alpha[r] = h[r] = T(0);
        g_d[r] = h_d[r] = 0;
        continue;
      }
      const bool member = row_in[r];
      w_out[r] = r == heaviest ? total_w_excl : total_w - wd[r] * as_one(member);  // W(A')
      w_with[r] = w_out[r] + wd[r];                                                     // W(A'∪r)
      g_d[r] = wd[r] / w_with[r];
      h_d[r] = num_members - member > 0 ? g_d[r] / w_out[r] : 0.0;  // A' = ∅: f(A', ·) = 0
      // sd = g δ − h (D_sel − [r ≠ r*] w_r δ) with D_sel the column sum over A (A ∖ r* for r*): alpha = g + h w_r.
      alpha[r] = static_cast<T>(g_d[r] + h_d[r] * wd[r] * as_one(member & (r != heaviest)));
      h[r] = static_cast<T>(h_d[r]);
    }
    if (member_rows.empty()) {
      std::fill(d_excl.begin(), d_excl.end(), T(0));
      std::fill(d_full.begin(), d_full.end(), T(0));
      return;
    }
    // Column sums, members in increasing order; the heaviest member is added last, to a sum of its own.
    w_loo[heaviest] = T(0);
    const Index lane = V::lanes();
    for (int64_t c = 0; c < row_stride; c += kLanes) {
      const Index column = lane + static_cast<IndexT>(c);
      Vec excl{};
      for (const int64_t t : member_rows) excl += w_loo[t] * delta(t, c, column);  // r*'s term: an exact 0
      V::store(d_excl.data() + c, excl);
      V::store(d_full.data() + c, excl + w[heaviest] * delta(heaviest, c, column));
    }
    w_loo[heaviest] = w[heaviest];
  }

  // Adds this draw's second differences (block[r * block_stride + c]), row effects f(A'∪r, C) − f(A', C) and
  // column effects f(A, C∪c) − f(A, C∖c).
  C10_ALWAYS_INLINE void accumulate(T* block, int64_t block_stride, double* row_effect, double* col_effect) const {
    const Index lane = V::lanes();
    for (int64_t r = 0; r < rows; ++r) {
      if (!row_valid[r]) continue;
      const T a = alpha[r], hr = h[r];
      const T* d_sel = r == heaviest ? d_excl.data() : d_full.data();
      T* out = block + r * block_stride;
      for (int64_t c = 0; c < row_stride; c += kLanes) {
        const Vec sd = a * delta(r, c, lane + static_cast<IndexT>(c)) - hr * V::load(d_sel + c);
        V::store(out + c, V::load(out + c) + sd);
      }
      if (!no_columns()) {
        row_effect[r] += g_d[r] * static_cast<double>(top1[r]) - h_d[r] * top_sum_without(r);
      }
    }
    if (member_rows.empty()) return;
    for (int64_t c = 0; c < cols; ++c) {
      if (col_valid[c]) col_effect[c] += static_cast<double>(d_full[c]) / total_w;
    }
  }

  // Scratch of backward(), one per half.
  struct BackwardScratch {
    std::vector<T> h_excl, h_star, q, q_star;  // [row_stride]
    std::vector<double> gd, lg, lh, dw_out;    // [rows]
    BackwardScratch(int64_t rows_, int64_t row_stride_)
        : h_excl(row_stride_), h_star(row_stride_), q(row_stride_), q_star(row_stride_), gd(rows_), lg(rows_),
          lh(rows_), dw_out(rows_) {}
  };

  // Gradient of L = Σ coef_sd[r,c]·sd(r,c) + Σ coef_row[r]·row_effect(r) + Σ coef_col[c]·col_effect(c) for this
  // draw (after prepare<true>()): adds dL/dS into block[r * block_stride + c] and dL/dw into grad_w[r].
  //
  // With sd = g_r δ_r − h_r D'_r (D'_r = Σ_{A∖r} w_t δ_t, g = w_r/W(A'∪r), h = g/W(A')), row_effect(r) =
  // g_r max_C S[r,·] − h_r Σ_{A∖r} w_t max_C S[t,·] and col_effect(c) = Σ_A w_t δ_t(c) / W(A):
  //   dL/dδ_t(c) = coef_sd[t,c] g_t + [t∈A] w_t (coef_col[c]/W − Σ_{r≠t} coef_sd[r,c] h_r)
  // which reaches S through δ's arg-maxima (and likewise for the row maxima), and dL/dw_t collects the weight's
  // own terms (through g_t, h_t), its share of the sums over A, and W(A) in every other row's normalisers. Sums
  // "over every row but t" are formed without t's term wherever t = r* could dominate them, as in the forward.
  C10_ALWAYS_INLINE void backward(const T* coef_sd, const double* coef_row, const double* coef_col, T* block,
                                  int64_t block_stride, double* grad_w, BackwardScratch& s) const {
    const Index lane = V::lanes();
    const bool any_cols = !no_columns(), any_rows = !member_rows.empty();
    // Pass 1: per row, Σ_c coef·δ and Σ_c coef·D_sel; per column, Σ_r coef·h (without r*, and r*'s term).
    std::fill(s.h_excl.begin(), s.h_excl.end(), T(0));
    std::fill(s.h_star.begin(), s.h_star.end(), T(0));
    double r_sum = 0, r_sum_excl = 0;  // Σ_r coef_row[r] h_r, and without r*
    for (int64_t r = 0; r < rows; ++r) {
      s.gd[r] = s.lg[r] = s.lh[r] = 0;
      if (!row_valid[r]) continue;
      const T* d_sel = r == heaviest ? d_excl.data() : d_full.data();
      T* h_sum = r == heaviest ? s.h_star.data() : s.h_excl.data();
      const T hr = h[r];
      Vec coef_delta{}, coef_d{};
      for (int64_t c = 0; c < row_stride; c += kLanes) {
        const Vec coef = V::load(coef_sd + r * row_stride + c);
        coef_delta += coef * delta(r, c, lane + static_cast<IndexT>(c));
        coef_d += coef * V::load(d_sel + c);
        V::store(h_sum + c, V::load(h_sum + c) + coef * hr);
      }
      const double gd = static_cast<double>(V::sum(coef_delta)), gdd = static_cast<double>(V::sum(coef_d));
      const double w_sel = wd[r] * as_one(row_in[r] & (r != heaviest));
      s.lg[r] = gd + (any_cols ? coef_row[r] * static_cast<double>(top1[r]) : 0.0);  // dL/dg_r
      s.lh[r] = -(gdd - w_sel * gd) - (any_cols ? coef_row[r] * top_sum_without(r) : 0.0);  // dL/dh_r
      r_sum += coef_row[r] * h_d[r];
      if (r != heaviest) r_sum_excl += coef_row[r] * h_d[r];
      s.gd[r] = gd;
    }
    // dL/dW(A'_r) of every row, and what flows into W(A) (every row's W(A'_r) and the column effects).
    double dw_total = 0, dw_excl = 0, col_part = 0;
    for (int64_t r = 0; r < rows; ++r) {
      s.dw_out[r] = 0;
      if (!row_valid[r]) continue;
      double d = -s.lg[r] * g_d[r] / w_with[r];
      if (h_d[r] != 0) d -= s.lh[r] * h_d[r] * (1.0 / w_with[r] + 1.0 / w_out[r]);
      s.dw_out[r] = d;
      dw_total += d;
      if (r != heaviest) dw_excl += d;
    }
    const T col_scale = static_cast<T>(any_rows ? 1.0 / total_w : 0.0);
    if (any_rows) {
      for (int64_t c = 0; c < cols; ++c) {
        if (col_valid[c]) col_part += coef_col[c] * static_cast<double>(d_full[c]) / (total_w * total_w);
      }
    }
    dw_total -= col_part;
    dw_excl -= col_part;
    // q = coef_col/W − Σ_r coef_sd h_r (all rows), q* = the same without r*.
    for (int64_t c = 0; c < row_stride; c += kLanes) {
      Vec col{};
      for (int64_t lane_c = 0; lane_c < kLanes; ++lane_c) {
        const int64_t cc = c + lane_c;
        col[lane_c] = cc < cols && col_valid[cc] ? static_cast<T>(coef_col[cc]) * col_scale : T(0);
      }
      const Vec excl = V::load(s.h_excl.data() + c);
      V::store(s.q_star.data() + c, col - excl);
      V::store(s.q.data() + c, col - (excl + V::load(s.h_star.data() + c)));
    }
    // Pass 2: dL/dδ_t(c) routed to the similarities; the weight gradients.
    for (int64_t t = 0; t < rows; ++t) {
      if (!row_valid[t]) continue;
      const bool member = row_in[t];
      const T beta = static_cast<T>(g_d[t] + wd[t] * h_d[t] * as_one(member & (t != heaviest)));
      const T w_q = member ? w[t] : T(0);
      const T* q = t == heaviest ? s.q_star.data() : s.q.data();
      const T* coef_row_t = coef_sd + t * row_stride;
      T* out = block + t * block_stride;
      const T best = any_cols ? top1[t] : T(0);
      const IndexT best_column = any_cols ? first[t] : IndexT(-1);
      Vec lost{}, delta_q{};
      for (int64_t c = 0; c < row_stride; c += kLanes) {
        const Index column = lane + static_cast<IndexT>(c);
        const Vec d_delta = V::load(coef_row_t + c) * beta + w_q * V::load(q + c);
        Vec routed = d_delta;
        if (any_cols) {  // δ = S − max_C (or 0) away from the arg-max: S[t,c] gains, the arg-max loses
          const Vec x = V::load(sim + t * row_stride + c);
          const auto wins = (x > best) | ((x == best) & (column < best_column));
          routed = wins ? d_delta : Vec{};
          lost += routed;
        }
        V::store(out + c, V::load(out + c) + routed);
        delta_q += delta(t, c, column) * V::load(q + c);  // used by members only; computed for all (see as_one)
      }
      double top_grad = 0;  // dL/d max_C S[t,·] through the row effects
      // Σ_{r≠t} coef_row[r] h_r for a member, 0 otherwise
      const double r_without = (t == heaviest ? r_sum_excl : r_sum - coef_row[t] * h_d[t]) * as_one(member);
      if (any_cols) {
        top_grad = coef_row[t] * g_d[t] - wd[t] * r_without;
        // δ_t(first) = max_C − max_{C∖first}: +1 to the arg-max, −1 to the second (a constant 0 when C = {first})
        const T d_first = coef_row_t[best_column] * beta + w_q * q[best_column];
        out[best_column] += (d_first + static_cast<T>(top_grad)) - V::sum(lost);
        if (member_cols.size() >= 2) out[second[t]] -= d_first;
      }
      double dw = (s.lg[t] * w_out[t] + (h_d[t] != 0 ? s.lh[t] : 0.0)) / (w_with[t] * w_with[t]);
      double dw_member = dw + static_cast<double>(V::sum(delta_q));
      if (t != heaviest) dw_member += h_d[t] * s.gd[t];
      if (any_cols) dw_member -= static_cast<double>(top1[t]) * r_without;
      dw_member += t == heaviest ? dw_excl : dw_total - s.dw_out[t];
      const double dw_of[2] = {dw, dw_member};
      dw = dw_of[member];
      grad_w[t] += dw;
    }
  }

  // Half value f(A, C) of the draw (after prepare()).
  double value() const { return member_rows.empty() || no_columns() ? 0.0 : top_sum / total_w; }

  // Gradient of coef·f(A, C): into the arg-max of every member row, and the row weights.
  void value_backward(double coef, double* grad_sim, int64_t gs_rs, int64_t gs_cs, double* grad_w) const {
    if (coef == 0.0 || member_rows.empty() || no_columns()) return;
    const double f = top_sum / total_w;
    for (const int64_t r : member_rows) {
      grad_sim[r * gs_rs + first[r] * gs_cs] += coef * wd[r] / total_w;
      grad_w[r] += coef * (static_cast<double>(top1[r]) - f) / total_w;
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Work items
// ---------------------------------------------------------------------------------------------------------------

// Both halves of one pair's game, bound to the draw buffers.
template <typename T>
struct PairGame {
  PairLayout<T> layout;
  std::vector<uint8_t> text_in, image_in;
  HalfGame<T> text_half, image_half;
  CoalitionSampler sampler;

  PairGame(const Game& g, int64_t b)
      : layout(g, b), text_in(g.text_len), image_in(g.image_len),
        text_half(g.text_len, g.image_len, layout.image_stride, layout.text_stride, layout.sim.data(),
                  layout.sim_t.data(), layout.text_w.data(), layout.text_wd, layout.text_valid, layout.image_valid,
                  text_in.data(), image_in.data()),
        image_half(g.image_len, g.text_len, layout.text_stride, layout.image_stride, layout.sim_t.data(),
                   layout.sim.data(), layout.image_w.data(), layout.image_wd, layout.image_valid, layout.text_valid,
                   image_in.data(), text_in.data()),
        sampler(g, b) {}

  template <bool kSecond>
  C10_ALWAYS_INLINE void draw(int64_t k) {
    sampler.draw(k, text_in.data(), image_in.data());
    text_half.template prepare<kSecond>();
    image_half.template prepare<kSecond>();
  }
};

// Per-draw terms of one half, summed over up to kFlushDraws draws in the compute type: a [rows][stride] block
// (the image half's rows are image tokens, so its block is transposed).
template <typename T>
struct DrawBlocks {
  int64_t text_len, image_len, text_stride, image_stride;
  std::vector<T> text, image;  // [T][image_stride], [V][text_stride]

  explicit DrawBlocks(const PairLayout<T>& layout)
      : text_len(layout.text_len), image_len(layout.image_len), text_stride(layout.text_stride),
        image_stride(layout.image_stride), text(text_len * image_stride, T(0)), image(image_len * text_stride, T(0)) {}

  // out[t*V + u] += both blocks' (t, u) entries, in float64; then the blocks restart from 0.
  void flush(double* out) {
    for (int64_t t = 0; t < text_len; ++t) {
      for (int64_t u = 0; u < image_len; ++u) {
        out[t * image_len + u] += static_cast<double>(text[t * image_stride + u]);
        out[t * image_len + u] += static_cast<double>(image[u * text_stride + t]);
      }
    }
    std::fill(text.begin(), text.end(), T(0));
    std::fill(image.begin(), image.end(), T(0));
  }
};

// The msr backward's per-draw weights of every stratum (dL/d(stratum mean) / count), [B, ...] float64.
struct MsrWeights {
  at::Tensor w11, w10, w01, w00;  // [B, T, V]
  at::Tensor wt1, wt0, wv1, wv0;  // [B, T], [B, V]
};

enum class Pass { kPairedForward, kPairedBackward, kMsrSums, kMsrBackward };

// One work item: pair `pair`, draws [first_draw, end_draw), partial sums into acc.
struct ItemArgs {
  Pass pass;
  const Game* game;
  int64_t pair, first_draw, end_draw;
  double* acc;
  Interrupt* interrupt;
  const double* coef_sd;     // paired backward: [B, T, V], dL/d(interaction) · ½ / K
  const double* coef_text;   // [B, T]
  const double* coef_image;  // [B, V]
  const MsrWeights* msr;     // msr backward
};

// acc = [interaction T·V | text value T | image value V]
template <typename T>
C10_ALWAYS_INLINE void paired_forward_item(const ItemArgs& a) {
  const Game& g = *a.game;
  const int64_t TV = g.text_len * g.image_len;
  PairGame<T> pg(g, a.pair);
  DrawBlocks<T> blocks(pg.layout);
  double *text_value = a.acc + TV, *image_value = a.acc + TV + g.text_len;
  for (int64_t k = a.first_draw; k < a.end_draw; ++k) {
    pg.template draw<false>(k);
    pg.text_half.accumulate(blocks.text.data(), blocks.image_stride, text_value, image_value);
    pg.image_half.accumulate(blocks.image.data(), blocks.text_stride, image_value, text_value);
    if ((k + 1 - a.first_draw) % kFlushDraws == 0) {
      blocks.flush(a.acc);
      if (a.interrupt->requested()) return;
    }
  }
  blocks.flush(a.acc);
}

// acc = [grad sim T·V | dL/dw text T | dL/dw image V]
template <typename T>
C10_ALWAYS_INLINE void paired_backward_item(const ItemArgs& a) {
  const Game& g = *a.game;
  const int64_t b = a.pair, TV = g.text_len * g.image_len;
  PairGame<T> pg(g, b);
  DrawBlocks<T> blocks(pg.layout);
  std::vector<T> coef_matrix(TV), coef(g.text_len * pg.layout.image_stride, T(0)),
      coef_t(g.image_len * pg.layout.text_stride, T(0));
  for (int64_t i = 0; i < TV; ++i) coef_matrix[i] = static_cast<T>(a.coef_sd[b * TV + i]);
  pg.layout.lay_out(coef_matrix.data(), coef.data(), coef_t.data());
  const double* coef_text = a.coef_text + b * g.text_len;
  const double* coef_image = a.coef_image + b * g.image_len;
  typename HalfGame<T>::BackwardScratch text_scratch(g.text_len, pg.layout.image_stride),
      image_scratch(g.image_len, pg.layout.text_stride);
  for (int64_t k = a.first_draw; k < a.end_draw; ++k) {
    pg.template draw<true>(k);
    // text half: rows = text; its row effects feed text values, its column effects image values.
    pg.text_half.backward(coef.data(), coef_text, coef_image, blocks.text.data(), blocks.image_stride, a.acc + TV,
                          text_scratch);
    pg.image_half.backward(coef_t.data(), coef_image, coef_text, blocks.image.data(), blocks.text_stride,
                           a.acc + TV + g.text_len, image_scratch);
    if ((k + 1 - a.first_draw) % kFlushDraws == 0) {
      blocks.flush(a.acc);
      if (a.interrupt->requested()) return;
    }
  }
  blocks.flush(a.acc);
}

// msr: sums of v_k over draws with i ∈ A and j ∈ C (T·V), i ∈ A (T), j ∈ C (V), all (1); and their counts.
// acc = [sums | counts], each T·V + T + V + 1.
template <typename T>
C10_ALWAYS_INLINE void msr_sums_item(const ItemArgs& a) {
  const Game& g = *a.game;
  const int64_t T_ = g.text_len, V_ = g.image_len, TV = T_ * V_, stride = TV + T_ + V_ + 1;
  PairGame<T> pg(g, a.pair);
  double *s = a.acc, *n = a.acc + stride;
  std::vector<double> image_in(V_);
  for (int64_t k = a.first_draw; k < a.end_draw; ++k) {
    pg.template draw<false>(k);
    const double v = 0.5 * (pg.text_half.value() + pg.image_half.value());
    for (int64_t j = 0; j < V_; ++j) image_in[j] = pg.image_in[j] ? 1.0 : 0.0;
    for (const int64_t i : pg.text_half.member_rows) {
      double *s_row = s + i * V_, *n_row = n + i * V_;
      for (int64_t j = 0; j < V_; ++j) {
        s_row[j] += v * image_in[j];
        n_row[j] += image_in[j];
      }
      s[TV + i] += v, n[TV + i] += 1;
    }
    for (const int64_t j : pg.image_half.member_rows) s[TV + T_ + j] += v, n[TV + T_ + j] += 1;
    s[TV + T_ + V_] += v, n[TV + T_ + V_] += 1;
    if ((k + 1 - a.first_draw) % kFlushDraws == 0 && a.interrupt->requested()) return;
  }
}

// acc = [grad sim T·V | dL/dw text T | dL/dw image V]: dL/dv_k = Σ_{i,j} (±1/N of the stratum (i, j) falls in at
// draw k) · dL/dI[i,j] plus the value terms, pushed through v_k = ½ (f_text + f_image).
template <typename T>
C10_ALWAYS_INLINE void msr_backward_item(const ItemArgs& a) {
  using V = Simd<double>;
  const Game& g = *a.game;
  const int64_t b = a.pair, T_ = g.text_len, V_ = g.image_len, TV = T_ * V_;
  const MsrWeights& m = *a.msr;
  PairGame<T> pg(g, b);
  const double *p11 = m.w11.data_ptr<double>() + b * TV, *p10 = m.w10.data_ptr<double>() + b * TV;
  const double *p01 = m.w01.data_ptr<double>() + b * TV, *p00 = m.w00.data_ptr<double>() + b * TV;
  const double *pt1 = m.wt1.data_ptr<double>() + b * T_, *pt0 = m.wt0.data_ptr<double>() + b * T_;
  const double *pv1 = m.wv1.data_ptr<double>() + b * V_, *pv0 = m.wv0.data_ptr<double>() + b * V_;
  std::vector<int64_t> image_in(V_);  // -1 for members: a lane mask
  for (int64_t k = a.first_draw; k < a.end_draw; ++k) {
    pg.template draw<false>(k);
    for (int64_t j = 0; j < V_; ++j) image_in[j] = pg.image_in[j] ? -1 : 0;
    V::Vec lanes{};
    double tail = 0;
    for (int64_t i = 0; i < T_; ++i) {
      const bool in_a = pg.text_in[i];
      const double* row_in_c = (in_a ? p11 : p01) + i * V_;
      const double* row_out_c = (in_a ? p10 : p00) + i * V_;
      int64_t j = 0;
      for (; j + V::kLanes <= V_; j += V::kLanes) {
        V::Index mask;
        std::memcpy(&mask, image_in.data() + j, sizeof(mask));
        lanes += mask != 0 ? V::load(row_in_c + j) : V::load(row_out_c + j);
      }
      for (; j < V_; ++j) tail += image_in[j] ? row_in_c[j] : row_out_c[j];
      tail += in_a ? pt1[i] : pt0[i];
    }
    for (int64_t j = 0; j < V_; ++j) tail += image_in[j] ? pv1[j] : pv0[j];
    const double coef = 0.5 * (V::sum(lanes) + tail);
    pg.text_half.value_backward(coef, a.acc, V_, 1, a.acc + TV);
    pg.image_half.value_backward(coef, a.acc, 1, V_, a.acc + TV + T_);
    if ((k + 1 - a.first_draw) % kFlushDraws == 0 && a.interrupt->requested()) return;
  }
}

// Every pass in two versions: AVX2 without FMA, so that both run the same operations (see the top of the file).
// One function per pass, so that profiles (callgrind) tell them apart.
#define CBD_FAST_ITEM_VERSIONS(pass)                                                                             \
  CBD_FAST_TARGET("avx2") void pass##_item_avx2_f32(const ItemArgs& a) { pass##_item<float>(a); }                \
  CBD_FAST_TARGET("avx2") void pass##_item_avx2_f64(const ItemArgs& a) { pass##_item<double>(a); }               \
  void pass##_item_portable_f32(const ItemArgs& a) { pass##_item<float>(a); }                                    \
  void pass##_item_portable_f64(const ItemArgs& a) { pass##_item<double>(a); }

CBD_FAST_ITEM_VERSIONS(paired_forward)
CBD_FAST_ITEM_VERSIONS(paired_backward)
CBD_FAST_ITEM_VERSIONS(msr_sums)
CBD_FAST_ITEM_VERSIONS(msr_backward)
#undef CBD_FAST_ITEM_VERSIONS

using ItemFn = void (*)(const ItemArgs&);

ItemFn item_function(const Game& game, Pass pass) {
  // [pass][avx2][float64]
  static constexpr ItemFn kFunctions[4][2][2] = {
      {{&paired_forward_item_portable_f32, &paired_forward_item_portable_f64},
       {&paired_forward_item_avx2_f32, &paired_forward_item_avx2_f64}},
      {{&paired_backward_item_portable_f32, &paired_backward_item_portable_f64},
       {&paired_backward_item_avx2_f32, &paired_backward_item_avx2_f64}},
      {{&msr_sums_item_portable_f32, &msr_sums_item_portable_f64},
       {&msr_sums_item_avx2_f32, &msr_sums_item_avx2_f64}},
      {{&msr_backward_item_portable_f32, &msr_backward_item_portable_f64},
       {&msr_backward_item_avx2_f32, &msr_backward_item_avx2_f64}}};
  const bool avx2 = cpu_isa::active(Isa::kAvx2) == Isa::kAvx2;
  return kFunctions[static_cast<int>(pass)][avx2][game.sim.scalar_type() == at::kDouble];
}

// Runs every (pair, slice of draws) work item of `pass` in parallel, each with its own zeroed row of `width`
// float64 partial sums; returns the rows summed over the slices of each pair in slice order: [B, width]. The only
// reduction across threads, so results do not depend on the thread count. Ctrl-C stops it between draws.
at::Tensor reduce_over_slices(const Game& game, int64_t width, ItemArgs args) {
  const Slicing slicing = make_slicing(game);
  auto partial = at::zeros({game.batch, slicing.slices_per_pair, width}, at::kDouble);
  double* partial_ptr = partial.data_ptr<double>();
  const ItemFn run = item_function(game, args.pass);
  Interrupt interrupt;
  args.game = &game;
  args.interrupt = &interrupt;
  at::parallel_for(0, game.batch * slicing.slices_per_pair, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end && !interrupt.requested(); ++item) {
      ItemArgs a = args;
      a.pair = item / slicing.slices_per_pair;
      const int64_t slice = item % slicing.slices_per_pair;
      a.first_draw = std::min(slice * slicing.draws_per_slice, game.num_draws[a.pair]);
      a.end_draw = std::min(a.first_draw + slicing.draws_per_slice, game.num_draws[a.pair]);
      a.acc = partial_ptr + item * width;
      run(a);
    }
  });
  interrupt.rethrow_if_requested();
  return partial.sum(1);
}

ItemArgs pass_args(Pass pass) {
  ItemArgs args{};
  args.pass = pass;
  return args;
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
  auto total = reduce_over_slices(game, TV + T + V, pass_args(Pass::kPairedForward));
  total.mul_(half_over_draws(game));
  return {total.narrow(1, 0, TV).reshape({B, T, V}), total.narrow(1, TV, T), total.narrow(1, TV + T, V)};
}

Tensor3 paired_backward(const Game& game, const at::Tensor& grad_interaction, const at::Tensor& grad_text_value,
                        const at::Tensor& grad_image_value) {
  const int64_t B = game.batch, T = game.text_len, V = game.image_len, TV = T * V;
  // Coefficients of each draw's terms: dL/d(estimate) · ½ / K.
  const auto scale = half_over_draws(game);
  const auto coef_sd = (grad_interaction.to(at::kDouble) * scale.view({B, 1, 1})).contiguous();
  const auto coef_text = (grad_text_value.to(at::kDouble) * scale).contiguous();
  const auto coef_image = (grad_image_value.to(at::kDouble) * scale).contiguous();
  ItemArgs args = pass_args(Pass::kPairedBackward);
  args.coef_sd = coef_sd.data_ptr<double>();
  args.coef_text = coef_text.data_ptr<double>();
  args.coef_image = coef_image.data_ptr<double>();
  auto total = reduce_over_slices(game, TV + T + V, args);
  // dL/d(logit) = w · dL/dw.
  return {total.narrow(1, 0, TV).reshape({B, T, V}), total.narrow(1, TV, T) * game.text_w,
          total.narrow(1, TV + T, V) * game.image_w};
}

// ---------------------------------------------------------------------------------------------------------------
// msr: one value per draw; strata sums over (i in A?) x (j in C?).

struct MsrSums {
  at::Tensor sums, counts;  // [B, T·V + T + V + 1] each
};

MsrSums msr_sums(const Game& game) {
  const int64_t stride = game.text_len * game.image_len + game.text_len + game.image_len + 1;
  auto total = reduce_over_slices(game, 2 * stride, pass_args(Pass::kMsrSums));
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
  auto gi = grad_interaction.to(at::kDouble);
  auto gt = grad_text_value.to(at::kDouble), gv = grad_image_value.to(at::kDouble);
  const MsrWeights weights{(gi * inverse_count(st.n11)).contiguous(), (-gi * inverse_count(st.n10)).contiguous(),
                           (-gi * inverse_count(st.n01)).contiguous(), (gi * inverse_count(st.n00)).contiguous(),
                           (gt * inverse_count(st.nt1)).contiguous(), (-gt * inverse_count(st.nt0)).contiguous(),
                           (gv * inverse_count(st.nv1)).contiguous(), (-gv * inverse_count(st.nv0)).contiguous()};
  ItemArgs args = pass_args(Pass::kMsrBackward);
  args.msr = &weights;
  auto total = reduce_over_slices(game, TV + T + V, args);
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
  banzhaf_common::check_output_gradients("banzhaf_interaction_backward", grad_interaction, grad_text_value,
                                         grad_image_value, sim, text_mask, image_mask);
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
