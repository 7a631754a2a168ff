#pragma once
#include "../../emu_core.hpp"
namespace cute {
struct uint128_t { uint32_t w[4]; };
// ldmatrix x4: lane l addresses row (l & 7) of matrix (l >> 3) (8 consecutive 16-bit elements). Every lane posts
// its row address, then reads its four result words through `word(rows, i, lane)` once all addresses are in.
template <typename Word>
inline void ldmatrix_x4(const uint128_t& src, uint32_t& d0, uint32_t& d1, uint32_t& d2, uint32_t& d3, Word word) {
  auto& W = emu::g_warps[emu::warp()];
  const int T = emu::lane();
  W.addr[T] = &src;
  emu::warp_sync();
  uint32_t* d[4] = {&d0, &d1, &d2, &d3};
  uint32_t out[4];
  for (int i = 0; i < 4; ++i) out[i] = word(W.addr, i, T);
  emu::warp_sync();
  for (int i = 0; i < 4; ++i) *d[i] = out[i];
}
inline const uint16_t* row_at(const void* const* rows, int r) { return static_cast<const uint16_t*>(rows[r]); }
struct SM75_U32x4_LDSM_N {
  static void copy(const uint128_t& src, uint32_t& d0, uint32_t& d1, uint32_t& d2, uint32_t& d3) {
    ldmatrix_x4(src, d0, d1, d2, d3, [](const void* const* rows, int i, int T) {
      const uint16_t* row = row_at(rows, i * 8 + T / 4);
      return uint32_t(row[2 * (T % 4)]) | (uint32_t(row[2 * (T % 4) + 1]) << 16);
    });
  }
};
struct SM75_U16x8_LDSM_T {  // transposed: the lane's two halves come from two rows, same column
  static void copy(const uint128_t& src, uint32_t& d0, uint32_t& d1, uint32_t& d2, uint32_t& d3) {
    ldmatrix_x4(src, d0, d1, d2, d3, [](const void* const* rows, int i, int T) {
      return uint32_t(row_at(rows, i * 8 + 2 * (T % 4))[T / 4]) |
             (uint32_t(row_at(rows, i * 8 + 2 * (T % 4) + 1)[T / 4]) << 16);
    });
  }
};
}  // namespace cute
