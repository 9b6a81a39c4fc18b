// RMSNorm CPU kernel. Forward: rows in parallel (OpenMP). Backward: rows cut into at most
// rms_norm::kMaxPartials chunks fixed by the shape, one dweight partial per chunk, summed in
// chunk order, so dweight is deterministic. Row bodies: rms_norm_rows.h.
#include <algorithm>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/reduce.h"
#include "cpu/rms_norm_rows.h"

namespace blip3o::cpu {

namespace {

template <class T>
void fwd(const T* x, const T* w, T* out, float* rstd, int64_t rows, int64_t n, float eps) {
  const bool vec = use_avx2();
#pragma omp parallel for schedule(static) if (rows * n > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    if (vec)
      rmsrow::fwd_avx2<false>(x + r * n, w, static_cast<const T*>(nullptr), out + r * n, rstd + r, n, eps);
    else
      rmsrow::fwd_scalar<false>(x + r * n, w, static_cast<const T*>(nullptr), out + r * n, rstd + r, n, eps);
  }
}

template <class T>
void bwd(const T* dy, const T* x, const T* w, const float* rstd, T* dx, float* dweight, int64_t rows, int64_t n) {
  const bool vec = use_avx2();
  const int64_t parts = std::min(rows, rms_norm::kMaxPartials);
  std::vector<float> part(static_cast<size_t>(parts * n), 0.0f);
#pragma omp parallel for schedule(static) if (rows * n > kParallelMin)
  for (int64_t p = 0; p < parts; ++p) {
    float* acc = part.data() + p * n;
    for (int64_t r = split_point(rows, parts, p); r < split_point(rows, parts, p + 1); ++r) {
      const int64_t o = r * n;
      if (vec)
        rmsrow::bwd_avx2<false>(dy + o, x + o, w, static_cast<const T*>(nullptr), rstd[r], dx + o, acc, nullptr, n);
      else
        rmsrow::bwd_scalar<false>(dy + o, x + o, w, static_cast<const T*>(nullptr), rstd[r], dx + o, acc, nullptr, n);
    }
  }
  sum_partials(part, parts, n, dweight);
}

}  // namespace

void rms_norm_fwd(const void* x, const void* weight, void* out, float* rstd, int64_t rows, int64_t n, float eps,
                  DType dt) {
  visit_host_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    fwd(static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<T*>(out), rstd, rows, n, eps);
  });
}

void rms_norm_bwd(const void* dy, const void* x, const void* weight, const float* rstd, void* dx, float* dweight,
                  int64_t rows, int64_t n, DType dt) {
  visit_host_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    bwd(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(weight), rstd,
        static_cast<T*>(dx), dweight, rows, n);
  });
}

}  // namespace blip3o::cpu
