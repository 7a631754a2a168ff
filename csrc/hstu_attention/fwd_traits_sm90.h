// Kernel traits of the Hopper (sm_90a) forward: tile sizes, pipeline depths, register split, the CuTe MMA atoms and
// shared-memory layouts (FwdTraitsSm90), the named barriers of the forward kernels, and the register-order and
// tile-offset facts that the mainloop and the epilogue rely on (self_checks.h verifies them on the host).
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "fwd_sm90_api.h"
#include "sm90_common.h"

namespace hstu {
namespace sm90 {

// Named barriers of the forward kernels (0 is __syncthreads).
constexpr int kTurnBarrier = 1;      // 1 and 2: the ping-pong consumers' turns to issue their GEMMs
constexpr int kEpilogueBarrier = 3;  // 3 and 4: one per consumer warpgroup's epilogue
constexpr int kProducerBarrier = 5;  // the producer warpgroup (DynamicPersistentScheduler's item hand-over)

// kWarpGroups_: consumer warpgroups per block. 2: the default (128 query rows, ping-pong in the warp-specialized
// kernel, one block per SM). 1: the warp-specialized kernel's short-sequence shape (Sm90FwdKernel::kTwoPerSm, head
// dims 64 / 128): 64 query rows and 64-key tiles, 96 KB of shared memory at head dim 128, so two blocks share an SM
// and one block's prologue (Q and first K / V loads) and epilogue run under the other's GEMMs. (128-key tiles with
// one K and two V slots, 112 KB, also fit two per SM; measured slower than both.)
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
  static_assert(kWarpGroups != 2 || kBlockM == kSm90FwdBlockM, "heuristics.h's launch order counts 128-row tiles");
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
  // Warp-specialized kernel (hstu_fwd_sm90_ws_kernel): K and V rings behind mbarrier pipelines (a slot is refilled
  // only after both consumer warpgroups released it), then the barriers. V_t is released one step after K_t (its O
  // GEMM runs during step t + 1), and the producer loads K, V in tile order: a third V slot keeps the producer from
  // waiting on V_{t-1} before it can start K_{t+1}.
  // A second Q slot at head dims 64 / 128 (a persistent scheduler: the producer loads the next work item's Q while the
  // consumers still stage this item's O through theirs; with the SingleTileScheduler it stays unused).
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

}  // namespace sm90
}  // namespace hstu
