// Flow-matching sampler update CUDA kernels (contract: python/blip3o_fast/ops/flow_step.py; math:
// blip3o/flow_step.h, shared with the CPU face). Elementwise grid-stride loops over the B*N latents;
// with the doubled CFG batch, element e's unconditional velocity is v[e], its conditional one
// v[B*N + e]. The v_prev / v_save branches are uniform across the grid, so they cost nothing; only
// the guided form is a template. The exact kernel rounds through the model dtype after each operation and
// uses __fmul_rn / __fadd_rn (via the header) so nothing fuses into an FMA.
#include "blip3o/flow_step.h"
#include "cuda/cuda_common.cuh"
#include "cuda/kernels.h"

namespace blip3o::cuda {

namespace {

template <bool kGuided, class TX, class TV>
__global__ void fast_kernel(const TX* x, const TV* __restrict__ v, TX* out,
                            const float* v_prev, float* v_save, int64_t total, float dt, float g, float c_prev) {
  // out may alias x and v_save may alias v_prev (no __restrict__ on those four): each element is read
  // before it is written, by the same thread.
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float vc = kGuided ? flow_step::combine(to_float(v[e]), to_float(v[total + e]), g) : to_float(v[e]);
    const float xe = to_float(x[e]);
    const float xn = v_prev ? flow_step::update(xe, dt, vc, c_prev, v_prev[e]) : flow_step::update(xe, dt, vc);
    if (v_save) v_save[e] = vc;
    out[e] = from_float<TX>(xn);
  }
}

template <class T>
__global__ void exact_kernel(const T* x, const T* __restrict__ v, T* out, int64_t total, bool guided, float dt,
                             float g) {
  const auto round = [](float f) { return to_float(from_float<T>(f)); };
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float vc = guided ? flow_step::exact_combine(to_float(v[e]), to_float(v[total + e]), g, round)
                            : to_float(v[e]);
    out[e] = from_float<T>(flow_step::exact_update(to_float(x[e]), dt, vc, round));
  }
}

}  // namespace

const char* flow_step(const void* x, const void* v, void* out, const float* v_prev, float* v_save, int64_t batch,
                      int64_t n, bool guided, float dt, float guidance, float c_prev, bool exact, DType x_dt,
                      DType v_dt, int device, void* stream) {
  const int64_t total = batch * n;
  if (total == 0) return nullptr;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return error_text(guard.status());
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (exact) {  // the binding checks x and v share a dtype here
    visit_device_dtype(v_dt, [&](auto tag) {
      using T = decltype(tag);
      exact_kernel<T><<<grid_for(total, 256), 256, 0, st>>>(static_cast<const T*>(x), static_cast<const T*>(v),
                                                            static_cast<T*>(out), total, guided, dt, guidance);
    });
    return launch_status();
  }
  visit_device_dtype(x_dt, [&](auto xtag) {
    using TX = decltype(xtag);
    visit_device_dtype(v_dt, [&](auto vtag) {
      using TV = decltype(vtag);
      const auto* xp = static_cast<const TX*>(x);
      const auto* vp = static_cast<const TV*>(v);
      auto* op = static_cast<TX*>(out);
      const unsigned blocks = grid_for(total, 256);
      if (guided)
        fast_kernel<true><<<blocks, 256, 0, st>>>(xp, vp, op, v_prev, v_save, total, dt, guidance, c_prev);
      else
        fast_kernel<false><<<blocks, 256, 0, st>>>(xp, vp, op, v_prev, v_save, total, dt, guidance, c_prev);
    });
  });
  return launch_status();
}

}  // namespace blip3o::cuda
