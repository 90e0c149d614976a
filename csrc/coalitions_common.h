// Host-side piece of the fill_coalitions op shared by the C++ CPU kernel and the CUDA launcher (ATen only, any
// device): the checks of the two tensors it fills.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace cbd_fast {
namespace coalitions_common {

// text_in[K,B,T] and image_in[K,B,V]: bool, contiguous (they are filled in place), with one K and one B, both
// < 2^32 (they are 32-bit Philox counter words), on one device. The device kind is the caller's to check.
inline void check_outputs(const at::Tensor& text_in, const at::Tensor& image_in) {
  auto check_filled = [](const char* name, const at::Tensor& x, const char* shape_doc) {
    TORCH_CHECK(x.scalar_type() == at::kBool && x.dim() == 3, "fill_coalitions: ", name, " must be a bool tensor ",
                shape_doc, ", got ", x.scalar_type(), " of shape ", x.sizes());
    TORCH_CHECK(x.is_contiguous(), "fill_coalitions: ", name, " must be contiguous (it is filled in place)");
  };
  check_filled("text_in", text_in, "[K, B, T]");
  check_filled("image_in", image_in, "[K, B, V]");
  TORCH_CHECK(image_in.size(0) == text_in.size(0) && image_in.size(1) == text_in.size(1),
              "fill_coalitions: image_in [K, B, V] must have text_in's K = ", text_in.size(0), " and B = ",
              text_in.size(1), ", got shape ", image_in.sizes());
  TORCH_CHECK(text_in.size(0) < (int64_t(1) << 32) && text_in.size(1) < (int64_t(1) << 32),
              "fill_coalitions: text_in [K, B, T] must have K, B < 2^32 (32-bit Philox counter words), got shape ",
              text_in.sizes());
  TORCH_CHECK(image_in.device() == text_in.device(), "fill_coalitions: image_in must be on text_in's device ",
              text_in.device(), ", got one on ", image_in.device());
}

}  // namespace coalitions_common
}  // namespace cbd_fast
