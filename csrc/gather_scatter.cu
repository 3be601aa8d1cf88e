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

enum class Op { kGatherRows, kGatherCols, kScatterRows, kScatterCols };

// Every kernel takes (src, idx, out) and three sizes, in the order of its entry point.
template <typename T>
using Kernel = void (*)(const T*, const std::int64_t*, T*, std::int64_t, std::int64_t, std::int64_t);

template <Op op, typename T, int VEC>
constexpr Kernel<T> kernel() {
  if constexpr (op == Op::kGatherRows) return _gather_rows_kernel<T, VEC>;
  else if constexpr (op == Op::kGatherCols) return _gather_cols_kernel<T, VEC>;
  else if constexpr (op == Op::kScatterRows) return _scatter_rows_kernel<T, VEC>;
  else return _scatter_cols_kernel<T, VEC>;
}

// How an op's sizes map onto its grid: the row kernels move whole rows (packs along a row of `width`, both src and
// out read or written in packs); the column kernels move output columns (packs along out's row, src read element
// by element, so only out's alignment matters).
struct Grid {
  std::int64_t x;               // elements along grid x, VEC a thread
  std::int64_t y;               // rows along grid y
  std::int64_t rows_per_block;  // rows a block of grid y walks
  bool src_in_packs;            // whether src must be 16-byte aligned too
};

template <Op op, typename T>
void launch(const char* name, const Grid& grid, std::intptr_t src, std::intptr_t idx, std::intptr_t out,
            std::int64_t a, std::int64_t b, std::int64_t c, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  const auto* p_src = reinterpret_cast<const T*>(src);
  const auto* p_idx = reinterpret_cast<const std::int64_t*>(idx);
  auto* p_out = reinterpret_cast<T*>(out);
  const unsigned int gy = grid_y(grid.y, grid.rows_per_block);
  if (grid.x % V == 0 && (!grid.src_in_packs || aligned16(src)) && aligned16(out)) {
    const Kernel<T> packed = kernel<op, T, V>();
    packed<<<dim3(ceil_div(grid.x / V, kThreads), gy), kThreads, 0, stream>>>(p_src, p_idx, p_out, a, b, c);
  } else {
    const Kernel<T> single = kernel<op, T, 1>();
    single<<<dim3(ceil_div(grid.x, kThreads), gy), kThreads, 0, stream>>>(p_src, p_idx, p_out, a, b, c);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) check_cuda(err, (std::string(name) + " kernel launch").c_str());
}

// The shared part of the four entry points: size checks, nothing to do for an empty grid, the device, and the
// element type of `elem_size` bytes (values are only moved, so one unsigned type of each size serves all dtypes).
template <Op op>
void run(const char* name, const Grid& grid, std::intptr_t src, std::intptr_t idx, std::intptr_t out, std::int64_t a,
         std::int64_t b, std::int64_t c, int elem_size, int device, std::intptr_t stream) {
  if (a < 0 || b < 0 || c < 0) throw std::invalid_argument(std::string("sat_kernels._C.") + name + ": negative size");
  if (grid.x == 0 || grid.y == 0) return;
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  switch (elem_size) {
    case 2: launch<op, std::uint16_t>(name, grid, src, idx, out, a, b, c, s); break;
    case 4: launch<op, std::uint32_t>(name, grid, src, idx, out, a, b, c, s); break;
    case 8: launch<op, std::uint64_t>(name, grid, src, idx, out, a, b, c, s); break;
    default: throw std::invalid_argument(std::string("sat_kernels._C.") + name + ": elem_size must be 2, 4 or 8");
  }
}

}  // namespace

void gather_rows(std::intptr_t src, std::intptr_t idx, std::intptr_t out, std::int64_t n, std::int64_t k,
                 std::int64_t width, int elem_size, int device, std::intptr_t stream) {
  run<Op::kGatherRows>("gather_rows", {width, k, 1, true}, src, idx, out, n, k, width, elem_size, device, stream);
}

void gather_cols(std::intptr_t src, std::intptr_t idx, std::intptr_t out, std::int64_t rows, std::int64_t n,
                 std::int64_t k, int elem_size, int device, std::intptr_t stream) {
  run<Op::kGatherCols>("gather_cols", {k, rows, kRowsPerBlock, false}, src, idx, out, rows, n, k, elem_size, device,
                       stream);
}

void scatter_rows(std::intptr_t src, std::intptr_t idx, std::intptr_t out, std::int64_t n, std::int64_t k,
                  std::int64_t width, int elem_size, int device, std::intptr_t stream) {
  run<Op::kScatterRows>("scatter_rows", {width, n, kRowsPerBlock, true}, src, idx, out, n, k, width, elem_size, device,
                        stream);
}

void scatter_cols(std::intptr_t src, std::intptr_t idx, std::intptr_t out, std::int64_t rows, std::int64_t n,
                  std::int64_t k, int elem_size, int device, std::intptr_t stream) {
  run<Op::kScatterCols>("scatter_cols", {n, rows, kRowsPerBlock, false}, src, idx, out, rows, n, k, elem_size, device,
                        stream);
}

}  // namespace sat
