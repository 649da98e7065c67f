// A dense parameter table: a flat float32 tensor cut into fixed-size blocks.
//
// Blocks are numbered globally (block b covers elements [b * block_size, min((b+1) * block_size, n))),
// so a server that holds only some blocks of a table uses the same numbers as every worker. Each held
// block owns its values, its optimizer state ("slots") and its step count, guarded by its own mutex:
// updates to different blocks run in parallel, updates to one block serialize and are never torn.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "paramserver/optimizer.h"

namespace paramserver {

// A table that needs more memory than the machine has, refused before anything was allocated.
// A std::bad_alloc (MemoryError to Python) whose message names the bytes needed and the memory
// the machine has; the bindings raise it as paramserver.errors.ResourceExhaustedError.
class TableTooLarge : public std::bad_alloc {
 public:
  explicit TableTooLarge(std::string message) : message_(std::move(message)) {}
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  std::string message_;
};

class DenseTable {
 public:
  // num_elements > 0, block_size > 0. `held` lists the global block ids this table stores (empty:
  // all of them). Values start at zero. Throws std::invalid_argument on a bad size, optimizer or
  // block id, and std::bad_alloc (with a message naming the bytes needed and the machine's
  // memory) before allocating anything when the table needs more than the machine's physical
  // memory.
  DenseTable(std::size_t num_elements, std::size_t block_size, const OptimizerConfig& optimizer,
             const std::vector<std::int64_t>& held = {});

  DenseTable(const DenseTable&) = delete;
  DenseTable& operator=(const DenseTable&) = delete;

  std::size_t num_elements() const { return num_elements_; }
  std::size_t block_size() const { return block_size_; }
  std::int64_t num_blocks() const { return num_blocks_; }
  const OptimizerConfig& optimizer() const { return optimizer_; }
  // Global ids of the blocks held here, ascending.
  std::vector<std::int64_t> held_blocks() const;
  bool holds(std::int64_t block) const;
  // First element and length of a block (any block of the table, held or not).
  std::size_t block_offset(std::int64_t block) const;
  std::size_t block_length(std::int64_t block) const;
  // Bytes of values plus optimizer state held by this table.
  std::size_t bytes() const;

  // One optimizer step on a held block; `grad` has block_length(block) elements.
  // Throws std::out_of_range for a block not held. Thread safe.
  void apply(std::int64_t block, const float* grad);
  // Copy a held block's values into `out` (block_length(block) elements). Thread safe.
  void read(std::int64_t block, float* out) const;
  // Overwrite a held block's values (optimizer state and step are kept). Thread safe.
  void assign(std::int64_t block, const float* values);
  // Updates applied to a held block so far.
  std::int64_t step(std::int64_t block) const;

  // Optimizer state of a held block, for checkpoints: slot s has block_length(block) elements.
  void read_slot(std::int64_t block, int slot, float* out) const;
  void restore_block(std::int64_t block, const float* values, const float* const* slots,
                     std::int64_t step);

 private:
  // Throws std::bad_alloc naming both sizes if `floats` arena floats plus the block table of
  // `blocks` entries and `held` block headers need more than the machine's physical memory.
  void check_fits_in_memory(std::size_t floats, std::size_t blocks, std::size_t held,
                            int slots) const;
  // A held block's state lives in the table's arena: the values, then each slot, each array
  // starting on a 64-byte boundary so that vector loads and stores never straddle a cache line.
  struct Block {
    std::size_t length = 0;
    std::size_t stride = 0;  // floats from the start of one array to the next
    int num_slots = 0;
    float* base = nullptr;   // into arena_
    std::int64_t step = 0;
    mutable std::mutex mu;
    float* values() const { return base; }
    float* slot(int s) const { return base + (1 + static_cast<std::size_t>(s)) * stride; }
  };
  Block& held(std::int64_t block);
  const Block& held(std::int64_t block) const;

  std::size_t num_elements_;
  std::size_t block_size_;
  std::int64_t num_blocks_;
  OptimizerConfig optimizer_;
  // One allocation for every held block's values and slots. Large arenas are aligned to 2 MiB and
  // marked for transparent huge pages: the kernels stream 4-5 arrays at once, and with 4 KiB pages
  // the TLB misses and prefetcher restarts at every page cost ~20% of Adam's throughput.
  std::unique_ptr<float, void (*)(void*)> arena_{nullptr, &std::free};
  // Indexed by global block id; null for blocks held elsewhere.
  std::vector<std::unique_ptr<Block>> blocks_;
};

}  // namespace paramserver
