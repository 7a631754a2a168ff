// Launcher of the Hopper (sm_90a) backward kernels (bwd_kernel_sm90.h) and the explicit specialisation of
// run_bwd_sm90 (bwd_sm90_api.h) that each instantiations/hstu_bwd_*_sm90.cu unit compiles.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "bwd_kernel_sm90.h"
#include "bwd_sm90_api.h"
#include "hstu.h"
#include "kernel_attributes.h"

namespace hstu {
namespace sm90 {

template <typename Element, int kHeadDim, bool kHasRab>
void launch_bwd_sm90(const AttnParams& p, cudaStream_t stream) {
  using Tr = std::conditional_t<kHeadDim == 256, BwdTraitsSm90Split<Element, kHasRab>,
                                BwdTraitsSm90<Element, kHeadDim, kHasRab>>;
  if (p.batch == 0 || p.max_seqlen == 0) return;
  auto check = [](cudaError_t err, const char* what) {
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("hstu attention (sm90 backward): ") + what + ": " +
                               cudaGetErrorString(err));
  };
  if (p.dq_accum == nullptr || p.drab != nullptr || p.dropout)
    throw std::runtime_error("hstu attention (sm90 backward): needs the atomic-dq path without drab and dropout");
  auto kernel = [] {
    if constexpr (kHeadDim == 256)
      return hstu_bwd_sm90_split_kernel<Tr>;
    else
      return hstu_bwd_sm90_kernel<Tr>;
  }();
  check(set_kernel_attribute_once(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes),
        "cudaFuncSetAttribute");
  if (p.sched_group < 1) throw std::invalid_argument("hstu attention (sm90 backward): sched_group < 1");
  const int64_t items = int64_t{(p.max_seqlen + Tr::kBlockN - 1) / Tr::kBlockN} * p.batch * p.heads;
  if (items > INT32_MAX) throw std::invalid_argument("hstu attention (sm90 backward): more than 2^31 - 1 tiles");
  kernel<<<static_cast<unsigned>(items), Tr::kThreads, Tr::kSmemBytes, stream>>>(p);  // schedule_grouped_block
  check(cudaGetLastError(), "launch");
}

}  // namespace sm90
}  // namespace hstu

// One explicit specialisation of run_bwd_sm90 per translation unit (instantiations/hstu_bwd_*_sm90.cu).
#define HSTU_INSTANTIATE_BWD_SM90(T, D, RAB)                              \
  namespace hstu {                                                        \
  template <>                                                             \
  void run_bwd_sm90<T, D, RAB>(const AttnParams& p, cudaStream_t stream) { \
    sm90::launch_bwd_sm90<T, D, RAB>(p, stream);                          \
  }                                                                       \
  }
