#include "parallel.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace edgeplaid {
namespace {

thread_local bool t_in_pool_task = false;

class Pool {
 public:
  explicit Pool(int n_threads) : n_threads_(std::max(1, n_threads)) {
    for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, i] { worker(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
    }
    cv_work_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return n_threads_; }

  // Runs job(thread_index) on every thread of the pool, the caller being thread 0.
  void run(const std::function<void(int)>& job) {
    {
      std::lock_guard<std::mutex> lk(m_);
      job_ = &job;
      pending_ = n_threads_ - 1;
      ++generation_;
    }
    cv_work_.notify_all();
    t_in_pool_task = true;
    job(0);
    t_in_pool_task = false;
    std::unique_lock<std::mutex> lk(m_);
    cv_done_.wait(lk, [this] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void worker(int index) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* job;
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_work_.wait(lk, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        job = job_;
      }
      t_in_pool_task = true;
      (*job)(index);
      t_in_pool_task = false;
      std::lock_guard<std::mutex> lk(m_);
      if (--pending_ == 0) cv_done_.notify_one();
    }
  }

  const int n_threads_;
  std::vector<std::thread> workers_;
  std::mutex m_;
  std::condition_variable cv_work_, cv_done_;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
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
