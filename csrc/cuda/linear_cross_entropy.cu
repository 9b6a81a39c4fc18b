// Fused linear + cross-entropy CUDA kernels (contract: python/blip3o_fast/ops/linear_cross_entropy.py;
// math: blip3o/linear_cross_entropy.h, shared with the CPU face). Tiled shared-memory SIMT GEMMs with fp32
// accumulation: 256 threads own a 64 x 64 logit tile, 4 x 4 per thread, fed through shared memory 16
// columns of H at a time. The (N, V) logits are never written.
// Forward: one block per (64 rows, vocab split), an online log-sum-exp over its split's tiles (the 16
// threads of a row meet by warp shuffles), partial (max, sum, target logit) per split; a combine kernel
// merges the splits per row. Backward: the logit tile is recomputed and turned into dlogits, staged in
// shared memory, and multiplied by 64-column chunks of W (dhidden, one block per 64 rows) or of hidden
// (dweight, one block per 64 vocab rows), added into fp32 accumulators the block owns: no atomics, a
// fixed order, deterministic. fp32 outputs accumulate in place; 16-bit ones in fp32 scratch (dweight's
// a span of vocab rows per launch, so the scratch stays bounded), rounded once at the end.
#include <algorithm>

#include "blip3o/linear_cross_entropy.h"
#include "cuda/cuda_common.cuh"
#include "cuda/kernels.h"

namespace blip3o::cuda {

namespace {

namespace lce = linear_cross_entropy;

constexpr int kTile = 64;     // rows and columns of a logit tile
constexpr int kStep = 16;     // H columns per shared-memory step of the logit GEMM
constexpr int kThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
constexpr int kPad = kTile + 4;

struct alignas(16) LogitSmem {
  float a[kStep][kPad];  // x rows, transposed: a[k][row]
  float b[kStep][kPad];  // y rows, transposed
};

struct alignas(16) ProductSmem {
  float d[kTile][kPad];  // dlogits staged as d[p][i]: p the product's reduction index, i its output row
  float y[kTile][kPad];  // a 64 x 64 chunk of the right-hand matrix: y[p][col]
};

// acc[i][j] = x[x0 + ty*4 + i] . y[y0 + tx*4 + j] over H, rows past xn / yn read as 0.
template <class T>
__device__ void tile_logits(const T* __restrict__ x, int64_t x0, int64_t xn, const T* __restrict__ y, int64_t y0,
                            int64_t yn, int64_t h, LogitSmem& s, float acc[4][4]) {
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int lr = tid >> 2, lk = (tid & 3) * 4;  // the loader's row and first column
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  const int64_t xr = x0 + lr, yr = y0 + lr;
  for (int64_t k0 = 0; k0 < h; k0 += kStep) {
    __syncthreads();  // the previous step's readers are done
    for (int e = 0; e < 4; ++e) {
      const int64_t k = k0 + lk + e;
      s.a[lk + e][lr] = xr < xn && k < h ? to_float(x[xr * h + k]) : 0.0f;
      s.b[lk + e][lr] = yr < yn && k < h ? to_float(y[yr * h + k]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kStep; ++kk) {
      const float4 av = *reinterpret_cast<const float4*>(&s.a[kk][ty * 4]);
      const float4 bv = *reinterpret_cast<const float4*>(&s.b[kk][tx * 4]);
      const float a[4] = {av.x, av.y, av.z, av.w}, b[4] = {bv.x, bv.y, bv.z, bv.w};
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }
}

// Reductions over the 16 threads of a tile row (one half warp: lanes differing in their low 4 bits).
__device__ __forceinline__ float row_max(float v) {
  for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float row_sum(float v) {
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Per row r: the target, the gradient g (0 for ignored rows or rows past n) and the lse to use
// (kInactiveLse there, so dlogit is exactly 0).
struct RowFactors {
  int64_t t;
  float g, lse;
};

__device__ __forceinline__ RowFactors row_factors(const int64_t* targets, const float* dloss, const float* lse,
                                                  int64_t r, int64_t n, int64_t v, int64_t ignore_index) {
  if (r >= n) return {-1, 0.0f, lce::kInactiveLse};
  const int64_t t = targets[r];
  const bool on = t != ignore_index && t >= 0 && t < v;
  return {t, on ? dloss[r] : 0.0f, on ? lse[r] : lce::kInactiveLse};
}

// out[o0 + ty*4 + i][:] += sum_p s.d[p][ty*4 + i] * y[y0 + p][:] over p < 64, 64 columns at a time; the
// calling block owns rows o0 .. o0 + 64 of out (fp32, row length h), rows past on skipped.
template <class T>
__device__ void accumulate_product(ProductSmem& s, const T* __restrict__ y, int64_t y0, int64_t yn, int64_t h,
                                   float* __restrict__ out, int64_t o0, int64_t on) {
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  for (int64_t c0 = 0; c0 < h; c0 += kTile) {
    __syncthreads();  // s.d is staged / the previous chunk's readers are done
    for (int it = 0; it < kTile * kTile / kThreads; ++it) {
      const int idx = it * kThreads + tid, p = idx / kTile, c = idx % kTile;
      const int64_t row = y0 + p, col = c0 + c;
      s.y[p][c] = row < yn && col < h ? to_float(y[row * h + col]) : 0.0f;
    }
    __syncthreads();
    float acc[4][4] = {};
#pragma unroll 8
    for (int p = 0; p < kTile; ++p) {
      const float4 dv = *reinterpret_cast<const float4*>(&s.d[p][ty * 4]);
      const float4 yv = *reinterpret_cast<const float4*>(&s.y[p][tx * 4]);
      const float a[4] = {dv.x, dv.y, dv.z, dv.w}, b[4] = {yv.x, yv.y, yv.z, yv.w};
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    for (int i = 0; i < 4; ++i) {
      const int64_t row = o0 + ty * 4 + i;
      if (row >= on) continue;
      for (int j = 0; j < 4; ++j) {
        const int64_t col = c0 + tx * 4 + j;
        if (col < h) out[row * h + col] += acc[i][j];  // only this thread touches this element
      }
    }
  }
}

// ---- forward ----

template <class T>
__global__ void __launch_bounds__(kThreads, 2) fwd_kernel(const T* __restrict__ hidden, const T* __restrict__ weight,
                                                       const int64_t* __restrict__ targets, float* __restrict__ part,
                                                       int64_t n, int64_t h, int64_t v, int64_t per_split) {
  __shared__ LogitSmem s;
  const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile, split = blockIdx.y;
  const int64_t v_lo = split * per_split, v_hi = min(v, v_lo + per_split);
  float run_max[4], run_sum[4], pick[4];
  int64_t tgt[4];
  for (int i = 0; i < 4; ++i) {
    const int64_t r = m0 + ty * 4 + i;
    run_max[i] = lce::kLowest;
    run_sum[i] = 0.0f;
    pick[i] = 0.0f;
    tgt[i] = r < n ? targets[r] : -1;
  }
  float acc[4][4];
  for (int64_t v0 = v_lo; v0 < v_hi; v0 += kTile) {
    tile_logits(hidden, m0, n, weight, v0, v_hi, h, s, acc);
    for (int i = 0; i < 4; ++i) {
      float mx = lce::kLowest;
      for (int j = 0; j < 4; ++j) {
        const int64_t c = v0 + tx * 4 + j;
        if (c < v_hi) {
          mx = fmaxf(mx, acc[i][j]);
          if (c == tgt[i]) pick[i] += acc[i][j];
        }
      }
      const float new_max = fmaxf(run_max[i], row_max(mx));
      float e = 0.0f;
      for (int j = 0; j < 4; ++j)
        if (v0 + tx * 4 + j < v_hi) e += expf(acc[i][j] - new_max);
      run_sum[i] = lce::rescale(run_sum[i], run_max[i], new_max) + row_sum(e);
      run_max[i] = new_max;
    }
  }
  for (int i = 0; i < 4; ++i) {
    const float p = row_sum(pick[i]);  // the one thread that saw the target column holds it
    const int64_t r = m0 + ty * 4 + i;
    if (tx == 0 && r < n) {
      part[(3 * split) * n + r] = run_max[i];
      part[(3 * split + 1) * n + r] = run_sum[i];
      part[(3 * split + 2) * n + r] = p;
    }
  }
}

__global__ void combine_kernel(const float* __restrict__ part, const int64_t* __restrict__ targets,
                               float* __restrict__ loss, float* __restrict__ lse, int64_t n, int64_t v,
                               int64_t splits, int64_t ignore_index) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n) return;
  float mx = lce::kLowest, pick = 0.0f;
  for (int64_t s = 0; s < splits; ++s) {
    mx = fmaxf(mx, part[(3 * s) * n + r]);
    pick += part[(3 * s + 2) * n + r];
  }
  float sum = 0.0f;
  for (int64_t s = 0; s < splits; ++s) sum += lce::rescale(part[(3 * s + 1) * n + r], part[(3 * s) * n + r], mx);
  const int64_t t = targets[r];
  const bool on = t != ignore_index && t >= 0 && t < v;
  const float l = lce::lse(mx, sum);
  loss[r] = on ? lce::row_loss(l, pick) : 0.0f;
  lse[r] = on ? l : 0.0f;
}

// ---- backward ----

// dhidden: block = 64 rows; over every vocab tile, acc[rows] += dlogits @ W_tile.
template <class T>
__global__ void __launch_bounds__(kThreads, 2) dh_kernel(const float* __restrict__ dloss, const T* __restrict__ hidden,
                                                      const T* __restrict__ weight, const int64_t* __restrict__ targets,
                                                      const float* __restrict__ lse, float* __restrict__ acc_out,
                                                      int64_t n, int64_t h, int64_t v, int64_t ignore_index) {
  __shared__ LogitSmem ls;
  __shared__ ProductSmem ps;
  const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile;
  RowFactors f[4];
  for (int i = 0; i < 4; ++i) f[i] = row_factors(targets, dloss, lse, m0 + ty * 4 + i, n, v, ignore_index);
  float acc[4][4];
  for (int64_t v0 = 0; v0 < v; v0 += kTile) {
    tile_logits(hidden, m0, n, weight, v0, v, h, ls, acc);
    __syncthreads();  // the previous tile's product is done reading ps.d
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int64_t c = v0 + tx * 4 + j;
        ps.d[tx * 4 + j][ty * 4 + i] = c < v ? lce::dlogit(acc[i][j], f[i].lse, f[i].g, c == f[i].t) : 0.0f;
      }
    accumulate_product(ps, weight, v0, v, h, acc_out, m0, n);
  }
}

// dweight: block = 64 vocab rows of the span starting at v_base; over every row tile,
// acc[cols] += dlogits^T @ hidden_tile (acc holds the span's rows).
template <class T>
__global__ void __launch_bounds__(kThreads, 2) dw_kernel(const float* __restrict__ dloss, const T* __restrict__ hidden,
                                                      const T* __restrict__ weight, const int64_t* __restrict__ targets,
                                                      const float* __restrict__ lse, float* __restrict__ acc_out,
                                                      int64_t n, int64_t h, int64_t v, int64_t v_base,
                                                      int64_t v_end, int64_t ignore_index) {
  __shared__ LogitSmem ls;
  __shared__ ProductSmem ps;
  const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
  const int64_t local0 = static_cast<int64_t>(blockIdx.x) * kTile, c0 = v_base + local0;
  float acc[4][4];
  for (int64_t m0 = 0; m0 < n; m0 += kTile) {
    RowFactors f[4];
    for (int j = 0; j < 4; ++j) f[j] = row_factors(targets, dloss, lse, m0 + tx * 4 + j, n, v, ignore_index);
    tile_logits(weight, c0, v_end, hidden, m0, n, h, ls, acc);  // acc[i][j]: vocab row i, token j
    __syncthreads();
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j)
        ps.d[tx * 4 + j][ty * 4 + i] = lce::dlogit(acc[i][j], f[j].lse, f[j].g, c0 + ty * 4 + i == f[j].t);
    accumulate_product(ps, hidden, m0, n, h, acc_out, local0, v_end - v_base);
  }
}

template <class T>
__global__ void round_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t count) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = from_float<T>(src[i]);
}

int sm_count(int device) {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms > 0 ? sms : 1;
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

const char* linear_cross_entropy_fwd(const void* hidden, const void* weight, const int64_t* targets, float* loss,
                                     float* lse, int64_t n, int64_t h, int64_t v, int64_t ignore_index, DType dt,
                                     int device, void* stream) {
  if (n == 0) return nullptr;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  // Vocabulary splits: enough blocks to fill the GPU twice over, whole tiles per split, none empty.
  const int64_t row_blocks = cdiv(n, kTile), v_tiles = cdiv(v, kTile);
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(v_tiles, cdiv(2 * sm_count(device), row_blocks)));
  const int64_t per_split = cdiv(v_tiles, want) * kTile, splits = cdiv(v, per_split);
  float* part = nullptr;
  cudaError_t e = cudaMallocAsync(reinterpret_cast<void**>(&part), 3 * splits * n * sizeof(float), st);
  if (e != cudaSuccess) return error_text(e);
  visit_device_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    fwd_kernel<T><<<dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits)), kThreads, 0, st>>>(
        static_cast<const T*>(hidden), static_cast<const T*>(weight), targets, part, n, h, v, per_split);
  });
  combine_kernel<<<static_cast<unsigned>(cdiv(n, 256)), 256, 0, st>>>(part, targets, loss, lse, n, v, splits,
                                                                       ignore_index);
  const char* launch = launch_status();
  cudaFreeAsync(part, st);
  return launch;
}

const char* linear_cross_entropy_bwd(const float* dloss, const void* hidden, const void* weight,
                                     const int64_t* targets, const float* lse, void* dhidden, void* dweight,
                                     int64_t n, int64_t h, int64_t v, int64_t ignore_index, DType dt, int device,
                                     void* stream) {
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool f32 = dt == DType::f32;
  cudaError_t e = cudaSuccess;
  if (dhidden != nullptr) {
    float* acc = static_cast<float*>(dhidden);
    if (!f32) e = cudaMallocAsync(reinterpret_cast<void**>(&acc), std::max<int64_t>(1, n * h) * sizeof(float), st);
    if (e == cudaSuccess) e = cudaMemsetAsync(acc, 0, n * h * sizeof(float), st);
    if (e != cudaSuccess) return error_text(e);
    visit_device_dtype(dt, [&](auto tag) {
      using T = decltype(tag);
      if (n > 0)
        dh_kernel<T><<<static_cast<unsigned>(cdiv(n, kTile)), kThreads, 0, st>>>(
            dloss, static_cast<const T*>(hidden), static_cast<const T*>(weight), targets, lse, acc, n, h, v,
            ignore_index);
      if (!f32 && n * h > 0)
        round_kernel<T><<<grid_for(n * h, 256), 256, 0, st>>>(acc, static_cast<T*>(dhidden), n * h);
    });
    if (!f32) cudaFreeAsync(acc, st);
    if (const char* launch = launch_status()) return launch;
  }
  if (dweight != nullptr) {
    // 16-bit weights: a span of vocab rows per launch through fp32 scratch, each launch filling the GPU.
    const int64_t v_tiles = cdiv(v, kTile);
    const int64_t per_launch = f32 ? v_tiles : std::min<int64_t>(v_tiles, 2 * sm_count(device));
    float* scratch = nullptr;
    if (!f32) {
      e = cudaMallocAsync(reinterpret_cast<void**>(&scratch), per_launch * kTile * h * sizeof(float), st);
      if (e != cudaSuccess) return error_text(e);
    }
    for (int64_t t0 = 0; t0 < v_tiles && e == cudaSuccess; t0 += per_launch) {
      const int64_t v0 = t0 * kTile, v1 = std::min(v, (t0 + per_launch) * kTile);
      float* acc = f32 ? static_cast<float*>(dweight) + v0 * h : scratch;
      e = cudaMemsetAsync(acc, 0, (v1 - v0) * h * sizeof(float), st);
      if (e != cudaSuccess) break;
      visit_device_dtype(dt, [&](auto tag) {
        using T = decltype(tag);
        if (n > 0)
          dw_kernel<T><<<static_cast<unsigned>(cdiv(v1 - v0, kTile)), kThreads, 0, st>>>(
              dloss, static_cast<const T*>(hidden), static_cast<const T*>(weight), targets, lse, acc, n, h, v, v0,
              v1, ignore_index);
        if (!f32)
          round_kernel<T><<<grid_for((v1 - v0) * h, 256), 256, 0, st>>>(acc, static_cast<T*>(dweight) + v0 * h,
                                                                         (v1 - v0) * h);
      });
    }
    if (scratch != nullptr) cudaFreeAsync(scratch, st);
    if (e != cudaSuccess) return error_text(e);
  }
  return launch_status();
}

}  // namespace blip3o::cuda
