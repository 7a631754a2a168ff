// Block-wide reductions over one row, shared by the layer kernels (norm_mul_dropout.cu, uvqk.cu): one block works
// on one row at a time, every thread striding over the columns.
#pragma once

#include <cstdint>

namespace hstu {
namespace layer {

// Sum of v over the block (every thread gets it); shm holds one float per warp.
template <typename V>
__device__ __forceinline__ V block_sum(V v, V* shm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  V total = threadIdx.x < warps ? shm[threadIdx.x] : V(0);
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
    if (lane == 0) shm[0] = total;
  }
  __syncthreads();
  total = shm[0];
  __syncthreads();  // shm is reused by the next call
  return total;
}

// mean and rstd of a row of length d (fp32, centred second pass)
template <typename T>
__device__ __forceinline__ float2 row_stats(const T* __restrict__ xr, int64_t d, float eps, float* shm) {
  float s = 0.f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) s += static_cast<float>(xr[c]);
  const float mean = block_sum(s, shm) / static_cast<float>(d);
  float v = 0.f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const float t = static_cast<float>(xr[c]) - mean;
    v += t * t;
  }
  const float var = block_sum(v, shm) / static_cast<float>(d);
  return make_float2(mean, rsqrtf(var + eps));
}

}  // namespace layer
}  // namespace hstu
