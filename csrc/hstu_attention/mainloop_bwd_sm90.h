// Mainloop pieces of the Hopper (sm_90a) backward: the block's shared tiles, loads and query-tile walk (BwdTiles:
// K / V resident, a cp.async ring of Q / dO tiles, zero-filled past the sequence end) and the per-step dq reductions
// into the float32 workspace (add_dq_slice). The GEMMs and the pointwise stage of a step are in the kernels
// (bwd_kernel_sm90.h); the pointwise math itself in pointwise.h.
#pragma once

#include <cute/tensor.hpp>

#include "bwd_traits_sm90.h"
#include "hstu.h"
#include "mask.h"
#include "sm90_common.h"
#include "tile_scheduler.h"
#include "utils.h"

namespace hstu {
namespace sm90 {

#if defined(HSTU_SM90_DEVICE)
// dQ reductions: each warp of a dQ MMA holds a 16-row slice of the (64 rows x 64 columns) chunk, value pair e at row
// r0 + 8 (e % 2), columns c0 + 8 (e / 2) + {0, 1} (check_sm90_bwd_fragments checks both for every dQ MMA). Added in
// that order, one warp instruction touches eight rows with 32 bytes each; the warp instead stores its slice into its
// own shared staging rows (kDqStageStride floats apart: the pair stores and the row reads are bank-conflict free at 72)
// and reads it back as whole rows, so each 16-byte reduction instruction covers two full 256-byte rows (four
// 128-byte lines). Measured in one process on an H200: the backward 8-9% faster at head dim 128
// (64,1024,4,128: 607 against 658 us; 32,4096,4,128: 3580 against 3948), where its reductions cost 21-37%.
// kPasses = 2 stages 8 rows at a time (half the shared memory, for the head-dim-256 kernel).

// dst = the chunk's (row 0, column 0) in the workspace, valid = rows left in the sequence (rows < valid are added),
// stage = this warp's staging rows (kDqStageFloatsPerWarp<kPasses> floats).
template <int kPasses, typename Acc, typename Coords>
__device__ __forceinline__ void add_dq_slice(Acc const& acc, Coords const& coord, float* stage, float* dst,
                                             int64_t row_stride, int valid, int lane) {
  using namespace cute;
  static_assert(kPasses == 1 || kPasses == 2, "16 or 8 staged rows per pass");
  constexpr int kPassRows = 16 / kPasses;
  const int r0 = get<0>(coord(0));
  const int slice0 = r0 & ~15;
  float* const w0 = stage + (r0 - slice0) * kDqStageStride + get<1>(coord(0));
  const int r = lane >> 4, c = 4 * (lane & 15);  // two rows of 16 x 4 columns per instruction
  CUTE_UNROLL
  for (int pass = 0; pass < kPasses; ++pass) {
    for_each(make_int_sequence<decltype(size(acc))::value / 2>{}, [&](auto e_) {
      constexpr int e = decltype(e_)::value;
      if (kPasses == 1 || e % 2 == pass)
        *reinterpret_cast<float2*>(w0 + (kPasses == 1 ? (e % 2) * 8 * kDqStageStride : 0) + 8 * (e / 2)) =
            make_float2(acc(2 * e), acc(2 * e + 1));
    });
    __syncwarp();
    const int first = slice0 + pass * kPassRows;
    float* g = dst + static_cast<int64_t>(first + r) * row_stride + c;
    CUTE_UNROLL
    for (int i = 0; i < kPassRows / 2; ++i) {
      const float4 x = *reinterpret_cast<const float4*>(stage + (2 * i + r) * kDqStageStride + c);
      if (first + 2 * i + r < valid) red_add_v4_f32(g, x);
      g += 2 * row_stride;
    }
    __syncwarp();  // the staging rows are rewritten by the next pass or step
  }
}

// The shared tiles and global rows both sm90 backward kernels start from: K and V of the block's keys (resident), a
// kStages ring of Q / dO tiles, then whatever the kernel keeps after them (extra()). Each tile has a K-major view and
// an MN-major one (the same bytes: "seen MN-major" above).
// The constructor also takes the block's work item: key tile n0 = tile * BN of (sequence, head); base = the element
// offset of (first token of the sequence, this head) in q / k / v / dout and the gradients.
template <typename Tr>
struct BwdTiles {
  using T = typename Tr::T;
  using Element = typename Tr::Element;
  static constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, NT = Tr::kThreads;
  WorkItem w;
  int n0;
  int64_t base;
  T* k;
  const Element *gq, *gk, *gv, *gdo;
  int64_t row_stride;

  __device__ BwdTiles(unsigned char* smem, const AttnParams& p)
      : w(schedule_grouped_block(p, (p.max_seqlen + BN - 1) / BN, /*reverse=*/false)),
        n0(w.tile * BN),
        base(static_cast<int64_t>(w.seq_start) * p.row_stride + static_cast<int64_t>(w.head) * D),
        k(reinterpret_cast<T*>(smem)),
        gq(reinterpret_cast<const Element*>(p.q) + base),
        gk(reinterpret_cast<const Element*>(p.k) + base),
        gv(reinterpret_cast<const Element*>(p.v) + base),
        gdo(reinterpret_cast<const Element*>(p.dout) + base),
        row_stride(p.row_stride) {}
  __device__ T* v() const { return k + Tr::kSizeK; }
  __device__ T* q(int stage) const { return k + 2 * Tr::kSizeK + stage * Tr::kSizeQ; }
  __device__ T* dout(int stage) const { return q(Tr::kStages) + stage * Tr::kSizeQ; }
  __device__ T* extra() const { return dout(Tr::kStages); }
  __device__ auto sK() const { return cute::make_tensor(cute::make_smem_ptr(k), typename Tr::SmemLayoutK{}); }
  __device__ auto sKt() const { return cute::make_tensor(cute::make_smem_ptr(k), typename Tr::SmemLayoutKt{}); }
  __device__ auto sV() const { return cute::make_tensor(cute::make_smem_ptr(v()), typename Tr::SmemLayoutK{}); }
  __device__ auto sQ(int st) const { return cute::make_tensor(cute::make_smem_ptr(q(st)), typename Tr::SmemLayoutQ{}); }
  __device__ auto sQt(int st) const {
    return cute::make_tensor(cute::make_smem_ptr(q(st)), typename Tr::SmemLayoutQt{});
  }
  __device__ auto sdO(int st) const {
    return cute::make_tensor(cute::make_smem_ptr(dout(st)), typename Tr::SmemLayoutQ{});
  }
  __device__ auto sdOt(int st) const {
    return cute::make_tensor(cute::make_smem_ptr(dout(st)), typename Tr::SmemLayoutQt{});
  }
  // K and V rows [n0, n0 + BN), zero past the sequence end (L tokens)
  __device__ void load_kv(int n0, int L, int tid) const {
    load_rows_async<BN, D, NT, false>(sK(), gk + n0 * row_stride, row_stride, L - n0, tid);
    load_rows_async<BN, D, NT, false>(sV(), gv + n0 * row_stride, row_stride, L - n0, tid);
  }
  // Q and dO rows of query tile m into a ring stage
  __device__ void load_qdo(int m, int stage, int L, int tid) const {
    load_rows_async<BM, D, NT, false>(sQ(stage), gq + m * BM * row_stride, row_stride, L - m * BM, tid);
    load_rows_async<BM, D, NT, false>(sdO(stage), gdo + m * BM * row_stride, row_stride, L - m * BM, tid);
  }
  // The step loop's query tiles: the next one after m that sees this key tile (query_tiles() when none is left).
  __device__ int query_tiles() const { return (w.mask.L + BM - 1) / BM; }
  __device__ int next_query_tile(int m) const { return w.mask.next_query_tile(m, query_tiles(), BM, n0, n0 + BN); }
  // Pipeline prologue: K, V and the first visible Q / dO tile (into stage 0) as one commit group; returns that tile.
  // Rows before the key tile see none of it under a causal mask without contexts.
  __device__ int start_loads(int tid) const {
    const SeqMask& mk = w.mask;
    const int m = next_query_tile(((mk.causal && mk.c == 0) ? n0 / BM : 0) - 1);
    load_kv(n0, mk.L, tid);
    if (m < query_tiles()) load_qdo(m, 0, mk.L, tid);
    cp_async_commit();
    return m;
  }
};

#endif  // HSTU_SM90_DEVICE

}  // namespace sm90
}  // namespace hstu
