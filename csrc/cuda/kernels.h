// CUDA launchers over raw device pointers, the same shapes as the CPU kernels (csrc/cpu/kernels.h).
// Plain C++ (no CUDA types) so bindings.cpp can include it. Each launch runs on `stream` (a
// cudaStream_t) with `device` made current for the call; returns nullptr or the CUDA error text.
#pragma once
#include <cstdint>

#include "blip3o/common.h"
#include "blip3o/dit_attention.h"
#include "blip3o/varlen_prefill_attention.h"
#include "blip3o/paged_decode_attention.h"

namespace blip3o::cuda {

const char* rms_norm_fwd(const void* x, const void* weight, void* out, float* rstd, int64_t rows, int64_t n,
                         float eps, DType dt, int device, void* stream);
const char* rms_norm_bwd(const void* dy, const void* x, const void* weight, const float* rstd, void* dx,
                         float* dweight, int64_t rows, int64_t n, DType dt, int device, void* stream);

const char* rope_apply(const void* x, const float* cos, const float* sin, void* out, int64_t tokens, int64_t heads,
                       int64_t d, bool interleaved, bool inverse, DType dt, int device, void* stream);

const char* swiglu_fwd(const void* gate, const void* up, void* out, int64_t n, DType dt, int device, void* stream);
const char* swiglu_bwd(const void* dy, const void* gate, const void* up, void* dgate, void* dup, int64_t n,
                       DType dt, int device, void* stream);

const char* rms_norm_modulate_fwd(const void* x, const void* weight, const void* scale, void* out, float* rstd,
                                  int64_t batch, int64_t t, int64_t n, float eps, DType dt, int device,
                                  void* stream);
const char* rms_norm_modulate_bwd(const void* dy, const void* x, const void* weight, const void* scale,
                                  const float* rstd, void* dx, float* dweight, float* dscale, int64_t batch,
                                  int64_t t, int64_t n, DType dt, int device, void* stream);

// Fused DiT attention: pointers and dims per python/blip3o_fast/ops/dit_attention.py.
const char* dit_attention_fwd(const dit_attention::FwdArgs& args, const dit_attention::Dims& dims, DType dt,
                              int device, void* stream);
const char* dit_attention_bwd(const dit_attention::BwdArgs& args, const dit_attention::Dims& dims, DType dt,
                              int device, void* stream);

// Fused DiT block epilogue, as csrc/cpu/kernels.h.
const char* gated_residual_norm_fwd(const void* x, const void* y, const void* y_weight, const void* gate,
                                    const void* next_weight, const void* next_scale, void* x_out, void* h,
                                    float* rstd_y, float* rstd_x, int64_t batch, int64_t t, int64_t n, float eps,
                                    DType dt, int device, void* stream);
const char* gated_residual_norm_bwd(const void* dxo, const void* dh, const void* x, const void* y,
                                    const void* y_weight, const void* gate, const void* next_weight,
                                    const void* next_scale, const float* rstd_y, const float* rstd_x, void* dx,
                                    void* dy, float* dy_weight, float* dgate, float* dnext_weight,
                                    float* dnext_scale, int64_t batch, int64_t t, int64_t n, DType dt, int device,
                                    void* stream);

// Flow-matching sampler update, as csrc/cpu/kernels.h.
const char* flow_step(const void* x, const void* v, void* out, const float* v_prev, float* v_save, int64_t batch,
                      int64_t n, bool guided, float dt, float guidance, float c_prev, bool exact, DType x_dt,
                      DType v_dt, int device, void* stream);

// Paged decode attention, as csrc/cpu/kernels.h.
const char* paged_decode_attention(const paged_decode_attention::Args& args, const paged_decode_attention::Dims& dims,
                                   DType dt, int device, void* stream);

// Fused linear + cross-entropy, as csrc/cpu/kernels.h.
const char* linear_cross_entropy_fwd(const void* hidden, const void* weight, const int64_t* targets, float* loss,
                                     float* lse, int64_t n, int64_t h, int64_t v, int64_t ignore_index, DType dt,
                                     int device, void* stream);
const char* linear_cross_entropy_bwd(const float* dloss, const void* hidden, const void* weight,
                                     const int64_t* targets, const float* lse, void* dhidden, void* dweight,
                                     int64_t n, int64_t h, int64_t v, int64_t ignore_index, DType dt, int device,
                                     void* stream);

// Varlen causal prefill attention, as csrc/cpu/kernels.h (cu_seqlens on the device).
const char* varlen_prefill_attention_fwd(const void* q, const void* k, const void* v, const int32_t* cu_seqlens,
                                         void* out, const varlen_prefill_attention::Dims& dims, DType dt,
                                         int device, void* stream);

// RoPE of q and k fused with the paged KV-cache write, as csrc/cpu/kernels.h.
const char* rope_kv_cache_write(const void* q, const void* k, const void* v, const float* cos, const float* sin,
                                void* k_cache, void* v_cache, const int64_t* slots, void* q_rot, void* k_rot,
                                int64_t tokens, int64_t heads, int64_t kv_heads, int64_t d, int64_t num_slots,
                                DType dt, int device, void* stream);

// Decoder residual add + RMSNorm, as csrc/cpu/kernels.h.
const char* residual_rms_norm_fwd(const void* x, const void* residual, const void* weight, void* out,
                                  void* new_residual, float* rstd, int64_t rows, int64_t n, float eps, DType dt,
                                  int device, void* stream);
const char* residual_rms_norm_bwd(const void* dy, const void* dres, const void* s, const void* weight,
                                  const float* rstd, void* ds, float* dweight, int64_t rows, int64_t n, DType dt,
                                  int device, void* stream);

// Per-row token sampling, as csrc/cpu/kernels.h (every pointer on the device).
const char* sample_tokens(const void* logits, const float* temperature, const int32_t* top_k, const float* top_p,
                          const int64_t* seeds, const int64_t* counters, int64_t* tokens, float* logprobs,
                          int64_t batch, int64_t vocab, DType dt, int device, void* stream);

// Small-M linear for decode steps, as csrc/cpu/kernels.h (bias may be nullptr).
const char* decode_linear(const void* x, const void* weight, const void* bias, void* out, int64_t m, int64_t n,
                          int64_t k, DType dt, int device, void* stream);

}  // namespace blip3o::cuda
