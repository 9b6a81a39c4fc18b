// Small-M linear (decode steps) CUDA launcher: y[m, n] = x[m, :] . weight[n, :] + bias[n].
// GEMV over M rows: one warp per weight row, its lanes stride along K with 16-byte loads of the
// weight (VEC elements, widened to fp32), each chunk FMA'd against the same chunk of up to MR rows of
// x (x is tiny and shared by every warp: it stays in L1/L2). fp32 accumulators, one warp sum per x
// row, bias added and rounded once by lane 0. M above MR takes more passes (grid y), the later ones
// reading the weight from L2. Rows that are not 16-byte aligned or K % VEC != 0 take the scalar
// (VEC = 1) kernel. No split-K: a weight of few rows (N below a few warps per SM) underfills the GPU,
// which is why the Triton face (split-K) stays the default (ops/dispatch.py).
#include "cuda/cuda_common.cuh"
#include "cuda/kernels.h"

namespace blip3o::cuda {

namespace {

constexpr int kWarps = 4;  // weight rows per block

template <class T, int VEC>
struct alignas(sizeof(T) * VEC) Chunk { T v[VEC]; };

template <class T, int VEC, int MR>
__global__ void __launch_bounds__(32 * kWarps) decode_linear_kernel(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ out, int64_t m,
    int64_t n, int64_t k) {
  using C = Chunk<T, VEC>;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MR;
  if (row >= n) return;
  const int rows = static_cast<int>(m - m0 < MR ? m - m0 : MR);
  const C* wr = reinterpret_cast<const C*>(w + row * k);
  const C* xr = reinterpret_cast<const C*>(x + m0 * k);
  const int64_t chunks = k / VEC, xstride = k / VEC;
  float acc[MR];
#pragma unroll
  for (int i = 0; i < MR; ++i) acc[i] = 0.0f;
#pragma unroll 2
  for (int64_t c = lane; c < chunks; c += 32) {
    const C wc = wr[c];
    float wf[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) wf[j] = to_float(wc.v[j]);
#pragma unroll
    for (int i = 0; i < MR; ++i) {
      if (i < rows) {
        const C xc = xr[i * xstride + c];
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[i] = fmaf(wf[j], to_float(xc.v[j]), acc[i]);
      }
    }
  }
  const float b = bias != nullptr ? to_float(bias[row]) : 0.0f;
#pragma unroll
  for (int i = 0; i < MR; ++i) {
    const float s = warp_sum(acc[i]);
    if (lane == 0 && i < rows) out[(m0 + i) * n + row] = from_float<T>(s + b);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <class T, int VEC, int MR>
void launch(const T* x, const T* w, const T* bias, T* out, int64_t m, int64_t n, int64_t k, cudaStream_t st) {
  const dim3 grid(static_cast<unsigned>((n + kWarps - 1) / kWarps), static_cast<unsigned>((m + MR - 1) / MR));
  decode_linear_kernel<T, VEC, MR><<<grid, 32 * kWarps, 0, st>>>(x, w, bias, out, m, n, k);
}

// x rows per pass: M itself up to 16 (one read of the weight), else passes of 16.
template <class T, int VEC>
void launch_rows(const T* x, const T* w, const T* bias, T* out, int64_t m, int64_t n, int64_t k, cudaStream_t st) {
  if (m <= 1) launch<T, VEC, 1>(x, w, bias, out, m, n, k, st);
  else if (m <= 2) launch<T, VEC, 2>(x, w, bias, out, m, n, k, st);
  else if (m <= 4) launch<T, VEC, 4>(x, w, bias, out, m, n, k, st);
  else if (m <= 8) launch<T, VEC, 8>(x, w, bias, out, m, n, k, st);
  else launch<T, VEC, 16>(x, w, bias, out, m, n, k, st);
}

}  // namespace

const char* decode_linear(const void* x, const void* weight, const void* bias, void* out, int64_t m, int64_t n,
                          int64_t k, DType dt, int device, void* stream) {
  if (m == 0 || n == 0) return nullptr;
  if ((m + 15) / 16 > 65535) return "decode_linear: too many rows of x for one launch (M > 1048560)";
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  visit_device_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const auto* xp = static_cast<const T*>(x);
    const auto* wp = static_cast<const T*>(weight);
    const auto* bp = static_cast<const T*>(bias);
    auto* op = static_cast<T*>(out);
    if (k % kVec == 0 && aligned16(x) && aligned16(weight))
      launch_rows<T, kVec>(xp, wp, bp, op, m, n, k, st);
    else
      launch_rows<T, 1>(xp, wp, bp, op, m, n, k, st);
  });
  return launch_status();
}

}  // namespace blip3o::cuda
