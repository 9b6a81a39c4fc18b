// SwiGLU CPU kernel: elementwise over fixed-size blocks in parallel (OpenMP), AVX2 exp or libm expf.
// Math: csrc/include/blip3o/swiglu.h; contract: python/blip3o_fast/ops/swiglu.py.
#include <algorithm>

#include "blip3o/swiglu.h"
#include "cpu/kernels.h"
#include "cpu/vec_avx2.h"

namespace blip3o::cpu {

namespace {

constexpr int64_t kBlock = 1 << 13;  // elements per task, a multiple of 8

template <class T>
void fwd_scalar(const T* gate, const T* up, T* out, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) out[i] = from_f32<T>(swiglu::forward(to_f32(gate[i]), to_f32(up[i])));
}

template <class T>
void bwd_scalar(const T* dy, const T* gate, const T* up, T* dgate, T* dup, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) {
    const float g = to_f32(gate[i]), d = to_f32(dy[i]);
    const float sig = swiglu::sigmoid(g);
    dgate[i] = from_f32<T>(swiglu::grad_gate(d, g, to_f32(up[i]), sig));
    dup[i] = from_f32<T>(swiglu::grad_up(d, g, sig));
  }
}

template <class T>
BLIP3O_AVX2 void fwd_avx2(const T* gate, const T* up, T* out, int64_t lo, int64_t hi) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 neg = _mm256_set1_ps(-0.0f);
  int64_t i = lo;
  for (; i + 8 <= hi; i += 8) {
    const __m256 g = avx2::load8(gate + i);
    const __m256 den = _mm256_add_ps(one, avx2::exp(_mm256_xor_ps(g, neg)));
    avx2::store8(out + i, _mm256_mul_ps(_mm256_div_ps(g, den), avx2::load8(up + i)));
  }
  fwd_scalar(gate, up, out, i, hi);
}

template <class T>
BLIP3O_AVX2 void bwd_avx2(const T* dy, const T* gate, const T* up, T* dgate, T* dup, int64_t lo, int64_t hi) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 neg = _mm256_set1_ps(-0.0f);
  int64_t i = lo;
  for (; i + 8 <= hi; i += 8) {
    const __m256 g = avx2::load8(gate + i), u = avx2::load8(up + i), d = avx2::load8(dy + i);
    const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, avx2::exp(_mm256_xor_ps(g, neg))));
    const __m256 tail = _mm256_add_ps(one, _mm256_mul_ps(g, _mm256_sub_ps(one, sig)));
    avx2::store8(dgate + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(d, u), sig), tail));
    avx2::store8(dup + i, _mm256_mul_ps(_mm256_mul_ps(d, g), sig));
  }
  bwd_scalar(dy, gate, up, dgate, dup, i, hi);
}

template <class T>
void fwd(const T* gate, const T* up, T* out, int64_t n) {
  const bool vec = use_avx2();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t lo = blk * kBlock, hi = std::min(n, lo + kBlock);
    if (vec)
      fwd_avx2(gate, up, out, lo, hi);
    else
      fwd_scalar(gate, up, out, lo, hi);
  }
}

template <class T>
void bwd(const T* dy, const T* gate, const T* up, T* dgate, T* dup, int64_t n) {
  const bool vec = use_avx2();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t lo = blk * kBlock, hi = std::min(n, lo + kBlock);
    if (vec)
      bwd_avx2(dy, gate, up, dgate, dup, lo, hi);
    else
      bwd_scalar(dy, gate, up, dgate, dup, lo, hi);
  }
}

}  // namespace

void swiglu_fwd(const void* gate, const void* up, void* out, int64_t n, DType dt) {
  visit_host_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    fwd(static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(out), n);
  });
}

void swiglu_bwd(const void* dy, const void* gate, const void* up, void* dgate, void* dup, int64_t n, DType dt) {
  visit_host_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    bwd(static_cast<const T*>(dy), static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(dgate),
        static_cast<T*>(dup), n);
  });
}

}  // namespace blip3o::cpu
