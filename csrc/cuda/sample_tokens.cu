// Token sampling CUDA launcher: one block per row, the same three phases as kernels/sample_tokens.py
// (raw max + log-sum-exp; top-k / top-p thresholds by bisection over the row's values with passes that
// snap to present values; Gumbel-max over the kept tokens), with the shared noise and key math of
// csrc/include/blip3o/sample_tokens.h. Every reduction runs in an order fixed by the block size, so a row
// always gives the same token; no scratch memory, no host sync (CUDA-graph capturable).
#include <cfloat>

#include "blip3o/sample_tokens.h"
#include "cuda/cuda_common.cuh"
#include "cuda/kernels.h"

namespace blip3o::cuda {

namespace {

namespace st = blip3o::sample_tokens;
constexpr int kThreads = 512;
constexpr float kGumbelMax = 16.64f;  // above every value gumbel() returns (16.6356)
constexpr int kMaxSteps = 160;        // a guard only: a search takes at most ~70 steps

// Block-wide reductions over kThreads threads, returned to every thread. smem: 32 slots, reused.
template <class V, class Op>
__device__ __forceinline__ V block_reduce(V v, Op op, V* smem) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = smem[lane < kThreads / 32 ? lane : 0];
  for (int o = kThreads / 64; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return __shfl_sync(0xffffffffu, v, 0);  // lanes 0..15 hold the result; the rest combined copies
}

struct Sum { template <class V> __device__ V operator()(V a, V b) const { return a + b; } };
struct Max { template <class V> __device__ V operator()(V a, V b) const { return a > b ? a : b; } };

// (value, index) max with the lowest index on ties; -inf everywhere gives the lowest index seen.
__device__ __forceinline__ void block_argmax(float& v, int& i, float* fs, int* is) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) { fs[warp] = v; is[warp] = i; }
  __syncthreads();
  const int src = lane < kThreads / 32 ? lane : 0;
  v = fs[src];
  i = is[src];
  for (int o = kThreads / 64; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
  }
  v = __shfl_sync(0xffffffffu, v, 0);
  i = __shfl_sync(0xffffffffu, i, 0);
}

struct Shared {
  float f[32];
  int i[32];
  unsigned u[32];
};

template <class T>
__device__ __forceinline__ float scaled(const T* row, int64_t i, float temp) {
  return st::div_rn(to_float(row[i]), temp);
}

// The smallest present key passing the rule: count(s > v) < k, or (kMass) sum(exp(s - max) : s > v) < thr.
// Invariant: keys <= lo fail, hi is present and passes; c_lo / c_hi count keys > lo / >= hi.
template <bool kMass, class T>
__device__ uint32_t search(const T* row, int64_t vocab, float temp, float row_max, int k, float thr, uint32_t lo,
                           uint32_t hi, Shared& sh) {
  int c_lo = 1, c_hi = 0;
  float width = 16.0f;
  for (int step = 0; c_lo != c_hi && step < kMaxSteps; ++step) {
    const float hi_v = st::key_value(hi), lo_v = st::key_value(lo);
    const bool floor = lo == 0u;
    const float mid_v = floor ? hi_v - width : lo_v * 0.5f + hi_v * 0.5f;
    const bool near = floor ? width <= 128.0f : hi_v - lo_v <= 128.0f;
    if (floor) width *= 2.0f;
    const uint32_t cand = st::ordered_key(mid_v);
    const uint32_t mk = near && cand > lo && cand < hi ? cand : lo + (hi - lo) / 2;
    int c_m = 0, n_lo = 0, n_hi = 0, cq = 0;
    float mass = 0.0f;
    uint32_t q = 0u;
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
      const float s = scaled(row, i, temp);
      const uint32_t kk = st::ordered_key(s);
      c_m += kk > mk;
      n_lo += kk > lo;
      n_hi += kk >= hi;
      if (kMass && kk > mk) mass += __expf(s - row_max);
      if (kk <= mk) {
        if (kk > q) { q = kk; cq = 0; }
        cq += kk == q;
      }
    }
    c_m = block_reduce(c_m, Sum{}, sh.i);
    n_lo = block_reduce(n_lo, Sum{}, sh.i);
    n_hi = block_reduce(n_hi, Sum{}, sh.i);
    if (kMass) mass = block_reduce(mass, Sum{}, sh.f);
    const uint32_t q_all = block_reduce(q, Max{}, sh.u);
    cq = block_reduce(q == q_all ? cq : 0, Sum{}, sh.i);
    const bool passes = kMass ? mass < thr : c_m < k;
    if (cq > 0 && q_all > lo && passes) {
      hi = q_all;
      c_hi = c_m + cq;
      c_lo = n_lo;
    } else {
      lo = mk;
      c_lo = c_m;
      c_hi = n_hi;
    }
  }
  return hi;
}

template <class T>
__global__ void sample_kernel(const T* __restrict__ logits, const float* __restrict__ temperature,
                              const int32_t* __restrict__ top_k, const float* __restrict__ top_p,
                              const int64_t* __restrict__ seeds, const int64_t* __restrict__ counters,
                              int64_t* __restrict__ tokens, float* __restrict__ logprobs, int64_t vocab) {
  __shared__ Shared sh;
  const int64_t r = blockIdx.x;
  const T* row = logits + r * vocab;
  // 1. raw max (lowest index) and the log-sum-exp normaliser (per-thread online, then combined)
  float best = -INFINITY, m = -INFINITY, sum = 0.0f;
  int best_i = 0;
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
    const float x = to_float(row[i]);
    if (x > best) { best = x; best_i = static_cast<int>(i); }
    const float m_new = fmaxf(m, x);
    const float ref = m_new > -INFINITY ? m_new : 0.0f;
    sum = sum * __expf(m - ref) + __expf(x - ref);
    m = m_new;
  }
  block_argmax(best, best_i, sh.f, sh.i);
  const float log_z = best + logf(block_reduce(sum * __expf(m - best), Sum{}, sh.f));

  int token = best_i;
  const float temp = temperature[r];
  if (temp > 0.0f) {
    const int k = top_k[r];
    const float p = top_p[r];
    const float row_max = st::div_rn(best, temp);  // x / temp is monotone: the raw max is the scaled max
    const uint32_t max_key = st::ordered_key(row_max);
    uint32_t tau = 0u;
    // 2. the kept set's threshold key: top-k, then top-p among the top-k survivors
    if (k > 0 && k < vocab) tau = search<false>(row, vocab, temp, row_max, k, 0.0f, 0u, max_key, sh);
    if (p < 1.0f) {
      float z = 0.0f;
      for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
        const float s = scaled(row, i, temp);
        if (st::ordered_key(s) >= tau) z += __expf(s - row_max);
      }
      z = block_reduce(z, Sum{}, sh.f);
      tau = search<true>(row, vocab, temp, row_max, 0, p * z, tau > 0u ? tau - 1u : 0u, max_key, sh);
    }
    // 3. Gumbel-max over the kept tokens; a token that cannot beat this thread's best even with the
    // largest noise (fl(s + g) <= fl(s + kGumbelMax)), or lies kPruneSpan below the max, skips the noise.
    const uint32_t key = st::row_key(seeds[r], counters[r]);
    const float floor_s = fabsf(row_max) < st::kPruneMaxAbs ? row_max - st::kPruneSpan : -INFINITY;
    float g_best = -INFINITY;
    int g_i = 0;
    bool first = true;
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
      const float s = scaled(row, i, temp);
      if (first) { g_i = static_cast<int>(i); first = false; }  // the lowest index this thread saw
      if (st::ordered_key(s) < tau || !(s >= floor_s) || s + kGumbelMax < g_best) continue;
      const float score = s + st::gumbel(key, static_cast<uint32_t>(i));
      if (score > g_best) { g_best = score; g_i = static_cast<int>(i); }
    }
    block_argmax(g_best, g_i, sh.f, sh.i);
    token = g_i;
  }
  if (threadIdx.x == 0) {
    tokens[r] = token;
    logprobs[r] = to_float(row[token]) - log_z;
  }
}

}  // namespace

const char* sample_tokens(const void* logits, const float* temperature, const int32_t* top_k, const float* top_p,
                          const int64_t* seeds, const int64_t* counters, int64_t* tokens, float* logprobs,
                          int64_t batch, int64_t vocab, DType dt, int device, void* stream) {
  if (batch == 0) return nullptr;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  visit_device_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    sample_kernel<T><<<static_cast<unsigned>(batch), kThreads, 0, st>>>(
        static_cast<const T*>(logits), temperature, top_k, top_p, seeds, counters, tokens, logprobs, vocab);
  });
  return launch_status();
}

}  // namespace blip3o::cuda
