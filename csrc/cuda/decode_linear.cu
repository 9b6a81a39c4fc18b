// Small-M linear (decode steps) CUDA launcher: y[m, n] = x[m, :] . weight[n, :] + bias[n].
// GEMV over M rows: one warp per weight row, its lanes stride along K with 16-byte loads of the
// weight (VEC elements, widened to fp32), each chunk FMA'd against the same chunk of up to MR rows of
// x (x is tiny and shared by every warp: it stays in L1/L2). fp32 accumulators, one warp sum per x
// row, bias added and rounded once by lane 0. M above MR takes more passes (grid y), the later ones
// reading the weight from L2. Rows that are not 16-byte aligned or K % VEC != 0 take the scalar
// (VEC = 1) kernel. Split-K (grid z) when the rows alone give too few warps to keep HBM busy (N = 896
// is 896 warps on 132 SMs): each split writes fp32 partials (splits, M, N), summed in split order by a
// second kernel that adds the bias and rounds once (deterministic, no atomics).
#include <algorithm>
#include <type_traits>

#include "cuda/cuda_common.cuh"
#include "cuda/kernels.h"

namespace blip3o::cuda {

namespace {

constexpr int kWarps = 4;            // weight rows per block
constexpr int kWarpsPerSm = 32;      // the split-K target: enough warps in flight per SM
constexpr int kMaxSplits = 32;

// VEC elements at p (16-byte aligned when VEC > 1) as fp32: one 16-byte load, unpacked in registers.
template <class T, int VEC>
__device__ __forceinline__ void load_f32(const T* p, float (&f)[VEC]) {
  if constexpr (VEC == 1) {
    f[0] = to_float(*p);
  } else if constexpr (sizeof(T) == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    f[0] = v.x, f[1] = v.y, f[2] = v.z, f[3] = v.w;
  } else {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // bf16 -> fp32: the high half of the fp32 bits
        f[2 * i] = __uint_as_float(words[i] << 16);
        f[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
      } else {
        const float2 h = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
        f[2 * i] = h.x, f[2 * i + 1] = h.y;
      }
    }
  }
}

template <class T, int VEC, int MR>
__global__ void __launch_bounds__(32 * kWarps) decode_linear_kernel(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ out,
    float* __restrict__ part, int64_t m, int64_t n, int64_t k, int64_t chunks_per_split) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MR;
  if (row >= n) return;
  const int rows = static_cast<int>(m - m0 < MR ? m - m0 : MR);
  const T* wr = w + row * k;
  const T* xr = x + m0 * k;
  const int64_t chunks = k / VEC;
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * chunks_per_split;
  const int64_t c1 = c0 + chunks_per_split < chunks ? c0 + chunks_per_split : chunks;
  float acc[MR];
#pragma unroll
  for (int i = 0; i < MR; ++i) acc[i] = 0.0f;
  for (int64_t c = c0 + lane; c < c1; c += 32) {
    float wf[VEC];
    load_f32<T, VEC>(wr + c * VEC, wf);
#pragma unroll
    for (int i = 0; i < MR; ++i) {
      if (i < rows) {
        float xf[VEC];
        load_f32<T, VEC>(xr + i * k + c * VEC, xf);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[i] = fmaf(wf[j], xf[j], acc[i]);
      }
    }
  }
  const float b = bias != nullptr ? to_float(bias[row]) : 0.0f;
  float* split_part = part != nullptr ? part + static_cast<int64_t>(blockIdx.z) * m * n : nullptr;
#pragma unroll
  for (int i = 0; i < MR; ++i) {
    const float s = warp_sum(acc[i]);
    if (lane != 0 || i >= rows) continue;
    if (split_part != nullptr)
      split_part[(m0 + i) * n + row] = s;
    else
      out[(m0 + i) * n + row] = from_float<T>(s + b);
  }
}

// out[i] = sum over splits of part[s, i] (in split order) + bias[i % n], rounded once.
template <class T>
__global__ void reduce_kernel(const float* __restrict__ part, const T* __restrict__ bias, T* __restrict__ out,
                              int64_t total, int64_t n, int splits) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int p = 0; p < splits; ++p) s += part[p * total + i];
    out[i] = from_float<T>(s + (bias != nullptr ? to_float(bias[i % n]) : 0.0f));
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// One launch's shape: x rows per pass, K chunks (of VEC elements) per split, splits.
struct Plan { int64_t mr, chunks_per_split, splits; };

// x rows per pass: M itself up to 16 (one read of the weight), else passes of 16. Splits: until the
// grid holds kWarpsPerSm warps per SM, each split at least one chunk per lane.
Plan plan_for(int64_t m, int64_t n, int64_t k, int vec, int sms) {
  const int64_t mr = m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : m <= 8 ? 8 : 16;
  const int64_t chunks = k / vec, warps = n * ((m + mr - 1) / mr);
  int64_t splits = (static_cast<int64_t>(kWarpsPerSm) * sms + warps - 1) / warps;
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, kMaxSplits, chunks / 32}));
  const int64_t per = std::max<int64_t>(1, (chunks + splits - 1) / splits);
  return {mr, per, std::max<int64_t>(1, (chunks + per - 1) / per)};  // no empty split
}

template <class T, int VEC, int MR>
void launch(const T* x, const T* w, const T* bias, T* out, float* part, int64_t m, int64_t n, int64_t k,
            const Plan& p, cudaStream_t st) {
  const dim3 grid(static_cast<unsigned>((n + kWarps - 1) / kWarps), static_cast<unsigned>((m + MR - 1) / MR),
                  static_cast<unsigned>(p.splits));
  decode_linear_kernel<T, VEC, MR><<<grid, 32 * kWarps, 0, st>>>(x, w, bias, out, part, m, n, k, p.chunks_per_split);
}

template <class T, int VEC>
void launch_rows(const T* x, const T* w, const T* bias, T* out, float* part, int64_t m, int64_t n, int64_t k,
                 const Plan& p, cudaStream_t st) {
  switch (p.mr) {
    case 1: launch<T, VEC, 1>(x, w, bias, out, part, m, n, k, p, st); break;
    case 2: launch<T, VEC, 2>(x, w, bias, out, part, m, n, k, p, st); break;
    case 4: launch<T, VEC, 4>(x, w, bias, out, part, m, n, k, p, st); break;
    case 8: launch<T, VEC, 8>(x, w, bias, out, part, m, n, k, p, st); break;
    default: launch<T, VEC, 16>(x, w, bias, out, part, m, n, k, p, st); break;
  }
}

}  // namespace

const char* decode_linear(const void* x, const void* weight, const void* bias, void* out, int64_t m, int64_t n,
                          int64_t k, DType dt, int device, void* stream) {
  if (m == 0 || n == 0) return nullptr;
  if ((m + 15) / 16 > 65535) return "decode_linear: too many rows of x for one launch (M > 1048560)";
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  int sms = 0;
  cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return error_text(e);
  const int vec = static_cast<int>(16 / (dt == DType::f32 ? 4 : 2));
  const bool vectorized = k % vec == 0 && aligned16(x) && aligned16(weight);
  const Plan plan = plan_for(m, n, k, vectorized ? vec : 1, sms);
  float* part = nullptr;
  if (plan.splits > 1) {
    e = cudaMallocAsync(reinterpret_cast<void**>(&part), static_cast<size_t>(plan.splits * m * n) * sizeof(float), st);
    if (e != cudaSuccess) return error_text(e);
  }
  visit_device_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const auto* xp = static_cast<const T*>(x);
    const auto* wp = static_cast<const T*>(weight);
    const auto* bp = static_cast<const T*>(bias);
    auto* op = static_cast<T*>(out);
    if (vectorized)
      launch_rows<T, kVec>(xp, wp, bp, op, part, m, n, k, plan, st);
    else
      launch_rows<T, 1>(xp, wp, bp, op, part, m, n, k, plan, st);
    if (part != nullptr)
      reduce_kernel<T><<<grid_for(m * n, 256), 256, 0, st>>>(part, bp, op, m * n, n, static_cast<int>(plan.splits));
  });
  const char* launch_err = launch_status();
  if (part != nullptr) e = cudaFreeAsync(part, st);
  return launch_err != nullptr ? launch_err : error_text(e);
}

}  // namespace blip3o::cuda
