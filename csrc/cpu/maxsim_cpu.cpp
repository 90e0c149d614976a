// Placeholder until the MaxSim kernel lands.
#include <ATen/ATen.h>
#include "../ops.h"
namespace cbd_fast {
Tensor5 maxsim_forward_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, c10::string_view) {
  TORCH_CHECK(false, "maxsim: not built yet");
}
Tensor4 maxsim_backward_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "maxsim: not built yet");
}
}  // namespace cbd_fast
