// Host self-checks of the layout assumptions the Hopper kernels and the launch order rely on: pure layout algebra
// and index arithmetic, no GPU. Only .ci/compile_check.sh includes this header (it builds a small host program that
// runs every check for every instantiated shape); no kernel or launcher does. Each check returns an empty string
// when it passes, else what failed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <cute/tensor.hpp>

#include "bwd_traits_sm90.h"
#include "fwd_traits_sm90.h"
#include "sm90_common.h"
#include "tile_scheduler.h"

namespace hstu {

// Host check of grouped_tile_coords: over a grid of shapes and group sizes (partial last groups included) the items
// cover every (tile, sequence, head) exactly once, a group's items come tile by tile (longest first with reverse),
// and group = 1 is pair after pair with tiles in order. Empty string when it passes.
inline std::string check_grouped_schedule() {
  for (int tiles : {1, 2, 3, 8, 33})
    for (int batch : {1, 2, 5, 13})
      for (int heads : {1, 3, 4})
        for (int group : {1, 2, 7, 16, 64})
          for (bool reverse : {false, true}) {
            const int items = tiles * batch * heads;
            std::vector<int> seen(items, 0);
            int prev_pair_group = -1, prev_t = 0;
            const std::string at = " (tiles " + std::to_string(tiles) + ", batch " + std::to_string(batch) +
                                   ", heads " + std::to_string(heads) + ", group " + std::to_string(group) + ")";
            for (int item = 0; item < items; ++item) {
              const TileCoords c = grouped_tile_coords(item, tiles, batch, heads, group, reverse);
              if (c.tile < 0 || c.tile >= tiles || c.batch < 0 || c.batch >= batch || c.head < 0 || c.head >= heads)
                return "item " + std::to_string(item) + " out of range" + at;
              if (seen[(c.batch * heads + c.head) * tiles + c.tile]++) return "item visited twice" + at;
              const int pair = c.batch * heads + c.head, t = reverse ? tiles - 1 - c.tile : c.tile;
              if (pair / group == prev_pair_group && t < prev_t) return "group not tile by tile" + at;
              if (pair / group < prev_pair_group) return "groups out of order" + at;
              prev_pair_group = pair / group;
              prev_t = t;
              if (group == 1 && item != pair * tiles + t) return "group 1 is not pair after pair" + at;
            }
          }
  return "";
}

namespace sm90 {

// ---- shared tiles and loads (sm90_common.h)
// Host-side self-check (pure layout algebra, no GPU), returns an empty string when it passes.
// (2) A shared tile, addressed as load_rows_async does (through a swizzled smem tensor on a 1024-byte aligned base):
//     each 8-column chunk is 8 contiguous elements at a 16-byte aligned offset, and (row, col) -> offset is a
//     bijection onto [0, rows * cols).
template <typename Layout, typename T>
inline std::string check_sm90_smem_tile(bool transposed, int rows, int cols) {
  static_assert(sizeof(T) == 2, "16-bit elements");
  std::vector<uint16_t> storage(rows * cols + 1024);
  T* base = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(storage.data()) + 1023) & ~uintptr_t(1023));
  auto s = cute::make_tensor(cute::make_smem_ptr(base), Layout{});
  std::vector<int> seen(rows * cols, 0);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; c += 8) {
      const T* p0 = transposed ? &s(c, r) : &s(r, c);
      const long off0 = p0 - base;
      if (off0 % 8 != 0) return "chunk not 16-byte aligned";
      for (int k = 0; k < 8; ++k) {
        const T* pk = transposed ? &s(c + k, r) : &s(r, c + k);
        const long off = pk - base;
        if (off != off0 + k) return "chunk not contiguous";
        if (off < 0 || off >= rows * cols) return "offset out of the tile";
        seen[off]++;
      }
    }
  for (int x : seen)
    if (x != 1) return "not a bijection";
  return "";
}

// (3) load_rows_async's addressing with kThreads threads: every round's chunk address (one swizzled address per
//     phase plus compile-time offsets) is the tensor's own &s(row, col), and the rounds copy each chunk once.
template <typename Layout, typename T, int kRows, int kCols, int kThreads, bool kTransposed>
inline std::string check_row_load_plan() {
  using Plan = RowLoadPlan<kRows, kCols, kThreads>;
  std::vector<uint16_t> storage(kRows * kCols + 1024);
  T* base = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(storage.data()) + 1023) & ~uintptr_t(1023));
  auto s = cute::make_tensor(cute::make_smem_ptr(base), Layout{});
  std::vector<int> seen(kRows * kCols / 8, 0);
  for (int tid = 0; tid < kThreads; ++tid)
    for (int phase = 0; phase < Plan::kPhases; ++phase)
      for (int period = 0; period < Plan::kRounds / Plan::kPhases; ++period) {
        const int r = Plan::phase_row(tid, phase) + Plan::period_rows(period), c = Plan::col(tid);
        if (r >= kRows) return "round row outside the tile";
        const T* want = kTransposed ? &s(c, r) : &s(r, c);
        if (Plan::template chunk_ptr<kTransposed>(s, tid, phase, period) != want)
          return "round address != tensor address (thread " + std::to_string(tid) + ", row " + std::to_string(r) + ")";
        seen[r * (kCols / 8) + c / 8]++;
      }
  for (int x : seen)
    if (x != 1) return "rounds do not copy each chunk once";
  return "";
}

// ---- forward (fwd_traits_sm90.h, mainloop_fwd_sm90.h, epilogue_fwd_sm90.h)
// Host-side self-checks of the layout assumptions above (pure layout algebra, no GPU; .ci/compile_check.sh runs them
// for every instantiated shape). Each returns an empty string when it passes.
// (1) P's A-operand fragment enumerates the same (row, key) as S's accumulator fragment, S rows lie in the thread's
//     warpgroup, and O accumulator values 2e, 2e + 1 are adjacent columns (c even) of one row.
template <typename Tr>
inline std::string check_sm90_fragments() {
  using namespace cute;
  typename Tr::MmaS mma_s;
  typename Tr::MmaO mma_o;
  auto cS = make_identity_tensor(Shape<typename Tr::BM, typename Tr::BN>{});
  auto cO = make_identity_tensor(Shape<typename Tr::BM, typename Tr::HD>{});
  for (int t = 0; t < Tr::kThreads; ++t) {
    auto thr_s = mma_s.get_thread_slice(t);
    auto thr_o = mma_o.get_thread_slice(t);
    auto tScS = thr_s.partition_C(cS);
    auto tOcP = thr_o.partition_A(cS);  // (row, key) of each P operand value
    auto tOcO = thr_o.partition_C(cO);
    if (size(tScS) != size(tOcP)) return "P/S fragment sizes differ";
    for (int e = 0; e < size(tScS); ++e) {
      if (get<0>(tScS(e)) != get<0>(tOcP(e)) || get<1>(tScS(e)) != get<1>(tOcP(e)))
        return "P operand order != S accumulator order at thread " + std::to_string(t) + " value " +
               std::to_string(e);
      if (get<0>(tScS(e)) / 64 != t / 128) return "S row outside the thread's warpgroup";
    }
    for (int e = 0; e + 1 < size(tOcO); e += 2) {
      if (get<0>(tOcO(e)) != get<0>(tOcO(e + 1)) || get<1>(tOcO(e)) + 1 != get<1>(tOcO(e + 1)) ||
          get<1>(tOcO(e)) % 2 != 0)
        return "O accumulator pair not adjacent at thread " + std::to_string(t);
      if (get<0>(tOcO(e)) / 64 != t / 128) return "O row outside the thread's warpgroup";
    }
  }
  return "";
}

template <typename Tr>
inline std::string check_sm90_traits() {
  using T = typename Tr::T;
  std::string e = check_sm90_fragments<Tr>();
  if (e.empty()) e = check_sm90_smem_tile<typename Tr::SmemLayoutQ, T>(false, Tr::kBlockM, Tr::kHeadDim);
  if (e.empty()) {  // the epilogue's staging offsets
    std::vector<uint16_t> storage(Tr::kSizeQ + 1024);
    T* q = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(storage.data()) + 1023) & ~uintptr_t(1023));
    auto sQ = cute::make_tensor(cute::make_smem_ptr(q), typename Tr::SmemLayoutQ{});
    for (int r = 0; r < Tr::kBlockM && e.empty(); ++r)
      for (int c = 0; c < Tr::kHeadDim; ++c)
        if (&sQ(r, c) - q != q_tile_offset<Tr::kBlockM>(r, c)) {
          e = "q_tile_offset != SmemLayoutQ at (" + std::to_string(r) + ", " + std::to_string(c) + ")";
          break;
        }
  }
  if (e.empty()) e = check_sm90_smem_tile<typename Tr::SmemLayoutK, T>(false, Tr::kBlockN, Tr::kHeadDim);
  if (e.empty()) e = check_sm90_smem_tile<typename Tr::SmemLayoutVt, T>(true, Tr::kBlockN, Tr::kHeadDim);
  // the loads of both kernels: all threads (hstu_fwd_sm90_kernel), the producer warpgroup (the ws kernel)
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, D = Tr::kHeadDim, NT = Tr::kThreads;
  if (e.empty()) e = check_row_load_plan<typename Tr::SmemLayoutQ, T, BM, D, NT, false>();
  if (e.empty()) e = check_row_load_plan<typename Tr::SmemLayoutK, T, BN, D, NT, false>();
  if (e.empty()) e = check_row_load_plan<typename Tr::SmemLayoutVt, T, BN, D, NT, true>();
  if (e.empty()) e = check_row_load_plan<typename Tr::SmemLayoutQ, T, BM, D, 128, false>();
  if (e.empty()) e = check_row_load_plan<typename Tr::SmemLayoutK, T, BN, D, 128, false>();
  if (e.empty()) e = check_row_load_plan<typename Tr::SmemLayoutVt, T, BN, D, 128, true>();
  return e;
}

// ---- backward (bwd_traits_sm90.h, mainloop_bwd_sm90.h, epilogue_bwd_sm90.h)
// Host-side self-checks of the layout assumptions above (pure layout algebra, no GPU; .ci/compile_check.sh runs them
// for every instantiated shape). Each returns an empty string when it passes.
// (1) Fragments: the A operand of dV / dK enumerates the same (key, query) as the accumulator of S^T / dP^T; S^T
//     keys lie in the thread's warpgroup; accumulator values 2e, 2e + 1 are adjacent columns (even first) of one row
//     for S^T (the dS^T pair stores), dK / dV (epilogue; rows in the thread's warpgroup) and dQ (the reductions).
template <typename Tr>
inline std::string check_sm90_bwd_fragments() {
  using namespace cute;
  typename Tr::MmaSdP mma_s;
  typename Tr::MmaKV mma_kv;
  typename Tr::MmaDQ mma_dq;
  auto cS = make_identity_tensor(Shape<typename Tr::BN, typename Tr::BM>{});
  auto cKV = make_identity_tensor(Shape<typename Tr::BN, typename Tr::HD>{});
  auto cDQ = make_identity_tensor(Shape<typename Tr::BM, typename Tr::DQC>{});
  auto pairs_ok = [](auto const& frag, int& bad) {
    for (int e = 0; e + 1 < size(frag); e += 2) {
      if (get<0>(frag(e)) != get<0>(frag(e + 1)) || get<1>(frag(e)) + 1 != get<1>(frag(e + 1)) ||
          get<1>(frag(e)) % 2 != 0) {
        bad = e;
        return false;
      }
    }
    return true;
  };
  if (size(mma_dq) != 128) return "dQ MMA is not one warpgroup";
  for (int t = 0; t < Tr::kThreads; ++t) {
    auto thr_s = mma_s.get_thread_slice(t);
    auto thr_kv = mma_kv.get_thread_slice(t);
    auto tScS = thr_s.partition_C(cS);
    auto tKVcP = thr_kv.partition_A(cS);  // (key, query) of each P^T / dS^T operand value
    auto tKVcKV = thr_kv.partition_C(cKV);
    if (size(tScS) != size(tKVcP)) return "P^T/S^T fragment sizes differ";
    int bad = 0;
    for (int e = 0; e < size(tScS); ++e) {
      if (get<0>(tScS(e)) != get<0>(tKVcP(e)) || get<1>(tScS(e)) != get<1>(tKVcP(e)))
        return "P^T operand order != S^T accumulator order at thread " + std::to_string(t) + " value " +
               std::to_string(e);
      if (get<0>(tScS(e)) / 64 != t / 128) return "S^T key outside the thread's warpgroup";
    }
    if (!pairs_ok(tScS, bad)) return "S^T accumulator pair not adjacent at thread " + std::to_string(t);
    if (!pairs_ok(tKVcKV, bad)) return "dK/dV accumulator pair not adjacent at thread " + std::to_string(t);
    for (int e = 0; e < size(tKVcKV); ++e)
      if (get<0>(tKVcKV(e)) / 64 != t / 128) return "dK/dV row outside the thread's warpgroup";
    if (t < 128) {
      auto tDQcdQ = mma_dq.get_thread_slice(t).partition_C(cDQ);
      if (!pairs_ok(tDQcdQ, bad)) return "dQ accumulator pair not adjacent at thread " + std::to_string(t);
      if (get<0>(tDQcdQ(0)) / 16 != t / 32 || get<0>(tDQcdQ(0)) % 16 >= 8)  // add_dq_slice's 16-row slices
        return "dQ rows of thread " + std::to_string(t) + " outside its warp's 16-row slice";
      for (int e = 0; 2 * e < size(tDQcdQ); ++e)  // the reductions' addressing: two rows, 8-column steps
        if (get<0>(tDQcdQ(2 * e)) != get<0>(tDQcdQ(0)) + 8 * (e % 2) ||
            get<1>(tDQcdQ(2 * e)) != get<1>(tDQcdQ(0)) + 8 * (e / 2))
          return "dQ accumulator pair " + std::to_string(e) + " not at (r0 + 8 (e % 2), c0 + 8 (e / 2)), thread " +
                 std::to_string(t);
    }
  }
  return "";
}

// Whether layout B addresses element (c, r) exactly where layout A addresses (r, c), for every r < rows, c < cols (on
// a 1024-byte aligned base, as the kernels' shared tiles).
template <typename LayoutA, typename LayoutB, typename T>
inline bool transposed_view(int rows, int cols) {
  std::vector<uint16_t> storage(rows * cols + 1024);
  T* base = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(storage.data()) + 1023) & ~uintptr_t(1023));
  auto a = cute::make_tensor(cute::make_smem_ptr(base), LayoutA{});
  auto b = cute::make_tensor(cute::make_smem_ptr(base), LayoutB{});
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c)
      if (&b(c, r) != &a(r, c)) return false;
  return true;
}

// Whether local_tile(tile, (rows, cols), (bi, bj)) starts 1024-byte aligned (a GMMA descriptor base) and addresses
// element (r, c) where the whole tile addresses (bi rows + r, bj cols + c).
template <typename Layout, typename T, int kRows, int kCols>
inline bool sub_tile_ok(int bi, int bj) {
  using namespace cute;
  std::vector<uint16_t> storage(cosize_v<Layout> + 1024);
  T* base = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(storage.data()) + 1023) & ~uintptr_t(1023));
  auto t = make_tensor(make_smem_ptr(base), Layout{});
  auto sub = local_tile(t, Shape<Int<kRows>, Int<kCols>>{}, make_coord(bi, bj));
  if (((&sub(0, 0) - base) * 2) % 1024 != 0) return false;
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kCols; ++c)
      if (&sub(r, c) != &t(bi * kRows + r, bj * kCols + c)) return false;
  return true;
}

// The K / V and Q / dO tiles (layouts of both backward kernels) and load_rows_async's addressing of them.
template <typename Tr>
inline std::string check_bwd_tile_loads() {
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, NT = Tr::kThreads;
  std::string e = check_sm90_smem_tile<typename Tr::SmemLayoutK, T>(false, BN, D);
  if (e.empty()) e = check_sm90_smem_tile<typename Tr::SmemLayoutQ, T>(false, BM, D);
  if (e.empty()) e = check_row_load_plan<typename Tr::SmemLayoutK, T, BN, D, NT, false>();
  if (e.empty()) e = check_row_load_plan<typename Tr::SmemLayoutQ, T, BM, D, NT, false>();
  return e;
}

// (2) Shared tiles: the loads' addressing (check_sm90_smem_tile) of K / V and Q / dO; the MN-major views Kt, Qt / dOt
//     address the very same element as the K-major tiles (Kt(d, j) == K(j, d), Qt(d, i) == Q(i, d)); the dS tile is a
//     bijection onto its storage, equal to ds_offset, with queries i, i + 1 (i even) adjacent and 4-byte aligned;
//     every dQ chunk of Kt starts 1024-byte aligned and local_tile addresses it as Kt.
template <typename Tr>
inline std::string check_sm90_bwd_smem() {
  using namespace cute;
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN;
  std::string e = check_bwd_tile_loads<Tr>();
  if (!e.empty()) return e;
  if (!transposed_view<typename Tr::SmemLayoutK, typename Tr::SmemLayoutKt, T>(BN, D)) return "Kt view != K tile";
  if (!transposed_view<typename Tr::SmemLayoutQ, typename Tr::SmemLayoutQt, T>(BM, D)) return "Qt view != Q tile";
  std::vector<uint16_t> storage(Tr::kSizeK + 1024);
  T* base = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(storage.data()) + 1023) & ~uintptr_t(1023));
  for (int ch = 0; ch < D / Tr::kDqChunk; ++ch)
    if (!sub_tile_ok<typename Tr::SmemLayoutKt, T, Tr::kDqChunk, BN>(ch, 0)) return "dQ chunk of Kt misaddressed";
  auto sdS = make_tensor(make_smem_ptr(base), typename Tr::SmemLayoutDS{});
  std::vector<int> seen(Tr::kSizeDS, 0);
  for (int i = 0; i < BM; ++i)
    for (int j = 0; j < BN; ++j) {
      const long off = &sdS(i, j) - base;
      if (off < 0 || off >= Tr::kSizeDS) return "dS offset out of the tile";
      seen[off]++;
      if (off != ds_offset(i, j)) return "ds_offset != SmemLayoutDS";
      if (i % 2 == 0 && (off % 2 != 0 || &sdS(i + 1, j) - base != off + 1)) return "dS query pair not adjacent";
    }
  for (int x : seen)
    if (x != 1) return "dS tile not a bijection";
  return "";
}

// The head-dim-256 split kernel: (1) S^T accumulator pairs are queries i, i + 1 (i even) of one key (the P^T / dS^T
// pair stores), dK / dV pairs adjacent columns, dQ pairs at (r0 + 8 (e % 2), c0 + 8 (e / 2)); (2) the loads'
// addressing, the MN-major views (Kt, Qt / dOt; the P^T / dS^T tile seen as dS), ds_offset on the P^T tile, and every
// sub-tile a warpgroup hands to a GMMA (its 32 query rows of Q / dO, its 128 columns of Qt / dOt, the dQ chunks of
// Kt) aligned and addressed as the whole tile.
template <typename Tr>
inline std::string check_sm90_bwd_split_traits() {
  using namespace cute;
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN;
  typename Tr::MmaSdP mma_s;
  typename Tr::MmaKV mma_kv;
  typename Tr::MmaDQ mma_dq;
  if (size(mma_s) != 128 || size(mma_kv) != 128 || size(mma_dq) != 128) return "MMAs are not one warpgroup each";
  for (int t = 0; t < 128; ++t) {
    auto cS = mma_s.get_thread_slice(t).partition_C(make_identity_tensor(Shape<typename Tr::BN, typename Tr::HM>{}));
    auto cKV = mma_kv.get_thread_slice(t).partition_C(make_identity_tensor(Shape<typename Tr::BN, typename Tr::HH>{}));
    auto cDQ = mma_dq.get_thread_slice(t).partition_C(make_identity_tensor(Shape<typename Tr::BM, typename Tr::DQC>{}));
    for (int e = 0; e + 1 < size(cS); e += 2)
      if (get<0>(cS(e)) != get<0>(cS(e + 1)) || get<1>(cS(e)) + 1 != get<1>(cS(e + 1)) || get<1>(cS(e)) % 2)
        return "S^T accumulator pair not adjacent queries at thread " + std::to_string(t);
    for (int e = 0; e + 1 < size(cKV); e += 2)
      if (get<0>(cKV(e)) != get<0>(cKV(e + 1)) || get<1>(cKV(e)) + 1 != get<1>(cKV(e + 1)) || get<1>(cKV(e)) % 2)
        return "dK/dV accumulator pair not adjacent at thread " + std::to_string(t);
    for (int e = 0; 2 * e < size(cDQ); ++e)
      if (get<0>(cDQ(2 * e)) != get<0>(cDQ(0)) + 8 * (e % 2) || get<1>(cDQ(2 * e)) != get<1>(cDQ(0)) + 8 * (e / 2) ||
          get<1>(cDQ(2 * e + 1)) != get<1>(cDQ(2 * e)) + 1 || get<0>(cDQ(2 * e + 1)) != get<0>(cDQ(2 * e)))
        return "dQ accumulator pair " + std::to_string(e) + " misplaced at thread " + std::to_string(t);
    if (get<0>(cDQ(0)) / 16 != t / 32 || get<0>(cDQ(0)) % 16 >= 8)  // add_dq_slice's 16-row slices
      return "dQ rows of thread " + std::to_string(t) + " outside its warp's 16-row slice";
  }
  std::string e = check_bwd_tile_loads<Tr>();
  if (!e.empty()) return e;
  if (!transposed_view<typename Tr::SmemLayoutK, typename Tr::SmemLayoutKt, T>(BN, D)) return "Kt view != K tile";
  if (!transposed_view<typename Tr::SmemLayoutQ, typename Tr::SmemLayoutQt, T>(BM, D)) return "Qt view != Q tile";
  if (!transposed_view<typename Tr::SmemLayoutPt, typename Tr::SmemLayoutDS, T>(BN, BM)) return "dS view != dS^T tile";
  std::vector<uint16_t> storage(Tr::kSizeP + 1024);
  T* base = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(storage.data()) + 1023) & ~uintptr_t(1023));
  auto sPt = make_tensor(make_smem_ptr(base), typename Tr::SmemLayoutPt{});
  for (int j = 0; j < BN; ++j)
    for (int i = 0; i < BM; ++i)
      if (&sPt(j, i) - base != ds_offset(i, j)) return "ds_offset != SmemLayoutPt";
  for (int w = 0; w < Tr::kWarpGroups; ++w) {
    if (!sub_tile_ok<typename Tr::SmemLayoutQ, T, Tr::kHalfM, D>(w, 0)) return "query half of Q misaddressed";
    if (!sub_tile_ok<typename Tr::SmemLayoutQt, T, Tr::kHalfD, BM>(w, 0)) return "column half of Qt misaddressed";
  }
  for (int ch = 0; ch < D / Tr::kDqChunk; ++ch)
    if (!sub_tile_ok<typename Tr::SmemLayoutKt, T, Tr::kDqChunk, BN>(ch, 0)) return "dQ chunk of Kt misaddressed";
  return "";
}

template <typename Tr>
inline std::string check_sm90_bwd_traits() {
  std::string e = check_sm90_bwd_fragments<Tr>();
  if (e.empty()) e = check_sm90_bwd_smem<Tr>();
  return e;
}

}  // namespace sm90
}  // namespace hstu
