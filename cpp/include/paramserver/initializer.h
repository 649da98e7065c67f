// Deterministic row initializers for embedding tables (and, through Python, dense tables).
//
// A row's initial values are a pure function of (initializer, table seed, row id, element index):
// the same on every server, after every restart and on every platform. Random values come from a
// counter-based generator (splitmix64 of a per-row key and the element index) turned into floats
// with IEEE double arithmetic only (+, -, *, /, sqrt, frexp): no std::*_distribution (whose output
// is implementation-defined) and no libm log/sin/cos (whose last bit may differ between libms).
// The value of element j does not depend on the row width, so a row of width 8 is a prefix of the
// same row at width 16.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace paramserver {

enum class InitializerKind : int { kZeros = 0, kUniform = 1, kNormal = 2 };

// What a fresh row is filled with. Fields an initializer does not use are ignored.
struct InitializerConfig {
  InitializerKind kind = InitializerKind::kZeros;
  // kUniform: values in [low, high) (a value may round up to high in float32, as torch's may).
  double low = 0.0;
  double high = 0.0;
  // kNormal: mean + stddev * z with z ~ N(0, 1) from the Box-Muller transform.
  double mean = 0.0;
  double stddev = 0.0;
};

// Throws std::invalid_argument naming the first bad parameter (non-finite, low > high, stddev < 0).
void validate(const InitializerConfig& config);

// Human-readable description, e.g. "normal(mean=0, std=0.01)".
std::string describe(const InitializerConfig& config);

// Fills out[0, n) with the first n initial values of row `id` of a table with seed `seed`.
// Thread safe (pure function); never allocates. `config` must be valid.
void initialize_row(const InitializerConfig& config, std::uint64_t seed, std::uint64_t id,
                    float* out, std::size_t n);

// The 64-bit mixing function of the generator (splitmix64's finalizer, a bijection). Also used to
// hash ids in the embedding table: ids are often sequential, so they must be mixed before their
// bits pick a stripe and a map slot.
inline std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

}  // namespace paramserver
