// RoPE CPU kernel: tokens in parallel (OpenMP); every head of a token reads the token's cos/sin row.
// Math: csrc/include/blip3o/rope.h; contract: python/blip3o_fast/ops/rope.py.
#include "blip3o/rope.h"
#include "cpu/kernels.h"
#include "cpu/vec_avx2.h"

namespace blip3o::cpu {

namespace {

// sgn is +1 or -1 (inverse); multiplying by it is exact, so this equals passing -sin.
template <class T>
void head_scalar(const T* x, const float* c, const float* s, float sgn, T* out, int64_t half, bool interleaved,
                 int64_t lo) {
  for (int64_t i = lo; i < half; ++i) {
    const int64_t ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
    const float a = to_f32(x[ia]), b = to_f32(x[ib]), si = sgn * s[i];
    out[ia] = from_f32<T>(rope::rotate_a(a, b, c[i], si));
    out[ib] = from_f32<T>(rope::rotate_b(a, b, c[i], si));
  }
}

// Half layout: 8 pairs per step, a from the first half of the head, b from the second.
template <class T>
BLIP3O_AVX2 void head_half_avx2(const T* x, const float* c, const float* s, float sgn, T* out, int64_t half) {
  const __m256 sg = _mm256_set1_ps(sgn);
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m256 a = avx2::load8(x + i), b = avx2::load8(x + half + i);
    const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_mul_ps(sg, _mm256_loadu_ps(s + i));
    avx2::store8(out + i, _mm256_sub_ps(_mm256_mul_ps(a, cv), _mm256_mul_ps(b, sv)));
    avx2::store8(out + half + i, _mm256_add_ps(_mm256_mul_ps(b, cv), _mm256_mul_ps(a, sv)));
  }
  head_scalar(x, c, s, sgn, out, half, false, i);
}

// Interleaved layout: 4 pairs (8 values a0 b0 a1 b1 ...) per step. With c and s duplicated per pair
// and s negated on even lanes, out = x*c + swap(x)*s gives a*c - b*s and b*c + a*s; -(b*s) equals
// b*(-s) exactly, so this rounds as the scalar formula does.
template <class T>
BLIP3O_AVX2 void head_interleaved_avx2(const T* x, const float* c, const float* s, float sgn, T* out,
                                       int64_t half) {
  const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  const __m256 sign = _mm256_setr_ps(-sgn, sgn, -sgn, sgn, -sgn, sgn, -sgn, sgn);
  int64_t i = 0;
  for (; i + 4 <= half; i += 4) {
    const __m256 v = avx2::load8(x + 2 * i);
    const __m256 cv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(c + i)), dup);
    const __m256 sv = _mm256_mul_ps(sign, _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s + i)), dup));
    const __m256 swapped = _mm256_permute_ps(v, 0xB1);
    avx2::store8(out + 2 * i, _mm256_add_ps(_mm256_mul_ps(v, cv), _mm256_mul_ps(swapped, sv)));
  }
  head_scalar(x, c, s, sgn, out, half, true, i);
}

template <class T>
void apply(const T* x, const float* cos, const float* sin, T* out, int64_t tokens, int64_t heads, int64_t d,
           bool interleaved, bool inverse) {
  const bool vec = use_avx2();
  const int64_t half = d / 2;
  const float sgn = inverse ? -1.0f : 1.0f;
#pragma omp parallel for schedule(static) if (tokens * heads * d > kParallelMin)
  for (int64_t tok = 0; tok < tokens; ++tok) {
    const float* c = cos + tok * half;
    const float* s = sin + tok * half;
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t o = (tok * heads + h) * d;
      if (!vec)
        head_scalar(x + o, c, s, sgn, out + o, half, interleaved, 0);
      else if (interleaved)
        head_interleaved_avx2(x + o, c, s, sgn, out + o, half);
      else
        head_half_avx2(x + o, c, s, sgn, out + o, half);
    }
  }
}

}  // namespace

void rope_apply(const void* x, const float* cos, const float* sin, void* out, int64_t tokens, int64_t heads,
                int64_t d, bool interleaved, bool inverse, DType dt) {
  visit_host_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    apply(static_cast<const T*>(x), cos, sin, static_cast<T*>(out), tokens, heads, d, interleaved, inverse);
  });
}

}  // namespace blip3o::cpu
