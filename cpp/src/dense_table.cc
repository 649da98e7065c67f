#include "paramserver/dense_table.h"

#include <algorithm>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>

#include <unistd.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace paramserver {

namespace {

// Cache-line (and AVX-512 vector) size.
constexpr std::size_t kAlignment = 64;
constexpr std::size_t kHugePage = std::size_t{2} << 20;
// Largest arena, in floats, whose byte size (rounded up to a huge page) still fits in size_t.
constexpr std::size_t kMaxFloats = (SIZE_MAX - kHugePage) / sizeof(float);

std::size_t round_up(std::size_t n, std::size_t to) { return (n + to - 1) / to * to; }

// `bytes` of memory aligned for the kernels; huge-page backed where the OS allows it.
float* allocate_arena(std::size_t bytes) {
  const std::size_t align = bytes >= kHugePage ? kHugePage : kAlignment;
  const std::size_t size = round_up(bytes, align);
  void* p = std::aligned_alloc(align, size);
  if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Advice only: with THP disabled it fails or is ignored, and the table still works.
  if (align == kHugePage) (void)madvise(p, size, MADV_HUGEPAGE);
#endif
  return static_cast<float*>(p);
}

// Physical memory of this machine in bytes (0: unknown).
std::size_t physical_memory() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) {
    const auto p = static_cast<std::size_t>(pages), s = static_cast<std::size_t>(page);
    return p > SIZE_MAX / s ? SIZE_MAX : p * s;
  }
#endif
  return 0;
}

}  // namespace

void DenseTable::check_fits_in_memory(std::size_t floats, std::size_t blocks, std::size_t held,
                                      int slots) const {
  const std::size_t machine = physical_memory();
  // The arena, the block table (one pointer per block of the table) and each held block's header.
  const std::size_t pointers =
      blocks > SIZE_MAX / sizeof(void*) ? SIZE_MAX : blocks * sizeof(void*);
  std::size_t needed = floats * sizeof(float);
  needed = needed > SIZE_MAX - pointers ? SIZE_MAX : needed + pointers;
  const std::size_t headers = held > SIZE_MAX / sizeof(Block) ? SIZE_MAX : held * sizeof(Block);
  needed = needed > SIZE_MAX - headers ? SIZE_MAX : needed + headers;
  if (machine == 0 || needed <= machine) return;
  throw TableTooLarge("a dense table of " + std::to_string(num_elements_) + " elements (" +
                 std::to_string(held) + " of its " + std::to_string(blocks) +
                 " blocks held here, values and " + std::to_string(slots) +
                 " optimizer state arrays) needs " + std::to_string(needed) +
                 " bytes, but this machine has " + std::to_string(machine) +
                 " bytes of memory; nothing was allocated");
}

DenseTable::DenseTable(std::size_t num_elements, std::size_t block_size,
                       const OptimizerConfig& optimizer, const std::vector<std::int64_t>& held)
    : num_elements_(num_elements), block_size_(block_size), optimizer_(optimizer) {
  if (num_elements == 0) throw std::invalid_argument("num_elements must be > 0");
  if (block_size == 0) throw std::invalid_argument("block_size must be > 0");
  validate(optimizer);
  // Not (n + size - 1) / size, which wraps for n near SIZE_MAX.
  const std::size_t blocks = num_elements / block_size + (num_elements % block_size != 0 ? 1 : 0);
  if (blocks > static_cast<std::size_t>(INT64_MAX)) throw std::bad_alloc();
  num_blocks_ = static_cast<std::int64_t>(blocks);
  const int slots = num_slots(optimizer);
  constexpr std::size_t kAlignFloats = kAlignment / sizeof(float);

  // Everything the table needs is sized (and checked against the machine's memory) before any of
  // it is allocated: a table that cannot fit fails at once with a message saying so, instead of
  // with a bare std::bad_alloc or, past overcommit, the OOM killer while the arena is zero-filled.
  const std::size_t count = held.empty() ? blocks : held.size();
  std::size_t total = 0;  // floats in the arena
  for (std::size_t i = 0; i < count; ++i) {
    const std::int64_t b = held.empty() ? static_cast<std::int64_t>(i) : held[i];
    if (b < 0 || b >= num_blocks_) {
      throw std::invalid_argument("block " + std::to_string(b) + " out of range [0, " +
                                  std::to_string(num_blocks_) + ")");
    }
    const std::size_t length = block_length(b);
    // Checked so that an absurd size fails as MemoryError instead of wrapping to a small arena.
    if (length > kMaxFloats) throw std::bad_alloc();
    const std::size_t stride = round_up(length, kAlignFloats);
    const std::size_t floats = stride * static_cast<std::size_t>(1 + slots);
    if (stride > kMaxFloats / static_cast<std::size_t>(1 + slots) || floats > kMaxFloats - total) {
      throw std::bad_alloc();
    }
    total += floats;
  }
  check_fits_in_memory(total, blocks, count, slots);
  blocks_.resize(static_cast<std::size_t>(num_blocks_));
  for (std::size_t i = 0; i < count; ++i) {
    const std::int64_t b = held.empty() ? static_cast<std::int64_t>(i) : held[i];
    auto& block = blocks_[static_cast<std::size_t>(b)];
    if (block) throw std::invalid_argument("block " + std::to_string(b) + " listed twice");
    block = std::make_unique<Block>();
    block->length = block_length(b);
    block->stride = round_up(block->length, kAlignFloats);
    block->num_slots = slots;
  }
  arena_.reset(allocate_arena(total * sizeof(float)));
  // Blocks in ascending id order, so a batched call over consecutive ids walks memory forward.
  float* next = arena_.get();
  for (auto& block : blocks_) {
    if (!block) continue;
    block->base = next;
    next += block->stride * static_cast<std::size_t>(1 + slots);
    std::fill_n(block->values(), block->length, 0.0f);
    for (int s = 0; s < slots; ++s) {
      std::fill_n(block->slot(s), block->length, slot_initial_value(optimizer, s));
    }
  }
}

std::vector<std::int64_t> DenseTable::held_blocks() const {
  std::vector<std::int64_t> out;
  for (std::int64_t b = 0; b < num_blocks_; ++b) {
    if (blocks_[static_cast<std::size_t>(b)]) out.push_back(b);
  }
  return out;
}

bool DenseTable::holds(std::int64_t block) const {
  return block >= 0 && block < num_blocks_ && blocks_[static_cast<std::size_t>(block)] != nullptr;
}

std::size_t DenseTable::block_offset(std::int64_t block) const {
  if (block < 0 || block >= num_blocks_) {
    throw std::out_of_range("block " + std::to_string(block) + " out of range [0, " +
                            std::to_string(num_blocks_) + ")");
  }
  return static_cast<std::size_t>(block) * block_size_;
}

std::size_t DenseTable::block_length(std::int64_t block) const {
  const std::size_t start = block_offset(block);
  return std::min(block_size_, num_elements_ - start);
}

std::size_t DenseTable::bytes() const {
  std::size_t total = 0;
  for (const auto& b : blocks_) {
    if (b) total += b->length * sizeof(float) * static_cast<std::size_t>(1 + b->num_slots);
  }
  return total;
}

DenseTable::Block& DenseTable::held(std::int64_t block) {
  return const_cast<Block&>(static_cast<const DenseTable*>(this)->held(block));
}

const DenseTable::Block& DenseTable::held(std::int64_t block) const {
  if (!holds(block)) {
    if (block < 0 || block >= num_blocks_) {
      throw std::out_of_range("block " + std::to_string(block) + " out of range [0, " +
                              std::to_string(num_blocks_) + ")");
    }
    throw std::out_of_range("block " + std::to_string(block) + " is not held by this shard");
  }
  return *blocks_[static_cast<std::size_t>(block)];
}

void DenseTable::apply(std::int64_t block, const float* grad) {
  Block& b = held(block);
  float* slot_ptrs[3] = {nullptr, nullptr, nullptr};
  std::lock_guard<std::mutex> lock(b.mu);
  for (int s = 0; s < b.num_slots; ++s) slot_ptrs[s] = b.slot(s);
  apply_step(optimizer_, b.values(), grad, slot_ptrs, b.length, b.step + 1);
  ++b.step;
}

void DenseTable::read(std::int64_t block, float* out) const {
  const Block& b = held(block);
  std::lock_guard<std::mutex> lock(b.mu);
  std::copy_n(b.values(), b.length, out);
}

void DenseTable::assign(std::int64_t block, const float* values) {
  Block& b = held(block);
  std::lock_guard<std::mutex> lock(b.mu);
  std::copy_n(values, b.length, b.values());
}

std::int64_t DenseTable::step(std::int64_t block) const {
  const Block& b = held(block);
  std::lock_guard<std::mutex> lock(b.mu);
  return b.step;
}

void DenseTable::read_slot(std::int64_t block, int slot, float* out) const {
  const Block& b = held(block);
  if (slot < 0 || slot >= b.num_slots) {
    throw std::out_of_range("slot " + std::to_string(slot) + " out of range [0, " +
                            std::to_string(b.num_slots) + ")");
  }
  std::lock_guard<std::mutex> lock(b.mu);
  std::copy_n(b.slot(slot), b.length, out);
}

void DenseTable::restore_block(std::int64_t block, const float* values, const float* const* slots,
                               std::int64_t step) {
  Block& b = held(block);
  if (step < 0) throw std::invalid_argument("step must be >= 0, got " + std::to_string(step));
  std::lock_guard<std::mutex> lock(b.mu);
  std::copy_n(values, b.length, b.values());
  for (int s = 0; s < b.num_slots; ++s) std::copy_n(slots[s], b.length, b.slot(s));
  b.step = step;
}

}  // namespace paramserver
