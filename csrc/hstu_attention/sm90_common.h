// Pieces shared by the Hopper (sm_90a, wgmma) kernels, forward and backward.
//   CuteElement          CUDA element type -> the CuTe type of the same bits (GMMA atoms, shared tiles; a table of
//                        its own: utils.h, which has the sm80 MMA's, is also compiled by the host emulation of the
//                        tests, without CUTLASS)
//   fence_proxy_async_smem, publish_copies_to_block (the step barrier after cp.async), red_add_v4_f32,
//   RowLoadPlan, load_rows_async (cp.async, zero-fill past the sequence end, through a CuTe smem tensor),
//   wg_gemm_issue / wg_wait / wg_gemm (one warpgroup GEMM over all k blocks: issued, waited for, or both)
//                        [sm_90a only]
//   non-finite operand entries: tile_hides_entries, zero_nonfinite_chunks, any_flag, nonfinite_terms, packed_weight,
//                        add_dropped_terms_sm90 [sm_90a only]
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
#include "mask.h"
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

// Element offset of (row r, column c) in a (kRows, D) K-major tile of 128B-swizzled atoms of 8 rows x 64 columns,
// tiled along the rows first (the Q tile, the backward's K / V / Q / dO tiles, the forward's V tile seen K-major),
// written out with 32-bit math; self_checks.h compares it with the layouts.
template <int kRows>
__host__ __device__ __forceinline__ constexpr int q_tile_offset(int r, int c) {
  return (c >> 6) * (kRows * 64) + (r >> 3) * 512 + (r & 7) * 64 + ((((c >> 3) & 7) ^ (r & 7)) << 3) + (c & 7);
}

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

// ---- Non-finite operand entries. A product over keys (or queries) multiplies every entry the mask hides by an exact
// zero, and 0 * NaN, 0 * inf are NaN. On tiles that hide entries (tile_hides_entries) the kernels zero the non-finite
// entries of the shared tiles such a product reads, each thread in the chunks it copied, right after its copies
// landed (zero_nonfinite_chunks: one flag per tile row); scores whose operand rows had entries zeroed are recomputed
// where visible (nonfinite_terms), and the terms the zeroed entries dropped are added back for visible entries
// (add_dropped_terms_sm90). An entry a row sees thus propagates as IEEE arithmetic says, one it does not see never
// reaches it. Tiles that hide nothing skip all of it.

// The block's dynamic shared memory (every kernel's extern array aliases it): flags at a fixed offset are addressed
// from it instead of through a pointer kept in a register across the main loop.
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(1024) unsigned char hstu_sm90_dynamic_smem[];
  return hstu_sm90_dynamic_smem;
}

// Whether the (rows [m0, m1) x keys [n0, n1)) tile hides an entry inside the sequence (false only when none is).
// Entries past the sequence end need no care: their operand rows are zero-filled (finite) and their rows never stored.
__device__ __forceinline__ bool tile_hides_entries(const SeqMask& mk, int m0, int m1, int n0, int n1) {
  return !mk.tile_full(m0, min(m1, mk.L), n0, min(n1, mk.L));
}

// The 16-bit float in the low 16 bits of h, as float.
template <typename Element>
__device__ __forceinline__ float half_bits_to_float(uint32_t h) {
  if constexpr (std::is_same_v<Element, __nv_bfloat16>)
    return __uint_as_float(h << 16);
  else
    return __half2float(__ushort_as_half(static_cast<unsigned short>(h & 0xffffu)));
}

// Zeroes the non-finite entries of the 16-byte chunks that thread tid copied into a shared tile with
// load_rows_async<kRows, kCols, kThreads> (the same chunks: RowLoadPlan), and writes flags[row] (whether the row held
// one) for every row of the tile. tile: the tile's first element, a (kRows, kCols) K-major 128B-swizzled tile tiled
// rows first, or the same bytes seen MN-major (the forward's V tile); addressed with q_tile_offset (check_scan_tiles
// compares it with every scanned layout). Call once this thread's copies have landed (cp_async_wait_all): a thread
// reads back only its own chunks, and the kChunksPerRow threads copying a row (aligned consecutive lanes of one warp)
// combine their findings by shuffles, the first of them writing the row's flag. Rounds go one at a time (few
// registers: the warp-specialized producer has 40; this runs on masked tiles only). Called by whole warps. Returns
// whether this thread's rows held one. The zeroed chunks and the flags are for other threads (and wgmma) after a
// proxy fence and a barrier.
template <int kRows, int kCols, int kThreads, typename Element, typename T>
__device__ __forceinline__ bool zero_nonfinite_chunks(T* tile, uint8_t* flags, int tid) {
  using Plan = RowLoadPlan<kRows, kCols, kThreads>;
  static_assert(Plan::kRounds <= 32, "one bit per round");
  static_assert(32 % Plan::kChunksPerRow == 0, "a row's threads are aligned lanes of one warp");
  const int row0 = Plan::first_row(tid), col = Plan::col(tid);
  uint32_t bits = 0;  // bit r: the row of round r held a non-finite entry
#pragma unroll 1
  for (int r = 0; r < Plan::kRounds; ++r) {
    uint4* chunk = reinterpret_cast<uint4*>(tile + q_tile_offset<kRows>(row0 + r * Plan::kRowsPerRound, col));
    const uint4 v = *chunk;
    uint32_t w[4] = {v.x, v.y, v.z, v.w};
    bool bad = false;
    CUTE_UNROLL
    for (int i = 0; i < 4; ++i) {
      const bool lo = nonfinite_bits<Element>(w[i]), hi = nonfinite_bits<Element>(w[i] >> 16);
      bad |= lo || hi;
      w[i] &= (lo ? 0xffff0000u : 0xffffffffu) & (hi ? 0x0000ffffu : 0xffffffffu);
    }
    if (bad) {
      *chunk = make_uint4(w[0], w[1], w[2], w[3]);
      bits |= 1u << r;
    }
  }
  CUTE_UNROLL
  for (int lanes = 1; lanes < Plan::kChunksPerRow; lanes *= 2) bits |= __shfl_xor_sync(0xffffffffu, bits, lanes);
  if (col == 0) {
#pragma unroll 1
    for (int r = 0; r < Plan::kRounds; ++r) flags[row0 + r * Plan::kRowsPerRound] = (bits >> r) & 1u;
  }
  return bits != 0;
}

// Whether any of the kN flags (16-byte aligned, shared memory) is set.
template <int kN>
__device__ __forceinline__ bool any_flag(const uint8_t* flags) {
  static_assert(kN % 16 == 0, "whole 16-byte words");
  uint32_t any = 0;
  CUTE_UNROLL
  for (int i = 0; i < kN / 16; ++i) {
    const uint4 v = reinterpret_cast<const uint4*>(flags)[i];
    any |= v.x | v.y | v.z | v.w;
  }
  return any != 0;
}

// The sum of the terms a[d] * b[d], d < kD, that have a non-finite factor (a and b: rows in global memory, 16-byte
// aligned): the exact value of a score one of whose operand rows had entries zeroed, whenever that row held one (its
// finite terms cannot change a non-finite total). Inline (a call would serialize the kernel's wgmmas); off the fast
// path.
template <int kD, typename Element>
__device__ __forceinline__ float nonfinite_terms(const Element* a, const Element* b) {
  float sum = 0.f;
#pragma unroll 1
  for (int d = 0; d < kD; d += 8) {
    const uint4 x = *reinterpret_cast<const uint4*>(a + d), y = *reinterpret_cast<const uint4*>(b + d);
    const uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
    CUTE_UNROLL
    for (int i = 0; i < 8; ++i) {
      const uint32_t xi = xs[i / 2] >> (16 * (i % 2)), yi = ys[i / 2] >> (16 * (i % 2));
      if (nonfinite_bits<Element>(xi) || nonfinite_bits<Element>(yi))
        sum += half_bits_to_float<Element>(xi) * half_bits_to_float<Element>(yi);
    }
  }
  return sum;
}

// Weight W(row 8 h, k = 8 kb + kk) of a warp's register A operand (16-bit values packed in pairs, in the order of a
// wgmma accumulator: value 4 kb + 2 h + par at (row 8 h, k = 8 kb + 2 t + par) relative to the quad's first row,
// t = lane % 4), as the MMA multiplied it, passed on from the lane of the quad that holds it. h and kb must be
// compile-time values (unrolled loops): a register array indexed at run time would live in local memory. Called by
// whole warps.
template <typename Element, typename FragA>
__device__ __forceinline__ float packed_weight(FragA& a, int h, int kb, int kk, int lane) {
  using namespace cute;
  Tensor a32 = recast<uint32_t>(a);
  const uint32_t word = __shfl_sync(0xffffffffu, a32(2 * kb + h), (lane & ~3) | (kk >> 1));
  return half_bits_to_float<Element>((kk & 1) ? word >> 16 : word);
}

// acc += the terms W B that kK zeroed rows of B dropped: acc is a warpgroup MMA accumulator fragment (value
// 4 nb + 2 h + par at (row 8 h, column 8 nb + 2 t + par) relative to the thread's first row and column 0); B's row k
// is flagged in flags[k] (8-byte aligned) when it had entries zeroed, orig + k * stride is its original (global
// memory, 16-byte aligned, offset to acc's column 0). For each flagged k = 8 kb + kk and each of the thread's rows h
// with visible(h, k): acc += weight(h, kb, kk) * b for every non-finite b of row k at the thread's columns. The warp
// first finds the row's 8-column chunks holding one (a lane per chunk, one ballot), then reads only those: few
// registers live, so the code of this rare path does not crowd the main loop's. weight is called by every lane (it
// may shuffle), with h and kb compile-time values; entries not visible add nothing (their weight is zero, and
// 0 * inf is NaN). Called by whole warps; off the fast path.
template <typename Element, int kK, typename Acc, typename Weight, typename Visible>
__device__ __forceinline__ void add_dropped_terms_sm90(Acc& acc, Weight&& weight, Visible&& visible,
                                                       const uint8_t* flags, const Element* orig, int64_t stride,
                                                       int lane) {
  using namespace cute;
  static_assert(kK % 8 == 0, "blocks of 8 rows of B");
  constexpr int kNB = decltype(size(acc))::value / 4;  // 8-column chunks of acc's columns
  static_assert(kNB <= 32, "a lane per chunk");
  const int t = lane & 3;
  CUTE_UNROLL
  for (int kb = 0; kb < kK / 8; ++kb) {
    const uint2 block = reinterpret_cast<const uint2*>(flags)[kb];  // the same flags for every lane
    if ((block.x | block.y) == 0) continue;
#pragma unroll 1
    for (int kk = 0; kk < 8; ++kk) {
      if (flags[8 * kb + kk] == 0) continue;
      const int k = 8 * kb + kk;
      const Element* row = orig + k * stride;
      bool chunk_bad = false;
      if (lane < kNB) {
        const uint4 v = *reinterpret_cast<const uint4*>(row + 8 * lane);
        const uint32_t x[4] = {v.x, v.y, v.z, v.w};
        CUTE_UNROLL
        for (int i = 0; i < 4; ++i) chunk_bad |= nonfinite_bits<Element>(x[i]) || nonfinite_bits<Element>(x[i] >> 16);
      }
      const uint32_t chunks = __ballot_sync(0xffffffffu, chunk_bad);
      CUTE_UNROLL
      for (int h = 0; h < 2; ++h) {
        const float w = weight(h, kb, kk);
        if (!visible(h, k)) continue;
        CUTE_UNROLL
        for (int nb = 0; nb < kNB; ++nb) {
          if (((chunks >> nb) & 1u) == 0) continue;
          const uint32_t pair = *reinterpret_cast<const uint32_t*>(row + 8 * nb + 2 * t);
          CUTE_UNROLL
          for (int par = 0; par < 2; ++par) {
            const uint32_t b = pair >> (16 * par);
            if (nonfinite_bits<Element>(b)) acc(4 * nb + 2 * h + par) += w * half_bits_to_float<Element>(b);
          }
        }
      }
    }
  }
}

#endif  // HSTU_SM90_DEVICE

}  // namespace sm90
}  // namespace hstu
