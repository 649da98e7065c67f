#include "paramserver/parallel.h"

#include <algorithm>
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
  // Static interleaved split: blocks are equal-sized, so each thread gets an equal share.
  auto run = [&](std::int64_t t) {
    try {
      for (std::int64_t i = t; i < count; i += workers) fn(i);
    } catch (...) {
      errors[static_cast<std::size_t>(t)] = std::current_exception();
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
