// Coalition masks from the shared Philox stream (DESIGN §4.2), CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../coalitions_common.h"
#include "../ops.h"
#include "../philox.h"

namespace cbd_fast {

namespace {
void fill_side(at::Tensor& out, uint64_t seed, CoalitionSide side) {
  const int64_t num_samples = out.size(0), batch = out.size(1), len = out.size(2);
  bool* data = out.data_ptr<bool>();
  at::parallel_for(0, num_samples * batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> words((len + 31) / 32 + 4);
    for (int64_t kb = begin; kb < end; ++kb) {
      coalition_words(seed, kb / batch, kb % batch, side, len, words.data());
      bool* row = data + kb * len;
      for (int64_t t = 0; t < len; ++t) row[t] = coalition_bit(words.data(), t);
    }
  });
}
}  // namespace

void fill_coalitions_cpu(at::Tensor& text_in, at::Tensor& image_in, int64_t seed) {
  coalitions_common::check_outputs(text_in, image_in);
  fill_side(text_in, static_cast<uint64_t>(seed), kTextSide);
  fill_side(image_in, static_cast<uint64_t>(seed), kImageSide);
}

}  // namespace cbd_fast
