// CUDA launchers over raw device pointers, the same shapes as the CPU kernels (csrc/cpu/kernels.h).
// Plain C++ (no CUDA types) so bindings.cpp can include it. Each launch runs on `stream` (a
// cudaStream_t) with `device` made current for the call; returns nullptr or the CUDA error text.
#pragma once
#include <cstdint>

#include "blip3o/common.h"

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

}  // namespace blip3o::cuda
