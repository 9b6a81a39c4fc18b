// Varlen causal prefill attention CUDA kernel. Math: csrc/include/blip3o/varlen_prefill_attention.h (shared
// with the CPU face); contract: python/blip3o_fast/ops/varlen_prefill_attention.py. fp32 math, one rounding
// at the store.
//
// One block per (query tile of kQ rows of one sequence, q head). blockIdx.x numbers every sequence's tiles
// back to back; warp 0 finds the block's sequence with a warp-wide prefix sum of tile counts over
// cu_seqlens, 32 sequences per step (no host-side table, no sync), and cdiv(N, kQ) + S blocks bound the
// tile count (spare blocks find nothing and return). 4 warps x 4 query rows; a 32-key tile of K (rows
// padded to D+1 floats so lane strides hit distinct banks) and of V sits in shared memory (16-byte
// loads when D allows); lanes own keys while scoring, then own output channels for O += P V; online
// softmax with fp32 accumulators. Key tiles past the tile's last query are skipped (causal); keys past
// each query's own position are masked. GQA: q head h reads kv head h / (H / KVH).
#include <type_traits>

#include "blip3o/varlen_prefill_attention.h"
#include "cuda/cuda_common.cuh"
#include "cuda/kernels.h"

namespace blip3o::cuda {

namespace {

namespace vpa = varlen_prefill_attention;

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kQ = kWarps * kRowsPerWarp;  // query rows per block
constexpr int kTile = 32;                  // keys per shared-memory tile: one per lane
constexpr int kThreads = kWarps * 32;      // launch bounds (kThreads, 1): the accumulators stay in registers
constexpr unsigned kFull = 0xffffffffu;

extern __shared__ __align__(16) float vpa_smem[];

struct TileOf {
  int64_t start, len, q0;  // the sequence's first row and length, the tile's first query position
};

// Warp 0: the sequence owning query tile `tile` (len = 0 when none does: a spare block).
__device__ void find_tile(const int32_t* cu, int64_t seqs, int64_t tokens, int64_t tile, TileOf* out) {
  const int lane = threadIdx.x & 31;
  int64_t before = 0;  // tiles of the sequences already passed
  for (int64_t base = 0; base < seqs; base += 32) {
    int64_t start = 0, len = 0;
    if (base + lane < seqs) vpa::seq_rows(cu, base + lane, tokens, start, len);
    const int64_t tiles = (len + kQ - 1) / kQ;
    int64_t incl = tiles;
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t y = __shfl_up_sync(kFull, incl, o);
      if (lane >= o) incl += y;
    }
    // The first lane whose cumulative count passes `tile` owns it (an empty sequence never does: its
    // count equals its predecessor's).
    const unsigned hit = __ballot_sync(kFull, before + incl > tile);
    if (hit != 0) {
      if (lane == __ffs(hit) - 1) *out = {start, len, (tile - (before + incl - tiles)) * kQ};
      return;
    }
    before += __shfl_sync(kFull, incl, 31);
  }
  if (lane == 0) *out = {0, 0, 0};
}

// dst[r * ld + e] = x[(row0 + r) * stride + e] * mul for r < rows (zeros from `valid` on), e < d; 16-byte
// loads when kVec (d a multiple of the chunk, pointers aligned).
template <class T, bool kVec>
__device__ void load_rows(const T* x, int64_t row0, int64_t stride, int valid, int rows, int d, float mul,
                          float* dst, int ld) {
  constexpr int CW = kVec ? static_cast<int>(16 / sizeof(T)) : 1;
  const int per_row = d / CW;
  for (int it = threadIdx.x; it < rows * per_row; it += blockDim.x) {
    const int r = it / per_row, e0 = (it % per_row) * CW;
    float f[CW];
    if (r < valid) {
      const T* p = x + (row0 + r) * stride + e0;
      if constexpr (kVec) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < CW; ++i) f[i] = to_float(e[i]) * mul;
      } else {
        f[0] = to_float(p[0]) * mul;
      }
    } else {
#pragma unroll
      for (int i = 0; i < CW; ++i) f[i] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < CW; ++i) dst[r * ld + e0 + i] = f[i];
  }
}

// Dot of a row broadcast to the warp (a: contiguous, 16-byte aligned when d % 4 == 0) with the lane's row b.
__device__ __forceinline__ float dot_bcast(const float* a, const float* b, int d) {
  float acc = 0.0f;
  if (d % 4 == 0) {
    for (int e = 0; e < d; e += 4) {
      const float4 av = *reinterpret_cast<const float4*>(a + e);
      acc = fmaf(av.x, b[e], acc);
      acc = fmaf(av.y, b[e + 1], acc);
      acc = fmaf(av.z, b[e + 2], acc);
      acc = fmaf(av.w, b[e + 3], acc);
    }
  } else {
    for (int e = 0; e < d; ++e) acc = fmaf(a[e], b[e], acc);
  }
  return acc;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// smem: qs[kQ][D] | ks[kTile][D+1] | vs[kTile][D] | ps[kWarps][kRowsPerWarp][kTile]
template <class T, int NC, bool kVec>
__global__ void __launch_bounds__(kThreads, 1) fwd_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                       const T* __restrict__ v, const int32_t* __restrict__ cu,
                                                       T* __restrict__ out, vpa::Dims m) {
  __shared__ TileOf tile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  if (warp == 0) find_tile(cu, m.seqs, m.tokens, blockIdx.x, &tile);
  __syncthreads();
  const int64_t start = tile.start, len = tile.len, q0 = tile.q0;
  if (len == 0) return;  // block-uniform: a spare block
  const int d = static_cast<int>(m.d), h = blockIdx.y, g = h / static_cast<int>(m.heads / m.kv_heads);
  const int queries = static_cast<int>(len - q0 < kQ ? len - q0 : kQ);
  const int64_t q_stride = m.heads * m.d, kv_stride = m.kv_heads * m.d;
  float* qs = vpa_smem;
  float* ks = qs + kQ * d;
  float* vs = ks + kTile * (d + 1);
  float* ps = vs + kTile * d + warp * kRowsPerWarp * kTile;
  load_rows<T, kVec>(q + h * d, start + q0, q_stride, queries, kQ, d, m.scale, qs, d);

  float o[kRowsPerWarp][NC], mx[kRowsPerWarp], l[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    mx[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < NC; ++c) o[r][c] = 0.0f;
  }
  const int64_t key_end = vpa::visible_keys(q0 + queries - 1);  // what the tile's last query sees
  for (int64_t j0 = 0; j0 < key_end; j0 += kTile) {
    __syncthreads();  // the previous tile is consumed (and, the first time, qs is written)
    const int valid = static_cast<int>(len - j0 < kTile ? len - j0 : kTile);
    load_rows<T, kVec>(k + g * d, start + j0, kv_stride, valid, kTile, d, 1.0f, ks, d + 1);
    load_rows<T, kVec>(v + g * d, start + j0, kv_stride, valid, kTile, d, 1.0f, vs, d);
    __syncthreads();
    const int64_t key = j0 + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t pos = q0 + warp * kRowsPerWarp + r;
      const bool seen = key < vpa::visible_keys(pos) && key < len;
      const float s = seen ? dot_bcast(qs + (warp * kRowsPerWarp + r) * d, ks + lane * (d + 1), d) : -INFINITY;
      const float m_new = fmaxf(mx[r], warp_max(s));
      float pr = 0.0f, alpha = 1.0f;
      if (m_new != -INFINITY) {  // warp-uniform: every lane sees the same m_new
        alpha = vpa::online_rescale(mx[r], m_new);
        pr = seen ? expf(s - m_new) : 0.0f;
      }
      l[r] = l[r] * alpha + pr;  // each lane sums its own keys; the lanes are added at the end
      mx[r] = m_new;
#pragma unroll
      for (int c = 0; c < NC; ++c) o[r][c] *= alpha;
      ps[r * kTile + lane] = pr;
    }
    __syncwarp();
    for (int jj = 0; jj < kTile; ++jj) {
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const int e = lane + 32 * c;
        const float vv = e < d ? vs[jj * d + e] : 0.0f;
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) o[r][c] = fmaf(ps[r * kTile + jj], vv, o[r][c]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int qi = warp * kRowsPerWarp + r;
    const float lsum = warp_sum(l[r]);
    if (qi >= queries) continue;
    T* dst = out + (start + q0 + qi) * q_stride + h * d;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int e = lane + 32 * c;
      if (e < d) dst[e] = from_float<T>(o[r][c] / lsum);  // every query sees itself: lsum > 0
    }
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <class T>
const char* launch(const T* q, const T* k, const T* v, const int32_t* cu, T* out, const vpa::Dims& m,
                   cudaStream_t st) {
  const bool vec = m.d % (16 / sizeof(T)) == 0 && aligned16(q) && aligned16(k) && aligned16(v);
  const dim3 grid(static_cast<unsigned>((m.tokens + kQ - 1) / kQ + m.seqs), static_cast<unsigned>(m.heads));
  const size_t smem = (kQ * m.d + kTile * (m.d + 1) + kTile * m.d + kWarps * kRowsPerWarp * kTile) * sizeof(float);
  cudaError_t err = cudaSuccess;
  auto go = [&](auto nc) {
    auto run = [&](auto kernel) {
      if (smem > 48 * 1024)  // opt in above the default dynamic shared-memory limit
        err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (err == cudaSuccess) kernel<<<grid, kThreads, smem, st>>>(q, k, v, cu, out, m);
    };
    constexpr int NC = decltype(nc)::value;
    if (vec)
      run(fwd_kernel<T, NC, true>);
    else
      run(fwd_kernel<T, NC, false>);
  };
  if (m.d <= 32)
    go(std::integral_constant<int, 1>{});
  else if (m.d <= 64)
    go(std::integral_constant<int, 2>{});
  else if (m.d <= 128)
    go(std::integral_constant<int, 4>{});
  else if (m.d <= 256)
    go(std::integral_constant<int, 8>{});
  else
    return "varlen_prefill_attention: the CUDA face supports head dims up to 256";
  if (err != cudaSuccess) return error_text(err);
  return launch_status();
}

}  // namespace

const char* varlen_prefill_attention_fwd(const void* q, const void* k, const void* v, const int32_t* cu_seqlens,
                                         void* out, const varlen_prefill_attention::Dims& dims, DType dt,
                                         int device, void* stream) {
  if (dims.tokens == 0 || dims.seqs == 0 || dims.heads == 0 || dims.d == 0) return nullptr;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  const char* err = nullptr;
  visit_device_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    err = launch(static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), cu_seqlens,
                 static_cast<T*>(out), dims, static_cast<cudaStream_t>(stream));
  });
  return err;
}

}  // namespace blip3o::cuda
