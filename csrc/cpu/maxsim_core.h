// The MaxSim micro-kernel shared by maxsim, maxsim_packed, fused_decompress_maxsim and
// centroid_scores. Included by per-ISA translation units after simd.h.
//
// Layout. Query tokens sit on the vector lanes: a query is packed once, transposed, as
//   qt[d * stride + i] = q[i][d]      (stride = n_vec * W; lanes past n_valid are zero)
// and document tokens are rows of fp32 that the kernel broadcasts one element at a time. A
// register tile holds NT document tokens x NQV query vectors of dot products; the running
// max over document tokens is lane-wise, so there is no horizontal reduction and the
// (query tokens x document tokens) score matrix never exists in memory.
//
// Summation order over `dim` is sequential on every ISA, so with the scalar path's fmaf the
// three ISAs return bit-identical scores.
#pragma once
#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "parallel.h"
#include "simd.h"

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

constexpr int W = Vec::W;
constexpr int kMaxQueryVecs = 4;  // query vectors per register tile

// One query's valid tokens, packed for the micro-kernel.
struct PackedQuery {
  const float* qt;  // [dim][stride]
  int64_t n_valid;  // valid (unmasked) tokens, compacted to lanes [0, n_valid)
  int64_t n_vec;    // ceil(n_valid / W)
  int64_t stride;   // n_vec * W
  int64_t dim;
};

// Calls f with the storage type as a compile-time constant.
template <class F>
EP_INLINE void with_dtype(DType t, F&& f) {
  switch (t) {
    case DType::f32: f(std::integral_constant<DType, DType::f32>{}); break;
    case DType::f16: f(std::integral_constant<DType, DType::f16>{}); break;
    case DType::bf16: f(std::integral_constant<DType, DType::bf16>{}); break;
  }
}

// Packs the valid tokens of rows [first, first + count) of a (rows, dim) fp32 matrix, where
// row r is valid when mask is null or mask[r] != 0. `rows_of` (optional) receives the
// original row index of each packed lane.
inline PackedQuery pack_rows(const float* data, const uint8_t* mask, int64_t first, int64_t count,
                             int64_t dim, std::vector<float>& buf,
                             std::vector<int64_t>* rows_of = nullptr) {
  int64_t n_valid = 0;
  for (int64_t r = first; r < first + count; ++r) n_valid += (mask == nullptr || mask[r]) ? 1 : 0;
  const int64_t n_vec = (n_valid + W - 1) / W;
  const int64_t stride = n_vec * W;
  buf.assign(size_t(stride * dim), 0.0f);
  if (rows_of) rows_of->clear();
  int64_t lane = 0;
  for (int64_t r = first; r < first + count; ++r) {
    if (mask != nullptr && !mask[r]) continue;
    const float* src = data + r * dim;
    for (int64_t d = 0; d < dim; ++d) buf[size_t(d * stride + lane)] = src[d];
    if (rows_of) rows_of->push_back(r);
    ++lane;
  }
  return PackedQuery{buf.data(), n_valid, n_vec, stride, dim};
}

// acc[t][v] = sum_d qt[d][v*W : (v+1)*W] * rows[t][d]
//
// The loop order inside one d keeps every live value in a register: NT*NQV accumulators plus
// either the NQV query vectors (hoisted; one broadcast at a time) or the NT broadcasts
// (hoisted; one query vector at a time), whichever fits the register file. Spilling an
// accumulator puts a store-to-load round trip on its FMA chain: the AVX-512 NQV=2 tile
// (24 accumulators + 12 broadcasts) measured 52% of peak that way, 2 in 3 of what it reaches
// with the query vectors hoisted.
//
// DIM > 0 fixes dim at compile time: the NT broadcast addresses are then one pointer plus
// immediate offsets, instead of NT row pointers that do not all fit the integer registers
// (their spills and reloads cost ~10% of the AVX-512 tile's rate).
//
// kAccumulate adds to acc as given instead of starting from zero.
template <int NQV, int NT, int DIM = 0, bool kAccumulate = false>
EP_INLINE void dot_tile(const float* qt, int64_t qstride, const float* rows, int64_t dim_arg,
                        Vec (&acc)[NT][NQV]) {
  const int64_t dim = DIM > 0 ? DIM : dim_arg;
  constexpr bool kHoistQuery = NT * NQV + NQV + 1 <= Vec::kRegs;
  if constexpr (!kAccumulate) {
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t)
#pragma GCC unroll 8
      for (int v = 0; v < NQV; ++v) acc[t][v] = Vec::zero();
  }
  for (int64_t d = 0; d < dim; ++d) {
    const float* q = qt + d * qstride;
    if constexpr (kHoistQuery) {
      Vec qv[NQV];
#pragma GCC unroll 8
      for (int v = 0; v < NQV; ++v) qv[v] = Vec::load(q + v * W);
#pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) {
        const Vec b = Vec::set1(rows[t * dim + d]);
#pragma GCC unroll 8
        for (int v = 0; v < NQV; ++v) acc[t][v] = fmadd(qv[v], b, acc[t][v]);
      }
    } else {
      Vec b[NT];
#pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) b[t] = Vec::set1(rows[t * dim + d]);
#pragma GCC unroll 8
      for (int v = 0; v < NQV; ++v) {
        const Vec qv = Vec::load(q + v * W);
#pragma GCC unroll 16
        for (int t = 0; t < NT; ++t) acc[t][v] = fmadd(qv, b[t], acc[t][v]);
      }
    }
  }
}

template <int NQV>
constexpr int tile_rows() {
  return Vec::kAccRegs / NQV > 0 ? Vec::kAccRegs / NQV : 1;
}

// Sweeps rows through the micro-kernel for NQV query vectors, keeping the running max
//   best[v*W + lane] = max(best, max_t <query lane of vector v, rows[t]>).
//
// A remainder of fewer than NT rows is swept as one more full tile over the last NT rows:
// rows seen twice change no max, and a full tile runs at
// the micro-kernel's rate where a one-row tile is bound by FMA latency (4x slower per row).
template <int NQV, int DIM>
EP_INLINE void sweep_rows_dim(const float* qt, int64_t qstride, const float* rows, int64_t n_rows,
                              int64_t dim, float* best) {
  constexpr int NT = tile_rows<NQV>();
  Vec m[NQV];
#pragma GCC unroll 8
  for (int v = 0; v < NQV; ++v) m[v] = Vec::load(best + v * W);
  // Non-finite document values: a row holding NaN or inf makes its dot products NaN or inf, and
  // acc * 0 NaN in every lane. That poison is added to the first query vector's maxima, and the
  // max keeps a NaN once there (max(x, m) returns its second operand, m, when either is NaN), so
  // the document scores NaN as in the reference; the op then raises naming the argument. The
  // cost is one multiply-add per row against NQV * dim for the dot products.
  auto fold = [&](auto& acc, int rows_in_tile) {
    Vec poison = acc[0][0] * Vec::zero();
    for (int r = 1; r < rows_in_tile; ++r) poison = fmadd(acc[r][0], Vec::zero(), poison);
    for (int r = 0; r < rows_in_tile; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NQV; ++v) m[v] = max(acc[r][v], m[v]);
    m[0] = m[0] + poison;
  };
  int64_t t = 0;
  for (; t + NT <= n_rows; t += NT) {
    Vec acc[NT][NQV];
    dot_tile<NQV, NT, DIM>(qt, qstride, rows + t * dim, dim, acc);
    fold(acc, NT);
  }
  if (t < n_rows && n_rows >= NT) {
    Vec acc[NT][NQV];
    dot_tile<NQV, NT, DIM>(qt, qstride, rows + (n_rows - NT) * dim, dim, acc);
    fold(acc, NT);
    t = n_rows;
  }
  for (; t < n_rows; ++t) {
    Vec acc[1][NQV];
    dot_tile<NQV, 1, DIM>(qt, qstride, rows + t * dim, dim, acc);
    fold(acc, 1);
  }
#pragma GCC unroll 8
  for (int v = 0; v < NQV; ++v) m[v].store(best + v * W);
}

// Calls f(std::integral_constant<int, DIM>{}) with DIM = dim for the widths of the models
// edgeplaid serves (48, 64 and 128: mxbai-edge-colbert, ColBERTv2), else DIM = 0 (dim read at run
// time): the sweeps' addresses are then one pointer plus immediate offsets (dot_tile).
template <class F>
EP_INLINE void with_fixed_dim(int64_t dim, F&& f) {
  switch (dim) {
    case 48: f(std::integral_constant<int, 48>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

template <int NQV>
EP_INLINE void sweep_rows(const float* qt, int64_t qstride, const float* rows, int64_t n_rows, int64_t dim,
                          float* best) {
  with_fixed_dim(dim, [&](auto d) { sweep_rows_dim<NQV, decltype(d)::value>(qt, qstride, rows, n_rows, dim, best); });
}

// Calls f(std::integral_constant<int, nv>{}) for a query-vector count nv in [1, kMaxQueryVecs].
template <class F>
EP_INLINE void with_query_vecs(int64_t nv, F&& f) {
  switch (nv) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// Folds n_rows document tokens into one query's running maxima best[0 : q.stride].
inline void max_rows(const PackedQuery& q, const float* rows, int64_t n_rows, float* best) {
  for (int64_t v0 = 0; v0 < q.n_vec; v0 += kMaxQueryVecs) {
    with_query_vecs(std::min<int64_t>(kMaxQueryVecs, q.n_vec - v0), [&](auto nqv) {
      sweep_rows<decltype(nqv)::value>(q.qt + v0 * W, q.stride, rows, n_rows, q.dim, best + v0 * W);
    });
  }
}

// Score = sum of the running maxima over valid query tokens, in token order. An empty
// document leaves them at -inf (score -inf); a query with no valid token scores 0.
inline float sum_best(const PackedQuery& q, const float* best) {
  float s = 0.0f;
  for (int64_t i = 0; i < q.n_valid; ++i) s += best[i];
  return s;
}

// Asks for bytes [p, p + n) to be brought into the caches ahead of use. Chunks are staged
// while the previous one is being scored, so DRAM/L3 latency hides behind the FMAs instead of
// stalling the staging copy (the hardware prefetcher starts late on every new document).
EP_INLINE void prefetch_bytes(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(c + i, 0, 3);
}

// prefetch_bytes into L2 only (prefetcht1): for a whole next document, whose ~100 lines would
// overflow the L1's miss buffers (prefetches past them are dropped or stall).
EP_INLINE void prefetch_bytes_l2(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(c + i, 0, 2);
}

// Rows staged per chunk: fits L1/L2 and is reused by every query scored against it.
inline int64_t chunk_rows(int64_t dim) { return std::max<int64_t>(16, 8192 / std::max<int64_t>(dim, 1)); }

// A float buffer of at least n elements for one kernel call: the calling thread's cached one
// (kept across calls: a fresh multi-MiB buffer is mmapped and its pages zeroed by the kernel on
// first touch, every call: ~15% of a reranking call) up to 32 MiB, else `fallback`, which the
// caller keeps alive. Pass the returned pointer to the pool's threads: a thread_local named in
// their lambdas would be their own, empty, one.
inline float* call_buffer(int64_t n, std::vector<float>& fallback) {
  constexpr int64_t kCached = int64_t(1) << 23;
  static thread_local std::vector<float> cached;
  n = std::max<int64_t>(n, 1);
  if (n <= kCached) {
    if (cached.size() < size_t(n)) cached.resize(size_t(n));
    return cached.data();
  }
  fallback.resize(size_t(n));
  return fallback.data();
}

// Scratch reused by one thread across calls.
struct Scratch {
  std::vector<float> rows;  // staged fp32 document tokens
  std::vector<float> best;  // running maxima, one stride per query
};
inline Scratch& thread_scratch() {
  static thread_local Scratch s;
  return s;
}

// Scores one document, delivered by `stream` in chunks of fp32 rows, against queries
// qs[0 : n_queries]; writes out[k * out_stride].
//   stream.next(float* buf, int64_t cap, const float** rows) -> rows delivered (0 at the end);
//   *rows points either into buf or straight at fp32 storage;
//   stream.prefetch(int64_t cap) asks for the storage of the next chunk of up to cap rows.
template <class Stream>
void score_document(Stream& stream, const PackedQuery* qs, int64_t n_queries, float* out,
                    int64_t out_stride) {
  Scratch& s = thread_scratch();
  int64_t max_stride = 0;
  for (int64_t k = 0; k < n_queries; ++k) max_stride = std::max(max_stride, qs[k].stride);
  s.best.assign(size_t(std::max<int64_t>(1, max_stride * n_queries)), kNegInf);
  const int64_t dim = n_queries > 0 ? qs[0].dim : 0;
  const int64_t cap = chunk_rows(dim);
  if (s.rows.size() < size_t(cap * dim)) s.rows.resize(size_t(cap * dim));
  const float* rows = nullptr;
  for (int64_t n; (n = stream.next(s.rows.data(), cap, &rows)) > 0;) {
    stream.prefetch(cap);
    for (int64_t k = 0; k < n_queries; ++k) max_rows(qs[k], rows, n, s.best.data() + k * max_stride);
  }
  for (int64_t k = 0; k < n_queries; ++k)
    out[k * out_stride] = sum_best(qs[k], s.best.data() + k * max_stride);
}

// Stream over contiguous stored rows [begin, end) of a (rows, dim) matrix of type T, widened
// chunk by chunk into buf. fp32 is copied too: one sequential copy that the prefetchers
// follow, after which the micro-kernel's broadcast loads (NT rows at a stride of dim) all hit
// L1 (fp32 reranking measured 40% -> 60% of peak with it).
template <DType T>
struct ContiguousRows {
  using E = typename Elem<T>::type;
  const E* base;
  int64_t dim, next_row, end;
  int64_t next(float* buf, int64_t cap, const float** rows) {
    const int64_t n = std::min(cap, end - next_row);
    if (n <= 0) return 0;
    widen_row<T>(base + next_row * dim, n * dim, buf);
    next_row += n;
    *rows = buf;
    return n;
  }
  void prefetch(int64_t cap) const {
    prefetch_bytes(base + next_row * dim, std::min(cap, end - next_row) * dim * int64_t(sizeof(E)));
  }
};

// Stream over the unmasked rows of one padded document.
template <DType T>
struct MaskedRows {
  using E = typename Elem<T>::type;
  const E* base;
  const uint8_t* mask;
  int64_t dim, next_row, end;
  int64_t next(float* buf, int64_t cap, const float** rows) {
    int64_t n = 0;
    for (; next_row < end && n < cap; ++next_row) {
      if (!mask[next_row]) continue;
      widen_row<T>(base + next_row * dim, dim, buf + n * dim);
      ++n;
    }
    *rows = buf;
    return n;
  }
  void prefetch(int64_t cap) const {
    prefetch_bytes(base + next_row * dim, std::min(cap, end - next_row) * dim * int64_t(sizeof(E)));
  }
};

// Packs every query of a batch; qs[k] views into buf.
inline std::vector<PackedQuery> pack_queries(const Queries& q, std::vector<float>& buf) {
  std::vector<std::vector<float>> parts(size_t(q.nq));
  std::vector<PackedQuery> qs(size_t(q.nq));
  int64_t total = 0;
  for (int64_t k = 0; k < q.nq; ++k) {
    qs[size_t(k)] = pack_rows(q.data, q.mask, k * q.lq, q.lq, q.dim, parts[size_t(k)]);
    total += int64_t(parts[size_t(k)].size());
  }
  buf.resize(size_t(std::max<int64_t>(total, 1)));
  int64_t at = 0;
  for (int64_t k = 0; k < q.nq; ++k) {
    std::copy(parts[size_t(k)].begin(), parts[size_t(k)].end(), buf.begin() + at);
    qs[size_t(k)].qt = buf.data() + at;
    at += int64_t(parts[size_t(k)].size());
  }
  return qs;
}

// The error for token t whose centroid id is outside [0, n_centroids).
inline void report_bad_code(KernelError& err, int64_t t, int64_t code, int64_t n_centroids) {
  err.report("codes: token " + std::to_string(t) + " has centroid id " + std::to_string(code) + ", expected [0, " +
             std::to_string(n_centroids) + ")");
}

// Document ranges from offsets, checked: 0 <= begin <= end <= n_tokens.
inline bool doc_range(const int64_t* offsets, int64_t doc, int64_t n_tokens, int64_t* begin,
                      int64_t* end, KernelError& err) {
  *begin = offsets[doc];
  *end = offsets[doc + 1];
  if (*begin < 0 || *begin > *end || *end > n_tokens) {
    err.report("doc_offsets: document " + std::to_string(doc) + " spans [" +
               std::to_string(*begin) + ", " + std::to_string(*end) +
               "), expected non-decreasing offsets within [0, " + std::to_string(n_tokens) + "]");
    return false;
  }
  return true;
}

// Tasks per parallel chunk so that each thread gets ~16 chunks.
inline int64_t grain_for(int64_t n_tasks, int64_t max_grain) {
  return std::clamp<int64_t>(n_tasks / 64, 1, max_grain);
}

// Runs every (query, candidate) pair, or, when cand.ids is null, every document against all
// queries at once (each document is staged once and reused by every query):
//   score(doc, first_query, n_queries, out, out_stride) scores one document;
//   prefetch(doc) asks for the start of a document's storage (the next candidate's first chunk
//   is on its way while the current one is scored).
template <class Prefetch, class Score>
void run_pairs(int64_t nq, int64_t nd, const Candidates& cand, float* out, KernelError& err,
               const Prefetch& prefetch, const Score& score) {
  if (cand.ids == nullptr) {
    parallel_for(nd, grain_for(nd, 16), [&](int64_t d0, int64_t d1) {
      for (int64_t d = d0; d < d1 && !err.set(); ++d) score(d, int64_t(0), nq, out + d, nd);
    });
    return;
  }
  const int64_t n_pairs = nq * cand.nc;
  parallel_for(n_pairs, grain_for(n_pairs, 32), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1 && !err.set(); ++p) {
      const int64_t doc = cand.ids[p];
      if (doc == -1) {
        out[p] = kNegInf;
        continue;
      }
      if (doc < 0 || doc >= nd) {
        err.report("candidates: id " + std::to_string(doc) + " out of range, expected -1 or [0, " +
                   std::to_string(nd) + ")");
        return;
      }
      if (p + 1 < p1) {
        const int64_t next = cand.ids[p + 1];
        if (next >= 0 && next < nd) prefetch(next);
      }
      score(doc, p / cand.nc, int64_t(1), out + p, int64_t(1));
    }
  });
}

// run_pairs over documents delivered as streams of fp32 rows: make_stream(doc) returns the
// document's stream (see score_document).
template <class MakeStream>
void run_maxsim(const std::vector<PackedQuery>& qs, int64_t nd, const Candidates& cand,
                float* out, KernelError& err, const MakeStream& make_stream) {
  const int64_t cap = qs.empty() ? 0 : chunk_rows(qs[0].dim);
  run_pairs(
      int64_t(qs.size()), nd, cand, out, err, [&](int64_t doc) { make_stream(doc).prefetch(cap); },
      [&](int64_t doc, int64_t q0, int64_t n, float* o, int64_t stride) {
        auto stream = make_stream(doc);
        score_document(stream, &qs[size_t(q0)], n, o, stride);
      });
}

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
