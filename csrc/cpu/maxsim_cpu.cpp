// All-pairs fine-grained score (MaxSim / WTI, DESIGN §5) on the CPU: the ops maxsim_score and
// maxsim_score_backward, with the contract of the CUDA kernels (token coefficients α [Bt,T] and β [Bi,V] come in
// precomputed; the backward returns gradients for the features and the coefficients).
//
// Similarities are computed tile by tile — a block of texts against a block of images — by a packed multiply-add
// micro-kernel (the register-blocked inner kernel of a GEMM: a few text tokens against a panel of image tokens,
// accumulators in registers) into a tile buffer that stays in cache, and each tile is folded at once into the row
// and column maxima of its pairs. The Bt×Bi×T×V tensor never exists, and the forward keeps nothing for a backward.
// The backward recomputes the maxima and arg-maxima tile by tile (O(Bt·Bi·(T+V)) for the duration of the call);
// then every gradient row is summed, in a fixed order, by the one thread that owns it.
//
// Why not ATen's GEMM on the tiles: on the AMD EPYC (Zen 5) core this was tuned on, MKL's sgemm runs at about
// 63 GFLOP/s (its AVX2 path), which the torch backend's large GEMMs already reach; this micro-kernel runs at
// 150-215 GFLOP/s with AVX-512 and 85-100 GFLOP/s with AVX2 and FMA. It also makes every similarity one sum over D
// in index order with a single accumulator, whatever tile it lands in, so the results do not depend on the thread
// count or on the batch composition (a BLAS picks its kernels, and with them the summation order, by matrix shape).
// The AVX-512 and AVX2 versions fuse the multiply-adds and agree bit for bit; the portable version does not fuse.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../maxsim_common.h"
#include "../ops.h"
#include "cpu_isa.h"
#include "interrupt.h"

namespace cbd_fast {
namespace {

using cpu_isa::Isa;
using maxsim_common::ScoreSizes;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------------------------
// Inputs, outputs and the tile plan
// ---------------------------------------------------------------------------------------------------------------

// Inputs of both directions, converted once: features in the accumulation type, masks, coefficients.
template <typename T>
struct Problem {
  ScoreSizes n;
  const T* text;               // [Bt, T, D]
  const T* image;              // [Bi, V, D]
  const bool* text_valid;      // [Bt, T]
  const bool* image_valid;     // [Bi, V]
  const bool* text_nonempty;   // [Bt]
  const bool* image_nonempty;  // [Bi]
  const T* alpha;              // [Bt, T]
  const T* beta;               // [Bi, V]
  // False where a valid token has a non-finite feature: every pair of that text or image scores NaN (as the
  // similarities with NaN or ±inf in them would make it), whatever its maxima.
  const bool* text_finite;     // [Bt]
  const bool* image_finite;    // [Bi]
};

// What the backward's first pass writes per pair (a·Bi + b): the arg-max and value of every text token's row maximum
// and every image token's column maximum; arg-max -1 for invalid tokens and for pairs with an empty side.
template <typename T>
struct PairMaxima {
  int32_t* text_arg;   // [Bt·Bi, T]
  T* text_max;         // [Bt·Bi, T]
  int32_t* image_arg;  // [Bt·Bi, V]
  T* image_max;        // [Bt·Bi, V]
};

// A tile is a block of whole texts × a block of whole images; a work item is a run of text blocks × a run of image
// blocks. Per item the text blocks are packed once, and each image block once for all of them, so packing costs
// O(1/rows + 1/columns) of the multiply-adds. The plan changes no result (every similarity is computed alike
// wherever it lands, and each pair is folded within one tile), so it may depend on the thread count.
constexpr int64_t kImagePackBytes = int64_t(512) << 10;  // one packed image block: stays in L2 while it is used
constexpr int64_t kTextPackBytes = int64_t(1) << 20;     // the packed text blocks of an item
constexpr int64_t kTileElements = int64_t(1) << 16;      // similarities of a tile (256 KiB in fp32)
constexpr int64_t kItemsPerThread = 4;                   // load balance

struct TilePlan {
  int64_t texts_per_block, images_per_block, text_blocks, image_blocks;
  int64_t text_blocks_per_item, image_blocks_per_item, text_items, image_items;
  int64_t tile_rows, tile_cols;  // capacity: a text block's rows and an image block's columns, padded
  int64_t items() const { return text_items * image_items; }
};

// The number of tokens per block, 1 <= k <= max_items, whose padding to a multiple of `multiple` wastes least
// (ties: the larger block).
int64_t least_padding(int64_t tokens, int64_t max_items, int64_t multiple) {
  int64_t best = 1;
  double best_waste = 2;
  for (int64_t k = 1; k <= max_items; ++k) {
    const int64_t used = k * tokens;
    const double waste = double(ceil_div(used, multiple) * multiple - used) / double(used);
    if (waste <= best_waste) best = k, best_waste = waste;
  }
  return best;
}

TilePlan make_plan(const ScoreSizes& n, int64_t block_rows, int64_t panel_cols, int64_t element_bytes) {
  const int64_t row_bytes = n.dim * element_bytes;
  TilePlan plan;
  const int64_t max_cols = std::max<int64_t>(kImagePackBytes / row_bytes, n.image_len);
  plan.images_per_block = std::min(least_padding(n.image_len, std::max<int64_t>(max_cols / n.image_len, 1),
                                                 panel_cols), n.num_images);
  plan.tile_cols = ceil_div(plan.images_per_block * n.image_len, panel_cols) * panel_cols;
  const int64_t max_rows = std::max<int64_t>(kTileElements / plan.tile_cols, n.text_len);
  plan.texts_per_block = std::min(least_padding(n.text_len, std::max<int64_t>(max_rows / n.text_len, 1),
                                                block_rows), n.num_texts);
  plan.tile_rows = ceil_div(plan.texts_per_block * n.text_len, block_rows) * block_rows;
  plan.text_blocks = ceil_div(n.num_texts, plan.texts_per_block);
  plan.image_blocks = ceil_div(n.num_images, plan.images_per_block);
  plan.text_blocks_per_item =
      std::clamp<int64_t>(kTextPackBytes / (plan.tile_rows * row_bytes), 1, plan.text_blocks);
  plan.text_items = ceil_div(plan.text_blocks, plan.text_blocks_per_item);
  const int64_t wanted = kItemsPerThread * at::get_num_threads();
  if (plan.text_items < wanted) {  // few texts: split their blocks finer, then the images
    plan.text_blocks_per_item = std::max<int64_t>(1, plan.text_blocks / wanted);
    plan.text_items = ceil_div(plan.text_blocks, plan.text_blocks_per_item);
  }
  plan.image_blocks_per_item =
      ceil_div(plan.image_blocks, std::clamp<int64_t>(ceil_div(wanted, plan.text_items), 1, plan.image_blocks));
  plan.image_items = ceil_div(plan.image_blocks, plan.image_blocks_per_item);
  return plan;
}

// The per-thread buffers of the tile loop, from the torch allocator (so memory profiles see them).
template <typename T>
struct TileWorkspace {
  at::Tensor storage;
  T *text_pack, *image_pack, *tile, *column_excluded, *column_max;
  int32_t* column_arg;

  TileWorkspace(const TilePlan& plan, int64_t depth, bool with_arg, const at::TensorOptions& options) {
    const int64_t a = plan.text_blocks_per_item * plan.tile_rows * depth, b = plan.tile_cols * depth;
    const int64_t t = plan.tile_rows * plan.tile_cols, c = plan.tile_cols;
    storage = at::empty({a + b + t + (with_arg ? 3 : 2) * c}, options);  // int32 arg-max fits in a T slot
    text_pack = storage.data_ptr<T>();
    image_pack = text_pack + a;
    tile = image_pack + b;
    column_excluded = tile + t;
    column_max = column_excluded + c;
    column_arg = with_arg ? reinterpret_cast<int32_t*>(column_max + c) : nullptr;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Similarity tiles
// ---------------------------------------------------------------------------------------------------------------

// Packed layouts: the rows of a text block in blocks of block_rows, pack[block][d][i]; the columns (image tokens) of
// an image block in panels of panel_cols, pack[panel][d][j]; both zero past the last row / column.
template <typename T>
C10_ALWAYS_INLINE void pack_rows(const T* x, int64_t rows, int64_t depth, int64_t block_rows, T* pack) {
  for (int64_t r0 = 0; r0 < rows; r0 += block_rows) {
    T* out = pack + r0 * depth;
    const int64_t height = std::min(block_rows, rows - r0);
    for (int64_t d = 0; d < depth; ++d) {
      for (int64_t i = 0; i < height; ++i) out[d * block_rows + i] = x[(r0 + i) * depth + d];
      for (int64_t i = height; i < block_rows; ++i) out[d * block_rows + i] = T(0);
    }
  }
}

// out[i, 0:kCols] = Σ_d a[d, i] · b[d, 0:kCols] for i < kRows, summed over d in index order, one accumulator per
// output element. a: kRows packed rows, b: one packed panel; out rows `stride` apart.
template <typename T, int kBytes, int kRows, int kVecs>
C10_ALWAYS_INLINE void micro_kernel(const T* a, const T* b, int64_t depth, T* out, int64_t stride) {
  using Vec = typename cpu_isa::Vec<T, kBytes>::type;
  constexpr int kLanes = cpu_isa::Vec<T, kBytes>::kLanes;
  Vec acc[kRows][kVecs];
  for (int i = 0; i < kRows; ++i) {
    for (int v = 0; v < kVecs; ++v) acc[i][v] = Vec{};
  }
  for (int64_t d = 0; d < depth; ++d) {
    Vec panel[kVecs];
    for (int v = 0; v < kVecs; ++v) std::memcpy(&panel[v], b + (d * kVecs + v) * kLanes, sizeof(Vec));
    for (int i = 0; i < kRows; ++i) {
      const T ai = a[d * kRows + i];
      for (int v = 0; v < kVecs; ++v) acc[i][v] += ai * panel[v];
    }
  }
  for (int i = 0; i < kRows; ++i) {
    for (int v = 0; v < kVecs; ++v) std::memcpy(out + i * stride + v * kLanes, &acc[i][v], sizeof(Vec));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Maxima of the pairs of a tile
// ---------------------------------------------------------------------------------------------------------------

// The maxima below use `x > m ? x : m`, which compiles to a single max instruction; a NaN similarity never wins
// it. Non-finite features are dealt with per pair instead (such a pair scores NaN, see Problem::text_finite).

// Largest lane of v.
template <typename T, int kBytes>
C10_ALWAYS_INLINE T horizontal_max(typename cpu_isa::Vec<T, kBytes>::type v) {
  if constexpr (kBytes == static_cast<int>(sizeof(T))) {
    return v[0];
  } else {
    using Half = typename cpu_isa::Vec<T, kBytes / 2>::type;
    Half low, high;
    std::memcpy(&low, &v, sizeof(Half));
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
    return horizontal_max<T, kBytes / 2>(high > low ? high : low);
  }
}

// column_max[c] = max over the valid tokens t of one text of rows[t][c] for c < cols (a multiple of the vector
// width), with the first arg-max into column_arg when given. The text has a valid token.
template <typename T, int kBytes>
C10_ALWAYS_INLINE void column_maxima(const T* rows, int64_t stride, int64_t cols, const bool* text_valid,
                                     int64_t text_len, T* column_max, int32_t* column_arg) {
  using VecT = cpu_isa::Vec<T, kBytes>;
  using Vec = typename VecT::type;
  using IndexT = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;  // lanes as wide as T's: masks fit
  using Index = typename cpu_isa::Vec<IndexT, kBytes>::type;
  constexpr int64_t kLanes = VecT::kLanes;
  int64_t first = 0;
  while (!text_valid[first]) ++first;
  for (int64_t c = 0; c < cols; c += kLanes) {
    Vec m;
    std::memcpy(&m, rows + first * stride + c, sizeof(Vec));
    Index arg = Index{} + static_cast<IndexT>(first);
    for (int64_t t = first + 1; t < text_len; ++t) {
      if (!text_valid[t]) continue;
      Vec x;
      std::memcpy(&x, rows + t * stride + c, sizeof(Vec));
      if (column_arg != nullptr) arg = x > m ? Index{} + static_cast<IndexT>(t) : arg;  // strict: the first wins
      m = x > m ? x : m;
    }
    std::memcpy(column_max + c, &m, sizeof(Vec));
    if (column_arg != nullptr) {
      for (int64_t lane = 0; lane < kLanes; ++lane) column_arg[c + lane] = static_cast<int32_t>(arg[lane]);
    }
  }
}

// max over the valid u < len of segment[u], and its first arg-max into *arg when given. excluded[u] is 0 on valid
// tokens and -inf on invalid ones (x + -inf is -inf or NaN, and neither wins a maximum). The segment has a valid
// token.
template <typename T, int kBytes>
C10_ALWAYS_INLINE T row_maximum(const T* segment, const T* excluded, int64_t len, int32_t* arg) {
  using VecT = cpu_isa::Vec<T, kBytes>;
  using Vec = typename VecT::type;
  constexpr int64_t kLanes = VecT::kLanes;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  T best = kNegInf;
  if (len >= kLanes) {
    Vec m = Vec{} + kNegInf;
    for (int64_t u = 0; u < len; u += kLanes) {
      const int64_t at = std::min(u, len - kLanes);  // the last vector may overlap the previous one: max is idempotent
      Vec x, e;
      std::memcpy(&x, segment + at, sizeof(Vec));
      std::memcpy(&e, excluded + at, sizeof(Vec));
      x += e;
      m = x > m ? x : m;
    }
    best = horizontal_max<T, kBytes>(m);
  } else {
    for (int64_t u = 0; u < len; ++u) {
      const T x = segment[u] + excluded[u];
      best = x > best ? x : best;
    }
  }
  if (arg != nullptr) {
    int64_t first = 0;
    while (first < len && !(excluded[first] == 0 && segment[first] == best)) ++first;
    if (first == len) {  // no finite maximum (non-finite features): any valid token
      first = 0;
      while (excluded[first] != 0) ++first;
    }
    *arg = static_cast<int32_t>(first);
  }
  return best;
}

// Folds the tile of texts [a0, a1) × images [b0, b1): scores (maxima null) or every pair's maxima and arg-maxima.
template <typename T, int kBytes>
C10_ALWAYS_INLINE void fold_tile(const Problem<T>& p, const TileWorkspace<T>& ws, int64_t stride, int64_t a0,
                                 int64_t a1, int64_t b0, int64_t b1, T* score, const PairMaxima<T>* maxima) {
  constexpr int64_t kLanes = cpu_isa::Vec<T, kBytes>::kLanes;
  const int64_t text_len = p.n.text_len, image_len = p.n.image_len, num_images = p.n.num_images;
  const int64_t cols = (b1 - b0) * image_len;
  for (int64_t a = a0; a < a1; ++a) {
    const bool text_nonempty = p.text_nonempty[a];
    const T* rows = ws.tile + (a - a0) * text_len * stride;
    const bool* text_valid = p.text_valid + a * text_len;
    const T* alpha = p.alpha + a * text_len;
    if (text_nonempty) {
      column_maxima<T, kBytes>(rows, stride, ceil_div(cols, kLanes) * kLanes, text_valid, text_len, ws.column_max,
                               ws.column_arg);
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t pair = a * num_images + b, offset = (b - b0) * image_len;
      const bool* image_valid = p.image_valid + b * image_len;
      const T* beta = p.beta + b * image_len;
      const bool live = text_nonempty && p.image_nonempty[b];
      if (maxima == nullptr) {
        T text_term = 0, image_term = 0;
        for (int64_t t = 0; live && t < text_len; ++t) {
          if (text_valid[t]) {
            text_term += alpha[t] * row_maximum<T, kBytes>(rows + t * stride + offset, ws.column_excluded + offset,
                                                           image_len, nullptr);
          }
        }
        for (int64_t u = 0; live && u < image_len; ++u) {
          if (image_valid[u]) image_term += beta[u] * ws.column_max[offset + u];
        }
        score[pair] = !live ? T(0)
                      : p.text_finite[a] && p.image_finite[b] ? T(0.5) * (text_term + image_term)
                                                              : std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      int32_t* text_arg = maxima->text_arg + pair * text_len;
      T* text_max = maxima->text_max + pair * text_len;
      for (int64_t t = 0; t < text_len; ++t) {
        text_arg[t] = -1;
        text_max[t] = 0;
        if (live && text_valid[t]) {
          text_max[t] = row_maximum<T, kBytes>(rows + t * stride + offset, ws.column_excluded + offset, image_len,
                                               text_arg + t);
        }
      }
      int32_t* image_arg = maxima->image_arg + pair * image_len;
      T* image_max = maxima->image_max + pair * image_len;
      for (int64_t u = 0; u < image_len; ++u) {
        const bool counts = live && image_valid[u];
        image_arg[u] = counts ? ws.column_arg[offset + u] : -1;
        image_max[u] = counts ? ws.column_max[offset + u] : T(0);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Work items
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
struct ItemArgs {
  const Problem<T>* p;
  const TilePlan* plan;
  TileWorkspace<T>* ws;
  int64_t text_block0, text_block1, image_block0, image_block1;
  T* score;                       // forward: [Bt, Bi]
  const PairMaxima<T>* maxima;    // backward
  Interrupt* interrupt;           // checked after every image block
};

// One work item with the micro-kernel of kRows × kVecs vectors of kBytes: packs its text blocks, then per image
// block packs the block, computes its tile against every text block and folds it.
template <typename T, int kBytes, int kRows, int kVecs>
C10_ALWAYS_INLINE void process_item_impl(const ItemArgs<T>& args) {
  constexpr int64_t kCols = kVecs * cpu_isa::Vec<T, kBytes>::kLanes;
  const Problem<T>& p = *args.p;
  const TilePlan& plan = *args.plan;
  TileWorkspace<T>& ws = *args.ws;
  const int64_t text_len = p.n.text_len, image_len = p.n.image_len, depth = p.n.dim;
  const int64_t stride = plan.tile_cols;
  auto text_range = [&](int64_t tb) {
    const int64_t a0 = tb * plan.texts_per_block;
    return std::make_pair(a0, std::min(a0 + plan.texts_per_block, p.n.num_texts));
  };
  for (int64_t tb = args.text_block0; tb < args.text_block1; ++tb) {
    const auto [a0, a1] = text_range(tb);
    pack_rows(p.text + a0 * text_len * depth, (a1 - a0) * text_len, depth, int64_t(kRows),
              ws.text_pack + (tb - args.text_block0) * plan.tile_rows * depth);
  }
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t ib = args.image_block0; ib < args.image_block1; ++ib) {
    const int64_t b0 = ib * plan.images_per_block, b1 = std::min(b0 + plan.images_per_block, p.n.num_images);
    const int64_t cols = (b1 - b0) * image_len, panels = ceil_div(cols, kCols);
    pack_rows(p.image + b0 * image_len * depth, cols, depth, kCols, ws.image_pack);
    for (int64_t c = 0; c < panels * kCols; ++c) {
      ws.column_excluded[c] = c < cols && p.image_valid[b0 * image_len + c] ? T(0) : kNegInf;
    }
    for (int64_t tb = args.text_block0; tb < args.text_block1; ++tb) {
      const auto [a0, a1] = text_range(tb);
      const int64_t row_blocks = ceil_div((a1 - a0) * text_len, kRows);
      const T* text_pack = ws.text_pack + (tb - args.text_block0) * plan.tile_rows * depth;
      // Row blocks outermost: a row block (kRows × depth) stays in L1 while the panels stream through from L2.
      for (int64_t blk = 0; blk < row_blocks; ++blk) {
        for (int64_t panel = 0; panel < panels; ++panel) {
          micro_kernel<T, kBytes, kRows, kVecs>(text_pack + blk * depth * kRows, ws.image_pack + panel * depth * kCols,
                                                depth, ws.tile + blk * kRows * stride + panel * kCols, stride);
        }
      }
      fold_tile<T, kBytes>(p, ws, stride, a0, a1, b0, b1, args.score, args.maxima);
    }
    if (args.interrupt->requested()) return;
  }
}

template <typename T>
using ItemFn = void (*)(const ItemArgs<T>&);

// One version per instruction set: AVX-512 (32 vector registers: 12 rows × 2 vectors of accumulators), AVX2 with
// FMA (16 registers: 6 × 2), portable 16-byte vectors (SSE2 / NEON: 4 × 2).
#define CBD_FAST_ITEM_VERSIONS(T, suffix)                                                                       \
  CBD_FAST_TARGET("avx512f") void process_item_avx512_##suffix(const ItemArgs<T>& args) {                       \
    process_item_impl<T, 64, 12, 2>(args);                                                                       \
  }                                                                                                              \
  CBD_FAST_TARGET("avx2,fma") void process_item_avx2_##suffix(const ItemArgs<T>& args) {                        \
    process_item_impl<T, 32, 6, 2>(args);                                                                        \
  }                                                                                                              \
  void process_item_portable_##suffix(const ItemArgs<T>& args) { process_item_impl<T, 16, 4, 2>(args); }

CBD_FAST_ITEM_VERSIONS(float, f32)
CBD_FAST_ITEM_VERSIONS(double, f64)
#undef CBD_FAST_ITEM_VERSIONS

// The item function of an instruction set, with its micro-kernel's block height and panel width.
template <typename T>
struct ItemKernel {
  ItemFn<T> process;
  int64_t block_rows, panel_cols;
  std::pair<int64_t, int64_t> shape() const { return {block_rows, panel_cols}; }
};

template <typename T>
ItemKernel<T> item_kernel(Isa isa) {
  constexpr int64_t kSize = sizeof(T);
  if constexpr (std::is_same_v<T, float>) {
    if (isa == Isa::kAvx512) return {&process_item_avx512_f32, 12, 2 * 64 / kSize};
    if (isa == Isa::kAvx2) return {&process_item_avx2_f32, 6, 2 * 32 / kSize};
    return {&process_item_portable_f32, 4, 2 * 16 / kSize};
  } else {
    if (isa == Isa::kAvx512) return {&process_item_avx512_f64, 12, 2 * 64 / kSize};
    if (isa == Isa::kAvx2) return {&process_item_avx2_f64, 6, 2 * 32 / kSize};
    return {&process_item_portable_f64, 4, 2 * 16 / kSize};
  }
}

// Every tile of the problem, in parallel: scores (forward) or the pair maxima (backward, `maxima` not null).
template <typename T>
void for_each_tile(const Problem<T>& p, Isa isa, const at::TensorOptions& options, T* score,
                   const PairMaxima<T>* maxima) {
  const ItemKernel<T> kernel = item_kernel<T>(isa);
  const TilePlan plan = make_plan(p.n, kernel.block_rows, kernel.panel_cols, sizeof(T));
  Interrupt interrupt;
  at::parallel_for(0, plan.items(), 1, [&](int64_t begin, int64_t end) {
    TileWorkspace<T> ws(plan, p.n.dim, maxima != nullptr, options);
    for (int64_t item = begin; item < end && !interrupt.requested(); ++item) {
      const int64_t ti = item % plan.text_items, ii = item / plan.text_items;
      ItemArgs<T> args{&p, &plan, &ws, ti * plan.text_blocks_per_item,
                       std::min((ti + 1) * plan.text_blocks_per_item, plan.text_blocks),
                       ii * plan.image_blocks_per_item,
                       std::min((ii + 1) * plan.image_blocks_per_item, plan.image_blocks), score, maxima,
                       &interrupt};
      kernel.process(args);
    }
  });
  interrupt.rethrow_if_requested();
}

// ---------------------------------------------------------------------------------------------------------------
// Gradients
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
struct GradientArgs {
  Problem<T> p;
  PairMaxima<T> maxima;
  const T* grad_score;  // [Bt, Bi]
  T* grad_text;         // [Bt, T, D]
  T* grad_image;        // [Bi, V, D]
  T* grad_alpha;        // [Bt, T]
  T* grad_beta;         // [Bi, V]
};

// out[0:len] += scale · in[0:len]
template <typename T>
C10_ALWAYS_INLINE void add_scaled(T* __restrict__ out, T scale, const T* __restrict__ in, int64_t len) {
  for (int64_t d = 0; d < len; ++d) out[d] += scale * in[d];
}

// Gradients owned by text a, summed over images b in order: ∂s[a,b]/∂X[a,t] = ½ α_a[t] Y[b, arg-max of row t]
// (text term) and ½ β_b[u] Y[b,u] for every u whose column maximum is t (image term); ∂s/∂α_a[t] = ½ r_t.
template <typename T>
C10_ALWAYS_INLINE void text_gradients_impl(const GradientArgs<T>& g, int64_t a) {
  const int64_t text_len = g.p.n.text_len, image_len = g.p.n.image_len, D = g.p.n.dim, Bi = g.p.n.num_images;
  const T* alpha = g.p.alpha + a * text_len;
  T* grad_x = g.grad_text + a * text_len * D;
  T* grad_alpha = g.grad_alpha + a * text_len;
  for (int64_t b = 0; b < Bi; ++b) {
    const int64_t pair = a * Bi + b;
    const T half_grad = T(0.5) * g.grad_score[pair];
    if (half_grad == T(0)) continue;
    const T* y = g.p.image + b * image_len * D;
    const T* beta = g.p.beta + b * image_len;
    const int32_t* text_arg = g.maxima.text_arg + pair * text_len;
    const int32_t* image_arg = g.maxima.image_arg + pair * image_len;
    const T* text_max = g.maxima.text_max + pair * text_len;
    for (int64_t t = 0; t < text_len; ++t) {
      if (text_arg[t] < 0) continue;
      add_scaled(grad_x + t * D, half_grad * alpha[t], y + text_arg[t] * D, D);
      grad_alpha[t] += half_grad * text_max[t];
    }
    for (int64_t u = 0; u < image_len; ++u) {
      if (image_arg[u] >= 0) add_scaled(grad_x + image_arg[u] * D, half_grad * beta[u], y + u * D, D);
    }
  }
}

// The mirror image: gradients owned by image b, summed over texts a in order.
template <typename T>
C10_ALWAYS_INLINE void image_gradients_impl(const GradientArgs<T>& g, int64_t b) {
  const int64_t text_len = g.p.n.text_len, image_len = g.p.n.image_len, D = g.p.n.dim, Bi = g.p.n.num_images;
  const T* beta = g.p.beta + b * image_len;
  T* grad_y = g.grad_image + b * image_len * D;
  T* grad_beta = g.grad_beta + b * image_len;
  for (int64_t a = 0; a < g.p.n.num_texts; ++a) {
    const int64_t pair = a * Bi + b;
    const T half_grad = T(0.5) * g.grad_score[pair];
    if (half_grad == T(0)) continue;
    const T* x = g.p.text + a * text_len * D;
    const T* alpha = g.p.alpha + a * text_len;
    const int32_t* text_arg = g.maxima.text_arg + pair * text_len;
    const int32_t* image_arg = g.maxima.image_arg + pair * image_len;
    const T* image_max = g.maxima.image_max + pair * image_len;
    for (int64_t t = 0; t < text_len; ++t) {
      if (text_arg[t] >= 0) add_scaled(grad_y + text_arg[t] * D, half_grad * alpha[t], x + t * D, D);
    }
    for (int64_t u = 0; u < image_len; ++u) {
      if (image_arg[u] < 0) continue;
      add_scaled(grad_y + u * D, half_grad * beta[u], x + image_arg[u] * D, D);
      grad_beta[u] += half_grad * image_max[u];
    }
  }
}

template <typename T>
using GradientFn = void (*)(const GradientArgs<T>&, int64_t);

#define CBD_FAST_GRADIENT_VERSIONS(T, suffix)                                                                       \
  CBD_FAST_TARGET("avx512f") void text_gradients_avx512_##suffix(const GradientArgs<T>& g, int64_t a) {           \
    text_gradients_impl(g, a);                                                                                     \
  }                                                                                                                \
  CBD_FAST_TARGET("avx2,fma") void text_gradients_avx2_##suffix(const GradientArgs<T>& g, int64_t a) {            \
    text_gradients_impl(g, a);                                                                                     \
  }                                                                                                                \
  void text_gradients_portable_##suffix(const GradientArgs<T>& g, int64_t a) { text_gradients_impl(g, a); }        \
  CBD_FAST_TARGET("avx512f") void image_gradients_avx512_##suffix(const GradientArgs<T>& g, int64_t b) {          \
    image_gradients_impl(g, b);                                                                                    \
  }                                                                                                                \
  CBD_FAST_TARGET("avx2,fma") void image_gradients_avx2_##suffix(const GradientArgs<T>& g, int64_t b) {           \
    image_gradients_impl(g, b);                                                                                    \
  }                                                                                                                \
  void image_gradients_portable_##suffix(const GradientArgs<T>& g, int64_t b) { image_gradients_impl(g, b); }

CBD_FAST_GRADIENT_VERSIONS(float, f32)
CBD_FAST_GRADIENT_VERSIONS(double, f64)
#undef CBD_FAST_GRADIENT_VERSIONS

template <typename T>
std::pair<GradientFn<T>, GradientFn<T>> gradients_for(Isa isa) {
  if constexpr (std::is_same_v<T, float>) {
    if (isa == Isa::kAvx512) return {&text_gradients_avx512_f32, &image_gradients_avx512_f32};
    if (isa == Isa::kAvx2) return {&text_gradients_avx2_f32, &image_gradients_avx2_f32};
    return {&text_gradients_portable_f32, &image_gradients_portable_f32};
  } else {
    if (isa == Isa::kAvx512) return {&text_gradients_avx512_f64, &image_gradients_avx512_f64};
    if (isa == Isa::kAvx2) return {&text_gradients_avx2_f64, &image_gradients_avx2_f64};
    return {&text_gradients_portable_f64, &image_gradients_portable_f64};
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Op plumbing
// ---------------------------------------------------------------------------------------------------------------

ScoreSizes check_inputs(const char* op, const at::Tensor& text, const at::Tensor& image, const at::Tensor& text_mask,
                        const at::Tensor& image_mask, const at::Tensor& alpha, const at::Tensor& beta) {
  const ScoreSizes n = maxsim_common::check_score_inputs(op, text, image, text_mask, image_mask, alpha, beta);
  TORCH_CHECK(text.device().is_cpu(), op, ": text must be a CPU tensor, got one on ", text.device());
  TORCH_CHECK(n.text_len <= std::numeric_limits<int32_t>::max() &&
                  n.image_len <= std::numeric_limits<int32_t>::max(),
              op, ": T and V must be < 2^31, got T = ", n.text_len, ", V = ", n.image_len);
  return n;
}

// The converted inputs of one call and the Problem view of them.
struct Converted {
  at::Tensor text, image, text_valid, image_valid, text_nonempty, image_nonempty, alpha, beta, text_finite,
      image_finite;

  Converted(const at::Tensor& text_, const at::Tensor& image_, const at::Tensor& text_mask,
            const at::Tensor& image_mask, const at::Tensor& alpha_, const at::Tensor& beta_, at::ScalarType acc)
      : text(text_.to(acc).contiguous()),
        image(image_.to(acc).contiguous()),
        text_valid(text_mask.contiguous()),
        image_valid(image_mask.contiguous()),
        text_nonempty(text_mask.any(1).contiguous()),
        image_nonempty(image_mask.any(1).contiguous()),
        alpha(alpha_.to(acc).contiguous()),
        beta(beta_.to(acc).contiguous()),
        text_finite(all_finite(text, text_valid, acc)),
        image_finite(all_finite(image, image_valid, acc)) {}

  // [B] bool: every valid token of item b has finite features. One pass over the features: x - x is 0 for a finite
  // x and NaN for ±inf and NaN, and a NaN stays in a sum.
  static at::Tensor all_finite(const at::Tensor& features, const at::Tensor& valid, at::ScalarType acc) {
    const int64_t items = features.size(0), tokens = features.size(1), depth = features.size(2);
    at::Tensor finite = at::empty({items}, valid.options());
    bool* out = finite.data_ptr<bool>();
    const bool* valid_ptr = valid.data_ptr<bool>();
    AT_DISPATCH_FLOATING_TYPES(acc, "maxsim_all_finite", [&] {
      const scalar_t* x = features.data_ptr<scalar_t>();
      at::parallel_for(0, items, 16, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          scalar_t sum = 0;
          for (int64_t t = 0; t < tokens; ++t) {
            if (!valid_ptr[b * tokens + t]) continue;
            const scalar_t* row = x + (b * tokens + t) * depth;
            for (int64_t d = 0; d < depth; ++d) sum += row[d] - row[d];
          }
          out[b] = sum == 0;
        }
      });
    });
    return finite;
  }

  template <typename T>
  Problem<T> problem(const ScoreSizes& n) const {
    return {n,
            text.data_ptr<T>(),
            image.data_ptr<T>(),
            text_valid.data_ptr<bool>(),
            image_valid.data_ptr<bool>(),
            text_nonempty.data_ptr<bool>(),
            image_nonempty.data_ptr<bool>(),
            alpha.data_ptr<T>(),
            beta.data_ptr<T>(),
            text_finite.data_ptr<bool>(),
            image_finite.data_ptr<bool>()};
  }
};

at::Tensor score_impl(const at::Tensor& text, const at::Tensor& image, const at::Tensor& text_mask,
                      const at::Tensor& image_mask, const at::Tensor& alpha, const at::Tensor& beta, const ScoreSizes& n,
                      Isa isa) {
  const at::ScalarType acc = maxsim_common::accumulation_type(text.scalar_type());
  const at::TensorOptions options = text.options().dtype(acc);
  at::Tensor score = at::empty({n.num_texts, n.num_images}, options);
  const Converted in(text, image, text_mask, image_mask, alpha, beta, acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "maxsim_score_cpu", [&] {
    for_each_tile<scalar_t>(in.problem<scalar_t>(n), isa, options, score.data_ptr<scalar_t>(), nullptr);
  });
  return score;
}

Tensor4 backward_impl(const at::Tensor& grad_score, const at::Tensor& text, const at::Tensor& image,
                      const at::Tensor& text_mask, const at::Tensor& image_mask, const at::Tensor& alpha,
                      const at::Tensor& beta, const ScoreSizes& n, Isa isa) {
  const at::ScalarType acc = maxsim_common::accumulation_type(text.scalar_type());
  const at::TensorOptions options = text.options().dtype(acc);
  // Gradients in the accumulation dtype: float32 for half-precision features, else the features' dtype.
  at::Tensor grad_text, grad_image, grad_alpha, grad_beta;
  auto zero_gradients = [&] {
    grad_text = at::zeros(text.sizes(), options);
    grad_image = at::zeros(image.sizes(), options);
    grad_alpha = at::zeros({n.num_texts, n.text_len}, options);
    grad_beta = at::zeros({n.num_images, n.image_len}, options);
  };
  const Converted in(text, image, text_mask, image_mask, alpha, beta, acc);
  const at::Tensor grad_score_c = grad_score.to(acc).contiguous();
  const int64_t pairs = n.num_texts * n.num_images;
  // Pass 1: every pair's maxima and arg-maxima, recomputed (alive for this call only).
  at::Tensor text_arg = at::empty({pairs, n.text_len}, options.dtype(at::kInt));
  at::Tensor image_arg = at::empty({pairs, n.image_len}, options.dtype(at::kInt));
  at::Tensor text_max = at::empty({pairs, n.text_len}, options), image_max = at::empty({pairs, n.image_len}, options);
  AT_DISPATCH_FLOATING_TYPES(acc, "maxsim_score_backward_cpu", [&] {
    const Problem<scalar_t> p = in.problem<scalar_t>(n);
    const PairMaxima<scalar_t> maxima{text_arg.data_ptr<int32_t>(), text_max.data_ptr<scalar_t>(),
                                      image_arg.data_ptr<int32_t>(), image_max.data_ptr<scalar_t>()};
    for_each_tile<scalar_t>(p, isa, options, nullptr, &maxima);
    // Pass 2, with the gradients allocated only now that pass 1's workspaces are freed: each gradient row is owned
    // by one thread (no atomics, a fixed summation order).
    zero_gradients();
    const GradientArgs<scalar_t> args{p,
                                      maxima,
                                      grad_score_c.data_ptr<scalar_t>(),
                                      grad_text.data_ptr<scalar_t>(),
                                      grad_image.data_ptr<scalar_t>(),
                                      grad_alpha.data_ptr<scalar_t>(),
                                      grad_beta.data_ptr<scalar_t>()};
    const auto [text_gradients, image_gradients] = gradients_for<scalar_t>(isa);
    Interrupt interrupt;
    at::parallel_for(0, n.num_texts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t a = begin; a < end && !interrupt.requested(); ++a) text_gradients(args, a);
    });
    at::parallel_for(0, n.num_images, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end && !interrupt.requested(); ++b) image_gradients(args, b);
    });
    interrupt.rethrow_if_requested();
  });
  return {grad_text, grad_image, grad_alpha, grad_beta};
}

// The score is symmetric: swapping (text, text_mask, alpha) with (image, image_mask, beta) transposes it, bit for bit
// (the same products summed in the same order, and the two halves of each score added the other way round, which
// rounds the same). Tiles put text tokens on rows and image tokens on columns, padded to the micro-kernel's block
// height and panel width; when image tokens would fill the panels poorly (e.g. one image of 17 tokens against many
// texts) the swapped problem has less padding. Depends on the sizes only, never on the thread count.
ScoreSizes swapped(const ScoreSizes& n) { return {n.num_images, n.image_len, n.num_texts, n.text_len, n.dim}; }

bool swap_sides(const ScoreSizes& n, Isa isa, at::ScalarType acc) {
  const auto [block_rows, panel_cols] = acc == at::kDouble ? item_kernel<double>(isa).shape()
                                                            : item_kernel<float>(isa).shape();
  const int64_t element_bytes = at::elementSize(acc);
  auto padded_work = [&](const ScoreSizes& sizes) {
    const TilePlan plan = make_plan(sizes, block_rows, panel_cols, element_bytes);
    return double(plan.text_blocks * plan.tile_rows) * double(plan.image_blocks * plan.tile_cols);
  };
  return 5 * padded_work(swapped(n)) < 4 * padded_work(n);  // at least 20% less work
}

}  // namespace

at::Tensor maxsim_score_cpu(const at::Tensor& text, const at::Tensor& image, const at::Tensor& text_mask,
                            const at::Tensor& image_mask, const at::Tensor& alpha, const at::Tensor& beta) {
  const ScoreSizes n = check_inputs("maxsim_score", text, image, text_mask, image_mask, alpha, beta);
  const at::ScalarType acc = maxsim_common::accumulation_type(text.scalar_type());
  if (maxsim_common::is_empty_problem(n)) return at::zeros({n.num_texts, n.num_images}, text.options().dtype(acc));
  const Isa isa = cpu_isa::active(Isa::kAvx512);
  if (swap_sides(n, isa, acc)) {
    return score_impl(image, text, image_mask, text_mask, beta, alpha, swapped(n), isa).t().contiguous();
  }
  return score_impl(text, image, text_mask, image_mask, alpha, beta, n, isa);
}

Tensor4 maxsim_score_backward_cpu(const at::Tensor& grad_score, const at::Tensor& text, const at::Tensor& image,
                                  const at::Tensor& text_mask, const at::Tensor& image_mask, const at::Tensor& alpha,
                                  const at::Tensor& beta) {
  constexpr const char* op = "maxsim_score_backward";
  const ScoreSizes n = check_inputs(op, text, image, text_mask, image_mask, alpha, beta);
  maxsim_common::check_grad_score(op, grad_score, n, text.device());
  const at::ScalarType acc = maxsim_common::accumulation_type(text.scalar_type());
  if (maxsim_common::is_empty_problem(n)) {
    const at::TensorOptions options = text.options().dtype(acc);
    return {at::zeros(text.sizes(), options), at::zeros(image.sizes(), options),
            at::zeros({n.num_texts, n.text_len}, options), at::zeros({n.num_images, n.image_len}, options)};
  }
  const Isa isa = cpu_isa::active(Isa::kAvx512);
  if (swap_sides(n, isa, acc)) {
    auto [grad_image, grad_text, grad_beta, grad_alpha] =
        backward_impl(grad_score.t(), image, text, image_mask, text_mask, beta, alpha, swapped(n), isa);
    return {grad_text, grad_image, grad_alpha, grad_beta};
  }
  return backward_impl(grad_score, text, image, text_mask, image_mask, alpha, beta, n, isa);
}

}  // namespace cbd_fast
