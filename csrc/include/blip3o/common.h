// Framework-free helpers shared by host and device code: no torch, no nanobind here.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#define BLIP3O_HD __host__ __device__ __forceinline__
#else
#define BLIP3O_HD inline
#endif

namespace blip3o {

// Element types the kernels accept; every kernel computes in fp32.
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// Host-side conversions for 16-bit types (device code uses cuda_fp16 / cuda_bf16).
inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest even, as torch does when casting fp32 -> bf16.
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) { mant <<= 1; --exp; }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u));
  if (absx >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (absx < 0x38800000u) {  // subnormal or zero in fp16
    if (absx < 0x33000000u) return static_cast<uint16_t>(sign);
    const uint32_t e = absx >> 23;
    uint32_t m = (absx & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 113 + 13 = 126
    uint32_t r = m >> (shift);
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = absx - 0x38000000u;  // rebias exponent 127 -> 15 (shifted by 13)
  const uint32_t rem = r & 0x1fffu;
  r >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return static_cast<uint16_t>(sign | r);
}

// Host storage tags for 16-bit data (the raw bits); device code uses __half / __nv_bfloat16.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

inline float to_f32(float v) { return v; }
inline float to_f32(bf16_t v) { return bf16_to_f32(v.bits); }
inline float to_f32(f16_t v) { return f16_to_f32(v.bits); }

template <class T> inline T from_f32(float v);
template <> inline float from_f32<float>(float v) { return v; }
template <> inline bf16_t from_f32<bf16_t>(float v) { return bf16_t{f32_to_bf16(v)}; }
template <> inline f16_t from_f32<f16_t>(float v) { return f16_t{f32_to_f16(v)}; }

// Calls fn(T{}) with the host storage type of dt, so a kernel template is written once.
template <class Fn>
inline void visit_host_dtype(DType dt, Fn&& fn) {
  switch (dt) {
    case DType::f32: fn(float{}); break;
    case DType::f16: fn(f16_t{}); break;
    case DType::bf16: fn(bf16_t{}); break;
  }
}

// Start of part p when `total` items are cut into `parts` contiguous, near-equal parts. Reductions
// cut their rows this way with `parts` fixed by the shape alone, so their sums are deterministic
// whatever the thread count or device.
BLIP3O_HD int64_t split_point(int64_t total, int64_t parts, int64_t p) { return total * p / parts; }

}  // namespace blip3o
