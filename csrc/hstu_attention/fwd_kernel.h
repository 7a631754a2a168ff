// Forward mainloop + epilogue (sm80 tensor-core path; also the path that runs on sm90).
// Block = kWarps warps, each warp owns 16 * kMI query rows; the block walks the key tiles its query tile can see,
// double-buffering K/V in shared memory with cp.async. GEMMs: S = Q K^T (A and B from shared memory), then
// O += SiLU(S) V with SiLU(S) converted in registers from the accumulator layout to the A-operand layout.
#pragma once

#include "cached.h"
#include "dropout.h"
#include "hstu.h"
#include "mask.h"
#include "pointwise.h"
#include "rab_tables.h"
#include "tile_scheduler.h"
#include "utils.h"

namespace hstu {

template <typename Element_, int kHeadDim_, bool kHasRab_, int kWarps_, int kBlockN_, int kMI_ = 1, int kStages_ = 2>
struct FwdTraits {
  static constexpr int kStages = kStages_;  // K/V shared-memory pipeline depth
  static constexpr int kMI = kMI_;
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kHasRab = kHasRab_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = 16 * kMI * kWarps;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kSmemQ = kBlockM * kHeadDim;
  static constexpr int kSmemKV = kBlockN * kHeadDim;
  static constexpr int kSmemFlags = (kBlockN + 15) / 16 * 16;  // per key of the current tile: V row non-finite
  static constexpr int kSmemBytes = (kSmemQ + 2 * kStages * kSmemKV) * 2 + kSmemFlags;
};

// add_dropped_terms (utils.h) for the kMI row blocks of a warp in the forward layout (the forward and dq kernels):
// rows row_lo + 16 mi (+ 8), keys n0 + 8 nb + 2 t + (e & 1), an entry selected where visible and (kDropout) kept
// (keep: dropout_bits_qk_mi's flags); rows(k): the original of the tile's row k (StridedRows, CachedRows).
template <typename Element, bool kDropout, int kMI, int kNB, int kKB, int kWords, typename Rows>
__device__ __forceinline__ void add_dropped_terms_mi(float (&acc)[kMI][kNB][4], const float (&w)[kMI][kKB][4],
                                                     const uint8_t* flags, const Rows& rows,
                                                     const SeqMask& mk, int row_lo, int n0,
                                                     const uint32_t (&keep)[kWords], int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi) {
    auto selected = [&](int nb, int e) {
      const int i = row_lo + 16 * mi + (e >> 1) * 8, j = n0 + nb * 8 + 2 * t + (e & 1);
      bool sel = mk.visible(i, j);
      if constexpr (kDropout) sel = sel && dropout_flag(keep, mi * (4 * kKB) + nb * 4 + e);
      return sel;
    };
    add_dropped_terms<Element, kNB, kKB>(acc[mi], w[mi], flags, rows, selected, lane);
  }
}

// kDropout: attention dropout (dropout.h); the false instantiation (p == 0) contains no dropout code at all.
// kTables (kHasRab units only): the bias comes from the weight tables (rab_tables.h) instead of the dense rab.
// kCached: the cached forward (cached.h): the query tiles are tiles of new rows, at absolute rows cached + local
// row, and the keys come from the cache and the new rows; false: the full attention (cached = 0 at compile time).
// kPaged (kCached only): the cached keys / values are read through the page table (AttnParams::page_table).
template <typename Traits, bool kDropout, bool kTables = false, bool kCached = false, bool kPaged = false>
__global__ void __launch_bounds__(Traits::kThreads) hstu_fwd_kernel(const AttnParams p) {
  using Element = typename Traits::Element;
  static_assert(!kTables || Traits::kHasRab, "the table kernels are the kHasRab instantiations");
  static_assert(!kCached || (!kDropout && !kTables), "the cached forward has no dropout and no bias tables");
  static_assert(kCached || !kPaged, "only the cached forward reads a paged cache");
  constexpr int D = Traits::kHeadDim, BM = Traits::kBlockM, BN = Traits::kBlockN, NT = Traits::kThreads;
  static_assert(BM % 16 == 0 && BN % 16 == 0, "dropout.h's 2 x 2 Philox grouping needs 16-aligned tiles");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* sQ = reinterpret_cast<Element*>(smem_raw);
  Element* sK = sQ + Traits::kSmemQ;  // kStages slots
  Element* sV = sK + Traits::kStages * Traits::kSmemKV;
  uint8_t* v_bad = reinterpret_cast<uint8_t*>(sV + Traits::kStages * Traits::kSmemKV);

  const FwdWork fw = schedule_fwd_block<kCached, kPaged>(p);
  const WorkItem& w = fw.item;
  const SeqMask& mk = w.mask;
  const int q_shift = fw.cached;  // absolute row of the sequence's first query row
  const int m_local = w.tile * BM;  // first row of the tile in q / out
  const int m0 = q_shift + m_local;  // first row of the tile in the sequence
  if (m0 >= mk.L) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;

  const int64_t base = static_cast<int64_t>(w.seq_start) * p.row_stride + static_cast<int64_t>(w.head) * D;
  const Element* gQ = reinterpret_cast<const Element*>(p.q) + base;
  const Element* gK = reinterpret_cast<const Element*>(p.k) + base;
  const Element* gV = reinterpret_cast<const Element*>(p.v) + base;

  load_tile_async<BM, D, NT>(sQ, gQ + m_local * p.row_stride, p.row_stride, mk.L - m0, tid);
  // kCached: the tile's keys from the cache and the new rows
  [[maybe_unused]] auto cached_rows = [&](const void* cache, const Element* fresh, int row0) {
    return make_cached_rows<kPaged, D>(p, fw, cache, fresh, row0);
  };

  const int n_tiles = (mk.key_end(m0, m0 + BM) + BN - 1) / BN;
  auto next_tile = [&](int n) { return mk.next_key_tile(n, n_tiles, BN, m0, m0 + BM); };
  auto load_kv = [&](int n, int stage) {
    if constexpr (kCached) {
      load_cached_tile_async<BN, D, NT>(sK + stage * Traits::kSmemKV, cached_rows(p.k_cache, gK, n * BN), mk.L, tid);
      load_cached_tile_async<BN, D, NT>(sV + stage * Traits::kSmemKV, cached_rows(p.v_cache, gV, n * BN), mk.L, tid);
    } else {
      load_tile_pair_async<BN, D, NT>(sK + stage * Traits::kSmemKV, sV + stage * Traits::kSmemKV, gK, gV,
                                      p.row_stride, n * BN, mk.L, tid);
    }
  };

  // Pipeline: the prologue requests the first kStages - 1 visible K/V tiles (one commit group each, Q rides in the
  // first); iteration `it` waits for group `it`, then requests the next tile into the slot freed by iteration it-1.
  constexpr int kStages = Traits::kStages;
  int n = next_tile(-1);
  int n_load = n;
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (n_load < n_tiles) {
      load_kv(n_load, st);
      n_load = next_tile(n_load);
    }
    cp_async_commit();
  }

  constexpr int MI = Traits::kMI;
  float acc_o[MI][D / 8][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) zero_acc(acc_o[mi]);
  const int hr = (Traits::kHasRab && p.rab_heads == 1) ? 0 : w.head;
  const int warp_row0 = warp * 16 * MI;       // first row of this warp inside the tile
  const int row_lo = m0 + warp_row0 + g;      // rows row_lo + 16 mi + {0, 8} of this thread
  const uint32_t drop_bh = static_cast<uint32_t>(w.batch * p.heads + w.head);  // dropout counter (kDropout only)
  const auto tb = make_table_bias<kTables>(p, w.batch, w.head, w.seq_start, mk.L);
  [[maybe_unused]] int64_t row_t[MI][2];  // kTables: t_ref and position of this thread's rows
  [[maybe_unused]] int row_p[MI][2];
  if constexpr (kTables) table_rows<MI>(tb, row_lo, row_t, row_p);

  int it = 0;
  while (n < n_tiles) {
    const int stage = it % kStages;
    cute::cp_async_wait<kStages - 2>();
    __syncthreads();
    if (n_load < n_tiles) {
      load_kv(n_load, (it + kStages - 1) % kStages);
      n_load = next_tile(n_load);
    }
    cp_async_commit();

    const Element* tK = sK + stage * Traits::kSmemKV;
    Element* tV = sV + stage * Traits::kSmemKV;
    const int n0 = n * BN;
    // Tiles with masked (or dropped) entries: O = P V multiplies them by P = 0, so the tile's non-finite V entries
    // are zeroed (one scan of the tile) and the terms of the entries that are selected are added back below. Fully
    // visible tiles skip both: every row sees every key there.
    const bool exact_v = kDropout || !mk.tile_full(m0, m0 + BM, n0, n0 + BN);
    bool v_nonfinite = false;
    if (exact_v) v_nonfinite = __syncthreads_or(zero_nonfinite_rows<BN, D, NT>(tV, v_bad, tid));
    // Dropout keep flags of this thread's elements (before the GEMM: fewer registers live): bit
    // mi * kKeepBits + 4 nb + e of keep (32-bit words) belongs to s[mi][nb][e].
    constexpr int kKeepBits = BN / 2;  // flags per 16-row block (dropout_bits_qk_mi)
    uint32_t keep[(MI * kKeepBits + 31) / 32];
    if constexpr (kDropout) dropout_bits_qk_mi<MI, BN>(keep, p, drop_bh, m0 + warp_row0, n * BN, lane);
    float s[MI][BN / 8][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) zero_acc(s[mi]);
    gemm_ss_nk_mi<MI, BN / 8, D, D, D>(s, sQ, warp_row0, tK, lane);

    // pointwise stage, two unrolled copies (with_tile_mask: fully visible tiles skip every mask and bounds test)
    auto pointwise = [&](auto masked_tag) {
      constexpr bool kMasked = decltype(masked_tag)::value != TileMask::kNone;
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = row_lo + 16 * mi + (e >> 1) * 8;
            const int j = n0 + nb * 8 + 2 * t + (e & 1);
            float x = s[mi][nb][e];
            if constexpr (kTables) {
              if (!kMasked || (i < mk.L && j < mk.L))
                x += tb.value(tb.index(row_t[mi][e >> 1], row_p[mi][e >> 1], tb.key_time(j), tb.position(j)));
            } else if constexpr (Traits::kHasRab) {
              if (!kMasked || (i < mk.L && j < mk.L)) x += rab_value<Element>(p, w.batch, hr, i - q_shift, j);
            }
            x *= p.alpha;
            float pv = x * sigmoid_t<Element>(x);
            if constexpr (kMasked) {
              if (!mk.visible(i, j)) pv = 0.f;
            }
            if constexpr (kDropout) {
              // 1 / (1 - p) is folded into the epilogue scale
              if (!dropout_flag(keep, mi * kKeepBits + nb * 4 + e)) pv = 0.f;
            }
            s[mi][nb][e] = pv;
          }
        }
      }
    };
    with_tile_mask(mk, m0, m0 + BM, n0, n0 + BN, pointwise);
    uint32_t pa[MI][BN / 16][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) acc_to_a<Element, BN / 8>(pa[mi], s[mi]);
    gemm_rs_kn_mi<MI, D / 8, BN, D>(acc_o, pa, tV, lane);
    if (v_nonfinite) {
      if constexpr (kCached)
        add_dropped_terms_mi<Element, kDropout>(acc_o, s, v_bad, cached_rows(p.v_cache, gV, n0), mk, row_lo, n0, keep,
                                               lane);
      else
        add_dropped_terms_mi<Element, kDropout>(acc_o, s, v_bad, StridedRows<Element>{gV + n0 * p.row_stride,
                                               p.row_stride}, mk, row_lo, n0, keep, lane);
    }
    ++it;
    n = next_tile(n);
  }
  cp_async_wait_all();

  Element* gO = reinterpret_cast<Element*>(p.out) + base + m_local * p.row_stride;
  float o_scale = p.inv_scale;
  if constexpr (kDropout) o_scale *= p.dropout_scale;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
    store_acc_rows<Element, D / 8>(gO, p.row_stride, acc_o[mi], o_scale, warp_row0 + 16 * mi, mk.L - m0, lane);
}

}  // namespace hstu
