// fused_decompress_maxsim: MaxSim straight from codes + packed residuals (residual_codec.h).
// edgeplaid-isa: avx512vnni (the int8 code-scoring kernel with vpdpbusd; setup.py builds it)
#pragma once
#include "code_scoring.h"
#include "residual_codec.h"

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

#if !defined(EDGEPLAID_ISA_VNNI)  // the VNNI unit only adds the int8 code-scoring kernel
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
#endif

// Scored from the codes (code_scoring.h): the ScoreTable of PLAID's
// stage 1 and inv_norm (n_tokens,) fp32 from the index; int8 selects the quantised precision.
void fused_decompress_maxsim_codes(const Queries& q, const Compressed& tokens, const float* inv_norm,
                                   const int64_t* offsets, int64_t nd, const ScoreTable& scores,
                                   const float* bucket_weights, int nbits, bool int8, const Candidates& cand,
                                   float* out, KernelError& err) {
  const int64_t n_centroids = scores.n_centroids;
  const Levels levels(bucket_weights, nbits);
  const ResidualDecoder decoder(bucket_weights, nbits, q.dim);
  const LevelDecoder level_decoder(levels, nbits, q.dim);
  const ScoredQueries prepared = prepare_queries(q, scores, int8, levels.wscale);
  const CodeScoring cs{&tokens, inv_norm, n_centroids, q.dim, &decoder, &level_decoder, int8};
  const int64_t row_bytes = q.dim * nbits / 8, cap = chunk_rows(q.dim);
  run_pairs(
      q.nq, nd, cand, out, err,
      [&](int64_t doc) {
        const int64_t begin = std::clamp<int64_t>(offsets[doc], 0, tokens.codes.n);
        const int64_t n = std::clamp<int64_t>(offsets[doc + 1] - begin, 0, cap);
        prefetch_bytes_l2(tokens.residuals + begin * row_bytes, n * row_bytes);
        prefetch_bytes_l2(inv_norm + begin, n * int64_t(sizeof(float)));
        prefetch_bytes_l2(static_cast<const char*>(tokens.codes.data) + begin * tokens.codes.bytes,
                          n * tokens.codes.bytes);
      },
      [&](int64_t doc, int64_t q0, int64_t n, float* o, int64_t stride) {
        int64_t begin = 0, end = 0;
        if (!doc_range(offsets, doc, tokens.codes.n, &begin, &end, err)) return;
        score_codes_document(cs, begin, end, prepared.qs.data() + q0, n, o, stride, err);
      });
}

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
