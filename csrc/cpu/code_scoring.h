// fused_decompress_maxsim scored from the codes: the stored token is
//   token = (centroids[code] + r) * inv_norm,   r[d] = bucket_weights[b_d],
// so for a query token q
//   <q, token> = (<q, centroids[code]> + sum_d q[d] * bucket_weights[b_d]) * inv_norm.
// The first term is the centroid score PLAID's stage 1 already computed (centroid_scores), the
// second reads the residual codes only, and inv_norm is stored per token by the index. No
// centroid row is read and nothing is normalised at search time.
//
// Two precisions:
//   exact (fp32): the residual codes decoded to bucket weights in registers (residual_codec.h)
//     and multiplied with the query in the MaxSim micro-kernel (maxsim_core.h).
//   int8: query tokens quantised to int8 per token, bucket weights to 7-bit levels once per call
//     (16 numbers), the codes expanded to those levels by a byte shuffle, and 4-byte dot
//     products accumulated in int32 (AVX-512 VNNI vpdpbusd; AVX-512BW vpmaddubsw + vpmaddwd;
//     AVX2 the sign trick below). The integer dot products are exact on every ISA, and the fp32
//     epilogue is the same sequence of roundings everywhere, so every SIMD path returns the
//     scalar path's scores bit for bit.
//
// Quantisation (the same plain scalar code on every ISA; no expression the compiler may contract):
//   wscale = max_b |bucket_weights[b]| / 63,  level[b] = clamp(round(w_b / wscale), -63, 63)
//   qscale_i = max_d |q_id| / 127,            qq_id = round(q_id / qscale_i)          (ties to even)
//   dot_it = sum_d qq_id * level[b_td]                                                 (exact int32)
//   s_it = fma(float(dot_it), qscale_i * wscale, centroid_score[i][code_t]) * inv_norm[t]
// How the integer sum is formed (vpmaddubsw and vpdpbusd multiply an unsigned byte by a signed one):
//   VNNI, AVX-512BW, scalar: levels stored offset, level + 64 in [1, 127], and the sum corrected
//     by -64 * sum_d qq_id. A vpmaddubsw pair sum is at most 2 * 127 * 127 = 32,258: no saturation.
//   AVX2: levels stored signed, and each product taken as |level| * (qq with level's sign)
//     (vpabsb once per broadcast document bytes, vpsignb per query vector). |level| <= 63 halves
//     the pair sums' reach (2 * 63 * 127 = 16,002), so the int16 pair sums of two groups of 4
//     bytes add without overflow before one vpmaddwd widens them: 3 multiplies per 64 byte
//     products instead of 4. Zen 2 has one vector integer multiply pipe: a 2-thread micro-kernel
//     measured 87 against 67 Gop/s (x1.30) for the same 8-bit query and the same exact sums.
#pragma once
#include <cmath>

#include "residual_codec.h"

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

constexpr int kLevelRange = 63;   // bucket weights quantised to [-63, 63] ...
constexpr int kLevelOffset = 64;  // ... stored offset (kStoredOffset) as unsigned bytes [1, 127]
constexpr int kQueryRange = 127;  // query values quantised to [-127, 127]
#if defined(EDGEPLAID_ISA_AVX2)
constexpr int kStoredOffset = 0;  // AVX2: signed levels (the sign trick)
#else
constexpr int kStoredOffset = kLevelOffset;
#endif

// ------------------------------------------------------------------ int8 vector helpers

// DocBytes: one document token's 4 level bytes broadcast to every 32-bit lane, in the form the
// ISA's dot product takes. dot4 adds the 4-byte dot products of one group of 4 dimensions to acc,
// dot8 those of two groups.
#if defined(EDGEPLAID_ISA_AVX512)
struct IVec {
  __m512i v;
  static EP_INLINE IVec load(const void* p) { return {_mm512_loadu_si512(p)}; }
  // Four bytes broadcast to every 32-bit lane.
  static EP_INLINE IVec bcast4(const uint8_t* p) {
    int32_t x;
    std::memcpy(&x, p, 4);
    return {_mm512_set1_epi32(x)};
  }
  EP_INLINE Vec to_float() const { return {_mm512_cvtepi32_ps(v)}; }
  // (*this << shift) + b, lane-wise.
  EP_INLINE IVec shl_add(int shift, IVec b) const { return {_mm512_add_epi32(_mm512_slli_epi32(v, shift), b.v)}; }
};
struct DocBytes {
  __m512i u;  // level + 64, unsigned
};
EP_INLINE DocBytes doc_bytes_of(IVec b) { return {b.v}; }
// acc + sum over the 4 bytes of each lane of u[byte] * s[byte] (u unsigned, s signed).
EP_INLINE IVec dot4(IVec acc, const DocBytes& d, IVec s) {
#if defined(EDGEPLAID_ISA_VNNI)
  return {dpbusd(acc.v, d.u, s.v)};  // simd.h
#else
  const __m512i pairs = _mm512_maddubs_epi16(d.u, s.v);  // never saturates: see the header
  return {_mm512_add_epi32(acc.v, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)))};
#endif
}
#elif defined(EDGEPLAID_ISA_AVX2)
struct IVec {
  __m256i v;
  static EP_INLINE IVec load(const void* p) { return {_mm256_loadu_si256(static_cast<const __m256i*>(p))}; }
  static EP_INLINE IVec bcast4(const uint8_t* p) {
    int32_t x;
    std::memcpy(&x, p, 4);
    return {_mm256_set1_epi32(x)};
  }
  EP_INLINE Vec to_float() const { return {_mm256_cvtepi32_ps(v)}; }
  // (*this << shift) + b, lane-wise.
  EP_INLINE IVec shl_add(int shift, IVec b) const { return {_mm256_add_epi32(_mm256_slli_epi32(v, shift), b.v)}; }
};
struct DocBytes {
  __m256i level;  // signed, [-63, 63]
  __m256i mag;    // |level|
};
EP_INLINE DocBytes doc_bytes_of(IVec b) { return {b.v, _mm256_abs_epi8(b.v)}; }
// Pair sums of |level| * (q with level's sign) = level * q, each at most 2 * 63 * 127 in magnitude.
EP_INLINE __m256i signed_pairs(const DocBytes& d, IVec q) {
  return _mm256_maddubs_epi16(d.mag, _mm256_sign_epi8(q.v, d.level));
}
EP_INLINE IVec dot4(IVec acc, const DocBytes& d, IVec q) {
  return {_mm256_add_epi32(acc.v, _mm256_madd_epi16(signed_pairs(d, q), _mm256_set1_epi16(1)))};
}
// Two groups' pair sums added in int16 (at most 4 * 63 * 127 = 32,004: exact), then widened once.
EP_INLINE IVec dot8(IVec acc, const DocBytes& d0, IVec q0, const DocBytes& d1, IVec q1) {
  const __m256i pairs = _mm256_add_epi16(signed_pairs(d0, q0), signed_pairs(d1, q1));
  return {_mm256_add_epi32(acc.v, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))};
}
#else
// One lane: 4 signed query bytes against 4 unsigned (offset) level bytes.
struct IVec {
  int32_t v;
  static EP_INLINE IVec load(const void* p) {
    int32_t x;
    std::memcpy(&x, p, 4);
    return {x};
  }
  static EP_INLINE IVec bcast4(const uint8_t* p) { return load(p); }
  EP_INLINE Vec to_float() const { return {float(v)}; }
  // (*this << shift) + b, as a multiply (a left shift of a negative int is undefined before C++20).
  EP_INLINE IVec shl_add(int shift, IVec b) const { return {v * (int32_t(1) << shift) + b.v}; }
};
struct DocBytes {
  uint8_t u[4];
};
EP_INLINE DocBytes doc_bytes_of(IVec b) {
  DocBytes d;
  std::memcpy(d.u, &b.v, 4);
  return d;
}
EP_INLINE IVec dot4(IVec acc, const DocBytes& d, IVec s) {
  int8_t sb[4];
  std::memcpy(sb, &s.v, 4);
  int32_t sum = acc.v;
  for (int j = 0; j < 4; ++j) sum += int32_t(d.u[j]) * int32_t(sb[j]);
  return {sum};
}
#endif

EP_INLINE DocBytes doc_bytes(const uint8_t* p) { return doc_bytes_of(IVec::bcast4(p)); }
#if !defined(EDGEPLAID_ISA_AVX2)
// Two groups one after the other (AVX2's own adds their int16 pair sums before one widening).
EP_INLINE IVec dot8(IVec acc, const DocBytes& d0, IVec s0, const DocBytes& d1, IVec s1) {
  return dot4(dot4(acc, d0, s0), d1, s1);
}
#endif

// Accumulator registers of the int8 tile: VNNI needs none besides the accumulators and the
// query vectors; vpmaddubsw + vpmaddwd need a temporary and the vector of ones, and AVX2 the
// two groups' document bytes and their magnitudes.
constexpr int kInt8AccRegs = Vec::W == 16 ? 24 : 8;

// ------------------------------------------------------------------ quantisation

// Bucket weights -> 7-bit levels, stored as bytes level + kStoredOffset; wscale such that
// level ~ weight / wscale.
struct Levels {
  uint8_t of_bucket[256];
  float wscale;
  Levels(const float* bucket_weights, int nbits) {
    const int n = 1 << nbits;
    float amax = 0.0f;
    for (int b = 0; b < n; ++b) amax = std::max(amax, std::fabs(bucket_weights[b]));
    wscale = amax > 0.0f ? amax / float(kLevelRange) : 0.0f;
    for (int b = 0; b < 256; ++b) {
      int level = 0;
      if (b < n && wscale > 0.0f) level = int(std::nearbyint(bucket_weights[b] / wscale));
      of_bucket[b] = uint8_t(std::clamp(level, -kLevelRange, kLevelRange) + kStoredOffset);  // mod 256
    }
  }
};

// ------------------------------------------------------------------ residual codes -> levels

// Writes the levels of one token's dimensions to out[0 : dim4) (dim4 = dim rounded up to 4; the
// padding gets level 0, i.e. weight 0, against query bytes that are 0 there).
struct LevelDecoder {
  uint8_t table[256 * 8];  // byte value -> the (8 / nbits) levels it encodes
  int nbits, per_byte;
  int64_t dim, dim4, row_bytes;
  alignas(16) uint8_t lut16[16];  // bucket index -> level, for the byte shuffle (nbits <= 4)

  LevelDecoder(const Levels& levels, int nbits_, int64_t dim_)
      : nbits(nbits_), per_byte(8 / nbits_), dim(dim_), dim4((dim_ + 3) / 4 * 4), row_bytes(dim_ * nbits_ / 8) {
    const int mask = (1 << nbits) - 1;
    for (int b = 0; b < 256; ++b)
      for (int m = 0; m < per_byte; ++m) table[b * per_byte + m] = levels.of_bucket[(b >> (m * nbits)) & mask];
    for (int i = 0; i < 16; ++i) lut16[i] = levels.of_bucket[nbits <= 4 ? (i & mask) : i];
  }

  // Levels of rows [0, n) of residuals into out (n, dim4). One switch per chunk; the loops keep
  // every size in registers (stores through uint8_t* may alias anything, so members read inside
  // the loop would be reloaded after every store). When dim is a multiple of 4 the output rows are
  // back to back just like the input rows, so the chunk decodes as one stream, 32 bytes at a time.
  void decode_rows(const uint8_t* residuals, int64_t n, uint8_t* out) const {
    switch (nbits) {
      case 1: decode_rows_nb<1>(residuals, n, out); break;
      case 2: decode_rows_nb<2>(residuals, n, out); break;
      case 4: decode_rows_nb<4>(residuals, n, out); break;
      default: decode_rows_nb<8>(residuals, n, out); break;
    }
  }

  template <int NB>
  EP_INLINE void decode_rows_nb(const uint8_t* residuals, int64_t n, uint8_t* out) const {
    const int64_t rb = row_bytes, d4 = dim4, dm = dim;
    if (dm == d4) {
      decode_stream<NB>(residuals, n * rb, out);
      return;
    }
    for (int64_t j = 0; j < n; ++j) {
      decode_stream<NB>(residuals + j * rb, rb, out + j * d4);
      for (int64_t d = dm; d < d4; ++d) out[j * d4 + d] = uint8_t(kStoredOffset);
    }
  }

  // out[k * (8 / NB) + m] = level of field m of byte k, for bytes [0, n_bytes) of in.
  template <int NB>
  EP_INLINE void decode_stream(const uint8_t* in, int64_t n_bytes, uint8_t* out) const {
    constexpr int PB = 8 / NB;
    const uint8_t* tab = table;
    int64_t b = 0;
#if defined(EDGEPLAID_ISA_AVX2) || defined(EDGEPLAID_ISA_AVX512)
    const __m128i lut = _mm_load_si128(reinterpret_cast<const __m128i*>(lut16));
#if defined(EDGEPLAID_ISA_AVX512)
    if constexpr (NB == 4) {  // 64 bytes -> 128 levels; the qword permutes undo the per-lane unpacks
      const __m512i lut4 = _mm512_broadcast_i32x4(lut);
      const __m512i m = _mm512_set1_epi8(0x0f);
      const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
      const __m512i second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
      for (; b + 64 <= n_bytes; b += 64) {
        const __m512i x = _mm512_loadu_si512(in + b);
        const __m512i lo = _mm512_shuffle_epi8(lut4, _mm512_and_si512(x, m));
        const __m512i hi = _mm512_shuffle_epi8(lut4, _mm512_and_si512(_mm512_srli_epi16(x, 4), m));
        const __m512i a = _mm512_unpacklo_epi8(lo, hi), c = _mm512_unpackhi_epi8(lo, hi);
        _mm512_storeu_si512(out + 2 * b, _mm512_permutex2var_epi64(a, first, c));
        _mm512_storeu_si512(out + 2 * b + 64, _mm512_permutex2var_epi64(a, second, c));
      }
    }
#endif
    if constexpr (NB == 4 || NB == 2) {
      // vpshufb and the unpacks work within 128-bit lanes: lane 0 holds bytes 0-15 of the block,
      // lane 1 bytes 16-31; the final cross-lane permutes put the outputs in byte order.
      const __m256i lut2 = _mm256_broadcastsi128_si256(lut);
      for (; b + 32 <= n_bytes; b += 32) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + b));
        uint8_t* o = out + b * PB;
        if constexpr (NB == 4) {
          const __m256i m = _mm256_set1_epi8(0x0f);
          const __m256i lo = _mm256_shuffle_epi8(lut2, _mm256_and_si256(x, m));
          const __m256i hi = _mm256_shuffle_epi8(lut2, _mm256_and_si256(_mm256_srli_epi16(x, 4), m));
          const __m256i a = _mm256_unpacklo_epi8(lo, hi), c = _mm256_unpackhi_epi8(lo, hi);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_permute2x128_si256(a, c, 0x20));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 32), _mm256_permute2x128_si256(a, c, 0x31));
        } else {
          const __m256i m = _mm256_set1_epi8(0x03);
          const __m256i f0 = _mm256_shuffle_epi8(lut2, _mm256_and_si256(x, m));
          const __m256i f1 = _mm256_shuffle_epi8(lut2, _mm256_and_si256(_mm256_srli_epi16(x, 2), m));
          const __m256i f2 = _mm256_shuffle_epi8(lut2, _mm256_and_si256(_mm256_srli_epi16(x, 4), m));
          const __m256i f3 = _mm256_shuffle_epi8(lut2, _mm256_and_si256(_mm256_srli_epi16(x, 6), m));
          const __m256i p01 = _mm256_unpacklo_epi8(f0, f1), p01h = _mm256_unpackhi_epi8(f0, f1);
          const __m256i p23 = _mm256_unpacklo_epi8(f2, f3), p23h = _mm256_unpackhi_epi8(f2, f3);
          const __m256i q0 = _mm256_unpacklo_epi16(p01, p23), q1 = _mm256_unpackhi_epi16(p01, p23);
          const __m256i q2 = _mm256_unpacklo_epi16(p01h, p23h), q3 = _mm256_unpackhi_epi16(p01h, p23h);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_permute2x128_si256(q0, q1, 0x20));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 32), _mm256_permute2x128_si256(q2, q3, 0x20));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 64), _mm256_permute2x128_si256(q0, q1, 0x31));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 96), _mm256_permute2x128_si256(q2, q3, 0x31));
        }
      }
    }
    if constexpr (NB <= 4)
      for (; b + 8 <= n_bytes; b += 8) decode8<NB>(lut, in + b, out + b * PB);
#endif
    for (; b < n_bytes; ++b) std::memcpy(out + b * PB, tab + in[b] * PB, PB);
  }

#if defined(EDGEPLAID_ISA_AVX2) || defined(EDGEPLAID_ISA_AVX512)
  // Decodes 8 residual bytes (64 / NB dimensions) with byte shuffles; reads only those 8 bytes.
  template <int NB>
  static EP_INLINE void decode8(__m128i lut, const uint8_t* in, uint8_t* o) {
    const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(in));
    if constexpr (NB == 4) {  // byte k -> dims 2k (low nibble), 2k + 1 (high nibble)
      const __m128i lo = _mm_and_si128(x, _mm_set1_epi8(0x0f));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(x, 4), _mm_set1_epi8(0x0f));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o),
                       _mm_unpacklo_epi8(_mm_shuffle_epi8(lut, lo), _mm_shuffle_epi8(lut, hi)));
    } else if constexpr (NB == 2) {  // byte k -> dims 4k .. 4k + 3, two bits each from the bottom
      const __m128i m = _mm_set1_epi8(0x03);
      const __m128i f0 = _mm_shuffle_epi8(lut, _mm_and_si128(x, m));
      const __m128i f1 = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(x, 2), m));
      const __m128i f2 = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(x, 4), m));
      const __m128i f3 = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(x, 6), m));
      const __m128i p01 = _mm_unpacklo_epi8(f0, f1), p23 = _mm_unpacklo_epi8(f2, f3);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_unpacklo_epi16(p01, p23));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16), _mm_unpackhi_epi16(p01, p23));
    } else {  // NB 1: byte k -> dims 8k .. 8k + 7, bit j for dim 8k + j
      const __m128i bit = _mm_set1_epi64x(int64_t(0x8040201008040201ull));
      const __m128i w0 = _mm_shuffle_epi8(lut, _mm_setzero_si128());
      const __m128i w1 = _mm_shuffle_epi8(lut, _mm_set1_epi8(1));
#pragma GCC unroll 4
      for (int h = 0; h < 4; ++h) {  // two bytes -> 16 dims at a time
        const __m128i spread = _mm_shuffle_epi8(
            x, _mm_unpacklo_epi64(_mm_set1_epi8(char(2 * h)), _mm_set1_epi8(char(2 * h + 1))));
        const __m128i set = _mm_cmpeq_epi8(_mm_and_si128(spread, bit), bit);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16 * h), _mm_blendv_epi8(w0, w1, set));
      }
    }
  }
#endif
};

// ------------------------------------------------------------------ queries

// One query prepared for code scoring: its valid tokens compacted to lanes [0, n_valid).
struct ScoredQuery {
  int64_t n_valid, n_vec, stride;
  const float* qt;      // exact: [dim][stride] (PackedQuery layout)
  const int8_t* q8;     // int8: [dim4 / 4][stride][4] quantised values
  const float* scale;   // int8: [stride] qscale_i * wscale
  const int32_t* bias;  // int8: [stride] -kStoredOffset * sum_d qq_id
  const float* table;   // [n_centroids][tstride] centroid scores of the valid tokens
  int64_t tstride;      // >= stride: the ScoreTable's own when it is centroid-major
};

struct ScoredQueries {
  std::vector<ScoredQuery> qs;
  std::vector<std::vector<float>> qt, scale;
  std::vector<float> table_fallback;  // the tables when too large for call_buffer's cached one
  std::vector<std::vector<int8_t>> q8;
  std::vector<std::vector<int32_t>> bias;
};

// Quantises row q (dim fp32) into lane `lane` of q8 and returns qscale.
inline float quantise_query_row(const float* q, int64_t dim, int64_t stride, int64_t lane, int8_t* q8,
                                int32_t* sum) {
  float amax = 0.0f;
  for (int64_t d = 0; d < dim; ++d) amax = std::max(amax, std::fabs(q[d]));
  const float qscale = amax > 0.0f ? amax / float(kQueryRange) : 0.0f;
  int32_t s = 0;
  for (int64_t d = 0; d < dim; ++d) {
    int v = qscale > 0.0f ? int(std::nearbyint(q[d] / qscale)) : 0;
    v = std::clamp(v, -kQueryRange, kQueryRange);
    q8[(d / 4) * stride * 4 + lane * 4 + d % 4] = int8_t(v);
    s += v;
  }
  *sum = s;
  return qscale;
}

// Lanes [0, n_valid) quantised from rows rows[lane] of data (dim floats each): q8 [dim4 / 4][stride][4],
// scale[lane] = qscale * factor, bias[lane] = -kStoredOffset * sum_d qq (the stored levels' offset
// taken back); zero past n_valid. Stage 4 (factor: the levels' wscale) and stage 1's int8 kernel.
inline void quantise_lanes(const float* data, const int64_t* rows, int64_t n_valid, int64_t dim, int64_t stride,
                           float factor, std::vector<int8_t>& q8, std::vector<float>& scale,
                           std::vector<int32_t>& bias) {
  q8.assign(size_t((dim + 3) / 4 * stride * 4), 0);
  scale.assign(size_t(stride), 0.0f);
  bias.assign(size_t(stride), 0);
  for (int64_t lane = 0; lane < n_valid; ++lane) {
    int32_t sum = 0;
    scale[size_t(lane)] = quantise_query_row(data + rows[lane] * dim, dim, stride, lane, q8.data(), &sum) * factor;
    bias[size_t(lane)] = -kStoredOffset * sum;
  }
}

inline ScoredQueries prepare_queries(const Queries& q, const ScoreTable& scores, bool int8, float wscale) {
  ScoredQueries out;
  const int64_t nq = q.nq, dim = q.dim, n_centroids = scores.n_centroids;
  out.qs.resize(size_t(nq));
  out.qt.resize(size_t(nq));
  out.scale.resize(size_t(nq));
  // A token-major ScoreTable is transposed: n_centroids x stride floats a query (0.5-2 MiB), in
  // one call_buffer. A centroid-major one (unmasked queries) is read in place.
  const bool in_place = scores.stride > 0;
  std::vector<int64_t> table_at(size_t(nq) + 1, 0);
  for (int64_t k = 0; k < nq && !in_place; ++k) {
    int64_t n_valid = 0;
    for (int64_t i = 0; i < q.lq; ++i) n_valid += (q.mask == nullptr || q.mask[k * q.lq + i]) ? 1 : 0;
    const int64_t stride = std::max<int64_t>((n_valid + W - 1) / W * W, W);
    table_at[size_t(k) + 1] = table_at[size_t(k)] + n_centroids * stride;
  }
  float* const tables = in_place ? nullptr : call_buffer(table_at[size_t(nq)], out.table_fallback);
  out.q8.resize(size_t(nq));
  out.bias.resize(size_t(nq));
  for (int64_t k = 0; k < nq; ++k) {
    std::vector<int64_t> rows;
    const PackedQuery pq = pack_rows(q.data, q.mask, k * q.lq, q.lq, dim, out.qt[size_t(k)], &rows);
    ScoredQuery& s = out.qs[size_t(k)];
    s.n_valid = pq.n_valid;
    s.n_vec = pq.n_vec;
    s.stride = std::max<int64_t>(pq.stride, W);
    if (int8) {
      quantise_lanes(q.data, rows.data(), pq.n_valid, dim, s.stride, wscale, out.q8[size_t(k)], out.scale[size_t(k)],
                     out.bias[size_t(k)]);
      s.q8 = out.q8[size_t(k)].data();
      s.scale = out.scale[size_t(k)].data();
      s.bias = out.bias[size_t(k)].data();
    }
    s.qt = out.qt[size_t(k)].data();
    if (in_place) {
      s.table = scores.data + k * n_centroids * scores.stride;
      s.tstride = scores.stride;
      continue;
    }
    // The table transposed once per query: one token's scores are then a contiguous row of lanes.
    float* tp = tables + table_at[size_t(k)];  // every element written below
    std::vector<const float*> src(size_t(pq.n_valid));
    for (int64_t lane = 0; lane < pq.n_valid; ++lane) src[size_t(lane)] = scores.data + rows[size_t(lane)] * n_centroids;
    // ~512 KiB of table per task: a smaller table is filled inline (waking the pool costs more).
    parallel_for(n_centroids, std::max<int64_t>(1024, (int64_t(1) << 17) / s.stride), [&](int64_t c0, int64_t c1) {
      transpose_rows(src.data(), pq.n_valid, c0, c1, tp, s.stride);
    });
    s.table = tp;
    s.tstride = s.stride;
  }
  return out;
}

// ------------------------------------------------------------------ tiles

// Asks for the table rows of the tile's tokens (NQV * W floats each): they are gathered by
// centroid id, and without this each epilogue waits on an L2/L3 miss the dot products could hide.
template <int NQV, int NT>
EP_INLINE void prefetch_table_rows(const int32_t* codes, const float* table, int64_t tstride) {
#pragma GCC unroll 16
  for (int r = 0; r < NT; ++r) {
    const float* row = table + int64_t(codes[r]) * tstride;
#pragma GCC unroll 4
    for (int l = 0; l < NQV * W; l += 16) __builtin_prefetch(row + l, 0, 3);
  }
}

// Exact tile: the accumulators start at the tokens' centroid scores (a load where zeroing was),
// so after the dot products acc = <q, centroid> + <q, r> and the epilogue is one multiply by
// inv_norm before the running maximum.
template <int NQV, int NT, int DIM>
EP_INLINE void exact_tile(const float* qt, int64_t qstride, const float* rows, const int32_t* codes,
                          const float* inv, int64_t dim, const float* table, int64_t tstride, Vec (&m)[NQV]) {
  Vec acc[NT][NQV];
#pragma GCC unroll 16
  for (int r = 0; r < NT; ++r) {
    const float* trow = table + int64_t(codes[r]) * tstride;
#pragma GCC unroll 8
    for (int v = 0; v < NQV; ++v) acc[r][v] = Vec::load(trow + v * W);
  }
  dot_tile<NQV, NT, DIM, true>(qt, qstride, rows, dim, acc);
#pragma GCC unroll 16
  for (int r = 0; r < NT; ++r) {
    const Vec s = Vec::set1(inv[r]);
#pragma GCC unroll 8
    for (int v = 0; v < NQV; ++v) m[v] = max(m[v], acc[r][v] * s);
  }
}

// Exact sweep of n_rows decoded residual rows (fp32 bucket weights) for NQV query vectors.
template <int NQV, int DIM>
EP_INLINE void sweep_exact_dim(const float* qt, int64_t qstride, const float* rows, const int32_t* codes,
                               const float* inv, int64_t n_rows, int64_t dim, const float* table, int64_t tstride,
                               float* best) {
  constexpr int NT = tile_rows<NQV>();
  Vec m[NQV];
#pragma GCC unroll 8
  for (int v = 0; v < NQV; ++v) m[v] = Vec::load(best + v * W);
  int64_t t = 0;
  if (n_rows >= NT) prefetch_table_rows<NQV, NT>(codes, table, tstride);
  for (; t + NT <= n_rows; t += NT) {
    // The next tile's table rows are on their way while this tile's dot products run.
    if (t + 2 * NT <= n_rows) prefetch_table_rows<NQV, NT>(codes + t + NT, table, tstride);
    exact_tile<NQV, NT, DIM>(qt, qstride, rows + t * dim, codes + t, inv + t, dim, table, tstride, m);
  }
  if (t < n_rows && n_rows >= NT) {  // overlapping last tile: max is idempotent
    t = n_rows - NT;
    exact_tile<NQV, NT, DIM>(qt, qstride, rows + t * dim, codes + t, inv + t, dim, table, tstride, m);
    t = n_rows;
  }
  for (; t < n_rows; ++t) exact_tile<NQV, 1, DIM>(qt, qstride, rows + t * dim, codes + t, inv + t, dim, table, tstride, m);
#pragma GCC unroll 8
  for (int v = 0; v < NQV; ++v) m[v].store(best + v * W);
}

template <int NQV>
EP_INLINE void sweep_exact(const float* qt, int64_t qstride, const float* rows, const int32_t* codes,
                           const float* inv, int64_t n_rows, int64_t dim, const float* table, int64_t tstride,
                           float* best) {
  with_fixed_dim(dim, [&](auto d) {
    sweep_exact_dim<NQV, decltype(d)::value>(qt, qstride, rows, codes, inv, n_rows, dim, table, tstride, best);
  });
}

// acc[t][v] = bias[v] + sum_g dot4(rows[t][4g : 4g + 4], q8[g][v * W : (v + 1) * W][0 : 4])
// (kInit false: acc[t][v] += the sum, bias not added).
// AVX2 takes the groups two at a time (dot8), keeping each token's two DocBytes in registers and
// loading the query vectors (two loads a cycle hide them; 16 registers hold no more). The other
// ISAs keep the query vectors in registers and broadcast each token's bytes once per group (two
// groups' query vectors would not fit beside AVX-512's 24 accumulators).
template <int NQV, int NT, int GROUPS, bool kInit = true>
EP_INLINE void dot_tile_i8(const int8_t* q8, int64_t qstride4, const uint8_t* rows, int64_t row_bytes,
                           int64_t groups_arg, const IVec (&bias)[NQV], IVec (&acc)[NT][NQV]) {
  const int64_t groups = GROUPS > 0 ? GROUPS : groups_arg;
  const int64_t rb = GROUPS > 0 ? GROUPS * 4 : row_bytes;
  if constexpr (kInit) {
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t)
#pragma GCC unroll 8
      for (int v = 0; v < NQV; ++v) acc[t][v] = bias[v];
  }
  int64_t g = 0;
#if defined(EDGEPLAID_ISA_AVX2)
  for (; g + 2 <= groups; g += 2) {
    const int8_t* q0 = q8 + g * qstride4;
    const int8_t* q1 = q0 + qstride4;
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) {
      const DocBytes d0 = doc_bytes(rows + t * rb + g * 4), d1 = doc_bytes(rows + t * rb + g * 4 + 4);
#pragma GCC unroll 8
      for (int v = 0; v < NQV; ++v)
        acc[t][v] = dot8(acc[t][v], d0, IVec::load(q0 + v * W * 4), d1, IVec::load(q1 + v * W * 4));
    }
  }
#endif
  for (; g < groups; ++g) {  // AVX2: an odd group count's last group (dim / 4 odd)
    IVec qv[NQV];
#pragma GCC unroll 8
    for (int v = 0; v < NQV; ++v) qv[v] = IVec::load(q8 + g * qstride4 + v * W * 4);
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) {
      const DocBytes d = doc_bytes(rows + t * rb + g * 4);
#pragma GCC unroll 8
      for (int v = 0; v < NQV; ++v) acc[t][v] = dot4(acc[t][v], d, qv[v]);
    }
  }
}

template <int NQV, int NT>
EP_INLINE void fold_i8(const IVec (&acc)[NT][NQV], const Vec (&scale)[NQV], const int32_t* codes,
                       const float* inv, const float* table, int64_t tstride, Vec (&m)[NQV]) {
#pragma GCC unroll 16
  for (int r = 0; r < NT; ++r) {
    const float* trow = table + int64_t(codes[r]) * tstride;
    const Vec s = Vec::set1(inv[r]);
#pragma GCC unroll 8
    for (int v = 0; v < NQV; ++v) m[v] = max(m[v], fmadd(acc[r][v].to_float(), scale[v], Vec::load(trow + v * W)) * s);
  }
}

template <int NQV>
constexpr int tile_rows_i8() {
  return kInt8AccRegs / NQV > 0 ? kInt8AccRegs / NQV : 1;
}

template <int NQV, int GROUPS>
EP_INLINE void sweep_i8_dim(const ScoredQuery& q, int64_t v0, const uint8_t* rows, int64_t row_bytes,
                            const int32_t* codes, const float* inv, int64_t n_rows, float* best) {
  constexpr int NT = tile_rows_i8<NQV>();
  const int64_t groups = row_bytes / 4, qstride4 = q.stride * 4;
  const int8_t* q8 = q.q8 + v0 * W * 4;
  const float* table = q.table + v0 * W;
  Vec m[NQV], scale[NQV];
  IVec bias[NQV];
#pragma GCC unroll 8
  for (int v = 0; v < NQV; ++v) {
    m[v] = Vec::load(best + v * W);
    scale[v] = Vec::load(q.scale + v0 * W + v * W);
    bias[v] = IVec::load(q.bias + v0 * W + v * W);
  }
  int64_t t = 0;
  for (; t + NT <= n_rows; t += NT) {
    IVec acc[NT][NQV];
    prefetch_table_rows<NQV, NT>(codes + t, table, q.tstride);
    dot_tile_i8<NQV, NT, GROUPS>(q8, qstride4, rows + t * row_bytes, row_bytes, groups, bias, acc);
    fold_i8<NQV, NT>(acc, scale, codes + t, inv + t, table, q.tstride, m);
  }
  if (t < n_rows && n_rows >= NT) {
    IVec acc[NT][NQV];
    t = n_rows - NT;
    dot_tile_i8<NQV, NT, GROUPS>(q8, qstride4, rows + t * row_bytes, row_bytes, groups, bias, acc);
    fold_i8<NQV, NT>(acc, scale, codes + t, inv + t, table, q.tstride, m);
    t = n_rows;
  }
  for (; t < n_rows; ++t) {
    IVec acc[1][NQV];
    dot_tile_i8<NQV, 1, GROUPS>(q8, qstride4, rows + t * row_bytes, row_bytes, groups, bias, acc);
    fold_i8<NQV, 1>(acc, scale, codes + t, inv + t, table, q.tstride, m);
  }
#pragma GCC unroll 8
  for (int v = 0; v < NQV; ++v) m[v].store(best + v * W);
}

template <int NQV>
EP_INLINE void sweep_i8(const ScoredQuery& q, int64_t v0, const uint8_t* rows, int64_t row_bytes,
                        const int32_t* codes, const float* inv, int64_t n_rows, float* best) {
  // A row is dim4 level bytes: the served dims (48, 64, 128) are their own dim4, GROUPS = dim4 / 4.
  with_fixed_dim(row_bytes, [&](auto d) {
    sweep_i8_dim<NQV, decltype(d)::value / 4>(q, v0, rows, row_bytes, codes, inv, n_rows, best);
  });
}

// ------------------------------------------------------------------ documents

// Copies codes [at, at + n) to int32 and inv_norm to out_inv; returns the position (relative to
// at) of the first token with an out-of-range code or an inv_norm that is not positive and
// finite, or -1. The checks are folded into one flag per chunk: no branch per token.
template <class Code>
EP_INLINE int64_t stage_ids_as(const Code* codes, const float* inv_norm, int64_t n, int64_t n_centroids,
                               int32_t* out_codes, float* out_inv) {
  // Unsigned compares only, so the loop vectorises: a code is valid when (unsigned) code < n_centroids
  // (negative ids wrap to huge values); inv_norm is positive and finite when its bits minus one,
  // unsigned, are below those of +inf minus one (zero, negatives, inf and NaN all fail).
  using U = std::conditional_t<sizeof(Code) == 8, uint64_t, uint32_t>;
  const U limit = U(std::min<uint64_t>(uint64_t(n_centroids), uint64_t(std::numeric_limits<U>::max())));
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(inv_norm);
  U bad = 0;
  for (int64_t j = 0; j < n; ++j) {
    const U c = U(codes[j]);
    bad |= U(c >= limit) | U(bits[j] - 1u >= 0x7f7fffffu);
    out_codes[j] = int32_t(c);
  }
  std::memcpy(out_inv, inv_norm, sizeof(float) * size_t(n));
  if (!bad) return -1;
  for (int64_t j = 0; j < n; ++j)
    if (U(codes[j]) >= limit || bits[j] - 1u >= 0x7f7fffffu) return j;
  return -1;
}

EP_INLINE int64_t stage_ids(const Ids& codes, const float* inv_norm, int64_t at, int64_t n, int64_t n_centroids,
                            int32_t* out_codes, float* out_inv) {
  switch (codes.bytes) {
    case 2:
      return stage_ids_as(static_cast<const uint16_t*>(codes.data) + at, inv_norm + at, n, n_centroids, out_codes,
                          out_inv);
    case 4:
      return stage_ids_as(static_cast<const int32_t*>(codes.data) + at, inv_norm + at, n, n_centroids, out_codes,
                          out_inv);
    default:
      return stage_ids_as(static_cast<const int64_t*>(codes.data) + at, inv_norm + at, n, n_centroids, out_codes,
                          out_inv);
  }
}

struct CodeScratch {
  std::vector<float> rows;     // exact: decoded bucket weights (cap, dim)
  std::vector<uint8_t> rows8;  // int8: levels (cap, dim4)
  std::vector<int32_t> codes;  // (cap,)
  std::vector<float> inv;      // (cap,)
  std::vector<float> best;
};
inline CodeScratch& code_scratch() {
  static thread_local CodeScratch s;
  return s;
}

struct CodeScoring {
  const Compressed* tokens;
  const float* inv_norm;
  int64_t n_centroids, dim;
  const ResidualDecoder* decoder;  // exact
  const LevelDecoder* levels;      // int8
  bool int8;
};

// Scores tokens [begin, end) of one document against queries qs[0 : n], out[k * out_stride].
inline void score_codes_document(const CodeScoring& cs, int64_t begin, int64_t end, const ScoredQuery* qs,
                                 int64_t n, float* out, int64_t out_stride, KernelError& err) {
  CodeScratch& s = code_scratch();
  const int64_t dim = cs.dim, dim4 = (dim + 3) / 4 * 4;
  const int64_t row_bytes = dim * (cs.int8 ? cs.levels->nbits : cs.decoder->nbits) / 8;
  const int64_t cap = chunk_rows(dim);
  int64_t max_stride = 0;
  for (int64_t k = 0; k < n; ++k) max_stride = std::max(max_stride, qs[k].stride);
  s.best.assign(size_t(std::max<int64_t>(1, max_stride * n)), kNegInf);
  if (s.codes.size() < size_t(cap)) {
    s.codes.resize(size_t(cap));
    s.inv.resize(size_t(cap));
  }
  if (cs.int8 && s.rows8.size() < size_t(cap * dim4)) s.rows8.resize(size_t(cap * dim4));
  if (!cs.int8 && s.rows.size() < size_t(cap * dim)) s.rows.resize(size_t(cap * dim));
  const Compressed& tok = *cs.tokens;
  for (int64_t at = begin; at < end; at += cap) {
    const int64_t rows = std::min(cap, end - at);
    const int64_t bad = stage_ids(tok.codes, cs.inv_norm, at, rows, cs.n_centroids, s.codes.data(), s.inv.data());
    if (bad >= 0) {
      const int64_t t = at + bad;
      if (tok.codes[t] < 0 || tok.codes[t] >= cs.n_centroids)
        report_bad_code(err, t, tok.codes[t], cs.n_centroids);
      else
        err.report("inv_norm: token " + std::to_string(t) + " has " + std::to_string(cs.inv_norm[t]) +
                   ", expected a positive finite 1 / ||centroid + residual|| (recompute it: "
                   "edgeplaid.ops.residual_inv_norms)");
      return;
    }
    const uint8_t* res = tok.residuals + at * row_bytes;
    if (cs.int8) {
      cs.levels->decode_rows(res, rows, s.rows8.data());
    } else {
      cs.decoder->decode_rows(res, rows, s.rows.data());
    }
    if (at + cap < end) {  // the next chunk's codes are on their way while this one is scored
      const int64_t next = std::min(cap, end - at - cap);
      prefetch_bytes(tok.residuals + (at + cap) * row_bytes, next * row_bytes);
      prefetch_bytes(cs.inv_norm + at + cap, next * int64_t(sizeof(float)));
    }
    for (int64_t k = 0; k < n; ++k) {
      const ScoredQuery& q = qs[k];
      float* best = s.best.data() + k * max_stride;
      for (int64_t v0 = 0; v0 < q.n_vec; v0 += kMaxQueryVecs) {
        with_query_vecs(std::min<int64_t>(kMaxQueryVecs, q.n_vec - v0), [&](auto nqv) {
          constexpr int NQV = decltype(nqv)::value;
          if (cs.int8)
            sweep_i8<NQV>(q, v0, s.rows8.data(), dim4, s.codes.data(), s.inv.data(), rows, best + v0 * W);
          else
            sweep_exact<NQV>(q.qt + v0 * W, q.stride, s.rows.data(), s.codes.data(), s.inv.data(), rows, dim,
                             q.table + v0 * W, q.tstride, best + v0 * W);
        });
      }
    }
  }
  for (int64_t k = 0; k < n; ++k) {
    float total = 0.0f;
    const float* best = s.best.data() + k * max_stride;
    for (int64_t i = 0; i < qs[k].n_valid; ++i) total += best[i];
    out[k * out_stride] = total;
  }
}

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
