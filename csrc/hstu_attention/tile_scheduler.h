// Maps thread blocks to (tile, sequence, head) work items of the jagged batch.
#pragma once

#include "hstu.h"
#include "mask.h"

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

}  // namespace hstu
