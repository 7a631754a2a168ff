// Mainloop pieces of the Hopper (sm_90a) forward, per query tile and key tile:
//   consumer: the pointwise stage on the S accumulator (fwd_pointwise: P = SiLU(alpha (S + rab)), masked) and P's
//             repacking as the A operand of O += P V (pack_p); in the warp-specialized kernel the consumers' walk over
//             the visible key tiles (ws_consume_key_tiles: wait, S_t and O += P_{t-1} V_{t-1} in this warpgroup's turn,
//             release, pointwise stage)
//   producer: the warp-specialized kernel's producer walk (ws_produce_key_tiles: K and V of each visible key tile
//             into the next free ring slots with cp.async, zero-filled past the sequence end)
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

#endif  // HSTU_SM90_DEVICE

#if defined(HSTU_SM90_DEVICE)
// The producer's walk over the key tiles that query tile m0 may see (the warp-specialized kernel): per tile, K into
// the next free K slot and V into the next free V slot (cp.async, zero-filled past the sequence end), each slot
// published when this thread's copies have landed.
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
    load_rows_async<BN, D, 128, true>(
        make_tensor(make_smem_ptr(pV + sv.index() * Tr::kSizeV), typename Tr::SmemLayoutVt{}),
        gV + n * BN * p.row_stride, p.row_stride, valid, tid);
    pipe_v.producer_commit(sv, cutlass::arch::cpasync_barrier_arrive);
    ++sv;
  }
}

// The consumers' walk over the key tiles that query tile m0 may see (the warp-specialized kernel): per tile, wait for
// K, issue S_t (and O += P_{t-1} V_{t-1}) in this warpgroup's turn, release K once S_t retired, the pointwise stage,
// release V_{t-1} once its O GEMM retired, P_t into tOrP, wait for V_t. Leaves the last tile's P in tOrP and its V slot
// in sv_prev (have_prev) for the caller's last O GEMM.
template <typename Tr, typename PipeK, typename PipeV, typename StateK, typename StateV, typename MmaS, typename MmaO,
          typename FragQ, typename FragS, typename CoordS, typename FragO, typename FragP>
__device__ __forceinline__ void ws_consume_key_tiles(const AttnParams& p, const SeqMask& mk, int batch, int hr, int m0,
                                                     int cwg, typename Tr::T* pK, typename Tr::T* pV, PipeK& pipe_k,
                                                     PipeV& pipe_v, StateK& sk, StateV& sv, StateV& sv_prev,
                                                     bool& have_prev, MmaS& mma_s, MmaO& mma_o, FragQ const& tSrQ,
                                                     FragS& tSrS, CoordS const& tScS, FragO& tOrO, FragP& tOrP) {
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

    fwd_pointwise<Tr>(p, mk, batch, hr, m0, wm0, n * BN, tSrS, tScS);
    wg_wait<0>(tOrO, tOrP);
    if (have_prev) pipe_v.consumer_release(sv_prev);
    pack_p<typename Tr::Element>(tSrS, tOrP);
    pipe_v.consumer_wait(sv);
    fence_proxy_async_smem();
    sv_prev = sv;
    ++sv;
    have_prev = true;
  }
}
#endif

}  // namespace sm90
}  // namespace hstu
