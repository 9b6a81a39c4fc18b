// CPU kernels over raw pointers (contiguous, one storage dtype per call, math in fp32).
// Shapes follow the kernel contracts in python/blip3o_fast/ops/<op>.py.
#pragma once
#include <cstdint>

#include "blip3o/common.h"
#include "blip3o/dit_attention.h"

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

// Fused DiT attention: pointers and dims per python/blip3o_fast/ops/dit_attention.py.
void dit_attention_fwd(const dit_attention::FwdArgs& args, const dit_attention::Dims& dims, DType dt);
void dit_attention_bwd(const dit_attention::BwdArgs& args, const dit_attention::Dims& dims, DType dt);

// Fused DiT block epilogue: the next-norm pointers (next_weight, next_scale, h, rstd_x; dh,
// dnext_weight, dnext_scale) are all null or all set.
void gated_residual_norm_fwd(const void* x, const void* y, const void* y_weight, const void* gate,
                             const void* next_weight, const void* next_scale, void* x_out, void* h, float* rstd_y,
                             float* rstd_x, int64_t batch, int64_t t, int64_t n, float eps, DType dt);
void gated_residual_norm_bwd(const void* dxo, const void* dh, const void* x, const void* y, const void* y_weight,
                             const void* gate, const void* next_weight, const void* next_scale, const float* rstd_y,
                             const float* rstd_x, void* dx, void* dy, float* dy_weight, float* dgate,
                             float* dnext_weight, float* dnext_scale, int64_t batch, int64_t t, int64_t n, DType dt);

// Flow-matching sampler update over x/out (batch, n) and v (batch or 2 * batch when guided, n);
// v_prev / v_save fp32 or null.
void flow_step(const void* x, const void* v, void* out, const float* v_prev, float* v_save, int64_t batch,
               int64_t n, bool guided, float dt, float guidance, float c_prev, bool exact, DType x_dt, DType v_dt);

}  // namespace blip3o::cpu
