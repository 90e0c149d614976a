// Fused Monte Carlo Banzhaf pass (DESIGN §3-§4) on CUDA: the paired and msr estimators, forward and backward, from
// a similarity tensor or from token features. Plain CUDA + philox.h; banzhaf_launch.cpp is the torch-facing side.
//
// A port of csrc/cpu/banzhaf_cpu.cpp (HalfGame::prepare / accumulate / backward, msr_sums / msr_backward). One CTA
// owns one pair and one fixed slice of its draws. Per draw it builds the coalition bits from the shared Philox
// stream, then runs the O(T·V) algorithm in phases separated by __syncthreads:
//   A  top-two maxima and arg-max of every row of both halves over the other side's members (one thread per row,
//      members in ascending order: ties go to the lowest index exactly as in the C++), per-row 1/W(A'∪r), 1/W(A')
//   B  per-column sums over the member rows (one thread per column, rows in ascending order) and value sums
//   C  per-element accumulation (forward) or the per-row gradient passes (backward, one warp per row: every
//      gradient of row r lands in row r, at column c, top1_index[r] or top2_index[r], so no atomics are needed)
//   D  (backward) the adjoint of W(A), a sum over all rows and columns, added to the member rows' weight
//      gradients; it runs beside phase A of the next draw (the coalition bits are double-buffered)
// The msr passes need only phase A and one value per draw. Each similarity gradient half has its own accumulator
// ([T,V] for the text half, [V,T] for the image half), so both are written row by row; the launcher adds them.
// Every sum has a fixed order (sequential loops, or warp butterflies over lane-strided partials), each accumulator
// element has one owner per phase, and the per-slice partial sums are reduced in slice order by a separate kernel:
// results are bit-stable across runs and do not depend on the block size. Like the C++ kernels, sums are in double
// (the leave-one-out terms subtract one token's share from a total); maxima compare the stored similarity values
// (float for fp32/fp16/bf16 inputs, double for fp64), which are exact in double.
//
// The text half of a pair has rows = text tokens and columns = image tokens over sim [T,V]; the image half is the
// same computation with rows = image tokens over simᵀ [V,T]. Both matrices are kept (in shared memory when they
// fit) so every row scan and every column scan reads consecutive addresses across a warp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../philox.h"

namespace cbd_fast {
namespace banzhaf_cuda {

// Keep in sync with banzhaf_launch.cpp.
enum Pass : int { kPairedForward = 0, kPairedBackward = 1, kMsrSums = 2, kMsrBackward = 3 };
enum TokenType : int { kNoTokens = -1, kFloatTokens = 0, kHalfTokens = 1, kBFloat16Tokens = 2, kDoubleTokens = 3 };

constexpr int kMaxTextTokens = 256;
constexpr int kMaxImageTokens = 576;
constexpr int kTextWords = kMaxTextTokens / 32;
constexpr int kImageWords = kMaxImageTokens / 32;
constexpr int kWords = kTextWords + kImageWords;  // one bit per token: text words, then image words

// 128 threads: at the anchor size (T=32, V=50) the row and column phases have T+V = 82 work items, and several
// small CTAs per SM hide each other's barriers. Results do not depend on this number.
constexpr int kThreads = 128;
constexpr int kMinBlocksPerSm = 4;  // caps the pass kernels at 128 registers
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Similarity from token features: D is consumed in chunks of kDimChunk columns staged in shared memory (row stride
// padded by one element against bank conflicts); each thread owns kSimOutputsPerThread outputs per pass.
constexpr int kDimChunk = 32;
constexpr int kChunkStride = kDimChunk + 1;
constexpr int kSimOutputsPerThread = 8;
constexpr int kSimOutputsPerPass = kThreads * kSimOutputsPerThread;

// Rows (text rows of one pass, then all image rows) of the token chunk staged per similarity pass.
inline int similarity_chunk_rows(int text_len, int image_len) {
  const int text_rows = (kSimOutputsPerPass + image_len - 1) / image_len + 1;
  return (text_rows < text_len ? text_rows : text_len) + image_len;
}

// Dynamic shared memory a CTA may plan for (the H100 allows 227 KB per block).
constexpr int64_t kSmemBudget = 200 * 1024;

// Slots of HalfLayout::scalars.
constexpr int kTotalW = 0;   // W(A) = Σ_{r∈A} w_r
constexpr int kSumFull = 1;  // Σ_{r∈A} w_r max_{c∈C} S[r,c]  (0 when C = ∅)
constexpr int kGFull = 2;    // adjoint of kSumFull (backward)
constexpr int kNumScalars = 4;

// Byte offsets of one half game's per-draw arrays in dynamic shared memory (-1: not allocated for this pass).
struct HalfLayout {
  int top1, top2, idx1, idx2;      // [rows] scalar, scalar, int, int
  int inv_with, inv_without;       // [rows] double: 1/W(A'∪r) and 1/W(A') with A' = A∖r (0 when A' = ∅)
  int sum_with, sum_without;       // [cols] double: Σ_{r∈A} w_r max over C∪c, resp. C∖c, of row r
  int g_with, gtot_col, gtot_row;  // backward: [cols] adjoint of sum_with, [cols] / [rows] parts of the W(A) adjoint
  int scalars;                     // double[kNumScalars]
};

struct SmemLayout {
  int valid_bits;   // uint32[kWords]
  int draw_bits;    // uint32[2][kWords], double-buffered by draw parity
  int text_w, image_w;  // double [T], [V]
  HalfLayout text, image;
  int row_sums;     // msr backward: double[T + 1]
  int sim, sim_t;   // scalar [T*V] each; -1: read from global memory
  int gemm;         // scalar [(T+V) * kChunkStride]: token chunks when the CTA computes its similarity
  int acc;          // double [width]; -1: accumulate in the CTA's slot of the global partial buffer
  int total;
};

// Everything a pass kernel reads; pointers are to global memory, per-pair tensors are [B, ...] contiguous.
struct PassParams {
  const void* sim;          // [B,T,V] scalar (unused when the CTA computes its similarity)
  const void* sim_t;        // [B,V,T] scalar (needed only when the similarity is not staged in shared memory)
  const void* text_tokens;  // [B,T,D] (from-tokens passes)
  const void* image_tokens; // [B,V,D]
  const bool* text_valid;   // [B,T]
  const bool* image_valid;  // [B,V]
  const double* text_w;     // [B,T] exp weights, 0 on invalid tokens
  const double* image_w;    // [B,V]
  // paired backward: dL/d(draw term) [B,T,V], its transpose [B,V,T], and the value coefficients [B,T], [B,V];
  // msr backward: stratum coefficients [B,4,V,T] (index 2·[i∈A] + [j∈C]), [B,2,T] ([i∈A]), [B,2,V] ([j∈C]).
  const double* coef_pairs;
  const double* coef_pairs_t;
  const double* coef_text;
  const double* coef_image;
  double* partial;          // [B, slices, width]
  uint64_t seed;
  uint32_t num_samples;
  uint32_t draws_per_slice;
  int text_len, image_len, dim, slices, width;
  SmemLayout smem;
};

// ---------------------------------------------------------------------------------------------------------------
// Shared-memory plan (host)

class SmemPlanner {
 public:
  static int64_t round_up(int64_t bytes) { return (bytes + 15) / 16 * 16; }
  bool fits(int64_t bytes) const { return used_ + round_up(bytes) <= kSmemBudget; }
  int take(int64_t bytes) {
    const int64_t at = used_;
    used_ += round_up(bytes);
    return static_cast<int>(at);
  }
  int64_t used() const { return used_; }

 private:
  int64_t used_ = 0;
};

// Per-draw state always lives in shared memory; then the similarity pair (sim, simᵀ, and the token chunks when
// the CTA computes it) if it fits, then the accumulator if it fits.
inline SmemLayout plan_shared_memory(int pass, int scalar_size, int text_len, int image_len, bool from_tokens,
                                     int64_t width) {
  const bool paired = pass == kPairedForward || pass == kPairedBackward;
  const bool paired_backward = pass == kPairedBackward;
  SmemPlanner plan;
  SmemLayout layout;
  layout.valid_bits = plan.take(kWords * 4);
  layout.draw_bits = plan.take(2 * kWords * 4);
  layout.text_w = plan.take(int64_t(text_len) * 8);
  layout.image_w = plan.take(int64_t(image_len) * 8);
  auto half = [&](int64_t rows, int64_t cols) {
    HalfLayout h;
    h.top1 = plan.take(rows * scalar_size);
    h.top2 = plan.take(rows * scalar_size);
    h.idx1 = plan.take(rows * 4);
    h.idx2 = plan.take(rows * 4);
    h.inv_with = paired ? plan.take(rows * 8) : -1;
    h.inv_without = paired ? plan.take(rows * 8) : -1;
    h.sum_with = paired ? plan.take(cols * 8) : -1;
    h.sum_without = paired ? plan.take(cols * 8) : -1;
    h.g_with = paired_backward ? plan.take(cols * 8) : -1;
    h.gtot_col = paired_backward ? plan.take(cols * 8) : -1;
    h.gtot_row = paired_backward ? plan.take(rows * 8) : -1;
    h.scalars = plan.take(kNumScalars * 8);
    return h;
  };
  layout.text = half(text_len, image_len);
  layout.image = half(image_len, text_len);
  layout.row_sums = pass == kMsrBackward ? plan.take(int64_t(text_len + 1) * 8) : -1;
  const int64_t sim_bytes = int64_t(text_len) * image_len * scalar_size;
  const int64_t gemm_bytes =
      from_tokens ? int64_t(similarity_chunk_rows(text_len, image_len)) * kChunkStride * scalar_size : 0;
  layout.sim = layout.sim_t = layout.gemm = -1;
  if (plan.fits(SmemPlanner::round_up(sim_bytes) * 2 + gemm_bytes)) {
    layout.sim = plan.take(sim_bytes);
    layout.sim_t = plan.take(sim_bytes);
    if (from_tokens) layout.gemm = plan.take(gemm_bytes);
  }
  layout.acc = plan.fits(width * 8) ? plan.take(width * 8) : -1;
  layout.total = static_cast<int>(plan.used());
  return layout;
}

// ---------------------------------------------------------------------------------------------------------------
// Device helpers

template <typename T>
__device__ __forceinline__ T* smem_at(unsigned char* smem, int offset) {
  return offset < 0 ? nullptr : reinterpret_cast<T*>(smem + offset);
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t neg_inf() {
  return -static_cast<scalar_t>(INFINITY);
}

__device__ __forceinline__ bool test_bit(const uint32_t* words, int i) { return (words[i >> 5] >> (i & 31)) & 1u; }

__device__ __forceinline__ int count_members(const uint32_t* words, int len) {
  int n = 0;
  for (int w = 0; w < (len + 31) >> 5; ++w) n += __popc(words[w]);
  return n;
}

// Sum over the 32 lanes, identical in every lane (each butterfly step adds the same two values in every lane).
__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

__device__ __forceinline__ float token_value(float x) { return x; }
__device__ __forceinline__ float token_value(__half x) { return __half2float(x); }
__device__ __forceinline__ float token_value(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double token_value(double x) { return x; }

__device__ __forceinline__ float multiply_add(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double multiply_add(double a, double b, double c) { return fma(a, b, c); }

// One half game of the current draw, as seen by one thread (pointers into shared or global memory).
template <typename scalar_t>
struct Half {
  int rows, cols;
  const scalar_t* sim_rows;  // [rows, cols]
  const scalar_t* sim_cols;  // [cols, rows]
  const uint32_t* row_in;    // member bits of this draw
  const uint32_t* col_in;
  const uint32_t* row_valid;
  const uint32_t* col_valid;
  const double* w;  // [rows]
  int row_count, col_count;  // |A|, |C| of this half
  scalar_t* top1;
  scalar_t* top2;
  int* idx1;
  int* idx2;
  double* inv_with;
  double* inv_without;
  double* sum_with;
  double* sum_without;
  double* g_with;
  double* gtot_col;
  double* gtot_row;
  double* scalars;
  // backward only
  const double* coef_rows;  // [rows, cols]
  const double* coef_row;   // [rows]
  const double* coef_col;   // [cols]
  double* acc_rows;         // gradient w.r.t. sim_rows [rows, cols]
  double* acc_w;            // gradient w.r.t. the row weights [rows]
};

// The CTA's pair: similarity pointers (shared or global memory) and its accumulator.
template <typename scalar_t>
struct PairTables {
  int pair, text_len, image_len;
  const scalar_t* sim;    // [T,V]
  const scalar_t* sim_t;  // [V,T]
  double* acc;            // [width]
};

template <typename scalar_t>
__device__ PairTables<scalar_t> pair_tables(const PassParams& p, unsigned char* smem, int pair) {
  PairTables<scalar_t> tb;
  tb.pair = pair;
  tb.text_len = p.text_len;
  tb.image_len = p.image_len;
  const size_t tv = size_t(p.text_len) * p.image_len;
  tb.sim = p.smem.sim >= 0 ? smem_at<scalar_t>(smem, p.smem.sim) : static_cast<const scalar_t*>(p.sim) + pair * tv;
  tb.sim_t = p.smem.sim_t >= 0 ? smem_at<scalar_t>(smem, p.smem.sim_t)
                               : static_cast<const scalar_t*>(p.sim_t) + pair * tv;
  tb.acc = p.smem.acc >= 0 ? smem_at<double>(smem, p.smem.acc) : p.partial + size_t(blockIdx.x) * p.width;
  return tb;
}

// The text half (text_rows) or the image half of the draw whose bits are in buffer `parity`.
template <typename scalar_t>
__device__ __forceinline__ Half<scalar_t> make_half(const PassParams& p, unsigned char* smem,
                                                    const PairTables<scalar_t>& tb, bool text_rows, int parity,
                                                    int text_members, int image_members) {
  const HalfLayout& l = text_rows ? p.smem.text : p.smem.image;
  const uint32_t* bits = smem_at<uint32_t>(smem, p.smem.draw_bits) + parity * kWords;
  const uint32_t* valid = smem_at<uint32_t>(smem, p.smem.valid_bits);
  const int T = tb.text_len, V = tb.image_len;
  const size_t tv = size_t(T) * V;
  Half<scalar_t> h;
  h.rows = text_rows ? T : V;
  h.cols = text_rows ? V : T;
  h.sim_rows = text_rows ? tb.sim : tb.sim_t;
  h.sim_cols = text_rows ? tb.sim_t : tb.sim;
  h.row_in = text_rows ? bits : bits + kTextWords;
  h.col_in = text_rows ? bits + kTextWords : bits;
  h.row_valid = text_rows ? valid : valid + kTextWords;
  h.col_valid = text_rows ? valid + kTextWords : valid;
  h.w = smem_at<double>(smem, text_rows ? p.smem.text_w : p.smem.image_w);
  h.row_count = text_rows ? text_members : image_members;
  h.col_count = text_rows ? image_members : text_members;
  h.top1 = smem_at<scalar_t>(smem, l.top1);
  h.top2 = smem_at<scalar_t>(smem, l.top2);
  h.idx1 = smem_at<int>(smem, l.idx1);
  h.idx2 = smem_at<int>(smem, l.idx2);
  h.inv_with = smem_at<double>(smem, l.inv_with);
  h.inv_without = smem_at<double>(smem, l.inv_without);
  h.sum_with = smem_at<double>(smem, l.sum_with);
  h.sum_without = smem_at<double>(smem, l.sum_without);
  h.g_with = smem_at<double>(smem, l.g_with);
  h.gtot_col = smem_at<double>(smem, l.gtot_col);
  h.gtot_row = smem_at<double>(smem, l.gtot_row);
  h.scalars = smem_at<double>(smem, l.scalars);
  const size_t pair = tb.pair;
  if (p.coef_pairs != nullptr && p.coef_pairs_t != nullptr) {  // paired backward
    h.coef_rows = text_rows ? p.coef_pairs + pair * tv : p.coef_pairs_t + pair * tv;
    h.coef_row = text_rows ? p.coef_text + pair * T : p.coef_image + pair * V;
    h.coef_col = text_rows ? p.coef_image + pair * V : p.coef_text + pair * T;
  } else {
    h.coef_rows = h.coef_row = h.coef_col = nullptr;
  }
  // backward accumulator: [grad via text half (T,V) | grad via image half (V,T) | grad text w (T) | grad image w (V)]
  h.acc_rows = text_rows ? tb.acc : tb.acc + tv;
  h.acc_w = text_rows ? tb.acc + 2 * tv : tb.acc + 2 * tv + T;
  return h;
}

// ---------------------------------------------------------------------------------------------------------------
// Similarity from token features

// sim[e] and sim_t[u*T + t] for the outputs e = t*V + u in [e_begin, e_end) (at most kSimOutputsPerPass) of one
// pair: sequential multiply-adds over d in ascending order in scalar_t (fp32 for fp32/fp16/bf16 tokens). Only the
// text rows of the pass are staged. Every thread of the CTA must call it: it synchronises.
template <typename scalar_t, typename token_t>
__device__ void similarity_pass(const token_t* __restrict__ text, const token_t* __restrict__ image, int T, int V,
                                int dim, int e_begin, int e_end, scalar_t* chunk, scalar_t* sim, scalar_t* sim_t) {
  const int tid = threadIdx.x;
  const int text_first = e_begin / V;
  const int text_rows = (e_end - 1) / V - text_first + 1;
  const int staged_rows = text_rows + V;
  scalar_t acc[kSimOutputsPerThread];
  int text_at[kSimOutputsPerThread], image_at[kSimOutputsPerThread];
#pragma unroll
  for (int j = 0; j < kSimOutputsPerThread; ++j) {
    acc[j] = scalar_t(0);
    // Threads past the end compute a duplicate of the last output and do not store it.
    const int e = min(e_begin + tid + j * kThreads, e_end - 1);
    const int t = e / V;
    text_at[j] = (t - text_first) * kChunkStride;
    image_at[j] = (text_rows + e - t * V) * kChunkStride;
  }
  for (int d0 = 0; d0 < dim; d0 += kDimChunk) {
    __syncthreads();  // the previous chunk has been consumed
    for (int i = tid; i < staged_rows * kDimChunk; i += kThreads) {
      const int row = i / kDimChunk, d = d0 + i % kDimChunk;
      const token_t* src =
          row < text_rows ? text + size_t(text_first + row) * dim : image + size_t(row - text_rows) * dim;
      chunk[row * kChunkStride + i % kDimChunk] = d < dim ? static_cast<scalar_t>(token_value(src[d])) : scalar_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kSimOutputsPerThread; ++j) {
      const scalar_t* x = chunk + text_at[j];
      const scalar_t* y = chunk + image_at[j];
#pragma unroll 8
      for (int d = 0; d < kDimChunk; ++d) acc[j] = multiply_add(x[d], y[d], acc[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < kSimOutputsPerThread; ++j) {
    const int e = e_begin + tid + j * kThreads;
    if (e < e_end) {
      const int t = e / V, u = e - t * V;
      sim[e] = acc[j];
      sim_t[size_t(u) * T + t] = acc[j];
    }
  }
}

// Scratch similarity for games whose similarity does not fit in shared memory: grid = B × passes per pair.
template <typename scalar_t, typename token_t>
__global__ void __launch_bounds__(kThreads) pair_similarity_kernel(const token_t* __restrict__ text,
                                                                   const token_t* __restrict__ image, int T, int V,
                                                                   int dim, int passes_per_pair, scalar_t* sim,
                                                                   scalar_t* sim_t) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int pair = blockIdx.x / passes_per_pair;
  const int e_begin = (blockIdx.x - pair * passes_per_pair) * kSimOutputsPerPass;
  const int e_end = min(e_begin + kSimOutputsPerPass, T * V);
  const size_t tv = size_t(T) * V;
  similarity_pass<scalar_t, token_t>(text + size_t(pair) * T * dim, image + size_t(pair) * V * dim, T, V, dim,
                                     e_begin, e_end, reinterpret_cast<scalar_t*>(smem), sim + pair * tv,
                                     sim_t + pair * tv);
}

// ---------------------------------------------------------------------------------------------------------------
// CTA setup and the coalition of a draw

// Valid bits, weights, the staged (or computed) similarity, and a zeroed accumulator. Ends with __syncthreads.
template <typename scalar_t, typename token_t, bool kFromTokens>
__device__ void load_pair(const PassParams& p, unsigned char* smem, const PairTables<scalar_t>& tb) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int T = p.text_len, V = p.image_len;
  const size_t pair = tb.pair, tv = size_t(T) * V;
  uint32_t* valid = smem_at<uint32_t>(smem, p.smem.valid_bits);
  for (int word = warp; word < kWords; word += kWarps) {
    const bool text = word < kTextWords;
    const int i = (text ? word : word - kTextWords) * 32 + lane;
    const bool in_range = i < (text ? T : V);
    const bool bit = in_range && (text ? p.text_valid[pair * T + i] : p.image_valid[pair * V + i]);
    const uint32_t bits = __ballot_sync(kFullMask, bit);
    if (lane == 0) valid[word] = bits;
  }
  double* text_w = smem_at<double>(smem, p.smem.text_w);
  double* image_w = smem_at<double>(smem, p.smem.image_w);
  for (int i = tid; i < T; i += kThreads) text_w[i] = p.text_w[pair * T + i];
  for (int i = tid; i < V; i += kThreads) image_w[i] = p.image_w[pair * V + i];
  scalar_t* sim = smem_at<scalar_t>(smem, p.smem.sim);
  scalar_t* sim_t = smem_at<scalar_t>(smem, p.smem.sim_t);
  if (kFromTokens) {
    const token_t* text = static_cast<const token_t*>(p.text_tokens) + pair * T * p.dim;
    const token_t* image = static_cast<const token_t*>(p.image_tokens) + pair * V * p.dim;
    scalar_t* chunk = smem_at<scalar_t>(smem, p.smem.gemm);
    for (int e0 = 0; e0 < T * V; e0 += kSimOutputsPerPass) {
      similarity_pass<scalar_t, token_t>(text, image, T, V, p.dim, e0, min(e0 + kSimOutputsPerPass, T * V), chunk,
                                         sim, sim_t);
    }
  } else if (sim != nullptr) {
    const scalar_t* src = static_cast<const scalar_t*>(p.sim) + pair * tv;
    for (int e = tid; e < T * V; e += kThreads) {
      const scalar_t s = src[e];
      const int t = e / V, u = e - t * V;
      sim[e] = s;
      sim_t[size_t(u) * T + t] = s;
    }
  }
  for (int e = tid; e < p.width; e += kThreads) tb.acc[e] = 0.0;
  __syncthreads();
}

// Phase 0: member bits (Philox stream of DESIGN §4.2, & valid) of draw `draw` into `bits`; one thread per
// 128-token chunk.
__device__ __forceinline__ void draw_coalition(const PassParams& p, int pair, uint32_t draw, uint32_t* bits,
                                               const uint32_t* valid) {
  const int text_chunks = (p.text_len + 127) >> 7, image_chunks = (p.image_len + 127) >> 7;
  const int tid = threadIdx.x;
  if (tid < text_chunks + image_chunks) {
    const bool text = tid < text_chunks;
    const int chunk = text ? tid : tid - text_chunks;
    const int words = ((text ? p.text_len : p.image_len) + 31) >> 5;
    const int offset = text ? 0 : kTextWords;
    const PhiloxWords r = philox4x32_10(draw, static_cast<uint32_t>(pair), text ? kTextSide : kImageSide,
                                        static_cast<uint32_t>(chunk), static_cast<uint32_t>(p.seed),
                                        static_cast<uint32_t>(p.seed >> 32));
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int i = chunk * 4 + w;
      if (i < words) bits[offset + i] = r.w[w] & valid[offset + i];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Phase A: top-two maxima per row

// W(A) of a half: lane-strided partial sums, then a butterfly (the same value in every warp).
__device__ __forceinline__ double member_weight_sum(const uint32_t* in, const double* w, int n) {
  double s = 0.0;
  for (int r = threadIdx.x & 31; r < n; r += 32) {
    if (test_bit(in, r)) s += w[r];
  }
  return warp_sum(s);
}

// Top-two maxima of row r over the column members, ascending column order with strict '>' (so the lowest index
// wins ties; the first two members fill the slots whatever their values), and the row's 1/W terms.
template <typename scalar_t, bool kInverses>
__device__ void prepare_row(const Half<scalar_t>& h, int r, double total_w) {
  scalar_t m1 = neg_inf<scalar_t>(), m2 = neg_inf<scalar_t>();
  int i1 = -1, i2 = -1;
  const int words = (h.cols + 31) >> 5;
  for (int word = 0; word < words; ++word) {
    uint32_t bits = h.col_in[word];
    while (bits != 0u) {
      const int c = (word << 5) + __ffs(bits) - 1;
      bits &= bits - 1u;
      const scalar_t s = h.sim_cols[size_t(c) * h.rows + r];
      if (i1 < 0 || s > m1) {
        m2 = m1, i2 = i1, m1 = s, i1 = c;
      } else if (i2 < 0 || s > m2) {
        m2 = s, i2 = c;
      }
    }
  }
  h.top1[r] = m1;
  h.top2[r] = m2;
  h.idx1[r] = i1;
  h.idx2[r] = i2;
  if (kInverses) {
    double inv_with = 0.0, inv_without = 0.0;
    if (test_bit(h.row_valid, r)) {
      const bool member = test_bit(h.row_in, r);
      const double w = h.w[r];
      inv_with = 1.0 / (total_w + (member ? 0.0 : w));
      inv_without = h.row_count - int(member) == 0 ? 0.0 : 1.0 / (total_w - (member ? w : 0.0));
    }
    h.inv_with[r] = inv_with;
    h.inv_without[r] = inv_without;
  }
}

// Phase A of both halves. W(A) of each half is computed redundantly by every warp (identical values) so the
// per-row inverses need no extra barrier; thread 0 publishes it for the later phases.
template <typename scalar_t, bool kInverses>
__device__ void prepare_rows(const Half<scalar_t>& text, const Half<scalar_t>& image) {
  const double text_total = member_weight_sum(text.row_in, text.w, text.rows);
  const double image_total = member_weight_sum(image.row_in, image.w, image.rows);
  if (threadIdx.x == 0) {
    text.scalars[kTotalW] = text_total;
    image.scalars[kTotalW] = image_total;
  }
  for (int i = threadIdx.x; i < text.rows + image.rows; i += kThreads) {
    if (i < text.rows) {
      prepare_row<scalar_t, kInverses>(text, i, text_total);
    } else {
      prepare_row<scalar_t, kInverses>(image, i - text.rows, image_total);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Phase B: column sums

template <typename scalar_t>
__device__ __forceinline__ bool column_out_empty(const Half<scalar_t>& h, int c) {  // C ∖ c = ∅
  return h.col_count - int(test_bit(h.col_in, c)) == 0;
}

// sum_with[c] = Σ_{r∈A} w_r max_{C∪c} S[r,·] and sum_without[c] = Σ_{r∈A} w_r max_{C∖c} S[r,·] (rows ascending).
template <typename scalar_t>
__device__ void column_sums(const Half<scalar_t>& h, int c) {
  double sum_with = 0.0, sum_without = 0.0;
  if (test_bit(h.col_valid, c)) {
    const bool out_empty = column_out_empty(h, c);
    const int words = (h.rows + 31) >> 5;
    for (int word = 0; word < words; ++word) {
      uint32_t bits = h.row_in[word];
      while (bits != 0u) {
        const int r = (word << 5) + __ffs(bits) - 1;
        bits &= bits - 1u;
        const scalar_t s = h.sim_rows[size_t(r) * h.cols + c];
        const scalar_t t1 = h.top1[r];
        const int i1 = h.idx1[r];
        const double w = h.w[r];
        const scalar_t m_with = (s > t1 || (s == t1 && c < i1)) ? s : t1;
        sum_with += w * double(m_with);
        if (!out_empty) sum_without += w * double(c == i1 ? h.top2[r] : t1);
      }
    }
  }
  h.sum_with[c] = sum_with;
  h.sum_without[c] = sum_without;
}

// Backward, after column_sums(h, c) in the same thread: the adjoint of sum_with[c] (that of sum_without[c] is its
// negation when C∖c ≠ ∅, else 0) and column c's part of the W(A) adjoint.
template <typename scalar_t>
__device__ void column_adjoints(const Half<scalar_t>& h, int c) {
  double g_with = 0.0, g_total = 0.0;
  if (test_bit(h.col_valid, c)) {
    const int words = (h.rows + 31) >> 5;
    for (int word = 0; word < words; ++word) {
      uint32_t bits = h.row_valid[word];
      while (bits != 0u) {
        const int r = (word << 5) + __ffs(bits) - 1;
        bits &= bits - 1u;
        g_with += h.coef_rows[size_t(r) * h.cols + c] * (h.inv_with[r] - h.inv_without[r]);
      }
    }
    if (h.row_count > 0) {  // column effect (sum_with − [sum_without]) / W(A)
      const double gc = h.coef_col[c];
      const double total_w = h.scalars[kTotalW];
      g_with += gc / total_w;
      g_total = -(gc * (h.sum_with[c] - (column_out_empty(h, c) ? 0.0 : h.sum_without[c])) / (total_w * total_w));
    }
  }
  h.g_with[c] = g_with;
  h.gtot_col[c] = g_total;
}

// Σ_{r∈A} w_r top1[r] (0 when C = ∅); warp-level.
template <typename scalar_t>
__device__ double member_top_sum(const Half<scalar_t>& h) {
  if (h.col_count == 0) return 0.0;
  double s = 0.0;
  for (int r = threadIdx.x & 31; r < h.rows; r += 32) {
    if (test_bit(h.row_in, r)) s += h.w[r] * double(h.top1[r]);
  }
  return warp_sum(s);
}

// Adjoint of sum_full: Σ_{valid r} coef_row[r] (1/W(A'∪r) − 1/W(A')) (0 when C = ∅); warp-level.
template <typename scalar_t>
__device__ double full_adjoint(const Half<scalar_t>& h) {
  if (h.col_count == 0) return 0.0;
  double s = 0.0;
  for (int r = threadIdx.x & 31; r < h.rows; r += 32) {
    if (test_bit(h.row_valid, r)) s += h.coef_row[r] * (h.inv_with[r] - h.inv_without[r]);
  }
  return warp_sum(s);
}

template <typename scalar_t, bool kBackward>
__device__ void column_phase(const Half<scalar_t>& text, const Half<scalar_t>& image) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // Warp-level sums first, one job per warp (sum_full of each half, and their adjoints in the backward), then one
  // thread per column of either half.
  for (int job = warp; job < (kBackward ? 4 : 2); job += kWarps) {
    if (job == 0) {
      const double s = member_top_sum(text);
      if (lane == 0) text.scalars[kSumFull] = s;
    } else if (job == 1) {
      const double s = member_top_sum(image);
      if (lane == 0) image.scalars[kSumFull] = s;
    } else if (job == 2) {
      const double s = full_adjoint(text);
      if (lane == 0) text.scalars[kGFull] = s;
    } else {
      const double s = full_adjoint(image);
      if (lane == 0) image.scalars[kGFull] = s;
    }
  }
  for (int i = threadIdx.x; i < text.cols + image.cols; i += kThreads) {
    if (i < text.cols) {
      column_sums(text, i);
      if (kBackward) column_adjoints(text, i);
    } else {
      column_sums(image, i - text.cols);
      if (kBackward) column_adjoints(image, i - text.cols);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Phase C, forward: one thread per accumulator element

// f(A'∪r, C'∪c) − f(A'∪r, C') − f(A', C'∪c) + f(A', C') for row r, column c of half h (HalfGame::accumulate).
template <typename scalar_t>
__device__ __forceinline__ double second_difference(const Half<scalar_t>& h, int r, int c, scalar_t s) {
  const scalar_t t1 = h.top1[r];
  const int i1 = h.idx1[r];
  const bool member = test_bit(h.row_in, r);
  const double w = h.w[r];
  const double join_w = member ? 0.0 : w, member_w = member ? w : 0.0;
  const double inv_with = h.inv_with[r], inv_without = h.inv_without[r];
  const double m_with = double((s > t1 || (s == t1 && c < i1)) ? s : t1);
  const double sum_with = h.sum_with[c];
  double sd = (sum_with + join_w * m_with) * inv_with - (sum_with - member_w * m_with) * inv_without;
  if (!column_out_empty(h, c)) {
    const double m_without = double(c == i1 ? h.top2[r] : t1);
    const double sum_without = h.sum_without[c];
    sd -= (sum_without + join_w * m_without) * inv_with - (sum_without - member_w * m_without) * inv_without;
  }
  return sd;
}

// f(A'∪r, C) − f(A', C) (used when C ≠ ∅).
template <typename scalar_t>
__device__ __forceinline__ double row_effect(const Half<scalar_t>& h, int r) {
  const bool member = test_bit(h.row_in, r);
  const double w = h.w[r];
  const double join_w = member ? 0.0 : w, member_w = member ? w : 0.0;
  const double sum_full = h.scalars[kSumFull], top = double(h.top1[r]);
  return (sum_full + join_w * top) * h.inv_with[r] - (sum_full - member_w * top) * h.inv_without[r];
}

// f(A, C∪c) − f(A, C∖c) (used when A ≠ ∅).
template <typename scalar_t>
__device__ __forceinline__ double column_effect(const Half<scalar_t>& h, int c) {
  return (h.sum_with[c] - (column_out_empty(h, c) ? 0.0 : h.sum_without[c])) / h.scalars[kTotalW];
}

// acc = [interaction T·V | text value T | image value V], each element owned by one thread; the order of the
// additions per element is the C++ order (text half, then image half).
template <typename scalar_t>
__device__ void accumulate_forward(const Half<scalar_t>& text, const Half<scalar_t>& image,
                                   const PairTables<scalar_t>& tb) {
  const int T = tb.text_len, V = tb.image_len, TV = T * V;
  double* acc = tb.acc;
  for (int e = threadIdx.x; e < TV + T + V; e += kThreads) {
    if (e < TV) {
      const int t = e / V, u = e - t * V;
      if (!test_bit(text.row_valid, t) || !test_bit(image.row_valid, u)) continue;
      const scalar_t s = tb.sim[e];
      double a = acc[e];
      a += second_difference(text, t, u, s);
      a += second_difference(image, u, t, s);
      acc[e] = a;
    } else if (e < TV + T) {
      const int t = e - TV;
      if (!test_bit(text.row_valid, t)) continue;
      double a = acc[e];
      if (text.col_count > 0) a += row_effect(text, t);
      if (image.row_count > 0) a += column_effect(image, t);
      acc[e] = a;
    } else {
      const int u = e - TV - T;
      if (!test_bit(image.row_valid, u)) continue;
      double a = acc[e];
      if (text.row_count > 0) a += column_effect(text, u);
      if (image.col_count > 0) a += row_effect(image, u);
      acc[e] = a;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Phase C, backward: one warp per row (HalfGame::backward, passes 1 and 2 except the W(A) adjoint)

template <typename scalar_t>
__device__ void backward_row(const Half<scalar_t>& h, int r, int lane) {
  const bool member = test_bit(h.row_in, r);
  const double w = h.w[r];
  const double join_w = member ? 0.0 : w, member_w = member ? w : 0.0;
  const double inv_with = h.inv_with[r], inv_without = h.inv_without[r];
  const double scale = join_w * inv_with + member_w * inv_without;  // d f / d (the row's max entries)
  const scalar_t t1 = h.top1[r], t2 = h.top2[r];
  const int i1 = h.idx1[r], i2 = h.idx2[r];
  const scalar_t* sim_row = h.sim_rows + size_t(r) * h.cols;
  const double* coef_row = h.coef_rows + size_t(r) * h.cols;
  double* acc_row = h.acc_rows + size_t(r) * h.cols;
  // Lane-strided partial sums: adjoints of W(A) (g_total) and of w_r (g_own + g_w), gradients to top1/top2.
  double g_total = 0.0, g_own = 0.0, g_w = 0.0, to_first = 0.0, to_second = 0.0;
  for (int c = lane; c < h.cols; c += 32) {
    if (!test_bit(h.col_valid, c)) continue;
    const scalar_t s = sim_row[c];
    const bool wins = s > t1 || (s == t1 && c < i1);  // max over C∪c comes from column c itself
    const double m_with = double(wins ? s : t1);
    const bool out_empty = column_out_empty(h, c);
    const bool drop_top = c == i1;  // max over C∖c falls back to top2
    const double m_without = double(drop_top ? t2 : t1);
    const double g = coef_row[c];
    const double sum_with = h.sum_with[c], sum_without = h.sum_without[c];
    double direct = 0.0;
    // Pass 1: +g·f11 − g·f01 ...
    const double f11 = (sum_with + join_w * m_with) * inv_with;
    const double f01 = (sum_with - member_w * m_with) * inv_without;
    g_total += g * (f01 * inv_without - f11 * inv_with);
    g_own += member ? g * (m_with - f01) * inv_without : g * (m_with - f11) * inv_with;
    if (wins) {
      direct += g * scale;
    } else {
      to_first += g * scale;
    }
    if (!out_empty) {  // ... − g·f10 + g·f00
      const double f10 = (sum_without + join_w * m_without) * inv_with;
      const double f00 = (sum_without - member_w * m_without) * inv_without;
      g_total -= g * (f00 * inv_without - f10 * inv_with);
      g_own -= member ? g * (m_without - f00) * inv_without : g * (m_without - f10) * inv_with;
      if (drop_top) {
        to_second -= g * scale;
      } else {
        to_first -= g * scale;
      }
    }
    // Pass 2: the column sums are sums over the member rows.
    if (member) {
      const double gw = h.g_with[c];
      g_w += gw * m_with;
      if (wins) {
        direct += gw * w;
      } else {
        to_first += gw * w;
      }
      if (!out_empty) {
        const double gwo = -gw;
        g_w += gwo * m_without;
        if (drop_top) {
          to_second += gwo * w;
        } else {
          to_first += gwo * w;
        }
      }
    }
    acc_row[c] += direct;
  }
  g_total = warp_sum(g_total);
  g_own = warp_sum(g_own);
  g_w = warp_sum(g_w);
  to_first = warp_sum(to_first);
  to_second = warp_sum(to_second);
  __syncwarp();  // the lanes' writes to acc_row are visible before lane 0 adds to top1/top2 entries
  if (lane == 0) {
    if (h.col_count > 0) {  // row effect, and pass 2 through sum_full
      const double gr = h.coef_row[r];
      const double sum_full = h.scalars[kSumFull], top = double(t1);
      const double f1 = (sum_full + join_w * top) * inv_with;
      const double f0 = (sum_full - member_w * top) * inv_without;
      g_total += gr * (f0 * inv_without - f1 * inv_with);
      g_own += member ? gr * (top - f0) * inv_without : gr * (top - f1) * inv_with;
      to_first += gr * scale;
      if (member) {
        const double g_full = h.scalars[kGFull];
        g_w += g_full * top;
        to_first += g_full * w;
      }
    }
    h.gtot_row[r] = g_total;
    h.acc_w[r] += g_own + g_w;
    if (i1 >= 0) acc_row[i1] += to_first;
    if (i2 >= 0) acc_row[i2] += to_second;
  }
}

template <typename scalar_t>
__device__ void backward_rows(const Half<scalar_t>& text, const Half<scalar_t>& image) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int i = warp; i < text.rows + image.rows; i += kWarps) {
    if (i < text.rows) {
      if (test_bit(text.row_valid, i)) backward_row(text, i, lane);
    } else {
      const int u = i - text.rows;
      if (test_bit(image.row_valid, u)) backward_row(image, u, lane);
    }
  }
}

// Phase D: the W(A) adjoint of a draw, Σ over rows and columns of its parts (the same value in every warp), added
// to the weight gradient of every member row.
template <typename scalar_t>
__device__ double total_weight_adjoint(const Half<scalar_t>& h) {
  double s = 0.0;
  for (int r = threadIdx.x & 31; r < h.rows; r += 32) {
    if (test_bit(h.row_valid, r)) s += h.gtot_row[r];
  }
  for (int c = threadIdx.x & 31; c < h.cols; c += 32) s += h.gtot_col[c];
  return warp_sum(s);
}

template <typename scalar_t>
__device__ void finish_weight_gradients(const Half<scalar_t>& text, const Half<scalar_t>& image) {
  const double text_total = total_weight_adjoint(text), image_total = total_weight_adjoint(image);
  for (int i = threadIdx.x; i < text.rows + image.rows; i += kThreads) {
    if (i < text.rows) {
      if (test_bit(text.row_in, i)) text.acc_w[i] += text_total;
    } else {
      const int u = i - text.rows;
      if (test_bit(image.row_in, u)) image.acc_w[u] += image_total;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// msr

// f(A, C) of a half from warp-level sums (0 when A or C is empty).
template <typename scalar_t>
__device__ double half_value(const Half<scalar_t>& h, double* total_w, double* sum_full) {
  *total_w = member_weight_sum(h.row_in, h.w, h.rows);
  *sum_full = member_top_sum(h);
  return (h.row_count > 0 && h.col_count > 0) ? *sum_full / *total_w : 0.0;
}

// acc = [Σ v over the draws with i∈A, j∈C (T·V) | i∈A (T) | j∈C (V) | all (1)] then the same counts.
__device__ void accumulate_msr_sums(double* acc, int T, int V, double v, const uint32_t* text_in,
                                    const uint32_t* image_in) {
  const int TV = T * V, stride = TV + T + V + 1;
  for (int e = threadIdx.x; e < stride; e += kThreads) {
    bool in;
    if (e < TV) {
      const int t = e / V;
      in = test_bit(text_in, t) && test_bit(image_in, e - t * V);
    } else if (e < TV + T) {
      in = test_bit(text_in, e - TV);
    } else if (e < TV + T + V) {
      in = test_bit(image_in, e - TV - T);
    } else {
      in = true;
    }
    if (in) {
      acc[e] += v;
      acc[stride + e] += 1.0;
    }
  }
}

// Row i < T of dL/dv for this draw: Σ_j coef[2·[i∈A] + [j∈C]][j][i] + coef_text[[i∈A]][i]; row T: the image
// terms Σ_j coef_image[[j∈C]][j].
__device__ double msr_coefficient_row(const PassParams& p, int pair, int i, const uint32_t* text_in,
                                      const uint32_t* image_in) {
  const int T = p.text_len, V = p.image_len;
  const size_t tv = size_t(T) * V;
  double s = 0.0;
  if (i < T) {
    const bool in_a = test_bit(text_in, i);
    const double* coef = p.coef_pairs + size_t(pair) * 4 * tv + (in_a ? 2 * tv : 0) + i;
    for (int j = 0; j < V; ++j) s += coef[(test_bit(image_in, j) ? tv : 0) + size_t(j) * T];
    return s + p.coef_text[size_t(pair) * 2 * T + (in_a ? T : 0) + i];
  }
  const double* coef = p.coef_image + size_t(pair) * 2 * V;
  for (int j = 0; j < V; ++j) s += coef[(test_bit(image_in, j) ? V : 0) + j];
  return s;
}

// Gradient of coef·f(A, C) of a half (HalfGame::value_backward); one thread per row.
template <typename scalar_t>
__device__ __forceinline__ void value_backward_row(const Half<scalar_t>& h, int r, double coef, double total_w,
                                                   double value) {
  if (h.row_count == 0 || h.col_count == 0 || !test_bit(h.row_in, r)) return;
  h.acc_rows[size_t(r) * h.cols + h.idx1[r]] += coef * h.w[r] / total_w;
  h.acc_w[r] += coef * (double(h.top1[r]) - value) / total_w;
}

// ---------------------------------------------------------------------------------------------------------------
// The pass kernel: grid = B × slices, one CTA per (pair, slice of draws)

template <typename scalar_t, typename token_t, bool kFromTokens, int kPass>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) banzhaf_pass_kernel(const PassParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int pair = blockIdx.x / p.slices;
  const int slice = blockIdx.x - pair * p.slices;
  const uint64_t k_begin = min(uint64_t(slice) * p.draws_per_slice, uint64_t(p.num_samples));
  const uint64_t k_end = min(k_begin + p.draws_per_slice, uint64_t(p.num_samples));
  const int tid = threadIdx.x;
  const int T = p.text_len, V = p.image_len;
  const PairTables<scalar_t> tb = pair_tables<scalar_t>(p, smem, pair);
  load_pair<scalar_t, token_t, kFromTokens>(p, smem, tb);
  uint32_t* draw_bits = smem_at<uint32_t>(smem, p.smem.draw_bits);
  const uint32_t* valid = smem_at<uint32_t>(smem, p.smem.valid_bits);

  for (uint64_t k = k_begin; k < k_end; ++k) {
    const int parity = int((k - k_begin) & 1u);
    // Phase 0 (bits of draw k go to the buffer the previous draw did not use).
    draw_coalition(p, pair, static_cast<uint32_t>(k), draw_bits + parity * kWords, valid);
    __syncthreads();
    if (kPass == kPairedBackward && k > k_begin) {
      // Phase D of the previous draw, beside phase A of this one: it reads the previous bits and W(A) adjoint
      // parts (untouched until phase B) and writes weight gradients (next written in phase C).
      finish_weight_gradients(make_half(p, smem, tb, true, parity ^ 1, 0, 0),
                              make_half(p, smem, tb, false, parity ^ 1, 0, 0));
    }
    const uint32_t* bits = draw_bits + parity * kWords;
    const int text_members = count_members(bits, T);
    const int image_members = count_members(bits + kTextWords, V);
    const Half<scalar_t> text = make_half(p, smem, tb, true, parity, text_members, image_members);
    const Half<scalar_t> image = make_half(p, smem, tb, false, parity, text_members, image_members);

    if (kPass == kPairedForward || kPass == kPairedBackward) {
      prepare_rows<scalar_t, true>(text, image);
      __syncthreads();
      column_phase<scalar_t, kPass == kPairedBackward>(text, image);
      __syncthreads();
      if (kPass == kPairedForward) {
        accumulate_forward(text, image, tb);
      } else {
        backward_rows(text, image);
      }
    } else if (kPass == kMsrSums) {
      prepare_rows<scalar_t, false>(text, image);
      __syncthreads();
      double text_total, text_full, image_total, image_full;
      const double text_value = half_value(text, &text_total, &text_full);
      const double v = 0.5 * (text_value + half_value(image, &image_total, &image_full));
      accumulate_msr_sums(tb.acc, T, V, v, bits, bits + kTextWords);
    } else {  // kMsrBackward
      double* row_sums = smem_at<double>(smem, p.smem.row_sums);
      for (int i = tid; i < (T + 1) + T + V; i += kThreads) {
        if (i <= T) {
          row_sums[i] = msr_coefficient_row(p, pair, i, bits, bits + kTextWords);
        } else if (i < 2 * T + 1) {
          prepare_row<scalar_t, false>(text, i - (T + 1), 0.0);
        } else {
          prepare_row<scalar_t, false>(image, i - (2 * T + 1), 0.0);
        }
      }
      __syncthreads();
      double coef = 0.0;
      for (int i = tid & 31; i <= T; i += 32) coef += row_sums[i];
      coef = 0.5 * warp_sum(coef);
      double text_total, text_full, image_total, image_full;
      const double text_value = half_value(text, &text_total, &text_full);
      const double image_value = half_value(image, &image_total, &image_full);
      for (int i = tid; i < T + V; i += kThreads) {
        if (i < T) {
          value_backward_row(text, i, coef, text_total, text_value);
        } else {
          value_backward_row(image, i - T, coef, image_total, image_value);
        }
      }
    }
  }
  if (kPass == kPairedBackward && k_end > k_begin) {
    __syncthreads();
    const int parity = int((k_end - 1 - k_begin) & 1u);
    finish_weight_gradients(make_half(p, smem, tb, true, parity, 0, 0), make_half(p, smem, tb, false, parity, 0, 0));
  }
  __syncthreads();
  if (p.smem.acc >= 0) {
    double* slot = p.partial + size_t(blockIdx.x) * p.width;
    for (int e = tid; e < p.width; e += kThreads) slot[e] = tb.acc[e];
  }
}

// out[b, x] = Σ_s partial[b, s, x], slices in ascending order.
__global__ void reduce_slices_kernel(const double* __restrict__ partial, int64_t batch, int64_t slices,
                                     int64_t width, double* __restrict__ out) {
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= batch * width) return;
  const int64_t b = index / width, x = index - b * width;
  const double* src = partial + b * slices * width + x;
  double s = 0.0;
  for (int64_t i = 0; i < slices; ++i) s += src[i * width];
  out[index] = s;
}

// ---- Host: launch entry points ----------------------------------------------------------------------------------

template <typename Kernel>
cudaError_t allow_shared_memory(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <typename scalar_t, typename token_t, bool kFromTokens, int kPass>
cudaError_t launch_pass_kernel(const PassParams& p, int64_t grid, cudaStream_t stream) {
  auto kernel = banzhaf_pass_kernel<scalar_t, token_t, kFromTokens, kPass>;
  const cudaError_t status = allow_shared_memory(kernel, p.smem.total);
  if (status != cudaSuccess) return status;
  kernel<<<static_cast<unsigned>(grid), kThreads, p.smem.total, stream>>>(p);
  return cudaGetLastError();
}

template <typename scalar_t, typename token_t, bool kFromTokens>
cudaError_t launch_for_pass(int pass, const PassParams& p, int64_t grid, cudaStream_t stream) {
  switch (pass) {
    case kPairedForward:
      return launch_pass_kernel<scalar_t, token_t, kFromTokens, kPairedForward>(p, grid, stream);
    case kMsrSums:
      return launch_pass_kernel<scalar_t, token_t, kFromTokens, kMsrSums>(p, grid, stream);
    case kPairedBackward:  // backward passes read the similarity (the fused op has no backward of its own)
      if constexpr (!kFromTokens) {
        return launch_pass_kernel<scalar_t, scalar_t, false, kPairedBackward>(p, grid, stream);
      }
      break;
    case kMsrBackward:
      if constexpr (!kFromTokens) {
        return launch_pass_kernel<scalar_t, scalar_t, false, kMsrBackward>(p, grid, stream);
      }
      break;
    default:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace banzhaf_cuda

using namespace banzhaf_cuda;

int64_t banzhaf_cuda_max_text_tokens() { return kMaxTextTokens; }
int64_t banzhaf_cuda_max_image_tokens() { return kMaxImageTokens; }

// Whether the pass keeps the pair's similarity in shared memory (then the CTA computes it from tokens itself, and
// the transposed copy in global memory is not needed).
bool banzhaf_cuda_similarity_in_smem(int pass, bool use_double, int64_t text_len, int64_t image_len,
                                     bool from_tokens, int64_t width) {
  const SmemLayout layout = plan_shared_memory(pass, use_double ? 8 : 4, static_cast<int>(text_len),
                                               static_cast<int>(image_len), from_tokens, width);
  return layout.sim >= 0;
}

// sim[B,T,V] and sim_t[B,V,T] (float, or double when use_double) from text[B,T,D], image[B,V,D] of token_type.
cudaError_t launch_banzhaf_pair_similarity(const void* text, const void* image, int token_type, bool use_double,
                                           int64_t batch, int64_t text_len, int64_t image_len, int64_t dim,
                                           void* sim, void* sim_t, cudaStream_t stream) {
  const int T = static_cast<int>(text_len), V = static_cast<int>(image_len), D = static_cast<int>(dim);
  const int64_t passes = (text_len * image_len + kSimOutputsPerPass - 1) / kSimOutputsPerPass;
  const int64_t grid = batch * passes;
  if (grid == 0) return cudaSuccess;
  if (grid > INT32_MAX) return cudaErrorInvalidValue;
  const int bytes = similarity_chunk_rows(T, V) * kChunkStride * (use_double ? 8 : 4);
  auto run = [&](auto kernel, auto* out, auto* out_t, const auto* text_in, const auto* image_in) {
    cudaError_t status = allow_shared_memory(kernel, bytes);
    if (status != cudaSuccess) return status;
    kernel<<<static_cast<unsigned>(grid), kThreads, bytes, stream>>>(text_in, image_in, T, V, D,
                                                                      static_cast<int>(passes), out, out_t);
    return cudaGetLastError();
  };
  float* simf = static_cast<float*>(sim);
  float* simf_t = static_cast<float*>(sim_t);
  switch (token_type) {
    case kFloatTokens:
      if (use_double) break;
      return run(pair_similarity_kernel<float, float>, simf, simf_t, static_cast<const float*>(text),
                 static_cast<const float*>(image));
    case kHalfTokens:
      if (use_double) break;
      return run(pair_similarity_kernel<float, __half>, simf, simf_t, static_cast<const __half*>(text),
                 static_cast<const __half*>(image));
    case kBFloat16Tokens:
      if (use_double) break;
      return run(pair_similarity_kernel<float, __nv_bfloat16>, simf, simf_t,
                 static_cast<const __nv_bfloat16*>(text), static_cast<const __nv_bfloat16*>(image));
    case kDoubleTokens:
      if (!use_double) break;
      return run(pair_similarity_kernel<double, double>, static_cast<double*>(sim), static_cast<double*>(sim_t),
                 static_cast<const double*>(text), static_cast<const double*>(image));
    default:
      break;
  }
  return cudaErrorInvalidValue;
}

// One pass over all (pair, slice) work items, writing partial[B, slices, width] (see PassParams for the inputs of
// each pass). token_type is kNoTokens to read sim/sim_t, else the CTA computes its similarity from the tokens (only
// for forward passes whose similarity fits in shared memory: banzhaf_cuda_similarity_in_smem).
cudaError_t launch_banzhaf_pass(int pass, bool use_double, int token_type, const void* sim, const void* sim_t,
                                const void* text_tokens, const void* image_tokens, int64_t dim,
                                const bool* text_valid, const bool* image_valid, const double* text_w,
                                const double* image_w, const double* coef_pairs, const double* coef_pairs_t,
                                const double* coef_text, const double* coef_image, int64_t batch, int64_t text_len,
                                int64_t image_len, int64_t num_samples, uint64_t seed, int64_t slices,
                                int64_t width, double* partial, cudaStream_t stream) {
  if (text_len < 1 || image_len < 1 || text_len > kMaxTextTokens || image_len > kMaxImageTokens || slices < 1 ||
      num_samples < 1 || num_samples > UINT32_MAX || batch * slices > INT32_MAX || width > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  if (batch == 0) return cudaSuccess;
  const bool from_tokens = token_type != kNoTokens;
  PassParams p;
  p.sim = sim;
  p.sim_t = sim_t;
  p.text_tokens = text_tokens;
  p.image_tokens = image_tokens;
  p.text_valid = text_valid;
  p.image_valid = image_valid;
  p.text_w = text_w;
  p.image_w = image_w;
  p.coef_pairs = coef_pairs;
  p.coef_pairs_t = pass == kPairedBackward ? coef_pairs_t : nullptr;
  p.coef_text = coef_text;
  p.coef_image = coef_image;
  p.partial = partial;
  p.seed = seed;
  p.num_samples = static_cast<uint32_t>(num_samples);
  p.draws_per_slice = static_cast<uint32_t>((num_samples + slices - 1) / slices);
  p.text_len = static_cast<int>(text_len);
  p.image_len = static_cast<int>(image_len);
  p.dim = static_cast<int>(dim);
  p.slices = static_cast<int>(slices);
  p.width = static_cast<int>(width);
  p.smem = plan_shared_memory(pass, use_double ? 8 : 4, p.text_len, p.image_len, from_tokens, width);
  if (from_tokens && p.smem.sim < 0) return cudaErrorInvalidValue;
  if (!from_tokens && p.smem.sim < 0 && sim_t == nullptr) return cudaErrorInvalidValue;
  const int64_t grid = batch * slices;
  if (use_double) {
    switch (token_type) {
      case kNoTokens:
        return launch_for_pass<double, double, false>(pass, p, grid, stream);
      case kDoubleTokens:
        return launch_for_pass<double, double, true>(pass, p, grid, stream);
      default:
        return cudaErrorInvalidValue;
    }
  }
  switch (token_type) {
    case kNoTokens:
      return launch_for_pass<float, float, false>(pass, p, grid, stream);
    case kFloatTokens:
      return launch_for_pass<float, float, true>(pass, p, grid, stream);
    case kHalfTokens:
      return launch_for_pass<float, __half, true>(pass, p, grid, stream);
    case kBFloat16Tokens:
      return launch_for_pass<float, __nv_bfloat16, true>(pass, p, grid, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// out[B, width] = partial[B, slices, width] summed over the slices in order.
cudaError_t launch_banzhaf_reduce_slices(const double* partial, int64_t batch, int64_t slices, int64_t width,
                                         double* out, cudaStream_t stream) {
  const int64_t total = batch * width;
  if (total == 0) return cudaSuccess;
  constexpr int kReduceThreads = 256;
  const int64_t blocks = (total + kReduceThreads - 1) / kReduceThreads;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  reduce_slices_kernel<<<static_cast<unsigned>(blocks), kReduceThreads, 0, stream>>>(partial, batch, slices, width,
                                                                                      out);
  return cudaGetLastError();
}

}  // namespace cbd_fast
