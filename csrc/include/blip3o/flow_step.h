// Flow-matching sampler update math shared by the CPU and CUDA faces
// (oracle: python/blip3o_fast/ops/flow_step.py).
#pragma once
#include "blip3o/common.h"

namespace blip3o::flow_step {

// Classifier-free guidance in fp32: v_u + g * (v_c - v_u).
BLIP3O_HD float combine(float vu, float vc, float g) { return vu + g * (vc - vu); }

// The new latent in fp32: x + dt * v (+ c_prev * v_prev when the solver keeps a history).
BLIP3O_HD float update(float x, float dt, float v) { return x + dt * v; }
BLIP3O_HD float update(float x, float dt, float v, float c_prev, float v_prev) { return x + dt * v + c_prev * v_prev; }

// Products and sums that must not fuse into an FMA (nvcc contracts a * b + c by default; the CPU
// build has -ffp-contract=off).
BLIP3O_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
BLIP3O_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// The released sampler's arithmetic (exact mode): `round` rounds an fp32 value to the model's
// storage dtype and back, as each PyTorch op in that dtype does. The combine rounds after each
// of its three operations (guidance itself stays fp32: PyTorch keeps a Python scalar on the right
// unrounded). The scheduler step computes dt * v in the model dtype, adds it to x in fp32 and
// rounds back. dt is a float32 0-dim CPU tensor there, which PyTorch's CPU kernels round to the
// model dtype before the product and its CUDA kernels keep in fp32: each face passes dt as its
// device's PyTorch sees it.
template <class Round>
BLIP3O_HD float exact_combine(float vu, float vc, float g, Round round) {
  return round(add_rn(vu, round(mul_rn(g, round(vc - vu)))));
}
template <class Round>
BLIP3O_HD float exact_update(float x, float dt, float v, Round round) {
  return round(add_rn(x, round(mul_rn(dt, v))));
}

}  // namespace blip3o::flow_step
