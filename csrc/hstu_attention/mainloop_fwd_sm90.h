// Mainloop pieces of the Hopper (sm_90a) forward, per query tile and key tile:
//   consumer: the pointwise stage on the S accumulator (fwd_pointwise: P = SiLU(alpha (S + rab)), masked) and P's
//             repacking as the A operand of O += P V (pack_p); in the warp-specialized kernel the consumers' walk over
//             the visible key tiles (ws_consume_key_tiles: wait, S_t and O += P_{t-1} V_{t-1} in this warpgroup's turn,
//             release, pointwise stage)
//   producer: the warp-specialized kernel's producer walk (ws_produce_key_tiles: K and V of each visible key tile
//             into the next free ring slots with cp.async, zero-filled past the sequence end)
//   non-finite V entries (both kernels): which V tiles are scanned (fwd_scans_v), the dropped terms added back
//             (fwd_add_dropped_v)
// The single-role kernel (fwd_kernel_sm90.h) runs the same pointwise stage in its own cp.async loop.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "fwd_traits_sm90.h"
#include "hstu.h"
#include "mask.h"
#include "pointwise.h"
#include "sm90_common.h"
#include "tile_scheduler.h"
#include "utils.h"

namespace hstu {
namespace sm90 {

#if defined(HSTU_SM90_DEVICE)
// The pointwise stage of key tile n0 for the rows [wm0, wm0 + 64) a warpgroup owns, in place on its S accumulator
// (coordinates relative to the block's first row m0): P = SiLU(alpha (S + rab)), zero where the mask hides (i, j).
// with_tile_mask: tiles wholly visible for these rows skip every mask / bounds test, causal diagonal tiles test j <= i
// alone; without rab, rows and keys past the sequence end (zero-filled Q / K rows) give P = 0 on any path.
template <typename Tr, typename FragS, typename CoordS>
__device__ __forceinline__ void fwd_pointwise(const AttnParams& p, const SeqMask& mk, int batch, int hr, int m0,
                                              int wm0, int n0, FragS& tSrS, CoordS const& tScS) {
  using namespace cute;
  constexpr bool kCausalPath = true, kZeroOutside = !Tr::kHasRab;
  with_tile_mask<kCausalPath, kZeroOutside>(mk, wm0, wm0 + 64, n0, n0 + Tr::kBlockN, [&](auto mask_tag) {
    constexpr TileMask kMask = decltype(mask_tag)::value;
    CUTE_UNROLL
    for (int e = 0; e < size(tSrS); ++e) {
      const int i = m0 + get<0>(tScS(e));
      const int j = n0 + get<1>(tScS(e));
      float x = tSrS(e);
      if constexpr (Tr::kHasRab) {
        if (kMask != TileMask::kExact || (i < mk.L && j < mk.L))
          x += rab_value<typename Tr::Element>(p, batch, hr, i, j);
      }
      x *= p.alpha;
      float pv = x * sigmoid_t<typename Tr::Element>(x);
      if constexpr (kMask == TileMask::kCausal) {
        if (j > i) pv = 0.f;
      } else if constexpr (kMask == TileMask::kExact) {
        if (!mk.visible(i, j)) pv = 0.f;
      }
      tSrS(e) = pv;
    }
  });
}

// P in q's dtype, in the A-operand register order of O += P V (identical linear order: see POperandShape).
template <typename Element, typename FragS, typename FragP>
__device__ __forceinline__ void pack_p(FragS const& tSrS, FragP& tOrP) {
  using namespace cute;
  Tensor tOrP32 = recast<uint32_t>(tOrP);
  CUTE_UNROLL
  for (int e = 0; e < size(tOrP32); ++e) tOrP32(e) = pack2<Element>(tSrS(2 * e), tSrS(2 * e + 1));
}

// O = P V multiplies the V entries of keys a row does not see by P = 0. Key tiles that hide entries from the query
// tile have their V tile's non-finite entries zeroed once the copies land (zero_nonfinite_chunks, one flag per key),
// and the consumers add the terms of the visible entries back (fwd_add_dropped_v). Whether key tile n0 of query tile
// m0 is scanned: the loading threads' decision, repeated by the consumers (the same expression).
template <typename Tr>
__device__ __forceinline__ bool fwd_scans_v(const SeqMask& mk, int m0, int n0) {
  return tile_hides_entries(mk, m0, m0 + Tr::kBlockM, n0, n0 + Tr::kBlockN);
}

// The row flags of V slot `slot`: the single-role kernel's, the warp-specialized kernel's.
template <typename Tr>
__device__ __forceinline__ uint8_t* v_flags(int slot) {
  return dynamic_smem() + Tr::kTileBytes + slot * Tr::kBlockN;
}
template <typename Tr>
__device__ __forceinline__ uint8_t* ws_v_flags(int slot) {
  return dynamic_smem() + Tr::kFlagsOffsetWs + slot * Tr::kBlockN;
}

// O += the terms of P V that the zeroed V entries of key tile n0 dropped (flags: its V slot's row flags), for the
// entries this warpgroup's rows see (after the O GEMM of that tile retired, its P still in tOrP). gV: row 0 of the
// sequence's V (this head).
template <typename Tr, typename FragO, typename CoordO, typename FragP>
__device__ __forceinline__ void fwd_add_dropped_v(const AttnParams& p, const SeqMask& mk, int m0,
                                                  const typename Tr::Element* gV, const uint8_t* flags, int n0,
                                                  FragO& tOrO, CoordO const& tOcO, FragP& tOrP, int lane) {
  using namespace cute;
  using Element = typename Tr::Element;
  add_dropped_terms_sm90<Element, Tr::kBlockN>(
      tOrO, [&](int h, int kb, int kk) { return packed_weight<Element>(tOrP, h, kb, kk, lane); },
      [&](int h, int k) { return mk.visible(m0 + get<0>(tOcO(2 * h)), n0 + k); }, flags, gV + n0 * p.row_stride,
      p.row_stride, lane);
}

#endif  // HSTU_SM90_DEVICE

#if defined(HSTU_SM90_DEVICE)
// The producer's walk over the key tiles that query tile m0 may see (the warp-specialized kernel): per tile, K into
// the next free K slot and V into the next free V slot (cp.async, zero-filled past the sequence end), each slot
// published when this thread's copies have landed. A V tile that fwd_scans_v picks is published only after this
// thread has waited for its copies and zeroed their non-finite entries, with the slot's row flags (ws_v_flags).
template <typename Tr, typename PipeK, typename PipeV, typename StateK, typename StateV>
__device__ __forceinline__ void ws_produce_key_tiles(const AttnParams& p, const SeqMask& mk, int m0,
                                                     const typename Tr::Element* gK, const typename Tr::Element* gV,
                                                     typename Tr::T* pK, typename Tr::T* pV, PipeK& pipe_k,
                                                     PipeV& pipe_v, StateK& sk, StateV& sv, int tid) {
  using namespace cute;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN;
  const int n_tiles = (mk.key_end(m0, m0 + BM) + BN - 1) / BN;
  for (int n = mk.next_key_tile(-1, n_tiles, BN, m0, m0 + BM); n < n_tiles;
       n = mk.next_key_tile(n, n_tiles, BN, m0, m0 + BM)) {
    const int valid = mk.L - n * BN;
    pipe_k.producer_acquire(sk);
    load_rows_async<BN, D, 128, false>(
        make_tensor(make_smem_ptr(pK + sk.index() * Tr::kSizeK), typename Tr::SmemLayoutK{}),
        gK + n * BN * p.row_stride, p.row_stride, valid, tid);
    pipe_k.producer_commit(sk, cutlass::arch::cpasync_barrier_arrive);
    ++sk;
    pipe_v.producer_acquire(sv);
    typename Tr::T* const tV = pV + sv.index() * Tr::kSizeV;
    load_rows_async<BN, D, 128, true>(make_tensor(make_smem_ptr(tV), typename Tr::SmemLayoutVt{}),
                                      gV + n * BN * p.row_stride, p.row_stride, valid, tid);
    if (fwd_scans_v<Tr>(mk, m0, n * BN)) {
      cp_async_wait_all();
      zero_nonfinite_chunks<BN, D, 128, typename Tr::Element>(tV, ws_v_flags<Tr>(sv.index()), tid);
      fence_proxy_async_smem();  // (also keeps the zeroing and flag stores before the arrive)
      pipe_v.producer_commit(sv);
    } else {
      pipe_v.producer_commit(sv, cutlass::arch::cpasync_barrier_arrive);
    }
    ++sv;
  }
}

// fwd_add_dropped_v in the warp-specialized kernel (V slot `slot`, key tile n0 of item w), then a compiler fence that
// keeps its flag reads before the caller's release of the slot.
template <typename Tr, typename FragO, typename CoordO, typename FragP>
__device__ __forceinline__ void ws_add_dropped_v(const AttnParams& p, const WorkItem& w, int m0, int slot, int n0,
                                                 FragO& tOrO, CoordO const& tOcO, FragP& tOrP, int lane) {
  const auto* gV = reinterpret_cast<const typename Tr::Element*>(p.v) +
                   static_cast<int64_t>(w.seq_start) * p.row_stride + static_cast<int64_t>(w.head) * Tr::kHeadDim;
  fwd_add_dropped_v<Tr>(p, w.mask, m0, gV, ws_v_flags<Tr>(slot), n0, tOrO, tOcO, tOrP, lane);
  compiler_fence();
}

// The consumers' walk over the key tiles that query tile m0 may see (the warp-specialized kernel): per tile, wait for
// K, issue S_t (and O += P_{t-1} V_{t-1}) in this warpgroup's turn, release K once S_t retired, the pointwise stage,
// add the terms V_{t-1}'s zeroed entries dropped (ws_add_dropped_v) and release V_{t-1} once its O GEMM retired, P_t
// into tOrP, wait for V_t (its flags, when the producer scanned it). Leaves the last tile's P in tOrP, its V slot in sv_prev (have_prev) and, when its V had
// entries zeroed, its first key in dropped_n0 (else -1) for the caller's last O GEMM.
template <typename Tr, typename PipeK, typename PipeV, typename StateK, typename StateV, typename MmaS, typename MmaO,
          typename FragQ, typename FragS, typename CoordS, typename FragO, typename CoordO, typename FragP>
__device__ __forceinline__ void ws_consume_key_tiles(const AttnParams& p, const WorkItem& w, int hr, int m0, int cwg,
                                                     typename Tr::T* pK, typename Tr::T* pV, PipeK& pipe_k,
                                                     PipeV& pipe_v, StateK& sk, StateV& sv, StateV& sv_prev,
                                                     bool& have_prev, int& dropped_n0, MmaS& mma_s, MmaO& mma_o,
                                                     FragQ const& tSrQ, FragS& tSrS, CoordS const& tScS, FragO& tOrO,
                                                     CoordO const& tOcO, FragP& tOrP) {
  using namespace cute;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN;
  constexpr bool kPingPong = Tr::kWarpGroups == 2;
  const int ctid = threadIdx.x - 128;
  auto thr_s = mma_s.get_thread_slice(ctid);
  auto thr_o = mma_o.get_thread_slice(ctid);
  auto sK = [&](int slot) { return make_tensor(make_smem_ptr(pK + slot * Tr::kSizeK), typename Tr::SmemLayoutK{}); };
  auto sVt = [&](int slot) {
    return make_tensor(make_smem_ptr(pV + slot * Tr::kSizeV), typename Tr::SmemLayoutVt{});
  };
  const SeqMask& mk = w.mask;
  const int wm0 = m0 + 64 * cwg;
  const int n_tiles = (mk.key_end(m0, m0 + BM) + BN - 1) / BN;
  for (int n = mk.next_key_tile(-1, n_tiles, BN, m0, m0 + BM); n < n_tiles;
       n = mk.next_key_tile(n, n_tiles, BN, m0, m0 + BM)) {
    pipe_k.consumer_wait(sk);
    fence_proxy_async_smem();
    if constexpr (kPingPong) named_barrier_sync<256>(kTurnBarrier + cwg);
    Tensor tSrK = thr_s.partition_fragment_B(sK(sk.index()));
    wg_gemm_issue</*kZeroInit=*/true, /*kARegs=*/false>(mma_s, tSrQ, tSrK, tSrS);
    if (have_prev) {
      Tensor tOrV = thr_o.partition_fragment_B(sVt(sv_prev.index()));
      wg_gemm_issue</*kZeroInit=*/false, /*kARegs=*/true>(mma_o, tOrP, tOrV, tOrO);
      if constexpr (kPingPong) named_barrier_arrive<256>(kTurnBarrier + (cwg ^ 1));
      wg_wait<1>(tSrS);  // S_t ready; O += P_{t-1} V_{t-1} keeps running during the pointwise stage
    } else {
      if constexpr (kPingPong) named_barrier_arrive<256>(kTurnBarrier + (cwg ^ 1));
      wg_wait<0>(tSrS);
    }
    pipe_k.consumer_release(sk);
    ++sk;

    fwd_pointwise<Tr>(p, mk, w.batch, hr, m0, wm0, n * BN, tSrS, tScS);
    wg_wait<0>(tOrO, tOrP);
    if (have_prev) {
      if (dropped_n0 >= 0) ws_add_dropped_v<Tr>(p, w, m0, sv_prev.index(), dropped_n0, tOrO, tOcO, tOrP, ctid % 32);
      pipe_v.consumer_release(sv_prev);
    }
    pack_p<typename Tr::Element>(tSrS, tOrP);
    pipe_v.consumer_wait(sv);
    fence_proxy_async_smem();
    dropped_n0 = fwd_scans_v<Tr>(mk, m0, n * BN) && any_flag<BN>(ws_v_flags<Tr>(sv.index())) ? n * BN : -1;
    sv_prev = sv;
    ++sv;
    have_prev = true;
  }
}
#endif

}  // namespace sm90
}  // namespace hstu
