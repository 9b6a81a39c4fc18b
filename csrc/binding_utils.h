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

}  // namespace blip3o::bind
