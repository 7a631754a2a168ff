// Epilogue of the Hopper (sm_90a) backward: dK and dV from the accumulators to global memory, staged through the
// block's K and V tiles. (dq leaves through the workspace during the mainloop: add_dq_slice.)
#pragma once

#include <cute/tensor.hpp>

#include "bwd_traits_sm90.h"
#include "hstu.h"
#include "mainloop_bwd_sm90.h"
#include "utils.h"

namespace hstu {
namespace sm90 {

#if defined(HSTU_SM90_DEVICE)
// Epilogue: dV / N and dK alpha / N (the sm80 kernel's scales without dropout), keys of this sequence only (the
// rows after it belong to the next one). Staged through the K and V tiles, free once every warpgroup's GEMMs have
// retired (the first barrier): the accumulator pairs (adjacent columns, checked on the host) go there with each
// row's 16-byte chunks XOR-permuted by row % 8 (conflict-free for the pair stores, which cover 8 consecutive rows,
// and for the chunk reads), then leave as coalesced 16-byte stores of whole rows. One 4-byte global store per pair
// took ~6 us per block (14% of the backward's samples at 64,1024,4,128). col0: the accumulators' first column.
template <typename Tr, typename Acc, typename Coords>
__device__ inline void store_dk_dv(const BwdTiles<Tr>& tiles, const AttnParams& p, Acc const& dk, Acc const& dv,
                                   Coords const& coord, int col0, int tid) {
  using namespace cute;
  using Element = typename Tr::Element;
  constexpr int D = Tr::kHeadDim, BN = Tr::kBlockN, NT = Tr::kThreads;
  static_assert(D % 64 == 0, "the staging swizzle permutes groups of 8 chunks");
  __syncthreads();
  uint32_t* const stage_k = reinterpret_cast<uint32_t*>(tiles.k);
  uint32_t* const stage_v = reinterpret_cast<uint32_t*>(tiles.v());
  const float dv_scale = p.inv_scale;
  const float dk_scale = p.alpha * p.inv_scale;
  CUTE_UNROLL
  for (int e = 0; e < size(dv) / 2; ++e) {
    const int r = get<0>(coord(2 * e));
    const int c = col0 + get<1>(coord(2 * e));
    const int word = (r * D + (((c >> 3) ^ (r & 7)) << 3) + (c & 7)) >> 1;
    stage_v[word] = pack2<Element>(dv(2 * e) * dv_scale, dv(2 * e + 1) * dv_scale);
    stage_k[word] = pack2<Element>(dk(2 * e) * dk_scale, dk(2 * e + 1) * dk_scale);
  }
  __syncthreads();
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  const int chunks = min(BN, tiles.w.mask.L - tiles.n0) * kChunks;
  Element* const gdk =
      reinterpret_cast<Element*>(p.dk) + tiles.base + static_cast<int64_t>(tiles.n0) * tiles.row_stride;
  Element* const gdv =
      reinterpret_cast<Element*>(p.dv) + tiles.base + static_cast<int64_t>(tiles.n0) * tiles.row_stride;
  for (int i = tid; i < chunks; i += NT) {
    const int r = i / kChunks, ch = i % kChunks;
    const int src = r * D + ((ch ^ (r & 7)) << 3);
    const int64_t dst = static_cast<int64_t>(r) * tiles.row_stride + ch * 8;
    *reinterpret_cast<uint4*>(gdk + dst) = *reinterpret_cast<const uint4*>(tiles.k + src);
    *reinterpret_cast<uint4*>(gdv + dst) = *reinterpret_cast<const uint4*>(tiles.v() + src);
  }
}
#endif  // HSTU_SM90_DEVICE

}  // namespace sm90
}  // namespace hstu
