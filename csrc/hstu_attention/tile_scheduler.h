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
// The (sequence, head) pairs form groups of p.sched_group pairs whose items are launched together (their rows stay
// in L2 while the group's blocks read them and, in the backward, add dq into them); inside a group the pairs' tile
// 0 comes first, then tile 1, ... (tile t is tiles - 1 - t with `reverse`), so that under a causal mask the longest
// items start first and the shortest fill the tail of the launch (the forward's last query tiles and the backward's
// first key tiles see the most). sched_group = 1: pair after pair, as schedule_block.
__device__ __forceinline__ WorkItem schedule_grouped_block(const AttnParams& p, int tiles, bool reverse) {
  const int pairs = p.batch * p.heads;
  const int group_items = p.sched_group * tiles;
  const int group = static_cast<int>(blockIdx.x) / group_items;
  const int in_group = min(p.sched_group, pairs - group * p.sched_group);
  const int r = static_cast<int>(blockIdx.x) - group * group_items;
  const int pair = group * p.sched_group + r % in_group;
  const int t = r / in_group;
  return make_work_item(p, reverse ? tiles - 1 - t : t, pair / p.heads, pair % p.heads);
}

// Pairs per group of the grouped schedule: as many as keep the group's q, k, v, out / dout (2 bytes per element) and
// dq workspace (4 bytes) within ~32 MB of L2 (the H100 / H200 have 50 MB): 21 pairs at 1024 tokens and head dim
// 128, 5 at 4096, 2 at 8192.
inline int grouped_schedule_pairs(int max_seqlen, int head_dim, int pairs) {
  const int64_t bytes_per_pair = int64_t{12} * max_seqlen * head_dim;
  const int64_t fit = (int64_t{32} << 20) / (bytes_per_pair > 0 ? bytes_per_pair : 1);
  return static_cast<int>(fit < 1 ? 1 : (fit > pairs ? (pairs > 0 ? pairs : 1) : fit));
}

}  // namespace hstu
