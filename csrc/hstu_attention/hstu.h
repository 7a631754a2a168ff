// Host/device parameter block and launcher declarations of the fused HSTU attention kernels.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace hstu {

// Everything a kernel needs, passed by value. Tensors are jagged (T, H, D) with unit stride in D.
struct AttnParams {
  // inputs
  const void* __restrict__ q;
  const void* __restrict__ k;
  const void* __restrict__ v;
  const int* __restrict__ seq_offsets;   // (B + 1,)
  const int* __restrict__ num_contexts;  // (B,) or nullptr
  const int* __restrict__ num_targets;   // (B,) or nullptr
  const void* __restrict__ rab;          // (B, Hr, >=N, >=N), q's dtype, or nullptr
  int64_t rab_batch_stride;
  int64_t rab_head_stride;
  int64_t rab_row_stride;
  int rab_heads;  // 1 or H

  // Relative bias as weight tables (hstu/ops/hstu_attention/rab_tables.py), exclusive with rab:
  //   bias(b, h, i, j) = time_w[h][bucket(t_ref(i) - t_j)] + pos_w[h][clamp(p_i - p_j, -(M-1), M-1) + M - 1]
  // bucket(dt) = min(int(logf(max(|dt|, 1)) / time_divisor), time_buckets); t_ref(i) = t_i, or with rab_time_next the
  // next token's time (the last token of sequence b: next_timestamps[b], or its own time when that is nullptr);
  // p_i = min(i, L_b - shared_positions[b]) (i without shared_positions). Set by the binding; the sm80-style
  // kernels of the kHasRab units read them (rab_tables.h) when rab is nullptr.
  const float* __restrict__ rab_pos_weights;   // (Hp, 2M - 1) fp32, Hp = 1 or H, or nullptr
  const float* __restrict__ rab_time_weights;  // (Ht, K + 1) fp32, Ht = 1 or H, or nullptr
  const int64_t* __restrict__ rab_timestamps;       // (T,) seconds, with rab_time_weights
  const int64_t* __restrict__ rab_next_timestamps;  // (B,) or nullptr
  const int* __restrict__ rab_shared_positions;     // (B,) or nullptr
  int rab_pos_heads;    // Hp (row stride of rab_pos_weights: rab_pos_size)
  int rab_pos_size;     // 2M - 1
  int rab_time_heads;   // Ht (row stride of rab_time_weights: time_buckets + 1)
  int rab_time_buckets; // K
  bool rab_time_next;   // time reference "next"
  float rab_time_divisor;
  // Table gradients (backward): fp32 workspaces shaped like the tables, zero on entry, or nullptr. The dk/dv kernel
  // adds alpha * dS of every entry into its weights: on the atomic-dq path a per-block shared-memory histogram, then
  // global atomics (the summation order varies); on the deterministic path per-warp histograms written to
  // rab_table_slots and summed in a fixed order by the dq kernel (bitwise reproducible).
  float* __restrict__ drab_pos_weights;
  float* __restrict__ drab_time_weights;
  // Floats of that shared-memory histogram (rab_table_hist_floats), set by launch.h when it fits next to the
  // kernel's tiles; 0: every entry goes to global atomics (deterministic path: each warp's histogram is its slot).
  int rab_hist_floats;

  // outputs (forward) / gradient inputs+outputs (backward)
  void* __restrict__ out;
  const void* __restrict__ dout;
  void* __restrict__ dq;
  void* __restrict__ dk;
  void* __restrict__ dv;
  float* __restrict__ drab;  // fp32, laid out like a contiguous (B, Hr, rab_rows, rab_cols), or nullptr
  int64_t drab_batch_stride;
  int64_t drab_head_stride;
  int64_t drab_row_stride;
  // Atomic dq (deterministic = false): fp32 (T, H, D) workspace, zero on entry, same row stride as q; the dk/dv
  // kernel adds alpha-free partial dq = dS K into it and a final kernel writes dq = scale * workspace in q's dtype.
  // nullptr: the deterministic dq kernel runs instead.
  float* __restrict__ dq_accum;
  int64_t total_rows;  // T (tokens)

  // (sequence, head) pairs per group of the sm90 kernels' grouped schedule (tile_scheduler.h), set by launch.h
  int sched_group;
  // Work items the persistent sm90 forward has handed out beyond its first wave: one int, zero at launch
  int* tile_counter;

  // Cached forward (run_fwd_cached, cached.h): q, k, v, out and seq_offsets are the new rows of every sequence, and
  // sequence b is its cached rows (k_cache / v_cache rows cache_offsets[b] .. cache_offsets[b + 1], same row stride)
  // followed by its new rows: the masks apply at absolute positions (new row i is row cached_b + i) and max_seqlen
  // is the largest number of new rows. Dense rab rows are new rows, its columns the keys of the whole sequence.
  // nullptr (every other launch): full attention over seq_offsets.
  const void* __restrict__ k_cache;
  const void* __restrict__ v_cache;
  const int* __restrict__ cache_offsets;  // (B + 1,)
  // Paged cache (page_table != nullptr): k_cache / v_cache are pools of pages of 2^page_shift rows, and cached row r
  // of sequence b is pool row page_table[b * page_table_stride + (r >> page_shift)] * 2^page_shift + r % 2^page_shift;
  // cache_offsets then only give the cached lengths (cache_offsets[b + 1] - cache_offsets[b]).
  const int* __restrict__ page_table;
  int64_t page_table_stride;
  int page_shift;

  // row strides (elements) of the (T, H, D) tensors; head stride is D
  int64_t row_stride;
  int batch;
  int heads;
  int max_seqlen;
  float alpha;
  float inv_scale;  // 1 / scaling_seqlen
  bool causal;
  int window;  // < 0: no window
  int group;   // target group size >= 1

  // attention dropout (dropout.h): active when `dropout` is set (p > 0); keep when a Philox word >= threshold
  bool dropout;
  uint32_t dropout_seed_lo;
  uint32_t dropout_seed_hi;
  uint32_t dropout_threshold;  // min(ceil(p * 2^32), 2^32 - 1)
  float dropout_scale;         // 1 / (1 - p)

  // Deterministic backward with table gradients (dq_accum == nullptr): rab_table_slot_floats floats, one histogram of
  // rab_table_grad_floats per (batch, head, 16-key block) that the dk/dv kernel's warps write (no atomics) and the
  // dq kernel sums in a fixed order into drab_*_weights (rab_tables.h); nullptr otherwise.
  float* __restrict__ rab_table_slots;
};

// Floats of one table-gradient histogram: the time row (K + 1) then the position row (2M - 1) of the gradients p
// asks for; 0 without table gradients.
__host__ __device__ inline int rab_table_grad_floats(const AttnParams& p) {
  int n = 0;
  if (p.drab_time_weights != nullptr) n += p.rab_time_buckets + 1;
  if (p.drab_pos_weights != nullptr) n += p.rab_pos_size;
  return n;
}
// Floats of the deterministic path's slot workspace (rab_table_slots): batch x heads x ceil(max_seqlen / 16)
// histograms.
__host__ __device__ inline int64_t rab_table_slot_floats(const AttnParams& p) {
  return int64_t{p.batch} * p.heads * ((p.max_seqlen + 15) / 16) * rab_table_grad_floats(p);
}

// A tri-state choice: let heuristics.h decide, or force it off / on.
enum class Choice : signed char { kAuto = -1, kOff = 0, kOn = 1 };

// How a call picks its kernels: built by the binding from Python's arguments (hstu.ops.hstu_attention.cuda) and read
// by heuristics.h's pure functions, which launch.h and the binding's kernel_plan query share. The defaults are what
// the op runs; the other values are explicit variants for tests and benchmarks.
struct KernelOptions {
  bool deterministic = false;         // backward: dq by its own kernel, no atomics (bitwise reproducible)
  bool sm90_forward = true;           // the Hopper forward wherever it applies (false: the sm80-style kernel)
  bool sm90_backward = true;          // the Hopper backward wherever it applies (false: the sm80-style kernels)
  bool fwd_warp_specialized = true;   // Hopper forward: producer warpgroup + consumers (false: the single-role kernel)
  Choice fwd_two_per_sm = Choice::kAuto;  // Hopper warp-specialized forward at head dims 64 / 128: two 64-row blocks
                                          // per SM (kAuto: sequences of at most 256 tokens)
  bool fwd_persistent = true;         // Hopper warp-specialized forward at head dims 64 / 128: one wave of blocks
  Choice grouped_schedule = Choice::kAuto;  // Hopper kernels' launch order: grouped (kOn) or pair after pair (kOff)
  // Benchmark-only variants of the sm80-style atomic-dq backward, compiled with HSTU_BENCH_VARIANTS only (the binding
  // refuses them otherwise): 8 warps per dk/dv block (bf16, head dim 128, no rab, no dropout; 0: the tile config),
  // and head dim 256 as a dV pass plus a dK + dq pass instead of one split-head-dim pass.
  int bench_bwd_warps = 0;
  bool bench_d256_two_pass = false;
};

// One explicit specialisation per (element type, head dim, rab) lives in instantiations/*.cu.
template <typename Element, int kHeadDim, bool kHasRab>
void run_fwd(const AttnParams& params, const KernelOptions& options, cudaStream_t stream);

template <typename Element, int kHeadDim, bool kHasRab>
void run_bwd(const AttnParams& params, const KernelOptions& options, cudaStream_t stream);

// The cached forward (AttnParams' cached fields; no dropout, no bias tables: a dense rab or none) at the head dims
// generate_kernels.py instantiates it for (CACHED_FWD_HEAD_DIMS); it runs the sm80-style forward on every arch.
constexpr bool cached_fwd_head_dim(int head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256;
}
template <int kHeadDim>
inline constexpr bool kCachedFwdHeadDim = cached_fwd_head_dim(kHeadDim);

template <typename Element, int kHeadDim, bool kHasRab>
void run_fwd_cached(const AttnParams& params, cudaStream_t stream);

// Debug: writes the dropout keep mask (batch, heads, max_seqlen, max_seqlen) as contiguous bool. Specialised in
// every forward translation unit (so any pruned build has one); the template arguments only pick that unit.
template <typename Element, int kHeadDim, bool kHasRab>
void run_dropout_keep_mask(const AttnParams& params, bool* out, cudaStream_t stream);

}  // namespace hstu
