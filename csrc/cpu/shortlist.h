// A token's shortlist of its best centroids on one thread (centroid_scores' top-k on every ISA).
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>

#include "rank_key.h"

namespace edgeplaid {
namespace EDGEPLAID_ISA_NS {

// One token's shortlist of centroids on one thread. Every score above the threshold is
// appended (a store, no branches on the data); when the list is full, nth_element keeps the
// k best and the threshold rises to the k-th best score. A binary heap costs ~2 mispredicted
// branches per level on every insertion instead: at n_probe 32 that was 0.3 ms of a 0.8 ms
// call. Centroids arrive in increasing id order, so a later score equal to the threshold
// loses to the kept one, as the lower id must.
struct Shortlist {
  RankKey* items;
  int64_t size;
};

EP_INLINE void keep_best(Shortlist& list, int64_t k, float* thr) {
  std::nth_element(list.items, list.items + (k - 1), list.items + list.size, std::greater<RankKey>());
  list.size = k;
  *thr = key_score(list.items[k - 1]);
}

// Room per shortlist: each compaction drops at least k + 64 entries for O(2k + 64) work.
inline int64_t shortlist_capacity(int64_t k) { return 2 * k + 64; }

}  // namespace EDGEPLAID_ISA_NS
}  // namespace edgeplaid
