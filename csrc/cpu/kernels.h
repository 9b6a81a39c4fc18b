// CPU kernels over raw pointers (contiguous, one storage dtype per call, math in fp32).
// Shapes follow the kernel contracts in python/blip3o_fast/ops/<op>.py.
#pragma once
#include <cstdint>

#include "blip3o/common.h"
#include "blip3o/dit_attention.h"
#include "blip3o/varlen_prefill_attention.h"
#include "blip3o/paged_decode_attention.h"

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

// Paged decode attention: pointers and dims per python/blip3o_fast/ops/paged_decode_attention.py.
void paged_decode_attention(const paged_decode_attention::Args& args, const paged_decode_attention::Dims& dims,
                            DType dt);

// Fused linear + cross-entropy: hidden (n, h), weight (v, h), targets (n) int64; dhidden / dweight may be
// null (not wanted). Contract: python/blip3o_fast/ops/linear_cross_entropy.py.
void linear_cross_entropy_fwd(const void* hidden, const void* weight, const int64_t* targets, float* loss,
                              float* lse, int64_t n, int64_t h, int64_t v, int64_t ignore_index, DType dt);
void linear_cross_entropy_bwd(const float* dloss, const void* hidden, const void* weight, const int64_t* targets,
                              const float* lse, void* dhidden, void* dweight, int64_t n, int64_t h, int64_t v,
                              int64_t ignore_index, DType dt);

// Varlen causal prefill attention: q/out (tokens, heads, d), k/v (tokens, kv_heads, d), cu_seqlens
// (seqs + 1) int32 offsets. Contract: python/blip3o_fast/ops/varlen_prefill_attention.py.
void varlen_prefill_attention_fwd(const void* q, const void* k, const void* v, const int32_t* cu_seqlens, void* out,
                                  const varlen_prefill_attention::Dims& dims, DType dt);

// RoPE (rotate-half) of q (tokens, heads, d) and k (tokens, kv_heads, d) fused with the paged KV-cache write
// of rotated k and v at slots (tokens) int64 (outside [0, num_slots): not written). cos/sin (tokens, d/2).
// Contract: python/blip3o_fast/ops/rope_kv_cache_write.py.
void rope_kv_cache_write(const void* q, const void* k, const void* v, const float* cos, const float* sin,
                         void* k_cache, void* v_cache, const int64_t* slots, void* q_rot, void* k_rot,
                         int64_t tokens, int64_t heads, int64_t kv_heads, int64_t d, int64_t num_slots, DType dt);

// Decoder residual add + RMSNorm: x, residual, out, new_residual, dy, dres, s, ds (rows, n); rstd (rows)
// and dweight fp32. Contract: python/blip3o_fast/ops/residual_rms_norm.py.
void residual_rms_norm_fwd(const void* x, const void* residual, const void* weight, void* out, void* new_residual,
                           float* rstd, int64_t rows, int64_t n, float eps, DType dt);
void residual_rms_norm_bwd(const void* dy, const void* dres, const void* s, const void* weight, const float* rstd,
                           void* ds, float* dweight, int64_t rows, int64_t n, DType dt);

// Per-row token sampling over logits (batch, vocab); the per-row parameters and outputs have batch
// entries. Contract: python/blip3o_fast/ops/sample_tokens.py.
void sample_tokens(const void* logits, const float* temperature, const int32_t* top_k, const float* top_p,
                   const int64_t* seeds, const int64_t* counters, int64_t* tokens, float* logprobs, int64_t batch,
                   int64_t vocab, DType dt);

// Small-M linear for decode steps: out (m, n) = x (m, k) @ weight (n, k)^T + bias (n) (bias may be
// nullptr). Contract: python/blip3o_fast/ops/decode_linear.py.
void decode_linear(const void* x, const void* weight, const void* bias, void* out, int64_t m, int64_t n, int64_t k,
                   DType dt);

}  // namespace blip3o::cpu
