// The relative attention bias read from weight tables (AttnParams' rab_* fields, hstu.h) by the sm80-style kernels,
// and the shared-memory histograms of its backward (the tables' gradients). Math of
// hstu/ops/hstu_attention/rab_tables.py:
//   bias(i, j) = w_time[bucket(t_ref(i) - t_j)] + w_pos[clamp(p_i - p_j, -(M - 1), M - 1) + M - 1]
//   bucket(dt) = min(int(logf(float(max(|dt|, 1))) / divisor), K)   (float32 throughout, like the reference)
// Also compiled by the host emulation of the tests.
#pragma once

#include <cmath>
#include <cstdint>

#include "hstu.h"
#include "utils.h"

namespace hstu {

// Whether a call carries bias tables (the kHasRab units then run their table kernels instead of the dense rab).
__host__ __device__ __forceinline__ bool has_rab_tables(const AttnParams& p) {
  return p.rab_pos_weights != nullptr || p.rab_time_weights != nullptr;
}

// Floats of the backward's shared-memory table histograms (this head's time row, then its position row) for the
// gradient workspaces p asks for; 0 without table gradients.
__host__ __device__ __forceinline__ int rab_table_hist_floats(const AttnParams& p) {
  int n = 0;
  if (p.drab_time_weights != nullptr) n += p.rab_time_buckets + 1;
  if (p.drab_pos_weights != nullptr) n += p.rab_pos_size;
  return n;
}

// Row `head` of a (heads, size) table (row 0 of a one-row table shared by every head), or nullptr.
template <typename T>
__host__ __device__ __forceinline__ T* table_row(T* table, int heads, int head, int size) {
  return table == nullptr ? nullptr : table + static_cast<int64_t>(heads == 1 ? 0 : head) * size;
}

// Table ids of one (query, key) entry.
struct TableIndex {
  int time;  // bucket, or -1 without a time table
  int pos;   // position id, or -1 without a position table
};

// One (sequence, head)'s view of the tables. Built per block (row and key lookups read the sequence's timestamps
// through the read-only cache); every lookup needs i, j < L.
struct TableBias {
  const float* time_w;  // this head's time row, or nullptr
  const float* pos_w;   // this head's position row, or nullptr
  const int64_t* ts;    // the sequence's timestamps (time table only)
  int64_t tail;         // "next": t_ref of the sequence's last row
  int L;
  int history_end;  // positions are min(i, history_end)
  int half;         // M
  int buckets;      // K
  float divisor;
  float inv_divisor;
  bool next;

  __device__ __forceinline__ TableBias(const AttnParams& p, int batch, int head, int seq_start, int L_) {
    L = L_;
    time_w = table_row(p.rab_time_weights, p.rab_time_heads, head, p.rab_time_buckets + 1);
    pos_w = table_row(p.rab_pos_weights, p.rab_pos_heads, head, p.rab_pos_size);
    ts = p.rab_timestamps == nullptr ? nullptr : p.rab_timestamps + seq_start;
    next = p.rab_time_next;
    tail = 0;
    if (time_w != nullptr && next && L > 0)
      tail = p.rab_next_timestamps != nullptr ? ldg_i64(p.rab_next_timestamps + batch) : ldg_i64(ts + L - 1);
    history_end = p.rab_shared_positions != nullptr ? L - p.rab_shared_positions[batch] : L;
    half = (p.rab_pos_size + 1) / 2;
    buckets = p.rab_time_buckets;
    divisor = p.rab_time_divisor;
    inv_divisor = 1.f / divisor;
  }

  __device__ __forceinline__ static int64_t ldg_i64(const int64_t* ptr) {
#if defined(__CUDA_ARCH__)
    return __ldg(reinterpret_cast<const long long*>(ptr));
#else
    return *ptr;
#endif
  }

  // t_ref(i) of a row (0 without a time table)
  __device__ __forceinline__ int64_t row_time(int i) const {
    if (time_w == nullptr) return 0;
    if (!next) return ldg_i64(ts + i);
    return i + 1 < L ? ldg_i64(ts + i + 1) : tail;
  }
  // t_j of a key (0 without a time table)
  __device__ __forceinline__ int64_t key_time(int j) const { return time_w == nullptr ? 0 : ldg_i64(ts + j); }
  __device__ __forceinline__ int position(int i) const { return i < history_end ? i : history_end; }

  // The reference's float32 bucket, int(logf(m) / divisor) clamped to K. The fast estimate (approximate log, times
  // 1 / divisor: at most ~1e-4 from logf(m) / divisor for any int64 gap) truncates to the same integer unless it lies
  // within 1e-3 of one; only those entries pay for the correctly rounded logf and division.
  __device__ __forceinline__ int bucket(int64_t t_ref, int64_t t_key) const {
    const int64_t dt = t_ref - t_key;
    uint64_t mag = dt < 0 ? uint64_t{0} - static_cast<uint64_t>(dt) : static_cast<uint64_t>(dt);
    if (mag < 1) mag = 1;
    const float m = static_cast<float>(mag);
#if defined(__CUDA_ARCH__)
    const float fast = __logf(m) * inv_divisor;
#else  // host emulation of the kernels (tests only)
    const float fast = logf(m) * inv_divisor;
#endif
    if (fast >= static_cast<float>(buckets) + 1.f) return buckets;
    float b = fast;
    if (fabsf(fast - rintf(fast)) < 1e-3f) b = logf(m) / divisor;  // >= 0: truncation is the reference's floor
    const int id = static_cast<int>(b);
    return id < buckets ? id : buckets;
  }

  // Ids from a row's (t_ref, position) and a key's (t_j, position).
  __device__ __forceinline__ TableIndex index(int64_t t_ref, int p_row, int64_t t_key, int p_key) const {
    TableIndex id{-1, -1};
    if (time_w != nullptr) id.time = bucket(t_ref, t_key);
    if (pos_w != nullptr) {
      int r = p_row - p_key;
      r = r < -(half - 1) ? -(half - 1) : (r > half - 1 ? half - 1 : r);
      id.pos = r + half - 1;
    }
    return id;
  }
  __device__ __forceinline__ TableIndex index(int i, int j) const {
    return index(row_time(i), position(i), key_time(j), position(j));
  }

  // The bias of an entry: time part, then position part (the reference's order of the float32 sum).
  __device__ __forceinline__ float value(const TableIndex& id) const {
    float v = 0.f;
    if (id.time >= 0) v = time_w[id.time];
    if (id.pos >= 0) v += pos_w[id.pos];
    return v;
  }
};

// The table gradients of one block: d w_time[bucket] += g and d w_pos[id] += g for every entry, summed in a
// shared-memory fp32 histogram (time row, then position row) when the launch reserved one (p.rab_hist_floats > 0)
// and added into the global fp32 workspaces by flush(); with no histogram every entry goes to global atomics.
struct TableGrads {
  float* hist;        // shared histogram, or nullptr
  float* g_time;      // this head's row of the time-gradient workspace, or nullptr
  float* g_pos;       // this head's row of the position-gradient workspace, or nullptr
  int time_size;      // floats of the histogram's time row (0 without a time gradient)
  int total;          // floats of the histogram

  __device__ __forceinline__ TableGrads(const AttnParams& p, int head, float* smem_hist) {
    g_time = table_row(p.drab_time_weights, p.rab_time_heads, head, p.rab_time_buckets + 1);
    g_pos = table_row(p.drab_pos_weights, p.rab_pos_heads, head, p.rab_pos_size);
    time_size = g_time == nullptr ? 0 : p.rab_time_buckets + 1;
    total = rab_table_hist_floats(p);
    hist = p.rab_hist_floats > 0 ? smem_hist : nullptr;
  }

  __device__ __forceinline__ bool active() const { return g_time != nullptr || g_pos != nullptr; }

  // Zero the histogram (all threads of the block; the block's first barrier orders it before any add).
  template <int kThreads>
  __device__ __forceinline__ void clear(int tid) const {
    if (hist == nullptr) return;
    for (int k = tid; k < total; k += kThreads) hist[k] = 0.f;
  }

  __device__ __forceinline__ void add(const TableIndex& id, float g) const {
    if (g_time != nullptr) atomicAdd(hist != nullptr ? hist + id.time : g_time + id.time, g);
    if (g_pos != nullptr) atomicAdd(hist != nullptr ? hist + time_size + id.pos : g_pos + id.pos, g);
  }

  // After the block's last add: the histogram's non-zero entries into the workspaces (all threads of the block).
  template <int kThreads>
  __device__ __forceinline__ void flush(int tid) const {
    if (hist == nullptr) return;
    __syncthreads();
    for (int k = tid; k < total; k += kThreads) {
      const float v = hist[k];
      if (v == 0.f) continue;
      if (k < time_size)
        atomicAdd(g_time + k, v);
      else
        atomicAdd(g_pos + (k - time_size), v);
    }
  }
};

// The kernels' table state: TableBias with kTables, an empty stand-in otherwise (no code, no registers).
struct NoTableBias {};
template <bool kTables>
__device__ __forceinline__ auto make_table_bias(const AttnParams& p, int batch, int head, int seq_start, int L) {
  if constexpr (kTables)
    return TableBias(p, batch, head, seq_start, L);
  else
    return NoTableBias{};
}

// The dk/dv kernel's table-gradient state: TableGrads with kOn, an empty stand-in otherwise.
struct NoTableGrads {};
template <bool kOn>
__device__ __forceinline__ auto make_table_grads(const AttnParams& p, int head, float* smem_hist) {
  if constexpr (kOn)
    return TableGrads(p, head, smem_hist);
  else
    return NoTableGrads{};
}

// t_ref and position of the rows row_lo + 16 mi + 8 h (the forward-layout kernels' rows of a thread), once per
// block; rows past the sequence get zeros (never looked up).
template <int kMI>
__device__ __forceinline__ void table_rows(const TableBias& tb, int row_lo, int64_t (&t)[kMI][2], int (&pos)[kMI][2]) {
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = row_lo + 16 * mi + 8 * h;
      const bool in = i < tb.L;
      t[mi][h] = in ? tb.row_time(i) : 0;
      pos[mi][h] = in ? tb.position(i) : 0;
    }
  }
}

}  // namespace hstu
