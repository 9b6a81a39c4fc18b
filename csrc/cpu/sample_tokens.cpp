// Token sampling CPU kernel: rows in parallel (OpenMP), one row per task. Per row: the raw max and
// log-sum-exp (AVX2 exp where available), then for temperature > 0 the scaled row, the top-k value by
// nth_element, the top-p value by a growing partial sort of the top-k survivors, and the Gumbel-max draw
// over the kept tokens with the shared noise of blip3o/sample_tokens.h. The draw starts from the row's
// max token and skips every token that cannot beat the best score so far even with the largest
// possible noise, so only the few contenders pay for the hash and the two logs.
// Semantics (ties, thresholds): python/blip3o_fast/ops/sample_tokens.py.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "blip3o/sample_tokens.h"
#include "cpu/kernels.h"
#include "cpu/vec_avx2.h"

namespace blip3o::cpu {

namespace {

namespace st = blip3o::sample_tokens;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kGumbelMax = 16.64f;  // above every value gumbel() returns (16.6356)

struct RawStats { float max; int64_t argmax; float log_z; };

// sum of exp(l[i] - m) over the whole 8-wide blocks of [0, v); *done: how many elements that covered.
template <class T>
BLIP3O_AVX2 float sum_exp_avx2(const T* l, int64_t v, float m, int64_t* done) {
  __m256 acc = _mm256_setzero_ps();
  const __m256 mv = _mm256_set1_ps(m);
  int64_t i = 0;
  for (; i + 8 <= v; i += 8) acc = _mm256_add_ps(acc, avx2::exp(_mm256_sub_ps(avx2::load8(l + i), mv)));
  *done = i;
  return avx2::hsum(acc);
}

template <class T>
RawStats raw_stats(const T* l, int64_t v) {
  float m = -kInf;
  int64_t am = 0;
  for (int64_t i = 0; i < v; ++i) {
    const float x = to_f32(l[i]);
    if (x > m) { m = x; am = i; }  // strict: the lowest index on ties
  }
  double sum = 0.0;
  int64_t i = 0;
  if (use_avx2() && m > -kInf) sum = sum_exp_avx2(l, v, m, &i);
  for (; i < v; ++i) sum += std::exp(static_cast<double>(to_f32(l[i]) - m));
  return {m, am, m + static_cast<float>(std::log(sum))};
}

// The smallest value v of `vals` (a row's top-k survivors, all >= the top-k value) with
// sum(w : s > v) < p * Z, w = exp(s - row_max), or the row max: a sorted prefix grown until the
// boundary tie group lies inside it.
float top_p_value(std::vector<float>& vals, float row_max, float p) {
  double z = 0.0;
  for (const float s : vals) z += std::exp(static_cast<double>(s - row_max));
  const float limit = p * static_cast<float>(z);
  const size_t n = vals.size();
  for (size_t m = std::min<size_t>(n, 256);; m = std::min(n, m * 8)) {
    std::partial_sort(vals.begin(), vals.begin() + static_cast<std::ptrdiff_t>(m), vals.end(), std::greater<>());
    float kept = vals[0], before = 0.0f;
    size_t j = 0;
    while (j < m) {
      const float v = vals[j];
      if (!(before < limit) && v != row_max) return kept;
      kept = v;
      for (; j < m && vals[j] == v; ++j) before += std::exp(vals[j] - row_max);
    }
    if (m == n) return kept;  // every survivor kept; otherwise the last group may continue past m
  }
}

template <class T>
void sample_row(const T* l, int64_t v, float temp, int32_t top_k, float top_p, int64_t seed, int64_t counter,
                std::vector<float>& s, std::vector<float>& cand, int64_t* token, float* logprob) {
  const RawStats raw = raw_stats(l, v);
  int64_t tok = raw.argmax;
  if (temp > 0.0f) {
    s.resize(static_cast<size_t>(v));
    for (int64_t i = 0; i < v; ++i) s[i] = st::div_rn(to_f32(l[i]), temp);
    const float row_max = s[raw.argmax];  // x / temp is monotone: the raw argmax is a scaled argmax
    float tau = -kInf;
    const bool k_on = top_k > 0 && top_k < v, p_on = top_p < 1.0f;
    if (k_on || p_on) {
      cand.assign(s.begin(), s.end());
      if (k_on) {
        std::nth_element(cand.begin(), cand.begin() + (top_k - 1), cand.end(), std::greater<>());
        tau = cand[top_k - 1];
        cand.erase(std::remove_if(cand.begin(), cand.end(), [tau](float x) { return !(x >= tau); }), cand.end());
      }
      if (p_on) tau = std::max(tau, top_p_value(cand, row_max, top_p));
    }
    const uint32_t key = st::row_key(seed, counter);
    float best = row_max + st::gumbel(key, static_cast<uint32_t>(raw.argmax));
    tok = raw.argmax;
    for (int64_t i = 0; i < v; ++i) {
      const float x = s[i];
      // fl(x + g) <= fl(x + kGumbelMax): a token below best that way cannot win (rounding is monotone)
      if (!(x >= tau) || x + kGumbelMax < best || i == raw.argmax) continue;
      const float score = x + st::gumbel(key, static_cast<uint32_t>(i));
      if (score > best || (score == best && i < tok)) { best = score; tok = i; }
    }
  }
  *token = tok;
  *logprob = to_f32(l[tok]) - raw.log_z;
}

}  // namespace

void sample_tokens(const void* logits, const float* temperature, const int32_t* top_k, const float* top_p,
                   const int64_t* seeds, const int64_t* counters, int64_t* tokens, float* logprobs, int64_t batch,
                   int64_t vocab, DType dt) {
  visit_host_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* l = static_cast<const T*>(logits);
#pragma omp parallel if (batch > 1)
    {
      std::vector<float> s, cand;
#pragma omp for schedule(dynamic, 1)
      for (int64_t r = 0; r < batch; ++r)
        sample_row(l + r * vocab, vocab, temperature[r], top_k[r], top_p[r], seeds[r], counters[r], s, cand,
                   tokens + r, logprobs + r);
    }
  });
}

}  // namespace blip3o::cpu
