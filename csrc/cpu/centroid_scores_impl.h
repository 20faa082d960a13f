// centroid_scores: S = Q . C^T for every valid query token against every centroid, and each
// token's top-n_probe centroids (score descending, ties to the lower id).
//
// The GEMM reuses the MaxSim micro-kernel: query tokens on the lanes, centroids broadcast as
// rows. A block of centroid scores lands in a small L1 tile, with each token's maximum over
// the block kept in registers on the way; one lane-wise compare of those maxima against each
// token's current k-th best score tells which tokens (rarely any) need their row of the
// tile scanned for the per-token heaps. The tile reaches the row-major output by 8 x 8
// register transposes.
// Each thread owns a contiguous range of centroids, visited in increasing id order, so a
// score equal to a heap's worst never displaces it (the lower id wins ties); the per-thread
// heaps are merged at the end with the full (score, id) order.
#pragma once
#include <algorithm>

#include "maxsim_core.h"

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

struct ScoredId {
  float score;
  int64_t id;
};
// a ranks before b: higher score, then lower id. A functor, so the heap code inlines it.
struct RanksBefore {
  bool operator()(const ScoredId& a, const ScoredId& b) const {
    return a.score > b.score || (a.score == b.score && a.id < b.id);
  }
};
constexpr RanksBefore ranks_before{};

// tile[t * ld + v * W + lane] = <query lane of vector v, rows[t]> for NQV query vectors, and
// block_max[v * W + lane] = max over t of the same.
template <int NQV>
void score_tile(const float* qt, int64_t qstride, const float* rows, int64_t n_rows, int64_t dim,
                float* tile, int64_t ld, float* block_max) {
  constexpr int NT = tile_rows<NQV>();
  Vec m[NQV];
#pragma GCC unroll 8
  for (int v = 0; v < NQV; ++v) m[v] = Vec::set1(kNegInf);
  int64_t t = 0;
  for (; t + NT <= n_rows; t += NT) {
    Vec acc[NT][NQV];
    dot_tile<NQV, NT>(qt, qstride, rows + t * dim, dim, acc);
#pragma GCC unroll 16
    for (int r = 0; r < NT; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NQV; ++v) {
        acc[r][v].store(tile + (t + r) * ld + v * W);
        m[v] = max(m[v], acc[r][v]);
      }
  }
  for (; t < n_rows; ++t) {
    Vec acc[1][NQV];
    dot_tile<NQV, 1>(qt, qstride, rows + t * dim, dim, acc);
#pragma GCC unroll 8
    for (int v = 0; v < NQV; ++v) {
      acc[0][v].store(tile + t * ld + v * W);
      m[v] = max(m[v], acc[0][v]);
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < NQV; ++v) m[v].store(block_max + v * W);
}

// Replaces the root (the worst kept entry) of a full heap and restores the heap order.
inline void replace_top(ScoredId* h, int64_t k, ScoredId e) {
  int64_t i = 0;
  for (;;) {
    int64_t child = 2 * i + 1;
    if (child >= k) break;
    // the "larger" child in heap order is the one that ranks later (worse)
    if (child + 1 < k && ranks_before(h[child], h[child + 1])) ++child;
    if (!ranks_before(e, h[child])) break;
    h[i] = h[child];
    i = child;
  }
  h[i] = e;
}

// Offers scores[0:n] (ids first_id + c, increasing) to a heap of the k best; *thr is the
// score an entry must beat (-inf until the heap is full).
inline void scan_into_heap(const float* scores, int64_t n, int64_t first_id, ScoredId* h, int64_t k,
                           int64_t* size, float* thr) {
  auto offer = [&](int64_t c) {
    const ScoredId e{scores[c], first_id + c};
    if (*size < k) {
      h[(*size)++] = e;
      std::push_heap(h, h + *size, ranks_before);
    } else {
      replace_top(h, k, e);
    }
    if (*size == k) *thr = h[0].score;  // root = worst kept
  };
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    uint32_t bits = gt_mask(Vec::load(scores + c), Vec::set1(*thr));
    for (; bits; bits &= bits - 1) {
      const int64_t j = c + __builtin_ctz(bits);
      if (scores[j] > *thr) offer(j);  // the threshold may have risen within this vector
    }
  }
  for (; c < n; ++c)
    if (scores[c] > *thr) offer(c);
}

// out_rows[lane][c] = tile[c * ld + lane] for c < n_cols, lane < n_lanes.
inline void copy_out(const float* tile, int64_t ld, int64_t n_cols, int64_t n_lanes, float* const* out_rows) {
  int64_t lane = 0;
  for (; lane + 8 <= n_lanes; lane += 8) {
    int64_t c = 0;
    for (; c + 8 <= n_cols; c += 8) {
      float* dst[8];
      for (int j = 0; j < 8; ++j) dst[j] = out_rows[lane + j] + c;
      transpose_8x8(tile + c * ld + lane, ld, dst);
    }
    for (; c < n_cols; ++c)
      for (int j = 0; j < 8; ++j) out_rows[lane + j][c] = tile[c * ld + lane + j];
  }
  for (; lane < n_lanes; ++lane)
    for (int64_t c = 0; c < n_cols; ++c) out_rows[lane][c] = tile[c * ld + lane];
}

void centroid_scores(const Queries& q, const Rows& centroids, int64_t n_probe, float* scores,
                     int64_t* top_ids, KernelError& err) {
  (void)err;
  const int64_t n_rows = q.nq * q.lq, n_cent = centroids.rows, dim = q.dim, k = n_probe;
  std::vector<float> qbuf;
  std::vector<int64_t> row_of;  // packed lane -> output row
  const PackedQuery packed = pack_rows(q.data, q.mask, 0, n_rows, dim, qbuf, &row_of);
  if (q.mask != nullptr) {
    // Masked query tokens: scores 0, no centroid ids.
    parallel_for(n_rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (q.mask[r]) continue;
        std::fill(scores + r * n_cent, scores + (r + 1) * n_cent, 0.0f);
        std::fill(top_ids + r * k, top_ids + (r + 1) * k, int64_t(-1));
      }
    });
  }
  const int64_t n_valid = packed.n_valid;
  if (n_valid == 0 || n_cent == 0) return;

  const int max_threads = get_num_threads();
  std::vector<ScoredId> heaps(size_t(max_threads * n_valid * k));
  std::vector<int64_t> heap_size(size_t(max_threads * n_valid), 0);
  // Centroids per staged block: a multiple of every tile height (3, 4, 6, 8, 12) and of 8.
  constexpr int64_t kBlock = 96;

  with_dtype(centroids.dtype, [&](auto tag) {
    constexpr DType T = decltype(tag)::value;
    using E = typename Elem<T>::type;
    const E* base = static_cast<const E*>(centroids.data);
    parallel_each_thread([&](int thread, int n_threads) {
      const int64_t c_begin = n_cent * thread / n_threads;
      const int64_t c_end = n_cent * (thread + 1) / n_threads;
      ScoredId* heap = heaps.data() + thread * n_valid * k;
      int64_t* size = heap_size.data() + thread * n_valid;
      std::vector<float> threshold(size_t(packed.stride), kNegInf);
      std::vector<float> staged(size_t(kBlock * dim));
      std::vector<float> tile(size_t(kBlock * kMaxQueryVecs * W));
      std::vector<float> block_max(size_t(kMaxQueryVecs * W));
      std::vector<float*> out_rows(size_t(kMaxQueryVecs * W));
      for (int64_t c0 = c_begin; c0 < c_end; c0 += kBlock) {
        const int64_t nc = std::min(kBlock, c_end - c0);
        ContiguousRows<T> rows_in{base, dim, c0, c0 + nc};
        const float* rows = nullptr;
        rows_in.next(staged.data(), nc, &rows);
        for (int64_t v0 = 0; v0 < packed.n_vec; v0 += kMaxQueryVecs) {
          const int64_t nv = std::min<int64_t>(kMaxQueryVecs, packed.n_vec - v0);
          const int64_t ld = nv * W;
          const float* qt = packed.qt + v0 * W;
          float* bm = block_max.data();
          switch (nv) {
            case 4: score_tile<4>(qt, packed.stride, rows, nc, dim, tile.data(), ld, bm); break;
            case 3: score_tile<3>(qt, packed.stride, rows, nc, dim, tile.data(), ld, bm); break;
            case 2: score_tile<2>(qt, packed.stride, rows, nc, dim, tile.data(), ld, bm); break;
            default: score_tile<1>(qt, packed.stride, rows, nc, dim, tile.data(), ld, bm); break;
          }
          const int64_t lanes = std::min(ld, n_valid - v0 * W);
          for (int64_t lane = 0; lane < lanes; ++lane)
            out_rows[size_t(lane)] = scores + row_of[size_t(v0 * W + lane)] * n_cent + c0;
          copy_out(tile.data(), ld, nc, lanes, out_rows.data());
          // Top-k: only tokens whose block maximum beats their current k-th best scan their
          // (contiguous, cache-hot) output row, W scores per compare.
          for (int64_t v = 0; v < nv; ++v) {
            float* thr = threshold.data() + (v0 + v) * W;
            for (uint32_t bits = gt_mask(Vec::load(bm + v * W), Vec::load(thr)); bits; bits &= bits - 1) {
              const int64_t lane = v * W + __builtin_ctz(bits);
              if (lane >= lanes) break;
              const int64_t r = v0 * W + lane;
              scan_into_heap(out_rows[size_t(lane)], nc, c0, heap + r * k, k, size + r, thr + (lane - v * W));
            }
          }
        }
      }
    });
  });

  // Merge the per-thread heaps of each token.
  parallel_for(n_valid, 16, [&](int64_t r0, int64_t r1) {
    std::vector<ScoredId> all;
    for (int64_t r = r0; r < r1; ++r) {
      all.clear();
      for (int t = 0; t < max_threads; ++t) {
        const ScoredId* h = heaps.data() + (t * n_valid + r) * k;
        all.insert(all.end(), h, h + heap_size[size_t(t * n_valid + r)]);
      }
      const int64_t keep = std::min<int64_t>(k, int64_t(all.size()));
      std::partial_sort(all.begin(), all.begin() + keep, all.end(), ranks_before);
      int64_t* dst = top_ids + row_of[size_t(r)] * k;
      for (int64_t j = 0; j < k; ++j) dst[j] = j < keep ? all[size_t(j)].id : -1;
    }
  });
}

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
