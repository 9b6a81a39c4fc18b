// nanobind module blip3o_fast._C: one entry per kernel. Tensors arrive zero-copy over DLPack as
// C-contiguous ndarrays; .noconvert() everywhere, so a tensor of the wrong dtype or layout is
// refused instead of silently copied (a kernel would then write into the copy). Arguments are
// checked against the kernel contracts (binding_utils.h), then the GIL is released for the kernel.
// CUDA entries end in _cuda and take the cudaStream_t (as an integer) last.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <stdexcept>

#include "binding_utils.h"
#include "cpu/cpu_features.h"
#include "cpu/kernels.h"
#ifdef BLIP3O_WITH_CUDA
#include "cuda/kernels.h"
#endif

namespace nb = nanobind;
using namespace nb::literals;
using blip3o::bind::f32;
namespace check = blip3o::bind;
namespace cpu = blip3o::cpu;

using CpuArray = nb::ndarray<nb::device::cpu, nb::c_contig>;

#ifdef BLIP3O_WITH_CUDA
namespace cuda = blip3o::cuda;
using CudaArray = nb::ndarray<nb::device::cuda, nb::c_contig>;

// Runs a launcher without the GIL and turns its CUDA error text into a RuntimeError.
template <class Launch>
void cuda_call(const char* op, Launch&& launch) {
  const char* err;
  {
    nb::gil_scoped_release nogil;
    err = launch();
  }
  if (err != nullptr) throw std::runtime_error(std::string(op) + ": CUDA error: " + err);
}

inline void* as_stream(uintptr_t s) { return reinterpret_cast<void*>(s); }
#endif

NB_MODULE(_C, m) {
  m.doc() = "blip3o_fast compiled kernels (CPU, and CUDA when built with a toolkit)";
  m.def("cpu_features", &blip3o::cpu::feature_string);
#ifdef BLIP3O_WITH_CUDA
  m.def("has_cuda", [] { return true; });
#else
  m.def("has_cuda", [] { return false; });
#endif

  m.def("rms_norm_fwd", [](CpuArray x, CpuArray w, CpuArray out, CpuArray rstd, float eps) {
    const auto s = check::check_rms_norm_fwd(x, w, out, rstd);
    nb::gil_scoped_release nogil;
    cpu::rms_norm_fwd(x.data(), w.data(), out.data(), f32(rstd.data()), s.rows, s.n, eps, s.dt);
  }, "x"_a.noconvert(), "weight"_a.noconvert(), "out"_a.noconvert(), "rstd"_a.noconvert(), "eps"_a);

  m.def("rms_norm_bwd", [](CpuArray dy, CpuArray x, CpuArray w, CpuArray rstd, CpuArray dx, CpuArray dw) {
    const auto s = check::check_rms_norm_bwd(dy, x, w, rstd, dx, dw);
    nb::gil_scoped_release nogil;
    cpu::rms_norm_bwd(dy.data(), x.data(), w.data(), f32(rstd.data()), dx.data(), f32(dw.data()), s.rows, s.n, s.dt);
  }, "dy"_a.noconvert(), "x"_a.noconvert(), "weight"_a.noconvert(), "rstd"_a.noconvert(), "dx"_a.noconvert(),
     "dweight"_a.noconvert());

  m.def("rope_apply", [](CpuArray x, CpuArray cos, CpuArray sin, CpuArray out, bool interleaved, bool inverse) {
    const auto s = check::check_rope_apply(x, cos, sin, out);
    nb::gil_scoped_release nogil;
    cpu::rope_apply(x.data(), f32(cos.data()), f32(sin.data()), out.data(), s.tokens, s.heads, s.d, interleaved,
                    inverse, s.dt);
  }, "x"_a.noconvert(), "cos"_a.noconvert(), "sin"_a.noconvert(), "out"_a.noconvert(), "interleaved"_a,
     "inverse"_a);

  m.def("swiglu_fwd", [](CpuArray gate, CpuArray up, CpuArray out) {
    const auto s = check::check_swiglu_fwd(gate, up, out);
    nb::gil_scoped_release nogil;
    cpu::swiglu_fwd(gate.data(), up.data(), out.data(), s.n, s.dt);
  }, "gate"_a.noconvert(), "up"_a.noconvert(), "out"_a.noconvert());

  m.def("swiglu_bwd", [](CpuArray dy, CpuArray gate, CpuArray up, CpuArray dgate, CpuArray dup) {
    const auto s = check::check_swiglu_bwd(dy, gate, up, dgate, dup);
    nb::gil_scoped_release nogil;
    cpu::swiglu_bwd(dy.data(), gate.data(), up.data(), dgate.data(), dup.data(), s.n, s.dt);
  }, "dy"_a.noconvert(), "gate"_a.noconvert(), "up"_a.noconvert(), "dgate"_a.noconvert(), "dup"_a.noconvert());

  m.def("rms_norm_modulate_fwd", [](CpuArray x, CpuArray w, CpuArray scale, CpuArray out, CpuArray rstd, float eps) {
    const auto s = check::check_rms_norm_modulate_fwd(x, w, scale, out, rstd);
    nb::gil_scoped_release nogil;
    cpu::rms_norm_modulate_fwd(x.data(), w.data(), scale.data(), out.data(), f32(rstd.data()), s.batch, s.t, s.n,
                               eps, s.dt);
  }, "x"_a.noconvert(), "weight"_a.noconvert(), "scale"_a.noconvert(), "out"_a.noconvert(), "rstd"_a.noconvert(),
     "eps"_a);

  m.def("rms_norm_modulate_bwd", [](CpuArray dy, CpuArray x, CpuArray w, CpuArray scale, CpuArray rstd, CpuArray dx,
                                    CpuArray dw, CpuArray ds) {
    const auto s = check::check_rms_norm_modulate_bwd(dy, x, w, scale, rstd, dx, dw, ds);
    nb::gil_scoped_release nogil;
    cpu::rms_norm_modulate_bwd(dy.data(), x.data(), w.data(), scale.data(), f32(rstd.data()), dx.data(),
                               f32(dw.data()), f32(ds.data()), s.batch, s.t, s.n, s.dt);
  }, "dy"_a.noconvert(), "x"_a.noconvert(), "weight"_a.noconvert(), "scale"_a.noconvert(), "rstd"_a.noconvert(),
     "dx"_a.noconvert(), "dweight"_a.noconvert(), "dscale"_a.noconvert());

#ifdef BLIP3O_WITH_CUDA
  m.def("rms_norm_fwd_cuda", [](CudaArray x, CudaArray w, CudaArray out, CudaArray rstd, float eps, uintptr_t st) {
    const auto s = check::check_rms_norm_fwd(x, w, out, rstd);
    cuda_call("rms_norm_fwd_cuda", [&] {
      return cuda::rms_norm_fwd(x.data(), w.data(), out.data(), f32(rstd.data()), s.rows, s.n, eps, s.dt, s.device,
                                as_stream(st));
    });
  }, "x"_a.noconvert(), "weight"_a.noconvert(), "out"_a.noconvert(), "rstd"_a.noconvert(), "eps"_a, "stream"_a);

  m.def("rms_norm_bwd_cuda", [](CudaArray dy, CudaArray x, CudaArray w, CudaArray rstd, CudaArray dx, CudaArray dw,
                                uintptr_t st) {
    const auto s = check::check_rms_norm_bwd(dy, x, w, rstd, dx, dw);
    cuda_call("rms_norm_bwd_cuda", [&] {
      return cuda::rms_norm_bwd(dy.data(), x.data(), w.data(), f32(rstd.data()), dx.data(), f32(dw.data()), s.rows,
                                s.n, s.dt, s.device, as_stream(st));
    });
  }, "dy"_a.noconvert(), "x"_a.noconvert(), "weight"_a.noconvert(), "rstd"_a.noconvert(), "dx"_a.noconvert(),
     "dweight"_a.noconvert(), "stream"_a);

  m.def("rope_apply_cuda", [](CudaArray x, CudaArray cos, CudaArray sin, CudaArray out, bool interleaved,
                              bool inverse, uintptr_t st) {
    const auto s = check::check_rope_apply(x, cos, sin, out);
    cuda_call("rope_apply_cuda", [&] {
      return cuda::rope_apply(x.data(), f32(cos.data()), f32(sin.data()), out.data(), s.tokens, s.heads, s.d,
                              interleaved, inverse, s.dt, s.device, as_stream(st));
    });
  }, "x"_a.noconvert(), "cos"_a.noconvert(), "sin"_a.noconvert(), "out"_a.noconvert(), "interleaved"_a,
     "inverse"_a, "stream"_a);

  m.def("swiglu_fwd_cuda", [](CudaArray gate, CudaArray up, CudaArray out, uintptr_t st) {
    const auto s = check::check_swiglu_fwd(gate, up, out);
    cuda_call("swiglu_fwd_cuda", [&] {
      return cuda::swiglu_fwd(gate.data(), up.data(), out.data(), s.n, s.dt, s.device, as_stream(st));
    });
  }, "gate"_a.noconvert(), "up"_a.noconvert(), "out"_a.noconvert(), "stream"_a);

  m.def("swiglu_bwd_cuda", [](CudaArray dy, CudaArray gate, CudaArray up, CudaArray dgate, CudaArray dup,
                              uintptr_t st) {
    const auto s = check::check_swiglu_bwd(dy, gate, up, dgate, dup);
    cuda_call("swiglu_bwd_cuda", [&] {
      return cuda::swiglu_bwd(dy.data(), gate.data(), up.data(), dgate.data(), dup.data(), s.n, s.dt, s.device,
                              as_stream(st));
    });
  }, "dy"_a.noconvert(), "gate"_a.noconvert(), "up"_a.noconvert(), "dgate"_a.noconvert(), "dup"_a.noconvert(),
     "stream"_a);

  m.def("rms_norm_modulate_fwd_cuda", [](CudaArray x, CudaArray w, CudaArray scale, CudaArray out, CudaArray rstd,
                                         float eps, uintptr_t st) {
    const auto s = check::check_rms_norm_modulate_fwd(x, w, scale, out, rstd);
    cuda_call("rms_norm_modulate_fwd_cuda", [&] {
      return cuda::rms_norm_modulate_fwd(x.data(), w.data(), scale.data(), out.data(), f32(rstd.data()), s.batch,
                                         s.t, s.n, eps, s.dt, s.device, as_stream(st));
    });
  }, "x"_a.noconvert(), "weight"_a.noconvert(), "scale"_a.noconvert(), "out"_a.noconvert(), "rstd"_a.noconvert(),
     "eps"_a, "stream"_a);

  m.def("rms_norm_modulate_bwd_cuda", [](CudaArray dy, CudaArray x, CudaArray w, CudaArray scale, CudaArray rstd,
                                         CudaArray dx, CudaArray dw, CudaArray ds, uintptr_t st) {
    const auto s = check::check_rms_norm_modulate_bwd(dy, x, w, scale, rstd, dx, dw, ds);
    cuda_call("rms_norm_modulate_bwd_cuda", [&] {
      return cuda::rms_norm_modulate_bwd(dy.data(), x.data(), w.data(), scale.data(), f32(rstd.data()), dx.data(),
                                         f32(dw.data()), f32(ds.data()), s.batch, s.t, s.n, s.dt, s.device,
                                         as_stream(st));
    });
  }, "dy"_a.noconvert(), "x"_a.noconvert(), "weight"_a.noconvert(), "scale"_a.noconvert(), "rstd"_a.noconvert(),
     "dx"_a.noconvert(), "dweight"_a.noconvert(), "dscale"_a.noconvert(), "stream"_a);
#endif
}
