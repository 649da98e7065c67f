// A sparse embedding table (one server's shard): any 64-bit id -> a row of `dim` float32 values
// plus that row's optimizer state and step count.
//
// Rows are created on first touch (pull or push) with a deterministic initializer, so a row's
// initial values depend only on (initializer, seed, id). Every push applies one optimizer step per
// distinct row with the semantics of torch.optim applied to that row alone: rows not pushed stay
// untouched, and each row counts its own steps (SGD momentum's first step, Adagrad's lr_decay,
// Adam's bias correction).
//
// Layout. The table is split by id hash into `num_stripes` stripes, each with its own mutex, an
// open-addressing id -> row map and row storage in fixed-size chunks. A row record is contiguous:
// [values | slot 0 | ... | slot S-1], each `dim` floats, so an update runs on contiguous spans.
// Chunks are allocated once and never move or get copied: growth costs one allocation per chunk
// and resident memory stays near the bytes of the rows actually created.
//
// Thread safety: every method may be called from any number of threads at once. A batch holds one
// stripe's lock while it reads or updates that stripe's rows, so a row is never seen half-updated
// and no update is lost. Batches are split by stripe and, when large, processed on several threads.
// Whole-table operations (export, import, clear, bytes) lock every stripe, in stripe order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "paramserver/initializer.h"
#include "paramserver/optimizer.h"

namespace paramserver {

class IdMap;

// Rows copied out of a table (a checkpoint's content), row r at the same index in every array.
struct EmbeddingRows {
  std::vector<std::uint64_t> ids;    // n
  std::vector<float> values;         // n * dim
  std::vector<float> slots;          // n * num_slots * dim: row r's slot s at (r * S + s) * dim
  std::vector<std::int64_t> steps;   // n: optimizer steps applied to each row
};

class EmbeddingTable {
 public:
  // dim > 0; 1 <= num_stripes <= 4096, a power of two. Throws std::invalid_argument on a bad
  // dimension, stripe count, optimizer or initializer.
  EmbeddingTable(std::size_t dim, const OptimizerConfig& optimizer,
                 const InitializerConfig& initializer, std::uint64_t seed = 0,
                 std::size_t num_stripes = kDefaultStripes);
  ~EmbeddingTable();

  EmbeddingTable(const EmbeddingTable&) = delete;
  EmbeddingTable& operator=(const EmbeddingTable&) = delete;

  static constexpr std::size_t kDefaultStripes = 32;
  // Batches with fewer than this many elements (ids x dim) run on the calling thread only.
  // parallel_for starts a thread per call (tens of microseconds, far more on a busy machine),
  // and a 4,096 x 64 batch takes ~0.2-0.8 ms on one thread: benchmarks/bench_embedding.py found
  // 2 threads slower at dim <= 64 and faster only from 4,096 x 256 (Adagrad) up.
  static constexpr std::size_t kParallelMinElements = std::size_t{1} << 20;

  std::size_t dim() const { return dim_; }
  const OptimizerConfig& optimizer() const { return optimizer_; }
  const InitializerConfig& initializer() const { return initializer_; }
  std::uint64_t seed() const { return seed_; }
  std::size_t num_stripes() const { return stripes_.size(); }
  int num_slots() const { return num_slots_; }

  // Copies the rows of ids[0, n) into out[0, n * dim), in request order (duplicates repeated),
  // creating missing rows with the initializer. num_threads: 0 picks (1 for small batches, up to
  // the hardware's cores for large ones); >= 1 is an upper bound. Blocks on stripe locks.
  void pull(const std::uint64_t* ids, std::size_t n, float* out, int num_threads = 0);

  // Like pull(), but never creates a row: an id not held gets the initializer's values for it (the
  // row it would be created with) and the table is left unchanged. For evaluation and serving,
  // which must not grow the table. Blocks on stripe locks.
  void lookup(const std::uint64_t* ids, std::size_t n, float* out, int num_threads = 0) const;

  // Applies one optimizer step to every distinct id of ids[0, n). The gradients grads[i * dim,
  // (i + 1) * dim) of equal ids are summed first, in the order they appear (as torch's sparse
  // coalesce does); missing rows are created with the initializer before their first step.
  // num_threads as in pull(). Nothing here can fail on valid pointers except allocation
  // (std::bad_alloc) or a stripe exceeding 2^32 - 1 rows (std::length_error); rows already
  // stepped when that happens stay stepped.
  void push(const std::uint64_t* ids, std::size_t n, const float* grads, int num_threads = 0);

  // Number of rows (distinct ids ever touched since construction or clear()).
  std::size_t num_rows() const;
  // Bytes allocated for rows (values + optimizer state + step counts, whole chunks) and maps.
  std::size_t bytes() const;
  bool contains(std::uint64_t id) const;

  // Every row, stripe by stripe, in creation order within a stripe. A consistent snapshot: all
  // stripes are locked for the copy.
  EmbeddingRows export_rows() const;
  // export_rows() into caller-provided buffers of `capacity` rows (layout as EmbeddingRows), so a
  // checkpoint can copy into memory it allocated and touched beforehand. Returns the number of rows
  // written, or, without writing anything, the number of rows held when that exceeds `capacity`.
  std::size_t export_rows_into(std::size_t capacity, std::uint64_t* ids, float* values,
                               float* slots, std::int64_t* steps) const;
  // Creates or overwrites n rows with the given values, slots (layout as EmbeddingRows) and step
  // counts. Throws std::invalid_argument, before changing anything, on a negative step or a
  // repeated id.
  void import_rows(const std::uint64_t* ids, std::size_t n, const float* values, const float* slots,
                   const std::int64_t* steps);
  // Drops every row and frees their memory.
  void clear();

 private:
  struct Chunk;
  struct Stripe;

  static std::uint64_t hash(std::uint64_t id) { return mix64(id); }
  // The stripe comes from the hash's top 12 bits and the map slot from its low bits, so the two
  // choices are independent.
  std::size_t stripe_of(std::uint64_t hash) const { return (hash >> 52) & stripe_mask_; }
  int threads_for(std::size_t n, int requested) const;

  // Returns the record of `id`, creating it if absent (filled by the initializer when `initialize`,
  // left for the caller to overwrite otherwise). Caller holds s.mu. Strong guarantee: on
  // std::bad_alloc / std::length_error the stripe is unchanged.
  float* row_record(Stripe& s, std::uint64_t id, std::uint64_t hash, std::int64_t** step,
                    bool initialize = true);
  float* record_at(Stripe& s, std::uint32_t row, std::int64_t** step) const;
  // Chunk sizes grow 2^m, 2^m, 2^(m+1), ... up to 2^M rows and then stay at 2^M (m =
  // kFirstChunkShift, M = chunk_shift_): a small table allocates little, a large one mostly full
  // chunks. chunk_of() maps a row number to (chunk, row within chunk).
  std::size_t chunk_of(std::uint32_t row, std::size_t* within) const;
  std::size_t chunk_rows(std::size_t chunk) const;

  // Positions 0..n-1 grouped by stripe, stable (request order within a stripe).
  struct Grouping {
    std::vector<std::uint64_t> hashes;   // per position
    std::vector<std::uint32_t> order;    // positions, grouped by stripe
    std::vector<std::uint32_t> offsets;  // stripe k's positions: order[offsets[k], offsets[k+1])
  };
  Grouping group(const std::uint64_t* ids, std::size_t n) const;

  std::size_t dim_;
  OptimizerConfig optimizer_;
  InitializerConfig initializer_;
  std::uint64_t seed_;
  int num_slots_;
  std::size_t record_floats_;     // dim * (1 + num_slots)
  unsigned chunk_shift_;          // rows per full chunk = 1 << chunk_shift_
  unsigned first_chunk_shift_;    // rows of the first chunk = 1 << first_chunk_shift_
  std::size_t stripe_mask_;       // num_stripes - 1
  std::vector<std::unique_ptr<Stripe>> stripes_;
};

}  // namespace paramserver
