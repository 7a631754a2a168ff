// Host emulation of the attention kernels, for tests without a GPU (tests/ops/test_hstu_attention_cuda_emulation.py builds it
// with g++ and drives it through ctypes). The real kernel sources (fwd_kernel.h / bwd_kernel.h) run block after
// block, one ucontext fiber per CUDA thread; emu_core.hpp and the fake cute/arch headers emulate barriers,
// ldmatrix, mma.sync, cp.async (synchronous) and atomics. Which sm80-style kernels run comes from heuristics.h's
// plan_backward, as in launch.h (the sm90 wgmma kernels are not emulated); the benchmark variants are compiled in.
// variant: 0 = the default options, 8 = KernelOptions::bench_bwd_warps = 8, 2 = KernelOptions::bench_d256_two_pass.
#define HSTU_HOST_EMULATION 1
#define HSTU_BENCH_VARIANTS 1
#include <functional>
#include "emu_core.hpp"
#include "bwd_kernel.h"
#include "heuristics.h"
#include "tile_config.h"

using namespace hstu;

namespace hstu { alignas(128) unsigned char smem_raw[256 * 1024]; }

namespace {
std::function<void()>* g_body;

void fiber_main() {
  (*g_body)();
  emu::g_cur->done = true;
  swapcontext(&emu::g_cur->ctx, &emu::g_sched);
}

// smem_bytes: the dynamic shared memory the real launch requests; writes past it abort (poison check per block).
void launch(std::function<void()> body, dim3 grid, int threads, int smem_bytes) {
  g_body = &body;
  std::vector<emu::Fiber> fibers(threads);
  for (auto& f : fibers) f.stack.resize(1 << 20);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        emu::g_block_idx = make_uint3(bx, by, bz);
        emu::g_grid_dim = make_uint3(grid.x, grid.y, grid.z);
        emu::g_block_dim = make_uint3(threads, 1, 1);
        std::memset(hstu::smem_raw, 0xff, sizeof(hstu::smem_raw));  // NaN poison: reads of unwritten shared memory show
        for (auto& b : emu::g_bars) b = emu::Bar{};
        for (int t = 0; t < threads; ++t) {
          auto& f = fibers[t];
          f.done = false;
          f.cp_groups.clear();
          f.cp_open.clear();
          f.tid = make_uint3(t, 0, 0);
          f.linear = t;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, (void (*)())fiber_main, 0);
        }
        long stall = 0;
        for (;;) {
          bool all_done = true;
          for (auto& f : fibers) {
            if (f.done) continue;
            all_done = false;
            emu::g_cur = &f;
            swapcontext(&emu::g_sched, &f.ctx);
          }
          if (all_done) break;
          if (++stall > 100000000L) { std::fprintf(stderr, "emulation: deadlock?\n"); std::abort(); }
        }
        for (auto& b : emu::g_bars)
          if (b.arrived != 0) { std::fprintf(stderr, "emulation: barrier left with waiters\n"); std::abort(); }
        for (size_t i = smem_bytes; i < sizeof(hstu::smem_raw); ++i)
          if (hstu::smem_raw[i] != 0xff) {
            std::fprintf(stderr, "emulation: shared-memory write at byte %zu past the %d requested\n", i, smem_bytes);
            std::abort();
          }
        for (auto& f : fibers)
          if (!f.cp_groups.empty() || !f.cp_open.empty()) {  // copies still in flight at exit: apply (harmless)
            for (auto& g : f.cp_groups) for (auto& c : g) cute::emu_apply(c);
            for (auto& c : f.cp_open) cute::emu_apply(c);
          }
      }
}

dim3 grid_for(const AttnParams& p, int tile, int heads) {
  return dim3((p.max_seqlen + tile - 1) / tile, p.batch, heads);
}

// Whether the call's bias comes from the weight tables (launch.h's with_bias_source).
bool table_call(const AttnParams& p) { return p.rab == nullptr && has_rab_tables(p); }

template <typename Element, int D, bool kRab, bool kDrop, bool kTables>
void fwd_impl(const AttnParams& p) {
  using Cfg = TileConfig<D>;
  using Traits = FwdTraits<Element, D, kRab, Cfg::kFwdWarps, Cfg::kFwdBlockN, Cfg::kFwdMI, Cfg::kFwdStages>;
  launch([&] { hstu_fwd_kernel<Traits, kDrop, kTables>(p); }, grid_for(p, Traits::kBlockM, p.heads), Traits::kThreads,
         Traits::kSmemBytes);
}

// The cached forward (launch.h's launch_fwd_cached).
template <typename Element, int D, bool kRab>
void fwd_cached_impl(const AttnParams& p) {
  using Cfg = TileConfig<D>;
  using Traits = FwdTraits<Element, D, kRab, Cfg::kFwdWarps, Cfg::kFwdBlockN, Cfg::kFwdMI, Cfg::kFwdStages>;
  if (p.page_table != nullptr)
    launch([&] { hstu_fwd_kernel<Traits, false, false, true, true>(p); }, grid_for(p, Traits::kBlockM, p.heads),
           Traits::kThreads, Traits::kSmemBytes);
  else
    launch([&] { hstu_fwd_kernel<Traits, false, false, true>(p); }, grid_for(p, Traits::kBlockM, p.heads),
           Traits::kThreads, Traits::kSmemBytes);
}

// 0: the table gradients go to global atomics; else launch.h's shared-memory histogram where it fits (227 KB)
int g_table_hist = 1;

// launch.h's launch_dkdv, on the emulator.
template <typename DkDv, bool kTwoPass, bool kDrop, bool kTables>
void dkdv(const AttnParams& p) {
  const bool head_loop = p.drab != nullptr && p.rab_heads == 1 && p.heads > 1;
  const bool atomic = p.dq_accum != nullptr;
  const dim3 g = grid_for(p, DkDv::kBlockN, head_loop ? 1 : p.heads);
  const int nt = DkDv::kThreads;
  // the dS passes' parameters and shared memory (with the table histogram)
  auto ds_pass = [&](int smem) {
    AttnParams ps = p;
    const int floats = rab_table_hist_floats(p);
    if (kTables && g_table_hist && smem + 4 * floats <= 227 * 1024) ps.rab_hist_floats = floats;
    return std::make_pair(ps, smem + 4 * ps.rab_hist_floats);
  };
  const auto [pd, sm] = ds_pass(DkDv::kSmemBytes);
  const auto [pa, sma] = ds_pass(DkDv::kSmemBytesAtomic);
  if constexpr (DkDv::kDSplit > 1) {
    launch([&] { hstu_bwd_dkdv_kernel<DkDv, kPassBoth, kDrop, true, kTables>(pa); }, g, nt, sma);
  } else if constexpr (kTwoPass) {
    launch([&] { hstu_bwd_dkdv_kernel<DkDv, kPassDV, kDrop, false, kTables>(p); },
           grid_for(p, DkDv::kBlockN, p.heads), nt, DkDv::kSmemBytes);
    if (atomic)
      launch([&] { hstu_bwd_dkdv_kernel<DkDv, kPassDK, kDrop, true, kTables>(pa); }, g, nt, sma);
    else
      launch([&] { hstu_bwd_dkdv_kernel<DkDv, kPassDK, kDrop, false, kTables>(pd); }, g, nt, sm);
  } else {
    if (atomic)
      launch([&] { hstu_bwd_dkdv_kernel<DkDv, kPassBoth, kDrop, true, kTables>(pa); }, g, nt, sma);
    else
      launch([&] { hstu_bwd_dkdv_kernel<DkDv, kPassBoth, kDrop, false, kTables>(pd); }, g, nt, sm);
  }
}

template <typename Element, int D, bool kRab, bool kDrop, bool kTables>
void bwd_impl(const AttnParams& p, int variant) {
  using Cfg = TileConfig<D>;
  const bool atomic = p.dq_accum != nullptr;
  KernelOptions options;
  options.deterministic = !atomic;
  options.bench_bwd_warps = variant == 8 ? 8 : 0;
  options.bench_d256_two_pass = variant == 2;
  // no sm90 device: the sm80-style kernels
  const BwdPlan plan = plan_backward(problem_of<Element, D, kRab>(p), options, Platform{});
  if (p.batch > 0 && p.max_seqlen > 0) {
    const bool launched = with_sm80_dkdv_shape<Element, D, kRab, kDrop>(
        plan.dkdv, [&](auto warps, auto dsplit, auto two_pass) {
          using DkDv = BwdDkDvTraits<Element, D, kRab, decltype(warps)::value, Cfg::kDkDvBlockM, Cfg::kDkDvStages,
                                     decltype(dsplit)::value>;
          dkdv<DkDv, decltype(two_pass)::value, kDrop, kTables>(p);
        });
    if (!launched) {
      std::fprintf(stderr, "emulation: no dk/dv kernel for plan %d\n", static_cast<int>(plan.dkdv));
      std::abort();
    }
    if (!plan.atomic_dq) {
      using Dq = BwdDqTraits<Element, D, kRab, Cfg::kDqWarps, Cfg::kDqBlockN, Cfg::kDqMI, Cfg::kDqStages>;
      launch([&] { hstu_bwd_dq_kernel<Dq, kDrop, kTables>(p); }, grid_for(p, Dq::kBlockM, p.heads), Dq::kThreads,
             Dq::kSmemBytes);
    }
  }
  if (atomic) {
    float scale = p.alpha * p.inv_scale;
    if (p.dropout) scale *= p.dropout_scale;
    const int64_t n8 = p.total_rows * p.row_stride / 8;
    if (n8 > 0)
      launch([&] { hstu_dq_convert_kernel<Element>(p.dq_accum, reinterpret_cast<Element*>(p.dq), n8, scale); },
             dim3(std::min<int64_t>((n8 + 255) / 256, 3)), 256, 0);
  }
}

template <bool kBwd, typename T, int D>
void dispatch3(const AttnParams& p, int variant) {
  auto go = [&](auto rab, auto drop) {
    constexpr bool kRab = decltype(rab)::value, kDrop = decltype(drop)::value;
    auto run = [&](auto tables) {
      if constexpr (kBwd) bwd_impl<T, D, kRab, kDrop, decltype(tables)::value>(p, variant);
      else fwd_impl<T, D, kRab, kDrop, decltype(tables)::value>(p);
    };
    if constexpr (kRab) {
      if (table_call(p)) return run(std::true_type{});
    }
    run(std::false_type{});
  };
  const bool rab = p.rab != nullptr || has_rab_tables(p);
  if (rab && p.dropout) go(std::true_type{}, std::true_type{});
  else if (rab) go(std::true_type{}, std::false_type{});
  else if (p.dropout) go(std::false_type{}, std::true_type{});
  else go(std::false_type{}, std::false_type{});
}

template <typename T>
void dispatch_cached(const AttnParams& p, int D) {
  auto go = [&](auto d) {
    constexpr int kD = decltype(d)::value;
    if (p.rab != nullptr) fwd_cached_impl<T, kD, true>(p);
    else fwd_cached_impl<T, kD, false>(p);
  };
  switch (D) {
    case 32: return go(std::integral_constant<int, 32>{});
    case 64: return go(std::integral_constant<int, 64>{});
    case 128: return go(std::integral_constant<int, 128>{});
    case 256: return go(std::integral_constant<int, 256>{});
  }
  std::abort();
}

template <bool kBwd>
void dispatch(const AttnParams& p, int dtype, int D, int variant) {
  if (dtype == 0) {
    switch (D) {
      case 32: return dispatch3<kBwd, __nv_bfloat16, 32>(p, variant);
      case 64: return dispatch3<kBwd, __nv_bfloat16, 64>(p, variant);
      case 128: return dispatch3<kBwd, __nv_bfloat16, 128>(p, variant);
      case 256: return dispatch3<kBwd, __nv_bfloat16, 256>(p, variant);
    }
  } else {
    switch (D) {
      case 32: return dispatch3<kBwd, __half, 32>(p, variant);
      case 64: return dispatch3<kBwd, __half, 64>(p, variant);
      case 128: return dispatch3<kBwd, __half, 128>(p, variant);
      case 256: return dispatch3<kBwd, __half, 256>(p, variant);
    }
  }
  std::abort();
}
}  // namespace

extern "C" {
// ints: batch, heads, max_seqlen, causal, window, group, rab_heads, dtype(0 bf16, 1 fp16), D, dropout(0/1), variant,
// total_rows. int64s: rab strides (batch, head, row), drab strides, row_stride. floats: alpha, inv_scale,
// dropout_scale. uint32s: seed lo, seed hi, threshold. Then the bias tables (AttnParams' rab_* fields; table_hist 0:
// the table gradients by global atomics instead of the shared-memory histogram).
struct EmuArgs {
  const void *q, *k, *v, *dout;
  void *out, *dq, *dk, *dv;
  float *drab, *dq_accum;
  const int *offsets, *ctx, *tgt;
  const void* rab;
  int64_t rab_bs, rab_hs, rab_rs, drab_bs, drab_hs, drab_rs, row_stride, total_rows;
  int batch, heads, max_seqlen, causal, window, group, rab_heads, dtype, D, dropout, variant;
  float alpha, inv_scale, dropout_scale;
  uint32_t seed_lo, seed_hi, threshold;
  const float *pos_w, *time_w;
  const int64_t *timestamps, *next_timestamps;
  const int* shared_positions;
  float *dpos, *dtime;
  int pos_heads, pos_size, time_heads, time_buckets, time_next, table_hist;
  float time_divisor;
  // the cached forward's cached keys / values and their offsets (AttnParams' cached fields)
  const void *k_cache, *v_cache;
  const int* cache_offsets;
  // the paged cache (AttnParams' page_table fields; page_table nullptr: the contiguous cache)
  const int* page_table;
  int64_t page_table_stride;
  int page_shift;
};

static AttnParams to_params(const EmuArgs& a) {
  AttnParams p{};
  p.q = a.q; p.k = a.k; p.v = a.v; p.seq_offsets = a.offsets; p.num_contexts = a.ctx; p.num_targets = a.tgt;
  p.rab = a.rab; p.rab_batch_stride = a.rab_bs; p.rab_head_stride = a.rab_hs; p.rab_row_stride = a.rab_rs;
  p.rab_heads = a.rab_heads; p.out = a.out; p.dout = a.dout; p.dq = a.dq; p.dk = a.dk; p.dv = a.dv;
  p.drab = a.drab; p.drab_batch_stride = a.drab_bs; p.drab_head_stride = a.drab_hs; p.drab_row_stride = a.drab_rs;
  p.dq_accum = a.dq_accum; p.total_rows = a.total_rows;
  p.row_stride = a.row_stride; p.batch = a.batch; p.heads = a.heads; p.max_seqlen = a.max_seqlen;
  p.alpha = a.alpha; p.inv_scale = a.inv_scale; p.causal = a.causal != 0; p.window = a.window; p.group = a.group;
  p.dropout = a.dropout != 0; p.dropout_seed_lo = a.seed_lo; p.dropout_seed_hi = a.seed_hi;
  p.dropout_threshold = a.threshold; p.dropout_scale = a.dropout_scale;
  p.rab_pos_weights = a.pos_w; p.rab_time_weights = a.time_w; p.rab_timestamps = a.timestamps;
  p.rab_next_timestamps = a.next_timestamps; p.rab_shared_positions = a.shared_positions;
  p.drab_pos_weights = a.dpos; p.drab_time_weights = a.dtime; p.rab_pos_heads = a.pos_heads;
  p.rab_pos_size = a.pos_size; p.rab_time_heads = a.time_heads; p.rab_time_buckets = a.time_buckets;
  p.rab_time_next = a.time_next != 0; p.rab_time_divisor = a.time_divisor;
  g_table_hist = a.table_hist;
  p.k_cache = a.k_cache; p.v_cache = a.v_cache; p.cache_offsets = a.cache_offsets;
  p.page_table = a.page_table; p.page_table_stride = a.page_table_stride; p.page_shift = a.page_shift;
  return p;
}

int emu_fwd(const EmuArgs* a) {
  const AttnParams p = to_params(*a);
  if (p.batch == 0 || p.max_seqlen == 0) return 0;
  dispatch<false>(p, a->dtype, a->D, a->variant);
  return 0;
}
// The cached forward: q, k, v, out and offsets are the new rows, max_seqlen their largest count per sequence.
int emu_fwd_cached(const EmuArgs* a) {
  const AttnParams p = to_params(*a);
  if (p.batch == 0 || p.max_seqlen == 0) return 0;
  if (a->dtype == 0) dispatch_cached<__nv_bfloat16>(p, a->D);
  else dispatch_cached<__half>(p, a->D);
  return 0;
}
int emu_bwd(const EmuArgs* a) {
  const AttnParams p = to_params(*a);
  dispatch<true>(p, a->dtype, a->D, a->variant);
  return 0;
}
long emu_switches() { return emu::g_switches; }

// heuristics.h's plans, for the tests (no device: sm90_device says what the device would be). problem[]: head_dim,
// batch, heads, max_seqlen, bf16, rab, drab, dropout, rab_tables. out[0]: an sm90 kernel;
// out[1]: Sm90FwdKernel (forward) or Sm80DkDv (backward); out[2]: persistent (forward) or atomic dq (backward);
// out[3]: sched_group. options[]: deterministic, sm90_forward, sm90_backward, fwd_warp_specialized, fwd_two_per_sm,
// fwd_persistent, grouped_schedule (Choice values: -1 auto, 0 off, 1 on), bench_bwd_warps, bench_d256_two_pass.
void emu_plan(int backward, const int* problem, const int* options, int sm90_device, int* out) {
  Problem pr;
  pr.head_dim = problem[0];
  pr.batch = problem[1];
  pr.heads = problem[2];
  pr.max_seqlen = problem[3];
  pr.bf16 = problem[4] != 0;
  pr.rab = problem[5] != 0;
  pr.drab = problem[6] != 0;
  pr.dropout = problem[7] != 0;
  pr.rab_tables = problem[8] != 0;
  KernelOptions o;
  o.deterministic = options[0] != 0;
  o.sm90_forward = options[1] != 0;
  o.sm90_backward = options[2] != 0;
  o.fwd_warp_specialized = options[3] != 0;
  o.fwd_two_per_sm = static_cast<Choice>(options[4]);
  o.fwd_persistent = options[5] != 0;
  o.grouped_schedule = static_cast<Choice>(options[6]);
  o.bench_bwd_warps = options[7];
  o.bench_d256_two_pass = options[8] != 0;
  Platform pl;
  pl.sm90_device = sm90_device != 0;
  pl.sm90_forward_built = pl.sm90_backward_built = true;
  if (backward) {
    const BwdPlan plan = plan_backward(pr, o, pl);
    out[0] = plan.sm90;
    out[1] = static_cast<int>(plan.dkdv);
    out[2] = plan.atomic_dq;
    out[3] = plan.sched_group;
  } else {
    const FwdPlan plan = plan_forward(pr, o, pl);
    out[0] = plan.sm90;
    out[1] = static_cast<int>(plan.sm90_choice.kernel);
    out[2] = plan.sm90_choice.persistent;
    out[3] = plan.sched_group;
  }
}
}
