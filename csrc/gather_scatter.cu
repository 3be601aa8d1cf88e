// Gathers and scatters of kept rows/columns, by element size (the values are only moved, never converted, so one
// instantiation serves fp16 and bf16). A thread moves one 16-byte pack of VEC elements when the row length and the
// addresses allow it, one element otherwise (VEC = 1). Gathers check each index (device assert, like index_select);
// scatters look indices up by binary search in the ascending list and write every output element exactly once.
#include <cassert>

#include "common.cuh"
#include "sat_kernels.h"

namespace sat {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = 32;  // column kernels: rows a block walks with the same indices

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& b) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = b;
}

// First position p in the ascending idx[0:k] with idx[p] >= value.
__device__ __forceinline__ std::int64_t lower_bound(const std::int64_t* __restrict__ idx, std::int64_t k,
                                                    std::int64_t value) {
  std::int64_t lo = 0, hi = k;
  while (lo < hi) {
    const std::int64_t mid = (lo + hi) >> 1;
    if (__ldg(idx + mid) < value) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// out[j, :] = src[idx[j], :]. Thread: one pack of a row; block y: rows j strided by gridDim.y.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    _gather_rows_kernel(const T* __restrict__ src, const std::int64_t* __restrict__ idx, T* __restrict__ out,
                        std::int64_t n, std::int64_t k, std::int64_t width) {
  const std::int64_t o_w = (static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (o_w >= width) return;
  for (std::int64_t j = blockIdx.y; j < k; j += gridDim.y) {
    const std::int64_t row = __ldg(idx + j);
    assert(row >= 0 && row < n && "gather_rows: index out of range");
    store_pack<T, VEC>(out + j * width + o_w, load_pack<T, VEC>(src + row * width + o_w));
  }
}

// out[r, j] = src[r, idx[j]]. Thread: VEC consecutive output columns (their indices read once), rows strided.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    _gather_cols_kernel(const T* __restrict__ src, const std::int64_t* __restrict__ idx, T* __restrict__ out,
                        std::int64_t rows, std::int64_t n, std::int64_t k) {
  const std::int64_t o_j = (static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (o_j >= k) return;
  std::int64_t b_col[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    b_col[v] = __ldg(idx + o_j + v);
    assert(b_col[v] >= 0 && b_col[v] < n && "gather_cols: index out of range");
  }
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.y) * kRowsPerBlock; r < rows;
       r += static_cast<std::int64_t>(gridDim.y) * kRowsPerBlock) {
    const std::int64_t r_end = r + kRowsPerBlock < rows ? r + kRowsPerBlock : rows;
    for (std::int64_t i_r = r; i_r < r_end; ++i_r) {
      const T* p_src = src + i_r * n;
      Pack<T, VEC> b_val;
#pragma unroll
      for (int v = 0; v < VEC; ++v) b_val.v[v] = p_src[b_col[v]];
      store_pack<T, VEC>(out + i_r * k + o_j, b_val);
    }
  }
}

// out[r, :] = src[p, :] where idx[p] == r, else 0. Block y: a run of kRowsPerBlock output rows, whose kept rows are
// consecutive entries of idx starting at one binary search.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    _scatter_rows_kernel(const T* __restrict__ src, const std::int64_t* __restrict__ idx, T* __restrict__ out,
                         std::int64_t n, std::int64_t k, std::int64_t width) {
  const std::int64_t o_w = (static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (o_w >= width) return;
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.y) * kRowsPerBlock; r < n;
       r += static_cast<std::int64_t>(gridDim.y) * kRowsPerBlock) {
    const std::int64_t r_end = r + kRowsPerBlock < n ? r + kRowsPerBlock : n;
    std::int64_t p = lower_bound(idx, k, r);
    for (std::int64_t i_r = r; i_r < r_end; ++i_r) {
      Pack<T, VEC> b_val = {};
      if (p < k && __ldg(idx + p) == i_r) {
        b_val = load_pack<T, VEC>(src + p * width + o_w);
        ++p;
      }
      store_pack<T, VEC>(out + i_r * width + o_w, b_val);
    }
  }
}

// out[r, c] = src[r, p] where idx[p] == c, else 0. Thread: VEC consecutive output columns (their positions found
// once), rows strided.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    _scatter_cols_kernel(const T* __restrict__ src, const std::int64_t* __restrict__ idx, T* __restrict__ out,
                         std::int64_t rows, std::int64_t n, std::int64_t k) {
  const std::int64_t o_c = (static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (o_c >= n) return;
  std::int64_t b_pos[VEC];  // -1: the column is not kept
  std::int64_t p = lower_bound(idx, k, o_c);
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    b_pos[v] = -1;
    if (p < k && __ldg(idx + p) == o_c + v) b_pos[v] = p++;
  }
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.y) * kRowsPerBlock; r < rows;
       r += static_cast<std::int64_t>(gridDim.y) * kRowsPerBlock) {
    const std::int64_t r_end = r + kRowsPerBlock < rows ? r + kRowsPerBlock : rows;
    for (std::int64_t i_r = r; i_r < r_end; ++i_r) {
      const T* p_src = src + i_r * k;
      Pack<T, VEC> b_val;
#pragma unroll
      for (int v = 0; v < VEC; ++v) b_val.v[v] = b_pos[v] >= 0 ? p_src[b_pos[v]] : T(0);
      store_pack<T, VEC>(out + i_r * n + o_c, b_val);
    }
  }
}

template <typename T>
constexpr int kVec = 16 / sizeof(T);

template <typename T>
void launch_gather_rows(std::intptr_t src, std::intptr_t idx, std::intptr_t out, std::int64_t n, std::int64_t k,
                        std::int64_t width, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  const auto* p_src = reinterpret_cast<const T*>(src);
  const auto* p_idx = reinterpret_cast<const std::int64_t*>(idx);
  auto* p_out = reinterpret_cast<T*>(out);
  const unsigned int gy = grid_y(k, 1);
  if (width % V == 0 && aligned16(src) && aligned16(out)) {
    _gather_rows_kernel<T, V><<<dim3(ceil_div(width / V, kThreads), gy), kThreads, 0, stream>>>(p_src, p_idx, p_out,
                                                                                               n, k, width);
  } else {
    _gather_rows_kernel<T, 1><<<dim3(ceil_div(width, kThreads), gy), kThreads, 0, stream>>>(p_src, p_idx, p_out, n,
                                                                                            k, width);
  }
  check_launch("gather_rows kernel launch");
}

template <typename T>
void launch_gather_cols(std::intptr_t src, std::intptr_t idx, std::intptr_t out, std::int64_t rows, std::int64_t n,
                        std::int64_t k, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  const auto* p_src = reinterpret_cast<const T*>(src);
  const auto* p_idx = reinterpret_cast<const std::int64_t*>(idx);
  auto* p_out = reinterpret_cast<T*>(out);
  const unsigned int gy = grid_y(rows, kRowsPerBlock);
  if (k % V == 0 && aligned16(out)) {
    _gather_cols_kernel<T, V><<<dim3(ceil_div(k / V, kThreads), gy), kThreads, 0, stream>>>(p_src, p_idx, p_out, rows,
                                                                                           n, k);
  } else {
    _gather_cols_kernel<T, 1><<<dim3(ceil_div(k, kThreads), gy), kThreads, 0, stream>>>(p_src, p_idx, p_out, rows, n,
                                                                                        k);
  }
  check_launch("gather_cols kernel launch");
}

template <typename T>
void launch_scatter_rows(std::intptr_t src, std::intptr_t idx, std::intptr_t out, std::int64_t n, std::int64_t k,
                         std::int64_t width, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  const auto* p_src = reinterpret_cast<const T*>(src);
  const auto* p_idx = reinterpret_cast<const std::int64_t*>(idx);
  auto* p_out = reinterpret_cast<T*>(out);
  const unsigned int gy = grid_y(n, kRowsPerBlock);
  if (width % V == 0 && aligned16(src) && aligned16(out)) {
    _scatter_rows_kernel<T, V><<<dim3(ceil_div(width / V, kThreads), gy), kThreads, 0, stream>>>(p_src, p_idx, p_out,
                                                                                                n, k, width);
  } else {
    _scatter_rows_kernel<T, 1><<<dim3(ceil_div(width, kThreads), gy), kThreads, 0, stream>>>(p_src, p_idx, p_out, n,
                                                                                             k, width);
  }
  check_launch("scatter_rows kernel launch");
}

template <typename T>
void launch_scatter_cols(std::intptr_t src, std::intptr_t idx, std::intptr_t out, std::int64_t rows, std::int64_t n,
                         std::int64_t k, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  const auto* p_src = reinterpret_cast<const T*>(src);
  const auto* p_idx = reinterpret_cast<const std::int64_t*>(idx);
  auto* p_out = reinterpret_cast<T*>(out);
  const unsigned int gy = grid_y(rows, kRowsPerBlock);
  if (n % V == 0 && aligned16(out)) {
    _scatter_cols_kernel<T, V><<<dim3(ceil_div(n / V, kThreads), gy), kThreads, 0, stream>>>(p_src, p_idx, p_out,
                                                                                            rows, n, k);
  } else {
    _scatter_cols_kernel<T, 1><<<dim3(ceil_div(n, kThreads), gy), kThreads, 0, stream>>>(p_src, p_idx, p_out, rows,
                                                                                         n, k);
  }
  check_launch("scatter_cols kernel launch");
}

// Calls launch<T> for the element type of `elem_size` bytes.
template <template <typename> class Launch, typename... Args>
void by_elem_size(int elem_size, const char* name, Args... args) {
  switch (elem_size) {
    case 2: Launch<std::uint16_t>::run(args...); break;
    case 4: Launch<std::uint32_t>::run(args...); break;
    case 8: Launch<std::uint64_t>::run(args...); break;
    default: throw std::invalid_argument(std::string("sat_kernels._C.") + name + ": elem_size must be 2, 4 or 8");
  }
}

template <typename T>
struct GatherRows {
  template <typename... A>
  static void run(A... a) { launch_gather_rows<T>(a...); }
};
template <typename T>
struct GatherCols {
  template <typename... A>
  static void run(A... a) { launch_gather_cols<T>(a...); }
};
template <typename T>
struct ScatterRows {
  template <typename... A>
  static void run(A... a) { launch_scatter_rows<T>(a...); }
};
template <typename T>
struct ScatterCols {
  template <typename... A>
  static void run(A... a) { launch_scatter_cols<T>(a...); }
};

void check_sizes(const char* name, std::int64_t a, std::int64_t b, std::int64_t c) {
  if (a < 0 || b < 0 || c < 0) throw std::invalid_argument(std::string("sat_kernels._C.") + name + ": negative size");
}

}  // namespace

void gather_rows(std::intptr_t src, std::intptr_t idx, std::intptr_t out, std::int64_t n, std::int64_t k,
                 std::int64_t width, int elem_size, int device, std::intptr_t stream) {
  check_sizes("gather_rows", n, k, width);
  if (k == 0 || width == 0) return;
  DeviceGuard guard(device);
  by_elem_size<GatherRows>(elem_size, "gather_rows", src, idx, out, n, k, width, as_stream(stream));
}

void gather_cols(std::intptr_t src, std::intptr_t idx, std::intptr_t out, std::int64_t rows, std::int64_t n,
                 std::int64_t k, int elem_size, int device, std::intptr_t stream) {
  check_sizes("gather_cols", rows, n, k);
  if (rows == 0 || k == 0) return;
  DeviceGuard guard(device);
  by_elem_size<GatherCols>(elem_size, "gather_cols", src, idx, out, rows, n, k, as_stream(stream));
}

void scatter_rows(std::intptr_t src, std::intptr_t idx, std::intptr_t out, std::int64_t n, std::int64_t k,
                  std::int64_t width, int elem_size, int device, std::intptr_t stream) {
  check_sizes("scatter_rows", n, k, width);
  if (n == 0 || width == 0) return;
  DeviceGuard guard(device);
  by_elem_size<ScatterRows>(elem_size, "scatter_rows", src, idx, out, n, k, width, as_stream(stream));
}

void scatter_cols(std::intptr_t src, std::intptr_t idx, std::intptr_t out, std::int64_t rows, std::int64_t n,
                  std::int64_t k, int elem_size, int device, std::intptr_t stream) {
  check_sizes("scatter_cols", rows, n, k);
  if (rows == 0 || n == 0) return;
  DeviceGuard guard(device);
  by_elem_size<ScatterCols>(elem_size, "scatter_cols", src, idx, out, rows, n, k, as_stream(stream));
}

}  // namespace sat
