// Launchers: pick tile shapes per head dim, set shared-memory limits, launch on the given stream.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>

#include "bwd_kernel.h"
#include "bwd_sm90_api.h"
#include "fwd_kernel.h"
#include "fwd_sm90_api.h"
#include "kernel_attributes.h"
#include "tile_config.h"

namespace hstu {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("hstu attention: ") + what + ": " + cudaGetErrorString(err));
}

template <typename Kernel>
inline void set_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024)
    check_cuda(set_kernel_attribute_once(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
               "cudaFuncSetAttribute");
}


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

// Hopper forward (fwd_kernel_sm90.h, wgmma). HSTU_WITH_SM90_FWD: setup.py / CMake define it for every unit when
// the sm90 units are built (sm_90a in the architecture list, no HSTU_DISABLE_SM90); they are pruned like the sm80
// units, so run_fwd_sm90<T, D, rab> exists whenever run_fwd<T, D, rab> does (D in 64, 128, 256). Used when the
// current device is sm_90 and the forward has no dropout, unless HSTU_SM90_FWD=0 (read at every call, so tests and
// benchmarks can compare the two forwards).
inline bool env_equals(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e != nullptr && std::strcmp(e, value) == 0;
}
// An explicit opt-in (`name`=1) that this build cannot honour: said once per variable.
template <typename Tag>
inline void warn_once_if_requested(const char* name, const char* why) {
  static bool told = false;
  if (!told && env_equals(name, "1")) {
    told = true;
    std::fprintf(stderr, "hstu attention: %s=1 ignored: %s\n", name, why);
  }
}
// Asked at every launch: the answer is cached per device (two attribute queries each time cost more than the env
// lookups around it).
inline bool current_device_is_sm90() {
  constexpr int kMaxDevices = 64;
  static std::atomic<signed char> cached[kMaxDevices] = {};  // 0: not asked yet, 1: sm_90, -1: other
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (dev >= 0 && dev < kMaxDevices && cached[dev].load(std::memory_order_relaxed) != 0)
    return cached[dev].load(std::memory_order_relaxed) > 0;
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) return false;
  const bool sm90 = major == 9 && minor == 0;
  if (dev >= 0 && dev < kMaxDevices) cached[dev].store(sm90 ? 1 : -1, std::memory_order_relaxed);
  return sm90;
}

// Whether a Hopper kernel takes a launch (the forward's and the backward's rule): built in (kBuilt) with a kernel
// for the head dim (kHeadDimOk), the call's own conditions (`eligible`), the switch `env` not "0" and an sm_90
// device. A build without the kernel says once that `env`=1 cannot be honoured, and why (`not_built`).
template <typename Tag, bool kBuilt, bool kHeadDimOk>
inline bool use_sm90_kernel(bool eligible, const char* env, const char* not_built) {
  if constexpr (!kBuilt) {
    warn_once_if_requested<Tag>(env, not_built);
    return false;
  } else {
    return kHeadDimOk && eligible && !env_equals(env, "0") && current_device_is_sm90();
  }
}

inline constexpr bool kBuiltSm90Fwd =
#if defined(HSTU_WITH_SM90_FWD)
    true;
#else
    false;
#endif

// The parameters of an sm90 kernel launch: p with the launch order (tile_scheduler.h). The grouped order where it
// measured faster than pair after pair (H200, benchmarks/RESULTS.md v16): launches of at most 1024 tiles (a few
// waves, whose tail it shortens: the forward at 128,200,1,64 went 16 -> 25 TFLOP/s) and the backward over sequences
// of 2048 tokens or more (1-4%); elsewhere level or 1-4% slower. HSTU_SM90_GROUPED_SCHEDULE=1 / 0 (read at
// every call) forces one order or the other.
template <int kHeadDim>
inline AttnParams with_sm90_schedule(const AttnParams& p, bool backward) {
  const int tile = backward ? kSm90BwdBlockN<kHeadDim> : kSm90FwdBlockM;
  const int64_t items = int64_t{(p.max_seqlen + tile - 1) / tile} * p.batch * p.heads;
  bool grouped = items <= 1024 || (backward && p.max_seqlen >= 2048);
  if (env_equals("HSTU_SM90_GROUPED_SCHEDULE", "0")) grouped = false;
  if (env_equals("HSTU_SM90_GROUPED_SCHEDULE", "1")) grouped = true;
  AttnParams s = p;
  s.sched_group = grouped ? grouped_schedule_pairs(p.max_seqlen, kHeadDim, p.batch * p.heads) : 1;
  return s;
}

template <int kHeadDim>
inline bool use_sm90_fwd(const AttnParams& p) {
  return use_sm90_kernel<struct Sm90FwdTag, kBuiltSm90Fwd, kSm90FwdHeadDim<kHeadDim>>(
      !p.dropout, "HSTU_SM90_FWD", "built without the sm90 forward (needs 9.0a in TORCH_CUDA_ARCH_LIST and no "
                                   "HSTU_DISABLE_SM90)");
}

// Which sm90 forward takes a launch (fwd_sm90_api.h). Sequences up to kSm90FwdTwoPerSmMaxSeqlen tokens at head dims
// 64 / 128: two 64-row blocks per SM, whose prologues and epilogues (a large share of a short sequence's blocks)
// overlap the other block's GEMMs; longer ones: the ping-pong kernel, whose 128-key tiles run the GEMMs faster
// (H200, causal, head dim 128, 131072 tokens: 170 against 153 TFLOP/s at 256 tokens, level at 512, 309 against 344
// at 1024; benchmarks/RESULTS.md v17). Read at every call: HSTU_SM90_FWD_WS=0 takes the single-role kernel,
// HSTU_SM90_FWD_TWO_PER_SM=1 / 0 forces the two-per-SM kernel (where the head dim has one) or the ping-pong one.
inline constexpr int kSm90FwdTwoPerSmMaxSeqlen = 256;
template <int kHeadDim>
inline Sm90FwdKernel sm90_fwd_kernel_for(const AttnParams& p) {
  if (env_equals("HSTU_SM90_FWD_WS", "0")) return Sm90FwdKernel::kSingleRole;
  bool two_per_sm = p.max_seqlen <= kSm90FwdTwoPerSmMaxSeqlen;
  if (env_equals("HSTU_SM90_FWD_TWO_PER_SM", "0")) two_per_sm = false;
  if (env_equals("HSTU_SM90_FWD_TWO_PER_SM", "1")) two_per_sm = true;
  return two_per_sm && kHeadDim <= 128 ? Sm90FwdKernel::kTwoPerSm : Sm90FwdKernel::kPingPong;
}
template <typename Element, int kHeadDim, bool kHasRab>
void launch_fwd(const AttnParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.max_seqlen == 0) return;
  if (use_sm90_fwd<kHeadDim>(p)) {
#if defined(HSTU_WITH_SM90_FWD)
    if constexpr (kSm90FwdHeadDim<kHeadDim>) {
      // The warp-specialized kernel (hstu_fwd_sm90_ws_kernel: a producer warpgroup, mbarrier pipelines) in one of
      // its two shapes, or the single-role one.
      run_fwd_sm90<Element, kHeadDim, kHasRab>(with_sm90_schedule<kHeadDim>(p, /*backward=*/false), stream,
                                               sm90_fwd_kernel_for<kHeadDim>(p));
      return;
    }
#endif
  }
  if (p.dropout)
    launch_fwd_impl<Element, kHeadDim, kHasRab, true>(p, stream);
  else
    launch_fwd_impl<Element, kHeadDim, kHasRab, false>(p, stream);
}

template <typename Element, int kHeadDim>
void launch_dq_convert(const AttnParams& p, cudaStream_t stream) {
  const int64_t n8 = p.total_rows * p.row_stride / 8;
  if (n8 == 0) return;
  float scale = p.alpha * p.inv_scale;
  if (p.dropout) scale *= p.dropout_scale;
  const int64_t blocks = std::min<int64_t>((n8 + 255) / 256, 132 * 16);
  hstu_dq_convert_kernel<Element><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      p.dq_accum, reinterpret_cast<Element*>(p.dq), n8, scale);
  check_cuda(cudaGetLastError(), "backward dq convert launch");
}

// The dk/dv kernel launches (one or two passes) for the tile traits DkDv.
template <typename DkDv, bool kSplit, bool kDropout>
void launch_dkdv(const AttnParams& p, cudaStream_t stream) {
  const bool head_loop = p.drab != nullptr && p.rab_heads == 1 && p.heads > 1;
  const bool atomic_dq = p.dq_accum != nullptr;
  // The dS pass (dk, or dk + dv) of the atomic path also produces dq.
  auto launch_ds_pass = [&](auto kernel, int smem, const char* what) {
    set_smem(kernel, smem);
    kernel<<<grid_for(p, DkDv::kBlockN, head_loop ? 1 : p.heads), DkDv::kThreads, smem, stream>>>(p);
    check_cuda(cudaGetLastError(), what);
  };
  if constexpr (DkDv::kDSplit > 1) {
    launch_ds_pass(hstu_bwd_dkdv_kernel<DkDv, kPassBoth, kDropout, true>, DkDv::kSmemBytesAtomic,
                   "backward dk/dv/dq (split head dim) launch");
  } else if constexpr (kSplit) {
    auto kdv = hstu_bwd_dkdv_kernel<DkDv, kPassDV, kDropout, false>;
    set_smem(kdv, DkDv::kSmemBytes);
    kdv<<<grid_for(p, DkDv::kBlockN, p.heads), DkDv::kThreads, DkDv::kSmemBytes, stream>>>(p);
    check_cuda(cudaGetLastError(), "backward dv launch");
    if (atomic_dq)
      launch_ds_pass(hstu_bwd_dkdv_kernel<DkDv, kPassDK, kDropout, true>, DkDv::kSmemBytesAtomic,
                     "backward dk+dq launch");
    else
      launch_ds_pass(hstu_bwd_dkdv_kernel<DkDv, kPassDK, kDropout, false>, DkDv::kSmemBytes, "backward dk launch");
  } else {
    if (atomic_dq)
      launch_ds_pass(hstu_bwd_dkdv_kernel<DkDv, kPassBoth, kDropout, true>, DkDv::kSmemBytesAtomic,
                     "backward dk/dv/dq launch");
    else
      launch_ds_pass(hstu_bwd_dkdv_kernel<DkDv, kPassBoth, kDropout, false>, DkDv::kSmemBytes,
                     "backward dk/dv launch");
  }
}

// Benchmark knobs (tile tuning), read once per process. HSTU_BWD_WARPS=8 runs the atomic-dq dk/dv kernel of bf16,
// head dim 128, no rab, no dropout with 8 warps (128 keys per block) instead of 4. HSTU_BWD_D256_2PASS=1 runs the
// atomic path at head dim 256 as a dV pass + a dK/dq pass (4 warps each) instead of the one split-head-dim pass.
inline int env_knob(const char* name) {
  const char* e = std::getenv(name);
  return e ? std::atoi(e) : 0;
}
inline int bwd_warps_knob() {
  static const int v = env_knob("HSTU_BWD_WARPS");
  return v;
}
inline bool bwd_d256_two_pass_knob() {
  static const bool v = env_knob("HSTU_BWD_D256_2PASS") != 0;
  return v;
}

template <typename Element, int kHeadDim, bool kHasRab, bool kDropout>
void launch_bwd_impl(const AttnParams& p, cudaStream_t stream) {
  using Cfg = TileConfig<kHeadDim>;
  using DkDv = BwdDkDvTraits<Element, kHeadDim, kHasRab, Cfg::kDkDvWarps, Cfg::kDkDvBlockM, Cfg::kDkDvStages>;
  const bool atomic_dq = p.dq_accum != nullptr;
  bool done = false;
  if constexpr (std::is_same_v<Element, __nv_bfloat16> && !kHasRab && !kDropout && kHeadDim == 128) {
    if (atomic_dq && bwd_warps_knob() == 8) {
      using DkDv8 = BwdDkDvTraits<Element, kHeadDim, kHasRab, 8, Cfg::kDkDvBlockM, Cfg::kDkDvStages>;
      launch_dkdv<DkDv8, Cfg::kDkDvSplit, kDropout>(p, stream);
      done = true;
    }
  }
  if constexpr (Cfg::kDkDvSplit) {
    if (atomic_dq && !bwd_d256_two_pass_knob()) {
      using DkDv1 = BwdDkDvTraits<Element, kHeadDim, kHasRab, Cfg::kDkDvOnePassWarps, Cfg::kDkDvBlockM,
                                  Cfg::kDkDvStages, 2>;
      launch_dkdv<DkDv1, false, kDropout>(p, stream);
      done = true;
    }
  }
  if (!done) launch_dkdv<DkDv, Cfg::kDkDvSplit, kDropout>(p, stream);
  if (atomic_dq) return;  // launch_bwd converts the workspace
  using Dq = BwdDqTraits<Element, kHeadDim, kHasRab, Cfg::kDqWarps, Cfg::kDqBlockN, Cfg::kDqMI, Cfg::kDqStages>;
  auto kq = hstu_bwd_dq_kernel<Dq, kDropout>;
  set_smem(kq, Dq::kSmemBytes);
  kq<<<grid_for(p, Dq::kBlockM, p.heads), Dq::kThreads, Dq::kSmemBytes, stream>>>(p);
  check_cuda(cudaGetLastError(), "backward dq launch");
}

// Hopper backward (bwd_kernel_sm90.h, wgmma): used when the build has the sm90 backward units (HSTU_WITH_SM90_BWD,
// bwd_sm90_api.h), the head dim is 64, 128 or 256, the current device is sm_90 and the call takes the atomic-dq path
// (deterministic=False) without dropout and without a rab gradient (drab), unless HSTU_SM90_BWD=0 (read at every
// call, so tests and benchmarks can compare the two backwards). Anything else runs the sm80-style backward below.
inline constexpr bool kBuiltSm90Bwd =
#if defined(HSTU_WITH_SM90_BWD)
    true;
#else
    false;
#endif

template <int kHeadDim>
inline bool use_sm90_bwd(const AttnParams& p) {
  return use_sm90_kernel<struct Sm90BwdTag, kBuiltSm90Bwd, kSm90BwdHeadDim<kHeadDim>>(
      p.dq_accum != nullptr && p.drab == nullptr && !p.dropout, "HSTU_SM90_BWD",
      "built without the sm90 backward (needs 9.0a in TORCH_CUDA_ARCH_LIST, no HSTU_DISABLE_SM90, no "
      "HSTU_DISABLE_BACKWARD)");
}

template <typename Element, int kHeadDim, bool kHasRab>
void launch_bwd(const AttnParams& p, cudaStream_t stream) {
  if (p.batch > 0 && p.max_seqlen > 0) {
#if defined(HSTU_WITH_SM90_BWD)
    if constexpr (kSm90BwdHeadDim<kHeadDim>) {
      if (use_sm90_bwd<kHeadDim>(p)) {
        // dk, dv and the dq workspace; converted below
        run_bwd_sm90<Element, kHeadDim, kHasRab>(with_sm90_schedule<kHeadDim>(p, /*backward=*/true), stream);
        launch_dq_convert<Element, kHeadDim>(p, stream);
        return;
      }
    }
#else
    (void)use_sm90_bwd<kHeadDim>(p);  // only reports an HSTU_SM90_BWD=1 that cannot take effect
#endif
    if (p.dropout)
      launch_bwd_impl<Element, kHeadDim, kHasRab, true>(p, stream);
    else
      launch_bwd_impl<Element, kHeadDim, kHasRab, false>(p, stream);
  }
  // Atomic path: every dq element comes from the (zeroed) workspace, also rows no block touched.
  if (p.dq_accum != nullptr) launch_dq_convert<Element, kHeadDim>(p, stream);
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
