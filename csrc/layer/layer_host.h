// Host-side argument checks and dtype dispatch shared by the layer ops (norm_mul_dropout.cu, uvqk.cu).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

namespace hstu {
namespace layer {

// A LayerNorm's weight and bias (named `names`, e.g. "weight and bias"): contiguous (width,) tensors of one dtype,
// x's or float32, on x's device
inline void check_affine(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const char* names, const char* width) {
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && bias.sizes() == weight.sizes() &&
                  weight.scalar_type() == bias.scalar_type() && weight.is_contiguous() && bias.is_contiguous() &&
                  weight.device() == x.device() && bias.device() == x.device(),
              op, ": ", names, " must be contiguous (", width, ",) tensors of one dtype on x's device");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat, op, ": ", names,
              " must have x's dtype or float32");
}

// f(T{}, W{}) for x's dtype T and the LayerNorm weight's dtype W (T or float)
template <typename F>
void with_types(const at::Tensor& x, const at::Tensor& weight, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hstu_layer", [&] {
    if (weight.scalar_type() == x.scalar_type()) {
      f(scalar_t{}, scalar_t{});
    } else {
      f(scalar_t{}, float{});
    }
  });
}

}  // namespace layer
}  // namespace hstu
