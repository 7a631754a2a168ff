// The cached forward's view of a sequence (hstu_fwd_kernel<..., kCached = true>, AttnParams' cached fields): the
// cached_b rows of k_cache / v_cache followed by the n_b new rows of k / v, queried by the new rows only. The mask
// (SeqMask) works in absolute positions: new row i is row cached_b + i of a sequence of cached_b + n_b keys.
// Paged variant (kPaged, AttnParams::page_table): the cached rows live in pages of a pool, found through the
// sequence's page table; the contiguous variant compiles no page-table code.
#pragma once

#include "hstu.h"
#include "tile_scheduler.h"
#include "utils.h"

namespace hstu {

// A forward block's work item and where its keys live: key j < cached is row cache_start + j of k_cache / v_cache
// (paged: row j of the pages listed at `pages`), key j >= cached is new row j - cached (of q's sequence,
// item.seq_start). cached = 0 for full attention.
struct FwdWork {
  WorkItem item;
  int cache_start;
  int cached;
  const int* pages;  // paged cache: the sequence's page table row; nullptr otherwise
};

// Query tile `tile` (of new rows) of sequence `batch`, head `head` of a cached forward.
template <bool kPaged>
__device__ __forceinline__ FwdWork make_cached_work_item(const AttnParams& p, int tile, int batch, int head) {
  FwdWork f;
  f.item = make_work_item(p, tile, batch, head);  // L, h: the new rows so far
  f.cache_start = p.cache_offsets[batch];
  f.cached = p.cache_offsets[batch + 1] - f.cache_start;
  f.pages = nullptr;
  if constexpr (kPaged) {
    f.pages = p.page_table + batch * p.page_table_stride;
    f.cache_start = 0;  // pool rows come from the page table
  }
  f.item.mask.L += f.cached;
  f.item.mask.h += f.cached;
  return f;
}

// The forward's work item (grid = (query tiles, B, heads), longest work first as schedule_block).
template <bool kCached, bool kPaged = false>
__device__ __forceinline__ FwdWork schedule_fwd_block(const AttnParams& p) {
  if constexpr (kCached)
    return make_cached_work_item<kPaged>(p, gridDim.x - 1 - blockIdx.x, blockIdx.y, blockIdx.z);
  else
    return FwdWork{schedule_block(p, /*reverse=*/true), 0, 0, nullptr};
}

// Rows of one (sequence, head) for add_dropped_terms: row k of a tile starting at key row0 (strided, one tensor).
template <typename Element>
struct StridedRows {
  const Element* base;  // row 0
  int64_t stride;
  __device__ __forceinline__ const Element* operator()(int k) const { return base + k * stride; }
};

// The same for a cached sequence's keys (or values): key j < cached from the cache, the others from the new rows.
// kPaged: cached key j is pool row pages[j >> page_shift] * 2^page_shift + (j & (2^page_shift - 1)).
template <typename Element, bool kPaged = false>
struct CachedRows {
  const Element* cache;  // contiguous: key 0 of the cached rows; paged: row 0 of the pool (same head)
  const Element* fresh;  // key `cached` (the first new row)
  int64_t stride;
  int cached;
  int row0;  // key of the tile's row 0
  const int* pages;  // kPaged: the sequence's page table row
  int page_shift;    // kPaged: log2 of the page size
  __device__ __forceinline__ const Element* operator()(int k) const {
    const int j = row0 + k;
    if (j >= cached) return fresh + (j - cached) * stride;
    if constexpr (kPaged) {
      const int64_t pool_row = (static_cast<int64_t>(pages[j >> page_shift]) << page_shift) |
                               (j & ((1 << page_shift) - 1));
      return cache + pool_row * stride;
    } else {
      return cache + j * stride;
    }
  }
};

// CachedRows of head `head` (head dim D) for the tile of keys starting at row0 of work item fw: `cache` is k_cache or
// v_cache, `fresh` the sequence's first new row of k or v (same head).
template <bool kPaged, int D, typename Element>
__device__ __forceinline__ CachedRows<Element, kPaged> make_cached_rows(const AttnParams& p, const FwdWork& fw,
                                                                        const void* cache, const Element* fresh,
                                                                        int row0) {
  const Element* c = reinterpret_cast<const Element*>(cache) + static_cast<int64_t>(fw.cache_start) * p.row_stride +
                     static_cast<int64_t>(fw.item.head) * D;
  return CachedRows<Element, kPaged>{c, fresh, p.row_stride, fw.cached, row0, fw.pages, kPaged ? p.page_shift : 0};
}

// Keys [row0, row0 + kRows) of a cached sequence of len keys (rows.cached of them cached) into a swizzled shared tile;
// keys at or past len are zero-filled (no address past either buffer is formed).
template <int kRows, int kCols, int kThreads, typename Element, bool kPaged>
__device__ __forceinline__ void load_cached_tile_async(Element* smem, const CachedRows<Element, kPaged>& rows, int len,
                                                       int tid) {
  load_rows_async<kRows, kCols, kThreads>(smem, rows, rows.fresh, len - rows.row0, tid);
}

}  // namespace hstu
