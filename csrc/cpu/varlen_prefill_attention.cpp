// Varlen causal prefill attention CPU kernel. Math: csrc/include/blip3o/varlen_prefill_attention.h;
// contract: python/blip3o_fast/ops/varlen_prefill_attention.py. fp32 math, one rounding at the store.
//
// Prep (tokens in parallel): k of every kv head goes transposed into fp32 `kt` (KVH, D, NP), keys
// innermost so a score tile vectorises across keys, and v into `vr` (KVH, NP, DP). Each sequence starts
// at a multiple of 16 in NP with zeros after its keys; DP rounds D up to 16.
// Attention: tasks (sequence, kv head, tile of kRows queries), longest first, OpenMP dynamic. A task
// stacks its queries for every q head of the kv head's group (row = query * G + head), so a K/V tile is
// read once per group. Score tiles of rows x kKeys, the causal limit applied per row, online softmax,
// O += P V; key tiles past the tile's last query are never visited (causal tile skipping).
// Micro-kernels: 4 rows x 16 columns of fp32 accumulators, AVX2/FMA or a scalar loop chosen at run time.
#include <algorithm>
#include <cmath>
#include <vector>

#include "blip3o/varlen_prefill_attention.h"
#include "cpu/kernels.h"
#include "cpu/vec_avx2.h"

namespace blip3o::cpu {

namespace {

namespace vpa = varlen_prefill_attention;

constexpr int64_t kRows = 16;  // queries per task
constexpr int64_t kKeys = 64;  // keys per score tile, a multiple of 16

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- micro-kernels (m a multiple of 4; n, dp multiples of 16) ----

// c[i*ldc + j] = sum_e a[i*lda + e] * bt[e*ldb + j] for i < m, j < n.
void scores_scalar(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t d, float* c, int64_t ldc,
                   int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i) {
    float* ci = c + i * ldc;
    std::fill(ci, ci + n, 0.0f);
    for (int64_t e = 0; e < d; ++e) {
      const float av = a[i * lda + e];
      const float* b = bt + e * ldb;
      for (int64_t j = 0; j < n; ++j) ci[j] += av * b[j];
    }
  }
}

BLIP3O_AVX2 void scores_avx2(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t d, float* c,
                             int64_t ldc, int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; i += 4) {
    const float* a0 = a + i * lda;
    for (int64_t j = 0; j < n; j += 16) {
      __m256 acc[4][2];
      for (auto& row : acc) row[0] = row[1] = _mm256_setzero_ps();
      const float* b = bt + j;
      for (int64_t e = 0; e < d; ++e, b += ldb) {
        const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        for (int r = 0; r < 4; ++r) {
          const __m256 av = _mm256_broadcast_ss(a0 + r * lda + e);
          acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
        }
      }
      for (int r = 0; r < 4; ++r) {
        _mm256_storeu_ps(c + (i + r) * ldc + j, acc[r][0]);
        _mm256_storeu_ps(c + (i + r) * ldc + j + 8, acc[r][1]);
      }
    }
  }
}

// c[i*ldc + e] += sum_k p[i*ldp + k] * v[k*ldv + e] for i < m, k < kn, e < dp.
void accum_scalar(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t m, int64_t kn, float* c,
                  int64_t ldc, int64_t dp) {
  for (int64_t i = 0; i < m; ++i) {
    float* ci = c + i * ldc;
    for (int64_t k = 0; k < kn; ++k) {
      const float pv = p[i * ldp + k];
      const float* vk = v + k * ldv;
      for (int64_t e = 0; e < dp; ++e) ci[e] += pv * vk[e];
    }
  }
}

BLIP3O_AVX2 void accum_avx2(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t m, int64_t kn,
                            float* c, int64_t ldc, int64_t dp) {
  for (int64_t i = 0; i < m; i += 4) {
    for (int64_t e = 0; e < dp; e += 16) {
      __m256 acc[4][2];
      for (int r = 0; r < 4; ++r) {
        acc[r][0] = _mm256_loadu_ps(c + (i + r) * ldc + e);
        acc[r][1] = _mm256_loadu_ps(c + (i + r) * ldc + e + 8);
      }
      const float* vk = v + e;
      for (int64_t k = 0; k < kn; ++k, vk += ldv) {
        const __m256 v0 = _mm256_loadu_ps(vk), v1 = _mm256_loadu_ps(vk + 8);
        for (int r = 0; r < 4; ++r) {
          const __m256 pv = _mm256_broadcast_ss(p + (i + r) * ldp + k);
          acc[r][0] = _mm256_fmadd_ps(pv, v0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(pv, v1, acc[r][1]);
        }
      }
      for (int r = 0; r < 4; ++r) {
        _mm256_storeu_ps(c + (i + r) * ldc + e, acc[r][0]);
        _mm256_storeu_ps(c + (i + r) * ldc + e + 8, acc[r][1]);
      }
    }
  }
}

// Online-softmax step of one score row s[0, n): keys from `valid` on are causally hidden. Updates the
// running max m and sum l, turns s into unnormalised probabilities (0 where hidden) and returns the
// factor the row's accumulated O must be scaled by.
float softmax_step_scalar(float* s, int64_t n, int64_t valid, float& m, float& l) {
  valid = std::min(valid, n);
  float mx = -INFINITY;
  for (int64_t j = 0; j < valid; ++j) mx = std::max(mx, s[j]);
  const float m_new = std::max(m, mx);
  if (m_new == -INFINITY) {  // nothing visible yet
    std::fill(s, s + n, 0.0f);
    return 1.0f;
  }
  const float alpha = vpa::online_rescale(m, m_new);
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) sum += s[j] = j < valid ? std::exp(s[j] - m_new) : 0.0f;
  l = l * alpha + sum;
  m = m_new;
  return alpha;
}

BLIP3O_AVX2 float softmax_step_avx2(float* s, int64_t n, int64_t valid, float& m, float& l) {
  valid = std::max<int64_t>(0, std::min(valid, n));
  const __m256i lim = _mm256_set1_epi32(static_cast<int>(valid));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 mx = _mm256_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 keep = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(lim, _mm256_add_epi32(iota, _mm256_set1_epi32(static_cast<int>(j)))));
    const __m256 x = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(s + j), keep);
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
  const float alpha = vpa::online_rescale(m, m_new);
  const __m256 mv = _mm256_set1_ps(m_new), neg_inf = _mm256_set1_ps(-INFINITY);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 x = _mm256_loadu_ps(s + j);
    // hidden keys (-inf) give exactly 0, not exp's clamped tiny value
    const __m256 p = _mm256_and_ps(_mm256_cmp_ps(x, neg_inf, _CMP_NEQ_OQ), avx2::exp(_mm256_sub_ps(x, mv)));
    _mm256_storeu_ps(s + j, p);
    acc = _mm256_add_ps(acc, p);
  }
  l = l * alpha + avx2::hsum(acc);
  m = m_new;
  return alpha;
}

struct Kernels {
  bool vec;
  void scores(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t d, float* c, int64_t ldc,
              int64_t m, int64_t n) const {
    vec ? scores_avx2(a, lda, bt, ldb, d, c, ldc, m, n) : scores_scalar(a, lda, bt, ldb, d, c, ldc, m, n);
  }
  void accum(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t m, int64_t kn, float* c,
             int64_t ldc, int64_t dp) const {
    vec ? accum_avx2(p, ldp, v, ldv, m, kn, c, ldc, dp) : accum_scalar(p, ldp, v, ldv, m, kn, c, ldc, dp);
  }
  float softmax_step(float* s, int64_t n, int64_t valid, float& m, float& l) const {
    return vec ? softmax_step_avx2(s, n, valid, m, l) : softmax_step_scalar(s, n, valid, m, l);
  }
};

struct Task {
  int64_t seq, kv_head, q0;
};

template <class T>
void attend(const T* q, const T* k, const T* v, const int32_t* cu, T* out, const vpa::Dims& m) {
  const Kernels K{use_avx2()};
  const int64_t d = m.d, dp = round_up(d, 16), kvh = m.kv_heads, group = m.heads / m.kv_heads;
  std::vector<int64_t> start(m.seqs), len(m.seqs), padded(m.seqs + 1, 0);  // padded: each sequence's offset in NP
  for (int64_t s = 0; s < m.seqs; ++s) {
    vpa::seq_rows(cu, s, m.tokens, start[s], len[s]);
    padded[s + 1] = padded[s] + round_up(len[s], 16);
  }
  const int64_t np = padded[m.seqs];
  if (np == 0) return;

  // ---- prep: fp32 K transposed and V row-major, per kv head ----
  std::vector<float> kt(static_cast<size_t>(kvh * d * np), 0.0f), vr(static_cast<size_t>(kvh * np * dp), 0.0f);
#pragma omp parallel for collapse(2) schedule(dynamic) if (np * kvh * d > kParallelMin)
  for (int64_t s = 0; s < m.seqs; ++s)
    for (int64_t g = 0; g < kvh; ++g)
      for (int64_t j = 0; j < len[s]; ++j) {
        const int64_t row = start[s] + j, col = padded[s] + j;
        for (int64_t e = 0; e < d; ++e) {
          kt[(g * d + e) * np + col] = to_f32(k[(row * kvh + g) * d + e]);
          vr[(g * np + col) * dp + e] = to_f32(v[(row * kvh + g) * d + e]);
        }
      }

  // ---- tasks, the longest (most keys) first so the dynamic schedule ends balanced ----
  std::vector<Task> tasks;
  for (int64_t s = 0; s < m.seqs; ++s)
    for (int64_t q0 = 0; q0 < len[s]; q0 += kRows)
      for (int64_t g = 0; g < kvh; ++g) tasks.push_back({s, g, q0});
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.q0 > b.q0; });
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  const int64_t rows_max = round_up(kRows * group, 4);
  int64_t work = 0;
  for (int64_t s = 0; s < m.seqs; ++s) work += len[s] * len[s] / 2 * m.heads * d;

#pragma omp parallel if (ntasks > 1 && work > kParallelMin)
  {
    std::vector<float> qblk(rows_max * dp), sc(rows_max * kKeys), acc(rows_max * dp), mx(rows_max), l(rows_max);
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < ntasks; ++t) {
      const Task task = tasks[t];
      const int64_t queries = std::min(kRows, len[task.seq] - task.q0);
      const int64_t rows = round_up(queries * group, 4), first = start[task.seq] + task.q0;
      const int64_t h0 = task.kv_head * group;
      std::fill(qblk.begin(), qblk.end(), 0.0f);
      for (int64_t r = 0; r < queries; ++r)
        for (int64_t hh = 0; hh < group; ++hh) {
          const T* src = q + ((first + r) * m.heads + h0 + hh) * d;
          float* dst = qblk.data() + (r * group + hh) * dp;
          for (int64_t e = 0; e < d; ++e) dst[e] = to_f32(src[e]) * m.scale;
        }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(mx.begin(), mx.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.0f);
      const float* kt_seq = kt.data() + task.kv_head * d * np + padded[task.seq];
      const float* vr_seq = vr.data() + (task.kv_head * np + padded[task.seq]) * dp;
      const int64_t key_end = vpa::visible_keys(task.q0 + queries - 1);  // the tile's last query sees this many
      for (int64_t j0 = 0; j0 < key_end; j0 += kKeys) {
        const int64_t nk = std::min(kKeys, round_up(key_end - j0, 16));
        K.scores(qblk.data(), dp, kt_seq + j0, np, d, sc.data(), kKeys, rows, nk);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t valid = vpa::visible_keys(task.q0 + r / group) - j0;
          const float alpha = K.softmax_step(sc.data() + r * kKeys, nk, valid, mx[r], l[r]);
          if (alpha != 1.0f)
            for (int64_t e = 0; e < dp; ++e) acc[r * dp + e] *= alpha;
        }
        K.accum(sc.data(), kKeys, vr_seq + j0 * dp, dp, rows, nk, acc.data(), dp, dp);
      }
      for (int64_t r = 0; r < queries; ++r)
        for (int64_t hh = 0; hh < group; ++hh) {
          const int64_t row = r * group + hh;
          T* dst = out + ((first + r) * m.heads + h0 + hh) * d;
          const float inv = 1.0f / l[row];  // every query sees at least itself: l > 0
          for (int64_t e = 0; e < d; ++e) dst[e] = from_f32<T>(acc[row * dp + e] * inv);
        }
    }
  }
}

}  // namespace

void varlen_prefill_attention_fwd(const void* q, const void* k, const void* v, const int32_t* cu_seqlens, void* out,
                                  const varlen_prefill_attention::Dims& dims, DType dt) {
  visit_host_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    attend(static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), cu_seqlens,
           static_cast<T*>(out), dims);
  });
}

}  // namespace blip3o::cpu
