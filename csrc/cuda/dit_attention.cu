// Fused DiT attention CUDA kernels. Math: csrc/include/blip3o/dit_attention.h (shared with the CPU face);
// contract: python/blip3o_fast/ops/dit_attention.py. fp32 math, one rounding at the store.
//
// LayerNorm spans a token's whole H*D row, so a first kernel writes per-token mean/rstd of q (and k) to
// fp32 scratch; the attention kernels then normalise, rotate and scale each tile as they load it (16-byte
// loads when D allows). Forward: one block per (query tile of kQ rows, head, batch); 4 warps x 4 query
// rows; lanes own keys while scoring a 32-key tile (K in shared memory, rows padded to D+1 floats so lane
// strides hit distinct banks), then own output channels for O += P V; online softmax, fp32 accumulators.
// Backward: delta = rowsum(dO * O) per query; a dQ kernel (forward's layout, recomputing P from lse); a
// dK/dV kernel (one block per kv-head key tile, looping over the group's query heads, so GQA sums need no
// atomics); then per-token RoPE/LayerNorm backward with weight/bias partials per block, summed in a fixed
// order, and the gate gradient summed by one block per head. Everything is deterministic.
#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "blip3o/dit_attention.h"
#include "cuda/cuda_common.cuh"
#include "cuda/kernels.h"

namespace blip3o::cuda {

namespace {

namespace da = dit_attention;

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kQ = kWarps * kRowsPerWarp;  // query rows per forward / dQ block
constexpr int kTile = 32;                  // keys (or queries, in the dK/dV kernel) per tile: one per lane
constexpr int kThreads = kWarps * 32;  // launch bounds (kThreads, 1): without the 1, ptxas capped
                                       // registers near 64 and spilled
constexpr int kTokenThreads = 256;
constexpr int64_t kMaxBlocksPartials = 256;  // LayerNorm-backward blocks at most, each one partial row

extern __shared__ __align__(16) float dyn_smem[];

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// 1 / sqrt(D) rounded as the CPU face computes it (rsqrtf is approximate).
__device__ __forceinline__ float inv_sqrt(int d) { return 1.0f / sqrtf(static_cast<float>(d)); }

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// CW consecutive values of one row as fp32: one 16-byte load when kVec, else element by element.
template <class T, bool kVec>
struct Chunk {
  static constexpr int CW = kVec ? static_cast<int>(16 / sizeof(T)) : 2;
  __device__ __forceinline__ static void load(const T* p, float* f) {
    if constexpr (kVec) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < CW; ++i) f[i] = to_float(e[i]);
    } else {
#pragma unroll
      for (int i = 0; i < CW; ++i) f[i] = to_float(p[i]);
    }
  }
};

// Where a tile's rows come from: tokens tok0 .. tok0 + valid - 1 of a (tokens, heads, D) tensor, one head.
// w != nullptr: LayerNorm with the tokens' mean/rstd; cos != nullptr: RoPE with the tokens' angles.
template <class T>
struct TileSrc {
  const T* x;
  int64_t tok0;
  int heads, head, valid;
  const float *mean, *rstd;
  const T *w, *b;
  const float *cos, *sin;
  float mul;
};

// dst[r * ld + e] for r < rows (zeros past `valid`), e < D.
template <class T, bool kVec>
__device__ void load_tile(const TileSrc<T>& s, int d, int rows, float* dst, int ld) {
  using C = Chunk<T, kVec>;
  const int per_row = d / C::CW, half = d / 2;
  for (int it = threadIdx.x; it < rows * per_row; it += blockDim.x) {
    const int r = it / per_row, e0 = (it % per_row) * C::CW;
    float f[C::CW];
    if (r < s.valid) {
      const int64_t tok = s.tok0 + r;
      C::load(s.x + (tok * s.heads + s.head) * d + e0, f);
      if (s.w != nullptr) {
        const float mu = s.mean[tok], rs = s.rstd[tok];
#pragma unroll
        for (int i = 0; i < C::CW; ++i) {
          const int c = s.head * d + e0 + i;
          f[i] = da::ln_apply(f[i], mu, rs, to_float(s.w[c]), to_float(s.b[c]));
        }
      }
      if (s.cos != nullptr) {
#pragma unroll
        for (int i = 0; i < C::CW; i += 2) {
          const float c = s.cos[tok * half + (e0 + i) / 2], sn = s.sin[tok * half + (e0 + i) / 2];
          const float a = f[i], b = f[i + 1];
          f[i] = rope::rotate_a(a, b, c, sn);
          f[i + 1] = rope::rotate_b(a, b, c, sn);
        }
      }
#pragma unroll
      for (int i = 0; i < C::CW; ++i) f[i] *= s.mul;
    } else {
#pragma unroll
      for (int i = 0; i < C::CW; ++i) f[i] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < C::CW; ++i) dst[r * ld + e0 + i] = f[i];
  }
}

// Dot product of a row broadcast to the warp (a, contiguous, 16-byte aligned when d % 4 == 0) with the
// lane's own row b.
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

// ---- per-token LayerNorm statistics: one warp per token row of n values ----
template <class T>
__global__ void ln_stats_kernel(const T* __restrict__ x, int64_t rows, int64_t n, float* __restrict__ mean,
                                float* __restrict__ rstd) {
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const int lane = threadIdx.x & 31;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const T* xr = x + r * n;
    float s = 0.0f;
    for (int64_t i = lane; i < n; i += 32) s += to_float(xr[i]);
    const float mu = warp_sum(s) / static_cast<float>(n);
    float v = 0.0f;
    for (int64_t i = lane; i < n; i += 32) {
      const float c = to_float(xr[i]) - mu;
      v += c * c;
    }
    v = warp_sum(v) / static_cast<float>(n);
    if (lane == 0) {
      mean[r] = mu;
      rstd[r] = da::ln_rstd(v);
    }
  }
}

// Pointers every attention kernel reads, typed.
template <class T>
struct Ptrs {
  const T *q, *k, *v, *qw, *qb, *kw, *kb, *gate;
  const float *cos, *sin, *q_mean, *q_rstd, *k_mean, *k_rstd;
  const bool* mask;
  bool rope_k;
};

template <class T>
__device__ __forceinline__ TileSrc<T> q_src(const Ptrs<T>& p, const da::Dims& m, int64_t b, int h, int64_t t0,
                                            float scale) {
  const int valid = static_cast<int>(imin(kQ, m.tq - t0));
  return {p.q, b * m.tq + t0, static_cast<int>(m.hq), h, valid, p.q_mean, p.q_rstd, p.qw, p.qb, p.cos, p.sin, scale};
}

// A key tile of n rows starting at key j0, normalised and rotated as the contract says.
template <class T>
__device__ __forceinline__ TileSrc<T> k_src(const Ptrs<T>& p, const da::Dims& m, int64_t b, int g, int64_t j0,
                                            int n) {
  const int valid = static_cast<int>(imin(n, m.tk - j0));
  return {p.k, b * m.tk + j0, static_cast<int>(m.hkv), g, valid, p.k_mean, p.k_rstd, p.kw, p.kb,
          p.rope_k ? p.cos : nullptr, p.rope_k ? p.sin : nullptr, 1.0f};
}

template <class T>
__device__ __forceinline__ TileSrc<T> v_src(const Ptrs<T>& p, const da::Dims& m, int64_t b, int g, int64_t j0,
                                            int n) {
  const int valid = static_cast<int>(imin(n, m.tk - j0));
  return {p.v, b * m.tk + j0, static_cast<int>(m.hkv), g, valid, nullptr, nullptr, nullptr, nullptr, nullptr,
          nullptr, 1.0f};
}

__device__ __forceinline__ bool key_kept(const bool* mask, const da::Dims& m, int64_t b, int64_t j) {
  return j < m.tk && (mask == nullptr || mask[b * m.tk + j]);
}

// ---- forward ----
// smem: qs[kQ][D] | ks[kTile][D+1] | vs[kTile][D] | ps[kWarps][kRowsPerWarp][kTile]
template <class T, int NC, bool kVec>
__global__ void __launch_bounds__(kThreads, 1) fwd_kernel(Ptrs<T> p, da::Dims m, const T* __restrict__ residual,
                                                       T* __restrict__ out, float* __restrict__ lse,
                                                       T* __restrict__ out_ungated) {
  const int d = static_cast<int>(m.d);
  const int64_t b = blockIdx.z, t0 = static_cast<int64_t>(blockIdx.x) * kQ;
  const int h = blockIdx.y, g = h / static_cast<int>(m.hq / m.hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  float* qs = dyn_smem;
  float* ks = qs + kQ * d;
  float* vs = ks + kTile * (d + 1);
  float* ps = vs + kTile * d + warp * kRowsPerWarp * kTile;
  load_tile<T, kVec>(q_src(p, m, b, h, t0, inv_sqrt(d)), d, kQ, qs, d);

  float o[kRowsPerWarp][NC], mx[kRowsPerWarp], l[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    mx[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < NC; ++c) o[r][c] = 0.0f;
  }
  for (int64_t j0 = 0; j0 < m.tk; j0 += kTile) {
    __syncthreads();  // the previous tile is consumed (and, the first time, qs is written)
    load_tile<T, kVec>(k_src(p, m, b, g, j0, kTile), d, kTile, ks, d + 1);
    load_tile<T, kVec>(v_src(p, m, b, g, j0, kTile), d, kTile, vs, d);
    __syncthreads();
    const bool kept = key_kept(p.mask, m, b, j0 + lane);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const float s = kept ? dot_bcast(qs + (warp * kRowsPerWarp + r) * d, ks + lane * (d + 1), d) : -INFINITY;
      const float m_new = fmaxf(mx[r], warp_max(s));
      float pr = 0.0f, alpha = 1.0f;
      if (m_new != -INFINITY) {  // warp-uniform: every lane sees the same m_new
        alpha = da::online_rescale(mx[r], m_new);
        pr = da::prob(s, m_new);
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
    const int64_t t = t0 + warp * kRowsPerWarp + r;
    const float lsum = warp_sum(l[r]);
    if (t >= m.tq) continue;
    if (lane == 0) lse[(b * m.hq + h) * m.tq + t] = da::row_lse(mx[r], lsum);
    const float tg = p.gate != nullptr ? da::gate_factor(to_float(p.gate[h])) : 1.0f;
    const int64_t base = ((b * m.tq + t) * m.hq + h) * d;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int e = lane + 32 * c;
      if (e >= d) continue;
      const float ov = lsum > 0.0f ? o[r][c] / lsum : 0.0f;
      if (out_ungated != nullptr) out_ungated[base + e] = from_float<T>(ov);
      out[base + e] = from_float<T>(da::gated(ov, tg, residual != nullptr ? to_float(residual[base + e]) : 0.0f));
    }
  }
}

// ---- backward ----

// delta[b, h, t] = sum_d (dout * tanh g) * o and gdot[b, h, t] = sum_d dout * o: one warp per (token, head).
template <class T>
__global__ void delta_kernel(const T* __restrict__ dout, const T* __restrict__ o, const T* __restrict__ gate,
                             da::Dims m, float* __restrict__ delta, float* __restrict__ gdot) {
  const int64_t rows = m.b * m.tq * m.hq, warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const int lane = threadIdx.x & 31;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const int64_t h = r % m.hq, tok = r / m.hq, b = tok / m.tq, t = tok % m.tq;
    float s = 0.0f;
    for (int64_t e = lane; e < m.d; e += 32) s += to_float(dout[r * m.d + e]) * to_float(o[r * m.d + e]);
    s = warp_sum(s);
    if (lane == 0) {
      const float tg = gate != nullptr ? da::gate_factor(to_float(gate[h])) : 1.0f;
      delta[(b * m.hq + h) * m.tq + t] = s * tg;
      if (gdot != nullptr) gdot[(b * m.hq + h) * m.tq + t] = s;
    }
  }
}

// dQ: forward's layout. Writes dqn (B, Tq, Hq, D) fp32: the gradient of the normalised, rotated q.
// smem: qs[kQ][D] | dos[kQ][D] | ks[kTile][D+1] | vs[kTile][D+1] | ds[kWarps][kRowsPerWarp][kTile]
template <class T, int NC, bool kVec>
__global__ void __launch_bounds__(kThreads, 1) dq_kernel(Ptrs<T> p, da::Dims m, const T* __restrict__ dout,
                                                      const float* __restrict__ lse, const float* __restrict__ delta,
                                                      float* __restrict__ dqn) {
  const int d = static_cast<int>(m.d);
  const int64_t b = blockIdx.z, t0 = static_cast<int64_t>(blockIdx.x) * kQ;
  const int h = blockIdx.y, g = h / static_cast<int>(m.hq / m.hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const float scale = inv_sqrt(d);
  float* qs = dyn_smem;
  float* dos = qs + kQ * d;
  float* ks = dos + kQ * d;
  float* vs = ks + kTile * (d + 1);
  float* dss = vs + kTile * (d + 1) + warp * kRowsPerWarp * kTile;
  load_tile<T, kVec>(q_src(p, m, b, h, t0, scale), d, kQ, qs, d);
  TileSrc<T> dsrc = q_src(p, m, b, h, t0, p.gate != nullptr ? da::gate_factor(to_float(p.gate[h])) : 1.0f);
  dsrc.x = dout;
  dsrc.w = nullptr;
  dsrc.cos = nullptr;
  load_tile<T, kVec>(dsrc, d, kQ, dos, d);

  float acc[kRowsPerWarp][NC], rl[kRowsPerWarp], rd[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t t = t0 + warp * kRowsPerWarp + r;
    rl[r] = t < m.tq ? lse[(b * m.hq + h) * m.tq + t] : -INFINITY;
    rd[r] = t < m.tq ? delta[(b * m.hq + h) * m.tq + t] : 0.0f;
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[r][c] = 0.0f;
  }
  for (int64_t j0 = 0; j0 < m.tk; j0 += kTile) {
    __syncthreads();
    load_tile<T, kVec>(k_src(p, m, b, g, j0, kTile), d, kTile, ks, d + 1);
    load_tile<T, kVec>(v_src(p, m, b, g, j0, kTile), d, kTile, vs, d + 1);
    __syncthreads();
    const bool kept = key_kept(p.mask, m, b, j0 + lane);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r;
      float ds = 0.0f;
      if (kept) {
        const float pr = da::prob(dot_bcast(qs + row * d, ks + lane * (d + 1), d), rl[r]);
        ds = da::grad_score(pr, dot_bcast(dos + row * d, vs + lane * (d + 1), d), rd[r]);
      }
      dss[r * kTile + lane] = ds;
    }
    __syncwarp();
    for (int jj = 0; jj < kTile; ++jj) {
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const int e = lane + 32 * c;
        const float kv = e < d ? ks[jj * (d + 1) + e] : 0.0f;
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) acc[r][c] = fmaf(dss[r * kTile + jj], kv, acc[r][c]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t t = t0 + warp * kRowsPerWarp + r;
    if (t >= m.tq) continue;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int e = lane + 32 * c;
      if (e < d) dqn[((b * m.tq + t) * m.hq + h) * d + e] = acc[r][c] * scale;
    }
  }
}

// dK/dV: one block per (key tile of kQ keys, kv head, batch); each warp owns kRowsPerWarp keys, lanes own
// queries while scoring a 32-query tile, then channels. Loops over every query head of the group.
// Writes dv (storage type) and dkn (B, Tk, Hkv, D) fp32.
// smem: kk[kQ][D] | vv[kQ][D] | qs[kTile][D+1] | dos[kTile][D+1] | pw[kWarps][kRowsPerWarp][kTile] | dsw (same)
template <class T, int NC, bool kVec>
__global__ void __launch_bounds__(kThreads, 1) dkv_kernel(Ptrs<T> p, da::Dims m, const T* __restrict__ dout,
                                                       const float* __restrict__ lse,
                                                       const float* __restrict__ delta, float* __restrict__ dkn,
                                                       T* __restrict__ dv) {
  const int d = static_cast<int>(m.d);
  const int64_t b = blockIdx.z, j0 = static_cast<int64_t>(blockIdx.x) * kQ;
  const int g = blockIdx.y, rep = static_cast<int>(m.hq / m.hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const float scale = inv_sqrt(d);
  float* kk = dyn_smem;
  float* vv = kk + kQ * d;
  float* qs = vv + kQ * d;
  float* dos = qs + kTile * (d + 1);
  float* pw = dos + kTile * (d + 1) + warp * kRowsPerWarp * kTile;
  float* dsw = pw + kWarps * kRowsPerWarp * kTile;
  load_tile<T, kVec>(k_src(p, m, b, g, j0, kQ), d, kQ, kk, d);
  load_tile<T, kVec>(v_src(p, m, b, g, j0, kQ), d, kQ, vv, d);
  bool kept[kRowsPerWarp];
  float adk[kRowsPerWarp][NC], adv[kRowsPerWarp][NC];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    kept[r] = key_kept(p.mask, m, b, j0 + warp * kRowsPerWarp + r);
#pragma unroll
    for (int c = 0; c < NC; ++c) adk[r][c] = adv[r][c] = 0.0f;
  }
  for (int h = g * rep; h < (g + 1) * rep; ++h) {
    const float tg = p.gate != nullptr ? da::gate_factor(to_float(p.gate[h])) : 1.0f;
    for (int64_t i0 = 0; i0 < m.tq; i0 += kTile) {
      __syncthreads();
      TileSrc<T> qsrc = q_src(p, m, b, h, i0, scale);
      qsrc.valid = static_cast<int>(imin(kTile, m.tq - i0));
      load_tile<T, kVec>(qsrc, d, kTile, qs, d + 1);
      qsrc.x = dout;
      qsrc.w = nullptr;
      qsrc.cos = nullptr;
      qsrc.mul = tg;
      load_tile<T, kVec>(qsrc, d, kTile, dos, d + 1);
      __syncthreads();
      const int64_t i = i0 + lane;
      const float li = i < m.tq ? lse[(b * m.hq + h) * m.tq + i] : -INFINITY;
      const float di = i < m.tq ? delta[(b * m.hq + h) * m.tq + i] : 0.0f;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int row = warp * kRowsPerWarp + r;
        float pr = 0.0f, ds = 0.0f;
        if (kept[r]) {
          pr = da::prob(dot_bcast(kk + row * d, qs + lane * (d + 1), d), li);
          ds = da::grad_score(pr, dot_bcast(vv + row * d, dos + lane * (d + 1), d), di);
        }
        pw[r * kTile + lane] = pr;
        dsw[r * kTile + lane] = ds;
      }
      __syncwarp();
      for (int ii = 0; ii < kTile; ++ii) {
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          const int e = lane + 32 * c;
          const float dov = e < d ? dos[ii * (d + 1) + e] : 0.0f;
          const float qv = e < d ? qs[ii * (d + 1) + e] : 0.0f;
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            adv[r][c] = fmaf(pw[r * kTile + ii], dov, adv[r][c]);
            adk[r][c] = fmaf(dsw[r * kTile + ii], qv, adk[r][c]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t j = j0 + warp * kRowsPerWarp + r;
    if (j >= m.tk) continue;
    const int64_t base = ((b * m.tk + j) * m.hkv + g) * d;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int e = lane + 32 * c;
      if (e >= d) continue;
      dkn[base + e] = adk[r][c];
      dv[base + e] = from_float<T>(adv[r][c]);
    }
  }
}

// RoPE + LayerNorm backward over token rows of n = heads * D values: block `blk` runs rows
// [split(rows, gridDim.x, blk), split(rows, gridDim.x, blk + 1)) in order, each thread the same pairs of
// every row, so its weight/bias partials (wpart (grid, 2n): dw | db) need no atomics. w == nullptr:
// dx = y (no LayerNorm, no partials).
template <class T>
__global__ void token_bwd_kernel(const float* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                 const float* __restrict__ mean, const float* __restrict__ rstd,
                                 const float* __restrict__ cos, const float* __restrict__ sin, int64_t rows,
                                 int64_t n, int64_t half, T* __restrict__ dx, float* __restrict__ wpart) {
  __shared__ float red[32];
  const int64_t pairs = n / 2;
  float* pw = w != nullptr ? wpart + blockIdx.x * 2 * n : nullptr;
  if (pw != nullptr)
    for (int64_t c = threadIdx.x; c < 2 * n; c += blockDim.x) pw[c] = 0.0f;
  __syncthreads();  // zeroed by other threads than the ones that accumulate
  for (int64_t r = split_point(rows, gridDim.x, blockIdx.x); r < split_point(rows, gridDim.x, blockIdx.x + 1); ++r) {
    const float* y = dy + r * n;
    auto grad = [&](int64_t pi, float& ga, float& gb) {  // y of pair pi with the rotation undone
      ga = y[2 * pi];
      gb = y[2 * pi + 1];
      if (cos != nullptr) {
        const int64_t ci = r * half + pi % half;
        const float c = cos[ci], s = -sin[ci], a = ga;
        ga = rope::rotate_a(a, gb, c, s);
        gb = rope::rotate_b(a, gb, c, s);
      }
    };
    if (w == nullptr) {
      for (int64_t pi = threadIdx.x; pi < pairs; pi += blockDim.x) {
        float ga, gb;
        grad(pi, ga, gb);
        dx[r * n + 2 * pi] = from_float<T>(ga);
        dx[r * n + 2 * pi + 1] = from_float<T>(gb);
      }
      continue;
    }
    const float mu = mean[r], rs = rstd[r];
    float sg = 0.0f, sgx = 0.0f;
    for (int64_t pi = threadIdx.x; pi < pairs; pi += blockDim.x) {
      float gy[2];
      grad(pi, gy[0], gy[1]);
      for (int u = 0; u < 2; ++u) {
        const int64_t e = 2 * pi + u;
        const float gw = gy[u] * to_float(w[e]);
        sg += gw;
        sgx += gw * ((to_float(x[r * n + e]) - mu) * rs);
      }
    }
    const float mg = block_sum(sg, red) / static_cast<float>(n);
    const float mgx = block_sum(sgx, red) / static_cast<float>(n);
    for (int64_t pi = threadIdx.x; pi < pairs; pi += blockDim.x) {
      float gy[2];
      grad(pi, gy[0], gy[1]);
      for (int u = 0; u < 2; ++u) {
        const int64_t e = 2 * pi + u;
        const float xhat = (to_float(x[r * n + e]) - mu) * rs;
        dx[r * n + e] = from_float<T>(da::ln_grad_x(gy[u] * to_float(w[e]), xhat, mg, mgx, rs));
        pw[e] += gy[u] * xhat;
        pw[n + e] += gy[u];
      }
    }
  }
}

// out[i] = sum over p < parts, in order, of part[p * stride + i], for i < n.
__global__ void sum_parts_kernel(const float* __restrict__ part, int64_t parts, int64_t stride, int64_t n,
                                 float* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = 0.0f;
    for (int64_t p = 0; p < parts; ++p) acc += part[p * stride + i];
    out[i] = acc;
  }
}

// dgate[h] = (1 - tanh^2 g_h) * sum over (b, t) of gdot[b, h, t]: one block per head, fixed order.
template <class T>
__global__ void dgate_kernel(const float* __restrict__ gdot, const T* __restrict__ gate, int64_t b, int64_t hq,
                             int64_t tq, float* __restrict__ dgate) {
  __shared__ float red[32];
  const int64_t h = blockIdx.x;
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < b * tq; i += blockDim.x) s += gdot[((i / tq) * hq + h) * tq + i % tq];
  s = block_sum(s, red);
  if (threadIdx.x == 0) dgate[h] = s * da::gate_grad_scale(da::gate_factor(to_float(gate[h])));
}

// ---- host side ----

// Scratch from the stream-ordered allocator, freed on the same stream when the call ends.
class Scratch {
 public:
  explicit Scratch(cudaStream_t st) : st_(st) {}
  ~Scratch() {
    for (int i = 0; i < n_; ++i) cudaFreeAsync(ptr_[i], st_);
  }
  float* floats(int64_t count, cudaError_t& err) {
    void* p = nullptr;
    if (err == cudaSuccess && count > 0) err = cudaMallocAsync(&p, static_cast<size_t>(count) * sizeof(float), st_);
    if (p != nullptr) ptr_[n_++] = p;
    return static_cast<float*>(p);
  }

 private:
  cudaStream_t st_;
  void* ptr_[8] = {};
  int n_ = 0;
};

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Calls fn(NC, kVec) tags: NC = 32-channel chunks per lane (D <= 256), kVec = 16-byte loads possible.
template <class T, class Fn>
const char* visit_shape(int64_t d, bool vec, Fn&& fn) {
  auto pick = [&](auto nc) {
    if (vec)
      fn(nc, std::true_type{});
    else
      fn(nc, std::false_type{});
  };
  if (d <= 32)
    pick(std::integral_constant<int, 1>{});
  else if (d <= 64)
    pick(std::integral_constant<int, 2>{});
  else if (d <= 128)
    pick(std::integral_constant<int, 4>{});
  else if (d <= 256)
    pick(std::integral_constant<int, 8>{});
  else
    return "dit_attention: the CUDA face supports head dims up to 256";
  return nullptr;
}

// Launches a kernel needing `smem` bytes of dynamic shared memory, opting in above the 48 KiB default.
template <class K, class... Args>
cudaError_t launch(K kernel, dim3 grid, size_t smem, cudaStream_t st, Args... args) {
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, kThreads, smem, st>>>(args...);
  return cudaSuccess;
}

template <class T>
void stats(const T* x, int64_t rows, int64_t n, float* mean, float* rstd, cudaStream_t st) {
  ln_stats_kernel<T><<<grid_for(rows * 32, kTokenThreads), kTokenThreads, 0, st>>>(x, rows, n, mean, rstd);
}

template <class T>
bool can_vec(const da::Dims& m, std::initializer_list<const void*> ptrs) {
  if (m.d % (16 / sizeof(T)) != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

template <class T>
const char* forward(const da::FwdArgs& a, const da::Dims& m, cudaStream_t st) {
  cudaError_t err = cudaSuccess;
  Scratch ws(st);
  float* qstat = ws.floats(2 * m.b * m.tq, err);
  float* kstat = a.k_weight != nullptr ? ws.floats(2 * m.b * m.tk, err) : nullptr;
  if (err != cudaSuccess) return error_text(err);
  Ptrs<T> p{static_cast<const T*>(a.q), static_cast<const T*>(a.k), static_cast<const T*>(a.v),
            static_cast<const T*>(a.q_weight), static_cast<const T*>(a.q_bias), static_cast<const T*>(a.k_weight),
            static_cast<const T*>(a.k_bias), static_cast<const T*>(a.gate), a.cos, a.sin, qstat,
            qstat + m.b * m.tq, kstat, kstat != nullptr ? kstat + m.b * m.tk : nullptr, a.key_mask, a.rope_k};
  stats(p.q, m.b * m.tq, m.hq * m.d, qstat, qstat + m.b * m.tq, st);
  if (kstat != nullptr) stats(p.k, m.b * m.tk, m.hkv * m.d, kstat, kstat + m.b * m.tk, st);
  const bool vec = can_vec<T>(m, {a.q, a.k, a.v, a.q_weight, a.q_bias, a.k_weight, a.k_bias});
  const dim3 grid(static_cast<unsigned>((m.tq + kQ - 1) / kQ), static_cast<unsigned>(m.hq),
                  static_cast<unsigned>(m.b));
  const size_t smem = (kQ * m.d + kTile * (m.d + 1) + kTile * m.d + kWarps * kRowsPerWarp * kTile) * sizeof(float);
  const char* bad = visit_shape<T>(m.d, vec, [&](auto nc, auto kvec) {
    err = launch(fwd_kernel<T, decltype(nc)::value, decltype(kvec)::value>, grid, smem, st, p, m,
                 static_cast<const T*>(a.residual), static_cast<T*>(a.out), a.lse, static_cast<T*>(a.out_ungated));
  });
  if (bad != nullptr) return bad;
  if (err != cudaSuccess) return error_text(err);
  return launch_status();
}

template <class T>
const char* backward(const da::BwdArgs& a, const da::Dims& m, cudaStream_t st) {
  cudaError_t err = cudaSuccess;
  Scratch ws(st);
  const int64_t nq = m.hq * m.d, nk = m.hkv * m.d;
  const int64_t qrows = m.b * m.tq, krows = m.b * m.tk;
  const int64_t qparts = std::min(std::max<int64_t>(qrows, 1), kMaxBlocksPartials);
  const int64_t kparts = std::min(std::max<int64_t>(krows, 1), kMaxBlocksPartials);
  float* qstat = ws.floats(2 * qrows, err);
  float* kstat = a.k_weight != nullptr ? ws.floats(2 * krows, err) : nullptr;
  float* rows = ws.floats(2 * qrows * m.hq, err);  // delta | gdot
  float* dqn = ws.floats(qrows * nq, err);
  float* dkn = ws.floats(krows * nk, err);
  float* qpart = ws.floats(qparts * 2 * nq, err);
  float* kpart = a.k_weight != nullptr ? ws.floats(kparts * 2 * nk, err) : nullptr;
  if (err != cudaSuccess) return error_text(err);
  Ptrs<T> p{static_cast<const T*>(a.q), static_cast<const T*>(a.k), static_cast<const T*>(a.v),
            static_cast<const T*>(a.q_weight), static_cast<const T*>(a.q_bias), static_cast<const T*>(a.k_weight),
            static_cast<const T*>(a.k_bias), static_cast<const T*>(a.gate), a.cos, a.sin, qstat, qstat + qrows,
            kstat, kstat != nullptr ? kstat + krows : nullptr, a.key_mask, a.rope_k};
  const T* dout = static_cast<const T*>(a.dout);
  stats(p.q, qrows, nq, qstat, qstat + qrows, st);
  if (kstat != nullptr) stats(p.k, krows, nk, kstat, kstat + krows, st);
  float* delta = rows;
  float* gdot = a.dgate != nullptr ? rows + qrows * m.hq : nullptr;
  delta_kernel<T><<<grid_for(qrows * m.hq * 32, kTokenThreads), kTokenThreads, 0, st>>>(
      dout, static_cast<const T*>(a.out_ungated), p.gate, m, delta, gdot);
  const bool vec = can_vec<T>(m, {a.q, a.k, a.v, a.q_weight, a.q_bias, a.k_weight, a.k_bias, a.dout});
  const size_t dq_smem = (2 * kQ * m.d + 2 * kTile * (m.d + 1) + kWarps * kRowsPerWarp * kTile) * sizeof(float);
  const size_t dkv_smem =
      (2 * kQ * m.d + 2 * kTile * (m.d + 1) + 2 * kWarps * kRowsPerWarp * kTile) * sizeof(float);
  const dim3 qgrid(static_cast<unsigned>((m.tq + kQ - 1) / kQ), static_cast<unsigned>(m.hq),
                   static_cast<unsigned>(m.b));
  const dim3 kgrid(static_cast<unsigned>((m.tk + kQ - 1) / kQ), static_cast<unsigned>(m.hkv),
                   static_cast<unsigned>(m.b));
  const char* bad = visit_shape<T>(m.d, vec, [&](auto nc, auto kvec) {
    constexpr int NC = decltype(nc)::value;
    constexpr bool V = decltype(kvec)::value;
    err = launch(dq_kernel<T, NC, V>, qgrid, dq_smem, st, p, m, dout, a.lse, delta, dqn);
    if (err == cudaSuccess && m.tk > 0)
      err = launch(dkv_kernel<T, NC, V>, kgrid, dkv_smem, st, p, m, dout, a.lse, delta, dkn, static_cast<T*>(a.dv));
  });
  if (bad != nullptr) return bad;
  if (err != cudaSuccess) return error_text(err);
  token_bwd_kernel<T><<<static_cast<unsigned>(qparts), kTokenThreads, 0, st>>>(
      dqn, p.q, p.qw, p.q_mean, p.q_rstd, a.cos, a.sin, qrows, nq, m.d / 2, static_cast<T*>(a.dq), qpart);
  sum_parts_kernel<<<grid_for(nq, kTokenThreads), kTokenThreads, 0, st>>>(qpart, qparts, 2 * nq, nq, a.dq_weight);
  sum_parts_kernel<<<grid_for(nq, kTokenThreads), kTokenThreads, 0, st>>>(qpart + nq, qparts, 2 * nq, nq,
                                                                          a.dq_bias);
  token_bwd_kernel<T><<<static_cast<unsigned>(kparts), kTokenThreads, 0, st>>>(
      dkn, p.k, p.kw, p.k_mean, p.k_rstd, a.rope_k ? a.cos : nullptr, a.rope_k ? a.sin : nullptr, krows, nk,
      m.d / 2, static_cast<T*>(a.dk), kpart);
  if (kpart != nullptr) {
    sum_parts_kernel<<<grid_for(nk, kTokenThreads), kTokenThreads, 0, st>>>(kpart, kparts, 2 * nk, nk,
                                                                            a.dk_weight);
    sum_parts_kernel<<<grid_for(nk, kTokenThreads), kTokenThreads, 0, st>>>(kpart + nk, kparts, 2 * nk, nk,
                                                                            a.dk_bias);
  }
  if (gdot != nullptr)
    dgate_kernel<T><<<static_cast<unsigned>(m.hq), kTokenThreads, 0, st>>>(gdot, p.gate, m.b, m.hq, m.tq, a.dgate);
  return launch_status();
}

}  // namespace

const char* dit_attention_fwd(const da::FwdArgs& args, const da::Dims& dims, DType dt, int device, void* stream) {
  if (dims.b * dims.tq * dims.hq == 0) return nullptr;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  const char* res = nullptr;
  visit_device_dtype(dt, [&](auto tag) {
    res = forward<decltype(tag)>(args, dims, static_cast<cudaStream_t>(stream));
  });
  return res;
}

const char* dit_attention_bwd(const da::BwdArgs& args, const da::Dims& dims, DType dt, int device, void* stream) {
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  const char* res = nullptr;
  visit_device_dtype(dt, [&](auto tag) {
    res = backward<decltype(tag)>(args, dims, static_cast<cudaStream_t>(stream));
  });
  return res;
}

}  // namespace blip3o::cuda
