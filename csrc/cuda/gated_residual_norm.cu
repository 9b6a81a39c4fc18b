// Fused DiT block epilogue CUDA kernels (contract: python/blip3o_fast/ops/gated_residual_norm.py;
// math: blip3o/gated_residual_norm.h, shared with the CPU face). Forward: one block per row; the
// row's fp32 x_out stays in shared memory between the residual pass and the next norm's pass.
// Backward: as rms_norm_kernels.cuh, one block per group of row units (grouping fixed by the
// shape), each thread owning the same columns in every row, so it keeps its columns' parameter
// partials in workspace rows without atomics; the partials are then summed in a fixed order.
// Shared memory per block: N floats (xohat, then gxo, in the backward).
#include "blip3o/gated_residual_norm.h"
#include "cuda/kernels.h"
#include "cuda/rms_norm_kernels.cuh"

namespace blip3o::cuda {

namespace {

namespace grn = gated_residual_norm;

template <bool kNext, class T>
__global__ void fwd_kernel(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ wy,
                           const T* __restrict__ gate, const T* __restrict__ wn, const T* __restrict__ sn,
                           T* __restrict__ xo, T* __restrict__ h, float* __restrict__ rstd_y,
                           float* __restrict__ rstd_x, int64_t t, int64_t n, float eps) {
  extern __shared__ float buf[];  // kNext: this row's fp32 x_out (each thread reads back only its own)
  __shared__ float red[32];
  const int64_t row = blockIdx.x, b = row / t, o = row * n;
  const T* g = gate + b * n;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = to_float(y[o + i]);
    ss += v * v;
  }
  const float ry = rms_norm::rstd(block_sum(ss, red), n, eps);
  if (threadIdx.x == 0) rstd_y[row] = ry;
  float sx = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = grn::residual(to_float(x[o + i]), to_float(g[i]), to_float(y[o + i]), ry, to_float(wy[i]));
    xo[o + i] = from_float<T>(v);
    if (kNext) {
      buf[i] = v;
      sx += v * v;
    }
  }
  if (!kNext) return;
  const float rx = rms_norm::rstd(block_sum(sx, red), n, eps);
  if (threadIdx.x == 0) rstd_x[row] = rx;
  const T* s = sn + b * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    h[o + i] = from_float<T>(rms_norm_modulate::forward(buf[i], rx, to_float(wn[i]), 1.0f + to_float(s[i])));
}

// Block grp runs units [split(units, groups, grp), split(units, groups, grp+1)) in order; unit u covers
// rows [split(t, chunks, c), split(t, chunks, c+1)) of batch u / chunks. wpart_*: (groups, n);
// spart_*: (units, n) when chunks > 1, else dgate / dnext_scale themselves.
template <bool kNext, class T>
__global__ void bwd_kernel(const T* __restrict__ dxo, const T* __restrict__ dh, const T* __restrict__ x,
                           const T* __restrict__ y, const T* __restrict__ wy, const T* __restrict__ gate,
                           const T* __restrict__ wn, const T* __restrict__ sn, const float* __restrict__ rstd_y,
                           const float* __restrict__ rstd_x, T* __restrict__ dx, T* __restrict__ dy,
                           float* __restrict__ wpart_y, float* __restrict__ wpart_n, float* __restrict__ spart_g,
                           float* __restrict__ spart_s, int64_t t, int64_t n, int64_t chunks, int64_t units) {
  extern __shared__ float buf[];  // this row's xohat, then its gxo (each thread reads back only its own)
  __shared__ float red[32];
  const int64_t grp = blockIdx.x, groups = gridDim.x;
  float* dwy = wpart_y + grp * n;
  float* dwn = kNext ? wpart_n + grp * n : nullptr;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    dwy[i] = 0.0f;
    if (kNext) dwn[i] = 0.0f;
  }
  const float nf = static_cast<float>(n);
  for (int64_t u = split_point(units, groups, grp); u < split_point(units, groups, grp + 1); ++u) {
    const int64_t b = u / chunks, c = u % chunks, slot = (chunks > 1 ? u : b) * n;
    const T* g = gate + b * n;
    const T* s = kNext ? sn + b * n : nullptr;
    float* dg = spart_g + slot;
    float* ds = kNext ? spart_s + slot : nullptr;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      dg[i] = 0.0f;
      if (kNext) ds[i] = 0.0f;
    }
    for (int64_t tt = split_point(t, chunks, c); tt < split_point(t, chunks, c + 1); ++tt) {
      const int64_t row = b * t + tt, o = row * n;
      const float ry = rstd_y[row];
      const float rx = kNext ? rstd_x[row] : 0.0f;
      float mean_h = 0.0f;
      if (kNext) {
        float dot = 0.0f;
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
          const float xo = grn::residual(to_float(x[o + i]), to_float(g[i]), to_float(y[o + i]), ry, to_float(wy[i]));
          const float xohat = xo * rx, d = to_float(dh[o + i]), w = to_float(wn[i]), s1 = 1.0f + to_float(s[i]);
          buf[i] = xohat;
          dot += grn::grad_h(d, s1, w) * xohat;
          ds[i] += grn::dns_term(d, xohat, w);
          dwn[i] += grn::dnw_term(d, s1, xohat);
        }
        mean_h = block_sum(dot, red) / nf;
      }
      float dot = 0.0f;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        float gxo = to_float(dxo[o + i]);
        if (kNext)
          gxo = grn::grad_xo(gxo, grn::grad_h(to_float(dh[o + i]), 1.0f + to_float(s[i]), to_float(wn[i])), buf[i],
                             mean_h, rx);
        const float yhat = to_float(y[o + i]) * ry, gi = to_float(g[i]), w = to_float(wy[i]);
        dx[o + i] = from_float<T>(gxo);
        buf[i] = gxo;
        dot += grn::grad_y_in(gxo, gi, w) * yhat;
        dg[i] += grn::dgate_term(gxo, yhat, w);
        dwy[i] += grn::dyw_term(gxo, gi, yhat);
      }
      const float mean_y = block_sum(dot, red) / nf;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float yhat = to_float(y[o + i]) * ry;
        const float gy = grn::grad_y_in(buf[i], to_float(g[i]), to_float(wy[i]));
        dy[o + i] = from_float<T>(rms_norm::grad_x(gy, yhat, mean_y, ry));
      }
    }
  }
}

// Lets a kernel use `bytes` of dynamic shared memory (above 48 KB needs an opt-in).
template <class Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace

const char* gated_residual_norm_fwd(const void* x, const void* y, const void* y_weight, const void* gate,
                                    const void* next_weight, const void* next_scale, void* x_out, void* h,
                                    float* rstd_y, float* rstd_x, int64_t batch, int64_t t, int64_t n, float eps,
                                    DType dt, int device, void* stream) {
  const int64_t rows = batch * t;
  if (rows == 0) return nullptr;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool next = next_weight != nullptr;
  const size_t smem = next ? static_cast<size_t>(n) * sizeof(float) : 0;
  cudaError_t e = cudaSuccess;
  visit_device_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const auto kernel = next ? fwd_kernel<true, T> : fwd_kernel<false, T>;
    e = allow_smem(kernel, smem);
    if (e != cudaSuccess) return;
    kernel<<<static_cast<unsigned>(rows), row_threads(n), smem, st>>>(
        static_cast<const T*>(x), static_cast<const T*>(y), static_cast<const T*>(y_weight),
        static_cast<const T*>(gate), static_cast<const T*>(next_weight), static_cast<const T*>(next_scale),
        static_cast<T*>(x_out), static_cast<T*>(h), rstd_y, rstd_x, t, n, eps);
  });
  return e != cudaSuccess ? error_text(e) : launch_status();
}

const char* gated_residual_norm_bwd(const void* dxo, const void* dh, const void* x, const void* y,
                                    const void* y_weight, const void* gate, const void* next_weight,
                                    const void* next_scale, const float* rstd_y, const float* rstd_x, void* dx,
                                    void* dy, float* dy_weight, float* dgate, float* dnext_weight,
                                    float* dnext_scale, int64_t batch, int64_t t, int64_t n, DType dt, int device,
                                    void* stream) {
  if (n == 0) return nullptr;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool next = next_weight != nullptr;
  if (batch * t == 0) {  // nothing to sum: the parameter gradients are zero
    cudaError_t e = cudaMemsetAsync(dy_weight, 0, n * sizeof(float), st);
    if (e == cudaSuccess) e = cudaMemsetAsync(dgate, 0, batch * n * sizeof(float), st);
    if (e == cudaSuccess && next) e = cudaMemsetAsync(dnext_weight, 0, n * sizeof(float), st);
    if (e == cudaSuccess && next) e = cudaMemsetAsync(dnext_scale, 0, batch * n * sizeof(float), st);
    return error_text(e);
  }
  const int64_t chunks = rms_norm_modulate::chunks_per_batch(batch, t, rmsnorm::kMaxPartials);
  const int64_t units = batch * chunks;
  const int64_t groups = units < rmsnorm::kMaxPartials ? units : rmsnorm::kMaxPartials;
  const int64_t kinds = next ? 2 : 1;  // (y_weight, next_weight) and (gate, next_scale) partials
  const bool own_spart = chunks > 1;
  float* ws = nullptr;
  const size_t ws_floats = static_cast<size_t>(kinds * (groups + (own_spart ? units : 0)) * n);
  cudaError_t e = cudaMallocAsync(reinterpret_cast<void**>(&ws), ws_floats * sizeof(float), st);
  if (e != cudaSuccess) return error_text(e);
  float* wpart_y = ws;
  float* wpart_n = next ? ws + groups * n : nullptr;
  float* spart_g = own_spart ? ws + kinds * groups * n : dgate;
  float* spart_s = !next ? nullptr : own_spart ? spart_g + units * n : dnext_scale;
  const size_t smem = static_cast<size_t>(n) * sizeof(float);
  visit_device_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const auto kernel = next ? bwd_kernel<true, T> : bwd_kernel<false, T>;
    e = allow_smem(kernel, smem);
    if (e != cudaSuccess) return;
    kernel<<<static_cast<unsigned>(groups), row_threads(n), smem, st>>>(
        static_cast<const T*>(dxo), static_cast<const T*>(dh), static_cast<const T*>(x), static_cast<const T*>(y),
        static_cast<const T*>(y_weight), static_cast<const T*>(gate), static_cast<const T*>(next_weight),
        static_cast<const T*>(next_scale), rstd_y, rstd_x, static_cast<T*>(dx), static_cast<T*>(dy), wpart_y, wpart_n,
        spart_g, spart_s, t, n, chunks, units);
  });
  const char* launch = e != cudaSuccess ? error_text(e) : nullptr;
  if (launch == nullptr) {
    const int threads = 256;
    const unsigned col_blocks = grid_for(n, threads);
    rmsnorm::sum_partials_kernel<<<dim3(col_blocks, 1), threads, 0, st>>>(wpart_y, groups, n, dy_weight);
    if (next) rmsnorm::sum_partials_kernel<<<dim3(col_blocks, 1), threads, 0, st>>>(wpart_n, groups, n, dnext_weight);
    if (own_spart) {
      const dim3 grid(col_blocks, static_cast<unsigned>(batch));
      rmsnorm::sum_partials_kernel<<<grid, threads, 0, st>>>(spart_g, chunks, n, dgate);
      if (next) rmsnorm::sum_partials_kernel<<<grid, threads, 0, st>>>(spart_s, chunks, n, dnext_scale);
    }
    launch = launch_status();
  }
  e = cudaFreeAsync(ws, st);
  return launch != nullptr ? launch : error_text(e);
}

}  // namespace blip3o::cuda
