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
#include <cmath>
#include <functional>
#include <limits>
#include <memory>

#include "maxsim_core.h"
#include "rank_key.h"

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

// ------------------------------------------------------------------ ragged stage 2

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

// Whether cell c's list lies within the IVF's entries (else reports it).
inline bool check_cell(const IvfLists& ivf, int64_t c, KernelError& err) {
  const int64_t begin = ivf.offsets[c], end = ivf.offsets[c + 1];
  if (begin >= 0 && begin <= end && end <= ivf.n_entries) return true;
  err.report("ivf_offsets: cell " + std::to_string(c) + " spans [" + std::to_string(begin) + ", " +
             std::to_string(end) + "), expected non-decreasing offsets within [0, " + std::to_string(ivf.n_entries) +
             "]");
  return false;
}

// Reports IVF entry e, a document outside [0, nd); returns false.
inline bool report_bad_entry(const IvfLists& ivf, int64_t e, int64_t nd, KernelError& err) {
  err.report("ivf_docs: entry " + std::to_string(e) + " is document " + std::to_string(ivf.docs[e]) +
             ", expected [0, " + std::to_string(nd) + ")");
  return false;
}

// Candidates of one query: the live documents of its probed IVF cells, each once, in the order
// the cells list them. `seen` is a zeroed bitmap of nd bits, left zeroed (only the words set here
// are cleared: O(entries), not O(nd), per query).
inline bool gather_cells(const IvfLists& ivf, const int64_t* probed, int64_t n_probed, const uint8_t* live,
                         int64_t nd, std::vector<int64_t>& cells, std::vector<uint64_t>& seen,
                         std::vector<int32_t>& out, KernelError& err) {
  cells.clear();
  for (int64_t j = 0; j < n_probed; ++j) {
    const int64_t c = probed[j];
    if (c == -1) continue;
    if (c < 0 || c >= ivf.n_cells) {
      err.report("probed: centroid id " + std::to_string(c) + " out of range, expected -1 or [0, " +
                 std::to_string(ivf.n_cells) + ")");
      return false;
    }
    cells.push_back(c);
  }
  std::sort(cells.begin(), cells.end());
  cells.erase(std::unique(cells.begin(), cells.end()), cells.end());
  int64_t total = 0;
  for (const int64_t c : cells) {
    if (!check_cell(ivf, c, err)) return false;
    total += ivf.offsets[c + 1] - ivf.offsets[c];
  }
  out.resize(size_t(total));
  int64_t n = 0;
  for (const int64_t c : cells) {
    for (int64_t e = ivf.offsets[c]; e < ivf.offsets[c + 1]; ++e) {
      const uint32_t d = uint32_t(ivf.docs[e]);
      if (int64_t(d) >= nd) {
        for (int64_t j = 0; j < n; ++j) seen[uint32_t(out[size_t(j)]) >> 6] = 0;
        return report_bad_entry(ivf, e, nd, err);
      }
      // Branch-free: the slot is written always and kept only for a live document not seen yet
      // (lists overlap: a document has tokens in several probed cells).
      uint64_t& word = seen[d >> 6];
      const uint64_t bit = uint64_t(1) << (d & 63);
      const bool fresh = !(word & bit) && (live == nullptr || live[d]);
      word |= fresh ? bit : 0;
      out[size_t(n)] = int32_t(d);
      n += fresh;
    }
  }
  out.resize(size_t(n));
  for (const int32_t d : out) seen[uint32_t(d) >> 6] = 0;
  return true;
}

// score(q, D) = sum over valid lanes of max over kept tokens of table[code]; -inf: no kept token.
// The NV running-max vectors stay in registers. (A branch-free variant, pruned tokens maxing a
// row of -inf, measured 25% slower on SciFact: ~1 token in 9 is kept, and loads dominate.)
// *bad: some code is outside [0, n_centroids) (its row is never read).
template <int NV, class Code>
EP_INLINE float interaction_score(const Code* codes, int64_t begin, int64_t end, const uint8_t* keep,
                                  const float* table, int64_t stride, int64_t n_valid, int64_t n_centroids,
                                  bool* bad) {
  Vec best[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) best[v] = Vec::set1(kNegInf);
  uint32_t any = 0;
  bool oob = false;
  for (int64_t t = begin; t < end; ++t) {
    const uint64_t code = uint64_t(int64_t(codes[t]));
    const bool in = code < uint64_t(n_centroids);
    oob |= !in;
    const uint64_t c = in ? code : 0;
    const uint32_t kept = uint32_t(keep[c]) & uint32_t(in);
    any |= kept;
    if (!kept) continue;
    const float* row = table + int64_t(c) * stride;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) best[v] = max(best[v], Vec::load(row + v * W));
  }
  *bad = oob;
  if (!any) return kNegInf;
  float lanes[NV * W];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) best[v].store(lanes + v * W);
  float s = 0.0f;
  for (int64_t i = 0; i < n_valid; ++i) s += lanes[i];
  return s;
}

// interaction_score for any lane count (more than kMaxLaneVecs vectors of query tokens).
template <class Code>
inline float interaction_score_any(const Code* codes, int64_t begin, int64_t end, const uint8_t* keep,
                                   const float* table, int64_t stride, int64_t n_lanes, int64_t n_valid,
                                   int64_t n_centroids, float* best, bool* bad) {
  for (int64_t i = 0; i < n_lanes; i += W) Vec::set1(kNegInf).store(best + i);
  bool any = false;
  *bad = false;
  for (int64_t t = begin; t < end; ++t) {
    const uint64_t code = uint64_t(int64_t(codes[t]));
    if (code >= uint64_t(n_centroids)) {
      *bad = true;
      return kNegInf;
    }
    if (!keep[code]) continue;
    any = true;
    const float* row = table + int64_t(code) * stride;
    for (int64_t i = 0; i < n_lanes; i += W) max(Vec::load(best + i), Vec::load(row + i)).store(best + i);
  }
  if (!any) return kNegInf;
  float s = 0.0f;
  for (int64_t i = 0; i < n_valid; ++i) s += best[i];
  return s;
}

// Register tiles cover up to 32 lanes (a 32-token query: ColBERT's default query length).
constexpr int64_t kMaxLaneVecs = (32 + W - 1) / W;

// One document's score for codes stored as Code; lanes: the query's lanes (a multiple of W).
template <class Code>
inline float document_interaction(const Code* codes, int64_t begin, int64_t end, const uint8_t* keep,
                                  const float* table, int64_t stride, int64_t n_lanes, int64_t n_valid,
                                  int64_t n_centroids, float* best, bool* bad) {
  switch (kMaxLaneVecs >= n_lanes / W ? n_lanes / W : 0) {
    case 1: return interaction_score<1>(codes, begin, end, keep, table, stride, n_valid, n_centroids, bad);
    case 2: return interaction_score<2>(codes, begin, end, keep, table, stride, n_valid, n_centroids, bad);
    case 3:
      if constexpr (kMaxLaneVecs >= 3)
        return interaction_score<3>(codes, begin, end, keep, table, stride, n_valid, n_centroids, bad);
      [[fallthrough]];
    case 4:
      if constexpr (kMaxLaneVecs >= 4)
        return interaction_score<4>(codes, begin, end, keep, table, stride, n_valid, n_centroids, bad);
      [[fallthrough]];
    default:
      return interaction_score_any(codes, begin, end, keep, table, stride, n_lanes, n_valid, n_centroids, best, bad);
  }
}

// The n_keep best keys, best first: a higher score, then a lower id (a pruned document, -inf,
// ranks after every scored one but still before padding); -1 / -inf past the candidates.
inline void select_best(std::vector<RankKey>& keys, int64_t n_keep, int64_t* ids, float* scores) {
  const int64_t nc = int64_t(keys.size()), kept = std::min(n_keep, nc);
  if (kept > 0 && kept < nc) std::nth_element(keys.begin(), keys.begin() + (kept - 1), keys.end(), std::greater<RankKey>());
  std::sort(keys.begin(), keys.begin() + kept, std::greater<RankKey>());
  for (int64_t j = 0; j < n_keep; ++j) {
    ids[j] = j < kept ? key_id(keys[size_t(j)]) : -1;
    scores[j] = j < kept ? key_score(keys[size_t(j)]) : kNegInf;
  }
}

// Stage 2 centroid by centroid, for when the kept centroids' IVF lists are shorter than the
// candidates' tokens (with PLAID's threshold on SciFact: ~37k list entries against ~370k tokens a
// query). A document's score only needs, per kept centroid it holds, that centroid's row once: the
// max over its kept tokens equals the max over the distinct kept centroids among them, and those
// are exactly the kept cells whose IVF list names the document. So each kept centroid's row is
// loaded into registers once and maxed into the state of every candidate in its list; the
// candidates' codes are never read. Same maxima, same summation order: the same scores, bit for
// bit, as the token loop.
//   state (nc + kSpareRows, NV * W): running maxima, -inf (rows nc..: spares for the other
//   documents); touched (nc + kSpareRows,): candidate j holds a kept centroid;
//   slot_of (nd,): a document's candidate index, -1 otherwise.
constexpr int64_t kSpareRows = 8;
// When one query's kept centroids are split across the pool, each part needs this many list
// entries, and this many per row of its state (a part's fixed cost is its state's fill and its
// share of the merge, ~nc + kSpareRows row operations; SciFact: 36k entries, 1.5k candidates).
constexpr int64_t kEntriesPerPart = 4096;
constexpr int64_t kEntriesPerRow = 4;

// NV > 0: that many lane vectors, the kept row held in registers (reading it from L1 at each
// update measured 25% slower on SciFact); NV == 0: nv_arg of them, the row read from memory.
template <int NV>
inline void interaction_by_centroid(const int32_t* kept, int64_t n_kept, const IvfLists& ivf, int64_t nd,
                                    const int32_t* slot_of, int64_t n_slots, const float* table, int64_t stride,
                                    int64_t nv_arg, float* state, uint8_t* touched, KernelError& err) {
  const int64_t nv = NV > 0 ? NV : nv_arg;
  for (int64_t k = 0; k < n_kept && !err.set(); ++k) {
    const int32_t c = kept[k];
    const float* row = table + int64_t(c) * stride;
    Vec reg[NV > 0 ? NV : 1];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) reg[v] = Vec::load(row + v * W);
    for (int64_t e = ivf.offsets[c]; e < ivf.offsets[c + 1]; ++e) {
      const uint32_t d = uint32_t(ivf.docs[e]);
      if (int64_t(d) >= nd) {
        report_bad_entry(ivf, e, nd, err);
        return;
      }
      // Branch-free: a document that is not a candidate updates one of kSpareRows rows past the
      // last candidate's (a list holds about as many of those as candidates: an unpredictable
      // branch; one spare row would chain every such update through store-to-load forwarding).
      const int32_t slot = slot_of[d];
      const int64_t j = slot < 0 ? n_slots + (d & (kSpareRows - 1)) : slot;
      float* st = state + j * nv * W;
      if constexpr (NV > 0) {
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) max(Vec::load(st + v * W), reg[v]).store(st + v * W);
      } else {
        for (int64_t v = 0; v < nv; ++v) max(Vec::load(st + v * W), Vec::load(row + v * W)).store(st + v * W);
      }
      touched[j] = 1;
    }
  }
}

// A thread's bitmap of nd bits, zero between uses (gather_cells clears the words it sets): no
// O(nd) allocation or clearing per query.
inline std::vector<uint64_t>& seen_bitmap(int64_t nd) {
  static thread_local std::vector<uint64_t> seen;
  if (int64_t(seen.size()) < nd / 64 + 1) seen.resize(size_t(nd / 64 + 1), 0);
  return seen;
}

// A thread's (nd,) map from document to candidate index, -1 everywhere between uses (each use
// resets the entries it set: O(candidates), not O(nd), a query).
inline std::vector<int32_t>& slot_map(int64_t nd) {
  static thread_local std::vector<int32_t> slots;
  if (int64_t(slots.size()) < nd) slots.resize(size_t(nd), -1);
  return slots;
}

void centroid_interaction_topk(const ScoreTable& scores, const float* centroid_max, const uint8_t* queries_mask,
                               const Ids& codes, const int64_t* offsets, int64_t nd, const IvfLists& ivf,
                               const int64_t* probed, int64_t n_probed, const uint8_t* live, const float* threshold,
                               int64_t n_keep, int64_t* out_ids, float* out_scores, KernelError& err) {
  const int64_t nq = scores.nq, lq = scores.lq, n_centroids = scores.n_centroids, stride = scores.stride;
  // One query a thread when there are enough queries (no hand-off inside a query); else the
  // query's candidates are split across the pool.
  const bool per_query = nq >= parallel_width();
  const auto run_query = [&](int64_t qi) {
    int64_t n_valid = 0;
    for (int64_t i = 0; i < lq; ++i) n_valid += (queries_mask == nullptr || queries_mask[qi * lq + i]) ? 1 : 0;
    const int64_t n_lanes = std::max<int64_t>(1, (n_valid + W - 1) / W) * W;
    const float* table = scores.data + qi * n_centroids * stride;
    // keep[c]: no threshold, or the centroid's best score over the valid tokens >= threshold (a
    // query without valid tokens prunes nothing: every document scores 0, as the reference).
    std::vector<uint8_t> keep(size_t(n_centroids), uint8_t(1));
    if (threshold != nullptr && n_valid > 0) {
      const float thr = *threshold;
      const float below = std::nextafter(thr, -std::numeric_limits<float>::infinity());
      const auto mark = [&](int64_t c0, int64_t c1) {
        if (centroid_max != nullptr) {
          const float* cm = centroid_max + qi * n_centroids;
          for (int64_t c = c0; c < c1; ++c) keep[size_t(c)] = cm[c] >= thr;
          return;
        }
        for (int64_t c = c0; c < c1; ++c) {
          uint32_t any = 0;
          for (int64_t v = 0; v * W < n_valid; ++v) {
            const int64_t lanes = std::min<int64_t>(W, n_valid - v * W);
            const uint32_t valid_lanes = lanes >= 32 ? ~0u : (1u << lanes) - 1u;
            any |= gt_mask(Vec::load(table + c * stride + v * W), Vec::set1(below)) & valid_lanes;
          }
          keep[size_t(c)] = any != 0;
        }
      };
      if (per_query || centroid_max != nullptr)
        mark(0, n_centroids);
      else
        parallel_for(n_centroids, std::max<int64_t>(1024, (int64_t(1) << 17) / stride), mark);
    }
    std::vector<int64_t> cells;
    std::vector<uint64_t>& seen = seen_bitmap(nd);
    std::vector<int32_t> cand;
    if (!gather_cells(ivf, probed + qi * n_probed, n_probed, live, nd, cells, seen, cand, err)) return;
    const int64_t nc = int64_t(cand.size());
    std::vector<RankKey> keys(static_cast<size_t>(nc));
    // Centroid by centroid when the kept centroids' lists are shorter than the candidates' tokens.
    const int64_t nv = n_lanes / W;
    if (threshold != nullptr && n_valid > 0 && nc > 0) {
      std::vector<int32_t> kept;
      int64_t entries = 0, tokens = 0;
      for (int64_t c = 0; c < n_centroids; ++c)
        if (keep[size_t(c)]) {
          kept.push_back(int32_t(c));
          entries += ivf.offsets[c + 1] - ivf.offsets[c];
        }
      for (const int32_t d : cand) {
        int64_t begin = 0, end = 0;
        if (!doc_range(offsets, d, codes.n, &begin, &end, err)) return;
        tokens += end - begin;
      }
      for (const int64_t c : kept)
        if (!check_cell(ivf, c, err)) return;
      if (entries < tokens) {
        std::vector<int32_t>& slot_of = slot_map(nd);
        for (int64_t j = 0; j < nc; ++j) slot_of[size_t(cand[size_t(j)])] = int32_t(j);
        // One query alone: the kept centroids split across the pool by list entries, each part
        // maxing into its own state (the updates are scattered loads and stores that one thread
        // cannot overlap: 36k of them took 0.33 ms on one Zen 2 thread); the parts' maxima are
        // merged below. Max is exact and order-free: the same scores, bit for bit.
        const int64_t rows = nc + kSpareRows, row_floats = nv * W;
        // A part costs its state's fill and its share of the merge, ~rows row operations: worth
        // it when its entries are several times that (and at most one part per kept centroid).
        const int64_t worth = std::min(entries / kEntriesPerPart, entries / (kEntriesPerRow * rows));
        const int64_t n_parts =
            per_query ? 1 : std::clamp<int64_t>(std::min<int64_t>(worth, int64_t(kept.size())), 1, parallel_width());
        std::vector<int64_t> cut(size_t(n_parts + 1), int64_t(kept.size()));
        cut[0] = 0;
        for (int64_t k = 0, p = 1, seen_entries = 0; k < int64_t(kept.size()) && p < n_parts; ++k) {
          seen_entries += ivf.offsets[kept[size_t(k)] + 1] - ivf.offsets[kept[size_t(k)]];
          if (seen_entries * n_parts >= entries * p) cut[size_t(p++)] = k + 1;
        }
        // Uninitialised: each part fills its own state with -inf, on its own thread.
        const std::unique_ptr<float[]> state(new float[size_t(n_parts * rows * row_floats)]);
        std::vector<uint8_t> touched(size_t(n_parts * rows), 0);
        const auto run_part = [&](int64_t p) {
          float* st = state.get() + p * rows * row_floats;
          std::fill(st, st + rows * row_floats, kNegInf);
          const int32_t* ks = kept.data() + cut[size_t(p)];
          const int64_t nk = cut[size_t(p + 1)] - cut[size_t(p)];
          uint8_t* tp = touched.data() + p * rows;
          const auto run = [&](auto nv_const) {
            constexpr int NV = decltype(nv_const)::value;
            interaction_by_centroid<NV>(ks, nk, ivf, nd, slot_of.data(), nc, table, stride, nv, st, tp, err);
          };
          switch (nv) {
            case 1: run(std::integral_constant<int, 1>{}); break;
            case 2: run(std::integral_constant<int, 2>{}); break;
            case 3: run(std::integral_constant<int, 3>{}); break;
            case 4: run(std::integral_constant<int, 4>{}); break;
            default: run(std::integral_constant<int, 0>{});
          }
        };
        if (n_parts == 1)
          run_part(0);
        else
          parallel_for(n_parts, 1, [&](int64_t p0, int64_t p1) {
            for (int64_t p = p0; p < p1; ++p) run_part(p);
          });
        for (const int32_t d : cand) slot_of[size_t(d)] = -1;
        if (err.set()) return;
        // The parts' rows maxed lane vector by lane vector, then summed lane by lane in order (the
        // single state's sum, bit for bit); candidates split across the pool when there are parts.
        const auto merge = [&](int64_t j0, int64_t j1) {
          std::vector<float> merged(static_cast<size_t>(row_floats));
          for (int64_t j = j0; j < j1; ++j) {
            bool any = false;
            for (int64_t p = 0; p < n_parts; ++p) any |= touched[size_t(p * rows + j)] != 0;
            float sc = kNegInf;
            if (any) {
              const float* st = state.get() + j * row_floats;
              for (int64_t v = 0; v < nv; ++v) {
                Vec m = Vec::load(st + v * W);
                for (int64_t p = 1; p < n_parts; ++p) m = max(m, Vec::load(st + p * rows * row_floats + v * W));
                m.store(merged.data() + v * W);
              }
              sc = 0.0f;
              for (int64_t i = 0; i < n_valid; ++i) sc += merged[size_t(i)];
            }
            keys[size_t(j)] = rank_key(sc, cand[size_t(j)]);
          }
        };
        if (n_parts == 1)
          merge(0, nc);
        else
          parallel_for(nc, grain_for(nc, 64), merge);
        select_best(keys, n_keep, out_ids + qi * n_keep, out_scores + qi * n_keep);
        return;
      }
    }
    const auto score_range = [&](int64_t j0, int64_t j1) {
      std::vector<float> best(static_cast<size_t>(n_lanes));
      for (int64_t j = j0; j < j1 && !err.set(); ++j) {
        const int64_t doc = cand[size_t(j)];
        int64_t begin = 0, end = 0;
        if (!doc_range(offsets, doc, codes.n, &begin, &end, err)) return;
        if (j + 2 < j1) {  // the candidates are scattered: ask for a later one's codes now
          const int64_t ahead = offsets[cand[size_t(j + 2)]];
          if (ahead >= 0 && ahead < codes.n)
            prefetch_bytes(static_cast<const uint8_t*>(codes.data) + ahead * codes.bytes, 256);
        }
        bool bad = false;
        float s;
        switch (codes.bytes) {
          case 2:
            s = document_interaction(static_cast<const uint16_t*>(codes.data), begin, end, keep.data(), table, stride,
                                     n_lanes, n_valid, n_centroids, best.data(), &bad);
            break;
          case 4:
            s = document_interaction(static_cast<const int32_t*>(codes.data), begin, end, keep.data(), table, stride,
                                     n_lanes, n_valid, n_centroids, best.data(), &bad);
            break;
          default:
            s = document_interaction(static_cast<const int64_t*>(codes.data), begin, end, keep.data(), table, stride,
                                     n_lanes, n_valid, n_centroids, best.data(), &bad);
        }
        if (bad) {
          for (int64_t t = begin; t < end; ++t)
            if (codes[t] < 0 || codes[t] >= n_centroids) {
              report_bad_code(err, t, codes[t], n_centroids);
              return;
            }
        }
        keys[size_t(j)] = rank_key(s, doc);
      }
    };
    if (per_query)
      score_range(0, nc);
    else
      parallel_for(nc, grain_for(nc, 32), score_range);
    if (err.set()) return;
    select_best(keys, n_keep, out_ids + qi * n_keep, out_scores + qi * n_keep);
  };
  if (per_query)
    parallel_for(nq, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t qi = q0; qi < q1 && !err.set(); ++qi) run_query(qi);
    });
  else
    for (int64_t qi = 0; qi < nq && !err.set(); ++qi) run_query(qi);
}

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
