// maxsim (padded documents) and maxsim_packed (ragged documents by offsets), one body for
// every ISA; see maxsim_core.h for the kernel.
#pragma once
#include "maxsim_core.h"

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

void maxsim_padded(const Queries& q, const PaddedDocs& docs, float* out, KernelError& err) {
  std::vector<float> qbuf;
  const std::vector<PackedQuery> qs = pack_queries(q, qbuf);
  const Candidates all{nullptr, docs.nd};
  with_dtype(docs.dtype, [&](auto tag) {
    constexpr DType T = decltype(tag)::value;
    using E = typename Elem<T>::type;
    const E* base = static_cast<const E*>(docs.data);
    if (docs.mask == nullptr) {
      run_maxsim(qs, docs.nd, all, out, err, [&](int64_t d) {
        return ContiguousRows<T>{base, docs.dim, d * docs.ld, (d + 1) * docs.ld};
      });
    } else {
      run_maxsim(qs, docs.nd, all, out, err, [&](int64_t d) {
        // Row indices span the whole (nd * ld) array; the mask is indexed the same way.
        return MaskedRows<T>{base, docs.mask, docs.dim, d * docs.ld, (d + 1) * docs.ld};
      });
    }
  });
}

void maxsim_packed(const Queries& q, const PackedDocs& docs, const Candidates& cand, float* out,
                   KernelError& err) {
  std::vector<float> qbuf;
  const std::vector<PackedQuery> qs = pack_queries(q, qbuf);
  with_dtype(docs.tokens.dtype, [&](auto tag) {
    constexpr DType T = decltype(tag)::value;
    using E = typename Elem<T>::type;
    const E* base = static_cast<const E*>(docs.tokens.data);
    run_maxsim(qs, docs.nd, cand, out, err, [&](int64_t d) {
      int64_t begin = 0, end = 0;
      if (!doc_range(docs.offsets, d, docs.tokens.rows, &begin, &end, err)) begin = end = 0;
      return ContiguousRows<T>{base, docs.tokens.dim, begin, end};
    });
  });
}

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
