// The HSTU layer's input side, LayerNorm(x) -> x_norm @ W^T + b -> SiLU split into u, v, q, k, registered in the
// `hstu_layer` torch library (CUDA implementations only; hstu/ops/uvqk/ checks arguments, permutes the weight, owns
// autograd and falls back to its PyTorch reference):
//
//   uvqk_fwd(x, norm_weight, norm_bias, eps, weight, bias, sm90) -> (out, pre, x_norm, mean, rstd)
//       x: (T, K); weight: (4, N, K) and bias: (4, N), the projection's rows and bias regrouped part by part
//       (u, v, q, k; within a part head by head); x_norm: (T, K); out = SiLU(pre), pre = x_norm @ weight[p]^T +
//       bias[p]: (4, T, N), so out[p] is one contiguous (T, N) tensor per part, the layout the attention takes.
//   uvqk_norm(x, norm_weight, norm_bias, mean, rstd, dtype) -> x_norm     (the forward's x_norm again, bit for bit)
//   uvqk_silu(pre) -> SiLU(pre)                                          (the forward's out again, bit for bit)
//   uvqk_silu_bwd(du, dv, dq, dk, pre, heads) -> d_pre (T, 4 N) in the projection's own row order (head by head,
//       u | v | q | k within a head), so that dW = d_pre^T x_norm and dx_norm = d_pre W need no permutation
//   uvqk_norm_bwd(dx_norm, x, norm_weight, mean, rstd) -> (dx, dnorm_weight, dnorm_bias)
//
// What is fused where: the LayerNorm is its own kernel (one block per row, fp32 statistics, x_norm written once in
// the GEMM's dtype, mean / rstd kept for the backward): the GEMM streams x_norm through TMA into shared memory, where
// normalising would need a register pass over every A tile of every N tile (K is small: x_norm is 1/8 of the
// GEMM's output traffic). On sm_90 the bias, the rounding of pre to the output dtype, the store of pre (an
// auxiliary TMA store, what the backward's SiLU derivative reads) and the SiLU run in the epilogue of one CUTLASS
// 3.x batched GEMM (warp-specialised cooperative TMA / wgmma mainloop, batch = the 4 parts sharing x_norm through a
// batch stride of 0, an EVT tree: silu(aux_store(round(acc + bias)))). On other GPUs (or sm90 = false) cuBLAS
// (at::addmm, one per part) writes pre and one elementwise kernel applies the SiLU. SiLU is computed from the
// rounded pre in both, x / (1 + exp(-x)) in fp32 as torch's silu does, so recomputing it from pre gives the
// forward's values bit for bit. The backward's GEMMs (dW, dx_norm) are cuBLAS calls of the caller.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "layer_host.h"
#include "row_reduce.cuh"

#if defined(HSTU_WITH_SM90_FWD) && !defined(HSTU_DISABLE_SM90)
#define HSTU_UVQK_SM90 1
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#endif

namespace hstu {
namespace layer {
namespace uvqk {

constexpr int kNormThreads = 256;
constexpr int kParts = 4;  // u, v, q, k

__host__ __device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// dy * silu'(x) = dy * s * (1 + x * (1 - s)), s = sigmoid(x)
__device__ __forceinline__ float silu_grad(float dy, float x) {
  const float s = 1.0f / (1.0f + expf(-x));
  return dy * s * (1.0f + x * (1.0f - s));
}

// (x - mean) * rstd * w + b with every rounding pinned, so the forward and the recomputation agree bit for bit
__device__ __forceinline__ float normalize(float x, float mean, float rstd, float w, float b) {
  return __fmaf_rn(__fmul_rn(__fsub_rn(x, mean), rstd), w, b);
}

// x_norm of every row; kHaveStats: mean and rstd are given (the recomputation), else computed and written
template <typename TX, typename TW, typename TO, bool kHaveStats>
__global__ void __launch_bounds__(kNormThreads) norm_kernel(const TX* __restrict__ x, const TW* __restrict__ weight,
                                                            const TW* __restrict__ bias, TO* __restrict__ out,
                                                            float* __restrict__ mean, float* __restrict__ rstd,
                                                            int64_t rows, int64_t d, float eps) {
  __shared__ float shm[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const TX* xr = x + row * d;
    float2 st;
    if constexpr (kHaveStats) {
      st = make_float2(mean[row], rstd[row]);
    } else {
      st = row_stats(xr, d, eps, shm);
      if (threadIdx.x == 0) {
        mean[row] = st.x;
        rstd[row] = st.y;
      }
    }
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      out[row * d + c] = static_cast<TO>(normalize(static_cast<float>(xr[c]), st.x, st.y,
                                                   static_cast<float>(weight[c]), static_cast<float>(bias[c])));
    }
  }
}

// LayerNorm backward of one row per block iteration: n = (x - mean) * rstd, g = dx_norm * w,
// dx = rstd * (g - mean(g) - n * mean(g * n)); the block adds dx_norm * n and dx_norm to its row of the
// (blocks, d) fp32 partial sums of the weight's and bias's gradients.
template <typename TX, typename TW, typename TG>
__global__ void __launch_bounds__(kNormThreads) norm_bwd_kernel(const TG* __restrict__ dxn, const TX* __restrict__ x,
                                                                const TW* __restrict__ weight,
                                                                const float* __restrict__ mean,
                                                                const float* __restrict__ rstd, TX* __restrict__ dx,
                                                                float* __restrict__ dweight_part,
                                                                float* __restrict__ dbias_part, int64_t rows,
                                                                int64_t d) {
  __shared__ float shm[32];
  float* dw = dweight_part + static_cast<int64_t>(blockIdx.x) * d;
  float* db = dbias_part + static_cast<int64_t>(blockIdx.x) * d;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * d;
    const float m = mean[row], r = rstd[row];
    float sum_g = 0.f, sum_gn = 0.f;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      const float dn = static_cast<float>(dxn[base + c]);
      const float n = (static_cast<float>(x[base + c]) - m) * r;
      const float g = __fmul_rn(dn, static_cast<float>(weight[c]));
      sum_g += g;
      sum_gn += g * n;
      dw[c] += dn * n;  // column c of this block's partial row belongs to this thread alone
      db[c] += dn;
    }
    const float mean_g = block_sum(sum_g, shm) / static_cast<float>(d);
    const float mean_gn = block_sum(sum_gn, shm) / static_cast<float>(d);
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      const float n = (static_cast<float>(x[base + c]) - m) * r;
      // __fmul_rn: g - mean_g must not contract into an fma whose unrounded product differs from the first pass's
      const float g = __fmul_rn(static_cast<float>(dxn[base + c]), static_cast<float>(weight[c]));
      dx[base + c] = static_cast<TX>(r * (g - mean_g - n * mean_gn));
    }
  }
}

template <typename T>
__global__ void silu_kernel(const T* __restrict__ pre, T* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<T>(silu(static_cast<float>(pre[i])));
  }
}

template <typename T>
struct PartGrads {
  const T* g[kParts];  // du, dv, dq, dk: (T, N) each
};

// d_pre[t, h * 4D + p * D + j] = g_p[t, h * D + j] * silu'(pre[p, t, h * D + j]); one row per block iteration
template <typename T>
__global__ void silu_bwd_kernel(PartGrads<T> grads, const T* __restrict__ pre, T* __restrict__ d_pre, int64_t rows,
                                int n, int dim) {
  const int width = kParts * n, head_width = kParts * dim;
  for (int64_t t = blockIdx.x; t < rows; t += gridDim.x) {
    for (int col = threadIdx.x; col < width; col += blockDim.x) {
      const int h = col / head_width, within = col - h * head_width;
      const int p = within / dim;
      const int64_t src = t * n + h * dim + (within - p * dim);
      d_pre[t * width + col] = static_cast<T>(
          silu_grad(static_cast<float>(grads.g[p][src]), static_cast<float>(pre[p * rows * n + src])));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// sm_90: the CUTLASS 3.x GEMM with the bias / aux-store / SiLU epilogue

#ifdef HSTU_UVQK_SM90

// SiLU as an epilogue compute function (scalar, and per fragment of fp32 values)
template <class V>
struct SiluFn {
  CUTLASS_HOST_DEVICE V operator()(V const& v) const { return V(silu(float(v))); }
};
template <int N>
struct SiluFn<cutlass::Array<float, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<float, N> const& v) const {
    cutlass::Array<float, N> out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = silu(v[i]);
    return out;
  }
};

// D = silu(pre), Aux = pre = round_to_E(acc + per-column bias): the metadata the epilogue builder reads to size the
// auxiliary store's shared-memory tile
template <class E>
struct SiluBiasAux : cutlass::epilogue::fusion::FusionOperation {
  using ElementOutput = E;
  using ElementCompute = float;
  using ElementBias = E;
  static constexpr int AlignmentBias = 128 / cutlass::sizeof_bits_v<E>;
  static constexpr bool IsPerColBiasSupported = true;
  static constexpr bool IsEltActSupported = true;
  using ElementAux = E;
  using GmemLayoutTagAux = cutlass::layout::RowMajor;
  static constexpr int AlignmentAux = 128 / cutlass::sizeof_bits_v<E>;
  static constexpr bool IsAuxOutSupported = true;
};

}  // namespace uvqk
}  // namespace layer
}  // namespace hstu

namespace cutlass::epilogue::fusion {

template <int StagesC, int StagesD, int FragmentSize, bool ReuseSmemC, bool DelayTmaStore, class E,
          class CtaTileShapeMNK, class EpilogueTile, class SmemLayoutAtom, class CopyOpR2S>
struct FusionCallbacks<epilogue::Sm90TmaWarpSpecialized<StagesC, StagesD, FragmentSize, ReuseSmemC, DelayTmaStore>,
                       hstu::layer::uvqk::SiluBiasAux<E>, CtaTileShapeMNK, EpilogueTile, SmemLayoutAtom, CopyOpR2S>
    : Sm90EVT<Sm90Compute<hstu::layer::uvqk::SiluFn, E, float, FloatRoundStyle::round_to_nearest>,
              Sm90EVT<Sm90AuxStore<StagesD, EpilogueTile, E, FloatRoundStyle::round_to_nearest,
                                   cute::Stride<int64_t, cute::_1, int64_t>, SmemLayoutAtom, CopyOpR2S,
                                   128 / sizeof_bits_v<E>>,
                      Sm90EVT<Sm90Compute<cutlass::plus, E, float, FloatRoundStyle::round_to_nearest>, Sm90AccFetch,
                              Sm90RowBroadcast<0, CtaTileShapeMNK, E, float,
                                               cute::Stride<cute::_0, cute::_1, int64_t>, 128 / sizeof_bits_v<E>>>>> {
  using Impl =
      Sm90EVT<Sm90Compute<hstu::layer::uvqk::SiluFn, E, float, FloatRoundStyle::round_to_nearest>,
              Sm90EVT<Sm90AuxStore<StagesD, EpilogueTile, E, FloatRoundStyle::round_to_nearest,
                                   cute::Stride<int64_t, cute::_1, int64_t>, SmemLayoutAtom, CopyOpR2S,
                                   128 / sizeof_bits_v<E>>,
                      Sm90EVT<Sm90Compute<cutlass::plus, E, float, FloatRoundStyle::round_to_nearest>, Sm90AccFetch,
                              Sm90RowBroadcast<0, CtaTileShapeMNK, E, float,
                                               cute::Stride<cute::_0, cute::_1, int64_t>, 128 / sizeof_bits_v<E>>>>>;
  using Operation = hstu::layer::uvqk::SiluBiasAux<E>;

  struct Arguments {
    E const* bias_ptr = nullptr;
    cute::Stride<cute::_0, cute::_1, int64_t> dBias = {};
    E* aux_ptr = nullptr;
    cute::Stride<int64_t, cute::_1, int64_t> dAux = {};

    operator typename Impl::Arguments() const {
      return {
          // silu(store(round(acc + bias)))
          {
              // store(round(acc + bias))
              {
                  // round(acc + bias)
                  {},                         // acc
                  {bias_ptr, E(0), dBias},    // bias
                  {}                          // plus
              },
              {aux_ptr, dAux}  // store
          },
          {}  // silu
      };
    }
  };

  using Impl::Impl;
};

}  // namespace cutlass::epilogue::fusion

namespace hstu {
namespace layer {
namespace uvqk {

template <class E>
struct Sm90Gemm {
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits_v<E>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, kAlign, E,
      cutlass::layout::RowMajor, kAlign, cutlass::epilogue::TmaWarpSpecializedCooperative,
      SiluBiasAux<E>>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, E, cutlass::layout::RowMajor, kAlign, E,
      cutlass::layout::ColumnMajor, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// out[p] = silu(pre[p]), pre[p] = round(x_norm @ weight[p]^T + bias[p]) for the 4 parts in one batched launch
template <class AtType, class E>
void sm90_gemm(const at::Tensor& xn, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out,
               at::Tensor& pre) {
  using G = Sm90Gemm<E>;
  using Gemm = typename G::Gemm;
  const int rows = static_cast<int>(xn.size(0)), k = static_cast<int>(xn.size(1));
  const int n = static_cast<int>(weight.size(1));
  const int64_t nk = static_cast<int64_t>(n) * k, tn = static_cast<int64_t>(rows) * n;
  typename G::Kernel::StrideA stride_a = cute::make_stride(static_cast<int64_t>(k), cute::_1{}, int64_t(0));
  typename G::Kernel::StrideB stride_b = cute::make_stride(static_cast<int64_t>(k), cute::_1{}, nk);
  typename G::CollectiveEpilogue::StrideC stride_c = cute::make_stride(static_cast<int64_t>(n), cute::_1{}, tn);
  typename G::CollectiveEpilogue::StrideD stride_d = cute::make_stride(static_cast<int64_t>(n), cute::_1{}, tn);
  const E* a = reinterpret_cast<const E*>(xn.data_ptr<AtType>());
  const E* b = reinterpret_cast<const E*>(weight.data_ptr<AtType>());
  E* d = reinterpret_cast<E*>(out.data_ptr<AtType>());
  cutlass::KernelHardwareInfo hw;
  hw.device_id = xn.get_device();
  hw.sm_count = sm_count(hw.device_id);
  typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kBatched,
                                {rows, n, k, kParts},
                                {a, stride_a, b, stride_b},
                                {{}, nullptr, stride_c, d, stride_d},
                                hw};
  args.epilogue.thread.bias_ptr = reinterpret_cast<const E*>(bias.data_ptr<AtType>());
  args.epilogue.thread.dBias = cute::make_stride(cute::_0{}, cute::_1{}, static_cast<int64_t>(n));
  args.epilogue.thread.aux_ptr = reinterpret_cast<E*>(pre.data_ptr<AtType>());
  args.epilogue.thread.dAux = cute::make_stride(static_cast<int64_t>(n), cute::_1{}, tn);
  Gemm gemm;
  TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess,
              "hstu_layer.uvqk_fwd: the sm90 GEMM cannot take this problem (T=", rows, ", N=", n, ", K=", k,
              "; N and K must be multiples of 8)");
  at::Tensor workspace = at::empty({static_cast<int64_t>(Gemm::get_workspace_size(args))},
                                   xn.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  TORCH_CHECK(gemm.initialize(args, workspace.data_ptr(), stream) == cutlass::Status::kSuccess,
              "hstu_layer.uvqk_fwd: initializing the sm90 GEMM failed");
  TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess, "hstu_layer.uvqk_fwd: the sm90 GEMM launch failed");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif  // HSTU_UVQK_SM90

// ---------------------------------------------------------------------------------------------------------------
// Host side

unsigned blocks_for(int64_t rows, int per_sm) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(rows, static_cast<int64_t>(sms) * per_sm)));
}

unsigned elementwise_blocks(int64_t n) {
  return blocks_for((n + 255) / 256, 16);
}

void check_norm_params(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous (T, K) CUDA tensor");
  check_affine(op, x, weight, bias, "norm_weight and norm_bias", "K");
}

// f(TO{}) for a half type (the GEMM's dtype)
template <typename F>
void with_half_type(at::ScalarType t, const char* op, F&& f) {
  TORCH_CHECK(t == at::kBFloat16 || t == at::kHalf, op, ": the GEMM dtype must be bfloat16 or float16, got ", t);
  if (t == at::kBFloat16) {
    f(at::BFloat16{});
  } else {
    f(at::Half{});
  }
}

// x_norm in dtype `out_dtype`; with mean / rstd undefined they are computed and returned
at::Tensor run_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                    at::Tensor& mean, at::Tensor& rstd, at::ScalarType out_dtype, bool have_stats) {
  const int64_t rows = x.size(0), d = x.size(1);
  at::Tensor out = at::empty({rows, d}, x.options().dtype(out_dtype));
  if (rows == 0 || d == 0) return out;
  const unsigned blocks = blocks_for(rows, 8);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  with_types(x, weight, [&](auto tx, auto tw) {
    using TX = decltype(tx);
    using TW = decltype(tw);
    with_half_type(out_dtype, "hstu_layer.uvqk_norm", [&](auto to) {
      using TO = decltype(to);
      const auto launch = [&](auto kernel) {
        kernel<<<blocks, kNormThreads, 0, stream>>>(x.data_ptr<TX>(), weight.data_ptr<TW>(), bias.data_ptr<TW>(),
                                                    out.data_ptr<TO>(), mean.data_ptr<float>(),
                                                    rstd.data_ptr<float>(), rows, d, static_cast<float>(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (have_stats) {
        launch(norm_kernel<TX, TW, TO, true>);
      } else {
        launch(norm_kernel<TX, TW, TO, false>);
      }
    });
  });
  return out;
}

void launch_silu(const at::Tensor& pre, at::Tensor& out) {
  const int64_t n = pre.numel();
  if (n == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  with_half_type(pre.scalar_type(), "hstu_layer.uvqk_silu", [&](auto t) {
    using T = decltype(t);
    silu_kernel<T><<<elementwise_blocks(n), 256, 0, stream>>>(pre.data_ptr<T>(), out.data_ptr<T>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

bool use_sm90(const at::Tensor& x) {
#ifdef HSTU_UVQK_SM90
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, x.get_device()));
  return major == 9 && minor == 0;
#else
  (void)x;
  return false;
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps,
    const at::Tensor& weight, const at::Tensor& bias, bool sm90) {
  constexpr const char* op = "hstu_layer.uvqk_fwd";
  check_norm_params(op, x, norm_weight, norm_bias);
  TORCH_CHECK(eps > 0.0 && x.size(1) > 0, op, ": eps must be > 0 and x must have columns");
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == kParts && weight.size(2) == x.size(1) && weight.is_contiguous() &&
                  weight.device() == x.device(),
              op, ": weight must be a contiguous (4, N, K) tensor on x's device");
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == kParts && bias.size(1) == weight.size(1) && bias.is_contiguous() &&
                  bias.scalar_type() == weight.scalar_type() && bias.device() == x.device(),
              op, ": bias must be a contiguous (4, N) tensor of weight's dtype on x's device");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), k = x.size(1), n = weight.size(1);
  const at::ScalarType dtype = weight.scalar_type();
  at::Tensor mean = at::zeros({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::zeros({rows}, x.options().dtype(at::kFloat));
  at::Tensor xn = run_norm(x, norm_weight, norm_bias, eps, mean, rstd, dtype, false);
  at::Tensor out = at::empty({kParts, rows, n}, x.options().dtype(dtype));
  at::Tensor pre = at::empty({kParts, rows, n}, x.options().dtype(dtype));
  if (rows == 0 || n == 0) return {out, pre, xn, mean, rstd};
#ifdef HSTU_UVQK_SM90
  if (sm90 && use_sm90(x) && k % 8 == 0 && n % 8 == 0 && rows <= INT32_MAX) {
    with_half_type(dtype, op, [&](auto t) {
      using T = decltype(t);
      using E = std::conditional_t<std::is_same_v<T, at::BFloat16>, cutlass::bfloat16_t, cutlass::half_t>;
      sm90_gemm<T, E>(xn, weight, bias, out, pre);
    });
    return {out, pre, xn, mean, rstd};
  }
#endif
  for (int64_t p = 0; p < kParts; ++p) {
    at::Tensor pre_p = pre.select(0, p);
    at::addmm_out(pre_p, bias.select(0, p), xn, weight.select(0, p).t());
  }
  launch_silu(pre, out);
  return {out, pre, xn, mean, rstd};
}

at::Tensor norm(const at::Tensor& x, const at::Tensor& norm_weight, const at::Tensor& norm_bias, const at::Tensor& mean,
                const at::Tensor& rstd, at::ScalarType dtype) {
  check_norm_params("hstu_layer.uvqk_norm", x, norm_weight, norm_bias);
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.numel() == x.size(0) &&
                  rstd.numel() == x.size(0) && mean.is_contiguous() && rstd.is_contiguous(),
              "hstu_layer.uvqk_norm: mean and rstd must be the forward's (T,) float32 outputs");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor m = mean, r = rstd;
  return run_norm(x, norm_weight, norm_bias, 1.0, m, r, dtype, true);
}

at::Tensor silu_op(const at::Tensor& pre) {
  TORCH_CHECK(pre.is_cuda() && pre.is_contiguous(), "hstu_layer.uvqk_silu: pre must be a contiguous CUDA tensor");
  const c10::cuda::CUDAGuard guard(pre.device());
  at::Tensor out = at::empty_like(pre);
  launch_silu(pre, out);
  return out;
}

at::Tensor silu_bwd(const at::Tensor& du, const at::Tensor& dv, const at::Tensor& dq, const at::Tensor& dk,
                    const at::Tensor& pre, int64_t heads) {
  constexpr const char* op = "hstu_layer.uvqk_silu_bwd";
  TORCH_CHECK(pre.is_cuda() && pre.dim() == 3 && pre.size(0) == kParts && pre.is_contiguous(), op,
              ": pre must be the forward's contiguous (4, T, N) tensor");
  const int64_t rows = pre.size(1), n = pre.size(2);
  TORCH_CHECK(heads > 0 && n % heads == 0 && kParts * n <= INT32_MAX, op, ": heads must divide N (4 N < 2^31)");
  const at::Tensor* grads[kParts] = {&du, &dv, &dq, &dk};
  for (const at::Tensor* g : grads) {
    TORCH_CHECK(g->is_contiguous() && g->numel() == rows * n && g->scalar_type() == pre.scalar_type() &&
                    g->device() == pre.device(),
                op, ": du, dv, dq, dk must be contiguous, with T * N elements of pre's dtype on its device");
  }
  const c10::cuda::CUDAGuard guard(pre.device());
  at::Tensor d_pre = at::empty({rows, kParts * n}, pre.options());
  const int64_t total = d_pre.numel();
  if (total == 0) return d_pre;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  with_half_type(pre.scalar_type(), op, [&](auto t) {
    using T = decltype(t);
    PartGrads<T> g;
    for (int p = 0; p < kParts; ++p) g.g[p] = grads[p]->data_ptr<T>();
    silu_bwd_kernel<T><<<blocks_for(rows, 8), 256, 0, stream>>>(g, pre.data_ptr<T>(), d_pre.data_ptr<T>(), rows,
                                                                 static_cast<int>(n), static_cast<int>(n / heads));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return d_pre;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd(const at::Tensor& dxn, const at::Tensor& x,
                                                        const at::Tensor& norm_weight, const at::Tensor& mean,
                                                        const at::Tensor& rstd) {
  constexpr const char* op = "hstu_layer.uvqk_norm_bwd";
  check_norm_params(op, x, norm_weight, norm_weight);
  TORCH_CHECK(dxn.sizes() == x.sizes() && dxn.is_contiguous() && dxn.device() == x.device(), op,
              ": dx_norm must be contiguous and shaped as x");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.numel() == x.size(0) &&
                  rstd.numel() == x.size(0) && mean.is_contiguous() && rstd.is_contiguous(),
              op, ": mean and rstd must be the forward's (T,) float32 outputs");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), d = x.size(1);
  at::Tensor dx = at::empty_like(x);
  if (rows == 0 || d == 0) return {dx, at::zeros_like(norm_weight), at::zeros_like(norm_weight)};
  const unsigned blocks = blocks_for(rows, 8);
  at::Tensor dweight_part = at::zeros({static_cast<int64_t>(blocks), d}, x.options().dtype(at::kFloat));
  at::Tensor dbias_part = at::zeros_like(dweight_part);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  with_types(x, norm_weight, [&](auto tx, auto tw) {
    using TX = decltype(tx);
    using TW = decltype(tw);
    with_half_type(dxn.scalar_type(), op, [&](auto tg) {
      using TG = decltype(tg);
      norm_bwd_kernel<TX, TW, TG><<<blocks, kNormThreads, 0, stream>>>(
          dxn.data_ptr<TG>(), x.data_ptr<TX>(), norm_weight.data_ptr<TW>(), mean.data_ptr<float>(),
          rstd.data_ptr<float>(), dx.data_ptr<TX>(), dweight_part.data_ptr<float>(), dbias_part.data_ptr<float>(),
          rows, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dx, dweight_part.sum(0).to(norm_weight.scalar_type()), dbias_part.sum(0).to(norm_weight.scalar_type())};
}

bool has_sm90_gemm() {
#ifdef HSTU_UVQK_SM90
  return true;
#else
  return false;
#endif
}

}  // namespace uvqk
}  // namespace layer
}  // namespace hstu

TORCH_LIBRARY_FRAGMENT(hstu_layer, m) {
  m.def("uvqk_fwd(Tensor x, Tensor norm_weight, Tensor norm_bias, float eps, Tensor weight, Tensor bias, bool sm90) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("uvqk_norm(Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor mean, Tensor rstd, ScalarType dtype) "
        "-> Tensor");
  m.def("uvqk_silu(Tensor pre) -> Tensor");
  m.def("uvqk_silu_bwd(Tensor du, Tensor dv, Tensor dq, Tensor dk, Tensor pre, int heads) -> Tensor");
  m.def("uvqk_norm_bwd(Tensor dx_norm, Tensor x, Tensor norm_weight, Tensor mean, Tensor rstd) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("uvqk_has_sm90_gemm() -> bool", &hstu::layer::uvqk::has_sm90_gemm);
}

TORCH_LIBRARY_IMPL(hstu_layer, CUDA, m) {
  m.impl("uvqk_fwd", &hstu::layer::uvqk::fwd);
  m.impl("uvqk_norm", &hstu::layer::uvqk::norm);
  m.impl("uvqk_silu", &hstu::layer::uvqk::silu_op);
  m.impl("uvqk_silu_bwd", &hstu::layer::uvqk::silu_bwd);
  m.impl("uvqk_norm_bwd", &hstu::layer::uvqk::norm_bwd);
}
