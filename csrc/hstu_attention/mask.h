// The visibility rule of the op contract, per element and per tile (conservative tile tests used to skip work).
#pragma once

#include <type_traits>

namespace hstu {

struct SeqMask {
  int L;        // sequence length
  int c;        // contextual rows
  int h;        // history end = L - num_targets
  int w;        // window (< 0: none)
  int g;        // target group size
  bool causal;

  __device__ __forceinline__ bool visible(int i, int j) const {
    if (i >= L || j >= L) return false;
    if (!causal) return w < 0 || abs(i - j) <= w;
    if (i < c) return j < h;
    if (i < h) return j <= i && (w < 0 || i - j <= w || j < c);
    if (j < h) return w < 0 || h - j <= w || j < c;
    const int gs = h + ((i - h) / g) * g;
    return j >= gs && j <= i;
  }

  // Whether any (i, j) with m0 <= i < m1, n0 <= j < n1 may be visible (false only when none is).
  __device__ __forceinline__ bool tile_any(int m0, int m1, int n0, int n1) const {
    m1 = min(m1, L);
    n1 = min(n1, L);
    if (m0 >= m1 || n0 >= n1) return false;
    if (!causal) return w < 0 || (n0 <= m1 - 1 + w && n1 - 1 >= m0 - w);
    if (m0 < c && n0 < h) return true;
    int r0 = max(m0, c), r1 = min(m1, h);
    if (r0 < r1 && n0 <= r1 - 1 && (w < 0 || n0 < c || n1 - 1 >= r0 - w)) return true;
    r0 = max(m0, h);
    r1 = m1;
    if (r0 < r1) {
      if (n0 < h && (w < 0 || n0 < c || n1 - 1 >= h - w)) return true;
      const int gs = h + ((r0 - h) / g) * g;
      if (n0 <= r1 - 1 && n1 - 1 >= gs) return true;
    }
    return false;
  }

  // Whether every (i, j) of the tile is inside the sequence and visible (false when unsure).
  __device__ __forceinline__ bool tile_full(int m0, int m1, int n0, int n1) const {
    if (m1 > L || n1 > L) return false;
    if (!causal) return w < 0 || max(m1 - 1 - n0, n1 - 1 - m0) <= w;
    if (m0 >= c && m1 <= h) {
      if (n1 - 1 > m0) return false;
      if (w < 0 || n1 <= c) return true;
      return (m1 - 1) - n0 <= w;
    }
    return false;
  }

  // Whether the tile's rule reduces to j <= i with every element inside the sequence: causal, no window, rows of the
  // history (no contexts, no targets among them). The diagonal tiles of plain causal attention; a short sequence
  // has many of them (8 of a sequence's 36 forward tile steps at 1024 tokens with 128-row / 128-key tiles).
  __device__ __forceinline__ bool tile_causal_only(int m0, int m1, int n0, int n1) const {
    (void)n0;
    return causal && w < 0 && m0 >= c && m1 <= h && m1 <= L && n1 <= L;
  }

  // The first key tile after tile n (tiles of bn keys, n < n_tiles) that rows [m0, m1) may see; n_tiles if none.
  __device__ __forceinline__ int next_key_tile(int n, int n_tiles, int bn, int m0, int m1) const {
    for (++n; n < n_tiles; ++n)
      if (tile_any(m0, m1, n * bn, n * bn + bn)) return n;
    return n_tiles;
  }

  // The first query tile after tile m (tiles of bm rows) that may see keys [n0, n1); m_tiles if none.
  __device__ __forceinline__ int next_query_tile(int m, int m_tiles, int bm, int n0, int n1) const {
    for (++m; m < m_tiles; ++m)
      if (tile_any(m * bm, m * bm + bm, n0, n1)) return m;
    return m_tiles;
  }

  // Exclusive upper bound of the keys any row of [m0, m1) may see.
  __device__ __forceinline__ int key_end(int m0, int m1) const {
    if (causal && m0 >= c) return min(m1, L);
    return L;
  }
};

// How the pointwise stage of a tile applies the mask: not at all (every element inside the sequence and visible),
// as j <= i alone (tile_causal_only), or by the exact per-element rule (visible, bounds).
enum class TileMask { kNone, kCausal, kExact };
template <TileMask kMask>
using TileMaskTag = std::integral_constant<TileMask, kMask>;

// The pointwise stage of a (rows [m0, m1) x keys [n0, n1)) tile: f(TileMaskTag<kNone>) when the tile is wholly inside
// the sequence and visible, f(TileMaskTag<kCausal>) when its rule is j <= i (only with kCausalPath: the kernels whose
// diagonal tiles weigh enough to carry a third copy), else f(TileMaskTag<kExact>). Unrolled copies behind a uniform
// branch instead of mask code predicated onto every element.
// kZeroOutside: the caller's values outside the sequence are exactly zero whatever the path (query and key rows
// zero-filled past the end, no rab: S = 0 there, SiLU(0) = 0, dP = 0), so only the part of the tile inside the
// sequence is tested. A jagged batch's partial last tiles then take the unmasked (or j <= i) copy too.
template <bool kCausalPath = false, bool kZeroOutside = false, typename F>
__device__ __forceinline__ void with_tile_mask(const SeqMask& mk, int m0, int m1, int n0, int n1, F&& f) {
  if constexpr (kZeroOutside) {
    m1 = min(m1, mk.L);
    n1 = min(n1, mk.L);
  }
  if (mk.tile_full(m0, m1, n0, n1)) {
    f(TileMaskTag<TileMask::kNone>{});
    return;
  }
  if constexpr (kCausalPath) {
    if (mk.tile_causal_only(m0, m1, n0, n1)) {
      f(TileMaskTag<TileMask::kCausal>{});
      return;
    }
  }
  f(TileMaskTag<TileMask::kExact>{});
}

}  // namespace hstu
