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
// centroid_scores_int8 takes the same path with int8 products (code_scoring.h's tiles) for centroids
// quantised once by the caller.
//
// edgeplaid-isa: amx avx512vnni (the fp32 table on AMX tiles for fp16 / bf16 centroids:
// centroid_scores_amx.h; the int8 kernel with vpdpbusd)
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>

#include "centroid_scores_amx.h"
#include "code_scoring.h"
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

// table[lane][c * ts] = tile[c * ld + lane] for c < n_cols, lane < n_lanes: the lanes of one
// vector whose slots are consecutive (one query's tokens) are one vector store per centroid. A last
// partial vector's store is whole where tail_fits (its row has W lanes from its first slot on:
// the tile's lanes past the valid tokens are zero, as the row's padding lanes are), else masked
// (AVX2's vmaskmovps store costs ~10x a plain one on AMD).
inline void copy_out_table(const float* tile, int64_t ld, int64_t n_cols, int64_t n_lanes, float* const* out,
                           int64_t ts, bool tail_fits) {
  for (int64_t v = 0; v * W < n_lanes; ++v) {
    float* const* dst = out + v * W;
    const int64_t lanes = std::min<int64_t>(W, n_lanes - v * W);
    bool consecutive = true;
    for (int64_t j = 1; j < lanes && consecutive; ++j) consecutive = dst[j] == dst[0] + j;
    if (consecutive && (lanes == W || tail_fits)) {
      for (int64_t c = 0; c < n_cols; ++c) Vec::load(tile + c * ld + v * W).store(dst[0] + c * ts);
    } else if (consecutive) {
      for (int64_t c = 0; c < n_cols; ++c) Vec::load(tile + c * ld + v * W).store_first(dst[0] + c * ts, int(lanes));
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
// From n_valid rounded down to W, in whole vectors; the copy of the valid lanes comes after. With
// whole_tail (one query whose last vector the copy stores whole, zeros included) from n_valid
// rounded up to W: the lanes the copy writes anyway are not stored twice.
inline void zero_padding_lanes(float* scores, const std::vector<int64_t>& n_valid_of, int64_t n_cent, int64_t ts,
                               int64_t c0, int64_t nc, bool whole_tail) {
  for (int64_t qi = 0; qi < int64_t(n_valid_of.size()); ++qi) {
    const int64_t used = n_valid_of[size_t(qi)];
    const int64_t from = whole_tail ? (used + W - 1) / W * W : used / W * W;
    if (from >= ts) continue;
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
// valid token), for the rows of centroids [c0, c0 + nc) of every query. The lanes of a last
// partial vector are read whole (a row has ts >= n_valid rounded up to W lanes) with -inf added
// past n_valid, and each row's maximum is one horizontal reduction: a scalar maximum lane by lane
// (a chain of ~22 dependent maxss a centroid) was half of int8 stage 1's time on the Zen 4.
inline void row_maxima(const float* scores, const std::vector<int64_t>& n_valid_of, int64_t n_cent, int64_t ts,
                       int64_t c0, int64_t nc, float* centroid_max) {
  for (int64_t qi = 0; qi < int64_t(n_valid_of.size()); ++qi) {
    const int64_t n_valid = n_valid_of[size_t(qi)];
    float* dst = centroid_max + qi * n_cent + c0;
    if (n_valid == 0) {
      std::fill(dst, dst + nc, kNegInf);
      continue;
    }
    const int64_t full = n_valid / W, rem = n_valid % W;
    float pad_lanes[W];
    for (int j = 0; j < W; ++j) pad_lanes[j] = j < rem ? 0.0f : kNegInf;
    const Vec pad = Vec::load(pad_lanes);
    const float* rows = scores + (qi * n_cent + c0) * ts;
    for (int64_t c = 0; c < nc; ++c) {
      const float* row = rows + c * ts;
      Vec m = rem > 0 ? Vec::load(row + full * W) + pad : Vec::load(row);
      for (int64_t v = rem > 0 ? 0 : 1; v < full; ++v) m = max(m, Vec::load(row + v * W));
      dst[c] = m.max_lane();
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

// What every precision of centroid_scores shares: the valid query tokens packed onto lanes
// (all queries of the call back to back), each lane's output row, and in the centroid-major
// layout its slot (the j-th valid token of query qi is lane j of qi's rows: valid tokens
// compacted, as stages 2-4 read them; lanes past a query's valid tokens are zero).
struct Stage1Plan {
  std::vector<float> qbuf;
  PackedQuery packed{};
  std::vector<int64_t> row_of, slot_of, n_valid_of;
  bool tail_fits = false;  // centroid-major: the last lane vector's first slot has W lanes left in its row
};

// Fills p, writes the outputs of masked tokens and of the empty cases; false: nothing is left to
// compute (no valid token, or no centroid).
inline bool plan_stage1(const Queries& q, int64_t n_cent, int64_t k, int64_t ts, float* scores, int64_t* top_ids,
                        float* centroid_max, Stage1Plan& p) {
  const int64_t n_rows = q.nq * q.lq;
  p.packed = pack_rows(q.data, q.mask, 0, n_rows, q.dim, p.qbuf, &p.row_of);
  if (ts > 0) {
    p.n_valid_of.assign(size_t(q.nq), 0);
    p.slot_of.resize(size_t(p.packed.n_valid));
    for (int64_t lane = 0; lane < p.packed.n_valid; ++lane) {
      const int64_t qi = p.row_of[size_t(lane)] / q.lq;
      p.slot_of[size_t(lane)] = qi * n_cent * ts + p.n_valid_of[size_t(qi)]++;
    }
    if (p.packed.n_valid > 0) {
      const int64_t last = (p.packed.n_vec - 1) * W;  // the last vector's first lane
      p.tail_fits = p.slot_of[size_t(last)] - p.row_of[size_t(last)] / q.lq * n_cent * ts + W <= ts;
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
  const int64_t n_valid = p.packed.n_valid;
  if (n_valid == 0 && centroid_max != nullptr) std::fill(centroid_max, centroid_max + q.nq * n_cent, kNegInf);
  // No valid token at all: the centroid-major table is all padding (the sweep, which writes it
  // otherwise, does not run).
  if (n_valid == 0 && ts > 0) std::fill(scores, scores + q.nq * n_cent * ts, 0.0f);
  return n_valid > 0 && n_cent > 0;
}

// Each pool thread's shortlists: lists[t * n_valid + lane], shortlist_capacity(k) entries each.
struct Stage1Lists {
  int max_threads;
  int64_t cap;
  std::vector<RankKey> items;
  std::vector<Shortlist> lists;
  Stage1Lists(int64_t n_valid, int64_t k)
      : max_threads(parallel_width()),
        cap(shortlist_capacity(k)),
        items(size_t(max_threads * n_valid * cap)),
        lists(size_t(max_threads * n_valid)) {
    for (size_t i = 0; i < lists.size(); ++i) lists[i] = Shortlist{items.data() + i * size_t(cap), 0};
  }
};

// Centroids per staged block: a multiple of every tile height (fp32: 3, 4, 6, 8, 12; int8: 1, 2,
// 3, 4, 6, 8, 12, 24) and of 8.
constexpr int64_t kStage1Block = 96;

// Every thread's contiguous range of centroids, a block at a time: `make_source(c_begin, c_end)`
// gives the thread's Source, whose load(n) stages the next (up to n) centroids and returns how
// many, and whose sweep(v0, nv, nc, tile, ld, gmax) fills the block's score tile for query
// vectors [v0, v0 + nv) (sweep_tiles' contract) and returns the row-group height. The rest (the
// table or token-major copies, the shortlists, the centroid maxima) is the same for every
// precision.
template <class MakeSource>
void sweep_centroids(const Stage1Plan& p, const Queries& q, int64_t n_cent, int64_t k, int64_t ts, float* scores,
                     float* centroid_max, Stage1Lists& sl, MakeSource&& make_source) {
  const PackedQuery& packed = p.packed;
  const int64_t n_valid = packed.n_valid, cap = sl.cap;
  // Up to this n_probe each token's k best group maxima bound its threshold (the scan below).
  constexpr int64_t kGroupBound = 8;
  constexpr int64_t kBlock = kStage1Block;
  // Non-temporal output stores need every block's row start 32-byte aligned (and a SIMD ISA).
  // The (n_rows, C) output is written once here and read later by other code: streaming it
  // skips the read-for-ownership of every line and keeps the centroids in cache.
  const bool stream_out =
      W > 1 && ts == 0 && reinterpret_cast<uintptr_t>(scores) % 32 == 0 && n_cent % 8 == 0;
  parallel_each_thread([&](int thread, int n_threads) {
    // Ranges start at multiples of 8 so that streamed blocks stay aligned.
    const auto split = [&](int t) { return t == n_threads ? n_cent : (n_cent * t / n_threads) & ~int64_t(7); };
    const int64_t c_begin = split(thread), c_end = split(thread + 1);
    Shortlist* mine = sl.lists.data() + thread * n_valid;
    std::vector<float> threshold(size_t(packed.stride), kNegInf);
    std::vector<float> best_group_max(size_t(packed.stride * kGroupBound), kNegInf);  // per token, best first
    std::vector<float> tile(size_t(kBlock * kMaxQueryVecs * W));
    std::vector<float> gmax(size_t(kBlock * kMaxQueryVecs * W));  // a row group's maxima
    std::vector<float*> out_rows(size_t(kMaxQueryVecs * W));
    auto source = make_source(c_begin, c_end);
    for (int64_t c0 = c_begin; c0 < c_end; c0 += kBlock) {
      const int64_t nc = source.load(kBlock);
      // Centroid-major: each query's lanes past its valid tokens are zero. Written here, just
      // before the tiles' copies fill the valid lanes of the same lines (in L1 by then): a
      // separate pass over the table first cost a read-for-ownership of every line twice.
      if (ts > 0) zero_padding_lanes(scores, p.n_valid_of, n_cent, ts, c0, nc, q.nq == 1 && p.tail_fits);
      for (int64_t v0 = 0; v0 < packed.n_vec; v0 += kMaxQueryVecs) {
        const int64_t nv = std::min<int64_t>(kMaxQueryVecs, packed.n_vec - v0);
        const int64_t ld = nv * W;
        const int64_t group = source.sweep(v0, nv, nc, tile.data(), ld, gmax.data());
        const int64_t lanes = std::min(ld, n_valid - v0 * W);
        if (ts > 0) {  // centroid-major: valid token j of query qi at (qi * n_cent + c) * ts + j
          for (int64_t lane = 0; lane < lanes; ++lane)
            out_rows[size_t(lane)] = scores + p.slot_of[size_t(v0 * W + lane)] + c0 * ts;
          copy_out_table(tile.data(), ld, nc, lanes, out_rows.data(), ts, p.tail_fits);
        } else {
          for (int64_t lane = 0; lane < lanes; ++lane)
            out_rows[size_t(lane)] = scores + p.row_of[size_t(v0 * W + lane)] * n_cent + c0;
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
      if (centroid_max != nullptr) row_maxima(scores, p.n_valid_of, n_cent, ts, c0, nc, centroid_max);
    }
#if defined(EDGEPLAID_ISA_AVX2) || defined(EDGEPLAID_ISA_AVX512)
    if (stream_out) _mm_sfence();  // the non-temporal stores are visible before we return
#endif
  });
}

#if !defined(EDGEPLAID_ISA_VNNI)  // the VNNI unit only adds the int8 kernel below
// fp32 products: the centroids widened a block at a time into an L1 buffer.
template <DType T>
struct Fp32Source {
  const PackedQuery* packed;
  ContiguousRows<T> rows_in;
  std::vector<float> staged;
  const float* rows = nullptr;

  int64_t load(int64_t n) {
    const int64_t nc = rows_in.next(staged.data(), n, &rows);
    rows_in.prefetch(n);  // the next block, while this one is scored
    return nc;
  }
  int64_t sweep(int64_t v0, int64_t nv, int64_t nc, float* tile, int64_t ld, float* gmax) const {
    int64_t group = 1;
    with_query_vecs(nv, [&](auto nqv) {
      group = sweep_tiles<decltype(nqv)::value>(packed->qt + v0 * W, packed->stride, rows, nc, rows_in.dim, tile, ld,
                                               gmax);
    });
    return group;
  }
};

// table_stride == 0: scores is token-major (nq * lq, n_centroids); > 0: centroid-major
// (nq, n_centroids, table_stride), each query's valid tokens compacted into lanes 0.., the rest zero.
// centroid_max (centroid-major only; null: not wanted): (nq, n_centroids), each centroid's best
// score over the query's valid tokens (PLAID's pruning test), taken from the tile still in cache.
void centroid_scores(const Queries& q, const Rows& centroids, int64_t n_probe, int64_t table_stride,
                     float* scores, int64_t* top_ids, float* centroid_max, KernelError& err) {
  (void)err;
  const int64_t n_cent = centroids.rows, dim = q.dim, k = n_probe, ts = table_stride;
  Stage1Plan p;
  if (!plan_stage1(q, n_cent, k, ts, scores, top_ids, centroid_max, p)) return;
  Stage1Lists sl(p.packed.n_valid, k);
#if defined(EDGEPLAID_ISA_AMX)
  // The centroid-major table from half-precision centroids: on AMX tiles (centroid_scores_amx.h).
  if (ts > 0 && centroids.dtype != DType::f32 && amx_stage1::amx_range_ok(q)) {
    centroid_scores_amx(q, centroids, k, ts, p.row_of, p.n_valid_of, scores, centroid_max, sl.lists);
    merge_shortlists(sl.lists, sl.max_threads, p.packed.n_valid, k, p.row_of, top_ids);
    return;
  }
#endif
  with_dtype(centroids.dtype, [&](auto tag) {
    constexpr DType T = decltype(tag)::value;
    using E = typename Elem<T>::type;
    const E* base = static_cast<const E*>(centroids.data);
    sweep_centroids(p, q, n_cent, k, ts, scores, centroid_max, sl, [&](int64_t c_begin, int64_t c_end) {
      return Fp32Source<T>{&p.packed, ContiguousRows<T>{base, dim, c_begin, c_end},
                           std::vector<float>(size_t(kStage1Block * dim))};
    });
  });
  merge_shortlists(sl.lists, sl.max_threads, p.packed.n_valid, k, p.row_of, top_ids);
}

#endif  // !EDGEPLAID_ISA_VNNI

#if !defined(EDGEPLAID_ISA_AMX)  // the AMX unit's tiles serve the fp32 kernel only
// ------------------------------------------------------------------ int8 products
//
// centroid_scores_int8: the same outputs from 4-byte integer dot products (code_scoring.h's
// tiles: vpdpbusd, vpmaddubsw or the AVX2 sign trick, exact on every ISA):
//   qscale_i = max_d |q_id| / 127,  qq_id = round(q_id / qscale_i)   (ties to even, as stage 4's)
//   S[i, c] = float(sum_d qq_id * L_cd) * (qscale_i * scale_c),  L = 64 * hi + lo
// with the centroids quantised once by the caller to 12-bit levels (Int8Rows), summed as two
// passes of 7-bit halves: acc = bias + hi . qq, then acc = (acc << 6) + bias + lo . qq. The
// integer sum is exact and the epilogue the same roundings everywhere, so every ISA returns the
// scalar path's scores bit for bit. Why: stage 1's products at 2x the fp32 FMA rate where the CPU
// has VNNI (twice 4x), and half the fp16 centroids' bytes. Why 12 bits: 7-bit centroid levels
// (one pass) moved stage 4's centroid term enough to cost SciFact 0.009 of recall@10 against
// exhaustive search; 12 bits leave it where fp32 is (README).

// The packed query lanes quantised (code_scoring.h's quantise_lanes): q8 [dim4 / 4][stride][4],
// scale [stride] qscale, bias [stride] -kStoredOffset * sum_d qq; zero past n_valid.
struct Int8Lanes {
  std::vector<int8_t> q8;
  std::vector<float> scale;
  std::vector<int32_t> bias;
};

// tile[r * ld + v * W + lane] = the scores of NT centroid rows (stored levels, row_bytes apart:
// the hi halves at rows, the lo halves at rows_lo; scales cscale) for NQV query vectors; m[v] =
// their maximum over the rows.
template <int NQV, int NT, int GROUPS>
EP_INLINE void int8_rows_to_tile(const int8_t* q8, int64_t qstride4, const IVec (&bias)[NQV], const Vec (&qs)[NQV],
                                 const uint8_t* rows, const uint8_t* rows_lo, int64_t row_bytes, const float* cscale,
                                 float* tile, int64_t ld, Vec (&m)[NQV]) {
  IVec acc[NT][NQV];
  dot_tile_i8<NQV, NT, GROUPS>(q8, qstride4, rows, row_bytes, row_bytes / 4, bias, acc);
#pragma GCC unroll 16
  for (int r = 0; r < NT; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NQV; ++v) acc[r][v] = acc[r][v].shl_add(kLevelHiShift, bias[v]);
  dot_tile_i8<NQV, NT, GROUPS, false>(q8, qstride4, rows_lo, row_bytes, row_bytes / 4, bias, acc);
#pragma GCC unroll 8
  for (int v = 0; v < NQV; ++v) m[v] = Vec::set1(kNegInf);
#pragma GCC unroll 24
  for (int r = 0; r < NT; ++r) {
    const Vec cs = Vec::set1(cscale[r]);
#pragma GCC unroll 8
    for (int v = 0; v < NQV; ++v) {
      const Vec s = acc[r][v].to_float() * (qs[v] * cs);
      s.store(tile + r * ld + v * W);
      m[v] = max(s, m[v]);
    }
  }
}

// sweep_tiles_dim's contract for int8 rows: the block's tile and each row group's maxima;
// returns the group height NT.
template <int NQV, int GROUPS>
EP_INLINE int64_t sweep_tiles_i8_dim(const Int8Lanes& lanes, int64_t stride, int64_t v0, const uint8_t* rows,
                                     const uint8_t* rows_lo, int64_t row_bytes, const float* cscale, int64_t n_rows,
                                     float* tile, int64_t ld, float* group_max) {
  constexpr int NT = tile_rows_i8<NQV>();
  const int64_t qstride4 = stride * 4;
  const int8_t* q8 = lanes.q8.data() + v0 * W * 4;
  IVec bias[NQV];
  Vec qs[NQV], m[NQV];
#pragma GCC unroll 8
  for (int v = 0; v < NQV; ++v) {
    bias[v] = IVec::load(lanes.bias.data() + (v0 + v) * W);
    qs[v] = Vec::load(lanes.scale.data() + (v0 + v) * W);
  }
  int64_t t = 0;
  for (; t + NT <= n_rows; t += NT) {
    int8_rows_to_tile<NQV, NT, GROUPS>(q8, qstride4, bias, qs, rows + t * row_bytes, rows_lo + t * row_bytes,
                                       row_bytes, cscale + t, tile + t * ld, ld, m);
#pragma GCC unroll 8
    for (int v = 0; v < NQV; ++v) m[v].store(group_max + t / NT * ld + v * W);
  }
  if (t == n_rows) return NT;
  // The last rows as sweep_tiles_dim takes them: a full tile over the last NT rows where there
  // are that many (rows seen twice get the same scores again), else one row at a time; their
  // group's maximum is read back from the tile.
  if (n_rows >= NT) {
    const int64_t at = n_rows - NT;
    int8_rows_to_tile<NQV, NT, GROUPS>(q8, qstride4, bias, qs, rows + at * row_bytes, rows_lo + at * row_bytes,
                                       row_bytes, cscale + at, tile + at * ld, ld, m);
  } else {
    for (int64_t r = t; r < n_rows; ++r)
      int8_rows_to_tile<NQV, 1, GROUPS>(q8, qstride4, bias, qs, rows + r * row_bytes, rows_lo + r * row_bytes,
                                        row_bytes, cscale + r, tile + r * ld, ld, m);
  }
  for (int v = 0; v < NQV; ++v) {
    Vec mx = Vec::load(tile + t * ld + v * W);
    for (int64_t r = t + 1; r < n_rows; ++r) mx = max(Vec::load(tile + r * ld + v * W), mx);
    mx.store(group_max + t / NT * ld + v * W);
  }
  return NT;
}

template <int NQV>
EP_INLINE int64_t sweep_tiles_i8(const Int8Lanes& lanes, int64_t stride, int64_t v0, const uint8_t* rows,
                                 const uint8_t* rows_lo, int64_t row_bytes, const float* cscale, int64_t n_rows,
                                 float* tile, int64_t ld, float* group_max) {
  int64_t group = 1;
  with_fixed_dim(row_bytes, [&](auto d) {  // as sweep_i8: GROUPS = dim4 / 4 for the served dims
    group = sweep_tiles_i8_dim<NQV, decltype(d)::value / 4>(lanes, stride, v0, rows, rows_lo, row_bytes, cscale,
                                                             n_rows, tile, ld, group_max);
  });
  return group;
}

// int8 levels: used in place where the ISA stores them signed (AVX2), else offset into an L1
// buffer a block at a time (kStoredOffset: the unsigned side of vpdpbusd / vpmaddubsw), both halves.
struct Int8Source {
  const Int8Lanes* lanes;
  int64_t stride;
  const Int8Rows* c;
  int64_t at, end;
  std::vector<uint8_t> staged;  // 2 x kStage1Block x dim4: hi rows, then lo rows
  const uint8_t* rows = nullptr;
  const uint8_t* rows_lo = nullptr;
  const float* cscale = nullptr;

  int64_t load(int64_t n) {
    const int64_t nc = std::min(n, end - at), rb = c->dim4;
    const int8_t* hi = c->levels + at * rb;
    const int8_t* lo = c->levels + (c->rows + at) * rb;
    if constexpr (kStoredOffset == 0) {
      rows = reinterpret_cast<const uint8_t*>(hi);
      rows_lo = reinterpret_cast<const uint8_t*>(lo);
    } else {
      // Through local pointers: a byte store may alias any member, which the loop would then
      // reload each byte (and not vectorise: it cost half of this kernel's time).
      uint8_t* dst = staged.data();
      const int64_t n_bytes = nc * rb, half = kStage1Block * rb;
      for (int64_t i = 0; i < n_bytes; ++i) dst[i] = uint8_t(hi[i] + kStoredOffset);
      for (int64_t i = 0; i < n_bytes; ++i) dst[half + i] = uint8_t(lo[i] + kStoredOffset);
      rows = dst;
      rows_lo = dst + half;
    }
    cscale = c->scale + at;
    at += nc;
    const int64_t next = std::min(n, end - at) * rb;  // the next block, both halves
    prefetch_bytes_l2(c->levels + at * rb, next);
    prefetch_bytes_l2(c->levels + (c->rows + at) * rb, next);
    return nc;
  }
  int64_t sweep(int64_t v0, int64_t nv, int64_t nc, float* tile, int64_t ld, float* gmax) const {
    int64_t group = 1;
    with_query_vecs(nv, [&](auto nqv) {
      group = sweep_tiles_i8<decltype(nqv)::value>(*lanes, stride, v0, rows, rows_lo, c->dim4, cscale, nc, tile, ld,
                                                   gmax);
    });
    return group;
  }
};

void centroid_scores_int8(const Queries& q, const Int8Rows& centroids, int64_t n_probe, int64_t table_stride,
                          float* scores, int64_t* top_ids, float* centroid_max, KernelError& err) {
  (void)err;
  const int64_t n_cent = centroids.rows, k = n_probe, ts = table_stride;
  Stage1Plan p;
  if (!plan_stage1(q, n_cent, k, ts, scores, top_ids, centroid_max, p)) return;
  Int8Lanes lanes;
  quantise_lanes(q.data, p.row_of.data(), p.packed.n_valid, q.dim, p.packed.stride, 1.0f, lanes.q8, lanes.scale,
                 lanes.bias);
  Stage1Lists sl(p.packed.n_valid, k);
  sweep_centroids(p, q, n_cent, k, ts, scores, centroid_max, sl, [&](int64_t c_begin, int64_t c_end) {
    return Int8Source{&lanes, p.packed.stride, &centroids, c_begin, c_end,
                      std::vector<uint8_t>(size_t(2 * kStage1Block * centroids.dim4))};
  });
  merge_shortlists(sl.lists, sl.max_threads, p.packed.n_valid, k, p.row_of, top_ids);
}
#endif

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
