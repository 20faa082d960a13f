// nearest_centroids: each token's k best centroids by inner product (score descending, ties to
// the lower id), searched coarse to fine for index building (see CentroidGroups in ops.h):
//   1. the token is scored against every group centroid; the n_probe best groups are kept;
//   2. it is scored against every member of those groups; the k best are kept;
//   3. with a neighbour graph, a walk: the neighbours of the best not yet expanded of the first
//      `width` candidates are scored and enter the list, up to max_steps times.
// Exhaustive search is the special case of one group probed (or every group).
//
// Every score is one sequential FMA chain over d, <x, c> = fma(x[d], c[d], ...) from d = 0,
// whether the centroid is met in a block lane or on the walk, so a centroid scores the same on
// every path and every ISA (the scalar path's fmaf included): the three ISAs return the same ids.
// Tokens are processed in chunks, stage by stage, so that centroid data is reused from cache:
// a register tile scores kTileTokens tokens against kTileBlocks blocks (the block vectors of a
// dimension loaded once for all of them), and the fine stage visits the groups one by one,
// scoring every token of the chunk that probes a group while its blocks are in L2. The walk's
// row-major chains run four at a time.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "maxsim_core.h"
#include "rank_key.h"

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

// Best k (score, id) pairs seen, distinct ids, sorted by score descending then id ascending.
struct BestK {
  float* score;
  int32_t* id;
  int64_t k, size;

  EP_INLINE static bool before(float s, int32_t i, float s2, int32_t i2) { return s > s2 || (s == s2 && i < i2); }
  // Scores below this cannot enter (equal ones may, by a lower id).
  EP_INLINE float floor() const { return size < k ? kNegInf : score[k - 1]; }
  EP_INLINE void offer(float s, int32_t i) {
    if (size == k && !before(s, i, score[k - 1], id[k - 1])) return;
    // A centroid met twice (a neighbour already scored, a centroid in two probed groups)
    // scores the same both times: it is listed once.
    for (int64_t j = 0; j < size; ++j)
      if (id[j] == i) return;
    int64_t pos = size < k ? size : k - 1;
    for (; pos > 0 && before(s, i, score[pos - 1], id[pos - 1]); --pos) {
      score[pos] = score[pos - 1];
      id[pos] = id[pos - 1];
    }
    score[pos] = s;
    id[pos] = i;
    if (size < k) ++size;
  }
};

// Candidates as rank keys (rank_key.h): sorting plain integers inlines where a comparator would not.
EP_INLINE uint64_t candidate_key(float score, int32_t id) { return rank_key(score, id); }
EP_INLINE float candidate_score(uint64_t key) { return key_score(key); }
EP_INLINE int32_t candidate_id(uint64_t key) { return int32_t(key_id(key)); }

// A token's best k candidates while a stage sweeps blocks: every lane at or above the floor is
// appended (a store, no search); a full list is cut to its k best keys by a linear selection and
// the floor rises to the k-th score. Insertion into a sorted list cost O(k) per candidate: 35% of
// the search at n_probe 32. With `distinct` the ids offered are known to be distinct (group
// ids); otherwise a centroid can be met twice (in two probed groups), with the same key both
// times, and the cut keeps distinct keys. k == 1 keeps a running maximum.
struct CandidateList {
  uint64_t* items;
  int64_t size, cap, k;
  float floor;
  bool distinct;

  static int64_t capacity(int64_t k) { return 2 * k + 64; }
  EP_INLINE void add(float s, int32_t i) {
    const uint64_t key = candidate_key(s, i);
    if (k == 1) {
      if (size == 0 || key > items[0]) {
        items[0] = key;
        size = 1;
        floor = s;
      }
      return;
    }
    items[size++] = key;
    if (size == cap) cut();
  }
  // Keeps the k best (distinct) keys, in no particular order.
  void cut() {
    if (size <= k) return;
    std::nth_element(items, items + (k - 1), items + size, std::greater<uint64_t>());
    if (!distinct) {
      std::sort(items, items + k, std::greater<uint64_t>());
      if (std::unique(items, items + k) - items < k) {  // duplicates among the k best: rare
        std::sort(items, items + size, std::greater<uint64_t>());
        size = std::unique(items, items + size) - items;
        if (size < k) return;
      }
    }
    size = k;
    floor = candidate_score(*std::min_element(items, items + k));
  }
  // The k best distinct keys, sorted best first.
  void finish() {
    cut();
    std::sort(items, items + size, std::greater<uint64_t>());
    size = std::unique(items, items + size) - items;
  }
};

constexpr int kLaneVecs = kBlockLanes / W > 0 ? kBlockLanes / W : 1;  // vectors per block
// Register tile: kTileTokens tokens x kTileBlocks blocks of accumulators (24 zmm on AVX-512,
// 12 ymm on AVX2), the block vectors of one dimension loaded once for all the tile's tokens.
constexpr int kTileBlocks = W == 16 ? 3 : 1;
constexpr int kTileTokens = W == 16 ? 8 : (W == 8 ? 6 : 1);
// Member blocks swept per pass over a group's tokens: ~400 KB at dim 48, kept in L2 while
// every token of the chunk that probes the group is scored against them.
constexpr int64_t kRangeBlocks = 128;
// Tokens per chunk: enough tokens probe each group for its blocks to be reused from cache.
constexpr int64_t kChunkTokens = 2048;

// out[t * NB * kBlockLanes + b * kBlockLanes + l] = <xs[t], lane l of block b> for kTileTokens
// staged tokens xs (kTileTokens, dim) and NB consecutive blocks.
template <int NB>
EP_INLINE void tile_scores(const float* xs, const float* blocks, int64_t dim, float* out) {
  constexpr int NT = kTileTokens;
  const int64_t bstride = dim * kBlockLanes;
  if constexpr (W == 1) {
    for (int t = 0; t < NT; ++t)
      for (int b = 0; b < NB; ++b)
        for (int l = 0; l < kBlockLanes; ++l) {
          float s = 0.0f;
          for (int64_t d = 0; d < dim; ++d)
            s = __builtin_fmaf(xs[t * dim + d], blocks[b * bstride + d * kBlockLanes + l], s);
          out[(t * NB + b) * kBlockLanes + l] = s;
        }
  } else {
    constexpr int NV = NB * kLaneVecs;
    Vec acc[NT][NV];
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[t][v] = Vec::zero();
    for (int64_t d = 0; d < dim; ++d) {
      Vec c[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        c[v] = Vec::load(blocks + (v / kLaneVecs) * bstride + d * kBlockLanes + (v % kLaneVecs) * W);
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) {
        const Vec xd = Vec::set1(xs[t * dim + d]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[t][v] = fmadd(xd, c[v], acc[t][v]);
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[t][v].store(out + t * NV * W + v * W);
  }
}

// Offers lanes s[0 : n_lanes] (ids ids[0 : n_lanes]; -1 = padding, skipped) to a list; lanes
// below its floor are skipped W at a time. n_lanes is a multiple of kBlockLanes.
EP_INLINE void offer_lanes(const float* s, const int32_t* ids, int64_t n_lanes, CandidateList& list) {
  for (int64_t j = 0; j < n_lanes; j += W) {
    // Lanes not below the floor: !(floor > s). (A tie with the floor may still win by id.)
    uint32_t pass = ~gt_mask(Vec::set1(list.floor), Vec::load(s + j)) & ((1u << W) - 1u);
    for (; pass; pass &= pass - 1) {
      const int lane = __builtin_ctz(pass);
      if (ids[j + lane] >= 0) list.add(s[j + lane], ids[j + lane]);
    }
  }
}

// Scores tokens tok[0 : n_tok] (rows of xs, (chunk, dim) fp32) against blocks [b0, b1) of rows
// and offers every lane to each token's list lists[tok[i]].
inline void sweep(const float* xs, const int32_t* tok, int64_t n_tok, const BlockRows& rows, int64_t b0, int64_t b1,
                  int64_t dim, CandidateList* lists, float* stage, float* s) {
  constexpr int NT = kTileTokens;
  for (int64_t r0 = b0; r0 < b1; r0 += kRangeBlocks) {
    const int64_t r1 = std::min(b1, r0 + kRangeBlocks);
    for (int64_t i0 = 0; i0 < n_tok; i0 += NT) {
      const int64_t nt = std::min<int64_t>(NT, n_tok - i0);
      // A short tile repeats its last token; the repeats' scores are not offered.
      for (int t = 0; t < NT; ++t)
        std::memcpy(stage + t * dim, xs + int64_t(tok[i0 + std::min<int64_t>(t, nt - 1)]) * dim,
                    sizeof(float) * size_t(dim));
      int64_t b = r0;
      for (; b + kTileBlocks <= r1; b += kTileBlocks) {
        tile_scores<kTileBlocks>(stage, rows.data + b * dim * kBlockLanes, dim, s);
        for (int64_t t = 0; t < nt; ++t)
          offer_lanes(s + t * kTileBlocks * kBlockLanes, rows.ids + b * kBlockLanes, kTileBlocks * kBlockLanes,
                      lists[tok[i0 + t]]);
      }
      for (; b < r1; ++b) {
        tile_scores<1>(stage, rows.data + b * dim * kBlockLanes, dim, s);
        for (int64_t t = 0; t < nt; ++t)
          offer_lanes(s + t * kBlockLanes, rows.ids + b * kBlockLanes, kBlockLanes, lists[tok[i0 + t]]);
      }
    }
  }
}

// <x, c> for four row-major centroids at once: four independent sequential FMA chains.
EP_INLINE void dot_rows4(const float* x, const float* const* c, int64_t dim, float* out) {
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  for (int64_t d = 0; d < dim; ++d) {
    s0 = __builtin_fmaf(x[d], c[0][d], s0);
    s1 = __builtin_fmaf(x[d], c[1][d], s1);
    s2 = __builtin_fmaf(x[d], c[2][d], s2);
    s3 = __builtin_fmaf(x[d], c[3][d], s3);
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

// The walk (a best-first search on the neighbour graph): up to max_steps times, the best-ranked
// of the first `width` candidates that was not expanded yet is expanded (its neighbours are
// scored and offered); it stops when the first `width` are all expanded. width 1: from the best
// to its best neighbour until the best stays put. False on a bad id.
inline bool walk(const float* x, const CentroidGroups& g, int64_t max_steps, int64_t width, BestK& best,
                 int32_t* expanded, KernelError& err) {
  const int64_t dim = g.dim, deg = g.degree;
  int64_t n_expanded = 0;
  for (int64_t step = 0; step < max_steps; ++step) {
    int32_t cur = -1;
    for (int64_t r = 0; r < std::min(width, best.size) && cur < 0; ++r) {
      bool seen = false;
      for (int64_t e = 0; e < n_expanded && !seen; ++e) seen = expanded[e] == best.id[r];
      if (!seen) cur = best.id[r];
    }
    if (cur < 0) break;
    if (cur >= g.n_centroids) {
      err.report("groups: centroid id " + std::to_string(cur) + " out of range [0, " +
                 std::to_string(g.n_centroids) + ")");
      return false;
    }
    expanded[n_expanded++] = cur;
    const int32_t* nb = g.graph + int64_t(cur) * deg;
    const float* rows[4];
    int32_t ids[4];
    float s[4];
    int n = 0;
    const auto flush = [&] {
      for (int i = n; i < 4; ++i) rows[i] = rows[0];  // unused chains repeat the first row
      dot_rows4(x, rows, dim, s);
      for (int i = 0; i < n; ++i) best.offer(s[i], ids[i]);
      n = 0;
    };
    for (int64_t j = 0; j < deg; ++j) {
      const int32_t c = nb[j];
      if (c < 0) continue;
      if (c >= g.n_centroids) {
        err.report("graph: neighbour id " + std::to_string(c) + " of centroid " + std::to_string(cur) +
                   " out of range [-1, " + std::to_string(g.n_centroids) + ")");
        return false;
      }
      rows[n] = g.centroids + int64_t(c) * dim;
      ids[n++] = c;
      if (n == 4) flush();
    }
    if (n > 0) flush();
  }
  return true;
}

void nearest_centroids(const Rows& tokens, const CentroidGroups& g, int64_t n_probe, int64_t k_out, int64_t max_steps,
                       int64_t width, float* scores, int64_t* ids, KernelError& err) {
  const int64_t n = tokens.rows, dim = g.dim, n_groups = g.n_groups;
  // The walk ranks `width` candidates: the lists keep at least that many.
  const int64_t k = g.graph != nullptr ? std::max(k_out, width) : k_out;
  with_dtype(tokens.dtype, [&](auto tag) {
    constexpr DType T = decltype(tag)::value;
    using E = typename Elem<T>::type;
    const E* base = static_cast<const E*>(tokens.data);
    parallel_for(n, kChunkTokens, [&](int64_t c0, int64_t c1) {
      const int64_t m = c1 - c0;
      std::vector<float> xs(static_cast<size_t>(m * dim)), stage(static_cast<size_t>(kTileTokens * dim));
      std::vector<float> s(static_cast<size_t>(kTileTokens * kTileBlocks * kBlockLanes));
      const int64_t gcap = CandidateList::capacity(n_probe), kcap = CandidateList::capacity(k);
      std::vector<uint64_t> gitems(static_cast<size_t>(m * gcap)), kitems(static_cast<size_t>(m * kcap));
      std::vector<CandidateList> glists(static_cast<size_t>(m)), lists(static_cast<size_t>(m));
      std::vector<int32_t> all(static_cast<size_t>(m));
      std::vector<float> bs(static_cast<size_t>(k));
      std::vector<int32_t> bi(static_cast<size_t>(k)), expanded(static_cast<size_t>(std::max<int64_t>(max_steps, 1)));
      for (int64_t i = 0; i < m; ++i) {
        widen_row<T>(base + (c0 + i) * dim, dim, xs.data() + i * dim);
        glists[size_t(i)] = CandidateList{gitems.data() + i * gcap, 0, gcap, n_probe, kNegInf, true};
        lists[size_t(i)] = CandidateList{kitems.data() + i * kcap, 0, kcap, k, kNegInf, false};
        all[size_t(i)] = int32_t(i);
      }
      // 1. each token's n_probe best groups
      sweep(xs.data(), all.data(), m, g.groups, 0, g.groups.n_blocks, dim, glists.data(), stage.data(), s.data());
      for (auto& list : glists) list.cut();  // the probed groups, in any order
      // 2. the tokens probing each group (counting sort by group), scored against its members
      std::vector<int64_t> start(static_cast<size_t>(n_groups + 1), 0);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < glists[size_t(i)].size; ++j) {
          const int32_t grp = candidate_id(glists[size_t(i)].items[j]);
          if (grp < 0 || grp >= n_groups) {
            err.report("groups: group id " + std::to_string(grp) + " out of range [0, " + std::to_string(n_groups) +
                       ")");
            return;
          }
          ++start[size_t(grp) + 1];
        }
      for (int64_t grp = 0; grp < n_groups; ++grp) start[size_t(grp + 1)] += start[size_t(grp)];
      std::vector<int32_t> by_group(static_cast<size_t>(start[size_t(n_groups)]));
      {
        std::vector<int64_t> fill(start.begin(), start.end() - 1);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < glists[size_t(i)].size; ++j) {
            const int32_t grp = candidate_id(glists[size_t(i)].items[j]);
            by_group[size_t(fill[size_t(grp)]++)] = int32_t(i);
          }
      }
      for (int64_t grp = 0; grp < n_groups && !err.set(); ++grp) {
        const int64_t t0 = start[size_t(grp)], t1 = start[size_t(grp + 1)];
        if (t0 == t1) continue;
        const int64_t b0 = g.group_blocks[grp], b1 = g.group_blocks[grp + 1];
        if (b0 < 0 || b0 > b1 || b1 > g.members.n_blocks) {
          err.report("groups: blocks [" + std::to_string(b0) + ", " + std::to_string(b1) + ") of group " +
                     std::to_string(grp) + " out of range [0, " + std::to_string(g.members.n_blocks) + "]");
          return;
        }
        sweep(xs.data(), by_group.data() + t0, t1 - t0, g.members, b0, b1, dim, lists.data(), stage.data(), s.data());
      }
      // 3. the walk (with a graph), token by token, and the output
      for (int64_t i = 0; i < m; ++i) {
        CandidateList& list = lists[size_t(i)];
        list.finish();
        BestK best{bs.data(), bi.data(), k, list.size};
        for (int64_t j = 0; j < list.size; ++j) {
          bs[size_t(j)] = candidate_score(list.items[j]);
          bi[size_t(j)] = candidate_id(list.items[j]);
        }
        if (g.graph != nullptr && !walk(xs.data() + i * dim, g, max_steps, width, best, expanded.data(), err))
          return;
        const int64_t t = c0 + i;
        for (int64_t j = 0; j < k_out; ++j) {
          const bool have = j < best.size;
          scores[t * k_out + j] = have ? best.score[j] : kNegInf;
          ids[t * k_out + j] = have ? best.id[j] : -1;
        }
      }
    });
  });
}

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
