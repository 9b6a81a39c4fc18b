// adaLN RMSNorm-zero CUDA launchers; kernels in rms_norm_kernels.cuh (kMod = true), math in
// csrc/include/blip3o/rms_norm_modulate.h.
#include "cuda/kernels.h"
#include "cuda/rms_norm_kernels.cuh"

namespace blip3o::cuda {

const char* rms_norm_modulate_fwd(const void* x, const void* weight, const void* scale, void* out, float* rstd,
                                  int64_t batch, int64_t t, int64_t n, float eps, DType dt, int device,
                                  void* stream) {
  return rmsnorm::forward<true>(x, weight, scale, out, rstd, batch * t, t, n, eps, dt, device, stream);
}

const char* rms_norm_modulate_bwd(const void* dy, const void* x, const void* weight, const void* scale,
                                  const float* rstd, void* dx, float* dweight, float* dscale, int64_t batch,
                                  int64_t t, int64_t n, DType dt, int device, void* stream) {
  return rmsnorm::backward<true>(dy, x, weight, scale, rstd, dx, dweight, dscale, batch, t, n, dt, device, stream);
}

}  // namespace blip3o::cuda
