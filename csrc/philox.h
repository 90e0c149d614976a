// Philox4x32-10 counter-based generator, shared by the C++ CPU kernels and the CUDA kernels.
//
// Coalition stream of DESIGN §4.2: key = (seed lo, seed hi); for draw k and pair b the text bits come from
// counter (k, b, 0, chunk) and the image bits from counter (k, b, 1, chunk). One call yields 128 bits; token t
// is bit (t mod 32) of word ((t mod 128) div 32) of chunk (t div 128).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define CBD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CBD_HOST_DEVICE inline
#endif

namespace cbd_fast {

struct PhiloxWords {
  uint32_t w[4];
};

CBD_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

// Ten rounds of Philox4x32 on counter (c0, c1, c2, c3) with key (k0, k1).
CBD_HOST_DEVICE PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                          uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kMul0, c0, hi0, lo0);
    philox_mulhilo(kMul1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  PhiloxWords out;
  out.w[0] = c0;
  out.w[1] = c1;
  out.w[2] = c2;
  out.w[3] = c3;
  return out;
}

// Which side of the game a bit stream belongs to (third counter word).
enum CoalitionSide : uint32_t { kTextSide = 0u, kImageSide = 1u };

// Fills `words[0 .. ceil(len/32))` with the membership bits of draw `draw`, pair `pair`, side `side`.
CBD_HOST_DEVICE void coalition_words(uint64_t seed, int64_t draw, int64_t pair, CoalitionSide side, int64_t len,
                                     uint32_t* words) {
  const uint32_t k0 = static_cast<uint32_t>(seed);
  const uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  const int64_t num_words = (len + 31) / 32;
  for (int64_t chunk = 0; chunk * 4 < num_words; ++chunk) {
    const PhiloxWords r = philox4x32_10(static_cast<uint32_t>(draw), static_cast<uint32_t>(pair),
                                        static_cast<uint32_t>(side), static_cast<uint32_t>(chunk), k0, k1);
    for (int w = 0; w < 4 && chunk * 4 + w < num_words; ++w) words[chunk * 4 + w] = r.w[w];
  }
}

CBD_HOST_DEVICE bool coalition_bit(const uint32_t* words, int64_t token) {
  return (words[token >> 5] >> (token & 31)) & 1u;
}

}  // namespace cbd_fast
