// Fused linear + cross-entropy CPU kernel. Math: csrc/include/blip3o/linear_cross_entropy.h; contract:
// python/blip3o_fast/ops/linear_cross_entropy.py. The (N, V) logits never exist: only a tile of them.
//
// Forward and dhidden (OpenMP over row tiles of kRowTile rows): the row tile of hidden is packed once,
// transposed into 16-column panels (fp32, zero-padded); then for each vocab tile of kVocabTile rows of
// W (converted to fp32 rows) the logit tile C[v][m] = W_v . h_m is one GEMM, folded into the rows'
// online log-sum-exp (forward), or turned into dlogits D[v][m] and accumulated as dH[m] += sum_v D[v][m] W_v.
// dweight (OpenMP over vocab tiles): the vocab tile of W is packed once into panels; for each row tile
// the logits C[m][v] are recomputed and dW[v] += sum_m D[m][v] h_m. Each tile owns its output rows, so
// there are no atomics and every sum runs in a fixed order (deterministic for any thread count).
// Micro-kernels: 4 x 16 fp32 accumulators, AVX2/FMA or a scalar loop picked at run time.
#include <algorithm>
#include <cmath>
#include <vector>

#include "blip3o/linear_cross_entropy.h"
#include "cpu/kernels.h"
#include "cpu/vec_avx2.h"

namespace blip3o::cpu {

namespace {

namespace lce = linear_cross_entropy;

constexpr int64_t kRowTile = 128;   // rows of hidden per task (a multiple of 16)
constexpr int64_t kVocabTile = 64;  // rows of W per tile (a multiple of 16)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- GEMM micro-kernels (m a multiple of 4, n a multiple of 16) ----

// c[i*ldc + j] = sum_{k < kn} a[i*lda + k] * panel(j)[k] for i < m, j < n, where bp holds 16-column
// panels one after another: element (k, j) at bp[(j / 16) * kn * 16 + k * 16 + j % 16].
void gemm_panel_scalar(const float* a, int64_t lda, const float* bp, int64_t kn, float* c, int64_t ldc, int64_t m,
                       int64_t n) {
  for (int64_t s = 0; s < n / 16; ++s) {
    const float* b = bp + s * kn * 16;
    for (int64_t i = 0; i < m; ++i) {
      float acc[16] = {};
      const float* ai = a + i * lda;
      for (int64_t k = 0; k < kn; ++k)
        for (int64_t j = 0; j < 16; ++j) acc[j] += ai[k] * b[k * 16 + j];
      std::copy(acc, acc + 16, c + i * ldc + s * 16);
    }
  }
}

BLIP3O_AVX2 void gemm_panel_avx2(const float* a, int64_t lda, const float* bp, int64_t kn, float* c, int64_t ldc,
                                 int64_t m, int64_t n) {
  for (int64_t s = 0; s < n / 16; ++s) {
    const float* bs = bp + s * kn * 16;
    for (int64_t i = 0; i < m; i += 4) {
      const float *a0 = a + i * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
      __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
      const float* b = bs;
      for (int64_t k = 0; k < kn; ++k, b += 16) {
        const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        __m256 av = _mm256_broadcast_ss(a0 + k);
        c00 = _mm256_fmadd_ps(av, b0, c00);
        c01 = _mm256_fmadd_ps(av, b1, c01);
        av = _mm256_broadcast_ss(a1 + k);
        c10 = _mm256_fmadd_ps(av, b0, c10);
        c11 = _mm256_fmadd_ps(av, b1, c11);
        av = _mm256_broadcast_ss(a2 + k);
        c20 = _mm256_fmadd_ps(av, b0, c20);
        c21 = _mm256_fmadd_ps(av, b1, c21);
        av = _mm256_broadcast_ss(a3 + k);
        c30 = _mm256_fmadd_ps(av, b0, c30);
        c31 = _mm256_fmadd_ps(av, b1, c31);
      }
      float* ci = c + i * ldc + s * 16;
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

// out[i*ldo + j] += sum_{p < np} a[p*lda + i] * b[p*ldb + j] for i < m, j < n (a read transposed).
void gemm_acc_scalar(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t np, float* out, int64_t ldo,
                     int64_t m, int64_t n) {
  for (int64_t j0 = 0; j0 < n; j0 += 16)
    for (int64_t i = 0; i < m; ++i) {
      float acc[16];
      std::copy(out + i * ldo + j0, out + i * ldo + j0 + 16, acc);
      for (int64_t p = 0; p < np; ++p) {
        const float av = a[p * lda + i];
        const float* bp = b + p * ldb + j0;
        for (int64_t j = 0; j < 16; ++j) acc[j] += av * bp[j];
      }
      std::copy(acc, acc + 16, out + i * ldo + j0);
    }
}

BLIP3O_AVX2 void gemm_acc_avx2(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t np, float* out,
                               int64_t ldo, int64_t m, int64_t n) {
  for (int64_t j0 = 0; j0 < n; j0 += 16)  // the 16-column strip of b stays in L1 across all i
    for (int64_t i = 0; i < m; i += 4) {
      float* o = out + i * ldo + j0;
      __m256 c00 = _mm256_loadu_ps(o), c01 = _mm256_loadu_ps(o + 8);
      __m256 c10 = _mm256_loadu_ps(o + ldo), c11 = _mm256_loadu_ps(o + ldo + 8);
      __m256 c20 = _mm256_loadu_ps(o + 2 * ldo), c21 = _mm256_loadu_ps(o + 2 * ldo + 8);
      __m256 c30 = _mm256_loadu_ps(o + 3 * ldo), c31 = _mm256_loadu_ps(o + 3 * ldo + 8);
      const float* ap = a + i;
      const float* bp = b + j0;
      for (int64_t p = 0; p < np; ++p, ap += lda, bp += ldb) {
        const __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8);
        __m256 av = _mm256_broadcast_ss(ap);
        c00 = _mm256_fmadd_ps(av, b0, c00);
        c01 = _mm256_fmadd_ps(av, b1, c01);
        av = _mm256_broadcast_ss(ap + 1);
        c10 = _mm256_fmadd_ps(av, b0, c10);
        c11 = _mm256_fmadd_ps(av, b1, c11);
        av = _mm256_broadcast_ss(ap + 2);
        c20 = _mm256_fmadd_ps(av, b0, c20);
        c21 = _mm256_fmadd_ps(av, b1, c21);
        av = _mm256_broadcast_ss(ap + 3);
        c30 = _mm256_fmadd_ps(av, b0, c30);
        c31 = _mm256_fmadd_ps(av, b1, c31);
      }
      _mm256_storeu_ps(o, c00);
      _mm256_storeu_ps(o + 8, c01);
      _mm256_storeu_ps(o + ldo, c10);
      _mm256_storeu_ps(o + ldo + 8, c11);
      _mm256_storeu_ps(o + 2 * ldo, c20);
      _mm256_storeu_ps(o + 2 * ldo + 8, c21);
      _mm256_storeu_ps(o + 3 * ldo, c30);
      _mm256_storeu_ps(o + 3 * ldo + 8, c31);
    }
}

// ---- the logit-tile epilogues ----

// Columns m < mp of c (rows v < vn valid) folded into each column's running max / sum.
void lse_update_scalar(const float* c, int64_t ldc, int64_t vn, int64_t mp, float* run_max, float* run_sum) {
  for (int64_t m = 0; m < mp; ++m) {
    float mx = run_max[m];
    for (int64_t v = 0; v < vn; ++v) mx = std::max(mx, c[v * ldc + m]);
    float s = lce::rescale(run_sum[m], run_max[m], mx);
    for (int64_t v = 0; v < vn; ++v) s += expf(c[v * ldc + m] - mx);
    run_max[m] = mx;
    run_sum[m] = s;
  }
}

BLIP3O_AVX2 void lse_update_avx2(const float* c, int64_t ldc, int64_t vn, int64_t mp, float* run_max,
                                 float* run_sum) {
  for (int64_t m = 0; m < mp; m += 8) {
    const __m256 old = _mm256_loadu_ps(run_max + m);
    __m256 mx = old;
    for (int64_t v = 0; v < vn; ++v) mx = _mm256_max_ps(mx, _mm256_loadu_ps(c + v * ldc + m));
    __m256 s = _mm256_mul_ps(_mm256_loadu_ps(run_sum + m), avx2::exp(_mm256_sub_ps(old, mx)));
    for (int64_t v = 0; v < vn; ++v)
      s = _mm256_add_ps(s, avx2::exp(_mm256_sub_ps(_mm256_loadu_ps(c + v * ldc + m), mx)));
    _mm256_storeu_ps(run_max + m, mx);
    _mm256_storeu_ps(run_sum + m, s);
  }
}

// In place, logits -> exp(logit - lse) * g (the onehot term is subtracted by the caller), over a block of
// `outer` x `inner` with lse/g indexed by the inner index (per_inner) or by the outer one.
void softmax_grad_scalar(float* c, int64_t ldc, int64_t outer, int64_t inner, const float* lse, const float* g,
                         bool per_inner) {
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t i = 0; i < inner; ++i) {
      const int64_t r = per_inner ? i : o;
      c[o * ldc + i] = lce::dlogit(c[o * ldc + i], lse[r], g[r], false);
    }
}

BLIP3O_AVX2 void softmax_grad_avx2(float* c, int64_t ldc, int64_t outer, int64_t inner, const float* lse,
                                   const float* g, bool per_inner) {
  for (int64_t o = 0; o < outer; ++o) {
    float* row = c + o * ldc;
    const __m256 lo = _mm256_set1_ps(per_inner ? 0.0f : lse[o]), go = _mm256_set1_ps(per_inner ? 0.0f : g[o]);
    for (int64_t i = 0; i < inner; i += 8) {
      const __m256 l = per_inner ? _mm256_loadu_ps(lse + i) : lo;
      const __m256 gv = per_inner ? _mm256_loadu_ps(g + i) : go;
      _mm256_storeu_ps(row + i, _mm256_mul_ps(avx2::exp(_mm256_sub_ps(_mm256_loadu_ps(row + i), l)), gv));
    }
  }
}

// ---- conversions between the storage dtype and fp32 tiles ----

template <class T>
BLIP3O_AVX2 int64_t load_row_avx2(const T* s, int64_t h, float* d) {
  int64_t k = 0;
  for (; k + 8 <= h; k += 8) avx2::store8(d + k, avx2::load8(s + k));
  return k;
}

// dst[r * ldd + k] = src[r * h + k] as fp32 for r < rows, k < h; zero for k in [h, ldd) and rows in [rows, rows_pad).
template <class T>
void load_rows(const T* src, int64_t rows, int64_t h, int64_t rows_pad, int64_t ldd, float* dst, bool vec) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    float* d = dst + r * ldd;
    int64_t k = 0;
    if (r < rows) {
      const T* s = src + r * h;
      if (vec) k = load_row_avx2(s, h, d);
      for (; k < h; ++k) d[k] = to_f32(s[k]);
    }
    std::fill(d + k, d + ldd, 0.0f);
  }
}

// Rows of src (rows x h) transposed into 16-column panels of depth ldk: element (k, r) at
// dst[(r / 16) * ldk * 16 + k * 16 + r % 16], zero where r >= rows or k >= h; rows_pad a multiple of 16.
template <class T>
void load_panels(const T* src, int64_t rows, int64_t h, int64_t rows_pad, int64_t ldk, float* dst) {
  std::fill(dst, dst + rows_pad * ldk, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    float* d = dst + (r / 16) * ldk * 16 + r % 16;
    const T* s = src + r * h;
    for (int64_t k = 0; k < h; ++k) d[k * 16] = to_f32(s[k]);
  }
}

template <class T>
BLIP3O_AVX2 int64_t store_row_avx2(const float* s, int64_t h, T* d) {
  int64_t k = 0;
  for (; k + 8 <= h; k += 8) avx2::store8(d + k, _mm256_loadu_ps(s + k));
  return k;
}

// dst[r * h + k] = src[r * lds + k] rounded once to T, for r < rows, k < h.
template <class T>
void store_rows(const float* src, int64_t lds, int64_t rows, int64_t h, T* dst, bool vec) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * lds;
    T* d = dst + r * h;
    int64_t k = vec ? store_row_avx2(s, h, d) : 0;
    for (; k < h; ++k) d[k] = from_f32<T>(s[k]);
  }
}

struct Kernels {
  bool vec;
  void gemm_panel(const float* a, int64_t lda, const float* bp, int64_t kn, float* c, int64_t ldc, int64_t m,
                  int64_t n) const {
    vec ? gemm_panel_avx2(a, lda, bp, kn, c, ldc, m, n) : gemm_panel_scalar(a, lda, bp, kn, c, ldc, m, n);
  }
  void gemm_acc(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t np, float* out, int64_t ldo,
                int64_t m, int64_t n) const {
    vec ? gemm_acc_avx2(a, lda, b, ldb, np, out, ldo, m, n) : gemm_acc_scalar(a, lda, b, ldb, np, out, ldo, m, n);
  }
  void lse_update(const float* c, int64_t ldc, int64_t vn, int64_t mp, float* run_max, float* run_sum) const {
    vec ? lse_update_avx2(c, ldc, vn, mp, run_max, run_sum) : lse_update_scalar(c, ldc, vn, mp, run_max, run_sum);
  }
  void softmax_grad(float* c, int64_t ldc, int64_t outer, int64_t inner, const float* lse, const float* g,
                    bool per_inner) const {
    vec ? softmax_grad_avx2(c, ldc, outer, inner, lse, g, per_inner)
        : softmax_grad_scalar(c, ldc, outer, inner, lse, g, per_inner);
  }
};

struct Shape {
  int64_t n, h, v, hp, ignore_index;
  int64_t row_tiles() const { return (n + kRowTile - 1) / kRowTile; }
  int64_t vocab_tiles() const { return (v + kVocabTile - 1) / kVocabTile; }
  bool active(int64_t t) const { return t != ignore_index && t >= 0 && t < v; }
};

// Per-row gradient and lse of a row tile; rows past the tile or with no gradient get g = 0 and
// kInactiveLse, so their dlogits are exactly 0.
void row_factors(const Shape& S, const int64_t* targets, const float* dloss, const float* lse, int64_t m0,
                 int64_t mc, int64_t mp, float* g, float* l) {
  for (int64_t m = 0; m < mp; ++m) {
    const bool on = m < mc && S.active(targets[m0 + m]) && dloss[m0 + m] != 0.0f;
    g[m] = on ? dloss[m0 + m] : 0.0f;
    l[m] = on ? lse[m0 + m] : lce::kInactiveLse;
  }
}

// ---- forward ----

template <class T>
void fwd(const T* hidden, const T* weight, const int64_t* targets, float* loss, float* lse_out, const Shape& S) {
  const Kernels K{use_avx2()};
  const int64_t tasks = S.row_tiles();
#pragma omp parallel if (tasks > 1 && S.n * S.v * S.h > kParallelMin)
  {
    std::vector<float> hp(kRowTile * S.hp), wt(kVocabTile * S.hp), c(kVocabTile * kRowTile);
    std::vector<float> run_max(kRowTile), run_sum(kRowTile), picked(kRowTile);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t m0 = task * kRowTile, mc = std::min(kRowTile, S.n - m0), mp = round_up(mc, 16);
      load_panels(hidden + m0 * S.h, mc, S.h, mp, S.hp, hp.data());
      std::fill(run_max.begin(), run_max.end(), lce::kLowest);
      std::fill(run_sum.begin(), run_sum.end(), 0.0f);
      std::fill(picked.begin(), picked.end(), 0.0f);
      for (int64_t v0 = 0; v0 < S.v; v0 += kVocabTile) {
        const int64_t vc = std::min(kVocabTile, S.v - v0), vp = round_up(vc, 4);
        load_rows(weight + v0 * S.h, vc, S.h, vp, S.hp, wt.data(), K.vec);
        K.gemm_panel(wt.data(), S.hp, hp.data(), S.hp, c.data(), mp, vp, mp);  // c[v][m]
        K.lse_update(c.data(), mp, vc, mp, run_max.data(), run_sum.data());
        for (int64_t m = 0; m < mc; ++m) {
          const int64_t t = targets[m0 + m] - v0;
          if (t >= 0 && t < vc) picked[m] = c[t * mp + m];
        }
      }
      for (int64_t m = 0; m < mc; ++m) {
        const bool on = S.active(targets[m0 + m]);
        const float l = lce::lse(run_max[m], run_sum[m]);
        loss[m0 + m] = on ? lce::row_loss(l, picked[m]) : 0.0f;
        lse_out[m0 + m] = on ? l : 0.0f;
      }
    }
  }
}

// ---- backward ----

// dhidden by row tiles: dH[m] = sum over vocab tiles of sum_v dlogits[v][m] W_v.
template <class T>
void bwd_hidden(const float* dloss, const T* hidden, const T* weight, const int64_t* targets, const float* lse,
                T* dhidden, const Shape& S, const Kernels& K) {
  const int64_t tasks = S.row_tiles();
#pragma omp parallel if (tasks > 1 && S.n * S.v * S.h > kParallelMin)
  {
    std::vector<float> hp(kRowTile * S.hp), wt(kVocabTile * S.hp), c(kVocabTile * kRowTile), dh(kRowTile * S.hp);
    std::vector<float> g(kRowTile), l(kRowTile);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t m0 = task * kRowTile, mc = std::min(kRowTile, S.n - m0), mp = round_up(mc, 16);
      row_factors(S, targets, dloss, lse, m0, mc, mp, g.data(), l.data());
      std::fill(dh.begin(), dh.end(), 0.0f);
      if (std::all_of(g.begin(), g.begin() + mp, [](float x) { return x == 0.0f; })) {
        store_rows(dh.data(), S.hp, mc, S.h, dhidden + m0 * S.h, K.vec);  // nothing flows back to this tile
        continue;
      }
      load_panels(hidden + m0 * S.h, mc, S.h, mp, S.hp, hp.data());
      for (int64_t v0 = 0; v0 < S.v; v0 += kVocabTile) {
        const int64_t vc = std::min(kVocabTile, S.v - v0), vp = round_up(vc, 4);
        load_rows(weight + v0 * S.h, vc, S.h, vp, S.hp, wt.data(), K.vec);
        K.gemm_panel(wt.data(), S.hp, hp.data(), S.hp, c.data(), mp, vp, mp);  // c[v][m]
        K.softmax_grad(c.data(), mp, vc, mp, l.data(), g.data(), true);
        for (int64_t m = 0; m < mc; ++m) {
          const int64_t t = targets[m0 + m] - v0;
          if (t >= 0 && t < vc) c[t * mp + m] -= g[m];
        }
        K.gemm_acc(c.data(), mp, wt.data(), S.hp, vc, dh.data(), S.hp, mp, S.hp);
      }
      store_rows(dh.data(), S.hp, mc, S.h, dhidden + m0 * S.h, K.vec);
    }
  }
}

// dweight by vocab tiles: dW[v] = sum over row tiles of sum_m dlogits[m][v] h_m.
template <class T>
void bwd_weight(const float* dloss, const T* hidden, const T* weight, const int64_t* targets, const float* lse,
                T* dweight, const Shape& S, const Kernels& K) {
  const int64_t tasks = S.vocab_tiles();
#pragma omp parallel if (tasks > 1 && S.n * S.v * S.h > kParallelMin)
  {
    std::vector<float> wp(kVocabTile * S.hp), hr(kRowTile * S.hp), c(kRowTile * kVocabTile), dw(kVocabTile * S.hp);
    std::vector<float> g(kRowTile), l(kRowTile);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t v0 = task * kVocabTile, vc = std::min(kVocabTile, S.v - v0), vp = round_up(vc, 16);
      load_panels(weight + v0 * S.h, vc, S.h, vp, S.hp, wp.data());
      std::fill(dw.begin(), dw.end(), 0.0f);
      for (int64_t m0 = 0; m0 < S.n; m0 += kRowTile) {
        const int64_t mc = std::min(kRowTile, S.n - m0), mp = round_up(mc, 4);
        row_factors(S, targets, dloss, lse, m0, mc, mp, g.data(), l.data());
        if (std::all_of(g.begin(), g.begin() + mp, [](float x) { return x == 0.0f; })) continue;
        load_rows(hidden + m0 * S.h, mc, S.h, mp, S.hp, hr.data(), K.vec);
        K.gemm_panel(hr.data(), S.hp, wp.data(), S.hp, c.data(), vp, mp, vp);  // c[m][v]
        K.softmax_grad(c.data(), vp, mp, vp, l.data(), g.data(), false);
        for (int64_t m = 0; m < mc; ++m) {
          const int64_t t = targets[m0 + m] - v0;
          if (t >= 0 && t < vc) c[m * vp + t] -= g[m];
        }
        K.gemm_acc(c.data(), vp, hr.data(), S.hp, mc, dw.data(), S.hp, round_up(vc, 4), S.hp);
      }
      store_rows(dw.data(), S.hp, vc, S.h, dweight + v0 * S.h, K.vec);
    }
  }
}

}  // namespace

void linear_cross_entropy_fwd(const void* hidden, const void* weight, const int64_t* targets, float* loss,
                              float* lse, int64_t n, int64_t h, int64_t v, int64_t ignore_index, DType dt) {
  const Shape S{n, h, v, round_up(h, 16), ignore_index};
  visit_host_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    fwd(static_cast<const T*>(hidden), static_cast<const T*>(weight), targets, loss, lse, S);
  });
}

void linear_cross_entropy_bwd(const float* dloss, const void* hidden, const void* weight, const int64_t* targets,
                              const float* lse, void* dhidden, void* dweight, int64_t n, int64_t h, int64_t v,
                              int64_t ignore_index, DType dt) {
  const Shape S{n, h, v, round_up(h, 16), ignore_index};
  const Kernels K{use_avx2()};
  visit_host_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* hs = static_cast<const T*>(hidden);
    const T* ws = static_cast<const T*>(weight);
    if (dhidden != nullptr) bwd_hidden(dloss, hs, ws, targets, lse, static_cast<T*>(dhidden), S, K);
    if (dweight != nullptr) bwd_weight(dloss, hs, ws, targets, lse, static_cast<T*>(dweight), S, K);
  });
}

}  // namespace blip3o::cpu
