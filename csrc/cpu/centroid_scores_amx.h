// centroid_scores' centroid-major table (PLAID's stage 1) on AMX tiles, for half-precision
// centroids (the codec's fp16, or bf16). Included by centroid_scores_impl.h in its amx unit.
//
// Why: the tiles do the GEMM (~1,024 FLOP a cycle a core in TDPBF16PS, 16 x 16 outputs 32 deep)
// and their output tile is already a 16-centroid x 16-token block of the table, stored in place.
// On a 2-core Sapphire Rapids, SciFact's shape (~22 valid tokens x 16,384 centroids x 48 dims):
// 0.29-0.34 against 0.38-0.40 ms a query one at a time, 0.25-0.27 against 0.35-0.36 ms in blocks
// of 8 queries (the AVX-512 kernel, alternated). The products themselves take ~0.05 ms; what bounds the call now is
// the table it writes (16,384 rows x 32 lanes x 4 B = 2 MB a query, ~8 GB/s of stores in blocks).
//
// Precision: bf16 products accumulated in fp32, made as exact as fp32 by splitting both sides.
//   fp16 centroid  c = c_hi + c_lo             (bf16 pieces, exact: fp16 has 11 significant bits)
//   fp32 query     q = q_hi + q_mid + q_lo     (q_hi its top 16 bits, then the rest rounded twice:
//                                               exact up to fp32's last bit)
//   <q, c> = c_hi.q_hi + c_hi.q_mid + c_hi.q_lo + c_lo.q_hi + c_lo.q_mid     (c_lo.q_lo < 2^-24 |c q|)
// Each bf16 x bf16 product is exact in fp32 and the tiles accumulate in fp32 (round to nearest),
// so the scores differ from the AVX-512 kernel's only by the order of fp32 roundings (a few ulp);
// integer-valued inputs give the same exact sums. bf16 centroids have no c_lo. The tiles treat
// subnormal inputs and results as zero: a query holding a value 0 < |x| < 2^-100 (whose pieces
// could be subnormal) goes to the AVX-512 kernel instead (amx_range_ok); products below 2^-126
// are lost, an absolute error no score can rank on.
//
// Layout: the centroid side is one row per centroid, [c_hi (dim) | c_lo (dim)] zero-padded to
// whole 32-element chunks (the A tile: 16 centroids x 32 bf16 per chunk), converted 32 centroids
// (a step, two A tiles) at a time into an L1 buffer. (Converting a step ahead and scanning a step
// behind, so the vector units and the tiles overlap, measured no faster: 0.32 against 0.31 ms.) The query side is three sets of B tiles (VNNI pairs: row r holds
// elements 2r, 2r + 1 of the chunk for each of 16 tokens): q_hi and q_mid under both halves of the
// centroid row, q_lo under c_hi only; zero past the valid tokens, so the table's padding lanes
// come out zero. Tiles: 0-3 accumulators (2 x 16 centroids x 16 tokens each), 4-5 the centroid chunks,
// 6-7 the query chunks in turn.
#pragma once
#include "amx_tiles.h"
#include "dtypes.h"
#include "ops.h"
#include "parallel.h"
#include "rank_key.h"
#include "shortlist.h"

#if defined(EDGEPLAID_ISA_AMX)
namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

namespace amx_stage1 {

constexpr int64_t kBlock = 16;  // centroids per A tile: a tile's rows
constexpr int64_t kStep = 32;   // centroids per step: two A tiles (4 and 5)
constexpr int64_t kDepth = 32;  // bf16 per tile row: one chunk of the combined vector
constexpr int64_t kGroups = 2;  // query-token groups of 16 per pass: accumulators 2g, 2g + 1

// Accumulators 2g (centroids of tile 4) and 2g + 1 (tile 5) += A . B, with B (a chunk of query
// group g) loaded into tile 6 or 7 in turn: the next load need not wait for the products reading
// the last one. Four accumulators (two groups) keep four independent product chains in flight,
// enough to cover a product's latency (a chain of one accumulator ran at a third of the rate).
EP_INLINE void product(int64_t g, int& turn, const uint16_t* b) {
  const int t = turn;
  turn ^= 1;
  switch (g * 2 + t) {
    case 0: _tile_loadd(6, b, 64); _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 5, 6); break;
    case 1: _tile_loadd(7, b, 64); _tile_dpbf16ps(0, 4, 7); _tile_dpbf16ps(1, 5, 7); break;
    case 2: _tile_loadd(6, b, 64); _tile_dpbf16ps(2, 4, 6); _tile_dpbf16ps(3, 5, 6); break;
    default: _tile_loadd(7, b, 64); _tile_dpbf16ps(2, 4, 7); _tile_dpbf16ps(3, 5, 7); break;
  }
}

// Accumulators 2g, 2g + 1 to rows [0, 16) and [16, 32) of dst (row stride in bytes).
EP_INLINE void store_group(int64_t g, float* dst, int64_t stride_bytes) {
  float* low = dst;
  float* high = reinterpret_cast<float*>(reinterpret_cast<char*>(dst) + 16 * stride_bytes);
  if (g == 0) {
    _tile_stored(0, low, stride_bytes);
    _tile_stored(1, high, stride_bytes);
  } else {
    _tile_stored(2, low, stride_bytes);
    _tile_stored(3, high, stride_bytes);
  }
}

EP_INLINE void zero_groups(int64_t n) {
  _tile_zero(0);
  _tile_zero(1);
  if (n > 1) {
    _tile_zero(2);
    _tile_zero(3);
  }
}

// Lane r = the maximum of the 16 lanes of v[r], for r < 16: a transposing tree (46 shuffles and
// maxima for 16 rows, against ~8 for each row's own reduction).
EP_INLINE __m512 row_maxima16(const __m512* v) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: 8 partial maxima of row 2i, lanes 8-15: of row 2i + 1
    w[i] = _mm512_max_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // quarter k: 4 partial maxima of row 4i + k
    x[i] = _mm512_max_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // quarter k: 2 of row 8i + k, then 2 of row 8i + 4 + k
    y[i] = _mm512_max_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // quarter k: rows k, 4 + k, 8 + k, 12 + k, i.e. lane 4k + m holds row 4m + k
  const __m512 z = _mm512_max_ps(_mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, z);
}

// One query's B tiles: sets (q_hi, q_mid, q_lo) x groups x chunks, 512 bf16 each.
struct QueryTiles {
  std::vector<uint16_t> b;
  int64_t groups = 0, chunks = 0;
  const uint16_t* at(int64_t set, int64_t g, int64_t j) const { return b.data() + ((set * groups + g) * chunks + j) * 512; }
};

// The query's n valid tokens are rows[0, n) of data (each dim fp32); pieces: 2 (fp16 centroids) or 1.
inline void pack_query(const float* data, const int64_t* rows, int64_t n, int64_t dim, int64_t pieces,
                       int64_t chunks, QueryTiles& out) {
  out.groups = (n + 15) / 16;
  out.chunks = chunks;
  out.b.assign(size_t(3 * out.groups * chunks * 512), 0);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t g = t / 16, lane = t % 16;
    for (int64_t d = 0; d < dim; ++d) {
      // The first piece is x cut to its top 16 bits, not rounded: that never overflows (3.4e38
      // would round to inf) and leaves x - hi exact; the other two are rounded (dtypes.h).
      const float x = data[rows[t] * dim + d];
      const uint16_t part0 = uint16_t(float_to_bits(x) >> 16);
      const float hi = bf16_to_float(part0);
      const uint16_t part1 = float_to_bf16(x - hi);
      const uint16_t part[3] = {part0, part1, float_to_bf16(x - hi - bf16_to_float(part1))};
      for (int64_t p = 0; p < pieces; ++p) {
        const int64_t kk = p * dim + d, j = kk / kDepth, r = (kk % kDepth) / 2, e = kk % 2;
        for (int64_t set = 0; set < 3; ++set) {
          if (set == 2 && p > 0) continue;  // q_lo meets c_hi only
          uint16_t* tile = out.b.data() + ((set * out.groups + g) * chunks + j) * 512;
          tile[r * 32 + 2 * lane + e] = part[set];
        }
      }
    }
  }
}

// Rows [c0, c0 + nc) of the centroids into the A buffer (kStep rows of chunks * kDepth bf16):
// [hi | lo] for fp16, [c] for bf16; rows past nc zero. Columns past pieces * dim stay zero.
template <DType T>
EP_INLINE void convert_block(const uint16_t* base, int64_t dim, int64_t c0, int64_t nc, int64_t row_len,
                             uint16_t* a) {
  for (int64_t r = 0; r < kStep; ++r) {
    uint16_t* dst = a + r * row_len;
    if (r >= nc) {
      std::memset(dst, 0, size_t(row_len) * 2);
      continue;
    }
    const uint16_t* src = base + (c0 + r) * dim;
    for (int64_t d = 0; d < dim; d += 16) {
      // Whole vectors where the row has 16 more elements (every dim that is a multiple of 16):
      // the masked loads and stores measured ~20% slower.
      const bool whole = dim - d >= 16;
      const __mmask16 m = whole ? __mmask16(0xffff) : __mmask16((1u << (dim - d)) - 1u);
      const __m256i h = whole ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + d))
                              : _mm256_maskz_loadu_epi16(m, src + d);
      __m256i hi = h, lo = _mm256_setzero_si256();
      if constexpr (T == DType::f16) {
        const __m512 x = _mm512_cvtph_ps(h);
        hi = (__m256i)_mm512_cvtneps_pbh(x);
        const __m512 hif = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
        lo = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(x, hif));
      }
      if (whole) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), hi);
        if constexpr (T == DType::f16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + dim + d), lo);
      } else {
        _mm256_mask_storeu_epi16(dst + d, m, hi);
        if constexpr (T == DType::f16) _mm256_mask_storeu_epi16(dst + dim + d, m, lo);
      }
    }
  }
}

// Whether every query value's bf16 pieces stay in the tiles' normal range: |x| = 0 or >= 2^-100.
inline bool amx_range_ok(const Queries& q) {
  const int64_t n = q.nq * q.lq;
  for (int64_t r = 0; r < n; ++r) {
    if (q.mask != nullptr && !q.mask[r]) continue;
    for (int64_t d = 0; d < q.dim; ++d) {
      const float a = std::fabs(q.data[r * q.dim + d]);
      if (a != 0.0f && a < 0x1p-100f) return false;
    }
  }
  return true;
}

}  // namespace amx_stage1

// The centroid-major table, top-k ids and centroid maxima of centroid_scores (same contract; see
// centroid_scores_impl.h) for fp16 / bf16 centroids. lists: per thread, per packed valid token
// (queries' valid tokens in order), the shortlists the caller merges.
// row_of: packed token -> row of q (pack_rows' order), n_valid_of: valid tokens per query.
inline void centroid_scores_amx(const Queries& q, const Rows& centroids, int64_t k, int64_t ts,
                                const std::vector<int64_t>& row_of, const std::vector<int64_t>& n_valid_of,
                                float* scores, float* centroid_max, std::vector<Shortlist>& lists) {
  using namespace amx_stage1;
  const int64_t n_cent = centroids.rows, dim = q.dim;
  const int64_t pieces = centroids.dtype == DType::f16 ? 2 : 1;
  const int64_t chunks = (pieces * dim + kDepth - 1) / kDepth, row_len = chunks * kDepth;
  // Per query: its valid tokens' first packed index and its B tiles.
  std::vector<int64_t> first(size_t(q.nq) + 1, 0);
  std::vector<QueryTiles> tiles(size_t(q.nq));
  for (int64_t qi = 0; qi < q.nq; ++qi) {
    const int64_t n = n_valid_of[size_t(qi)];
    first[size_t(qi) + 1] = first[size_t(qi)] + n;
    pack_query(q.data, row_of.data() + first[size_t(qi)], n, dim, pieces, chunks, tiles[size_t(qi)]);
  }
  const int64_t n_valid = first.back();
  const int64_t cap = shortlist_capacity(k);
  const uint16_t* base = static_cast<const uint16_t*>(centroids.data);
  parallel_each_thread([&](int thread, int n_threads) {
    const auto split = [&](int t) { return t == n_threads ? n_cent : (n_cent * t / n_threads) & ~(kStep - 1); };
    const int64_t c_begin = split(thread), c_end = split(thread + 1);
    if (c_begin >= c_end) return;
    configure_tiles();
    Shortlist* mine = lists.data() + thread * n_valid;
    std::vector<float> threshold(size_t(n_valid + 16), kNegInf);  // + 16: whole-vector loads
    std::vector<uint16_t> a(size_t(kStep * row_len), 0);            // one step's centroids
    std::vector<float> tail(size_t(q.nq * kStep * ts));            // a short last step's tiles
    const __m512 neg_inf = _mm512_set1_ps(kNegInf);
    const auto convert = [&](int64_t c0, uint16_t* dst) {
      const int64_t nc = std::min(kStep, c_end - c0);
      if (centroids.dtype == DType::f16)
        convert_block<DType::f16>(base, dim, c0, nc, row_len, dst);
      else
        convert_block<DType::bf16>(base, dim, c0, nc, row_len, dst);
    };
    // Where step c0's rows of query qi land: the table, or for a short last step the tail buffer.
    const auto rows_of = [&](int64_t c0, int64_t qi) {
      return c_end - c0 >= kStep ? scores + (qi * n_cent + c0) * ts : tail.data() + qi * kStep * ts;
    };
    // The products of one step, every query: the table rows of centroids [c0, c0 + 32).
    const auto multiply = [&](int64_t c0, const uint16_t* a_step) {
      const uint16_t* a_low = a_step;
      const uint16_t* a_high = a_step + kBlock * row_len;
      for (int64_t qi = 0; qi < q.nq; ++qi) {
        const QueryTiles& qt = tiles[size_t(qi)];
        float* out = rows_of(c0, qi);
        for (int64_t g0 = 0; g0 < qt.groups; g0 += kGroups) {
          const int64_t ng = std::min(kGroups, qt.groups - g0);
          zero_groups(ng);
          int turn = 0;
          for (int64_t j = 0; j < chunks; ++j) {
            _tile_loadd(4, a_low + j * kDepth, row_len * 2);
            _tile_loadd(5, a_high + j * kDepth, row_len * 2);
            for (int64_t set = 0; set < 3; ++set) {
              // q_lo pairs with the c_hi columns [0, dim) only: chunks wholly past them are zero.
              if (set == 2 && j * kDepth >= dim) continue;
              for (int64_t g = 0; g < ng; ++g) product(g, turn, qt.at(set, g0 + g, j));
            }
          }
          for (int64_t g = 0; g < ng; ++g) store_group(g, out + (g0 + g) * 16, ts * 4);
        }
        // Lanes past the query's tiles: zero (the tiles' own padding lanes are zero already).
        for (int64_t r = 0; r < kStep; ++r)
          for (int64_t lane = qt.groups * 16; lane < ts; lane += 16) _mm512_storeu_ps(out + r * ts + lane, _mm512_setzero_ps());
      }
    };
    // Top-k candidates and the centroids' maxima of one step's rows, every query.
    const auto scan = [&](int64_t c0) {
      const int64_t nc = std::min(kStep, c_end - c0);
      for (int64_t qi = 0; qi < q.nq; ++qi) {
        const QueryTiles& qt = tiles[size_t(qi)];
        const int64_t nv = first[size_t(qi) + 1] - first[size_t(qi)];
        const float* out = rows_of(c0, qi);
        if (nc < kStep) std::memcpy(scores + (qi * n_cent + c0) * ts, out, size_t(nc * ts) * 4);
        float* thr_q = threshold.data() + first[size_t(qi)];
        Shortlist* lists_q = mine + first[size_t(qi)];
        __m512 rm[kStep];  // per row, the lane-wise maximum over the groups
        for (int64_t r = 0; r < kStep; ++r) rm[r] = neg_inf;
        for (int64_t g = 0; g < qt.groups; ++g) {
          const int64_t live = std::min<int64_t>(16, nv - g * 16);
          const __mmask16 lanes = __mmask16((1u << live) - 1u);
          __m512 bm = neg_inf;
          for (int64_t r = 0; r < nc; ++r) {
            const __m512 v = _mm512_mask_loadu_ps(neg_inf, lanes, out + r * ts + g * 16);
            bm = _mm512_max_ps(bm, v);
            rm[r] = _mm512_max_ps(rm[r], v);
          }
          float* thr = thr_q + g * 16;
          const __mmask16 trig = _mm512_mask_cmp_ps_mask(lanes, bm, _mm512_loadu_ps(thr), _CMP_GT_OQ);
          if (trig == 0) continue;
          for (int64_t r = 0; r < nc; ++r) {
            const float* row = out + r * ts + g * 16;
            for (uint32_t bits = _mm512_mask_cmp_ps_mask(trig, _mm512_loadu_ps(row), _mm512_loadu_ps(thr), _CMP_GT_OQ);
                 bits; bits &= bits - 1) {
              const int lane = __builtin_ctz(bits);
              Shortlist& list = lists_q[g * 16 + lane];
              list.items[list.size++] = rank_key(row[lane], c0 + r);
              if (list.size == cap) keep_best(list, k, thr + lane);
            }
          }
        }
        if (centroid_max != nullptr) {
          alignas(64) float maxima[kStep];
          _mm512_store_ps(maxima, row_maxima16(rm));
          if (nc > 16) _mm512_store_ps(maxima + 16, row_maxima16(rm + 16));
          std::copy(maxima, maxima + nc, centroid_max + qi * n_cent + c0);
        }
      }
    };
    for (int64_t c0 = c_begin; c0 < c_end; c0 += kStep) {
      convert(c0, a.data());
      multiply(c0, a.data());
      scan(c0);
    }
    _tile_release();
  });
}

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
#endif  // EDGEPLAID_ISA_AMX
