// Each thread its own share, and the others take from its end when it falls behind: kernels that
// keep their pace on a CPU the engine shares.
//
// at::parallel_for gives each thread one equal, fixed share, and the kernel ends when the last
// share is done: a thread whose core another process took (a busy neighbour, a sidecar, a CFS
// quota) holds every other thread at that barrier, ~270 times a decode step. Here each thread
// works through its share from the front, one unit (`grain` items) at a time, and a thread that
// has finished its own takes units from the back of the others' shares. On a quiet CPU nobody
// steals and each thread walks exactly the fixed share, in order (handing out small chunks from
// one counter instead measured ~10% slower on the 576-wide GEMMs: 18 panel pairs never divide
// evenly into chunks). Which thread computes a unit never changes its bits, so the results are
// those of the fixed split: set_dynamic_split(false) brings that split back for the test that
// checks it.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

namespace pagedserve {

inline std::atomic<bool>& dynamic_split_flag() {
  static std::atomic<bool> on{true};
  return on;
}

// The thread count that shapes work decompositions (into how many ranges a decode attention
// splits each sequence), fixed by the engine at start: the threads that then run the work may
// be fewer (the engine's measured choice of 1 or N on a shared CPU) without changing any result.
// 0: the current thread count.
inline std::atomic<int64_t>& planned_threads_value() {
  static std::atomic<int64_t> n{0};
  return n;
}

inline int64_t planned_threads() {
  const int64_t n = planned_threads_value().load(std::memory_order_relaxed);
  return n > 0 ? n : at::get_num_threads();
}

// One thread's share of units [lo, hi), both ends in one word: the owner takes from lo, others
// from hi, by compare-and-swap, so a unit is taken exactly once.
struct alignas(64) Share {
  std::atomic<uint64_t> v;
  static uint64_t pack(uint32_t lo, uint32_t hi) { return uint64_t(hi) << 32 | lo; }
  int64_t take(bool front) {
    uint64_t cur = v.load(std::memory_order_relaxed);
    for (;;) {
      const uint32_t lo = uint32_t(cur), hi = uint32_t(cur >> 32);
      if (lo >= hi) return -1;
      const uint64_t next = front ? pack(lo + 1, hi) : pack(lo, hi - 1);
      if (v.compare_exchange_weak(cur, next, std::memory_order_relaxed)) return front ? lo : hi - 1;
    }
  }
};

// at::parallel_for's contract, f(b, e) over [begin, end) with at least `grain` items per call,
// the units shared out as above.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  if (!dynamic_split_flag().load(std::memory_order_relaxed)) {
    at::parallel_for(begin, end, grain, f);
    return;
  }
  grain = std::max<int64_t>(grain, 1);
  const int64_t units = (n + grain - 1) / grain;
  const int64_t threads = std::min<int64_t>(at::in_parallel_region() ? 1 : at::get_num_threads(), units);
  if (threads <= 1) {
    f(begin, end);
    return;
  }
  std::unique_ptr<Share[]> shares(new Share[threads]);
  for (int64_t t = 0; t < threads; ++t)
    shares[t].v.store(Share::pack(uint32_t(t * units / threads), uint32_t((t + 1) * units / threads)));
  auto run = [&](int64_t u) { f(begin + u * grain, std::min(end, begin + (u + 1) * grain)); };
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t u; (u = shares[t].take(true)) >= 0;) run(u);
    for (int64_t k = 1; k < threads; ++k)  // then help the others, from the back of their shares
      for (int64_t u; (u = shares[(t0 + k) % threads].take(false)) >= 0;) run(u);
  });
}

}  // namespace pagedserve
