// Fused DiT block epilogue math shared by the CPU and CUDA faces
// (oracle: python/blip3o_fast/ops/gated_residual_norm.py). Products keep the reference's
// left-to-right order; the norms themselves are rms_norm.h's and rms_norm_modulate.h's.
#pragma once
#include "blip3o/rms_norm_modulate.h"

namespace blip3o::gated_residual_norm {

// The new residual stream in fp32: x + gate * (y * rstd_y) * y_weight.
BLIP3O_HD float residual(float x, float gate, float y, float rstd_y, float wy) { return x + gate * (y * rstd_y) * wy; }

// Backward pieces per element (names as in the contract: yhat = y * rstd_y, xohat = x_out * rstd_x,
// s1 = 1 + next_scale):
//   gh = dh * s1 * wn, the gradient reaching the next norm's xohat;
//   gxo = dxo + rstd_x * (gh - xohat * mean(gh * xohat)), the total gradient of x_out (and of x);
//   gy = gxo * gate * wy, whose rms_norm::grad_x gives dy.
BLIP3O_HD float grad_h(float dh, float s1, float wn) { return dh * s1 * wn; }
BLIP3O_HD float grad_xo(float dxo, float gh, float xohat, float mean_h, float rstd_x) {
  return dxo + rms_norm::grad_x(gh, xohat, mean_h, rstd_x);
}
BLIP3O_HD float grad_y_in(float gxo, float gate, float wy) { return gxo * gate * wy; }

// Parameter-gradient terms, summed over rows: dgate (over t), dy_weight (over b, t),
// dnext_scale (over t), dnext_weight (over b, t).
BLIP3O_HD float dgate_term(float gxo, float yhat, float wy) { return gxo * yhat * wy; }
BLIP3O_HD float dyw_term(float gxo, float gate, float yhat) { return gxo * gate * yhat; }
BLIP3O_HD float dns_term(float dh, float xohat, float wn) { return dh * xohat * wn; }
BLIP3O_HD float dnw_term(float dh, float s1, float xohat) { return dh * s1 * xohat; }

}  // namespace blip3o::gated_residual_norm
