#pragma once
#include "copy_sm75.hpp"
namespace cute {
inline float emu_bf16(uint16_t b) { uint32_t u = uint32_t(b) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline float emu_f16(uint16_t b) { __half h; std::memcpy(&h, &b, 2); return __half2float(h); }
template <bool kBf16>
struct EmuMma {
  static void fma(float& d0, float& d1, float& d2, float& d3, const uint32_t& a0, const uint32_t& a1,
                  const uint32_t& a2, const uint32_t& a3, const uint32_t& b0, const uint32_t& b1, const float& c0,
                  const float& c1, const float& c2, const float& c3) {
    auto& W = emu::g_warps[emu::warp()];
    const int T = emu::lane();
    W.a[T][0] = a0; W.a[T][1] = a1; W.a[T][2] = a2; W.a[T][3] = a3;
    W.b[T][0] = b0; W.b[T][1] = b1;
    emu::warp_sync();
    auto cv = [](uint16_t x) { return kBf16 ? emu_bf16(x) : emu_f16(x); };
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
      for (int r = 0; r < 4; ++r) {
        A[rows[r]][cols[r]] = cv(W.a[l][r] & 0xffff);
        A[rows[r]][cols[r] + 1] = cv(W.a[l][r] >> 16);
      }
      for (int r = 0; r < 2; ++r) {
        B[2 * t + 8 * r][g] = cv(W.b[l][r] & 0xffff);
        B[2 * t + 8 * r + 1][g] = cv(W.b[l][r] >> 16);
      }
    }
    emu::warp_sync();
    const int g = T >> 2, t = T & 3;
    float out[4] = {c0, c1, c2, c3};
    const int orow[4] = {g, g, g + 8, g + 8}, ocol[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int e = 0; e < 4; ++e) {
      float s = 0.f;
      for (int k = 0; k < 16; ++k) s += A[orow[e]][k] * B[k][ocol[e]];
      out[e] += s;
    }
    d0 = out[0]; d1 = out[1]; d2 = out[2]; d3 = out[3];
  }
};
using SM80_16x8x16_F32BF16BF16F32_TN = EmuMma<true>;
using SM80_16x8x16_F32F16F16F32_TN = EmuMma<false>;
}  // namespace cute
