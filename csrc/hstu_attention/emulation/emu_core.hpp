// Host emulation of the CUDA features the hstu attention kernels use (tests only, see harness.cpp): every CUDA thread
// of a block is a ucontext fiber run by a round-robin scheduler on one OS thread; __syncthreads, named barriers and
// the warp-collective ldmatrix / mma.sync are fiber barriers (a deadlock or a barrier left waiting aborts).
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
#include <type_traits>

#ifndef __global__
#define __global__
#endif
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__
#undef __align__
#define __align__(x)
#undef __forceinline__
#define __forceinline__ inline

namespace emu {
struct PendingCopy {
  void* dst;
  const void* src;
  bool pred;
};
struct Fiber {
  std::vector<std::vector<PendingCopy>> cp_groups;  // committed cp.async groups, oldest first (lazy mode)
  std::vector<PendingCopy> cp_open;                 // issued, not yet committed
  ucontext_t ctx;
  uint3 tid;
  int linear;
  bool done = false;
  std::vector<char> stack;
};
struct Bar { int arrived = 0; long gen = 0; };
struct Warp {
  const void* addr[32];
  uint32_t a[32][4], b[32][2];
  uint32_t shfl[32];
};
inline Fiber* g_cur = nullptr;
inline ucontext_t g_sched;
inline uint3 g_block_idx, g_grid_dim, g_block_dim;
inline Bar g_bars[2048];
inline int g_sync_or = 0;  // __syncthreads_or's reduction (0 between calls)
inline Warp g_warps[32];
inline long g_switches = 0;
// HSTU_EMU_LAZY_CP_ASYNC=1: cp.async copies land only when a wait requires them (the latest the hardware may
// deliver them), so a read of a tile before its wait sees the previous contents; default: at issue.
inline const bool g_lazy_cp_async = std::getenv("HSTU_EMU_LAZY_CP_ASYNC") != nullptr;
inline void yield() { ++g_switches; swapcontext(&g_cur->ctx, &g_sched); }
inline void barrier(int id, int expected) {
  Bar& b = g_bars[id];
  if (++b.arrived == expected) { b.arrived = 0; ++b.gen; return; }
  const long gen = b.gen;
  while (b.gen == gen) yield();
}
inline int lane() { return g_cur->linear & 31; }
inline int warp() { return g_cur->linear >> 5; }
inline void warp_sync() { barrier(1024 + warp(), 32); }
}  // namespace emu

#define threadIdx (::emu::g_cur->tid)
#define blockIdx (::emu::g_block_idx)
#define gridDim (::emu::g_grid_dim)
#define blockDim (::emu::g_block_dim)

inline void __syncthreads() { emu::barrier(0, emu::g_block_dim.x * emu::g_block_dim.y * emu::g_block_dim.z); }
inline void hstu_emulation_named_barrier(int id, int threads) { emu::barrier(id, threads); }
// bar.red.or: three block barriers around one shared flag (set, read, cleared by thread 0 before its next call)
inline int __syncthreads_or(int pred) {
  __syncthreads();
  if (pred) emu::g_sync_or = 1;
  __syncthreads();
  const int any = emu::g_sync_or;
  __syncthreads();
  if (emu::g_cur->linear == 0) emu::g_sync_or = 0;
  return any;
}
// shfl.sync.idx over the full warp (4-byte values)
template <typename T>
inline T __shfl_sync(unsigned, T v, int src) {
  static_assert(sizeof(T) == 4, "4-byte shuffles");
  emu::Warp& w = emu::g_warps[emu::warp()];
  std::memcpy(&w.shfl[emu::lane()], &v, 4);
  emu::warp_sync();
  T r;
  std::memcpy(&r, &w.shfl[src & 31], 4);
  emu::warp_sync();
  return r;
}
inline float atomicAdd(float* p, float v) { float o = *p; *p = o + v; return o; }
inline float2 atomicAdd(float2* p, float2 v) { float2 o = *p; p->x += v.x; p->y += v.y; return o; }
using std::min;
using std::max;
