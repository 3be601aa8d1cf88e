// Host-side helpers shared by the launchers: error checks, device guard, stream cast, grid sizing.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace sat {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("sat_kernels._C: ") + what + " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

// Makes `device` current for the scope: a kernel launches on the current device, and the caller's stream belongs to
// the tensors' device, which need not be the current one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device_) check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = 0;
};

inline cudaStream_t as_stream(std::intptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

inline bool aligned16(std::intptr_t ptr) { return ptr % 16 == 0; }

inline unsigned int ceil_div(std::int64_t a, std::int64_t b) { return static_cast<unsigned int>((a + b - 1) / b); }

// gridDim.y is at most 65535; kernels stride over the rest.
inline unsigned int grid_y(std::int64_t rows, std::int64_t rows_per_block) {
  return static_cast<unsigned int>(std::min<std::int64_t>((rows + rows_per_block - 1) / rows_per_block, 65535));
}

}  // namespace sat
