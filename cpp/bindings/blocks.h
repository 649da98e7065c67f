// Block lists of a dense table, shared by the binding files: checked ids in, lengths and offsets
// out.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "arrays.h"
#include "paramserver/dense_table.h"

namespace paramserver::bindings {

inline std::vector<std::int64_t> block_list(py::array& blocks) {
  const std::size_t n = static_cast<std::size_t>(blocks.size());
  const auto* p = span_of<std::int64_t>(blocks, "blocks", n, false, "int64");
  return std::vector<std::int64_t>(p, p + n);
}

// Total elements of `blocks`, checking every id first (so nothing is applied on a bad list).
inline std::size_t total_length(const DenseTable& t, const std::vector<std::int64_t>& blocks) {
  std::size_t total = 0;
  for (std::int64_t b : blocks) {
    if (!t.holds(b)) {
      if (b < 0 || b >= t.num_blocks()) {
        throw py::index_error("block " + std::to_string(b) + " out of range [0, " +
                              std::to_string(t.num_blocks()) + ")");
      }
      throw py::index_error("block " + std::to_string(b) + " is not held by this shard");
    }
    total += t.block_length(b);
  }
  return total;
}

// Offsets of each block's data inside a concatenated buffer.
inline std::vector<std::size_t> offsets_of(const DenseTable& t, const std::vector<std::int64_t>& blocks) {
  std::vector<std::size_t> off(blocks.size());
  std::size_t pos = 0;
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    off[i] = pos;
    pos += t.block_length(blocks[i]);
  }
  return off;
}

}  // namespace paramserver::bindings
