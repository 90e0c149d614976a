#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace cbd_fast {
namespace cpu_isa {

Isa detected() {
#if CBD_FAST_X86
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kPortable;
  }();
  return isa;
#else
  return Isa::kPortable;
#endif
}

Isa active(Isa highest) {
  Isa isa = std::min(detected(), highest);
  // Read at every call (cheap next to any kernel), so that a test can switch versions within one process.
  if (const char* cap = std::getenv("CBD_FAST_CPU_ISA"); cap != nullptr && *cap != '\0') {
    Isa requested;
    if (std::strcmp(cap, "portable") == 0) {
      requested = Isa::kPortable;
    } else if (std::strcmp(cap, "avx2") == 0) {
      requested = Isa::kAvx2;
    } else if (std::strcmp(cap, "avx512") == 0) {
      requested = Isa::kAvx512;
    } else {
      TORCH_CHECK(false, "the environment variable CBD_FAST_CPU_ISA must be 'portable', 'avx2' or 'avx512' (the ",
                  "highest instruction set the CPU kernels may use), got '", cap, "'");
    }
    isa = std::min(isa, requested);
  }
  return isa;
}

const char* name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "portable";
  }
}

}  // namespace cpu_isa
}  // namespace cbd_fast
