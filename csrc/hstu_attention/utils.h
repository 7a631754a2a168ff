// Warp-level building blocks of the sm80-style path: swizzled shared-memory tiles, cp.async tile loads,
// ldmatrix fragment loads and the m16n8k16 tensor-core MMA (CuTe's SM80 MMA / SM75 LDSM / SM80 cp.async atoms).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>

#if defined(__CUDACC__)
#define HSTU_NOINLINE __noinline__
#else  // host emulation of the kernels (tests only)
#define HSTU_NOINLINE __attribute__((noinline))
#endif

namespace hstu {

template <typename Element>
struct MmaAtom;
template <>
struct MmaAtom<__nv_bfloat16> {
  using Op = cute::SM80_16x8x16_F32BF16BF16F32_TN;
};
template <>
struct MmaAtom<__half> {
  using Op = cute::SM80_16x8x16_F32F16F16F32_TN;
};

// d += a * b for one 16x8x16 tile: a = 4 regs (16x16, row major), b = 2 regs (16x8, "col major").
template <typename Element>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  MmaAtom<Element>::Op::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0, b1, d[0], d[1], d[2], d[3]);
}

template <typename Element>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&r);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 r = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&r);
}

template <typename Element>
__device__ __forceinline__ float to_float(Element x);
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

// A shared-memory tile of kRows x kCols 16-bit elements, row major, with its 16-byte chunks XOR-swizzled by row
// so that the eight row addresses of one ldmatrix phase fall into distinct bank groups.
template <int kCols>
struct SmemTile {
  static constexpr int kChunks = kCols / 8;
  static_assert(kChunks == 4 || kChunks % 8 == 0, "head dim must be 32 or a multiple of 64");
  __device__ __forceinline__ static int offset(int row, int col) {
    const int chunk = col >> 3;
    const int sw = (kChunks >= 8) ? (row & 7) : ((row >> 1) & 3);
    return row * kCols + ((chunk ^ sw) << 3) + (col & 7);
  }
};

// Asynchronously copies rows [0, kRows) of a global tile, row r starting at src(r), into a swizzled shared tile of
// kCols columns; rows >= valid_rows are zero-filled and never read (their copies name `any`, a valid address).
template <int kRows, int kCols, int kThreads, typename Element, typename Src>
__device__ __forceinline__ void load_rows_async(Element* smem, const Src& src, const Element* any, int valid_rows,
                                                int tid) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kTotal = kRows * kChunksPerRow;
  using Copy = cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t, cute::uint128_t>;
#pragma unroll
  for (int idx = tid; idx < kTotal; idx += kThreads) {
    const int row = idx / kChunksPerRow;
    const int col = (idx % kChunksPerRow) * 8;
    const bool ok = row < valid_rows;
    const Element* from = ok ? src(row) + col : any;  // never forms an address past the rows
    Copy::copy(*reinterpret_cast<const cute::uint128_t*>(from),
               *reinterpret_cast<cute::uint128_t*>(smem + SmemTile<kCols>::offset(row, col)), ok);
  }
}

// load_rows_async of a (rows, kCols) global tile with a row stride in elements.
template <int kRows, int kCols, int kThreads, typename Element>
__device__ __forceinline__ void load_tile_async(Element* smem, const Element* gmem, int64_t row_stride,
                                                int valid_rows, int tid) {
  load_rows_async<kRows, kCols, kThreads>(
      smem, [&](int row) { return gmem + row * row_stride; }, gmem, valid_rows, tid);
}

// Rows [row0, row0 + kRows) of two tensors with the same row stride (K and V, or Q and dO, of one sequence and head)
// into two swizzled shared tiles; rows at or past len are zero-filled.
template <int kRows, int kCols, int kThreads, typename Element>
__device__ __forceinline__ void load_tile_pair_async(Element* s0, Element* s1, const Element* g0, const Element* g1,
                                                     int64_t row_stride, int row0, int len, int tid) {
  load_tile_async<kRows, kCols, kThreads>(s0, g0 + row0 * row_stride, row_stride, len - row0, tid);
  load_tile_async<kRows, kCols, kThreads>(s1, g1 + row0 * row_stride, row_stride, len - row0, tid);
}

__device__ __forceinline__ void cp_async_commit() { cute::cp_async_fence(); }
__device__ __forceinline__ void cp_async_wait_all() { cute::cp_async_wait<0>(); }

// A operand (16 rows x 16 k) from a row-major [m][k] shared tile.
template <int kCols, typename Element>
__device__ __forceinline__ void ldsm_a(uint32_t (&a)[4], const Element* tile, int row0, int k0, int lane) {
  const int row = row0 + (lane & 15);
  const int col = k0 + ((lane >> 4) << 3);
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(tile + SmemTile<kCols>::offset(row, col)),
                                a[0], a[1], a[2], a[3]);
}

// B operands of two n8 blocks (n0..n0+15) x 16 k from a shared tile stored [n][k] (k contiguous).
// b[nb][0..1] feed the MMA of n block nb.
template <int kCols, typename Element>
__device__ __forceinline__ void ldsm_b_nk(uint32_t (&b)[2][2], const Element* tile, int n0, int k0, int lane) {
  const int row = n0 + (lane & 7) + ((lane >> 4) << 3);
  const int col = k0 + (((lane >> 3) & 1) << 3);
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(tile + SmemTile<kCols>::offset(row, col)),
                                b[0][0], b[0][1], b[1][0], b[1][1]);
}

// B operands of two n8 blocks (n0..n0+15) x 16 k from a shared tile stored [k][n] (n contiguous): transposing load.
template <int kCols, typename Element>
__device__ __forceinline__ void ldsm_b_kn(uint32_t (&b)[2][2], const Element* tile, int k0, int n0, int lane) {
  const int row = k0 + (lane & 15);
  const int col = n0 + ((lane >> 4) << 3);
  cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(tile + SmemTile<kCols>::offset(row, col)),
                                b[0][0], b[0][1], b[1][0], b[1][1]);
}

// A operand (16 rows x 16 k) from a shared tile stored [k][m] (m contiguous): transposing load. Lane l addresses
// row k0 + (l & 7) + 8 (l >> 4), column m0 + 8 ((l >> 3) & 1), so the four 8x8 matrices arrive in A-fragment order.
template <int kCols, typename Element>
__device__ __forceinline__ void ldsm_a_t(uint32_t (&a)[4], const Element* tile, int m0, int k0, int lane) {
  const int row = k0 + (lane & 7) + ((lane >> 4) << 3);
  const int col = m0 + (((lane >> 3) & 1) << 3);
  cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(tile + SmemTile<kCols>::offset(row, col)),
                                a[0], a[1], a[2], a[3]);
}

// The warp GEMMs below are one family, software-pipelined by hand: the ldmatrix / mma atoms are volatile asm, which
// the compiler keeps in program order, so the fragments of step s+1 are requested before the MMAs of step s issue.
// A warp owns kMI blocks of 16 rows (rows row0 + 16 mi), so every B fragment read from shared memory feeds kMI MMAs
// (half the shared-memory traffic per MMA at kMI = 2).

// The shared step loop: acc(mi, nb) (the 16 x 8 accumulator of row block mi, n block nb) += A[16 x kK] B over steps
// (k block, chunk of up to 4 n-pairs), B fragments double-buffered in registers. load_a(kk) fetches the A fragments
// of k block kk (called as a step starts a new k block, one step ahead of its MMAs); a_of(kk, mi) returns them;
// load_b(b, kk, np) fetches the B fragments of k block kk and n-pair np (n blocks 2 np, 2 np + 1).
template <int kMI, int kNB, int kK, typename Element, typename Acc, typename LoadA, typename AOf, typename LoadB>
__device__ __forceinline__ void warp_gemm(Acc&& acc, LoadA&& load_a, AOf&& a_of, LoadB&& load_b) {
  constexpr int kNP = kNB / 2;
  constexpr int kC = kNP < 4 ? kNP : 4;
  constexpr int kChunks = kNP / kC;
  constexpr int kSteps = (kK / 16) * kChunks;
  static_assert(kNP % kC == 0, "n pairs must split into chunks");
  uint32_t b[2][kC][2][2];
  auto load = [&](int s) {
    const int kk = s / kChunks, ch = s % kChunks;
    if (ch == 0) load_a(kk);
#pragma unroll
    for (int c = 0; c < kC; ++c) load_b(b[s & 1][c], kk, ch * kC + c);
  };
  load(0);
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    if (s + 1 < kSteps) load(s + 1);
    const int kk = s / kChunks, ch = s % kChunks;
#pragma unroll
    for (int c = 0; c < kC; ++c) {
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi) {
        mma16816<Element>(acc(mi, 2 * (ch * kC + c)), a_of(kk, mi), b[s & 1][c][0][0], b[s & 1][c][0][1]);
        mma16816<Element>(acc(mi, 2 * (ch * kC + c) + 1), a_of(kk, mi), b[s & 1][c][1][0], b[s & 1][c][1][1]);
      }
    }
  }
}

// acc[mi][16 x 8*kNB] += A[16 x kK] * B^T with A from a [m][k] tile (rows row0 + 16 mi ..) and B from a [n][k] tile
// (rows 0..8*kNB-1); kK = number of k columns used.
template <int kMI, int kNB, int kK, int kColsA, int kColsB, typename Element>
__device__ __forceinline__ void gemm_ss_nk_mi(float (&acc)[kMI][kNB][4], const Element* tile_a, int row0,
                                              const Element* tile_b, int lane) {
  uint32_t a[2][kMI][4];
  warp_gemm<kMI, kNB, kK, Element>(
      [&](int mi, int nb) -> float(&)[4] { return acc[mi][nb]; },
      [&](int kk) {
#pragma unroll
        for (int mi = 0; mi < kMI; ++mi) ldsm_a<kColsA>(a[kk & 1][mi], tile_a, row0 + 16 * mi, kk * 16, lane);
      },
      [&](int kk, int mi) -> const uint32_t(&)[4] { return a[kk & 1][mi]; },
      [&](uint32_t(&b)[2][2], int kk, int np) { ldsm_b_nk<kColsB>(b, tile_b, np * 16, kk * 16, lane); });
}

// acc[mi][16 x 8*kNB] += P[16 x kK] * B where P is held in registers as A fragments (pa[mi][kK/16][4]) and B comes
// from a [k][n] tile (rows 0..kK-1, cols 0..8*kNB-1).
template <int kMI, int kNB, int kK, int kColsB, typename Element>
__device__ __forceinline__ void gemm_rs_kn_mi(float (&acc)[kMI][kNB][4], const uint32_t (&pa)[kMI][kK / 16][4],
                                              const Element* tile_b, int lane) {
  warp_gemm<kMI, kNB, kK, Element>(
      [&](int mi, int nb) -> float(&)[4] { return acc[mi][nb]; }, [](int) {},
      [&](int kk, int mi) -> const uint32_t(&)[4] { return pa[mi][kk]; },
      [&](uint32_t(&b)[2][2], int kk, int np) { ldsm_b_kn<kColsB>(b, tile_b, kk * 16, np * 16, lane); });
}

// One warp-owned row block (kMI = 1) of the two above.
template <int kNB, int kK, int kColsA, int kColsB, typename Element>
__device__ __forceinline__ void gemm_ss_nk(float (&acc)[kNB][4], const Element* tile_a, int row0,
                                           const Element* tile_b, int lane) {
  uint32_t a[2][4];
  warp_gemm<1, kNB, kK, Element>(
      [&](int, int nb) -> float(&)[4] { return acc[nb]; },
      [&](int kk) { ldsm_a<kColsA>(a[kk & 1], tile_a, row0, kk * 16, lane); },
      [&](int kk, int) -> const uint32_t(&)[4] { return a[kk & 1]; },
      [&](uint32_t(&b)[2][2], int kk, int np) { ldsm_b_nk<kColsB>(b, tile_b, np * 16, kk * 16, lane); });
}
template <int kNB, int kK, int kColsB, typename Element>
__device__ __forceinline__ void gemm_rs_kn(float (&acc)[kNB][4], const uint32_t (&pa)[kK / 16][4],
                                           const Element* tile_b, int lane) {
  warp_gemm<1, kNB, kK, Element>(
      [&](int, int nb) -> float(&)[4] { return acc[nb]; }, [](int) {},
      [&](int kk, int) -> const uint32_t(&)[4] { return pa[kk]; },
      [&](uint32_t(&b)[2][2], int kk, int np) { ldsm_b_kn<kColsB>(b, tile_b, kk * 16, np * 16, lane); });
}

// acc[kMI][kNB] (rows m0 + 16 mi, columns n0 + 8 nb) += A * B with A read from a [k][m] shared tile (transposing
// ldmatrix, tile width kColsA) and B from a [k][n] shared tile (tile width kColsB); k runs over 0..kK-1.
template <int kMI, int kNB, int kK, int kColsA, int kColsB, typename Element>
__device__ __forceinline__ void gemm_tt_kn_mi(float (&acc)[kMI][kNB][4], const Element* tile_a, int m0,
                                              const Element* tile_b, int n0, int lane) {
  static_assert(kNB % 2 == 0, "n blocks come in pairs");
  constexpr int kNP = kNB / 2;
  uint32_t a[2][kMI][4];
  uint32_t b[2][kNP][2][2];
  auto load = [&](int kk) {
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi) ldsm_a_t<kColsA>(a[kk & 1][mi], tile_a, m0 + 16 * mi, kk * 16, lane);
#pragma unroll
    for (int np = 0; np < kNP; ++np) ldsm_b_kn<kColsB>(b[kk & 1][np], tile_b, kk * 16, n0 + 16 * np, lane);
  };
  load(0);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    if (kk + 1 < kK / 16) load(kk + 1);
#pragma unroll
    for (int np = 0; np < kNP; ++np) {
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi) {
        mma16816<Element>(acc[mi][2 * np], a[kk & 1][mi], b[kk & 1][np][0][0], b[kk & 1][np][0][1]);
        mma16816<Element>(acc[mi][2 * np + 1], a[kk & 1][mi], b[kk & 1][np][1][0], b[kk & 1][np][1][1]);
      }
    }
  }
}

// bar.arrive on named barrier `id`: counts this warp's threads towards the kThreads a bar.sync on `id` waits for,
// without waiting (producer / consumer hand-overs between warpgroups; device code only).
template <int kThreads>
__device__ __forceinline__ void named_barrier_arrive(int id) {
#if defined(__CUDA_ARCH__)
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "n"(kThreads) : "memory");
#endif
}

// bar.sync on named barrier `id` (1..15; 0 is __syncthreads) for kThreads threads (a multiple of 32).
template <int kThreads>
__device__ __forceinline__ void named_barrier_sync(int id) {
#if defined(__CUDA_ARCH__)
  asm volatile("bar.sync %0, %1;" ::"r"(id), "n"(kThreads) : "memory");
#elif defined(HSTU_HOST_EMULATION)  // the tests' host emulation of the kernels
  hstu_emulation_named_barrier(id, kThreads);
#endif
}

// A compiler-only barrier: no memory access moves across it. CUTLASS's mbarrier arrive / wait asm carries no memory
// clobber, so plain shared-memory accesses meant to sit after a wait or before an arrive need one.
__device__ __forceinline__ void compiler_fence() { asm volatile("" ::: "memory"); }

// A cutlass::PipelineAsync's parameters as this thread sees them: `producers` threads fill a slot, `consumers`
// release it (the sm90 kernels' hand-overs between warpgroups).
template <typename Pipe>
__device__ __forceinline__ typename Pipe::Params ws_pipeline_params(bool producer, int producers, int consumers) {
  typename Pipe::Params pp;
  pp.role = producer ? Pipe::ThreadCategory::Producer : Pipe::ThreadCategory::Consumer;
  pp.producer_arv_count = producers;
  pp.consumer_arv_count = consumers;
  return pp;
}

// Fire-and-forget float32 add of two adjacent floats (8-byte aligned) in global memory: one vector reduction on
// sm_90, two scalar ones before.
__device__ __forceinline__ void atomic_add2(float* addr, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(addr), make_float2(x, y));
#else
  atomicAdd(addr, x);
  atomicAdd(addr + 1, y);
#endif
}

// Converts a 16 x kN fp32 accumulator (kN/8 n8 blocks) into A fragments of a 16 x kN operand.
template <typename Element, int kNB>
__device__ __forceinline__ void acc_to_a(uint32_t (&pa)[kNB / 2][4], const float (&acc)[kNB][4]) {
#pragma unroll
  for (int kk = 0; kk < kNB / 2; ++kk) {
    pa[kk][0] = pack2<Element>(acc[2 * kk][0], acc[2 * kk][1]);
    pa[kk][1] = pack2<Element>(acc[2 * kk][2], acc[2 * kk][3]);
    pa[kk][2] = pack2<Element>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    pa[kk][3] = pack2<Element>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
  }
}

template <int kNB>
__device__ __forceinline__ void zero_acc(float (&acc)[kNB][4]) {
#pragma unroll
  for (int i = 0; i < kNB; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
  }
}


// Non-finite entries of loaded tiles. The products over keys (queries) multiply a masked entry by an exact zero, and
// 0 * NaN / 0 * inf is NaN, so on tiles with masked entries the kernels zero the non-finite entries of the tile a
// product reads (zero_nonfinite_rows), recompute the scores that read a zeroed entry (nonfinite_dot), and add the
// dropped terms back for the entries that are selected (add_dropped_terms): an entry a row sees propagates as IEEE
// arithmetic says, one it does not see never reaches it.

// Whether a 16-bit float (the low 16 bits of h) is infinite or NaN: exponent bits all ones.
template <typename Element>
__device__ __forceinline__ bool nonfinite_bits(uint32_t h) {
  constexpr uint32_t kExp = std::is_same_v<Element, __nv_bfloat16> ? 0x7f80u : 0x7c00u;
  return (h & kExp) == kExp;
}

__device__ __forceinline__ bool finite_f(float x) { return fabsf(x) <= 3.402823466e38f; }  // false for inf, NaN

// x rounded to Element, as float: the value an MMA operand packed from x holds.
template <typename Element>
__device__ __forceinline__ float rounded(float x) {
  if constexpr (std::is_same_v<Element, __nv_bfloat16>)
    return __bfloat162float(__float2bfloat16_rn(x));
  else
    return __half2float(__float2half_rn(x));
}

// Zeroes the non-finite entries of rows [0, kRows) of a swizzled shared tile and sets flags[row] to whether the row
// held one; returns whether this thread found any. Thread tid scans rows tid, tid + kThreads, ... whole (no flag
// needs clearing or atomics); call after the barrier that makes the tile's copies visible, and read the zeroed tile
// and the flags after the next one.
template <int kRows, int kCols, int kThreads, typename Element>
__device__ __forceinline__ bool zero_nonfinite_rows(Element* tile, uint8_t* flags, int tid) {
  bool any = false;
#pragma unroll 1
  for (int row = tid; row < kRows; row += kThreads) {
    bool bad = false;
#pragma unroll 4
    for (int col = 0; col < kCols; col += 8) {
      uint4* chunk = reinterpret_cast<uint4*>(tile + SmemTile<kCols>::offset(row, col));
      const uint4 v = *chunk;
      uint32_t w[4] = {v.x, v.y, v.z, v.w};
      bool chunk_bad = false;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const bool lo = nonfinite_bits<Element>(w[k]), hi = nonfinite_bits<Element>(w[k] >> 16);
        chunk_bad |= lo || hi;
        w[k] &= (lo ? 0xffff0000u : 0xffffffffu) & (hi ? 0x0000ffffu : 0xffffffffu);
      }
      if (chunk_bad) {
        *chunk = make_uint4(w[0], w[1], w[2], w[3]);
        bad = true;
      }
    }
    flags[row] = bad;
    any |= bad;
  }
  return any;
}

// The sum over d < kD of the terms a[d] * b[d] that have a non-finite factor (NaN, or +-inf, as IEEE arithmetic
// adds them, in any order) written into out; returns false, out unchanged, when there is none. a and b are rows in
// global memory (the originals of a zeroed tile's rows). Such a sum is the exact dot product whenever it exists: its
// finite terms cannot change a non-finite total. Off the fast path (tiles whose loads held a non-finite entry).
template <int kD, typename Element>
__device__ HSTU_NOINLINE bool nonfinite_dot(const Element* a, const Element* b, float& out) {
  float sum = 0.f;
  bool any = false;
#pragma unroll 1
  for (int d = 0; d < kD; ++d) {
    const float x = to_float<Element>(a[d]), y = to_float<Element>(b[d]);
    if (!finite_f(x) || !finite_f(y)) {
      sum += x * y;
      any = true;
    }
  }
  if (any) out = sum;
  return any;
}

// The terms acc += W B lost to a zeroed tile B, added back: W is a warp's 16 x 8 kKB fp32 operand in accumulator
// layout (w[kb][e]: row g + 8 (e >> 1), k = 8 kb + 2 t + (e & 1)), B the tile (row k, columns 8 nb + 2 t + (e & 1)
// of acc[nb][e]) whose rows flagged in flags[k] had non-finite entries zeroed; rows(k) is the original row k (global
// memory, offset to acc's first column; StridedRows / CachedRows of cached.h). For each flagged k and each of this thread's two rows whose
// (row, k) entry selected(kb, e) keeps (evaluated by the thread holding w[kb][e], which passes W[row][k] on by a quad
// shuffle), acc += W[row][k] * b for every non-finite b of row k, with W rounded as the MMA operand holds it.
// Entries not selected add nothing: W is zero there, and 0 * inf would be NaN. Off the fast path.
template <typename Element, int kNB, int kKB, typename Rows, typename Selected>
__device__ __forceinline__ void add_dropped_terms(float (&acc)[kNB][4], const float (&w)[kKB][4],
                                                  const uint8_t* flags, const Rows& rows, Selected&& selected,
                                                  int lane) {
  const int t = lane & 3;
#pragma unroll 1
  for (int k = 0; k < 8 * kKB; ++k) {
    if (!flags[k]) continue;  // the same flag for the whole block
    const Element* row = rows(k);
    const int src = (lane & ~3) | ((k & 7) >> 1);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float wv = 0.f;
      int sel = 0;
#pragma unroll
      for (int kb = 0; kb < kKB; ++kb) {
#pragma unroll
        for (int par = 0; par < 2; ++par) {
          if (8 * kb + 2 * t + par == k) {
            wv = w[kb][2 * h + par];
            sel = selected(kb, 2 * h + par) ? 1 : 0;
          }
        }
      }
      wv = __shfl_sync(0xffffffffu, wv, src);
      sel = __shfl_sync(0xffffffffu, sel, src);
      if (!sel) continue;
      wv = rounded<Element>(wv);
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
        for (int par = 0; par < 2; ++par) {
          const float b = to_float<Element>(row[8 * nb + 2 * t + par]);
          if (!finite_f(b)) acc[nb][2 * h + par] += wv * b;
        }
      }
    }
  }
}

// dst[d] += w * b[d] (float32 atomics) for the non-finite entries b[d] of a row of kD (global memory): the terms of
// an atomically accumulated product that a zeroed tile row dropped. Off the fast path.
template <int kD, typename Element>
__device__ HSTU_NOINLINE void add_dropped_row(float* dst, float w, const Element* b) {
#pragma unroll 1
  for (int d = 0; d < kD; ++d) {
    const float x = to_float<Element>(b[d]);
    if (!finite_f(x)) atomicAdd(dst + d, w * x);
  }
}

// Stores a warp's 16 x kD fp32 accumulator (times scale) as Element rows row_base + {g, g+8}, rows >= valid_rows
// skipped. gmem points at row 0 of the tile.
template <typename Element, int kNB>
__device__ __forceinline__ void store_acc_rows(Element* gmem, int64_t row_stride, const float (&acc)[kNB][4],
                                               float scale, int row_base, int valid_rows, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row_base + g + half * 8;
    if (row < valid_rows) {
      Element* dst = gmem + row * row_stride;
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
        const uint32_t v = pack2<Element>(acc[nb][half * 2] * scale, acc[nb][half * 2 + 1] * scale);
        *reinterpret_cast<uint32_t*>(dst + nb * 8 + 2 * t) = v;
      }
    }
  }
}

}  // namespace hstu
