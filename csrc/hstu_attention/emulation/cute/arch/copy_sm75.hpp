#pragma once
#include "../../emu_core.hpp"
namespace cute {
struct uint128_t { uint32_t w[4]; };
// ldmatrix x4: lane l addresses row (l & 7) of matrix (l >> 3) (8 consecutive 16-bit elements).
struct SM75_U32x4_LDSM_N {
  static void copy(const uint128_t& src, uint32_t& d0, uint32_t& d1, uint32_t& d2, uint32_t& d3) {
    auto& W = emu::g_warps[emu::warp()];
    const int T = emu::lane();
    W.addr[T] = &src;
    emu::warp_sync();
    uint32_t* d[4] = {&d0, &d1, &d2, &d3};
    uint32_t out[4];
    for (int i = 0; i < 4; ++i) {
      const uint16_t* row = static_cast<const uint16_t*>(W.addr[i * 8 + T / 4]);
      out[i] = uint32_t(row[2 * (T % 4)]) | (uint32_t(row[2 * (T % 4) + 1]) << 16);
    }
    emu::warp_sync();
    for (int i = 0; i < 4; ++i) *d[i] = out[i];
  }
};
struct SM75_U16x8_LDSM_T {
  static void copy(const uint128_t& src, uint32_t& d0, uint32_t& d1, uint32_t& d2, uint32_t& d3) {
    auto& W = emu::g_warps[emu::warp()];
    const int T = emu::lane();
    W.addr[T] = &src;
    emu::warp_sync();
    uint32_t* d[4] = {&d0, &d1, &d2, &d3};
    uint32_t out[4];
    for (int i = 0; i < 4; ++i) {
      const uint16_t* r0 = static_cast<const uint16_t*>(W.addr[i * 8 + 2 * (T % 4)]);
      const uint16_t* r1 = static_cast<const uint16_t*>(W.addr[i * 8 + 2 * (T % 4) + 1]);
      out[i] = uint32_t(r0[T / 4]) | (uint32_t(r1[T / 4]) << 16);
    }
    emu::warp_sync();
    for (int i = 0; i < 4; ++i) *d[i] = out[i];
  }
};
}  // namespace cute
