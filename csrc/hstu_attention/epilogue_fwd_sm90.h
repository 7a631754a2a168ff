// Epilogue of the Hopper (sm_90a) forward: O / N from a consumer warpgroup's accumulators to global memory, staged
// through its own rows of the Q tile.
#pragma once

#include <cute/tensor.hpp>

#include "fwd_traits_sm90.h"
#include "hstu.h"
#include "sm90_common.h"
#include "utils.h"

namespace hstu {
namespace sm90 {

#if defined(HSTU_SM90_DEVICE)
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

}  // namespace sm90
}  // namespace hstu
