// All-pairs fine-grained score (MaxSim / WTI, DESIGN §5), CUDA.
//
//   s[a,b] = ½ ( Σ_t α[a,t] · max_{u valid} ⟨X[a,t], Y[b,u]⟩ + Σ_u β[b,u] · max_{t valid} ⟨X[a,t], Y[b,u]⟩ )
//
// Forward (maxsim_pairs_kernel): one CTA per rectangle of whole pairs, a block of texts × a block of images.
// The rectangle's similarities are computed chunk by chunk (kBM text tokens × kBN image tokens: tensor cores
// with fp32 accumulation for half inputs, register-tiled FMA for fp32/fp64) into shared memory and folded at
// once into running row maxima (per text token and image) and column maxima (per image token and text). No
// chunk outlives its reduction: the only global output is score[Bt, Bi].
//
// Backward: the same kernel runs again and, instead of the score, writes per pair the arg-max of every row and
// column, the maxima, and the inverse maps (for each text token the image tokens whose column max it is, and
// for each image token the text tokens whose row max it is) as int16 lists: O(Bt·Bi·(T+V)) transient memory,
// never O(Bt·Bi·T·V). Then maxsim_gather_kernel runs once per side: a CTA per (text, slice of D) sums the
// gradient rows of that text over all images in index order (and the mirror image for images). No atomics.
//
// Semantics are those of csrc/cpu/maxsim_cpu.cpp: invalid tokens never enter a max or a sum; a term whose other
// side has no valid token is 0; ties in a max go to the lowest index, the one entry the gradient flows through.
//
// Determinism: every similarity is one dot product whose summation order depends only on D (not on where the
// chunk lies), maxima are exact, and every output element is reduced in a fixed order by the thread or warp
// that owns it, so results are bitwise reproducible and do not depend on how pairs are grouped into CTAs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>

namespace cbd_fast {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Running maxima one rectangle may keep in shared memory: rows·images + texts·columns entries.
constexpr int kRunningBudget = 4096;
// Texts and images per rectangle are searched up to this many.
constexpr int kMaxItemsPerRect = 128;
// Consecutive CTAs take this many text blocks against the same image block, so that the working set of
// concurrently running CTAs stays in L2.
constexpr int kRasterGroup = 8;

// Dtype codes shared with maxsim_launch.cpp.
constexpr int kDtypeFloat32 = 0, kDtypeFloat64 = 1, kDtypeFloat16 = 2, kDtypeBFloat16 = 3;

// ---------------------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------------------

template <typename in_t>
struct AccumulatorOf {
  using type = float;  // fp32 and half inputs accumulate in fp32
};
template <>
struct AccumulatorOf<double> {
  using type = double;
};

__device__ __forceinline__ float negative_infinity(float) { return -CUDART_INF_F; }
__device__ __forceinline__ double negative_infinity(double) { return -CUDART_INF; }

__device__ __forceinline__ float to_accumulator(float x) { return x; }
__device__ __forceinline__ double to_accumulator(double x) { return x; }
__device__ __forceinline__ float to_accumulator(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_accumulator(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  // Butterfly: every lane ends with the same value, summed in the same fixed order.
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// N consecutive elements of T, aligned so that shared-memory loads and stores of it are single vector accesses.
template <typename T, int N>
struct alignas(sizeof(T) * N) Packet {
  T v[N];
};

__host__ __device__ constexpr size_t align_up(size_t x, size_t alignment) {
  return (x + alignment - 1) / alignment * alignment;
}

// ---------------------------------------------------------------------------------------------------------
// Similarity chunk: S[r][c] = <rows[r], cols[c]> for r < kBM, c < kBN, into shared memory.
//
// Rows past n_rows and columns past n_cols are computed from zero operands (S = 0 there); the reductions never
// read them as valid. Both tiles start and end with __syncthreads(): on entry the work area may still be read
// by the previous chunk's reductions (the caller syncs before calling), on exit S is complete for every thread.
// The work area holds the double-buffered operand stages during the k loop and S afterwards.
// ---------------------------------------------------------------------------------------------------------

// Asynchronous global -> shared copy of kBytes (4, 8 or 16) bytes, in flight until wait_async_copies(). An
// invalid source fills the destination with zeros (src must still be a mapped address; it is not read).
template <int kBytes>
__device__ __forceinline__ void copy_async(void* dst, const void* src, bool valid) {
  const unsigned dst_address = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int src_bytes = valid ? kBytes : 0;
  if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_address), "l"(src), "r"(src_bytes)
                 : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst_address), "l"(src), "n"(kBytes),
                 "r"(src_bytes)
                 : "memory");
  }
}

__device__ __forceinline__ void wait_async_copies() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Eight consecutive half-precision elements row[k..k+8) as raw bits, zeros past dim, by scalar loads: the path
// for rows that are not 16-byte aligned (dim % 8 != 0).
template <typename in_t>
__device__ __forceinline__ uint4 load_eight_scalar(const in_t* __restrict__ row, int k, int dim) {
  const unsigned short* bits = reinterpret_cast<const unsigned short*>(row);
  uint32_t words[4];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const int k0 = k + 2 * w;
    const uint32_t lo = k0 < dim ? bits[k0] : 0u;
    const uint32_t hi = k0 + 1 < dim ? bits[k0 + 1] : 0u;
    words[w] = lo | (hi << 16);  // little endian: the lower address is the low half
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// Half inputs (fp16 / bf16): nvcuda::wmma 16x16x16 with fp32 accumulation. 8 warps as 2 (rows) x 4 (columns),
// each computing a 64x32 block as 4x2 fragments.
template <typename in_t>
struct WmmaTile {
  using acc_t = float;
  static constexpr int kBM = 128, kBN = 128, kBK = 32;
  static constexpr int kLdOperand = kBK + 8;  // elements; rows stay 16-byte aligned, fragment loads spread banks
  static constexpr int kLdS = kBN + 4;        // floats; 4 mod 32 keeps the row reduction conflict-free
  static constexpr size_t kOperandBytes = size_t(2) * (kBM + kBN) * kLdOperand * sizeof(in_t);
  static constexpr size_t kSBytes = size_t(kBM) * kLdS * sizeof(float);
  static constexpr size_t kWorkBytes = kOperandBytes > kSBytes ? kOperandBytes : kSBytes;
  static_assert(kBM * kBK / 8 == 2 * kThreads && kBN * kBK / 8 == 2 * kThreads, "two 8-element loads per thread");

  __device__ static void compute(unsigned char* work, const in_t* __restrict__ rows, int n_rows,
                                 const in_t* __restrict__ cols, int n_cols, int dim, bool vector_ok) {
    using namespace nvcuda;
    in_t* a_stages = reinterpret_cast<in_t*>(work);  // [2][kBM][kLdOperand]
    in_t* b_stages = a_stages + 2 * kBM * kLdOperand;  // [2][kBN][kLdOperand]
    float* S = reinterpret_cast<float*>(work);         // [kBM][kLdS], after the k loop
    const int tid = threadIdx.x, warp = tid >> 5;

    // Each thread moves two 8-element vectors of each operand per k step: vector v covers row v/4, k (v%4)*8.
    int load_row[2], load_k[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int v = tid + i * kThreads;
      load_row[i] = v >> 2;
      load_k[i] = (v & 3) * 8;
    }
    // Operand slice of k step k0 into a stage: asynchronous 16-byte copies when rows are 16-byte aligned
    // (vector_ok), else synchronous scalar loads.
    auto load_stage = [&](int stage, int k0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int offset = (stage * kBM + load_row[i]) * kLdOperand + load_k[i];
        const int k = k0 + load_k[i];
        const bool a_in = load_row[i] < n_rows, b_in = load_row[i] < n_cols;  // kBN == kBM: same offsets
        const in_t* a_row = rows + int64_t(a_in ? load_row[i] : 0) * dim;
        const in_t* b_row = cols + int64_t(b_in ? load_row[i] : 0) * dim;
        if (vector_ok) {
          copy_async<16>(a_stages + offset, a_row + (k < dim ? k : 0), a_in && k < dim);
          copy_async<16>(b_stages + offset, b_row + (k < dim ? k : 0), b_in && k < dim);
        } else {
          const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
          *reinterpret_cast<uint4*>(a_stages + offset) = a_in ? load_eight_scalar(a_row, k, dim) : zero;
          *reinterpret_cast<uint4*>(b_stages + offset) = b_in ? load_eight_scalar(b_row, k, dim) : zero;
        }
      }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    }
    const int warp_row = (warp >> 2) * 64, warp_col = (warp & 3) * 32;
    const bool warp_has_work = warp_row < n_rows && warp_col < n_cols;  // warp-uniform
    const int num_k_steps = (dim + kBK - 1) / kBK;

    load_stage(0, 0);
    wait_async_copies();
    __syncthreads();
    for (int step = 0; step < num_k_steps; ++step) {
      const int stage = step & 1;
      // The other stage was last read before the previous barrier: refill it while this one is multiplied.
      if (step + 1 < num_k_steps) load_stage(stage ^ 1, (step + 1) * kBK);
      if (warp_has_work) {
        const in_t* a_base = a_stages + (stage * kBM + warp_row) * kLdOperand;
        const in_t* b_base = b_stages + (stage * kBN + warp_col) * kLdOperand;
#pragma unroll
        for (int kk = 0; kk < kBK; kk += 16) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, in_t, wmma::col_major> b_frag[2];
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b_frag[j], b_base + j * 16 * kLdOperand + kk, kLdOperand);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, in_t, wmma::row_major> a_frag;
            wmma::load_matrix_sync(a_frag, a_base + i * 16 * kLdOperand + kk, kLdOperand);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a_frag, b_frag[j], acc[i][j]);
          }
        }
      }
      wait_async_copies();
      __syncthreads();  // the next stage has landed, and nobody reads this one any more
    }
    // The barrier above also retired the operand stages, which S overwrites.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(S + (warp_row + i * 16) * kLdS + warp_col + j * 16, acc[i][j], kLdS,
                                wmma::mem_row_major);
      }
    }
    __syncthreads();
  }
};

// fp32 / fp64 inputs: register-tiled FMA in the input precision. A thread computes kTM x kTN outputs, as two
// runs of kTM/2 rows (one in each half of the tile) by two runs of kTN/2 columns, so that its shared-memory
// reads are vector loads without bank conflicts. Each similarity is a sequential FMA chain over k.
template <typename acc_t>
struct FmaTile {
  static constexpr int kBM = sizeof(acc_t) == 4 ? 128 : 64, kBN = kBM, kBK = 16;
  static constexpr int kTM = kBM / 16, kTN = kBN / 16;  // 16 x 16 threads
  static constexpr int kRun = kTM / 2;
  static constexpr int kLdOperand = kBM + 4;  // operands stored transposed, [k][row]
  static constexpr int kLdS = kBN + 4;
  static constexpr int kLoads = kBM * kBK / kThreads;  // elements of each operand per thread per k step
  static constexpr size_t kOperandBytes = size_t(2) * 2 * kBK * kLdOperand * sizeof(acc_t);
  static constexpr size_t kSBytes = size_t(kBM) * kLdS * sizeof(acc_t);
  static constexpr size_t kWorkBytes = kOperandBytes > kSBytes ? kOperandBytes : kSBytes;
  static_assert(kTM == kTN && kBM * kBK % kThreads == 0, "square tile, whole loads per thread");
  static_assert(kBK == 16 && kThreads == 256, "the load and thread maps below assume 16 k per step, 16x16 threads");

  __device__ static void compute(unsigned char* work, const acc_t* __restrict__ rows, int n_rows,
                                 const acc_t* __restrict__ cols, int n_cols, int dim, bool /*vector_ok*/) {
    using RunPacket = Packet<acc_t, kRun>;
    acc_t* a_stages = reinterpret_cast<acc_t*>(work);    // [2][kBK][kLdOperand]
    acc_t* b_stages = a_stages + 2 * kBK * kLdOperand;  // [2][kBK][kLdOperand]
    acc_t* S = reinterpret_cast<acc_t*>(work);           // [kBM][kLdS], after the k loop
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;

    // Element e = tid + i*kThreads of an operand slice is (row e/16, k e%16): a warp reads 16 consecutive k of
    // two rows, coalesced.
    auto load_stage = [&](int stage, int k0) {
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const int e = tid + i * kThreads, r = e >> 4, k = k0 + (e & 15);
        const int offset = (stage * kBK + (e & 15)) * kLdOperand + r;  // stored transposed: [k][row]
        const bool a_in = r < n_rows && k < dim, b_in = r < n_cols && k < dim;
        copy_async<sizeof(acc_t)>(a_stages + offset, rows + (a_in ? int64_t(r) * dim + k : 0), a_in);
        copy_async<sizeof(acc_t)>(b_stages + offset, cols + (b_in ? int64_t(r) * dim + k : 0), b_in);
      }
    };

    acc_t acc[kTM][kTN];
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] = acc_t(0);
    }
    const int num_k_steps = (dim + kBK - 1) / kBK;
    load_stage(0, 0);
    wait_async_copies();
    __syncthreads();
    for (int step = 0; step < num_k_steps; ++step) {
      const int stage = step & 1;
      if (step + 1 < num_k_steps) load_stage(stage ^ 1, (step + 1) * kBK);
      // Unrolled by 2 only: fully unrolled, the operands preloaded for later k push the kernel past 128 registers.
#pragma unroll 2
      for (int k = 0; k < kBK; ++k) {
        const acc_t* a_row = a_stages + (stage * kBK + k) * kLdOperand;
        const acc_t* b_row = b_stages + (stage * kBK + k) * kLdOperand;
        const RunPacket a_lo = *reinterpret_cast<const RunPacket*>(a_row + ty * kRun);
        const RunPacket a_hi = *reinterpret_cast<const RunPacket*>(a_row + kBM / 2 + ty * kRun);
        const RunPacket b_lo = *reinterpret_cast<const RunPacket*>(b_row + tx * kRun);
        const RunPacket b_hi = *reinterpret_cast<const RunPacket*>(b_row + kBN / 2 + tx * kRun);
#pragma unroll
        for (int i = 0; i < kTM; ++i) {
          const acc_t a = i < kRun ? a_lo.v[i] : a_hi.v[i - kRun];
#pragma unroll
          for (int j = 0; j < kTN; ++j) {
            const acc_t b = j < kRun ? b_lo.v[j] : b_hi.v[j - kRun];
            acc[i][j] = fma(a, b, acc[i][j]);
          }
        }
      }
      wait_async_copies();
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const int r = i < kRun ? ty * kRun + i : kBM / 2 + ty * kRun + (i - kRun);
      RunPacket lo, hi;
#pragma unroll
      for (int j = 0; j < kRun; ++j) {
        lo.v[j] = acc[i][j];
        hi.v[j] = acc[i][kRun + j];
      }
      *reinterpret_cast<RunPacket*>(S + r * kLdS + tx * kRun) = lo;
      *reinterpret_cast<RunPacket*>(S + r * kLdS + kBN / 2 + tx * kRun) = hi;
    }
    __syncthreads();
  }
};

template <typename in_t>
struct TileOf {
  using type = WmmaTile<in_t>;
};
template <>
struct TileOf<float> {
  using type = FmaTile<float>;
};
template <>
struct TileOf<double> {
  using type = FmaTile<double>;
};

// ---------------------------------------------------------------------------------------------------------
// Rectangle kernel (forward score; backward pair state)
// ---------------------------------------------------------------------------------------------------------

// Byte offsets of the per-rectangle arrays in dynamic shared memory; the work area of the tile comes first.
struct RectLayout {
  size_t text_best, image_best, text_best_index, image_best_index;
  size_t text_valid, image_valid, text_nonempty, image_nonempty;
  size_t total;
};

template <typename in_t>
struct RectArgs {
  using acc_t = typename AccumulatorOf<in_t>::type;
  const in_t* text;        // [Bt, T, D]
  const in_t* image;       // [Bi, V, D]
  const bool* text_mask;   // [Bt, T]
  const bool* image_mask;  // [Bi, V]
  const acc_t* alpha;      // [Bt, T]
  const acc_t* beta;       // [Bi, V]
  acc_t* score;            // [Bt, Bi]: forward output
  int16_t* pair_index;     // [Bt*Bi, 3T+3V+2]: backward pair state, see PairStateLayout
  acc_t* pair_max;         // [Bt*Bi, T+V]: backward pair state
  int64_t num_texts, num_images;
  int text_len, image_len, dim;
  int texts_per_rect, images_per_rect;
  int64_t text_blocks, image_blocks;
  bool vector_ok;
  RectLayout layout;
};

// Row reduction of one chunk: for every text-token row and every image the chunk touches, the maximum over
// that image's valid tokens in the chunk, folded into text_best[row][image] (strict >: earlier chunks hold
// lower token indices, so the first maximum is kept). A warp takes 8 rows of one image segment; the 4 lanes of
// a quad stride the segment's columns (S stride 4 mod 32: conflict-free) and are merged by shuffles.
template <typename acc_t, int kLdS, bool kKeepIndex>
__device__ void reduce_rows(const acc_t* S, int row0, int num_rows, int col0, int num_cols, int image_len,
                            int images_per_rect, const unsigned char* image_valid, acc_t* text_best,
                            int16_t* text_best_index) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, quad_lane = lane & 3;
  const int first_image = col0 / image_len, last_image = (col0 + num_cols - 1) / image_len;
  const int row_groups = (num_rows + 7) / 8;
  const int tasks = row_groups * (last_image - first_image + 1);
  for (int task = warp; task < tasks; task += kWarps) {  // warp-uniform
    const int image = first_image + task / row_groups;
    const int r = (task % row_groups) * 8 + (lane >> 2);
    const int c_begin = max(image * image_len, col0) - col0;
    const int c_end = min((image + 1) * image_len, col0 + num_cols) - col0;
    acc_t best = negative_infinity(acc_t(0));
    int best_c = INT_MAX;
    for (int c = c_begin + quad_lane; c < c_end; c += 4) {  // increasing c: strict > keeps the first
      if (image_valid[col0 + c]) {
        const acc_t v = S[r * kLdS + c];
        if (v > best) {
          best = v;
          best_c = c;
        }
      }
    }
#pragma unroll
    for (int offset = 1; offset <= 2; offset <<= 1) {
      const acc_t other = __shfl_xor_sync(kFullMask, best, offset);
      const int other_c = __shfl_xor_sync(kFullMask, best_c, offset);
      if (other > best || (other == best && other_c < best_c)) {
        best = other;
        best_c = other_c;
      }
    }
    if (quad_lane == 0 && r < num_rows && best_c != INT_MAX) {
      const int entry = (row0 + r) * images_per_rect + image;
      if (best > text_best[entry]) {
        text_best[entry] = best;
        if constexpr (kKeepIndex) text_best_index[entry] = static_cast<int16_t>(col0 + best_c - image * image_len);
      }
    }
  }
}

// Column reduction of one chunk: for every valid image-token column and every text the chunk touches, the
// maximum over that text's valid tokens in the chunk (rows in increasing order, strict >), folded into
// image_best[text][column]. A thread per (column, text): consecutive lanes read consecutive columns.
template <typename acc_t, int kLdS, int kBN, bool kKeepIndex>
__device__ void reduce_columns(const acc_t* S, int row0, int num_rows, int col0, int num_cols, int text_len,
                               int columns_per_rect, const unsigned char* text_valid,
                               const unsigned char* image_valid, acc_t* image_best, int16_t* image_best_index) {
  const int first_text = row0 / text_len, last_text = (row0 + num_rows - 1) / text_len;
  const int tasks = kBN * (last_text - first_text + 1);
  for (int task = threadIdx.x; task < tasks; task += kThreads) {
    const int c = task % kBN, text = first_text + task / kBN;
    if (c >= num_cols || !image_valid[col0 + c]) continue;
    const int r_begin = max(text * text_len, row0) - row0;
    const int r_end = min((text + 1) * text_len, row0 + num_rows) - row0;
    acc_t best = negative_infinity(acc_t(0));
    int best_r = -1;
    for (int r = r_begin; r < r_end; ++r) {
      if (text_valid[row0 + r]) {
        const acc_t v = S[r * kLdS + c];
        if (v > best) {
          best = v;
          best_r = r;
        }
      }
    }
    if (best_r >= 0) {
      const int entry = text * columns_per_rect + col0 + c;
      if (best > image_best[entry]) {
        image_best[entry] = best;
        if constexpr (kKeepIndex) image_best_index[entry] = static_cast<int16_t>(row0 + best_r - text * text_len);
      }
    }
  }
}

// Stable inverse of a map item -> key (key -1 = no key), by one warp: offsets[k] .. offsets[k+1] delimit, in
// list, the items with key k in increasing order. count is warp-private scratch of n_keys ints.
template <typename KeyOf>
__device__ void build_inverse(KeyOf key_of, int n_items, int n_keys, int* count, int16_t* offsets,
                              int16_t* list) {
  const int lane = threadIdx.x & 31;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int k = lane; k < n_keys; k += 32) count[k] = 0;
  __syncwarp();
  for (int base = 0; base < n_items; base += 32) {
    const int item = base + lane;
    const int key = item < n_items ? key_of(item) : -1;
    const unsigned peers = __match_any_sync(kFullMask, key);
    if (key >= 0 && lane == __ffs(peers) - 1) count[key] += __popc(peers);
    __syncwarp();
  }
  // Exclusive prefix sums, 32 keys at a time; count becomes the fill cursor of each key.
  int carry = 0;
  for (int base = 0; base < n_keys; base += 32) {
    const int k = base + lane;
    const int x = k < n_keys ? count[k] : 0;
    int inclusive = x;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int y = __shfl_up_sync(kFullMask, inclusive, offset);
      if (lane >= offset) inclusive += y;
    }
    if (k < n_keys) {
      count[k] = carry + inclusive - x;
      offsets[k] = static_cast<int16_t>(carry + inclusive - x);
    }
    carry += __shfl_sync(kFullMask, inclusive, 31);
  }
  if (lane == 0) offsets[n_keys] = static_cast<int16_t>(carry);
  __syncwarp();
  for (int base = 0; base < n_items; base += 32) {
    const int item = base + lane;
    const int key = item < n_items ? key_of(item) : -1;
    const unsigned peers = __match_any_sync(kFullMask, key);
    if (key >= 0) list[count[key] + __popc(peers & lanes_below)] = static_cast<int16_t>(item);
    __syncwarp();
    if (key >= 0 && lane == __ffs(peers) - 1) count[key] += __popc(peers);
    __syncwarp();
  }
}

// Layout of one pair's int16 state (width 3T+3V+2), shared with the gather kernel:
//   text_arg[T]        image token of each text token's row max (-1: invalid token or empty pair)
//   image_arg[V]       text token of each image token's column max (-1 likewise)
//   text_offsets[T+1]  text_list[V]:   per text token t, the image tokens u with image_arg[u] == t
//   image_offsets[V+1] image_list[T]:  per image token u, the text tokens t with text_arg[t] == u
// and of its acc_t state (width T+V): text_max[T], image_max[V] (0 where the arg is -1).
struct PairStateLayout {
  int text_arg, image_arg, text_offsets, text_list, image_offsets, image_list, width;
  __host__ __device__ PairStateLayout(int T, int V)
      : text_arg(0),
        image_arg(T),
        text_offsets(T + V),
        text_list(2 * T + V + 1),
        image_offsets(2 * T + 2 * V + 1),
        image_list(2 * T + 3 * V + 2),
        width(3 * T + 3 * V + 2) {}
};

template <typename in_t, bool kKeepState>
__global__ void __launch_bounds__(kThreads, 2) maxsim_pairs_kernel(const RectArgs<in_t> args) {
  using acc_t = typename AccumulatorOf<in_t>::type;
  using Tile = typename TileOf<in_t>::type;
  extern __shared__ __align__(128) unsigned char smem[];
  const RectLayout& layout = args.layout;
  const acc_t* S = reinterpret_cast<const acc_t*>(smem);
  acc_t* text_best = reinterpret_cast<acc_t*>(smem + layout.text_best);    // [rows][images_per_rect]
  acc_t* image_best = reinterpret_cast<acc_t*>(smem + layout.image_best);  // [texts_per_rect][columns]
  int16_t* text_best_index = reinterpret_cast<int16_t*>(smem + layout.text_best_index);
  int16_t* image_best_index = reinterpret_cast<int16_t*>(smem + layout.image_best_index);
  unsigned char* text_valid = smem + layout.text_valid;
  unsigned char* image_valid = smem + layout.image_valid;
  unsigned char* text_nonempty = smem + layout.text_nonempty;
  unsigned char* image_nonempty = smem + layout.image_nonempty;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int T = args.text_len, V = args.image_len, D = args.dim;
  const int texts_per_rect = args.texts_per_rect, images_per_rect = args.images_per_rect;
  const int columns_per_rect = images_per_rect * V;  // row stride of image_best

  // Grouped raster: kRasterGroup text blocks run against one image block before the next image block.
  const int64_t rect = blockIdx.x;
  const int64_t group_span = int64_t(kRasterGroup) * args.image_blocks;
  const int64_t first_text_block = rect / group_span * kRasterGroup;
  const int64_t group_rows =
      args.text_blocks - first_text_block < kRasterGroup ? args.text_blocks - first_text_block : kRasterGroup;
  const int64_t text_block = first_text_block + rect % group_span % group_rows;
  const int64_t image_block = rect % group_span / group_rows;
  const int64_t a0 = text_block * texts_per_rect, b0 = image_block * images_per_rect;
  const int num_texts = int(args.num_texts - a0 < texts_per_rect ? args.num_texts - a0 : texts_per_rect);
  const int num_images = int(args.num_images - b0 < images_per_rect ? args.num_images - b0 : images_per_rect);
  const int R = num_texts * T, C = num_images * V;  // text-token rows, image-token columns of this rectangle

  // Masks of the rectangle's tokens, which of its texts / images have a valid token, running maxima at -inf.
  for (int r = tid; r < R; r += kThreads) text_valid[r] = args.text_mask[a0 * T + r];
  for (int c = tid; c < C; c += kThreads) image_valid[c] = args.image_mask[b0 * V + c];
  for (int item = warp; item < num_texts + num_images; item += kWarps) {  // warp-uniform
    bool any = false;
    if (item < num_texts) {
      for (int t = lane; t < T; t += 32) any |= args.text_mask[(a0 + item) * T + t];
    } else {
      for (int u = lane; u < V; u += 32) any |= args.image_mask[(b0 + item - num_texts) * V + u];
    }
    any = __any_sync(kFullMask, any);
    if (lane == 0) {
      if (item < num_texts) {
        text_nonempty[item] = any;
      } else {
        image_nonempty[item - num_texts] = any;
      }
    }
  }
  const acc_t minus_inf = negative_infinity(acc_t(0));
  for (int e = tid; e < R * images_per_rect; e += kThreads) {
    text_best[e] = minus_inf;
    if constexpr (kKeepState) text_best_index[e] = -1;
  }
  for (int e = tid; e < texts_per_rect * columns_per_rect; e += kThreads) {
    image_best[e] = minus_inf;
    if constexpr (kKeepState) image_best_index[e] = -1;
  }
  __syncthreads();

  for (int row0 = 0; row0 < R; row0 += Tile::kBM) {
    const int num_rows = min(Tile::kBM, R - row0);
    for (int col0 = 0; col0 < C; col0 += Tile::kBN) {
      const int num_cols = min(Tile::kBN, C - col0);
      Tile::compute(smem, args.text + (a0 * T + row0) * D, num_rows, args.image + (b0 * V + col0) * D, num_cols,
                    D, args.vector_ok);
      reduce_rows<acc_t, Tile::kLdS, kKeepState>(S, row0, num_rows, col0, num_cols, V, images_per_rect,
                                                 image_valid, text_best, text_best_index);
      reduce_columns<acc_t, Tile::kLdS, Tile::kBN, kKeepState>(S, row0, num_rows, col0, num_cols, T,
                                                              columns_per_rect, text_valid, image_valid,
                                                              image_best, image_best_index);
      __syncthreads();  // S is overwritten by the next chunk; the running maxima are complete
    }
  }

  // One warp per pair of the rectangle.
  for (int pair = warp; pair < num_texts * num_images; pair += kWarps) {  // warp-uniform
    const int i = pair / num_images, j = pair % num_images;
    const int64_t a = a0 + i, b = b0 + j;
    const bool live = text_nonempty[i] && image_nonempty[j];
    if constexpr (!kKeepState) {
      acc_t text_term = 0, image_term = 0;
      if (live) {
        for (int t = lane; t < T; t += 32) {
          if (text_valid[i * T + t]) text_term += args.alpha[a * T + t] * text_best[(i * T + t) * images_per_rect + j];
        }
        for (int u = lane; u < V; u += 32) {
          if (image_valid[j * V + u]) image_term += args.beta[b * V + u] * image_best[i * columns_per_rect + j * V + u];
        }
        text_term = warp_sum(text_term);
        image_term = warp_sum(image_term);
      }
      if (lane == 0) args.score[a * args.num_images + b] = acc_t(0.5) * (text_term + image_term);
    } else {
      const PairStateLayout state(T, V);
      const int64_t pair_id = a * args.num_images + b;
      int16_t* index = args.pair_index + pair_id * state.width;
      acc_t* maxima = args.pair_max + pair_id * (T + V);
      // Arg-max of each row / column, -1 where the token is invalid or the pair is empty.
      auto text_arg = [&](int t) -> int {
        return live && text_valid[i * T + t] ? text_best_index[(i * T + t) * images_per_rect + j] : -1;
      };
      auto image_arg = [&](int u) -> int {
        return live && image_valid[j * V + u] ? image_best_index[i * columns_per_rect + j * V + u] : -1;
      };
      for (int t = lane; t < T; t += 32) {
        const int arg = text_arg(t);
        index[state.text_arg + t] = static_cast<int16_t>(arg);
        maxima[t] = arg >= 0 ? text_best[(i * T + t) * images_per_rect + j] : acc_t(0);
      }
      for (int u = lane; u < V; u += 32) {
        const int arg = image_arg(u);
        index[state.image_arg + u] = static_cast<int16_t>(arg);
        maxima[T + u] = arg >= 0 ? image_best[i * columns_per_rect + j * V + u] : acc_t(0);
      }
      // The work area is free after the last chunk's barrier: a warp-private counter array per warp.
      int* count = reinterpret_cast<int*>(smem) + warp * (max(T, V) + 1);
      build_inverse(image_arg, V, T, count, index + state.text_offsets, index + state.text_list);
      build_inverse(text_arg, T, V, count, index + state.image_offsets, index + state.image_list);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Gather kernel (backward): gradient rows of one side, from the pair state
// ---------------------------------------------------------------------------------------------------------

constexpr int kGatherSlice = 32;                          // elements of D per CTA (one warp-wide run)
constexpr int kGatherSlots = kThreads / kGatherSlice;     // rows handled side by side
constexpr int kGatherRowsPerThread = 16;
constexpr int kGatherRowsPerCta = kGatherSlots * kGatherRowsPerThread;

// "own" is the side whose gradient is produced (text: own = text, other = image; and the mirror image).
template <typename in_t>
struct GatherArgs {
  using acc_t = typename AccumulatorOf<in_t>::type;
  const acc_t* grad_score;    // [Bt, Bi]
  const int16_t* pair_index;  // [Bt*Bi, index_width]
  const acc_t* pair_max;      // [Bt*Bi, T+V]
  const in_t* other;          // [B_other, M, D]
  const acc_t* own_coef;      // [B_own, L]: α for texts, β for images
  const acc_t* other_coef;    // [B_other, M]
  acc_t* grad_own;            // [B_own, L, D]
  acc_t* grad_own_coef;       // [B_own, L]
  int64_t num_own, num_other;
  int own_len, other_len, dim;
  int64_t own_pair_stride, other_pair_stride;  // pair id = p*own_pair_stride + q*other_pair_stride
  int arg_offset, offsets_offset, list_offset, index_width;
  int max_offset, max_width;
};

// grad_own[p, i, :] = Σ_q ½ g(p,q) ( own_coef[p,i] · other[q, arg(i)]  +  Σ_{j: other arg(j) = i} other_coef[q,j] ·
// other[q, j] ), and grad_own_coef[p, i] = Σ_q ½ g(p,q) · max(i), summed over q in increasing order, then j in
// increasing order: the order of the C++ kernel. CTA = (p, slice of D, block of rows); a thread owns one
// element of D for kGatherRowsPerThread rows, in registers.
template <typename in_t>
__global__ void __launch_bounds__(kThreads) maxsim_gather_kernel(const GatherArgs<in_t> g) {
  using acc_t = typename AccumulatorOf<in_t>::type;
  const int64_t p = blockIdx.x;
  const int L = g.own_len, M = g.other_len, D = g.dim;
  const int d = blockIdx.y * kGatherSlice + threadIdx.x % kGatherSlice;
  const int first_row = blockIdx.z * kGatherRowsPerCta + threadIdx.x / kGatherSlice;
  const bool has_d = d < D;
  const acc_t* own_coef = g.own_coef + p * L;

  acc_t grad[kGatherRowsPerThread], coef_grad[kGatherRowsPerThread];
#pragma unroll
  for (int k = 0; k < kGatherRowsPerThread; ++k) grad[k] = coef_grad[k] = acc_t(0);

  for (int64_t q = 0; q < g.num_other; ++q) {
    const int64_t pair = p * g.own_pair_stride + q * g.other_pair_stride;
    const acc_t half_grad = acc_t(0.5) * g.grad_score[pair];
    const int16_t* index = g.pair_index + pair * g.index_width;
    const int16_t* own_arg = index + g.arg_offset;
    const int16_t* offsets = index + g.offsets_offset;
    const int16_t* list = index + g.list_offset;
    const acc_t* own_max = g.pair_max + pair * g.max_width + g.max_offset;
    const in_t* other_column = g.other + q * M * D + d;  // element d of every token of other item q
    const acc_t* other_coef = g.other_coef + q * M;
#pragma unroll
    for (int k = 0; k < kGatherRowsPerThread; ++k) {
      const int i = first_row + k * kGatherSlots;
      if (i < L) {  // warp-uniform: a warp is one row
        coef_grad[k] = fma(half_grad, own_max[i], coef_grad[k]);
        if (has_d) {
          const int arg = own_arg[i];
          if (arg >= 0) grad[k] = fma(half_grad * own_coef[i], to_accumulator(other_column[int64_t(arg) * D]), grad[k]);
          const int end = offsets[i + 1];
          for (int e = offsets[i]; e < end; ++e) {
            const int j = list[e];
            grad[k] = fma(half_grad * other_coef[j], to_accumulator(other_column[int64_t(j) * D]), grad[k]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int k = 0; k < kGatherRowsPerThread; ++k) {
    const int i = first_row + k * kGatherSlots;
    if (i >= L) continue;
    if (has_d) g.grad_own[(p * L + i) * D + d] = grad[k];
    if (blockIdx.y == 0 && threadIdx.x % kGatherSlice == 0) g.grad_own_coef[p * L + i] = coef_grad[k];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side: rectangle plan and launches
// ---------------------------------------------------------------------------------------------------------

// Similarity chunks computed for n items of len tokens grouped per_rect at a time, kTile rows per chunk.
int64_t chunks_for(int64_t n, int64_t len, int64_t per_rect, int64_t tile) {
  const int64_t full = n / per_rect, rest = n % per_rect;
  return full * ((per_rect * len + tile - 1) / tile) + (rest > 0 ? (rest * len + tile - 1) / tile : 0);
}

struct RectPlan {
  int texts_per_rect, images_per_rect;
  int64_t text_blocks, image_blocks;
  RectLayout layout;
};

// Texts and images per rectangle: fewest computed similarity chunks (padding included) within the running-
// maxima budget, ties to the smaller rectangle (more CTAs). Texts / images per rectangle never exceed the
// batch, and a rectangle spans at most 4 chunks per side unless one item alone is longer.
template <typename Tile, typename acc_t>
RectPlan plan_rects(int64_t Bt, int64_t T, int64_t Bi, int64_t V, bool keep_state) {
  int best_texts = 1, best_images = 1;
  int64_t best_chunks = -1;
  for (int texts = 1; texts <= std::min<int64_t>(Bt, kMaxItemsPerRect); ++texts) {
    if (texts > 1 && texts * T > 4 * Tile::kBM) break;
    const int64_t row_chunks = chunks_for(Bt, T, texts, Tile::kBM);
    for (int images = 1; images <= std::min<int64_t>(Bi, kMaxItemsPerRect); ++images) {
      if (images > 1 && images * V > 4 * Tile::kBN) break;
      if (int64_t(texts) * images * (T + V) > kRunningBudget) break;
      const int64_t chunks = row_chunks * chunks_for(Bi, V, images, Tile::kBN);
      if (best_chunks < 0 || chunks < best_chunks ||
          (chunks == best_chunks && int64_t(texts) * images < int64_t(best_texts) * best_images)) {
        best_chunks = chunks;
        best_texts = texts;
        best_images = images;
      }
    }
  }
  RectPlan plan;
  plan.texts_per_rect = best_texts;
  plan.images_per_rect = best_images;
  plan.text_blocks = (Bt + best_texts - 1) / best_texts;
  plan.image_blocks = (Bi + best_images - 1) / best_images;
  const size_t rows = size_t(best_texts) * T, cols = size_t(best_images) * V;
  RectLayout& layout = plan.layout;
  size_t offset = align_up(Tile::kWorkBytes, 16);
  auto take = [&](size_t bytes) {
    const size_t at = offset;
    offset = align_up(offset + bytes, 16);
    return at;
  };
  layout.text_best = take(rows * best_images * sizeof(acc_t));
  layout.image_best = take(size_t(best_texts) * cols * sizeof(acc_t));
  layout.text_best_index = take(keep_state ? rows * best_images * sizeof(int16_t) : 0);
  layout.image_best_index = take(keep_state ? size_t(best_texts) * cols * sizeof(int16_t) : 0);
  layout.text_valid = take(rows);
  layout.image_valid = take(cols);
  layout.text_nonempty = take(best_texts);
  layout.image_nonempty = take(best_images);
  layout.total = offset;
  return plan;
}

template <typename in_t, bool kKeepState>
cudaError_t launch_pairs(RectArgs<in_t> args, cudaStream_t stream) {
  using acc_t = typename AccumulatorOf<in_t>::type;
  using Tile = typename TileOf<in_t>::type;
  const RectPlan plan = plan_rects<Tile, acc_t>(args.num_texts, args.text_len, args.num_images, args.image_len,
                                                kKeepState);
  // The pair-state scratch (a counter array per warp) lives in the tile's work area.
  const size_t scratch = size_t(kWarps) * (std::max(args.text_len, args.image_len) + 1) * sizeof(int);
  const int64_t rects = plan.text_blocks * plan.image_blocks;
  if (plan.layout.total > 227 * 1024 || scratch > Tile::kWorkBytes || rects > INT32_MAX) {
    return cudaErrorInvalidConfiguration;
  }
  args.texts_per_rect = plan.texts_per_rect;
  args.images_per_rect = plan.images_per_rect;
  args.text_blocks = plan.text_blocks;
  args.image_blocks = plan.image_blocks;
  args.layout = plan.layout;
  const auto kernel = maxsim_pairs_kernel<in_t, kKeepState>;
  cudaError_t status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.layout.total));
  if (status != cudaSuccess) return status;
  kernel<<<static_cast<unsigned>(rects), kThreads, plan.layout.total, stream>>>(args);
  return cudaGetLastError();
}

template <typename in_t>
RectArgs<in_t> rect_args(const void* text, const void* image, const bool* text_mask, const bool* image_mask,
                         const void* alpha, const void* beta, int64_t num_texts, int64_t text_len,
                         int64_t num_images, int64_t image_len, int64_t dim) {
  using acc_t = typename AccumulatorOf<in_t>::type;
  RectArgs<in_t> args{};
  args.text = static_cast<const in_t*>(text);
  args.image = static_cast<const in_t*>(image);
  args.text_mask = text_mask;
  args.image_mask = image_mask;
  args.alpha = static_cast<const acc_t*>(alpha);
  args.beta = static_cast<const acc_t*>(beta);
  args.num_texts = num_texts;
  args.num_images = num_images;
  args.text_len = int(text_len);
  args.image_len = int(image_len);
  args.dim = int(dim);
  // 16-byte vectors of 8 half elements need every token row to start 16-byte aligned.
  args.vector_ok = dim % 8 == 0 && reinterpret_cast<uintptr_t>(text) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(image) % 16 == 0;
  return args;
}

template <typename in_t>
cudaError_t score_for(const void* text, const void* image, const bool* text_mask, const bool* image_mask,
                      const void* alpha, const void* beta, void* score, int64_t num_texts, int64_t text_len,
                      int64_t num_images, int64_t image_len, int64_t dim, cudaStream_t stream) {
  using acc_t = typename AccumulatorOf<in_t>::type;
  RectArgs<in_t> args = rect_args<in_t>(text, image, text_mask, image_mask, alpha, beta, num_texts, text_len,
                                        num_images, image_len, dim);
  args.score = static_cast<acc_t*>(score);
  return launch_pairs<in_t, false>(args, stream);
}

template <typename in_t>
cudaError_t backward_for(const void* grad_score, const void* text, const void* image, const bool* text_mask,
                         const bool* image_mask, const void* alpha, const void* beta, int16_t* pair_index,
                         void* pair_max, void* grad_text, void* grad_image, void* grad_alpha, void* grad_beta,
                         int64_t num_texts, int64_t text_len, int64_t num_images, int64_t image_len, int64_t dim,
                         cudaStream_t stream) {
  using acc_t = typename AccumulatorOf<in_t>::type;
  RectArgs<in_t> args = rect_args<in_t>(text, image, text_mask, image_mask, alpha, beta, num_texts, text_len,
                                        num_images, image_len, dim);
  args.pair_index = pair_index;
  args.pair_max = static_cast<acc_t*>(pair_max);
  cudaError_t status = launch_pairs<in_t, true>(args, stream);
  if (status != cudaSuccess) return status;

  const int T = int(text_len), V = int(image_len);
  const PairStateLayout state(T, V);
  const unsigned d_slices = static_cast<unsigned>((dim + kGatherSlice - 1) / kGatherSlice);
  GatherArgs<in_t> side{};
  side.grad_score = static_cast<const acc_t*>(grad_score);
  side.pair_index = pair_index;
  side.pair_max = static_cast<const acc_t*>(pair_max);
  side.index_width = state.width;
  side.max_width = T + V;
  side.dim = int(dim);

  // Texts: own = text, other = image; pair id = a*Bi + b.
  GatherArgs<in_t> text_side = side;
  text_side.other = static_cast<const in_t*>(image);
  text_side.own_coef = static_cast<const acc_t*>(alpha);
  text_side.other_coef = static_cast<const acc_t*>(beta);
  text_side.grad_own = static_cast<acc_t*>(grad_text);
  text_side.grad_own_coef = static_cast<acc_t*>(grad_alpha);
  text_side.num_own = num_texts;
  text_side.num_other = num_images;
  text_side.own_len = T;
  text_side.other_len = V;
  text_side.own_pair_stride = num_images;
  text_side.other_pair_stride = 1;
  text_side.arg_offset = state.text_arg;
  text_side.offsets_offset = state.text_offsets;
  text_side.list_offset = state.text_list;
  text_side.max_offset = 0;
  const dim3 text_grid(static_cast<unsigned>(num_texts), d_slices,
                       static_cast<unsigned>((T + kGatherRowsPerCta - 1) / kGatherRowsPerCta));
  maxsim_gather_kernel<in_t><<<text_grid, kThreads, 0, stream>>>(text_side);
  status = cudaGetLastError();
  if (status != cudaSuccess) return status;

  // Images: own = image, other = text; pair id = b + a*Bi.
  GatherArgs<in_t> image_side = side;
  image_side.other = static_cast<const in_t*>(text);
  image_side.own_coef = static_cast<const acc_t*>(beta);
  image_side.other_coef = static_cast<const acc_t*>(alpha);
  image_side.grad_own = static_cast<acc_t*>(grad_image);
  image_side.grad_own_coef = static_cast<acc_t*>(grad_beta);
  image_side.num_own = num_images;
  image_side.num_other = num_texts;
  image_side.own_len = V;
  image_side.other_len = T;
  image_side.own_pair_stride = 1;
  image_side.other_pair_stride = num_images;
  image_side.arg_offset = state.image_arg;
  image_side.offsets_offset = state.image_offsets;
  image_side.list_offset = state.image_list;
  image_side.max_offset = T;
  const dim3 image_grid(static_cast<unsigned>(num_images), d_slices,
                        static_cast<unsigned>((V + kGatherRowsPerCta - 1) / kGatherRowsPerCta));
  maxsim_gather_kernel<in_t><<<image_grid, kThreads, 0, stream>>>(image_side);
  return cudaGetLastError();
}

}  // namespace

// Entry points for csrc/cuda/maxsim_launch.cpp. Sizes are positive and within the limits checked there; all
// arrays are contiguous. dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16 (of text and image); alpha, beta,
// score and all gradients are float64 for float64 inputs, else float32.

int64_t maxsim_pair_index_width(int64_t text_len, int64_t image_len) { return 3 * text_len + 3 * image_len + 2; }

cudaError_t launch_maxsim_score(int dtype, const void* text, const void* image, const bool* text_mask,
                                const bool* image_mask, const void* alpha, const void* beta, void* score,
                                int64_t num_texts, int64_t text_len, int64_t num_images, int64_t image_len,
                                int64_t dim, cudaStream_t stream) {
  switch (dtype) {
    case kDtypeFloat32:
      return score_for<float>(text, image, text_mask, image_mask, alpha, beta, score, num_texts, text_len,
                              num_images, image_len, dim, stream);
    case kDtypeFloat64:
      return score_for<double>(text, image, text_mask, image_mask, alpha, beta, score, num_texts, text_len,
                               num_images, image_len, dim, stream);
    case kDtypeFloat16:
      return score_for<__half>(text, image, text_mask, image_mask, alpha, beta, score, num_texts, text_len,
                               num_images, image_len, dim, stream);
    case kDtypeBFloat16:
      return score_for<__nv_bfloat16>(text, image, text_mask, image_mask, alpha, beta, score, num_texts, text_len,
                                      num_images, image_len, dim, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_maxsim_score_backward(int dtype, const void* grad_score, const void* text, const void* image,
                                         const bool* text_mask, const bool* image_mask, const void* alpha,
                                         const void* beta, int16_t* pair_index, void* pair_max, void* grad_text,
                                         void* grad_image, void* grad_alpha, void* grad_beta, int64_t num_texts,
                                         int64_t text_len, int64_t num_images, int64_t image_len, int64_t dim,
                                         cudaStream_t stream) {
#define CBD_FAST_MAXSIM_BACKWARD(in_t)                                                                          \
  backward_for<in_t>(grad_score, text, image, text_mask, image_mask, alpha, beta, pair_index, pair_max,        \
                     grad_text, grad_image, grad_alpha, grad_beta, num_texts, text_len, num_images, image_len, \
                     dim, stream)
  switch (dtype) {
    case kDtypeFloat32:
      return CBD_FAST_MAXSIM_BACKWARD(float);
    case kDtypeFloat64:
      return CBD_FAST_MAXSIM_BACKWARD(double);
    case kDtypeFloat16:
      return CBD_FAST_MAXSIM_BACKWARD(__half);
    case kDtypeBFloat16:
      return CBD_FAST_MAXSIM_BACKWARD(__nv_bfloat16);
    default:
      return cudaErrorInvalidValue;
  }
#undef CBD_FAST_MAXSIM_BACKWARD
}

}  // namespace cbd_fast
