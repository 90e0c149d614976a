// Placeholder until the fused Banzhaf kernel lands.
#include <ATen/ATen.h>
#include "../ops.h"
namespace cbd_fast {
Tensor3 banzhaf_interaction_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, int64_t, int64_t, c10::string_view) {
  TORCH_CHECK(false, "banzhaf_interaction: not built yet");
}
Tensor3 banzhaf_interaction_backward_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         int64_t, int64_t, c10::string_view) {
  TORCH_CHECK(false, "banzhaf_interaction: not built yet");
}
}  // namespace cbd_fast
