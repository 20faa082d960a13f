// Element types that cross the binding, and exact scalar conversions for them.
// Torch-free: fp16 and bf16 travel as raw uint16_t bit patterns.
#pragma once
#include <cstdint>
#include <cstring>

namespace edgeplaid {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// Internal linkage: these are compiled with different ISA flags in different translation
// units, so each unit keeps its own copy (see simd.h).
namespace {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// Round to nearest even, NaN kept quiet: the same result as torch's .to(torch.bfloat16).
inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// IEEE binary16 -> binary32, exact for every input (normals, subnormals, inf, NaN).
inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return bits_to_float(sign);
  // Subnormal: value = man * 2^-24, exactly representable in fp32.
  const float v = float(man) * (1.0f / 16777216.0f);
  return (h & 0x8000u) ? -v : v;
}

// binary32 -> binary16, round to nearest even (what F16C and torch do).
inline uint16_t float_to_f16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);       // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);      // overflow -> inf
  if (a < 0x38800000u) {                                      // subnormal or zero
    const float scaled = bits_to_float(a) * 16777216.0f;     // exact: times 2^24
    // nearbyint under the default rounding mode is round-half-even.
    float r = scaled + 8388608.0f;                            // 2^23 forces integer rounding
    r -= 8388608.0f;
    return uint16_t(sign | uint16_t(r));
  }
  const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
  return uint16_t(sign | uint16_t((rounded - 0x38000000u) >> 13));
}

template <DType T>
struct Elem;
template <>
struct Elem<DType::f32> {
  using type = float;
  static float to_float(float x) { return x; }
  static float from_float(float x) { return x; }
};
template <>
struct Elem<DType::f16> {
  using type = uint16_t;
  static float to_float(uint16_t x) { return f16_to_float(x); }
  static uint16_t from_float(float x) { return float_to_f16(x); }
};
template <>
struct Elem<DType::bf16> {
  using type = uint16_t;
  static float to_float(uint16_t x) { return bf16_to_float(x); }
  static uint16_t from_float(float x) { return float_to_bf16(x); }
};

}  // namespace
}  // namespace edgeplaid
