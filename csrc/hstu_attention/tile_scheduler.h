// Maps thread blocks to (tile, sequence, head) work items of the jagged batch: the 3-D grid of the sm80-style kernels,
// the grouped 1-D launch order of the sm90 kernels, and the tile schedulers the sm90 forward kernel is templated on.
#pragma once

#include "hstu.h"
#include "mask.h"
#include "utils.h"

#if !defined(HSTU_HOST_EMULATION)
#include <cute/util/type_traits.hpp>
#endif

namespace hstu {

struct WorkItem {
  int tile;       // index of the block's tile inside the sequence
  int batch;      // sequence index
  int head;       // head index (or first head when a block loops over heads)
  int seq_start;  // first token of the sequence
  SeqMask mask;
};

// The work item of tile `tile` (query tile in a forward, key tile in a backward) of sequence `batch`, head `head`.
__device__ __forceinline__ WorkItem make_work_item(const AttnParams& p, int tile, int batch, int head) {
  WorkItem w;
  w.tile = tile;
  w.batch = batch;
  w.head = head;
  w.seq_start = p.seq_offsets[batch];
  const int L = p.seq_offsets[batch + 1] - w.seq_start;
  const int t = p.num_targets ? p.num_targets[batch] : 0;
  w.mask.L = L;
  w.mask.c = p.num_contexts ? p.num_contexts[batch] : 0;
  w.mask.h = L - t;
  w.mask.w = p.window;
  w.mask.g = p.group;
  w.mask.causal = p.causal;
  return w;
}

// grid = (tiles of max_seqlen, B, heads). Tiles are handed out longest-work first: with a causal mask the last
// query tiles of a sequence see the most keys, so blockIdx.x = 0 takes the last tile.
__device__ __forceinline__ WorkItem schedule_block(const AttnParams& p, bool reverse) {
  return make_work_item(p, reverse ? (gridDim.x - 1 - blockIdx.x) : blockIdx.x, blockIdx.y, blockIdx.z);
}

// The sm90 kernels' grouped schedule: a 1-D grid over tiles x B x heads items (tiles of max_seqlen per sequence).
// The (sequence, head) pairs form groups of `group` pairs whose items are launched together (their rows stay in L2
// while the group's blocks read them and, in the backward, add dq into them); inside a group the pairs' tile 0 comes
// first, then tile 1, ... (tile t is tiles - 1 - t with `reverse`), so that under a causal mask the longest items
// start first and the shortest fill the tail of the launch (the forward's last query tiles and the backward's first
// key tiles see the most). group = 1: pair after pair, as schedule_block. check_grouped_schedule tests it on the host.
struct TileCoords {
  int tile, batch, head;
};
__host__ __device__ __forceinline__ TileCoords grouped_tile_coords(int item, int tiles, int batch, int heads,
                                                                   int group, bool reverse) {
  const int pairs = batch * heads;
  const int group_items = group * tiles;
  const int g = item / group_items;
  const int in_group = pairs - g * group < group ? pairs - g * group : group;  // the last group may be partial
  const int r = item - g * group_items;
  const int pair = g * group + r % in_group;
  const int t = r / in_group;
  return {reverse ? tiles - 1 - t : t, pair / heads, pair % heads};
}
// Item `item` of the grouped schedule (a persistent kernel walks several), and the block's own item.
__device__ __forceinline__ WorkItem schedule_grouped_item(const AttnParams& p, int tiles, bool reverse, int item) {
  const TileCoords c = grouped_tile_coords(item, tiles, p.batch, p.heads, p.sched_group, reverse);
  return make_work_item(p, c.tile, c.batch, c.head);
}
__device__ __forceinline__ WorkItem schedule_grouped_block(const AttnParams& p, int tiles, bool reverse) {
  return schedule_grouped_item(p, tiles, reverse, static_cast<int>(blockIdx.x));
}

#if !defined(HSTU_HOST_EMULATION)  // (the host emulation of the tests runs the sm80-style kernels only)
namespace sm90 {

// Tile schedulers of the warp-specialized sm90 forward (hstu_fwd_sm90_ws_kernel<Traits, Scheduler>): which query tiles
// of the grouped launch order (above, longest first) each block runs. The launcher picks one at compile time from
// heuristics.h's plan; the kernel sees one interface:
//   kPersistent               whether a block runs several work items (the kernel then keeps a second Q slot and
//                             hands the consumers' Q slot and ping-pong turn from item to item)
//   SharedStorage             what the scheduler keeps in the block's shared memory (after the kernel's barriers)
//   grid_blocks(items, res)   (host) blocks to launch for `items` work items when `res` blocks fit the device at once
//   Scheduler(p, tile_rows, storage)
//                             per thread, before the block sets anything up; no barrier traffic
//   idle_block()              the whole block has nothing to do: it returns before it sets anything up
//   init_barriers(producer, consumers)
//                             the scheduler's own barriers (warp 0; `consumers` consumer threads), before the
//                             block's __syncthreads
//   get_work<kProducer>(), is_valid(work): the block's next item for the producer warpgroup (kProducer) or the
//                             consumer warpgroups; an invalid one ends the walk
//   prefetch_next_work(p)     (producer) starts fetching the item after the current one, in flight during its loads
//   work_item(p, work)        the (tile, sequence, head) of an item
// A work item may be a tile past its sequence end (max_seqlen tiles per sequence): the kernel skips those.

// One block per work item: the grid is the item list, block b runs item b.
struct SingleTileScheduler {
  static constexpr bool kPersistent = false;
  struct SharedStorage {};
  using Work = bool;  // the block's item, not yet run

  static int64_t grid_blocks(int64_t items, int64_t /*resident_blocks*/) { return items; }

  __device__ __forceinline__ SingleTileScheduler(const AttnParams& p, int tile_rows, SharedStorage& /*storage*/)
      : item_(schedule_grouped_block(p, (p.max_seqlen + tile_rows - 1) / tile_rows, /*reverse=*/true)),
        tile_rows_(tile_rows) {}
  __device__ __forceinline__ bool idle_block() const { return item_.tile * tile_rows_ >= item_.mask.L; }
  __device__ __forceinline__ void init_barriers(bool /*producer*/, int /*consumers*/) {}
  template <bool kProducer>
  __device__ __forceinline__ Work get_work() {
    const Work work = pending_;
    pending_ = false;
    return work;
  }
  __device__ __forceinline__ void prefetch_next_work(const AttnParams& /*p*/) {}
  __device__ __forceinline__ bool is_valid(Work work) const { return work; }
  __device__ __forceinline__ const WorkItem& work_item(const AttnParams& /*p*/, Work /*work*/) const { return item_; }

 private:
  WorkItem item_;
  int tile_rows_;
  bool pending_ = true;
};

// One wave of blocks (as many as fit the device at once, at most one per item) drawing work items until none is
// left: block b starts with item b, then takes gridDim.x + the next value of p.tile_counter (zeroed by the launcher),
// so the longest items go first and a block that finishes early takes more. The producer warpgroup's thread 0 draws
// the items and hands each to the block through ItemPipe (a 2-slot cutlass::PipelineAsync, producer count 1: the
// consumers read the slot and release it); the other producer threads read it after the producer warpgroup's named
// barrier kProducerBarrier. An item >= the item count tells every thread that none is left.
template <int kProducerBarrier, typename ItemPipe>
struct DynamicPersistentScheduler {
  static constexpr bool kPersistent = true;
  struct SharedStorage {
    typename ItemPipe::SharedStorage pipe;
    int items[ItemPipe::Stages];  // the item of each slot, right after the barriers
  };
  using Work = int;  // an item of the grouped launch order

  static int64_t grid_blocks(int64_t items, int64_t resident_blocks) {
    return items < resident_blocks ? items : resident_blocks;
  }

  __device__ __forceinline__ DynamicPersistentScheduler(const AttnParams& p, int tile_rows, SharedStorage& storage)
      : tiles_((p.max_seqlen + tile_rows - 1) / tile_rows),
        items_(tiles_ * p.batch * p.heads),
        storage_(storage),
        slots_(reinterpret_cast<int*>(&storage.pipe + 1)) {}
  __device__ __forceinline__ bool idle_block() const { return false; }
  __device__ __forceinline__ void init_barriers(bool producer, int consumers) {
    params_ = ws_pipeline_params<ItemPipe>(producer, 1, consumers);
    ItemPipe::init_barriers(storage_.pipe, params_);
  }

  template <bool kProducer>
  __device__ __forceinline__ Work get_work() {
    if constexpr (kProducer)
      return hand_over(next_);  // only thread 0's is real: it alone writes the item slot
    else
      return receive();
  }
  __device__ __forceinline__ void prefetch_next_work(const AttnParams& p) {
    next_ = 0;
    if (threadIdx.x == 0) next_ = static_cast<int>(gridDim.x) + atomicAdd(p.tile_counter, 1);
  }
  __device__ __forceinline__ bool is_valid(Work work) const { return work < items_; }
  __device__ __forceinline__ WorkItem work_item(const AttnParams& p, Work work) const {
    return schedule_grouped_item(p, tiles_, /*reverse=*/true, work);
  }

 private:
  // Producer warpgroup: thread 0 puts `item` into the next slot; every producer thread returns the slot's item. Only
  // the thread that fills the slot waits for it to be free: another one arriving late could find the consumers
  // already done with the slot, its barrier a phase further, and wait for the next phase forever.
  __device__ __forceinline__ int hand_over(int item) {
    if (threadIdx.x == 0) {
      ItemPipe pipe = pipeline();
      pipe.producer_acquire(producer_state_);
      slots_[producer_state_.index()] = item;
      compiler_fence();  // CUTLASS's mbarrier arrive / wait asm has no memory clobber: keep the slot access in place
      pipe.producer_commit(producer_state_);
    }
    __syncwarp();  // bar.sync is .aligned: warp 0 arrives converged
    named_barrier_sync<128>(kProducerBarrier);
    const int work = slots_[producer_state_.index()];
    ++producer_state_;
    return work;
  }
  // Consumer warpgroups: the next slot's item, and the slot released.
  __device__ __forceinline__ int receive() {
    ItemPipe pipe = pipeline();
    pipe.consumer_wait(consumer_state_);
    compiler_fence();
    const int work = slots_[consumer_state_.index()];
    compiler_fence();
    pipe.consumer_release(consumer_state_);
    ++consumer_state_;
    return work;
  }

  // The item pipeline over this block's barriers, as this thread's role sees it.
  __device__ __forceinline__ ItemPipe pipeline() const { return ItemPipe(storage_.pipe, params_, cute::false_type{}); }

  int tiles_;
  int items_;
  SharedStorage& storage_;
  int* slots_;  // storage_.items
  typename ItemPipe::Params params_;  // set by init_barriers
  typename ItemPipe::PipelineState producer_state_{0, 1, 0};  // slot 0, a phase ahead: the slots start empty
  typename ItemPipe::PipelineState consumer_state_;           // slot 0, phase 0
  int next_ = static_cast<int>(blockIdx.x);                   // the item the producer hands over next
};

}  // namespace sm90
#endif  // !HSTU_HOST_EMULATION

}  // namespace hstu
