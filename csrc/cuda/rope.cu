// RoPE CUDA kernel: one thread per rotated pair, grid-stride; adjacent threads touch adjacent pairs
// of one head, so loads coalesce in both layouts. Math: csrc/include/blip3o/rope.h.
#include "blip3o/rope.h"
#include "cuda/cuda_common.cuh"
#include "cuda/kernels.h"

namespace blip3o::cuda {

namespace {

template <class T>
__global__ void rope_kernel(const T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                            T* __restrict__ out, int64_t pairs, int64_t heads, int64_t half, bool interleaved,
                            float sgn) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = p % half, head_row = p / half, tok = head_row / heads;
    const int64_t base = head_row * 2 * half;
    const int64_t ia = base + (interleaved ? 2 * i : i), ib = base + (interleaved ? 2 * i + 1 : i + half);
    const float a = to_float(x[ia]), b = to_float(x[ib]);
    const float c = cos[tok * half + i], s = sgn * sin[tok * half + i];  // sgn = -1: inverse rotation
    out[ia] = from_float<T>(rope::rotate_a(a, b, c, s));
    out[ib] = from_float<T>(rope::rotate_b(a, b, c, s));
  }
}

}  // namespace

const char* rope_apply(const void* x, const float* cos, const float* sin, void* out, int64_t tokens, int64_t heads,
                       int64_t d, bool interleaved, bool inverse, DType dt, int device, void* stream) {
  const int64_t half = d / 2, pairs = tokens * heads * half;
  if (pairs == 0) return nullptr;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  constexpr int kThreads = 256;
  visit_device_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    rope_kernel<T><<<grid_for(pairs, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), cos, sin, static_cast<T*>(out), pairs, heads, half, interleaved,
        inverse ? -1.0f : 1.0f);
  });
  return launch_status();
}

}  // namespace blip3o::cuda
