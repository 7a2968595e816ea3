// The kernels' own threads: every loop of the module splits its work through
// parallel_for, over one pool shared by all the kernels.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include <sched.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace cpu_kernels {

// A pause inside a spin loop: it leaves the core to its hyperthread sibling and
// keeps the loop from flooding the memory system with loads.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// One worker per core this process may run on, besides the calling thread, each loop
// split between them. Between loops a worker spins for up to 100 us before sleeping on
// a futex: a decoded token is many small loops close together, and waking a sleeper
// costs more than the gap; the spin ends long before a prompt's or a training step's
// BLAS call needs the core. Not OpenMP: its sleeping threads are slow to start a small
// matvec, and its spinning ones (OMP_WAIT_POLICY=active) starve the BLAS's own threads.
class Workers {
 public:
  // One pool for the whole module: a static in an inline function is one object per
  // shared library, whichever kernel's file calls it first.
  static Workers& get() {
    static Workers* workers = new Workers();  // never destroyed: the threads outlive statics
    return *workers;
  }

  // body(begin, end) on contiguous parts of [0, n), one part per thread.
  template <typename Body>
  void parallel_for(int64_t n, const Body& body) {
    const int parts = int(threads_.size()) + 1;
    if (n <= 1 || parts == 1) {
      if (n > 0) body(0, n);
      return;
    }
    auto run_part = [&](int part) {
      const int64_t begin = n * part / parts, end = n * (part + 1) / parts;
      if (begin < end) body(begin, end);
    };
    std::lock_guard<std::mutex> lock(mutex_);  // one loop at a time
    job_ = &run_part;
    call_ = [](const void* job, int part) { (*static_cast<const decltype(run_part)*>(job))(part); };
    pending_.store(parts - 1, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    std::exception_ptr error;  // rethrown only once no worker still uses run_part
    try {
      run_part(0);
    } catch (...) {
      error = std::current_exception();
    }
    // The parts are even: the others finish about when this one does.
    for (int spins = 0;; spins++) {
      const int left = pending_.load(std::memory_order_acquire);
      if (left == 0) break;
      if (spins < 4096) cpu_relax();
      else pending_.wait(left, std::memory_order_acquire);
    }
    if (error) std::rethrow_exception(error);
  }

 private:
  Workers() {
    cpu_set_t cpus;
    const int cores = sched_getaffinity(0, sizeof(cpus), &cpus) == 0 ? CPU_COUNT(&cpus) : 1;
    for (int part = 1; part < cores; part++) threads_.emplace_back([this, part] { work(part); });
    for (auto& t : threads_) t.detach();
  }

  void work(int part) {
    uint32_t seen = 0;  // the generation at construction: no loop was posted before
    for (;;) {
      spin_while_unchanged(seen, std::chrono::microseconds(100));
      generation_.wait(seen, std::memory_order_acquire);  // returns once it differs
      seen = generation_.load(std::memory_order_acquire);
      call_(job_, part);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) pending_.notify_one();
    }
  }

  void spin_while_unchanged(uint32_t seen, std::chrono::microseconds limit) const {
    const auto until = std::chrono::steady_clock::now() + limit;
    for (int i = 1; generation_.load(std::memory_order_acquire) == seen; i++)
      if (i % 64 != 0) cpu_relax();
      else if (std::chrono::steady_clock::now() > until) return;
  }

  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::atomic<uint32_t> generation_{0};
  std::atomic<int> pending_{0};
  const void* job_ = nullptr;
  void (*call_)(const void*, int) = nullptr;
};

template <typename Body>
void parallel_for(int64_t n, const Body& body) {
  Workers::get().parallel_for(n, body);
}

// body(begin, end) over the elements [0, n), split between the threads in chunks:
// for elementwise loops, whose parts need not follow any row structure.
template <typename Body>
void parallel_elements(size_t n, const Body& body) {
  constexpr size_t chunk = 4096;
  parallel_for(int64_t((n + chunk - 1) / chunk), [&](int64_t first, int64_t last) {
    body(size_t(first) * chunk, std::min(n, size_t(last) * chunk));
  });
}

}  // namespace cpu_kernels
