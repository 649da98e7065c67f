#include "paramserver/parallel.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace paramserver {

void parallel_for(std::int64_t count, int num_threads, const std::function<void(std::int64_t)>& fn) {
  if (num_threads < 1) {
    throw std::invalid_argument("num_threads must be >= 1, got " + std::to_string(num_threads));
  }
  const std::int64_t workers = std::max<std::int64_t>(1, std::min<std::int64_t>(num_threads, count));
  if (workers == 1) {
    for (std::int64_t i = 0; i < count; ++i) fn(i);
    return;
  }
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(workers));
  // Dynamic split: each thread takes the next item when it is free. The items cost the same, but
  // the threads do not run alike on a shared machine (a server also runs its RPC threads), and a
  // static split would make every call wait for its most-preempted thread.
  std::atomic<std::int64_t> next{0};
  auto run = [&](std::int64_t t) {
    try {
      for (std::int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < count;
           i = next.fetch_add(1, std::memory_order_relaxed)) {
        fn(i);
      }
    } catch (...) {
      errors[static_cast<std::size_t>(t)] = std::current_exception();
      // Let the other threads stop early: no item after a failure is started.
      next.store(count, std::memory_order_relaxed);
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(workers - 1));
  for (std::int64_t t = 1; t < workers; ++t) threads.emplace_back(run, t);
  run(0);
  for (auto& th : threads) th.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

}  // namespace paramserver
