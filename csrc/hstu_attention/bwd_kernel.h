// Backward kernels (sm80 tensor-core path, also run on sm90). No softmax statistics are needed for HSTU:
//   x = alpha * (q.k + rab), P = SiLU(x) / N, dP = dO . v, dS = dP * SiLU'(x) * alpha / N
//   dV = P^T dO, dK = dS^T Q, dQ = dS K, drab = dS.
// With dropout (kDropout, keep mask from dropout.h, the same bits as the forward): P and dS are multiplied by
// keep / (1 - p); the keep flags zero elements in registers, 1 / (1 - p) joins the store scales.
// Two paths:
//   deterministic (no atomics): dkdv kernel (a block owns a key tile and walks the query tiles that can see it)
//     plus dq kernel (a block owns a query tile and walks the key tiles it can see); S and dP are computed twice.
//   atomic dq (kAtomicDq): the dkdv kernel also forms dQ_partial = dS K for its key tile (dS^T goes through shared
//     memory once, transposed by ldmatrix) and adds it into a float32 workspace with vector atomics; a final
//     elementwise kernel (launch.h) scales and converts it. One pass: S and dP are computed once.
#pragma once

#include "fwd_kernel.h"

namespace hstu {

enum BwdPass : int { kPassBoth = 0, kPassDV = 1, kPassDK = 2 };

// kDSplit = 2: two warps share each 16-key block and own half of the head dim each (dK / dV accumulators, and the
// partial sums of S^T and dP^T over their half, exchanged through shared memory): one pass at head dim 256.
template <typename Element_, int kHeadDim_, bool kHasRab_, int kWarps_, int kBlockM_, int kStages_ = 2,
          int kDSplit_ = 1>
struct BwdDkDvTraits {
  static constexpr int kStages = kStages_;  // Q/dO shared-memory pipeline depth
  static constexpr int kDSplit = kDSplit_;
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kHasRab = kHasRab_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockN = 16 * kWarps / kDSplit;  // keys per block
  static constexpr int kBlockM = kBlockM_;     // queries per step
  static constexpr int kSmemKV = kBlockN * kHeadDim;
  static constexpr int kSmemQ = kBlockM * kHeadDim;
  // Per row of the current Q and dO tiles and of the resident K tile: whether it held a non-finite entry (zeroed).
  static constexpr int kSmemFlags = (2 * kBlockM + kBlockN + 15) / 16 * 16;
  static constexpr int kSmemTiles = (2 * kSmemKV + 2 * kStages * kSmemQ) * 2;
  static constexpr int kSmemBytes = kSmemTiles + kSmemFlags;
  // Atomic dq: dS^T tile (keys x queries) in shared memory, and the warp grid of dQ_partial = dS K (kBlockM x
  // kHeadDim): kDqWarpsN warps across the head dim (>= 16 columns each), kDqWarpsM across the rows; each warp
  // covers its columns in chunks of kDqChunk so that at most 32 accumulator floats per thread are live.
  static constexpr int kSmemDS = kBlockN * kBlockM;
  static constexpr int kXchFloats = kDSplit > 1 ? kWarps * 32 * (kBlockM / 8) * 8 : 0;  // S^T + dP^T partials
  static constexpr int kSmemBytesAtomic = kSmemTiles + kSmemDS * 2 + kXchFloats * 4 + kSmemFlags;
  static constexpr int kDqWarpsN = (kWarps < kHeadDim / 16) ? kWarps : kHeadDim / 16;
  static constexpr int kDqWarpsM = kWarps / kDqWarpsN;
  static constexpr int kDqRows = kBlockM / kDqWarpsM;
  static constexpr int kDqCols = kHeadDim / kDqWarpsN;
  static constexpr int kDqMI = kDqRows / 16;
  static constexpr int kDqChunkMax = 64 / kDqMI;
  static constexpr int kDqChunk = (kDqCols < kDqChunkMax) ? kDqCols : kDqChunkMax;
  static_assert(kDqWarpsM * kDqWarpsN == kWarps && kDqRows % 16 == 0 && kDqCols % kDqChunk == 0 &&
                    kDqChunk % 16 == 0,
                "atomic-dq warp grid");
};

template <typename Element_, int kHeadDim_, bool kHasRab_, int kWarps_, int kBlockN_, int kMI_ = 1, int kStages_ = 2>
struct BwdDqTraits {
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
  static constexpr int kSmemFlags = (kBlockN + 15) / 16 * 16;  // per key of the current tile: K row non-finite
  static constexpr int kSmemBytes = (2 * kSmemQ + 2 * kStages * kSmemKV) * 2 + kSmemFlags;
};


// kAtomicDq: also accumulate dq into p.dq_accum (needs the dS pass: kPassBoth or kPassDK).
// kTables (kHasRab units only): the bias comes from the weight tables (rab_tables.h); the dS pass sums the tables'
// gradients in histograms (shared memory past the tiles when p.rab_hist_floats reserves it): with kAtomicDq one per
// block, added into p.drab_*_weights with global atomics (TableGrads); without (the deterministic path) one per
// warp, written to the warp's slot of p.rab_table_slots in a fixed order and summed by the dq kernel
// (DetTableGrads).
template <typename Traits, int kPass, bool kDropout, bool kAtomicDq, bool kTables = false>
__global__ void __launch_bounds__(Traits::kThreads) hstu_bwd_dkdv_kernel(const AttnParams p) {
  using Element = typename Traits::Element;
  static_assert(!kTables || Traits::kHasRab, "the table kernels are the kHasRab instantiations");
  constexpr int D = Traits::kHeadDim, BM = Traits::kBlockM, BN = Traits::kBlockN, NT = Traits::kThreads;
  static_assert(BM % 16 == 0 && BN % 16 == 0, "dropout.h's 2 x 2 Philox grouping needs 16-aligned tiles");
  constexpr bool kDoDV = kPass != kPassDK;
  constexpr bool kDoDK = kPass != kPassDV;
  static_assert(!kAtomicDq || kDoDK, "atomic dq needs dS");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* sK = reinterpret_cast<Element*>(smem_raw);
  Element* sV = sK + Traits::kSmemKV;
  Element* sQ = sV + Traits::kSmemKV;  // kStages slots
  Element* sdO = sQ + Traits::kStages * Traits::kSmemQ;
  Element* sdS = sdO + Traits::kStages * Traits::kSmemQ;  // kAtomicDq only: dS^T, [key][query] (BN x BM)
  uint8_t* q_bad = smem_raw + (kAtomicDq ? Traits::kSmemBytesAtomic : Traits::kSmemBytes) - Traits::kSmemFlags;
  uint8_t* do_bad = q_bad + BM;
  uint8_t* k_bad = do_bad + BM;
  float* table_hist = reinterpret_cast<float*>(q_bad + Traits::kSmemFlags);  // kTables: p.rab_hist_floats

  const WorkItem w = schedule_block(p, /*reverse=*/false);
  const SeqMask& mk = w.mask;
  const int n0 = w.tile * BN;
  if (n0 >= mk.L) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  // A 1-head rab whose gradient is wanted sums over heads: one block then walks all heads in turn, adding into
  // drab in a fixed order (deterministic, no atomics).
  const bool head_loop = kDoDK && p.drab != nullptr && p.rab_heads == 1 && p.heads > 1;
  const int h_begin = w.head, h_end = head_loop ? p.heads : w.head + 1;
  const int m_begin = (mk.causal && mk.c == 0) ? n0 / BM : 0;  // rows before the key tile see none of it
  const int m_tiles = (mk.L + BM - 1) / BM;
  constexpr int DS = Traits::kDSplit, DH = D / DS;  // warps per 16-key block; head-dim columns per warp
  static_assert(DS == 1 || (kAtomicDq && kPass == kPassBoth && DH % 64 == 0), "split head dim: one atomic pass");
  const int wk = warp / DS, wd = warp % DS;  // key block, head-dim part of this warp
  const int key_lo = n0 + wk * 16 + g;       // keys key_lo and key_lo + 8 of this thread
  const auto tb = make_table_bias<kTables>(p, w.batch, w.head, w.seq_start, mk.L);
  const auto tg = make_table_grads<kTables && kDoDK && kAtomicDq>(p, w.head, table_hist);
  constexpr bool kDetTables = kTables && kDoDK && !kAtomicDq;
  static_assert(!kDetTables || DS == 1, "deterministic table gradients: one warp per 16-key block");
  const auto dg = make_det_table_grads<kDetTables>(p, w.batch, w.head, n0 + wk * 16, mk.L, wk, Traits::kWarps,
                                                   table_hist);
  [[maybe_unused]] int64_t key_t[2];  // kTables: t_j and position of this thread's keys
  [[maybe_unused]] int key_p[2];
  if constexpr (kTables) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = key_lo + 8 * h;
      key_t[h] = j < mk.L ? tb.key_time(j) : 0;
      key_p[h] = j < mk.L ? tb.position(j) : 0;
    }
  }
  if constexpr (kTables && kDoDK && kAtomicDq) tg.template clear<NT>(tid);  // ordered before any add by the head
                                                                            // loop's barrier
  if constexpr (kDetTables) dg.clear(lane);
  float ds_scale = p.alpha * p.inv_scale;  // dS (dk, drab) scale; P (dv) uses p_scale
  float p_scale = p.inv_scale;
  if constexpr (kDropout) {
    ds_scale *= p.dropout_scale;
    p_scale *= p.dropout_scale;
  }

  auto next_tile = [&](int m) { return mk.next_query_tile(m, m_tiles, BM, n0, n0 + BN); };

  for (int head = h_begin; head < h_end; ++head) {
    const int64_t base = static_cast<int64_t>(w.seq_start) * p.row_stride + static_cast<int64_t>(head) * D;
    const Element* gQ = reinterpret_cast<const Element*>(p.q) + base;
    const Element* gK = reinterpret_cast<const Element*>(p.k) + base;
    const Element* gV = reinterpret_cast<const Element*>(p.v) + base;
    const Element* gdO = reinterpret_cast<const Element*>(p.dout) + base;
    const int hr = (Traits::kHasRab && p.rab_heads == 1) ? 0 : head;

    __syncthreads();  // the previous head's shared tiles are no longer read
    load_tile_pair_async<BN, D, NT>(sK, sV, gK, gV, p.row_stride, n0, mk.L, tid);
    bool k_nonfinite = false;
    auto load_q = [&](int m, int stage) {
      load_tile_pair_async<BM, D, NT>(sQ + stage * Traits::kSmemQ, sdO + stage * Traits::kSmemQ, gQ, gdO,
                                      p.row_stride, m * BM, mk.L, tid);
    };
    constexpr int kStages = Traits::kStages;
    int m = next_tile(m_begin - 1);
    int m_load = m;
#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) {
      if (m_load < m_tiles) {
        load_q(m_load, st);
        m_load = next_tile(m_load);
      }
      cp_async_commit();
    }

    float acc_dv[kDoDV ? DH / 8 : 1][4];
    float acc_dk[kDoDK ? DH / 8 : 1][4];
    zero_acc(acc_dv);
    zero_acc(acc_dk);

    int it = 0;
    while (m < m_tiles) {
      const int stage = it % kStages;
      cute::cp_async_wait<kStages - 2>();
      __syncthreads();
      if (m_load < m_tiles) {
        load_q(m_load, (it + kStages - 1) % kStages);
        m_load = next_tile(m_load);
      }
      cp_async_commit();
      Element* tQ = sQ + stage * Traits::kSmemQ;
      Element* tdO = sdO + stage * Traits::kSmemQ;
      const int m0 = m * BM;
      // Atomic dq: dQ = dS K multiplies K by the zeros of masked dS, so the resident K tile's non-finite entries are
      // zeroed once per block and head (its copies rode in the first commit group) and every score reading a zeroed
      // entry is recomputed below, in every query tile.
      if constexpr (kAtomicDq) {
        if (it == 0) k_nonfinite = __syncthreads_or(zero_nonfinite_rows<BN, D, NT>(sK, k_bad, tid));
      }
      // Tiles with masked (or dropped) entries: dK = dS^T Q and dV = P^T dO multiply them by zeros, so the tile's
      // non-finite Q entries (dS pass) and dO entries (dV pass) are zeroed, the scores reading them recomputed and
      // the dropped terms of the selected entries added back. Fully visible tiles skip this.
      const bool exact_q = kDropout || !mk.tile_full(m0, m0 + BM, n0, n0 + BN);
      bool q_nonfinite = false, do_nonfinite = false;
      if (exact_q) {
        bool found_q = false, found_do = false;
        if constexpr (kDoDK) found_q = zero_nonfinite_rows<BM, D, NT>(tQ, q_bad, tid);
        if constexpr (kDoDV) found_do = zero_nonfinite_rows<BM, D, NT>(tdO, do_bad, tid);
        q_nonfinite = __syncthreads_or(found_q);
        do_nonfinite = __syncthreads_or(found_do);
      }

      // Dropout keep flags (before the GEMMs: fewer registers live): bit 4 nb + e belongs to st[nb][e] /
      // dpt[nb][e] (key n0 + 16 warp + g + 8 (e >> 1), query m0 + 8 nb + 2 t + (e & 1)); the counter is this
      // head's (the 1-head-rab loop walks heads).
      uint32_t keep = 0;
      if constexpr (kDropout)
        keep = dropout_bits_kq<BM / 8>(p, static_cast<uint32_t>(w.batch * p.heads + head), n0 + wk * 16, m0, lane);
      float st[BM / 8][4];  // S^T: rows = keys, cols = queries
      zero_acc(st);
      // Column offsets of wd * DH (a multiple of 64) commute with the swizzle: the sub-tiles are plain pointers.
      gemm_ss_nk<BM / 8, DH, D, D>(st, sK + wd * DH, wk * 16, tQ + wd * DH, lane);
      float dpt[kDoDK ? BM / 8 : 1][4];  // dP^T
      if constexpr (kDoDK) {
        zero_acc(dpt);
        gemm_ss_nk<BM / 8, DH, D, D>(dpt, sV + wd * DH, wk * 16, tdO + wd * DH, lane);
      }
      if constexpr (DS == 2) {
        // Sum the two halves' partial S^T and dP^T: both warps of the pair end with identical full values (a + b
        // == b + a). Layout [warp][float4 slot][lane]: conflict-free 16-byte accesses. The pair synchronises on
        // its own named barrier; the next iteration's block barrier guards the slots against reuse.
        float4* xch = reinterpret_cast<float4*>(sdS + Traits::kSmemDS);
        constexpr int NS = BM / 8;  // float4 slots per array
        float4* mine = xch + warp * (2 * NS) * 32 + lane;
        const float4* other = xch + (warp ^ 1) * (2 * NS) * 32 + lane;
#pragma unroll
        for (int nb = 0; nb < NS; ++nb) {
          mine[nb * 32] = make_float4(st[nb][0], st[nb][1], st[nb][2], st[nb][3]);
          mine[(NS + nb) * 32] = make_float4(dpt[nb][0], dpt[nb][1], dpt[nb][2], dpt[nb][3]);
        }
        named_barrier_sync<64>(1 + wk);
#pragma unroll
        for (int nb = 0; nb < NS; ++nb) {
          const float4 a = other[nb * 32], b = other[(NS + nb) * 32];
          st[nb][0] += a.x, st[nb][1] += a.y, st[nb][2] += a.z, st[nb][3] += a.w;
          dpt[nb][0] += b.x, dpt[nb][1] += b.y, dpt[nb][2] += b.z, dpt[nb][3] += b.w;
        }
      }
      if (q_nonfinite || k_nonfinite || do_nonfinite) {
        // Scores whose operands had entries zeroed: the exact non-finite value where the entry is visible (masked
        // ones are selected away below).
#pragma unroll
        for (int nb = 0; nb < BM / 8; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = key_lo + (e >> 1) * 8;
            const int i = m0 + nb * 8 + 2 * t + (e & 1);
            if (!mk.visible(i, j)) continue;
            const bool row_q = q_nonfinite && q_bad[i - m0], row_k = k_nonfinite && k_bad[j - n0];
            if (row_q || row_k) nonfinite_dot<D>(gQ + i * p.row_stride, gK + j * p.row_stride, st[nb][e]);
            if constexpr (kDoDK) {
              if (do_nonfinite && do_bad[i - m0])
                nonfinite_dot<D>(gdO + i * p.row_stride, gV + j * p.row_stride, dpt[nb][e]);
            }
          }
        }
      }
      auto pointwise = [&](auto masked_tag) {
        constexpr bool kMasked = decltype(masked_tag)::value != TileMask::kNone;
#pragma unroll
        for (int nb = 0; nb < BM / 8; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = key_lo + (e >> 1) * 8;
            const int i = m0 + nb * 8 + 2 * t + (e & 1);
            [[maybe_unused]] const bool inside = !kMasked || (i < mk.L && j < mk.L);
            float x = st[nb][e];
            [[maybe_unused]] TableIndex ids{-1, -1};
            if constexpr (kTables) {
              if (inside) {
                ids = tb.index(tb.row_time(i), tb.position(i), key_t[e >> 1], key_p[e >> 1]);
                x += tb.value(ids);
              }
            } else if constexpr (Traits::kHasRab) {
              if (inside) x += rab_value<Element>(p, w.batch, hr, i, j);
            }
            x *= p.alpha;
            const float sig = sigmoid_t<Element>(x);
            bool vis = !kMasked || mk.visible(i, j);
            if constexpr (kDropout) vis = vis && ((keep >> (nb * 4 + e)) & 1u);
            st[nb][e] = vis ? x * sig : 0.f;
            if constexpr (kDoDK) {
              const float ds = vis ? dpt[nb][e] * silu_grad(x, sig) : 0.f;
              dpt[nb][e] = ds;
              if constexpr (kDetTables) {
                dg.add(ids, ds * ds_scale, vis && inside, lane);  // warp-collective
              } else if constexpr (kTables) {
                if (vis && inside && tg.active() && (DS == 1 || wd == 0)) tg.add(ids, ds * ds_scale);
              }
              if (p.drab != nullptr && inside && (DS == 1 || wd == 0)) {
                float* dr = p.drab + w.batch * p.drab_batch_stride + hr * p.drab_head_stride +
                            static_cast<int64_t>(i) * p.drab_row_stride + j;
                if (head_loop)
                  *dr += ds * ds_scale;
                else
                  *dr = ds * ds_scale;
              }
            }
          }
        }
      };
      with_tile_mask(mk, m0, m0 + BM, n0, n0 + BN, pointwise);
      // (query i, key j) of st / dpt[nb][e] is selected: visible and kept
      auto selected = [&](int nb, int e) {
        const int j = key_lo + (e >> 1) * 8, i = m0 + nb * 8 + 2 * t + (e & 1);
        bool sel = mk.visible(i, j);
        if constexpr (kDropout) sel = sel && ((keep >> (nb * 4 + e)) & 1u);
        return sel;
      };
      if constexpr (kDoDV) {
        uint32_t pa[BM / 16][4];
        acc_to_a<Element, BM / 8>(pa, st);
        gemm_rs_kn<DH / 8, BM, D>(acc_dv, pa, tdO + wd * DH, lane);
        if (do_nonfinite)
          add_dropped_terms<Element, DH / 8, BM / 8>(
              acc_dv, st, do_bad, StridedRows<Element>{gdO + m0 * p.row_stride + wd * DH, p.row_stride}, selected,
              lane);
      }
      if constexpr (kDoDK) {
        uint32_t pa[BM / 16][4];
        acc_to_a<Element, BM / 8>(pa, dpt);
        if (kAtomicDq && wd == 0) {
          // dS^T rows (keys) 16 wk + g (+8), columns (queries) 16 kk + 2 t (+8): the A fragments as stored.
#pragma unroll
          for (int kk = 0; kk < BM / 16; ++kk) {
            const int r = wk * 16 + g, c = kk * 16 + 2 * t;
            *reinterpret_cast<uint32_t*>(sdS + SmemTile<BM>::offset(r, c)) = pa[kk][0];
            *reinterpret_cast<uint32_t*>(sdS + SmemTile<BM>::offset(r + 8, c)) = pa[kk][1];
            *reinterpret_cast<uint32_t*>(sdS + SmemTile<BM>::offset(r, c + 8)) = pa[kk][2];
            *reinterpret_cast<uint32_t*>(sdS + SmemTile<BM>::offset(r + 8, c + 8)) = pa[kk][3];
          }
        }
        gemm_rs_kn<DH / 8, BM, D>(acc_dk, pa, tQ + wd * DH, lane);
        if (q_nonfinite)
          add_dropped_terms<Element, DH / 8, BM / 8>(
              acc_dk, dpt, q_bad, StridedRows<Element>{gQ + m0 * p.row_stride + wd * DH, p.row_stride}, selected,
              lane);
        if (kAtomicDq && k_nonfinite && wd == 0) {
          // dQ's terms lost to the zeroed K entries, from this thread's own dS elements (keys j, queries i)
#pragma unroll
          for (int nb = 0; nb < BM / 8; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int j = key_lo + (e >> 1) * 8, i = m0 + nb * 8 + 2 * t + (e & 1);
              if (!k_bad[j - n0] || !selected(nb, e)) continue;
              add_dropped_row<D>(p.dq_accum + base + static_cast<int64_t>(i) * p.row_stride,
                                 rounded<Element>(dpt[nb][e]), gK + j * p.row_stride);
            }
          }
        }
      }
      if constexpr (kAtomicDq) {
        // dQ_partial[BM x D] = dS[BM x BN] K[BN x D]; every warp's dS^T rows must be in shared memory. The next
        // iteration's first barrier keeps sdS alive until every warp has read it.
        __syncthreads();
        constexpr int MIQ = Traits::kDqMI, CH = Traits::kDqChunk;
        const int wm = warp / Traits::kDqWarpsN, wn = warp % Traits::kDqWarpsN;
        const int qrow0 = wm * Traits::kDqRows;
        const int valid = mk.L - m0;
        float* gAcc = p.dq_accum + base + static_cast<int64_t>(m0) * p.row_stride;
#pragma unroll 1
        for (int ch = 0; ch < Traits::kDqCols / CH; ++ch) {
          const int col0 = wn * Traits::kDqCols + ch * CH;
          float acc_q[MIQ][CH / 8][4];
#pragma unroll
          for (int mi = 0; mi < MIQ; ++mi) zero_acc(acc_q[mi]);
          gemm_tt_kn_mi<MIQ, CH / 8, BN, BM, D>(acc_q, sdS, qrow0, sK, col0, lane);
#pragma unroll
          for (int mi = 0; mi < MIQ; ++mi) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const int row = qrow0 + 16 * mi + g + 8 * half;
              if (row < valid) {
                float* dst = gAcc + static_cast<int64_t>(row) * p.row_stride + col0 + 2 * t;
#pragma unroll
                for (int nb = 0; nb < CH / 8; ++nb)
                  atomic_add2(dst + nb * 8, acc_q[mi][nb][2 * half], acc_q[mi][nb][2 * half + 1]);
              }
            }
          }
        }
      }
      ++it;
      m = next_tile(m);
    }
    cp_async_wait_all();

    if constexpr (kDoDV) {
      Element* gdV = reinterpret_cast<Element*>(p.dv) + base + n0 * p.row_stride + wd * DH;
      store_acc_rows<Element, DH / 8>(gdV, p.row_stride, acc_dv, p_scale, wk * 16, mk.L - n0, lane);
    }
    if constexpr (kDoDK) {
      Element* gdK = reinterpret_cast<Element*>(p.dk) + base + n0 * p.row_stride + wd * DH;
      store_acc_rows<Element, DH / 8>(gdK, p.row_stride, acc_dk, ds_scale, wk * 16, mk.L - n0, lane);
    }
  }
  if constexpr (kTables && kDoDK && kAtomicDq) tg.template flush<NT>(tid);
  if constexpr (kDetTables) dg.flush(lane);
}

// kTables (kHasRab units only): the bias comes from the weight tables (rab_tables.h), and the blocks first sum the
// dk/dv launch's table-gradient slots into p.drab_*_weights (reduce_table_slots; this kernel runs on the
// deterministic path only).
template <typename Traits, bool kDropout, bool kTables = false>
__global__ void __launch_bounds__(Traits::kThreads) hstu_bwd_dq_kernel(const AttnParams p) {
  using Element = typename Traits::Element;
  static_assert(!kTables || Traits::kHasRab, "the table kernels are the kHasRab instantiations");
  constexpr int D = Traits::kHeadDim, BM = Traits::kBlockM, BN = Traits::kBlockN, NT = Traits::kThreads;
  static_assert(BM % 16 == 0 && BN % 16 == 0, "dropout.h's 2 x 2 Philox grouping needs 16-aligned tiles");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* sQ = reinterpret_cast<Element*>(smem_raw);
  Element* sdO = sQ + Traits::kSmemQ;
  Element* sK = sdO + Traits::kSmemQ;  // kStages slots
  Element* sV = sK + Traits::kStages * Traits::kSmemKV;
  uint8_t* k_bad = reinterpret_cast<uint8_t*>(sV + Traits::kStages * Traits::kSmemKV);

  if constexpr (kTables) {
    const int64_t block = blockIdx.x + static_cast<int64_t>(gridDim.x) * (blockIdx.y + gridDim.y * blockIdx.z);
    reduce_table_slots<NT>(p, block, static_cast<int64_t>(gridDim.x) * gridDim.y * gridDim.z, threadIdx.x);
  }
  const WorkItem w = schedule_block(p, /*reverse=*/true);
  const SeqMask& mk = w.mask;
  const int m0 = w.tile * BM;
  if (m0 >= mk.L) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;

  const int64_t base = static_cast<int64_t>(w.seq_start) * p.row_stride + static_cast<int64_t>(w.head) * D;
  const Element* gQ = reinterpret_cast<const Element*>(p.q) + base;
  const Element* gK = reinterpret_cast<const Element*>(p.k) + base;
  const Element* gV = reinterpret_cast<const Element*>(p.v) + base;
  const Element* gdO = reinterpret_cast<const Element*>(p.dout) + base;
  const int hr = (Traits::kHasRab && p.rab_heads == 1) ? 0 : w.head;

  load_tile_pair_async<BM, D, NT>(sQ, sdO, gQ, gdO, p.row_stride, m0, mk.L, tid);

  const int n_tiles = (mk.key_end(m0, m0 + BM) + BN - 1) / BN;
  auto next_tile = [&](int n) { return mk.next_key_tile(n, n_tiles, BN, m0, m0 + BM); };
  auto load_kv = [&](int n, int stage) {
    load_tile_pair_async<BN, D, NT>(sK + stage * Traits::kSmemKV, sV + stage * Traits::kSmemKV, gK, gV,
                                    p.row_stride, n * BN, mk.L, tid);
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
  float acc_dq[MI][D / 8][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) zero_acc(acc_dq[mi]);
  const int warp_row0 = warp * 16 * MI;
  const int row_lo = m0 + warp_row0 + g;
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
    Element* tK = sK + stage * Traits::kSmemKV;
    const Element* tV = sV + stage * Traits::kSmemKV;
    const int n0 = n * BN;
    // Tiles with masked (or dropped) entries: dQ = dS K multiplies them by dS = 0, so the tile's non-finite K
    // entries are zeroed (one scan of the tile), the scores reading them recomputed and the dropped terms of the
    // selected entries added back. Fully visible tiles skip this.
    const bool exact_k = kDropout || !mk.tile_full(m0, m0 + BM, n0, n0 + BN);
    bool k_nonfinite = false;
    if (exact_k) k_nonfinite = __syncthreads_or(zero_nonfinite_rows<BN, D, NT>(tK, k_bad, tid));

    // Dropout keep flags (forward layout; before the GEMMs: fewer registers live): bit
    // mi * kKeepBits + 4 nb + e of keep (32-bit words) belongs to dp[mi][nb][e].
    constexpr int kKeepBits = BN / 2;
    uint32_t keep[(MI * kKeepBits + 31) / 32];
    if constexpr (kDropout) dropout_bits_qk_mi<MI, BN>(keep, p, drop_bh, m0 + warp_row0, n0, lane);
    float s[MI][BN / 8][4];
    float dp[MI][BN / 8][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      zero_acc(s[mi]);
      zero_acc(dp[mi]);
    }
    gemm_ss_nk_mi<MI, BN / 8, D, D, D>(s, sQ, warp_row0, tK, lane);
    gemm_ss_nk_mi<MI, BN / 8, D, D, D>(dp, sdO, warp_row0, tV, lane);
    if (k_nonfinite) {
      // scores of visible entries whose key had entries zeroed: the exact non-finite value
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = row_lo + 16 * mi + (e >> 1) * 8, j = n0 + nb * 8 + 2 * t + (e & 1);
            if (mk.visible(i, j) && k_bad[j - n0])
              nonfinite_dot<D>(gQ + i * p.row_stride, gK + j * p.row_stride, s[mi][nb][e]);
          }
        }
      }
    }
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
              if (!kMasked || (i < mk.L && j < mk.L)) x += rab_value<Element>(p, w.batch, hr, i, j);
            }
            x *= p.alpha;
            const float sig = sigmoid_t<Element>(x);
            bool vis = !kMasked || mk.visible(i, j);
            if constexpr (kDropout) vis = vis && dropout_flag(keep, mi * kKeepBits + nb * 4 + e);
            dp[mi][nb][e] = vis ? dp[mi][nb][e] * silu_grad(x, sig) : 0.f;
          }
        }
      }
    };
    with_tile_mask(mk, m0, m0 + BM, n0, n0 + BN, pointwise);
    uint32_t pa[MI][BN / 16][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) acc_to_a<Element, BN / 8>(pa[mi], dp[mi]);
    gemm_rs_kn_mi<MI, D / 8, BN, D>(acc_dq, pa, tK, lane);
    if (k_nonfinite)
      add_dropped_terms_mi<Element, kDropout>(acc_dq, dp, k_bad, StridedRows<Element>{gK + n0 * p.row_stride,
                                             p.row_stride}, mk, row_lo, n0, keep, lane);
    ++it;
    n = next_tile(n);
  }
  cp_async_wait_all();
  Element* gdQ = reinterpret_cast<Element*>(p.dq) + base + m0 * p.row_stride;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
    if constexpr (kDropout)
      store_acc_rows<Element, D / 8>(gdQ, p.row_stride, acc_dq[mi], p.alpha * p.inv_scale * p.dropout_scale,
                                     warp_row0 + 16 * mi, mk.L - m0, lane);
    else  // the p == 0 kernels keep their exact pre-dropout code
      store_acc_rows<Element, D / 8>(gdQ, p.row_stride, acc_dq[mi], p.alpha * p.inv_scale, warp_row0 + 16 * mi,
                                     mk.L - m0, lane);
  }
}

// dq = scale * workspace in q's dtype (atomic-dq path); n8 = T * H * D / 8 (D is a multiple of 8). Eight values per
// thread and step: two 16-byte loads, one 16-byte store (dq is 16-byte aligned: the binding checks it).
template <typename Element>
__global__ void __launch_bounds__(256) hstu_dq_convert_kernel(const float* __restrict__ acc, Element* __restrict__ dq,
                                                               int64_t n8, float scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n8; i += stride) {
    const float4 a = reinterpret_cast<const float4*>(acc)[2 * i];
    const float4 b = reinterpret_cast<const float4*>(acc)[2 * i + 1];
    uint4 o;
    o.x = pack2<Element>(a.x * scale, a.y * scale);
    o.y = pack2<Element>(a.z * scale, a.w * scale);
    o.z = pack2<Element>(b.x * scale, b.y * scale);
    o.w = pack2<Element>(b.z * scale, b.w * scale);
    reinterpret_cast<uint4*>(dq)[i] = o;
  }
}

}  // namespace hstu
