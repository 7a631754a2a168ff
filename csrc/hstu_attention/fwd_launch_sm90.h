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

inline void check_fwd_sm90(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("hstu attention (sm90 forward): ") + what + ": " + cudaGetErrorString(err));
}

// Launches `kernel` (one of the kernels of traits Tr) on `blocks` blocks of `threads` threads with `smem` bytes of
// dynamic shared memory.
template <typename Tr, typename Kernel>
void launch_fwd_sm90_grid(Kernel kernel, const AttnParams& p, cudaStream_t stream, int64_t blocks, int threads,
                          int smem) {
  check_fwd_sm90(set_kernel_attribute_once(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
                 "cudaFuncSetAttribute");
  if constexpr (Tr::kBlocksPerSmWs > 1)  // the largest shared-memory carveout, so that both blocks fit
    check_fwd_sm90(set_kernel_attribute_once(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                             cudaSharedmemCarveoutMaxShared),
                   "cudaFuncSetAttribute (carveout)");
  kernel<<<dim3(static_cast<unsigned>(blocks)), threads, smem, stream>>>(p);
  check_fwd_sm90(cudaGetLastError(), "launch");
}

// The warp-specialized kernel of traits Tr with tile scheduler Scheduler over `items` work items. A persistent
// scheduler's wave is as many blocks as fit the device at once (SMs x blocks per SM); its work counter
// (p.tile_counter) is zeroed on the stream first.
template <typename Tr, typename Scheduler>
void launch_fwd_sm90_ws(const AttnParams& p, cudaStream_t stream, int64_t items) {
  int64_t resident = items;
  if constexpr (Scheduler::kPersistent) {
    if (p.tile_counter == nullptr) throw std::invalid_argument("hstu attention (sm90 forward): no tile counter");
    int device = 0, sms = 0;
    check_fwd_sm90(cudaGetDevice(&device), "cudaGetDevice");
    check_fwd_sm90(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    resident = int64_t{sms} * Tr::kBlocksPerSmWs;
    check_fwd_sm90(cudaMemsetAsync(p.tile_counter, 0, sizeof(int), stream), "cudaMemsetAsync (tile counter)");
  }
  launch_fwd_sm90_grid<Tr>(hstu_fwd_sm90_ws_kernel<Tr, Scheduler>, p, stream, Scheduler::grid_blocks(items, resident),
                           Tr::kThreads + 128, Tr::kSmemBytesWs);
}

// Launches the sm90 forward kernel of traits Tr that `choice` names (heuristics.h's plan_forward): the single-role
// kernel, or the warp-specialized one with the tile scheduler the plan implies: one block per query tile, or
// (persistent, head dims 64 / 128) one wave of blocks drawing the work items.
template <typename Tr>
void launch_fwd_sm90_kernel(const AttnParams& p, cudaStream_t stream, Sm90FwdChoice choice) {
  if (p.batch == 0 || p.max_seqlen == 0) return;
  if (p.sched_group < 1) throw std::invalid_argument("hstu attention (sm90 forward): sched_group < 1");
  const int64_t items = int64_t{(p.max_seqlen + Tr::kBlockM - 1) / Tr::kBlockM} * p.batch * p.heads;
  if (items > INT32_MAX - 2 * 1024) throw std::invalid_argument("hstu attention (sm90 forward): too many tiles");
  if (choice.kernel == Sm90FwdKernel::kSingleRole) {
    if constexpr (Tr::kWarpGroups == 2) {  // (the one-consumer shape exists only warp-specialized)
      launch_fwd_sm90_grid<Tr>(hstu_fwd_sm90_kernel<Tr>, p, stream, items, Tr::kThreads, Tr::kSmemBytes);
      return;
    }
  }
  if constexpr (Tr::kHeadDim <= 128) {
    if (choice.persistent && choice.kernel != Sm90FwdKernel::kSingleRole) {
      launch_fwd_sm90_ws<Tr, FwdPersistentScheduler>(p, stream, items);
      return;
    }
  }
  launch_fwd_sm90_ws<Tr, FwdSingleTileScheduler>(p, stream, items);
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
