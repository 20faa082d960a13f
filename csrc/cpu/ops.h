// Arguments of the CPU kernels and their per-ISA entry points. Torch-free: raw pointers,
// sizes and element types. The bindings check every structural property (dtype, rank,
// shape, contiguity) before calling; the kernels themselves check every id and offset they
// dereference, so bad data reports an error instead of reading out of bounds.
#pragma once
#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>

#include "dtypes.h"

namespace edgeplaid {

// First error reported by any thread of a kernel; the binding raises it as ValueError.
class KernelError {
 public:
  void report(std::string message) {
    std::lock_guard<std::mutex> lk(m_);
    if (!set_.load()) {
      message_ = std::move(message);
      set_.store(true);
    }
  }
  bool set() const { return set_.load(std::memory_order_relaxed); }
  const std::string& message() const { return message_; }

 private:
  std::atomic<bool> set_{false};
  std::mutex m_;
  std::string message_;
};

// Queries, always fp32 (they are small; the bindings widen them): (nq, lq, dim) contiguous,
// mask (nq, lq) of 0/1 bytes or null (every token valid).
struct Queries {
  const float* data;
  const uint8_t* mask;
  int64_t nq, lq, dim;
};

// Row-major matrix (rows, dim) of fp32, fp16 or bf16.
struct Rows {
  const void* data;
  DType dtype;
  int64_t rows, dim;
};

// Centroids quantised for int8 stage-1 scoring: 12-bit levels L = 64 * hi + lo, stored as two
// 7-bit halves (the int8 tiles take levels in [-63, 63]): centroid[c][d] ~ scale[c] * L[c][d],
//   hi[c][d] = levels[c * dim4 + d],  lo[c][d] = levels[(rows + c) * dim4 + d]   (levels (2, rows, dim4))
// each in [-63, 63] (lo in [-32, 32]), zero past dim.
struct Int8Rows {
  const int8_t* levels;
  const float* scale;
  int64_t rows, dim, dim4;
};
constexpr int kLevelHiShift = 6;  // L = (hi << 6) + lo
// The largest dim the int8 stage 1 takes: in its second pass the int32 accumulator holds at most
// (64 x 63 x 127 + 64 x 127 + 96 x 127) x dim = 532,384 x dim (the shifted first pass, the offset's
// bias, the lo levels + 64 against 8-bit queries), below 2^31 up to dim 4,033.
constexpr int64_t kInt8Stage1MaxDim = 4032;

// Documents packed back to back: document d is tokens[offsets[d] : offsets[d + 1]].
struct PackedDocs {
  Rows tokens;
  const int64_t* offsets;  // (nd + 1,)
  int64_t nd;
};

// Documents padded to ld tokens: (nd, ld, dim), mask (nd, ld) or null.
struct PaddedDocs {
  const void* data;
  DType dtype;
  const uint8_t* mask;
  int64_t nd, ld, dim;
};

// Per-query candidate document ids (nq, nc), -1 = padding; ids == null: every document.
struct Candidates {
  const int64_t* ids;
  int64_t nc;
};

// Integer ids stored as uint16 (PLAID codes of indexes with <= 65,536 centroids: 2 bytes a
// token), int32 or int64; `bytes` is the element size.
struct Ids {
  const void* data;
  int bytes;
  int64_t n;
  int64_t operator[](int64_t i) const {
    switch (bytes) {
      case 2: return static_cast<const uint16_t*>(data)[i];
      case 4: return static_cast<const int32_t*>(data)[i];
      default: return static_cast<const int64_t*>(data)[i];
    }
  }
};

// The residual codec: token = normalize(centroids[code] + bucket_weights[bits of residual]).
struct Codec {
  Rows centroids;               // (n_centroids, dim)
  const float* bucket_weights;  // (2**nbits,)
  int nbits;
};

// Compressed tokens: codes (n,) and residuals (n, dim * nbits / 8) bytes.
struct Compressed {
  Ids codes;
  const uint8_t* residuals;
};

// Stage 1's scores <queries[q, i], centroids[c]> (fp32) in one of two layouts:
//   token-major (stride == 0): data[(q * lq + i) * n_centroids + c], every token of every query;
//   centroid-major (stride > 0): data[(q * n_centroids + c) * stride + j] for the j-th valid
//     token of query q (its valid tokens compacted into lanes 0..n_valid, the other lanes zero):
//     one centroid's scores for all tokens of a query are contiguous, the layout stages 2-4 read,
//     so they use it in place instead of transposing the token-major one.
// kTableLanes divides every centroid-major stride (a multiple of every ISA's vector width).
constexpr int64_t kTableLanes = 16;
struct ScoreTable {
  const float* data;
  int64_t nq, lq, n_centroids, stride;
};

// The inverted file: the documents having a token in centroid c are docs[offsets[c] : offsets[c + 1]]
// (unique within a cell; a document appears in every cell its tokens fall in).
struct IvfLists {
  const int64_t* offsets;  // (n_cells + 1,)
  const int32_t* docs;     // (n_entries,)
  int64_t n_cells, n_entries;
};

// Centroids laid out for nearest_centroids' coarse-to-fine search (index building). Rows are
// stored in blocks of kBlockLanes centroids, dimension-major: in block b, lane l holds centroid
// ids[b * kBlockLanes + l] and data[(b * dim + d) * kBlockLanes + l] is its d-th element, so a
// token is scored against a whole block with one broadcast and one FMA per dimension. A set
// that is not a whole number of blocks is padded with lanes of id -1 (never returned).
constexpr int kBlockLanes = 16;
struct BlockRows {
  const float* data;    // (n_blocks, dim, kBlockLanes)
  const int32_t* ids;   // (n_blocks, kBlockLanes)
  int64_t n_blocks;
};

// Group g's member centroids are members' blocks [group_blocks[g], group_blocks[g + 1]); a
// token probes the n_probe groups whose centroids score highest, then (graph != null) walks the
// neighbour graph from its best centroids: each step scores the `degree` neighbours of one
// candidate (centroids (n_centroids, dim) row-major; -1 = no neighbour).
struct CentroidGroups {
  BlockRows groups;             // the group centroids; ids are group ids in [0, n_groups)
  int64_t n_groups;
  BlockRows members;            // every centroid, group by group; ids in [0, n_centroids)
  const int64_t* group_blocks;  // (n_groups + 1,)
  const float* centroids;       // (n_centroids, dim) fp32, read by the walk only
  int64_t n_centroids;
  const int32_t* graph;         // (n_centroids, degree) or null: no walk
  int64_t degree;
  int64_t dim;
};

// int8_linear's input rows (int8_linear_impl.h): x (m, k) float32 or bf16, row-major, each row
// made x' before it is quantised:
//   x' = (LN(x) * inv_smooth) H,  LN(x) = (x - mean) / sqrt(var + norm_eps) * norm_w + norm_b
// (mean and the biased var over the row's k elements, in float32), or x * inv_smooth without
// norm_w (no layer norm); inv_smooth, norm_b null: 1, 0. H: the block-diagonal unnormalised
// Hadamard matrix of blocks of `rotate` (a power of two dividing k; entries +-1), or 1 (rotate 0).
struct Int8LinearInput {
  const void* x;
  DType dtype;
  int64_t m, k;
  const float* inv_smooth;  // (k,) or null
  const float* norm_w;      // (k,) or null: no layer norm
  const float* norm_b;      // (k,) or null
  float norm_eps;
  int64_t rotate;           // 0, or the Hadamard blocks' size
};

// Attention (attention_impl.h): for every batch b, head h and position i,
//   out[b, i, h] = sum_j p_ij v[b, j, h],  p_i = softmax over allowed j of q[b, i, h] . k[b, j, h] * scale,
// allowed: key_valid[b, j] != 0 (null: every key) and |i - j| <= window (window < 0: every key).
// A row with no allowed key is zero. q, k, v, out are (B, L, H, D) with element strides
// (batch, position, head) and a contiguous last axis: bf16 (uint16_t) on AMX tiles (the amx
// unit) or on vdpbf16ps (the avx512bf16 unit: attention_bf16.h), float32 on the vector units
// (the base ISAs: attention_vec.h).
struct AttentionArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int64_t q_strides[3], k_strides[3], v_strides[3], out_strides[3];
  const uint8_t* key_valid;  // (B, L) or null
  int64_t b, l, h, d, window;
  float scale;
};

#define EDGEPLAID_DECLARE_KERNELS(ns)                                                          \
  namespace ns {                                                                               \
  void maxsim_padded(const Queries& q, const PaddedDocs& docs, float* out, KernelError& err); \
  void maxsim_packed(const Queries& q, const PackedDocs& docs, const Candidates& cand,         \
                     float* out, KernelError& err);                                            \
  void centroid_scores(const Queries& q, const Rows& centroids, int64_t n_probe,              \
                       int64_t table_stride, float* scores, int64_t* top_ids, float* centroid_max, \
                       KernelError& err);                                                      \
  void centroid_scores_int8(const Queries& q, const Int8Rows& centroids, int64_t n_probe,      \
                            int64_t table_stride, float* scores, int64_t* top_ids,             \
                            float* centroid_max, KernelError& err);                            \
  void decompress_residuals(const Compressed& tokens, const Codec& codec, void* out,          \
                            DType out_dtype, KernelError& err);                                \
  void fused_decompress_maxsim(const Queries& q, const Compressed& tokens,                     \
                               const int64_t* offsets, int64_t nd, const Codec& codec,         \
                               const Candidates& cand, float* out, KernelError& err);          \
  void centroid_interaction(const ScoreTable& scores, const uint8_t* queries_mask,             \
                            const Ids& codes, const int64_t* offsets, int64_t nd,              \
                            const Candidates& cand, const float* threshold, float* out,        \
                            KernelError& err);                                                 \
  void centroid_interaction_topk(const ScoreTable& scores, const float* centroid_max,          \
                                 const uint8_t* queries_mask, const Ids& codes,                 \
                                 const int64_t* offsets, int64_t nd, const IvfLists& ivf,       \
                                 const int64_t* probed, int64_t n_probed, const uint8_t* live,  \
                                 const float* threshold, int64_t n_keep, int64_t* out_ids,      \
                                 float* out_scores, KernelError& err);                          \
  void fused_decompress_maxsim_codes(const Queries& q, const Compressed& tokens,              \
                                     const float* inv_norm, const int64_t* offsets, int64_t nd, \
                                     const ScoreTable& scores, const float* bucket_weights,     \
                                     int nbits, bool int8, const Candidates& cand, float* out,  \
                                     KernelError& err);                                         \
  void nearest_centroids(const Rows& tokens, const CentroidGroups& groups, int64_t n_probe,      \
                         int64_t k, int64_t max_steps, int64_t width, float* scores,            \
                         int64_t* ids, KernelError& err);                                       \
  void compress_residuals(const Rows& tokens, const Ids& codes, const Rows& centroids,          \
                          const float* bucket_cutoffs, const float* bucket_weights, int nbits,  \
                          uint8_t* residuals, float* inv_norm, KernelError& err);               \
  int64_t int8_linear_block();                                                                 \
  void int8_linear_pack(const int8_t* qweight, int64_t n, int64_t k, int8_t* packed);         \
  void int8_linear(const Int8LinearInput& in, const int8_t* packed, const float* scales,      \
                   const float* bias, int64_t n, int post, const void* other, void* out,       \
                   KernelError& err);                                                          \
  void rotary_embed(void* x, DType dtype, int64_t b, int64_t l, int64_t g, int64_t d,          \
                    int64_t sb, int64_t sl, int64_t sg, const float* cos, const float* sin);   \
  void attention(const AttentionArgs& a);                                                      \
  double fma_probe(int64_t iterations);                                                        \
  double int8_probe(int64_t iterations);                                                       \
  double bf16_probe(int64_t iterations);                                                       \
  }

EDGEPLAID_DECLARE_KERNELS(scalar)
EDGEPLAID_DECLARE_KERNELS(avx2)
EDGEPLAID_DECLARE_KERNELS(avx512)

// AVX-512 with VNNI (vpdpbusd): its unit defines only the int8 kernels (code scoring, stage 1's
// int8 table, int8_linear) and int8_probe;
// the other declarations are never called (bindings.cpp's EP_DISPATCH_INT8).
EDGEPLAID_DECLARE_KERNELS(avx512vnni)

// AVX-512 with AVX512-BF16: its unit defines only attention, for bf16 heads, and bf16_probe
// (bindings.cpp checks bf16_attention_ready()).
EDGEPLAID_DECLARE_KERNELS(avx512bf16)

// AVX-512 with AMX tiles: its unit defines only attention (bindings.cpp checks amx_ready()).
EDGEPLAID_DECLARE_KERNELS(amx)

}  // namespace edgeplaid
