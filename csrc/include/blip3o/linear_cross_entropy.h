// Fused linear + cross-entropy math shared by the CPU and CUDA faces
// (oracle: python/blip3o_fast/ops/linear_cross_entropy.py). A row's logits arrive tile by tile;
// the online log-sum-exp keeps a running max and a sum of exp(logit - max) rescaled when the max grows.
#pragma once
#include "blip3o/common.h"

namespace blip3o::linear_cross_entropy {

// Start value of a running max: the lowest finite float, so max - max never meets inf - inf.
constexpr float kLowest = -3.402823466e38f;
// Stands in for the lse of a row with no gradient (ignored or padding): exp(logit - kInactiveLse) is 0,
// so a zero gradient times it stays 0 where exp(logit - 0) could overflow to inf and give NaN.
constexpr float kInactiveLse = 3.402823466e38f;

// The running sum after the max moves from old_max to new_max (new_max >= old_max).
BLIP3O_HD float rescale(float sum, float old_max, float new_max) { return sum * expf(old_max - new_max); }

BLIP3O_HD float lse(float max, float sum) { return max + logf(sum); }

// Per-row loss: lse - the target's logit.
BLIP3O_HD float row_loss(float lse_row, float target_logit) { return lse_row - target_logit; }

// d loss_row / d logit times the row's incoming gradient g: (softmax - onehot) * g.
BLIP3O_HD float dlogit(float logit, float lse_row, float g, bool is_target) {
  return (expf(logit - lse_row) - (is_target ? 1.0f : 0.0f)) * g;
}

}  // namespace blip3o::linear_cross_entropy
