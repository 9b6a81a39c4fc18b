// adaLN RMSNorm-zero CPU kernel: rms_norm.cpp's row bodies with the (1 + scale[b]) factor.
// Backward partials: each batch's T rows cut into rms_norm_modulate::chunks_per_batch chunks
// ("units", fixed by the shape); units are grouped into at most kMaxPartials contiguous groups,
// each run in order by one thread with its own dweight partial; a unit's dscale partial is its own
// row (written straight into dscale when a batch is one unit). Sums run in a fixed order.
#include <algorithm>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/reduce.h"
#include "cpu/rms_norm_rows.h"

namespace blip3o::cpu {

namespace {

template <class T>
void fwd(const T* x, const T* w, const T* scale, T* out, float* rstd, int64_t batch, int64_t t, int64_t n,
         float eps) {
  const bool vec = use_avx2();
  const int64_t rows = batch * t;
#pragma omp parallel for schedule(static) if (rows * n > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = scale + (r / t) * n;
    if (vec)
      rmsrow::fwd_avx2<true>(x + r * n, w, s, out + r * n, rstd + r, n, eps);
    else
      rmsrow::fwd_scalar<true>(x + r * n, w, s, out + r * n, rstd + r, n, eps);
  }
}

template <class T>
void bwd(const T* dy, const T* x, const T* w, const T* scale, const float* rstd, T* dx, float* dweight,
         float* dscale, int64_t batch, int64_t t, int64_t n) {
  const bool vec = use_avx2();
  const int64_t chunks = rms_norm_modulate::chunks_per_batch(batch, t, rms_norm::kMaxPartials);
  const int64_t units = batch * chunks;
  const int64_t groups = std::min(units, rms_norm::kMaxPartials);
  std::vector<float> wpart(static_cast<size_t>(groups * n), 0.0f);
  std::vector<float> spart(chunks > 1 ? static_cast<size_t>(units * n) : 0, 0.0f);
  if (chunks == 1) std::fill(dscale, dscale + batch * n, 0.0f);
#pragma omp parallel for schedule(static) if (batch * t * n > kParallelMin)
  for (int64_t g = 0; g < groups; ++g) {
    float* dw = wpart.data() + g * n;
    for (int64_t u = split_point(units, groups, g); u < split_point(units, groups, g + 1); ++u) {
      const int64_t b = u / chunks, c = u % chunks;
      float* ds = chunks > 1 ? spart.data() + u * n : dscale + b * n;
      const T* s = scale + b * n;
      for (int64_t tt = split_point(t, chunks, c); tt < split_point(t, chunks, c + 1); ++tt) {
        const int64_t r = b * t + tt, o = r * n;
        if (vec)
          rmsrow::bwd_avx2<true>(dy + o, x + o, w, s, rstd[r], dx + o, dw, ds, n);
        else
          rmsrow::bwd_scalar<true>(dy + o, x + o, w, s, rstd[r], dx + o, dw, ds, n);
      }
    }
  }
  sum_partials(wpart, groups, n, dweight);
  if (chunks > 1) {
#pragma omp parallel for schedule(static) if (units * n > kParallelMin)
    for (int64_t b = 0; b < batch; ++b) {
      float* out = dscale + b * n;
      std::fill(out, out + n, 0.0f);
      for (int64_t c = 0; c < chunks; ++c) {
        const float* src = spart.data() + (b * chunks + c) * n;
        for (int64_t i = 0; i < n; ++i) out[i] += src[i];
      }
    }
  }
}

}  // namespace

void rms_norm_modulate_fwd(const void* x, const void* weight, const void* scale, void* out, float* rstd,
                           int64_t batch, int64_t t, int64_t n, float eps, DType dt) {
  visit_host_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    fwd(static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(scale), static_cast<T*>(out),
        rstd, batch, t, n, eps);
  });
}

void rms_norm_modulate_bwd(const void* dy, const void* x, const void* weight, const void* scale, const float* rstd,
                           void* dx, float* dweight, float* dscale, int64_t batch, int64_t t, int64_t n, DType dt) {
  visit_host_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    bwd(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(weight),
        static_cast<const T*>(scale), rstd, static_cast<T*>(dx), dweight, dscale, batch, t, n);
  });
}

}  // namespace blip3o::cpu
