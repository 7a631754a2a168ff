// Declaration of the Hopper (sm_90a, wgmma) backward launcher, shared by launch.h (which may call it), hstu_api.cpp
// (build_info) and the sm90 backward translation units (which define it). Free of kernel code, like fwd_sm90_api.h.
#pragma once

#include "hstu.h"

// The sm90 backward units (instantiations/hstu_bwd_*_sm90.cu) are built exactly when the sm90 forward units are
// (HSTU_WITH_SM90_FWD: sm_90a targeted, no HSTU_DISABLE_SM90) and the backward is (no HSTU_DISABLE_BACKWARD); they are
// pruned by dtype / head dim / rab like the sm80 units, so run_bwd_sm90<T, D, rab> exists whenever run_bwd<T, D, rab>
// does (D in 64, 128, 256).
#if defined(HSTU_WITH_SM90_FWD) && !defined(HSTU_DISABLE_BACKWARD)
#define HSTU_WITH_SM90_BWD 1
#endif

namespace hstu {

// Head dims with an sm90 backward kernel (the others always run the sm80-style backward).
constexpr bool kSm90BwdHeadDimOk(int head_dim) { return head_dim == 64 || head_dim == 128 || head_dim == 256; }
template <int kHeadDim>
inline constexpr bool kSm90BwdHeadDim = kSm90BwdHeadDimOk(kHeadDim);
// Keys per block of the sm90 backward (BwdTraitsSm90 / BwdTraitsSm90Split::kBlockN).
constexpr int kSm90BwdBlockNFor(int head_dim) { return head_dim == 256 ? 64 : 128; }
template <int kHeadDim>
inline constexpr int kSm90BwdBlockN = kSm90BwdBlockNFor(kHeadDim);

// One explicit specialisation per (element type, head dim, rab) in instantiations/hstu_bwd_*_sm90.cu. Launches the
// dk/dv/dq-partial kernel only (atomic-dq path: p.dq_accum != nullptr; no dropout, no drab); the caller (launch.h)
// has checked those conditions, the device and the build (heuristics.h's plan_backward) and runs the dq convert
// kernel afterwards.
template <typename Element, int kHeadDim, bool kHasRab>
void run_bwd_sm90(const AttnParams& params, cudaStream_t stream);

}  // namespace hstu
