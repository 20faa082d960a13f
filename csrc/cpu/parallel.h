// One persistent thread pool per process. Idle workers poll for the next call for a short
// while (EDGEPLAID_SPIN_US, default 100 us, yielding the CPU on every round), then sleep on a
// condition variable; the calling thread works too. A call made
// while the pool is busy (another Python thread, or a nested call) runs inline instead of
// queueing, so there is never oversubscription nor deadlock.
#pragma once
#include <cstdint>
#include <functional>

namespace edgeplaid {

void set_num_threads(int n);  // n <= 0: one per hardware thread
int get_num_threads();

// The threads a parallel call made here would use: 1 inside a pool task (nested calls run
// inline), else get_num_threads(). Kernels size their per-thread state and choose between
// splitting one query and running one query a thread by it.
int parallel_width();

// Calls fn(begin, end) over [0, n) in chunks of `grain`, dynamically balanced.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// Calls fn(thread_index, n_threads) once on each of the pool's threads (for probes).
void parallel_each_thread(const std::function<void(int, int)>& fn);

}  // namespace edgeplaid
