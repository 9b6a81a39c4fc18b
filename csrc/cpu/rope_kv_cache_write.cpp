// RoPE + KV-cache write CPU kernel: chunks of kChunk tokens in parallel (OpenMP). A chunk's q and k rows are
// rotated by the RoPE kernel itself (csrc/cpu/rope.cpp: AVX2 or scalar, the same rounding as apply_rope),
// then each token's rotated k row, still in cache, and its v row are copied to the token's slot: one pass
// over the data instead of RoPE over all of q and k followed by two scattered copies.
// Rules: csrc/include/blip3o/rope_kv_cache_write.h; contract: python/blip3o_fast/ops/rope_kv_cache_write.py.
#include <algorithm>
#include <cstring>

#include "blip3o/rope_kv_cache_write.h"
#include "cpu/kernels.h"
#include "cpu/vec_avx2.h"

namespace blip3o::cpu {

namespace {

// Tokens per task: amortises rope_apply's per-call cost (its OpenMP region), small enough that the chunk's
// rotated k rows are still in cache when they are copied to their slots.
constexpr int64_t kChunk = 16;

size_t dtype_size(DType dt) { return dt == DType::f32 ? 4 : 2; }

}  // namespace

void rope_kv_cache_write(const void* q, const void* k, const void* v, const float* cos, const float* sin,
                         void* k_cache, void* v_cache, const int64_t* slots, void* q_rot, void* k_rot,
                         int64_t tokens, int64_t heads, int64_t kv_heads, int64_t d, int64_t num_slots, DType dt) {
  const size_t es = dtype_size(dt);
  const size_t q_row = static_cast<size_t>(heads * d) * es, kv_row = static_cast<size_t>(kv_heads * d) * es;
  const auto at = [](const void* p, int64_t i, size_t row) { return static_cast<const char*>(p) + i * row; };
  const auto at_mut = [](void* p, int64_t i, size_t row) { return static_cast<char*>(p) + i * row; };
#pragma omp parallel for schedule(static) if (tokens * (heads + 2 * kv_heads) * d > kParallelMin)
  for (int64_t t0 = 0; t0 < tokens; t0 += kChunk) {
    const int64_t n = std::min(kChunk, tokens - t0), half = d / 2;
    // Nested in this parallel loop, rope_apply runs the chunk on this thread.
    rope_apply(at(q, t0, q_row), cos + t0 * half, sin + t0 * half, at_mut(q_rot, t0, q_row), n, heads, d, false,
               false, dt);
    rope_apply(at(k, t0, kv_row), cos + t0 * half, sin + t0 * half, at_mut(k_rot, t0, kv_row), n, kv_heads, d,
               false, false, dt);
    for (int64_t t = t0; t < t0 + n; ++t) {
      const int64_t slot = slots[t];
      if (!rope_kv_cache_write::slot_written(slot, num_slots)) continue;
      std::memcpy(at_mut(k_cache, slot, kv_row), at(k_rot, t, kv_row), kv_row);
      std::memcpy(at_mut(v_cache, slot, kv_row), at(v, t, kv_row), kv_row);
    }
  }
}

}  // namespace blip3o::cpu
