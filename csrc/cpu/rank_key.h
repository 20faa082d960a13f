// (score, id) as one integer whose order is the ranking order: a higher key is a higher score,
// then a lower id. Selections (centroid_scores' shortlists, nearest_centroids' candidate lists)
// then compare plain integers, which the standard algorithms (compiled for the baseline ISA, see
// isa_begin.h) inline; a comparator defined under an ISA pragma cannot be inlined into them and
// cost a call per comparison (40% of centroid_scores at n_probe 128). Ids must fit 32 bits.
// In the ISA's namespace, like every function compiled with its flags (one definition per ISA).
#pragma once
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

using RankKey = uint64_t;

EP_INLINE RankKey rank_key(float score, int64_t id) {
  uint32_t b;
  std::memcpy(&b, &score, sizeof b);
  b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);  // monotonic map of IEEE floats to uint32
  return (RankKey(b) << 32) | RankKey(~uint32_t(id));
}
EP_INLINE float key_score(RankKey key) {
  uint32_t b = uint32_t(key >> 32);
  b = (b & 0x80000000u) ? (b & 0x7fffffffu) : ~b;
  float score;
  std::memcpy(&score, &b, sizeof score);
  return score;
}
EP_INLINE int64_t key_id(RankKey key) { return int64_t(~uint32_t(key)); }

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
