// Host entry points of sat_kernels._C. Device buffers are passed as raw addresses (intptr_t) and the CUDA stream as
// its handle, so the extension does not depend on the torch build; the Python wrappers
// (sat_kernels/ops/mlp/cuda/kernels.py) check every tensor before calling these.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace sat {

// Kept set of each row of fp32 `scores` [rows, n]: the k largest selection keys (see selection_keys.cuh), ties to the
// lower index, written sorted ascending to `out` [rows, k] (int64, or int32 when `out_int32`). `uniform` [rows, n]
// (0 = none) is pre-drawn noise for sample/random, else Philox(seed, offset). `workspace` holds rows * n uint32 keys
// when they do not fit in shared memory. One block per row, no host synchronisation.
void select_kept(std::intptr_t scores, std::intptr_t uniform, std::intptr_t workspace, std::intptr_t out,
                 bool out_int32, std::int64_t rows, std::int64_t n, std::int64_t k, int strategy, std::uint64_t seed,
                 std::uint64_t offset, int device, std::intptr_t stream);

// Gathers and scatters of whole elements of `elem_size` bytes (2, 4 or 8: fp16/bf16, fp32, fp64), row-major
// contiguous buffers, int64 indices. 16-byte vector loads/stores where sizes and addresses allow, scalar otherwise.
// gather_rows:  out[j, :] = src[idx[j], :]           src [n, width], out [k, width]
// gather_cols:  out[r, j] = src[r, idx[j]]           src [rows, n], out [rows, k]
// scatter_rows: out[idx[j], :] = src[j, :], 0 elsewhere     src [k, width], out [n, width]   (idx strictly ascending)
// scatter_cols: out[r, idx[j]] = src[r, j], 0 elsewhere     src [rows, k], out [rows, n]    (idx strictly ascending)
// The scatters write every element of `out` once (no separate zero fill).
void gather_rows(std::intptr_t src, std::intptr_t idx, std::intptr_t out, std::int64_t n, std::int64_t k,
                 std::int64_t width, int elem_size, int device, std::intptr_t stream);
void gather_cols(std::intptr_t src, std::intptr_t idx, std::intptr_t out, std::int64_t rows, std::int64_t n,
                 std::int64_t k, int elem_size, int device, std::intptr_t stream);
void scatter_rows(std::intptr_t src, std::intptr_t idx, std::intptr_t out, std::int64_t n, std::int64_t k,
                  std::int64_t width, int elem_size, int device, std::intptr_t stream);
void scatter_cols(std::intptr_t src, std::intptr_t idx, std::intptr_t out, std::int64_t rows, std::int64_t n,
                  std::int64_t k, int elem_size, int device, std::intptr_t stream);

// Host twins for tests on machines without a GPU: the same key and Philox functions the kernels run.
void host_selection_keys(std::intptr_t scores, std::intptr_t uniform, std::intptr_t keys, std::int64_t n,
                         std::int64_t row, int strategy, std::uint64_t seed, std::uint64_t offset);
std::tuple<std::uint32_t, std::uint32_t, std::uint32_t, std::uint32_t> host_philox4x32_10(
    std::uint32_t c0, std::uint32_t c1, std::uint32_t c2, std::uint32_t c3, std::uint32_t k0, std::uint32_t k1);

// Build and runtime facts: the virtual architectures compiled in, the CUDA runtime version it was built with, the
// number of visible devices (0 without a driver or GPU).
std::vector<int> compiled_archs();
int runtime_version();
int device_count();

}  // namespace sat
