// The Platform (heuristics.h) of the current device: what this build linked in and whether the device is sm_90.
// Shared by launch.h (every launch) and the binding (the kernel_plan query), so both see the same platform.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

#include "bwd_sm90_api.h"  // HSTU_WITH_SM90_BWD
#include "heuristics.h"

namespace hstu {

// Asked at every launch: the answer is cached per device (two attribute queries per launch cost more host time
// than the rest of the launch decision).
inline bool current_device_is_sm90() {
  constexpr int kMaxDevices = 64;
  static std::atomic<signed char> cached[kMaxDevices] = {};  // 0: not asked yet, 1: sm_90, -1: other
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (dev >= 0 && dev < kMaxDevices && cached[dev].load(std::memory_order_relaxed) != 0)
    return cached[dev].load(std::memory_order_relaxed) > 0;
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) return false;
  const bool sm90 = major == 9 && minor == 0;
  if (dev >= 0 && dev < kMaxDevices) cached[dev].store(sm90 ? 1 : -1, std::memory_order_relaxed);
  return sm90;
}

// HSTU_WITH_SM90_FWD: setup.py / CMake define it for every unit when the sm90 units are built (sm_90a in the
// architecture list, no HSTU_DISABLE_SM90); they are pruned like the sm80 units, so run_fwd_sm90<T, D, rab> exists
// whenever run_fwd<T, D, rab> does (D in 64, 128, 256), and likewise run_bwd_sm90 (bwd_sm90_api.h).
inline constexpr bool kBuiltSm90Fwd =
#if defined(HSTU_WITH_SM90_FWD)
    true;
#else
    false;
#endif
inline constexpr bool kBuiltSm90Bwd =
#if defined(HSTU_WITH_SM90_BWD)
    true;
#else
    false;
#endif

inline Platform current_platform() {
  Platform pl;
  pl.sm90_forward_built = kBuiltSm90Fwd;
  pl.sm90_backward_built = kBuiltSm90Bwd;
  pl.sm90_device = (kBuiltSm90Fwd || kBuiltSm90Bwd) && current_device_is_sm90();
  return pl;
}

}  // namespace hstu
