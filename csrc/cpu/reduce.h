// Deterministic sum of per-chunk partial rows: out[i] = sum over p (in order) of part[p * n + i].
#pragma once
#include <cstdint>
#include <vector>

namespace blip3o::cpu {

inline void sum_partials(const std::vector<float>& part, int64_t parts, int64_t n, float* out) {
  constexpr int64_t kBlock = 512;  // columns per task: a cache-friendly strip, vectorised by the compiler
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (parts * n > (1 << 15))
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t lo = blk * kBlock, hi = lo + kBlock < n ? lo + kBlock : n;
    for (int64_t i = lo; i < hi; ++i) out[i] = 0.0f;
    for (int64_t p = 0; p < parts; ++p) {
      const float* src = part.data() + p * n;
      for (int64_t i = lo; i < hi; ++i) out[i] += src[i];
    }
  }
}

}  // namespace blip3o::cpu
