// RoPE + KV-cache write CUDA kernel. Math: rope.h's rotate_a / rotate_b in the rotate-half layout (shared
// with csrc/cuda/rope.cu and the CPU faces); slot rule: csrc/include/blip3o/rope_kv_cache_write.h;
// contract: python/blip3o_fast/ops/rope_kv_cache_write.py.
//
// One block per token (grid-stride). A token's work items are (row, chunk): its rows are its H q heads, KVH k
// heads and KVH v heads; a chunk is W consecutive channels of a row's first half plus the matching W of its
// second half, moved as 16-byte vectors when the layout allows (W = 16 / sizeof(T)), else one element. q and
// k chunks are rotated in fp32 and stored to q_rot / k_rot, k chunks also to k_cache, and v chunks copied
// to v_cache, when the token's slot is inside the pool.
#include "blip3o/rope_kv_cache_write.h"
#include "cuda/cuda_common.cuh"
#include "cuda/kernels.h"

namespace blip3o::cuda {

namespace {

constexpr int kThreads = 128;

// W consecutive elements as fp32, and back; one 16-byte access when W * sizeof(T) == 16.
template <class T, int W>
struct Chunk {
  static constexpr bool kVec = W * sizeof(T) == 16;
  __device__ __forceinline__ static void load(const T* p, float* f) {
    if constexpr (kVec) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < W; ++i) f[i] = to_float(e[i]);
    } else {
#pragma unroll
      for (int i = 0; i < W; ++i) f[i] = to_float(p[i]);
    }
  }
  __device__ __forceinline__ static void store(T* p, const float* f) {
    if constexpr (kVec) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < W; ++i) e[i] = from_float<T>(f[i]);
      *reinterpret_cast<uint4*>(p) = raw;
    } else {
#pragma unroll
      for (int i = 0; i < W; ++i) p[i] = from_float<T>(f[i]);
    }
  }
  __device__ __forceinline__ static void copy(const T* src, T* dst) {
    if constexpr (kVec) {
      *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src));
    } else {
#pragma unroll
      for (int i = 0; i < W; ++i) dst[i] = src[i];
    }
  }
};

template <class T, int W>
__global__ void rope_kv_cache_write_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                           const float* __restrict__ cos, const float* __restrict__ sin,
                                           T* __restrict__ k_cache, T* __restrict__ v_cache,
                                           const int64_t* __restrict__ slots, T* __restrict__ q_rot,
                                           T* __restrict__ k_rot, int64_t tokens, int heads, int kv_heads, int half,
                                           int64_t num_slots) {
  using C = Chunk<T, W>;
  const int chunks = half / W, rows = heads + 2 * kv_heads, d = 2 * half;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const int64_t slot = slots[t];
    const bool write = rope_kv_cache_write::slot_written(slot, num_slots);
    for (int it = threadIdx.x; it < rows * chunks; it += blockDim.x) {
      const int row = it / chunks, i0 = (it % chunks) * W;
      if (row >= heads + kv_heads) {  // a v head: copied when written
        const int g = row - heads - kv_heads;
        if (!write) continue;
        const int64_t src = (t * kv_heads + g) * d + i0, dst = (slot * kv_heads + g) * d + i0;
        C::copy(v + src, v_cache + dst);
        C::copy(v + src + half, v_cache + dst + half);
        continue;
      }
      const bool is_q = row < heads;
      const int g = is_q ? row : row - heads;
      const int64_t base = (t * (is_q ? heads : kv_heads) + g) * d + i0;
      float a[W], b[W], ra[W], rb[W];
      C::load((is_q ? q : k) + base, a);
      C::load((is_q ? q : k) + base + half, b);
#pragma unroll
      for (int i = 0; i < W; ++i) {
        const float c = cos[t * half + i0 + i], s = sin[t * half + i0 + i];
        ra[i] = rope::rotate_a(a[i], b[i], c, s);
        rb[i] = rope::rotate_b(a[i], b[i], c, s);
      }
      T* out = is_q ? q_rot : k_rot;
      C::store(out + base, ra);
      C::store(out + base + half, rb);
      if (!is_q && write) {
        const int64_t dst = (slot * kv_heads + g) * d + i0;
        C::store(k_cache + dst, ra);
        C::store(k_cache + dst + half, rb);
      }
    }
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

const char* rope_kv_cache_write(const void* q, const void* k, const void* v, const float* cos, const float* sin,
                                void* k_cache, void* v_cache, const int64_t* slots, void* q_rot, void* k_rot,
                                int64_t tokens, int64_t heads, int64_t kv_heads, int64_t d, int64_t num_slots,
                                DType dt, int device, void* stream) {
  if (tokens == 0 || d == 0) return nullptr;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  const unsigned blocks = static_cast<unsigned>(tokens < (1 << 16) ? tokens : (1 << 16));
  const bool aligned = aligned16(q) && aligned16(k) && aligned16(v) && aligned16(k_cache) && aligned16(v_cache) &&
                       aligned16(q_rot) && aligned16(k_rot);
  visit_device_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kW = static_cast<int>(16 / sizeof(T));
    auto run = [&](auto kernel) {
      kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
          static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), cos, sin,
          static_cast<T*>(k_cache), static_cast<T*>(v_cache), slots, static_cast<T*>(q_rot), static_cast<T*>(k_rot),
          tokens, static_cast<int>(heads), static_cast<int>(kv_heads), static_cast<int>(d / 2), num_slots);
    };
    if (aligned && (d / 2) % kW == 0)
      run(rope_kv_cache_write_kernel<T, kW>);
    else
      run(rope_kv_cache_write_kernel<T, 1>);
  });
  return launch_status();
}

}  // namespace blip3o::cuda
