// Jagged-tensor copies on CUDA, registered as the `hstu_jagged` torch library (CUDA implementations only; the
// Python layer hstu/ops/jagged/ checks arguments, owns autograd and falls back to its PyTorch references).
//
// A jagged tensor is `values` (T, row) with `offsets` (B + 1,): sequence b is rows offsets[b] .. offsets[b + 1].
// Rows are copied as raw bytes in the widest vector (16, 8, 4, 2 or 1 bytes) that divides the row and the
// pointers' alignment, so every dtype and feature width takes the same kernels. Each kernel walks the rows of its
// OUTPUT and writes every one of them (padding and zeros included), so no output needs a separate fill, and
// finds a jagged row's sequence by binary search over the offsets: no kernel needs a host-side size beyond the
// output shapes the caller allocates.
//
//   to_padded(values, offsets, N, pad)       (B, N, row):  row p < len_b of sequence b, else pad
//   from_padded(dense, offsets, T)           (T, row):     dense[b, p] for p < N, else zeros (the gradient of
//                                                          to_padded for rows past N)
//   concat(a, offsets_a, b, offsets_b, out_offsets)  per sequence [a_b; b_b]
//   split(values, offsets_a, offsets_b, out_offsets) its inverse: (a, b)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace hstu {
namespace jagged {

constexpr int kThreads = 256;

// The sequence holding jagged row t: the last b with offsets[b] <= t (empty sequences are passed over).
template <typename Idx>
__device__ __forceinline__ int64_t sequence_of(const Idx* __restrict__ offsets, int64_t batch, int64_t t) {
  int64_t lo = 0, hi = batch;  // offsets[lo] <= t < offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) >> 1;
    if (static_cast<int64_t>(offsets[mid]) <= t) lo = mid; else hi = mid;
  }
  return lo;
}

// Threads of a block split into groups of `tpr` threads, one output row per group per step; rows are visited with
// a grid-stride loop.
struct RowWalk {
  int64_t first, stride;
  int lane, tpr;
  __device__ RowWalk(int tpr_) : tpr(tpr_) {
    const int rows_per_block = kThreads / tpr;
    lane = threadIdx.x % tpr;
    first = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / tpr;
    stride = static_cast<int64_t>(gridDim.x) * rows_per_block;
  }
};

template <typename Idx, typename Vec>
__global__ void __launch_bounds__(kThreads) to_padded_kernel(const Vec* __restrict__ values,
                                                              const Idx* __restrict__ offsets, Vec* __restrict__ out,
                                                              int64_t batch, int64_t n, int64_t row_vecs, int tpr,
                                                              Vec pad) {
  const RowWalk w(tpr);
  for (int64_t r = w.first; r < batch * n; r += w.stride) {
    const int64_t b = r / n, p = r - b * n;
    const int64_t start = offsets[b], len = static_cast<int64_t>(offsets[b + 1]) - start;
    Vec* dst = out + r * row_vecs;
    if (p < len) {
      const Vec* src = values + (start + p) * row_vecs;
      for (int64_t v = w.lane; v < row_vecs; v += tpr) dst[v] = src[v];
    } else {
      for (int64_t v = w.lane; v < row_vecs; v += tpr) dst[v] = pad;
    }
  }
}

template <typename Idx, typename Vec>
__global__ void __launch_bounds__(kThreads) from_padded_kernel(const Vec* __restrict__ dense,
                                                                const Idx* __restrict__ offsets, Vec* __restrict__ out,
                                                                int64_t batch, int64_t n, int64_t total,
                                                                int64_t row_vecs, int tpr) {
  const RowWalk w(tpr);
  for (int64_t t = w.first; t < total; t += w.stride) {
    const int64_t b = sequence_of(offsets, batch, t);
    const int64_t p = t - static_cast<int64_t>(offsets[b]);
    Vec* dst = out + t * row_vecs;
    if (p < n) {
      const Vec* src = dense + (b * n + p) * row_vecs;
      for (int64_t v = w.lane; v < row_vecs; v += tpr) dst[v] = src[v];
    } else {
      const Vec zero{};
      for (int64_t v = w.lane; v < row_vecs; v += tpr) dst[v] = zero;
    }
  }
}

// Row t of the concatenation [a_b; b_b] lives in a (returns true, row *src) or in b (false).
template <typename Idx>
__device__ __forceinline__ bool concat_source(const Idx* __restrict__ offsets_a, const Idx* __restrict__ offsets_b,
                                              const Idx* __restrict__ out_offsets, int64_t batch, int64_t t,
                                              int64_t* src) {
  const int64_t b = sequence_of(out_offsets, batch, t);
  const int64_t p = t - static_cast<int64_t>(out_offsets[b]);
  const int64_t a0 = offsets_a[b], len_a = static_cast<int64_t>(offsets_a[b + 1]) - a0;
  if (p < len_a) {
    *src = a0 + p;
    return true;
  }
  *src = static_cast<int64_t>(offsets_b[b]) + p - len_a;
  return false;
}

template <typename Idx, typename Vec>
__global__ void __launch_bounds__(kThreads) concat_kernel(const Vec* __restrict__ a, const Vec* __restrict__ bv,
                                                           const Idx* __restrict__ offsets_a,
                                                           const Idx* __restrict__ offsets_b,
                                                           const Idx* __restrict__ out_offsets, Vec* __restrict__ out,
                                                           int64_t batch, int64_t total, int64_t row_vecs, int tpr) {
  const RowWalk w(tpr);
  for (int64_t t = w.first; t < total; t += w.stride) {
    int64_t s;
    const Vec* src = concat_source(offsets_a, offsets_b, out_offsets, batch, t, &s) ? a + s * row_vecs
                                                                                    : bv + s * row_vecs;
    Vec* dst = out + t * row_vecs;
    for (int64_t v = w.lane; v < row_vecs; v += tpr) dst[v] = src[v];
  }
}

template <typename Idx, typename Vec>
__global__ void __launch_bounds__(kThreads) split_kernel(const Vec* __restrict__ values,
                                                          const Idx* __restrict__ offsets_a,
                                                          const Idx* __restrict__ offsets_b,
                                                          const Idx* __restrict__ out_offsets, Vec* __restrict__ a,
                                                          Vec* __restrict__ bv, int64_t batch, int64_t total,
                                                          int64_t row_vecs, int tpr) {
  const RowWalk w(tpr);
  for (int64_t t = w.first; t < total; t += w.stride) {
    int64_t s;
    Vec* dst = concat_source(offsets_a, offsets_b, out_offsets, batch, t, &s) ? a + s * row_vecs : bv + s * row_vecs;
    const Vec* src = values + t * row_vecs;
    for (int64_t v = w.lane; v < row_vecs; v += tpr) dst[v] = src[v];
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side

// Bytes per row of a (rows, ...) contiguous tensor.
int64_t row_bytes(const at::Tensor& t) {
  return t.dim() == 0 ? 0 : (t.size(0) == 0 ? t.numel() : t.numel() / t.size(0)) * t.element_size();
}

// The widest vector that divides the row and every pointer's alignment.
int vector_bytes(int64_t bytes_per_row, std::initializer_list<const void*> ptrs) {
  for (int v : {16, 8, 4, 2}) {
    bool ok = bytes_per_row % v == 0;
    for (const void* p : ptrs) ok = ok && reinterpret_cast<std::uintptr_t>(p) % v == 0;
    if (ok) return v;
  }
  return 1;
}

template <typename F>
void with_vector(int bytes, F&& f) {
  switch (bytes) {
    case 16: f(uint4{}); break;
    case 8: f(uint2{}); break;
    case 4: f(uint32_t{}); break;
    case 2: f(uint16_t{}); break;
    default: f(uint8_t{}); break;
  }
}

template <typename F>
void with_index(const at::Tensor& offsets, F&& f) {
  if (offsets.scalar_type() == at::kInt) f(int32_t{}); else f(int64_t{});
}

// launch(Idx{}, Vec{}) for the offsets' index type and the vector width, then the launch check.
template <typename F>
void launch_typed(const at::Tensor& offsets, int vbytes, F&& launch) {
  with_index(offsets, [&](auto idx) { with_vector(vbytes, [&](auto vec) { launch(idx, vec); }); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct Launch {
  int tpr;
  unsigned grid;
};

// Threads per row: the power of two covering the row's vectors (at most a block); blocks: enough for every row,
// at most 32 per SM (the kernels loop).
Launch launch_for(int64_t rows, int64_t row_vecs) {
  int tpr = 1;
  while (tpr < row_vecs && tpr < kThreads) tpr *= 2;
  const int64_t rows_per_block = kThreads / tpr;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t want = (rows + rows_per_block - 1) / rows_per_block;
  const int64_t cap = static_cast<int64_t>(sms) * 32;
  return {tpr, static_cast<unsigned>(std::max<int64_t>(1, std::min(want, cap)))};
}

// n rows shaped like the rows of t (t's dimensions after the first `skip`).
std::vector<int64_t> rows_shape(int64_t n, const at::Tensor& t, int skip = 1) {
  std::vector<int64_t> shape{n};
  for (int64_t d = skip; d < t.dim(); ++d) shape.push_back(t.size(d));
  return shape;
}

// How the kernels walk `rows` output rows of `bytes_per_row` bytes: vector width, vectors per row, grid, stream.
struct RowPlan {
  int vbytes;
  int64_t row_vecs;
  Launch launch;
  cudaStream_t stream;
};
RowPlan plan_rows(int64_t rows, int64_t bytes_per_row, std::initializer_list<const void*> ptrs) {
  const int vbytes = vector_bytes(bytes_per_row, ptrs);
  const int64_t row_vecs = bytes_per_row / vbytes;
  return {vbytes, row_vecs, launch_for(rows, row_vecs), c10::cuda::getCurrentCUDAStream().stream()};
}

void check_common(const at::Tensor& offsets, std::initializer_list<at::Tensor> tensors) {
  TORCH_CHECK(offsets.scalar_type() == at::kInt || offsets.scalar_type() == at::kLong,
              "hstu_jagged: offsets must be int32 or int64");
  for (const auto& t : tensors) {
    TORCH_CHECK(t.is_cuda() && t.device() == offsets.device(), "hstu_jagged: tensors must be on offsets' device");
    TORCH_CHECK(t.is_contiguous(), "hstu_jagged: tensors must be contiguous");
  }
}

at::Tensor to_padded(const at::Tensor& values, const at::Tensor& offsets, int64_t max_length,
                     const at::Scalar& padding_value) {
  check_common(offsets, {values, offsets});
  TORCH_CHECK(values.dim() >= 1 && offsets.dim() == 1 && offsets.numel() >= 1 && max_length >= 0,
              "hstu_jagged.to_padded: bad shapes");
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t batch = offsets.numel() - 1;
  std::vector<int64_t> shape = rows_shape(max_length, values);
  shape.insert(shape.begin(), batch);
  at::Tensor out = at::empty(shape, values.options());
  const int64_t rb = row_bytes(values);
  if (out.numel() == 0 || rb == 0) return out;
  // the padding element's bytes, repeated to fill a 16-byte vector
  const at::Tensor pad_elem = at::full({1}, padding_value, values.options().device(at::kCPU));
  const int es = static_cast<int>(values.element_size());
  alignas(16) unsigned char pattern[16];
  for (int i = 0; i < 16; i += es) std::memcpy(pattern + i, pad_elem.data_ptr(), es);
  // element sizes are powers of two and the row and pointers are element-aligned, so the vector holds whole
  // elements and the padding pattern lines up with it
  const RowPlan r = plan_rows(batch * max_length, rb, {values.data_ptr(), out.data_ptr()});
  TORCH_CHECK(r.vbytes % es == 0, "hstu_jagged.to_padded: unsupported element size ", es);
  launch_typed(offsets, r.vbytes, [&](auto idx, auto vec) {
    using Idx = decltype(idx);
    using Vec = decltype(vec);
    Vec pad;
    std::memcpy(&pad, pattern, sizeof(Vec));
    to_padded_kernel<Idx, Vec><<<r.launch.grid, kThreads, 0, r.stream>>>(
        static_cast<const Vec*>(values.data_ptr()), offsets.data_ptr<Idx>(), static_cast<Vec*>(out.data_ptr()),
        batch, max_length, r.row_vecs, r.launch.tpr, pad);
  });
  return out;
}

at::Tensor from_padded(const at::Tensor& dense, const at::Tensor& offsets, int64_t total) {
  check_common(offsets, {dense, offsets});
  TORCH_CHECK(dense.dim() >= 2 && offsets.dim() == 1 && offsets.numel() == dense.size(0) + 1 && total >= 0,
              "hstu_jagged.from_padded: bad shapes");
  const c10::cuda::CUDAGuard guard(dense.device());
  const int64_t batch = dense.size(0), n = dense.size(1);
  at::Tensor out = at::empty(rows_shape(total, dense, 2), dense.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK(batch > 0, "hstu_jagged.from_padded: rows without a sequence");
  const RowPlan r = plan_rows(total, row_bytes(out), {dense.data_ptr(), out.data_ptr()});
  launch_typed(offsets, r.vbytes, [&](auto idx, auto vec) {
    using Idx = decltype(idx);
    using Vec = decltype(vec);
    from_padded_kernel<Idx, Vec><<<r.launch.grid, kThreads, 0, r.stream>>>(
        static_cast<const Vec*>(dense.data_ptr()), offsets.data_ptr<Idx>(), static_cast<Vec*>(out.data_ptr()),
        batch, n, total, r.row_vecs, r.launch.tpr);
  });
  return out;
}

void check_pair_offsets(const at::Tensor& offsets_a, const at::Tensor& offsets_b, const at::Tensor& out_offsets) {
  TORCH_CHECK(offsets_a.scalar_type() == offsets_b.scalar_type() && offsets_a.scalar_type() == out_offsets.scalar_type(),
              "hstu_jagged: offsets_a, offsets_b and out_offsets must share a dtype");
  TORCH_CHECK(offsets_a.dim() == 1 && offsets_a.numel() >= 1 && offsets_b.numel() == offsets_a.numel() &&
                  out_offsets.numel() == offsets_a.numel(),
              "hstu_jagged: offsets_a, offsets_b and out_offsets must have B + 1 entries each");
}

at::Tensor concat(const at::Tensor& a, const at::Tensor& offsets_a, const at::Tensor& b, const at::Tensor& offsets_b,
                  const at::Tensor& out_offsets) {
  check_common(offsets_a, {a, b, offsets_a, offsets_b, out_offsets});
  check_pair_offsets(offsets_a, offsets_b, out_offsets);
  TORCH_CHECK(a.dim() >= 1 && a.sizes().slice(1) == b.sizes().slice(1) && a.scalar_type() == b.scalar_type(),
              "hstu_jagged.concat: a and b rows differ");
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty(rows_shape(a.size(0) + b.size(0), a), a.options());
  if (out.numel() == 0) return out;
  const int64_t total = out.size(0), batch = offsets_a.numel() - 1;
  const RowPlan r = plan_rows(total, row_bytes(out), {a.data_ptr(), b.data_ptr(), out.data_ptr()});
  launch_typed(offsets_a, r.vbytes, [&](auto idx, auto vec) {
    using Idx = decltype(idx);
    using Vec = decltype(vec);
    concat_kernel<Idx, Vec><<<r.launch.grid, kThreads, 0, r.stream>>>(
        static_cast<const Vec*>(a.data_ptr()), static_cast<const Vec*>(b.data_ptr()), offsets_a.data_ptr<Idx>(),
        offsets_b.data_ptr<Idx>(), out_offsets.data_ptr<Idx>(), static_cast<Vec*>(out.data_ptr()), batch, total,
        r.row_vecs, r.launch.tpr);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> split(const at::Tensor& values, const at::Tensor& offsets_a,
                                         const at::Tensor& offsets_b, const at::Tensor& out_offsets, int64_t total_a,
                                         int64_t total_b) {
  check_common(offsets_a, {values, offsets_a, offsets_b, out_offsets});
  check_pair_offsets(offsets_a, offsets_b, out_offsets);
  TORCH_CHECK(values.dim() >= 1 && total_a >= 0 && total_b >= 0 && values.size(0) == total_a + total_b,
              "hstu_jagged.split: values has ", values.size(0), " rows, not total_a + total_b = ", total_a + total_b);
  const c10::cuda::CUDAGuard guard(values.device());
  at::Tensor a = at::empty(rows_shape(total_a, values), values.options());
  at::Tensor b = at::empty(rows_shape(total_b, values), values.options());
  if (values.numel() == 0) return {a, b};
  const int64_t total = values.size(0), batch = offsets_a.numel() - 1;
  const RowPlan r = plan_rows(total, row_bytes(values), {values.data_ptr(), a.data_ptr(), b.data_ptr()});
  launch_typed(offsets_a, r.vbytes, [&](auto idx, auto vec) {
    using Idx = decltype(idx);
    using Vec = decltype(vec);
    split_kernel<Idx, Vec><<<r.launch.grid, kThreads, 0, r.stream>>>(
        static_cast<const Vec*>(values.data_ptr()), offsets_a.data_ptr<Idx>(), offsets_b.data_ptr<Idx>(),
        out_offsets.data_ptr<Idx>(), static_cast<Vec*>(a.data_ptr()), static_cast<Vec*>(b.data_ptr()), batch, total,
        r.row_vecs, r.launch.tpr);
  });
  return {a, b};
}

}  // namespace jagged
}  // namespace hstu

TORCH_LIBRARY(hstu_jagged, m) {
  m.def("to_padded(Tensor values, Tensor offsets, int max_length, Scalar padding_value) -> Tensor");
  m.def("from_padded(Tensor dense, Tensor offsets, int total) -> Tensor");
  m.def("concat(Tensor a, Tensor offsets_a, Tensor b, Tensor offsets_b, Tensor out_offsets) -> Tensor");
  m.def("split(Tensor values, Tensor offsets_a, Tensor offsets_b, Tensor out_offsets, int total_a, int total_b) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hstu_jagged, CUDA, m) {
  m.impl("to_padded", &hstu::jagged::to_padded);
  m.impl("from_padded", &hstu::jagged::from_padded);
  m.impl("concat", &hstu::jagged::concat);
  m.impl("split", &hstu::jagged::split);
}
