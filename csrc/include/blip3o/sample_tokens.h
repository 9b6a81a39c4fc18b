// Token sampling math shared by every face (oracle: python/blip3o_fast/ops/sample_tokens.py, which
// restates each function below with torch integer/float ops; kernels/sample_tokens.py does the same
// in Triton). Everything here is bit-exact by construction, so all faces draw the same Gumbel noise:
//
// Counter-based hash (all arithmetic mod 2^32, >> logical):
//   mix(h)     = murmur3 fmix32: h ^= h >> 16; h *= 0x85ebca6b; h ^= h >> 13; h *= 0xc2b2ae35; h ^= h >> 16
//   row_key    = mix(mix(mix(mix(seed_lo ^ 0x9e3779b9) ^ seed_hi) ^ counter_lo) ^ counter_hi)
//                (seed, counter int64 split into their two's-complement 32-bit halves)
//   bits(i)    = mix(row_key ^ mix(i))                                   i = token index (uint32)
//   u(i)       = (2 * (bits >> 9) + 1) * 2^-24                           odd multiple of 2^-24: exact, in (0, 1)
//   gumbel(i)  = -plog(-plog(u(i)))                                      in [-2.8116, 16.6356]
// plog is a natural log built from IEEE-rounded +, -, *, / only, in a fixed order and never contracted
// into FMAs (device code uses the __f*_rn intrinsics; the C++ build passes -ffp-contract=off; Triton
// launches with enable_fp_fusion=False), so every face gets the same bits (about 1 ulp from log):
//   x = m * 2^e with m in [sqrt(1/2), sqrt(2)); s = (m - 1) / (m + 1); z = s * s
//   p = ((((C9 * z) + C7) * z + C5) * z + C3) * z;  r = s * p + s;  log m = r + r  (atanh series, 2e-9 rel)
//   plog(x) = e * LN2_HI + (e * LN2_LO + log m)
// A row's draws depend only on (seed, counter, token index): never on the batch around the row.
#pragma once
#include "blip3o/common.h"

namespace blip3o::sample_tokens {

// Exact float32 constants (hex literals: the same bits in C++, CUDA and Python's float.fromhex).
constexpr float kC3 = 0x1.555556p-2f;
constexpr float kC5 = 0x1.99999ap-3f;
constexpr float kC7 = 0x1.24924ap-3f;
constexpr float kC9 = 0x1.c71c72p-4f;
constexpr float kLn2Hi = 0x1.63p-1f;        // 0.693359375: e * kLn2Hi is exact for |e| < 2^15
constexpr float kLn2Lo = -0x1.bd0106p-13f;  // ln 2 - kLn2Hi
// Gumbel noise lies in [-2.8116, 16.6356]: a token whose scaled logit is more than this below the
// row max can never win the argmax (margin > 1 for |max| < kPruneMaxAbs), so kernels may skip it.
constexpr float kPruneSpan = 20.5f;
constexpr float kPruneMaxAbs = 65536.0f;

BLIP3O_HD uint32_t mix(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

BLIP3O_HD uint32_t row_key(int64_t seed, int64_t counter) {
  const uint64_t s = static_cast<uint64_t>(seed), c = static_cast<uint64_t>(counter);
  uint32_t h = mix(static_cast<uint32_t>(s) ^ 0x9e3779b9u);
  h = mix(h ^ static_cast<uint32_t>(s >> 32));
  h = mix(h ^ static_cast<uint32_t>(c));
  return mix(h ^ static_cast<uint32_t>(c >> 32));
}

BLIP3O_HD uint32_t token_bits(uint32_t key, uint32_t index) { return mix(key ^ mix(index)); }

// IEEE-rounded arithmetic that the compiler may not fuse (nvcc contracts a * b + c by default).
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ uint32_t float_bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ float bits_float(uint32_t v) { return __uint_as_float(v); }
#else
inline float mul_rn(float a, float b) { return a * b; }
inline float add_rn(float a, float b) { return a + b; }
inline float div_rn(float a, float b) { return a / b; }
inline uint32_t float_bits(float v) { uint32_t b; std::memcpy(&b, &v, sizeof(b)); return b; }
inline float bits_float(uint32_t v) { float f; std::memcpy(&f, &v, sizeof(f)); return f; }
#endif

BLIP3O_HD float uniform(uint32_t bits) {
  return static_cast<float>(((bits >> 9) << 1) | 1u) * 0x1p-24f;  // < 2^24: exact conversion and scaling
}

// Natural log of a positive normal float, bit-identical on every face (see the top of this file).
BLIP3O_HD float plog(float x) {
  const uint32_t b = float_bits(x);
  const uint32_t mant = b & 0x7fffffu;
  const bool high = mant > 0x3504f3u;  // m > sqrt(2): halve it, bump the exponent
  const float m = bits_float(mant | (high ? 0x3f000000u : 0x3f800000u));
  const float e = static_cast<float>(static_cast<int32_t>(b >> 23) - (high ? 126 : 127));
  const float s = div_rn(add_rn(m, -1.0f), add_rn(m, 1.0f));
  const float z = mul_rn(s, s);
  float p = mul_rn(kC9, z);
  p = mul_rn(add_rn(p, kC7), z);
  p = mul_rn(add_rn(p, kC5), z);
  p = mul_rn(add_rn(p, kC3), z);
  const float r = add_rn(mul_rn(s, p), s);
  return add_rn(mul_rn(e, kLn2Hi), add_rn(mul_rn(e, kLn2Lo), add_rn(r, r)));
}

BLIP3O_HD float gumbel(uint32_t key, uint32_t index) {
  return -plog(-plog(uniform(token_bits(key, index))));
}

// Float -> uint32 that orders like the floats (-inf lowest, -0 taken as +0, so ties compare as floats
// do); the threshold searches bisect in this key space, which also steps between adjacent floats.
BLIP3O_HD uint32_t ordered_key(float v) {
  uint32_t b = float_bits(v);
  if (b == 0x80000000u) b = 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

BLIP3O_HD float key_value(uint32_t k) { return bits_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k); }

}  // namespace blip3o::sample_tokens
