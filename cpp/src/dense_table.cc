#include "paramserver/dense_table.h"

#include <algorithm>
#include <new>
#include <stdexcept>
#include <string>

namespace paramserver {

namespace {
// Cache-line (and AVX-512 vector) size.
constexpr std::size_t kAlignment = 64;
}  // namespace

DenseTable::DenseTable(std::size_t num_elements, std::size_t block_size,
                       const OptimizerConfig& optimizer, const std::vector<std::int64_t>& held)
    : num_elements_(num_elements), block_size_(block_size), optimizer_(optimizer) {
  if (num_elements == 0) throw std::invalid_argument("num_elements must be > 0");
  if (block_size == 0) throw std::invalid_argument("block_size must be > 0");
  validate(optimizer);
  num_blocks_ = static_cast<std::int64_t>((num_elements + block_size - 1) / block_size);
  blocks_.resize(static_cast<std::size_t>(num_blocks_));
  const int slots = num_slots(optimizer);
  auto make = [&](std::int64_t b) {
    if (b < 0 || b >= num_blocks_) {
      throw std::invalid_argument("block " + std::to_string(b) + " out of range [0, " +
                                  std::to_string(num_blocks_) + ")");
    }
    auto& slot = blocks_[static_cast<std::size_t>(b)];
    if (slot) throw std::invalid_argument("block " + std::to_string(b) + " listed twice");
    slot = std::make_unique<Block>();
    const std::size_t len = block_length(b);
    constexpr std::size_t kAlignFloats = kAlignment / sizeof(float);
    slot->length = len;
    slot->stride = (len + kAlignFloats - 1) / kAlignFloats * kAlignFloats;
    slot->num_slots = slots;
    const std::size_t bytes = slot->stride * sizeof(float) * static_cast<std::size_t>(1 + slots);
    slot->data.reset(static_cast<float*>(std::aligned_alloc(kAlignment, bytes)));
    if (!slot->data) throw std::bad_alloc();
    std::fill_n(slot->values(), len, 0.0f);
    for (int s = 0; s < slots; ++s) std::fill_n(slot->slot(s), len, slot_initial_value(optimizer, s));
  };
  if (held.empty()) {
    for (std::int64_t b = 0; b < num_blocks_; ++b) make(b);
  } else {
    for (std::int64_t b : held) make(b);
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
