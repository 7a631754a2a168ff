// The pointwise math of the op, shared by every kernel (sm80-style and sm90, forward and backward): the relative
// attention bias read, the sigmoid behind SiLU (x sigmoid(x)) and its derivative. Also compiled by the host
// emulation of the tests (the #else branches).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "hstu.h"
#include "mask.h"
#include "utils.h"

namespace hstu {

// rab[b, hr, i, j] in q's dtype (the binding casts rab to it), as float.
template <typename Element>
__device__ __forceinline__ float rab_value(const AttnParams& p, int b, int hr, int i, int j) {
  const Element* r = reinterpret_cast<const Element*>(p.rab) + b * p.rab_batch_stride + hr * p.rab_head_stride +
                     static_cast<int64_t>(i) * p.rab_row_stride + j;
  return to_float<Element>(*r);
}

// 1 / (1 + exp(-x)) with the approximate exp2 and reciprocal units (relative error ~1e-7, far below bf16/fp16
// rounding); exp overflowing to +inf gives exactly 0.
__device__ __forceinline__ float sigmoidf_fast(float x) {
#if defined(__CUDA_ARCH__)
  float e, r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(-x * 1.4426950408889634f));
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.f + e));
  return r;
#else  // host emulation of the kernels (tests only)
  return 1.f / (1.f + exp2f(-x * 1.4426950408889634f));
#endif
}

// One special-function op instead of two: sigmoid(x) = 0.5 + 0.5 tanh(x / 2). tanh.approx has ~2^-11 relative
// error, under bf16's rounding of P (2^-9), so bf16 uses it; fp16 (2^-11 rounding) keeps the exp/rcp form.
template <typename Element>
__device__ __forceinline__ float sigmoid_t(float x) {
  if constexpr (sizeof(Element) == 2 && std::is_same_v<Element, __nv_bfloat16>) {
    float t;
#if defined(__CUDA_ARCH__)
    asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(0.5f * x));
#else  // host emulation of the kernels (tests only)
    t = tanhf(0.5f * x);
#endif
    return fmaf(0.5f, t, 0.5f);
  } else {
    return sigmoidf_fast(x);
  }
}

// d/dx SiLU(x) = sigmoid(x) (1 + x (1 - sigmoid(x))), from x and sig = sigmoid(x).
__device__ __forceinline__ float silu_grad(float x, float sig) { return sig * (1.f + x * (1.f - sig)); }

// One element of the pointwise stage (bwd_kernel.h's math, no dropout) for query i, key j: x = alpha (s + rab);
// returns P = SiLU(x) and overwrites s with SiLU'(x), both zero where the mask hides (i, j).
template <typename Element, TileMask kMask, bool kHasRab>
__device__ __forceinline__ float silu_and_grad(const AttnParams& p, const SeqMask& mk, int b, int hr, int i, int j,
                                               float& s) {
  float x = s;
  if constexpr (kHasRab) {
    if (kMask != TileMask::kExact || (i < mk.L && j < mk.L)) x += rab_value<Element>(p, b, hr, i, j);
  }
  x *= p.alpha;
  const float sig = sigmoid_t<Element>(x);
  const bool vis = kMask == TileMask::kNone || (kMask == TileMask::kCausal ? j <= i : mk.visible(i, j));
  s = vis ? silu_grad(x, sig) : 0.f;
  return vis ? x * sig : 0.f;
}

}  // namespace hstu
