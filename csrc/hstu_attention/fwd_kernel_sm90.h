// Hopper (sm_90a) forward: the same math, masks and tile walk as fwd_kernel.h, with the two GEMMs on warpgroup MMAs
// (wgmma, through CuTe's SM90 GMMA atoms) instead of per-warp mma.sync.
//
// Block = 2 consumer warpgroups (256 threads), 128 query rows (64 per warpgroup); no producer warp, no TMA: all
// 256 threads stream K/V tiles into shared-memory rings with cp.async (zero-fill past the sequence end, exactly as
// the sm80 path), one tile ahead of the GEMMs.
// Overlap inside a warpgroup: step t issues S_t = Q K_t^T and then O += P_{t-1} V_{t-1} (the previous step's P,
// still in registers) as two wgmma batches, waits for the first only, and runs the pointwise stage of S_t on the
// CUDA cores while the tensor cores work on the second. Hence V lives one step longer than K: K uses 2 slots, V 3.
//   S = Q K^T : SS-wgmma, Q (resident) and K both K-major (head dim contiguous) 128B-swizzled tiles
//   P = SiLU(alpha (S + rab)) (masked), per element in registers on the fp32 accumulator; element coordinates come
//       from the MMA partition of an identity tensor; masks through mask.h (next_key_tile / with_tile_mask)
//   O += P V  : RS-wgmma, P re-packed in registers as the A operand (same register order: see POperandShape), V
//       the B operand in MN-major form (head dim contiguous) from a 128B-swizzled MN-major tile
// Epilogue: O * (1 / N) staged through the warpgroup's own Q rows, then 16-byte row stores (store_o); rows past the
// sequence end skipped.
// Device code exists only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); compiled for any other target the kernel traps.
// Shared helpers (CuteElement, rab_value, load_rows_async, wg_gemm, check_sm90_smem_tile, ...): sm90_common.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "fwd_sm90_api.h"
#include "kernel_attributes.h"
#include "hstu.h"
#include "mask.h"
#include "sm90_common.h"
#include "tile_scheduler.h"
#include "utils.h"

namespace hstu {
namespace sm90 {

// kWarpGroups_: consumer warpgroups per block. 2: the default (128 query rows, ping-pong in the warp-specialized
// kernel, one block per SM). 1: the warp-specialized kernel's short-sequence shape (Sm90FwdKernel::kTwoPerSm, head
// dims 64 / 128): 64 query rows and 64-key tiles, 96 KB of shared memory at head dim 128, so two blocks share an SM
// and one block's prologue (Q and first K / V loads) and epilogue run under the other's GEMMs. (128-key tiles with
// one K and two V slots, 112 KB, also fit two per SM; measured slower than both, RESULTS.md v17.)
template <typename Element_, int kHeadDim_, bool kHasRab_, int kWarpGroups_ = 2>
struct FwdTraitsSm90 {
  using Element = Element_;                               // CUDA type (global memory, helpers of utils.h)
  using T = typename CuteElement<Element>::type;          // the same bits as a CuTe type (GMMA atoms, smem)
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kHasRab = kHasRab_;
  static constexpr int kWarpGroups = kWarpGroups_;
  static_assert(kWarpGroups == 2 || (kWarpGroups == 1 && kHeadDim <= 128), "consumer warpgroups: 2, or 1 at D <= 128");
  static constexpr int kThreads = 128 * kWarpGroups;
  static constexpr int kBlockM = 64 * kWarpGroups;        // 64 query rows per warpgroup (one wgmma M)
  static_assert(kWarpGroups != 2 || kBlockM == kSm90FwdBlockM, "launch.h's launch order counts 128-row tiles");
  // Registers per thread: O is 64 x D fp32 per warpgroup = D / 2 floats, S = BN / 2 floats, P = BN / 4 words.
  static constexpr int kBlockN = (kHeadDim >= 256 || kWarpGroups == 1) ? 64 : 128;
  static constexpr int kStagesK = 2;  // K_t is free once S_t has retired (step t)
  static constexpr int kStagesV = 3;  // V_t is read by step t + 1's O GEMM, and step t + 1 already loads tile t + 2
  static_assert(kHeadDim % 64 == 0 && kHeadDim <= 256, "head dim 64, 128 or 256");

  using BM = cute::Int<kBlockM>;
  using BN = cute::Int<kBlockN>;
  using HD = cute::Int<kHeadDim>;
  using WgLayout = cute::Layout<cute::Shape<cute::Int<kWarpGroups>, cute::_1, cute::_1>>;  // warpgroups along M
  // S = Q K^T: (M, N, K) = (64 per warpgroup, BN, D); both operands K-major in shared memory.
  using MmaS = decltype(cute::make_tiled_mma(
      cute::SM90::GMMA::ss_op_selector<T, T, float, cute::Shape<cute::_64, BN, HD>, cute::SM90::GMMA::Major::K,
                                       cute::SM90::GMMA::Major::K>(),
      WgLayout{}));
  // O = P V: (M, N, K) = (64 per warpgroup, D, BN); A = P in registers (K-major by definition), B = V MN-major.
  using MmaO = decltype(cute::make_tiled_mma(
      cute::SM90::GMMA::rs_op_selector<T, T, float, cute::Shape<cute::_64, HD, BN>, cute::SM90::GMMA::Major::K,
                                       cute::SM90::GMMA::Major::MN>(),
      WgLayout{}));

  // Shared tiles. Q: (BM, D), K: (BN, D), both K-major (D contiguous); Vt: (D, BN) = V seen as the (N, K) B operand
  // of P V, MN-major (D contiguous), atoms tiled along K (keys) first.
  using SmemLayoutQ = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_K_SW128_Atom<T>{}, cute::Shape<BM, HD>{}));
  using SmemLayoutK = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_K_SW128_Atom<T>{}, cute::Shape<BN, HD>{}));
  using SmemLayoutVt = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_MN_SW128_Atom<T>{},
                                                    cute::Shape<HD, BN>{}, cute::Step<cute::_2, cute::_1>{}));
  static constexpr int kSizeQ = cute::cosize_v<SmemLayoutQ>;
  static constexpr int kSizeK = cute::cosize_v<SmemLayoutK>;
  static constexpr int kSizeV = cute::cosize_v<SmemLayoutVt>;
  static_assert(kSizeQ == kBlockM * kHeadDim && kSizeK == kBlockN * kHeadDim && kSizeV == kBlockN * kHeadDim,
                "compact shared tiles");
  // 128B-swizzled GMMA tiles need 1024-byte aligned bases: every tile size is a multiple of 8 rows x 128 bytes.
  static_assert((kSizeQ * 2) % 1024 == 0 && (kSizeK * 2) % 1024 == 0, "1024-byte aligned tiles");
  static constexpr int kSmemBytes = (kSizeQ + kStagesK * kSizeK + kStagesV * kSizeV) * 2;  // 96 / 192 / 224 KB
  // Warp-specialized variant (hstu_fwd_sm90_ws_kernel): K and V rings behind mbarrier pipelines (a slot is refilled
  // only after both consumer warpgroups released it), then the barriers. V_t is released one step after K_t (its O
  // GEMM runs during step t + 1), and the producer loads K, V in tile order: a third V slot keeps the producer from
  // waiting on V_{t-1} before it can start K_{t+1}.
  // A second Q slot at head dims 64 / 128 (the persistent kernel: the producer loads the next work item's Q while the
  // consumers still stage this item's O through theirs; the one-tile-per-block kernel leaves it unused).
  static constexpr int kStagesWsK = 2;
  static constexpr int kStagesWsV = 3;
  static constexpr int kStagesWsQ = kHeadDim <= 128 ? 2 : 1;
  static constexpr int kTileBytesWs =
      (kStagesWsQ * kSizeQ + kStagesWsK * kSizeK + kStagesWsV * kSizeV) * 2;  // 112 / 224 / 224 KB
  static constexpr int kSmemBytesWs = kTileBytesWs + 256;
  static_assert(kSmemBytes <= 227 * 1024 && kSmemBytesWs <= 227 * 1024, "shared memory per block on sm_90");
  // Warp-specialized kernel: blocks per SM and the setmaxnreg split of the roles. The registers move within the
  // block's launch allocation (65536 / blocks per SM / threads, in steps of 8: 168 per thread with two consumer
  // warpgroups, 128 with one), so the producer must give back exactly what the consumers take, or their allocation
  // waits forever.
  static constexpr int kBlocksPerSmWs = kWarpGroups == 1 ? 2 : 1;
  static constexpr int kProducerRegs = 40;
  static constexpr int kConsumerRegs = kWarpGroups == 1 ? 216 : 232;
  static_assert(128 * kProducerRegs + kThreads * kConsumerRegs ==
                    (kThreads + 128) * (65536 / kBlocksPerSmWs / (kThreads + 128) / 8 * 8),
                "register budget of the block");
  static_assert(kBlocksPerSmWs * (kSmemBytesWs + 1024) <= 228 * 1024, "shared memory of the blocks sharing an SM");
};

// The A-operand fragment of O = P V has the same per-thread register order as the accumulator fragment of S:
// accumulator value (v0, v1, n8) sits at (row 8 v1 + r, col v0 + 8 n8 + c) and A value (v0, v1, v2) of k block kb
// at (row 8 v1 + r, k v0 + 8 v2 + 16 kb) (r, c: the thread's base), so with n8 = v2 + 2 kb both enumerate the
// same elements in the same linear order. check_sm90_fragments (host) verifies this for every instantiated shape.
template <typename Tr>
using POperandShape = decltype(cute::partition_shape_A(typename Tr::MmaO{}, cute::Shape<typename Tr::BM, typename Tr::BN>{}));

// Element offset of (row r, column c) in the Q tile (SmemLayoutQ: K-major, 128B-swizzled atoms of 8 rows x 64
// columns, tiled along the rows first), written out with 32-bit math; check_sm90_traits compares it with the layout.
template <int kRows>
__host__ __device__ __forceinline__ constexpr int q_tile_offset(int r, int c) {
  return (c >> 6) * (kRows * 64) + (r >> 3) * 512 + (r & 7) * 64 + ((((c >> 3) & 7) ^ (r & 7)) << 3) + (c & 7);
}

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

constexpr int kEpilogueBarrier = 3;  // named barriers 3 and 4, one per consumer warpgroup (1 and 2: ping-pong turns)

// Epilogue of warpgroup wg (wtid = its thread 0..127): O / N, rows of this sequence only (the rows after it belong
// to the next sequence). Staged through the warpgroup's own 64 rows of the Q tile, free once its last S GEMM retired
// (the other warpgroup's GEMMs read only their own rows): the accumulator pairs (adjacent columns, checked by
// check_sm90_fragments) go to their swizzled places, conflict-free for the 8 rows a pair store covers, then leave as
// coalesced 16-byte stores of whole rows instead of one 4-byte global store per pair.
template <typename Tr, typename FragO, typename CoordO>
__device__ __forceinline__ void store_o(const AttnParams& p, int64_t base, int m0, int L, FragO const& tOrO,
                                        CoordO const& tOcO, typename Tr::T* q_tile, int wg, int wtid) {
  using namespace cute;
  using Element = typename Tr::Element;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM;
  uint32_t* const stage = reinterpret_cast<uint32_t*>(q_tile);
  const float o_scale = p.inv_scale;
  CUTE_UNROLL
  for (int e = 0; e < size(tOrO) / 2; ++e) {
    const int r = get<0>(tOcO(2 * e));
    const int c = get<1>(tOcO(2 * e));
    stage[q_tile_offset<BM>(r, c) >> 1] = pack2<Element>(tOrO(2 * e) * o_scale, tOrO(2 * e + 1) * o_scale);
  }
  named_barrier_sync<128>(kEpilogueBarrier + wg);
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  const int r0 = 64 * wg;
  const int chunks = min(64, L - (m0 + r0)) * kChunks;
  Element* const gO = reinterpret_cast<Element*>(p.out) + base + static_cast<int64_t>(m0 + r0) * p.row_stride;
  for (int i = wtid; i < chunks; i += 128) {
    const int r = i / kChunks, ch = i % kChunks;
    *reinterpret_cast<uint4*>(gO + static_cast<int64_t>(r) * p.row_stride + ch * 8) =
        *reinterpret_cast<const uint4*>(q_tile + q_tile_offset<BM>(r0 + r, ch * 8));
  }
}
#endif  // HSTU_SM90_DEVICE

template <typename Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) hstu_fwd_sm90_kernel(const AttnParams p) {
#if defined(HSTU_SM90_DEVICE)
  using namespace cute;
  using Element = typename Tr::Element;
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, NT = Tr::kThreads;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  T* const pQ = reinterpret_cast<T*>(smem_raw);
  T* const pK = pQ + Tr::kSizeQ;                  // kStagesK slots
  T* const pV = pK + Tr::kStagesK * Tr::kSizeK;   // kStagesV slots

  // The 128B-swizzled GMMA tiles need a 1024-byte aligned base (no static shared memory in this kernel).
  if ((cast_smem_ptr_to_uint(smem_raw) & 1023u) != 0) __trap();

  const WorkItem w = schedule_grouped_block(p, (p.max_seqlen + BM - 1) / BM, /*reverse=*/true);
  const SeqMask& mk = w.mask;
  const int m0 = w.tile * BM;
  if (m0 >= mk.L) return;  // whole block uniform: no barrier or warpgroup op is skipped by part of it
  const int tid = threadIdx.x;
  const int wg = tid / 128;

  const int64_t base = static_cast<int64_t>(w.seq_start) * p.row_stride + static_cast<int64_t>(w.head) * D;
  const Element* gQ = reinterpret_cast<const Element*>(p.q) + base;
  const Element* gK = reinterpret_cast<const Element*>(p.k) + base;
  const Element* gV = reinterpret_cast<const Element*>(p.v) + base;

  Tensor sQ = make_tensor(make_smem_ptr(pQ), typename Tr::SmemLayoutQ{});
  auto sK = [&](int stage) { return make_tensor(make_smem_ptr(pK + stage * Tr::kSizeK), typename Tr::SmemLayoutK{}); };
  auto sVt = [&](int stage) {
    return make_tensor(make_smem_ptr(pV + stage * Tr::kSizeV), typename Tr::SmemLayoutVt{});
  };

  const int n_tiles = (mk.key_end(m0, m0 + BM) + BN - 1) / BN;
  auto next_tile = [&](int n) { return mk.next_key_tile(n, n_tiles, BN, m0, m0 + BM); };
  auto load_kv = [&](int n, int k_slot, int v_slot) {
    const int valid = mk.L - n * BN;
    load_rows_async<BN, D, NT, false>(sK(k_slot), gK + n * BN * p.row_stride, p.row_stride, valid, tid);
    load_rows_async<BN, D, NT, true>(sVt(v_slot), gV + n * BN * p.row_stride, p.row_stride, valid, tid);
  };

  typename Tr::MmaS mma_s;
  typename Tr::MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);

  Tensor tSrQ = thr_s.partition_fragment_A(sQ);  // descriptors of this warpgroup's 64 rows of Q
  Tensor tSrS = partition_fragment_C(mma_s, Shape<typename Tr::BM, typename Tr::BN>{});
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<typename Tr::BM, typename Tr::BN>{}));
  Tensor tOrO = partition_fragment_C(mma_o, Shape<typename Tr::BM, typename Tr::HD>{});
  Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<typename Tr::BM, typename Tr::HD>{}));
  Tensor tOrP = make_tensor<T>(POperandShape<Tr>{});
  static_assert(decltype(size(tSrS))::value == decltype(size(tOrP))::value, "P fragment = S fragment");
  static_assert(decltype(size(tScS))::value == decltype(size(tSrS))::value, "S coordinates");
  static_assert(decltype(size(tOcO))::value == decltype(size(tOrO))::value, "O coordinates");
  static_assert(decltype(size(tSrS))::value % 2 == 0, "pairs");
  clear(tOrO);

  // Pipeline: Q and the first visible K/V tile form one commit group. Step t waits for everything it issued (tile t),
  // publishes it to the async proxy and the block, issues its GEMMs, then requests tile t + 1 into K slot (t + 1) % 2
  // and V slot (t + 1) % 3. Those held tiles t - 1 (K, read by S_{t-1}) and t - 2 (V, read by step t - 1's O GEMM),
  // and every warpgroup retired both batches before this step's barrier; the GEMMs in flight read K slot t % 2 and
  // V slot (t - 1) % 3.
  int n = next_tile(-1);
  load_rows_async<BM, D, NT, false>(sQ, gQ + m0 * p.row_stride, p.row_stride, mk.L - m0, tid);
  if (n < n_tiles) load_kv(n, 0, 0);
  cp_async_commit();

  const int hr = (Tr::kHasRab && p.rab_heads == 1) ? 0 : w.head;
  const int wm0 = m0 + 64 * wg;  // first row of this warpgroup
  int k_slot = 0, v_slot = 0;
  int v_prev = -1;  // V slot of the previous step's tile, whose P is in tOrP; -1 before the first step
  while (n < n_tiles) {
    publish_copies_to_block();
    Tensor tSrK = thr_s.partition_fragment_B(sK(k_slot));
    wg_gemm_issue</*kZeroInit=*/true, /*kARegs=*/false>(mma_s, tSrQ, tSrK, tSrS);
    // The next tile's copies go out while the tensor cores run this step's GEMMs.
    const int n_next = next_tile(n);
    auto load_next = [&] {
      if (n_next < n_tiles) load_kv(n_next, k_slot ^ 1, v_slot == 2 ? 0 : v_slot + 1);
      cp_async_commit();
    };
    if (v_prev >= 0) {
      Tensor tOrV = thr_o.partition_fragment_B(sVt(v_prev));
      wg_gemm_issue</*kZeroInit=*/false, /*kARegs=*/true>(mma_o, tOrP, tOrV, tOrO);
      load_next();
      wg_wait<1>(tSrS);  // S_t ready; O += P_{t-1} V_{t-1} keeps running during the pointwise stage
    } else {
      load_next();
      wg_wait<0>(tSrS);
    }

    const int n0 = n * BN;
    fwd_pointwise<Tr>(p, mk, w.batch, hr, m0, wm0, n0, tSrS, tScS);
    // P_t, once the O GEMM reading P_{t-1} from the same registers has retired.
    wg_wait<0>(tOrO, tOrP);
    pack_p<Element>(tSrS, tOrP);

    v_prev = v_slot;
    n = n_next;
    k_slot ^= 1;
    v_slot = v_slot == 2 ? 0 : v_slot + 1;
  }
  cp_async_wait_all();
  // No key tile at all (the loop did not run): other threads' Q copies may still be landing in the rows store_o
  // stages O in (each thread waited only for its own).
  if (v_prev < 0) __syncthreads();
  if (v_prev >= 0) {  // the last tile's O GEMM
    Tensor tOrV = thr_o.partition_fragment_B(sVt(v_prev));
    wg_gemm</*kZeroInit=*/false, /*kARegs=*/true>(mma_o, tOrP, tOrV, tOrO);
  }

  store_o<Tr>(p, base, m0, mk.L, tOrO, tOcO, pQ, wg, tid % 128);
#else
  // Not an sm_90a target: the launcher never selects this kernel there.
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------------------------------
// Warp-specialized variant, the default on sm_90 (launch.h; HSTU_SM90_FWD_WS=0 takes the kernel above).
// Block = 3 warpgroups: warpgroup 0 produces (cp.async with zero-fill, exactly the loads of the kernel above) into
// K / V rings (2 / 3 slots) guarded by cutlass::PipelineAsync mbarrier pairs (full: the producer's 128 threads'
// copies landed; empty: the 256 consumer threads released the slot) and then keeps 40 registers (setmaxnreg);
// warpgroups 1 and 2 consume (232 registers), 64 query rows each, with the same math, masks, in-warpgroup overlap
// (S_t with O += P_{t-1} V_{t-1}) and epilogue as hstu_fwd_sm90_kernel, and no block-wide barrier in the loop.
// Ping-pong: the consumers take turns to issue their GEMMs (named barriers kTurnBarrier + w, 256 threads: one group
// syncs while the other arrives), so one group's pointwise stage runs under the other's GEMMs.
// With one consumer warpgroup (FwdTraitsSm90<..., 1>) there is no turn to take: the two blocks sharing the SM
// interleave on their own. At head dims 64 / 128 the default is its persistent form (hstu_fwd_sm90_persistent_kernel
// below: the same step loop, one wave of blocks walking work items); this one-tile-per-block form runs at head dim
// 256 and with HSTU_SM90_FWD_PERSISTENT=0.
constexpr int kTurnBarrier = 1;  // named barriers 1 and 2 (0 is __syncthreads)

#if defined(HSTU_SM90_DEVICE)
// A PipelineAsync's parameters as this thread sees them: `producers` threads fill a slot, `consumers` release it.
template <typename Pipe>
__device__ __forceinline__ typename Pipe::Params ws_pipeline_params(bool producer, int producers, int consumers) {
  typename Pipe::Params pp;
  pp.role = producer ? Pipe::ThreadCategory::Producer : Pipe::ThreadCategory::Consumer;
  pp.producer_arv_count = producers;
  pp.consumer_arv_count = consumers;
  return pp;
}
#endif

#if defined(HSTU_SM90_DEVICE)
// The producer's walk over the key tiles that query tile m0 may see (both warp-specialized kernels): per tile, K into
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

// The consumers' walk over the key tiles that query tile m0 may see (both warp-specialized kernels): per tile, wait for
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

template <typename Tr>
__global__ void __launch_bounds__(Tr::kThreads + 128, Tr::kBlocksPerSmWs) hstu_fwd_sm90_ws_kernel(const AttnParams p) {
#if defined(HSTU_SM90_DEVICE)
  using namespace cute;
  using Element = typename Tr::Element;
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM;
  using PipeK = cutlass::PipelineAsync<Tr::kStagesWsK>;
  using PipeV = cutlass::PipelineAsync<Tr::kStagesWsV>;
  using PipeQ = cutlass::PipelineAsync<1>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  T* const pQ = reinterpret_cast<T*>(smem_raw);
  T* const pK = pQ + Tr::kSizeQ;                   // kStagesWsK slots
  T* const pV = pK + Tr::kStagesWsK * Tr::kSizeK;  // kStagesWsV slots
  auto* k_storage = reinterpret_cast<typename PipeK::SharedStorage*>(smem_raw + Tr::kTileBytesWs);
  auto* v_storage = reinterpret_cast<typename PipeV::SharedStorage*>(k_storage + 1);
  auto* q_storage = reinterpret_cast<typename PipeQ::SharedStorage*>(v_storage + 1);
  static_assert(sizeof(typename PipeK::SharedStorage) + sizeof(typename PipeV::SharedStorage) +
                        sizeof(typename PipeQ::SharedStorage) <= 256,
                "barriers fit the reserved bytes");
  if ((cast_smem_ptr_to_uint(smem_raw) & 1023u) != 0) __trap();

  const WorkItem w = schedule_grouped_block(p, (p.max_seqlen + BM - 1) / BM, /*reverse=*/true);
  const SeqMask& mk = w.mask;
  const int m0 = w.tile * BM;
  if (m0 >= mk.L) return;  // whole block uniform
  const int tid = threadIdx.x;
  const bool producer = tid < 128;

  PipeK pipe_k(*k_storage, ws_pipeline_params<PipeK>(producer, 128, Tr::kThreads), cute::true_type{});  // warp 0 inits
  PipeV pipe_v(*v_storage, ws_pipeline_params<PipeV>(producer, 128, Tr::kThreads), cute::true_type{});
  PipeQ pipe_q(*q_storage, ws_pipeline_params<PipeQ>(producer, 128, Tr::kThreads), cute::true_type{});
  __syncthreads();  // initialized barriers visible to every thread

  const int64_t base = static_cast<int64_t>(w.seq_start) * p.row_stride + static_cast<int64_t>(w.head) * D;
  auto sVt = [&](int slot) {
    return make_tensor(make_smem_ptr(pV + slot * Tr::kSizeV), typename Tr::SmemLayoutVt{});
  };

  if (producer) {
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    const Element* gK = reinterpret_cast<const Element*>(p.k) + base;
    const Element* gV = reinterpret_cast<const Element*>(p.v) + base;
    auto sq = cutlass::make_producer_start_state<PipeQ>();
    pipe_q.producer_acquire(sq);
    load_rows_async<BM, D, 128, false>(make_tensor(make_smem_ptr(pQ), typename Tr::SmemLayoutQ{}),
                                       reinterpret_cast<const Element*>(p.q) + base + m0 * p.row_stride,
                                       p.row_stride, mk.L - m0, tid);
    pipe_q.producer_commit(sq, cutlass::arch::cpasync_barrier_arrive);
    auto sk = cutlass::make_producer_start_state<PipeK>();
    auto sv = cutlass::make_producer_start_state<PipeV>();
    ws_produce_key_tiles<Tr>(p, mk, m0, gK, gV, pK, pV, pipe_k, pipe_v, sk, sv, tid);
    cp_async_wait_all();  // the block's shared memory outlives every copy it issued
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
  const int ctid = tid - 128;  // 0..255 over the two consumer warpgroups
  const int cwg = ctid / 128;
  typename Tr::MmaS mma_s;
  typename Tr::MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(ctid);
  auto thr_o = mma_o.get_thread_slice(ctid);
  Tensor sQ = make_tensor(make_smem_ptr(pQ), typename Tr::SmemLayoutQ{});
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);
  Tensor tSrS = partition_fragment_C(mma_s, Shape<typename Tr::BM, typename Tr::BN>{});
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<typename Tr::BM, typename Tr::BN>{}));
  Tensor tOrO = partition_fragment_C(mma_o, Shape<typename Tr::BM, typename Tr::HD>{});
  Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<typename Tr::BM, typename Tr::HD>{}));
  Tensor tOrP = make_tensor<T>(POperandShape<Tr>{});
  clear(tOrO);

  const int hr = (Tr::kHasRab && p.rab_heads == 1) ? 0 : w.head;
  // After each full-barrier wait, a proxy fence: the producer's cp.async writes (generic proxy) are then read by
  // this thread's wgmmas (async proxy).
  pipe_q.consumer_wait(cutlass::PipelineState<1>{});
  fence_proxy_async_smem();
  constexpr bool kPingPong = Tr::kWarpGroups == 2;
  if (kPingPong && cwg == 1) named_barrier_arrive<256>(kTurnBarrier);  // group 0 issues first
  cutlass::PipelineState<Tr::kStagesWsK> sk;           // consumer states start at slot 0, phase 0
  cutlass::PipelineState<Tr::kStagesWsV> sv, sv_prev;
  bool have_prev = false;                            // P_{t-1} in tOrP, V_{t-1} in slot sv_prev
  ws_consume_key_tiles<Tr>(p, mk, w.batch, hr, m0, cwg, pK, pV, pipe_k, pipe_v, sk, sv, sv_prev, have_prev, mma_s, mma_o,
                           tSrQ, tSrS, tScS, tOrO, tOrP);
  if (kPingPong && cwg == 0) named_barrier_sync<256>(kTurnBarrier);  // group 1's last hand-over
  if (have_prev) {  // the last tile's O GEMM
    Tensor tOrV = thr_o.partition_fragment_B(sVt(sv_prev.index()));
    wg_gemm</*kZeroInit=*/false, /*kARegs=*/true>(mma_o, tOrP, tOrV, tOrO);
    pipe_v.consumer_release(sv_prev);
  }
  store_o<Tr>(p, base, m0, mk.L, tOrO, tOcO, pQ, cwg, ctid % 128);
#else
  __trap();
#endif
}

constexpr int kProducerBarrier = 5;  // named barrier of the producer warpgroup (3 and 4: the consumers' epilogues)

// Persistent: min(work items, SMs x blocks per SM) blocks, each running work items (query tiles of the grouped launch
// order, tile_scheduler.h) until none is left: block b starts with item b, then takes gridDim.x + the next value of
// p.tile_counter (zeroed by the launcher), so the longest items go first and a block that finishes early takes more. The
// producer's thread 0 draws the items and hands each to the block through a 2-slot pipeline (the consumers read it
// there). Across items the K / V rings, the Q slots and the consumers' turn-taking simply continue: the producer
// loads the next item's Q and first K / V tiles while the consumers finish this one, so a short sequence's
// per-tile prologue (loads, launch) hides under the previous tile's GEMMs and epilogue.
template <typename Tr>
__global__ void __launch_bounds__(Tr::kThreads + 128, Tr::kBlocksPerSmWs) hstu_fwd_sm90_persistent_kernel(const AttnParams p) {
#if defined(HSTU_SM90_DEVICE)
  using namespace cute;
  using Element = typename Tr::Element;
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM;
  using PipeK = cutlass::PipelineAsync<Tr::kStagesWsK>;
  using PipeV = cutlass::PipelineAsync<Tr::kStagesWsV>;
  using PipeQ = cutlass::PipelineAsync<Tr::kStagesWsQ>;
  using PipeItem = cutlass::PipelineAsync<2>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  T* const pQ = reinterpret_cast<T*>(smem_raw);       // kStagesWsQ slots
  T* const pK = pQ + Tr::kStagesWsQ * Tr::kSizeQ;     // kStagesWsK slots
  T* const pV = pK + Tr::kStagesWsK * Tr::kSizeK;     // kStagesWsV slots
  auto* k_storage = reinterpret_cast<typename PipeK::SharedStorage*>(smem_raw + Tr::kTileBytesWs);
  auto* v_storage = reinterpret_cast<typename PipeV::SharedStorage*>(k_storage + 1);
  auto* q_storage = reinterpret_cast<typename PipeQ::SharedStorage*>(v_storage + 1);
  auto* item_storage = reinterpret_cast<typename PipeItem::SharedStorage*>(q_storage + 1);
  int* const item_slots = reinterpret_cast<int*>(item_storage + 1);  // the item of each PipeItem slot
  static_assert(sizeof(typename PipeK::SharedStorage) + sizeof(typename PipeV::SharedStorage) +
                        sizeof(typename PipeQ::SharedStorage) + sizeof(typename PipeItem::SharedStorage) +
                        2 * sizeof(int) <= 256,
                "barriers fit the reserved bytes");
  if ((cast_smem_ptr_to_uint(smem_raw) & 1023u) != 0) __trap();

  const int tid = threadIdx.x;
  const bool producer = tid < 128;
  PipeK pipe_k(*k_storage, ws_pipeline_params<PipeK>(producer, 128, Tr::kThreads), cute::true_type{});  // warp 0 inits
  PipeV pipe_v(*v_storage, ws_pipeline_params<PipeV>(producer, 128, Tr::kThreads), cute::true_type{});
  PipeQ pipe_q(*q_storage, ws_pipeline_params<PipeQ>(producer, 128, Tr::kThreads), cute::true_type{});
  PipeItem pipe_item(*item_storage, ws_pipeline_params<PipeItem>(producer, 1, Tr::kThreads), cute::true_type{});
  __syncthreads();  // initialized barriers visible to every thread

  const int tiles = (p.max_seqlen + BM - 1) / BM;
  const int items = tiles * p.batch * p.heads;
  auto base_of = [&](const WorkItem& w) {
    return static_cast<int64_t>(w.seq_start) * p.row_stride + static_cast<int64_t>(w.head) * D;
  };
  auto sVt = [&](int slot) {
    return make_tensor(make_smem_ptr(pV + slot * Tr::kSizeV), typename Tr::SmemLayoutVt{});
  };
  auto sQ = [&](int slot) { return make_tensor(make_smem_ptr(pQ + slot * Tr::kSizeQ), typename Tr::SmemLayoutQ{}); };

  if (producer) {
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    auto sq = cutlass::make_producer_start_state<PipeQ>();
    auto sk = cutlass::make_producer_start_state<PipeK>();
    auto sv = cutlass::make_producer_start_state<PipeV>();
    auto si = cutlass::make_producer_start_state<PipeItem>();
    int item = blockIdx.x;
    while (true) {
      // Hand the item to the consumers (items: none left), and to the other producer threads. Only the thread that
      // fills the slot waits for it to be free: another one arriving late could find the consumers already done with
      // the slot, its barrier a phase further, and wait for the next phase forever.
      if (tid == 0) {
        pipe_item.producer_acquire(si);
        item_slots[si.index()] = item;
        compiler_fence();  // CUTLASS's mbarrier arrive / wait asm has no memory clobber: keep the slot access in place
        pipe_item.producer_commit(si);
      }
      __syncwarp();  // bar.sync is .aligned: warp 0 arrives converged
      named_barrier_sync<128>(kProducerBarrier);
      item = item_slots[si.index()];
      ++si;
      if (item >= items) break;
      int next = 0;
      if (tid == 0) next = static_cast<int>(gridDim.x) + atomicAdd(p.tile_counter, 1);  // in flight during the loads
      const WorkItem w = schedule_grouped_item(p, tiles, /*reverse=*/true, item);
      const SeqMask& mk = w.mask;
      const int m0 = w.tile * BM;
      if (m0 < mk.L) {
        const int64_t base = base_of(w);
        const Element* gK = reinterpret_cast<const Element*>(p.k) + base;
        const Element* gV = reinterpret_cast<const Element*>(p.v) + base;
        pipe_q.producer_acquire(sq);
        load_rows_async<BM, D, 128, false>(sQ(sq.index()), reinterpret_cast<const Element*>(p.q) + base + m0 * p.row_stride,
                                           p.row_stride, mk.L - m0, tid);
        pipe_q.producer_commit(sq, cutlass::arch::cpasync_barrier_arrive);
        ++sq;
        ws_produce_key_tiles<Tr>(p, mk, m0, gK, gV, pK, pV, pipe_k, pipe_v, sk, sv, tid);
      }
      item = next;  // only thread 0's is real: it alone writes the item slot
    }
    cp_async_wait_all();  // the block's shared memory outlives every copy it issued
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
  const int ctid = tid - 128;  // 0..255 over the two consumer warpgroups
  const int cwg = ctid / 128;
  typename Tr::MmaS mma_s;
  typename Tr::MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(ctid);
  auto thr_o = mma_o.get_thread_slice(ctid);
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<typename Tr::BM, typename Tr::BN>{}));
  Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<typename Tr::BM, typename Tr::HD>{}));

  constexpr bool kPingPong = Tr::kWarpGroups == 2;
  // Turn-taking runs through every step of every item: group 0 issues first; each step a group waits for its turn
  // and then hands the turn over, and group 0 takes group 1's last hand-over after the last item.
  if (kPingPong && cwg == 1) named_barrier_arrive<256>(kTurnBarrier);
  cutlass::PipelineState<Tr::kStagesWsQ> sq;  // consumer states start at slot 0, phase 0
  cutlass::PipelineState<Tr::kStagesWsK> sk;
  cutlass::PipelineState<Tr::kStagesWsV> sv, sv_prev;
  cutlass::PipelineState<2> si;
  while (true) {
    pipe_item.consumer_wait(si);
    compiler_fence();
    const int item = item_slots[si.index()];
    compiler_fence();
    pipe_item.consumer_release(si);
    ++si;
    if (item >= items) break;
    const WorkItem w = schedule_grouped_item(p, tiles, /*reverse=*/true, item);
    const SeqMask& mk = w.mask;
    const int m0 = w.tile * BM;
    if (m0 >= mk.L) continue;  // the producer skips it too
    const int hr = (Tr::kHasRab && p.rab_heads == 1) ? 0 : w.head;
    // the register fragments live inside one item (declared outside, ptxas kept them alive across items: spills)
    Tensor tSrS = partition_fragment_C(mma_s, Shape<typename Tr::BM, typename Tr::BN>{});
    Tensor tOrO = partition_fragment_C(mma_o, Shape<typename Tr::BM, typename Tr::HD>{});
    Tensor tOrP = make_tensor<T>(POperandShape<Tr>{});
    clear(tOrO);
    // After each full-barrier wait, a proxy fence: the producer's cp.async writes (generic proxy) are then read by
    // this thread's wgmmas (async proxy).
    pipe_q.consumer_wait(sq);
    fence_proxy_async_smem();
    Tensor tSrQ = thr_s.partition_fragment_A(sQ(sq.index()));
    bool have_prev = false;  // P_{t-1} in tOrP, V_{t-1} in slot sv_prev
    ws_consume_key_tiles<Tr>(p, mk, w.batch, hr, m0, cwg, pK, pV, pipe_k, pipe_v, sk, sv, sv_prev, have_prev, mma_s,
                             mma_o, tSrQ, tSrS, tScS, tOrO, tOrP);
    if (have_prev) {  // the last tile's O GEMM
      Tensor tOrV = thr_o.partition_fragment_B(sVt(sv_prev.index()));
      wg_gemm</*kZeroInit=*/false, /*kARegs=*/true>(mma_o, tOrP, tOrV, tOrO);
      pipe_v.consumer_release(sv_prev);
    }
    store_o<Tr>(p, base_of(w), m0, mk.L, tOrO, tOcO, pQ + sq.index() * Tr::kSizeQ, cwg, ctid % 128);
    compiler_fence();
    pipe_q.consumer_release(sq);  // this thread's staging reads are done
    ++sq;
  }
  if (kPingPong && cwg == 0) named_barrier_sync<256>(kTurnBarrier);  // group 1's last hand-over
#else
  __trap();
#endif
}

// Host-side self-checks of the layout assumptions above (pure layout algebra, no GPU; .ci/compile_check.sh runs them
// for every instantiated shape). Each returns an empty string when it passes.
// (1) P's A-operand fragment enumerates the same (row, key) as S's accumulator fragment, S rows lie in the thread's
//     warpgroup, and O accumulator values 2e, 2e + 1 are adjacent columns (c even) of one row.
template <typename Tr>
inline std::string check_sm90_fragments() {
  using namespace cute;
  typename Tr::MmaS mma_s;
  typename Tr::MmaO mma_o;
  auto cS = make_identity_tensor(Shape<typename Tr::BM, typename Tr::BN>{});
  auto cO = make_identity_tensor(Shape<typename Tr::BM, typename Tr::HD>{});
  for (int t = 0; t < Tr::kThreads; ++t) {
    auto thr_s = mma_s.get_thread_slice(t);
    auto thr_o = mma_o.get_thread_slice(t);
    auto tScS = thr_s.partition_C(cS);
    auto tOcP = thr_o.partition_A(cS);  // (row, key) of each P operand value
    auto tOcO = thr_o.partition_C(cO);
    if (size(tScS) != size(tOcP)) return "P/S fragment sizes differ";
    for (int e = 0; e < size(tScS); ++e) {
      if (get<0>(tScS(e)) != get<0>(tOcP(e)) || get<1>(tScS(e)) != get<1>(tOcP(e)))
        return "P operand order != S accumulator order at thread " + std::to_string(t) + " value " +
               std::to_string(e);
      if (get<0>(tScS(e)) / 64 != t / 128) return "S row outside the thread's warpgroup";
    }
    for (int e = 0; e + 1 < size(tOcO); e += 2) {
      if (get<0>(tOcO(e)) != get<0>(tOcO(e + 1)) || get<1>(tOcO(e)) + 1 != get<1>(tOcO(e + 1)) ||
          get<1>(tOcO(e)) % 2 != 0)
        return "O accumulator pair not adjacent at thread " + std::to_string(t);
      if (get<0>(tOcO(e)) / 64 != t / 128) return "O row outside the thread's warpgroup";
    }
  }
  return "";
}

template <typename Tr>
inline std::string check_sm90_traits() {
  using T = typename Tr::T;
  std::string e = check_sm90_fragments<Tr>();
  if (e.empty()) e = check_sm90_smem_tile<typename Tr::SmemLayoutQ, T>(false, Tr::kBlockM, Tr::kHeadDim);
  if (e.empty()) {  // the epilogue's staging offsets
    std::vector<uint16_t> storage(Tr::kSizeQ + 1024);
    T* q = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(storage.data()) + 1023) & ~uintptr_t(1023));
    auto sQ = cute::make_tensor(cute::make_smem_ptr(q), typename Tr::SmemLayoutQ{});
    for (int r = 0; r < Tr::kBlockM && e.empty(); ++r)
      for (int c = 0; c < Tr::kHeadDim; ++c)
        if (&sQ(r, c) - q != q_tile_offset<Tr::kBlockM>(r, c)) {
          e = "q_tile_offset != SmemLayoutQ at (" + std::to_string(r) + ", " + std::to_string(c) + ")";
          break;
        }
  }
  if (e.empty()) e = check_sm90_smem_tile<typename Tr::SmemLayoutK, T>(false, Tr::kBlockN, Tr::kHeadDim);
  if (e.empty()) e = check_sm90_smem_tile<typename Tr::SmemLayoutVt, T>(true, Tr::kBlockN, Tr::kHeadDim);
  // the loads of both kernels: all threads (hstu_fwd_sm90_kernel), the producer warpgroup (the ws kernel)
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, D = Tr::kHeadDim, NT = Tr::kThreads;
  if (e.empty()) e = check_row_load_plan<typename Tr::SmemLayoutQ, T, BM, D, NT, false>();
  if (e.empty()) e = check_row_load_plan<typename Tr::SmemLayoutK, T, BN, D, NT, false>();
  if (e.empty()) e = check_row_load_plan<typename Tr::SmemLayoutVt, T, BN, D, NT, true>();
  if (e.empty()) e = check_row_load_plan<typename Tr::SmemLayoutQ, T, BM, D, 128, false>();
  if (e.empty()) e = check_row_load_plan<typename Tr::SmemLayoutK, T, BN, D, 128, false>();
  if (e.empty()) e = check_row_load_plan<typename Tr::SmemLayoutVt, T, BN, D, 128, true>();
  return e;
}

template <typename Tr>
void launch_fwd_sm90_kernel(const AttnParams& p, cudaStream_t stream, bool warp_specialized) {
  if (p.batch == 0 || p.max_seqlen == 0) return;
  auto check = [](cudaError_t err, const char* what) {
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("hstu attention (sm90 forward): ") + what + ": " + cudaGetErrorString(err));
  };
  if (p.sched_group < 1) throw std::invalid_argument("hstu attention (sm90 forward): sched_group < 1");
  const int64_t items = int64_t{(p.max_seqlen + Tr::kBlockM - 1) / Tr::kBlockM} * p.batch * p.heads;
  if (items > INT32_MAX - 2 * 1024) throw std::invalid_argument("hstu attention (sm90 forward): too many tiles");
  if (p.tile_counter == nullptr) throw std::invalid_argument("hstu attention (sm90 forward): no tile counter");
  // Head dims 64 / 128: the persistent kernel, one wave of blocks that take the items from there (H200, 64,1024,4,128:
  // 368 against 342 TFLOP/s; 128,200,1,64: 40 against 37; level on long sequences; RESULTS.md, session 11).
  // HSTU_SM90_FWD_PERSISTENT=0 (read at every call) takes the one-tile-per-block kernel instead. Head dim 256 keeps
  // that one: in the persistent item loop ptxas spills 252 bytes there (471 against 544 TFLOP/s at 32,4096,4,256).
  dim3 grid(static_cast<unsigned>(items));
  auto kernel = hstu_fwd_sm90_ws_kernel<Tr>;
  if constexpr (Tr::kHeadDim <= 128) {
    const char* e = std::getenv("HSTU_SM90_FWD_PERSISTENT");
    if (!(e && e[0] == '0')) {
      int device = 0, sms = 0;
      check(cudaGetDevice(&device), "cudaGetDevice");
      check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
      kernel = hstu_fwd_sm90_persistent_kernel<Tr>;
      grid = dim3(static_cast<unsigned>(std::min<int64_t>(items, int64_t{sms} * Tr::kBlocksPerSmWs)));
      check(cudaMemsetAsync(p.tile_counter, 0, sizeof(int), stream), "cudaMemsetAsync (tile counter)");
    }
  }
  int smem = Tr::kSmemBytesWs, threads = Tr::kThreads + 128;
  if constexpr (Tr::kWarpGroups == 2) {  // (the one-consumer shape exists only warp-specialized)
    if (!warp_specialized) {
      kernel = hstu_fwd_sm90_kernel<Tr>;
      smem = Tr::kSmemBytes;
      threads = Tr::kThreads;
      grid = dim3(static_cast<unsigned>(items));  // schedule_grouped_block
    }
  }
  check(set_kernel_attribute_once(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "cudaFuncSetAttribute");
  if constexpr (Tr::kBlocksPerSmWs > 1)  // the largest shared-memory carveout, so that both blocks fit
    check(set_kernel_attribute_once(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                    cudaSharedmemCarveoutMaxShared),
          "cudaFuncSetAttribute (carveout)");
  kernel<<<grid, threads, smem, stream>>>(p);
  check(cudaGetLastError(), "launch");
}

template <typename Element, int kHeadDim, bool kHasRab>
void launch_fwd_sm90(const AttnParams& p, cudaStream_t stream, Sm90FwdKernel which) {
  if constexpr (kHeadDim <= 128) {
    if (which == Sm90FwdKernel::kTwoPerSm) {
      launch_fwd_sm90_kernel<FwdTraitsSm90<Element, kHeadDim, kHasRab, 1>>(p, stream, /*warp_specialized=*/true);
      return;
    }
  }
  launch_fwd_sm90_kernel<FwdTraitsSm90<Element, kHeadDim, kHasRab>>(p, stream, which != Sm90FwdKernel::kSingleRole);
}

}  // namespace sm90
}  // namespace hstu

// One explicit specialisation of run_fwd_sm90 per translation unit (instantiations/hstu_fwd_*_sm90.cu).
#define HSTU_INSTANTIATE_FWD_SM90(T, D, RAB)                                                        \
  namespace hstu {                                                                                  \
  template <>                                                                                       \
  void run_fwd_sm90<T, D, RAB>(const AttnParams& p, cudaStream_t stream, Sm90FwdKernel which) {     \
    sm90::launch_fwd_sm90<T, D, RAB>(p, stream, which);                                             \
  }                                                                                                 \
  }
