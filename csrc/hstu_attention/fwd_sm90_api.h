// Declaration of the Hopper (sm_90a, wgmma) forward launcher, shared by launch.h (which may call it) and the sm90
// translation units (which define it). Deliberately free of kernel code so the sm80 units do not parse CuTe's SM90
// headers.
#pragma once

#include "hstu.h"

namespace hstu {

// Head dims with an sm90 forward kernel (the others always run the sm80-style kernel).
constexpr bool kSm90FwdHeadDimOk(int head_dim) { return head_dim == 64 || head_dim == 128 || head_dim == 256; }
template <int kHeadDim>
inline constexpr bool kSm90FwdHeadDim = kSm90FwdHeadDimOk(kHeadDim);
// Query rows per block of both sm90 forward kernels (FwdTraitsSm90::kBlockM).
inline constexpr int kSm90FwdBlockM = 128;

// The sm90 forward kernels (fwd_kernel_sm90.h; heuristics.h picks one per call):
//   kPingPong   hstu_fwd_sm90_ws_kernel, 128 query rows per block: a producer warpgroup and two ping-pong consumers
//   kTwoPerSm   the same kernel with one consumer warpgroup, 64 rows and 64-key tiles, two blocks per SM (head dims
//               64 / 128; at 256 it runs kPingPong)
//   kSingleRole hstu_fwd_sm90_kernel, 128 rows: every warpgroup loads and computes
enum class Sm90FwdKernel { kPingPong, kTwoPerSm, kSingleRole };

// Which sm90 forward a launch runs (heuristics.h picks it). persistent: the warp-specialized kernel at head dims
// 64 / 128 with the DynamicPersistentScheduler (tile_scheduler.h: one wave of blocks drawing work items) instead of the
// SingleTileScheduler (one block per tile); the launcher turns it into the kernel's scheduler type.
struct Sm90FwdChoice {
  Sm90FwdKernel kernel = Sm90FwdKernel::kPingPong;
  bool persistent = false;
};

// One explicit specialisation per (element type, head dim, rab) in instantiations/hstu_fwd_*_sm90.cu. Forward
// without dropout only; the caller (launch.h) has checked the device and the build (heuristics.h's plan_forward).
template <typename Element, int kHeadDim, bool kHasRab>
void run_fwd_sm90(const AttnParams& params, cudaStream_t stream, Sm90FwdChoice choice);

}  // namespace hstu
