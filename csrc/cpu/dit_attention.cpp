// Fused DiT attention CPU kernel. Math: csrc/include/blip3o/dit_attention.h; contract:
// python/blip3o_fast/ops/dit_attention.py. Everything runs in fp32 and rounds once at the store.
//
// Prep (tokens in parallel): q is LayerNormed over its token's Hq*D row, rotated and scaled by 1/sqrt(D)
// once into `qs` (B, Hq, Tq, D); k likewise (LayerNorm and RoPE optional) into `kt` (B, Hkv, D, TkP), keys
// innermost so score tiles vectorise across keys; v into `vr` (B, Hkv, TkP, DP). TkP and DP round Tk and
// D up to 16 with zeros, and a per-key bias (0 or -inf) masks padding and key_mask alike.
// Forward: tasks (batch, head, block of kRows queries), flash style: score tiles of kRows x kKeys, an
// online softmax, O += P V, so no Tq x Tk matrix exists. Backward: tasks (batch, kv head) own every
// query head of their group, so dK/dV accumulate in per-thread scratch with no partials and dQ rows are
// written by one task each; then LayerNorm/RoPE backward per token with the weight/bias/gate gradients
// summed from partials fixed by the shape (deterministic). Micro-kernels: 4 rows x 16 columns of fp32
// accumulators, AVX2/FMA or a scalar loop picked at run time.
#include <algorithm>
#include <cmath>
#include <vector>

#include "blip3o/dit_attention.h"
#include "cpu/kernels.h"
#include "cpu/reduce.h"
#include "cpu/vec_avx2.h"

namespace blip3o::cpu {

namespace {

namespace da = dit_attention;

constexpr int64_t kRows = 32;  // queries per block, a multiple of 4
constexpr int64_t kKeys = 64;  // keys per score tile, a multiple of 16

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- micro-kernels (m a multiple of 4, n / dp multiples of 16) ----

// c[i*ldc + j] = sum_d a[i*lda + d] * bt[d*ldb + j] for i < m, j < n.
void scores_scalar(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t d, float* c, int64_t ldc,
                   int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i) {
    float* ci = c + i * ldc;
    std::fill(ci, ci + n, 0.0f);
    for (int64_t k = 0; k < d; ++k) {
      const float av = a[i * lda + k];
      const float* b = bt + k * ldb;
      for (int64_t j = 0; j < n; ++j) ci[j] += av * b[j];
    }
  }
}

BLIP3O_AVX2 void scores_avx2(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t d, float* c,
                             int64_t ldc, int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; i += 4) {
    const float* a0 = a + i * lda;
    for (int64_t j = 0; j < n; j += 16) {
      __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
      const float* b = bt + j;
      for (int64_t k = 0; k < d; ++k, b += ldb) {
        const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        __m256 av = _mm256_broadcast_ss(a0 + k);
        c00 = _mm256_fmadd_ps(av, b0, c00);
        c01 = _mm256_fmadd_ps(av, b1, c01);
        av = _mm256_broadcast_ss(a0 + lda + k);
        c10 = _mm256_fmadd_ps(av, b0, c10);
        c11 = _mm256_fmadd_ps(av, b1, c11);
        av = _mm256_broadcast_ss(a0 + 2 * lda + k);
        c20 = _mm256_fmadd_ps(av, b0, c20);
        c21 = _mm256_fmadd_ps(av, b1, c21);
        av = _mm256_broadcast_ss(a0 + 3 * lda + k);
        c30 = _mm256_fmadd_ps(av, b0, c30);
        c31 = _mm256_fmadd_ps(av, b1, c31);
      }
      float* ci = c + i * ldc + j;
      _mm256_storeu_ps(ci, c00);
      _mm256_storeu_ps(ci + 8, c01);
      _mm256_storeu_ps(ci + ldc, c10);
      _mm256_storeu_ps(ci + ldc + 8, c11);
      _mm256_storeu_ps(ci + 2 * ldc, c20);
      _mm256_storeu_ps(ci + 2 * ldc + 8, c21);
      _mm256_storeu_ps(ci + 3 * ldc, c30);
      _mm256_storeu_ps(ci + 3 * ldc + 8, c31);
    }
  }
}

// c[i*ldc + e] += sum_k p[i*prs + k*pks] * v[k*ldv + e] for i < m, e < dp. Strides let one kernel do
// P V and dS K (pks = 1) as well as P^T dO and dS^T Q (prs = 1).
void accum_scalar(const float* p, int64_t prs, int64_t pks, const float* v, int64_t ldv, int64_t m, int64_t kn,
                  float* c, int64_t ldc, int64_t dp) {
  for (int64_t i = 0; i < m; ++i) {
    float* ci = c + i * ldc;
    for (int64_t k = 0; k < kn; ++k) {
      const float pv = p[i * prs + k * pks];
      const float* vk = v + k * ldv;
      for (int64_t e = 0; e < dp; ++e) ci[e] += pv * vk[e];
    }
  }
}

BLIP3O_AVX2 void accum_avx2(const float* p, int64_t prs, int64_t pks, const float* v, int64_t ldv, int64_t m,
                            int64_t kn, float* c, int64_t ldc, int64_t dp) {
  for (int64_t i = 0; i < m; i += 4) {
    const float* p0 = p + i * prs;
    for (int64_t e = 0; e < dp; e += 16) {
      float* ci = c + i * ldc + e;
      __m256 c00 = _mm256_loadu_ps(ci), c01 = _mm256_loadu_ps(ci + 8);
      __m256 c10 = _mm256_loadu_ps(ci + ldc), c11 = _mm256_loadu_ps(ci + ldc + 8);
      __m256 c20 = _mm256_loadu_ps(ci + 2 * ldc), c21 = _mm256_loadu_ps(ci + 2 * ldc + 8);
      __m256 c30 = _mm256_loadu_ps(ci + 3 * ldc), c31 = _mm256_loadu_ps(ci + 3 * ldc + 8);
      const float* vk = v + e;
      for (int64_t k = 0; k < kn; ++k, vk += ldv) {
        const __m256 v0 = _mm256_loadu_ps(vk), v1 = _mm256_loadu_ps(vk + 8);
        const float* pk = p0 + k * pks;
        __m256 pv = _mm256_broadcast_ss(pk);
        c00 = _mm256_fmadd_ps(pv, v0, c00);
        c01 = _mm256_fmadd_ps(pv, v1, c01);
        pv = _mm256_broadcast_ss(pk + prs);
        c10 = _mm256_fmadd_ps(pv, v0, c10);
        c11 = _mm256_fmadd_ps(pv, v1, c11);
        pv = _mm256_broadcast_ss(pk + 2 * prs);
        c20 = _mm256_fmadd_ps(pv, v0, c20);
        c21 = _mm256_fmadd_ps(pv, v1, c21);
        pv = _mm256_broadcast_ss(pk + 3 * prs);
        c30 = _mm256_fmadd_ps(pv, v0, c30);
        c31 = _mm256_fmadd_ps(pv, v1, c31);
      }
      _mm256_storeu_ps(ci, c00);
      _mm256_storeu_ps(ci + 8, c01);
      _mm256_storeu_ps(ci + ldc, c10);
      _mm256_storeu_ps(ci + ldc + 8, c11);
      _mm256_storeu_ps(ci + 2 * ldc, c20);
      _mm256_storeu_ps(ci + 2 * ldc + 8, c21);
      _mm256_storeu_ps(ci + 3 * ldc, c30);
      _mm256_storeu_ps(ci + 3 * ldc + 8, c31);
    }
  }
}

// Online-softmax step of one score row s[0, n) (n a multiple of 16), bias added: running max m and sum l
// update, s becomes the unnormalised probabilities; returns the factor the row's O must be scaled by.
float softmax_step_scalar(float* s, const float* bias, int64_t n, float& m, float& l) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j] += bias[j]);
  const float m_new = std::max(m, mx);
  if (m_new == -INFINITY) {  // every key so far masked: nothing to add
    std::fill(s, s + n, 0.0f);
    return 1.0f;
  }
  const float alpha = da::online_rescale(m, m_new);
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) sum += s[j] = da::prob(s[j], m_new);
  l = l * alpha + sum;
  m = m_new;
  return alpha;
}

// exp(x - sub) per lane, 0 where x is -inf (masked keys), so no tiny exp(-104) leaks through.
BLIP3O_AVX2 inline __m256 masked_exp(__m256 x, __m256 sub) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
  return _mm256_and_ps(keep, avx2::exp(_mm256_sub_ps(x, sub)));
}

BLIP3O_AVX2 float softmax_step_avx2(float* s, const float* bias, int64_t n, float& m, float& l) {
  __m256 mx = _mm256_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 x = _mm256_add_ps(_mm256_loadu_ps(s + j), _mm256_loadu_ps(bias + j));
    _mm256_storeu_ps(s + j, x);
    mx = _mm256_max_ps(mx, x);
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float m_new = std::max(m, _mm_cvtss_f32(h));
  if (m_new == -INFINITY) {
    std::fill(s, s + n, 0.0f);
    return 1.0f;
  }
  const float alpha = da::online_rescale(m, m_new);
  const __m256 mv = _mm256_set1_ps(m_new);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 p = masked_exp(_mm256_loadu_ps(s + j), mv);
    _mm256_storeu_ps(s + j, p);
    acc = _mm256_add_ps(acc, p);
  }
  l = l * alpha + avx2::hsum(acc);
  m = m_new;
  return alpha;
}

// Backward row: s (scores, bias not yet added) becomes P = exp(s + bias - lse) and dp becomes
// dS = P * (dP - delta).
void grad_row_scalar(float* s, float* dp, const float* bias, int64_t n, float lse, float delta) {
  for (int64_t j = 0; j < n; ++j) {
    const float p = da::prob(s[j] + bias[j], lse);
    s[j] = p;
    dp[j] = da::grad_score(p, dp[j], delta);
  }
}

BLIP3O_AVX2 void grad_row_avx2(float* s, float* dp, const float* bias, int64_t n, float lse, float delta) {
  if (lse == -INFINITY) {  // fully masked query (or a padding row): no gradient flows
    std::fill(s, s + n, 0.0f);
    std::fill(dp, dp + n, 0.0f);
    return;
  }
  const __m256 lv = _mm256_set1_ps(lse), dv = _mm256_set1_ps(delta);
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 p = masked_exp(_mm256_add_ps(_mm256_loadu_ps(s + j), _mm256_loadu_ps(bias + j)), lv);
    _mm256_storeu_ps(s + j, p);
    _mm256_storeu_ps(dp + j, _mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dp + j), dv)));
  }
}

struct Kernels {
  bool vec;
  void scores(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t d, float* c, int64_t ldc,
              int64_t m, int64_t n) const {
    vec ? scores_avx2(a, lda, bt, ldb, d, c, ldc, m, n) : scores_scalar(a, lda, bt, ldb, d, c, ldc, m, n);
  }
  void accum(const float* p, int64_t prs, int64_t pks, const float* v, int64_t ldv, int64_t m, int64_t kn,
             float* c, int64_t ldc, int64_t dp) const {
    vec ? accum_avx2(p, prs, pks, v, ldv, m, kn, c, ldc, dp) : accum_scalar(p, prs, pks, v, ldv, m, kn, c, ldc, dp);
  }
  float softmax_step(float* s, const float* bias, int64_t n, float& m, float& l) const {
    return vec ? softmax_step_avx2(s, bias, n, m, l) : softmax_step_scalar(s, bias, n, m, l);
  }
  void grad_row(float* s, float* dp, const float* bias, int64_t n, float lse, float delta) const {
    vec ? grad_row_avx2(s, dp, bias, n, lse, delta) : grad_row_scalar(s, dp, bias, n, lse, delta);
  }
};

// ---- prep: normalised, rotated operands in fp32 ----

// Mean and rstd of one token's n values (two passes in double: the row is short, the sum exact enough).
template <class T>
void ln_stats(const T* x, int64_t n, float& mean, float& rstd) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += to_f32(x[i]);
  const double mu = s / static_cast<double>(n);
  double v = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double c = to_f32(x[i]) - mu;
    v += c * c;
  }
  mean = static_cast<float>(mu);
  rstd = da::ln_rstd(static_cast<float>(v / static_cast<double>(n)));
}

struct Layout {
  int64_t b, tq, tk, hq, hkv, d, half, tkp, dp, rep;
  float scale;
  explicit Layout(const da::Dims& s)
      : b(s.b), tq(s.tq), tk(s.tk), hq(s.hq), hkv(s.hkv), d(s.d), half(s.d / 2), tkp(round_up(s.tk, 16)),
        dp(round_up(s.d, 16)), rep(s.hq / s.hkv), scale(1.0f / std::sqrt(static_cast<float>(s.d))) {}
  size_t kv_size() const { return static_cast<size_t>(b * hkv * tkp * dp); }
};

struct Prepared {
  std::vector<float> qs, kt, kr, vr, vt, bias, q_mean, q_rstd, k_mean, k_rstd;
};

// One token row x (H*D values) into normalised (optional), rotated (optional) fp32 values, head by head,
// passed to put(head, channel, value). cos/sin: the token's D/2 angles (nullptr: no rotation).
template <class T, class Put>
void norm_rotate_row(const T* x, const T* w, const T* bias, float mean, float rstd, const float* c, const float* s,
                     int64_t heads, int64_t d, float mul, Put&& put) {
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t i = 0; i < d / 2; ++i) {
      const int64_t ia = h * d + 2 * i, ib = ia + 1;
      float a = to_f32(x[ia]), b = to_f32(x[ib]);
      if (w != nullptr) {
        a = da::ln_apply(a, mean, rstd, to_f32(w[ia]), to_f32(bias[ia]));
        b = da::ln_apply(b, mean, rstd, to_f32(w[ib]), to_f32(bias[ib]));
      }
      if (c != nullptr) {
        const float ra = rope::rotate_a(a, b, c[i], s[i]), rb = rope::rotate_b(a, b, c[i], s[i]);
        a = ra;
        b = rb;
      }
      put(h, 2 * i, a * mul);
      put(h, 2 * i + 1, b * mul);
    }
  }
}

// Fills qs, kt, vr and the key bias; for the backward also kr (row-major kn) and vt (transposed v), and
// keeps the LayerNorm statistics.
template <class T>
Prepared prepare(const Layout& L, const T* q, const T* k, const T* v, const T* qw, const T* qb, const T* kw,
                 const T* kb, const float* cos, const float* sin, const bool* key_mask, bool rope_k, bool bwd) {
  Prepared P;
  P.qs.assign(static_cast<size_t>(L.b * L.hq * L.tq * L.d), 0.0f);
  P.kt.assign(L.kv_size(), 0.0f);  // (D, TkP) per head: D * TkP <= TkP * DP
  P.vr.assign(L.kv_size(), 0.0f);
  if (bwd) {
    P.kr.assign(L.kv_size(), 0.0f);
    P.vt.assign(L.kv_size(), 0.0f);
  }
  P.q_mean.resize(L.b * L.tq);
  P.q_rstd.resize(L.b * L.tq);
  P.k_mean.assign(L.b * L.tk, 0.0f);
  P.k_rstd.assign(L.b * L.tk, 1.0f);
  P.bias.assign(static_cast<size_t>(L.b * L.tkp), -INFINITY);
  const int64_t nq = L.hq * L.d, nk = L.hkv * L.d;
  const int64_t ktile = L.d * L.tkp, vtile = L.tkp * L.dp;
#pragma omp parallel for schedule(static) if (L.b * L.tq * nq > kParallelMin)
  for (int64_t r = 0; r < L.b * L.tq; ++r) {
    const int64_t bi = r / L.tq, t = r % L.tq;
    ln_stats(q + r * nq, nq, P.q_mean[r], P.q_rstd[r]);
    float* dst = P.qs.data() + bi * L.hq * L.tq * L.d + t * L.d;
    norm_rotate_row(q + r * nq, qw, qb, P.q_mean[r], P.q_rstd[r], cos + r * L.half, sin + r * L.half, L.hq, L.d,
                    L.scale, [&](int64_t h, int64_t e, float val) { dst[h * L.tq * L.d + e] = val; });
  }
#pragma omp parallel for schedule(static) if (L.b * L.tk * nk > kParallelMin)
  for (int64_t r = 0; r < L.b * L.tk; ++r) {
    const int64_t bi = r / L.tk, j = r % L.tk;
    if (kw != nullptr) ln_stats(k + r * nk, nk, P.k_mean[r], P.k_rstd[r]);
    P.bias[bi * L.tkp + j] = key_mask == nullptr || key_mask[r] ? 0.0f : -INFINITY;
    // With rope_k, Tk == Tq, so key row r uses the same angles as query row r.
    const float* c = rope_k ? cos + r * L.half : nullptr;
    const float* s = rope_k ? sin + r * L.half : nullptr;
    float* kt = P.kt.data() + bi * L.hkv * ktile;
    float* kr = bwd ? P.kr.data() + bi * L.hkv * vtile : nullptr;
    norm_rotate_row(k + r * nk, kw, kb, P.k_mean[r], P.k_rstd[r], c, s, L.hkv, L.d, 1.0f,
                    [&](int64_t g, int64_t e, float val) {
                      kt[g * ktile + e * L.tkp + j] = val;
                      if (kr != nullptr) kr[g * vtile + j * L.dp + e] = val;
                    });
    float* vr = P.vr.data() + bi * L.hkv * vtile;
    float* vt = bwd ? P.vt.data() + bi * L.hkv * ktile : nullptr;
    for (int64_t g = 0; g < L.hkv; ++g)
      for (int64_t e = 0; e < L.d; ++e) {
        const float val = to_f32(v[r * nk + g * L.d + e]);
        vr[g * vtile + j * L.dp + e] = val;
        if (vt != nullptr) vt[g * ktile + e * L.tkp + j] = val;
      }
  }
  return P;
}

// ---- forward ----

template <class T>
void fwd(const da::FwdArgs& a, const da::Dims& dims) {
  const Layout L(dims);
  const Kernels K{use_avx2()};
  const T* gate = static_cast<const T*>(a.gate);
  const T* res = static_cast<const T*>(a.residual);
  T* out = static_cast<T*>(a.out);
  T* out_ungated = static_cast<T*>(a.out_ungated);
  const Prepared P = prepare<T>(L, static_cast<const T*>(a.q), static_cast<const T*>(a.k), static_cast<const T*>(a.v),
                                static_cast<const T*>(a.q_weight), static_cast<const T*>(a.q_bias),
                                static_cast<const T*>(a.k_weight), static_cast<const T*>(a.k_bias), a.cos, a.sin,
                                a.key_mask, a.rope_k, false);
  const int64_t qblocks = (L.tq + kRows - 1) / kRows;
  const int64_t tasks = L.b * L.hq * qblocks;
#pragma omp parallel if (tasks > 1 && L.tq * L.tk * L.d * L.hq * L.b > kParallelMin)
  {
    std::vector<float> qblk(kRows * L.dp, 0.0f), sc(kRows * kKeys), acc(kRows * L.dp), m(kRows), l(kRows);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t bi = task / (L.hq * qblocks), h = task / qblocks % L.hq, i0 = task % qblocks * kRows;
      const int64_t rows = std::min(kRows, L.tq - i0), mp = round_up(rows, 4), g = h / L.rep;
      const float* qsrc = P.qs.data() + ((bi * L.hq + h) * L.tq + i0) * L.d;
      for (int64_t r = 0; r < mp; ++r)
        for (int64_t e = 0; e < L.d; ++e) qblk[r * L.dp + e] = r < rows ? qsrc[r * L.d + e] : 0.0f;
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.0f);
      const float* kt = P.kt.data() + (bi * L.hkv + g) * L.d * L.tkp;
      const float* vr = P.vr.data() + (bi * L.hkv + g) * L.tkp * L.dp;
      const float* bias = P.bias.data() + bi * L.tkp;
      for (int64_t j0 = 0; j0 < L.tkp; j0 += kKeys) {
        const int64_t nk = std::min(kKeys, L.tkp - j0);
        K.scores(qblk.data(), L.dp, kt + j0, L.tkp, L.d, sc.data(), kKeys, mp, nk);
        for (int64_t r = 0; r < mp; ++r) {
          const float alpha = K.softmax_step(sc.data() + r * kKeys, bias + j0, nk, m[r], l[r]);
          if (alpha != 1.0f)
            for (int64_t e = 0; e < L.dp; ++e) acc[r * L.dp + e] *= alpha;
        }
        K.accum(sc.data(), kKeys, 1, vr + j0 * L.dp, L.dp, mp, nk, acc.data(), L.dp, L.dp);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        a.lse[(bi * L.hq + h) * L.tq + i] = da::row_lse(m[r], l[r]);
        const int64_t o = ((bi * L.tq + i) * L.hq + h) * L.d;
        const float t = gate != nullptr ? da::gate_factor(to_f32(gate[h])) : 1.0f;
        for (int64_t e = 0; e < L.d; ++e) {
          const float ov = l[r] > 0.0f ? acc[r * L.dp + e] / l[r] : 0.0f;
          if (out_ungated != nullptr) out_ungated[o + e] = from_f32<T>(ov);
          out[o + e] = from_f32<T>(da::gated(ov, t, res != nullptr ? to_f32(res[o + e]) : 0.0f));
        }
      }
    }
  }
}

// ---- backward ----

// Gradient w.r.t. one token's x from the gradient y (fp32, H*D values, RoPE already undone) of its
// LayerNorm output: dx, and the weight/bias partial sums. Without a weight (k not normalised) dx = y.
template <class T>
void ln_backward_row(const float* y, const T* x, const T* w, float mean, float rstd, int64_t n, T* dx, float* dw,
                     float* db) {
  if (w == nullptr) {
    for (int64_t e = 0; e < n; ++e) dx[e] = from_f32<T>(y[e]);
    return;
  }
  double sg = 0.0, sgx = 0.0;
  for (int64_t e = 0; e < n; ++e) {
    const float g = y[e] * to_f32(w[e]), xhat = (to_f32(x[e]) - mean) * rstd;
    sg += g;
    sgx += static_cast<double>(g) * xhat;
  }
  const float mg = static_cast<float>(sg / n), mgx = static_cast<float>(sgx / n);
  for (int64_t e = 0; e < n; ++e) {
    const float xhat = (to_f32(x[e]) - mean) * rstd;
    dx[e] = from_f32<T>(da::ln_grad_x(y[e] * to_f32(w[e]), xhat, mg, mgx, rstd));
    dw[e] += y[e] * xhat;
    db[e] += y[e];
  }
}

// Undoes the interleaved rotation of a token's H*D gradient row in place (rotation by -angle).
void unrotate_row(float* y, const float* c, const float* s, int64_t heads, int64_t d) {
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < d / 2; ++i) {
      float* p = y + h * d + 2 * i;
      const float a = p[0], b = p[1];
      p[0] = rope::rotate_a(a, b, c[i], -s[i]);
      p[1] = rope::rotate_b(a, b, c[i], -s[i]);
    }
}

// LayerNorm/RoPE backward over `rows` token rows of n = heads * d values, from dy (fp32) into dx; the
// weight/bias gradients (when w is given) and, for the query side, the gate's sum(dout * o) per head are
// summed from per-chunk partials in chunk order. dgate_dot: (heads) fp32 or nullptr.
template <class T>
void token_backward(const Layout& L, std::vector<float>& dy, const T* x, const T* w, const float* mean,
                    const float* rstd, const float* cos, const float* sin, int64_t rows, int64_t heads, T* dx,
                    float* dw, float* db, const T* dout, const T* o, float* dgate_dot) {
  const int64_t n = heads * L.d;
  const int64_t parts = std::max<int64_t>(1, std::min(rows, da::kMaxPartials));
  const int64_t width = 2 * n + heads;  // dw | db | gate dot
  std::vector<float> part(static_cast<size_t>(parts * width), 0.0f);
#pragma omp parallel for schedule(static) if (rows * n > kParallelMin)
  for (int64_t p = 0; p < parts; ++p) {
    float* pw = part.data() + p * width;
    for (int64_t r = split_point(rows, parts, p); r < split_point(rows, parts, p + 1); ++r) {
      float* y = dy.data() + r * n;
      if (cos != nullptr) unrotate_row(y, cos + r * L.half, sin + r * L.half, heads, L.d);
      ln_backward_row(y, x + r * n, w, mean[r], rstd[r], n, dx + r * n, pw, pw + n);
      if (dgate_dot != nullptr)
        for (int64_t h = 0; h < heads; ++h) {
          float s = 0.0f;
          for (int64_t e = h * L.d; e < (h + 1) * L.d; ++e) s += to_f32(dout[r * n + e]) * to_f32(o[r * n + e]);
          pw[2 * n + h] += s;
        }
    }
  }
  std::vector<float> total(static_cast<size_t>(width));
  sum_partials(part, parts, width, total.data());
  if (w != nullptr) {
    std::copy(total.begin(), total.begin() + n, dw);
    std::copy(total.begin() + n, total.begin() + 2 * n, db);
  }
  if (dgate_dot != nullptr) std::copy(total.begin() + 2 * n, total.end(), dgate_dot);
}

template <class T>
void bwd(const da::BwdArgs& a, const da::Dims& dims) {
  const Layout L(dims);
  const Kernels K{use_avx2()};
  const T* dout = static_cast<const T*>(a.dout);
  const T* o = static_cast<const T*>(a.out_ungated);
  const T* gate = static_cast<const T*>(a.gate);
  const T* kw = static_cast<const T*>(a.k_weight);
  const Prepared P = prepare<T>(L, static_cast<const T*>(a.q), static_cast<const T*>(a.k),
                                static_cast<const T*>(a.v), static_cast<const T*>(a.q_weight),
                                static_cast<const T*>(a.q_bias), kw,
                                static_cast<const T*>(a.k_bias), a.cos, a.sin, a.key_mask, a.rope_k, true);
  std::vector<float> dqn(static_cast<size_t>(L.b * L.tq * L.hq * L.d));   // (B, Tq, Hq, D)
  std::vector<float> dkn(static_cast<size_t>(L.b * L.tk * L.hkv * L.d));  // (B, Tk, Hkv, D)
  T* dv = static_cast<T*>(a.dv);
  const int64_t tasks = L.b * L.hkv;
#pragma omp parallel if (tasks > 1 && L.tq * L.tk * L.d * L.hq * L.b > kParallelMin)
  {
    std::vector<float> qblk(kRows * L.dp, 0.0f), doblk(kRows * L.dp, 0.0f), sc(kRows * kKeys), dp(kRows * kKeys);
    std::vector<float> dq(kRows * L.dp), lse(kRows), delta(kRows);
    std::vector<float> dk(static_cast<size_t>(L.tkp * L.dp)), dvacc(static_cast<size_t>(L.tkp * L.dp));
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t bi = task / L.hkv, g = task % L.hkv;
      std::fill(dk.begin(), dk.end(), 0.0f);
      std::fill(dvacc.begin(), dvacc.end(), 0.0f);
      const float* kt = P.kt.data() + (bi * L.hkv + g) * L.d * L.tkp;
      const float* kr = P.kr.data() + (bi * L.hkv + g) * L.tkp * L.dp;
      const float* vt = P.vt.data() + (bi * L.hkv + g) * L.d * L.tkp;
      const float* bias = P.bias.data() + bi * L.tkp;
      for (int64_t h = g * L.rep; h < (g + 1) * L.rep; ++h) {
        const float t = gate != nullptr ? da::gate_factor(to_f32(gate[h])) : 1.0f;
        for (int64_t i0 = 0; i0 < L.tq; i0 += kRows) {
          const int64_t rows = std::min(kRows, L.tq - i0), mp = round_up(rows, 4);
          const float* qsrc = P.qs.data() + ((bi * L.hq + h) * L.tq + i0) * L.d;
          for (int64_t r = 0; r < mp; ++r) {
            const int64_t tok = ((bi * L.tq + i0 + r) * L.hq + h) * L.d;
            float dsum = 0.0f;
            for (int64_t e = 0; e < L.d; ++e) {
              const bool in = r < rows;
              qblk[r * L.dp + e] = in ? qsrc[r * L.d + e] : 0.0f;
              const float dov = in ? to_f32(dout[tok + e]) * t : 0.0f;
              doblk[r * L.dp + e] = dov;
              if (in) dsum += dov * to_f32(o[tok + e]);
            }
            delta[r] = dsum;
            lse[r] = r < rows ? a.lse[(bi * L.hq + h) * L.tq + i0 + r] : -INFINITY;
          }
          std::fill(dq.begin(), dq.end(), 0.0f);
          for (int64_t j0 = 0; j0 < L.tkp; j0 += kKeys) {
            const int64_t nk = std::min(kKeys, L.tkp - j0);
            K.scores(qblk.data(), L.dp, kt + j0, L.tkp, L.d, sc.data(), kKeys, mp, nk);
            K.scores(doblk.data(), L.dp, vt + j0, L.tkp, L.d, dp.data(), kKeys, mp, nk);
            for (int64_t r = 0; r < mp; ++r)
              K.grad_row(sc.data() + r * kKeys, dp.data() + r * kKeys, bias + j0, nk, lse[r], delta[r]);
            K.accum(sc.data(), 1, kKeys, doblk.data(), L.dp, nk, mp, dvacc.data() + j0 * L.dp, L.dp, L.dp);
            K.accum(dp.data(), 1, kKeys, qblk.data(), L.dp, nk, mp, dk.data() + j0 * L.dp, L.dp, L.dp);
            K.accum(dp.data(), kKeys, 1, kr + j0 * L.dp, L.dp, mp, nk, dq.data(), L.dp, L.dp);
          }
          for (int64_t r = 0; r < rows; ++r) {
            float* dst = dqn.data() + ((bi * L.tq + i0 + r) * L.hq + h) * L.d;
            for (int64_t e = 0; e < L.d; ++e) dst[e] = dq[r * L.dp + e] * L.scale;
          }
        }
      }
      for (int64_t j = 0; j < L.tk; ++j) {
        const int64_t tok = ((bi * L.tk + j) * L.hkv + g) * L.d;
        for (int64_t e = 0; e < L.d; ++e) {
          dkn[tok + e] = dk[j * L.dp + e];
          dv[tok + e] = from_f32<T>(dvacc[j * L.dp + e]);
        }
      }
    }
  }
  std::vector<float> gdot(a.dgate != nullptr ? L.hq : 0);
  token_backward<T>(L, dqn, static_cast<const T*>(a.q), static_cast<const T*>(a.q_weight), P.q_mean.data(),
                    P.q_rstd.data(), a.cos, a.sin, L.b * L.tq, L.hq, static_cast<T*>(a.dq), a.dq_weight, a.dq_bias,
                    dout, o, a.dgate != nullptr ? gdot.data() : nullptr);
  for (int64_t h = 0; a.dgate != nullptr && h < L.hq; ++h)
    a.dgate[h] = gdot[h] * da::gate_grad_scale(da::gate_factor(to_f32(gate[h])));
  token_backward<T>(L, dkn, static_cast<const T*>(a.k), kw, P.k_mean.data(), P.k_rstd.data(),
                    a.rope_k ? a.cos : nullptr, a.rope_k ? a.sin : nullptr, L.b * L.tk, L.hkv,
                    static_cast<T*>(a.dk), a.dk_weight, a.dk_bias, static_cast<const T*>(nullptr),
                    static_cast<const T*>(nullptr), nullptr);
}

}  // namespace

void dit_attention_fwd(const dit_attention::FwdArgs& args, const dit_attention::Dims& dims, DType dt) {
  visit_host_dtype(dt, [&](auto tag) { fwd<decltype(tag)>(args, dims); });
}

void dit_attention_bwd(const dit_attention::BwdArgs& args, const dit_attention::Dims& dims, DType dt) {
  visit_host_dtype(dt, [&](auto tag) { bwd<decltype(tag)>(args, dims); });
}

}  // namespace blip3o::cpu
