// RMSNorm CUDA kernels shared by rms_norm.cu and rms_norm_modulate.cu; kMod adds the adaLN factor
// (1 + scale[b]) as in csrc/cpu/rms_norm_rows.h. Forward: one block per row. Backward: one block per
// group of rows (grouping fixed by the shape), each thread keeping its own columns' dweight/dscale
// partials in a workspace row, then a second kernel sums the partials in a fixed order.
#pragma once
#include "blip3o/rms_norm_modulate.h"
#include "cuda/cuda_common.cuh"

namespace blip3o::cuda::rmsnorm {
// Internal linkage: rms_norm.cu and rms_norm_modulate.cu each compile their own copy of these kernels.
namespace {

// Backward blocks at most: fills every SM of an H100 a few times; fixed, so sums are deterministic.
constexpr int64_t kMaxPartials = 512;

template <bool kMod, class T>
__device__ __forceinline__ float one_plus_scale(const T* s, int64_t i) {
  return kMod ? 1.0f + to_float(s[i]) : 1.0f;
}

// x, out: (rows, n); scale: (rows / t, n) when kMod.
template <bool kMod, class T>
__global__ void fwd_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ scale,
                           T* __restrict__ out, float* __restrict__ rstd, int64_t t, int64_t n, float eps) {
  __shared__ float smem[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * n;
  T* yr = out + row * n;
  const T* s = kMod ? scale + (row / t) * n : nullptr;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = to_float(xr[i]);
    ss += v * v;
  }
  const float r = rms_norm::rstd(block_sum(ss, smem), n, eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = to_float(xr[i]), wi = to_float(w[i]);
    yr[i] = from_float<T>(kMod ? rms_norm_modulate::forward(v, r, wi, one_plus_scale<kMod>(s, i))
                               : rms_norm::forward(v, r, wi));
  }
}

// Block g runs units [split(units, groups, g), split(units, groups, g+1)) in order; unit u covers rows
// [split(t, chunks, c), split(t, chunks, c+1)) of batch b = u / chunks (plain RMSNorm: batch 1,
// t = rows). wpart: (groups, n); spart: (units, n) when chunks > 1, else dscale itself.
template <bool kMod, class T>
__global__ void bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                           const T* __restrict__ scale, const float* __restrict__ rstd, T* __restrict__ dx,
                           float* __restrict__ wpart, float* __restrict__ spart, int64_t t, int64_t n,
                           int64_t chunks, int64_t units) {
  __shared__ float smem[32];
  const int64_t g = blockIdx.x, groups = gridDim.x;
  float* dw = wpart + g * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dw[i] = 0.0f;
  for (int64_t u = split_point(units, groups, g); u < split_point(units, groups, g + 1); ++u) {
    const int64_t b = u / chunks, c = u % chunks;
    const T* s = kMod ? scale + b * n : nullptr;
    float* ds = kMod ? spart + (chunks > 1 ? u : b) * n : nullptr;
    if (kMod)
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ds[i] = 0.0f;
    for (int64_t tt = split_point(t, chunks, c); tt < split_point(t, chunks, c + 1); ++tt) {
      const int64_t row = b * t + tt, o = row * n;
      const float r = rstd[row];
      float dot = 0.0f;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float dn = to_float(dy[o + i]) * one_plus_scale<kMod>(s, i);
        dot += (dn * to_float(w[i])) * (to_float(x[o + i]) * r);
      }
      const float mean = block_sum(dot, smem) / static_cast<float>(n);
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float d = to_float(dy[o + i]), wi = to_float(w[i]);
        const float xhat = to_float(x[o + i]) * r;
        const float dn = kMod ? rms_norm_modulate::dn(d, one_plus_scale<kMod>(s, i)) : d;
        dx[o + i] = from_float<T>(rms_norm::grad_x(dn * wi, xhat, mean, r));
        dw[i] += dn * xhat;
        if (kMod) ds[i] += rms_norm_modulate::dscale_term(d, xhat, wi);
      }
    }
  }
}

// out[y, i] = sum over p < parts, in order, of part[(y * parts + p) * n + i]; grid.y indexes y.
__global__ void sum_partials_kernel(const float* __restrict__ part, int64_t parts, int64_t n,
                                    float* __restrict__ out) {
  const float* base = part + blockIdx.y * parts * n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = 0.0f;
    for (int64_t p = 0; p < parts; ++p) acc += base[p * n + i];
    out[blockIdx.y * n + i] = acc;
  }
}

template <bool kMod>
const char* forward(const void* x, const void* w, const void* scale, void* out, float* rstd, int64_t rows,
                    int64_t t, int64_t n, float eps, DType dt, int device, void* stream) {
  if (rows == 0) return nullptr;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  visit_device_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    fwd_kernel<kMod, T><<<static_cast<unsigned>(rows), row_threads(n), 0, st>>>(
        static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(scale), static_cast<T*>(out),
        rstd, t, n, eps);
  });
  return launch_status();
}

// batch = 1, t = rows for plain RMSNorm (dscale is then unused and may be null).
template <bool kMod>
const char* backward(const void* dy, const void* x, const void* w, const void* scale, const float* rstd, void* dx,
                     float* dweight, float* dscale, int64_t batch, int64_t t, int64_t n, DType dt, int device,
                     void* stream) {
  if (n == 0) return nullptr;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int threads = 256;
  const unsigned col_blocks = grid_for(n, threads);
  if (batch * t == 0) {  // nothing to sum: the gradients of weight and scale are zero
    cudaError_t e = cudaMemsetAsync(dweight, 0, n * sizeof(float), st);
    if (e == cudaSuccess && kMod) e = cudaMemsetAsync(dscale, 0, batch * n * sizeof(float), st);
    return error_text(e);
  }
  const int64_t chunks = rms_norm_modulate::chunks_per_batch(batch, t, kMaxPartials);
  const int64_t units = batch * chunks;
  const int64_t groups = units < kMaxPartials ? units : kMaxPartials;
  const bool own_spart = kMod && chunks > 1;
  float* ws = nullptr;
  const size_t ws_floats = static_cast<size_t>((groups + (own_spart ? units : 0)) * n);
  cudaError_t e = cudaMallocAsync(reinterpret_cast<void**>(&ws), ws_floats * sizeof(float), st);
  if (e != cudaSuccess) return error_text(e);
  float* spart = own_spart ? ws + groups * n : dscale;
  visit_device_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    bwd_kernel<kMod, T><<<static_cast<unsigned>(groups), row_threads(n), 0, st>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(scale),
        rstd, static_cast<T*>(dx), ws, spart, t, n, chunks, units);
  });
  sum_partials_kernel<<<dim3(col_blocks, 1), threads, 0, st>>>(ws, groups, n, dweight);
  if (own_spart) sum_partials_kernel<<<dim3(col_blocks, static_cast<unsigned>(batch)), threads, 0, st>>>(
      spart, chunks, n, dscale);
  const char* launch = launch_status();
  e = cudaFreeAsync(ws, st);
  return launch != nullptr ? launch : error_text(e);
}

}  // namespace
}  // namespace blip3o::cuda::rmsnorm
