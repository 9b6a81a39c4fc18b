// CPU kernels over raw pointers (contiguous, one storage dtype per call, math in fp32).
// Shapes follow the kernel contracts in python/blip3o_fast/ops/<op>.py.
#pragma once
#include <cstdint>

#include "blip3o/common.h"

namespace blip3o::cpu {

void rms_norm_fwd(const void* x, const void* weight, void* out, float* rstd, int64_t rows, int64_t n, float eps,
                  DType dt);
void rms_norm_bwd(const void* dy, const void* x, const void* weight, const float* rstd, void* dx, float* dweight,
                  int64_t rows, int64_t n, DType dt);

// x/out (tokens, heads, d); cos/sin (tokens, d/2) with tokens = B * T.
void rope_apply(const void* x, const float* cos, const float* sin, void* out, int64_t tokens, int64_t heads,
                int64_t d, bool interleaved, bool inverse, DType dt);

void swiglu_fwd(const void* gate, const void* up, void* out, int64_t n, DType dt);
void swiglu_bwd(const void* dy, const void* gate, const void* up, void* dgate, void* dup, int64_t n, DType dt);

void rms_norm_modulate_fwd(const void* x, const void* weight, const void* scale, void* out, float* rstd,
                           int64_t batch, int64_t t, int64_t n, float eps, DType dt);
void rms_norm_modulate_bwd(const void* dy, const void* x, const void* weight, const void* scale, const float* rstd,
                           void* dx, float* dweight, float* dscale, int64_t batch, int64_t t, int64_t n, DType dt);

}  // namespace blip3o::cpu
