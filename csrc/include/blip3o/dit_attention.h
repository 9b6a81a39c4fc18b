// Fused DiT attention math shared by the CPU and CUDA faces (oracle: python/blip3o_fast/ops/dit_attention.py):
// LayerNorm across all heads of a token, the interleaved RoPE pair rotation (rope.h), the online-softmax
// update, the softmax backward and the per-head tanh gate. Also the call's dims and pointers, so the CPU
// and CUDA entry points take one argument struct instead of twenty pointers.
#pragma once
#include "blip3o/common.h"
#include "blip3o/rope.h"

namespace blip3o::dit_attention {

constexpr float kLnEps = 1e-5f;  // fixed, as in Lumina-Next

struct Dims {
  int64_t b, tq, tk, hq, hkv, d;
};

// One forward call; nullptr where the contract's optional input or output is absent.
struct FwdArgs {
  const void *q, *k, *v, *q_weight, *q_bias, *k_weight, *k_bias;
  const float *cos, *sin;
  const bool* key_mask;
  const void *gate, *residual;
  bool rope_k;
  void* out;
  float* lse;
  void* out_ungated;
};

// One backward call; dk_weight/dk_bias are given iff k_weight is, dgate iff gate is.
struct BwdArgs {
  const void *dout, *q, *k, *v, *q_weight, *q_bias, *k_weight, *k_bias;
  const float *cos, *sin;
  const bool* key_mask;
  const void* gate;
  bool rope_k;
  const void* out_ungated;
  const float* lse;
  void *dq, *dk, *dv;
  float *dq_weight, *dq_bias, *dk_weight, *dk_bias, *dgate;
};

// LayerNorm over a token's n = H*D values: rstd from the biased variance, as torch.layer_norm.
BLIP3O_HD float ln_rstd(float var) { return 1.0f / sqrtf(var + kLnEps); }
BLIP3O_HD float ln_apply(float x, float mean, float rstd, float w, float b) { return (x - mean) * rstd * w + b; }

// dx of one element: g = dy * w, xhat = (x - mean) * rstd, mean_g / mean_gx = row means of g and g * xhat.
BLIP3O_HD float ln_grad_x(float g, float xhat, float mean_g, float mean_gx, float rstd) {
  return rstd * (g - mean_g - xhat * mean_gx);
}

// Online softmax: the factor that rescales what was accumulated under the old running max. A row whose
// keys so far are all masked has m_old = -inf and nothing accumulated; exp(-inf) = 0 covers it.
BLIP3O_HD float online_rescale(float m_old, float m_new) { return m_old == m_new ? 1.0f : expf(m_old - m_new); }

// Probability of a key under a row's final (max, sum) or lse; masked keys (s = -inf) and fully masked
// rows (lse = -inf) give 0 instead of NaN.
BLIP3O_HD float prob(float s, float lse) { return lse == -INFINITY || s == -INFINITY ? 0.0f : expf(s - lse); }

// lse of a row from its running max and sum; -inf for a fully masked row.
BLIP3O_HD float row_lse(float m, float l) { return m == -INFINITY ? -INFINITY : m + logf(l); }

// Softmax backward: dS = P * (dP - delta), delta = rowsum(dO * O).
BLIP3O_HD float grad_score(float p, float dp, float delta) { return p * (dp - delta); }

// Gate: out = residual + tanh(g) * o; d(tanh g)/dg = 1 - tanh^2.
BLIP3O_HD float gate_factor(float g) { return tanhf(g); }
BLIP3O_HD float gate_grad_scale(float t) { return 1.0f - t * t; }
BLIP3O_HD float gated(float o, float t, float residual) { return t * o + residual; }

// Partial sums a parameter-gradient reduction uses at most: a fixed function of the shape, so sums are
// deterministic whatever the thread or block counts.
constexpr int64_t kMaxPartials = 64;

}  // namespace blip3o::dit_attention
