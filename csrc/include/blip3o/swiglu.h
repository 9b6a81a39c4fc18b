// SwiGLU math shared by the CPU and CUDA faces (oracle: python/blip3o_fast/ops/swiglu.py).
// silu(g) = g / (1 + exp(-g)) and sigmoid(g) = 1 / (1 + exp(-g)), as torch computes them.
#pragma once
#include "blip3o/common.h"

namespace blip3o::swiglu {

BLIP3O_HD float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

BLIP3O_HD float forward(float g, float u) { return g / (1.0f + expf(-g)) * u; }

BLIP3O_HD float grad_gate(float dy, float g, float u, float sig) {
  return dy * u * sig * (1.0f + g * (1.0f - sig));
}

BLIP3O_HD float grad_up(float dy, float g, float sig) { return dy * g * sig; }

}  // namespace blip3o::swiglu
