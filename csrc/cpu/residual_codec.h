// Decoding of PLAID residuals, shared by decompress_residuals and fused_decompress_maxsim.
//
// Bit order (pinned by tests/ops/test_decompress_residuals.py::test_golden_bit_order): the
// residual row of a token is a little-endian bit string; dimension d's bucket index occupies
// bits [d * nbits, (d + 1) * nbits), i.e. byte d * nbits / 8, starting at bit
// (d * nbits) % 8 counted from the least significant bit. For nbits = 4, byte 0 = dim 0 in
// the low nibble and dim 1 in the high nibble.
//
// token = normalize(centroids[code] + bucket_weights[bucket index of each dimension]),
// normalize(x) = x / max(||x||_2, 1e-12), as colbert-ai's ResidualCodec.decompress does.
#pragma once
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "maxsim_core.h"

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

// byte value -> the (8 / nbits) bucket weights it encodes, in dimension order.
struct ByteTable {
  std::vector<float> weights;  // (256, per_byte)
  int per_byte;
  ByteTable(const float* bucket_weights, int nbits) : weights(size_t(256 * (8 / nbits))), per_byte(8 / nbits) {
    const int mask = (1 << nbits) - 1;
    for (int b = 0; b < 256; ++b)
      for (int m = 0; m < per_byte; ++m) weights[size_t(b * per_byte + m)] = bucket_weights[(b >> (m * nbits)) & mask];
  }
};

// Writes the residual part of a token, bucket_weights[b_t[d]] for each d, to out (dim fp32).
template <int PB>
EP_INLINE void copy_byte_weights(const uint8_t* residual, const float* w, int64_t n_bytes, float* out) {
  // A constant size: the copy is one or two moves, not a call to memcpy.
  for (int64_t b = 0; b < n_bytes; ++b) std::memcpy(out + b * PB, w + residual[b] * PB, sizeof(float) * PB);
}

EP_INLINE void decode_residual(const uint8_t* residual, const ByteTable& table, int64_t dim, float* out) {
  const float* w = table.weights.data();
  switch (table.per_byte) {
    case 1: copy_byte_weights<1>(residual, w, dim, out); break;
    case 2: copy_byte_weights<2>(residual, w, dim / 2, out); break;
    case 4: copy_byte_weights<4>(residual, w, dim / 4, out); break;
    default: copy_byte_weights<8>(residual, w, dim / 8, out); break;
  }
}

// Decodes residual rows to bucket weights. On AVX2/AVX-512, for nbits 1, 2 and 4 and dim a
// multiple of W, W dimensions at a time in registers: the row's 2·nbits (AVX-512) or nbits
// (AVX2) bytes are spread one byte per lane by a shuffle, shifted per lane to bring each
// dimension's bits down, masked, and looked up in the 2**nbits weights held in one register
// (two for nbits 4 on AVX2). Otherwise through the byte table.
struct ResidualDecoder {
  ByteTable table;
  int nbits;
  int64_t dim;
  bool in_registers = false;
#if defined(EDGEPLAID_ISA_AVX512)
  __m512 lut;
#elif defined(EDGEPLAID_ISA_AVX2)
  __m256 lut_lo, lut_hi;
#endif

  ResidualDecoder(const float* bucket_weights, int nbits_, int64_t dim_)
      : table(bucket_weights, nbits_), nbits(nbits_), dim(dim_) {
#if defined(EDGEPLAID_ISA_AVX512) || defined(EDGEPLAID_ISA_AVX2)
    alignas(64) float padded[16] = {};
    if (nbits <= 4)
      for (int b = 0; b < (1 << nbits); ++b) padded[b] = bucket_weights[b];
    in_registers = nbits <= 4 && dim % W == 0;
#if defined(EDGEPLAID_ISA_AVX512)
    lut = _mm512_load_ps(padded);
#else
    lut_lo = _mm256_load_ps(padded);
    lut_hi = _mm256_load_ps(padded + 8);
#endif
#endif
  }

  // out[j * dim + d] = bucket_weights[bucket index of dimension d of row j], for n consecutive rows
  // (dim * nbits / 8 bytes each): one switch per call, not per row.
  void decode_rows(const uint8_t* rows, int64_t n, float* out) const {
    const int64_t rb = dim * nbits / 8, d = dim;
#if defined(EDGEPLAID_ISA_AVX512)
    if (in_registers && nbits == 4) {
      // Rows are back to back in and out, so the chunk decodes as one stream: 16 bytes (32
      // dimensions) at a time, nibbles split and interleaved once for both halves.
      const int64_t total = n * rb;
      int64_t b = 0;
      const __m128i m = _mm_set1_epi8(0x0f);
      for (; b + 16 <= total; b += 16) {
        const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + b));
        const __m128i lo = _mm_and_si128(x, m), hi = _mm_and_si128(_mm_srli_epi16(x, 4), m);
        const __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi);
        _mm512_storeu_ps(out + 2 * b, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(first), lut));
        _mm512_storeu_ps(out + 2 * b + 16, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(second), lut));
      }
      for (; b < total; b += 8) {  // total is a multiple of 8 (dim is of 16)
        const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(rows + b));
        const __m128i lo = _mm_and_si128(x, m), hi = _mm_and_si128(_mm_srli_epi16(x, 4), m);
        _mm512_storeu_ps(out + 2 * b, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), lut));
      }
      return;
    }
#elif defined(EDGEPLAID_ISA_AVX2)
    if (in_registers && nbits == 4) {
      // As the AVX-512 stream above, 8 dimensions per lookup: indices 0-7 from lut_lo, 8-15 from
      // lut_hi, picked by bit 3 moved to the sign bit.
      const int64_t total = n * rb;
      int64_t b = 0;
      const __m128i m = _mm_set1_epi8(0x0f);
      auto put8 = [&](__m128i nibbles8, float* o) {  // the low 8 bytes of nibbles8 -> 8 floats
        const __m256i idx = _mm256_cvtepu8_epi32(nibbles8);
        const __m256 w = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, idx),
                                          _mm256_permutevar8x32_ps(lut_hi, idx),
                                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
        _mm256_storeu_ps(o, w);
      };
      for (; b + 16 <= total; b += 16) {
        const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + b));
        const __m128i lo = _mm_and_si128(x, m), hi = _mm_and_si128(_mm_srli_epi16(x, 4), m);
        const __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi);
        put8(first, out + 2 * b);
        put8(_mm_unpackhi_epi64(first, first), out + 2 * b + 8);
        put8(second, out + 2 * b + 16);
        put8(_mm_unpackhi_epi64(second, second), out + 2 * b + 24);
      }
      for (; b < total; b += 4) {  // total is a multiple of 4 (dim is of 8)
        int32_t bits4;
        std::memcpy(&bits4, rows + b, 4);
        const __m128i x = _mm_cvtsi32_si128(bits4);
        put8(_mm_unpacklo_epi8(_mm_and_si128(x, m), _mm_and_si128(_mm_srli_epi16(x, 4), m)), out + 2 * b);
      }
      return;
    }
#endif
#if defined(EDGEPLAID_ISA_AVX512) || defined(EDGEPLAID_ISA_AVX2)
    if (in_registers) {
      switch (nbits) {
        case 1: for (int64_t j = 0; j < n; ++j) decode_lanes<1>(rows + j * rb, out + j * d); return;
        case 2: for (int64_t j = 0; j < n; ++j) decode_lanes<2>(rows + j * rb, out + j * d); return;
        default: for (int64_t j = 0; j < n; ++j) decode_lanes<4>(rows + j * rb, out + j * d); return;
      }
    }
#endif
    for (int64_t j = 0; j < n; ++j) decode_residual(rows + j * rb, table, d, out + j * d);
  }

#if defined(EDGEPLAID_ISA_AVX512) || defined(EDGEPLAID_ISA_AVX2)
  template <int NB>
  EP_INLINE void decode_lanes(const uint8_t* row, float* out) const {
    constexpr int kBytes = W * NB / 8;  // bytes holding W dimensions
    // Lane l takes byte l*NB/8 and shifts it right by (l*NB) % 8.
    alignas(16) static constexpr int8_t kSpread[16] = {
        int8_t(0 * NB / 8),  int8_t(1 * NB / 8),  int8_t(2 * NB / 8),  int8_t(3 * NB / 8),
        int8_t(4 * NB / 8),  int8_t(5 * NB / 8),  int8_t(6 * NB / 8),  int8_t(7 * NB / 8),
        int8_t(8 * NB / 8),  int8_t(9 * NB / 8),  int8_t(10 * NB / 8), int8_t(11 * NB / 8),
        int8_t(12 * NB / 8), int8_t(13 * NB / 8), int8_t(14 * NB / 8), int8_t(15 * NB / 8)};
    alignas(64) static constexpr int32_t kShift[16] = {
        (0 * NB) % 8,  (1 * NB) % 8,  (2 * NB) % 8,  (3 * NB) % 8,  (4 * NB) % 8,  (5 * NB) % 8,
        (6 * NB) % 8,  (7 * NB) % 8,  (8 * NB) % 8,  (9 * NB) % 8,  (10 * NB) % 8, (11 * NB) % 8,
        (12 * NB) % 8, (13 * NB) % 8, (14 * NB) % 8, (15 * NB) % 8};
    const __m128i spread = _mm_load_si128(reinterpret_cast<const __m128i*>(kSpread));
    for (int64_t i = 0; i < dim; i += W) {
      uint64_t bits = 0;
      std::memcpy(&bits, row + i * NB / 8, kBytes);  // exactly the row's bytes: no over-read
      const __m128i bytes = _mm_shuffle_epi8(_mm_cvtsi64_si128(int64_t(bits)), spread);
#if defined(EDGEPLAID_ISA_AVX512)
      __m512i idx = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(bytes), _mm512_load_si512(kShift));
      idx = _mm512_and_si512(idx, _mm512_set1_epi32((1 << NB) - 1));
      _mm512_storeu_ps(out + i, _mm512_permutexvar_ps(idx, lut));
#else
      __m256i idx = _mm256_srlv_epi32(_mm256_cvtepu8_epi32(bytes),
                                      _mm256_load_si256(reinterpret_cast<const __m256i*>(kShift)));
      idx = _mm256_and_si256(idx, _mm256_set1_epi32((1 << NB) - 1));
      __m256 w = _mm256_permutevar8x32_ps(lut_lo, idx);
      if constexpr (NB == 4)  // indices 8-15: bit 3, moved to the sign bit, picks the high half
        w = _mm256_blendv_ps(w, _mm256_permutevar8x32_ps(lut_hi, idx),
                             _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
      _mm256_storeu_ps(out + i, w);
#endif
    }
  }
#endif
};

// out = normalize(centroid + out), in place (out holds the decoded residual).
template <DType T>
EP_INLINE void add_centroid_and_normalize(const typename Elem<T>::type* centroid, int64_t dim, float* out) {
  Vec ss = Vec::zero();
  int64_t i = 0;
  for (; i + W <= dim; i += W) {
    const Vec x = Vec::load(out + i) + load_as_f32<T>(centroid + i);
    x.store(out + i);
    ss = fmadd(x, x, ss);
  }
  float sum = ss.sum();
  for (; i < dim; ++i) {
    const float x = out[i] + Elem<T>::to_float(centroid[i]);
    out[i] = x;
    sum += x * x;
  }
  // One division, then multiplies: a vector division per W dims cost ~15% of the fused
  // kernel's time on AVX2; x * (1 / n) is within one rounding of x / n.
  const float inv = 1.0f / std::max(std::sqrt(sum), 1e-12f);
  const Vec iv = Vec::set1(inv);
  for (i = 0; i + W <= dim; i += W) (Vec::load(out + i) * iv).store(out + i);
  for (; i < dim; ++i) out[i] *= inv;
}

// Stream of decoded tokens [next_row, end) for score_document.
template <DType T>
struct DecodedRows {
  using E = typename Elem<T>::type;
  const E* centroids;
  int64_t n_centroids;
  const Compressed* tokens;
  const ResidualDecoder* decoder;
  int64_t dim, row_bytes, next_row, end;
  KernelError* err;
  int64_t next(float* buf, int64_t cap, const float** rows) {
    const int64_t n = std::min(cap, end - next_row);
    if (n <= 0) return 0;
    // Two passes: the table writes of every token retire before the vector reads of the
    // second pass (reading a token right after its piecewise writes stalls store forwarding).
    decoder->decode_rows(tokens->residuals + next_row * row_bytes, n, buf);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t t = next_row + j;
      const int64_t code = tokens->codes[t];
      if (code < 0 || code >= n_centroids) {
        report_bad_code(*err, t, code, n_centroids);
        return 0;
      }
      add_centroid_and_normalize<T>(centroids + code * dim, dim, buf + j * dim);
    }
    next_row += n;
    *rows = buf;
    return n;
  }
  void prefetch(int64_t cap) const {
    const int64_t n = std::min(cap, end - next_row);
    prefetch_bytes(tokens->residuals + next_row * row_bytes, n * row_bytes);
    const Ids& codes = tokens->codes;
    prefetch_bytes(static_cast<const char*>(codes.data) + next_row * codes.bytes, n * codes.bytes);
  }
};

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
