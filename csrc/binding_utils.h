// Argument checks for the kernel bindings: dtype, rank and shape per the kernel contracts, with an
// error naming the kernel and the argument. One check per kernel serves its CPU and CUDA bindings.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "blip3o/common.h"
#include "blip3o/dit_attention.h"

namespace blip3o::bind {

namespace nb = nanobind;

inline const char* dtype_name(DType dt) {
  return dt == DType::f32 ? "float32" : dt == DType::f16 ? "float16" : "bfloat16";
}

template <class A>
DType data_dtype(const char* op, const char* name, const A& a) {
  const nb::dlpack::dtype d = a.dtype();
  if (d.lanes == 1 && d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && d.bits == 32) return DType::f32;
  if (d.lanes == 1 && d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && d.bits == 16) return DType::f16;
  if (d.lanes == 1 && d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && d.bits == 16) return DType::bf16;
  throw nb::type_error((std::string(op) + ": " + name + " must be float32, float16 or bfloat16").c_str());
}

template <class A>
void expect_ndim(const char* op, const char* name, const A& a, size_t ndim) {
  if (a.ndim() != ndim)
    throw nb::value_error((std::string(op) + ": " + name + " must have " + std::to_string(ndim) +
                           " dimensions, got " + std::to_string(a.ndim())).c_str());
}

// Python's spelling of a shape: (3,) or (2, 3).
inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t k = 0; k < shape.size(); ++k) s += (k ? ", " : "") + std::to_string(shape[k]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// `a` has dtype `dt`, exactly `shape`, and lives on the same device as the kernel's first argument.
template <class A>
void expect(const char* op, const char* name, const A& a, DType dt, std::initializer_list<int64_t> shape,
            int device) {
  const DType got = data_dtype(op, name, a);
  if (got != dt)
    throw nb::type_error((std::string(op) + ": " + name + " must be " + dtype_name(dt) + ", got " +
                          dtype_name(got)).c_str());
  std::vector<int64_t> got_shape(a.ndim());
  for (size_t k = 0; k < a.ndim(); ++k) got_shape[k] = static_cast<int64_t>(a.shape(k));
  if (got_shape != std::vector<int64_t>(shape))
    throw nb::value_error((std::string(op) + ": " + name + " must have shape " + shape_str(shape) + ", got " +
                           shape_str(got_shape)).c_str());
  if (a.device_id() != device)
    throw nb::value_error((std::string(op) + ": " + name + " is on device " + std::to_string(a.device_id()) +
                           " but the first argument is on device " + std::to_string(device)).c_str());
}

inline float* f32(void* p) { return static_cast<float*>(p); }

// Shapes and dtype a kernel call runs with, read off its first argument and checked on the rest.
struct RowsDims { int64_t rows, n; DType dt; int device; };
struct RopeDims { int64_t tokens, heads, d; DType dt; int device; };
struct FlatDims { int64_t n; DType dt; int device; };
struct ModDims { int64_t batch, t, n; DType dt; int device; };

template <class A>
RowsDims check_rms_norm_fwd(const A& x, const A& weight, const A& out, const A& rstd) {
  const char* op = "rms_norm_fwd";
  expect_ndim(op, "x", x, 2);
  const RowsDims s{int64_t(x.shape(0)), int64_t(x.shape(1)), data_dtype(op, "x", x), x.device_id()};
  expect(op, "weight", weight, s.dt, {s.n}, s.device);
  expect(op, "out", out, s.dt, {s.rows, s.n}, s.device);
  expect(op, "rstd", rstd, DType::f32, {s.rows}, s.device);
  return s;
}

template <class A>
RowsDims check_rms_norm_bwd(const A& dy, const A& x, const A& weight, const A& rstd, const A& dx, const A& dweight) {
  const char* op = "rms_norm_bwd";
  expect_ndim(op, "dy", dy, 2);
  const RowsDims s{int64_t(dy.shape(0)), int64_t(dy.shape(1)), data_dtype(op, "dy", dy), dy.device_id()};
  expect(op, "x", x, s.dt, {s.rows, s.n}, s.device);
  expect(op, "weight", weight, s.dt, {s.n}, s.device);
  expect(op, "rstd", rstd, DType::f32, {s.rows}, s.device);
  expect(op, "dx", dx, s.dt, {s.rows, s.n}, s.device);
  expect(op, "dweight", dweight, DType::f32, {s.n}, s.device);
  return s;
}

template <class A>
RopeDims check_rope_apply(const A& x, const A& cos, const A& sin, const A& out) {
  const char* op = "rope_apply";
  expect_ndim(op, "x", x, 4);
  const int64_t b = x.shape(0), t = x.shape(1), h = x.shape(2), d = x.shape(3);
  if (d % 2) throw nb::value_error("rope_apply: the head dimension of x (its last) must be even");
  const RopeDims s{b * t, h, d, data_dtype(op, "x", x), x.device_id()};
  expect(op, "cos", cos, DType::f32, {b, t, d / 2}, s.device);
  expect(op, "sin", sin, DType::f32, {b, t, d / 2}, s.device);
  expect(op, "out", out, s.dt, {b, t, h, d}, s.device);
  return s;
}

template <class A>
FlatDims check_swiglu_fwd(const A& gate, const A& up, const A& out) {
  const char* op = "swiglu_fwd";
  expect_ndim(op, "gate", gate, 1);
  const FlatDims s{int64_t(gate.shape(0)), data_dtype(op, "gate", gate), gate.device_id()};
  expect(op, "up", up, s.dt, {s.n}, s.device);
  expect(op, "out", out, s.dt, {s.n}, s.device);
  return s;
}

template <class A>
FlatDims check_swiglu_bwd(const A& dy, const A& gate, const A& up, const A& dgate, const A& dup) {
  const char* op = "swiglu_bwd";
  expect_ndim(op, "dy", dy, 1);
  const FlatDims s{int64_t(dy.shape(0)), data_dtype(op, "dy", dy), dy.device_id()};
  expect(op, "gate", gate, s.dt, {s.n}, s.device);
  expect(op, "up", up, s.dt, {s.n}, s.device);
  expect(op, "dgate", dgate, s.dt, {s.n}, s.device);
  expect(op, "dup", dup, s.dt, {s.n}, s.device);
  return s;
}

template <class A>
ModDims check_rms_norm_modulate_fwd(const A& x, const A& weight, const A& scale, const A& out, const A& rstd) {
  const char* op = "rms_norm_modulate_fwd";
  expect_ndim(op, "x", x, 3);
  const ModDims s{int64_t(x.shape(0)), int64_t(x.shape(1)), int64_t(x.shape(2)), data_dtype(op, "x", x),
                  x.device_id()};
  expect(op, "weight", weight, s.dt, {s.n}, s.device);
  expect(op, "scale", scale, s.dt, {s.batch, s.n}, s.device);
  expect(op, "out", out, s.dt, {s.batch, s.t, s.n}, s.device);
  expect(op, "rstd", rstd, DType::f32, {s.batch * s.t}, s.device);
  return s;
}

template <class A>
ModDims check_rms_norm_modulate_bwd(const A& dy, const A& x, const A& weight, const A& scale, const A& rstd,
                                    const A& dx, const A& dweight, const A& dscale) {
  const char* op = "rms_norm_modulate_bwd";
  expect_ndim(op, "dy", dy, 3);
  const ModDims s{int64_t(dy.shape(0)), int64_t(dy.shape(1)), int64_t(dy.shape(2)), data_dtype(op, "dy", dy),
                  dy.device_id()};
  expect(op, "x", x, s.dt, {s.batch, s.t, s.n}, s.device);
  expect(op, "weight", weight, s.dt, {s.n}, s.device);
  expect(op, "scale", scale, s.dt, {s.batch, s.n}, s.device);
  expect(op, "rstd", rstd, DType::f32, {s.batch * s.t}, s.device);
  expect(op, "dx", dx, s.dt, {s.batch, s.t, s.n}, s.device);
  expect(op, "dweight", dweight, DType::f32, {s.n}, s.device);
  expect(op, "dscale", dscale, DType::f32, {s.batch, s.n}, s.device);
  return s;
}

// ---- fused DiT attention (python/blip3o_fast/ops/dit_attention.py); optional arguments arrive as nullptr ----

struct DitAttnDims { dit_attention::Dims dims; DType dt; int device; };

template <class A>
void expect_opt(const char* op, const char* name, const A* a, DType dt, std::initializer_list<int64_t> shape,
                int device) {
  if (a != nullptr) expect(op, name, *a, dt, shape, device);
}

template <class A>
void expect_mask(const char* op, const char* name, const A& a, std::initializer_list<int64_t> shape, int device) {
  const nb::dlpack::dtype d = a.dtype();
  if (!(d.lanes == 1 && d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bool) && d.bits == 8))
    throw nb::type_error((std::string(op) + ": " + name + " must be bool").c_str());
  std::vector<int64_t> got(a.ndim());
  for (size_t k = 0; k < a.ndim(); ++k) got[k] = static_cast<int64_t>(a.shape(k));
  if (got != std::vector<int64_t>(shape))
    throw nb::value_error((std::string(op) + ": " + name + " must have shape " + shape_str(shape) + ", got " +
                           shape_str(got)).c_str());
  if (a.device_id() != device)
    throw nb::value_error((std::string(op) + ": " + name + " is on device " + std::to_string(a.device_id()) +
                           " but the first argument is on device " + std::to_string(device)).c_str());
}

// The inputs the forward and backward share; `first` (q for the forward, dout for the backward) fixes
// the dtype and device.
template <class A>
DitAttnDims check_dit_attention_inputs(const char* op, const char* first_name, const A& first, const A& q,
                                       const A& k, const A& v, const A& q_weight, const A& q_bias, const A* k_weight,
                                       const A* k_bias, const A& cos, const A& sin, const A* key_mask,
                                       const A* gate, bool rope_k) {
  expect_ndim(op, first_name, first, 4);
  expect_ndim(op, "k", k, 4);
  const int64_t b = first.shape(0), tq = first.shape(1), hq = first.shape(2), d = first.shape(3);
  const int64_t tk = k.shape(1), hkv = k.shape(2);
  const DitAttnDims s{{b, tq, tk, hq, hkv, d}, data_dtype(op, first_name, first), first.device_id()};
  if (d % 2) throw nb::value_error((std::string(op) + ": the head dimension (last of q) must be even").c_str());
  if (hkv < 1 || hq % hkv)
    throw nb::value_error((std::string(op) + ": the query heads of q (" + std::to_string(hq) +
                           ") must be a multiple of the kv heads of k (" + std::to_string(hkv) + ")").c_str());
  if (rope_k && tk != tq)
    throw nb::value_error((std::string(op) + ": rope_k needs k with as many tokens as q (got " +
                           std::to_string(tk) + " and " + std::to_string(tq) + ")").c_str());
  if ((k_weight == nullptr) != (k_bias == nullptr))
    throw nb::value_error((std::string(op) + ": k_weight and k_bias must be given together").c_str());
  expect(op, "q", q, s.dt, {b, tq, hq, d}, s.device);
  expect(op, "k", k, s.dt, {b, tk, hkv, d}, s.device);
  expect(op, "v", v, s.dt, {b, tk, hkv, d}, s.device);
  expect(op, "q_weight", q_weight, s.dt, {hq * d}, s.device);
  expect(op, "q_bias", q_bias, s.dt, {hq * d}, s.device);
  expect_opt(op, "k_weight", k_weight, s.dt, {hkv * d}, s.device);
  expect_opt(op, "k_bias", k_bias, s.dt, {hkv * d}, s.device);
  expect(op, "cos", cos, DType::f32, {b, tq, d / 2}, s.device);
  expect(op, "sin", sin, DType::f32, {b, tq, d / 2}, s.device);
  if (key_mask != nullptr) expect_mask(op, "key_mask", *key_mask, {b, tk}, s.device);
  expect_opt(op, "gate", gate, s.dt, {hq}, s.device);
  return s;
}

template <class A>
DitAttnDims check_dit_attention_fwd(const A& q, const A& k, const A& v, const A& q_weight, const A& q_bias,
                                    const A* k_weight, const A* k_bias, const A& cos, const A& sin,
                                    const A* key_mask, const A* gate, const A* residual, bool rope_k, const A& out,
                                    const A& lse, const A* out_ungated) {
  const char* op = "dit_attention_fwd";
  const DitAttnDims s = check_dit_attention_inputs(op, "q", q, q, k, v, q_weight, q_bias, k_weight, k_bias, cos, sin,
                                                   key_mask, gate, rope_k);
  const auto& m = s.dims;
  expect_opt(op, "residual", residual, s.dt, {m.b, m.tq, m.hq, m.d}, s.device);
  expect(op, "out", out, s.dt, {m.b, m.tq, m.hq, m.d}, s.device);
  expect(op, "lse", lse, DType::f32, {m.b, m.hq, m.tq}, s.device);
  expect_opt(op, "out_ungated", out_ungated, s.dt, {m.b, m.tq, m.hq, m.d}, s.device);
  return s;
}

template <class A>
DitAttnDims check_dit_attention_bwd(const A& dout, const A& q, const A& k, const A& v, const A& q_weight,
                                    const A& q_bias, const A* k_weight, const A* k_bias, const A& cos, const A& sin,
                                    const A* key_mask, const A* gate, bool rope_k, const A& out_ungated,
                                    const A& lse, const A& dq, const A& dk, const A& dv, const A& dq_weight,
                                    const A& dq_bias, const A* dk_weight, const A* dk_bias, const A* dgate) {
  const char* op = "dit_attention_bwd";
  const DitAttnDims s = check_dit_attention_inputs(op, "dout", dout, q, k, v, q_weight, q_bias, k_weight, k_bias,
                                                   cos, sin, key_mask, gate, rope_k);
  const auto& m = s.dims;
  if ((dk_weight == nullptr) != (k_weight == nullptr) || (dk_bias == nullptr) != (k_bias == nullptr))
    throw nb::value_error("dit_attention_bwd: dk_weight and dk_bias must be given exactly when k_weight is");
  if ((dgate == nullptr) != (gate == nullptr))
    throw nb::value_error("dit_attention_bwd: dgate must be given exactly when gate is");
  expect(op, "out_ungated", out_ungated, s.dt, {m.b, m.tq, m.hq, m.d}, s.device);
  expect(op, "lse", lse, DType::f32, {m.b, m.hq, m.tq}, s.device);
  expect(op, "dq", dq, s.dt, {m.b, m.tq, m.hq, m.d}, s.device);
  expect(op, "dk", dk, s.dt, {m.b, m.tk, m.hkv, m.d}, s.device);
  expect(op, "dv", dv, s.dt, {m.b, m.tk, m.hkv, m.d}, s.device);
  expect(op, "dq_weight", dq_weight, DType::f32, {m.hq * m.d}, s.device);
  expect(op, "dq_bias", dq_bias, DType::f32, {m.hq * m.d}, s.device);
  expect_opt(op, "dk_weight", dk_weight, DType::f32, {m.hkv * m.d}, s.device);
  expect_opt(op, "dk_bias", dk_bias, DType::f32, {m.hkv * m.d}, s.device);
  expect_opt(op, "dgate", dgate, DType::f32, {m.hq}, s.device);
  return s;
}

// ---- gated residual + RMSNorm epilogue (python/blip3o_fast/ops/gated_residual_norm.py); the next-norm
// arguments arrive as nullptr together or not at all ----

template <class A>
ModDims check_gated_residual_norm_fwd(const A& x, const A& y, const A& y_weight, const A& gate, const A* next_weight,
                                      const A* next_scale, const A& x_out, const A* h, const A& rstd_y,
                                      const A* rstd_x) {
  const char* op = "gated_residual_norm_fwd";
  expect_ndim(op, "x", x, 3);
  const ModDims s{int64_t(x.shape(0)), int64_t(x.shape(1)), int64_t(x.shape(2)), data_dtype(op, "x", x),
                  x.device_id()};
  const bool next = next_weight != nullptr;
  if ((next_scale != nullptr) != next || (h != nullptr) != next || (rstd_x != nullptr) != next)
    throw nb::value_error("gated_residual_norm_fwd: next_weight, next_scale, h and rstd_x go together");
  expect(op, "y", y, s.dt, {s.batch, s.t, s.n}, s.device);
  expect(op, "y_weight", y_weight, s.dt, {s.n}, s.device);
  expect(op, "gate", gate, s.dt, {s.batch, s.n}, s.device);
  expect_opt(op, "next_weight", next_weight, s.dt, {s.n}, s.device);
  expect_opt(op, "next_scale", next_scale, s.dt, {s.batch, s.n}, s.device);
  expect(op, "x_out", x_out, s.dt, {s.batch, s.t, s.n}, s.device);
  expect_opt(op, "h", h, s.dt, {s.batch, s.t, s.n}, s.device);
  expect(op, "rstd_y", rstd_y, DType::f32, {s.batch * s.t}, s.device);
  expect_opt(op, "rstd_x", rstd_x, DType::f32, {s.batch * s.t}, s.device);
  return s;
}

template <class A>
ModDims check_gated_residual_norm_bwd(const A& dxo, const A* dh, const A& x, const A& y, const A& y_weight,
                                      const A& gate, const A* next_weight, const A* next_scale, const A& rstd_y,
                                      const A* rstd_x, const A& dx, const A& dy, const A& dy_weight, const A& dgate,
                                      const A* dnext_weight, const A* dnext_scale) {
  const char* op = "gated_residual_norm_bwd";
  expect_ndim(op, "dxo", dxo, 3);
  const ModDims s{int64_t(dxo.shape(0)), int64_t(dxo.shape(1)), int64_t(dxo.shape(2)), data_dtype(op, "dxo", dxo),
                  dxo.device_id()};
  const bool next = next_weight != nullptr;
  if ((dh != nullptr) != next || (next_scale != nullptr) != next || (rstd_x != nullptr) != next ||
      (dnext_weight != nullptr) != next || (dnext_scale != nullptr) != next)
    throw nb::value_error(
        "gated_residual_norm_bwd: dh, next_weight, next_scale, rstd_x, dnext_weight and dnext_scale go together");
  const std::initializer_list<int64_t> full = {s.batch, s.t, s.n};
  expect_opt(op, "dh", dh, s.dt, full, s.device);
  expect(op, "x", x, s.dt, full, s.device);
  expect(op, "y", y, s.dt, full, s.device);
  expect(op, "y_weight", y_weight, s.dt, {s.n}, s.device);
  expect(op, "gate", gate, s.dt, {s.batch, s.n}, s.device);
  expect_opt(op, "next_weight", next_weight, s.dt, {s.n}, s.device);
  expect_opt(op, "next_scale", next_scale, s.dt, {s.batch, s.n}, s.device);
  expect(op, "rstd_y", rstd_y, DType::f32, {s.batch * s.t}, s.device);
  expect_opt(op, "rstd_x", rstd_x, DType::f32, {s.batch * s.t}, s.device);
  expect(op, "dx", dx, s.dt, full, s.device);
  expect(op, "dy", dy, s.dt, full, s.device);
  expect(op, "dy_weight", dy_weight, DType::f32, {s.n}, s.device);
  expect(op, "dgate", dgate, DType::f32, {s.batch, s.n}, s.device);
  expect_opt(op, "dnext_weight", dnext_weight, DType::f32, {s.n}, s.device);
  expect_opt(op, "dnext_scale", dnext_scale, DType::f32, {s.batch, s.n}, s.device);
  return s;
}

// ---- flow-matching sampler update (python/blip3o_fast/ops/flow_step.py) ----

struct FlowDims { int64_t batch, n; bool guided; DType x_dt, v_dt; int device; };

template <class A>
FlowDims check_flow_step(const A& x, const A& v, const A& out, const A* v_prev, const A* v_save, bool exact) {
  const char* op = "flow_step";
  expect_ndim(op, "x", x, 2);
  expect_ndim(op, "v", v, 2);
  const int64_t b = x.shape(0), n = x.shape(1), rows = v.shape(0);
  const FlowDims s{b, n, rows == 2 * b && b > 0, data_dtype(op, "x", x), data_dtype(op, "v", v), x.device_id()};
  if (rows != b && rows != 2 * b)
    throw nb::value_error(("flow_step: v must have " + std::to_string(b) + " or " + std::to_string(2 * b) +
                           " rows (x has " + std::to_string(b) + "), got " + std::to_string(rows)).c_str());
  expect(op, "v", v, s.v_dt, {rows, n}, s.device);
  expect(op, "out", out, s.x_dt, {b, n}, s.device);
  expect_opt(op, "v_prev", v_prev, DType::f32, {b, n}, s.device);
  expect_opt(op, "v_save", v_save, DType::f32, {b, n}, s.device);
  if (exact && (s.v_dt != s.x_dt || v_prev != nullptr || v_save != nullptr))
    throw nb::value_error("flow_step: exact mode needs x and v of one dtype and no v_prev / v_save");
  return s;
}

}  // namespace blip3o::bind
