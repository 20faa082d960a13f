// centroid_interaction: PLAID stages 2-3. Each document token is replaced by its centroid's
// score: for query q and candidate document D,
//   score(q, D) = sum over valid query tokens i of  max over kept tokens j of D  S[q, i, code_j]
// where S = centroid_scores and token j is kept when threshold is null or max over valid i of
// S[q, i, code_j] >= threshold (PLAID's centroid pruning). No kept token: -inf; no valid query
// token: 0; candidate -1: -inf.
//
// The scores are read centroid-major, (n_centroids, lanes) per query, so that one token costs
// n_vec vector max operations on a contiguous row instead of lq strided loads: a centroid-major
// ScoreTable is used in place; a token-major one is transposed once per query (its valid tokens
// compacted into the lanes). Pruning decides each centroid once per query, in a sequential pass.
#pragma once
#include "maxsim_core.h"

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

void centroid_interaction(const ScoreTable& scores, const uint8_t* queries_mask, const Ids& codes,
                          const int64_t* offsets, int64_t nd, const Candidates& cand, const float* threshold,
                          float* out, KernelError& err) {
  const int64_t nq = scores.nq, lq = scores.lq, n_centroids = scores.n_centroids;
  const int64_t nc = cand.ids == nullptr ? nd : cand.nc;
  std::vector<float> fallback;
  std::vector<uint8_t> keep(static_cast<size_t>(n_centroids));
  std::vector<int64_t> valid;
  for (int64_t qi = 0; qi < nq && !err.set(); ++qi) {
    valid.clear();
    for (int64_t i = 0; i < lq; ++i)
      if (queries_mask == nullptr || queries_mask[qi * lq + i]) valid.push_back(qi * lq + i);
    const int64_t n_valid = int64_t(valid.size());
    const int64_t n_lanes = std::max<int64_t>(1, (n_valid + W - 1) / W) * W;  // lanes the loops visit
    // keep[c]: some valid lane scores >= threshold, i.e. > the next float below it (NaN never
    // passes): one vector compare per W lanes instead of a scalar max over them. A sequential
    // pass over the rows: deciding at a token's first visit instead reads ~every row at random.
    const Vec below = Vec::set1(
        threshold == nullptr ? 0.0f : std::nextafter(*threshold, -std::numeric_limits<float>::infinity()));
    const auto mark_kept = [&](const float* table, int64_t stride, int64_t c0, int64_t c1) {
      if (threshold == nullptr) {
        std::fill(keep.begin() + c0, keep.begin() + c1, uint8_t(1));
        return;
      }
      for (int64_t c = c0; c < c1; ++c) {
        uint32_t any = 0;
        for (int64_t v = 0; v * W < n_valid; ++v) {
          const int64_t lanes = std::min<int64_t>(W, n_valid - v * W);
          const uint32_t valid_lanes = lanes >= 32 ? ~0u : (1u << lanes) - 1u;
          any |= gt_mask(Vec::load(table + c * stride + v * W), below) & valid_lanes;
        }
        keep[size_t(c)] = any != 0;
      }
    };
    const float* table = nullptr;
    int64_t stride = 0;
    if (scores.stride > 0) {  // centroid-major: in place (its lanes are the valid tokens, compacted)
      table = scores.data + qi * n_centroids * scores.stride;
      stride = scores.stride;
      parallel_for(n_centroids, std::max<int64_t>(1024, (int64_t(1) << 17) / stride),
                   [&](int64_t c0, int64_t c1) { mark_kept(table, stride, c0, c1); });
    } else {
      stride = n_lanes;
      float* const buf = call_buffer(n_centroids * stride, fallback);  // every element written below
      std::vector<const float*> src(static_cast<size_t>(n_valid));
      for (int64_t j = 0; j < n_valid; ++j) src[size_t(j)] = scores.data + valid[size_t(j)] * n_centroids;
      // ~512 KiB of table per task: a smaller table is filled inline (waking the pool costs more).
      parallel_for(n_centroids, std::max<int64_t>(1024, (int64_t(1) << 17) / stride), [&](int64_t c0, int64_t c1) {
        transpose_rows(src.data(), n_valid, c0, c1, buf, stride);
        mark_kept(buf, stride, c0, c1);  // while the rows are in cache
      });
      table = buf;
    }
    parallel_for(nc, grain_for(nc, 32), [&](int64_t j0, int64_t j1) {
      std::vector<float> best_buf(static_cast<size_t>(n_lanes));
      float* best = best_buf.data();
      for (int64_t j = j0; j < j1 && !err.set(); ++j) {
        float* dst = out + qi * nc + j;
        const int64_t doc = cand.ids == nullptr ? j : cand.ids[qi * nc + j];
        if (doc == -1) {
          *dst = kNegInf;
          continue;
        }
        if (doc < 0 || doc >= nd) {
          err.report("candidates: id " + std::to_string(doc) + " out of range, expected -1 or [0, " +
                     std::to_string(nd) + ")");
          return;
        }
        int64_t begin = 0, end = 0;
        if (!doc_range(offsets, doc, codes.n, &begin, &end, err)) return;
        for (int64_t i = 0; i < n_lanes; i += W) Vec::set1(kNegInf).store(best + i);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t code = codes[t];
          if (code < 0 || code >= n_centroids) {
            report_bad_code(err, t, code, n_centroids);
            return;
          }
          if (!keep[size_t(code)]) continue;
          const float* row = table + code * stride;
          for (int64_t i = 0; i < n_lanes; i += W) max(Vec::load(best + i), Vec::load(row + i)).store(best + i);
        }
        float s = 0.0f;
        for (int64_t i = 0; i < n_valid; ++i) s += best[i];
        *dst = s;
      }
    });
  }
}

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
