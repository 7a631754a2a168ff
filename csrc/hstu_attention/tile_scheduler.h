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

// grid = (tiles of max_seqlen, B, heads). Tiles are handed out longest-work first: with a causal mask the last
// query tiles of a sequence see the most keys, so blockIdx.x = 0 takes the last tile.
__device__ __forceinline__ WorkItem schedule_block(const AttnParams& p, bool reverse) {
  WorkItem w;
  w.batch = blockIdx.y;
  w.head = blockIdx.z;
  w.tile = reverse ? (gridDim.x - 1 - blockIdx.x) : blockIdx.x;
  w.seq_start = p.seq_offsets[w.batch];
  const int L = p.seq_offsets[w.batch + 1] - w.seq_start;
  const int t = p.num_targets ? p.num_targets[w.batch] : 0;
  w.mask.L = L;
  w.mask.c = p.num_contexts ? p.num_contexts[w.batch] : 0;
  w.mask.h = L - t;
  w.mask.w = p.window;
  w.mask.g = p.group;
  w.mask.causal = p.causal;
  return w;
}

}  // namespace hstu
