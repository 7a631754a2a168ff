// Hopper (sm_90a) backward, atomic-dq path only: the math, scales, masks and query-tile walk of bwd_kernel.h's
// dk/dv kernel (kPassBoth, kAtomicDq, no dropout, no drab), with every GEMM on warpgroup MMAs (wgmma, through CuTe's
// SM90 GMMA atoms). Taken wherever it applies on sm_90 (heuristics.h's plan_backward). Two kernels over the traits of
// bwd_traits_sm90.h, the mainloop pieces of mainloop_bwd_sm90.h and the epilogue of epilogue_bwd_sm90.h; the launcher
// is bwd_launch_sm90.h.
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
// dQ sums over the whole key tile before it reduces: per-warpgroup partial sums (split-K, no block barrier) would add
// every dq element twice per key tile, and the reductions are what keeps L2 busy (66% against 25% tensor-pipe
// activity in ncu at 32,4096,4,128 with per-warpgroup sums).
// "Seen MN-major": a K-major 128B-swizzled (rows, D) tile tiled rows-first holds exactly the bytes of the MN-major
// (D, rows) tile tiled K-first (check_sm90_bwd_smem checks the identity), so Q, dO and K each live once in shared
// memory and get two CuTe views.
// Epilogue: dV * (1 / N), dK * (alpha / N) from the accumulators, rows (keys) < L; the launcher then runs the usual
// hstu_dq_convert_kernel (dq = alpha / N * workspace).
// Overlap inside a warpgroup: S^T and dP^T are issued together; the P half of the pointwise stage runs while
// dP^T computes and the dS half while dV computes; dK is issued before the block barrier that precedes dQ.
// Device code exists only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); compiled for any other target the kernel traps.
#pragma once

#include <cute/tensor.hpp>

#include "bwd_traits_sm90.h"
#include "epilogue_bwd_sm90.h"
#include "hstu.h"
#include "mainloop_bwd_sm90.h"
#include "mask.h"
#include "pointwise.h"
#include "sm90_common.h"
#include "utils.h"

namespace hstu {
namespace sm90 {

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

  store_dk_dv(tiles, p, tKVrdK, tKVrdV, tKVcKV, 0, tid);
#else
  // Not an sm_90a target: the launcher never selects this kernel there.
  __trap();
#endif
}

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
  store_dk_dv(tiles, p, tKVrdK, tKVrdV, tKVcKV, Tr::kHalfD * wg, tid);
#else
  __trap();
#endif
}

}  // namespace sm90
}  // namespace hstu
