// Pieces shared by the Hopper (sm_90a, wgmma) kernels, forward and backward.
//   CuteElement          CUDA element type -> the CuTe type of the same bits (GMMA atoms, shared tiles; a table of
//                        its own: utils.h, which has the sm80 MMA's, is also compiled by the host emulation of the
//                        tests, without CUTLASS)
//   fence_proxy_async_smem, publish_copies_to_block (the step barrier after cp.async), red_add_v4_f32,
//   RowLoadPlan, load_rows_async (cp.async, zero-fill past the sequence end, through a CuTe smem tensor),
//   wg_gemm_issue / wg_wait / wg_gemm (one warpgroup GEMM over all k blocks: issued, waited for, or both)
//                        [sm_90a only]
// (The host self-checks of these tiles' addressing are in self_checks.h.)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_types.h>

#include "hstu.h"
#include "utils.h"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HSTU_SM90_DEVICE 1
#endif

namespace hstu {
namespace sm90 {

template <typename Element>
struct CuteElement;
template <>
struct CuteElement<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct CuteElement<__half> {
  using type = cutlass::half_t;
};


// How load_rows_async spreads rows [0, kRows) of a (rows, kCols) global tile over kThreads threads, 16 bytes per
// cp.async: thread tid keeps one 8-column chunk (eight consecutive columns from a multiple of 8 are contiguous and
// 16-byte aligned in every shared layout used here: swizzling permutes whole 16-byte chunks) and copies rows
// first_row(tid) + round * kRowsPerRound. Only the first kPhases rounds form a swizzled address; the later ones add
// a compile-time offset, because rows a multiple of 8 apart lie whole 1024-byte swizzle periods apart in these
// 128B-swizzled tiles (check_row_load_plan verifies every round's address on the host). kTransposed: the shared
// tensor is indexed (col, row) (the MN-major V tile).
template <int kRows, int kCols, int kThreads>
struct RowLoadPlan {
  static constexpr int kChunksPerRow = kCols / 8;
  static constexpr int kRowsPerRound = kThreads / kChunksPerRow;
  static constexpr int kRounds = kRows / kRowsPerRound;
  static constexpr int kSwizzleRows = 8;
  static constexpr int kPhases = kRowsPerRound % kSwizzleRows == 0 ? 1 : kSwizzleRows / kRowsPerRound;
  static_assert(kThreads % kChunksPerRow == 0 && kRows % kRowsPerRound == 0, "whole rounds of 16-byte chunks");
  static_assert(kRowsPerRound % kSwizzleRows == 0 || kSwizzleRows % kRowsPerRound == 0, "rounds tile the period");
  static_assert(kRounds % kPhases == 0, "whole swizzle periods");
  __host__ __device__ static constexpr int first_row(int tid) { return tid / kChunksPerRow; }
  __host__ __device__ static constexpr int col(int tid) { return (tid % kChunksPerRow) * 8; }
  // round = phase + kPhases * period: the row offset below is a whole number of swizzle periods
  __host__ __device__ static constexpr int phase_row(int tid, int phase) { return first_row(tid) + phase * kRowsPerRound; }
  __host__ __device__ static constexpr int period_rows(int period) { return period * kPhases * kRowsPerRound; }

  // &s(row, col) (or &s(col, row)) of the chunk thread tid copies in round phase + kPhases * period
  template <bool kTransposed, typename SmemTensor>
  __host__ __device__ static auto* chunk_ptr(SmemTensor& s, int tid, int phase, int period) {
    const int r = phase_row(tid, phase), c = col(tid), dr = period_rows(period);
    if constexpr (kTransposed)
      return &s(c, r) + s.layout()(0, dr);
    else
      return &s(r, c) + s.layout()(dr, 0);
  }
};

#if defined(HSTU_SM90_DEVICE)

// Orders this thread's generic-proxy shared-memory writes (cp.async) before later async-proxy reads (wgmma).
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// The step barrier of the cp.async-fed sm90 kernels: waits for this thread's copies, orders them before async-proxy
// (wgmma) reads, and makes every thread's copies visible to the block.
__device__ __forceinline__ void publish_copies_to_block() {
  cp_async_wait_all();
  fence_proxy_async_smem();
  __syncthreads();
}

// The copies of RowLoadPlan (above); rows >= valid_rows are zero-filled and never addressed in global memory.
template <int kRows, int kCols, int kThreads, bool kTransposed, typename Element, typename SmemTensor>
__device__ __forceinline__ void load_rows_async(SmemTensor&& s, const Element* gmem, int64_t row_stride,
                                                int valid_rows, int tid) {
  using Plan = RowLoadPlan<kRows, kCols, kThreads>;
  using Copy = cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t, cute::uint128_t>;
  CUTE_UNROLL
  for (int phase = 0; phase < Plan::kPhases; ++phase) {
    const int row = Plan::phase_row(tid, phase);
    const Element* src = gmem + row * row_stride + Plan::col(tid);  // advanced one period per round
    const int64_t period_stride = Plan::period_rows(1) * row_stride;
    CUTE_UNROLL
    for (int period = 0; period < Plan::kRounds / Plan::kPhases; ++period, src += period_stride) {
      const bool ok = row + Plan::period_rows(period) < valid_rows;
      auto* dst = Plan::template chunk_ptr<kTransposed>(s, tid, phase, period);
      Copy::copy(*reinterpret_cast<const cute::uint128_t*>(ok ? src : gmem), *reinterpret_cast<cute::uint128_t*>(dst),
                 ok);
    }
  }
}

// Fire-and-forget fp32 add of four adjacent floats at p (16-byte aligned, global memory).
__device__ __forceinline__ void red_add_v4_f32(float* p, float4 x) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(x.x), "f"(x.y), "f"(x.z), "f"(x.w)
               : "memory");
}

// One warpgroup GEMM over all k blocks, issued as one wgmma batch and not waited for: C (+)= A B. kZeroInit: C = A B
// (the first k block overwrites C). kARegs: A is a register fragment (RS-wgmma), else shared-memory descriptors
// (SS-wgmma). Until a later wg_wait retires the batch, neither C nor a register A may be touched.
template <bool kZeroInit, bool kARegs, typename TiledMma, typename TA, typename TB, typename TC>
__device__ __forceinline__ void wg_gemm_issue(TiledMma& mma, TA& tA, TB const& tB, TC& tC) {
  if constexpr (kARegs) cute::warpgroup_fence_operand(tA);
  cute::warpgroup_fence_operand(tC);
  cute::warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = cute::SM90::GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int kb = 0; kb < cute::size<2>(tA); ++kb) {
    cute::gemm(mma, tA(cute::_, cute::_, kb), tB(cute::_, cute::_, kb), tC);
    mma.accumulate_ = cute::SM90::GMMA::ScaleOut::One;
  }
  cute::warpgroup_commit_batch();
  cute::warpgroup_fence_operand(tC);
}

// Waits until at most kPending of this warpgroup's wgmma batches are in flight (batches retire in issue order), then
// pins the given fragments (accumulators / register operands of the retired batches) after the wait.
template <int kPending, typename... Frags>
__device__ __forceinline__ void wg_wait(Frags&... frags) {
  cute::warpgroup_wait<kPending>();
  (cute::warpgroup_fence_operand(frags), ...);
}

// wg_gemm_issue, then wait for it: the result is ready on return.
template <bool kZeroInit, bool kARegs, typename TiledMma, typename TA, typename TB, typename TC>
__device__ __forceinline__ void wg_gemm(TiledMma& mma, TA& tA, TB const& tB, TC& tC) {
  wg_gemm_issue<kZeroInit, kARegs>(mma, tA, tB, tC);
  if constexpr (kARegs)
    wg_wait<0>(tC, tA);
  else
    wg_wait<0>(tC);
}

#endif  // HSTU_SM90_DEVICE

}  // namespace sm90
}  // namespace hstu
