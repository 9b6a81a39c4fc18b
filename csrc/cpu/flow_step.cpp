// Flow-matching sampler update CPU kernel (contract: python/blip3o_fast/ops/flow_step.py; math:
// blip3o/flow_step.h). Elementwise over the B*N latents: with the doubled CFG batch, element e's
// unconditional velocity is v[e] and its conditional one v[B*N + e]. Blocks of kBlock elements are
// shared out over OpenMP threads; each runs an AVX2/FMA body over its 8-aligned part and the
// scalar (header) math over the rest. out may be x, v_save may be v_prev: every element is read
// before it is written.
#include "cpu/kernels.h"
#include "cpu/vec_avx2.h"
#include "blip3o/flow_step.h"

namespace blip3o::cpu {

namespace {

constexpr int64_t kBlock = 4096;  // a multiple of 8, so only the last block has a scalar tail

struct Args {
  int64_t total;  // B * N
  float dt, g, c_prev;
};

template <class T>
float round_to(float v) {
  return to_f32(from_f32<T>(v));
}

template <bool kGuided, bool kPrev, bool kSave, class TX, class TV>
void fast_scalar(const TX* x, const TV* v, TX* out, const float* vp, float* vs, const Args& a, int64_t lo,
                 int64_t hi) {
  for (int64_t e = lo; e < hi; ++e) {
    const float vc = kGuided ? flow_step::combine(to_f32(v[e]), to_f32(v[a.total + e]), a.g) : to_f32(v[e]);
    const float xe = to_f32(x[e]);
    const float xn = kPrev ? flow_step::update(xe, a.dt, vc, a.c_prev, vp[e]) : flow_step::update(xe, a.dt, vc);
    if (kSave) vs[e] = vc;
    out[e] = from_f32<TX>(xn);
  }
}

// Same products and sums as the header, in the same order (no FMA: the scalar tail and the
// reference then round alike).
template <bool kGuided, bool kPrev, bool kSave, class TX, class TV>
BLIP3O_AVX2 int64_t fast_avx2(const TX* x, const TV* v, TX* out, const float* vp, float* vs, const Args& a,
                              int64_t lo, int64_t hi) {
  const __m256 dt = _mm256_set1_ps(a.dt), g = _mm256_set1_ps(a.g), cp = _mm256_set1_ps(a.c_prev);
  int64_t e = lo;
  for (; e + 8 <= hi; e += 8) {
    __m256 vc = avx2::load8(v + e);
    if (kGuided) vc = _mm256_add_ps(vc, _mm256_mul_ps(g, _mm256_sub_ps(avx2::load8(v + a.total + e), vc)));
    __m256 xn = _mm256_add_ps(avx2::load8(x + e), _mm256_mul_ps(dt, vc));
    if (kPrev) xn = _mm256_add_ps(xn, _mm256_mul_ps(cp, _mm256_loadu_ps(vp + e)));
    if (kSave) _mm256_storeu_ps(vs + e, vc);
    avx2::store8(out + e, xn);
  }
  return e;
}

template <class TX, class TV>
void exact_scalar(const TX* x, const TV* v, TX* out, const Args& a, bool guided, int64_t lo, int64_t hi) {
  const auto round = [](float f) { return round_to<TV>(f); };
  for (int64_t e = lo; e < hi; ++e) {
    const float vc = guided ? flow_step::exact_combine(to_f32(v[e]), to_f32(v[a.total + e]), a.g, round)
                            : to_f32(v[e]);
    out[e] = from_f32<TX>(flow_step::exact_update(to_f32(x[e]), a.dt, vc, round));
  }
}

// Rounding 8 lanes to T and back: through T's own store/load, which round to nearest even.
template <class T>
BLIP3O_AVX2 __m256 round8(__m256 v) {
  alignas(32) T tmp[8];
  avx2::store8(tmp, v);
  return avx2::load8(tmp);
}

template <class TX, class TV>
BLIP3O_AVX2 int64_t exact_avx2(const TX* x, const TV* v, TX* out, const Args& a, bool guided, int64_t lo,
                               int64_t hi) {
  const __m256 dt = _mm256_set1_ps(a.dt), g = _mm256_set1_ps(a.g);
  int64_t e = lo;
  for (; e + 8 <= hi; e += 8) {
    __m256 vc = avx2::load8(v + e);
    if (guided) {
      const __m256 d = round8<TV>(_mm256_sub_ps(avx2::load8(v + a.total + e), vc));
      vc = round8<TV>(_mm256_add_ps(vc, round8<TV>(_mm256_mul_ps(g, d))));
    }
    avx2::store8(out + e, _mm256_add_ps(avx2::load8(x + e), round8<TV>(_mm256_mul_ps(dt, vc))));
  }
  return e;
}

template <bool kGuided, bool kPrev, bool kSave, class TX, class TV>
void fast(const TX* x, const TV* v, TX* out, const float* vp, float* vs, const Args& a, bool vec) {
  const int64_t blocks = (a.total + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (a.total > kParallelMin)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t lo = blk * kBlock, hi = lo + kBlock < a.total ? lo + kBlock : a.total;
    const int64_t mid = vec ? fast_avx2<kGuided, kPrev, kSave>(x, v, out, vp, vs, a, lo, hi) : lo;
    fast_scalar<kGuided, kPrev, kSave>(x, v, out, vp, vs, a, mid, hi);
  }
}

template <class TX, class TV>
void run(const TX* x, const TV* v, TX* out, const float* vp, float* vs, const Args& a, bool guided, bool exact) {
  const bool vec = use_avx2();
  if (exact) {
    // PyTorch on CPU rounds the released step's 0-dim dt to v's dtype before the product (flow_step.h).
    Args e = a;
    e.dt = round_to<TV>(a.dt);
    const int64_t blocks = (e.total + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (e.total > kParallelMin)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t lo = blk * kBlock, hi = lo + kBlock < e.total ? lo + kBlock : e.total;
      exact_scalar(x, v, out, e, guided, vec ? exact_avx2(x, v, out, e, guided, lo, hi) : lo, hi);
    }
    return;
  }
  // The eight (guided, v_prev, v_save) forms, each its own loop: no per-element branches.
  const int form = (guided ? 4 : 0) | (vp ? 2 : 0) | (vs ? 1 : 0);
  switch (form) {
    case 0: fast<false, false, false>(x, v, out, vp, vs, a, vec); break;
    case 1: fast<false, false, true>(x, v, out, vp, vs, a, vec); break;
    case 2: fast<false, true, false>(x, v, out, vp, vs, a, vec); break;
    case 3: fast<false, true, true>(x, v, out, vp, vs, a, vec); break;
    case 4: fast<true, false, false>(x, v, out, vp, vs, a, vec); break;
    case 5: fast<true, false, true>(x, v, out, vp, vs, a, vec); break;
    case 6: fast<true, true, false>(x, v, out, vp, vs, a, vec); break;
    default: fast<true, true, true>(x, v, out, vp, vs, a, vec); break;
  }
}

}  // namespace

void flow_step(const void* x, const void* v, void* out, const float* v_prev, float* v_save, int64_t batch,
               int64_t n, bool guided, float dt, float guidance, float c_prev, bool exact, DType x_dt, DType v_dt) {
  const Args a{batch * n, dt, guidance, c_prev};
  if (a.total == 0) return;
  visit_host_dtype(x_dt, [&](auto xtag) {
    using TX = decltype(xtag);
    visit_host_dtype(v_dt, [&](auto vtag) {
      using TV = decltype(vtag);
      run(static_cast<const TX*>(x), static_cast<const TV*>(v), static_cast<TX*>(out), v_prev, v_save, a, guided,
          exact);
    });
  });
}

}  // namespace blip3o::cpu
