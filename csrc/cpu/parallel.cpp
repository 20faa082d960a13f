#include "parallel.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define EP_CPU_RELAX() _mm_pause()
#else
#define EP_CPU_RELAX() ((void)0)
#endif

namespace edgeplaid {
namespace {

thread_local bool t_in_pool_task = false;

using Clock = std::chrono::steady_clock;

// How long an idle worker (and the caller waiting for the workers) polls before sleeping on the
// condition variable. Waking a sleeping thread costs ~20 us on the 2-vCPU VMs we measure on (a
// futex wake plus the scheduler's wake-up latency), paid by every kernel call: a PLAID search
// makes ~6 of them a query, ~0.1 ms of a 3 ms query. A worker that polls until the next call
// arrives (Python glue between kernels takes 10-100 us) starts it in well under a microsecond.
// Polling yields the CPU on every round, so a runnable thread (torch's OpenMP workers, another
// process) takes it at once; the budget bounds the cycles burnt when nothing comes.
// EDGEPLAID_SPIN_US overrides it (0: always sleep, the pool's behaviour before).
int64_t spin_budget_ns() {
  static const int64_t ns = [] {
    const char* env = std::getenv("EDGEPLAID_SPIN_US");
    long us = 100;
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      const long v = std::strtol(env, &end, 10);
      if (end != env && *end == '\0' && v >= 0) us = std::min(v, 100000L);
    }
    return int64_t(us) * 1000;
  }();
  return ns;
}

// Polls done() for up to the spin budget; true when it held.
template <class Done>
bool spin_until(Done&& done) {
  const int64_t budget = spin_budget_ns();
  if (budget == 0) return done();
  const Clock::time_point start = Clock::now();
  for (int round = 0;; ++round) {
    for (int i = 0; i < 16; ++i) {
      if (done()) return true;
      EP_CPU_RELAX();
    }
    if ((round & 7) == 7) {
      if (std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count() > budget)
        return done();
      sched_yield();  // another runnable thread on this CPU goes first
    }
  }
}

class Pool {
 public:
  explicit Pool(int n_threads) : n_threads_(std::max(1, n_threads)) {
    for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, i] { worker(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_.store(true);
    }
    cv_work_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return n_threads_; }

  // Runs job(thread_index) on every thread of the pool, the caller being thread 0.
  void run(const std::function<void(int)>& job) {
    {
      // Under the mutex: a worker about to sleep re-checks the generation under it, so the
      // wake-up below cannot be lost.
      std::lock_guard<std::mutex> lk(m_);
      job_ = &job;
      pending_.store(n_threads_ - 1, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_work_.notify_all();  // no system call when no worker sleeps
    t_in_pool_task = true;
    job(0);
    t_in_pool_task = false;
    if (!spin_until([this] { return pending_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lk(m_);
      cv_done_.wait(lk, [this] { return pending_.load(std::memory_order_acquire) == 0; });
    }
    job_ = nullptr;
  }

 private:
  void worker(int index) {
    uint64_t seen = 0;
    for (;;) {
      const auto ready = [&] {
        return stop_.load(std::memory_order_acquire) || generation_.load(std::memory_order_acquire) != seen;
      };
      if (!spin_until(ready)) {
        std::unique_lock<std::mutex> lk(m_);
        cv_work_.wait(lk, ready);
      }
      if (stop_.load(std::memory_order_acquire)) return;
      const std::function<void(int)>* job;
      {
        std::lock_guard<std::mutex> lk(m_);  // job_ was written under it, before the generation
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
      }
      t_in_pool_task = true;
      (*job)(index);
      t_in_pool_task = false;
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lk(m_);  // the caller checks pending_ under it before sleeping
        cv_done_.notify_one();
      }
    }
  }

  const int n_threads_;
  std::vector<std::thread> workers_;
  std::mutex m_;
  std::condition_variable cv_work_, cv_done_;
  const std::function<void(int)>* job_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
};

std::mutex g_pool_mutex;  // held for the whole of one parallel call
std::unique_ptr<Pool> g_pool;
pid_t g_pool_pid = 0;
std::atomic<int> g_requested{0};

int hardware_threads() {
  // Read once: glibc answers hardware_concurrency() by reading /sys/devices/system/cpu/online,
  // which cost 1-2% of every parallel call (a few microseconds each).
  static const int n = [] {
    const unsigned c = std::thread::hardware_concurrency();
    return c == 0 ? 1 : int(c);
  }();
  return n;
}

int wanted_threads() {
  const int n = g_requested.load();
  return n > 0 ? n : hardware_threads();
}

// Call with g_pool_mutex held.
Pool& pool_locked() {
  const int want = wanted_threads();
  if (g_pool && g_pool_pid != getpid()) {
    // After fork() the workers do not exist in the child: forget the pool without joining.
    (void)g_pool.release();
  }
  if (!g_pool || g_pool->size() != want) {
    g_pool.reset(new Pool(want));
    g_pool_pid = getpid();
  }
  return *g_pool;
}

// Runs job(thread_index, n_threads) once on each pool thread; inline as (0, 1) when the pool
// is busy or when called from inside a pool task.
void run_on_all(const std::function<void(int, int)>& job) {
  std::unique_lock<std::mutex> lk(g_pool_mutex, std::try_to_lock);
  if (t_in_pool_task || !lk.owns_lock()) {
    job(0, 1);
    return;
  }
  Pool& pool = pool_locked();
  const int n = pool.size();
  if (n == 1) {
    job(0, 1);
    return;
  }
  pool.run([&](int index) { job(index, n); });
}

}  // namespace

void set_num_threads(int n) { g_requested.store(n <= 0 ? 0 : n); }

int get_num_threads() { return wanted_threads(); }

int parallel_width() { return t_in_pool_task ? 1 : wanted_threads(); }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  if (n <= grain || wanted_threads() == 1) {
    fn(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  run_on_all([&](int, int) {
    for (;;) {
      const int64_t begin = next.fetch_add(grain);
      if (begin >= n) return;
      fn(begin, std::min(n, begin + grain));
    }
  });
}

void parallel_each_thread(const std::function<void(int, int)>& fn) { run_on_all(fn); }

}  // namespace edgeplaid
