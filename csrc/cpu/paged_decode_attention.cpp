// Paged decode attention CPU kernel. Math: csrc/include/blip3o/paged_decode_attention.h; contract:
// python/blip3o_fast/ops/paged_decode_attention.py. fp32 math, one rounding at the store.
//
// Tasks (sequence, kv head, split) in parallel. A task holds its group's G = H / KVH query rows (scaled)
// and fp32 accumulators, and walks its tokens kTile at a time: each K row is converted to fp32 once and
// scored against all G queries, each V row once and added into all G accumulators, so the cache is read
// once per group. Online softmax per query head across tiles. With one split the task writes `out`;
// with several it writes its normalised partial and lse, and a second pass combines each (sequence,
// head) over its splits in split order (deterministic). AVX2/FMA or scalar row bodies, chosen at run time.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "blip3o/paged_decode_attention.h"
#include "cpu/kernels.h"
#include "cpu/vec_avx2.h"

namespace blip3o::cpu {

namespace {

namespace pda = paged_decode_attention;

constexpr int64_t kTile = 32;  // tokens scored per online-softmax step

// ---- row bodies: scalar, and AVX2/FMA with a scalar tail for D % 8 ----

template <class T>
void to_f32_scalar(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f32(src[i]);
}

float dot_scalar(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy_scalar(float* y, float a, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// s[j] = exp(s[j] - m) for j < n; returns their sum.
float exp_sum_scalar(float* s, int64_t n, float m) {
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) sum += s[j] = std::exp(s[j] - m);
  return sum;
}

template <class T>
BLIP3O_AVX2 void to_f32_avx2(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) avx2::store8(dst + i, avx2::load8(src + i));
  for (; i < n; ++i) dst[i] = to_f32(src[i]);
}

BLIP3O_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = avx2::hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

BLIP3O_AVX2 void axpy_avx2(float* y, float a, const float* x, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

BLIP3O_AVX2 float exp_sum_avx2(float* s, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 p = avx2::exp(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    _mm256_storeu_ps(s + j, p);
    acc = _mm256_add_ps(acc, p);
  }
  float sum = avx2::hsum(acc);
  for (; j < n; ++j) sum += s[j] = std::exp(s[j] - m);
  return sum;
}

template <class T>
struct Rows {
  bool vec;
  void to_f32(const T* src, float* dst, int64_t n) const {
    vec ? to_f32_avx2(src, dst, n) : to_f32_scalar(src, dst, n);
  }
  float dot(const float* a, const float* b, int64_t n) const { return vec ? dot_avx2(a, b, n) : dot_scalar(a, b, n); }
  void axpy(float* y, float a, const float* x, int64_t n) const {
    vec ? axpy_avx2(y, a, x, n) : axpy_scalar(y, a, x, n);
  }
  float exp_sum(float* s, int64_t n, float m) const { return vec ? exp_sum_avx2(s, n, m) : exp_sum_scalar(s, n, m); }
};

// Per-thread working set of one task: G scaled query rows, G accumulators, one converted K/V row, the
// tile's scores, the running max / sum per head and the tile's row pointers.
struct Scratch {
  std::vector<float> q, acc, row, s, m, l;
  std::vector<int64_t> rows;
  Scratch(int64_t g, int64_t d)
      : q(g * d), acc(g * d), row(d), s(g * kTile), m(g), l(g), rows(kTile) {}
};

// A cache row as fp32: fp32 rows are read in place, 16-bit ones converted once into buf.
template <class T>
const float* as_f32(const Rows<T>& R, const T* row, float* buf, int64_t d) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    R.to_f32(row, buf, d);
    return buf;
  }
}

// One (sequence b, kv head kv, split) task: leaves acc normalised (o) and m replaced by each head's lse.
template <class T>
void attend(const pda::Args& a, const pda::Dims& dims, const Rows<T>& R, int64_t b, int64_t kv, int64_t split,
            Scratch& w) {
  const int64_t d = dims.head_dim, g = dims.heads / dims.kv_heads, bs = dims.block_size;
  const T* q = static_cast<const T*>(a.q) + (b * dims.heads + kv * g) * d;
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  const int32_t* table = a.block_tables + b * dims.max_blocks;
  for (int64_t h = 0; h < g; ++h) {
    R.to_f32(q + h * d, w.q.data() + h * d, d);
    for (int64_t e = 0; e < d; ++e) w.q[h * d + e] *= a.scale;
  }
  std::fill(w.acc.begin(), w.acc.end(), 0.0f);
  std::fill(w.m.begin(), w.m.end(), -INFINITY);
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  const pda::TokenRange range = pda::split_tokens(a.seq_lens[b], bs, dims.num_splits, split);
  for (int64_t t0 = range.begin; t0 < range.end; t0 += kTile) {
    const int64_t n = std::min(kTile, range.end - t0);
    for (int64_t j = 0; j < n; ++j) {  // cache row of token t0 + j, kv head kv (int64: pools exceed 2^31)
      const int64_t tok = t0 + j;
      w.rows[j] = ((static_cast<int64_t>(table[tok / bs]) * bs + tok % bs) * dims.kv_heads + kv) * d;
    }
    for (int64_t j = 0; j < n; ++j) {
      const float* k = as_f32(R, kc + w.rows[j], w.row.data(), d);
      for (int64_t h = 0; h < g; ++h) w.s[h * kTile + j] = R.dot(w.q.data() + h * d, k, d);
    }
    for (int64_t h = 0; h < g; ++h) {
      float* s = w.s.data() + h * kTile;
      const float m_new = std::max(w.m[h], *std::max_element(s, s + n));
      const float alpha = pda::online_rescale(w.m[h], m_new);
      w.l[h] = w.l[h] * alpha + R.exp_sum(s, n, m_new);
      w.m[h] = m_new;
      if (alpha != 1.0f)
        for (int64_t e = 0; e < d; ++e) w.acc[h * d + e] *= alpha;
    }
    for (int64_t j = 0; j < n; ++j) {
      const float* v = as_f32(R, vc + w.rows[j], w.row.data(), d);
      for (int64_t h = 0; h < g; ++h) R.axpy(w.acc.data() + h * d, w.s[h * kTile + j], v, d);
    }
  }
  for (int64_t h = 0; h < g; ++h) {
    const float inv = w.l[h] > 0.0f ? 1.0f / w.l[h] : 0.0f;  // an empty split leaves acc = 0
    for (int64_t e = 0; e < d; ++e) w.acc[h * d + e] *= inv;
    w.m[h] = pda::split_lse(w.m[h], w.l[h]);
  }
}

template <class T>
void run(const pda::Args& a, const pda::Dims& dims) {
  const Rows<T> R{use_avx2()};
  const int64_t d = dims.head_dim, g = dims.heads / dims.kv_heads, splits = dims.num_splits;
  const int64_t tasks = dims.batch * dims.kv_heads * splits;
  int64_t tokens = 0;
  for (int64_t b = 0; b < dims.batch; ++b) tokens += std::max<int32_t>(a.seq_lens[b], 0);
  const bool parallel = tasks > 1 && tokens * dims.heads * d > kParallelMin;
  T* out = static_cast<T*>(a.out);
#pragma omp parallel if (parallel)
  {
    Scratch w(g, d);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / (dims.kv_heads * splits), kv = task / splits % dims.kv_heads, split = task % splits;
      attend<T>(a, dims, R, b, kv, split, w);
      for (int64_t h = 0; h < g; ++h) {
        const int64_t head = kv * g + h;
        const float* o = w.acc.data() + h * d;
        if (splits == 1) {
          T* dst = out + (b * dims.heads + head) * d;
          for (int64_t e = 0; e < d; ++e) dst[e] = from_f32<T>(o[e]);
        } else {
          const int64_t row = (b * dims.heads + head) * splits + split;
          std::copy(o, o + d, a.part_out + row * d);
          a.part_lse[row] = w.m[h];
        }
      }
    }
  }
  if (splits == 1) return;
  const int64_t rows = dims.batch * dims.heads;
#pragma omp parallel if (parallel)
  {
    std::vector<float> acc(d);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* lse = a.part_lse + r * splits;
      const float mx = *std::max_element(lse, lse + splits);
      std::fill(acc.begin(), acc.end(), 0.0f);
      float total = 0.0f;
      for (int64_t s = 0; s < splits; ++s) {
        const float wgt = pda::combine_weight(lse[s], mx);
        if (wgt == 0.0f) continue;  // an empty split: its partial is 0, its weight 0
        total += wgt;
        R.axpy(acc.data(), wgt, a.part_out + (r * splits + s) * d, d);
      }
      const float inv = total > 0.0f ? 1.0f / total : 0.0f;
      T* dst = out + r * d;
      for (int64_t e = 0; e < d; ++e) dst[e] = from_f32<T>(acc[e] * inv);
    }
  }
}

}  // namespace

void paged_decode_attention(const paged_decode_attention::Args& args, const paged_decode_attention::Dims& dims,
                            DType dt) {
  visit_host_dtype(dt, [&](auto tag) { run<decltype(tag)>(args, dims); });
}

}  // namespace blip3o::cpu
