// Launcher of the Hopper (sm_90a) forward kernels (fwd_kernel_sm90.h) and the explicit specialisation of
// run_fwd_sm90 (fwd_sm90_api.h) that each instantiations/hstu_fwd_*_sm90.cu unit compiles.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "fwd_kernel_sm90.h"
#include "fwd_sm90_api.h"
#include "hstu.h"
#include "kernel_attributes.h"

namespace hstu {
namespace sm90 {

// Launches the sm90 forward kernel of traits Tr that `choice` names (heuristics.h's plan_forward): the single-role
// kernel, or the warp-specialized one with one block per query tile or, persistent, one wave of blocks (SMs x blocks
// per SM) drawing the work items from p.tile_counter, which it zeroes on the stream first.
template <typename Tr>
void launch_fwd_sm90_kernel(const AttnParams& p, cudaStream_t stream, Sm90FwdChoice choice) {
  if (p.batch == 0 || p.max_seqlen == 0) return;
  auto check = [](cudaError_t err, const char* what) {
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("hstu attention (sm90 forward): ") + what + ": " + cudaGetErrorString(err));
  };
  if (p.sched_group < 1) throw std::invalid_argument("hstu attention (sm90 forward): sched_group < 1");
  const int64_t items = int64_t{(p.max_seqlen + Tr::kBlockM - 1) / Tr::kBlockM} * p.batch * p.heads;
  if (items > INT32_MAX - 2 * 1024) throw std::invalid_argument("hstu attention (sm90 forward): too many tiles");
  dim3 grid(static_cast<unsigned>(items));  // one block per item: schedule_grouped_block
  auto kernel = hstu_fwd_sm90_ws_kernel<Tr>;
  int smem = Tr::kSmemBytesWs, threads = Tr::kThreads + 128;
  if (choice.kernel == Sm90FwdKernel::kSingleRole) {
    if constexpr (Tr::kWarpGroups == 2) {  // (the one-consumer shape exists only warp-specialized)
      kernel = hstu_fwd_sm90_kernel<Tr>;
      smem = Tr::kSmemBytes;
      threads = Tr::kThreads;
    }
  } else if (choice.persistent) {
    if constexpr (Tr::kHeadDim <= 128) {
      if (p.tile_counter == nullptr) throw std::invalid_argument("hstu attention (sm90 forward): no tile counter");
      int device = 0, sms = 0;
      check(cudaGetDevice(&device), "cudaGetDevice");
      check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
      kernel = hstu_fwd_sm90_persistent_kernel<Tr>;
      grid = dim3(static_cast<unsigned>(std::min<int64_t>(items, int64_t{sms} * Tr::kBlocksPerSmWs)));
      check(cudaMemsetAsync(p.tile_counter, 0, sizeof(int), stream), "cudaMemsetAsync (tile counter)");
    }
  }
  check(set_kernel_attribute_once(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "cudaFuncSetAttribute");
  if constexpr (Tr::kBlocksPerSmWs > 1)  // the largest shared-memory carveout, so that both blocks fit
    check(set_kernel_attribute_once(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                    cudaSharedmemCarveoutMaxShared),
          "cudaFuncSetAttribute (carveout)");
  kernel<<<grid, threads, smem, stream>>>(p);
  check(cudaGetLastError(), "launch");
}

template <typename Element, int kHeadDim, bool kHasRab>
void launch_fwd_sm90(const AttnParams& p, cudaStream_t stream, Sm90FwdChoice choice) {
  if constexpr (kHeadDim <= 128) {
    if (choice.kernel == Sm90FwdKernel::kTwoPerSm) {
      launch_fwd_sm90_kernel<FwdTraitsSm90<Element, kHeadDim, kHasRab, 1>>(p, stream, choice);
      return;
    }
  }
  launch_fwd_sm90_kernel<FwdTraitsSm90<Element, kHeadDim, kHasRab>>(p, stream, choice);
}

}  // namespace sm90
}  // namespace hstu

// One explicit specialisation of run_fwd_sm90 per translation unit (instantiations/hstu_fwd_*_sm90.cu).
#define HSTU_INSTANTIATE_FWD_SM90(T, D, RAB)                                                        \
  namespace hstu {                                                                                  \
  template <>                                                                                       \
  void run_fwd_sm90<T, D, RAB>(const AttnParams& p, cudaStream_t stream, Sm90FwdChoice choice) {   \
    sm90::launch_fwd_sm90<T, D, RAB>(p, stream, choice);                                            \
  }                                                                                                 \
  }
