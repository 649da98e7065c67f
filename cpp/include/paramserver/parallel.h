// The core's only threading primitive: a blocking parallel loop for large batched calls.
#pragma once

#include <cstdint>
#include <functional>

namespace paramserver {

// Runs fn(i) for every i in [0, count) on up to `num_threads` threads, the caller's included, and
// returns when all are done. Threads take the next unstarted index as they become free, so the
// order across threads is unspecified.
// After an exception no further index is started; the first exception is rethrown in the caller
// once every thread has finished.
// Throws std::invalid_argument (before running anything) if num_threads < 1.
void parallel_for(std::int64_t count, int num_threads, const std::function<void(std::int64_t)>& fn);

}  // namespace paramserver
