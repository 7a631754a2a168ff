// Hopper (sm_90a) forward kernels: the same math, masks and tile walk as fwd_kernel.h, with the two GEMMs on
// warpgroup MMAs (wgmma, through CuTe's SM90 GMMA atoms) instead of per-warp mma.sync. Two kernels over one set of
// traits (fwd_traits_sm90.h), mainloop pieces (mainloop_fwd_sm90.h) and epilogue (epilogue_fwd_sm90.h); the launcher
// (fwd_launch_sm90.h) runs the one heuristics.h picks:
//   hstu_fwd_sm90_kernel<Tr>                single role: every warpgroup loads (cp.async) and computes, one block
//                                           per tile
//   hstu_fwd_sm90_ws_kernel<Tr, Scheduler>  warp-specialized: a producer warpgroup and one or two consumers, over
//                                           the work items a tile scheduler (tile_scheduler.h) gives the block
//
// Single role: block = 2 consumer warpgroups (256 threads), 128 query rows (64 per warpgroup); all 256 threads
// stream K/V tiles into shared-memory rings with cp.async (zero-fill past the sequence end, exactly as the sm80
// path), one tile ahead of the GEMMs.
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
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "epilogue_fwd_sm90.h"
#include "fwd_traits_sm90.h"
#include "hstu.h"
#include "mainloop_fwd_sm90.h"
#include "mask.h"
#include "sm90_common.h"
#include "tile_scheduler.h"
#include "utils.h"

namespace hstu {
namespace sm90 {

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
// Warp-specialized kernel, the default on sm_90 (heuristics.h; KernelOptions::fwd_warp_specialized = false takes the
// kernel above), templated on a tile scheduler (tile_scheduler.h) that says which work items a block runs:
//   SingleTileScheduler         one block per query tile (head dim 256, and KernelOptions::fwd_persistent = false)
//   DynamicPersistentScheduler  one wave of blocks drawing work items from a per-launch counter, longest first (the
//                               default at head dims 64 / 128)
// Block = 3 warpgroups: warpgroup 0 produces (cp.async with zero-fill, exactly the loads of the kernel above) Q and
// the visible K / V tiles of each item into a Q ring (1 slot, or Tr::kStagesWsQ for a persistent block) and K / V
// rings (2 / 3 slots), each guarded by cutlass::PipelineAsync mbarrier pairs (full: the producer's 128 threads' copies
// landed; empty: the 256 consumer threads released the slot), and keeps 40 registers (setmaxnreg); warpgroups 1 and 2
// consume (232 registers), 64 query rows each, with the same math, masks, in-warpgroup overlap (S_t with
// O += P_{t-1} V_{t-1}) and epilogue as hstu_fwd_sm90_kernel, and no block-wide barrier in the loop.
// Ping-pong: the consumers take turns to issue their GEMMs (named barriers kTurnBarrier + w, 256 threads: one group
// syncs while the other arrives), so one group's pointwise stage runs under the other's GEMMs.
// With one consumer warpgroup (FwdTraitsSm90<..., 1>) there is no turn to take: the two blocks sharing the SM
// interleave on their own.
// Across the items of a persistent block the K / V rings, the Q slots and the consumers' turn-taking simply continue:
// the producer loads the next item's Q and first K / V tiles while the consumers finish this one, so a short
// sequence's per-tile prologue (loads, launch) hides under the previous tile's GEMMs and epilogue.
template <typename Tr, typename Scheduler>
__global__ void __launch_bounds__(Tr::kThreads + 128, Tr::kBlocksPerSmWs) hstu_fwd_sm90_ws_kernel(const AttnParams p) {
#if defined(HSTU_SM90_DEVICE)
  using namespace cute;
  using Element = typename Tr::Element;
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM;
  constexpr bool kPersistent = Scheduler::kPersistent;
  // A persistent block's producer loads the next item's Q while the consumers stage this item's O through theirs.
  constexpr int kStagesQ = kPersistent ? Tr::kStagesWsQ : 1;
  using PipeK = cutlass::PipelineAsync<Tr::kStagesWsK>;
  using PipeV = cutlass::PipelineAsync<Tr::kStagesWsV>;
  using PipeQ = cutlass::PipelineAsync<kStagesQ>;
  using SchedStorage = typename Scheduler::SharedStorage;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  T* const pQ = reinterpret_cast<T*>(smem_raw);    // kStagesQ slots
  T* const pK = pQ + kStagesQ * Tr::kSizeQ;         // kStagesWsK slots
  T* const pV = pK + Tr::kStagesWsK * Tr::kSizeK;  // kStagesWsV slots
  auto* k_storage = reinterpret_cast<typename PipeK::SharedStorage*>(smem_raw + Tr::kTileBytesWs);
  auto* v_storage = reinterpret_cast<typename PipeV::SharedStorage*>(k_storage + 1);
  auto* q_storage = reinterpret_cast<typename PipeQ::SharedStorage*>(v_storage + 1);
  auto* sched_storage = reinterpret_cast<SchedStorage*>(q_storage + 1);
  static_assert(sizeof(typename PipeK::SharedStorage) + sizeof(typename PipeV::SharedStorage) +
                        sizeof(typename PipeQ::SharedStorage) + sizeof(SchedStorage) <= 256,
                "barriers fit the reserved bytes");
  static_assert(kStagesQ * Tr::kSizeQ + Tr::kStagesWsK * Tr::kSizeK + Tr::kStagesWsV * Tr::kSizeV <=
                    Tr::kTileBytesWs / 2, "tiles fit the reserved bytes");
  if ((cast_smem_ptr_to_uint(smem_raw) & 1023u) != 0) __trap();

  Scheduler sched(p, BM, *sched_storage);
  if (sched.idle_block()) return;  // whole block uniform
  const int tid = threadIdx.x;
  const bool producer = tid < 128;

  PipeK pipe_k(*k_storage, ws_pipeline_params<PipeK>(producer, 128, Tr::kThreads), cute::true_type{});  // warp 0 inits
  PipeV pipe_v(*v_storage, ws_pipeline_params<PipeV>(producer, 128, Tr::kThreads), cute::true_type{});
  PipeQ pipe_q(*q_storage, ws_pipeline_params<PipeQ>(producer, 128, Tr::kThreads), cute::true_type{});
  sched.init_barriers(producer, Tr::kThreads);
  __syncthreads();  // initialized barriers visible to every thread

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
    while (true) {
      const auto work = sched.template get_work</*kProducer=*/true>();
      if (!sched.is_valid(work)) break;
      sched.prefetch_next_work(p);  // in flight during the loads
      const WorkItem w = sched.work_item(p, work);
      const SeqMask& mk = w.mask;
      const int m0 = w.tile * BM;
      if (m0 < mk.L) {  // (a tile past its sequence end: nothing to load, the consumers skip it too)
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
  // Turn-taking runs through every step of every item: group 0 issues first (group 1 arrives once up front); each
  // step a group waits for its turn and then hands it over; group 0 takes group 1's last hand-over once it has
  // issued its last turn's GEMMs.
  // (A one-item block arrives once its Q tile is in.)
  if constexpr (kPersistent) {
    if (kPingPong && cwg == 1) named_barrier_arrive<256>(kTurnBarrier);
  }
  cutlass::PipelineState<kStagesQ> sq;  // consumer states start at slot 0, phase 0
  cutlass::PipelineState<Tr::kStagesWsK> sk;
  cutlass::PipelineState<Tr::kStagesWsV> sv, sv_prev;
  while (true) {
    const auto work = sched.template get_work</*kProducer=*/false>();
    if (!sched.is_valid(work)) break;
    const WorkItem w = sched.work_item(p, work);
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
    if constexpr (!kPersistent) {
      if (kPingPong && cwg == 1) named_barrier_arrive<256>(kTurnBarrier);
    }
    Tensor tSrQ = thr_s.partition_fragment_A(sQ(sq.index()));
    bool have_prev = false;  // P_{t-1} in tOrP, V_{t-1} in slot sv_prev
    ws_consume_key_tiles<Tr>(p, mk, w.batch, hr, m0, cwg, pK, pV, pipe_k, pipe_v, sk, sv, sv_prev, have_prev, mma_s,
                             mma_o, tSrQ, tSrS, tScS, tOrO, tOrP);
    if constexpr (!kPersistent) {
      if (kPingPong && cwg == 0) named_barrier_sync<256>(kTurnBarrier);  // group 1's last hand-over: the block's only item
    }
    if (have_prev) {  // the last tile's O GEMM
      Tensor tOrV = thr_o.partition_fragment_B(sVt(sv_prev.index()));
      wg_gemm</*kZeroInit=*/false, /*kARegs=*/true>(mma_o, tOrP, tOrV, tOrO);
      pipe_v.consumer_release(sv_prev);
    }
    store_o<Tr>(p, base_of(w), m0, mk.L, tOrO, tOcO, pQ + sq.index() * Tr::kSizeQ, cwg, ctid % 128);
    if constexpr (kPersistent) {  // the next item's Q goes into this slot once this thread's staging reads are done
      compiler_fence();
      pipe_q.consumer_release(sq);
    }
    ++sq;
  }
  if constexpr (kPersistent) {
    if (kPingPong && cwg == 0) named_barrier_sync<256>(kTurnBarrier);  // group 1's last hand-over
  }
#else
  __trap();
#endif
}

// The tile schedulers the launcher instantiates the warp-specialized kernel with.
using FwdSingleTileScheduler = SingleTileScheduler;
using FwdPersistentScheduler = DynamicPersistentScheduler<kProducerBarrier, cutlass::PipelineAsync<2>>;

}  // namespace sm90
}  // namespace hstu
