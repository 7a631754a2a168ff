// The relative attention bias read from weight tables (AttnParams' rab_* fields, hstu.h) by the sm80-style kernels,
// and the shared-memory histograms of its backward (the tables' gradients). Math of
// hstu/ops/hstu_attention/rab_tables.py:
//   bias(i, j) = w_time[bucket(t_ref(i) - t_j)] + w_pos[clamp(p_i - p_j, -(M - 1), M - 1) + M - 1]
//   bucket(dt) = min(int(logf(float(max(|dt|, 1))) / divisor), K)   (float32 throughout, like the reference)
// Also compiled by the host emulation of the tests.
#pragma once

#include <cmath>
#include <cstdint>
#if defined(HSTU_HOST_EMULATION)
#include <vector>
#endif

#include "hstu.h"
#include "utils.h"

namespace hstu {

// Whether a call carries bias tables (the kHasRab units then run their table kernels instead of the dense rab).
__host__ __device__ __forceinline__ bool has_rab_tables(const AttnParams& p) {
  return p.rab_pos_weights != nullptr || p.rab_time_weights != nullptr;
}

// Warps of the deterministic path's dk/dv kernels with a bias (TileConfig::kDkDvWarps); each keeps its own
// histogram.
constexpr int kDetTableWarps = 4;

// Floats of the dS pass's shared-memory table histograms (rab_table_grad_floats each, hstu.h): one per block on the
// atomic-dq path, one per warp (kDetTableWarps) on the deterministic path; 0 without table gradients.
__host__ __device__ __forceinline__ int rab_table_hist_floats(const AttnParams& p) {
  const int n = rab_table_grad_floats(p);
  return p.dq_accum == nullptr ? kDetTableWarps * n : n;
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
    total = rab_table_grad_floats(p);
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

// Warp collectives of the deterministic histograms (the host emulation: through the fiber scheduler's warp barrier).
#if defined(HSTU_HOST_EMULATION)
inline int g_emu_warp_ints[32][32];  // [warp][lane]
// Every lane's v, after a warp barrier: v of lane l in vals[l].
inline const int* emu_warp_exchange(int v) {
  int* row = g_emu_warp_ints[emu::warp()];
  emu::warp_sync();  // the previous exchange's reads are done
  row[emu::lane()] = v;
  emu::warp_sync();
  return row;
}
inline unsigned warp_match_any(int v) {
  const int* vals = emu_warp_exchange(v);
  unsigned peers = 0;
  for (int l = 0; l < 32; ++l) peers |= vals[l] == v ? 1u << l : 0u;
  return peers;
}
inline int warp_max(int v) {
  const int* vals = emu_warp_exchange(v);
  int m = vals[0];
  for (int l = 1; l < 32; ++l) m = vals[l] > m ? vals[l] : m;
  return m;
}
inline void warp_sync_all() { emu::warp_sync(); }
inline int popcount(unsigned v) { return __builtin_popcount(v); }
#else
__device__ __forceinline__ unsigned warp_match_any(int v) { return __match_any_sync(0xffffffffu, v); }
__device__ __forceinline__ int warp_max(int v) { return __reduce_max_sync(0xffffffffu, v); }
__device__ __forceinline__ void warp_sync_all() { __syncwarp(); }
__device__ __forceinline__ int popcount(unsigned v) { return __popc(v); }
#endif

// The deterministic path's slot workspace: p.rab_table_slots (the host emulation, whose harness passes none, keeps
// one of rab_table_slot_floats in a static buffer shared by the dk/dv and dq launches of a call).
#if defined(HSTU_HOST_EMULATION)
inline float* table_slots(const AttnParams& p) {
  static std::vector<float> slots;
  if (p.rab_table_slots != nullptr) return p.rab_table_slots;
  const size_t n = static_cast<size_t>(rab_table_slot_floats(p));
  if (slots.size() < n) slots.resize(n);
  return slots.data();
}
#else
__device__ __forceinline__ float* table_slots(const AttnParams& p) { return p.rab_table_slots; }
#endif

// The deterministic table gradients of one warp of the dk/dv kernel (16 keys, starting at key0): a histogram of
// rab_table_grad_floats (time row, then position row) in shared memory when the launch reserved one per warp
// (p.rab_hist_floats), else directly in the warp's slot of the workspace, slot (batch, head, key0 / 16). Lanes that
// hit the same id add in ascending lane order, one lane per id and round, so every sum has a fixed order; flush()
// copies a shared histogram to the slot. Warps whose keys all lie past the sequence have no slot (nothing to add).
struct DetTableGrads {
  float* hist;  // this warp's histogram, or nullptr
  float* slot;  // its slot
  int time_size;
  int total;
  bool time_on;
  bool pos_on;

  __device__ __forceinline__ DetTableGrads(const AttnParams& p, int batch, int head, int key0, int L, int warp,
                                           int warps, float* smem_hist) {
    time_on = p.drab_time_weights != nullptr;
    pos_on = p.drab_pos_weights != nullptr;
    time_size = time_on ? p.rab_time_buckets + 1 : 0;
    total = rab_table_grad_floats(p);
    hist = slot = nullptr;
    if (total == 0 || key0 >= L) return;
    const int64_t index = (static_cast<int64_t>(batch) * p.heads + head) * ((p.max_seqlen + 15) / 16) + key0 / 16;
    slot = table_slots(p) + index * total;
    hist = p.rab_hist_floats >= warps * total ? smem_hist + warp * total : slot;
  }

  // Zero the histogram (the warp's lanes; ordered before the first add by the warp barrier).
  __device__ __forceinline__ void clear(int lane) const {
    if (hist == nullptr) return;
    for (int k = lane; k < total; k += 32) hist[k] = 0.f;
    warp_sync_all();
  }

  // hist[id] += g for the lanes with `on` (all 32 lanes call it).
  __device__ __forceinline__ void add_one(int id, float g, bool on, int lane) const {
    const unsigned peers = warp_match_any(on ? id : -1);
    const int rank = popcount(peers & ((1u << lane) - 1u));
    const int rounds = warp_max(on ? rank + 1 : 0);
    for (int r = 0; r < rounds; ++r) {
      if (on && rank == r) hist[id] += g;
      warp_sync_all();
    }
  }

  // d w_time[id.time] += g, d w_pos[id.pos] += g for the lanes with `on` (all 32 lanes call it).
  __device__ __forceinline__ void add(const TableIndex& id, float g, bool on, int lane) const {
    if (hist == nullptr) return;
    if (time_on) add_one(id.time, g, on, lane);
    if (pos_on) add_one(time_size + id.pos, g, on, lane);
  }

  // After the warp's last add: a shared histogram into the slot.
  __device__ __forceinline__ void flush(int lane) const {
    if (hist == nullptr || hist == slot) return;
    warp_sync_all();
    for (int k = lane; k < total; k += 32) slot[k] = hist[k];
  }
};

// The dq kernel's part of the deterministic table gradients (the dk/dv launches have written every slot it reads):
// each gradient entry is the sum of its slots in the order batch, head, key block (every head's slots for a table
// shared by the heads), stored into p.drab_*_weights. The blocks of the grid split the entries (thread tid of
// block `block` of `blocks`).
template <int kThreads>
__device__ __forceinline__ void reduce_table_slots(const AttnParams& p, int64_t block, int64_t blocks, int tid) {
  const int per = rab_table_grad_floats(p);
  if (per == 0) return;
  const int time_size = p.drab_time_weights != nullptr ? p.rab_time_buckets + 1 : 0;
  const int pos_size = p.drab_pos_weights != nullptr ? p.rab_pos_size : 0;
  const int64_t time_entries = time_size == 0 ? 0 : int64_t{p.rab_time_heads} * time_size;
  const int64_t entries = time_entries + (pos_size == 0 ? 0 : int64_t{p.rab_pos_heads} * pos_size);
  const int key_blocks = (p.max_seqlen + 15) / 16;
  const float* slots = table_slots(p);
  for (int64_t e = block * kThreads + tid; e < entries; e += blocks * kThreads) {
    const bool time = e < time_entries;
    const int64_t r = time ? e : e - time_entries;
    const int size = time ? time_size : pos_size;
    const int table_heads = time ? p.rab_time_heads : p.rab_pos_heads;
    const int th = static_cast<int>(r / size);
    const int offset = (time ? 0 : time_size) + static_cast<int>(r % size);
    const int h_begin = table_heads == 1 ? 0 : th, h_end = table_heads == 1 ? p.heads : th + 1;
    float sum = 0.f;
    for (int b = 0; b < p.batch; ++b) {
      const int blocks_b = (p.seq_offsets[b + 1] - p.seq_offsets[b] + 15) / 16;
      for (int h = h_begin; h < h_end; ++h) {
        const float* s = slots + ((static_cast<int64_t>(b) * p.heads + h) * key_blocks) * per + offset;
        for (int kb = 0; kb < blocks_b; ++kb) sum += s[static_cast<int64_t>(kb) * per];
      }
    }
    (time ? p.drab_time_weights : p.drab_pos_weights)[r] = sum;
  }
}

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
// The same for the deterministic path's per-warp state: DetTableGrads with kOn.
template <bool kOn>
__device__ __forceinline__ auto make_det_table_grads(const AttnParams& p, int batch, int head, int key0, int L,
                                                     int warp, int warps, float* smem_hist) {
  if constexpr (kOn)
    return DetTableGrads(p, batch, head, key0, L, warp, warps, smem_hist);
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
