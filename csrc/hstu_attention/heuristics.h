// Kernel and launch-order choice per call: pure functions of the problem, the caller's KernelOptions (hstu.h) and
// what the device and the build offer (Platform). launch.h runs the plan they return and the binding's kernel_plan
// query reports the same plan, so a test can ask which kernel a call runs. No CUDA call, no environment read here.
// Each rule names the measurement behind it (NVIDIA H200, bf16, causal; benchmarks/RESULTS.md has the tables).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "bwd_sm90_api.h"
#include "fwd_sm90_api.h"
#include "hstu.h"
#include "tile_config.h"

namespace hstu {

// The facts of a call the choice depends on.
struct Problem {
  int head_dim = 0;
  int batch = 0;
  int heads = 0;
  int max_seqlen = 0;
  bool bf16 = true;      // element type: bfloat16 (else float16)
  bool rab = false;      // a relative attention bias is added
  bool drab = false;     // the backward also produces the bias gradient
  bool dropout = false;  // attention dropout p > 0
  bool rab_tables = false;  // the bias comes from weight tables (rab_tables.h): the sm80-style kernels only
};

// The Problem of a launch of run_fwd / run_bwd<Element, kHeadDim, kHasRab> with parameters p.
template <typename Element, int kHeadDim, bool kHasRab>
inline Problem problem_of(const AttnParams& p) {
  Problem pr;
  pr.head_dim = kHeadDim;
  pr.batch = p.batch;
  pr.heads = p.heads;
  pr.max_seqlen = p.max_seqlen;
  pr.bf16 = std::is_same_v<Element, __nv_bfloat16>;
  pr.rab = kHasRab;
  pr.drab = p.drab != nullptr;
  pr.dropout = p.dropout;
  pr.rab_tables = p.rab_pos_weights != nullptr || p.rab_time_weights != nullptr;
  return pr;
}

// What the device and the build offer (device_info.h fills it for the current device).
struct Platform {
  bool sm90_device = false;          // compute capability 9.0
  bool sm90_forward_built = false;   // the Hopper forward units are linked in (HSTU_WITH_SM90_FWD)
  bool sm90_backward_built = false;  // the Hopper backward units are linked in (HSTU_WITH_SM90_BWD)
};

// Pairs per group of the grouped launch order (tile_scheduler.h): as many (sequence, head) pairs as keep the group's
// q, k, v, out / dout (2 bytes per element) and dq workspace (4 bytes) within ~32 MB of the 50 MB L2 of an H100 /
// H200: 21 pairs at 1024 tokens and head dim 128, 5 at 4096, 2 at 8192.
inline int grouped_schedule_pairs(int max_seqlen, int head_dim, int pairs) {
  const int64_t bytes_per_pair = int64_t{12} * max_seqlen * head_dim;
  const int64_t fit = (int64_t{32} << 20) / (bytes_per_pair > 0 ? bytes_per_pair : 1);
  return static_cast<int>(fit < 1 ? 1 : (fit > pairs ? (pairs > 0 ? pairs : 1) : fit));
}

// sched_group of a Hopper launch over `tile`-row (forward) or `tile`-key (backward) work items; 1 is pair after pair.
// Grouped for launches of at most 1024 tiles (a few waves, whose tail it shortens: forward 128,200,1,64 16 -> 25
// TFLOP/s) and for the backward over sequences of 2048+ tokens (1-4%: 16,8192,4,128 377 -> 392); elsewhere it was level
// or 1-4% slower.
inline int sm90_sched_group(const Problem& pr, bool backward, int tile, Choice choice) {
  const int64_t items = int64_t{(pr.max_seqlen + tile - 1) / tile} * pr.batch * pr.heads;
  bool grouped = items <= 1024 || (backward && pr.max_seqlen >= 2048);
  if (choice != Choice::kAuto) grouped = choice == Choice::kOn;
  return grouped ? grouped_schedule_pairs(pr.max_seqlen, pr.head_dim, pr.batch * pr.heads) : 1;
}

// Sequences up to this length take the two-per-SM forward shape at head dims 64 / 128: the other block on the SM
// hides a block's prologue and epilogue (170 against 153 TFLOP/s at 256 tokens, level at 512, 309 against 344 at 1024,
// head dim 128, 131072 tokens).
inline constexpr int kSm90FwdTwoPerSmMaxSeqlen = 256;

struct FwdPlan {
  bool sm90 = false;     // a Hopper kernel (else the sm80-style hstu_fwd_kernel)
  Sm90FwdChoice sm90_choice;
  int sched_group = 1;   // Hopper launch order
};

inline FwdPlan plan_forward(const Problem& pr, const KernelOptions& o, const Platform& pl) {
  FwdPlan plan;
  // The Hopper forward takes every call it has a kernel for (its first, single-role version already ran 1.45x the
  // mma.sync forward at 32,4096,4,256 and 1.10-1.23x at head dim 128); dropout runs the sm80-style kernel, the only
  // one with dropout code; so do the bias tables (only the sm80-style kernels read them).
  plan.sm90 = pl.sm90_forward_built && pl.sm90_device && kSm90FwdHeadDimOk(pr.head_dim) && !pr.dropout &&
              !pr.rab_tables && o.sm90_forward;
  if (!plan.sm90) return plan;
  Sm90FwdChoice& c = plan.sm90_choice;
  if (!o.fwd_warp_specialized) {
    c.kernel = Sm90FwdKernel::kSingleRole;
  } else {
    bool two_per_sm = pr.max_seqlen <= kSm90FwdTwoPerSmMaxSeqlen;
    if (o.fwd_two_per_sm != Choice::kAuto) two_per_sm = o.fwd_two_per_sm == Choice::kOn;
    c.kernel = two_per_sm && pr.head_dim <= 128 ? Sm90FwdKernel::kTwoPerSm : Sm90FwdKernel::kPingPong;
    // Persistent at head dims 64 / 128 (64,1024,4,128: 368 against 342 TFLOP/s; level on long sequences); at 256 its
    // item loop spills 252 bytes (471 against 544 TFLOP/s at 32,4096,4,256), so one block per tile there.
    c.persistent = pr.head_dim <= 128 && o.fwd_persistent;
  }
  plan.sched_group = sm90_sched_group(pr, /*backward=*/false, kSm90FwdBlockM, o.grouped_schedule);
  return plan;
}

// The sm80-style dk/dv launches (bwd_kernel.h).
enum class Sm80DkDv {
  kOnePass,        // one kernel for dk and dv (and the atomic dq)
  kSplitHeadDim,   // head dim 256, atomic dq: one pass, 8 warps, two per 16-key block splitting the head dim
  kTwoPass,        // head dim 256: a dV pass and a dK pass (the accumulators of both do not fit the registers)
  kEightWarps,     // benchmark variant: 8 warps (128 keys) per block (bf16, head dim 128, no rab, no dropout)
};

struct BwdPlan {
  bool atomic_dq = true;  // dq through the float32 workspace (else the deterministic dq kernel)
  bool sm90 = false;      // the Hopper dk/dv/dq kernel (else the sm80-style kernels below)
  Sm80DkDv dkdv = Sm80DkDv::kOnePass;
  int sched_group = 1;    // Hopper launch order
};

inline BwdPlan plan_backward(const Problem& pr, const KernelOptions& o, const Platform& pl) {
  BwdPlan plan;
  // Atomic dq: one pass over S and dP instead of two (1.2-1.5x faster backward); its dq summation order varies.
  plan.atomic_dq = !o.deterministic;
  // The Hopper backward exists for the atomic path without dropout or a bias gradient (1.25x the mma.sync atomic
  // backward at 32,4096,4,128 in its first version); the bias tables run the sm80-style kernels (the only ones
  // reading them).
  plan.sm90 = pl.sm90_backward_built && pl.sm90_device && kSm90BwdHeadDimOk(pr.head_dim) && plan.atomic_dq &&
              !pr.drab && !pr.dropout && !pr.rab_tables && o.sm90_backward;
  if (plan.sm90) {
    plan.sched_group = sm90_sched_group(pr, /*backward=*/true, kSm90BwdBlockNFor(pr.head_dim), o.grouped_schedule);
    return plan;
  }
  const bool split_head_dim = pr.head_dim == 256;  // TileConfig<256>::kDkDvSplit
  if (o.bench_bwd_warps == 8 && plan.atomic_dq && pr.bf16 && !pr.rab && !pr.dropout && pr.head_dim == 128)
    plan.dkdv = Sm80DkDv::kEightWarps;
  else if (split_head_dim && plan.atomic_dq && !o.bench_d256_two_pass)
    plan.dkdv = Sm80DkDv::kSplitHeadDim;
  else if (split_head_dim)
    plan.dkdv = Sm80DkDv::kTwoPass;
  return plan;
}

// The tile shape of an sm80-style dk/dv plan for the unit (Element, kHeadDim, kHasRab, kDropout): calls
// f(warps, dsplit, two_pass), compile-time constants for BwdDkDvTraits<..., warps, ..., dsplit> launched in one pass
// or (two_pass) as a dV pass and a dK pass. Returns false when the unit has no such launch. launch.h and the host
// emulation both launch through it.
template <typename Element, int kHeadDim, bool kHasRab, bool kDropout, typename F>
bool with_sm80_dkdv_shape(Sm80DkDv dkdv, F&& f) {
  using Cfg = TileConfig<kHeadDim>;
  using OnePass = std::false_type;
  if constexpr (!Cfg::kDkDvSplit) {
    if (dkdv == Sm80DkDv::kOnePass) {
      f(std::integral_constant<int, Cfg::kDkDvWarps>{}, std::integral_constant<int, 1>{}, OnePass{});
      return true;
    }
#if defined(HSTU_BENCH_VARIANTS)
    if constexpr (std::is_same_v<Element, __nv_bfloat16> && !kHasRab && !kDropout && kHeadDim == 128) {
      if (dkdv == Sm80DkDv::kEightWarps) {
        f(std::integral_constant<int, 8>{}, std::integral_constant<int, 1>{}, OnePass{});
        return true;
      }
    }
#endif
  } else {
    if (dkdv == Sm80DkDv::kSplitHeadDim) {
      f(std::integral_constant<int, Cfg::kDkDvOnePassWarps>{}, std::integral_constant<int, 2>{}, OnePass{});
      return true;
    }
    if (dkdv == Sm80DkDv::kTwoPass) {
      f(std::integral_constant<int, Cfg::kDkDvWarps>{}, std::integral_constant<int, 1>{}, std::true_type{});
      return true;
    }
  }
  return false;
}

}  // namespace hstu
