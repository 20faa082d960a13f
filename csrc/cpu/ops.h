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

#define EDGEPLAID_DECLARE_KERNELS(ns)                                                          \
  namespace ns {                                                                               \
  void maxsim_padded(const Queries& q, const PaddedDocs& docs, float* out, KernelError& err); \
  void maxsim_packed(const Queries& q, const PackedDocs& docs, const Candidates& cand,         \
                     float* out, KernelError& err);                                            \
  void centroid_scores(const Queries& q, const Rows& centroids, int64_t n_probe,              \
                       float* scores, int64_t* top_ids, KernelError& err);                    \
  void decompress_residuals(const Compressed& tokens, const Codec& codec, void* out,          \
                            DType out_dtype, KernelError& err);                                \
  void fused_decompress_maxsim(const Queries& q, const Compressed& tokens,                     \
                               const int64_t* offsets, int64_t nd, const Codec& codec,         \
                               const Candidates& cand, float* out, KernelError& err);          \
  void centroid_interaction(const float* centroid_scores, const uint8_t* queries_mask,        \
                            int64_t nq, int64_t lq, int64_t n_centroids, const Ids& codes,     \
                            const int64_t* offsets, int64_t nd, const Candidates& cand,        \
                            const float* threshold, float* out, KernelError& err);             \
  void fused_decompress_maxsim_codes(const Queries& q, const Compressed& tokens,              \
                                     const float* inv_norm, const int64_t* offsets, int64_t nd, \
                                     const float* centroid_scores, int64_t n_centroids,         \
                                     const float* bucket_weights, int nbits, bool int8,         \
                                     const Candidates& cand, float* out, KernelError& err);     \
  double fma_probe(int64_t iterations);                                                        \
  double int8_probe(int64_t iterations);                                                       \
  }

EDGEPLAID_DECLARE_KERNELS(scalar)
EDGEPLAID_DECLARE_KERNELS(avx2)
EDGEPLAID_DECLARE_KERNELS(avx512)

// AVX-512 with VNNI (vpdpbusd): only the int8 code-scoring kernel and its probe differ.
namespace avx512vnni {
void fused_decompress_maxsim_codes(const Queries& q, const Compressed& tokens, const float* inv_norm,
                                   const int64_t* offsets, int64_t nd, const float* centroid_scores,
                                   int64_t n_centroids, const float* bucket_weights, int nbits, bool int8,
                                   const Candidates& cand, float* out, KernelError& err);
double int8_probe(int64_t iterations);
}  // namespace avx512vnni

}  // namespace edgeplaid
