// RMSNorm math shared by the CPU and CUDA faces (oracle: python/blip3o_fast/ops/rms_norm.py).
// Products keep the reference's left-to-right order so fp32 results match it closely.
#pragma once
#include "blip3o/common.h"

namespace blip3o::rms_norm {

// Most partial sums a dweight reduction uses: enough to feed every core, small enough to add up.
constexpr int64_t kMaxPartials = 64;

// 1 / sqrt(mean(x^2) + eps) from the row's sum of squares (an exact 1/sqrt, as torch.rsqrt).
BLIP3O_HD float rstd(float sumsq, int64_t n, float eps) {
  return 1.0f / sqrtf(sumsq / static_cast<float>(n) + eps);
}

BLIP3O_HD float forward(float x, float rstd, float w) { return x * rstd * w; }

// dx for one element: g = dy * w, xhat = x * rstd, mean_gxhat = the row mean of g * xhat.
BLIP3O_HD float grad_x(float g, float xhat, float mean_gxhat, float rstd) {
  return rstd * (g - xhat * mean_gxhat);
}

}  // namespace blip3o::rms_norm
