// nanobind module blip3o_fast._C: one entry per kernel. Tensors arrive zero-copy over DLPack as
// C-contiguous ndarrays; .noconvert() everywhere, so a tensor of the wrong dtype or layout is
// refused instead of silently copied (a kernel would then write into the copy). Arguments are
// checked against the kernel contracts (binding_utils.h), then the GIL is released for the kernel.
// CUDA entries end in _cuda and take the cudaStream_t (as an integer) last.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cmath>
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

// ---- paged decode attention (python/blip3o_fast/ops/paged_decode_attention.py): shapes, dtypes and
// devices of one call, the int32 tables included; part_out / part_lse come together or not at all ----
namespace pda = blip3o::paged_decode_attention;

struct PagedDecodeDims { pda::Dims dims; blip3o::DType dt; int device; };

template <class A>
void expect_i32(const char* op, const char* name, const A& a, std::initializer_list<int64_t> shape, int device) {
  const nb::dlpack::dtype d = a.dtype();
  if (!(d.lanes == 1 && d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Int) && d.bits == 32))
    throw nb::type_error((std::string(op) + ": " + name + " must be int32").c_str());
  std::vector<int64_t> got(a.ndim());
  for (size_t k = 0; k < a.ndim(); ++k) got[k] = static_cast<int64_t>(a.shape(k));
  if (got != std::vector<int64_t>(shape))
    throw nb::value_error((std::string(op) + ": " + name + " must have shape " + check::shape_str(shape) +
                           ", got " + check::shape_str(got)).c_str());
  if (a.device_id() != device)
    throw nb::value_error((std::string(op) + ": " + name + " is on device " + std::to_string(a.device_id()) +
                           " but q is on device " + std::to_string(device)).c_str());
}

template <class A>
PagedDecodeDims check_paged_decode_attention(const A& q, const A& k, const A& v, const A& tables, const A& lens,
                                             const A& out, const A* part_out, const A* part_lse, float scale) {
  const char* op = "paged_decode_attention";
  check::expect_ndim(op, "q", q, 3);
  check::expect_ndim(op, "k_cache", k, 4);
  check::expect_ndim(op, "block_tables", tables, 2);
  const int64_t b = q.shape(0), h = q.shape(1), d = q.shape(2);
  const int64_t nblocks = k.shape(0), bs = k.shape(1), kvh = k.shape(2), mb = tables.shape(1);
  if (kvh < 1 || h % kvh)
    throw nb::value_error(("paged_decode_attention: the heads of q (" + std::to_string(h) +
                           ") must be a multiple of the kv heads of k_cache (" + std::to_string(kvh) + ")").c_str());
  if (bs < 1) throw nb::value_error("paged_decode_attention: block_size (dim 1 of k_cache) must be >= 1");
  if ((part_out == nullptr) != (part_lse == nullptr))
    throw nb::value_error("paged_decode_attention: part_out and part_lse go together");
  if (part_lse != nullptr) check::expect_ndim(op, "part_lse", *part_lse, 3);
  const int64_t splits = part_lse != nullptr ? static_cast<int64_t>(part_lse->shape(2)) : 1;
  if (splits < 1) throw nb::value_error("paged_decode_attention: part_lse needs at least one split");
  if (!std::isfinite(scale)) throw nb::value_error("paged_decode_attention: scale must be finite");
  const PagedDecodeDims s{{b, h, kvh, d, bs, mb, splits}, check::data_dtype(op, "q", q), q.device_id()};
  check::expect(op, "k_cache", k, s.dt, {nblocks, bs, kvh, d}, s.device);
  check::expect(op, "v_cache", v, s.dt, {nblocks, bs, kvh, d}, s.device);
  expect_i32(op, "block_tables", tables, {b, mb}, s.device);
  expect_i32(op, "seq_lens", lens, {b}, s.device);
  check::expect(op, "out", out, s.dt, {b, h, d}, s.device);
  check::expect_opt(op, "part_out", part_out, blip3o::DType::f32, {b, h, splits, d}, s.device);
  check::expect_opt(op, "part_lse", part_lse, blip3o::DType::f32, {b, h, splits}, s.device);
  return s;
}

template <class A>
pda::Args paged_decode_attention_args(A& q, A& k, A& v, A& tables, A& lens, A& out, std::optional<A>& part_out,
                                      std::optional<A>& part_lse, float scale) {
  return {q.data(), k.data(), v.data(), static_cast<const int32_t*>(tables.data()),
          static_cast<const int32_t*>(lens.data()), out.data(), f32(data_or_null(part_out)),
          f32(data_or_null(part_lse)), scale};
}

// ---- fused linear + cross-entropy (python/blip3o_fast/ops/linear_cross_entropy.py): hidden (N, H) fixes the
// dtype and device; targets int64 (N,) ----
struct LinearCeDims { int64_t n, h, v; blip3o::DType dt; int device; };

template <class A>
void expect_targets(const char* op, const A& a, int64_t n, int device) {
  const nb::dlpack::dtype d = a.dtype();
  if (!(d.lanes == 1 && d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Int) && d.bits == 64))
    throw nb::type_error((std::string(op) + ": targets must be int64").c_str());
  if (a.ndim() != 1 || int64_t(a.shape(0)) != n)
    throw nb::value_error((std::string(op) + ": targets must have shape (" + std::to_string(n) + ",)").c_str());
  if (a.device_id() != device) throw nb::value_error((std::string(op) + ": targets is on another device").c_str());
}

template <class A>
LinearCeDims check_linear_cross_entropy(const char* op, const A& hidden, const A& weight, const A& targets,
                                        const A& lse) {
  check::expect_ndim(op, "hidden", hidden, 2);
  check::expect_ndim(op, "weight", weight, 2);
  const LinearCeDims s{int64_t(hidden.shape(0)), int64_t(hidden.shape(1)), int64_t(weight.shape(0)),
                       check::data_dtype(op, "hidden", hidden), hidden.device_id()};
  check::expect(op, "weight", weight, s.dt, {s.v, s.h}, s.device);
  expect_targets(op, targets, s.n, s.device);
  check::expect(op, "lse", lse, blip3o::DType::f32, {s.n}, s.device);
  return s;
}

template <class A>
LinearCeDims check_linear_cross_entropy_bwd(const A& dloss, const A& hidden, const A& weight, const A& targets,
                                            const A& lse, const A* dhidden, const A* dweight) {
  const char* op = "linear_cross_entropy_bwd";
  const LinearCeDims s = check_linear_cross_entropy(op, hidden, weight, targets, lse);
  check::expect(op, "dloss", dloss, blip3o::DType::f32, {s.n}, s.device);
  check::expect_opt(op, "dhidden", dhidden, s.dt, {s.n, s.h}, s.device);
  check::expect_opt(op, "dweight", dweight, s.dt, {s.v, s.h}, s.device);
  return s;
}

// ---- varlen prefill attention and RoPE + KV-cache write (python/blip3o_fast/ops/varlen_prefill_attention.py,
// python/blip3o_fast/ops/rope_kv_cache_write.py): q fixes the dtype and device ----
namespace vpa = blip3o::varlen_prefill_attention;

struct VarlenDims { vpa::Dims dims; blip3o::DType dt; int device; };
struct RopeKvDims { int64_t tokens, heads, kv_heads, d, num_slots; blip3o::DType dt; int device; };

// An integer vector of `bits` bits and length n on `device` (cu_seqlens int32, slots int64).
template <class A>
void expect_int_vector(const char* op, const char* name, const A& a, int bits, int64_t n, int device) {
  const nb::dlpack::dtype d = a.dtype();
  if (!(d.lanes == 1 && d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Int) && d.bits == bits))
    throw nb::type_error((std::string(op) + ": " + name + " must be int" + std::to_string(bits)).c_str());
  if (a.ndim() != 1 || int64_t(a.shape(0)) != n)
    throw nb::value_error((std::string(op) + ": " + name + " must have shape (" + std::to_string(n) + ",)").c_str());
  if (a.device_id() != device)
    throw nb::value_error((std::string(op) + ": " + name + " is on another device than q").c_str());
}

template <class A>
VarlenDims check_varlen_prefill_attention(const A& q, const A& k, const A& v, const A& cu, const A& out,
                                          int64_t max_seqlen, float scale) {
  const char* op = "varlen_prefill_attention_fwd";
  check::expect_ndim(op, "q", q, 3);
  check::expect_ndim(op, "k", k, 3);
  check::expect_ndim(op, "cu_seqlens", cu, 1);
  const int64_t n = q.shape(0), h = q.shape(1), d = q.shape(2), kvh = k.shape(1), seqs = int64_t(cu.shape(0)) - 1;
  if (kvh < 1 || h % kvh)
    throw nb::value_error(("varlen_prefill_attention_fwd: the heads of q (" + std::to_string(h) +
                           ") must be a multiple of the kv heads of k (" + std::to_string(kvh) + ")").c_str());
  if (seqs < 0) throw nb::value_error("varlen_prefill_attention_fwd: cu_seqlens needs at least one offset");
  if (max_seqlen < 0) throw nb::value_error("varlen_prefill_attention_fwd: max_seqlen must be >= 0");
  if (!std::isfinite(scale)) throw nb::value_error("varlen_prefill_attention_fwd: scale must be finite");
  const VarlenDims s{{n, seqs, h, kvh, d, scale}, check::data_dtype(op, "q", q), q.device_id()};
  check::expect(op, "k", k, s.dt, {n, kvh, d}, s.device);
  check::expect(op, "v", v, s.dt, {n, kvh, d}, s.device);
  expect_int_vector(op, "cu_seqlens", cu, 32, seqs + 1, s.device);
  check::expect(op, "out", out, s.dt, {n, h, d}, s.device);
  return s;
}

// Host-side offsets (the CPU face): 0 first, N last, nondecreasing, no sequence above max_seqlen.
inline void check_cu_seqlens_values(const int32_t* cu, int64_t seqs, int64_t tokens, int64_t max_seqlen) {
  if (cu[0] != 0 || cu[seqs] != tokens)
    throw nb::value_error(("varlen_prefill_attention_fwd: cu_seqlens must start at 0 and end at N = " +
                           std::to_string(tokens)).c_str());
  for (int64_t s = 0; s < seqs; ++s) {
    if (cu[s + 1] < cu[s]) throw nb::value_error("varlen_prefill_attention_fwd: cu_seqlens must be nondecreasing");
    if (cu[s + 1] - cu[s] > max_seqlen)
      throw nb::value_error("varlen_prefill_attention_fwd: a sequence is longer than max_seqlen");
  }
}

template <class A>
RopeKvDims check_rope_kv_cache_write(const A& q, const A& k, const A& v, const A& cos, const A& sin,
                                     const A& k_cache, const A& v_cache, const A& slots, const A& q_rot,
                                     const A& k_rot) {
  const char* op = "rope_kv_cache_write";
  check::expect_ndim(op, "q", q, 3);
  check::expect_ndim(op, "k", k, 3);
  check::expect_ndim(op, "k_cache", k_cache, 4);
  const int64_t t = q.shape(0), h = q.shape(1), d = q.shape(2), kvh = k.shape(1);
  const int64_t blocks = k_cache.shape(0), block_size = k_cache.shape(1);
  if (d % 2) throw nb::value_error("rope_kv_cache_write: the head dimension of q (its last) must be even");
  const RopeKvDims s{t, h, kvh, d, blocks * block_size, check::data_dtype(op, "q", q), q.device_id()};
  check::expect(op, "k", k, s.dt, {t, kvh, d}, s.device);
  check::expect(op, "v", v, s.dt, {t, kvh, d}, s.device);
  check::expect(op, "cos", cos, blip3o::DType::f32, {t, d / 2}, s.device);
  check::expect(op, "sin", sin, blip3o::DType::f32, {t, d / 2}, s.device);
  check::expect(op, "k_cache", k_cache, s.dt, {blocks, block_size, kvh, d}, s.device);
  check::expect(op, "v_cache", v_cache, s.dt, {blocks, block_size, kvh, d}, s.device);
  expect_int_vector(op, "slots", slots, 64, t, s.device);
  check::expect(op, "q_rot", q_rot, s.dt, {t, h, d}, s.device);
  check::expect(op, "k_rot", k_rot, s.dt, {t, kvh, d}, s.device);
  return s;
}

// ---- residual add + RMSNorm (python/blip3o_fast/ops/residual_rms_norm.py): the first argument fixes the
// dtype, rows and device ----
template <class A>
check::RowsDims check_residual_rms_norm_fwd(const A& x, const A& res, const A& weight, const A& out, const A& s_out,
                                            const A& rstd) {
  const char* op = "residual_rms_norm_fwd";
  check::expect_ndim(op, "x", x, 2);
  const check::RowsDims s{int64_t(x.shape(0)), int64_t(x.shape(1)), check::data_dtype(op, "x", x), x.device_id()};
  check::expect(op, "residual", res, s.dt, {s.rows, s.n}, s.device);
  check::expect(op, "weight", weight, s.dt, {s.n}, s.device);
  check::expect(op, "out", out, s.dt, {s.rows, s.n}, s.device);
  check::expect(op, "new_residual", s_out, s.dt, {s.rows, s.n}, s.device);
  check::expect(op, "rstd", rstd, blip3o::DType::f32, {s.rows}, s.device);
  return s;
}

template <class A>
check::RowsDims check_residual_rms_norm_bwd(const A& dy, const A& dres, const A& s_in, const A& weight,
                                            const A& rstd, const A& ds, const A& dweight) {
  const char* op = "residual_rms_norm_bwd";
  check::expect_ndim(op, "dy", dy, 2);
  const check::RowsDims s{int64_t(dy.shape(0)), int64_t(dy.shape(1)), check::data_dtype(op, "dy", dy),
                          dy.device_id()};
  check::expect(op, "dres", dres, s.dt, {s.rows, s.n}, s.device);
  check::expect(op, "s", s_in, s.dt, {s.rows, s.n}, s.device);
  check::expect(op, "ds", ds, s.dt, {s.rows, s.n}, s.device);
  check::expect(op, "weight", weight, s.dt, {s.n}, s.device);
  check::expect(op, "rstd", rstd, blip3o::DType::f32, {s.rows}, s.device);
  check::expect(op, "dweight", dweight, blip3o::DType::f32, {s.n}, s.device);
  return s;
}

// ---- token sampling (python/blip3o_fast/ops/sample_tokens.py): logits (B, V) fixes the device; the
// per-row parameters and outputs have B entries ----
struct SampleDims { int64_t batch, vocab; blip3o::DType dt; int device; };

template <class A>
SampleDims check_sample_tokens(const A& logits, const A& temp, const A& top_k, const A& top_p, const A& seeds,
                               const A& counters, const A& tokens, const A& logprobs) {
  const char* op = "sample_tokens";
  check::expect_ndim(op, "logits", logits, 2);
  const SampleDims s{int64_t(logits.shape(0)), int64_t(logits.shape(1)), check::data_dtype(op, "logits", logits),
                     logits.device_id()};
  if (s.vocab < 1 || s.vocab >= (int64_t(1) << 31))
    throw nb::value_error("sample_tokens: the vocabulary (dim 1 of logits) must be in [1, 2^31)");
  check::expect(op, "temperature", temp, blip3o::DType::f32, {s.batch}, s.device);
  expect_int_vector(op, "top_k", top_k, 32, s.batch, s.device);
  check::expect(op, "top_p", top_p, blip3o::DType::f32, {s.batch}, s.device);
  expect_int_vector(op, "seeds", seeds, 64, s.batch, s.device);
  expect_int_vector(op, "counters", counters, 64, s.batch, s.device);
  expect_int_vector(op, "tokens", tokens, 64, s.batch, s.device);
  check::expect(op, "logprobs", logprobs, blip3o::DType::f32, {s.batch}, s.device);
  return s;
}

// ---- small-M linear (python/blip3o_fast/ops/decode_linear.py): x (M, K) fixes the dtype and device;
// weight (N, K), bias (N,) or None, out (M, N) ----
struct DecodeLinearDims { int64_t m, n, k; blip3o::DType dt; int device; };

template <class A>
DecodeLinearDims check_decode_linear(const A& x, const A& weight, const A* bias, const A& out) {
  const char* op = "decode_linear";
  check::expect_ndim(op, "x", x, 2);
  check::expect_ndim(op, "weight", weight, 2);
  const DecodeLinearDims s{int64_t(x.shape(0)), int64_t(weight.shape(0)), int64_t(x.shape(1)),
                           check::data_dtype(op, "x", x), x.device_id()};
  check::expect(op, "weight", weight, s.dt, {s.n, s.k}, s.device);
  check::expect_opt(op, "bias", bias, s.dt, {s.n}, s.device);
  check::expect(op, "out", out, s.dt, {s.m, s.n}, s.device);
  return s;
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

  m.def("paged_decode_attention", [](CpuArray q, CpuArray k, CpuArray v, CpuArray tables, CpuArray lens,
                                     CpuArray out, OptCpuArray po, OptCpuArray pl, float scale) {
    const auto s = check_paged_decode_attention(q, k, v, tables, lens, out, opt(po), opt(pl), scale);
    const pda::Args args = paged_decode_attention_args(q, k, v, tables, lens, out, po, pl, scale);
    nb::gil_scoped_release nogil;
    cpu::paged_decode_attention(args, s.dims, s.dt);
  }, "q"_a.noconvert(), "k_cache"_a.noconvert(), "v_cache"_a.noconvert(), "block_tables"_a.noconvert(),
     "seq_lens"_a.noconvert(), "out"_a.noconvert(), "part_out"_a.noconvert().none(),
     "part_lse"_a.noconvert().none(), "scale"_a);

  m.def("linear_cross_entropy_fwd", [](CpuArray hidden, CpuArray w, CpuArray t, CpuArray loss, CpuArray lse,
                                       int64_t ignore_index) {
    const auto s = check_linear_cross_entropy("linear_cross_entropy_fwd", hidden, w, t, lse);
    check::expect("linear_cross_entropy_fwd", "loss", loss, blip3o::DType::f32, {s.n}, s.device);
    nb::gil_scoped_release nogil;
    cpu::linear_cross_entropy_fwd(hidden.data(), w.data(), static_cast<const int64_t*>(t.data()), f32(loss.data()),
                                  f32(lse.data()), s.n, s.h, s.v, ignore_index, s.dt);
  }, "hidden"_a.noconvert(), "weight"_a.noconvert(), "targets"_a.noconvert(), "loss"_a.noconvert(),
     "lse"_a.noconvert(), "ignore_index"_a);

  m.def("linear_cross_entropy_bwd", [](CpuArray dloss, CpuArray hidden, CpuArray w, CpuArray t, CpuArray lse,
                                       OptCpuArray dh, OptCpuArray dw, int64_t ignore_index) {
    const auto s = check_linear_cross_entropy_bwd(dloss, hidden, w, t, lse, opt(dh), opt(dw));
    nb::gil_scoped_release nogil;
    cpu::linear_cross_entropy_bwd(f32(dloss.data()), hidden.data(), w.data(), static_cast<const int64_t*>(t.data()),
                                  f32(lse.data()), data_or_null(dh), data_or_null(dw), s.n, s.h, s.v, ignore_index,
                                  s.dt);
  }, "dloss"_a.noconvert(), "hidden"_a.noconvert(), "weight"_a.noconvert(), "targets"_a.noconvert(),
     "lse"_a.noconvert(), "dhidden"_a.noconvert().none(), "dweight"_a.noconvert().none(), "ignore_index"_a);

  m.def("varlen_prefill_attention_fwd", [](CpuArray q, CpuArray k, CpuArray v, CpuArray cu, int64_t max_seqlen,
                                           float scale, CpuArray out) {
    const auto s = check_varlen_prefill_attention(q, k, v, cu, out, max_seqlen, scale);
    const auto* offsets = static_cast<const int32_t*>(cu.data());
    check_cu_seqlens_values(offsets, s.dims.seqs, s.dims.tokens, max_seqlen);
    nb::gil_scoped_release nogil;
    cpu::varlen_prefill_attention_fwd(q.data(), k.data(), v.data(), offsets, out.data(), s.dims, s.dt);
  }, "q"_a.noconvert(), "k"_a.noconvert(), "v"_a.noconvert(), "cu_seqlens"_a.noconvert(), "max_seqlen"_a,
     "scale"_a, "out"_a.noconvert());

  m.def("rope_kv_cache_write", [](CpuArray q, CpuArray k, CpuArray v, CpuArray cos, CpuArray sin, CpuArray kc,
                                  CpuArray vc, CpuArray slots, CpuArray q_rot, CpuArray k_rot) {
    const auto s = check_rope_kv_cache_write(q, k, v, cos, sin, kc, vc, slots, q_rot, k_rot);
    nb::gil_scoped_release nogil;
    cpu::rope_kv_cache_write(q.data(), k.data(), v.data(), f32(cos.data()), f32(sin.data()), kc.data(), vc.data(),
                             static_cast<const int64_t*>(slots.data()), q_rot.data(), k_rot.data(), s.tokens,
                             s.heads, s.kv_heads, s.d, s.num_slots, s.dt);
  }, "q"_a.noconvert(), "k"_a.noconvert(), "v"_a.noconvert(), "cos"_a.noconvert(), "sin"_a.noconvert(),
     "k_cache"_a.noconvert(), "v_cache"_a.noconvert(), "slots"_a.noconvert(), "q_rot"_a.noconvert(),
     "k_rot"_a.noconvert());

  m.def("residual_rms_norm_fwd", [](CpuArray x, CpuArray res, CpuArray w, CpuArray out, CpuArray s_out,
                                    CpuArray rstd, float eps) {
    const auto s = check_residual_rms_norm_fwd(x, res, w, out, s_out, rstd);
    nb::gil_scoped_release nogil;
    cpu::residual_rms_norm_fwd(x.data(), res.data(), w.data(), out.data(), s_out.data(), f32(rstd.data()), s.rows,
                               s.n, eps, s.dt);
  }, "x"_a.noconvert(), "residual"_a.noconvert(), "weight"_a.noconvert(), "out"_a.noconvert(),
     "new_residual"_a.noconvert(), "rstd"_a.noconvert(), "eps"_a);

  m.def("residual_rms_norm_bwd", [](CpuArray dy, CpuArray dres, CpuArray s_in, CpuArray w, CpuArray rstd,
                                    CpuArray ds, CpuArray dw) {
    const auto s = check_residual_rms_norm_bwd(dy, dres, s_in, w, rstd, ds, dw);
    nb::gil_scoped_release nogil;
    cpu::residual_rms_norm_bwd(dy.data(), dres.data(), s_in.data(), w.data(), f32(rstd.data()), ds.data(),
                               f32(dw.data()), s.rows, s.n, s.dt);
  }, "dy"_a.noconvert(), "dres"_a.noconvert(), "s"_a.noconvert(), "weight"_a.noconvert(), "rstd"_a.noconvert(),
     "ds"_a.noconvert(), "dweight"_a.noconvert());

  m.def("sample_tokens", [](CpuArray logits, CpuArray temp, CpuArray top_k, CpuArray top_p, CpuArray seeds,
                            CpuArray counters, CpuArray tokens, CpuArray logprobs) {
    const auto s = check_sample_tokens(logits, temp, top_k, top_p, seeds, counters, tokens, logprobs);
    nb::gil_scoped_release nogil;
    cpu::sample_tokens(logits.data(), f32(temp.data()), static_cast<const int32_t*>(top_k.data()),
                       f32(top_p.data()), static_cast<const int64_t*>(seeds.data()),
                       static_cast<const int64_t*>(counters.data()), static_cast<int64_t*>(tokens.data()),
                       f32(logprobs.data()), s.batch, s.vocab, s.dt);
  }, "logits"_a.noconvert(), "temperature"_a.noconvert(), "top_k"_a.noconvert(), "top_p"_a.noconvert(),
     "seeds"_a.noconvert(), "counters"_a.noconvert(), "tokens"_a.noconvert(), "logprobs"_a.noconvert());

  m.def("decode_linear", [](CpuArray x, CpuArray w, OptCpuArray bias, CpuArray out) {
    const auto s = check_decode_linear(x, w, opt(bias), out);
    nb::gil_scoped_release nogil;
    cpu::decode_linear(x.data(), w.data(), data_or_null(bias), out.data(), s.m, s.n, s.k, s.dt);
  }, "x"_a.noconvert(), "weight"_a.noconvert(), "bias"_a.noconvert().none(), "out"_a.noconvert());

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

  m.def("paged_decode_attention_cuda", [](CudaArray q, CudaArray k, CudaArray v, CudaArray tables, CudaArray lens,
                                          CudaArray out, OptCudaArray po, OptCudaArray pl, float scale, uintptr_t st) {
    const auto s = check_paged_decode_attention(q, k, v, tables, lens, out, opt(po), opt(pl), scale);
    const pda::Args args = paged_decode_attention_args(q, k, v, tables, lens, out, po, pl, scale);
    cuda_call("paged_decode_attention_cuda",
              [&] { return cuda::paged_decode_attention(args, s.dims, s.dt, s.device, as_stream(st)); });
  }, "q"_a.noconvert(), "k_cache"_a.noconvert(), "v_cache"_a.noconvert(), "block_tables"_a.noconvert(),
     "seq_lens"_a.noconvert(), "out"_a.noconvert(), "part_out"_a.noconvert().none(),
     "part_lse"_a.noconvert().none(), "scale"_a, "stream"_a);

  m.def("linear_cross_entropy_fwd_cuda", [](CudaArray hidden, CudaArray w, CudaArray t, CudaArray loss,
                                            CudaArray lse, int64_t ignore_index, uintptr_t st) {
    const auto s = check_linear_cross_entropy("linear_cross_entropy_fwd_cuda", hidden, w, t, lse);
    check::expect("linear_cross_entropy_fwd_cuda", "loss", loss, blip3o::DType::f32, {s.n}, s.device);
    cuda_call("linear_cross_entropy_fwd_cuda", [&] {
      return cuda::linear_cross_entropy_fwd(hidden.data(), w.data(), static_cast<const int64_t*>(t.data()),
                                            f32(loss.data()), f32(lse.data()), s.n, s.h, s.v, ignore_index, s.dt,
                                            s.device, as_stream(st));
    });
  }, "hidden"_a.noconvert(), "weight"_a.noconvert(), "targets"_a.noconvert(), "loss"_a.noconvert(),
     "lse"_a.noconvert(), "ignore_index"_a, "stream"_a);

  m.def("linear_cross_entropy_bwd_cuda", [](CudaArray dloss, CudaArray hidden, CudaArray w, CudaArray t,
                                            CudaArray lse, OptCudaArray dh, OptCudaArray dw, int64_t ignore_index,
                                            uintptr_t st) {
    const auto s = check_linear_cross_entropy_bwd(dloss, hidden, w, t, lse, opt(dh), opt(dw));
    cuda_call("linear_cross_entropy_bwd_cuda", [&] {
      return cuda::linear_cross_entropy_bwd(f32(dloss.data()), hidden.data(), w.data(),
                                            static_cast<const int64_t*>(t.data()), f32(lse.data()),
                                            data_or_null(dh), data_or_null(dw), s.n, s.h, s.v, ignore_index, s.dt,
                                            s.device, as_stream(st));
    });
  }, "dloss"_a.noconvert(), "hidden"_a.noconvert(), "weight"_a.noconvert(), "targets"_a.noconvert(),
     "lse"_a.noconvert(), "dhidden"_a.noconvert().none(), "dweight"_a.noconvert().none(), "ignore_index"_a,
     "stream"_a);

  m.def("varlen_prefill_attention_fwd_cuda", [](CudaArray q, CudaArray k, CudaArray v, CudaArray cu,
                                                int64_t max_seqlen, float scale, CudaArray out, uintptr_t st) {
    const auto s = check_varlen_prefill_attention(q, k, v, cu, out, max_seqlen, scale);
    cuda_call("varlen_prefill_attention_fwd_cuda", [&] {
      return cuda::varlen_prefill_attention_fwd(q.data(), k.data(), v.data(), static_cast<const int32_t*>(cu.data()),
                                                out.data(), s.dims, s.dt, s.device, as_stream(st));
    });
  }, "q"_a.noconvert(), "k"_a.noconvert(), "v"_a.noconvert(), "cu_seqlens"_a.noconvert(), "max_seqlen"_a,
     "scale"_a, "out"_a.noconvert(), "stream"_a);

  m.def("rope_kv_cache_write_cuda", [](CudaArray q, CudaArray k, CudaArray v, CudaArray cos, CudaArray sin,
                                       CudaArray kc, CudaArray vc, CudaArray slots, CudaArray q_rot, CudaArray k_rot,
                                       uintptr_t st) {
    const auto s = check_rope_kv_cache_write(q, k, v, cos, sin, kc, vc, slots, q_rot, k_rot);
    cuda_call("rope_kv_cache_write_cuda", [&] {
      return cuda::rope_kv_cache_write(q.data(), k.data(), v.data(), f32(cos.data()), f32(sin.data()), kc.data(),
                                       vc.data(), static_cast<const int64_t*>(slots.data()), q_rot.data(),
                                       k_rot.data(), s.tokens, s.heads, s.kv_heads, s.d, s.num_slots, s.dt,
                                       s.device, as_stream(st));
    });
  }, "q"_a.noconvert(), "k"_a.noconvert(), "v"_a.noconvert(), "cos"_a.noconvert(), "sin"_a.noconvert(),
     "k_cache"_a.noconvert(), "v_cache"_a.noconvert(), "slots"_a.noconvert(), "q_rot"_a.noconvert(),
     "k_rot"_a.noconvert(), "stream"_a);

  m.def("residual_rms_norm_fwd_cuda", [](CudaArray x, CudaArray res, CudaArray w, CudaArray out, CudaArray s_out,
                                         CudaArray rstd, float eps, uintptr_t st) {
    const auto s = check_residual_rms_norm_fwd(x, res, w, out, s_out, rstd);
    cuda_call("residual_rms_norm_fwd_cuda", [&] {
      return cuda::residual_rms_norm_fwd(x.data(), res.data(), w.data(), out.data(), s_out.data(), f32(rstd.data()),
                                         s.rows, s.n, eps, s.dt, s.device, as_stream(st));
    });
  }, "x"_a.noconvert(), "residual"_a.noconvert(), "weight"_a.noconvert(), "out"_a.noconvert(),
     "new_residual"_a.noconvert(), "rstd"_a.noconvert(), "eps"_a, "stream"_a);

  m.def("residual_rms_norm_bwd_cuda", [](CudaArray dy, CudaArray dres, CudaArray s_in, CudaArray w, CudaArray rstd,
                                         CudaArray ds, CudaArray dw, uintptr_t st) {
    const auto s = check_residual_rms_norm_bwd(dy, dres, s_in, w, rstd, ds, dw);
    cuda_call("residual_rms_norm_bwd_cuda", [&] {
      return cuda::residual_rms_norm_bwd(dy.data(), dres.data(), s_in.data(), w.data(), f32(rstd.data()), ds.data(),
                                         f32(dw.data()), s.rows, s.n, s.dt, s.device, as_stream(st));
    });
  }, "dy"_a.noconvert(), "dres"_a.noconvert(), "s"_a.noconvert(), "weight"_a.noconvert(), "rstd"_a.noconvert(),
     "ds"_a.noconvert(), "dweight"_a.noconvert(), "stream"_a);

  m.def("sample_tokens_cuda", [](CudaArray logits, CudaArray temp, CudaArray top_k, CudaArray top_p, CudaArray seeds,
                                 CudaArray counters, CudaArray tokens, CudaArray logprobs, uintptr_t st) {
    const auto s = check_sample_tokens(logits, temp, top_k, top_p, seeds, counters, tokens, logprobs);
    cuda_call("sample_tokens_cuda", [&] {
      return cuda::sample_tokens(logits.data(), f32(temp.data()), static_cast<const int32_t*>(top_k.data()),
                                 f32(top_p.data()), static_cast<const int64_t*>(seeds.data()),
                                 static_cast<const int64_t*>(counters.data()), static_cast<int64_t*>(tokens.data()),
                                 f32(logprobs.data()), s.batch, s.vocab, s.dt, s.device, as_stream(st));
    });
  }, "logits"_a.noconvert(), "temperature"_a.noconvert(), "top_k"_a.noconvert(), "top_p"_a.noconvert(),
     "seeds"_a.noconvert(), "counters"_a.noconvert(), "tokens"_a.noconvert(), "logprobs"_a.noconvert(), "stream"_a);

  m.def("decode_linear_cuda", [](CudaArray x, CudaArray w, OptCudaArray bias, CudaArray out, uintptr_t st) {
    const auto s = check_decode_linear(x, w, opt(bias), out);
    cuda_call("decode_linear_cuda", [&] {
      return cuda::decode_linear(x.data(), w.data(), data_or_null(bias), out.data(), s.m, s.n, s.k, s.dt, s.device,
                                 as_stream(st));
    });
  }, "x"_a.noconvert(), "weight"_a.noconvert(), "bias"_a.noconvert().none(), "out"_a.noconvert(), "stream"_a);
#endif
}
