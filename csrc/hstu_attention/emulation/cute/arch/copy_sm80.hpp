#pragma once
#include "copy_sm75.hpp"
namespace cute {
inline void emu_apply(const emu::PendingCopy& c) {
  if (c.pred) std::memcpy(c.dst, c.src, 16); else std::memset(c.dst, 0, 16);
}
template <class S, class D>
struct SM80_CP_ASYNC_CACHEGLOBAL_ZFILL {
  static_assert(sizeof(S) == 16 && sizeof(D) == 16, "16-byte cp.async");
  static void copy(const S& src, D& dst, bool pred) {
    const emu::PendingCopy c{&dst, &src, pred};
    if (emu::g_lazy_cp_async) emu::g_cur->cp_open.push_back(c); else emu_apply(c);
  }
};
inline void cp_async_fence() {
  emu::g_cur->cp_groups.push_back(std::move(emu::g_cur->cp_open));
  emu::g_cur->cp_open.clear();
}
// cp.async.wait_group N (N = 0: wait_all, which also covers copies not yet committed)
template <int N>
inline void cp_async_wait() {
  auto* f = emu::g_cur;
  if (N == 0) cp_async_fence();
  while (f->cp_groups.size() > static_cast<size_t>(N)) {
    for (const auto& c : f->cp_groups.front()) emu_apply(c);
    f->cp_groups.erase(f->cp_groups.begin());
  }
}
}  // namespace cute
