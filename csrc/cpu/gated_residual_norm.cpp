// Fused DiT block epilogue CPU kernel (contract: python/blip3o_fast/ops/gated_residual_norm.py;
// math: blip3o/gated_residual_norm.h). One row at a time, in passes over the row; a per-thread fp32
// scratch row (N floats, L1/L2-resident) carries x_out (forward) or xohat then gxo (backward)
// between passes, so nothing is rounded in between. Each pass has an AVX2/FMA body over the
// 8-aligned part and the scalar (header) math over the tail; the scalar path sums in double.
// Backward partials are laid out as in rms_norm_modulate.cpp: each batch's T rows cut into
// rms_norm_modulate::chunks_per_batch units, units grouped into at most kMaxPartials groups, so the
// parameter sums have an order fixed by the shape.
#include <algorithm>
#include <vector>

#include "blip3o/gated_residual_norm.h"
#include "cpu/kernels.h"
#include "cpu/reduce.h"
#include "cpu/vec_avx2.h"

namespace blip3o::cpu {

namespace {

namespace grn = gated_residual_norm;

// One row's operands; the batch rows (gate, next_scale) are already offset to the row's batch.
template <class T>
struct Row {
  const T *x, *y, *wy, *g, *wn, *sn;  // wn, sn null without the next norm
  int64_t n;
};

template <class T>
BLIP3O_AVX2 float sumsq_avx2(const T* v, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 v0 = avx2::load8(v + i), v1 = avx2::load8(v + i + 8);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
    a1 = _mm256_fmadd_ps(v1, v1, a1);
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 v0 = avx2::load8(v + i);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
  }
  float s = avx2::hsum(_mm256_add_ps(a0, a1));
  for (; i < n; ++i) s += to_f32(v[i]) * to_f32(v[i]);
  return s;
}

template <class T>
float sumsq(const T* v, int64_t n, bool vec) {
  if (vec) return sumsq_avx2(v, n);
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(to_f32(v[i])) * to_f32(v[i]);
  return static_cast<float>(s);
}

// ---- forward ----

// x_out = x + gate * yhat * wy for elements [lo, n); keeps the fp32 value in buf when buf is given.
template <class T>
double residual_tail(const Row<T>& r, float ry, T* xo, float* buf, int64_t lo) {
  double ss = 0.0;
  for (int64_t i = lo; i < r.n; ++i) {
    const float v = grn::residual(to_f32(r.x[i]), to_f32(r.g[i]), to_f32(r.y[i]), ry, to_f32(r.wy[i]));
    xo[i] = from_f32<T>(v);
    if (buf) buf[i] = v;
    ss += static_cast<double>(v) * v;
  }
  return ss;
}

template <class T>
BLIP3O_AVX2 float residual_avx2(const Row<T>& r, float ry, T* xo, float* buf) {
  const __m256 rv = _mm256_set1_ps(ry);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= r.n; i += 8) {
    const __m256 yn = _mm256_mul_ps(_mm256_mul_ps(avx2::load8(r.g + i), _mm256_mul_ps(avx2::load8(r.y + i), rv)),
                                    avx2::load8(r.wy + i));
    const __m256 v = _mm256_add_ps(avx2::load8(r.x + i), yn);
    avx2::store8(xo + i, v);
    if (buf) _mm256_storeu_ps(buf + i, v);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  return avx2::hsum(acc) + static_cast<float>(residual_tail(r, ry, xo, buf, i));
}

// h = x_out * rstd_x * wn * (1 + sn) from the fp32 x_out in buf, elements [lo, n).
template <class T>
void modulate_tail(const Row<T>& r, const float* buf, float rx, T* h, int64_t lo) {
  for (int64_t i = lo; i < r.n; ++i)
    h[i] = from_f32<T>(rms_norm_modulate::forward(buf[i], rx, to_f32(r.wn[i]), 1.0f + to_f32(r.sn[i])));
}

template <class T>
BLIP3O_AVX2 void modulate_avx2(const Row<T>& r, const float* buf, float rx, T* h) {
  const __m256 rv = _mm256_set1_ps(rx), one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= r.n; i += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(buf + i), rv), avx2::load8(r.wn + i));
    avx2::store8(h + i, _mm256_mul_ps(v, _mm256_add_ps(one, avx2::load8(r.sn + i))));
  }
  modulate_tail(r, buf, rx, h, i);
}

template <class T>
void fwd(const T* x, const T* y, const T* wy, const T* gate, const T* wn, const T* sn, T* xo, T* h, float* rstd_y,
         float* rstd_x, int64_t batch, int64_t t, int64_t n, float eps) {
  const bool vec = use_avx2();
  const int64_t rows = batch * t;
#pragma omp parallel if (rows * n > kParallelMin)
  {
    std::vector<float> scratch(wn ? static_cast<size_t>(n) : 0);
    float* buf = wn ? scratch.data() : nullptr;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t b = row / t, o = row * n;
      const Row<T> r{x + o, y + o, wy, gate + b * n, wn, wn ? sn + b * n : nullptr, n};
      const float ry = rms_norm::rstd(sumsq(r.y, n, vec), n, eps);
      rstd_y[row] = ry;
      const float ss = vec ? residual_avx2(r, ry, xo + o, buf) : static_cast<float>(residual_tail(r, ry, xo + o, buf, 0));
      if (!wn) continue;
      const float rx = rms_norm::rstd(ss, n, eps);
      rstd_x[row] = rx;
      if (vec)
        modulate_avx2(r, buf, rx, h + o);
      else
        modulate_tail(r, buf, rx, h + o, 0);
    }
  }
}

// ---- backward ----

// Row-level gradient operands and the partial rows this row adds into.
template <class T>
struct Grad {
  const T *dxo, *dh;  // dh null without the next norm
  T *dx, *dy;
  float *dyw, *dgate, *dnw, *dns;
  float ry, rx;
};

// Pass A (next norm only): buf = xohat; dns, dnw partials; returns sum of gh * xohat over [lo, n).
template <class T>
double pass_a_tail(const Row<T>& r, const Grad<T>& d, float* buf, int64_t lo) {
  double dot = 0.0;
  for (int64_t i = lo; i < r.n; ++i) {
    const float xo = grn::residual(to_f32(r.x[i]), to_f32(r.g[i]), to_f32(r.y[i]), d.ry, to_f32(r.wy[i]));
    const float xohat = xo * d.rx, dh = to_f32(d.dh[i]), wn = to_f32(r.wn[i]), s1 = 1.0f + to_f32(r.sn[i]);
    buf[i] = xohat;
    dot += static_cast<double>(grn::grad_h(dh, s1, wn)) * xohat;
    d.dns[i] += grn::dns_term(dh, xohat, wn);
    d.dnw[i] += grn::dnw_term(dh, s1, xohat);
  }
  return dot;
}

template <class T>
BLIP3O_AVX2 float pass_a_avx2(const Row<T>& r, const Grad<T>& d, float* buf) {
  const __m256 ry = _mm256_set1_ps(d.ry), rx = _mm256_set1_ps(d.rx), one = _mm256_set1_ps(1.0f);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= r.n; i += 8) {
    const __m256 yn = _mm256_mul_ps(_mm256_mul_ps(avx2::load8(r.g + i), _mm256_mul_ps(avx2::load8(r.y + i), ry)),
                                    avx2::load8(r.wy + i));
    const __m256 xohat = _mm256_mul_ps(_mm256_add_ps(avx2::load8(r.x + i), yn), rx);
    const __m256 dh = avx2::load8(d.dh + i), wn = avx2::load8(r.wn + i);
    const __m256 s1 = _mm256_add_ps(one, avx2::load8(r.sn + i));
    const __m256 dhs = _mm256_mul_ps(dh, s1);
    _mm256_storeu_ps(buf + i, xohat);
    acc = _mm256_fmadd_ps(_mm256_mul_ps(dhs, wn), xohat, acc);
    _mm256_storeu_ps(d.dns + i, _mm256_fmadd_ps(_mm256_mul_ps(dh, xohat), wn, _mm256_loadu_ps(d.dns + i)));
    _mm256_storeu_ps(d.dnw + i, _mm256_fmadd_ps(dhs, xohat, _mm256_loadu_ps(d.dnw + i)));
  }
  return avx2::hsum(acc) + static_cast<float>(pass_a_tail(r, d, buf, i));
}

// Pass B: gxo (into dx and buf), dgate and dy_weight partials; returns sum of gy * yhat over [lo, n).
template <class T>
double pass_b_tail(const Row<T>& r, const Grad<T>& d, float* buf, float mean_h, int64_t lo) {
  double dot = 0.0;
  for (int64_t i = lo; i < r.n; ++i) {
    float gxo = to_f32(d.dxo[i]);
    if (d.dh)
      gxo = grn::grad_xo(gxo, grn::grad_h(to_f32(d.dh[i]), 1.0f + to_f32(r.sn[i]), to_f32(r.wn[i])), buf[i],
                         mean_h, d.rx);
    const float yhat = to_f32(r.y[i]) * d.ry, g = to_f32(r.g[i]), wy = to_f32(r.wy[i]);
    d.dx[i] = from_f32<T>(gxo);
    buf[i] = gxo;
    dot += static_cast<double>(grn::grad_y_in(gxo, g, wy)) * yhat;
    d.dgate[i] += grn::dgate_term(gxo, yhat, wy);
    d.dyw[i] += grn::dyw_term(gxo, g, yhat);
  }
  return dot;
}

template <class T>
BLIP3O_AVX2 float pass_b_avx2(const Row<T>& r, const Grad<T>& d, float* buf, float mean_h) {
  const __m256 ry = _mm256_set1_ps(d.ry), rx = _mm256_set1_ps(d.rx), one = _mm256_set1_ps(1.0f);
  const __m256 mh = _mm256_set1_ps(mean_h);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= r.n; i += 8) {
    __m256 gxo = avx2::load8(d.dxo + i);
    if (d.dh) {
      const __m256 gh = _mm256_mul_ps(_mm256_mul_ps(avx2::load8(d.dh + i), _mm256_add_ps(one, avx2::load8(r.sn + i))),
                                      avx2::load8(r.wn + i));
      const __m256 xohat = _mm256_loadu_ps(buf + i);
      gxo = _mm256_add_ps(gxo, _mm256_mul_ps(rx, _mm256_sub_ps(gh, _mm256_mul_ps(xohat, mh))));
    }
    const __m256 yhat = _mm256_mul_ps(avx2::load8(r.y + i), ry);
    const __m256 g = avx2::load8(r.g + i), wy = avx2::load8(r.wy + i);
    avx2::store8(d.dx + i, gxo);
    _mm256_storeu_ps(buf + i, gxo);
    const __m256 gg = _mm256_mul_ps(gxo, g);
    acc = _mm256_fmadd_ps(_mm256_mul_ps(gg, wy), yhat, acc);
    _mm256_storeu_ps(d.dgate + i, _mm256_fmadd_ps(_mm256_mul_ps(gxo, yhat), wy, _mm256_loadu_ps(d.dgate + i)));
    _mm256_storeu_ps(d.dyw + i, _mm256_fmadd_ps(gg, yhat, _mm256_loadu_ps(d.dyw + i)));
  }
  return avx2::hsum(acc) + static_cast<float>(pass_b_tail(r, d, buf, mean_h, i));
}

// Pass C: dy from gxo (buf) and the row mean of gy * yhat.
template <class T>
void pass_c_tail(const Row<T>& r, const Grad<T>& d, const float* buf, float mean_y, int64_t lo) {
  for (int64_t i = lo; i < r.n; ++i) {
    const float yhat = to_f32(r.y[i]) * d.ry;
    const float gy = grn::grad_y_in(buf[i], to_f32(r.g[i]), to_f32(r.wy[i]));
    d.dy[i] = from_f32<T>(rms_norm::grad_x(gy, yhat, mean_y, d.ry));
  }
}

template <class T>
BLIP3O_AVX2 void pass_c_avx2(const Row<T>& r, const Grad<T>& d, const float* buf, float mean_y) {
  const __m256 ry = _mm256_set1_ps(d.ry), my = _mm256_set1_ps(mean_y);
  int64_t i = 0;
  for (; i + 8 <= r.n; i += 8) {
    const __m256 yhat = _mm256_mul_ps(avx2::load8(r.y + i), ry);
    const __m256 gy = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(buf + i), avx2::load8(r.g + i)),
                                    avx2::load8(r.wy + i));
    avx2::store8(d.dy + i, _mm256_mul_ps(ry, _mm256_sub_ps(gy, _mm256_mul_ps(yhat, my))));
  }
  pass_c_tail(r, d, buf, mean_y, i);
}

template <class T>
void bwd_row(const Row<T>& r, const Grad<T>& d, float* buf, bool vec) {
  const float nf = static_cast<float>(r.n);
  float mean_h = 0.0f;
  if (d.dh) mean_h = (vec ? pass_a_avx2(r, d, buf) : static_cast<float>(pass_a_tail(r, d, buf, 0))) / nf;
  const float mean_y = (vec ? pass_b_avx2(r, d, buf, mean_h) : static_cast<float>(pass_b_tail(r, d, buf, mean_h, 0))) / nf;
  if (vec)
    pass_c_avx2(r, d, buf, mean_y);
  else
    pass_c_tail(r, d, buf, mean_y, 0);
}

// Adds `chunks` partial rows per batch (src: (batch, chunks, n)) into out (batch, n) in order.
void sum_batch_partials(const std::vector<float>& src, int64_t batch, int64_t chunks, int64_t n, float* out) {
#pragma omp parallel for schedule(static) if (batch * chunks * n > kParallelMin)
  for (int64_t b = 0; b < batch; ++b) {
    float* o = out + b * n;
    std::fill(o, o + n, 0.0f);
    for (int64_t c = 0; c < chunks; ++c) {
      const float* s = src.data() + (b * chunks + c) * n;
      for (int64_t i = 0; i < n; ++i) o[i] += s[i];
    }
  }
}

template <class T>
void bwd(const T* dxo, const T* dh, const T* x, const T* y, const T* wy, const T* gate, const T* wn, const T* sn,
         const float* rstd_y, const float* rstd_x, T* dx, T* dy, float* dyw, float* dgate, float* dnw, float* dns,
         int64_t batch, int64_t t, int64_t n) {
  const bool vec = use_avx2(), next = wn != nullptr;
  const int64_t chunks = rms_norm_modulate::chunks_per_batch(batch, t, rms_norm::kMaxPartials);
  const int64_t units = batch * chunks;
  const int64_t groups = std::min(units, rms_norm::kMaxPartials);
  // Partial rows: per group for y_weight / next_weight, per unit for gate / next_scale (when a
  // batch is one unit, its gate / next_scale rows are written in place instead).
  std::vector<float> wpart_y(static_cast<size_t>(groups * n), 0.0f);
  std::vector<float> wpart_n(next ? wpart_y.size() : 0, 0.0f);
  std::vector<float> spart_g(chunks > 1 ? static_cast<size_t>(units * n) : 0, 0.0f);
  std::vector<float> spart_s(next ? spart_g.size() : 0, 0.0f);
  if (chunks == 1) {
    std::fill(dgate, dgate + batch * n, 0.0f);
    if (next) std::fill(dns, dns + batch * n, 0.0f);
  }
#pragma omp parallel if (batch * t * n > kParallelMin)
  {
    std::vector<float> scratch(static_cast<size_t>(n));
#pragma omp for schedule(static)
    for (int64_t grp = 0; grp < groups; ++grp) {
      float* wy_part = wpart_y.data() + grp * n;
      float* wn_part = next ? wpart_n.data() + grp * n : nullptr;
      for (int64_t u = split_point(units, groups, grp); u < split_point(units, groups, grp + 1); ++u) {
        const int64_t b = u / chunks, c = u % chunks;
        float* sg = chunks > 1 ? spart_g.data() + u * n : dgate + b * n;
        float* ss = !next ? nullptr : chunks > 1 ? spart_s.data() + u * n : dns + b * n;
        for (int64_t tt = split_point(t, chunks, c); tt < split_point(t, chunks, c + 1); ++tt) {
          const int64_t row = b * t + tt, o = row * n;
          const Row<T> r{x + o, y + o, wy, gate + b * n, wn, next ? sn + b * n : nullptr, n};
          const Grad<T> d{dxo + o, next ? dh + o : nullptr, dx + o, dy + o, wy_part, sg, wn_part, ss,
                          rstd_y[row], next ? rstd_x[row] : 0.0f};
          bwd_row(r, d, scratch.data(), vec);
        }
      }
    }
  }
  sum_partials(wpart_y, groups, n, dyw);
  if (next) sum_partials(wpart_n, groups, n, dnw);
  if (chunks > 1) {
    sum_batch_partials(spart_g, batch, chunks, n, dgate);
    if (next) sum_batch_partials(spart_s, batch, chunks, n, dns);
  }
}

}  // namespace

void gated_residual_norm_fwd(const void* x, const void* y, const void* y_weight, const void* gate,
                             const void* next_weight, const void* next_scale, void* x_out, void* h, float* rstd_y,
                             float* rstd_x, int64_t batch, int64_t t, int64_t n, float eps, DType dt) {
  visit_host_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    fwd(static_cast<const T*>(x), static_cast<const T*>(y), static_cast<const T*>(y_weight),
        static_cast<const T*>(gate), static_cast<const T*>(next_weight), static_cast<const T*>(next_scale),
        static_cast<T*>(x_out), static_cast<T*>(h), rstd_y, rstd_x, batch, t, n, eps);
  });
}

void gated_residual_norm_bwd(const void* dxo, const void* dh, const void* x, const void* y, const void* y_weight,
                             const void* gate, const void* next_weight, const void* next_scale, const float* rstd_y,
                             const float* rstd_x, void* dx, void* dy, float* dy_weight, float* dgate,
                             float* dnext_weight, float* dnext_scale, int64_t batch, int64_t t, int64_t n, DType dt) {
  visit_host_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    bwd(static_cast<const T*>(dxo), static_cast<const T*>(dh), static_cast<const T*>(x), static_cast<const T*>(y),
        static_cast<const T*>(y_weight), static_cast<const T*>(gate), static_cast<const T*>(next_weight),
        static_cast<const T*>(next_scale), rstd_y, rstd_x, static_cast<T*>(dx), static_cast<T*>(dy), dy_weight, dgate,
        dnext_weight, dnext_scale, batch, t, n);
  });
}

}  // namespace blip3o::cpu
