#include "paramserver/embedding_table.h"

#include <algorithm>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>

#include "id_map.h"
#include "kernels.h"
#include "paramserver/parallel.h"

namespace paramserver {

namespace {

// A full chunk holds about this many bytes of records: large enough that a stripe needs few chunks
// (and glibc serves each from its own mmap, so freeing returns memory to the OS), small enough that
// a stripe's last, partly used chunk wastes little. A stripe's first chunks are smaller
// (kFirstChunkShift), so small tables stay small. Huge pages (2 MiB, madvise) were tried for full
// chunks: no measurable gain on random 4K-row batches over 1M rows on the 2-vCPU VMs, so the
// simpler heap allocation stays.
constexpr std::size_t kChunkTargetBytes = std::size_t{1} << 20;
// How far ahead batched loops prefetch map slots and row records: enough misses in flight to
// cover memory latency, few enough to stay in L1.
constexpr std::size_t kPrefetchAhead = 8;
constexpr std::size_t kMaxStripes = 4096;  // stripe_of() uses 12 hash bits
constexpr unsigned kFirstChunkShift = 4;   // a stripe's first chunk holds 16 rows

// Asks for every cache line of [p, p + bytes): a record spans several lines and the hardware
// prefetcher does not follow random rows.
inline void prefetch_span(const void* p, std::size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (std::size_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off);
}

struct AlignedDelete {
  void operator()(float* p) const { ::operator delete[](p, std::align_val_t{64}); }
};

}  // namespace

struct EmbeddingTable::Chunk {
  // Uninitialized on allocation: a record is written when its row is created, so pages of rows
  // not yet created never become resident.
  std::unique_ptr<float[], AlignedDelete> records;
  std::unique_ptr<std::int64_t[]> steps;
};

// Aligned to a cache line so two stripes' mutexes never share one (false sharing under 2 threads).
struct alignas(64) EmbeddingTable::Stripe {
  mutable std::mutex mu;
  IdMap map{&EmbeddingTable::hash};
  std::vector<Chunk> chunks;
  std::uint32_t rows = 0;
};

EmbeddingTable::EmbeddingTable(std::size_t dim, const OptimizerConfig& optimizer,
                               const InitializerConfig& initializer, std::uint64_t seed,
                               std::size_t num_stripes)
    : dim_(dim), optimizer_(optimizer), initializer_(initializer), seed_(seed) {
  if (dim == 0) throw std::invalid_argument("dim must be > 0");
  if (num_stripes == 0 || num_stripes > kMaxStripes || (num_stripes & (num_stripes - 1)) != 0) {
    throw std::invalid_argument("num_stripes must be a power of two in [1, " +
                                std::to_string(kMaxStripes) + "], got " +
                                std::to_string(num_stripes));
  }
  validate(optimizer);
  validate(initializer);
  num_slots_ = paramserver::num_slots(optimizer);
  record_floats_ = dim * (1 + static_cast<std::size_t>(num_slots_));
  if (record_floats_ / (1 + static_cast<std::size_t>(num_slots_)) != dim ||
      record_floats_ > (std::size_t{1} << 40)) {
    throw std::invalid_argument("dim " + std::to_string(dim) + " is too large");
  }
  const std::size_t record_bytes = record_floats_ * sizeof(float);
  chunk_shift_ = 0;
  while ((record_bytes << (chunk_shift_ + 1)) <= kChunkTargetBytes) ++chunk_shift_;
  first_chunk_shift_ = std::min(kFirstChunkShift, chunk_shift_);
  stripe_mask_ = num_stripes - 1;
  stripes_.reserve(num_stripes);
  for (std::size_t k = 0; k < num_stripes; ++k) stripes_.push_back(std::make_unique<Stripe>());
}

EmbeddingTable::~EmbeddingTable() = default;

int EmbeddingTable::threads_for(std::size_t n, int requested) const {
  const int stripes = static_cast<int>(stripes_.size());
  // A small batch runs on the calling thread even when more are allowed: starting threads
  // costs more than it saves below ~1M elements (a 4,096 x 64 push and pull: 2.6 ms on 2 threads
  // of a loaded 2-core machine, 0.8 ms on one).
  if (n * dim_ < kParallelMinElements) return 1;
  if (requested >= 1) return std::min(requested, stripes);
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return std::min(cores, stripes);
}

EmbeddingTable::Grouping EmbeddingTable::group(const std::uint64_t* ids, std::size_t n) const {
  if (n > IdMap::kNoRow) {
    throw std::length_error("a batch holds at most " + std::to_string(IdMap::kNoRow) +
                            " ids, got " + std::to_string(n));
  }
  Grouping g;
  const std::size_t k = stripes_.size();
  g.hashes.resize(n);
  g.order.resize(n);
  g.offsets.assign(k + 1, 0);
  // Counting sort by stripe: stable, so request order survives within a stripe.
  for (std::size_t i = 0; i < n; ++i) {
    g.hashes[i] = hash(ids[i]);
    ++g.offsets[stripe_of(g.hashes[i]) + 1];
  }
  for (std::size_t s = 0; s < k; ++s) g.offsets[s + 1] += g.offsets[s];
  std::vector<std::uint32_t> next(g.offsets.begin(), g.offsets.end() - 1);
  for (std::size_t i = 0; i < n; ++i) {
    g.order[next[stripe_of(g.hashes[i])]++] = static_cast<std::uint32_t>(i);
  }
  return g;
}

std::size_t EmbeddingTable::chunk_of(std::uint32_t row, std::size_t* within) const {
  if (row >> chunk_shift_) {
    *within = row & ((std::uint32_t{1} << chunk_shift_) - 1);
    return (chunk_shift_ - first_chunk_shift_) + (row >> chunk_shift_);
  }
  if (row < (std::uint32_t{1} << first_chunk_shift_)) {
    *within = row;
    return 0;
  }
  const unsigned top = 31u - static_cast<unsigned>(__builtin_clz(row));
  *within = row - (std::uint32_t{1} << top);
  return top - first_chunk_shift_ + 1;
}

std::size_t EmbeddingTable::chunk_rows(std::size_t chunk) const {
  if (chunk == 0) return std::size_t{1} << first_chunk_shift_;
  if (chunk <= chunk_shift_ - first_chunk_shift_) {
    return std::size_t{1} << (first_chunk_shift_ + chunk - 1);
  }
  return std::size_t{1} << chunk_shift_;
}

float* EmbeddingTable::record_at(Stripe& s, std::uint32_t row, std::int64_t** step) const {
  std::size_t within = 0;
  Chunk& c = s.chunks[chunk_of(row, &within)];
  *step = &c.steps[within];
  return c.records.get() + within * record_floats_;
}

float* EmbeddingTable::row_record(Stripe& s, std::uint64_t id, std::uint64_t h, std::int64_t** step,
                                  bool initialize) {
  const std::uint32_t row = s.map.find(id, h);
  if (row != IdMap::kNoRow) return record_at(s, row, step);
  if (s.rows == IdMap::kNoRow) {
    throw std::length_error("embedding stripe is full (" + std::to_string(s.rows) + " rows)");
  }
  // Allocate before inserting, so a failed allocation leaves the map without a dangling row.
  std::size_t within = 0;
  if (chunk_of(s.rows, &within) == s.chunks.size()) {
    const std::size_t rows_per_chunk = chunk_rows(s.chunks.size());
    Chunk c;
    c.records.reset(static_cast<float*>(::operator new[](
        rows_per_chunk * record_floats_ * sizeof(float), std::align_val_t{64})));
    c.steps.reset(new std::int64_t[rows_per_chunk]);
    s.chunks.push_back(std::move(c));
  }
  const std::uint32_t created = s.rows;
  s.map.find_or_insert(id, h, created);
  ++s.rows;
  float* rec = record_at(s, created, step);
  **step = 0;
  if (initialize) {
    initialize_row(initializer_, seed_, id, rec, dim_);
    for (int k = 0; k < num_slots_; ++k) {
      std::fill_n(rec + (1 + k) * dim_, dim_, slot_initial_value(optimizer_, k));
    }
  }
  return rec;
}

void EmbeddingTable::pull(const std::uint64_t* ids, std::size_t n, float* out, int num_threads) {
  if (n == 0) return;
  const Grouping g = group(ids, n);
  std::vector<const float*> recs(n);
  const std::size_t row_bytes = dim_ * sizeof(float);
  parallel_for(static_cast<std::int64_t>(stripes_.size()), threads_for(n, num_threads),
               [&](std::int64_t k) {
    const std::size_t begin = g.offsets[k], end = g.offsets[k + 1];
    if (begin == end) return;
    Stripe& s = *stripes_[k];
    std::lock_guard<std::mutex> lock(s.mu);
    std::int64_t* step = nullptr;
    // Two passes so that both the map probes and the row copies have misses in flight.
    for (std::size_t i = begin; i < end; ++i) {
      if (i + kPrefetchAhead < end) s.map.prefetch(g.hashes[g.order[i + kPrefetchAhead]]);
      const std::uint32_t pos = g.order[i];
      recs[i] = row_record(s, ids[pos], g.hashes[pos], &step);
    }
    for (std::size_t i = begin; i < end; ++i) {
      if (i + kPrefetchAhead < end) prefetch_span(recs[i + kPrefetchAhead], row_bytes);
      std::memcpy(out + g.order[i] * dim_, recs[i], row_bytes);
    }
  });
}

void EmbeddingTable::lookup(const std::uint64_t* ids, std::size_t n, float* out,
                            int num_threads) const {
  if (n == 0) return;
  const Grouping g = group(ids, n);
  const std::size_t row_bytes = dim_ * sizeof(float);
  parallel_for(static_cast<std::int64_t>(stripes_.size()), threads_for(n, num_threads),
               [&](std::int64_t k) {
    const std::size_t begin = g.offsets[k], end = g.offsets[k + 1];
    if (begin == end) return;
    Stripe& s = *stripes_[k];
    std::lock_guard<std::mutex> lock(s.mu);
    for (std::size_t i = begin; i < end; ++i) {
      if (i + kPrefetchAhead < end) s.map.prefetch(g.hashes[g.order[i + kPrefetchAhead]]);
      const std::uint32_t pos = g.order[i];
      float* dst = out + pos * dim_;
      const std::uint32_t row = s.map.find(ids[pos], g.hashes[pos]);
      if (row == IdMap::kNoRow) {
        initialize_row(initializer_, seed_, ids[pos], dst, dim_);
      } else {
        std::int64_t* step = nullptr;
        std::memcpy(dst, record_at(s, row, &step), row_bytes);
      }
    }
  });
}

void EmbeddingTable::push(const std::uint64_t* ids, std::size_t n, const float* grads,
                          int num_threads) {
  if (n == 0) return;
  const Grouping g = group(ids, n);
  parallel_for(static_cast<std::int64_t>(stripes_.size()), threads_for(n, num_threads),
               [&](std::int64_t k) {
    const std::size_t begin = g.offsets[k], end = g.offsets[k + 1];
    if (begin == end) return;
    const std::size_t count = end - begin;
    // 1. Merge duplicates without the lock: a small open-addressing table over this stripe's
    //    positions maps an id to its first position; a repeated id gets an accumulator that starts
    //    as a copy of the first gradient and adds later ones in request order.
    std::vector<std::uint32_t> first;      // first position of each distinct id, in order
    std::vector<std::int32_t> acc_of;      // accumulator index per distinct id, -1: none
    std::vector<float> acc;                // accumulators, dim floats each
    first.reserve(count);
    acc_of.reserve(count);
    if (count == 1) {
      first.push_back(g.order[begin]);
      acc_of.push_back(-1);
    } else {
      std::size_t cap = 4;
      while (cap < 2 * count) cap <<= 1;
      std::vector<std::int32_t> table(cap, -1);
      for (std::size_t i = begin; i < end; ++i) {
        const std::uint32_t pos = g.order[i];
        std::size_t slot = g.hashes[pos] & (cap - 1);
        while (table[slot] >= 0 && ids[first[table[slot]]] != ids[pos]) slot = (slot + 1) & (cap - 1);
        if (table[slot] < 0) {
          table[slot] = static_cast<std::int32_t>(first.size());
          first.push_back(pos);
          acc_of.push_back(-1);
          continue;
        }
        const std::int32_t d = table[slot];
        if (acc_of[d] < 0) {
          acc_of[d] = static_cast<std::int32_t>(acc.size() / dim_);
          acc.insert(acc.end(), grads + first[d] * dim_, grads + (first[d] + 1) * dim_);
        }
        kernels::add_into(acc.data() + acc_of[d] * dim_, grads + pos * dim_, dim_);
      }
    }
    const std::size_t distinct = first.size();
    std::vector<float*> recs(distinct);
    std::vector<std::int64_t*> steps(distinct);
    // 2. Under the lock: find or create every row, then one optimizer step per distinct row.
    Stripe& s = *stripes_[k];
    std::lock_guard<std::mutex> lock(s.mu);
    for (std::size_t d = 0; d < distinct; ++d) {
      if (d + kPrefetchAhead < distinct) s.map.prefetch(g.hashes[first[d + kPrefetchAhead]]);
      const std::uint32_t pos = first[d];
      recs[d] = row_record(s, ids[pos], g.hashes[pos], &steps[d]);
    }
    float* slot_ptrs[3] = {nullptr, nullptr, nullptr};
    const std::size_t record_bytes = record_floats_ * sizeof(float);
    for (std::size_t d = 0; d < distinct; ++d) {
      if (d + kPrefetchAhead < distinct) {
        prefetch_span(recs[d + kPrefetchAhead], record_bytes);
        if (acc_of[d + kPrefetchAhead] < 0) {
          prefetch_span(grads + first[d + kPrefetchAhead] * dim_, dim_ * sizeof(float));
        }
      }
      float* rec = recs[d];
      for (int j = 0; j < num_slots_; ++j) slot_ptrs[j] = rec + (1 + j) * dim_;
      const float* grad = acc_of[d] < 0 ? grads + first[d] * dim_ : acc.data() + acc_of[d] * dim_;
      const std::int64_t step = *steps[d] + 1;
      apply_step(optimizer_, rec, grad, slot_ptrs, dim_, step);
      *steps[d] = step;
    }
  });
}

std::size_t EmbeddingTable::num_rows() const {
  std::size_t total = 0;
  for (const auto& s : stripes_) {
    std::lock_guard<std::mutex> lock(s->mu);
    total += s->rows;
  }
  return total;
}

std::size_t EmbeddingTable::bytes() const {
  const std::size_t row_bytes = record_floats_ * sizeof(float) + sizeof(std::int64_t);
  std::size_t total = stripes_.size() * sizeof(Stripe);
  for (const auto& s : stripes_) {
    std::lock_guard<std::mutex> lock(s->mu);
    for (std::size_t c = 0; c < s->chunks.size(); ++c) total += chunk_rows(c) * row_bytes;
    total += s->chunks.capacity() * sizeof(Chunk) + s->map.bytes();
  }
  return total;
}

bool EmbeddingTable::contains(std::uint64_t id) const {
  const std::uint64_t h = hash(id);
  const Stripe& s = *stripes_[stripe_of(h)];
  std::lock_guard<std::mutex> lock(s.mu);
  return s.map.find(id, h) != IdMap::kNoRow;
}

EmbeddingRows EmbeddingTable::export_rows() const {
  EmbeddingRows out;
  for (;;) {
    const std::size_t n = num_rows();
    out.ids.resize(n);
    out.values.resize(n * dim_);
    out.slots.resize(n * dim_ * num_slots_);
    out.steps.resize(n);
    const std::size_t got = export_rows_into(n, out.ids.data(), out.values.data(),
                                             out.slots.data(), out.steps.data());
    if (got <= n) {  // rows created between the count and the copy: try again with room
      out.ids.resize(got);
      out.values.resize(got * dim_);
      out.slots.resize(got * dim_ * num_slots_);
      out.steps.resize(got);
      return out;
    }
  }
}

std::size_t EmbeddingTable::export_rows_into(std::size_t capacity, std::uint64_t* ids,
                                             float* values, float* slots,
                                             std::int64_t* steps) const {
  std::vector<std::unique_lock<std::mutex>> locks;
  locks.reserve(stripes_.size());
  std::size_t n = 0;
  for (const auto& s : stripes_) {
    locks.emplace_back(s->mu);
    n += s->rows;
  }
  if (n > capacity) return n;
  std::size_t base = 0;
  for (const auto& sp : stripes_) {
    Stripe& s = *sp;
    // The map knows each row's id; rows are numbered densely from 0 in creation order.
    s.map.for_each([&](std::uint64_t id, std::uint32_t row) { ids[base + row] = id; });
    for (std::uint32_t row = 0; row < s.rows; ++row) {
      std::int64_t* step = nullptr;
      const float* rec = record_at(s, row, &step);
      const std::size_t r = base + row;
      std::memcpy(values + r * dim_, rec, dim_ * sizeof(float));
      if (num_slots_ > 0) {
        std::memcpy(slots + r * num_slots_ * dim_, rec + dim_, num_slots_ * dim_ * sizeof(float));
      }
      steps[r] = *step;
    }
    base += s.rows;
  }
  return n;
}

void EmbeddingTable::import_rows(const std::uint64_t* ids, std::size_t n, const float* values,
                                 const float* slots, const std::int64_t* steps) {
  for (std::size_t i = 0; i < n; ++i) {
    if (steps[i] < 0) {
      throw std::invalid_argument("step of row " + std::to_string(i) + " (id " +
                                  std::to_string(ids[i]) + ") must be >= 0, got " +
                                  std::to_string(steps[i]));
    }
  }
  {
    std::vector<std::uint64_t> sorted(ids, ids + n);
    std::sort(sorted.begin(), sorted.end());
    const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    if (dup != sorted.end()) {
      throw std::invalid_argument("id " + std::to_string(*dup) + " appears more than once");
    }
  }
  const Grouping g = group(ids, n);
  for (std::size_t k = 0; k < stripes_.size(); ++k) {
    Stripe& s = *stripes_[k];
    std::lock_guard<std::mutex> lock(s.mu);
    for (std::size_t i = g.offsets[k]; i < g.offsets[k + 1]; ++i) {
      const std::uint32_t pos = g.order[i];
      std::int64_t* step = nullptr;
      float* rec = row_record(s, ids[pos], g.hashes[pos], &step, /*initialize=*/false);
      std::memcpy(rec, values + pos * dim_, dim_ * sizeof(float));
      if (num_slots_ > 0) {
        std::memcpy(rec + dim_, slots + pos * num_slots_ * dim_, num_slots_ * dim_ * sizeof(float));
      }
      *step = steps[pos];
    }
  }
}

void EmbeddingTable::clear() {
  for (auto& s : stripes_) {
    std::lock_guard<std::mutex> lock(s->mu);
    s->map.clear();
    std::vector<Chunk>().swap(s->chunks);
    s->rows = 0;
  }
}

}  // namespace paramserver
