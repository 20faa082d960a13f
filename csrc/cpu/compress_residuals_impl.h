// compress_residuals: tokens and their centroid codes -> packed residual buckets and inv_norm,
// the inverse of decompress_residuals (residual_codec.h has the bit order):
//   r = token - centroids[code]                      (fp32)
//   b[d] = #{j : bucket_cutoffs[j] < r[d]}            (torch.bucketize for sorted cutoffs)
//   residual row = b packed nbits per dimension, little-endian
//   inv_norm = 1 / max(sqrt(ss), 1e-12),  ss = ||centroids[code] + bucket_weights[b]||^2
// ss is summed in a fixed order on every ISA: 16 lane sums (lane l adds the squares of
// dimensions l, l + 16, ...; each square rounded, then added), folded in halves (l + 8, l + 4,
// l + 2, l + 1). The three ISAs and the PyTorch twin return the same bits.
#pragma once
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "residual_codec.h"

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

constexpr int kNormLanes = 16;

// Packs bucket indices (one byte each, < 2**nbits) into n * nbits / 8 bytes. Eight indices
// (one uint64 load) at a time: adjacent fields are merged by shift-or-mask in three doubling
// steps, leaving 8 * nbits bits in order in the low bits.
EP_INLINE void pack_buckets(const uint8_t* b, int64_t n, int nbits, uint8_t* out) {
  if (nbits == 8) {
    std::memcpy(out, b, size_t(n));
    return;
  }
  const int s1 = 8 - nbits, s2 = 16 - 2 * nbits, s3 = 32 - 4 * nbits;
  const uint64_t m1 = nbits == 4 ? 0x00FF00FF00FF00FFull : nbits == 2 ? 0x000F000F000F000Full : 0x0003000300030003ull;
  const uint64_t m2 = nbits == 4 ? 0x0000FFFF0000FFFFull : nbits == 2 ? 0x000000FF000000FFull : 0x0000000F0000000Full;
  const uint64_t m3 = nbits == 4 ? 0x00000000FFFFFFFFull : nbits == 2 ? 0x000000000000FFFFull : 0x00000000000000FFull;
  int64_t i = 0, o = 0;
  for (; i + 8 <= n; i += 8, o += nbits) {
    uint64_t v;
    std::memcpy(&v, b + i, 8);
    v = (v | (v >> s1)) & m1;
    v = (v | (v >> s2)) & m2;
    v = (v | (v >> s3)) & m3;
    std::memcpy(out + o, &v, size_t(nbits));  // little-endian: the low nbits bytes
  }
  const int per = 8 / nbits;
  for (; i < n; i += per, ++o) {  // n * nbits is a multiple of 8: whole bytes remain
    uint8_t byte = 0;
    for (int j = 0; j < per; ++j) byte = uint8_t(byte | (b[i + j] << (j * nbits)));
    out[o] = byte;
  }
}

// b[d] = #{j < n_cut : cut[j] < r[d]} for d < dim.
EP_INLINE void bucketize(const float* r, int64_t dim, const float* cut, int n_cut, uint8_t* b) {
  int64_t d = 0;
#if defined(EDGEPLAID_ISA_AVX512)
  for (; d + 16 <= dim; d += 16) {
    const __m512 x = _mm512_loadu_ps(r + d);
    __m512i count = _mm512_setzero_si512();
    for (int j = 0; j < n_cut; ++j)
      count = _mm512_mask_add_epi32(count, _mm512_cmp_ps_mask(_mm512_set1_ps(cut[j]), x, _CMP_LT_OQ), count,
                                    _mm512_set1_epi32(1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(b + d), _mm512_cvtepi32_epi8(count));
  }
#elif defined(EDGEPLAID_ISA_AVX2)
  for (; d + 8 <= dim; d += 8) {
    const __m256 x = _mm256_loadu_ps(r + d);
    __m256i count = _mm256_setzero_si256();
    for (int j = 0; j < n_cut; ++j)  // the compare is all ones (-1) where cut[j] < x
      count = _mm256_sub_epi32(count, _mm256_castps_si256(_mm256_cmp_ps(_mm256_set1_ps(cut[j]), x, _CMP_LT_OQ)));
    alignas(32) int32_t c[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(c), count);
    for (int l = 0; l < 8; ++l) b[d + l] = uint8_t(c[l]);
  }
#endif
  for (; d < dim; ++d) {
    int c = 0;
    for (int j = 0; j < n_cut; ++j) c += cut[j] < r[d] ? 1 : 0;
    b[d] = uint8_t(c);
  }
}

// v * v, rounded: the empty asm hides the product from the optimiser, which would otherwise
// fuse it with the following add into an FMA (GCC contracts mul + add in C++ by default).
EP_INLINE float rounded_square(float v) {
  float sq = v * v;
  asm("" : "+x"(sq));
  return sq;
}

// sum of v[d]^2 in the fixed order above (v zero-padded to a multiple of 16 where read).
EP_INLINE float lane_sum_squares(const float* v, int64_t dim) {
  alignas(64) float acc[kNormLanes] = {};
  int64_t d = 0;
#if defined(EDGEPLAID_ISA_AVX512) || defined(EDGEPLAID_ISA_AVX2)
  constexpr int V = kNormLanes / W;
  Vec a[V];
  for (int i = 0; i < V; ++i) a[i] = Vec::zero();
  for (; d + kNormLanes <= dim; d += kNormLanes)
    for (int i = 0; i < V; ++i) {
      const Vec x = Vec::load(v + d + i * W);
      Vec sq = x * x;
      asm("" : "+v"(sq.v));  // as rounded_square
      a[i] = a[i] + sq;
    }
  for (int i = 0; i < V; ++i) a[i].store(acc + i * W);
#else
  for (; d + kNormLanes <= dim; d += kNormLanes)
    for (int l = 0; l < kNormLanes; ++l) acc[l] = acc[l] + rounded_square(v[d + l]);
#endif
  for (int l = 0; d + l < dim; ++l) acc[l] = acc[l] + rounded_square(v[d + l]);  // last, partial 16
  for (int h = kNormLanes / 2; h >= 1; h /= 2)
    for (int l = 0; l < h; ++l) acc[l] = acc[l] + acc[l + h];
  return acc[0];
}

void compress_residuals(const Rows& tokens, const Ids& codes, const Rows& centroids, const float* bucket_cutoffs,
                        const float* bucket_weights, int nbits, uint8_t* residuals, float* inv_norm,
                        KernelError& err) {
  const int64_t n = tokens.rows, dim = tokens.dim, row_bytes = dim * nbits / 8;
  const int n_cut = (1 << nbits) - 1;
  const ResidualDecoder decoder(bucket_weights, nbits, dim);
  with_dtype(tokens.dtype, [&](auto ttag) {
    constexpr DType TT = decltype(ttag)::value;
    using ET = typename Elem<TT>::type;
    with_dtype(centroids.dtype, [&](auto ctag) {
      constexpr DType TC = decltype(ctag)::value;
      using EC = typename Elem<TC>::type;
      const ET* tok = static_cast<const ET*>(tokens.data);
      const EC* cents = static_cast<const EC*>(centroids.data);
      parallel_for(n, 256, [&](int64_t t0, int64_t t1) {
        std::vector<float> x(static_cast<size_t>(dim)), c(static_cast<size_t>(dim)), v(static_cast<size_t>(dim));
        std::vector<uint8_t> b(static_cast<size_t>(dim));
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t code = codes[t];
          if (code < 0 || code >= centroids.rows) {
            report_bad_code(err, t, code, centroids.rows);
            return;
          }
          widen_row<TT>(tok + t * dim, dim, x.data());
          widen_row<TC>(cents + code * dim, dim, c.data());
          for (int64_t d = 0; d < dim; ++d) x[size_t(d)] -= c[size_t(d)];
          bucketize(x.data(), dim, bucket_cutoffs, n_cut, b.data());
          uint8_t* row = residuals + t * row_bytes;
          pack_buckets(b.data(), dim, nbits, row);
          // The decompressed vector before normalisation, exactly as the decoders form it.
          decoder.decode_rows(row, 1, v.data());
          for (int64_t d = 0; d < dim; ++d) v[size_t(d)] = c[size_t(d)] + v[size_t(d)];
          inv_norm[t] = 1.0f / std::max(std::sqrt(lane_sum_squares(v.data(), dim)), 1e-12f);
        }
      });
    });
  });
}

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
