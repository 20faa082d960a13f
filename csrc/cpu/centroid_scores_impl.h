// centroid_scores: S = Q . C^T for every valid query token against every centroid, and each
// token's top-n_probe centroids (score descending, ties to the lower id).
//
// The GEMM reuses the MaxSim micro-kernel: query tokens on the lanes, centroids broadcast as
// rows. A block of centroid scores lands in a small L1 tile, with each token's maximum over
// every register tile's rows (3 to 24 centroids) taken on the way; one lane-wise compare of
// those maxima against each token's threshold tells which tokens (rarely any, once warm) need
// those few rows scanned into their shortlist. The tile reaches the token-major output by 8 x 8 register
// transposes, or the centroid-major table (ScoreTable, stride > 0) by plain row copies: the tile
// is already centroid-major, so that layout costs no transposition here and none in stages 2-4.
// Each thread owns a contiguous range of centroids, visited in increasing id order, so a
// score equal to a shortlist's threshold never displaces it (the lower id wins ties); the
// per-thread shortlists are merged at the end with the full (score, id) order.
//
// edgeplaid-isa: amx (the centroid-major table on AMX tiles for fp16 / bf16 centroids: centroid_scores_amx.h)
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>

#include "centroid_scores_amx.h"
#include "maxsim_core.h"
#include "rank_key.h"
#include "shortlist.h"

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

// out_rows[lane][c] = tile[c * ld + lane] for c < n_cols, lane < n_lanes.
template <bool kStream>
inline void copy_out(const float* tile, int64_t ld, int64_t n_cols, int64_t n_lanes, float* const* out_rows) {
  int64_t lane = 0;
  for (; lane + 8 <= n_lanes; lane += 8) {
    int64_t c = 0;
    for (; c + 8 <= n_cols; c += 8) {
      float* dst[8];
      for (int j = 0; j < 8; ++j) dst[j] = out_rows[lane + j] + c;
      transpose_8x8<kStream>(tile + c * ld + lane, ld, dst);
    }
    for (; c < n_cols; ++c)
      for (int j = 0; j < 8; ++j) out_rows[lane + j][c] = tile[c * ld + lane + j];
  }
  for (; lane < n_lanes; ++lane)
    for (int64_t c = 0; c < n_cols; ++c) out_rows[lane][c] = tile[c * ld + lane];
}

// table[lane][c * ts] = tile[c * ld + lane] for c < n_cols, lane < n_lanes: W lanes whose slots
// are consecutive (one query's tokens) are one vector copy per centroid.
inline void copy_out_table(const float* tile, int64_t ld, int64_t n_cols, int64_t n_lanes, float* const* out,
                           int64_t ts) {
  for (int64_t v = 0; v * W < n_lanes; ++v) {
    float* const* dst = out + v * W;
    const int64_t lanes = std::min<int64_t>(W, n_lanes - v * W);
    bool consecutive = lanes == W;
    for (int64_t j = 1; j < lanes && consecutive; ++j) consecutive = dst[j] == dst[0] + j;
    if (consecutive) {
      for (int64_t c = 0; c < n_cols; ++c) Vec::load(tile + c * ld + v * W).store(dst[0] + c * ts);
    } else {
      for (int64_t j = 0; j < lanes; ++j)
        for (int64_t c = 0; c < n_cols; ++c) dst[j][c * ts] = tile[c * ld + v * W + j];
    }
  }
}

// tile[t * ld + v * W + lane] = <query lane of vector v, rows[t]> for t < n_rows, and
// group_max[g * ld + v * W + lane] = max of those over the rows [g * NT, min((g + 1) * NT, n_rows))
// of group g, NT = tile_rows<NQV>() (the micro-kernel's tile height). The shortlist scan then
// visits the NT rows of a group whose maximum beats a token's threshold, not a whole block:
// with one maximum per 96-centroid block, rescanning triggered blocks cost a quarter of SciFact's
// stage 1 on Zen 4 (0.09 of 0.38 ms a query).
template <int NQV, int DIM>
EP_INLINE void sweep_tiles_dim(const float* qt, int64_t qstride, const float* rows, int64_t n_rows, int64_t dim,
                               float* tile, int64_t ld, float* group_max) {
  constexpr int NT = tile_rows<NQV>();
  int64_t t = 0;
  for (; t + NT <= n_rows; t += NT) {
    Vec acc[NT][NQV];
    dot_tile<NQV, NT, DIM>(qt, qstride, rows + t * dim, dim, acc);
#pragma GCC unroll 8
    for (int v = 0; v < NQV; ++v) {
      Vec m = acc[0][v];
#pragma GCC unroll 24
      for (int r = 0; r < NT; ++r) {
        acc[r][v].store(tile + (t + r) * ld + v * W);
        m = max(acc[r][v], m);
      }
      m.store(group_max + t / NT * ld + v * W);
    }
  }
  if (t == n_rows) return;
  // The last n_rows - t rows: a full tile over the last NT rows where there are that many (a
  // one-row tile is bound by FMA latency, 4x slower a row; rows seen twice are stored again,
  // unchanged), else one row at a time. Their group's maximum is read back from the tile.
  if (n_rows >= NT) {
    Vec acc[NT][NQV];
    dot_tile<NQV, NT, DIM>(qt, qstride, rows + (n_rows - NT) * dim, dim, acc);
    for (int r = 0; r < NT; ++r)
      for (int v = 0; v < NQV; ++v) acc[r][v].store(tile + (n_rows - NT + r) * ld + v * W);
  } else {
    for (int64_t r = t; r < n_rows; ++r) {
      Vec acc[1][NQV];
      dot_tile<NQV, 1, DIM>(qt, qstride, rows + r * dim, dim, acc);
      for (int v = 0; v < NQV; ++v) acc[0][v].store(tile + r * ld + v * W);
    }
  }
  for (int v = 0; v < NQV; ++v) {
    Vec m = Vec::load(tile + t * ld + v * W);
    for (int64_t r = t + 1; r < n_rows; ++r) m = max(Vec::load(tile + r * ld + v * W), m);
    m.store(group_max + t / NT * ld + v * W);
  }
}

// sweep_tiles_dim with dim fixed at compile time where it is a served width (with_fixed_dim);
// returns the group height NT.
template <int NQV>
EP_INLINE int64_t sweep_tiles(const float* qt, int64_t qstride, const float* rows, int64_t n_rows, int64_t dim,
                              float* tile, int64_t ld, float* group_max) {
  with_fixed_dim(dim, [&](auto d) {
    sweep_tiles_dim<NQV, decltype(d)::value>(qt, qstride, rows, n_rows, dim, tile, ld, group_max);
  });
  return tile_rows<NQV>();
}

// Lanes [n_valid, ts) of the centroid-major rows of centroids [c0, c0 + nc) of every query: 0.
// From n_valid rounded down to W, in whole vectors; the copy of the valid lanes comes after.
inline void zero_padding_lanes(float* scores, const std::vector<int64_t>& n_valid_of, int64_t n_cent, int64_t ts,
                               int64_t c0, int64_t nc) {
  for (int64_t qi = 0; qi < int64_t(n_valid_of.size()); ++qi) {
    const int64_t used = n_valid_of[size_t(qi)];
    if (used >= ts) continue;
    const int64_t from = used / W * W;
    float* rows = scores + (qi * n_cent + c0) * ts;
    for (int64_t c = 0; c < nc; ++c) {
      float* row = rows + c * ts;
      int64_t j = from;
      for (; j + W <= ts; j += W) Vec::zero().store(row + j);
      for (; j < ts; ++j) row[j] = 0.0f;
    }
  }
}

// centroid_max[qi * n_cent + c] = max over lanes [0, n_valid) of one centroid-major row (-inf: no
// valid token), for the rows of centroids [c0, c0 + nc) of every query.
inline void row_maxima(const float* scores, const std::vector<int64_t>& n_valid_of, int64_t n_cent, int64_t ts,
                       int64_t c0, int64_t nc, float* centroid_max) {
  for (int64_t qi = 0; qi < int64_t(n_valid_of.size()); ++qi) {
    const int64_t n_valid = n_valid_of[size_t(qi)];
    float* dst = centroid_max + qi * n_cent + c0;
    if (n_valid == 0) {
      std::fill(dst, dst + nc, kNegInf);
      continue;
    }
    const int64_t full = n_valid / W;
    const float* rows = scores + (qi * n_cent + c0) * ts;
    for (int64_t c = 0; c < nc; ++c) {
      const float* row = rows + c * ts;
      Vec m = full > 0 ? Vec::load(row) : Vec::set1(kNegInf);
      for (int64_t v = 1; v < full; ++v) m = max(m, Vec::load(row + v * W));
      float lanes[W];
      m.store(lanes);
      float best = kNegInf;
      for (int j = 0; j < (full > 0 ? W : 0); ++j) best = std::max(best, lanes[j]);
      for (int64_t i = full * W; i < n_valid; ++i) best = std::max(best, row[i]);
      dst[c] = best;
    }
  }
}

// top_ids[row_of[r]] = the k best of token r's shortlists on every thread, best first (-1 past
// the centroids kept); lists[t * n_valid + r] is thread t's list of packed token r.
inline void merge_shortlists(const std::vector<Shortlist>& lists, int max_threads, int64_t n_valid, int64_t k,
                             const std::vector<int64_t>& row_of, int64_t* top_ids) {
  parallel_for(n_valid, 16, [&](int64_t r0, int64_t r1) {
    std::vector<RankKey> all;
    for (int64_t r = r0; r < r1; ++r) {
      all.clear();
      for (int t = 0; t < max_threads; ++t) {
        const Shortlist& list = lists[size_t(t * n_valid + r)];
        all.insert(all.end(), list.items, list.items + list.size);
      }
      const int64_t keep = std::min<int64_t>(k, int64_t(all.size()));
      if (keep > 0) {
        std::nth_element(all.begin(), all.begin() + (keep - 1), all.end(), std::greater<RankKey>());
        std::sort(all.begin(), all.begin() + keep, std::greater<RankKey>());
      }
      int64_t* dst = top_ids + row_of[size_t(r)] * k;
      for (int64_t j = 0; j < k; ++j) dst[j] = j < keep ? key_id(all[size_t(j)]) : -1;
    }
  });
}

// table_stride == 0: scores is token-major (nq * lq, n_centroids); > 0: centroid-major
// (nq, n_centroids, table_stride), each query's valid tokens compacted into lanes 0.., the rest zero.
// centroid_max (centroid-major only; null: not wanted): (nq, n_centroids), each centroid's best
// score over the query's valid tokens (PLAID's pruning test), taken from the tile still in cache.
void centroid_scores(const Queries& q, const Rows& centroids, int64_t n_probe, int64_t table_stride,
                     float* scores, int64_t* top_ids, float* centroid_max, KernelError& err) {
  (void)err;
  const int64_t n_rows = q.nq * q.lq, n_cent = centroids.rows, dim = q.dim, k = n_probe;
  const int64_t ts = table_stride;
  std::vector<float> qbuf;
  std::vector<int64_t> row_of;  // packed lane -> output row
  const PackedQuery packed = pack_rows(q.data, q.mask, 0, n_rows, dim, qbuf, &row_of);
  // Centroid-major: the j-th valid token of query qi is lane j of its rows (the valid tokens
  // compacted, as stages 2-4 read them); lanes past a query's valid tokens are zero.
  std::vector<int64_t> slot_of, n_valid_of;
  if (ts > 0) {
    n_valid_of.assign(size_t(q.nq), 0);
    slot_of.resize(size_t(packed.n_valid));
    for (int64_t lane = 0; lane < packed.n_valid; ++lane) {
      const int64_t qi = row_of[size_t(lane)] / q.lq;
      slot_of[size_t(lane)] = qi * n_cent * ts + n_valid_of[size_t(qi)]++;
    }
  }
  if (q.mask != nullptr) {
    // Masked query tokens: scores 0, no centroid ids.
    parallel_for(n_rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (q.mask[r]) continue;
        if (ts == 0) std::fill(scores + r * n_cent, scores + (r + 1) * n_cent, 0.0f);
        std::fill(top_ids + r * k, top_ids + (r + 1) * k, int64_t(-1));
      }
    });
  }
  const int64_t n_valid = packed.n_valid;
  if (n_valid == 0 && centroid_max != nullptr) std::fill(centroid_max, centroid_max + q.nq * n_cent, kNegInf);
  // No valid token at all: the centroid-major table is all padding (the sweep below, which
  // writes it otherwise, does not run).
  if (n_valid == 0 && ts > 0) std::fill(scores, scores + q.nq * n_cent * ts, 0.0f);
  if (n_valid == 0 || n_cent == 0) return;

  const int max_threads = parallel_width();
  const int64_t cap = shortlist_capacity(k);
  std::vector<RankKey> items(size_t(max_threads * n_valid * cap));
  std::vector<Shortlist> lists(size_t(max_threads * n_valid));
  for (size_t i = 0; i < lists.size(); ++i) lists[i] = Shortlist{items.data() + i * size_t(cap), 0};
#if defined(EDGEPLAID_ISA_AMX)
  // The centroid-major table from half-precision centroids: on AMX tiles (centroid_scores_amx.h).
  if (ts > 0 && centroids.dtype != DType::f32 && amx_stage1::amx_range_ok(q)) {
    centroid_scores_amx(q, centroids, k, ts, row_of, n_valid_of, scores, centroid_max, lists);
    merge_shortlists(lists, max_threads, n_valid, k, row_of, top_ids);
    return;
  }
#endif
  // Up to this n_probe each token's k best group maxima bound its threshold (the scan below).
  constexpr int64_t kGroupBound = 8;
  // Centroids per staged block: a multiple of every tile height (3, 4, 6, 8, 12) and of 8.
  constexpr int64_t kBlock = 96;
  // Non-temporal output stores need every block's row start 32-byte aligned (and a SIMD ISA).
  // The (n_rows, C) output is written once here and read later by other code: streaming it
  // skips the read-for-ownership of every line and keeps the centroids in cache.
  const bool stream_out =
      W > 1 && ts == 0 && reinterpret_cast<uintptr_t>(scores) % 32 == 0 && n_cent % 8 == 0;

  with_dtype(centroids.dtype, [&](auto tag) {
    constexpr DType T = decltype(tag)::value;
    using E = typename Elem<T>::type;
    const E* base = static_cast<const E*>(centroids.data);
    parallel_each_thread([&](int thread, int n_threads) {
      // Ranges start at multiples of 8 so that streamed blocks stay aligned.
      const auto split = [&](int t) { return t == n_threads ? n_cent : (n_cent * t / n_threads) & ~int64_t(7); };
      const int64_t c_begin = split(thread), c_end = split(thread + 1);
      Shortlist* mine = lists.data() + thread * n_valid;
      std::vector<float> threshold(size_t(packed.stride), kNegInf);
      std::vector<float> best_group_max(size_t(packed.stride * kGroupBound), kNegInf);  // per token, best first
      std::vector<float> staged(size_t(kBlock * dim));
      std::vector<float> tile(size_t(kBlock * kMaxQueryVecs * W));
      std::vector<float> gmax(size_t(kBlock * kMaxQueryVecs * W));  // a row group's maxima
      std::vector<float*> out_rows(size_t(kMaxQueryVecs * W));
      ContiguousRows<T> rows_in{base, dim, c_begin, c_end};
      for (int64_t c0 = c_begin; c0 < c_end; c0 += kBlock) {
        const float* rows = nullptr;
        const int64_t nc = rows_in.next(staged.data(), kBlock, &rows);
        rows_in.prefetch(kBlock);  // the next block, while this one is scored
        // Centroid-major: each query's lanes past its valid tokens are zero. Written here, just
        // before the tiles' copies fill the valid lanes of the same lines (in L1 by then): a
        // separate pass over the table first cost a read-for-ownership of every line twice.
        if (ts > 0) zero_padding_lanes(scores, n_valid_of, n_cent, ts, c0, nc);
        for (int64_t v0 = 0; v0 < packed.n_vec; v0 += kMaxQueryVecs) {
          const int64_t nv = std::min<int64_t>(kMaxQueryVecs, packed.n_vec - v0);
          const int64_t ld = nv * W;
          const float* qt = packed.qt + v0 * W;
          int64_t group = 1;
          with_query_vecs(nv, [&](auto nqv) {
            group = sweep_tiles<decltype(nqv)::value>(qt, packed.stride, rows, nc, dim, tile.data(), ld, gmax.data());
          });
          const int64_t lanes = std::min(ld, n_valid - v0 * W);
          if (ts > 0) {  // centroid-major: valid token j of query qi at (qi * n_cent + c) * ts + j
            for (int64_t lane = 0; lane < lanes; ++lane)
              out_rows[size_t(lane)] = scores + slot_of[size_t(v0 * W + lane)] + c0 * ts;
            copy_out_table(tile.data(), ld, nc, lanes, out_rows.data(), ts);
          } else {
            for (int64_t lane = 0; lane < lanes; ++lane)
              out_rows[size_t(lane)] = scores + row_of[size_t(v0 * W + lane)] * n_cent + c0;
            if (stream_out && nc == kBlock)
              copy_out<true>(tile.data(), ld, nc, lanes, out_rows.data());
            else
              copy_out<false>(tile.data(), ld, nc, lanes, out_rows.data());
          }
          // Top-k from the tile, still in L1: only the groups of rows whose maximum beats a
          // token's threshold are scanned, W tokens per compare.
          const int64_t n_groups = (nc + group - 1) / group;
          for (int64_t v = 0; v < nv; ++v) {
            float* thr = threshold.data() + (v0 + v) * W;
            float* kbest = best_group_max.data() + (v0 + v) * kGroupBound * W;
            const int64_t valid = std::min<int64_t>(W, lanes - v * W);
            const uint32_t lanes_mask = valid >= 32 ? ~0u : (1u << valid) - 1u;
            for (int64_t g = 0; g < n_groups; ++g) {
              const Vec gm = Vec::load(gmax.data() + g * ld + v * W);
              const uint32_t trig = gt_mask(gm, Vec::load(thr)) & lanes_mask;
              if (trig == 0) continue;
              for (int64_t c = g * group; c < std::min(nc, (g + 1) * group); ++c) {
                const float* col = tile.data() + c * ld + v * W;
                for (uint32_t bits = gt_mask(Vec::load(col), Vec::load(thr)) & trig; bits; bits &= bits - 1) {
                  const int lane = __builtin_ctz(bits);
                  Shortlist& list = mine[(v0 + v) * W + lane];
                  list.items[list.size++] = rank_key(col[lane], c0 + c);
                  if (list.size == cap) keep_best(list, k, thr + lane);
                }
              }
              if (k > kGroupBound) continue;
              // After the group's scan, its maximum joins each token's k best group maxima (k
              // vectors, best first, inserted by max / min), and the k-th of them bounds the
              // threshold from below: k centroids of lower id than any still to come score at
              // least that, so a later centroid scoring no more is not among the k best. The
              // shortlist's own threshold rises only when it fills (every 64 entries); with
              // this bound SciFact's queries append 4x fewer entries (3,909 -> 985 a query).
              Vec x = max(gm, Vec::set1(kNegInf));  // NaN (an overflowed score) -> -inf: no bound
              for (int64_t i = 0; i < k; ++i) {
                const Vec b = Vec::load(kbest + i * W);
                max(b, x).store(kbest + i * W);
                x = min(b, x);
              }
              max(Vec::load(thr), Vec::load(kbest + (k - 1) * W)).store(thr);
            }
          }
        }
        if (centroid_max != nullptr) row_maxima(scores, n_valid_of, n_cent, ts, c0, nc, centroid_max);
      }
#if defined(EDGEPLAID_ISA_AVX2) || defined(EDGEPLAID_ISA_AVX512)
      if (stream_out) _mm_sfence();  // the non-temporal stores are visible before we return
#endif
    });
  });

  merge_shortlists(lists, max_threads, n_valid, k, row_of, top_ids);
}

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
