// Built with -ffp-contract=off (CMakeLists.txt): a fused multiply-add would round differently
// from a separate multiply and add, and the point of this file is bit-identical output everywhere.
#include "paramserver/initializer.h"

#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>

namespace paramserver {

namespace {

constexpr std::uint64_t kGamma = 0x9E3779B97F4A7C15ULL;  // splitmix64's increment (golden ratio)
constexpr double kTwoPow53Inv = 1.0 / 9007199254740992.0;
constexpr double kLn2 = 0.693147180559945309417232121458;
constexpr double kSqrtHalf = 0.707106781186547524400844362105;
constexpr double kQuarterPi = 0.785398163397448309615660845820;

// The key of a row: a bijection of id for a fixed seed, so two ids never share a stream start.
std::uint64_t row_key(std::uint64_t seed, std::uint64_t id) {
  return mix64(mix64(seed + kGamma) ^ id);
}

// The k-th 64-bit draw of a row (k >= 0): splitmix64's output number k + 1 from the row key.
std::uint64_t draw(std::uint64_t key, std::uint64_t k) { return mix64(key + (k + 1) * kGamma); }

// Uniform double in [0, 1) with 53 random bits (exact: a 53-bit integer times 2^-53).
double unit_open_high(std::uint64_t bits) { return static_cast<double>(bits >> 11) * kTwoPow53Inv; }

// Uniform double in (0, 1]: safe to take the logarithm of.
double unit_open_low(std::uint64_t bits) {
  return static_cast<double>((bits >> 11) + 1) * kTwoPow53Inv;
}

// Series coefficients. Each is a quotient of exactly representable doubles (every factorial up to
// 22! is), folded by the compiler with IEEE division: the same bits on every compiler and platform.
// Multiplying by them (instead of dividing in the loop) makes a normal pair ~4x cheaper.
constexpr double kAtanhCoef[] = {1.0,        1.0 / 3.0,  1.0 / 5.0,  1.0 / 7.0,
                                 1.0 / 9.0,  1.0 / 11.0, 1.0 / 13.0, 1.0 / 15.0,
                                 1.0 / 17.0, 1.0 / 19.0, 1.0 / 21.0, 1.0 / 23.0};
// (-1)^k / (2k+1)!  and  (-1)^k / (2k)!, k = 0..9
constexpr double kSinCoef[] = {1.0,
                               -1.0 / 6.0,
                               1.0 / 120.0,
                               -1.0 / 5040.0,
                               1.0 / 362880.0,
                               -1.0 / 39916800.0,
                               1.0 / 6227020800.0,
                               -1.0 / 1307674368000.0,
                               1.0 / 355687428096000.0,
                               -1.0 / 121645100408832000.0};
constexpr double kCosCoef[] = {1.0,
                               -1.0 / 2.0,
                               1.0 / 24.0,
                               -1.0 / 720.0,
                               1.0 / 40320.0,
                               -1.0 / 3628800.0,
                               1.0 / 479001600.0,
                               -1.0 / 87178291200.0,
                               1.0 / 20922789888000.0,
                               -1.0 / 6402373705728000.0};

// Natural logarithm of x in (0, 1] with double arithmetic only: x = m * 2^e with m in
// [sqrt(1/2), sqrt(2)), log(m) = 2 atanh(s) with s = (m - 1) / (m + 1), |s| <= 0.172, summed to
// s^23 (truncation error < 1e-18, far below float32 resolution).
double det_log(double x) {
  int e = 0;
  double m = std::frexp(x, &e);  // exact
  if (m < kSqrtHalf) {
    m *= 2.0;  // exact
    --e;
  }
  const double s = (m - 1.0) / (m + 1.0);
  const double s2 = s * s;
  double series = kAtanhCoef[11];
  for (int k = 10; k >= 0; --k) series = kAtanhCoef[k] + s2 * series;
  return static_cast<double>(e) * kLn2 + 2.0 * s * series;
}

// sin and cos of phi in [0, pi/4] by Taylor series to phi^19 and phi^18 (truncation error < 1e-19).
void sincos_small(double phi, double* s, double* c) {
  const double p2 = phi * phi;
  double ss = kSinCoef[9], cc = kCosCoef[9];
  for (int k = 8; k >= 0; --k) {
    ss = kSinCoef[k] + p2 * ss;
    cc = kCosCoef[k] + p2 * cc;
  }
  *s = phi * ss;
  *c = cc;
}

// sin and cos of 2 pi u for u in [0, 1): the octant comes from u's bits exactly, the rest from the
// series on [0, pi/4] (odd octants by the complementary angle, so the series never leaves it).
void sincos_turn(double u, double* sin_out, double* cos_out) {
  const double u8 = u * 8.0;  // exact: scaling by a power of two
  const int octant = static_cast<int>(u8);
  const double f = u8 - octant;  // exact, in [0, 1)
  double s, c;
  if (octant & 1) {
    double s1, c1;
    sincos_small((1.0 - f) * kQuarterPi, &s1, &c1);
    s = c1;
    c = s1;
  } else {
    sincos_small(f * kQuarterPi, &s, &c);
  }
  switch (octant >> 1) {  // quadrant rotation
    case 0: *sin_out = s; *cos_out = c; break;
    case 1: *sin_out = c; *cos_out = -s; break;
    case 2: *sin_out = -s; *cos_out = -c; break;
    default: *sin_out = -c; *cos_out = s; break;
  }
}

void require_finite(double v, const char* name) {
  if (!std::isfinite(v)) {
    throw std::invalid_argument(std::string("invalid initializer ") + name + " " +
                                std::to_string(v) + ": must be finite");
  }
}

}  // namespace

void validate(const InitializerConfig& c) {
  switch (c.kind) {
    case InitializerKind::kZeros:
      return;
    case InitializerKind::kUniform:
      require_finite(c.low, "low");
      require_finite(c.high, "high");
      if (c.low > c.high) {
        throw std::invalid_argument("invalid uniform initializer: low " + std::to_string(c.low) +
                                    " > high " + std::to_string(c.high));
      }
      return;
    case InitializerKind::kNormal:
      require_finite(c.mean, "mean");
      require_finite(c.stddev, "std");
      if (c.stddev < 0.0) {
        throw std::invalid_argument("invalid normal initializer: std " + std::to_string(c.stddev) +
                                    " must be >= 0");
      }
      return;
  }
  throw std::invalid_argument("unknown initializer kind " + std::to_string(static_cast<int>(c.kind)));
}

std::string describe(const InitializerConfig& c) {
  std::ostringstream out;
  switch (c.kind) {
    case InitializerKind::kZeros:
      out << "zeros()";
      break;
    case InitializerKind::kUniform:
      out << "uniform(a=" << c.low << ", b=" << c.high << ")";
      break;
    case InitializerKind::kNormal:
      out << "normal(mean=" << c.mean << ", std=" << c.stddev << ")";
      break;
    default:
      out << "unknown(" << static_cast<int>(c.kind) << ")";
  }
  return out.str();
}

void initialize_row(const InitializerConfig& c, std::uint64_t seed, std::uint64_t id, float* out,
                    std::size_t n) {
  switch (c.kind) {
    case InitializerKind::kZeros:
      std::memset(out, 0, n * sizeof(float));
      return;
    case InitializerKind::kUniform: {
      const std::uint64_t key = row_key(seed, id);
      const double width = c.high - c.low;
      for (std::size_t j = 0; j < n; ++j) {
        out[j] = static_cast<float>(c.low + width * unit_open_high(draw(key, j)));
      }
      return;
    }
    case InitializerKind::kNormal: {
      // Box-Muller: elements 2k and 2k+1 share draws 2k and 2k+1 (radius and angle).
      const std::uint64_t key = row_key(seed, id);
      for (std::size_t j = 0; j < n; j += 2) {
        const double radius = std::sqrt(-2.0 * det_log(unit_open_low(draw(key, j))));
        double s, co;
        sincos_turn(unit_open_high(draw(key, j + 1)), &s, &co);
        out[j] = static_cast<float>(c.mean + c.stddev * (radius * co));
        if (j + 1 < n) out[j + 1] = static_cast<float>(c.mean + c.stddev * (radius * s));
      }
      return;
    }
  }
}

}  // namespace paramserver
