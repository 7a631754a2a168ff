// Launchers of the sm80-style kernels and the entry points run_fwd / run_bwd: run the plan heuristics.h picks for
// the call (an sm90 kernel through run_fwd_sm90 / run_bwd_sm90, or the kernels below), set shared-memory limits,
// launch on the given stream.
#pragma once

#include <algorithm>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "bwd_kernel.h"
#include "bwd_sm90_api.h"
#include "device_info.h"
#include "fwd_kernel.h"
#include "fwd_sm90_api.h"
#include "heuristics.h"
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

// Calls f(kTables) with kTables a compile-time bool: whether the call's bias comes from the weight tables
// (rab_tables.h; the kHasRab units only, when no dense rab is given).
template <bool kHasRab, typename F>
void with_bias_source(const AttnParams& p, F&& f) {
  if constexpr (kHasRab) {
    if (p.rab == nullptr && has_rab_tables(p)) return f(std::true_type{});
  }
  f(std::false_type{});
}

// The dk/dv kernel's shared-memory table histogram: the floats its table gradients need when they fit next to the
// kernel's `smem` bytes of tiles on this device, else 0 (global atomics).
inline int table_hist_floats_for(const AttnParams& p, int smem) {
  const int floats = rab_table_hist_floats(p);
  if (floats == 0) return 0;
  int device = 0, optin = 48 * 1024;
  if (cudaGetDevice(&device) == cudaSuccess)
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return int64_t{smem} + int64_t{4} * floats <= optin ? floats : 0;
}

// kDropout picks the kernel instantiation; p.dropout decides at launch (the p == 0 kernels carry no dropout code).
template <typename Element, int kHeadDim, bool kHasRab, bool kDropout>
void launch_fwd_impl(const AttnParams& p, cudaStream_t stream) {
  using Cfg = TileConfig<kHeadDim>;
  using Traits = FwdTraits<Element, kHeadDim, kHasRab, Cfg::kFwdWarps, Cfg::kFwdBlockN, Cfg::kFwdMI, Cfg::kFwdStages>;
  with_bias_source<kHasRab>(p, [&](auto tables) {
    auto kernel = hstu_fwd_kernel<Traits, kDropout, decltype(tables)::value>;
    set_smem(kernel, Traits::kSmemBytes);
    kernel<<<grid_for(p, Traits::kBlockM, p.heads), Traits::kThreads, Traits::kSmemBytes, stream>>>(p);
    check_cuda(cudaGetLastError(), "forward launch");
  });
}

template <typename Element, int kHeadDim, bool kHasRab>
void launch_fwd(const AttnParams& p, const KernelOptions& options, cudaStream_t stream) {
  if (p.batch == 0 || p.max_seqlen == 0) return;
  const FwdPlan plan = plan_forward(problem_of<Element, kHeadDim, kHasRab>(p), options, current_platform());
  if (plan.sm90) {
#if defined(HSTU_WITH_SM90_FWD)
    if constexpr (kSm90FwdHeadDim<kHeadDim>) {
      AttnParams s = p;
      s.sched_group = plan.sched_group;
      run_fwd_sm90<Element, kHeadDim, kHasRab>(s, stream, plan.sm90_choice);
      return;
    }
#endif
    throw std::logic_error("hstu attention: the forward plan names an sm90 kernel this unit does not have");
  }
  if (p.dropout)
    launch_fwd_impl<Element, kHeadDim, kHasRab, true>(p, stream);
  else
    launch_fwd_impl<Element, kHeadDim, kHasRab, false>(p, stream);
}

// The cached forward (cached.h): the sm80-style forward kernel over the new rows' query tiles, on every arch (grid:
// tiles of the largest number of new rows x B x heads).
template <typename Element, int kHeadDim, bool kHasRab>
void launch_fwd_cached(const AttnParams& p, cudaStream_t stream) {
  static_assert(kCachedFwdHeadDim<kHeadDim>, "no cached forward at this head dim (CACHED_FWD_HEAD_DIMS)");
  if (p.batch == 0 || p.max_seqlen == 0) return;
  if (p.cache_offsets == nullptr || p.dropout || has_rab_tables(p))
    throw std::invalid_argument("hstu attention: the cached forward needs cache_offsets, no dropout, no bias tables");
  using Cfg = TileConfig<kHeadDim>;
  using Traits = FwdTraits<Element, kHeadDim, kHasRab, Cfg::kFwdWarps, Cfg::kFwdBlockN, Cfg::kFwdMI, Cfg::kFwdStages>;
  auto run = [&](auto kernel) {
    set_smem(kernel, Traits::kSmemBytes);
    kernel<<<grid_for(p, Traits::kBlockM, p.heads), Traits::kThreads, Traits::kSmemBytes, stream>>>(p);
    check_cuda(cudaGetLastError(), "cached forward launch");
  };
  if (p.page_table != nullptr)
    run(hstu_fwd_kernel<Traits, /*kDropout=*/false, /*kTables=*/false, /*kCached=*/true, /*kPaged=*/true>);
  else
    run(hstu_fwd_kernel<Traits, /*kDropout=*/false, /*kTables=*/false, /*kCached=*/true, /*kPaged=*/false>);
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

// The dk/dv kernel launches for the tile traits DkDv: one pass (kPassBoth; with kDSplit > 1 the split-head-dim kernel)
// or, with kTwoPass, a dV pass and a dK pass. With an atomic-dq workspace the dS pass (dk, or dk + dv) also adds dq;
// with kTables it also adds the table gradients (its shared-memory histogram follows the tiles).
template <typename DkDv, bool kTwoPass, bool kDropout, bool kTables>
void launch_dkdv(const AttnParams& p, cudaStream_t stream) {
  const bool head_loop = p.drab != nullptr && p.rab_heads == 1 && p.heads > 1;
  const bool atomic_dq = p.dq_accum != nullptr;
  auto launch_ds_pass = [&](auto kernel, int smem, const char* what) {
    AttnParams ps = p;
    if constexpr (kTables) {
      ps.rab_hist_floats = table_hist_floats_for(p, smem);
      smem += 4 * ps.rab_hist_floats;
    }
    set_smem(kernel, smem);
    kernel<<<grid_for(p, DkDv::kBlockN, head_loop ? 1 : p.heads), DkDv::kThreads, smem, stream>>>(ps);
    check_cuda(cudaGetLastError(), what);
  };
  if constexpr (DkDv::kDSplit > 1) {
    launch_ds_pass(hstu_bwd_dkdv_kernel<DkDv, kPassBoth, kDropout, true, kTables>, DkDv::kSmemBytesAtomic,
                   "backward dk/dv/dq (split head dim) launch");
  } else if constexpr (kTwoPass) {
    auto kdv = hstu_bwd_dkdv_kernel<DkDv, kPassDV, kDropout, false, kTables>;
    set_smem(kdv, DkDv::kSmemBytes);
    kdv<<<grid_for(p, DkDv::kBlockN, p.heads), DkDv::kThreads, DkDv::kSmemBytes, stream>>>(p);
    check_cuda(cudaGetLastError(), "backward dv launch");
#if defined(HSTU_BENCH_VARIANTS)
    if (atomic_dq) {
      launch_ds_pass(hstu_bwd_dkdv_kernel<DkDv, kPassDK, kDropout, true, kTables>, DkDv::kSmemBytesAtomic,
                     "backward dk+dq launch");
      return;
    }
#endif
    if (atomic_dq) throw std::logic_error("hstu attention: the two-pass atomic backward is a benchmark variant");
    launch_ds_pass(hstu_bwd_dkdv_kernel<DkDv, kPassDK, kDropout, false, kTables>, DkDv::kSmemBytes,
                   "backward dk launch");
  } else {
    if (atomic_dq)
      launch_ds_pass(hstu_bwd_dkdv_kernel<DkDv, kPassBoth, kDropout, true, kTables>, DkDv::kSmemBytesAtomic,
                     "backward dk/dv/dq launch");
    else
      launch_ds_pass(hstu_bwd_dkdv_kernel<DkDv, kPassBoth, kDropout, false, kTables>, DkDv::kSmemBytes,
                     "backward dk/dv launch");
  }
}

// The sm80-style backward of `plan` (heuristics.h): the dk/dv launches, then the dq kernel on the deterministic path
// (the atomic path's workspace is converted by launch_bwd).
template <typename Element, int kHeadDim, bool kHasRab, bool kDropout>
void launch_bwd_impl(const AttnParams& p, const BwdPlan& plan, cudaStream_t stream) {
  using Cfg = TileConfig<kHeadDim>;
  with_bias_source<kHasRab>(p, [&](auto tables) {
    constexpr bool kTables = decltype(tables)::value;
    const bool launched = with_sm80_dkdv_shape<Element, kHeadDim, kHasRab, kDropout>(
        plan.dkdv, [&](auto warps, auto dsplit, auto two_pass) {
          using DkDv = BwdDkDvTraits<Element, kHeadDim, kHasRab, decltype(warps)::value, Cfg::kDkDvBlockM,
                                     Cfg::kDkDvStages, decltype(dsplit)::value>;
          launch_dkdv<DkDv, decltype(two_pass)::value, kDropout, kTables>(p, stream);
        });
    if (!launched) throw std::logic_error("hstu attention: no sm80 dk/dv kernel for this backward plan");
    if (plan.atomic_dq) return;  // launch_bwd converts the workspace
    using Dq = BwdDqTraits<Element, kHeadDim, kHasRab, Cfg::kDqWarps, Cfg::kDqBlockN, Cfg::kDqMI, Cfg::kDqStages>;
    auto kq = hstu_bwd_dq_kernel<Dq, kDropout, kTables>;
    set_smem(kq, Dq::kSmemBytes);
    kq<<<grid_for(p, Dq::kBlockM, p.heads), Dq::kThreads, Dq::kSmemBytes, stream>>>(p);
    check_cuda(cudaGetLastError(), "backward dq launch");
  });
}

template <typename Element, int kHeadDim, bool kHasRab>
void launch_bwd(const AttnParams& p, const KernelOptions& options, cudaStream_t stream) {
  const BwdPlan plan = plan_backward(problem_of<Element, kHeadDim, kHasRab>(p), options, current_platform());
  if (plan.atomic_dq != (p.dq_accum != nullptr))
    throw std::invalid_argument("hstu attention: the dq workspace must be given exactly when deterministic is false");
  if (p.batch > 0 && p.max_seqlen > 0) {
    if (plan.sm90) {
#if defined(HSTU_WITH_SM90_BWD)
      if constexpr (kSm90BwdHeadDim<kHeadDim>) {
        AttnParams s = p;
        s.sched_group = plan.sched_group;
        run_bwd_sm90<Element, kHeadDim, kHasRab>(s, stream);  // dk, dv and the dq workspace; converted below
        launch_dq_convert<Element, kHeadDim>(p, stream);
        return;
      }
#endif
      throw std::logic_error("hstu attention: the backward plan names an sm90 kernel this unit does not have");
    }
    if (p.dropout)
      launch_bwd_impl<Element, kHeadDim, kHasRab, true>(p, plan, stream);
    else
      launch_bwd_impl<Element, kHeadDim, kHasRab, false>(p, plan, stream);
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
  void run_fwd<T, D, RAB>(const AttnParams& p, const KernelOptions& o, cudaStream_t stream) {  \
    launch_fwd<T, D, RAB>(p, o, stream);                                                      \
  }                                                                                           \
  template <>                                                                                 \
  void run_dropout_keep_mask<T, D, RAB>(const AttnParams& p, bool* out, cudaStream_t stream) { \
    launch_dropout_keep_mask(p, out, stream);                                                 \
  }                                                                                           \
  }
// The cached forward (generate_kernels.py adds it to the sm80-style forward units of CACHED_FWD_HEAD_DIMS).
#define HSTU_INSTANTIATE_FWD_CACHED(T, D, RAB)                                          \
  namespace hstu {                                                                     \
  template <>                                                                          \
  void run_fwd_cached<T, D, RAB>(const AttnParams& p, cudaStream_t stream) {           \
    launch_fwd_cached<T, D, RAB>(p, stream);                                           \
  }                                                                                    \
  }
#define HSTU_INSTANTIATE_BWD(T, D, RAB)                                    \
  namespace hstu {                                                         \
  template <>                                                              \
  void run_bwd<T, D, RAB>(const AttnParams& p, const KernelOptions& o, cudaStream_t stream) { \
    launch_bwd<T, D, RAB>(p, o, stream);                                   \
  }                                                                        \
  }
