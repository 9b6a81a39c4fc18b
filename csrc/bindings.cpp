// nanobind module blip3o_fast._C: one entry per kernel. Tensors arrive zero-copy over DLPack as
// C-contiguous ndarrays; .noconvert() everywhere, so a tensor of the wrong dtype or layout is
// refused instead of silently copied (a kernel would then write into the copy). Arguments are
// checked against the kernel contracts (binding_utils.h), then the GIL is released for the kernel.
// CUDA entries end in _cuda and take the cudaStream_t (as an integer) last.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cstdint>
#include <optional>
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
using OptCpuArray = std::optional<CpuArray>;

namespace da = blip3o::dit_attention;

// Optional kernel arguments (None in Python) as pointers: nullptr when absent.
template <class A>
const A* opt(const std::optional<A>& a) { return a ? &*a : nullptr; }
template <class A>
void* data_or_null(const std::optional<A>& a) { return a ? a->data() : nullptr; }

template <class A>
da::FwdArgs dit_attention_fwd_args(A& q, A& k, A& v, A& qw, A& qb, std::optional<A>& kw, std::optional<A>& kb,
                                   A& cos, A& sin, std::optional<A>& mask, std::optional<A>& gate,
                                   std::optional<A>& res, bool rope_k, A& out, A& lse, std::optional<A>& out_ungated) {
  return {q.data(), k.data(), v.data(), qw.data(), qb.data(), data_or_null(kw), data_or_null(kb), f32(cos.data()),
          f32(sin.data()), static_cast<const bool*>(data_or_null(mask)), data_or_null(gate), data_or_null(res),
          rope_k, out.data(), f32(lse.data()), data_or_null(out_ungated)};
}

template <class A>
da::BwdArgs dit_attention_bwd_args(A& dout, A& q, A& k, A& v, A& qw, A& qb, std::optional<A>& kw,
                                   std::optional<A>& kb, A& cos, A& sin, std::optional<A>& mask,
                                   std::optional<A>& gate, bool rope_k, A& o, A& lse, A& dq, A& dk, A& dv, A& dqw,
                                   A& dqb, std::optional<A>& dkw, std::optional<A>& dkb, std::optional<A>& dgate) {
  return {dout.data(), q.data(), k.data(), v.data(), qw.data(), qb.data(), data_or_null(kw), data_or_null(kb),
          f32(cos.data()), f32(sin.data()), static_cast<const bool*>(data_or_null(mask)), data_or_null(gate), rope_k,
          o.data(), f32(lse.data()), dq.data(), dk.data(), dv.data(), f32(dqw.data()), f32(dqb.data()),
          f32(data_or_null(dkw)), f32(data_or_null(dkb)), f32(data_or_null(dgate))};
}

#ifdef BLIP3O_WITH_CUDA
namespace cuda = blip3o::cuda;
using CudaArray = nb::ndarray<nb::device::cuda, nb::c_contig>;
using OptCudaArray = std::optional<CudaArray>;

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

  m.def("dit_attention_fwd", [](CpuArray q, CpuArray k, CpuArray v, CpuArray qw, CpuArray qb, OptCpuArray kw,
        OptCpuArray kb, CpuArray cos, CpuArray sin, OptCpuArray mask, OptCpuArray gate, OptCpuArray res, bool rope_k,
        CpuArray out, CpuArray lse, OptCpuArray og) {
    const auto s = check::check_dit_attention_fwd(q, k, v, qw, qb, opt(kw), opt(kb), cos, sin, opt(mask), opt(gate),
                                                   opt(res), rope_k, out, lse, opt(og));
    const da::FwdArgs args =
        dit_attention_fwd_args(q, k, v, qw, qb, kw, kb, cos, sin, mask, gate, res, rope_k, out, lse, og);
    nb::gil_scoped_release nogil;
    cpu::dit_attention_fwd(args, s.dims, s.dt);
  }, "q"_a.noconvert(), "k"_a.noconvert(), "v"_a.noconvert(), "q_weight"_a.noconvert(), "q_bias"_a.noconvert(),
     "k_weight"_a.noconvert().none(), "k_bias"_a.noconvert().none(), "cos"_a.noconvert(), "sin"_a.noconvert(),
     "key_mask"_a.noconvert().none(), "gate"_a.noconvert().none(), "residual"_a.noconvert().none(), "rope_k"_a,
     "out"_a.noconvert(), "lse"_a.noconvert(), "out_ungated"_a.noconvert().none());

  m.def("dit_attention_bwd", [](CpuArray dout, CpuArray q, CpuArray k, CpuArray v, CpuArray qw, CpuArray qb,
        OptCpuArray kw, OptCpuArray kb, CpuArray cos, CpuArray sin, OptCpuArray mask, OptCpuArray gate, bool rope_k,
        CpuArray og, CpuArray lse, CpuArray dq, CpuArray dk, CpuArray dv, CpuArray dqw, CpuArray dqb, OptCpuArray dkw,
        OptCpuArray dkb, OptCpuArray dgate) {
    const auto s = check::check_dit_attention_bwd(dout, q, k, v, qw, qb, opt(kw), opt(kb), cos, sin, opt(mask),
                                                   opt(gate), rope_k, og, lse, dq, dk, dv, dqw, dqb, opt(dkw),
                                                   opt(dkb), opt(dgate));
    const da::BwdArgs args = dit_attention_bwd_args(dout, q, k, v, qw, qb, kw, kb, cos, sin, mask, gate, rope_k, og,
                                                    lse, dq, dk, dv, dqw, dqb, dkw, dkb, dgate);
    nb::gil_scoped_release nogil;
    cpu::dit_attention_bwd(args, s.dims, s.dt);
  }, "dout"_a.noconvert(), "q"_a.noconvert(), "k"_a.noconvert(), "v"_a.noconvert(), "q_weight"_a.noconvert(),
     "q_bias"_a.noconvert(), "k_weight"_a.noconvert().none(), "k_bias"_a.noconvert().none(), "cos"_a.noconvert(),
     "sin"_a.noconvert(), "key_mask"_a.noconvert().none(), "gate"_a.noconvert().none(), "rope_k"_a,
     "out_ungated"_a.noconvert(), "lse"_a.noconvert(), "dq"_a.noconvert(), "dk"_a.noconvert(), "dv"_a.noconvert(),
     "dq_weight"_a.noconvert(), "dq_bias"_a.noconvert(), "dk_weight"_a.noconvert().none(),
     "dk_bias"_a.noconvert().none(), "dgate"_a.noconvert().none());

  m.def("gated_residual_norm_fwd", [](CpuArray x, CpuArray y, CpuArray wy, CpuArray gate, OptCpuArray wn,
                                      OptCpuArray sn, CpuArray xo, OptCpuArray h, CpuArray ry, OptCpuArray rx,
                                      float eps) {
    const auto s = check::check_gated_residual_norm_fwd(x, y, wy, gate, opt(wn), opt(sn), xo, opt(h), ry, opt(rx));
    nb::gil_scoped_release nogil;
    cpu::gated_residual_norm_fwd(x.data(), y.data(), wy.data(), gate.data(), data_or_null(wn), data_or_null(sn),
                                 xo.data(), data_or_null(h), f32(ry.data()), f32(data_or_null(rx)), s.batch, s.t, s.n,
                                 eps, s.dt);
  }, "x"_a.noconvert(), "y"_a.noconvert(), "y_weight"_a.noconvert(), "gate"_a.noconvert(),
     "next_weight"_a.noconvert().none(), "next_scale"_a.noconvert().none(), "x_out"_a.noconvert(),
     "h"_a.noconvert().none(), "rstd_y"_a.noconvert(), "rstd_x"_a.noconvert().none(), "eps"_a);

  m.def("gated_residual_norm_bwd", [](CpuArray dxo, OptCpuArray dh, CpuArray x, CpuArray y, CpuArray wy,
                                      CpuArray gate, OptCpuArray wn, OptCpuArray sn, CpuArray ry, OptCpuArray rx,
                                      CpuArray dx, CpuArray dy, CpuArray dwy, CpuArray dgate, OptCpuArray dwn,
                                      OptCpuArray dsn) {
    const auto s = check::check_gated_residual_norm_bwd(dxo, opt(dh), x, y, wy, gate, opt(wn), opt(sn), ry, opt(rx),
                                                        dx, dy, dwy, dgate, opt(dwn), opt(dsn));
    nb::gil_scoped_release nogil;
    cpu::gated_residual_norm_bwd(dxo.data(), data_or_null(dh), x.data(), y.data(), wy.data(), gate.data(),
                                 data_or_null(wn), data_or_null(sn), f32(ry.data()), f32(data_or_null(rx)), dx.data(),
                                 dy.data(), f32(dwy.data()), f32(dgate.data()), f32(data_or_null(dwn)),
                                 f32(data_or_null(dsn)), s.batch, s.t, s.n, s.dt);
  }, "dxo"_a.noconvert(), "dh"_a.noconvert().none(), "x"_a.noconvert(), "y"_a.noconvert(),
     "y_weight"_a.noconvert(), "gate"_a.noconvert(), "next_weight"_a.noconvert().none(),
     "next_scale"_a.noconvert().none(), "rstd_y"_a.noconvert(), "rstd_x"_a.noconvert().none(), "dx"_a.noconvert(),
     "dy"_a.noconvert(), "dy_weight"_a.noconvert(), "dgate"_a.noconvert(), "dnext_weight"_a.noconvert().none(),
     "dnext_scale"_a.noconvert().none());

  m.def("flow_step", [](CpuArray x, CpuArray v, CpuArray out, OptCpuArray vp, OptCpuArray vs, float dt,
                        float guidance, float c_prev, bool exact) {
    const auto s = check::check_flow_step(x, v, out, opt(vp), opt(vs), exact);
    nb::gil_scoped_release nogil;
    cpu::flow_step(x.data(), v.data(), out.data(), f32(data_or_null(vp)), f32(data_or_null(vs)), s.batch, s.n,
                   s.guided, dt, guidance, c_prev, exact, s.x_dt, s.v_dt);
  }, "x"_a.noconvert(), "v"_a.noconvert(), "out"_a.noconvert(), "v_prev"_a.noconvert().none(),
     "v_save"_a.noconvert().none(), "dt"_a, "guidance"_a, "c_prev"_a, "exact"_a);

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

  m.def("dit_attention_fwd_cuda", [](CudaArray q, CudaArray k, CudaArray v, CudaArray qw, CudaArray qb,
        OptCudaArray kw, OptCudaArray kb, CudaArray cos, CudaArray sin, OptCudaArray mask, OptCudaArray gate,
        OptCudaArray res, bool rope_k, CudaArray out, CudaArray lse, OptCudaArray og, uintptr_t st) {
    const auto s = check::check_dit_attention_fwd(q, k, v, qw, qb, opt(kw), opt(kb), cos, sin, opt(mask), opt(gate),
                                                   opt(res), rope_k, out, lse, opt(og));
    const da::FwdArgs args =
        dit_attention_fwd_args(q, k, v, qw, qb, kw, kb, cos, sin, mask, gate, res, rope_k, out, lse, og);
    cuda_call("dit_attention_fwd_cuda",
              [&] { return cuda::dit_attention_fwd(args, s.dims, s.dt, s.device, as_stream(st)); });
  }, "q"_a.noconvert(), "k"_a.noconvert(), "v"_a.noconvert(), "q_weight"_a.noconvert(), "q_bias"_a.noconvert(),
     "k_weight"_a.noconvert().none(), "k_bias"_a.noconvert().none(), "cos"_a.noconvert(), "sin"_a.noconvert(),
     "key_mask"_a.noconvert().none(), "gate"_a.noconvert().none(), "residual"_a.noconvert().none(), "rope_k"_a,
     "out"_a.noconvert(), "lse"_a.noconvert(), "out_ungated"_a.noconvert().none(), "stream"_a);

  m.def("dit_attention_bwd_cuda", [](CudaArray dout, CudaArray q, CudaArray k, CudaArray v, CudaArray qw,
        CudaArray qb, OptCudaArray kw, OptCudaArray kb, CudaArray cos, CudaArray sin, OptCudaArray mask,
        OptCudaArray gate, bool rope_k, CudaArray og, CudaArray lse, CudaArray dq, CudaArray dk, CudaArray dv,
        CudaArray dqw, CudaArray dqb, OptCudaArray dkw, OptCudaArray dkb, OptCudaArray dgate, uintptr_t st) {
    const auto s = check::check_dit_attention_bwd(dout, q, k, v, qw, qb, opt(kw), opt(kb), cos, sin, opt(mask),
                                                   opt(gate), rope_k, og, lse, dq, dk, dv, dqw, dqb, opt(dkw),
                                                   opt(dkb), opt(dgate));
    const da::BwdArgs args = dit_attention_bwd_args(dout, q, k, v, qw, qb, kw, kb, cos, sin, mask, gate, rope_k, og,
                                                    lse, dq, dk, dv, dqw, dqb, dkw, dkb, dgate);
    cuda_call("dit_attention_bwd_cuda",
              [&] { return cuda::dit_attention_bwd(args, s.dims, s.dt, s.device, as_stream(st)); });
  }, "dout"_a.noconvert(), "q"_a.noconvert(), "k"_a.noconvert(), "v"_a.noconvert(), "q_weight"_a.noconvert(),
     "q_bias"_a.noconvert(), "k_weight"_a.noconvert().none(), "k_bias"_a.noconvert().none(), "cos"_a.noconvert(),
     "sin"_a.noconvert(), "key_mask"_a.noconvert().none(), "gate"_a.noconvert().none(), "rope_k"_a,
     "out_ungated"_a.noconvert(), "lse"_a.noconvert(), "dq"_a.noconvert(), "dk"_a.noconvert(), "dv"_a.noconvert(),
     "dq_weight"_a.noconvert(), "dq_bias"_a.noconvert(), "dk_weight"_a.noconvert().none(),
     "dk_bias"_a.noconvert().none(), "dgate"_a.noconvert().none(), "stream"_a);

  m.def("gated_residual_norm_fwd_cuda", [](CudaArray x, CudaArray y, CudaArray wy, CudaArray gate, OptCudaArray wn,
                                           OptCudaArray sn, CudaArray xo, OptCudaArray h, CudaArray ry,
                                           OptCudaArray rx, float eps, uintptr_t st) {
    const auto s = check::check_gated_residual_norm_fwd(x, y, wy, gate, opt(wn), opt(sn), xo, opt(h), ry, opt(rx));
    cuda_call("gated_residual_norm_fwd_cuda", [&] {
      return cuda::gated_residual_norm_fwd(x.data(), y.data(), wy.data(), gate.data(), data_or_null(wn),
                                           data_or_null(sn), xo.data(), data_or_null(h), f32(ry.data()),
                                           f32(data_or_null(rx)), s.batch, s.t, s.n, eps, s.dt, s.device,
                                           as_stream(st));
    });
  }, "x"_a.noconvert(), "y"_a.noconvert(), "y_weight"_a.noconvert(), "gate"_a.noconvert(),
     "next_weight"_a.noconvert().none(), "next_scale"_a.noconvert().none(), "x_out"_a.noconvert(),
     "h"_a.noconvert().none(), "rstd_y"_a.noconvert(), "rstd_x"_a.noconvert().none(), "eps"_a, "stream"_a);

  m.def("gated_residual_norm_bwd_cuda", [](CudaArray dxo, OptCudaArray dh, CudaArray x, CudaArray y, CudaArray wy,
                                           CudaArray gate, OptCudaArray wn, OptCudaArray sn, CudaArray ry,
                                           OptCudaArray rx, CudaArray dx, CudaArray dy, CudaArray dwy,
                                           CudaArray dgate, OptCudaArray dwn, OptCudaArray dsn, uintptr_t st) {
    const auto s = check::check_gated_residual_norm_bwd(dxo, opt(dh), x, y, wy, gate, opt(wn), opt(sn), ry, opt(rx),
                                                        dx, dy, dwy, dgate, opt(dwn), opt(dsn));
    cuda_call("gated_residual_norm_bwd_cuda", [&] {
      return cuda::gated_residual_norm_bwd(dxo.data(), data_or_null(dh), x.data(), y.data(), wy.data(), gate.data(),
                                           data_or_null(wn), data_or_null(sn), f32(ry.data()), f32(data_or_null(rx)),
                                           dx.data(), dy.data(), f32(dwy.data()), f32(dgate.data()),
                                           f32(data_or_null(dwn)), f32(data_or_null(dsn)), s.batch, s.t, s.n, s.dt,
                                           s.device, as_stream(st));
    });
  }, "dxo"_a.noconvert(), "dh"_a.noconvert().none(), "x"_a.noconvert(), "y"_a.noconvert(),
     "y_weight"_a.noconvert(), "gate"_a.noconvert(), "next_weight"_a.noconvert().none(),
     "next_scale"_a.noconvert().none(), "rstd_y"_a.noconvert(), "rstd_x"_a.noconvert().none(), "dx"_a.noconvert(),
     "dy"_a.noconvert(), "dy_weight"_a.noconvert(), "dgate"_a.noconvert(), "dnext_weight"_a.noconvert().none(),
     "dnext_scale"_a.noconvert().none(), "stream"_a);

  m.def("flow_step_cuda", [](CudaArray x, CudaArray v, CudaArray out, OptCudaArray vp, OptCudaArray vs, float dt,
                             float guidance, float c_prev, bool exact, uintptr_t st) {
    const auto s = check::check_flow_step(x, v, out, opt(vp), opt(vs), exact);
    cuda_call("flow_step_cuda", [&] {
      return cuda::flow_step(x.data(), v.data(), out.data(), f32(data_or_null(vp)), f32(data_or_null(vs)), s.batch,
                             s.n, s.guided, dt, guidance, c_prev, exact, s.x_dt, s.v_dt, s.device, as_stream(st));
    });
  }, "x"_a.noconvert(), "v"_a.noconvert(), "out"_a.noconvert(), "v_prev"_a.noconvert().none(),
     "v_save"_a.noconvert().none(), "dt"_a, "guidance"_a, "c_prev"_a, "exact"_a, "stream"_a);
#endif
}
