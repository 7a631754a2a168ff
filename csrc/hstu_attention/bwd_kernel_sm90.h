// Hopper (sm_90a) backward, atomic-dq path only: the math, scales, masks and query-tile walk of bwd_kernel.h's
// dk/dv kernel (kPassBoth, kAtomicDq, no dropout, no drab), with every GEMM on warpgroup MMAs (wgmma, through CuTe's
// SM90 GMMA atoms). The default on sm_90 (HSTU_SM90_BWD=0 opts out, launch.h); GPU-verified on an H200 (v9).
//
// Block = 2 consumer warpgroups (256 threads) owning a key tile of BN = 128 keys, 64 per warpgroup (one wgmma M).
// K and V are resident in shared memory; the block walks the query tiles (BM = 64 rows) that can see its keys with
// mask.h's next_query_tile (the sm80 dk/dv walk), streaming Q / dO through a 2-slot cp.async ring (zero-fill past the
// sequence end). Per query tile, per warpgroup (its 64 keys):
//   S^T  = K Q^T       SS-wgmma  A = K (K-major), B = Q (K-major)              64 x BM, k = D
//   dP^T = V dO^T      SS-wgmma  A = V (K-major), B = dO (K-major)             64 x BM, k = D
//   pointwise on the fp32 accumulators: x = alpha (s + rab), P^T = SiLU(x), dS^T = dP^T SiLU'(x), both masked
//   dV  += P^T dO      RS-wgmma  A = P^T from registers, B = dO seen MN-major   64 x D,  k = BM
//   dK  += dS^T Q      RS-wgmma  A = dS^T from registers, B = Q seen MN-major   64 x D,  k = BM
//   dS^T -> the block's swizzled (queries x 128 keys) shared tile (read back as the MN-major A operand dS)
//   dQ = dS K          SS-wgmma  A = dS (MN-major), B = K seen MN-major          BM x 64 per chunk, k = 128 keys
//       after a block barrier, warpgroup w takes the 64-column chunks ch = w (mod 2); each chunk is added into
//       p.dq_accum with 16-byte fp32 reductions of whole rows (rows < L), staged per warp (add_dq_slice).
// v9/v10 formed dQ per warpgroup over its own 64 keys (split-K, no block barrier): twice the reductions. The
// reductions kept L2 66% busy (ncu, 32,4096,4,128), so v11 sums over the whole key tile first.
// "Seen MN-major": a K-major 128B-swizzled (rows, D) tile tiled rows-first holds exactly the bytes of the MN-major
// (D, rows) tile tiled K-first (check_sm90_bwd_smem checks the identity), so Q, dO and K each live once in shared
// memory and get two CuTe views.
// Epilogue: dV * (1 / N), dK * (alpha / N) from the accumulators, rows (keys) < L; the launcher then runs the usual
// hstu_dq_convert_kernel (dq = alpha / N * workspace).
// Overlap inside a warpgroup (v10): S^T and dP^T are issued together; the P half of the pointwise stage runs while
// dP^T computes and the dS half while dV computes; dK is issued before the block barrier that precedes dQ.
// Device code exists only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); compiled for any other target the kernel traps.
#pragma once

#include <cstdio>
#include <stdexcept>
#include <type_traits>
#include <string>
#include <vector>

#include "bwd_kernel.h"  // silu_grad (the same pointwise math as the sm80 backward)
#include "bwd_sm90_api.h"
#include "hstu.h"
#include "kernel_attributes.h"
#include "mask.h"
#include "sm90_common.h"
#include "tile_scheduler.h"
#include "utils.h"

namespace hstu {
namespace sm90 {

// Shared staging of the dQ reductions (add_dq_slice): per warp 16 / kPasses rows of 64 floats, kDqStageStride apart.
inline constexpr int kDqStageStride = 72;
template <int kPasses>
inline constexpr int kDqStageFloatsPerWarp = 16 / kPasses * kDqStageStride;

template <typename Element_, int kHeadDim_, bool kHasRab_>
struct BwdTraitsSm90 {
  using Element = Element_;
  using T = typename CuteElement<Element>::type;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kHasRab = kHasRab_;
  static constexpr int kWarpGroups = 2;
  static constexpr int kThreads = 128 * kWarpGroups;
  static constexpr int kBlockN = 64 * kWarpGroups;  // keys per block, 64 per warpgroup
  static_assert(kBlockN == kSm90BwdBlockN<kHeadDim_>, "launch.h counts the backward's tiles with kSm90BwdBlockN");
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

  // Shared tiles (128B swizzle). K, V: (BN, D) K-major, atoms tiled rows first; Kt: the same bytes as the MN-major
  // (D, BN) B operand of dS K (atoms tiled along keys first). Q, dO: (BM, D) K-major; Qt / dOt: the same bytes as the
  // MN-major (D, BM) B operands of dS^T Q / P^T dO. dS: (BM queries, 64 keys) MN-major, one per warpgroup.
  using SmemLayoutK = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_K_SW128_Atom<T>{}, cute::Shape<BN, HD>{}));
  using SmemLayoutKt = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_MN_SW128_Atom<T>{},
                                                    cute::Shape<HD, BN>{}, cute::Step<cute::_2, cute::_1>{}));
  using SmemLayoutQ = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_K_SW128_Atom<T>{}, cute::Shape<BM, HD>{}));
  using SmemLayoutQt = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_MN_SW128_Atom<T>{},
                                                    cute::Shape<HD, BM>{}, cute::Step<cute::_2, cute::_1>{}));
  using SmemLayoutDS = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_MN_SW128_Atom<T>{},
                                                    cute::Shape<BM, BN>{}));
  static constexpr int kSizeK = cute::cosize_v<SmemLayoutK>;
  static constexpr int kSizeQ = cute::cosize_v<SmemLayoutQ>;
  static constexpr int kSizeDS = cute::cosize_v<SmemLayoutDS>;
  static_assert(kSizeK == kBlockN * kHeadDim && kSizeQ == kBlockM * kHeadDim && kSizeDS == kBlockM * kBlockN,
                "compact shared tiles");
  static_assert(cute::cosize_v<SmemLayoutKt> == kSizeK && cute::cosize_v<SmemLayoutQt> == kSizeQ, "same bytes");
  static_assert((kSizeK * 2) % 1024 == 0 && (kSizeQ * 2) % 1024 == 0 && (kSizeDS * 2) % 1024 == 0,
                "1024-byte aligned tiles");
  // K, V, kStages x (Q, dO), the block's dS tile, then the warps' dQ staging rows (add_dq_slice, 16 rows each):
  // 108 KB (D 64), 180 KB (D 128).
  static constexpr int kDqStagePasses = 1;
  static constexpr int kSmemBytes = (2 * kSizeK + 2 * kStages * kSizeQ + kSizeDS) * 2 +
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

// One element of the pointwise stage (bwd_kernel.h's math, no dropout) for query i, key j: x = alpha (s + rab);
// returns P = SiLU(x) and overwrites s with SiLU'(x), both zero where the mask hides (i, j).
template <typename Element, TileMask kMask, bool kHasRab>
__device__ __forceinline__ float silu_and_grad(const AttnParams& p, const SeqMask& mk, int b, int hr, int i, int j,
                                               float& s) {
  float x = s;
  if constexpr (kHasRab) {
    if (kMask != TileMask::kExact || (i < mk.L && j < mk.L)) x += rab_value<Element>(p, b, hr, i, j);
  }
  x *= p.alpha;
  const float sig = sigmoid_t<Element>(x);
  const bool vis = kMask == TileMask::kNone || (kMask == TileMask::kCausal ? j <= i : mk.visible(i, j));
  s = vis ? silu_grad(x, sig) : 0.f;
  return vis ? x * sig : 0.f;
}

#if defined(HSTU_SM90_DEVICE)
// dQ reductions: each warp of a dQ MMA holds a 16-row slice of the (64 rows x 64 columns) chunk, value pair e at row
// r0 + 8 (e % 2), columns c0 + 8 (e / 2) + {0, 1} (check_sm90_bwd_fragments checks both for every dQ MMA). Added in
// that order, one warp instruction touches eight rows with 32 bytes each; the warp instead stores its slice into its
// own shared staging rows (kDqStageStride floats apart: the pair stores and the row reads are bank-conflict free at 72)
// and reads it back as whole rows, so each 16-byte reduction instruction covers two full 256-byte rows (four
// 128-byte lines). Measured in one process on an H200 (session 10): the backward 8-9% faster at head dim 128
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
  // Epilogue: dV / N and dK alpha / N (the sm80 kernel's scales without dropout), keys of this sequence only (the
  // rows after it belong to the next one). Staged through the K and V tiles, free once every warpgroup's GEMMs have
  // retired (the first barrier): the accumulator pairs (adjacent columns, checked on the host) go there with each
  // row's 16-byte chunks XOR-permuted by row % 8 (conflict-free for the pair stores, which cover 8 consecutive rows,
  // and for the chunk reads), then leave as coalesced 16-byte stores of whole rows. One 4-byte global store per pair
  // took ~6 us per block (14% of the backward's samples at 64,1024,4,128). col0: the accumulators' first column.
  template <typename Acc, typename Coords>
  __device__ void store_dk_dv(const AttnParams& p, Acc const& dk, Acc const& dv, Coords const& coord, int col0,
                              int tid) const {
    using namespace cute;
    static_assert(D % 64 == 0, "the staging swizzle permutes groups of 8 chunks");
    __syncthreads();
    uint32_t* const stage_k = reinterpret_cast<uint32_t*>(k);
    uint32_t* const stage_v = reinterpret_cast<uint32_t*>(v());
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
    const int chunks = min(BN, w.mask.L - n0) * kChunks;
    Element* const gdk = reinterpret_cast<Element*>(p.dk) + base + static_cast<int64_t>(n0) * row_stride;
    Element* const gdv = reinterpret_cast<Element*>(p.dv) + base + static_cast<int64_t>(n0) * row_stride;
    for (int i = tid; i < chunks; i += NT) {
      const int r = i / kChunks, ch = i % kChunks;
      const int src = r * D + ((ch ^ (r & 7)) << 3);
      const int64_t dst = static_cast<int64_t>(r) * row_stride + ch * 8;
      *reinterpret_cast<uint4*>(gdk + dst) = *reinterpret_cast<const uint4*>(k + src);
      *reinterpret_cast<uint4*>(gdv + dst) = *reinterpret_cast<const uint4*>(v() + src);
    }
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

// The A operand of dV = P^T dO / dK = dS^T Q (registers) enumerates the same (key, query) elements in the same
// order as the accumulator of S^T / dP^T (the forward's P trick, transposed problem); checked on the host.
template <typename Tr>
using KVOperandShape =
    decltype(cute::partition_shape_A(typename Tr::MmaKV{}, cute::Shape<typename Tr::BN, typename Tr::BM>{}));

template <typename Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) hstu_bwd_sm90_kernel(const AttnParams p) {
#if defined(HSTU_SM90_DEVICE)
  using namespace cute;
  using Element = typename Tr::Element;
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // The 128B-swizzled GMMA tiles need a 1024-byte aligned base (no static shared memory in this kernel).
  if ((cast_smem_ptr_to_uint(smem_raw) & 1023u) != 0) __trap();
  const BwdTiles<Tr> tiles(smem_raw, p);
  const WorkItem& w = tiles.w;
  const SeqMask& mk = w.mask;
  const int n0 = tiles.n0;
  const int64_t base = tiles.base;
  if (n0 >= mk.L) return;  // whole block uniform: no barrier or warpgroup op is skipped by part of it
  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int wtid = tid % 128;
  T* const pdS = tiles.extra();  // the dS tile

  Tensor sdS = make_tensor(make_smem_ptr(pdS), typename Tr::SmemLayoutDS{});  // (query, key); stores: ds_offset

  const int m_tiles = tiles.query_tiles();

  typename Tr::MmaSdP mma_s;
  typename Tr::MmaKV mma_kv;
  typename Tr::MmaDQ mma_dq;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_kv = mma_kv.get_thread_slice(tid);
  auto thr_dq = mma_dq.get_thread_slice(wtid);

  Tensor tSrK = thr_s.partition_fragment_A(tiles.sK());  // descriptors of this warpgroup's 64 keys of K
  Tensor tSrV = thr_s.partition_fragment_A(tiles.sV());
  Tensor tSrS = partition_fragment_C(mma_s, Shape<typename Tr::BN, typename Tr::BM>{});   // S^T, then P^T
  Tensor tSrdP = partition_fragment_C(mma_s, Shape<typename Tr::BN, typename Tr::BM>{});  // dP^T, then dS^T
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<typename Tr::BN, typename Tr::BM>{}));  // (key, query)
  Tensor tKVrdV = partition_fragment_C(mma_kv, Shape<typename Tr::BN, typename Tr::HD>{});
  Tensor tKVrdK = partition_fragment_C(mma_kv, Shape<typename Tr::BN, typename Tr::HD>{});
  Tensor tKVcKV = thr_kv.partition_C(make_identity_tensor(Shape<typename Tr::BN, typename Tr::HD>{}));
  Tensor tKVrP = make_tensor<T>(KVOperandShape<Tr>{});
  Tensor tKVrdS = make_tensor<T>(KVOperandShape<Tr>{});
  Tensor tDQrdS = thr_dq.partition_fragment_A(sdS);  // descriptors of the block's dS tile (all 128 keys)
  Tensor tDQrdQ = partition_fragment_C(mma_dq, Shape<typename Tr::BM, typename Tr::DQC>{});
  Tensor tDQcdQ = thr_dq.partition_C(make_identity_tensor(Shape<typename Tr::BM, typename Tr::DQC>{}));
  static_assert(decltype(size(tSrS))::value == decltype(size(tKVrP))::value, "P^T fragment = S^T fragment");
  static_assert(decltype(size(tScS))::value == decltype(size(tSrS))::value, "S^T coordinates");
  static_assert(decltype(size(tKVcKV))::value == decltype(size(tKVrdV))::value, "dK/dV coordinates");
  static_assert(decltype(size(tDQcdQ))::value == decltype(size(tDQrdQ))::value, "dQ coordinates");
  static_assert(decltype(size(tSrS))::value % 2 == 0 && decltype(size(tDQrdQ))::value % 2 == 0, "pairs");
  clear(tKVrdV);
  clear(tKVrdK);

  // Pipeline (as the forward's K/V ring): K, V and the first visible Q/dO tile form one commit group; iteration `it`
  // waits for everything it issued (its own tile), publishes it to the async proxy and the block, then requests the
  // next visible tile into the other slot (last read by iteration it - 1, whose wgmmas every thread has waited for
  // before this barrier; the same barrier keeps iteration it's dS^T stores behind iteration it - 1's dQ GEMMs).
  // (Issued before this step's GEMMs: between them and their wait the copies' registers would force the compiler
  // to retire the GEMMs early, C7517, or spill.)
  int m = tiles.start_loads(tid);

  const int hr = (Tr::kHasRab && p.rab_heads == 1) ? 0 : w.head;
  const int wn0 = n0 + 64 * wg;  // first key of this warpgroup
  float* const gAcc = p.dq_accum + base;
  float* const dq_stage =
      reinterpret_cast<float*>(pdS + Tr::kSizeDS) + (tid / 32) * kDqStageFloatsPerWarp<Tr::kDqStagePasses>;
  int stage = 0;
  while (m < m_tiles) {
    publish_copies_to_block();
    const int m_next = tiles.next_query_tile(m);
    if (m_next < m_tiles) tiles.load_qdo(m_next, stage ^ 1, mk.L, tid);
    cp_async_commit();

    // S^T and dP^T as two wgmma batches; each pointwise half starts as soon as its inputs have retired, while the
    // tensor cores run the next GEMM (dP^T under the P half, dV under the dS half).
    Tensor tSrQ = thr_s.partition_fragment_B(tiles.sQ(stage));
    Tensor tSrdO = thr_s.partition_fragment_B(tiles.sdO(stage));
    wg_gemm_issue</*kZeroInit=*/true, /*kARegs=*/false>(mma_s, tSrK, tSrQ, tSrS);
    wg_gemm_issue</*kZeroInit=*/true, /*kARegs=*/false>(mma_s, tSrV, tSrdO, tSrdP);
    wg_wait<1>(tSrS);

    const int m0 = m * BM;
    // P half of bwd_kernel.h's pointwise stage (no dropout): P^T = SiLU(x) with x = alpha (s + rab), packed in q's
    // dtype into the A operand of dV (identical linear order: see KVOperandShape); S^T's registers keep SiLU'(x),
    // zero where masked, for the dS half. with_tile_mask: tiles wholly visible for this warpgroup's keys skip every
    // mask / bounds test.
    auto pointwise_p = [&](auto mask_tag) {
      constexpr TileMask kMask = decltype(mask_tag)::value;
      Tensor tKVrP32 = recast<uint32_t>(tKVrP);
      CUTE_UNROLL
      for (int e2 = 0; e2 < size(tKVrP32); ++e2) {
        float pv[2];
        CUTE_UNROLL
        for (int h = 0; h < 2; ++h) {
          const int e = 2 * e2 + h;
          pv[h] = silu_and_grad<Element, kMask, Tr::kHasRab>(p, mk, w.batch, hr, m0 + get<1>(tScS(e)),
                                                                n0 + get<0>(tScS(e)), tSrS(e));
        }
        tKVrP32(e2) = pack2<Element>(pv[0], pv[1]);
      }
    };
    constexpr bool kCausalPath = true, kZeroOutside = !Tr::kHasRab;  // zero-filled rows past the end: P = dS = 0
    with_tile_mask<kCausalPath, kZeroOutside>(mk, m0, m0 + BM, wn0, wn0 + 64, pointwise_p);

    Tensor tKVrdO = thr_kv.partition_fragment_B(tiles.sdOt(stage));
    wg_gemm_issue</*kZeroInit=*/false, /*kARegs=*/true>(mma_kv, tKVrP, tKVrdO, tKVrdV);
    wg_wait<1>(tSrdP);

    // dS half: dS^T = dP^T SiLU'(x) (zero where masked), in q's dtype as the A operand of dK and, values 2e, 2e + 1
    // being queries i, i + 1 (i even) of one key, into this warpgroup's shared tile as one 4-byte store per pair (the
    // two queries are adjacent there; check_sm90_bwd_smem).
    {
      Tensor tKVrdS32 = recast<uint32_t>(tKVrdS);
      CUTE_UNROLL
      for (int e = 0; e < size(tKVrdS32); ++e) {
        const uint32_t ds2 = pack2<Element>(tSrdP(2 * e) * tSrS(2 * e), tSrdP(2 * e + 1) * tSrS(2 * e + 1));
        tKVrdS32(e) = ds2;
        *reinterpret_cast<uint32_t*>(pdS + ds_offset(get<1>(tScS(2 * e)), get<0>(tScS(2 * e)))) = ds2;
      }
    }
    fence_proxy_async_smem();  // the dS^T stores (generic proxy) before the dQ wgmma (async proxy) reads them

    // dQ = dS K over all 128 keys of the block: both warpgroups' dS^T halves must be in place (each thread stored and
    // fenced its part). Warpgroup w takes the 64-column chunk ch = w (at head dim 64 warpgroup 0 takes the only one):
    // one reduction per dq element and key block, half of what per-warpgroup partial sums would add. The chunk's GEMM
    // goes out before dK's, so its reductions run on the CUDA cores while the tensor cores compute dK.
    __syncthreads();
    auto issue_dk = [&] {
      Tensor tKVrQ = thr_kv.partition_fragment_B(tiles.sQt(stage));
      wg_gemm_issue</*kZeroInit=*/false, /*kARegs=*/true>(mma_kv, tKVrdS, tKVrQ, tKVrdK);
    };
    constexpr bool kEveryWgHasDqChunk = D / Tr::kDqChunk == Tr::kWarpGroups;
    if (kEveryWgHasDqChunk || wg < D / Tr::kDqChunk) {
      Tensor tDQrK = thr_dq.partition_fragment_B(local_tile(tiles.sKt(), Shape<typename Tr::DQC, typename Tr::BN>{},
                                                            make_coord(wg, 0)));  // (chunk columns, keys)
      wg_gemm_issue</*kZeroInit=*/true, /*kARegs=*/false>(mma_dq, tDQrdS, tDQrK, tDQrdQ);
      issue_dk();
      wg_wait<1>(tDQrdQ);
      add_dq_slice<Tr::kDqStagePasses>(tDQrdQ, tDQcdQ, dq_stage,
                                       gAcc + static_cast<int64_t>(m0) * p.row_stride + wg * Tr::kDqChunk,
                                       p.row_stride, mk.L - m0, tid % 32);
    } else {
      issue_dk();
    }
    wg_wait<0>(tKVrdV, tKVrdK, tKVrP, tKVrdS);  // dV / dK retired before the next step rewrites their A operands

    m = m_next;
    stage ^= 1;
  }
  cp_async_wait_all();

  tiles.store_dk_dv(p, tKVrdK, tKVrdV, tKVcKV, 0, tid);
#else
  // Not an sm_90a target: the launcher never selects this kernel there.
  __trap();
#endif
}

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
struct BwdTraitsSm90Split {
  using Element = Element_;
  using T = typename CuteElement<Element>::type;
  static constexpr int kHeadDim = 256;
  static constexpr bool kHasRab = kHasRab_;
  static constexpr int kWarpGroups = 2;
  static constexpr int kThreads = 128 * kWarpGroups;
  static constexpr int kBlockN = 64;   // keys per block
  static_assert(kBlockN == kSm90BwdBlockN<256>, "launch.h counts the backward's tiles with kSm90BwdBlockN");
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

  using SmemLayoutK = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_K_SW128_Atom<T>{}, cute::Shape<BN, HD>{}));
  using SmemLayoutKt = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_MN_SW128_Atom<T>{},
                                                    cute::Shape<HD, BN>{}, cute::Step<cute::_2, cute::_1>{}));
  using SmemLayoutQ = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_K_SW128_Atom<T>{}, cute::Shape<BM, HD>{}));
  using SmemLayoutQt = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_MN_SW128_Atom<T>{},
                                                    cute::Shape<HD, BM>{}, cute::Step<cute::_2, cute::_1>{}));
  // P^T / dS^T: (keys, queries), queries contiguous; SmemLayoutDS: the same bytes seen as dS (queries, keys).
  using SmemLayoutPt = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_K_SW128_Atom<T>{}, cute::Shape<BN, BM>{}));
  using SmemLayoutDS = decltype(cute::tile_to_shape(cute::SM90::GMMA::Layout_MN_SW128_Atom<T>{},
                                                    cute::Shape<BM, BN>{}));
  static constexpr int kSizeK = cute::cosize_v<SmemLayoutK>;
  static constexpr int kSizeQ = cute::cosize_v<SmemLayoutQ>;
  static constexpr int kSizeP = cute::cosize_v<SmemLayoutPt>;
  static_assert(kSizeK == kBlockN * kHeadDim && kSizeQ == kBlockM * kHeadDim && kSizeP == kBlockN * kBlockM,
                "compact shared tiles");
  static_assert(cute::cosize_v<SmemLayoutKt> == kSizeK && cute::cosize_v<SmemLayoutQt> == kSizeQ &&
                    cute::cosize_v<SmemLayoutDS> == kSizeP,
                "same bytes");
  static_assert(kBlockM == 64 && kBlockN == 64, "ds_offset: 64 x 64 tiles");
  // K, V, 2 x (Q, dO), P^T, dS^T (208 KB), then the warps' dQ staging rows (add_dq_slice, 8 rows each: 18 KB).
  static constexpr int kDqStagePasses = 2;
  static constexpr int kSmemBytes = (2 * kSizeK + 2 * kStages * kSizeQ + 2 * kSizeP) * 2 +
                                    kDqStageFloatsPerWarp<kDqStagePasses> * 4 * (kThreads / 32);
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block on sm_90");
};

template <typename Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) hstu_bwd_sm90_split_kernel(const AttnParams p) {
#if defined(HSTU_SM90_DEVICE)
  using namespace cute;
  using Element = typename Tr::Element;
  using T = typename Tr::T;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // The 128B-swizzled GMMA tiles need a 1024-byte aligned base (no static shared memory in this kernel).
  if ((cast_smem_ptr_to_uint(smem_raw) & 1023u) != 0) __trap();
  const BwdTiles<Tr> tiles(smem_raw, p);
  const WorkItem& w = tiles.w;
  const SeqMask& mk = w.mask;
  const int n0 = tiles.n0;
  const int64_t base = tiles.base;
  if (n0 >= mk.L) return;  // whole block uniform: no barrier or warpgroup op is skipped by part of it
  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int wtid = tid % 128;
  T* const pPt = tiles.extra();  // P^T
  T* const pdSt = pPt + Tr::kSizeP;  // dS^T

  Tensor sPt = make_tensor(make_smem_ptr(pPt), typename Tr::SmemLayoutPt{});
  Tensor sdSt = make_tensor(make_smem_ptr(pdSt), typename Tr::SmemLayoutPt{});
  Tensor sdS = make_tensor(make_smem_ptr(pdSt), typename Tr::SmemLayoutDS{});

  const int m_tiles = tiles.query_tiles();

  typename Tr::MmaSdP mma_s;
  typename Tr::MmaKV mma_kv;
  typename Tr::MmaDQ mma_dq;
  auto thr_s = mma_s.get_thread_slice(wtid);
  auto thr_kv = mma_kv.get_thread_slice(wtid);
  auto thr_dq = mma_dq.get_thread_slice(wtid);

  Tensor tSrK = thr_s.partition_fragment_A(tiles.sK());
  Tensor tSrV = thr_s.partition_fragment_A(tiles.sV());
  Tensor tSrS = partition_fragment_C(mma_s, Shape<typename Tr::BN, typename Tr::HM>{});   // S^T, then SiLU'
  Tensor tSrdP = partition_fragment_C(mma_s, Shape<typename Tr::BN, typename Tr::HM>{});  // dP^T
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<typename Tr::BN, typename Tr::HM>{}));  // (key, query)
  Tensor tKVrdV = partition_fragment_C(mma_kv, Shape<typename Tr::BN, typename Tr::HH>{});
  Tensor tKVrdK = partition_fragment_C(mma_kv, Shape<typename Tr::BN, typename Tr::HH>{});
  Tensor tKVcKV = thr_kv.partition_C(make_identity_tensor(Shape<typename Tr::BN, typename Tr::HH>{}));
  Tensor tKVrPt = thr_kv.partition_fragment_A(sPt);
  Tensor tKVrdSt = thr_kv.partition_fragment_A(sdSt);
  Tensor tDQrdS = thr_dq.partition_fragment_A(sdS);
  Tensor tDQrdQ = partition_fragment_C(mma_dq, Shape<typename Tr::BM, typename Tr::DQC>{});
  Tensor tDQcdQ = thr_dq.partition_C(make_identity_tensor(Shape<typename Tr::BM, typename Tr::DQC>{}));
  static_assert(decltype(size(tScS))::value == decltype(size(tSrS))::value, "S^T coordinates");
  static_assert(decltype(size(tSrS))::value % 2 == 0 && decltype(size(tDQrdQ))::value % 2 == 0, "pairs");
  clear(tKVrdV);
  clear(tKVrdK);

  // Pipeline as hstu_bwd_sm90_kernel's; the barrier at the top of a step also protects the P^T / dS^T tiles, read
  // by the previous step's stage-2 GEMMs (retired by every warpgroup before it).
  int m = tiles.start_loads(tid);

  const int hr = (Tr::kHasRab && p.rab_heads == 1) ? 0 : w.head;
  const int wq = Tr::kHalfM * wg;  // this warpgroup's first query (stage 1), relative to the step
  float* const gAcc = p.dq_accum + base + Tr::kHalfD * wg;  // this warpgroup's dQ columns (stage 2)
  float* const dq_stage =
      reinterpret_cast<float*>(pdSt + Tr::kSizeP) + (tid / 32) * kDqStageFloatsPerWarp<Tr::kDqStagePasses>;
  int stage = 0;
  while (m < m_tiles) {
    publish_copies_to_block();
    const int m_next = tiles.next_query_tile(m);
    if (m_next < m_tiles) tiles.load_qdo(m_next, stage ^ 1, mk.L, tid);
    cp_async_commit();

    // Stage 1: S^T and dP^T over this warpgroup's 32 queries; the P half of the pointwise stage runs under dP^T.
    Tensor tSrQ = thr_s.partition_fragment_B(local_tile(tiles.sQ(stage), Shape<typename Tr::HM, typename Tr::HD>{},
                                                        make_coord(wg, 0)));
    Tensor tSrdO = thr_s.partition_fragment_B(local_tile(tiles.sdO(stage), Shape<typename Tr::HM, typename Tr::HD>{},
                                                         make_coord(wg, 0)));
    wg_gemm_issue</*kZeroInit=*/true, /*kARegs=*/false>(mma_s, tSrK, tSrQ, tSrS);
    wg_gemm_issue</*kZeroInit=*/true, /*kARegs=*/false>(mma_s, tSrV, tSrdO, tSrdP);
    wg_wait<1>(tSrS);

    const int m0 = m * BM;
    // Values 2e, 2e + 1 are queries i, i + 1 (i even) of one key: one 4-byte store per pair (ds_offset).
    auto pointwise_p = [&](auto mask_tag) {
      constexpr TileMask kMask = decltype(mask_tag)::value;
      CUTE_UNROLL
      for (int e2 = 0; e2 < size(tSrS) / 2; ++e2) {
        float pv[2];
        CUTE_UNROLL
        for (int h = 0; h < 2; ++h) {
          const int e = 2 * e2 + h;
          pv[h] = silu_and_grad<Element, kMask, Tr::kHasRab>(p, mk, w.batch, hr, m0 + wq + get<1>(tScS(e)),
                                                                n0 + get<0>(tScS(e)), tSrS(e));
        }
        *reinterpret_cast<uint32_t*>(pPt + ds_offset(wq + get<1>(tScS(2 * e2)), get<0>(tScS(2 * e2)))) =
            pack2<Element>(pv[0], pv[1]);
      }
    };
    constexpr bool kCausalPath = true, kZeroOutside = !Tr::kHasRab;
    with_tile_mask<kCausalPath, kZeroOutside>(mk, m0 + wq, m0 + wq + Tr::kHalfM, n0, n0 + BN, pointwise_p);
    wg_wait<0>(tSrdP);
    CUTE_UNROLL
    for (int e = 0; e < size(tSrdP) / 2; ++e) {
      *reinterpret_cast<uint32_t*>(pdSt + ds_offset(wq + get<1>(tScS(2 * e)), get<0>(tScS(2 * e)))) =
          pack2<Element>(tSrdP(2 * e) * tSrS(2 * e), tSrdP(2 * e + 1) * tSrS(2 * e + 1));
    }
    fence_proxy_async_smem();  // the P^T / dS^T stores (generic proxy) before the stage-2 wgmmas (async proxy)
    __syncthreads();           // both warpgroups' halves of P^T and dS^T are in place

    // Stage 2: this warpgroup's 128 columns of dV, dK and dQ.
    Tensor tKVrdO = thr_kv.partition_fragment_B(local_tile(tiles.sdOt(stage), Shape<typename Tr::HH, typename Tr::BM>{},
                                                           make_coord(wg, 0)));
    Tensor tKVrQ = thr_kv.partition_fragment_B(local_tile(tiles.sQt(stage), Shape<typename Tr::HH, typename Tr::BM>{},
                                                          make_coord(wg, 0)));
    // The first dQ chunk's GEMM goes out before dV and dK, so its reductions run while the tensor cores compute them.
    const int valid = mk.L - m0;
    auto issue_dq_chunk = [&](int ch) {
      Tensor tDQrK = thr_dq.partition_fragment_B(local_tile(tiles.sKt(), Shape<typename Tr::DQC, typename Tr::BN>{},
                                                            make_coord(wg * (Tr::kHalfD / Tr::kDqChunk) + ch, 0)));
      wg_gemm_issue</*kZeroInit=*/true, /*kARegs=*/false>(mma_dq, tDQrdS, tDQrK, tDQrdQ);
    };
    auto add_chunk = [&](int ch) {
      add_dq_slice<Tr::kDqStagePasses>(tDQrdQ, tDQcdQ, dq_stage,
                                       gAcc + static_cast<int64_t>(m0) * p.row_stride + ch * Tr::kDqChunk,
                                       p.row_stride, valid, tid % 32);
    };
    static_assert(Tr::kHalfD / Tr::kDqChunk == 2, "two dQ chunks per warpgroup");
    issue_dq_chunk(0);
    wg_gemm_issue</*kZeroInit=*/false, /*kARegs=*/false>(mma_kv, tKVrPt, tKVrdO, tKVrdV);
    wg_gemm_issue</*kZeroInit=*/false, /*kARegs=*/false>(mma_kv, tKVrdSt, tKVrQ, tKVrdK);
    wg_wait<2>(tDQrdQ);
    add_chunk(0);
    issue_dq_chunk(1);
    wg_wait<0>(tDQrdQ, tKVrdV, tKVrdK);  // also retires dV / dK before the next step rewrites P^T / dS^T
    add_chunk(1);

    m = m_next;
    stage ^= 1;
  }
  cp_async_wait_all();

  // Epilogue: keys of this sequence only; this warpgroup's 128 columns. Scales as hstu_bwd_sm90_kernel.
  tiles.store_dk_dv(p, tKVrdK, tKVrdV, tKVcKV, Tr::kHalfD * wg, tid);
#else
  __trap();
#endif
}

// Host-side self-checks of the layout assumptions above (pure layout algebra, no GPU; .ci/compile_check.sh runs them
// for every instantiated shape). Each returns an empty string when it passes.
// (1) Fragments: the A operand of dV / dK enumerates the same (key, query) as the accumulator of S^T / dP^T; S^T
//     keys lie in the thread's warpgroup; accumulator values 2e, 2e + 1 are adjacent columns (even first) of one row
//     for S^T (the dS^T pair stores), dK / dV (epilogue; rows in the thread's warpgroup) and dQ (the reductions).
template <typename Tr>
inline std::string check_sm90_bwd_fragments() {
  using namespace cute;
  typename Tr::MmaSdP mma_s;
  typename Tr::MmaKV mma_kv;
  typename Tr::MmaDQ mma_dq;
  auto cS = make_identity_tensor(Shape<typename Tr::BN, typename Tr::BM>{});
  auto cKV = make_identity_tensor(Shape<typename Tr::BN, typename Tr::HD>{});
  auto cDQ = make_identity_tensor(Shape<typename Tr::BM, typename Tr::DQC>{});
  auto pairs_ok = [](auto const& frag, int& bad) {
    for (int e = 0; e + 1 < size(frag); e += 2) {
      if (get<0>(frag(e)) != get<0>(frag(e + 1)) || get<1>(frag(e)) + 1 != get<1>(frag(e + 1)) ||
          get<1>(frag(e)) % 2 != 0) {
        bad = e;
        return false;
      }
    }
    return true;
  };
  if (size(mma_dq) != 128) return "dQ MMA is not one warpgroup";
  for (int t = 0; t < Tr::kThreads; ++t) {
    auto thr_s = mma_s.get_thread_slice(t);
    auto thr_kv = mma_kv.get_thread_slice(t);
    auto tScS = thr_s.partition_C(cS);
    auto tKVcP = thr_kv.partition_A(cS);  // (key, query) of each P^T / dS^T operand value
    auto tKVcKV = thr_kv.partition_C(cKV);
    if (size(tScS) != size(tKVcP)) return "P^T/S^T fragment sizes differ";
    int bad = 0;
    for (int e = 0; e < size(tScS); ++e) {
      if (get<0>(tScS(e)) != get<0>(tKVcP(e)) || get<1>(tScS(e)) != get<1>(tKVcP(e)))
        return "P^T operand order != S^T accumulator order at thread " + std::to_string(t) + " value " +
               std::to_string(e);
      if (get<0>(tScS(e)) / 64 != t / 128) return "S^T key outside the thread's warpgroup";
    }
    if (!pairs_ok(tScS, bad)) return "S^T accumulator pair not adjacent at thread " + std::to_string(t);
    if (!pairs_ok(tKVcKV, bad)) return "dK/dV accumulator pair not adjacent at thread " + std::to_string(t);
    for (int e = 0; e < size(tKVcKV); ++e)
      if (get<0>(tKVcKV(e)) / 64 != t / 128) return "dK/dV row outside the thread's warpgroup";
    if (t < 128) {
      auto tDQcdQ = mma_dq.get_thread_slice(t).partition_C(cDQ);
      if (!pairs_ok(tDQcdQ, bad)) return "dQ accumulator pair not adjacent at thread " + std::to_string(t);
      if (get<0>(tDQcdQ(0)) / 16 != t / 32 || get<0>(tDQcdQ(0)) % 16 >= 8)  // add_dq_slice's 16-row slices
        return "dQ rows of thread " + std::to_string(t) + " outside its warp's 16-row slice";
      for (int e = 0; 2 * e < size(tDQcdQ); ++e)  // the reductions' addressing: two rows, 8-column steps
        if (get<0>(tDQcdQ(2 * e)) != get<0>(tDQcdQ(0)) + 8 * (e % 2) ||
            get<1>(tDQcdQ(2 * e)) != get<1>(tDQcdQ(0)) + 8 * (e / 2))
          return "dQ accumulator pair " + std::to_string(e) + " not at (r0 + 8 (e % 2), c0 + 8 (e / 2)), thread " +
                 std::to_string(t);
    }
  }
  return "";
}

// Whether layout B addresses element (c, r) exactly where layout A addresses (r, c), for every r < rows, c < cols (on
// a 1024-byte aligned base, as the kernels' shared tiles).
template <typename LayoutA, typename LayoutB, typename T>
inline bool transposed_view(int rows, int cols) {
  std::vector<uint16_t> storage(rows * cols + 1024);
  T* base = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(storage.data()) + 1023) & ~uintptr_t(1023));
  auto a = cute::make_tensor(cute::make_smem_ptr(base), LayoutA{});
  auto b = cute::make_tensor(cute::make_smem_ptr(base), LayoutB{});
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c)
      if (&b(c, r) != &a(r, c)) return false;
  return true;
}

// Whether local_tile(tile, (rows, cols), (bi, bj)) starts 1024-byte aligned (a GMMA descriptor base) and addresses
// element (r, c) where the whole tile addresses (bi rows + r, bj cols + c).
template <typename Layout, typename T, int kRows, int kCols>
inline bool sub_tile_ok(int bi, int bj) {
  using namespace cute;
  std::vector<uint16_t> storage(cosize_v<Layout> + 1024);
  T* base = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(storage.data()) + 1023) & ~uintptr_t(1023));
  auto t = make_tensor(make_smem_ptr(base), Layout{});
  auto sub = local_tile(t, Shape<Int<kRows>, Int<kCols>>{}, make_coord(bi, bj));
  if (((&sub(0, 0) - base) * 2) % 1024 != 0) return false;
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kCols; ++c)
      if (&sub(r, c) != &t(bi * kRows + r, bj * kCols + c)) return false;
  return true;
}

// The K / V and Q / dO tiles (layouts of both backward kernels) and load_rows_async's addressing of them.
template <typename Tr>
inline std::string check_bwd_tile_loads() {
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, NT = Tr::kThreads;
  std::string e = check_sm90_smem_tile<typename Tr::SmemLayoutK, T>(false, BN, D);
  if (e.empty()) e = check_sm90_smem_tile<typename Tr::SmemLayoutQ, T>(false, BM, D);
  if (e.empty()) e = check_row_load_plan<typename Tr::SmemLayoutK, T, BN, D, NT, false>();
  if (e.empty()) e = check_row_load_plan<typename Tr::SmemLayoutQ, T, BM, D, NT, false>();
  return e;
}

// (2) Shared tiles: the loads' addressing (check_sm90_smem_tile) of K / V and Q / dO; the MN-major views Kt, Qt / dOt
//     address the very same element as the K-major tiles (Kt(d, j) == K(j, d), Qt(d, i) == Q(i, d)); the dS tile is a
//     bijection onto its storage, equal to ds_offset, with queries i, i + 1 (i even) adjacent and 4-byte aligned;
//     every dQ chunk of Kt starts 1024-byte aligned and local_tile addresses it as Kt.
template <typename Tr>
inline std::string check_sm90_bwd_smem() {
  using namespace cute;
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN;
  std::string e = check_bwd_tile_loads<Tr>();
  if (!e.empty()) return e;
  if (!transposed_view<typename Tr::SmemLayoutK, typename Tr::SmemLayoutKt, T>(BN, D)) return "Kt view != K tile";
  if (!transposed_view<typename Tr::SmemLayoutQ, typename Tr::SmemLayoutQt, T>(BM, D)) return "Qt view != Q tile";
  std::vector<uint16_t> storage(Tr::kSizeK + 1024);
  T* base = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(storage.data()) + 1023) & ~uintptr_t(1023));
  for (int ch = 0; ch < D / Tr::kDqChunk; ++ch)
    if (!sub_tile_ok<typename Tr::SmemLayoutKt, T, Tr::kDqChunk, BN>(ch, 0)) return "dQ chunk of Kt misaddressed";
  auto sdS = make_tensor(make_smem_ptr(base), typename Tr::SmemLayoutDS{});
  std::vector<int> seen(Tr::kSizeDS, 0);
  for (int i = 0; i < BM; ++i)
    for (int j = 0; j < BN; ++j) {
      const long off = &sdS(i, j) - base;
      if (off < 0 || off >= Tr::kSizeDS) return "dS offset out of the tile";
      seen[off]++;
      if (off != ds_offset(i, j)) return "ds_offset != SmemLayoutDS";
      if (i % 2 == 0 && (off % 2 != 0 || &sdS(i + 1, j) - base != off + 1)) return "dS query pair not adjacent";
    }
  for (int x : seen)
    if (x != 1) return "dS tile not a bijection";
  return "";
}

// The head-dim-256 split kernel: (1) S^T accumulator pairs are queries i, i + 1 (i even) of one key (the P^T / dS^T
// pair stores), dK / dV pairs adjacent columns, dQ pairs at (r0 + 8 (e % 2), c0 + 8 (e / 2)); (2) the loads'
// addressing, the MN-major views (Kt, Qt / dOt; the P^T / dS^T tile seen as dS), ds_offset on the P^T tile, and every
// sub-tile a warpgroup hands to a GMMA (its 32 query rows of Q / dO, its 128 columns of Qt / dOt, the dQ chunks of
// Kt) aligned and addressed as the whole tile.
template <typename Tr>
inline std::string check_sm90_bwd_split_traits() {
  using namespace cute;
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN;
  typename Tr::MmaSdP mma_s;
  typename Tr::MmaKV mma_kv;
  typename Tr::MmaDQ mma_dq;
  if (size(mma_s) != 128 || size(mma_kv) != 128 || size(mma_dq) != 128) return "MMAs are not one warpgroup each";
  for (int t = 0; t < 128; ++t) {
    auto cS = mma_s.get_thread_slice(t).partition_C(make_identity_tensor(Shape<typename Tr::BN, typename Tr::HM>{}));
    auto cKV = mma_kv.get_thread_slice(t).partition_C(make_identity_tensor(Shape<typename Tr::BN, typename Tr::HH>{}));
    auto cDQ = mma_dq.get_thread_slice(t).partition_C(make_identity_tensor(Shape<typename Tr::BM, typename Tr::DQC>{}));
    for (int e = 0; e + 1 < size(cS); e += 2)
      if (get<0>(cS(e)) != get<0>(cS(e + 1)) || get<1>(cS(e)) + 1 != get<1>(cS(e + 1)) || get<1>(cS(e)) % 2)
        return "S^T accumulator pair not adjacent queries at thread " + std::to_string(t);
    for (int e = 0; e + 1 < size(cKV); e += 2)
      if (get<0>(cKV(e)) != get<0>(cKV(e + 1)) || get<1>(cKV(e)) + 1 != get<1>(cKV(e + 1)) || get<1>(cKV(e)) % 2)
        return "dK/dV accumulator pair not adjacent at thread " + std::to_string(t);
    for (int e = 0; 2 * e < size(cDQ); ++e)
      if (get<0>(cDQ(2 * e)) != get<0>(cDQ(0)) + 8 * (e % 2) || get<1>(cDQ(2 * e)) != get<1>(cDQ(0)) + 8 * (e / 2) ||
          get<1>(cDQ(2 * e + 1)) != get<1>(cDQ(2 * e)) + 1 || get<0>(cDQ(2 * e + 1)) != get<0>(cDQ(2 * e)))
        return "dQ accumulator pair " + std::to_string(e) + " misplaced at thread " + std::to_string(t);
    if (get<0>(cDQ(0)) / 16 != t / 32 || get<0>(cDQ(0)) % 16 >= 8)  // add_dq_slice's 16-row slices
      return "dQ rows of thread " + std::to_string(t) + " outside its warp's 16-row slice";
  }
  std::string e = check_bwd_tile_loads<Tr>();
  if (!e.empty()) return e;
  if (!transposed_view<typename Tr::SmemLayoutK, typename Tr::SmemLayoutKt, T>(BN, D)) return "Kt view != K tile";
  if (!transposed_view<typename Tr::SmemLayoutQ, typename Tr::SmemLayoutQt, T>(BM, D)) return "Qt view != Q tile";
  if (!transposed_view<typename Tr::SmemLayoutPt, typename Tr::SmemLayoutDS, T>(BN, BM)) return "dS view != dS^T tile";
  std::vector<uint16_t> storage(Tr::kSizeP + 1024);
  T* base = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(storage.data()) + 1023) & ~uintptr_t(1023));
  auto sPt = make_tensor(make_smem_ptr(base), typename Tr::SmemLayoutPt{});
  for (int j = 0; j < BN; ++j)
    for (int i = 0; i < BM; ++i)
      if (&sPt(j, i) - base != ds_offset(i, j)) return "ds_offset != SmemLayoutPt";
  for (int w = 0; w < Tr::kWarpGroups; ++w) {
    if (!sub_tile_ok<typename Tr::SmemLayoutQ, T, Tr::kHalfM, D>(w, 0)) return "query half of Q misaddressed";
    if (!sub_tile_ok<typename Tr::SmemLayoutQt, T, Tr::kHalfD, BM>(w, 0)) return "column half of Qt misaddressed";
  }
  for (int ch = 0; ch < D / Tr::kDqChunk; ++ch)
    if (!sub_tile_ok<typename Tr::SmemLayoutKt, T, Tr::kDqChunk, BN>(ch, 0)) return "dQ chunk of Kt misaddressed";
  return "";
}

template <typename Tr>
inline std::string check_sm90_bwd_traits() {
  std::string e = check_sm90_bwd_fragments<Tr>();
  if (e.empty()) e = check_sm90_bwd_smem<Tr>();
  return e;
}

template <typename Element, int kHeadDim, bool kHasRab>
void launch_bwd_sm90(const AttnParams& p, cudaStream_t stream) {
  using Tr = std::conditional_t<kHeadDim == 256, BwdTraitsSm90Split<Element, kHasRab>,
                                BwdTraitsSm90<Element, kHeadDim, kHasRab>>;
  if (p.batch == 0 || p.max_seqlen == 0) return;
  auto check = [](cudaError_t err, const char* what) {
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("hstu attention (sm90 backward): ") + what + ": " +
                               cudaGetErrorString(err));
  };
  if (p.dq_accum == nullptr || p.drab != nullptr || p.dropout)
    throw std::runtime_error("hstu attention (sm90 backward): needs the atomic-dq path without drab and dropout");
  auto kernel = [] {
    if constexpr (kHeadDim == 256)
      return hstu_bwd_sm90_split_kernel<Tr>;
    else
      return hstu_bwd_sm90_kernel<Tr>;
  }();
  check(set_kernel_attribute_once(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes),
        "cudaFuncSetAttribute");
  if (p.sched_group < 1) throw std::invalid_argument("hstu attention (sm90 backward): sched_group < 1");
  const int64_t items = int64_t{(p.max_seqlen + Tr::kBlockN - 1) / Tr::kBlockN} * p.batch * p.heads;
  if (items > INT32_MAX) throw std::invalid_argument("hstu attention (sm90 backward): more than 2^31 - 1 tiles");
  kernel<<<static_cast<unsigned>(items), Tr::kThreads, Tr::kSmemBytes, stream>>>(p);  // schedule_grouped_block
  check(cudaGetLastError(), "launch");
}

}  // namespace sm90
}  // namespace hstu

// One explicit specialisation of run_bwd_sm90 per translation unit (instantiations/hstu_bwd_*_sm90.cu).
#define HSTU_INSTANTIATE_BWD_SM90(T, D, RAB)                              \
  namespace hstu {                                                        \
  template <>                                                             \
  void run_bwd_sm90<T, D, RAB>(const AttnParams& p, cudaStream_t stream) { \
    sm90::launch_bwd_sm90<T, D, RAB>(p, stream);                          \
  }                                                                       \
  }
