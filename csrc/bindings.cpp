// pybind11 bindings of the CPU kernels. Arrays cross as numpy arrays (torch tensors are
// viewed with .numpy(); bf16 as uint16). Every structural property is checked here and
// reported as ValueError naming the argument; the GIL is released around each kernel.
// Dispatch to the active ISA happens here and nowhere else.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <memory>
#include <cstdlib>
#include <chrono>
#include <string>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/ops.h"
#include "cpu/parallel.h"

namespace py = pybind11;
using namespace edgeplaid;

#if defined(EDGEPLAID_HAVE_AVX512)
#define EP_IF_AVX512(...) __VA_ARGS__
#else
#define EP_IF_AVX512(...)
#endif
#if defined(EDGEPLAID_HAVE_AVX512VNNI)
#define EP_IF_AVX512VNNI(...) __VA_ARGS__
#else
#define EP_IF_AVX512VNNI(...)
#endif
#if defined(EDGEPLAID_HAVE_AVX512BF16)
#define EP_IF_AVX512BF16(...) __VA_ARGS__
#else
#define EP_IF_AVX512BF16(...)
#endif
#if defined(EDGEPLAID_HAVE_AMX)
#define EP_IF_AMX(...) __VA_ARGS__
#else
#define EP_IF_AMX(...)
#endif
#if defined(EDGEPLAID_HAVE_AVX2)
#define EP_IF_AVX2(...) __VA_ARGS__
#else
#define EP_IF_AVX2(...)
#endif

// Calls ns::fn(args...) for the namespace ns of the ISA `isa` (EP_DISPATCH: the active one).
#define EP_DISPATCH(fn, ...) EP_DISPATCH_ON(active_isa(), fn, __VA_ARGS__)
#define EP_DISPATCH_ON(isa, fn, ...)                                \
  do {                                                              \
    switch (isa) {                                                  \
      case Isa::avx512: EP_IF_AVX512(avx512::fn(__VA_ARGS__); break;) \
        [[fallthrough]];                                            \
      case Isa::avx2: EP_IF_AVX2(avx2::fn(__VA_ARGS__); break;)     \
        [[fallthrough]];                                            \
      default: scalar::fn(__VA_ARGS__);                             \
    }                                                               \
  } while (0)

namespace {

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

void expect_rank(const py::array& a, const char* name, py::ssize_t ndim, const char* layout) {
  if (a.ndim() != ndim)
    fail(std::string(name) + ": expected a " + std::to_string(ndim) + "-D array " + layout + ", got shape " +
         shape_str(a));
  if (!(a.flags() & py::array::c_style)) fail(std::string(name) + ": expected a C-contiguous array");
}

void expect_dim(const py::array& a, const char* name, py::ssize_t axis, int64_t want, const char* what) {
  if (a.shape(axis) != want)
    fail(std::string(name) + ": expected size " + std::to_string(want) + " (" + what + ") on axis " +
         std::to_string(axis) + ", got shape " + shape_str(a));
}

bool has_dtype(const py::array& a, char kind, py::ssize_t itemsize) {
  return a.dtype().kind() == kind && a.itemsize() == itemsize;
}

DType parse_dtype(const py::array& a, const std::string& dtype, const char* name) {
  if (dtype == "float32" && has_dtype(a, 'f', 4)) return DType::f32;
  if (dtype == "float16" && has_dtype(a, 'f', 2)) return DType::f16;
  if (dtype == "bfloat16" && has_dtype(a, 'u', 2)) return DType::bf16;
  fail(std::string(name) + ": expected float32, float16 or bfloat16 (given as uint16) data matching dtype '" +
       dtype + "'");
}

const float* f32_data(const py::array& a, const char* name) {
  if (!has_dtype(a, 'f', 4)) fail(std::string(name) + ": expected float32");
  return static_cast<const float*>(a.data());
}

// An optional (rows, cols) mask of bool or uint8.
const uint8_t* mask_data(const py::object& mask, const char* name, int64_t rows, int64_t cols) {
  if (mask.is_none()) return nullptr;
  const py::array a = mask.cast<py::array>();
  expect_rank(a, name, 2, "(n, length)");
  if (!(has_dtype(a, 'b', 1) || has_dtype(a, 'u', 1))) fail(std::string(name) + ": expected bool");
  expect_dim(a, name, 0, rows, "rows");
  expect_dim(a, name, 1, cols, "tokens per row");
  return static_cast<const uint8_t*>(a.data());
}

Queries queries_arg(const py::array& queries, const py::object& mask) {
  expect_rank(queries, "queries", 3, "(n_queries, query_len, dim)");
  const int64_t nq = queries.shape(0), lq = queries.shape(1), dim = queries.shape(2);
  if (dim < 1) fail("queries: dim must be >= 1");
  return Queries{f32_data(queries, "queries"), mask_data(mask, "queries_mask", nq, lq), nq, lq, dim};
}

const int64_t* offsets_arg(const py::array& offsets, int64_t* nd) {
  expect_rank(offsets, "doc_offsets", 1, "(n_docs + 1,)");
  if (!has_dtype(offsets, 'i', 8)) fail("doc_offsets: expected int64");
  if (offsets.shape(0) < 1) fail("doc_offsets: expected at least one entry (n_docs + 1)");
  *nd = offsets.shape(0) - 1;
  return static_cast<const int64_t*>(offsets.data());
}

Candidates candidates_arg(const py::object& candidates, int64_t nq, int64_t nd) {
  if (candidates.is_none()) return Candidates{nullptr, nd};
  const py::array a = candidates.cast<py::array>();
  expect_rank(a, "candidates", 2, "(n_queries, n_candidates)");
  if (!has_dtype(a, 'i', 8)) fail("candidates: expected int64");
  expect_dim(a, "candidates", 0, nq, "n_queries");
  return Candidates{static_cast<const int64_t*>(a.data()), a.shape(1)};
}

Ids codes_arg(const py::array& codes) {
  expect_rank(codes, "codes", 1, "(n_tokens,)");
  if (!(has_dtype(codes, 'u', 2) || has_dtype(codes, 'i', 4) || has_dtype(codes, 'i', 8)))
    fail("codes: expected uint16, int32 or int64");
  return Ids{codes.data(), int(codes.itemsize()), codes.shape(0)};
}

// nbits and bucket_weights (2**nbits,) float32 for tokens of `dim` dimensions; the weights.
const float* bucket_weights_arg(const py::array& bucket_weights, int nbits, int64_t dim) {
  if (nbits != 1 && nbits != 2 && nbits != 4 && nbits != 8)
    fail("nbits: expected one of 1, 2, 4, 8, got " + std::to_string(nbits));
  if ((dim * nbits) % 8 != 0) fail("nbits: dim * nbits must be a multiple of 8, got dim " + std::to_string(dim));
  expect_rank(bucket_weights, "bucket_weights", 1, "(2**nbits,)");
  expect_dim(bucket_weights, "bucket_weights", 0, int64_t(1) << nbits, "2**nbits");
  return f32_data(bucket_weights, "bucket_weights");
}

Codec codec_arg(const py::array& centroids, const std::string& dtype, const py::array& bucket_weights,
                int nbits, int64_t dim) {
  const float* weights = bucket_weights_arg(bucket_weights, nbits, dim);
  expect_rank(centroids, "centroids", 2, "(n_centroids, dim)");
  expect_dim(centroids, "centroids", 1, dim, "dim");
  const DType dt = parse_dtype(centroids, dtype, "centroids");
  return Codec{Rows{centroids.data(), dt, centroids.shape(0), dim}, weights, nbits};
}

const uint8_t* residuals_arg(const py::array& residuals, int64_t n, int64_t row_bytes) {
  expect_rank(residuals, "residuals", 2, "(n_tokens, dim * nbits / 8)");
  if (!has_dtype(residuals, 'u', 1)) fail("residuals: expected uint8");
  expect_dim(residuals, "residuals", 0, n, "one row per code");
  expect_dim(residuals, "residuals", 1, row_bytes, "dim * nbits / 8 bytes");
  return static_cast<const uint8_t*>(residuals.data());
}

void raise_if(const KernelError& err) {
  if (err.set()) fail(err.message());
}

// Stage 1's centroids (n_centroids, dim) of the given dtype and its n_probe.
Rows centroids_arg(const py::array& centroids, const std::string& dtype, int64_t dim, int64_t n_probe) {
  expect_rank(centroids, "centroids", 2, "(n_centroids, dim)");
  expect_dim(centroids, "centroids", 1, dim, "dim of queries");
  const Rows c{centroids.data(), parse_dtype(centroids, dtype, "centroids"), centroids.shape(0), dim};
  if (c.rows > int64_t(UINT32_MAX))  // the top-k selection packs ids into 32 bits
    fail("centroids: expected at most 2**32 - 1 centroids, got " + std::to_string(c.rows));
  if (n_probe < 1 || n_probe > c.rows)
    fail("n_probe: expected 1 <= n_probe <= n_centroids=" + std::to_string(c.rows) + ", got " +
         std::to_string(n_probe));
  return c;
}

IvfLists ivf_arg(const py::array& ivf_offsets, const py::array& ivf_docs, int64_t n_cent) {
  expect_rank(ivf_offsets, "ivf_offsets", 1, "(n_centroids + 1,)");
  if (!has_dtype(ivf_offsets, 'i', 8)) fail("ivf_offsets: expected int64");
  expect_dim(ivf_offsets, "ivf_offsets", 0, n_cent + 1, "n_centroids + 1");
  expect_rank(ivf_docs, "ivf_docs", 1, "(n_entries,)");
  if (!has_dtype(ivf_docs, 'i', 4)) fail("ivf_docs: expected int32");
  return IvfLists{static_cast<const int64_t*>(ivf_offsets.data()), static_cast<const int32_t*>(ivf_docs.data()),
                  n_cent, ivf_docs.shape(0)};
}

// The live documents (n_docs,) bool, or null (None: every document).
const uint8_t* live_arg(const py::object& live, int64_t nd) {
  if (live.is_none()) return nullptr;
  const py::array a = live.cast<py::array>();
  expect_rank(a, "live", 1, "(n_docs,)");
  if (!(has_dtype(a, 'b', 1) || has_dtype(a, 'u', 1))) fail("live: expected bool");
  expect_dim(a, "live", 0, nd, "n_docs");
  return static_cast<const uint8_t*>(a.data());
}

// The pruning threshold, stored in *value: null when None.
const float* threshold_arg(const py::object& threshold, float* value) {
  if (threshold.is_none()) return nullptr;
  *value = threshold.cast<float>();
  return value;
}

const float* inv_norm_arg(const py::array& inv_norm, int64_t n) {
  expect_rank(inv_norm, "inv_norm", 1, "(n_tokens,)");
  expect_dim(inv_norm, "inv_norm", 0, n, "one per code");
  return f32_data(inv_norm, "inv_norm");
}

// A precision argument (stage 1 and stage 4): true for "int8".
bool int8_precision_arg(const std::string& precision) {
  if (precision != "exact" && precision != "int8")
    fail("precision: expected 'exact' or 'int8', got '" + precision + "'");
  return precision == "int8";
}

py::array_t<float> maxsim_padded(const py::array& queries, const py::object& queries_mask, const py::array& docs,
                                 const std::string& dtype, const py::object& docs_mask) {
  const Queries q = queries_arg(queries, queries_mask);
  expect_rank(docs, "documents", 3, "(n_docs, doc_len, dim)");
  expect_dim(docs, "documents", 2, q.dim, "dim of queries");
  const int64_t nd = docs.shape(0), ld = docs.shape(1);
  const PaddedDocs d{docs.data(), parse_dtype(docs, dtype, "documents"),
                     mask_data(docs_mask, "documents_mask", nd, ld), nd, ld, q.dim};
  py::array_t<float> out({q.nq, nd});
  if (out.size() == 0) return out;  // nothing to compute (a zero-sized axis): the kernels never see it
  float* o = out.mutable_data();
  KernelError err;
  {
    py::gil_scoped_release release;
    EP_DISPATCH(maxsim_padded, q, d, o, err);
  }
  raise_if(err);
  return out;
}

py::array_t<float> maxsim_packed(const py::array& queries, const py::object& queries_mask, const py::array& tokens,
                                 const std::string& dtype, const py::array& offsets, const py::object& candidates) {
  const Queries q = queries_arg(queries, queries_mask);
  expect_rank(tokens, "doc_tokens", 2, "(n_tokens, dim)");
  expect_dim(tokens, "doc_tokens", 1, q.dim, "dim of queries");
  int64_t nd = 0;
  const int64_t* off = offsets_arg(offsets, &nd);
  const PackedDocs d{Rows{tokens.data(), parse_dtype(tokens, dtype, "doc_tokens"), tokens.shape(0), q.dim}, off, nd};
  const Candidates c = candidates_arg(candidates, q.nq, nd);
  py::array_t<float> out({q.nq, c.nc});
  if (out.size() == 0) return out;  // nothing to compute (a zero-sized axis): the kernels never see it
  float* o = out.mutable_data();
  KernelError err;
  {
    py::gil_scoped_release release;
    EP_DISPATCH(maxsim_packed, q, d, c, o, err);
  }
  raise_if(err);
  return out;
}

// The stride of a centroid-major ScoreTable of lq-token queries: lq rounded up to kTableLanes.
int64_t table_stride_for(int64_t lq) { return std::max<int64_t>(1, (lq + kTableLanes - 1) / kTableLanes) * kTableLanes; }

// Stage 1's scores as a kernel argument: token-major (nq, lq, n_centroids) when query_len is None,
// else centroid-major (nq, n_centroids, stride) of query_len-token queries (valid tokens compacted).
ScoreTable score_table_arg(const py::array& scores, const py::object& query_len) {
  if (query_len.is_none()) {
    expect_rank(scores, "centroid_scores", 3, "(n_queries, query_len, n_centroids)");
    return ScoreTable{f32_data(scores, "centroid_scores"), scores.shape(0), scores.shape(1), scores.shape(2), 0};
  }
  expect_rank(scores, "centroid_scores", 3, "(n_queries, n_centroids, stride) (centroid-major)");
  const int64_t lq = query_len.cast<int64_t>();
  if (lq < 0) fail("query_len: expected >= 0, got " + std::to_string(lq));
  expect_dim(scores, "centroid_scores", 2, table_stride_for(lq), "query_len rounded up to 16");
  return ScoreTable{f32_data(scores, "centroid_scores"), scores.shape(0), lq, scores.shape(1), scores.shape(2)};
}

// ---- Each op on its own ISA --------------------------------------------------------------------
// The fp32 kernels run active_isa() (best_isa(): full-width AVX-512, else AVX2; on Zen 4, whose
// AVX-512 units are 256 bits wide, AVX2 measured faster). The int8 kernels are chosen apart: the
// set with the most int8 products per instruction the CPU runs, VNNI (vpdpbusd, one instruction
// for 4-way u8*s8 sums) > AVX-512BW > AVX2 (vpmaddubsw + vpmaddwd; code_scoring.h) > scalar, whatever the fp32
// choice: on Zen 4 VNNI measured 931 int8 Gop/s against 388 for AVX2 (peak_int8_gops()), while
// its fp32 kernels stay on AVX2 (README, "Which ISA each op runs"). EDGEPLAID_CPU_INT8_ISA or
// set_cpu_int8_isa() overrides it, as EDGEPLAID_CPU_ISA / set_cpu_isa() override the fp32 one.
enum class Int8Isa { scalar, avx2, avx512, avx512vnni };
const char* int8_isa_name(Int8Isa isa) {
  switch (isa) {
    case Int8Isa::avx512vnni: return "avx512vnni";
    case Int8Isa::avx512: return "avx512";
    case Int8Isa::avx2: return "avx2";
    default: return "scalar";
  }
}
bool vnni_available() {
  EP_IF_AVX512VNNI(return cpu_features().avx512_vnni && isa_supported(Isa::avx512);)
  return false;
}
bool int8_isa_supported(Int8Isa isa) {
  switch (isa) {
    case Int8Isa::avx512vnni: return vnni_available();
    case Int8Isa::avx512: return isa_supported(Isa::avx512);
    case Int8Isa::avx2: return isa_supported(Isa::avx2);
    default: return true;
  }
}
Int8Isa best_int8_isa() {
  for (Int8Isa isa : {Int8Isa::avx512vnni, Int8Isa::avx512, Int8Isa::avx2})
    if (int8_isa_supported(isa)) return isa;
  return Int8Isa::scalar;
}
Int8Isa parse_int8_isa(const std::string& name, const char* what) {
  for (Int8Isa isa : {Int8Isa::scalar, Int8Isa::avx2, Int8Isa::avx512, Int8Isa::avx512vnni}) {
    if (name != int8_isa_name(isa)) continue;
    if (!int8_isa_supported(isa)) fail(std::string(what) + ": '" + name + "' is not supported by this CPU or build");
    return isa;
  }
  fail(std::string(what) + ": expected one of scalar, avx2, avx512, avx512vnni, got '" + name + "'");
}
std::atomic<int>& int8_setting() {
  static std::atomic<int> isa{[] {
    const char* env = std::getenv("EDGEPLAID_CPU_INT8_ISA");
    if (env == nullptr || *env == '\0') return int(best_int8_isa());
    return int(parse_int8_isa(env, "EDGEPLAID_CPU_INT8_ISA"));
  }()};
  return isa;
}
Int8Isa int8_isa() { return Int8Isa(int8_setting().load(std::memory_order_relaxed)); }
void set_cpu_int8_isa(const std::string& name) { int8_setting().store(int(parse_int8_isa(name, "isa"))); }

// Calls ns::fn(args...) for the int8 ISA's namespace ns.
#define EP_DISPATCH_INT8(fn, ...)                                                      \
  do {                                                                                 \
    switch (int8_isa()) {                                                              \
      case Int8Isa::avx512vnni: EP_IF_AVX512VNNI(avx512vnni::fn(__VA_ARGS__); break;)  \
        [[fallthrough]];                                                               \
      case Int8Isa::avx512: EP_IF_AVX512(avx512::fn(__VA_ARGS__); break;)              \
        [[fallthrough]];                                                               \
      case Int8Isa::avx2: EP_IF_AVX2(avx2::fn(__VA_ARGS__); break;)                    \
        [[fallthrough]];                                                               \
      default: scalar::fn(__VA_ARGS__);                                                \
    }                                                                                  \
  } while (0)

// The centroid-major table (PLAID's stage 1) on AMX tiles: where the fp32 kernels run AVX-512 and
// AMX is enabled (the amx unit's centroid_scores takes fp16 / bf16 centroids to the tiles and
// fp32 ones to its AVX-512 code). Measured in csrc/cpu/centroid_scores_amx.h and the README.
bool amx_tables() { return active_isa() == Isa::avx512 && amx_enabled(); }

// Stage 1's kernel (the op's binding and plaid_search's pipeline): with int8 centroids (c8 not
// null) the int8 kernel on the int8 ISA; else the centroid-major table (table_stride > 0) on AMX
// tiles where amx_tables(), or the active ISA's fp32 kernel. GIL released.
void run_centroid_scores(const Queries& q, const Rows& c, const Int8Rows* c8, int64_t n_probe, int64_t table_stride,
                         float* scores, int64_t* top_ids, float* centroid_max, KernelError& err) {
  if (c8 != nullptr) {
    EP_DISPATCH_INT8(centroid_scores_int8, q, *c8, n_probe, table_stride, scores, top_ids, centroid_max, err);
  } else if (table_stride > 0 && amx_tables()) {
    EP_IF_AMX(amx::centroid_scores(q, c, n_probe, table_stride, scores, top_ids, centroid_max, err);)
  } else {
    EP_DISPATCH(centroid_scores, q, c, n_probe, table_stride, scores, top_ids, centroid_max, err);
  }
}

// Stage 1's int8 centroids (centroid_scores' precision "int8"): levels (2, n_centroids, dim
// rounded up to 4) int8, the hi and lo halves of 12-bit levels, each in [-63, 63], zero past dim;
// scales (n_centroids,) float32, finite and >= 0: as edgeplaid.ops.quantise_centroids makes them
// once an index. Their shapes and dtypes are checked here; their values are not (O(n_centroids x
// dim) a call, more than a one-query search spends on stage 1's bookkeeping): a value out of range
// gives wrong scores, never an access out of bounds (no address depends on a level or a scale).
Int8Rows int8_centroids_arg(const py::object& levels, const py::object& scales, const Rows& c) {
  if (levels.is_none() || scales.is_none())
    fail("centroid_levels, centroid_scales: expected both for precision 'int8' (quantise_centroids)");
  // numpy arrays only: a cast of anything else would make a new array that only this function
  // holds, and the Int8Rows returned would point into it after it is freed.
  if (!py::isinstance<py::array>(levels)) fail("centroid_levels: expected a numpy array");
  if (!py::isinstance<py::array>(scales)) fail("centroid_scales: expected a numpy array");
  // Its int32 sums reach 532,384 x dim (ops.h).
  if (c.dim > kInt8Stage1MaxDim)
    fail("queries: int8 stage 1 takes dim <= " + std::to_string(kInt8Stage1MaxDim) + " (its int32 sums), got " +
         std::to_string(c.dim));
  const py::array lv = levels.cast<py::array>(), sc = scales.cast<py::array>();
  const int64_t dim4 = (c.dim + 3) / 4 * 4;
  expect_rank(lv, "centroid_levels", 3, "(2, n_centroids, dim rounded up to 4)");
  if (!has_dtype(lv, 'i', 1)) fail("centroid_levels: expected int8");
  expect_dim(lv, "centroid_levels", 0, 2, "the hi and lo halves");
  expect_dim(lv, "centroid_levels", 1, c.rows, "n_centroids");
  expect_dim(lv, "centroid_levels", 2, dim4, "dim rounded up to 4");
  expect_rank(sc, "centroid_scales", 1, "(n_centroids,)");
  expect_dim(sc, "centroid_scales", 0, c.rows, "n_centroids");
  const Int8Rows r{static_cast<const int8_t*>(lv.data()), f32_data(sc, "centroid_scales"), c.rows, c.dim, dim4};
  return r;
}

py::tuple centroid_scores(const py::array& queries, const py::object& queries_mask, const py::array& centroids,
                          const std::string& dtype, int64_t n_probe, const py::object& scores_out,
                          bool centroid_major, bool with_max, const std::string& precision,
                          const py::object& centroid_levels, const py::object& centroid_scales) {
  const Queries q = queries_arg(queries, queries_mask);
  const Rows c = centroids_arg(centroids, dtype, q.dim, n_probe);
  Int8Rows c8{};
  const bool int8 = int8_precision_arg(precision);
  if (int8) c8 = int8_centroids_arg(centroid_levels, centroid_scales, c);
  const int64_t ts = centroid_major ? table_stride_for(q.lq) : 0;
  const std::vector<py::ssize_t> shape =
      centroid_major ? std::vector<py::ssize_t>{q.nq, c.rows, ts} : std::vector<py::ssize_t>{q.nq, q.lq, c.rows};
  py::array_t<float> scores;
  if (scores_out.is_none()) {
    scores = py::array_t<float>(shape);
  } else {  // a caller's buffer, reused across calls (saves the page faults of a fresh one)
    scores = scores_out.cast<py::array>();
    expect_rank(scores, "out", 3, centroid_major ? "(n_queries, n_centroids, stride)" : "(n_queries, query_len, n_centroids)");
    f32_data(scores, "out");
    for (int axis = 0; axis < 3; ++axis) expect_dim(scores, "out", axis, shape[size_t(axis)], "the scores' shape");
    if (!scores.writeable()) fail("out: expected a writeable array");
  }
  py::array_t<int64_t> ids({q.nq, q.lq, n_probe});
  if (with_max && !centroid_major) fail("with_max: the centroid maxima come with the centroid-major layout only");
  py::array_t<float> cmax;
  float* m = nullptr;
  if (with_max) {
    cmax = py::array_t<float>({q.nq, c.rows});
    m = cmax.mutable_data();
    if (q.lq == 0) std::fill(m, m + cmax.size(), -std::numeric_limits<float>::infinity());
  }
  const auto result = [&]() -> py::tuple {
    if (with_max) return py::make_tuple(scores, ids, cmax);
    return py::make_tuple(scores, ids);
  };
  if (scores.size() == 0) return result();  // no query token: nothing to compute
  float* s = scores.mutable_data();
  int64_t* i = ids.mutable_data();
  KernelError err;
  {
    py::gil_scoped_release release;
    run_centroid_scores(q, c, int8 ? &c8 : nullptr, n_probe, ts, s, i, m, err);
  }
  raise_if(err);
  return result();
}

py::array decompress_residuals(const py::array& codes, const py::array& residuals, const py::array& centroids,
                               const std::string& dtype, const py::array& bucket_weights, int nbits,
                               const std::string& out_dtype) {
  const Ids ids = codes_arg(codes);
  if (centroids.ndim() != 2) expect_rank(centroids, "centroids", 2, "(n_centroids, dim)");
  const Codec codec = codec_arg(centroids, dtype, bucket_weights, nbits, centroids.shape(1));
  const Compressed tokens{ids, residuals_arg(residuals, ids.n, codec.centroids.dim * nbits / 8)};
  DType odt;
  py::array out;
  const std::vector<py::ssize_t> shape{ids.n, codec.centroids.dim};
  if (out_dtype == "float32") {
    odt = DType::f32;
    out = py::array_t<float>(shape);
  } else if (out_dtype == "float16" || out_dtype == "bfloat16") {
    odt = out_dtype == "float16" ? DType::f16 : DType::bf16;
    out = py::array_t<uint16_t>(shape);
  } else {
    fail("out_dtype: expected float32, float16 or bfloat16, got '" + out_dtype + "'");
  }
  if (out.size() == 0) return out;  // nothing to compute (a zero-sized axis): the kernels never see it
  void* o = out.mutable_data();
  KernelError err;
  {
    py::gil_scoped_release release;
    EP_DISPATCH(decompress_residuals, tokens, codec, o, odt, err);
  }
  raise_if(err);
  return out;
}

py::array_t<float> fused_decompress_maxsim(const py::array& queries, const py::object& queries_mask,
                                           const py::array& codes, const py::array& residuals,
                                           const py::array& offsets, const py::object& candidates,
                                           const py::array& centroids, const std::string& dtype,
                                           const py::array& bucket_weights, int nbits) {
  const Queries q = queries_arg(queries, queries_mask);
  const Ids ids = codes_arg(codes);
  const Codec codec = codec_arg(centroids, dtype, bucket_weights, nbits, q.dim);
  const Compressed tokens{ids, residuals_arg(residuals, ids.n, q.dim * nbits / 8)};
  int64_t nd = 0;
  const int64_t* off = offsets_arg(offsets, &nd);
  const Candidates c = candidates_arg(candidates, q.nq, nd);
  py::array_t<float> out({q.nq, c.nc});
  if (out.size() == 0) return out;  // nothing to compute (a zero-sized axis): the kernels never see it
  float* o = out.mutable_data();
  KernelError err;
  {
    py::gil_scoped_release release;
    EP_DISPATCH(fused_decompress_maxsim, q, tokens, off, nd, codec, c, o, err);
  }
  raise_if(err);
  return out;
}

py::array_t<float> centroid_interaction(const py::array& scores, const py::object& queries_mask,
                                        const py::array& codes, const py::array& offsets,
                                        const py::object& candidates, const py::object& threshold,
                                        const py::object& query_len) {
  const ScoreTable table = score_table_arg(scores, query_len);
  const int64_t nq = table.nq;
  const uint8_t* qmask = mask_data(queries_mask, "queries_mask", nq, table.lq);
  const Ids ids = codes_arg(codes);
  int64_t nd = 0;
  const int64_t* off = offsets_arg(offsets, &nd);
  const Candidates c = candidates_arg(candidates, nq, nd);
  float thr = 0.0f;
  const float* thr_ptr = threshold_arg(threshold, &thr);
  py::array_t<float> out({nq, c.nc});
  if (out.size() == 0) return out;  // nothing to compute (a zero-sized axis): the kernels never see it
  float* o = out.mutable_data();
  KernelError err;
  {
    py::gil_scoped_release release;
    EP_DISPATCH(centroid_interaction, table, qmask, ids, off, nd, c, thr_ptr, o, err);
  }
  raise_if(err);
  return out;
}

py::tuple centroid_interaction_topk(const py::array& scores, const py::object& centroid_max,
                                   const py::object& queries_mask, const py::array& codes, const py::array& offsets,
                                   const py::array& ivf_offsets, const py::array& ivf_docs, const py::array& probed,
                                   const py::object& live, const py::object& threshold, int64_t n_keep,
                                   int64_t query_len) {
  const ScoreTable table = score_table_arg(scores, py::int_(query_len));
  const int64_t nq = table.nq, n_cent = table.n_centroids;
  const uint8_t* qmask = mask_data(queries_mask, "queries_mask", nq, table.lq);
  const float* cmax = nullptr;
  if (!centroid_max.is_none()) {
    const py::array a = centroid_max.cast<py::array>();
    expect_rank(a, "centroid_max", 2, "(n_queries, n_centroids)");
    expect_dim(a, "centroid_max", 0, nq, "n_queries");
    expect_dim(a, "centroid_max", 1, n_cent, "n_centroids");
    cmax = f32_data(a, "centroid_max");
  }
  const Ids ids = codes_arg(codes);
  int64_t nd = 0;
  const int64_t* off = offsets_arg(offsets, &nd);
  const IvfLists ivf = ivf_arg(ivf_offsets, ivf_docs, n_cent);
  expect_rank(probed, "probed", 2, "(n_queries, n_probed)");
  if (!has_dtype(probed, 'i', 8)) fail("probed: expected int64");
  expect_dim(probed, "probed", 0, nq, "n_queries");
  const uint8_t* alive = live_arg(live, nd);
  if (nd > int64_t(INT32_MAX)) fail("doc_offsets: expected at most 2**31 - 1 documents, got " + std::to_string(nd));
  if (n_keep < 1) fail("n_keep: expected >= 1, got " + std::to_string(n_keep));
  float thr = 0.0f;
  const float* thr_ptr = threshold_arg(threshold, &thr);
  py::array_t<int64_t> out_ids({nq, n_keep});
  py::array_t<float> out_scores({nq, n_keep});
  if (nq == 0) return py::make_tuple(out_ids, out_scores);
  int64_t* oi = out_ids.mutable_data();
  float* os = out_scores.mutable_data();
  const int64_t* pr = static_cast<const int64_t*>(probed.data());
  const int64_t n_probed = probed.shape(1);
  KernelError err;
  {
    py::gil_scoped_release release;
    EP_DISPATCH(centroid_interaction_topk, table, cmax, qmask, ids, off, nd, ivf, pr, n_probed, alive, thr_ptr,
                n_keep, oi, os, err);
  }
  raise_if(err);
  return py::make_tuple(out_ids, out_scores);
}


py::array_t<float> fused_decompress_maxsim_codes(const py::array& queries, const py::object& queries_mask,
                                                 const py::array& codes, const py::array& residuals,
                                                 const py::array& inv_norm, const py::array& offsets,
                                                 const py::object& candidates, const py::array& centroid_scores,
                                                 const py::array& bucket_weights, int nbits,
                                                 const std::string& precision, const py::object& query_len) {
  const Queries q = queries_arg(queries, queries_mask);
  const bool int8 = int8_precision_arg(precision);
  const float* weights = bucket_weights_arg(bucket_weights, nbits, q.dim);
  const Ids ids = codes_arg(codes);
  const Compressed tokens{ids, residuals_arg(residuals, ids.n, q.dim * nbits / 8)};
  const float* inv = inv_norm_arg(inv_norm, ids.n);
  const ScoreTable table = score_table_arg(centroid_scores, query_len);
  expect_dim(centroid_scores, "centroid_scores", 0, q.nq, "n_queries");
  if (table.lq != q.lq)
    fail("query_len: expected " + std::to_string(q.lq) + " (the queries'), got " + std::to_string(table.lq));
  int64_t nd = 0;
  const int64_t* off = offsets_arg(offsets, &nd);
  const Candidates c = candidates_arg(candidates, q.nq, nd);
  py::array_t<float> out({q.nq, c.nc});
  if (out.size() == 0) return out;  // nothing to compute (a zero-sized axis): the kernels never see it
  float* o = out.mutable_data();
  KernelError err;
  {
    py::gil_scoped_release release;
    if (int8) EP_DISPATCH_INT8(fused_decompress_maxsim_codes, q, tokens, inv, off, nd, table, weights, nbits, int8, c, o, err);
    else EP_DISPATCH(fused_decompress_maxsim_codes, q, tokens, inv, off, nd, table, weights, nbits, int8, c, o, err);
  }
  raise_if(err);
  return out;
}

// ---- PLAID's CPU pipeline in one call ----------------------------------------------------------

// What plaid_search reads besides the queries, checked by its binding.
struct PlaidArgs {
  Rows centroids;           // (n_centroids, dim)
  Int8Rows centroids8;      // stage 1's int8 centroids, where given
  bool int8_stage1;         // stage 1 from int8 products (centroids8)
  int64_t n_probe;
  Compressed tokens;        // codes (n_tokens,), residuals (n_tokens, dim * nbits / 8)
  const float* inv_norm;    // (n_tokens,)
  const int64_t* offsets;   // (nd + 1,)
  int64_t nd;
  IvfLists ivf;
  const uint8_t* live;      // (nd,) or null
  const float* weights;     // (2**nbits,)
  int nbits;
  const float* threshold;   // or null
  int64_t n_candidates, k;
  bool int8;
};

// A buffer that grows to the largest size asked of it, uninitialised (every element a kernel
// reads it writes first): reused across the queries a thread runs in one call.
template <class T>
class Scratch {
 public:
  T* get(int64_t n) {
    if (n > n_) {
      data_.reset(new T[size_t(n)]);
      n_ = n;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<T[]> data_;
  int64_t n_ = 0;
};

// One thread's buffers: a query's table is n_centroids x stride floats (2 MiB for SciFact's
// 16,384 centroids and 32-token queries).
struct PlaidBuffers {
  Scratch<float> table, cmax, kept_scores, scores;
  Scratch<int64_t> top, kept, order;
};

// Stages 1, 1b-2 and 4 of the queries q (q.nq of them) with the kernels each stage's op runs,
// then each query's k best: a higher score first, then the earlier candidate (the order of
// PlaidSearcher.search's stable numpy sort); -inf / -1 past its scored documents. The kernels
// spread over the pool unless called from a pool task (then inline: plaid_search's one query a
// thread). out_scores / out_ids: (q.nq, k).
void plaid_block(const Queries& q, const PlaidArgs& a, PlaidBuffers& buf, float* out_scores, int64_t* out_ids,
                 KernelError& err) {
  const int64_t nq = q.nq, lq = q.lq, n_cent = a.centroids.rows, ts = table_stride_for(lq);
  const int64_t nc = a.n_candidates, k = a.k;
  float* table = buf.table.get(nq * n_cent * ts);
  float* cmax = buf.cmax.get(nq * n_cent);
  int64_t* top = buf.top.get(nq * lq * a.n_probe);
  if (lq == 0) std::fill(cmax, cmax + nq * n_cent, -std::numeric_limits<float>::infinity());
  run_centroid_scores(q, a.centroids, a.int8_stage1 ? &a.centroids8 : nullptr, a.n_probe, ts, table, top, cmax, err);
  if (err.set()) return;
  const ScoreTable st{table, nq, lq, n_cent, ts};
  int64_t* kept = buf.kept.get(nq * nc);
  float* kept_scores = buf.kept_scores.get(nq * nc);
  EP_DISPATCH(centroid_interaction_topk, st, cmax, q.mask, a.tokens.codes, a.offsets, a.nd, a.ivf, top,
              lq * a.n_probe, a.live, a.threshold, nc, kept, kept_scores, err);
  if (err.set()) return;
  float* scores = buf.scores.get(nq * nc);
  const Candidates cand{kept, nc};
  if (a.int8)
    EP_DISPATCH_INT8(fused_decompress_maxsim_codes, q, a.tokens, a.inv_norm, a.offsets, a.nd, st, a.weights, a.nbits,
                     true, cand, scores, err);
  else
    EP_DISPATCH(fused_decompress_maxsim_codes, q, a.tokens, a.inv_norm, a.offsets, a.nd, st, a.weights, a.nbits,
                false, cand, scores, err);
  if (err.set()) return;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t n = std::min(k, nc);
  int64_t* order = buf.order.get(nc);
  for (int64_t i = 0; i < nq; ++i) {
    const float* s = scores + i * nc;
    for (int64_t j = 0; j < nc; ++j) order[j] = j;
    std::partial_sort(order, order + n, order + nc,
                      [s](int64_t x, int64_t y) { return s[x] > s[y] || (s[x] == s[y] && x < y); });
    for (int64_t j = 0; j < k; ++j) {
      const int64_t at = j < n ? order[j] : -1;
      const bool scored = at >= 0 && s[at] != kNegInf && kept[i * nc + at] >= 0;
      out_scores[i * k + j] = scored ? s[at] : kNegInf;  // an empty or pruned document is no result
      out_ids[i * k + j] = scored ? kept[i * nc + at] : -1;
    }
  }
}

// PLAID's CPU pipeline for a batch of queries in one call: stage 1 (centroid_scores: the
// centroid-major table and each centroid's maximum; from int8 products where the int8 centroids
// centroid_levels / centroid_scales are given, int8_centroids_arg), stages 1b-2 (centroid_interaction_topk over
// the probed IVF lists, n_candidates kept) and stage 4 (fused_decompress_maxsim_codes of those),
// then each query's k best. The same kernels and checks as the three op calls, without the Python
// between them (conversions, checks, bundles and numpy selections: ~0.1-0.2 ms of a ~1 ms SciFact
// query on 2 cores, the measurements in README.md). One query alone runs each stage across the
// pool; several run one query per pool thread, every stage inline on it: no wait between stages,
// each thread's table in its own L2 (batched SciFact on the Zen 4: README, "one query a thread").
// Returns (scores (nq, k) float32, ids (nq, k) int64).
py::tuple plaid_search(const py::array& queries, const py::object& queries_mask, const py::array& centroids,
                       const std::string& dtype, int64_t n_probe, const py::array& codes,
                       const py::array& doc_offsets, const py::array& residuals, const py::array& inv_norm,
                       const py::array& ivf_offsets, const py::array& ivf_docs, const py::object& live,
                       const py::array& bucket_weights, int nbits, const py::object& threshold,
                       int64_t n_candidates, const std::string& precision, int64_t k,
                       const py::object& centroid_levels, const py::object& centroid_scales) {
  if (k < 1) fail("k: expected >= 1, got " + std::to_string(k));
  if (n_candidates < 1) fail("n_candidates: expected >= 1, got " + std::to_string(n_candidates));
  const Queries q = queries_arg(queries, queries_mask);
  PlaidArgs a;
  a.centroids = centroids_arg(centroids, dtype, q.dim, n_probe);
  a.n_probe = n_probe;
  a.int8 = int8_precision_arg(precision);
  // Stage 1 from int8 products where the caller gives the int8 centroids (the search's rule:
  // edgeplaid.ops.centroid_scores.stage1_precision), else fp32.
  a.int8_stage1 = !centroid_levels.is_none() || !centroid_scales.is_none();
  if (a.int8_stage1) a.centroids8 = int8_centroids_arg(centroid_levels, centroid_scales, a.centroids);
  a.weights = bucket_weights_arg(bucket_weights, nbits, q.dim);
  a.nbits = nbits;
  const Ids ids = codes_arg(codes);
  a.tokens = Compressed{ids, residuals_arg(residuals, ids.n, q.dim * nbits / 8)};
  a.inv_norm = inv_norm_arg(inv_norm, ids.n);
  a.offsets = offsets_arg(doc_offsets, &a.nd);
  if (a.nd > int64_t(INT32_MAX))
    fail("doc_offsets: expected at most 2**31 - 1 documents, got " + std::to_string(a.nd));
  a.ivf = ivf_arg(ivf_offsets, ivf_docs, a.centroids.rows);
  a.live = live_arg(live, a.nd);
  float thr = 0.0f;
  a.threshold = threshold_arg(threshold, &thr);
  a.n_candidates = n_candidates;
  a.k = k;
  py::array_t<float> out_scores({q.nq, k});
  py::array_t<int64_t> out_ids({q.nq, k});
  float* os = out_scores.mutable_data();
  int64_t* oi = out_ids.mutable_data();
  KernelError err;
  {
    py::gil_scoped_release release;
    if (q.nq < 2 || get_num_threads() < 2) {
      PlaidBuffers buf;
      if (q.nq > 0) plaid_block(q, a, buf, os, oi, err);
    } else {
      std::atomic<int64_t> next{0};
      parallel_each_thread([&](int, int) {
        PlaidBuffers buf;
        for (int64_t i = next.fetch_add(1); i < q.nq && !err.set(); i = next.fetch_add(1)) {
          const Queries one{q.data + i * q.lq * q.dim, q.mask == nullptr ? nullptr : q.mask + i * q.lq, 1, q.lq, q.dim};
          plaid_block(one, a, buf, os + i * k, oi + i * k, err);
        }
      });
    }
  }
  raise_if(err);
  return py::make_tuple(out_scores, out_ids);
}

double probe_int8(int64_t iterations) {
  switch (int8_isa()) {
    case Int8Isa::avx512vnni: EP_IF_AVX512VNNI(return avx512vnni::int8_probe(iterations);) [[fallthrough]];
    case Int8Isa::avx512: EP_IF_AVX512(return avx512::int8_probe(iterations);) [[fallthrough]];
    case Int8Isa::avx2: EP_IF_AVX2(return avx2::int8_probe(iterations);) [[fallthrough]];
    default: return scalar::int8_probe(iterations);
  }
}

double probe_flops(int64_t iterations) {
  double flops = 0;
  switch (active_isa()) {
    case Isa::avx512: EP_IF_AVX512(flops = avx512::fma_probe(iterations); break;) [[fallthrough]];
    case Isa::avx2: EP_IF_AVX2(flops = avx2::fma_probe(iterations); break;) [[fallthrough]];
    default: flops = scalar::fma_probe(iterations);
  }
  return flops;
}

// Peak rate in G operations/s of a probe on the pool's threads, each running ~`seconds`.
template <class Probe>
double peak_rate(double seconds, const Probe& probe) {
  if (!(seconds > 0)) fail("seconds: expected > 0");
  py::gil_scoped_release release;
  // Calibrate one thread's iteration rate, then run every thread for ~seconds.
  int64_t iters = 1 << 16;
  for (;;) {
    const auto t0 = std::chrono::steady_clock::now();
    probe(iters);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt > 0.02) {
      iters = std::max<int64_t>(1, int64_t(double(iters) * seconds / dt));
      break;
    }
    iters *= 4;
  }
  std::vector<double> flops(size_t(get_num_threads()), 0.0);
  const auto t0 = std::chrono::steady_clock::now();
  parallel_each_thread([&](int index, int) { flops[size_t(index)] = probe(iters); });
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double total = 0;
  for (double f : flops) total += f;
  return total / dt * 1e-9;
}

// fp32 FMA peak in GFLOP/s of the active ISA on the pool's threads, measured by an FMA loop
// with 10 independent accumulators per thread, for about `seconds`.
double peak_gflops(double seconds) { return peak_rate(seconds, probe_flops); }

// int8 multiply-add peak in G int ops/s (2 per multiply-add) of the int8 kernel set in use.
double peak_int8_gops(double seconds) { return peak_rate(seconds, probe_int8); }

// bf16 multiply-add peak in GFLOP/s (2 per multiply-add) of vdpbf16ps, the bf16 vector attention's
// instruction, on the pool's threads; where that kernel cannot run here, an error.
double peak_bf16_gflops(double seconds) {
  if (!bf16_attention_ready())
    fail("peak_bf16_gflops: needs AVX512-BF16 with AVX-512 in use (this CPU, OS, build or a forced ISA has none)");
  double rate = 0;
  EP_IF_AVX512BF16(rate = peak_rate(seconds, [](int64_t n) { return avx512bf16::bf16_probe(n); });)
  return rate;
}

// Which kernel takes bf16 heads of head dim d here: AMX tiles (32 or 64 dims, tiles enabled),
// else the vdpbf16ps kernel (multiples of 16 up to 512), else none.
const char* bf16_attention_kernel(int64_t d) {
  if (amx_enabled() && (d == 32 || d == 64)) return "amx";
  if (bf16_attention_ready() && d % 16 == 0 && d >= 16 && d <= 512) return "avx512bf16";
  return "none";
}

py::dict cpu_info() {
  const CpuFeatures& f = cpu_features();
  py::dict features;
  features["avx2"] = f.avx2 && f.os_avx;
  features["fma"] = f.fma;
  features["f16c"] = f.f16c;
  features["avx512f"] = f.avx512f && f.os_avx512;
  features["avx512bw"] = f.avx512bw && f.os_avx512;
  features["avx512vl"] = f.avx512vl && f.os_avx512;
  features["avx512dq"] = f.avx512dq && f.os_avx512;
  features["avx512_vnni"] = f.avx512_vnni && f.os_avx512;
  features["avx512_bf16"] = f.avx512_bf16 && f.os_avx512;
  features["amx_bf16"] = f.amx_bf16;
  py::list compiled, supported;
  for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512}) {
    if (isa_compiled(isa)) compiled.append(isa_name(isa));
    if (isa_supported(isa)) supported.append(isa_name(isa));
  }
  py::dict info;
  info["vendor"] = f.amd ? "AMD" : "other";
  info["family"] = f.family;
  info["features"] = features;
  info["compiled_isas"] = compiled;
  info["supported_isas"] = supported;
  info["best_isa"] = isa_name(best_isa());
  info["int8_isa"] = int8_isa_name(int8_isa());
  info["vnni_available"] = vnni_available();
  info["amx_ready"] = amx_ready();  // this CPU, OS and build can run AMX tiles
  info["amx_enabled"] = amx_enabled();  // ... and they are not turned off (set_cpu_amx)
  // The ISA each op's kernel runs now (the rule above EP_DISPATCH_INT8).
  py::dict per_op;
  const char* fp32 = isa_name(active_isa());
  for (const char* op : {"maxsim", "maxsim_packed", "centroid_scores", "centroid_interaction",
                         "centroid_interaction_topk", "decompress_residuals", "fused_decompress_maxsim",
                         "nearest_centroids", "compress_residuals", "rotary_embed"})
    per_op[op] = fp32;
  per_op["fused_decompress_maxsim[int8]"] = int8_isa_name(int8_isa());
  per_op["centroid_scores[int8]"] = int8_isa_name(int8_isa());
  per_op["int8_linear"] = int8_isa_name(int8_isa());
  if (amx_tables()) per_op["centroid_scores"] = "amx (centroid-major, fp16/bf16 centroids), else avx512";
  per_op["attention"] = isa_name(attention_isa());  // float32 heads
  per_op["attention[bf16]"] = bf16_attention_kernel(64);  // amx, avx512bf16 or none (head dim 64)
  info["op_isa"] = per_op;
  return info;
}


// ---- Index building (issue 14): nearest_centroids and compress_residuals ----------------------

BlockRows block_rows_arg(const py::array& data, const py::array& ids, const char* name, const char* ids_name,
                         int64_t dim) {
  expect_rank(data, name, 3, "(n_blocks, dim, 16)");
  f32_data(data, name);
  expect_dim(data, name, 1, dim, "dim of tokens");
  expect_dim(data, name, 2, kBlockLanes, "centroids per block");
  expect_rank(ids, ids_name, 2, "(n_blocks, 16)");
  if (!has_dtype(ids, 'i', 4)) fail(std::string(ids_name) + ": expected int32");
  expect_dim(ids, ids_name, 0, data.shape(0), "n_blocks");
  expect_dim(ids, ids_name, 1, kBlockLanes, "centroids per block");
  return BlockRows{static_cast<const float*>(data.data()), static_cast<const int32_t*>(ids.data()), data.shape(0)};
}

py::tuple nearest_centroids(const py::array& tokens, const std::string& dtype, const py::array& group_data,
                            const py::array& group_ids, const py::array& member_data, const py::array& member_ids,
                            const py::array& group_blocks, const py::object& centroids, const py::object& graph,
                            int64_t n_probe, int64_t k, int64_t max_steps, int64_t width) {
  expect_rank(tokens, "tokens", 2, "(n_tokens, dim)");
  const int64_t n = tokens.shape(0), dim = tokens.shape(1);
  if (dim < 1) fail("tokens: dim must be >= 1");
  const Rows rows{tokens.data(), parse_dtype(tokens, dtype, "tokens"), n, dim};
  CentroidGroups g{};
  g.dim = dim;
  g.groups = block_rows_arg(group_data, group_ids, "group_blocks", "group_block_ids", dim);
  g.members = block_rows_arg(member_data, member_ids, "member_blocks", "member_block_ids", dim);
  expect_rank(group_blocks, "group_offsets", 1, "(n_groups + 1,)");
  if (!has_dtype(group_blocks, 'i', 8)) fail("group_offsets: expected int64");
  g.n_groups = group_blocks.shape(0) - 1;
  if (g.n_groups < 1) fail("group_offsets: expected at least one group (n_groups + 1 >= 2 entries)");
  g.group_blocks = static_cast<const int64_t*>(group_blocks.data());
  if (n_probe < 1 || n_probe > g.n_groups)
    fail("n_probe: expected 1 <= n_probe <= n_groups=" + std::to_string(g.n_groups) + ", got " +
         std::to_string(n_probe));
  if (k < 1) fail("k: expected k >= 1, got " + std::to_string(k));
  if (max_steps < 0) fail("max_steps: expected >= 0, got " + std::to_string(max_steps));
  if (width < 1) fail("width: expected >= 1, got " + std::to_string(width));
  if (centroids.is_none() != graph.is_none()) fail("graph: expected centroids and graph both given or both None");
  py::array cents, grph;
  if (!graph.is_none()) {
    cents = centroids.cast<py::array>();
    grph = graph.cast<py::array>();
    expect_rank(cents, "centroids", 2, "(n_centroids, dim)");
    g.centroids = f32_data(cents, "centroids");
    expect_dim(cents, "centroids", 1, dim, "dim of tokens");
    g.n_centroids = cents.shape(0);
    expect_rank(grph, "graph", 2, "(n_centroids, degree)");
    if (!has_dtype(grph, 'i', 4)) fail("graph: expected int32");
    expect_dim(grph, "graph", 0, g.n_centroids, "n_centroids");
    g.graph = static_cast<const int32_t*>(grph.data());
    g.degree = grph.shape(1);
  }
  py::array_t<float> scores({n, k});
  py::array_t<int64_t> ids({n, k});
  if (n == 0) return py::make_tuple(scores, ids);
  float* s = scores.mutable_data();
  int64_t* i = ids.mutable_data();
  KernelError err;
  {
    py::gil_scoped_release release;
    EP_DISPATCH(nearest_centroids, rows, g, n_probe, k, max_steps, width, s, i, err);
  }
  raise_if(err);
  return py::make_tuple(scores, ids);
}

py::tuple compress_residuals(const py::array& tokens, const std::string& dtype, const py::array& codes,
                             const py::array& centroids, const std::string& centroids_dtype,
                             const py::array& bucket_cutoffs, const py::array& bucket_weights, int nbits) {
  expect_rank(tokens, "tokens", 2, "(n_tokens, dim)");
  const int64_t n = tokens.shape(0), dim = tokens.shape(1);
  if (dim < 1) fail("tokens: dim must be >= 1");
  const Rows rows{tokens.data(), parse_dtype(tokens, dtype, "tokens"), n, dim};
  const Ids ids = codes_arg(codes);
  expect_dim(codes, "codes", 0, n, "one per token");
  const Codec codec = codec_arg(centroids, centroids_dtype, bucket_weights, nbits, dim);
  expect_rank(bucket_cutoffs, "bucket_cutoffs", 1, "(2**nbits - 1,)");
  expect_dim(bucket_cutoffs, "bucket_cutoffs", 0, (int64_t(1) << nbits) - 1, "2**nbits - 1");
  const float* cutoffs = f32_data(bucket_cutoffs, "bucket_cutoffs");
  const int64_t row_bytes = dim * nbits / 8;
  py::array_t<uint8_t> residuals({n, row_bytes});
  py::array_t<float> inv_norm({n});
  if (n == 0) return py::make_tuple(residuals, inv_norm);
  uint8_t* r = residuals.mutable_data();
  float* in = inv_norm.mutable_data();
  KernelError err;
  {
    py::gil_scoped_release release;
    EP_DISPATCH(compress_residuals, rows, ids, codec.centroids, cutoffs, codec.bucket_weights, nbits, r, in, err);
  }
  raise_if(err);
  return py::make_tuple(residuals, inv_norm);
}

// ---- end of index building ---------------------------------------------------------------------

// Output channels per column block of int8_linear's packed weights on the int8 ISA (int8_linear
// is an int8 kernel: it runs the int8 ISA, VNNI's vpdpbusd where the CPU has it).
int64_t int8_linear_block() {
  switch (int8_isa()) {
    case Int8Isa::avx512vnni: EP_IF_AVX512VNNI(return avx512vnni::int8_linear_block();) [[fallthrough]];
    case Int8Isa::avx512: EP_IF_AVX512(return avx512::int8_linear_block();) [[fallthrough]];
    case Int8Isa::avx2: EP_IF_AVX2(return avx2::int8_linear_block();) [[fallthrough]];
    default: return scalar::int8_linear_block();
  }
}

py::array_t<int8_t> int8_linear_pack(const py::array& qweight) {
  expect_rank(qweight, "qweight", 2, "(out_features, in_features)");
  if (!has_dtype(qweight, 'i', 1)) fail("qweight: expected int8");
  const int64_t n = qweight.shape(0), k = qweight.shape(1);
  if (n < 1 || k < 1) fail("qweight: expected at least one output and one input feature, got shape " + shape_str(qweight));
  const int64_t nr = int8_linear_block(), n_blocks = (n + nr - 1) / nr, kq = (k + 3) / 4;
  py::array_t<int8_t> packed(std::vector<py::ssize_t>{n_blocks, kq, nr, 4});
  const int8_t* q = static_cast<const int8_t*>(qweight.data());
  int8_t* pk = packed.mutable_data();
  {
    py::gil_scoped_release release;
    EP_DISPATCH_INT8(int8_linear_pack, q, n, k, pk);
  }
  return packed;
}

// x (rows, in_features) and other float32, or both bf16 (uint16 bits): the output takes x's dtype.
py::array int8_linear(const py::array& x, const py::array& packed, const py::array& scales, const py::array& bias,
                      int64_t out_features, const std::string& post, const py::object& other,
                      const py::object& inv_smooth, const py::object& norm_weight, const py::object& norm_bias,
                      double norm_eps, int64_t rotate) {
  expect_rank(x, "x", 2, "(rows, in_features)");
  const bool bf16 = has_dtype(x, 'u', 2);
  if (!bf16 && !has_dtype(x, 'f', 4)) fail("x: expected float32 or bfloat16 (given as uint16)");
  const DType dtype = bf16 ? DType::bf16 : DType::f32;
  const int64_t m = x.shape(0), k = x.shape(1), n = out_features;
  expect_rank(packed, "packed", 4, "(n_blocks, ceil(in_features / 4), block, 4) from int8_linear_pack");
  if (!has_dtype(packed, 'i', 1)) fail("packed: expected int8 (from int8_linear_pack)");
  const int64_t nr = int8_linear_block();
  if (packed.shape(2) != nr)
    fail("packed: packed for blocks of " + std::to_string(packed.shape(2)) + " channels, the active ISA's kernel uses " +
         std::to_string(nr) + ": pack the weight again (int8_linear_pack) after changing the ISA");
  expect_dim(packed, "packed", 1, (k + 3) / 4, "ceil(in_features / 4) of x");
  expect_dim(packed, "packed", 3, 4, "quads");
  if (n < 1 || packed.shape(0) != (n + nr - 1) / nr)
    fail("out_features: expected " + std::to_string(packed.shape(0) * nr - nr + 1) + ".." +
         std::to_string(packed.shape(0) * nr) + " for packed of shape " + shape_str(packed) + ", got " +
         std::to_string(n));
  const int64_t padded = packed.shape(0) * nr;
  expect_rank(scales, "scales", 1, "(n_blocks * block,)");
  expect_dim(scales, "scales", 0, padded, "n_blocks * block");
  expect_rank(bias, "bias", 1, "(n_blocks * block,), zero-padded");
  expect_dim(bias, "bias", 0, padded, "n_blocks * block");
  const float* sc = f32_data(scales, "scales");
  const float* bs = f32_data(bias, "bias");
  int code = 0;
  const void* od = nullptr;
  py::array other_array;  // keeps a cast alive while the kernel reads it
  if (post == "add" || post == "mul") {
    code = post == "add" ? 1 : 2;
    if (other.is_none()) fail("other: required when post is '" + post + "'");
    other_array = other.cast<py::array>();
    expect_rank(other_array, "other", 2, "(rows, out_features)");
    expect_dim(other_array, "other", 0, m, "rows of x");
    expect_dim(other_array, "other", 1, n, "out_features");
    if (!has_dtype(other_array, bf16 ? 'u' : 'f', bf16 ? 2 : 4))
      fail(std::string("other: expected ") + (bf16 ? "bfloat16 (given as uint16)" : "float32") + ", as x");
    od = other_array.data();
  } else if (post == "geglu") {
    code = 3;
    if (n % (2 * nr) != 0)
      fail("out_features: 'geglu' takes both halves' column blocks in step: expected a multiple of " +
           std::to_string(2 * nr) + ", got " + std::to_string(n));
  } else if (post != "none") {
    fail("post: expected 'none', 'add', 'mul' or 'geglu', got '" + post + "'");
  }
  const float* smooth = nullptr;
  py::array smooth_array;  // keeps the cast alive while the kernel reads it
  if (!inv_smooth.is_none()) {
    smooth_array = inv_smooth.cast<py::array>();
    expect_rank(smooth_array, "inv_smooth", 1, "(in_features,)");
    expect_dim(smooth_array, "inv_smooth", 0, k, "in_features of x");
    smooth = f32_data(smooth_array, "inv_smooth");
  }
  // The layer norm applied to x's rows before they are quantised (ops.h: Int8LinearInput).
  const float* nw = nullptr;
  const float* nb = nullptr;
  py::array nw_array, nb_array;  // keep the casts alive while the kernel reads them
  if (!norm_weight.is_none()) {
    nw_array = norm_weight.cast<py::array>();
    expect_rank(nw_array, "norm_weight", 1, "(in_features,)");
    expect_dim(nw_array, "norm_weight", 0, k, "in_features of x");
    nw = f32_data(nw_array, "norm_weight");
    if (!(norm_eps >= 0.0)) fail("norm_eps: expected a non-negative number, got " + std::to_string(norm_eps));
  }
  if (!norm_bias.is_none()) {
    if (nw == nullptr) fail("norm_bias: given without norm_weight");
    nb_array = norm_bias.cast<py::array>();
    expect_rank(nb_array, "norm_bias", 1, "(in_features,)");
    expect_dim(nb_array, "norm_bias", 0, k, "in_features of x");
    nb = f32_data(nb_array, "norm_bias");
  }
  if (rotate != 0 && (rotate < 2 || (rotate & (rotate - 1)) != 0 || k % rotate != 0))
    fail("rotate: expected 0 or a power of two >= 2 dividing in_features (" + std::to_string(k) + "), got " +
         std::to_string(rotate));
  const int64_t n_out = code == 3 ? n / 2 : n;  // geglu: GELU(first half) * second half
  py::array out = bf16 ? py::array(py::array_t<uint16_t>(std::vector<py::ssize_t>{m, n_out}))
                       : py::array(py::array_t<float>(std::vector<py::ssize_t>{m, n_out}));
  if (m == 0) return out;
  const int8_t* pk = static_cast<const int8_t*>(packed.data());
  const void* xd = x.data();
  void* o = out.mutable_data();
  KernelError err;
  {
    py::gil_scoped_release release;
    const Int8LinearInput in{xd, dtype, m, k, smooth, nw, nb, float(norm_eps), rotate};
    EP_DISPATCH_INT8(int8_linear, in, pk, sc, bs, n, code, od, o, err);
  }
  raise_if(err);
  return out;
}

// x: (B, L, G, D) float32 or bfloat16 (uint16 bits), any strides but a contiguous last axis,
// rotated in place; cos, sin: (L, D / 2) float32.
// Element strides of the first three axes of a 4-D array viewed in place (rotary_embed,
// attention): the last axis contiguous, the others whole, non-negative elements. Empty arrays
// are not checked (numpy gives them zero strides).
void view_strides(const py::array& a, const std::string& name, int64_t* strides) {
  const py::ssize_t item = a.itemsize();
  const bool empty = a.size() == 0;
  if (!empty && a.shape(3) > 1 && a.strides(3) != item) fail(name + ": expected a contiguous last axis");
  for (int axis = 0; axis < 3; ++axis) {
    if (!empty && (a.strides(axis) < 0 || a.strides(axis) % item))
      fail(name + ": expected non-negative strides in whole elements, got shape " + shape_str(a));
    strides[axis] = a.strides(axis) / item;
  }
}

void rotary_embed(py::array& x, const std::string& dtype, const py::array& cos, const py::array& sin) {
  if (x.ndim() != 4) fail("x: expected a 4-D array (batch, length, groups, dim), got shape " + shape_str(x));
  const DType dt = parse_dtype(x, dtype, "x");
  if (dt == DType::f16) fail("x: expected float32 or bfloat16, got float16");
  if (!x.writeable()) fail("x: expected a writeable array (rotated in place)");
  const int64_t b = x.shape(0), l = x.shape(1), g = x.shape(2), d = x.shape(3);
  if (d % 2) fail("x: expected an even last axis (pairs), got shape " + shape_str(x));
  int64_t st[3];
  view_strides(x, "x", st);
  expect_rank(cos, "cos", 2, "(length, dim / 2)");
  expect_rank(sin, "sin", 2, "(length, dim / 2)");
  for (const auto& [t, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {
    expect_dim(*t, name, 0, l, "length of x");
    expect_dim(*t, name, 1, d / 2, "dim / 2 of x");
  }
  const float* c = f32_data(cos, "cos");
  const float* s = f32_data(sin, "sin");
  if (x.size() == 0) return;
  void* data = x.mutable_data();
  py::gil_scoped_release release;
  EP_DISPATCH(rotary_embed, data, dt, b, l, g, d, st[0], st[1], st[2], c, s);
}

// attention (csrc/cpu/attention_impl.h): q, k, v, out are (B, L, H, D) float32, or uint16 views
// of bf16, with a contiguous last axis; out is written. float32 on the vector units (the
// attention ISA), bf16 on AMX tiles or vdpbf16ps (bf16_attention_kernel).
void attention(const py::array& q, const py::array& k, const py::array& v, py::array& out,
               const py::object& key_valid, int64_t window, double scale) {
  const bool f32 = has_dtype(q, 'f', 4);
  AttentionArgs args{};
  const py::array* arrays[4] = {&q, &k, &v, &out};
  const char* names[4] = {"q", "k", "v", "out"};
  int64_t* strides[4] = {args.q_strides, args.k_strides, args.v_strides, args.out_strides};
  for (int i = 0; i < 4; ++i) {
    const py::array& a = *arrays[i];
    const std::string name = names[i];
    if (a.ndim() != 4) fail(name + ": expected a 4-D array (batch, length, heads, dim), got shape " + shape_str(a));
    if (f32 ? !has_dtype(a, 'f', 4) : !has_dtype(a, 'u', 2))
      fail(name + (f32 ? ": expected float32 (the dtype of q)" : ": expected bfloat16 (given as uint16, the dtype of q)"));
    for (int axis = 0; axis < 4; ++axis)
      if (a.shape(axis) != q.shape(axis)) fail(name + ": expected the shape of q " + shape_str(q) + ", got " + shape_str(a));
    view_strides(a, name, strides[i]);
  }
  if (!out.writeable()) fail("out: expected a writeable array");
  const int64_t d = q.shape(3);
  const std::string kernel = f32 ? "f32" : bf16_attention_kernel(d);
  if (kernel == "none")
    fail("attention: bfloat16 needs AMX-BF16 tiles (head dim 32 or 64) or AVX512-BF16 (a head dim that is a "
         "multiple of 16, at most 512), got head dim " +
         std::to_string(d) + " on a CPU, OS or build without them (cpu_info()['op_isa']['attention[bf16]']); "
         "float32 runs anywhere");
  if (f32 && (d < 16 || d > 512 || d % 16 != 0))  // whole vectors of every ISA
    fail("q: expected a head dim that is a multiple of 16, at most 512, got " + std::to_string(d));
  args.b = q.shape(0);
  args.l = q.shape(1);
  args.h = q.shape(2);
  args.d = d;
  args.window = window < 0 ? -1 : window;
  args.scale = float(scale);
  args.key_valid = mask_data(key_valid, "key_valid", args.b, args.l);
  if (q.size() == 0) return;
  args.q = q.data();
  args.k = k.data();
  args.v = v.data();
  args.out = out.mutable_data();
  py::gil_scoped_release release;
  if (f32) {
    EP_DISPATCH_ON(attention_isa(), attention, args);
  } else if (kernel == "amx") {
    EP_IF_AMX(amx::attention(args);)
  } else {
    EP_IF_AVX512BF16(avx512bf16::attention(args);)
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "edgeplaid CPU kernels (scalar, AVX2, AVX-512), torch-free; see edgeplaid.ops for the API.";
  m.def("maxsim_padded", &maxsim_padded, py::arg("queries"), py::arg("queries_mask"), py::arg("documents"),
        py::arg("dtype"), py::arg("documents_mask"));
  m.def("maxsim_packed", &maxsim_packed, py::arg("queries"), py::arg("queries_mask"), py::arg("doc_tokens"),
        py::arg("dtype"), py::arg("doc_offsets"), py::arg("candidates"));
  m.def("centroid_scores", &centroid_scores, py::arg("queries"), py::arg("queries_mask"), py::arg("centroids"),
        py::arg("dtype"), py::arg("n_probe"), py::arg("scores_out") = py::none(), py::arg("centroid_major") = false,
        py::arg("with_max") = false, py::arg("precision") = "exact", py::arg("centroid_levels") = py::none(),
        py::arg("centroid_scales") = py::none());
  m.def("decompress_residuals", &decompress_residuals, py::arg("codes"), py::arg("residuals"), py::arg("centroids"),
        py::arg("dtype"), py::arg("bucket_weights"), py::arg("nbits"), py::arg("out_dtype"));
  m.def("fused_decompress_maxsim", &fused_decompress_maxsim, py::arg("queries"), py::arg("queries_mask"),
        py::arg("codes"), py::arg("residuals"), py::arg("doc_offsets"), py::arg("candidates"), py::arg("centroids"),
        py::arg("dtype"), py::arg("bucket_weights"), py::arg("nbits"));
  m.def("fused_decompress_maxsim_codes", &fused_decompress_maxsim_codes, py::arg("queries"),
        py::arg("queries_mask"), py::arg("codes"), py::arg("residuals"), py::arg("inv_norm"), py::arg("doc_offsets"),
        py::arg("candidates"), py::arg("centroid_scores"), py::arg("bucket_weights"), py::arg("nbits"),
        py::arg("precision"), py::arg("query_len") = py::none());
  m.def("plaid_search", &plaid_search, py::arg("queries"), py::arg("queries_mask"), py::arg("centroids"),
        py::arg("dtype"), py::arg("n_probe"), py::arg("codes"), py::arg("doc_offsets"), py::arg("residuals"),
        py::arg("inv_norm"), py::arg("ivf_offsets"), py::arg("ivf_docs"), py::arg("live"), py::arg("bucket_weights"),
        py::arg("nbits"), py::arg("threshold"), py::arg("n_candidates"), py::arg("precision"), py::arg("k"),
        py::arg("centroid_levels") = py::none(), py::arg("centroid_scales") = py::none());
  m.def("centroid_interaction", &centroid_interaction, py::arg("centroid_scores"), py::arg("queries_mask"),
        py::arg("codes"), py::arg("doc_offsets"), py::arg("candidates"), py::arg("threshold"),
        py::arg("query_len") = py::none());
  m.def("centroid_interaction_topk", &centroid_interaction_topk, py::arg("centroid_scores"), py::arg("centroid_max"),
        py::arg("queries_mask"), py::arg("codes"), py::arg("doc_offsets"), py::arg("ivf_offsets"), py::arg("ivf_docs"),
        py::arg("probed"), py::arg("live"), py::arg("threshold"), py::arg("n_keep"), py::arg("query_len"));
  m.def("nearest_centroids", &nearest_centroids, py::arg("tokens"), py::arg("dtype"), py::arg("group_blocks"),
        py::arg("group_block_ids"), py::arg("member_blocks"), py::arg("member_block_ids"), py::arg("group_offsets"),
        py::arg("centroids"), py::arg("graph"), py::arg("n_probe"), py::arg("k"), py::arg("max_steps"),
        py::arg("width"));
  m.def("compress_residuals", &compress_residuals, py::arg("tokens"), py::arg("dtype"), py::arg("codes"),
        py::arg("centroids"), py::arg("centroids_dtype"), py::arg("bucket_cutoffs"), py::arg("bucket_weights"),
        py::arg("nbits"));
  m.def("int8_linear_pack", &int8_linear_pack, py::arg("qweight"),
        "(out_features, in_features) int8 -> the packed layout int8_linear reads on the active ISA.");
  m.def("int8_linear", &int8_linear, py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("bias"),
        py::arg("out_features"), py::arg("post") = "none", py::arg("other") = py::none(),
        py::arg("inv_smooth") = py::none(), py::arg("norm_weight") = py::none(), py::arg("norm_bias") = py::none(),
        py::arg("norm_eps") = 1e-5, py::arg("rotate") = 0);
  m.def("bf16_attention_kernel", &bf16_attention_kernel, py::arg("head_dim"),
        "The kernel that takes bf16 heads of this head dim here: 'amx', 'avx512bf16' or 'none'.");
  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("key_valid"),
        py::arg("window"), py::arg("scale"),
        "softmax(q k^T * scale, masked) v: float32 heads on the vector units, bf16 on AMX tiles or vdpbf16ps "
        "(csrc/cpu/attention_impl.h).");
  m.def("rotary_embed", &rotary_embed, py::arg("x"), py::arg("dtype"), py::arg("cos"), py::arg("sin"),
        "Rotary embedding of x's interleaved pairs, in place (see csrc/cpu/rotary_embed_impl.h).");
  m.def("peak_gflops", &peak_gflops, py::arg("seconds") = 0.25,
        "Measured fp32 FMA peak (GFLOP/s) of the active ISA on all pool threads.");
  m.def("peak_int8_gops", &peak_int8_gops, py::arg("seconds") = 0.25,
        "Measured int8 multiply-add peak (G int ops/s, 2 per multiply-add) of the int8 kernels in use.");
  m.def("peak_bf16_gflops", &peak_bf16_gflops, py::arg("seconds") = 0.25,
        "Measured bf16 multiply-add peak (GFLOP/s) of vdpbf16ps on all pool threads (AVX512-BF16 CPUs).");
  m.def("cpu_int8_isa", [] { return std::string(int8_isa_name(int8_isa())); });
  m.def("set_cpu_int8_isa", &set_cpu_int8_isa, py::arg("isa"));
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("get_num_threads", &get_num_threads);
  m.def("cpu_isa", [] { return std::string(isa_name(active_isa())); });
  m.def("set_cpu_isa", &set_active_isa, py::arg("isa"),
        "Forces a kernel set (scalar, avx2, avx512), or 'auto': the CPU's own choice, nothing forced.");
  m.def("cpu_isa_state", [] { return std::string(isa_forced() ? isa_name(active_isa()) : "auto"); },
        "What set_cpu_isa takes to restore the present choice: the forced ISA's name, or 'auto'.");
  m.def("cpu_info", &cpu_info);
  m.def("cpu_amx", &amx_enabled, "Whether the AMX tile kernels run (amx_ready and not turned off).");
  m.def("set_cpu_amx", &set_amx_enabled, py::arg("on"),
        "Turns the AMX tile kernels on (where amx_ready) or off (EDGEPLAID_CPU_AMX=0 at start does too).");
}
