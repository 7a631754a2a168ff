// Mainloop pieces of the Hopper (sm_90a) backward: the block's shared tiles, loads and query-tile walk (BwdTiles:
// K / V resident, a cp.async ring of Q / dO tiles, zero-filled past the sequence end, and the non-finite scans of
// the steps' tiles: publish_step), the scores recomputed where a scan zeroed an operand entry
// (recompute_nonfinite_scores), dS^T selected by the mask (select_ds) and the per-step dq reductions into the float32
// workspace (add_dq_slice). The GEMMs and the pointwise stage of a step are in the kernels (bwd_kernel_sm90.h); the
// pointwise math itself in pointwise.h.
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

// Non-finite operand entries (sm90_common.h). The products over a step's queries and the block's keys multiply the
// entries the mask hides by exact zeros: dV = P^T dO (P = 0), dK = dS^T Q and dQ = dS K (dS = 0, selected: dP may be
// non-finite where hidden). On steps whose tile hides entries (tile_hides_entries) publish_step zeroes the non-finite
// entries of the Q and dO tiles, and at the block's first such step those of the resident K tile (zeroed from then
// on), one flag per row. A zeroed Q or K row changes S^T, a zeroed dO row dP^T: those scores are recomputed where
// visible (recompute_nonfinite_scores, from the original rows). No term needs adding back to dK or dQ: a visible
// score reading a non-finite Q or K entry is itself non-finite, so its dS is NaN (SiLU' of +-inf or NaN is NaN) and
// dS^T Q, dS K are NaN in every column of that key / query row, zeroed entries or not. dV's terms from zeroed dO
// entries are added back (P is finite there).
struct BwdNonfinite {
  bool k_scanned = false;  // the K tile has been scanned (and its non-finite entries zeroed)
  bool k_any = false;      // ... and held a non-finite entry: scores of flagged keys are recomputed in every step
  bool qdo_any = false;    // this step's scan found a non-finite entry (its Q / dO flags are valid)
};

// Scores of acc (S^T or dP^T: (key, query) coordinates c relative to (k0, q0)) whose query row (q_flags) or key row
// (k_flags; nullptr: none) had entries zeroed, where query q0 + q sees key k0 + key: the exact value from the original
// rows ga + q * stride (queries) and gb + key * stride (keys). Off the fast path.
template <int kD, typename Element, typename Frag, typename Coords>
__device__ __forceinline__ void recompute_nonfinite_scores(Frag& acc, Coords const& c, const SeqMask& mk, int q0,
                                                           int k0, const uint8_t* q_flags, const uint8_t* k_flags,
                                                           const Element* ga, const Element* gb, int64_t stride) {
  using namespace cute;
  CUTE_UNROLL
  for (int e = 0; e < size(acc); ++e) {
    const int key = get<0>(c(e)), q = get<1>(c(e));
    const bool zeroed = (q_flags != nullptr && q_flags[q]) || (k_flags != nullptr && k_flags[key]);
    if (zeroed && mk.visible(q0 + q, k0 + key)) acc(e) = nonfinite_terms<kD>(ga + q * stride, gb + key * stride);
  }
}

// dS^T value e of a step, dP^T SiLU'(x) (dp(e) g(e)), selected as the pointwise stage's P half selects P (the same
// with_tile_mask tag): where query q0 + q sees key k0 + key (coordinates c(e) = (key, query)), else 0. A product
// would not do: dP^T may be non-finite where hidden.
template <typename MaskTag, typename Coords, typename FragDP, typename FragG>
__device__ __forceinline__ float select_ds(MaskTag, const SeqMask& mk, int q0, int k0, Coords const& c,
                                           FragDP const& dp, FragG const& g, int e) {
  using namespace cute;
  constexpr TileMask kMask = MaskTag::value;
  const float ds = dp(e) * g(e);
  if constexpr (kMask == TileMask::kNone) {
    return ds;
  } else {
    const int i = q0 + get<1>(c(e)), j = k0 + get<0>(c(e));
    const bool vis = kMask == TileMask::kCausal ? j <= i : mk.visible(i, j);
    return vis ? ds : 0.f;
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
  // Row flags of the non-finite scans: the K tile's, the Q and dO tiles' of a ring stage.
  __device__ uint8_t* k_flags() const { return reinterpret_cast<uint8_t*>(k) + Tr::kFlagsOffset; }
  __device__ uint8_t* q_flags(int stage) const { return k_flags() + BN + stage * 2 * BM; }
  __device__ uint8_t* do_flags(int stage) const { return q_flags(stage) + BM; }
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
  // The top of the step over query tile m (ring stage `stage`): waits for this thread's copies (that tile, at the
  // first step also K and V) and publishes them to the async proxy and the block. A tile that hides entries from the
  // block's keys first has the non-finite entries of this thread's chunks of Q and dO zeroed and their rows flagged,
  // and at the block's first such step also those of K; the barrier then tells every thread whether any was found.
  __device__ void publish_step(int m, int stage, BwdNonfinite& nf, int tid) const {
    const int m0 = m * BM;
    if (!tile_hides_entries(w.mask, m0, m0 + BM, n0, n0 + BN)) {
      publish_copies_to_block();
      nf.qdo_any = false;
      return;
    }
    cp_async_wait_all();
    const bool scan_k = !nf.k_scanned;
    bool found = false;
    if (scan_k) found = zero_nonfinite_chunks<BN, D, NT, Element>(k, k_flags(), tid);
    found |= zero_nonfinite_chunks<BM, D, NT, Element>(q(stage), q_flags(stage), tid);
    found |= zero_nonfinite_chunks<BM, D, NT, Element>(dout(stage), do_flags(stage), tid);
    fence_proxy_async_smem();
    nf.qdo_any = __syncthreads_or(found);
    if (scan_k) nf.k_any = nf.qdo_any && any_flag<BN>(k_flags());
    nf.k_scanned = true;
  }
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
