// SwiGLU CUDA kernels: elementwise, grid-stride, 16-byte vector loads/stores when every pointer is
// 16-byte aligned (4 fp32 or 8 fp16/bf16 per access), scalar for the tail or unaligned views.
// Math: csrc/include/blip3o/swiglu.h.
#include <cstdint>

#include "blip3o/swiglu.h"
#include "cuda/cuda_common.cuh"
#include "cuda/kernels.h"

namespace blip3o::cuda {

namespace {

template <class T>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <class T>
__device__ __forceinline__ void fwd_one(const T* g, const T* u, T* out, int j) {
  out[j] = from_float<T>(swiglu::forward(to_float(g[j]), to_float(u[j])));
}

template <class T>
__device__ __forceinline__ void bwd_one(const T* dy, const T* g, const T* u, T* dg, T* du, int j) {
  const float gf = to_float(g[j]), d = to_float(dy[j]);
  const float sig = swiglu::sigmoid(gf);
  dg[j] = from_float<T>(swiglu::grad_gate(d, gf, to_float(u[j]), sig));
  du[j] = from_float<T>(swiglu::grad_up(d, gf, sig));
}

// Elements [0, nvec * kSize) go by vectors, the rest one by one.
template <class T>
__global__ void fwd_kernel(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ out, int64_t n,
                           int64_t nvec) {
  using V = Vec<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (int64_t k = tid; k < nvec; k += stride) {
    const V gv = reinterpret_cast<const V*>(g)[k], uv = reinterpret_cast<const V*>(u)[k];
    V ov;
#pragma unroll
    for (int j = 0; j < V::kSize; ++j) fwd_one(gv.v, uv.v, ov.v, j);
    reinterpret_cast<V*>(out)[k] = ov;
  }
  for (int64_t i = nvec * V::kSize + tid; i < n; i += stride) fwd_one(g + i, u + i, out + i, 0);
}

template <class T>
__global__ void bwd_kernel(const T* __restrict__ dy, const T* __restrict__ g, const T* __restrict__ u,
                           T* __restrict__ dg, T* __restrict__ du, int64_t n, int64_t nvec) {
  using V = Vec<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (int64_t k = tid; k < nvec; k += stride) {
    const V dv = reinterpret_cast<const V*>(dy)[k], gv = reinterpret_cast<const V*>(g)[k];
    const V uv = reinterpret_cast<const V*>(u)[k];
    V dgv, duv;
#pragma unroll
    for (int j = 0; j < V::kSize; ++j) bwd_one(dv.v, gv.v, uv.v, dgv.v, duv.v, j);
    reinterpret_cast<V*>(dg)[k] = dgv;
    reinterpret_cast<V*>(du)[k] = duv;
  }
  for (int64_t i = nvec * V::kSize + tid; i < n; i += stride) bwd_one(dy + i, g + i, u + i, dg + i, du + i, 0);
}

bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

constexpr int kThreads = 256;

}  // namespace

const char* swiglu_fwd(const void* gate, const void* up, void* out, int64_t n, DType dt, int device, void* stream) {
  if (n == 0) return nullptr;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  const bool vec = aligned16({gate, up, out});
  visit_device_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const int64_t nvec = vec ? n / Vec<T>::kSize : 0;
    fwd_kernel<T><<<grid_for(nvec > 0 ? nvec : n, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(out), n, nvec);
  });
  return launch_status();
}

const char* swiglu_bwd(const void* dy, const void* gate, const void* up, void* dgate, void* dup, int64_t n,
                       DType dt, int device, void* stream) {
  if (n == 0) return nullptr;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  const bool vec = aligned16({dy, gate, up, dgate, dup});
  visit_device_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const int64_t nvec = vec ? n / Vec<T>::kSize : 0;
    bwd_kernel<T><<<grid_for(nvec > 0 ? nvec : n, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(dy), static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(dgate),
        static_cast<T*>(dup), n, nvec);
  });
  return launch_status();
}

}  // namespace blip3o::cuda
