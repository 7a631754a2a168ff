// Torch-facing entry points of the fused HSTU attention kernels: argument checks, parameter packing, dispatch
// over (dtype, head dim, rab) to the compiled instantiations.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "bwd_sm90_api.h"  // HSTU_WITH_SM90_BWD (build_info)
#include "device_info.h"
#include "heuristics.h"
#include "hstu.h"

namespace hstu {
namespace {

void check_qkv(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 3, name, " must be (T, H, D)");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have q's dtype");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
  TORCH_CHECK(t.sizes() == q.sizes(), name, " must have q's shape");
  TORCH_CHECK(t.device() == q.device(), name, " must be on q's device");
}

const int* opt_int_ptr(const std::optional<at::Tensor>& t, int64_t batch, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kInt && t->is_contiguous() && t->numel() == batch, name,
              " must be a contiguous int32 CUDA tensor of shape (B,)");
  return t->data_ptr<int>();
}

// The dense rab (B, 1 or H, >= rows, >= cols) of a call, in q's dtype.
void set_rab(AttnParams& p, const at::Tensor& r, const at::Tensor& q, int64_t rows, int64_t cols) {
  TORCH_CHECK(r.is_cuda() && r.device() == q.device() && r.dim() == 4, "rab must be a 4-d CUDA tensor on q's device");
  TORCH_CHECK(r.scalar_type() == q.scalar_type(), "rab must have q's dtype (the binding casts it)");
  TORCH_CHECK(r.size(0) == p.batch && (r.size(1) == 1 || r.size(1) == q.size(1)), "rab must be (B, 1 or H, N, N)");
  TORCH_CHECK(r.size(2) >= rows && r.size(3) >= cols, "rab's last two dims must be >= ", rows, " and ", cols);
  TORCH_CHECK(r.stride(3) == 1, "rab must have unit stride in its last dim");
  p.rab = r.data_ptr();
  p.rab_batch_stride = r.stride(0);
  p.rab_head_stride = r.stride(1);
  p.rab_row_stride = r.stride(2);
  p.rab_heads = static_cast<int>(r.size(1));
}

AttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seq_offsets,
                       int64_t max_seqlen, double alpha, int64_t scaling_seqlen, bool causal, int64_t window,
                       const std::optional<at::Tensor>& num_contexts, const std::optional<at::Tensor>& num_targets,
                       int64_t group, const std::optional<at::Tensor>& rab) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && q.is_contiguous(), "q must be a contiguous (T, H, D) CUDA tensor");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, "q must be bfloat16 or float16");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0, "q must be 16-byte aligned");
  check_qkv(k, q, "k");
  check_qkv(v, q, "v");
  TORCH_CHECK(seq_offsets.is_cuda() && seq_offsets.scalar_type() == at::kInt && seq_offsets.dim() == 1 &&
                  seq_offsets.is_contiguous() && seq_offsets.numel() >= 1,
              "seq_offsets must be a contiguous int32 CUDA tensor of shape (B + 1,)");
  TORCH_CHECK(max_seqlen >= 0 && max_seqlen < (1 << 30), "max_seqlen out of range");
  TORCH_CHECK(scaling_seqlen > 0, "scaling_seqlen must be positive");
  TORCH_CHECK(group >= 1, "target_group_size must be >= 1");
  TORCH_CHECK(q.size(0) * q.size(1) * q.size(2) < (int64_t(1) << 31) * 8, "tensor too large");
  AttnParams p{};
  const int64_t batch = seq_offsets.numel() - 1;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.seq_offsets = seq_offsets.data_ptr<int>();
  p.num_contexts = opt_int_ptr(num_contexts, batch, "num_contexts");
  p.num_targets = opt_int_ptr(num_targets, batch, "num_targets");
  p.row_stride = q.stride(0);
  p.batch = static_cast<int>(batch);
  p.heads = static_cast<int>(q.size(1));
  p.max_seqlen = static_cast<int>(max_seqlen);
  p.alpha = static_cast<float>(alpha);
  p.inv_scale = static_cast<float>(1.0 / static_cast<double>(scaling_seqlen));
  p.causal = causal;
  p.window = window < 0 ? -1 : static_cast<int>(std::min<int64_t>(window, 1 << 30));
  p.group = static_cast<int>(group);
  if (rab.has_value()) set_rab(p, *rab, q, max_seqlen, max_seqlen);
  return p;
}

// The relative-bias tables' arguments of one call (hstu/ops/hstu_attention/rab_tables.py; all optional).
struct BiasTables {
  std::optional<at::Tensor> position_weights, time_weights, timestamps, next_timestamps, shared_positions;
  bool time_next = false;
  double time_divisor = 0.301;
  std::optional<at::Tensor> dposition, dtime;  // backward: fp32 zeros shaped like the tables, or None

  bool given() const { return position_weights.has_value() || time_weights.has_value(); }
};

// A table (K,) or (H, K) of fp32 on q's device; returns its head count.
int check_table(const at::Tensor& w, const at::Tensor& q, const char* name) {
  TORCH_CHECK_VALUE(w.device() == q.device() && w.scalar_type() == at::kFloat && w.is_contiguous(), name,
                    " must be a contiguous float32 tensor on q's device");
  TORCH_CHECK_VALUE((w.dim() == 1 || (w.dim() == 2 && (w.size(0) == 1 || w.size(0) == q.size(1)))) && w.size(-1) >= 1,
                    name, " must be (K,) or (H, K) with K >= 1");
  return w.dim() == 1 ? 1 : static_cast<int>(w.size(0));
}

// A table's gradient workspace: fp32 zeros shaped like the table.
float* table_grad(const std::optional<at::Tensor>& d, const std::optional<at::Tensor>& w, const char* name) {
  if (!d.has_value()) return nullptr;
  TORCH_CHECK_VALUE(w.has_value(), name, " needs its table");
  TORCH_CHECK_VALUE(d->device() == w->device() && d->scalar_type() == at::kFloat && d->is_contiguous() &&
                        d->sizes() == w->sizes(),
                    name, " must be a contiguous float32 tensor shaped like its table");
  return d->data_ptr<float>();
}

// Checks the tables and fills the parameter block's table fields (the kHasRab units' sm80-style kernels read them,
// rab_tables.h). Refuses, before any launch, tables in a build without the rab units.
void set_tables(AttnParams& p, const BiasTables& t, const at::Tensor& q) {
  if (!t.given()) {
    TORCH_CHECK_VALUE(!t.timestamps && !t.next_timestamps && !t.shared_positions && !t.dposition && !t.dtime,
                      "rab_timestamps / rab_next_timestamps / rab_shared_positions / drab_position / drab_time need "
                      "rab_position_weights or rab_time_weights");
    return;
  }
  TORCH_CHECK_VALUE(p.rab == nullptr, "rab and the rab tables (rab_position_weights / rab_time_weights) are exclusive");
  const int64_t batch = p.batch;
  if (t.position_weights) {
    p.rab_pos_heads = check_table(*t.position_weights, q, "rab_position_weights");
    p.rab_pos_size = static_cast<int>(t.position_weights->size(-1));
    TORCH_CHECK_VALUE(p.rab_pos_size % 2 == 1, "rab_position_weights must have an odd length 2M - 1");
    p.rab_pos_weights = t.position_weights->data_ptr<float>();
  }
  if (t.time_weights) {
    p.rab_time_heads = check_table(*t.time_weights, q, "rab_time_weights");
    p.rab_time_buckets = static_cast<int>(t.time_weights->size(-1) - 1);
    p.rab_time_weights = t.time_weights->data_ptr<float>();
    TORCH_CHECK_VALUE(t.timestamps.has_value(), "rab_time_weights needs rab_timestamps");
    const at::Tensor& ts = *t.timestamps;
    TORCH_CHECK_VALUE(ts.device() == q.device() && ts.scalar_type() == at::kLong && ts.is_contiguous() &&
                          ts.dim() == 1 && ts.size(0) == q.size(0),
                      "rab_timestamps must be a contiguous int64 tensor of shape (T,) on q's device");
    p.rab_timestamps = ts.data_ptr<int64_t>();
    if (t.next_timestamps) {
      const at::Tensor& nt = *t.next_timestamps;
      TORCH_CHECK_VALUE(t.time_next, "rab_next_timestamps only applies with rab_time_next");
      TORCH_CHECK_VALUE(nt.device() == q.device() && nt.scalar_type() == at::kLong && nt.is_contiguous() &&
                            nt.dim() == 1 && nt.size(0) == batch,
                        "rab_next_timestamps must be a contiguous int64 tensor of shape (B,) on q's device");
      p.rab_next_timestamps = nt.data_ptr<int64_t>();
    }
    TORCH_CHECK_VALUE(std::isfinite(t.time_divisor) && t.time_divisor > 0.0, "rab_time_divisor must be positive");
    p.rab_time_next = t.time_next;
    p.rab_time_divisor = static_cast<float>(t.time_divisor);
  } else {
    TORCH_CHECK_VALUE(!t.timestamps && !t.next_timestamps, "rab_timestamps / rab_next_timestamps need rab_time_weights");
  }
  if (t.shared_positions) {
    TORCH_CHECK_VALUE(t.position_weights.has_value(), "rab_shared_positions needs rab_position_weights");
    TORCH_CHECK_VALUE(t.shared_positions->device() == q.device(), "rab_shared_positions must be on q's device");
    p.rab_shared_positions = opt_int_ptr(t.shared_positions, batch, "rab_shared_positions");
  }
  p.drab_pos_weights = table_grad(t.dposition, t.position_weights, "drab_position");
  p.drab_time_weights = table_grad(t.dtime, t.time_weights, "drab_time");
#ifdef HSTU_DISABLE_RAB
  TORCH_CHECK_VALUE(false, "rab_position_weights / rab_time_weights: built with HSTU_DISABLE_RAB (no rab kernels)");
#endif
}

// Dropout fields of the parameter block (dropout.h): p in [0, 1); p == 0 leaves dropout off (the kernels without
// any dropout code run).
void set_dropout(AttnParams& p, double dropout_p, int64_t seed) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1)");
  p.dropout = dropout_p > 0.0;
  const uint64_t s = static_cast<uint64_t>(seed);
  p.dropout_seed_lo = static_cast<uint32_t>(s & 0xffffffffu);
  p.dropout_seed_hi = static_cast<uint32_t>(s >> 32);
  const double thr = std::ceil(dropout_p * 4294967296.0);  // exact: p * 2^32 only shifts the exponent
  p.dropout_threshold = thr >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(thr);
  p.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
}

// What a dispatch runs: the forward, the backward or the cached forward (run_fwd / run_bwd / run_fwd_cached).
enum class Pass { kFwd, kBwd, kFwdCached };

template <Pass kPass, typename T, int D, bool kRab>
void run_pass(const AttnParams& p, const KernelOptions& o, cudaStream_t s) {
  if constexpr (kPass == Pass::kBwd) {
    run_bwd<T, D, kRab>(p, o, s);
  } else if constexpr (kPass == Pass::kFwd) {
    run_fwd<T, D, kRab>(p, o, s);
  } else if constexpr (kCachedFwdHeadDim<D>) {
    run_fwd_cached<T, D, kRab>(p, s);
  } else {
    TORCH_CHECK_VALUE(false, "hstu attention: no cached forward at head dim ", D);
  }
}

// The kHasRab units run both the dense rab and the bias tables (rab_tables.h).
template <Pass kPass, typename T, int D>
void dispatch_rab(const AttnParams& p, const KernelOptions& o, cudaStream_t s) {
  if (p.rab != nullptr || p.rab_pos_weights != nullptr || p.rab_time_weights != nullptr) {
#ifndef HSTU_DISABLE_RAB
    run_pass<kPass, T, D, true>(p, o, s);
#else
    TORCH_CHECK(false, "hstu attention: built with HSTU_DISABLE_RAB");
#endif
  } else {
    run_pass<kPass, T, D, false>(p, o, s);
  }
}

// Whether this build compiled head dim hdim in.
bool head_dim_compiled(int64_t hdim) {
  switch (hdim) {
#ifndef HSTU_DISABLE_HDIM32
    case 32: return true;
#endif
#ifndef HSTU_DISABLE_HDIM64
    case 64: return true;
#endif
#ifndef HSTU_DISABLE_HDIM128
    case 128: return true;
#endif
#ifndef HSTU_DISABLE_HDIM256
    case 256: return true;
#endif
    default: return false;
  }
}

template <Pass kPass, typename T>
void dispatch_hdim(const AttnParams& p, const KernelOptions& o, int hdim, cudaStream_t s) {
  switch (hdim) {
#ifndef HSTU_DISABLE_HDIM32
    case 32: return dispatch_rab<kPass, T, 32>(p, o, s);
#endif
#ifndef HSTU_DISABLE_HDIM64
    case 64: return dispatch_rab<kPass, T, 64>(p, o, s);
#endif
#ifndef HSTU_DISABLE_HDIM128
    case 128: return dispatch_rab<kPass, T, 128>(p, o, s);
#endif
#ifndef HSTU_DISABLE_HDIM256
    case 256: return dispatch_rab<kPass, T, 256>(p, o, s);
#endif
    default: TORCH_CHECK(false, "hstu attention: head dim ", hdim, " is not compiled in");
  }
}

template <Pass kPass>
void dispatch(const AttnParams& p, const KernelOptions& o, at::ScalarType dtype, int hdim, cudaStream_t s) {
  if (dtype == at::kBFloat16) {
#ifndef HSTU_DISABLE_BF16
    return dispatch_hdim<kPass, __nv_bfloat16>(p, o, hdim, s);
#endif
  } else {
#ifndef HSTU_DISABLE_FP16
    return dispatch_hdim<kPass, __half>(p, o, hdim, s);
#endif
  }
  TORCH_CHECK(false, "hstu attention: dtype ", dtype, " is not compiled in");
}

// The options object Python builds (hstu.ops.hstu_attention.cuda.KernelVariant), checked: a benchmark variant in a
// build without HSTU_BENCH_VARIANTS is refused instead of silently running the default kernels.
Choice to_choice(const std::optional<bool>& v) {
  return !v.has_value() ? Choice::kAuto : (*v ? Choice::kOn : Choice::kOff);
}

KernelOptions make_options(bool deterministic, bool sm90_forward, bool sm90_backward, bool fwd_warp_specialized,
                           std::optional<bool> fwd_two_per_sm, bool fwd_persistent,
                           std::optional<bool> grouped_schedule, int64_t bench_bwd_warps, bool bench_d256_two_pass) {
  if (bench_bwd_warps != 0 && bench_bwd_warps != 8)
    throw pybind11::value_error("bench_bwd_warps must be 0 (the tile config) or 8, got " +
                                std::to_string(bench_bwd_warps));
#ifndef HSTU_BENCH_VARIANTS
  if (bench_bwd_warps != 0 || bench_d256_two_pass)
    throw pybind11::value_error(std::string(bench_bwd_warps != 0 ? "bench_bwd_warps" : "bench_d256_two_pass") +
                                " needs a build with the benchmark variants (HSTU_BENCH_VARIANTS=1)");
#endif
  KernelOptions o;
  o.deterministic = deterministic;
  o.sm90_forward = sm90_forward;
  o.sm90_backward = sm90_backward;
  o.fwd_warp_specialized = fwd_warp_specialized;
  o.fwd_two_per_sm = to_choice(fwd_two_per_sm);
  o.fwd_persistent = fwd_persistent;
  o.grouped_schedule = to_choice(grouped_schedule);
  o.bench_bwd_warps = static_cast<int>(bench_bwd_warps);
  o.bench_d256_two_pass = bench_d256_two_pass;
  return o;
}

}  // namespace

// out: preallocated (T, H, D) like q (the caller may poison it); returns out.
at::Tensor fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seq_offsets,
               int64_t max_seqlen, double alpha, int64_t scaling_seqlen, bool causal, int64_t window,
               const std::optional<at::Tensor>& num_contexts, const std::optional<at::Tensor>& num_targets,
               int64_t group, const std::optional<at::Tensor>& rab, at::Tensor out, double dropout_p,
               int64_t dropout_seed, const KernelOptions& options, const BiasTables& tables) {
  c10::cuda::CUDAGuard guard(q.device());
  AttnParams p = make_params(q, k, v, seq_offsets, max_seqlen, alpha, scaling_seqlen, causal, window, num_contexts,
                             num_targets, group, rab);
  set_dropout(p, dropout_p, dropout_seed);
  TORCH_CHECK_VALUE(!tables.dposition && !tables.dtime, "the forward takes no table gradients");
  set_tables(p, tables, q);
  check_qkv(out, q, "out");
  p.out = out.data_ptr();
  // The persistent sm90 forward's work-item counter. Uninitialised: that kernel's launcher zeroes it on the stream
  // only when it launches (a fill kernel here cost every forward a launch).
  const at::Tensor tile_counter = at::empty({1}, q.options().dtype(at::kInt));
  p.tile_counter = tile_counter.data_ptr<int>();
  if (q.numel() > 0)
    dispatch<Pass::kFwd>(p, options, q.scalar_type(), static_cast<int>(q.size(2)), c10::cuda::getCurrentCUDAStream().stream());
  return out;
}

// The cached forward (cached.h): q, k, v (T_new, H, D) jagged by delta_offsets (B + 1) are the new rows, k_cache /
// v_cache (T_cache, H, D) jagged by cache_offsets (B + 1) the cached rows before them; max_new_rows / max_seqlen: the
// largest n_b and c_b + n_b. rab: dense (B, 1 or H, >= max_new_rows, >= max_seqlen), rows = new rows, or None.
// out: preallocated like q; returns out. Runs the sm80-style forward on every architecture.
// page_table (B, max_pages) int32 with page_size (a power of two): k_cache / v_cache are pools of pages and
// cache_offsets only give the cached lengths (AttnParams::page_table); None: the contiguous cache.
at::Tensor fwd_cached(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& delta_offsets,
                      int64_t max_new_rows, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& cache_offsets, int64_t max_seqlen, double alpha, int64_t scaling_seqlen,
                      int64_t window, const std::optional<at::Tensor>& num_contexts,
                      const std::optional<at::Tensor>& num_targets, int64_t group, const std::optional<at::Tensor>& rab,
                      at::Tensor out, const std::optional<at::Tensor>& page_table, int64_t page_size) {
  c10::cuda::CUDAGuard guard(q.device());
  AttnParams p = make_params(q, k, v, delta_offsets, max_new_rows, alpha, scaling_seqlen, /*causal=*/true, window,
                             num_contexts, num_targets, group, std::nullopt);
  TORCH_CHECK(max_seqlen >= max_new_rows && max_seqlen < (1 << 30), "max_seqlen must be in [max_new_rows, 2^30)");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k_cache, "k_cache"}, {v_cache, "v_cache"}}) {
    TORCH_CHECK(t.is_cuda() && t.device() == q.device() && t.dim() == 3 && t.scalar_type() == q.scalar_type() &&
                    t.is_contiguous(),
                name, " must be a contiguous (T_cache, H, D) CUDA tensor of q's dtype on q's device");
    TORCH_CHECK(t.size(1) == q.size(1) && t.size(2) == q.size(2) && t.size(0) == k_cache.size(0), name,
                " must have q's heads and head dim and k_cache's rows");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
  }
  TORCH_CHECK(cache_offsets.is_cuda() && cache_offsets.device() == q.device() &&
                  cache_offsets.scalar_type() == at::kInt && cache_offsets.dim() == 1 && cache_offsets.is_contiguous() &&
                  cache_offsets.numel() == delta_offsets.numel(),
              "cache_offsets must be a contiguous int32 CUDA tensor of delta_offsets' shape (B + 1,)");
  TORCH_CHECK(k_cache.size(0) < (int64_t(1) << 31), "k_cache too large");
  if (page_table.has_value()) {
    const at::Tensor& t = *page_table;
    TORCH_CHECK_VALUE(page_size > 0 && page_size <= (1 << 20) && (page_size & (page_size - 1)) == 0,
                      "page_size must be a power of two in [1, 2^20], got ", page_size);
    TORCH_CHECK_VALUE(t.is_cuda() && t.device() == q.device() && t.scalar_type() == at::kInt && t.dim() == 2 &&
                          t.is_contiguous() && t.size(0) == delta_offsets.numel() - 1,
                      "page_table must be a contiguous (B, max_pages) int32 CUDA tensor on q's device");
    TORCH_CHECK_VALUE(k_cache.size(0) % page_size == 0, "k_cache must hold whole pages of page_size rows");
    p.page_table = t.data_ptr<int>();
    p.page_table_stride = t.size(1);
    int shift = 0;
    while ((int64_t(1) << shift) < page_size) ++shift;
    p.page_shift = shift;
  }
  if (rab.has_value()) set_rab(p, *rab, q, max_new_rows, max_seqlen);
  check_qkv(out, q, "out");
  p.out = out.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.cache_offsets = cache_offsets.data_ptr<int>();
  if (q.numel() > 0)
    dispatch<Pass::kFwdCached>(p, KernelOptions{}, q.scalar_type(), static_cast<int>(q.size(2)),
                               c10::cuda::getCurrentCUDAStream().stream());
  return out;
}

// dq, dk, dv: preallocated like q; drab: fp32 zeros shaped like rab (contiguous) or None.
// options.deterministic: dq from its own kernel (no atomics, bitwise reproducible); false: the dk/dv kernel also adds
// dq into a float32 workspace with atomics (one pass over S and dP, faster; the summation order varies).
void bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
         const at::Tensor& seq_offsets, int64_t max_seqlen, double alpha, int64_t scaling_seqlen, bool causal,
         int64_t window, const std::optional<at::Tensor>& num_contexts, const std::optional<at::Tensor>& num_targets,
         int64_t group, const std::optional<at::Tensor>& rab, at::Tensor dq, at::Tensor dk, at::Tensor dv,
         const std::optional<at::Tensor>& drab, double dropout_p, int64_t dropout_seed, const KernelOptions& options,
         const BiasTables& tables) {
#ifdef HSTU_DISABLE_BACKWARD
  TORCH_CHECK(false, "hstu attention: built with HSTU_DISABLE_BACKWARD");
#else
  c10::cuda::CUDAGuard guard(q.device());
  AttnParams p = make_params(q, k, v, seq_offsets, max_seqlen, alpha, scaling_seqlen, causal, window, num_contexts,
                             num_targets, group, rab);
  set_dropout(p, dropout_p, dropout_seed);
  set_tables(p, tables, q);
  check_qkv(dout, q, "grad_out");
  check_qkv(dq, q, "dq");
  check_qkv(dk, q, "dk");
  check_qkv(dv, q, "dv");
  p.dout = dout.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  if (drab.has_value()) {
    TORCH_CHECK(rab.has_value(), "drab needs rab");
    const at::Tensor& d = *drab;
    TORCH_CHECK(d.is_cuda() && d.scalar_type() == at::kFloat && d.is_contiguous() && d.sizes() == rab->sizes(),
                "drab must be a contiguous float32 tensor shaped like rab");
    p.drab = d.data_ptr<float>();
    p.drab_batch_stride = d.stride(0);
    p.drab_head_stride = d.stride(1);
    p.drab_row_stride = d.stride(2);
  }
  at::Tensor dq_accum;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (!options.deterministic && q.numel() > 0) {
    // zeroed with a memset, not at::zeros: its fill kernel costs several times the host time (short sequences are
    // host-bound)
    dq_accum = at::empty(q.sizes(), q.options().dtype(at::kFloat));
    C10_CUDA_CHECK(cudaMemsetAsync(dq_accum.data_ptr(), 0, dq_accum.numel() * sizeof(float), stream));
    p.dq_accum = dq_accum.data_ptr<float>();
    p.total_rows = q.size(0);
  }
  at::Tensor table_slots;
  if (options.deterministic && q.numel() > 0 && rab_table_slot_floats(p) > 0) {
    // every slot the dq kernel sums is written by the dk/dv kernel first: no zeroing
    table_slots = at::empty({rab_table_slot_floats(p)}, q.options().dtype(at::kFloat));
    p.rab_table_slots = table_slots.data_ptr<float>();
  }
  if (q.numel() > 0) dispatch<Pass::kBwd>(p, options, q.scalar_type(), static_cast<int>(q.size(2)), stream);
#endif
}

// Debug: fills out (B, H, N, N) contiguous bool CUDA tensor with the kernels' dropout keep mask for
// (seed, p): out[b, h, i, j] is whether the attention weight of row i, key j of sequence b, head h is kept.
at::Tensor dropout_keep_mask(int64_t seed, double dropout_p, at::Tensor out) {
  TORCH_CHECK(out.is_cuda() && out.scalar_type() == at::kBool && out.dim() == 4 && out.is_contiguous(),
              "out must be a contiguous (B, H, N, N) bool CUDA tensor");
  TORCH_CHECK(out.size(2) == out.size(3), "out must be (B, H, N, N)");
  TORCH_CHECK(out.size(2) < (1 << 30) && out.size(0) * out.size(1) < (int64_t(1) << 31), "out is too large");
  c10::cuda::CUDAGuard guard(out.device());
  AttnParams p{};
  p.batch = static_cast<int>(out.size(0));
  p.heads = static_cast<int>(out.size(1));
  p.max_seqlen = static_cast<int>(out.size(2));
  set_dropout(p, dropout_p, seed);
  // Any compiled forward unit carries the mask kernel; pick one that the build switches kept.
#ifndef HSTU_DISABLE_BF16
  using MaskT = __nv_bfloat16;
#else
  using MaskT = __half;
#endif
#if !defined(HSTU_DISABLE_HDIM32)
  constexpr int kMaskD = 32;
#elif !defined(HSTU_DISABLE_HDIM64)
  constexpr int kMaskD = 64;
#elif !defined(HSTU_DISABLE_HDIM128)
  constexpr int kMaskD = 128;
#else
  constexpr int kMaskD = 256;
#endif
  run_dropout_keep_mask<MaskT, kMaskD, false>(p, out.data_ptr<bool>(), c10::cuda::getCurrentCUDAStream().stream());
  return out;
}

// Which kernels run_fwd / run_bwd would launch for a call with these properties on the current device: heuristics.h's
// plan, the same one the launchers follow. direction: "forward" or "backward"; dtype: "bfloat16" or "float16".
pybind11::dict kernel_plan(const std::string& direction, const std::string& dtype, int64_t head_dim, int64_t batch,
                           int64_t heads, int64_t max_seqlen, bool rab, bool rab_grad, bool dropout,
                           const KernelOptions& options, bool rab_tables) {
  if (direction != "forward" && direction != "backward")
    throw pybind11::value_error("direction must be 'forward' or 'backward', got '" + direction + "'");
  if (dtype != "bfloat16" && dtype != "float16")
    throw pybind11::value_error("dtype must be 'bfloat16' or 'float16', got '" + dtype + "'");
  if (!head_dim_compiled(head_dim))
    throw pybind11::value_error("head_dim " + std::to_string(head_dim) + " is not compiled in");
  if (batch < 0 || heads < 0 || max_seqlen < 0 || batch >= (int64_t{1} << 31) || heads >= (int64_t{1} << 31) ||
      max_seqlen >= (int64_t{1} << 30))
    throw pybind11::value_error("batch, heads and max_seqlen must be non-negative (and below 2^31, 2^31, 2^30)");
  if (rab_grad && !rab) throw pybind11::value_error("rab_grad needs rab");
  if (rab_tables && !rab) throw pybind11::value_error("rab_tables needs rab (the tables are a relative bias)");
  Problem pr;
  pr.head_dim = static_cast<int>(head_dim);
  pr.batch = static_cast<int>(batch);
  pr.heads = static_cast<int>(heads);
  pr.max_seqlen = static_cast<int>(max_seqlen);
  pr.bf16 = dtype == "bfloat16";
  pr.rab = rab;
  pr.drab = rab_grad;
  pr.dropout = dropout;
  pr.rab_tables = rab_tables;
  const Platform pl = current_platform();
  pybind11::dict d;
  pybind11::list kernels;
  d["direction"] = direction;
  if (direction == "forward") {
    const FwdPlan plan = plan_forward(pr, options, pl);
    const Sm90FwdChoice& c = plan.sm90_choice;
    if (!plan.sm90) {
      d["kernel"] = "sm80";
      kernels.append("hstu_fwd_kernel");
    } else if (c.kernel == Sm90FwdKernel::kSingleRole) {
      d["kernel"] = "sm90_single_role";
      kernels.append("hstu_fwd_sm90_kernel");
    } else {
      d["kernel"] = c.kernel == Sm90FwdKernel::kTwoPerSm ? "sm90_two_per_sm" : "sm90_ping_pong";
      kernels.append("hstu_fwd_sm90_ws_kernel");  // templated on its tile scheduler: d["persistent"]
    }
    d["consumer_warpgroups"] = plan.sm90 ? (c.kernel == Sm90FwdKernel::kTwoPerSm ? 1 : 2) : 0;
    d["persistent"] = plan.sm90 && c.persistent;
    d["sched_group"] = plan.sched_group;
  } else {
    const BwdPlan plan = plan_backward(pr, options, pl);
    d["kernel"] = plan.sm90 ? "sm90" : "sm80";
    d["atomic_dq"] = plan.atomic_dq;
    if (plan.sm90) {
      d["dkdv"] = pybind11::none();
      kernels.append(head_dim == 256 ? "hstu_bwd_sm90_split_kernel" : "hstu_bwd_sm90_kernel");
    } else {
      const char* dkdv[] = {"one_pass", "split_head_dim", "two_pass", "eight_warps"};
      d["dkdv"] = dkdv[static_cast<int>(plan.dkdv)];
      kernels.append("hstu_bwd_dkdv_kernel");
      if (!plan.atomic_dq) kernels.append("hstu_bwd_dq_kernel");
    }
    if (plan.atomic_dq) kernels.append("hstu_dq_convert_kernel");
    d["sched_group"] = plan.sched_group;
  }
  d["kernels"] = kernels;
  return d;
}

pybind11::dict build_info() {
  pybind11::dict d;
  pybind11::list dtypes, hdims;
#ifndef HSTU_DISABLE_BF16
  dtypes.append("bfloat16");
#endif
#ifndef HSTU_DISABLE_FP16
  dtypes.append("float16");
#endif
#ifndef HSTU_DISABLE_HDIM32
  hdims.append(32);
#endif
#ifndef HSTU_DISABLE_HDIM64
  hdims.append(64);
#endif
#ifndef HSTU_DISABLE_HDIM128
  hdims.append(128);
#endif
#ifndef HSTU_DISABLE_HDIM256
  hdims.append(256);
#endif
  d["dtypes"] = dtypes;
  d["head_dims"] = hdims;
#ifdef HSTU_DISABLE_RAB
  d["rab"] = false;
  d["rab_tables"] = false;
#else
  d["rab"] = true;
  d["rab_tables"] = true;  // the sm80-style kernels read the relative-bias tables (rab_tables.h)
#endif
#ifdef HSTU_DISABLE_BACKWARD
  d["backward"] = false;
#else
  d["backward"] = true;
#endif
  d["dropout"] = true;
  d["atomic_dq"] = true;
  pybind11::list cached_hdims;  // the cached forward's head dims (kCachedFwdHeadDim among the compiled ones)
  for (int hd : {32, 64, 128, 256})
    if (head_dim_compiled(hd) && cached_fwd_head_dim(hd)) cached_hdims.append(hd);
  d["cached_forward_head_dims"] = cached_hdims;
#ifdef HSTU_BENCH_VARIANTS
  d["bench_variants"] = true;  // benchmark-only kernel variants (KernelOptions::bench_*) compiled in
#else
  d["bench_variants"] = false;
#endif
#ifdef HSTU_WITH_SM90_FWD
  d["sm90_forward"] = true;  // Hopper wgmma forward units built (heuristics.h decides per call on sm_90)
#else
  d["sm90_forward"] = false;
#endif
#ifdef HSTU_WITH_SM90_BWD
  d["sm90_backward"] = true;  // Hopper wgmma backward units built (heuristics.h decides per call on sm_90)
#else
  d["sm90_backward"] = false;
#endif
  return d;
}

}  // namespace hstu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hstu fused CUDA kernels";
  namespace py = pybind11;
  py::class_<hstu::KernelOptions>(m, "KernelOptions",
                                  "how a call picks its kernels (csrc/hstu_attention/hstu.h, heuristics.h)")
      .def(py::init(&hstu::make_options), py::kw_only(), py::arg("deterministic") = false,
           py::arg("sm90_forward") = true, py::arg("sm90_backward") = true, py::arg("fwd_warp_specialized") = true,
           py::arg("fwd_two_per_sm") = py::none(), py::arg("fwd_persistent") = true,
           py::arg("grouped_schedule") = py::none(), py::arg("bench_bwd_warps") = 0,
           py::arg("bench_d256_two_pass") = false)
      .def_readonly("deterministic", &hstu::KernelOptions::deterministic)
      .def_readonly("sm90_forward", &hstu::KernelOptions::sm90_forward)
      .def_readonly("sm90_backward", &hstu::KernelOptions::sm90_backward)
      .def_readonly("fwd_warp_specialized", &hstu::KernelOptions::fwd_warp_specialized)
      .def_readonly("fwd_persistent", &hstu::KernelOptions::fwd_persistent)
      .def_readonly("bench_bwd_warps", &hstu::KernelOptions::bench_bwd_warps)
      .def_readonly("bench_d256_two_pass", &hstu::KernelOptions::bench_d256_two_pass);
  using OptTensor = std::optional<at::Tensor>;
  // The relative-bias tables' keywords (all optional).
  auto tables = [](OptTensor position_weights, OptTensor time_weights, OptTensor timestamps, OptTensor next_timestamps,
                   OptTensor shared_positions, bool time_next, double time_divisor, OptTensor dposition,
                   OptTensor dtime) {
    return hstu::BiasTables{std::move(position_weights), std::move(time_weights), std::move(timestamps),
                            std::move(next_timestamps), std::move(shared_positions), time_next, time_divisor,
                            std::move(dposition), std::move(dtime)};
  };
  m.def(
      "hstu_attn_fwd",
      [tables](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seq_offsets,
               int64_t max_seqlen, double alpha, int64_t scaling_seqlen, bool causal, int64_t window,
               const OptTensor& num_contexts, const OptTensor& num_targets, int64_t group, const OptTensor& rab,
               at::Tensor out, double dropout_p, int64_t dropout_seed, const hstu::KernelOptions& options,
               OptTensor rab_position_weights, OptTensor rab_time_weights, OptTensor rab_timestamps,
               OptTensor rab_next_timestamps, OptTensor rab_shared_positions, bool rab_time_next,
               double rab_time_divisor) {
        return hstu::fwd(q, k, v, seq_offsets, max_seqlen, alpha, scaling_seqlen, causal, window, num_contexts,
                         num_targets, group, rab, out, dropout_p, dropout_seed, options,
                         tables(rab_position_weights, rab_time_weights, rab_timestamps, rab_next_timestamps,
                                rab_shared_positions, rab_time_next, rab_time_divisor, std::nullopt, std::nullopt));
      },
      "HSTU attention forward", py::arg("q"), py::arg("k"), py::arg("v"), py::arg("seq_offsets"),
      py::arg("max_seqlen"), py::arg("alpha"), py::arg("scaling_seqlen"), py::arg("causal"), py::arg("window"),
      py::arg("num_contexts"), py::arg("num_targets"), py::arg("group"), py::arg("rab"), py::arg("out"),
      py::arg("dropout_p") = 0.0, py::arg("dropout_seed") = 0, py::arg("options") = hstu::KernelOptions{},
      py::arg("rab_position_weights") = py::none(), py::arg("rab_time_weights") = py::none(),
      py::arg("rab_timestamps") = py::none(), py::arg("rab_next_timestamps") = py::none(),
      py::arg("rab_shared_positions") = py::none(), py::arg("rab_time_next") = false,
      py::arg("rab_time_divisor") = 0.301);
  m.def(
      "hstu_attn_bwd",
      [tables](const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& seq_offsets, int64_t max_seqlen, double alpha, int64_t scaling_seqlen, bool causal,
               int64_t window, const OptTensor& num_contexts, const OptTensor& num_targets, int64_t group,
               const OptTensor& rab, at::Tensor dq, at::Tensor dk, at::Tensor dv, const OptTensor& drab,
               double dropout_p, int64_t dropout_seed, const hstu::KernelOptions& options,
               OptTensor rab_position_weights, OptTensor rab_time_weights, OptTensor rab_timestamps,
               OptTensor rab_next_timestamps, OptTensor rab_shared_positions, bool rab_time_next,
               double rab_time_divisor, OptTensor drab_position, OptTensor drab_time) {
        hstu::bwd(dout, q, k, v, seq_offsets, max_seqlen, alpha, scaling_seqlen, causal, window, num_contexts,
                  num_targets, group, rab, dq, dk, dv, drab, dropout_p, dropout_seed, options,
                  tables(rab_position_weights, rab_time_weights, rab_timestamps, rab_next_timestamps,
                         rab_shared_positions, rab_time_next, rab_time_divisor, drab_position, drab_time));
      },
      "HSTU attention backward", py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("seq_offsets"),
      py::arg("max_seqlen"), py::arg("alpha"), py::arg("scaling_seqlen"), py::arg("causal"), py::arg("window"),
      py::arg("num_contexts"), py::arg("num_targets"), py::arg("group"), py::arg("rab"), py::arg("dq"), py::arg("dk"),
      py::arg("dv"), py::arg("drab"), py::arg("dropout_p") = 0.0, py::arg("dropout_seed") = 0,
      py::arg("options") = hstu::KernelOptions{}, py::arg("rab_position_weights") = py::none(),
      py::arg("rab_time_weights") = py::none(), py::arg("rab_timestamps") = py::none(),
      py::arg("rab_next_timestamps") = py::none(), py::arg("rab_shared_positions") = py::none(),
      py::arg("rab_time_next") = false, py::arg("rab_time_divisor") = 0.301, py::arg("drab_position") = py::none(),
      py::arg("drab_time") = py::none());
  m.def("hstu_attn_fwd_cached", &hstu::fwd_cached,
        "HSTU cached attention forward: new rows against cached keys / values plus their own (inference)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("delta_offsets"), py::arg("max_new_rows"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_offsets"), py::arg("max_seqlen"), py::arg("alpha"),
        py::arg("scaling_seqlen"), py::arg("window"), py::arg("num_contexts"), py::arg("num_targets"),
        py::arg("group"), py::arg("rab"), py::arg("out"), py::arg("page_table") = py::none(),
        py::arg("page_size") = 0);
  m.def("kernel_plan", &hstu::kernel_plan,
        "which kernels a call with these properties runs on the current device (heuristics.h's plan)",
        py::arg("direction"), py::arg("dtype"), py::arg("head_dim"), py::arg("batch"), py::arg("heads"),
        py::arg("max_seqlen"), py::arg("rab"), py::arg("rab_grad"), py::arg("dropout"),
        py::arg("options") = hstu::KernelOptions{}, py::arg("rab_tables") = false);
  m.def("hstu_dropout_keep_mask", &hstu::dropout_keep_mask,
        "debug: the attention kernels' dropout keep mask (B, H, N, N) for (seed, p), written into out",
        py::arg("seed"), py::arg("dropout_p"), py::arg("out"));
  m.def("build_info", &hstu::build_info, "what this build compiled in");
}
