// Shared pieces of the CUDA kernels: storage-type conversions, block reductions, the device guard,
// launch-error reporting and grid sizing.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "blip3o/common.h"

namespace blip3o::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Calls fn(T{}) with the device storage type of dt.
template <class Fn>
void visit_device_dtype(DType dt, Fn&& fn) {
  switch (dt) {
    case DType::f32: fn(float{}); break;
    case DType::f16: fn(__half{}); break;
    case DType::bf16: fn(__nv_bfloat16{}); break;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over a block whose size is a multiple of 32, returned to every thread; the order is fixed by
// the block size, so the result is deterministic. smem: 32 floats, reusable across calls.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // the previous call's readers are done with smem
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x >> 5) ? smem[lane] : 0.0f;
  return warp_sum(v);
}

// Makes the tensors' device current for one launch and restores the caller's afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&prev_);
    if (prev_ != device) status_ = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int now = prev_;
    cudaGetDevice(&now);
    if (now != prev_) cudaSetDevice(prev_);
  }
  cudaError_t status() const { return status_; }

 private:
  int prev_ = 0;
  cudaError_t status_ = cudaSuccess;
};

inline const char* error_text(cudaError_t e) { return e == cudaSuccess ? nullptr : cudaGetErrorString(e); }

// Status of the launches just made: a bad configuration shows up here, not at the next sync.
inline const char* launch_status() { return error_text(cudaGetLastError()); }

// Threads per block for a row of n elements: about 8 elements per thread, a multiple of 32.
inline int row_threads(int64_t n) {
  int64_t t = ((n + 7) / 8 + 31) / 32 * 32;
  return static_cast<int>(t < 32 ? 32 : t > 1024 ? 1024 : t);
}

// Blocks for a grid-stride loop over `work` items with `threads` per block.
inline unsigned grid_for(int64_t work, int threads) {
  int64_t b = (work + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : b > (1 << 20) ? (1 << 20) : b);
}

}  // namespace blip3o::cuda
