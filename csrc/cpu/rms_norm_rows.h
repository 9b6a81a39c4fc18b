// Per-row RMSNorm work shared by rms_norm.cpp and rms_norm_modulate.cpp. kMod adds the adaLN
// factor (1 + scale): plain RMSNorm is the kMod=false case (dy * 1 == dy exactly, so one body
// serves both without changing the plain op's rounding). Each row has a scalar body (the header
// math, sums in double) and an AVX2/FMA body with the same products in the same order.
#pragma once
#include <cstdint>

#include "blip3o/rms_norm_modulate.h"
#include "cpu/vec_avx2.h"

namespace blip3o::cpu::rmsrow {

template <bool kMod, class T>
inline float one_plus_scale(const T* scale, int64_t i) {
  return kMod ? 1.0f + to_f32(scale[i]) : 1.0f;
}

template <bool kMod, class T>
inline float fwd_elem(const T* x, const T* w, const T* scale, float r, int64_t i) {
  return kMod ? rms_norm_modulate::forward(to_f32(x[i]), r, to_f32(w[i]), one_plus_scale<kMod>(scale, i))
              : rms_norm::forward(to_f32(x[i]), r, to_f32(w[i]));
}

// Backward for elements [lo, n): writes dx, adds into the dweight (and dscale) partial rows.
template <bool kMod, class T>
inline void bwd_tail(const T* dy, const T* x, const T* w, const T* scale, float r, float mean, T* dx,
                     float* dw, float* ds, int64_t lo, int64_t n) {
  for (int64_t i = lo; i < n; ++i) {
    const float xhat = to_f32(x[i]) * r;
    const float wi = to_f32(w[i]);
    const float d = to_f32(dy[i]);
    const float dn = kMod ? rms_norm_modulate::dn(d, one_plus_scale<kMod>(scale, i)) : d;
    dx[i] = from_f32<T>(rms_norm::grad_x(dn * wi, xhat, mean, r));
    dw[i] += dn * xhat;
    if (kMod) ds[i] += rms_norm_modulate::dscale_term(d, xhat, wi);
  }
}

template <bool kMod, class T>
void fwd_scalar(const T* x, const T* w, const T* scale, T* out, float* rstd, int64_t n, float eps) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_f32(x[i]);
    ss += static_cast<double>(v) * v;
  }
  const float r = rms_norm::rstd(static_cast<float>(ss), n, eps);
  *rstd = r;
  for (int64_t i = 0; i < n; ++i) out[i] = from_f32<T>(fwd_elem<kMod>(x, w, scale, r, i));
}

template <bool kMod, class T>
void bwd_scalar(const T* dy, const T* x, const T* w, const T* scale, float r, T* dx, float* dw, float* ds,
                int64_t n) {
  double dot = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float dn = kMod ? rms_norm_modulate::dn(to_f32(dy[i]), one_plus_scale<kMod>(scale, i)) : to_f32(dy[i]);
    dot += static_cast<double>(dn * to_f32(w[i])) * (to_f32(x[i]) * r);
  }
  const float mean = static_cast<float>(dot) / static_cast<float>(n);
  bwd_tail<kMod>(dy, x, w, scale, r, mean, dx, dw, ds, 0, n);
}

template <bool kMod, class T>
BLIP3O_AVX2 void fwd_avx2(const T* x, const T* w, const T* scale, T* out, float* rstd, int64_t n, float eps) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {  // four accumulators: hides FMA latency, shortens the sum chains
    const __m256 v0 = avx2::load8(x + i), v1 = avx2::load8(x + i + 8);
    const __m256 v2 = avx2::load8(x + i + 16), v3 = avx2::load8(x + i + 24);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
    a1 = _mm256_fmadd_ps(v1, v1, a1);
    a2 = _mm256_fmadd_ps(v2, v2, a2);
    a3 = _mm256_fmadd_ps(v3, v3, a3);
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 v = avx2::load8(x + i);
    a0 = _mm256_fmadd_ps(v, v, a0);
  }
  float ss = avx2::hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) {
    const float v = to_f32(x[i]);
    ss += v * v;
  }
  const float r = rms_norm::rstd(ss, n, eps);
  *rstd = r;
  const __m256 rv = _mm256_set1_ps(r), one = _mm256_set1_ps(1.0f);
  for (i = 0; i + 8 <= n; i += 8) {
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(avx2::load8(x + i), rv), avx2::load8(w + i));
    if (kMod) y = _mm256_mul_ps(y, _mm256_add_ps(one, avx2::load8(scale + i)));
    avx2::store8(out + i, y);
  }
  for (; i < n; ++i) out[i] = from_f32<T>(fwd_elem<kMod>(x, w, scale, r, i));
}

template <bool kMod, class T>
BLIP3O_AVX2 void bwd_avx2(const T* dy, const T* x, const T* w, const T* scale, float r, T* dx, float* dw,
                          float* ds, int64_t n) {
  const __m256 rv = _mm256_set1_ps(r), one = _mm256_set1_ps(1.0f);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 d0 = avx2::load8(dy + i), d1 = avx2::load8(dy + i + 8);
    if (kMod) {
      d0 = _mm256_mul_ps(d0, _mm256_add_ps(one, avx2::load8(scale + i)));
      d1 = _mm256_mul_ps(d1, _mm256_add_ps(one, avx2::load8(scale + i + 8)));
    }
    a0 = _mm256_fmadd_ps(_mm256_mul_ps(d0, avx2::load8(w + i)), _mm256_mul_ps(avx2::load8(x + i), rv), a0);
    a1 = _mm256_fmadd_ps(_mm256_mul_ps(d1, avx2::load8(w + i + 8)), _mm256_mul_ps(avx2::load8(x + i + 8), rv), a1);
  }
  float dot = avx2::hsum(_mm256_add_ps(a0, a1));
  for (; i < n; ++i) {
    const float dn = kMod ? rms_norm_modulate::dn(to_f32(dy[i]), one_plus_scale<kMod>(scale, i)) : to_f32(dy[i]);
    dot += (dn * to_f32(w[i])) * (to_f32(x[i]) * r);
  }
  const float mean = dot / static_cast<float>(n);
  const __m256 mv = _mm256_set1_ps(mean);
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 xhat = _mm256_mul_ps(avx2::load8(x + i), rv);
    const __m256 wi = avx2::load8(w + i);
    const __m256 d = avx2::load8(dy + i);
    const __m256 dn = kMod ? _mm256_mul_ps(d, _mm256_add_ps(one, avx2::load8(scale + i))) : d;
    const __m256 g = _mm256_mul_ps(dn, wi);
    avx2::store8(dx + i, _mm256_mul_ps(rv, _mm256_sub_ps(g, _mm256_mul_ps(xhat, mv))));
    _mm256_storeu_ps(dw + i, _mm256_fmadd_ps(dn, xhat, _mm256_loadu_ps(dw + i)));
    if (kMod) _mm256_storeu_ps(ds + i, _mm256_fmadd_ps(d, _mm256_mul_ps(xhat, wi), _mm256_loadu_ps(ds + i)));
  }
  bwd_tail<kMod>(dy, x, w, scale, r, mean, dx, dw, ds, i, n);
}

}  // namespace blip3o::cpu::rmsrow
