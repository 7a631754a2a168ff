// Launchers: pick tile shapes per head dim, set shared-memory limits, launch on the given stream.
#pragma once

#include <algorithm>
#include <cstdio>
#include <stdexcept>
#include <string>

#include "bwd_kernel.h"
#include "fwd_kernel.h"

namespace hstu {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("hstu attention: ") + what + ": " + cudaGetErrorString(err));
}

template <typename Kernel>
inline void set_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
               "cudaFuncSetAttribute");
}

template <int kHeadDim>
struct TileConfig {
  // forward: warps, 16-row blocks per warp, key tile. Two row blocks per warp halve the shared-memory reads per
  // MMA; head dim 256 keeps one (its output accumulator alone takes 128 registers per thread).
  static constexpr int kFwdWarps = 4;
  static constexpr int kFwdMI = kHeadDim >= 256 ? 1 : 2;
  static constexpr int kFwdBlockN = kHeadDim >= 128 ? 32 : 64;
  static constexpr int kFwdStages = kHeadDim >= 256 ? 2 : 4;
  // dk/dv: warps (x16 keys), query tile; head dim 256 runs dv and dk in two passes to fit registers
  static constexpr int kDkDvWarps = 4;
  static constexpr int kDkDvBlockM = kHeadDim >= 128 ? 32 : 64;
  static constexpr bool kDkDvSplit = kHeadDim >= 256;
  static constexpr int kDkDvStages = kHeadDim >= 256 ? 2 : (kHeadDim >= 64 ? 3 : 4);
  // dq: warps, 16-row blocks per warp, key tile
  static constexpr int kDqWarps = 4;
  static constexpr int kDqMI = kHeadDim >= 256 ? 1 : 2;
  static constexpr int kDqBlockN = kHeadDim >= 64 ? 32 : 64;
  static constexpr int kDqStages = kHeadDim >= 256 ? 2 : (kHeadDim >= 128 ? 3 : 4);
};

inline dim3 grid_for(const AttnParams& p, int tile, int heads) {
  return dim3((p.max_seqlen + tile - 1) / tile, p.batch, heads);
}

// kDropout picks the kernel instantiation; p.dropout decides at launch (the p == 0 kernels carry no dropout code).
template <typename Element, int kHeadDim, bool kHasRab, bool kDropout>
void launch_fwd_impl(const AttnParams& p, cudaStream_t stream) {
  using Cfg = TileConfig<kHeadDim>;
  using Traits = FwdTraits<Element, kHeadDim, kHasRab, Cfg::kFwdWarps, Cfg::kFwdBlockN, Cfg::kFwdMI, Cfg::kFwdStages>;
  auto kernel = hstu_fwd_kernel<Traits, kDropout>;
  set_smem(kernel, Traits::kSmemBytes);
  kernel<<<grid_for(p, Traits::kBlockM, p.heads), Traits::kThreads, Traits::kSmemBytes, stream>>>(p);
  check_cuda(cudaGetLastError(), "forward launch");
}

template <typename Element, int kHeadDim, bool kHasRab>
void launch_fwd(const AttnParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.max_seqlen == 0) return;
  if (p.dropout)
    launch_fwd_impl<Element, kHeadDim, kHasRab, true>(p, stream);
  else
    launch_fwd_impl<Element, kHeadDim, kHasRab, false>(p, stream);
}

template <typename Element, int kHeadDim, bool kHasRab, bool kDropout>
void launch_bwd_impl(const AttnParams& p, cudaStream_t stream) {
  using Cfg = TileConfig<kHeadDim>;
  using DkDv = BwdDkDvTraits<Element, kHeadDim, kHasRab, Cfg::kDkDvWarps, Cfg::kDkDvBlockM, Cfg::kDkDvStages>;
  const bool head_loop = p.drab != nullptr && p.rab_heads == 1 && p.heads > 1;
  if constexpr (Cfg::kDkDvSplit) {
    auto kdv = hstu_bwd_dkdv_kernel<DkDv, kPassDV, kDropout>;
    set_smem(kdv, DkDv::kSmemBytes);
    kdv<<<grid_for(p, DkDv::kBlockN, p.heads), DkDv::kThreads, DkDv::kSmemBytes, stream>>>(p);
    check_cuda(cudaGetLastError(), "backward dv launch");
    auto kdk = hstu_bwd_dkdv_kernel<DkDv, kPassDK, kDropout>;
    set_smem(kdk, DkDv::kSmemBytes);
    kdk<<<grid_for(p, DkDv::kBlockN, head_loop ? 1 : p.heads), DkDv::kThreads, DkDv::kSmemBytes, stream>>>(p);
    check_cuda(cudaGetLastError(), "backward dk launch");
  } else {
    auto k = hstu_bwd_dkdv_kernel<DkDv, kPassBoth, kDropout>;
    set_smem(k, DkDv::kSmemBytes);
    k<<<grid_for(p, DkDv::kBlockN, head_loop ? 1 : p.heads), DkDv::kThreads, DkDv::kSmemBytes, stream>>>(p);
    check_cuda(cudaGetLastError(), "backward dk/dv launch");
  }
  using Dq = BwdDqTraits<Element, kHeadDim, kHasRab, Cfg::kDqWarps, Cfg::kDqBlockN, Cfg::kDqMI, Cfg::kDqStages>;
  auto kq = hstu_bwd_dq_kernel<Dq, kDropout>;
  set_smem(kq, Dq::kSmemBytes);
  kq<<<grid_for(p, Dq::kBlockM, p.heads), Dq::kThreads, Dq::kSmemBytes, stream>>>(p);
  check_cuda(cudaGetLastError(), "backward dq launch");
}

template <typename Element, int kHeadDim, bool kHasRab>
void launch_bwd(const AttnParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.max_seqlen == 0) return;
  if (p.dropout)
    launch_bwd_impl<Element, kHeadDim, kHasRab, true>(p, stream);
  else
    launch_bwd_impl<Element, kHeadDim, kHasRab, false>(p, stream);
}

static inline void launch_dropout_keep_mask(const AttnParams& p, bool* out, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(p.batch) * p.heads * p.max_seqlen * p.max_seqlen;
  if (total == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 20);
  hstu_dropout_keep_mask_kernel<0><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, out);
  check_cuda(cudaGetLastError(), "dropout keep-mask launch");
}

}  // namespace hstu

// One explicit specialisation per translation unit (see instantiations/).
// The forward units also carry the debug dropout-mask launcher (see run_dropout_keep_mask in hstu.h).
#define HSTU_INSTANTIATE_FWD(T, D, RAB)                                                       \
  namespace hstu {                                                                            \
  template <>                                                                                 \
  void run_fwd<T, D, RAB>(const AttnParams& p, cudaStream_t stream) {                         \
    launch_fwd<T, D, RAB>(p, stream);                                                         \
  }                                                                                           \
  template <>                                                                                 \
  void run_dropout_keep_mask<T, D, RAB>(const AttnParams& p, bool* out, cudaStream_t stream) { \
    launch_dropout_keep_mask(p, out, stream);                                                 \
  }                                                                                           \
  }
#define HSTU_INSTANTIATE_BWD(T, D, RAB)                                    \
  namespace hstu {                                                         \
  template <>                                                              \
  void run_bwd<T, D, RAB>(const AttnParams& p, cudaStream_t stream) {      \
    launch_bwd<T, D, RAB>(p, stream);                                      \
  }                                                                        \
  }
