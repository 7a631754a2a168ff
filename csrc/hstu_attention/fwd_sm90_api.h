// Declaration of the Hopper (sm_90a, wgmma) forward launcher, shared by launch.h (which may call it) and the sm90
// translation units (which define it). Deliberately free of kernel code so the sm80 units do not parse CuTe's SM90
// headers.
#pragma once

#include "hstu.h"

namespace hstu {

// Head dims with an sm90 forward kernel (the others always run the sm80-style kernel).
template <int kHeadDim>
inline constexpr bool kSm90FwdHeadDim = kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256;
// Query rows per block of both sm90 forward kernels (FwdTraitsSm90::kBlockM).
inline constexpr int kSm90FwdBlockM = 128;

// One explicit specialisation per (element type, head dim, rab) in instantiations/hstu_fwd_*_sm90.cu. Forward
// without dropout only; the caller (launch.h) checks the device, the build and HSTU_SM90_FWD.
template <typename Element, int kHeadDim, bool kHasRab>
// warp_specialized: the producer / ping-pong variant (hstu_fwd_sm90_ws_kernel, the default; HSTU_SM90_FWD_WS=0 opts out).
void run_fwd_sm90(const AttnParams& params, cudaStream_t stream, bool warp_specialized);

}  // namespace hstu
