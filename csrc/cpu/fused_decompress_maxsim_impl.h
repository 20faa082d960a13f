// fused_decompress_maxsim: MaxSim straight from codes + packed residuals (residual_codec.h).
#pragma once
#include "residual_codec.h"

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

// MaxSim straight from codes + residuals: each candidate document is decoded chunk by chunk
// into a thread-local L1/L2 tile and scored there; the documents never exist in memory.
void fused_decompress_maxsim(const Queries& q, const Compressed& tokens, const int64_t* offsets,
                             int64_t nd, const Codec& codec, const Candidates& cand, float* out,
                             KernelError& err) {
  const ResidualDecoder decoder(codec.bucket_weights, codec.nbits, codec.centroids.dim);
  const int64_t dim = codec.centroids.dim;
  const int64_t row_bytes = dim * codec.nbits / 8;
  std::vector<float> qbuf;
  const std::vector<PackedQuery> qs = pack_queries(q, qbuf);
  with_dtype(codec.centroids.dtype, [&](auto tag) {
    constexpr DType T = decltype(tag)::value;
    using E = typename Elem<T>::type;
    const E* cents = static_cast<const E*>(codec.centroids.data);
    run_maxsim(qs, nd, cand, out, err, [&](int64_t d) {
      int64_t begin = 0, end = 0;
      if (!doc_range(offsets, d, tokens.codes.n, &begin, &end, err)) begin = end = 0;
      return DecodedRows<T>{cents, codec.centroids.rows, &tokens, &decoder, dim, row_bytes, begin, end, &err};
    });
  });
}

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
