// decompress_residuals: codes + packed residuals -> normalised token vectors (see
// residual_codec.h for the bit order and the formula).
#pragma once
#include "residual_codec.h"

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

void decompress_residuals(const Compressed& tokens, const Codec& codec, void* out, DType out_dtype,
                          KernelError& err) {
  const ResidualDecoder decoder(codec.bucket_weights, codec.nbits, codec.centroids.dim);
  const int64_t dim = codec.centroids.dim, n = tokens.codes.n;
  const int64_t row_bytes = dim * codec.nbits / 8;
  with_dtype(codec.centroids.dtype, [&](auto tag) {
    constexpr DType T = decltype(tag)::value;
    using E = typename Elem<T>::type;
    const E* cents = static_cast<const E*>(codec.centroids.data);
    parallel_for(n, 512, [&](int64_t t0, int64_t t1) {
      DecodedRows<T> stream{cents, codec.centroids.rows, &tokens, &decoder, dim, row_bytes, t0, t1, &err};
      Scratch& s = thread_scratch();
      const int64_t cap = chunk_rows(dim);
      if (s.rows.size() < size_t(cap * dim)) s.rows.resize(size_t(cap * dim));
      int64_t at = t0;
      const float* rows = nullptr;
      for (int64_t got; (got = stream.next(s.rows.data(), cap, &rows)) > 0; at += got) {
        const int64_t count = got * dim;
        switch (out_dtype) {
          case DType::f32: narrow_row<DType::f32>(rows, count, static_cast<float*>(out) + at * dim); break;
          case DType::f16: narrow_row<DType::f16>(rows, count, static_cast<uint16_t*>(out) + at * dim); break;
          case DType::bf16: narrow_row<DType::bf16>(rows, count, static_cast<uint16_t*>(out) + at * dim); break;
        }
      }
    });
  });
}

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
