// One fp32 vector type per instruction set, chosen by the macro each translation unit
// defines before including this header:
//   EDGEPLAID_ISA_SCALAR  (W = 1, plain C++: the reference every SIMD path must match)
//   EDGEPLAID_ISA_AVX2    (W = 8, AVX2 + FMA + F16C)
//   EDGEPLAID_ISA_AVX512  (W = 16, AVX-512 F/BW/VL/DQ)
// Kernels are written once against `Vec` and compiled three times; the ISA flags are set
// on the per-ISA .cpp files only, so the extension runs on CPUs without AVX-512.
// Half-precision inputs are widened in registers (vcvtph2ps / a 16-bit shift for bf16).
#pragma once
#include "isa_begin.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "dtypes.h"

#define EP_INLINE inline __attribute__((always_inline))

#if defined(EDGEPLAID_ISA_AVX512) && defined(EDGEPLAID_ISA_AMX)
#define EDGEPLAID_ISA_NS amx
#elif defined(EDGEPLAID_ISA_AVX512) && defined(EDGEPLAID_ISA_VNNI)
#define EDGEPLAID_ISA_NS avx512vnni
#elif defined(EDGEPLAID_ISA_AVX512) && defined(EDGEPLAID_ISA_BF16)
#define EDGEPLAID_ISA_NS avx512bf16
#elif defined(EDGEPLAID_ISA_AVX512)
#define EDGEPLAID_ISA_NS avx512
#elif defined(EDGEPLAID_ISA_AVX2)
#define EDGEPLAID_ISA_NS avx2
#elif defined(EDGEPLAID_ISA_SCALAR)
#define EDGEPLAID_ISA_NS scalar
#else
#error "define EDGEPLAID_ISA_SCALAR, EDGEPLAID_ISA_AVX2 or EDGEPLAID_ISA_AVX512 before simd.h"
#endif

namespace edgeplaid {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Everything compiled with ISA flags lives in the ISA's own namespace: two translation units
// must never define the same inline symbol with different instructions, or the linker could
// hand the AVX-512 copy to the AVX2 path (tests/test_isa_isolation.py checks the binary).
namespace EDGEPLAID_ISA_NS {

#if defined(EDGEPLAID_ISA_VNNI)
// acc + the sum over each int32 lane's 4 bytes of u[byte] (unsigned) * s[byte] (signed):
// vpdpbusd. As inline asm: GCC 12 copies the accumulator of _mm512_dpbusd_epi32 into a scratch
// register and back (and spills it) on every call; the asm accumulates in place.
EP_INLINE __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
}
#endif

#if defined(EDGEPLAID_ISA_AVX512)
struct Vec {
  static constexpr int W = 16;
  // Accumulator registers the MaxSim micro-tile may use (of 32 zmm).
  static constexpr int kAccRegs = 24;
  static constexpr int kRegs = 32;  // zmm0-31
  __m512 v;
  static EP_INLINE Vec zero() { return {_mm512_setzero_ps()}; }
  static EP_INLINE Vec set1(float x) { return {_mm512_set1_ps(x)}; }
  static EP_INLINE Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static EP_INLINE Vec load_f16(const uint16_t* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  static EP_INLINE Vec load_bf16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  EP_INLINE void store(float* p) const { _mm512_storeu_ps(p, v); }
  friend EP_INLINE Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  friend EP_INLINE Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
  friend EP_INLINE Vec min(Vec a, Vec b) { return {_mm512_min_ps(a.v, b.v)}; }
  friend EP_INLINE Vec abs(Vec a) { return {_mm512_abs_ps(a.v)}; }
  friend EP_INLINE Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend EP_INLINE Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend EP_INLINE Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend EP_INLINE Vec operator/(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }
  // Bit i set where a[i] > b[i].
  friend EP_INLINE uint32_t gt_mask(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ); }
  EP_INLINE float sum() const { return _mm512_reduce_add_ps(v); }
  EP_INLINE float max_lane() const { return _mm512_reduce_max_ps(v); }
  // Lanes [0, n) to p[0 : n) (0 <= n <= W); nothing past them is touched.
  EP_INLINE void store_first(float* p, int n) const { _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1u), v); }
};
#elif defined(EDGEPLAID_ISA_AVX2)
struct Vec {
  static constexpr int W = 8;
  static constexpr int kAccRegs = 12;  // of 16 ymm: 12 accumulators + broadcasts + one query vector
  static constexpr int kRegs = 16;     // ymm0-15
  __m256 v;
  static EP_INLINE Vec zero() { return {_mm256_setzero_ps()}; }
  static EP_INLINE Vec set1(float x) { return {_mm256_set1_ps(x)}; }
  static EP_INLINE Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static EP_INLINE Vec load_f16(const uint16_t* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  static EP_INLINE Vec load_bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  }
  EP_INLINE void store(float* p) const { _mm256_storeu_ps(p, v); }
  friend EP_INLINE Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  friend EP_INLINE Vec max(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
  friend EP_INLINE Vec min(Vec a, Vec b) { return {_mm256_min_ps(a.v, b.v)}; }
  friend EP_INLINE Vec abs(Vec a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }
  friend EP_INLINE Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend EP_INLINE Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
  friend EP_INLINE Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
  friend EP_INLINE Vec operator/(Vec a, Vec b) { return {_mm256_div_ps(a.v, b.v)}; }
  friend EP_INLINE uint32_t gt_mask(Vec a, Vec b) {
    return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)));
  }
  EP_INLINE float sum() const {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
  }
  EP_INLINE float max_lane() const {
    const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(t, _mm_shuffle_ps(t, t, 1)));
  }
  // Lanes [0, n) to p[0 : n) (0 <= n <= W); nothing past them is touched.
  EP_INLINE void store_first(float* p, int n) const {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane), v);
  }
};
#else
struct Vec {
  static constexpr int W = 1;
  static constexpr int kAccRegs = 8;
  static constexpr int kRegs = 16;
  float v;
  static EP_INLINE Vec zero() { return {0.0f}; }
  static EP_INLINE Vec set1(float x) { return {x}; }
  static EP_INLINE Vec load(const float* p) { return {*p}; }
  static EP_INLINE Vec load_f16(const uint16_t* p) { return {f16_to_float(*p)}; }
  static EP_INLINE Vec load_bf16(const uint16_t* p) { return {bf16_to_float(*p)}; }
  EP_INLINE void store(float* p) const { *p = v; }
  EP_INLINE float max_lane() const { return v; }
  EP_INLINE void store_first(float* p, int n) const {
    if (n > 0) *p = v;
  }
  // A fused multiply-add, as the SIMD paths do: one rounding per step, so that integer-valued
  // inputs give bit-identical scores on every ISA.
  friend EP_INLINE Vec fmadd(Vec a, Vec b, Vec c) { return {__builtin_fmaf(a.v, b.v, c.v)}; }
  friend EP_INLINE Vec max(Vec a, Vec b) { return {a.v > b.v ? a.v : b.v}; }
  friend EP_INLINE Vec min(Vec a, Vec b) { return {a.v < b.v ? a.v : b.v}; }
  friend EP_INLINE Vec abs(Vec a) { return {std::fabs(a.v)}; }
  friend EP_INLINE Vec operator+(Vec a, Vec b) { return {a.v + b.v}; }
  friend EP_INLINE Vec operator-(Vec a, Vec b) { return {a.v - b.v}; }
  friend EP_INLINE Vec operator*(Vec a, Vec b) { return {a.v * b.v}; }
  friend EP_INLINE Vec operator/(Vec a, Vec b) { return {a.v / b.v}; }
  friend EP_INLINE uint32_t gt_mask(Vec a, Vec b) { return a.v > b.v ? 1u : 0u; }
  EP_INLINE float sum() const { return v; }
};
#endif

constexpr float kLog2e = 1.4426950408889634f;  // e^x = 2^(x log2 e)

// 2^x for x in [-126, 0] (AVX-512: any x <= 0, scalef flushing to 0): n = round(x), 2^(x - n) by its Taylor polynomial of degree kDegree on
// [-1/2, 1/2] (relative error < 2e-7 at 6, the float32 attention's p; < 5e-5 at 4, enough for p
// that is rounded to bf16's 4e-3), times 2^n.
template <int kDegree>
EP_INLINE Vec exp2_neg(Vec x) {
  static_assert(kDegree >= 4 && kDegree <= 6, "degrees 4 to 6");
#if defined(EDGEPLAID_ISA_AVX512)
  const Vec n{_mm512_roundscale_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
#elif defined(EDGEPLAID_ISA_AVX2)
  const Vec n{_mm256_round_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
#else
  const Vec n{std::nearbyint(x.v)};
#endif
  const Vec f = fmadd(n, Vec::set1(-1.0f), x);
  constexpr float c[7] = {1.0f, 6.9314718e-1f, 2.4022651e-1f, 5.5504109e-2f, 9.6181291e-3f, 1.3333558e-3f, 1.5403530e-4f};
  Vec p = Vec::set1(c[kDegree]);
  if constexpr (kDegree >= 6) p = fmadd(p, f, Vec::set1(c[5]));
  if constexpr (kDegree >= 5) p = fmadd(p, f, Vec::set1(c[4]));
  for (int i = 3; i >= 0; --i) p = fmadd(p, f, Vec::set1(c[i]));
#if defined(EDGEPLAID_ISA_AVX512)
  return {_mm512_scalef_ps(p.v, n.v)};
#elif defined(EDGEPLAID_ISA_AVX2)
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
  return {_mm256_mul_ps(p.v, _mm256_castsi256_ps(e))};
#else
  return {std::ldexp(p.v, int(n.v))};
#endif
}

#if defined(EDGEPLAID_ISA_AVX512)
// 16 floats rounded to bf16 with integer ops (nearest even; NaN kept quiet, as dtypes.h's
// float_to_bf16): for units without AVX512-BF16's vcvtneps2bf16.
EP_INLINE __m256i round_to_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}
#endif

// Loads W elements of storage type T widened to fp32.
template <DType T>
EP_INLINE Vec load_as_f32(const typename Elem<T>::type* p) {
  if constexpr (T == DType::f32) return Vec::load(p);
  else if constexpr (T == DType::f16) return Vec::load_f16(p);
  else return Vec::load_bf16(p);
}

// Widens n elements of type T to fp32 (n need not be a multiple of W).
template <DType T>
EP_INLINE void widen_row(const typename Elem<T>::type* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + Vec::W <= n; i += Vec::W) load_as_f32<T>(src + i).store(dst + i);
  for (; i < n; ++i) dst[i] = Elem<T>::to_float(src[i]);
}

// Narrows n fp32 values to storage type T (round to nearest even; NaN stays NaN): the twin of
// widen_row for outputs. F16C/AVX-512 convert W at a time; bf16 rounds with integer ops.
template <DType T>
EP_INLINE void narrow_row(const float* src, int64_t n, typename Elem<T>::type* dst) {
  if constexpr (T == DType::f32) {
    std::memcpy(dst, src, sizeof(float) * size_t(n));
  } else {
    int64_t i = 0;
#if defined(EDGEPLAID_ISA_AVX512)
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(src + i);
    __m256i h;
    if constexpr (T == DType::f16) {
      h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      h = round_to_bf16(x);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
  }
#elif defined(EDGEPLAID_ISA_AVX2)
  if constexpr (T == DType::f16) {
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {  // bf16: the AVX-512 rounding above, 8 lanes; NaN lanes blended in
    for (; i + 8 <= n; i += 8) {
      const __m256 x = _mm256_loadu_ps(src + i);
      const __m256i u = _mm256_castps_si256(x);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
      const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
      r = _mm256_blendv_epi8(r, quiet, _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
      // Every lane is <= 0xffff: the unsigned-saturating pack is exact; it packs within 128-bit
      // lanes, so gather the two 64-bit halves holding the results into the low 128 bits.
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_castsi256_si128(packed));
    }
  }
#endif
    for (; i < n; ++i) dst[i] = Elem<T>::from_float(src[i]);
  }
}

// Transposes an 8 x 8 block: dst[j][i] = src[i * src_ld + j], with dst[j] a row pointer.
// kStream writes with non-temporal stores (dst rows 32-byte aligned): no read for ownership
// of lines that are only written, and no eviction of the caller's working set.
// dst[j][i] = src[i][j] for an 8 x 8 block given by row pointers (src[i] + 0..7).
template <bool kStream = false>
EP_INLINE void transpose_8x8_rows(const float* const* src, float* const* dst) {
#if defined(EDGEPLAID_ISA_AVX2) || defined(EDGEPLAID_ISA_AVX512)
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src[i]);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int h = 0; h < 8; h += 4) {
    r[h + 0] = _mm256_shuffle_ps(t[h + 0], t[h + 2], 0x44);
    r[h + 1] = _mm256_shuffle_ps(t[h + 0], t[h + 2], 0xee);
    r[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
    r[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xee);
  }
  for (int j = 0; j < 4; ++j) {
    const __m256 lo = _mm256_permute2f128_ps(r[j], r[j + 4], 0x20);
    const __m256 hi = _mm256_permute2f128_ps(r[j], r[j + 4], 0x31);
    if constexpr (kStream) {
      _mm256_stream_ps(dst[j], lo);
      _mm256_stream_ps(dst[j + 4], hi);
    } else {
      _mm256_storeu_ps(dst[j], lo);
      _mm256_storeu_ps(dst[j + 4], hi);
    }
  }
#else
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) dst[j][i] = src[i][j];
#endif
}

template <bool kStream = false>
EP_INLINE void transpose_8x8(const float* src, int64_t src_ld, float* const* dst) {
  const float* rows[8];
  for (int i = 0; i < 8; ++i) rows[i] = src + i * src_ld;
  transpose_8x8_rows<kStream>(rows, dst);
}

// dst[c * stride + lane] = rows[lane][c] for lane < n_lanes and c in [c0, c1), and 0 in lanes
// [n_lanes, stride): a (n_lanes, C) matrix given by row pointers, transposed to (C, stride) in
// 8 x 8 register blocks (one strided scalar store per element costs ~4x more).
inline void transpose_rows(const float* const* rows, int64_t n_lanes, int64_t c0, int64_t c1, float* out,
                           int64_t stride) {
  int64_t lane = 0;
  for (; lane + 8 <= n_lanes; lane += 8) {
    int64_t c = c0;
    for (; c + 8 <= c1; c += 8) {
      const float* src[8];
      float* dst[8];
      for (int i = 0; i < 8; ++i) src[i] = rows[lane + i] + c;
      for (int j = 0; j < 8; ++j) dst[j] = out + (c + j) * stride + lane;
      transpose_8x8_rows(src, dst);
    }
    for (; c < c1; ++c)
      for (int i = 0; i < 8; ++i) out[c * stride + lane + i] = rows[lane + i][c];
  }
  for (; lane < n_lanes; ++lane)
    for (int64_t c = c0; c < c1; ++c) out[c * stride + lane] = rows[lane][c];
  if (n_lanes < stride)
    for (int64_t c = c0; c < c1; ++c) std::fill(out + c * stride + n_lanes, out + (c + 1) * stride, 0.0f);
}

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
