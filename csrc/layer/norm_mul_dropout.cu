// The HSTU layer's output-side pointwise step in one kernel each way, registered as the `hstu_layer` torch library
// (CUDA implementations only; hstu/ops/norm_mul_dropout/ checks arguments, owns autograd and falls back to its
// PyTorch reference):
//
//   y = dropout(LayerNorm(x; weight, bias, eps) * u, p)          x, u, y: (rows, d); weight, bias: (d,)
//
// One block per row (grid-stride over rows), fp32 statistics (two passes over the row: mean, then the centred
// variance), any width d. Dropout: Philox4x32-10 (Salmon et al., SC'11) keyed by the seed, its 128-bit counter
// (group of four columns (offset + column) / 4, row) giving the four uniforms of that group's columns: the keep
// mask is a function of (seed, offset, row, column) alone, never stored; the backward draws it again. An element is
// kept when its uniform in [0, 1) (24 bits) is >= p; kept elements are scaled by 1 / (1 - p); the mask selects.
//
//   fwd(x, u, weight, bias, eps, p, seed, offset) -> (y, mean, rstd)        mean, rstd: (rows,) fp32
//   bwd(dy, x, u, weight, bias, mean, rstd, p, seed, offset) -> (dx, du, dweight, dbias)
//
// x, u, y, dy, dx, du share one dtype (fp32, fp16 or bf16); weight and bias are that dtype or fp32, and so are
// dweight and dbias (accumulated in fp32: per-block partial sums, then one column sum).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "layer_host.h"
#include "row_reduce.cuh"

namespace hstu {
namespace layer {

constexpr int kMaxThreads = 512;

// Philox4x32 with 10 rounds: four 32-bit random words of a 128-bit counter under a 64-bit key.
__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, uint2 key) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u, kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(kMul0, ctr.x), lo0 = kMul0 * ctr.x;
    const uint32_t hi1 = __umulhi(kMul1, ctr.z), lo1 = kMul1 * ctr.z;
    ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
    key.x += kWeyl0;
    key.y += kWeyl1;
  }
  return ctr;
}

// Keep bits (bit j: column c0 + j) of the group of four columns starting at c0 (a multiple of 4) of `row`.
__device__ __forceinline__ unsigned keep_bits(uint64_t seed, uint64_t offset, int64_t row, int64_t c0, float p) {
  const uint64_t group = (offset + static_cast<uint64_t>(c0)) >> 2;
  const uint64_t r = static_cast<uint64_t>(row);
  const uint4 bits = philox4x32_10(
      make_uint4(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), static_cast<uint32_t>(r),
                 static_cast<uint32_t>(r >> 32)),
      make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)));
  constexpr float kUnit = 1.0f / 16777216.0f;  // 2^-24
  const auto kept = [&](uint32_t w) { return static_cast<float>(w >> 8) * kUnit >= p; };
  return (kept(bits.x) ? 1u : 0u) | (kept(bits.y) ? 2u : 0u) | (kept(bits.z) ? 4u : 0u) | (kept(bits.w) ? 8u : 0u);
}

struct Dropout {
  float p, scale;
  uint64_t seed, offset;
  bool on;
};

// v after dropout: kept elements scaled by 1 / (1 - p), dropped ones 0 (selected, not multiplied by a mask)
__device__ __forceinline__ float dropped(float v, bool keep, const Dropout& drop) {
  return drop.on ? (keep ? v * drop.scale : 0.f) : v;
}

// f(c, keep) for every column c of `row` that this thread owns (groups of four consecutive columns, one Philox draw
// per group); keep: whether dropout keeps element (row, c)
template <typename F>
__device__ __forceinline__ void for_each_column(int64_t row, int64_t d, const Dropout& drop, F&& f) {
  for (int64_t c0 = 4 * static_cast<int64_t>(threadIdx.x); c0 < d; c0 += 4 * static_cast<int64_t>(blockDim.x)) {
    const unsigned keep = drop.on ? keep_bits(drop.seed, drop.offset, row, c0, drop.p) : 0xfu;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (c0 + j >= d) break;
      f(c0 + j, ((keep >> j) & 1u) != 0u);
    }
  }
}

template <typename T, typename W>
__global__ void __launch_bounds__(kMaxThreads) fwd_kernel(const T* __restrict__ x, const T* __restrict__ u,
                                                          const W* __restrict__ weight, const W* __restrict__ bias,
                                                          T* __restrict__ y, float* __restrict__ mean_out,
                                                          float* __restrict__ rstd_out, int64_t rows, int64_t d,
                                                          float eps, Dropout drop) {
  __shared__ float shm[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * d;
    const T* ur = u + row * d;
    T* yr = y + row * d;
    const float2 st = row_stats(xr, d, eps, shm);
    if (threadIdx.x == 0) {
      mean_out[row] = st.x;
      rstd_out[row] = st.y;
    }
    for_each_column(row, d, drop, [&](int64_t c, bool keep) {
      const float normed = (static_cast<float>(xr[c]) - st.x) * st.y * static_cast<float>(weight[c]) +
                           static_cast<float>(bias[c]);
      yr[c] = static_cast<T>(dropped(normed * static_cast<float>(ur[c]), keep, drop));
    });
  }
}

// Per row: g = keep ? dy * scale : 0 (the gradient reaching LayerNorm(x) * u), n = (x - mean) * rstd,
// du = g * (n * w + b), dn = g * u * w, dx = rstd * (dn - mean(dn) - n * mean(dn * n)); the block's rows add
// g * u * n and g * u to its row of the (blocks, d) fp32 partial sums of dweight and dbias.
template <typename T, typename W>
__global__ void __launch_bounds__(kMaxThreads) bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                          const T* __restrict__ u, const W* __restrict__ weight,
                                                          const W* __restrict__ bias,
                                                          const float* __restrict__ mean_in,
                                                          const float* __restrict__ rstd_in, T* __restrict__ dx,
                                                          T* __restrict__ du, float* __restrict__ dweight_part,
                                                          float* __restrict__ dbias_part, int64_t rows, int64_t d,
                                                          Dropout drop) {
  __shared__ float shm[32];
  float* dw = dweight_part + static_cast<int64_t>(blockIdx.x) * d;
  float* db = dbias_part + static_cast<int64_t>(blockIdx.x) * d;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * d;
    const float mean = mean_in[row], rstd = rstd_in[row];
    float sum_dn = 0.f, sum_dn_n = 0.f;
    for_each_column(row, d, drop, [&](int64_t c, bool keep) {
      const float g = dropped(static_cast<float>(dy[base + c]), keep, drop);
      const float n = (static_cast<float>(x[base + c]) - mean) * rstd;
      const float w = static_cast<float>(weight[c]);
      const float gu = g * static_cast<float>(u[base + c]);
      const float dn = __fmul_rn(gu, w);  // rounded as the second pass rounds it (no fma contraction)
      sum_dn += dn;
      sum_dn_n += dn * n;
      du[base + c] = static_cast<T>(g * (n * w + static_cast<float>(bias[c])));
      dw[c] += gu * n;  // column c of this block's partial row belongs to this thread alone
      db[c] += gu;
    });
    const float mean_dn = block_sum(sum_dn, shm) / static_cast<float>(d);
    const float mean_dn_n = block_sum(sum_dn_n, shm) / static_cast<float>(d);
    for_each_column(row, d, drop, [&](int64_t c, bool keep) {
      const float g = dropped(static_cast<float>(dy[base + c]), keep, drop);
      const float n = (static_cast<float>(x[base + c]) - mean) * rstd;
      // __fmul_rn: dn - mean_dn must not become fma(g * u, w, -mean_dn), whose unrounded product differs from the
      // first pass's dn (at d = 1, n = 0 and dx must be exactly 0)
      const float dn = __fmul_rn(g * static_cast<float>(u[base + c]), static_cast<float>(weight[c]));
      dx[base + c] = static_cast<T>(rstd * (dn - mean_dn - n * mean_dn_n));
    });
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side

struct Plan {
  int threads;
  unsigned blocks;
};

// Threads: a power of two covering the row in groups of four (32 to kMaxThreads); blocks: one per row, at most
// 8 per SM (the kernels loop over rows).
Plan plan_for(int64_t rows, int64_t d) {
  int threads = 32;
  while (threads < kMaxThreads && 4 * static_cast<int64_t>(threads) < d) threads *= 2;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t cap = static_cast<int64_t>(sms) * 8;
  return {threads, static_cast<unsigned>(std::max<int64_t>(1, std::min(rows, cap)))};
}

Dropout dropout_for(double p, int64_t seed, int64_t offset) {
  Dropout drop;
  drop.on = p > 0.0;
  drop.p = static_cast<float>(p);
  drop.scale = p < 1.0 ? static_cast<float>(1.0 / (1.0 - p)) : 0.f;
  drop.seed = static_cast<uint64_t>(seed);
  drop.offset = static_cast<uint64_t>(offset);
  return drop;
}

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& u, const at::Tensor& weight,
                  const at::Tensor& bias) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous (rows, d) CUDA tensor");
  TORCH_CHECK(u.sizes() == x.sizes() && u.scalar_type() == x.scalar_type() && u.is_contiguous() &&
                  u.device() == x.device(),
              op, ": u must be contiguous, shaped and typed as x, on x's device");
  check_affine(op, x, weight, bias, "weight and bias", "d");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& u, const at::Tensor& weight,
                                                   const at::Tensor& bias, double eps, double p, int64_t seed,
                                                   int64_t offset) {
  check_inputs("hstu_layer.norm_mul_dropout_fwd", x, u, weight, bias);
  TORCH_CHECK(x.scalar_type() != at::kDouble, "hstu_layer.norm_mul_dropout_fwd: float64 is not supported");
  TORCH_CHECK(p >= 0.0 && p <= 1.0 && eps > 0.0, "hstu_layer.norm_mul_dropout_fwd: p in [0, 1] and eps > 0");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), d = x.size(1);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0 || d == 0) return {y, mean.fill_(0), rstd.fill_(0)};
  const Plan plan = plan_for(rows, d);
  const Dropout drop = dropout_for(p, seed, offset);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  with_types(x, weight, [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    fwd_kernel<T, W><<<plan.blocks, plan.threads, 0, stream>>>(
        x.data_ptr<T>(), u.data_ptr<T>(), weight.data_ptr<W>(), bias.data_ptr<W>(), y.data_ptr<T>(),
        mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, d, static_cast<float>(eps), drop);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& dy, const at::Tensor& x,
                                                               const at::Tensor& u, const at::Tensor& weight,
                                                               const at::Tensor& bias, const at::Tensor& mean,
                                                               const at::Tensor& rstd, double p, int64_t seed,
                                                               int64_t offset) {
  check_inputs("hstu_layer.norm_mul_dropout_bwd", x, u, weight, bias);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.is_contiguous() &&
                  dy.device() == x.device(),
              "hstu_layer.norm_mul_dropout_bwd: dy must be contiguous, shaped and typed as x");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.numel() == x.size(0) &&
                  rstd.numel() == x.size(0) && mean.is_contiguous() && rstd.is_contiguous(),
              "hstu_layer.norm_mul_dropout_bwd: mean and rstd must be the forward's (rows,) float32 outputs");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), d = x.size(1);
  at::Tensor dx = at::empty_like(x);
  at::Tensor du = at::empty_like(u);
  if (rows == 0 || d == 0) return {dx, du, at::zeros_like(weight), at::zeros_like(bias)};
  const Plan plan = plan_for(rows, d);
  at::Tensor dweight_part = at::zeros({static_cast<int64_t>(plan.blocks), d}, x.options().dtype(at::kFloat));
  at::Tensor dbias_part = at::zeros_like(dweight_part);
  const Dropout drop = dropout_for(p, seed, offset);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  with_types(x, weight, [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    bwd_kernel<T, W><<<plan.blocks, plan.threads, 0, stream>>>(
        dy.data_ptr<T>(), x.data_ptr<T>(), u.data_ptr<T>(), weight.data_ptr<W>(), bias.data_ptr<W>(),
        mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr<T>(), du.data_ptr<T>(),
        dweight_part.data_ptr<float>(), dbias_part.data_ptr<float>(), rows, d, drop);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, du, dweight_part.sum(0).to(weight.scalar_type()), dbias_part.sum(0).to(bias.scalar_type())};
}

}  // namespace layer
}  // namespace hstu

TORCH_LIBRARY(hstu_layer, m) {
  m.def("norm_mul_dropout_fwd(Tensor x, Tensor u, Tensor weight, Tensor bias, float eps, float p, int seed, "
        "int offset) -> (Tensor, Tensor, Tensor)");
  m.def("norm_mul_dropout_bwd(Tensor dy, Tensor x, Tensor u, Tensor weight, Tensor bias, Tensor mean, Tensor rstd, "
        "float p, int seed, int offset) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hstu_layer, CUDA, m) {
  m.impl("norm_mul_dropout_fwd", &hstu::layer::fwd);
  m.impl("norm_mul_dropout_bwd", &hstu::layer::bwd);
}
