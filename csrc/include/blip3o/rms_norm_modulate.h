// adaLN RMSNorm-zero math shared by the CPU and CUDA faces
// (oracle: python/blip3o_fast/ops/rms_norm_modulate.py). The norm itself is rms_norm.h's.
#pragma once
#include "blip3o/rms_norm.h"

namespace blip3o::rms_norm_modulate {

// y = (x * rstd * w) * (1 + scale), with one_plus_scale = 1 + scale rounded in fp32 as the reference does.
BLIP3O_HD float forward(float x, float rstd, float w, float one_plus_scale) {
  return x * rstd * w * one_plus_scale;
}

// Backward pieces per element, xhat = x * rstd:
//   dscale term dy * (xhat * w), dweight term (dy * (1 + scale)) * xhat, g = dy * (1 + scale) * w;
// dx is then rms_norm::grad_x(g, xhat, mean(g * xhat), rstd).
BLIP3O_HD float dscale_term(float dy, float xhat, float w) { return dy * (xhat * w); }
BLIP3O_HD float dn(float dy, float one_plus_scale) { return dy * one_plus_scale; }

// dweight/dscale partial sums: each batch's T rows are cut into chunks_per_batch(B, T, target)
// contiguous chunks so that about `target` chunks exist in all; a fixed function of the shape, so
// the sums do not depend on thread or block counts.
BLIP3O_HD int64_t chunks_per_batch(int64_t b, int64_t t, int64_t target) {
  if (b < 1) return 1;
  int64_t c = (target + b - 1) / b;
  if (c > t) c = t;
  return c < 1 ? 1 : c;
}

}  // namespace blip3o::rms_norm_modulate
