// Fused kept-set selection: keys (score, or score + Gumbel noise, or noise), radix select of the k-th largest key on
// its bits, and the sorted index list, in one kernel launch with one thread block per row and no host synchronisation.
//
// Per row: pass 0 computes the keys and the histogram of their top 8 bits; each further pass fixes one more 8-bit digit
// of the threshold key among the keys that share the digits fixed so far, and stops early once every key of the chosen
// bin is kept. A last pass walks the row in index order in chunks of the block size: a block-wide exclusive scan of
// (kept-above-threshold, equal-to-threshold) flags gives each kept index its output position, so the output comes out
// sorted ascending and ties at the threshold go to the lower indices (the set of a stable descending sort).
// The keys live in shared memory when n * 4 bytes fit (n <= 40k on A100, 56k on H100), else in a global workspace.
#include <cub/block/block_scan.cuh>

#include <atomic>

#include "common.cuh"
#include "sat_kernels.h"
#include "selection_keys.cuh"

namespace sat {
namespace {

constexpr int kSelectThreads = 1024;
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
constexpr int kBinsPerLane = kBins / 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

using SelectScan = cub::BlockScan<std::uint32_t, kSelectThreads>;

struct SelectShared {
  std::uint32_t hist[kBins];
  std::uint32_t bin;    // the bin of the threshold key at the current digit
  std::uint32_t above;  // keys in higher bins (all kept)
  std::uint32_t count;  // keys in that bin
  typename SelectScan::TempStorage scan;
};

// Adds one digit per lane to the histogram. Lanes with equal digits add once (warp-aggregated): positive scores of
// similar magnitude share their sign and exponent bits, and a plain atomicAdd per key would serialise on one bin.
// A lane without a key passes bin == kBins. All 32 lanes of the warp must call it.
__device__ __forceinline__ void hist_add(std::uint32_t* hist, std::uint32_t bin) {
  const unsigned peers = __match_any_sync(kFullMask, bin);
  if (bin < kBins && static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(hist + bin, __popc(peers));
}

// Warp 0: the bin (counted from the top) that holds the k_rem-th largest key, the number of keys above it and in it.
__device__ __forceinline__ void find_bin(SelectShared& s, std::uint32_t k_rem) {
  const int lane = threadIdx.x;
  std::uint32_t b_count[kBinsPerLane];  // this lane's bins, highest first
  std::uint32_t local = 0;
#pragma unroll
  for (int j = 0; j < kBinsPerLane; ++j) {
    b_count[j] = s.hist[kBins - 1 - (lane * kBinsPerLane + j)];
    local += b_count[j];
  }
  std::uint32_t incl = local;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const std::uint32_t v = __shfl_up_sync(kFullMask, incl, d);
    if (lane >= d) incl += v;
  }
  const std::uint32_t excl = incl - local;
  if (excl < k_rem && k_rem <= incl) {  // exactly one lane
    std::uint32_t run = excl;
#pragma unroll
    for (int j = 0; j < kBinsPerLane; ++j) {
      if (run + b_count[j] >= k_rem) {
        s.bin = kBins - 1 - (lane * kBinsPerLane + j);
        s.above = run;
        s.count = b_count[j];
        break;
      }
      run += b_count[j];
    }
  }
}

template <typename IndexT>
__global__ void __launch_bounds__(kSelectThreads)
    _select_kept_kernel(const float* __restrict__ scores, const float* __restrict__ uniform,
                        std::uint32_t* __restrict__ workspace, IndexT* __restrict__ out, int n, int k, int strategy,
                        std::uint64_t seed, std::uint64_t offset, bool keys_in_smem) {
  extern __shared__ std::uint32_t s_keys[];
  __shared__ SelectShared s;
  const int i_row = blockIdx.x;
  const int tid = threadIdx.x;
  const std::int64_t o_row = static_cast<std::int64_t>(i_row) * n;
  const float* p_scores = scores + o_row;
  const float* p_uniform = uniform != nullptr ? uniform + o_row : nullptr;
  std::uint32_t* p_keys = keys_in_smem ? s_keys : workspace + o_row;
  IndexT* p_out = out + static_cast<std::int64_t>(i_row) * k;
  // every thread runs the same number of iterations, so whole warps reach __match_any_sync
  const int n_round = (n + kSelectThreads - 1) / kSelectThreads * kSelectThreads;

  for (int b = tid; b < kBins; b += kSelectThreads) s.hist[b] = 0;
  __syncthreads();
  for (int i = tid; i < n_round; i += kSelectThreads) {
    std::uint32_t bin = kBins;
    if (i < n) {
      const std::uint32_t key = selection_key(p_scores[i], p_uniform, i, i_row, strategy, seed, offset);
      p_keys[i] = key;
      bin = key >> (32 - kRadixBits);
    }
    hist_add(s.hist, bin);
  }
  __syncthreads();

  // threshold: kept are the keys whose masked value is > prefix, and the first k_rem (by index) of those == prefix
  std::uint32_t prefix = 0, mask = 0, k_rem = static_cast<std::uint32_t>(k);
  for (int shift = 32 - kRadixBits;; shift -= kRadixBits) {
    if (tid < 32) find_bin(s, k_rem);
    __syncthreads();
    const std::uint32_t count = s.count;
    k_rem -= s.above;
    prefix |= s.bin << shift;
    mask |= static_cast<std::uint32_t>(kBins - 1) << shift;
    if (shift == 0 || count == k_rem) break;  // key complete, or every key of the bin is kept
    for (int b = tid; b < kBins; b += kSelectThreads) s.hist[b] = 0;
    __syncthreads();
    const int next = shift - kRadixBits;
    for (int i = tid; i < n_round; i += kSelectThreads) {
      std::uint32_t bin = kBins;
      if (i < n) {
        const std::uint32_t key = p_keys[i];
        if ((key & mask) == prefix) bin = (key >> next) & (kBins - 1);
      }
      hist_add(s.hist, bin);
    }
    __syncthreads();
  }

  // sorted output: position = kept-above keys before i + min(equal keys before i, k_rem)
  std::uint32_t run_gt = 0, run_eq = 0;
  for (int base = 0; base < n; base += kSelectThreads) {
    const int i = base + tid;
    std::uint32_t gt = 0, eq = 0;
    if (i < n) {
      const std::uint32_t key = p_keys[i] & mask;
      gt = key > prefix;
      eq = key == prefix;
    }
    std::uint32_t excl, total;  // both counts packed in 16 bits each: a chunk has at most 1024 of either
    SelectScan(s.scan).ExclusiveSum((gt << 16) | eq, excl, total);
    const std::uint32_t gt_before = run_gt + (excl >> 16), eq_before = run_eq + (excl & 0xFFFFu);
    if (gt) {
      p_out[gt_before + min(eq_before, k_rem)] = static_cast<IndexT>(i);
    } else if (eq && eq_before < k_rem) {
      p_out[gt_before + eq_before] = static_cast<IndexT>(i);
    }
    run_gt += total >> 16;
    run_eq += total & 0xFFFFu;
    __syncthreads();  // the scan storage is reused by the next chunk
  }
}

constexpr int kMaxDevices = 64;

// Dynamic shared memory for the keys of one row, or 0 when they do not fit (the kernel then uses the workspace).
// The first call per device raises the kernel's dynamic shared memory limit to what the device allows.
template <typename IndexT>
std::size_t keys_smem_bytes(std::int64_t n, int device) {
  static std::atomic<std::int64_t> limit_plus_one[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) return 0;
  std::int64_t limit = limit_plus_one[device].load() - 1;
  if (limit < 0) {
    int optin = 0;
    check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
    cudaFuncAttributes attr;
    check_cuda(cudaFuncGetAttributes(&attr, _select_kept_kernel<IndexT>), "cudaFuncGetAttributes");
    limit = std::max<std::int64_t>(0, static_cast<std::int64_t>(optin) - static_cast<std::int64_t>(attr.sharedSizeBytes));
    check_cuda(cudaFuncSetAttribute(_select_kept_kernel<IndexT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(limit)),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
    limit_plus_one[device].store(limit + 1);
  }
  const std::int64_t bytes = n * static_cast<std::int64_t>(sizeof(std::uint32_t));
  return bytes <= limit ? static_cast<std::size_t>(bytes) : 0;
}

template <typename IndexT>
void launch_select(const float* scores, const float* uniform, std::uint32_t* workspace, IndexT* out, std::int64_t rows,
                   std::int64_t n, std::int64_t k, int strategy, std::uint64_t seed, std::uint64_t offset, int device,
                   cudaStream_t stream) {
  const std::size_t smem = keys_smem_bytes<IndexT>(n, device);
  _select_kept_kernel<IndexT><<<static_cast<unsigned int>(rows), kSelectThreads, smem, stream>>>(
      scores, uniform, workspace, out, static_cast<int>(n), static_cast<int>(k), strategy, seed, offset, smem > 0);
  check_launch("select_kept kernel launch");
}

}  // namespace

void select_kept(std::intptr_t scores, std::intptr_t uniform, std::intptr_t workspace, std::intptr_t out,
                 bool out_int32, std::int64_t rows, std::int64_t n, std::int64_t k, int strategy, std::uint64_t seed,
                 std::uint64_t offset, int device, std::intptr_t stream) {
  if (rows <= 0 || n <= 0 || k <= 0 || k > n || n > 0x7FFFFFFF || rows > 0x7FFFFFFF) {
    throw std::invalid_argument("sat_kernels._C.select_kept: need 1 <= k <= n < 2^31 and 1 <= rows < 2^31");
  }
  if (strategy != kTopk && strategy != kSample && strategy != kRandom) {
    throw std::invalid_argument("sat_kernels._C.select_kept: strategy must be 0 (topk), 1 (sample) or 2 (random)");
  }
  DeviceGuard guard(device);
  const auto* p_scores = reinterpret_cast<const float*>(scores);
  const auto* p_uniform = reinterpret_cast<const float*>(uniform);
  auto* p_workspace = reinterpret_cast<std::uint32_t*>(workspace);
  if (out_int32) {
    launch_select(p_scores, p_uniform, p_workspace, reinterpret_cast<std::int32_t*>(out), rows, n, k, strategy, seed,
                  offset, device, as_stream(stream));
  } else {
    launch_select(p_scores, p_uniform, p_workspace, reinterpret_cast<std::int64_t*>(out), rows, n, k, strategy, seed,
                  offset, device, as_stream(stream));
  }
}

void host_selection_keys(std::intptr_t scores, std::intptr_t uniform, std::intptr_t keys, std::int64_t n,
                         std::int64_t row, int strategy, std::uint64_t seed, std::uint64_t offset) {
  const auto* p_scores = reinterpret_cast<const float*>(scores);
  const auto* p_uniform = reinterpret_cast<const float*>(uniform);
  auto* p_keys = reinterpret_cast<std::uint32_t*>(keys);
  for (std::int64_t i = 0; i < n; ++i) {
    p_keys[i] = selection_key(p_scores[i], p_uniform, static_cast<std::uint32_t>(i), static_cast<std::uint32_t>(row),
                              strategy, seed, offset);
  }
}

std::tuple<std::uint32_t, std::uint32_t, std::uint32_t, std::uint32_t> host_philox4x32_10(
    std::uint32_t c0, std::uint32_t c1, std::uint32_t c2, std::uint32_t c3, std::uint32_t k0, std::uint32_t k1) {
  const Philox4 r = philox4x32_10(Philox4{c0, c1, c2, c3}, k0, k1);
  return {r.x, r.y, r.z, r.w};
}

std::vector<int> compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  return {__CUDA_ARCH_LIST__};
#else
  return {};
#endif
}

int runtime_version() { return CUDART_VERSION; }

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the error of a machine without driver or GPU
    return 0;
  }
  return count;
}

}  // namespace sat
