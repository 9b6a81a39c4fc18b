// RMSNorm CUDA launchers; kernels in rms_norm_kernels.cuh, math in csrc/include/blip3o/rms_norm.h.
#include "cuda/kernels.h"
#include "cuda/rms_norm_kernels.cuh"

namespace blip3o::cuda {

const char* rms_norm_fwd(const void* x, const void* weight, void* out, float* rstd, int64_t rows, int64_t n,
                         float eps, DType dt, int device, void* stream) {
  return rmsnorm::forward<false>(x, weight, nullptr, out, rstd, rows, rows, n, eps, dt, device, stream);
}

const char* rms_norm_bwd(const void* dy, const void* x, const void* weight, const float* rstd, void* dx,
                         float* dweight, int64_t rows, int64_t n, DType dt, int device, void* stream) {
  return rmsnorm::backward<false>(dy, x, weight, nullptr, rstd, dx, dweight, nullptr, 1, rows, n, dt, device,
                                  stream);
}

}  // namespace blip3o::cuda
