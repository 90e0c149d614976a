// Instruction sets of the CPU kernels, chosen at run time.
//
// The hot loops are compiled several times, with GCC's target attribute, into functions of the same signature: a
// portable version (the baseline x86-64 or any other architecture), an AVX2 one and, for MaxSim, an AVX-512 one.
// active_isa() picks the best one the CPU supports, capped by the environment variable CBD_FAST_CPU_ISA
// (portable | avx2 | avx512), which tests use to compare the versions on one machine. Nothing is compiled with
// -march=native.
#pragma once

#include <cstdint>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define CBD_FAST_X86 1
#define CBD_FAST_TARGET(isa) __attribute__((target(isa)))
#else
#define CBD_FAST_X86 0
#define CBD_FAST_TARGET(isa)
#endif

namespace cbd_fast {
namespace cpu_isa {

enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// The best instruction set this CPU supports (AVX2 counts only with FMA; AVX-512 means AVX-512F).
Isa detected();

// min(detected(), CBD_FAST_CPU_ISA if set, highest): the version a kernel with versions up to `highest` runs.
// An unknown CBD_FAST_CPU_ISA value is an error naming the variable.
Isa active(Isa highest);

const char* name(Isa isa);

// A GCC vector of kBytes / sizeof(T) lanes. The same element-wise arithmetic on these types gives the same bits
// whatever instructions implement it (no fused multiply-add is formed unless the target has FMA).
template <typename T, int kBytes>
struct Vec {
  typedef T type __attribute__((vector_size(kBytes)));
  static constexpr int kLanes = kBytes / static_cast<int>(sizeof(T));
};

}  // namespace cpu_isa
}  // namespace cbd_fast
