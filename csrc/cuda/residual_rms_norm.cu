// Residual add + RMSNorm CUDA launchers; math in csrc/include/blip3o/residual_rms_norm.h.
// Forward: one block per row; 16-byte vector loads and stores when the row and the pointers allow
// (VEC elements per access), else scalar. Each thread writes its chunks of the rounded sum, and the
// normalising pass reads those same chunks back (its own writes, from L1/L2, not HBM). Backward: row
// groups fixed by the shape, as rms_norm's backward (csrc/cuda/rms_norm_kernels.cuh), whose partial
// summation kernel it reuses, so dweight is deterministic.
#include "blip3o/residual_rms_norm.h"
#include "cuda/kernels.h"
#include "cuda/rms_norm_kernels.cuh"

namespace blip3o::cuda {

namespace {

template <class T, int VEC>
struct alignas(sizeof(T) * VEC) Chunk { T v[VEC]; };

template <class T, int VEC>
__global__ void fwd_kernel(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w,
                           T* __restrict__ out, T* __restrict__ s, float* __restrict__ rstd, int64_t n, float eps) {
  using C = Chunk<T, VEC>;
  __shared__ float smem[32];
  const int64_t o = static_cast<int64_t>(blockIdx.x) * n;
  const C* xr = reinterpret_cast<const C*>(x + o);
  const C* rr = reinterpret_cast<const C*>(res + o);
  C* sr = reinterpret_cast<C*>(s + o);
  const int64_t chunks = n / VEC;
  float ss = 0.0f;
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
    const C a = xr[c], b = rr[c];
    C sum;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      sum.v[j] = from_float<T>(residual_rms_norm::add(to_float(a.v[j]), to_float(b.v[j])));
      const float v = to_float(sum.v[j]);
      ss += v * v;
    }
    sr[c] = sum;
  }
  const float r = rms_norm::rstd(block_sum(ss, smem), n, eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
  const C* wr = reinterpret_cast<const C*>(w);
  C* yr = reinterpret_cast<C*>(out + o);
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
    const C a = sr[c], b = wr[c];
    C y;
#pragma unroll
    for (int j = 0; j < VEC; ++j) y.v[j] = from_float<T>(rms_norm::forward(to_float(a.v[j]), r, to_float(b.v[j])));
    yr[c] = y;
  }
}

// Block g runs rows [split(rows, groups, g), split(rows, groups, g + 1)); wpart: (groups, n).
template <class T>
__global__ void bwd_kernel(const T* __restrict__ dy, const T* __restrict__ dres, const T* __restrict__ s,
                           const T* __restrict__ w, const float* __restrict__ rstd, T* __restrict__ ds,
                           float* __restrict__ wpart, int64_t rows, int64_t n) {
  __shared__ float smem[32];
  const int64_t g = blockIdx.x, groups = gridDim.x;
  float* dw = wpart + g * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dw[i] = 0.0f;
  for (int64_t row = split_point(rows, groups, g); row < split_point(rows, groups, g + 1); ++row) {
    const int64_t o = row * n;
    const float r = rstd[row];
    float dot = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      dot += (to_float(dy[o + i]) * to_float(w[i])) * (to_float(s[o + i]) * r);
    const float mean = block_sum(dot, smem) / static_cast<float>(n);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const float d = to_float(dy[o + i]), xhat = to_float(s[o + i]) * r;
      ds[o + i] = from_float<T>(residual_rms_norm::grad_sum(to_float(dres[o + i]), d * to_float(w[i]), xhat, mean, r));
      dw[i] += d * xhat;
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Threads for `chunks` accesses per row: one or two each, a multiple of 32, at most 1024.
int chunk_threads(int64_t chunks) {
  const int64_t t = (chunks + 31) / 32 * 32;
  return static_cast<int>(t < 32 ? 32 : t > 1024 ? 1024 : t);
}

}  // namespace

const char* residual_rms_norm_fwd(const void* x, const void* residual, const void* weight, void* out,
                                  void* new_residual, float* rstd, int64_t rows, int64_t n, float eps, DType dt,
                                  int device, void* stream) {
  if (rows == 0) return nullptr;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool all16 = aligned16(x) && aligned16(residual) && aligned16(weight) && aligned16(out) &&
                     aligned16(new_residual);
  visit_device_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const auto* xp = static_cast<const T*>(x);
    const auto* rp = static_cast<const T*>(residual);
    const auto* wp = static_cast<const T*>(weight);
    auto* op = static_cast<T*>(out);
    auto* sp = static_cast<T*>(new_residual);
    if (all16 && n % kVec == 0)
      fwd_kernel<T, kVec><<<static_cast<unsigned>(rows), chunk_threads(n / kVec), 0, st>>>(xp, rp, wp, op, sp, rstd,
                                                                                          n, eps);
    else
      fwd_kernel<T, 1><<<static_cast<unsigned>(rows), row_threads(n), 0, st>>>(xp, rp, wp, op, sp, rstd, n, eps);
  });
  return launch_status();
}

const char* residual_rms_norm_bwd(const void* dy, const void* dres, const void* s, const void* weight,
                                  const float* rstd, void* ds, float* dweight, int64_t rows, int64_t n, DType dt,
                                  int device, void* stream) {
  if (n == 0) return nullptr;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (rows == 0) return error_text(cudaMemsetAsync(dweight, 0, n * sizeof(float), st));
  const int64_t groups = rows < rmsnorm::kMaxPartials ? rows : rmsnorm::kMaxPartials;
  float* ws = nullptr;
  cudaError_t e = cudaMallocAsync(reinterpret_cast<void**>(&ws), static_cast<size_t>(groups * n) * sizeof(float), st);
  if (e != cudaSuccess) return error_text(e);
  visit_device_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    bwd_kernel<T><<<static_cast<unsigned>(groups), row_threads(n), 0, st>>>(
        static_cast<const T*>(dy), static_cast<const T*>(dres), static_cast<const T*>(s),
        static_cast<const T*>(weight), rstd, static_cast<T*>(ds), ws, rows, n);
  });
  const int threads = 256;
  rmsnorm::sum_partials_kernel<<<dim3(grid_for(n, threads), 1), threads, 0, st>>>(ws, groups, n, dweight);
  const char* launch = launch_status();
  e = cudaFreeAsync(ws, st);
  return launch != nullptr ? launch : error_text(e);
}

}  // namespace blip3o::cuda
