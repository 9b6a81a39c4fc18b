// Residual add + RMSNorm math shared by the CPU and CUDA faces (oracle:
// python/blip3o_fast/ops/residual_rms_norm.py). The norm itself is csrc/include/blip3o/rms_norm.h,
// applied to the rounded sum, so the output follows the rms_norm op's rounding exactly.
#pragma once
#include "blip3o/rms_norm.h"

namespace blip3o::residual_rms_norm {

// The new residual stream before its one rounding to the storage dtype.
BLIP3O_HD float add(float x, float residual) { return x + residual; }

// Gradient of the sum s = x + residual: the incoming dres plus the norm's dx for this element.
BLIP3O_HD float grad_sum(float dres, float g, float xhat, float mean_gxhat, float rstd) {
  return dres + rms_norm::grad_x(g, xhat, mean_gxhat, rstd);
}

}  // namespace blip3o::residual_rms_norm
