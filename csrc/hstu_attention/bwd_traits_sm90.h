// Kernel traits of the Hopper (sm_90a) backward: tile sizes, the CuTe MMA atoms and shared-memory layouts of the
// head-dim 64 / 128 kernel (BwdTraitsSm90) and of the head-dim-256 kernel (BwdTraitsSm90Split), the dS tile offsets
// written out (ds_offset), the dq staging sizes, and the operand-order fact the mainloop relies on (KVOperandShape);
// self_checks.h verifies the layout facts on the host.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "bwd_sm90_api.h"
#include "sm90_common.h"

namespace hstu {
namespace sm90 {

// Shared staging of the dQ reductions (add_dq_slice): per warp 16 / kPasses rows of 64 floats, kDqStageStride apart.
inline constexpr int kDqStageStride = 72;
template <int kPasses>
inline constexpr int kDqStageFloatsPerWarp = 16 / kPasses * kDqStageStride;

// The shared tiles of both backward kernels (128B swizzle). K, V: (keys, D) K-major, atoms tiled rows first; Kt: the
// same bytes as the MN-major (D, keys) B operand of dS K (atoms tiled along keys first). Q, dO: (queries, D) K-major;
// Qt / dOt: the same bytes as the MN-major (D, queries) B operands of dS^T Q / P^T dO. dS: (queries, keys) MN-major.
template <typename T, int kKeys, int kQueries, int kHeadDim>
struct BwdSmemLayoutsSm90 {
  using SmemLayoutK = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_K_SW128_Atom<T>{},
                                                   cute::Shape<cute::Int<kKeys>, cute::Int<kHeadDim>>{}));
  using SmemLayoutKt = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_MN_SW128_Atom<T>{},
                                                    cute::Shape<cute::Int<kHeadDim>, cute::Int<kKeys>>{},
                                                    cute::Step<cute::_2, cute::_1>{}));
  using SmemLayoutQ = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_K_SW128_Atom<T>{},
                                                   cute::Shape<cute::Int<kQueries>, cute::Int<kHeadDim>>{}));
  using SmemLayoutQt = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_MN_SW128_Atom<T>{},
                                                    cute::Shape<cute::Int<kHeadDim>, cute::Int<kQueries>>{},
                                                    cute::Step<cute::_2, cute::_1>{}));
  using SmemLayoutDS = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_MN_SW128_Atom<T>{},
                                                    cute::Shape<cute::Int<kQueries>, cute::Int<kKeys>>{}));
  static constexpr int kSizeK = cute::cosize_v<SmemLayoutK>;
  static constexpr int kSizeQ = cute::cosize_v<SmemLayoutQ>;
  static constexpr int kSizeDS = cute::cosize_v<SmemLayoutDS>;
  static_assert(kSizeK == kKeys * kHeadDim && kSizeQ == kQueries * kHeadDim && kSizeDS == kQueries * kKeys,
                "compact shared tiles");
  static_assert(cute::cosize_v<SmemLayoutKt> == kSizeK && cute::cosize_v<SmemLayoutQt> == kSizeQ, "same bytes");
  static_assert((kSizeK * 2) % 1024 == 0 && (kSizeQ * 2) % 1024 == 0 && (kSizeDS * 2) % 1024 == 0,
                "1024-byte aligned tiles");
};

template <typename Element_, int kHeadDim_, bool kHasRab_>
struct BwdTraitsSm90 : BwdSmemLayoutsSm90<typename CuteElement<Element_>::type, 128, 64, kHeadDim_> {
  using Layouts = BwdSmemLayoutsSm90<typename CuteElement<Element_>::type, 128, 64, kHeadDim_>;
  using Element = Element_;
  using T = typename CuteElement<Element>::type;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kHasRab = kHasRab_;
  static constexpr int kWarpGroups = 2;
  static constexpr int kThreads = 128 * kWarpGroups;
  static constexpr int kBlockN = 64 * kWarpGroups;  // keys per block, 64 per warpgroup
  static_assert(kBlockN == kSm90BwdBlockN<kHeadDim_>, "heuristics.h counts the backward's tiles with kSm90BwdBlockN");
  static constexpr int kBlockM = 64;                // queries per step
  static constexpr int kStages = 2;                 // Q / dO ring
  static constexpr int kDqChunk = 64;               // dQ columns per GEMM (32 accumulator floats / thread)
  static_assert(kHeadDim / kDqChunk <= kWarpGroups, "one dQ chunk per warpgroup");
  // Registers per thread: dV and dK 64 x D fp32 per warpgroup = D / 2 floats each, S^T and dP^T BM / 2 each.
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dim 64 or 128");
  static_assert(kBlockM == 64, "ds_offset: one 64-query swizzle atom");

  using BN = cute::Int<kBlockN>;
  using BM = cute::Int<kBlockM>;
  using HD = cute::Int<kHeadDim>;
  using DQC = cute::Int<kDqChunk>;
  using WgLayout = cute::Layout<cute::Shape<cute::Int<kWarpGroups>, cute::_1, cute::_1>>;  // warpgroups along M
  // S^T = K Q^T and dP^T = V dO^T: (M, N, K) = (64 keys per warpgroup, BM, D); both operands K-major.
  using MmaSdP = decltype(cute::make_tiled_mma(
      cute::SM90::GMMA::ss_op_selector<T, T, float, cute::Shape<cute::_64, BM, HD>, cute::SM90::GMMA::Major::K,
                                       cute::SM90::GMMA::Major::K>(),
      WgLayout{}));
  // dV = P^T dO and dK = dS^T Q: (M, N, K) = (64 keys per warpgroup, D, BM); A in registers, B MN-major.
  using MmaKV = decltype(cute::make_tiled_mma(
      cute::SM90::GMMA::rs_op_selector<T, T, float, cute::Shape<cute::_64, HD, BM>, cute::SM90::GMMA::Major::K,
                                       cute::SM90::GMMA::Major::MN>(),
      WgLayout{}));
  // dQ_partial = dS K over one warpgroup's keys: (M, N, K) = (BM, 64-column chunk, 64 keys), one warpgroup; A = dS
  // (queries contiguous in the dS^T tile: MN-major), B = K seen as (D, keys) with D contiguous (MN-major).
  using MmaDQ = decltype(cute::make_tiled_mma(
      cute::SM90::GMMA::ss_op_selector<T, T, float, cute::Shape<BM, DQC, BN>, cute::SM90::GMMA::Major::MN,
                                       cute::SM90::GMMA::Major::MN>()));

  // The shared tiles (BwdSmemLayoutsSm90): K, V (128 keys), Q, dO (64 queries), the block's dS tile.
  static_assert(Layouts::kSizeK == kBlockN * kHeadDim && Layouts::kSizeQ == kBlockM * kHeadDim, "tile shapes");
  // K, V, kStages x (Q, dO), the block's dS tile, then the warps' dQ staging rows (add_dq_slice, 16 rows each):
  // 108 KB (D 64), 180 KB (D 128).
  static constexpr int kDqStagePasses = 1;
  static constexpr int kSmemBytes = (2 * Layouts::kSizeK + 2 * kStages * Layouts::kSizeQ + Layouts::kSizeDS) * 2 +
                                    kDqStageFloatsPerWarp<kDqStagePasses> * 4 * (kThreads / 32);
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block on sm_90");
};

// Element offset of (query i, key j) in a dS tile (SmemLayoutDS: 64 x BN, MN-major, 128B swizzle) written
// out: queries contiguous, 64 per key, 8 keys per 1024-byte atom, the 16-byte chunks (8 queries) of key j XOR-permuted
// by j mod 8. 32-bit integer math on (i, j) instead of CuTe's swizzled 64-bit pointers keeps the dS^T stores' addresses
// cheap (fewer registers); check_sm90_bwd_smem checks it against SmemLayoutDS for every (i, j).
__host__ __device__ __forceinline__ constexpr int ds_offset(int i, int j) {
  return ((((i >> 3) ^ (j & 7)) << 3) | (i & 7)) + ((j & 7) << 6) + ((j >> 3) << 9);
}

// The A operand of dV = P^T dO / dK = dS^T Q (registers) enumerates the same (key, query) elements in the same
// order as the accumulator of S^T / dP^T (the forward's P trick, transposed problem); checked on the host.
template <typename Tr>
using KVOperandShape =
    decltype(cute::partition_shape_A(typename Tr::MmaKV{}, cute::Shape<typename Tr::BN, typename Tr::BM>{}));

// ---------------------------------------------------------------------------------------------------------------------
// Head dim 256: the warpgroups split the work instead of the keys. dK and dV of 64 keys x 256 columns would take 256
// accumulator registers per thread in one warpgroup, so a block owns 64 keys and per query step of 64 rows:
//   stage 1, split by queries: warpgroup w computes S^T and dP^T for its 32 queries (SS-wgmma, 64 x 32, k = 256),
//     runs the pointwise stage on them and stores P^T and dS^T (q's dtype) into two shared (keys x queries) tiles;
//   block barrier;
//   stage 2, split by head-dim columns: warpgroup w owns columns [128 w, 128 w + 128) of dV, dK and dQ:
//     dV_w += P^T dO_w, dK_w += dS^T Q_w (SS-wgmma, 64 x 128, k = 64 queries; A = the shared tiles, K-major),
//     dQ_w = dS K_w in two 64-column chunks (A = the dS^T tile seen MN-major), added into p.dq_accum.
// Registers per thread: dV_w, dK_w 64 floats each, S^T / dP^T 16 each, a dQ chunk 32. Shared memory: K, V,
// 2 x (Q, dO), P^T, dS^T = 208 KB. Same masks, scales, walk and epilogue rules as hstu_bwd_sm90_kernel.
template <typename Element_, bool kHasRab_>
struct BwdTraitsSm90Split : BwdSmemLayoutsSm90<typename CuteElement<Element_>::type, 64, 64, 256> {
  using Layouts = BwdSmemLayoutsSm90<typename CuteElement<Element_>::type, 64, 64, 256>;
  using Element = Element_;
  using T = typename CuteElement<Element>::type;
  static constexpr int kHeadDim = 256;
  static constexpr bool kHasRab = kHasRab_;
  static constexpr int kWarpGroups = 2;
  static constexpr int kThreads = 128 * kWarpGroups;
  static constexpr int kBlockN = 64;   // keys per block
  static_assert(kBlockN == kSm90BwdBlockN<256>, "heuristics.h counts the backward's tiles with kSm90BwdBlockN");
  static constexpr int kBlockM = 64;   // queries per step
  static constexpr int kHalfM = 32;    // queries per warpgroup in stage 1
  static constexpr int kHalfD = 128;   // head-dim columns per warpgroup in stage 2
  static constexpr int kStages = 2;    // Q / dO ring
  static constexpr int kDqChunk = 64;  // dQ columns per GEMM

  using BN = cute::Int<kBlockN>;
  using BM = cute::Int<kBlockM>;
  using HM = cute::Int<kHalfM>;
  using HD = cute::Int<kHeadDim>;
  using HH = cute::Int<kHalfD>;
  using DQC = cute::Int<kDqChunk>;
  // S^T = K Q_w^T, dP^T = V dO_w^T: (64 keys, 32 queries, D), one warpgroup, both operands K-major.
  using MmaSdP = decltype(cute::make_tiled_mma(
      cute::SM90::GMMA::ss_op_selector<T, T, float, cute::Shape<BN, HM, HD>, cute::SM90::GMMA::Major::K,
                                       cute::SM90::GMMA::Major::K>()));
  // dV_w += P^T dO_w, dK_w += dS^T Q_w: (64 keys, 128 columns, 64 queries); A (keys x queries) K-major in shared
  // memory, B = dO / Q seen MN-major.
  using MmaKV = decltype(cute::make_tiled_mma(
      cute::SM90::GMMA::ss_op_selector<T, T, float, cute::Shape<BN, HH, BM>, cute::SM90::GMMA::Major::K,
                                       cute::SM90::GMMA::Major::MN>()));
  // dQ chunk = dS K_chunk: (64 queries, 64 columns, 64 keys); A = dS (queries contiguous: MN-major), B = K seen MN-major.
  using MmaDQ = decltype(cute::make_tiled_mma(
      cute::SM90::GMMA::ss_op_selector<T, T, float, cute::Shape<BM, DQC, BN>, cute::SM90::GMMA::Major::MN,
                                       cute::SM90::GMMA::Major::MN>()));

  // K, V, Q, dO (BwdSmemLayoutsSm90), and P^T / dS^T: (keys, queries), queries contiguous; the dS^T tile is read
  // back as SmemLayoutDS, the same bytes seen as dS (queries, keys).
  using SmemLayoutPt = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_K_SW128_Atom<T>{}, cute::Shape<BN, BM>{}));
  static constexpr int kSizeP = cute::cosize_v<SmemLayoutPt>;
  static_assert(Layouts::kSizeK == kBlockN * kHeadDim && kSizeP == kBlockN * kBlockM && Layouts::kSizeDS == kSizeP,
                "tile shapes");
  static_assert(kBlockM == 64 && kBlockN == 64, "ds_offset: 64 x 64 tiles");
  // K, V, 2 x (Q, dO), P^T, dS^T (208 KB), then the warps' dQ staging rows (add_dq_slice, 8 rows each: 18 KB).
  static constexpr int kDqStagePasses = 2;
  static constexpr int kSmemBytes = (2 * Layouts::kSizeK + 2 * kStages * Layouts::kSizeQ + 2 * kSizeP) * 2 +
                                    kDqStageFloatsPerWarp<kDqStagePasses> * 4 * (kThreads / 32);
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block on sm_90");
};

}  // namespace sm90
}  // namespace hstu
