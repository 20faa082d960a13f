// int8_linear: a linear layer with int8 weights and int8 activations, quantised per output
// channel and per row (token), float32 in and out:
//
//   x'[m, :] = (LN(x[m, :]) * inv_smooth) H  (each optional: ops.h's Int8LinearInput; below)
//   sx[m] = max_k |x'[m, k]| / 127,     qx[m, k] = round(x'[m, k] / sx[m])    (per row, at call time)
//   sw[n] = max_k |w[n, k]| / 127,      qw[n, k] = round(w[n, k] / sw[n])     (per channel, packed once)
//   y[m, n] = float(sum_k qx[m, k] * qw[n, k]) * (sx[m] * sw[n]) + bias[n]
//   out = y, y + other or y * other                                          (post = 0, 1, 2)
//   out[m, j] = GELU(y[m, j]) * y[m, h + j], h = n / 2                       (post = 3, "geglu")
//
// x, other and out are float32 or all bf16 (dtype): bf16 rows are widened as they are quantised,
// other is widened in the epilogue, out rounded to nearest even once (y in float32 until then), so
// a bf16 model's linear layers run int8 without a float32 copy of their inputs and outputs.
//
// geglu is ModernBERT's MLP input (Wi's first half through the erf GELU, times its second half)
// in one call: the VNNI tile takes block j of each half as its two column blocks and writes
// h columns; one pass over x and none over the (m, n) products (other ISAs: the same blocks, the
// GELU in scalar code). h must be a multiple of kLinNR.
//
// inv_smooth (k floats, or null) divides each input channel by its smoothing factor before the
// row is quantised; quantize_weight multiplied the weight's columns by the same factors, so the
// product is unchanged while channels with outlying activations (BERT's) no longer set every
// token's scale alone (SmoothQuant, Xiao et al. 2023; ops/int8_linear.py: smooth_factors).
// norm_w (k floats, or null) normalises each row first (the layer norm in front of the layer:
// prepare_row); rotate (0, or a power of two dividing k) multiplies it by block-diagonal
// unnormalised Hadamard matrices last (hadamard_blocks), quantize_weight having rotated the
// weight's rows by the same blocks over rotate: per-token outliers spread over their block.
//
// round() is round-half-to-even of x * (127 / amax) (as torch.round); the sums are exact int32
// (|sum| <= k * 127^2 < 2^31 for every k this op is used with), converted to float32 exactly
// while k <= 1040 and else rounded to nearest even, as the twin's float64 sums are (the MLP output
// projections' k reaches 1,536 in MiniLM). ops/reference.py's int8_linear is the same arithmetic.
//
// How, on AVX2: one vpmaddubsw (u8 x s8 -> pairs summed into int16) + vpmaddwd with ones (-> int32)
// per 32 multiply-adds, which Zen 3 issues at one per cycle on two different pipes (measured:
// 2.8 such 4-byte dot products per ns and core against 2.7 vpmaddwd alone and 6.4 fp32 FMAs, i.e.
// twice the fp32 multiply-add rate; vpmaddwd on int16 would only match fp32). vpmaddubsw's
// int16 pair sum saturates for u8 * s8 in general (255 * 127 * 2 > 32767); here the unsigned
// operand is |qx| <= 127 and the signed one qw with qx's sign (vpsignb), so the pair sum is at
// most 2 * 127 * 127 = 32258: exact, with 8 bits on both sides (7-bit weights, oneDNN's way on
// CPUs without VNNI, cost 0.0005 of mean cosine on the test models). The sign costs one more op
// per product and no time (measured: 2.9 dot products per ns with it).
// The AVX-512BW unit runs the same 256-bit code (vpsignb has no 512-bit form).
//
// How, with AVX-512 VNNI (its own unit, `vnni_tile`): vpdpbusd adds four u8 x s8 products into
// each int32 lane in one instruction, without saturation. The unsigned operand is the weight
// plus 128 (one vpxord of the packed signed weight per k-quad and 16 channels, shared by a tile's
// rows), the signed one the activation quad, broadcast from memory straight into the instruction:
//   sum_k (qw + 128) * qx = sum_k qw * qx + 128 * sum_k qx,
// so the row's sum of qx, taken as it is quantised, is subtracted from the lanes: the same exact
// int32 sums as the AVX2 code (|sum| <= k * 255 * 127 < 2^31 for k < 66,000), the same outputs
// bit for bit. One instruction per 64 multiply-adds against three (vpsignb, vpmaddubsw,
// vpmaddwd) and an add per 32: the AVX2 code measured 250 Gop/s on 2 Zen 4 cores, vpdpbusd's
// peak there is 930 (peak_int8_gops()).
//
// The weights are quantised once, in Python (ops/int8_linear.py: quantize_weight, the same
// rounding); int8_linear_pack only lays them out. The activations are quantised here, per call.
//
// Layout of the packed weights (int8_linear_pack): column blocks of kLinNR output channels;
// block j is (ceil(k / 4), kLinNR, 4) int8: for the k-quad p, channel n's qw[n, 4p : 4p + 4]
// side by side, so one vector load feeds vpmaddubsw with a broadcast quad of activations.
// Padding channels and the k's past the end are 0.
//
// Work: rows in chunks of kLinChunk, one chunk at a time per thread; a chunk's activations are
// quantised once into a per-thread buffer, then every column block (kept in L1 while the
// chunk's rows stream past it) runs a kLinMR x kLinNR register tile per k-quad.
// edgeplaid-isa: avx512vnni (vnni_tile: vpdpbusd)
#pragma once
#include <algorithm>
#include <array>
#include <type_traits>
#include <utility>

#include "ops.h"
#include "parallel.h"
#include "simd.h"

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

#if defined(EDGEPLAID_ISA_AVX2) || defined(EDGEPLAID_ISA_AVX512)
#define EP_LIN_SIMD 1
#endif

constexpr int kLinLanes = 8;       // int32 lanes of a ymm: output channels per vector
constexpr int kLinVecs = 2;        // vectors per tile row
constexpr int kLinMR = 4;          // rows per tile: 8 accumulators + 2 weights + 4 temporaries of 16 ymm
constexpr int64_t kLinNR = int64_t(kLinLanes) * kLinVecs;
constexpr int64_t kLinChunk = 96;  // rows quantised together (96 x 4 KB of int8 at k = 4096): 24 x 4, 8 x 12

int64_t int8_linear_block() { return kLinNR; }

namespace {

// q[0 : kp4] = round(x[0 : k] * inv) as int8 (|q| <= 127), zero past k.
inline void quantize_row(const float* x, int64_t k, float inv, int8_t* q, int64_t kp4) {
  int64_t i = 0;
#if defined(EP_LIN_SIMD)
  const __m256 s = _mm256_set1_ps(inv);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (; i + 32 <= k; i += 32) {
    // cvtps rounds to nearest even (the default MXCSR mode), as torch.round.
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), s));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), s));
    const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 16), s));
    const __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 24), s));
    // The packs work within 128-bit halves: dwords come out as a0-3 b0-3 c0-3 d0-3 | a4-7 ... d4-7.
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(bytes, order));
  }
#endif
  for (; i < k; ++i) q[i] = int8_t(std::nearbyint(x[i] * inv));
  for (; i < kp4; ++i) q[i] = 0;
}

// The row's transform (ops.h, Int8LinearInput) with the per-channel factors folded once per
// call: x' = ((x - mean) * rstd) * scale + shift with a layer norm (scale = norm_w * inv_smooth,
// shift = norm_b * inv_smooth or null), x * scale without one (scale = inv_smooth or null).
struct RowTransform {
  bool norm;
  float eps;
  const float* scale;  // (k,) or null: 1
  const float* shift;  // (k,) or null: 0
};

// row[0 : k] = x' of the row at element `at` of x (float32 or bf16), in float32; returns
// max_k |x'[k]|. The layer norm's statistics are two passes in float32 (mean, then the mean
// square of x - mean; torch's kernel may sum in another order): the fused norm replaced torch.layer_norm's own pass over the
// bf16 rows and its rounded output (0.09 of the int8 17m's 2.0 s for 200 abstracts on a Zen 4).
inline float prepare_row(const void* x, int64_t at, bool bf16, const RowTransform& tf, int64_t k, float* row) {
  const float* f = static_cast<const float*>(x) + at;
  const uint16_t* h = static_cast<const uint16_t*>(x) + at;
  constexpr int64_t W = Vec::W;
  const int64_t kw = k / W * W;
  const auto load = [&](int64_t i) __attribute__((always_inline)) {
    return bf16 ? Vec::load_bf16(h + i) : Vec::load(f + i);
  };
  const auto scalar = [&](int64_t i) { return bf16 ? bf16_to_float(h[i]) : f[i]; };
  Vec amax = Vec::zero();
  float amax_tail = 0.0f;
  if (!tf.norm) {
    for (int64_t i = 0; i < kw; i += W) {
      Vec v = load(i);
      if (tf.scale != nullptr) v = v * Vec::load(tf.scale + i);
      v.store(row + i);
      amax = max(amax, abs(v));
    }
    for (int64_t i = kw; i < k; ++i) {
      row[i] = tf.scale != nullptr ? scalar(i) * tf.scale[i] : scalar(i);
      amax_tail = std::max(amax_tail, std::fabs(row[i]));
    }
    return std::max(amax.max_lane(), amax_tail);
  }
  Vec sum = Vec::zero();
  float sum_tail = 0.0f;
  for (int64_t i = 0; i < kw; i += W) {
    const Vec v = load(i);
    v.store(row + i);
    sum = sum + v;
  }
  for (int64_t i = kw; i < k; ++i) sum_tail += (row[i] = scalar(i));
  const float mean = (sum.sum() + sum_tail) / float(k);
  const Vec mv = Vec::set1(-mean);
  Vec sq = Vec::zero();
  for (int64_t i = 0; i < kw; i += W) {
    const Vec d = Vec::load(row + i) + mv;
    sq = fmadd(d, d, sq);
  }
  float sq_tail = 0.0f;
  for (int64_t i = kw; i < k; ++i) sq_tail += (row[i] - mean) * (row[i] - mean);
  const float rstd = 1.0f / std::sqrt((sq.sum() + sq_tail) / float(k) + tf.eps);
  const Vec rv = Vec::set1(rstd);
  for (int64_t i = 0; i < kw; i += W) {
    Vec v = (Vec::load(row + i) + mv) * rv;
    v = tf.shift != nullptr ? fmadd(v, Vec::load(tf.scale + i), Vec::load(tf.shift + i)) : v * Vec::load(tf.scale + i);
    v.store(row + i);
    amax = max(amax, abs(v));
  }
  for (int64_t i = kw; i < k; ++i) {
    float v = (row[i] - mean) * rstd * tf.scale[i];
    if (tf.shift != nullptr) v += tf.shift[i];
    row[i] = v;
    amax_tail = std::max(amax_tail, std::fabs(v));
  }
  return std::max(amax.max_lane(), amax_tail);
}

// x with lanes i and i ^ H exchanged (H < W, a power of two).
template <int H>
EP_INLINE Vec swap_lanes(Vec x) {
#if defined(EDGEPLAID_ISA_AVX512)
  if constexpr (H == 1) return {_mm512_permute_ps(x.v, 0xB1)};
  if constexpr (H == 2) return {_mm512_permute_ps(x.v, 0x4E)};
  if constexpr (H == 4) return {_mm512_shuffle_f32x4(x.v, x.v, 0xB1)};
  if constexpr (H == 8) return {_mm512_shuffle_f32x4(x.v, x.v, 0x4E)};
#elif defined(EDGEPLAID_ISA_AVX2)
  if constexpr (H == 1) return {_mm256_permute_ps(x.v, 0xB1)};
  if constexpr (H == 2) return {_mm256_permute_ps(x.v, 0x4E)};
  if constexpr (H == 4) return {_mm256_permute2f128_ps(x.v, x.v, 1)};
#endif
  return x;  // not reached: W = 1 has no lanes to exchange
}

// The butterfly (a, b) -> (a + b, a - b) over lanes i and i ^ H of one vector: the partner plus
// the lane times +1 (bit H of i clear) or -1 (set).
template <int H>
EP_INLINE Vec butterfly_lanes(Vec x) {
  alignas(64) static constexpr float kSigns[4][16] = {
      {1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1},
      {1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1},
      {1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1},
      {1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1}};
  constexpr int row = H == 1 ? 0 : H == 2 ? 1 : H == 4 ? 2 : 3;
  return fmadd(x, Vec::load(kSigns[row]), swap_lanes<H>(x));
}

// x[0 : k] <- x H in place, H block-diagonal with unnormalised Hadamard blocks of b (a power of
// two dividing k): the fast Walsh-Hadamard transform, log2 b butterfly stages a block. Stages
// within a vector exchange lanes (one shuffle and one multiply-add a vector); the rest pair
// whole vectors. Why: the MLP's output projection's input (GELU(a) * b) has a heavy tail per
// token, which per-token int8 scales to; rotated, it is spread over the block (QuaRot, Ashkboos
// et al. 2024): mean per-token cosine to fp32 with only that layer in int8, MiniLM 0.99911 ->
// 0.99984, the random 32m 0.99951 -> 0.99985 (blocks of 64; 128 to 512 no better).
inline void hadamard_blocks(float* x, int64_t k, int64_t b) {
  constexpr int64_t W = Vec::W;
  if (W > 1 && b >= W) {  // stages below W within vectors, the rest across them
    for (int64_t v = 0; v < k; v += W) {
      Vec y = Vec::load(x + v);
      if constexpr (W > 1) y = butterfly_lanes<1>(y);
      if constexpr (W > 2) y = butterfly_lanes<2>(y);
      if constexpr (W > 4) y = butterfly_lanes<4>(y);
      if constexpr (W > 8) y = butterfly_lanes<8>(y);
      y.store(x + v);
    }
    for (int64_t i0 = 0; i0 < k; i0 += b)
      for (int64_t h = W; h < b; h *= 2)
        for (int64_t i = i0; i < i0 + b; i += 2 * h)
          for (int64_t j = i; j < i + h; j += W) {
            const Vec a = Vec::load(x + j), c = Vec::load(x + j + h);
            (a + c).store(x + j);
            (a - c).store(x + j + h);
          }
    return;
  }
  for (int64_t h = 1; h < b; h *= 2)  // blocks narrower than a vector (or no vectors): scalar
    for (int64_t i = 0; i < k; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float a = x[j], c = x[j + h];
        x[j] = a + c;
        x[j + h] = a - c;
      }
}

inline float abs_max(const float* x, int64_t k) {
  constexpr int64_t W = Vec::W;
  Vec m = Vec::zero();
  int64_t i = 0;
  for (; i + W <= k; i += W) m = max(m, abs(Vec::load(x + i)));
  float tail = 0.0f;
  for (; i < k; ++i) tail = std::max(tail, std::fabs(x[i]));
  return std::max(m.max_lane(), tail);
}

#if defined(EDGEPLAID_ISA_VNNI)
// The VNNI tiles' activations: q = round(row * inv) (|q| <= 127, zero past k) written quad by
// quad into a tile's interleaved layout (quad p at tile + p * 4 * kVnniMR, kVnniMR below);
// returns sum q (the tile's correction). AVX-512: 16 values a step, their four quads stored
// from one xmm (the former scalar spread of a contiguous row cost as much as quantising it).
inline int32_t quantize_spread(const float* row, int64_t k, float inv, int8_t* tile, int64_t kq, int64_t stride) {
  const __m512 s = _mm512_set1_ps(inv);
  __m512i total = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    // cvtps rounds to nearest even (the default MXCSR mode), as torch.round.
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + i), s));
    total = _mm512_add_epi32(total, q);
    const __m128i b = _mm512_cvtepi32_epi8(q);  // |q| <= 127: exact
    int8_t* dst = tile + (i / 4) * stride;
    // Each quad through a general register (_mm_storeu_si32 needs GCC 11).
    const int32_t quads[4] = {_mm_cvtsi128_si32(b), _mm_extract_epi32(b, 1), _mm_extract_epi32(b, 2),
                              _mm_extract_epi32(b, 3)};
    for (int j = 0; j < 4; ++j) std::memcpy(dst + j * stride, &quads[j], 4);
  }
  int32_t sum = _mm512_reduce_add_epi32(total);
  for (int64_t p = i / 4; p < kq; ++p) {  // the last quads: k's tail, zeros past it
    int8_t quad[4];
    for (int j = 0; j < 4; ++j) {
      const int64_t at = 4 * p + j;
      quad[j] = at < k ? int8_t(std::nearbyint(row[at] * inv)) : int8_t(0);
      sum += quad[j];
    }
    std::memcpy(tile + p * stride, quad, 4);
  }
  return sum;
}
#endif

inline int32_t quad_at(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// acc[r * kLinNR + n] = sum_k qx[r, k] * qw[n, k] for R rows (``ld`` bytes apart) against one
// column block. The accumulators are named variables: GCC keeps an array of vectors on the stack.
template <int R>
inline void tile(const int8_t* qx, int64_t ld, const int8_t* block, int64_t kq, int32_t* acc) {
  static_assert(R >= 1 && R <= kLinMR && kLinVecs == 2, "the tile is written out for 1..4 rows of 2 vectors");
#if defined(EP_LIN_SIMD)
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
          c31 = c00;
  const int8_t* b = block;
  for (int64_t p = 0; p < kq; ++p, b += 4 * kLinNR) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 4 * kLinLanes));
    // |qx| (unsigned) times qw with qx's sign: products and pair sums as qx * qw, never saturating.
#define EP_LIN_ROW(r)                                                                                \
  if constexpr (R > r) {                                                                             \
    const __m256i a = _mm256_set1_epi32(quad_at(qx + r * ld + 4 * p));                              \
    const __m256i u = _mm256_abs_epi8(a);                                                            \
    c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(w0, a)), ones)); \
    c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(w1, a)), ones)); \
  }
    EP_LIN_ROW(0) EP_LIN_ROW(1) EP_LIN_ROW(2) EP_LIN_ROW(3)
#undef EP_LIN_ROW
  }
#define EP_LIN_ROW(r)                                                                          \
  if constexpr (R > r) {                                                                       \
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * kLinNR), c##r##0);                \
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * kLinNR + kLinLanes), c##r##1);    \
  }
  EP_LIN_ROW(0) EP_LIN_ROW(1) EP_LIN_ROW(2) EP_LIN_ROW(3)
#undef EP_LIN_ROW
#else
  for (int r = 0; r < R; ++r)
    for (int64_t n = 0; n < kLinNR; ++n) {
      int32_t sum = 0;
      for (int64_t p = 0; p < kq; ++p)
        for (int j = 0; j < 4; ++j) sum += int32_t(qx[r * ld + 4 * p + j]) * int32_t(block[(p * kLinNR + n) * 4 + j]);
      acc[r * kLinNR + n] = sum;
    }
#endif
}

#if defined(EDGEPLAID_ISA_VNNI)
constexpr int kVnniMR = 12;  // rows per tile: 12 x 2 accumulators + 2 weights + the flip of 32 zmm
constexpr int kVnniNB = 2;   // column blocks (of kLinNR channels, one zmm each) per tile

// GELU(x) = x * Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2: erf by Abramowitz & Stegun 7.1.26
// (|error| < 1.5e-7), erfc(z) = (a1 t + ... + a5 t^5) e^(-z^2), t = 1 / (1 + p z), z = |x| / sqrt 2;
// Phi = 1 - erfc / 2 for x >= 0, erfc / 2 below.
inline __m512 gelu16(__m512 x) {
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678f));
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), z, _mm512_set1_ps(1.0f)));
  __m512 poly = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
  poly = _mm512_mul_ps(poly, t);
  const __m512 power = _mm512_max_ps(_mm512_mul_ps(_mm512_mul_ps(z, z), _mm512_set1_ps(-kLog2e)),
                                     _mm512_set1_ps(-126.0f));
  const __m512 half_erfc = _mm512_mul_ps(_mm512_mul_ps(poly, exp2_neg<6>(Vec{power}).v), _mm512_set1_ps(0.5f));
  const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 phi = _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_set1_ps(1.0f), half_erfc), half_erfc);
  return _mm512_mul_ps(x, phi);
}

// One tile's arguments: R rows of quantised activations against NB column blocks.
struct VnniTileArgs {
  const int8_t* qx;      // (kq, kVnniMR, 4) the tile's int8 activations, quad p of row r at
                         // (p * kVnniMR + r) * 4 (k padded to quads with zeros)
  const int32_t* qsum;   // (R,) sum_k qx[r, k]
  const float* sx;       // (R,) the rows' scales
  const int8_t* block;   // the first column block; the next one block_stride bytes on
  int64_t block_stride;
  int64_t kq;            // k-quads
  const float* sw;       // (kLinNR,) each block's columns' scales and biases (zero-padded):
  const float* bias;     // block 0's here, block 1's at sw_b / bias_b
  const float* sw_b;
  const float* bias_b;
  bool geglu;            // out = GELU(block 0's y) * block 1's y, kLinNR columns (NB = 2)
  int post;              // 0, 1: + other, 2: * other
  bool bf16;             // other and out are bf16 (else float32)
  const void* other;     // (R, ld_out) elements at the tile's first row and column, or null
  void* out;             // (R, ld_out) likewise
  int64_t ld_out;
  int64_t cols;          // columns to write: NB * kLinNR but in the last tile
};

// out[r, c] = float(sum_k qx[r, k] * qw[c, k]) * (sx[r] * sw[c]) + bias[c] (then + or * other)
// for the tile's R rows and NB column blocks: the sums through vpdpbusd on the weights plus 128
// (header: each row's 128 * qsum comes off at the end), the epilogue from the registers.
template <int R, int NB>
void vnni_tile(const VnniTileArgs& t) {
  static_assert(R >= 1 && R <= kVnniMR && NB >= 1 && NB <= kVnniNB, "the tile is written out for 1..12 rows of 1..2 blocks");
  // Named accumulators, not an array (GCC keeps an array of vectors on the stack), and simd.h's
  // dpbusd, not the intrinsic (GCC 12 copies its accumulator out and back: 239 Gop/s measured).
  const __m512i zero = _mm512_setzero_si512();
  __m512i c0_0 = zero, c0_1 = zero, c1_0 = zero, c1_1 = zero, c2_0 = zero, c2_1 = zero, c3_0 = zero, c3_1 = zero,
          c4_0 = zero, c4_1 = zero, c5_0 = zero, c5_1 = zero, c6_0 = zero, c6_1 = zero, c7_0 = zero, c7_1 = zero,
          c8_0 = zero, c8_1 = zero, c9_0 = zero, c9_1 = zero, c10_0 = zero, c10_1 = zero, c11_0 = zero, c11_1 = zero;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const int8_t* qx = t.qx;  // the quads of one p side by side: one base, constant offsets
  const int8_t* b0 = t.block;
  const int8_t* b1 = t.block + t.block_stride;
  for (int64_t p = 0; p < t.kq; ++p, b0 += 4 * kLinNR, b1 += 4 * kLinNR, qx += 4 * kVnniMR) {
    const __m512i w0 = _mm512_xor_si512(_mm512_loadu_si512(b0), flip);
    const __m512i w1 = NB > 1 ? _mm512_xor_si512(_mm512_loadu_si512(b1), flip) : zero;
#define EP_VNNI_ROW(r)                                                   \
  if constexpr (R > r) {                                                 \
    const __m512i a = _mm512_set1_epi32(quad_at(qx + 4 * r));             \
    c##r##_0 = dpbusd(c##r##_0, w0, a);                                  \
    if constexpr (NB > 1) c##r##_1 = dpbusd(c##r##_1, w1, a);            \
  }
    EP_VNNI_ROW(0) EP_VNNI_ROW(1) EP_VNNI_ROW(2) EP_VNNI_ROW(3) EP_VNNI_ROW(4) EP_VNNI_ROW(5)
    EP_VNNI_ROW(6) EP_VNNI_ROW(7) EP_VNNI_ROW(8) EP_VNNI_ROW(9) EP_VNNI_ROW(10) EP_VNNI_ROW(11)
#undef EP_VNNI_ROW
  }
  const __m512 sw0 = _mm512_loadu_ps(t.sw), bias0 = _mm512_loadu_ps(t.bias);
  const __m512 sw1 = NB > 1 ? _mm512_loadu_ps(t.sw_b) : sw0;
  const __m512 bias1 = NB > 1 ? _mm512_loadu_ps(t.bias_b) : bias0;
  const auto lanes = [](int64_t n) { return n >= kLinNR ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(n, 0)) - 1u); };
  const __mmask16 m0 = lanes(t.cols), m1 = lanes(t.cols - kLinNR);
  // (always_inline: GCC otherwise calls the epilogue's lambdas, 5% of int8 encoding measured)
  const auto load_other = [&](__mmask16 m, int64_t at) __attribute__((always_inline)) {
    if (!t.bf16) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(t.other) + at);
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(t.other) + at);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  };
  const auto value = [](__m512i c, __m512i shift, __m512 scale, __m512 bias) __attribute__((always_inline)) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c, shift)), scale, bias);
  };
  const auto store = [&](__m512 y, __mmask16 m, int64_t at) __attribute__((always_inline)) {
    if (t.bf16) {
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(t.out) + at, m, round_to_bf16(y));  // simd.h
    } else {
      _mm512_mask_storeu_ps(static_cast<float*>(t.out) + at, m, y);
    }
  };
  const auto finish = [&](__m512i c, __m512i shift, __m512 scale, __m512 bias, __mmask16 m,
                          int64_t at) __attribute__((always_inline)) {
    __m512 y = value(c, shift, scale, bias);
    if (t.post == 1) y = _mm512_add_ps(y, load_other(m, at));
    if (t.post == 2) y = _mm512_mul_ps(y, load_other(m, at));
    store(y, m, at);
  };
#define EP_VNNI_ROW(r)                                                                               \
  if constexpr (R > r) {                                                                             \
    const __m512i shift = _mm512_set1_epi32(128 * t.qsum[r]);                                        \
    const __m512 sx = _mm512_set1_ps(t.sx[r]);                                                       \
    if (NB > 1 && t.geglu) {                                                                         \
      const __m512 a = value(c##r##_0, shift, _mm512_mul_ps(sx, sw0), bias0);                        \
      const __m512 b = value(c##r##_1, shift, _mm512_mul_ps(sx, sw1), bias1);                        \
      store(_mm512_mul_ps(gelu16(a), b), m0, r * t.ld_out);                                          \
    } else {                                                                                         \
      finish(c##r##_0, shift, _mm512_mul_ps(sx, sw0), bias0, m0, r * t.ld_out);                      \
      if constexpr (NB > 1) finish(c##r##_1, shift, _mm512_mul_ps(sx, sw1), bias1, m1, r * t.ld_out + kLinNR); \
    }                                                                                                \
  }
  EP_VNNI_ROW(0) EP_VNNI_ROW(1) EP_VNNI_ROW(2) EP_VNNI_ROW(3) EP_VNNI_ROW(4) EP_VNNI_ROW(5)
  EP_VNNI_ROW(6) EP_VNNI_ROW(7) EP_VNNI_ROW(8) EP_VNNI_ROW(9) EP_VNNI_ROW(10) EP_VNNI_ROW(11)
#undef EP_VNNI_ROW
}

using VnniTile = void (*)(const VnniTileArgs&);
template <int NB, int... R>
constexpr std::array<VnniTile, sizeof...(R)> vnni_tiles(std::integer_sequence<int, R...>) {
  return {&vnni_tile<R + 1, NB>...};
}
// kVnniTiles[nb - 1][rows - 1]
constexpr std::array<std::array<VnniTile, kVnniMR>, kVnniNB> kVnniTiles = {
    vnni_tiles<1>(std::make_integer_sequence<int, kVnniMR>{}), vnni_tiles<2>(std::make_integer_sequence<int, kVnniMR>{})};
#endif

// out[0 : cols] = acc * (sx * sw) + bias, then + other or * other; other and out float32, or
// bf16 (the scalar loop: bf16 models run where the VNNI tile's epilogue does).
inline void epilogue(const int32_t* acc, float sx, const float* sw, const float* bias, int post,
                     const void* other_ptr, void* out_ptr, bool bf16, int64_t cols) {
  int64_t n = 0;
  if (bf16) {
    const uint16_t* other = static_cast<const uint16_t*>(other_ptr);
    uint16_t* out = static_cast<uint16_t*>(out_ptr);
    for (; n < cols; ++n) {
      float y = float(acc[n]) * (sx * sw[n]) + bias[n];
      if (post == 1) y += bf16_to_float(other[n]);
      if (post == 2) y *= bf16_to_float(other[n]);
      out[n] = float_to_bf16(y);
    }
    return;
  }
  const float* other = static_cast<const float*>(other_ptr);
  float* out = static_cast<float*>(out_ptr);
#if defined(EP_LIN_SIMD)
  const __m256 s = _mm256_set1_ps(sx);
  for (; n + 8 <= cols; n += 8) {
    const __m256 a = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + n)));
    __m256 y = _mm256_add_ps(_mm256_mul_ps(a, _mm256_mul_ps(s, _mm256_loadu_ps(sw + n))), _mm256_loadu_ps(bias + n));
    if (post == 1) y = _mm256_add_ps(y, _mm256_loadu_ps(other + n));
    if (post == 2) y = _mm256_mul_ps(y, _mm256_loadu_ps(other + n));
    _mm256_storeu_ps(out + n, y);
  }
#endif
  for (; n < cols; ++n) {
    float y = float(acc[n]) * (sx * sw[n]) + bias[n];
    if (post == 1) y += other[n];
    if (post == 2) y *= other[n];
    out[n] = y;
  }
}

// GELU with the erf, as torch's F.gelu (scalar: the ISAs without the VNNI tile's vector one).
inline float gelu(float y) { return 0.5f * y * (1.0f + std::erf(y * 0.70710678f)); }

// out[0 : cols] = GELU(acc * (sx * sw) + bias) * (acc_b * (sx * sw_b) + bias_b).
inline void geglu_epilogue(const int32_t* acc, const int32_t* acc_b, float sx, const float* sw, const float* bias,
                           const float* sw_b, const float* bias_b, void* out, bool bf16, int64_t cols) {
  for (int64_t c = 0; c < cols; ++c) {
    const float y = gelu(float(acc[c]) * (sx * sw[c]) + bias[c]) * (float(acc_b[c]) * (sx * sw_b[c]) + bias_b[c]);
    if (bf16) static_cast<uint16_t*>(out)[c] = float_to_bf16(y);
    else static_cast<float*>(out)[c] = y;
  }
}

// &p[at] for float32 or bf16 elements.
template <typename P>
inline P* element(P* p, int64_t at, bool bf16) {
  using Byte = std::conditional_t<std::is_const_v<P>, const char, char>;
  return static_cast<P*>(static_cast<Byte*>(p) + at * (bf16 ? 2 : 4));
}

struct LinScratch {
  std::vector<int8_t> qx;
  std::vector<float> sx;
  std::vector<int32_t> qsum;  // sum_k qx[r, k] (the VNNI tile's correction)
  std::vector<float> row32;  // one row of x' in float32 (prepare_row)
  std::vector<int32_t> acc;
};
inline LinScratch& lin_scratch() {
  static thread_local LinScratch s;
  return s;
}

}  // namespace

void int8_linear_pack(const int8_t* qweight, int64_t n, int64_t k, int8_t* packed) {
  const int64_t kq = (k + 3) / 4, n_blocks = (n + kLinNR - 1) / kLinNR;
  std::memset(packed, 0, size_t(n_blocks * kq * kLinNR * 4));
  for (int64_t c = 0; c < n; ++c) {
    int8_t* blk = packed + (c / kLinNR) * kq * kLinNR * 4;
    const int64_t lane = c % kLinNR;
    for (int64_t i = 0; i < k; ++i) blk[((i / 4) * kLinNR + lane) * 4 + (i % 4)] = qweight[c * k + i];
  }
}

void int8_linear(const Int8LinearInput& in, const int8_t* packed, const float* scales, const float* bias, int64_t n,
                 int post, const void* other, void* out, KernelError& err) {
  (void)err;
  const int64_t m = in.m, k = in.k;
  const int64_t kq = (k + 3) / 4, kp4 = 4 * kq, n_blocks = (n + kLinNR - 1) / kLinNR;
  const int64_t n_chunks = (m + kLinChunk - 1) / kLinChunk;
  const bool geglu = post == 3, bf16 = in.dtype == DType::bf16;
  const int64_t n_out = geglu ? n / 2 : n;  // geglu: n / 2 a multiple of kLinNR (the binding checks)
  // The norm's weight and bias times the smoothing, once per call.
  std::vector<float> folded;
  RowTransform tf{in.norm_w != nullptr, in.norm_eps, in.inv_smooth, nullptr};
  if (tf.norm) {
    folded.resize(size_t(2 * k));
    for (int64_t i = 0; i < k; ++i) {
      const float s = in.inv_smooth != nullptr ? in.inv_smooth[i] : 1.0f;
      folded[size_t(i)] = in.norm_w[i] * s;
      folded[size_t(k + i)] = in.norm_b != nullptr ? in.norm_b[i] * s : 0.0f;
    }
    tf.scale = folded.data();
    tf.shift = in.norm_b != nullptr ? folded.data() + k : nullptr;
  }
  parallel_for(n_chunks, 1, [&](int64_t c0, int64_t c1) {
    LinScratch& s = lin_scratch();
    if (s.qx.size() < size_t(kLinChunk * kp4)) s.qx.resize(size_t(kLinChunk * kp4));
    if (s.sx.size() < size_t(kLinChunk)) s.sx.resize(size_t(kLinChunk));
    if (s.qsum.size() < size_t(kLinChunk)) s.qsum.resize(size_t(kLinChunk));
    if (s.row32.size() < size_t(k)) s.row32.resize(size_t(k));
    if (s.acc.size() < size_t(2 * kLinMR * kLinNR)) s.acc.resize(size_t(2 * kLinMR * kLinNR));
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t r0 = chunk * kLinChunk, rows = std::min(kLinChunk, m - r0);
      for (int64_t r = 0; r < rows; ++r) {
        float* row = s.row32.data();
        float amax = prepare_row(in.x, (r0 + r) * k, bf16, tf, k, row);
        if (in.rotate > 0) {
          hadamard_blocks(row, k, in.rotate);
          amax = abs_max(row, k);
        }
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        s.sx[r] = amax / 127.0f;
#if defined(EDGEPLAID_ISA_VNNI)
        int8_t* tile = s.qx.data() + (r / kVnniMR) * kp4 * kVnniMR + (r % kVnniMR) * 4;
        s.qsum[size_t(r)] = quantize_spread(row, k, inv, tile, kq, 4 * kVnniMR);
#else
        quantize_row(row, k, inv, s.qx.data() + r * kp4, kp4);
#endif
      }
#if defined(EDGEPLAID_ISA_VNNI)
      const int64_t block_bytes = kq * kLinNR * 4;
      // geglu: tile j pairs block j of each half; else tiles of kVnniNB neighbouring blocks.
      const int64_t half_blocks = n_blocks / 2, step = geglu ? 1 : kVnniNB;
      const int64_t tiles_n = geglu ? half_blocks : n_blocks;
      for (int64_t j = 0; j < tiles_n; j += step) {
        const int64_t nb = geglu ? 2 : std::min<int64_t>(kVnniNB, n_blocks - j);
        const int64_t col0 = j * kLinNR, other_col = geglu ? col0 + half_blocks * kLinNR : col0 + kLinNR;
        const int64_t cols = geglu ? kLinNR : std::min(nb * kLinNR, n - col0);
        for (int64_t r = 0; r < rows; r += kVnniMR) {
          const int64_t tr = std::min<int64_t>(kVnniMR, rows - r), at = (r0 + r) * n_out + col0;
          const VnniTileArgs t{s.qx.data() + r * kp4,  // tile r / kVnniMR: kp4 * kVnniMR bytes on
                               s.qsum.data() + r,
                               s.sx.data() + r,
                               packed + j * block_bytes,
                               (geglu ? half_blocks : 1) * block_bytes,
                               kq,
                               scales + col0,
                               bias + col0,
                               scales + other_col,
                               bias + other_col,
                               geglu,
                               post,
                               bf16,
                               other ? element(other, at, bf16) : nullptr,
                               element(out, at, bf16),
                               n_out,
                               cols};
          kVnniTiles[size_t(nb - 1)][size_t(tr - 1)](t);
        }
      }
#else
      // geglu: block j of each half (the second's sums kept in acc_b), the GELU in scalar code.
      const int64_t half_blocks = n_blocks / 2, tiles_n = geglu ? half_blocks : n_blocks;
      for (int64_t j = 0; j < tiles_n; ++j) {
        const int8_t* block = packed + j * kq * kLinNR * 4;
        const int64_t col0 = j * kLinNR, cols = std::min(kLinNR, n_out - col0);
        for (int64_t r = 0; r < rows; r += kLinMR) {
          const int64_t tr = std::min<int64_t>(kLinMR, rows - r);
          const int8_t* qx = s.qx.data() + r * kp4;
          const auto run = [&](const int8_t* b, int32_t* acc) {
            switch (tr) {
              case 4: tile<4>(qx, kp4, b, kq, acc); break;
              case 3: tile<3>(qx, kp4, b, kq, acc); break;
              case 2: tile<2>(qx, kp4, b, kq, acc); break;
              default: tile<1>(qx, kp4, b, kq, acc);
            }
          };
          int32_t* acc = s.acc.data();
          int32_t* acc_b = acc + kLinMR * kLinNR;
          run(block, acc);
          if (geglu) run(block + half_blocks * kq * kLinNR * 4, acc_b);
          for (int64_t t = 0; t < tr; ++t) {
            const int64_t row = r0 + r + t;
            const int64_t at = row * n_out + col0;
            if (geglu) {
              geglu_epilogue(acc + t * kLinNR, acc_b + t * kLinNR, s.sx[r + t], scales + col0, bias + col0,
                             scales + col0 + half_blocks * kLinNR, bias + col0 + half_blocks * kLinNR,
                             element(out, at, bf16), bf16, cols);
            } else {
              epilogue(acc + t * kLinNR, s.sx[r + t], scales + col0, bias + col0, post,
                       other ? element(other, at, bf16) : nullptr, element(out, at, bf16), bf16, cols);
            }
          }
        }
      }
#endif
    }
  });
}

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
