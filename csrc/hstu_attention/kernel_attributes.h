// Kernel attributes (dynamic shared memory size, carveout) set once per (kernel, device, attribute, value).
// cudaFuncSetAttribute costs a few microseconds of host time; paid on every launch it was a visible part of a
// short-sequence step, which is bound by host time.
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <set>
#include <tuple>

namespace hstu {

inline cudaError_t set_kernel_attribute_once(const void* kernel, cudaFuncAttribute attribute, int value) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::mutex mutex;
  static std::set<std::tuple<const void*, int, int, int>> applied;
  const auto key = std::make_tuple(kernel, device, static_cast<int>(attribute), value);
  std::lock_guard<std::mutex> lock(mutex);
  if (applied.count(key) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, attribute, value);
  if (err == cudaSuccess) applied.insert(key);
  return err;
}

template <typename... Args>
cudaError_t set_kernel_attribute_once(void (*kernel)(Args...), cudaFuncAttribute attribute, int value) {
  return set_kernel_attribute_once(reinterpret_cast<const void*>(kernel), attribute, value);
}

}  // namespace hstu
