// Open-addressing map from 64-bit ids to 32-bit row numbers: the index of one embedding stripe.
// Internal to the core; EmbeddingTable serializes access to each map with its stripe's mutex.
//
// Why this shape: one 16-byte slot {id, row} per entry in one flat array, linear probing, load
// factor <= 3/4. A lookup touches one cache line in the common case and the array can be
// prefetched from the hash alone, which is what makes batched lookups run at memory-level
// parallelism instead of one dependent miss per id. Emptiness is marked by the row number
// (kNoRow), not by a reserved id, so every uint64 id -- 0 and 2^64-1 included -- is a valid key.
// At 1M rows the map costs 16-43 bytes per row (load 3/8..3/4), < 10% of a dim-64 Adagrad row.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

namespace paramserver {

class IdMap {
 public:
  static constexpr std::uint32_t kNoRow = 0xFFFFFFFFu;

  // Row of `id` (whose mixed hash is `hash`), or kNoRow.
  std::uint32_t find(std::uint64_t id, std::uint64_t hash) const {
    if (slots_.empty()) return kNoRow;
    for (std::size_t i = hash & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.row == kNoRow) return kNoRow;
      if (s.id == id) return s.row;
    }
  }

  // Row of `id`; if absent, maps it to `new_row` first. Returns (row, inserted). May grow the
  // slot array (rehash; rows themselves never move).
  std::pair<std::uint32_t, bool> find_or_insert(std::uint64_t id, std::uint64_t hash,
                                                std::uint32_t new_row) {
    if ((size_ + 1) * 4 > slots_.size() * 3) grow();
    for (std::size_t i = hash & mask_;; i = (i + 1) & mask_) {
      Slot& s = slots_[i];
      if (s.row == kNoRow) {
        s.id = id;
        s.row = new_row;
        ++size_;
        return {new_row, true};
      }
      if (s.id == id) return {s.row, false};
    }
  }

  // Hint the cache about the slot a lookup of `hash` will start at.
  void prefetch(std::uint64_t hash) const {
    if (!slots_.empty()) __builtin_prefetch(&slots_[hash & mask_]);
  }

  // Calls fn(id, row) for every entry, in slot order.
  template <typename Fn>
  void for_each(Fn&& fn) const {
    for (const Slot& s : slots_) {
      if (s.row != kNoRow) fn(s.id, s.row);
    }
  }

  std::size_t size() const { return size_; }
  std::size_t bytes() const { return slots_.capacity() * sizeof(Slot); }
  void clear() {
    std::vector<Slot>().swap(slots_);
    mask_ = 0;
    size_ = 0;
  }

  // `hash_of` recomputes an id's hash when the map grows (cheaper than storing it per slot).
  using HashFn = std::uint64_t (*)(std::uint64_t);
  explicit IdMap(HashFn hash_of) : hash_of_(hash_of) {}

 private:
  struct Slot {
    std::uint64_t id = 0;
    std::uint32_t row = kNoRow;
    std::uint32_t unused = 0;  // pads the slot to 16 bytes: 4 slots per cache line, never straddling
  };

  void grow() {
    const std::size_t capacity = slots_.empty() ? 16 : slots_.size() * 2;
    std::vector<Slot> old(capacity);
    old.swap(slots_);
    mask_ = capacity - 1;
    for (const Slot& s : old) {
      if (s.row == kNoRow) continue;
      std::size_t i = hash_of_(s.id) & mask_;
      while (slots_[i].row != kNoRow) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }

  std::vector<Slot> slots_;
  std::size_t mask_ = 0;
  std::size_t size_ = 0;
  HashFn hash_of_;
};

}  // namespace paramserver
