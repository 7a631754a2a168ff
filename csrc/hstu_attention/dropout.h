// Attention dropout: the keep mask as a pure function of (seed, batch b, head h, row i, column j), so that the
// forward, dk/dv and dq kernels (and the debug mask kernel) regenerate identical bits whatever their tiling.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"; the generator behind
// curand_Philox4x32_10) with key = (seed & 0xffffffff, seed >> 32) and counter
//   (colkey(j), rowkey(i), b * H + h, 0),  rowkey(i) = (i >> 4) * 8 + (i & 7)  (likewise colkey)
// gives four 32-bit words for the 2 x 2 positions {i0, i0 + 8} x {j0, j0 + 8} (i0 = i & ~8, j0 = j & ~8):
//   word 2 * bit3(i) + bit3(j)  belongs to (i, j).
// Position (i, j) is kept when word >= threshold, threshold = min(ceil(p * 2^32), 2^32 - 1): "uniform >= p" with the
// uniform = word / 2^32. The 16 x 16-aligned 2 x 2 grouping matches both accumulator layouts of the m16n8k16 MMA:
// a thread's elements (i, j), (i, j + 8), (i + 8, j), (i + 8, j + 8) (two n8 blocks of one 16-column pair,
// query-major in the forward / dq kernels, key-major in the dk/dv kernel) come from one Philox call, so no
// random word is wasted and no shuffle is needed. hstu/ops/hstu_attention/cuda.py has the same function in
// PyTorch (`dropout_keep_mask_reference`).
#pragma once

#include <cstdint>

#include "hstu.h"

namespace hstu {

struct Philox4 {
  uint32_t x, y, z, w;
};

// Philox4x32-10: 10 rounds, key bumped between rounds (Random123 / cuRAND constants).
__host__ __device__ __forceinline__ Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                          uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;  // one mul.wide.u32 each
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    if (r < 9) {
      k0 += kW0;
      k1 += kW1;
    }
  }
  return Philox4{c0, c1, c2, c3};
}

// Counter word of a row (or column) whose bit 3 is clear: drops bit 3, so {i, i + 8} share one counter.
__host__ __device__ __forceinline__ uint32_t dropout_key16(int i) {
  return (static_cast<uint32_t>(i) >> 4 << 3) | (static_cast<uint32_t>(i) & 7u);
}

// The four words of positions {i0, i0 + 8} x {j0, j0 + 8} (bit 3 of i0 and j0 clear):
// .x = (i0, j0), .y = (i0, j0 + 8), .z = (i0 + 8, j0), .w = (i0 + 8, j0 + 8).
__host__ __device__ __forceinline__ Philox4 dropout_block(const AttnParams& p, uint32_t bh, int i0, int j0) {
  return philox4x32_10(dropout_key16(j0), dropout_key16(i0), bh, 0u, p.dropout_seed_lo, p.dropout_seed_hi);
}

__host__ __device__ __forceinline__ uint32_t dropout_keep(const AttnParams& p, uint32_t word) {
  return word >= p.dropout_threshold ? 1u : 0u;
}

// Keep flag of one position (the debug mask kernel; the attention kernels use the fragment helpers below).
__host__ __device__ __forceinline__ bool dropout_keep_at(const AttnParams& p, uint32_t bh, int i, int j) {
  const Philox4 r = dropout_block(p, bh, i & ~8, j & ~8);
  const int word = ((i >> 3) & 1) * 2 + ((j >> 3) & 1);
  const uint32_t x = word == 0 ? r.x : word == 1 ? r.y : word == 2 ? r.z : r.w;
  return dropout_keep(p, x) != 0;
}

// Keep flags of a warp's 16 x (8 kNB) accumulator acc[nb][e] with rows row0 + g + 8 (e >> 1) and columns
// col0 + 8 nb + 2 t + (e & 1) (g = lane / 4, t = lane % 4); row0 and col0 multiples of 16. The rows are queries and the
// columns keys (forward / dq layout), or with kKeyRows the transpose: rows keys, columns queries (dk/dv layout).
// Bit 4 nb + e of the result is the flag of acc[nb][e]. One Philox block covers a (query, key) 2 x 2 of 8-offsets:
// words x, y, z, w = (i, j), (i, j + 8), (i + 8, j), (i + 8, j + 8).
template <int kNB, bool kKeyRows>
__host__ __device__ __forceinline__ uint32_t dropout_bits(const AttnParams& p, uint32_t bh, int row0, int col0,
                                                          int lane) {
  static_assert(kNB % 2 == 0 && kNB * 4 <= 32, "16-column pairs, at most 32 flags");
  const int g = lane >> 2, t = lane & 3;
  uint32_t bits = 0;
#pragma unroll
  for (int np = 0; np < kNB / 2; ++np) {
#pragma unroll
    for (int e1 = 0; e1 < 2; ++e1) {
      const int row = row0 + g, col = col0 + 16 * np + 2 * t + e1;  // both with bit 3 clear
      const Philox4 r = kKeyRows ? dropout_block(p, bh, col, row) : dropout_block(p, bh, row, col);
      const uint32_t next_col = kKeyRows ? r.z : r.y;  // (row, col + 8)
      const uint32_t next_row = kKeyRows ? r.y : r.z;  // (row + 8, col)
      bits |= dropout_keep(p, r.x) << ((2 * np) * 4 + e1);
      bits |= dropout_keep(p, next_col) << ((2 * np + 1) * 4 + e1);
      bits |= dropout_keep(p, next_row) << ((2 * np) * 4 + 2 + e1);
      bits |= dropout_keep(p, r.w) << ((2 * np + 1) * 4 + 2 + e1);
    }
  }
  return bits;
}

template <int kNB>
__host__ __device__ __forceinline__ uint32_t dropout_bits_qk(const AttnParams& p, uint32_t bh, int row0, int col0,
                                                             int lane) {
  return dropout_bits<kNB, false>(p, bh, row0, col0, lane);
}

template <int kNB>
__host__ __device__ __forceinline__ uint32_t dropout_bits_kq(const AttnParams& p, uint32_t bh, int key0, int q0,
                                                             int lane) {
  return dropout_bits<kNB, true>(p, bh, key0, q0, lane);
}

// Keep flags of a warp's kMI row blocks (rows row0 + 16 mi + ..., keys col0 + ...) in the forward / dq layout,
// packed: bit mi * kBN / 2 + 4 nb + e of keep (32-bit words) belongs to acc[mi][nb][e]. kBN / 2 (16 or 32) flags
// per row block, so a block never straddles a word.
template <int kMI, int kBN>
__host__ __device__ __forceinline__ void dropout_bits_qk_mi(uint32_t (&keep)[(kMI * (kBN / 2) + 31) / 32],
                                                            const AttnParams& p, uint32_t bh, int row0, int col0,
                                                            int lane) {
  constexpr int kKeepBits = kBN / 2;
#pragma unroll
  for (int w32 = 0; w32 < (kMI * kKeepBits + 31) / 32; ++w32) keep[w32] = 0u;
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi) {
    const uint32_t bits = dropout_bits_qk<kBN / 8>(p, bh, row0 + 16 * mi, col0, lane);
    keep[mi * kKeepBits / 32] |= bits << (mi * kKeepBits % 32);
  }
}

// Flag `bit` of a packed array of keep flags (bits 32 w .. 32 w + 31 in keep[w]).
template <int kWords>
__host__ __device__ __forceinline__ bool dropout_flag(const uint32_t (&keep)[kWords], int bit) {
  return (keep[bit / 32] >> (bit % 32)) & 1u;
}

// Debug kernel: out[b, h, i, j] = keep flag, (B, H, N, N) contiguous bool. Internal linkage: every forward
// translation unit launches its own copy (see HSTU_INSTANTIATE_FWD), so no kernel symbol is shared between units.
template <int kUnused = 0>
static __global__ void __launch_bounds__(256)
    hstu_dropout_keep_mask_kernel(const AttnParams p, bool* __restrict__ out) {
  const int64_t n = p.max_seqlen;
  const int64_t total = static_cast<int64_t>(p.batch) * p.heads * n * n;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(idx % n);
    const int i = static_cast<int>((idx / n) % n);
    const uint32_t bh = static_cast<uint32_t>(idx / (n * n));  // b * H + h
    out[idx] = dropout_keep_at(p, bh, i, j);
  }
}

}  // namespace hstu
