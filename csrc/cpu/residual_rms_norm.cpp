// Residual add + RMSNorm CPU kernel. Forward, rows in parallel: the rounded sum is written, then
// normalised by the rms_norm row bodies (rms_norm_rows.h) straight from that row, which is still in
// L1, so y is exactly what rms_norm gives on the new residual. Backward: rows cut into at most
// rms_norm::kMaxPartials chunks fixed by the shape, one dweight partial each, summed in order.
#include <algorithm>
#include <vector>

#include "blip3o/residual_rms_norm.h"
#include "cpu/kernels.h"
#include "cpu/reduce.h"
#include "cpu/rms_norm_rows.h"

namespace blip3o::cpu {

namespace {

template <class T>
void add_scalar(const T* x, const T* r, T* s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) s[i] = from_f32<T>(residual_rms_norm::add(to_f32(x[i]), to_f32(r[i])));
}

template <class T>
BLIP3O_AVX2 void add_avx2(const T* x, const T* r, T* s, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) avx2::store8(s + i, _mm256_add_ps(avx2::load8(x + i), avx2::load8(r + i)));
  for (; i < n; ++i) s[i] = from_f32<T>(residual_rms_norm::add(to_f32(x[i]), to_f32(r[i])));
}

// ds and the dweight partial for one row; `dot` sums (dy * w) * xhat (double in the scalar body).
template <class T>
void bwd_scalar(const T* dy, const T* dres, const T* s, const T* w, float r, T* ds, float* dw, int64_t n) {
  double dot = 0.0;
  for (int64_t i = 0; i < n; ++i) dot += static_cast<double>(to_f32(dy[i]) * to_f32(w[i])) * (to_f32(s[i]) * r);
  const float mean = static_cast<float>(dot) / static_cast<float>(n);
  for (int64_t i = 0; i < n; ++i) {
    const float xhat = to_f32(s[i]) * r, d = to_f32(dy[i]);
    ds[i] = from_f32<T>(residual_rms_norm::grad_sum(to_f32(dres[i]), d * to_f32(w[i]), xhat, mean, r));
    dw[i] += d * xhat;
  }
}

template <class T>
BLIP3O_AVX2 void bwd_avx2(const T* dy, const T* dres, const T* s, const T* w, float r, T* ds, float* dw, int64_t n) {
  const __m256 rv = _mm256_set1_ps(r);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_mul_ps(avx2::load8(dy + i), avx2::load8(w + i)),
                         _mm256_mul_ps(avx2::load8(s + i), rv), a0);
    a1 = _mm256_fmadd_ps(_mm256_mul_ps(avx2::load8(dy + i + 8), avx2::load8(w + i + 8)),
                         _mm256_mul_ps(avx2::load8(s + i + 8), rv), a1);
  }
  float dot = avx2::hsum(_mm256_add_ps(a0, a1));
  for (; i < n; ++i) dot += (to_f32(dy[i]) * to_f32(w[i])) * (to_f32(s[i]) * r);
  const float mean = dot / static_cast<float>(n);
  const __m256 mv = _mm256_set1_ps(mean);
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 xhat = _mm256_mul_ps(avx2::load8(s + i), rv);
    const __m256 d = avx2::load8(dy + i);
    const __m256 g = _mm256_mul_ps(d, avx2::load8(w + i));
    const __m256 dx = _mm256_mul_ps(rv, _mm256_sub_ps(g, _mm256_mul_ps(xhat, mv)));
    avx2::store8(ds + i, _mm256_add_ps(avx2::load8(dres + i), dx));
    _mm256_storeu_ps(dw + i, _mm256_fmadd_ps(d, xhat, _mm256_loadu_ps(dw + i)));
  }
  for (; i < n; ++i) {
    const float xhat = to_f32(s[i]) * r, d = to_f32(dy[i]);
    ds[i] = from_f32<T>(residual_rms_norm::grad_sum(to_f32(dres[i]), d * to_f32(w[i]), xhat, mean, r));
    dw[i] += d * xhat;
  }
}

template <class T>
void fwd(const T* x, const T* res, const T* w, T* out, T* s, float* rstd, int64_t rows, int64_t n, float eps) {
  const bool vec = use_avx2();
  const T* none = nullptr;
#pragma omp parallel for schedule(static) if (rows * n > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * n;
    if (vec) {
      add_avx2(x + o, res + o, s + o, n);
      rmsrow::fwd_avx2<false>(s + o, w, none, out + o, rstd + r, n, eps);
    } else {
      add_scalar(x + o, res + o, s + o, n);
      rmsrow::fwd_scalar<false>(s + o, w, none, out + o, rstd + r, n, eps);
    }
  }
}

template <class T>
void bwd(const T* dy, const T* dres, const T* s, const T* w, const float* rstd, T* ds, float* dweight, int64_t rows,
         int64_t n) {
  const bool vec = use_avx2();
  const int64_t parts = std::min(rows, rms_norm::kMaxPartials);
  std::vector<float> part(static_cast<size_t>(parts * n), 0.0f);
#pragma omp parallel for schedule(static) if (rows * n > kParallelMin)
  for (int64_t p = 0; p < parts; ++p) {
    float* acc = part.data() + p * n;
    for (int64_t r = split_point(rows, parts, p); r < split_point(rows, parts, p + 1); ++r) {
      const int64_t o = r * n;
      if (vec)
        bwd_avx2(dy + o, dres + o, s + o, w, rstd[r], ds + o, acc, n);
      else
        bwd_scalar(dy + o, dres + o, s + o, w, rstd[r], ds + o, acc, n);
    }
  }
  sum_partials(part, parts, n, dweight);  // rows == 0: no parts, dweight zeroed
}

}  // namespace

void residual_rms_norm_fwd(const void* x, const void* residual, const void* weight, void* out, void* new_residual,
                           float* rstd, int64_t rows, int64_t n, float eps, DType dt) {
  visit_host_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    fwd(static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const T*>(weight),
        static_cast<T*>(out), static_cast<T*>(new_residual), rstd, rows, n, eps);
  });
}

void residual_rms_norm_bwd(const void* dy, const void* dres, const void* s, const void* weight, const float* rstd,
                           void* ds, float* dweight, int64_t rows, int64_t n, DType dt) {
  visit_host_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    bwd(static_cast<const T*>(dy), static_cast<const T*>(dres), static_cast<const T*>(s),
        static_cast<const T*>(weight), rstd, static_cast<T*>(ds), dweight, rows, n);
  });
}

}  // namespace blip3o::cpu
