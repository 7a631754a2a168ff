// Tile shapes per head dim (launch.h; the host emulation used by the tests includes it too).
#pragma once

namespace hstu {

template <int kHeadDim>
struct TileConfig {
  // forward: warps, 16-row blocks per warp, key tile. Two row blocks per warp halve the shared-memory reads per
  // MMA; head dim 256 keeps one (its output accumulator alone takes 128 registers per thread).
  static constexpr int kFwdWarps = 4;
  static constexpr int kFwdMI = kHeadDim >= 256 ? 1 : 2;
  static constexpr int kFwdBlockN = kHeadDim >= 128 ? 32 : 64;
  static constexpr int kFwdStages = kHeadDim >= 256 ? 2 : 4;
  // dk/dv: warps (x16 keys), query tile; head dim 256 runs dv and dk in two passes to fit registers
  static constexpr int kDkDvWarps = 4;
  static constexpr int kDkDvBlockM = kHeadDim >= 128 ? 32 : 64;
  static constexpr bool kDkDvSplit = kHeadDim >= 256;
  // atomic-dq path at head dim 256: one pass, 8 warps, two per 16-key block splitting the head dim (kDSplit = 2)
  static constexpr int kDkDvOnePassWarps = 8;
  static constexpr int kDkDvStages = kHeadDim >= 256 ? 2 : (kHeadDim >= 64 ? 3 : 4);
  // dq: warps, 16-row blocks per warp, key tile
  static constexpr int kDqWarps = 4;
  static constexpr int kDqMI = kHeadDim >= 256 ? 1 : 2;
  static constexpr int kDqBlockN = kHeadDim >= 64 ? 32 : 64;
  static constexpr int kDqStages = kHeadDim >= 256 ? 2 : (kHeadDim >= 128 ? 3 : 4);
};

}  // namespace hstu
