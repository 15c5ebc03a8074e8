// SPDX-License-Identifier: Apache-2.0
//
// libFuzzer target for moebal's public API: losses, routers, capacity, global-batch balance and
// expert choice, fed with shapes, options and logits decoded from the fuzzer's bytes.
//
// Input format (every byte past the end of the input reads as 0, so any input is valid):
//   bytes 0..31  a fixed header, one field per byte (see `decode` below and README.md):
//     0 API   1 scalar type (double, float, bfloat16)   2 T = 1 + b % 64   3 N = 1 + b % 32
//     4 k (including 0, N + 1 and extreme values)   5 convention   6 score   7 coefficient
//     8 mask kind (none, bool, int64, float, double, uint8; wrong length; NaN)   9 mask pattern
//     10 logit scale   11 logit seed   12..28 per-API options   29 d loss / d output seed
//     30 gradient-check direction seed   31 extra switches
//   bytes 32..   edits of the logits, 3 bytes each: position (2 bytes, little-endian, mod T N)
//                and a code: NaN, +/-Inf, a row of -Inf, huge values, exp under/overflow
//                boundaries, ties with the neighbour or the previous row, or a small value.
//
// Checks (a violation prints a diagnostic to stderr and calls __builtin_trap):
//   - no crash, no ASan/UBSan report, no exception other than moebal::invalid_argument;
//   - an invalid_argument's what() starts with "moebal::" and contains "argument '";
//   - inputs that are invalid by the documented contract (k out of range, a mask of the wrong
//     length or with NaN, a non-finite coefficient, NaN or +Inf in a real token's logits, an
//     invalid enum value, ...) throw; inputs that are valid by the contract of the losses whose
//     checks README.md lists exhaustively do not throw;
//   - otherwise every output (value, gradient, weights, statistics) is finite, as long as the
//     true value cannot overflow the compute type (huge coefficients or z-losses of huge logits
//     are checked for no crash only), and API invariants hold (counts sum to T k, indices in
//     range and distinct, capacity respected, ...);
//   - differential checks: bfloat16 logits give bitwise the results of their float upcast
//     (README.md's claim); the SwitchAuxLoss object equals the one-line form bitwise;
//     `switch_aux_loss_with_counts` fed the loss's own counts equals the loss; the exact global
//     batch balance of the micro-batches equals the Switch loss of their concatenation;
//   - double logits: a central-difference check (Richardson-extrapolated) of the analytic
//     gradient along one random unit direction, whenever every discrete decision (top-k sets and
//     first choices, router order, kept groups, the normalization clamp, expert-choice picks) is
//     at least 1e-4 from changing; the step is as large as the margins allow and the selection
//     is verified unchanged at every perturbed point. The perturbation actually applied
//     (fl(x + h v) - x) is used, and the tolerance is 1e-4 relative plus the loss's rounding
//     noise (1024 eps |L| per evaluation), so a gradient wrong by more than 0.01 % along the
//     direction fails (-DMOEBAL_FUZZ_SELFTEST skews the analytic side by 0.1 % to show it).
//
// Library bugs found by this target are listed in README.md (inputs in crashes/). The
// environment variable MOEBAL_FUZZ_SKIP_KNOWN=1 stops checking the outputs of inputs in those
// classes (and skips the calls with known undefined behaviour), so that a session can look for
// new bugs while they are open; MOEBAL_FUZZ_STATS=1 prints per-API counters at exit.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include <moebal/moebal.hpp>

namespace {

using moebal::Index;
template <class S>
using RM = moebal::RowMatrix<S>;
using RMd = RM<double>;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr std::size_t kHeader = 32;
constexpr double kMargin = 1e-4;  // smallest top-k margin for the gradient check
constexpr double kStep = 1e-6;    // smallest central-difference step

// ------------------------------------------------------------------------------------------
// Failure reporting.

struct Case;
std::string describe(const Case& c);
const Case* g_case = nullptr;  // the decoded case, described with any failure

[[noreturn]] void fail(const std::string& what) {
  const std::string context = g_case ? describe(*g_case) : std::string("?");
  std::fprintf(stderr, "\nfuzz_api: CHECK FAILED: %s\n  case: %s\n", what.c_str(),
               context.c_str());
  std::fflush(stderr);
  __builtin_trap();
}

bool same_bits(double a, double b) {
  return (a == b && std::signbit(a) == std::signbit(b)) || (std::isnan(a) && std::isnan(b));
}

template <class... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream out;
  out.precision(17);
  (out << ... << parts);
  return out.str();
}

// ------------------------------------------------------------------------------------------
// Deterministic pseudo-random numbers (splitmix64): identical on every machine.

struct Rng {
  std::uint64_t state;
  explicit Rng(std::uint64_t seed) : state(seed * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull) {}
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return double(next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
  double symmetric() { return 2.0 * uniform() - 1.0; }                           // [-1, 1)
  double normal() {
    const double u = uniform() + 1e-300, v = uniform();
    return std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v);
  }
  Index below(Index n) { return n <= 0 ? 0 : Index(next() % std::uint64_t(n)); }
};

// ------------------------------------------------------------------------------------------
// The decoded case.

enum Api : int {
  kSwitch,
  kZ,
  kCv2,
  kSequence,
  kCombined,
  kDevice,
  kRoute,
  kCapacity,
  kGlobal,
  kExpertChoice,
  kApiCount
};
const char* const kApiNames[] = {"switch_aux_loss", "z_loss",         "cv2_importance_loss",
                                 "sequence_aux_loss", "combined_aux_loss", "device_balance_loss",
                                 "route",           "apply_capacity", "GlobalBatchBalance",
                                 "expert_choice"};
const char* const kTypeNames[] = {"double", "float", "bfloat16"};

enum class MaskKind { none, boolean, int64, float32, float64, uint8 };

struct Case {
  std::uint8_t h[kHeader] = {};
  int api = 0, type = 0;
  Index T = 1, N = 1, k = 1;
  int convention = 0, score = 0;
  double coefficient = 1.0;
  MaskKind mask_kind = MaskKind::none;
  Index mask_length = 0;
  std::vector<double> mask;  // mask values (as double), mask_length of them
  RMd logits;                // T x N, as decoded (before conversion to the scalar type)
  std::string edits;         // for the diagnostic
};

// An enum value from 4 bits: mostly valid values, 1/8 invalid ones (count and -1).
int enum_code(unsigned bits, int count) {
  const unsigned r = bits & 15u;
  if (r < 14) return int(r % unsigned(count));
  return r == 14 ? count : -1;
}

double coefficient_code(std::uint8_t b) {
  static const double table[16] = {1.0,  0.01, 0.0,   -1.0, 2.5,   1e-3, 1e3,  kNaN,
                                   kInf, -kInf, 1e-300, 1e6, -0.5, 0.1,  1e30, 1.7976931348623157e308};
  return table[b % 16];
}

std::vector<Index> divisors(Index n) {
  std::vector<Index> d;
  for (Index i = 1; i <= n; ++i)
    if (n % i == 0) d.push_back(i);
  return d;
}

Case decode(const std::uint8_t* data, std::size_t size) {
  Case c;
  for (std::size_t i = 0; i < kHeader && i < size; ++i) c.h[i] = data[i];
  const std::uint8_t* h = c.h;
  c.api = h[0] % kApiCount;
  c.type = h[1] % 3;
  c.T = 1 + h[2] % 64;
  c.N = 1 + h[3] % 32;
  if (h[4] < 224) {
    c.k = h[4] % (c.N + 2);  // 0 .. N + 1
  } else {
    const Index special[8] = {-1, std::numeric_limits<Index>::min(),
                              std::numeric_limits<Index>::max(), c.N + 1, 2 * c.N, 0, c.N, 1};
    c.k = special[(h[4] - 224) % 8];
  }
  c.convention = enum_code(h[5], 3);
  c.score = enum_code(h[6], 2);
  c.coefficient = coefficient_code(h[7]);

  // Mask.
  switch (h[8] % 10) {
    case 0: case 1: case 2: c.mask_kind = MaskKind::none; break;
    case 3: c.mask_kind = MaskKind::boolean; break;
    case 4: c.mask_kind = MaskKind::int64; break;
    case 5: c.mask_kind = MaskKind::float32; break;
    case 6: c.mask_kind = MaskKind::float64; break;
    case 7: c.mask_kind = MaskKind::uint8; break;
    case 8: c.mask_kind = MaskKind::int64; break;  // wrong length, below
    default: c.mask_kind = MaskKind::float64; break;  // NaN, below
  }
  if (c.mask_kind != MaskKind::none) {
    c.mask_length = c.T;
    if (h[8] % 10 == 8) c.mask_length = (h[9] & 1) ? c.T + 1 : c.T - 1;
    Rng rng(h[9]);
    const int density = (h[9] >> 1) & 3;  // all real, ~50 %, ~90 %, no real token
    for (Index t = 0; t < c.mask_length; ++t) {
      bool real = density == 0 || (density == 1 && rng.uniform() < 0.5) ||
                  (density == 2 && rng.uniform() < 0.9);
      double v = real ? 1.0 : 0.0;
      if (real && (c.mask_kind == MaskKind::float32 || c.mask_kind == MaskKind::float64)) {
        v = (h[9] & 8) ? -0.5 : 1.0;  // any nonzero is a real token
      }
      if (real && c.mask_kind == MaskKind::int64 && (h[9] & 16)) v = 7.0;
      c.mask.push_back(v);
    }
    if (h[8] % 10 == 9 && c.mask_length > 0) c.mask[std::size_t((h[9] >> 3) % c.mask_length)] = kNaN;
  }

  // Logits: a random base, then the edits.
  static const double scales[8] = {0.0, 1e-3, 0.1, 1.0, 4.0, 30.0, 1e3, 1e30};
  const double scale = scales[h[10] % 8];
  const bool quantize = (h[10] & 8) != 0;  // multiples of 0.5: many ties
  Rng rng(std::uint64_t(h[11]) | (std::uint64_t(h[10]) << 8));
  c.logits.resize(c.T, c.N);
  for (Index i = 0; i < c.logits.size(); ++i) {
    double v = scale * rng.symmetric();
    if (quantize) v = std::round(2.0 * v) / 2.0;
    c.logits.data()[i] = v;
  }
  const Index cells = c.T * c.N;
  std::ostringstream edits;
  edits.precision(17);
  for (std::size_t p = kHeader; p + 3 <= size; p += 3) {
    const Index pos = Index(data[p] | (unsigned(data[p + 1]) << 8)) % cells;
    const Index t = pos / c.N, j = pos % c.N;
    const std::uint8_t code = data[p + 2];
    double* row = c.logits.data() + t * c.N;
    double v = 0.0;
    bool single = true;
    switch (code) {
      case 0: v = kNaN; break;
      case 1: v = kInf; break;
      case 2: v = -kInf; break;
      case 3: std::fill(row, row + c.N, -kInf); single = false; break;
      case 4: v = 1e30; break;
      case 5: v = -1e30; break;
      case 6: v = 3e38; break;
      case 7: v = -3e38; break;
      case 8: v = 1e300; break;
      case 9: v = -1e300; break;
      case 10: v = -745.0; break;
      case 11: v = -88.0; break;
      case 12: v = 89.0; break;
      case 13: v = 0.0; break;
      case 14: v = 4.9406564584124654e-324; break;
      case 15: v = 1e-30; break;
      case 16: v = j > 0 ? row[j - 1] : row[c.N - 1]; break;  // tie with the neighbour
      case 17:  // the previous row (ties across tokens)
        if (t > 0) std::copy(row - c.N, row, row);
        single = false;
        break;
      case 18: std::fill(row, row + c.N, row[j]); single = false; break;  // a flat row
      case 19: {  // -Inf everywhere but here
        const double keep = row[j];
        std::fill(row, row + c.N, -kInf);
        row[j] = keep;
        single = false;
        break;
      }
      case 20: v = -1e4; break;
      case 21: v = 1e4; break;
      case 22: v = 710.0; break;
      case 23: v = -1e6; break;
      case 24: v = -110.0; break;
      case 25: v = -800.0; break;
      case 26: v = -700.0; break;  // sigmoid scores near the bottom of double's range
      case 27: v = -46.0; break;   // sigmoid near the normalized sigmoid's 1e-20
      case 28: v = 700.0; break;
      case 29: v = -1e2; break;    // float exp underflow
      default: v = (double(code) - 144.0) / 4.0; break;  // -29 .. 27.75
    }
    if (single) row[j] = v;
    edits << " (" << t << "," << j << "):" << int(code);
  }
  c.edits = edits.str();
  return c;
}

std::string describe(const Case& c) {
  std::ostringstream o;
  o.precision(17);
  o << kApiNames[c.api] << " type=" << kTypeNames[c.type] << " T=" << c.T << " N=" << c.N
    << " k=" << c.k << " convention=" << c.convention << " score=" << c.score
    << " coefficient=" << c.coefficient << " mask_kind=" << int(c.mask_kind)
    << " mask_length=" << c.mask_length << " header=[";
  for (std::size_t i = 0; i < kHeader; ++i) o << (i ? " " : "") << int(c.h[i]);
  o << "] edits:" << c.edits;
  if (c.T * c.N <= 64) {
    o << "\n  logits (as decoded, double):";
    for (Index t = 0; t < c.T; ++t) {
      o << "\n   ";
      for (Index j = 0; j < c.N; ++j) o << " " << c.logits(t, j);
    }
    if (!c.mask.empty()) {
      o << "\n  mask:";
      for (double m : c.mask) o << " " << m;
    }
  }
  return o.str();
}

// ------------------------------------------------------------------------------------------
// Masks: typed storage that outlives the calls, viewed by moebal::TokenMask.

struct MaskHolder {
  MaskKind kind = MaskKind::none;
  std::unique_ptr<bool[]> b;
  std::vector<std::int64_t> i64;
  std::vector<float> f32;
  std::vector<double> f64;
  std::vector<std::uint8_t> u8;
  Index length = 0;

  explicit MaskHolder(const Case& c) : kind(c.mask_kind), length(c.mask_length) {
    const std::size_t n = std::size_t(length);
    // Non-null storage even for a length-0 mask (TokenMask(nullptr, 0) used to be the empty
    // mask; now any explicit mask of length 0 is a mask of the wrong length).
    i64.reserve(n + 1);
    f32.reserve(n + 1);
    f64.reserve(n + 1);
    u8.reserve(n + 1);
    switch (kind) {
      case MaskKind::none: break;
      case MaskKind::boolean:
        b.reset(new bool[n + 1]);
        for (std::size_t i = 0; i < n; ++i) b[i] = c.mask[i] != 0.0;
        break;
      case MaskKind::int64:
        for (double v : c.mask) i64.push_back(std::int64_t(v));
        break;
      case MaskKind::float32:
        for (double v : c.mask) f32.push_back(float(v));
        break;
      case MaskKind::float64: f64.assign(c.mask.begin(), c.mask.end()); break;
      case MaskKind::uint8:
        for (double v : c.mask) u8.push_back(std::uint8_t(v != 0.0));
        break;
    }
  }
  // A view of elements [begin, begin + count) (count = -1: the whole mask).
  moebal::TokenMask view(Index begin = 0, Index count = -1) const {
    if (count < 0) count = length - begin;
    switch (kind) {
      case MaskKind::none: return {};
      case MaskKind::boolean: return moebal::TokenMask(b.get() + begin, count);
      case MaskKind::int64: return moebal::TokenMask(i64.data() + begin, count);
      case MaskKind::float32: return moebal::TokenMask(f32.data() + begin, count);
      case MaskKind::float64: return moebal::TokenMask(f64.data() + begin, count);
      case MaskKind::uint8: return moebal::TokenMask(u8.data() + begin, count);
    }
    return {};
  }
};

// ------------------------------------------------------------------------------------------
// What a call produced.

struct Outcome {
  double objective = 0.0;            // the scalar whose gradient is `grad`
  bool has_grad = false;
  RMd grad;                          // d objective / d logits, T x N
  double scale = 0.0;                // magnitude of the objective's terms (rounding noise)
  std::vector<double> values;        // every other output that must be finite
  std::vector<std::int64_t> discrete;  // the selection: equal under tiny perturbations
  bool finite_expected = true;       // false when the true values may overflow
};

template <class V>
void append(std::vector<double>& out, const V& v) {
  for (Index i = 0; i < Index(v.size()); ++i) out.push_back(double(v.data()[i]));
}
template <class V>
void append_discrete(std::vector<std::int64_t>& out, const V& v) {
  for (Index i = 0; i < Index(v.size()); ++i) out.push_back(std::int64_t(v.data()[i]));
}

template <class M>
RMd to_double(const M& m) {
  RMd out(m.rows(), m.cols());
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j) out(i, j) = double(m(i, j));
  return out;
}

// Row-wise validity facts about the logits as the compute type sees them.
struct Facts {
  std::vector<bool> real;            // per token (mask; all real if no/invalid mask)
  bool mask_valid = true;            // no mask, or length T and no NaN
  bool any_nan_or_pinf = false;      // in a real row
  bool any_all_ninf = false;         // a real row of all -Inf
  bool any_ninf = false;             // a -Inf in a real row
  Index real_rows = 0;
  double max_abs = 0.0;              // largest |finite logit| in real rows
  bool any_nan_or_pinf_anywhere = false;
  RMd seen;                          // the logits as the library sees them
};

Facts facts_of(const Case& c, const RMd& x) {
  Facts f;
  f.seen = x;
  f.real.assign(std::size_t(c.T), true);
  if (c.mask_kind != MaskKind::none) {
    if (c.mask_length != c.T) f.mask_valid = false;
    for (double m : c.mask)
      if (std::isnan(m)) f.mask_valid = false;
    if (f.mask_valid)
      for (Index t = 0; t < c.T; ++t) f.real[std::size_t(t)] = c.mask[std::size_t(t)] != 0.0;
  }
  for (Index t = 0; t < c.T; ++t) {
    bool all_ninf = true;
    for (Index j = 0; j < c.N; ++j) {
      const double v = x(t, j);
      const bool bad = std::isnan(v) || v == kInf;
      if (bad) f.any_nan_or_pinf_anywhere = true;
      if (!f.real[std::size_t(t)]) continue;
      if (bad) f.any_nan_or_pinf = true;
      if (v != -kInf) all_ninf = false;
      if (v == -kInf) f.any_ninf = true;
      if (std::isfinite(v)) f.max_abs = std::max(f.max_abs, std::abs(v));
    }
    if (f.real[std::size_t(t)]) {
      ++f.real_rows;
      if (all_ninf) f.any_all_ninf = true;
    }
  }
  return f;
}

// Largest magnitude a parameter may have for the outputs to be required finite.
template <class C>
constexpr double kReasonable = std::is_same_v<C, double> ? 1e250 : 1e25;

// ------------------------------------------------------------------------------------------
// Option decoding per API.

moebal::SwitchOptions switch_options(const Case& c, const MaskHolder& mask) {
  moebal::SwitchOptions o;
  o.convention = static_cast<moebal::SwitchConvention>(c.convention);
  o.score = static_cast<moebal::ScoreFunction>(c.score);
  o.coefficient = c.coefficient;
  o.mask = mask.view();
  return o;
}

// Sequence layout from bytes 12 and 13 (may be invalid on purpose).
moebal::SequenceLayout layout_of(const Case& c) {
  const std::uint8_t b = c.h[12], kind = c.h[13] % 4;
  Rng rng(b);
  if (kind >= 2) {  // segments
    std::vector<Index> lengths;
    Index left = c.T;
    while (left > 0) {
      const Index len = 1 + rng.below(std::min<Index>(left, 1 + b % 16));
      lengths.push_back(len);
      left -= len;
    }
    if (kind == 3) {  // broken on purpose
      switch (b % 4) {
        case 0: lengths.push_back(0); break;
        case 1: lengths.back() += 1; break;
        case 2: lengths.clear(); break;
        default: lengths[0] = -lengths[0]; break;
      }
    }
    return moebal::SequenceLayout::segments(lengths);
  }
  Index S;
  switch (b % 4) {
    case 0: S = 1 + (b >> 2) % c.T; break;  // may not divide T
    case 1:
    case 2: {
      const std::vector<Index> d = divisors(c.T);
      S = d[std::size_t((b >> 2) % d.size())];
      break;
    }
    default: {
      const Index special[4] = {0, -1, c.T + 1, std::numeric_limits<Index>::max()};
      S = special[(b >> 2) % 4];
      break;
    }
  }
  return kind == 0 ? moebal::SequenceLayout::batch_major(S)
                   : moebal::SequenceLayout::sequence_major(S);
}

bool layout_valid(const moebal::SequenceLayout& l, Index T) {
  if (l.kind() == moebal::SequenceLayout::Kind::segments) {
    if (l.lengths().empty()) return false;
    Index sum = 0;
    for (Index len : l.lengths()) {
      if (len < 1) return false;
      sum += len;
    }
    return sum == T;
  }
  return l.seq_len() >= 1 && T % l.seq_len() == 0;
}

moebal::RouterOptions router_options(const Case& c) {
  moebal::RouterOptions o;
  const std::uint8_t* h = c.h;
  o.score = static_cast<moebal::RouterScore>(enum_code(h[15], 3));
  static const int weights[4] = {0, 1, 0, 5};
  o.weights = static_cast<moebal::RouterWeights>(weights[h[16] & 3]);
  o.select_on_logits = (h[16] & 4) != 0;
  o.normalize = (h[16] & 8) != 0;
  static const int modes[4] = {0, 1, 0, 9};
  o.epsilon_mode = static_cast<moebal::NormalizeEpsilon>(modes[(h[16] >> 4) & 3]);
  static const double eps[8] = {0.0, 1e-20, 1.1920928955078125e-07, 1e-3, 1.0, -1.0, kNaN, 0.5};
  o.normalize_epsilon = eps[h[17] % 8];
  static const double scaling[8] = {1.0, 2.5, 0.5, 0.0, -1.0, 1e30, kNaN, kInf};
  o.scaling_factor = scaling[h[18] % 8];
  switch (h[19] % 4) {
    case 0: o.num_groups = 1; break;
    case 1:
    case 2: {
      const std::vector<Index> d = divisors(c.N);
      o.num_groups = d[std::size_t((h[19] >> 2) % d.size())];
      break;
    }
    default: {
      const Index special[4] = {0, -1, c.N + 1, 3};
      o.num_groups = special[(h[19] >> 2) % 4];
    }
  }
  o.group_topk = Index(h[20] % std::max<Index>(o.num_groups + 2, 2));
  o.group_score = static_cast<moebal::GroupScore>(enum_code(h[21] & 15, 3));
  o.group_fill = static_cast<moebal::GroupFill>(enum_code(h[21] >> 4, 2));
  Rng rng(std::uint64_t(h[22]) * 7 + 1);
  switch (h[22] % 8) {
    case 4:
      o.expert_bias.resize(c.N);
      for (Index i = 0; i < c.N; ++i) o.expert_bias[i] = 0.1 * rng.symmetric();
      break;
    case 5:
      o.expert_bias.resize(c.N);
      for (Index i = 0; i < c.N; ++i) o.expert_bias[i] = 1e3 * rng.symmetric();
      break;
    case 6:
      o.expert_bias = Eigen::VectorXd::Zero(c.N + 1);
      break;
    case 7:
      o.expert_bias = Eigen::VectorXd::Zero(c.N);
      o.expert_bias[rng.below(c.N)] = (h[22] & 8) ? kNaN : kInf;
      break;
    default: break;
  }
  return o;
}

moebal::CapacityOptions capacity_options(const Case& c) {
  moebal::CapacityOptions o;
  const std::uint8_t* h = c.h;
  o.formula = static_cast<moebal::CapacityFormula>(enum_code(h[23] & 15, 4));
  o.priority = static_cast<moebal::DropPriority>(enum_code(h[23] >> 4, 5));
  static const double cf[16] = {1.0, 1.25, 0.5, 2.0, 0.0,  -1.0,  -0.5, 1e-3,
                                100, kNaN, kInf, 1e30, 1e300, 0.1, 3.0, -1e300};
  o.capacity_factor = cf[h[24] % 16];
  static const Index minc[8] = {0, 1, 2, 5, -1, 100, std::numeric_limits<Index>::max() / 2, 0};
  o.min_capacity = minc[h[25] & 7];
  static const Index align[4] = {1, 8, 0, std::numeric_limits<Index>::max()};
  o.alignment = align[(h[25] >> 3) & 3];
  o.renormalize = (h[25] & 32) != 0;
  o.pad_to_capacity = (h[25] & 64) != 0;
  static const Index absolute[8] = {0, 1, 2, 5, c.T, 1000, -1, std::numeric_limits<Index>::max()};
  o.absolute_capacity = absolute[h[31] % 8];
  o.seed = h[29];
  return o;
}

// ------------------------------------------------------------------------------------------
// Library bugs this harness has found and reported (see tests/fuzz/README.md), as input
// classes. With MOEBAL_FUZZ_SKIP_KNOWN=1 in the environment, an input of a known class is
// still run (no crash, no sanitizer report, exception contract) but its outputs are not
// checked, and a call known to hit undefined behaviour is not made at all, so that a fuzzing
// session can look for new bugs while the known ones are open. Each returns the issue's name,
// or nullptr.

bool skip_known() {
  static const bool skip = [] {
    const char* v = std::getenv("MOEBAL_FUZZ_SKIP_KNOWN");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return skip;
}

// Calls that make the library execute undefined behaviour (UBSan reports). None is open: the
// capacity overflows found on 2026-11-23 are fixed (tests/fuzz/README.md). Add a class here while
// a newly found one is open.
const char* known_undefined_behaviour(const Case&) { return nullptr; }

// ------------------------------------------------------------------------------------------
// The API calls. Each returns an Outcome or throws (moebal::invalid_argument, we hope).

template <class S>
using Compute = moebal::compute_type_t<S>;

template <class S>
Outcome call_switch(const Case& c, const RM<S>& x, const MaskHolder& mask) {
  using C = Compute<S>;
  const moebal::SwitchOptions o = switch_options(c, mask);
  const auto r = moebal::switch_aux_loss(x, c.k, o);
  Outcome out;
  out.objective = double(r.loss);
  out.has_grad = true;
  out.grad = to_double(r.grad);
  out.scale = std::abs(out.objective) + std::abs(c.coefficient) * double(c.N) * double(c.k);
  append(out.values, r.stats.f);
  append(out.values, r.stats.P);
  out.values.push_back(r.stats.balanced_value);
  out.values.push_back(r.stats.balance.max_vio);
  out.values.push_back(r.stats.balance.cv);
  out.values.push_back(r.stats.balance.normalized_entropy);
  out.values.push_back(r.stats.balance.min_share);
  out.values.push_back(r.stats.balance.max_share);
  append_discrete(out.discrete, r.stats.tokens_per_expert);
  append_discrete(out.discrete, r.stats.first_choice_tokens);
  out.discrete.push_back(r.stats.tokens);
  // Invariants: sum c = T k, sum first = T.
  if (r.stats.tokens_per_expert.sum() != r.stats.tokens * c.k ||
      r.stats.first_choice_tokens.sum() != r.stats.tokens) {
    fail(cat("switch_aux_loss counts: sum c = ", r.stats.tokens_per_expert.sum(), ", sum first = ",
             r.stats.first_choice_tokens.sum(), ", T = ", r.stats.tokens, ", k = ", c.k));
  }

  // The reusable object: forward + backward (recomputed scores) must equal the one-line form
  // (fused) bitwise, and backward_accumulate must add exactly that.
  if (c.h[31] & 2) {
    moebal::SwitchOptions no_mask = o;
    no_mask.mask = moebal::TokenMask{};
    moebal::SwitchAuxLoss<S> loss(c.N, c.k, no_mask);
    const C value = loss.forward(x, o.mask);
    RM<C> g(c.T, c.N);
    loss.backward(x, g);
    if (std::memcmp(&value, &r.loss, sizeof value) != 0 &&
        !(std::isnan(double(value)) && std::isnan(double(r.loss)))) {
      fail(cat("SwitchAuxLoss::forward = ", double(value), " differs from switch_aux_loss = ",
               double(r.loss)));
    }
    for (Index i = 0; i < g.size(); ++i) {
      const double a = double(g.data()[i]), b = double(r.grad.data()[i]);
      if (!(a == b || (std::isnan(a) && std::isnan(b)))) {
        fail(cat("SwitchAuxLoss::backward element ", i, " = ", a, " differs from switch_aux_loss ", b));
      }
    }
    RM<C> acc = RM<C>::Constant(c.T, c.N, C(0.25));
    loss.backward_accumulate(x, acc, C(2));
    append(out.values, acc);
    if constexpr (!std::is_same_v<S, C>) {
      // A bfloat16 gradient buffer: each element is the float gradient rounded once.
      RM<S> low(c.T, c.N);
      loss.backward(x, low);
      for (Index i = 0; i < low.size(); ++i) {
        const S expected = static_cast<S>(r.grad.data()[i]);
        if (!same_bits(double(low.data()[i]), double(expected)))
          fail(cat("SwitchAuxLoss::backward into bfloat16: element ", i, " = ",
                   double(low.data()[i]), ", float gradient rounded = ", double(expected)));
      }
    }
  }

  // switch_aux_loss_with_counts fed the loss's own counts gives the same loss and gradient.
  if (c.h[31] & 4) {
    const moebal::CountVector counts = o.convention == moebal::SwitchConvention::first_choice
                                           ? r.stats.first_choice_tokens
                                           : r.stats.tokens_per_expert;
    const auto w = moebal::switch_aux_loss_with_counts(x, counts, c.k, o);
    const double tol = std::is_same_v<C, double> ? 1e-12 : 1e-5;
    const double lw = double(w.loss), lr = double(r.loss);
    if (std::isfinite(lr) && std::isfinite(lw) &&
        std::abs(lw - lr) > tol * (std::abs(lr) + std::abs(c.coefficient) * c.N * c.k)) {
      fail(cat("switch_aux_loss_with_counts(own counts) = ", lw, ", switch_aux_loss = ", lr));
    }
    const double gscale = double(r.grad.cwiseAbs().maxCoeff()) +
                          std::abs(c.coefficient) * c.N * c.k / double(c.T);
    for (Index i = 0; i < w.grad.size(); ++i) {
      const double a = double(w.grad.data()[i]), b = double(r.grad.data()[i]);
      if (std::isfinite(a) && std::isfinite(b) && std::abs(a - b) > 10 * tol * gscale) {
        fail(cat("switch_aux_loss_with_counts gradient element ", i, " = ", a, ", switch_aux_loss: ", b));
      }
    }
    out.values.push_back(lw);
    append(out.values, w.grad);
  }
  return out;
}

template <class S>
Outcome call_z(const Case& c, const RM<S>& x, const MaskHolder& mask) {
  moebal::ZLossOptions o;
  o.coefficient = c.coefficient;
  o.mask = mask.view();
  const auto r = moebal::z_loss(x, o);
  Outcome out;
  out.objective = double(r.loss);
  out.has_grad = true;
  out.grad = to_double(r.grad);
  out.scale = std::abs(out.objective);
  out.values.push_back(r.mean_squared_lse);
  out.discrete.push_back(r.tokens);
  return out;
}

template <class S>
Outcome call_cv2(const Case& c, const RM<S>& x, const MaskHolder& mask) {
  moebal::Cv2Options o;
  o.gates = static_cast<moebal::ImportanceGates>(enum_code(c.h[28] & 15, 2));
  o.variance = static_cast<moebal::Cv2Variance>(enum_code(c.h[28] >> 4, 2));
  o.score = static_cast<moebal::ScoreFunction>(c.score);
  o.coefficient = c.coefficient;
  o.mask = mask.view();
  Outcome out;
  // The load metric instead. Not for bfloat16: moebal::cv2_load<Eigen::bfloat16> does not
  // compile (its visitor takes `const Scalar*`, the rows are `const float*`; see README.md).
  if constexpr (!std::is_same_v<S, Eigen::bfloat16>) {
   if ((c.h[31] & 8) && c.type != 2) {  // same branch for a bfloat16 case's float upcast
    const auto r = moebal::cv2_load(x, c.k, o);
    out.objective = double(r.loss);
    out.has_grad = true;  // exactly zero, and the counts are locally constant
    out.grad = to_double(r.grad);
    out.scale = std::abs(out.objective) + std::abs(c.coefficient) * c.N;
    append_discrete(out.discrete, r.counts);
    out.discrete.push_back(r.tokens);
    if (r.counts.sum() != r.tokens * c.k) fail("cv2_load: sum of counts != T k");
    if (!r.grad.isZero(0)) fail("cv2_load: gradient not exactly zero");
    return out;
   }
  }
  const auto r = moebal::cv2_importance_loss(x, c.k, o);
  out.objective = double(r.loss);
  out.has_grad = true;
  out.grad = to_double(r.grad);
  out.scale = std::abs(out.objective) + std::abs(c.coefficient) * c.N;
  append(out.values, r.importance);
  out.discrete.push_back(r.tokens);
  return out;
}

template <class S>
Outcome call_sequence(const Case& c, const RM<S>& x, const MaskHolder& mask) {
  const moebal::SequenceLayout layout = layout_of(c);
  moebal::SequenceOptions o;
  o.convention = static_cast<moebal::SwitchConvention>(c.convention);
  o.score = static_cast<moebal::ScoreFunction>(c.score);
  o.coefficient = c.coefficient;
  o.mask_mode = static_cast<moebal::SequenceMaskMode>(enum_code(c.h[13] >> 4, 2));
  o.mask = mask.view();
  const auto r = moebal::sequence_aux_loss(x, c.k, layout, o);
  Outcome out;
  out.objective = double(r.loss);
  out.has_grad = true;
  out.grad = to_double(r.grad);
  out.scale = std::abs(out.objective) + std::abs(c.coefficient) * c.N * c.k;
  append(out.values, r.sequence_losses);
  append_discrete(out.discrete, r.sequence_tokens);
  append_discrete(out.discrete, r.counts);
  return out;
}

template <class S>
Outcome call_combined(const Case& c, const RM<S>& x, const MaskHolder& mask) {
  moebal::CombinedOptions o;
  const std::uint8_t b = c.h[14];
  static const double values[4] = {1.0, 0.01, -0.5, 1e3};
  const double w = values[(b >> 4) & 3];
  o.weights.switch_loss = (b & 1) ? w : 0.0;
  o.weights.z = (b & 2) ? w : 0.0;
  o.weights.sequence = (b & 4) ? w : 0.0;
  o.weights.cv2_importance = (b & 8) ? w : 0.0;
  if (c.h[31] & 16) o.weights.z = (c.h[31] & 32) ? kNaN : kInf;  // must be rejected
  o.convention = static_cast<moebal::SwitchConvention>(c.convention);
  o.score = static_cast<moebal::ScoreFunction>(c.score);
  if (!(b & 128)) o.layout = layout_of(c);
  o.mask_mode = static_cast<moebal::SequenceMaskMode>(enum_code(c.h[13] >> 4, 2));
  o.cv2_variance = static_cast<moebal::Cv2Variance>(enum_code(c.h[28] >> 4, 2));
  o.mask = mask.view();
  const auto r = moebal::combined_aux_loss(x, c.k, o);
  Outcome out;
  out.objective = double(r.loss);
  out.has_grad = true;
  out.grad = to_double(r.grad);
  const auto& t = r.terms;
  out.values.insert(out.values.end(), {t.switch_loss, t.z, t.sequence, t.cv2_importance});
  out.scale = std::abs(t.switch_loss) + std::abs(t.z) + std::abs(t.sequence) +
              std::abs(t.cv2_importance) + std::abs(w) * c.N * (c.k + 1);
  append(out.values, r.stats.f);
  append(out.values, r.stats.P);
  if (b & (1 | 4)) {  // a selection-based term is on (see selection_margin)
    append_discrete(out.discrete, r.stats.tokens_per_expert);
    append_discrete(out.discrete, r.stats.first_choice_tokens);
  }
  // The value is the sum of the terms.
  const double sum = t.switch_loss + t.z + t.sequence + t.cv2_importance;
  const double tol = std::is_same_v<Compute<S>, double> ? 1e-12 : 1e-5;
  if (std::isfinite(sum) && std::isfinite(out.objective) &&
      std::abs(sum - out.objective) > tol * out.scale) {
    fail(cat("combined_aux_loss: loss ", out.objective, " != sum of terms ", sum));
  }
  return out;
}

moebal::DeviceBalanceOptions device_options(const Case& c) {
  moebal::DeviceBalanceOptions o;
  const std::uint8_t b = c.h[12];
  if (b % 4 < 3) {
    const std::vector<Index> d = divisors(c.N);
    o.devices = d[std::size_t((b >> 2) % d.size())];
  } else {
    o.devices = Index((b >> 2) % (c.N + 2));  // 0 .. N + 1, may not divide N
  }
  o.max_devices = Index(c.h[28] % (o.devices + 2));
  o.score = static_cast<moebal::ScoreFunction>(c.score);
  o.coefficient = c.coefficient;
  return o;
}

double expert_choice_factor(const Case& c) {
  const double table[16] = {1.0, 2.0, 0.5, 0.0,  -1.0, kNaN, kInf, 1e300,
                            double(c.N), 1e-3, 2.0 * c.N, 1.5, 4.0, 0.25, 1e30, 8.0};
  return table[c.h[27] % 16];
}

template <class S>
Outcome call_device(const Case& c, const RM<S>& x, const MaskHolder& mask) {
  moebal::DeviceBalanceOptions o = device_options(c);
  o.mask = mask.view();
  const bool communication = (c.h[28] & 128) != 0;
  const auto r = communication ? moebal::communication_balance_loss(x, c.k, o)
                               : moebal::device_balance_loss(x, c.k, o);
  Outcome out;
  out.objective = double(r.loss);
  out.has_grad = true;
  out.grad = to_double(r.grad);
  out.scale = std::abs(out.objective) + std::abs(c.coefficient) * c.N * c.k;
  append(out.values, r.f);
  append(out.values, r.P);
  out.discrete.push_back(r.tokens);
  const Eigen::VectorXd f_scaled = (r.f * 1e6).array().round().matrix();  // f: counts / constants
  append_discrete(out.discrete, f_scaled);
  return out;
}

// d loss / d output: a fixed random matrix in [-1, 1].
template <class C>
RM<C> cotangent(const Case& c, Index rows, Index cols) {
  Rng rng(std::uint64_t(c.h[29]) * 31 + 7);
  RM<C> g(rows, cols);
  for (Index i = 0; i < g.size(); ++i) g.data()[i] = C(rng.symmetric());
  return g;
}

void check_indices(const moebal::IndexMatrix& idx, Index N, const char* what) {
  for (Index t = 0; t < idx.rows(); ++t) {
    for (Index i = 0; i < idx.cols(); ++i) {
      const Index e = idx(t, i);
      if (e < 0 || e >= N) fail(cat(what, ": index ", e, " out of [0, ", N, ") at row ", t));
      for (Index j = 0; j < i; ++j)
        if (idx(t, j) == e) fail(cat(what, ": expert ", e, " selected twice in row ", t));
    }
  }
}

template <class S>
Outcome call_route(const Case& c, const RM<S>& x) {
  using C = Compute<S>;
  const moebal::RouterOptions o = router_options(c);
  const auto r = moebal::route(x, c.k, o);
  check_indices(r.indices, c.N, "route");
  const RM<C> G = cotangent<C>(c, c.T, c.k);
  const auto grad = moebal::route_backward(x, r.indices, G, o);
  Outcome out;
  out.has_grad = true;
  out.grad = to_double(grad);
  double obj = 0.0, scale = 0.0;
  for (Index i = 0; i < G.size(); ++i) {
    obj += double(G.data()[i]) * double(r.weights.data()[i]);
    scale += std::abs(double(G.data()[i]) * double(r.weights.data()[i]));
  }
  out.objective = obj;
  out.scale = scale;
  append(out.values, r.weights);
  append_discrete(out.discrete, r.indices);
  return out;
}

template <class S>
Outcome call_capacity(const Case& c, const RM<S>& x) {
  using C = Compute<S>;
  moebal::RouterOptions ro;  // a plain router: the branch is about capacity
  ro.score = static_cast<moebal::RouterScore>(enum_code(c.h[15], 3));
  // Renormalized softmax weights only: the sum of the top-k softmax scores is >= 1/N, while
  // sigmoid scores that underflow to 0 make u / (sum u + 0) NaN (a finding of the route branch).
  ro.normalize = (c.h[16] & 8) != 0 && ro.score == moebal::RouterScore::softmax;
  const auto r = moebal::route(x, c.k, ro);
  moebal::IndexMatrix indices = r.indices;
  if (c.h[25] & 128) indices(c.h[29] % c.T, 0) = (c.h[29] & 1) ? c.N : -1;  // must be rejected
  const moebal::CapacityOptions o = capacity_options(c);
  const auto cr = moebal::apply_capacity(indices, r.weights, c.N, o);
  const Index T = c.T, k = c.k, N = c.N;
  // Invariants.
  if (cr.capacity < 0) fail(cat("apply_capacity: negative capacity ", cr.capacity));
  if (cr.counts_before.sum() != T * k) fail("apply_capacity: counts_before do not sum to T k");
  Index kept_total = 0;
  for (Index e = 0; e < N; ++e) {
    if (cr.counts_after[e] > cr.capacity || cr.counts_after[e] > cr.counts_before[e] ||
        cr.counts_after[e] < 0) {
      fail(cat("apply_capacity: expert ", e, " keeps ", cr.counts_after[e], " of ",
               cr.counts_before[e], " with capacity ", cr.capacity));
    }
    const Index routed_before = cr.counts_before[e];
    const Index expected_after = std::min(routed_before, cr.capacity);
    if (cr.counts_after[e] != expected_after) {
      fail(cat("apply_capacity: expert ", e, " keeps ", cr.counts_after[e], ", expected min(",
               routed_before, ", C = ", cr.capacity, ")"));
    }
    kept_total += cr.counts_after[e];
  }
  Index kept_flags = 0;
  for (Index t = 0; t < T; ++t) {
    for (Index s = 0; s < k; ++s) {
      const int kept = cr.kept(t, s);
      if (kept != 0 && kept != 1) fail("apply_capacity: kept flag not 0 or 1");
      kept_flags += kept;
      if (!kept && cr.weights(t, s) != C(0)) fail("apply_capacity: dropped slot with nonzero weight");
      if (kept && !o.renormalize && !same_bits(double(cr.weights(t, s)), double(r.weights(t, s))))
        fail("apply_capacity: kept weight changed without renormalization");
    }
  }
  if (kept_flags != kept_total) fail("apply_capacity: kept flags disagree with counts_after");
  Index map_total = 0;
  for (Index i = 0; i < cr.dense_map.size(); ++i) map_total += cr.dense_map.data()[i];
  if (map_total != kept_total + cr.padded.sum()) fail("apply_capacity: dense map total");
  for (Index e = 0; e < N; ++e) {
    const double d = cr.dropped_fraction[e];
    if (!(d >= 0.0 && d <= 1.0)) fail(cat("apply_capacity: dropped fraction ", d));
  }
  const RM<C> G = cotangent<C>(c, T, k);
  const RM<C> g = moebal::capacity_backward(r.weights, cr, G, o);
  Outcome out;
  out.has_grad = false;
  append(out.values, cr.weights);
  append(out.values, cr.dense_weights);
  append(out.values, g);
  out.values.push_back(cr.dropped_fraction_overall);
  append_discrete(out.discrete, cr.kept);
  out.discrete.push_back(cr.capacity);
  return out;
}

// Sums a buffer as if `ranks` identical ranks had contributed it.
struct ScaledSync {
  double ranks;
  void operator()(double* data, Index size) const {
    for (Index i = 0; i < size; ++i) data[i] *= ranks;
  }
};
// A rank that disagrees on N (adds one more expert's worth to the header).
struct DisagreeingSync {
  void operator()(double* data, Index size) const {
    for (Index i = 0; i < size; ++i) data[i] *= 2.0;
    if (size == 10) data[1] += 1.0;
  }
};

template <class S>
Outcome call_global(const Case& c, const RM<S>& x, const MaskHolder& mask) {
  using C = Compute<S>;
  const std::uint8_t b = c.h[26];
  moebal::GlobalBatchOptions o;
  o.convention = static_cast<moebal::SwitchConvention>(c.convention);
  o.score = static_cast<moebal::ScoreFunction>(c.score);
  o.coefficient = c.coefficient;
  o.weighting = static_cast<moebal::GlobalWeighting>((b >> 2) & 1);
  o.micro_batch_weight = (b & 8) ? 0.01 : 0.0;
  const int mode = (b >> 4) & 3;  // 0 single rank, 1 two identical ranks, 2 disagreeing, 3 misuse
  const bool running = (b & 64) != 0;
  const Index m = std::min<Index>(1 + (b & 3) % 3, c.T);
  // Micro-batch j: rows [begin[j], begin[j + 1]).
  std::vector<Index> begin(std::size_t(m + 1));
  for (Index j = 0; j <= m; ++j) begin[std::size_t(j)] = c.T * j / m;
  const bool mask_fits = mask.kind == MaskKind::none || mask.length == c.T;
  auto mb_mask = [&](Index j) {
    const Index n = begin[std::size_t(j + 1)] - begin[std::size_t(j)];
    // A mask of the wrong length gives every micro-batch a mask of the wrong length.
    if (!mask_fits) return mask.view(0, mask.length >= n + 1 ? n + 1 : n - 1);
    return mask.view(begin[std::size_t(j)], n);
  };
  auto rows = [&](Index j) {
    return x.middleRows(begin[std::size_t(j)], begin[std::size_t(j + 1)] - begin[std::size_t(j)]);
  };
  Outcome out;
  out.has_grad = true;
  out.grad = RMd::Zero(c.T, c.N);
  double total = 0.0;

  if (running) {
    moebal::RunningGlobalBalance<S> balance(c.N, c.k, o);
    for (Index j = 0; j < m; ++j) {
      const Index n = begin[std::size_t(j + 1)] - begin[std::size_t(j)];
      RM<C> g(n, c.N);
      C value;
      if (mode == 1) {
        value = balance.forward_backward(rows(j), g, ScaledSync{2.0}, mb_mask(j));
      } else if (mode == 2) {
        value = balance.forward_backward(rows(j), g, DisagreeingSync{}, mb_mask(j));
      } else {
        value = balance.forward_backward(rows(j), g, moebal::NoSync{}, mb_mask(j));
      }
      total += double(value);
      out.grad.middleRows(begin[std::size_t(j)], n) = to_double(g);
      append(out.values, balance.f());
    }
    if (mode == 2) fail("RunningGlobalBalance::forward_backward with a disagreeing rank did not throw");
    out.objective = total;
    out.scale = std::abs(total) + (std::abs(c.coefficient) + 0.01) * c.N * c.k * m;
    return out;
  }

  moebal::GlobalBatchBalance<S> balance(c.N, c.k, o);
  if (mode == 3) {
    // Misuse: forward before synchronize, count after synchronize. Both must throw.
    bool threw = false;
    try {
      balance.forward(rows(0), mb_mask(0));
    } catch (const moebal::invalid_argument&) {
      threw = true;
    }
    if (!threw) fail("GlobalBatchBalance::forward before synchronize did not throw");
    for (Index j = 0; j < m; ++j) balance.count(rows(j), mb_mask(j));
    balance.synchronize();
    threw = false;
    try {
      balance.count(rows(0), mb_mask(0));
    } catch (const moebal::invalid_argument&) {
      threw = true;
    }
    if (!threw) fail("GlobalBatchBalance::count after synchronize did not throw");
  } else {
    for (Index j = 0; j < m; ++j) balance.count(rows(j), mb_mask(j));
    if (mode == 1) {
      balance.synchronize(ScaledSync{2.0});
    } else if (mode == 2) {
      balance.synchronize(DisagreeingSync{});
      fail("GlobalBatchBalance::synchronize with a disagreeing rank did not throw");
    } else {
      balance.synchronize();
    }
  }
  for (Index j = 0; j < m; ++j) {
    const Index n = begin[std::size_t(j + 1)] - begin[std::size_t(j)];
    RM<C> g(n, c.N);
    const C value = balance.forward_backward(rows(j), g, mb_mask(j));
    total += double(value);
    out.grad.middleRows(begin[std::size_t(j)], n) = to_double(g);
  }
  append(out.values, balance.global_f());
  append_discrete(out.discrete, balance.global_counts());
  out.discrete.push_back(std::int64_t(balance.global_tokens()));
  out.objective = total;
  out.scale = std::abs(total) + (std::abs(c.coefficient) + 0.01) * c.N * c.k;

  // Exact global balance with token weighting and no micro-batch term: the shares sum to the
  // Switch loss of the concatenated batch (halved by a second identical rank), and the
  // gradient rows are that loss's gradient rows.
  if (o.weighting == moebal::GlobalWeighting::tokens && o.micro_batch_weight == 0.0 &&
      mode != 2 && mask_fits) {
    moebal::SwitchOptions so;
    so.convention = o.convention;
    so.score = o.score;
    so.coefficient = o.coefficient;
    so.mask = mask.view();
    const auto r = moebal::switch_aux_loss(x, c.k, so);
    const double ranks = mode == 1 ? 2.0 : 1.0;
    const double tol = std::is_same_v<C, double> ? 1e-12 : 2e-5;
    const double expected = double(r.loss) / ranks;
    if (std::isfinite(expected) && std::isfinite(total) &&
        std::abs(total - expected) > tol * out.scale) {
      fail(cat("GlobalBatchBalance shares sum to ", total, ", Switch loss of the batch / ranks = ",
               expected));
    }
    // Gradient terms are of size a N / T (times q f <= 1): the rounding scale.
    const double gscale = double(r.grad.cwiseAbs().maxCoeff()) / ranks +
                          std::abs(c.coefficient) * c.N * c.k / double(std::max<Index>(c.T, 1));
    for (Index i = 0; i < r.grad.size(); ++i) {
      const double a = out.grad.data()[i], e = double(r.grad.data()[i]) / ranks;
      if (std::isfinite(a) && std::isfinite(e) && std::abs(a - e) > 10 * tol * gscale) {
        fail(cat("GlobalBatchBalance gradient element ", i, " = ", a, ", Switch loss / ranks: ", e));
      }
    }
  }
  return out;
}

template <class S>
Outcome call_expert_choice(const Case& c, const RM<S>& x) {
  using C = Compute<S>;
  const double cf = expert_choice_factor(c);
  const auto r = moebal::expert_choice(x, cf);
  const Index T = c.T, N = c.N, Cap = r.capacity;
  if (Cap < 1 || Cap > T) fail(cat("expert_choice: capacity ", Cap, " outside [1, T = ", T, "]"));
  if (r.tokens.rows() != N || r.tokens.cols() != Cap) fail("expert_choice: tokens shape");
  std::vector<std::int64_t> sig;
  for (Index e = 0; e < N; ++e) {
    std::vector<std::int64_t> picked;
    for (Index i = 0; i < Cap; ++i) {
      const Index t = r.tokens(e, i);
      if (t < 0 || t >= T) fail(cat("expert_choice: token ", t, " out of range"));
      picked.push_back(t);
    }
    std::sort(picked.begin(), picked.end());
    if (std::adjacent_find(picked.begin(), picked.end()) != picked.end())
      fail("expert_choice: a token picked twice by one expert");
    sig.insert(sig.end(), picked.begin(), picked.end());
  }
  const RM<C> G = cotangent<C>(c, T, N);
  const auto grad = moebal::expert_choice_backward(x, r, G);
  Outcome out;
  out.has_grad = true;
  out.grad = to_double(grad);
  double obj = 0.0, scale = 0.0;
  for (Index i = 0; i < G.size(); ++i) {
    obj += double(G.data()[i]) * double(r.weights.data()[i]);
    scale += std::abs(double(G.data()[i]) * double(r.weights.data()[i]));
  }
  out.objective = obj;
  out.scale = scale;
  append(out.values, r.weights);
  out.discrete = sig;
  out.discrete.push_back(r.tokens_without_expert);
  return out;
}

template <class S>
Outcome call_api(const Case& c, const RM<S>& x) {
  const MaskHolder mask(c);
  switch (c.api) {
    case kSwitch: return call_switch(c, x, mask);
    case kZ: return call_z(c, x, mask);
    case kCv2: return call_cv2(c, x, mask);
    case kSequence: return call_sequence(c, x, mask);
    case kCombined: return call_combined(c, x, mask);
    case kDevice: return call_device(c, x, mask);
    case kRoute: return call_route(c, x);
    case kCapacity: return call_capacity(c, x);
    case kGlobal: return call_global(c, x, mask);
    default: return call_expert_choice(c, x);
  }
}

// ------------------------------------------------------------------------------------------
// What the contract says must happen.

enum class Expect { unknown, must_throw, must_not_throw };

bool uses_mask(int api) {
  return api != kRoute && api != kCapacity && api != kExpertChoice;
}
bool uses_k(int api) { return api != kZ && api != kExpertChoice; }
bool uses_coefficient(int api) {
  return api != kRoute && api != kCapacity && api != kExpertChoice && api != kCombined;
}

Expect predict(const Case& c, const Facts& f) {
  const bool k_ok = c.k >= 1 && c.k <= c.N;
  const bool coefficient_ok = std::isfinite(c.coefficient);
  const bool convention_ok = c.convention >= 0 && c.convention < 3;
  const bool score_ok = c.score >= 0 && c.score < 2;
  if (uses_k(c.api) && !k_ok) return Expect::must_throw;
  if (uses_mask(c.api) && !f.mask_valid) return Expect::must_throw;
  if (uses_coefficient(c.api) && !coefficient_ok) return Expect::must_throw;
  const bool routing = c.api == kRoute || c.api == kCapacity || c.api == kExpertChoice;
  if (routing ? f.any_nan_or_pinf_anywhere : f.any_nan_or_pinf) return Expect::must_throw;
  switch (c.api) {
    case kSwitch:
    case kSequence:
    case kDevice:
    case kGlobal:
    case kCombined:
      if (!score_ok) return Expect::must_throw;
      if (c.api != kDevice && !convention_ok) return Expect::must_throw;
      break;
    case kCv2: {
      if (!score_ok) return Expect::must_throw;
      const int gates = enum_code(c.h[28] & 15, 2), variance = enum_code(c.h[28] >> 4, 2);
      const bool load = (c.h[31] & 8) && c.type != 2;  // cv2_load ignores the variance
      if (gates < 0 || gates > 1 || (!load && (variance < 0 || variance > 1)))
        return Expect::must_throw;
      if (!load && variance == 1 && c.N < 2) return Expect::must_throw;
      break;
    }
    default: break;
  }
  switch (c.api) {
    case kSequence: {
      const int mode = enum_code(c.h[13] >> 4, 2);
      if (mode < 0 || mode > 1 || !layout_valid(layout_of(c), c.T)) return Expect::must_throw;
      break;
    }
    case kCombined: {
      if (c.h[31] & 16) return Expect::must_throw;  // a non-finite weight
      const std::uint8_t b = c.h[14];
      if ((b & 4) && (b & 128)) return Expect::must_throw;  // sequence term, no layout
      // Enum values out of range, as every other options struct's are.
      const int mask_mode = enum_code(c.h[13] >> 4, 2), variance = enum_code(c.h[28] >> 4, 2);
      if (mask_mode < 0 || mask_mode > 1 || variance < 0 || variance > 1) return Expect::must_throw;
      break;
    }
    case kDevice: {
      const moebal::DeviceBalanceOptions o = device_options(c);
      if (o.devices < 1 || c.N % o.devices != 0) return Expect::must_throw;
      if ((c.h[28] & 128) && (o.max_devices < 1 || o.max_devices > o.devices))
        return Expect::must_throw;
      break;
    }
    case kCapacity: {
      if (c.h[25] & 128) return Expect::must_throw;  // an index out of range
      if (!std::isfinite(capacity_options(c).capacity_factor)) return Expect::must_throw;
      break;
    }
    case kExpertChoice: {
      const double cf = expert_choice_factor(c);
      if (!(cf > 0) || !std::isfinite(cf)) return Expect::must_throw;
      break;
    }
    case kGlobal:
      if (((c.h[26] >> 4) & 3) == 2) return Expect::must_throw;  // a disagreeing rank
      break;
    default: break;
  }
  // Valid by the contract: the checks README.md lists are exhaustive for these losses.
  const bool ninf_rows_ok =
      !f.any_all_ninf || (c.score == 1 && c.api != kZ);  // sigmoid accepts all -Inf rows
  switch (c.api) {
    case kSwitch:
    case kZ:
      if (ninf_rows_ok) return Expect::must_not_throw;
      break;
    case kCv2: {
      // Top-k gates q_i / sum_topk q are undefined, and rejected, where every top-k sigmoid
      // score of a real row is 0 (a row of -Inf, or logits below the exp underflow bound);
      // so is the population CV^2 of dense gates when every importance is 0: no prediction
      // near that bound. A d L / d I beyond the compute type (a huge coefficient) is rejected
      // by the backward pass: no prediction for huge coefficients either.
      const bool load = (c.h[31] & 8) && c.type != 2;
      const double reasonable = c.type == 0 ? kReasonable<double> : kReasonable<float>;
      if (!load && std::abs(c.coefficient) > reasonable) return Expect::unknown;
      const bool topk_gates = enum_code(c.h[28] & 15, 2) == 1;
      const bool population = enum_code(c.h[28] >> 4, 2) == 0;
      if (!load && (topk_gates || population) && c.score == 1) {
        const double bound = c.type == 0 ? -700.0 : -80.0;
        for (Index t = 0; t < c.T; ++t)
          if (f.real[std::size_t(t)] && f.seen.row(t).maxCoeff() < bound) return Expect::unknown;
      }
      if (ninf_rows_ok) return Expect::must_not_throw;
      break;
    }
    case kSequence: {
      const int mode = enum_code(c.h[13] >> 4, 2);
      if (ninf_rows_ok && mode >= 0 && mode <= 1 && layout_valid(layout_of(c), c.T))
        return Expect::must_not_throw;
      break;
    }
    default: break;
  }
  return Expect::unknown;
}

// Whether the outputs can be required finite: the true values must not overflow the compute
// type (a huge coefficient, or the z-loss of huge logits, may legitimately give Inf).
template <class C>
bool finite_expected(const Case& c, const Facts& f) {
  const double big = kReasonable<C>;
  if (std::abs(c.coefficient) > big) return false;
  const double lse = f.max_abs + std::log(double(c.N)) + 1.0;
  const double limit = double(std::numeric_limits<C>::max()) / 64.0;
  const bool z_involved = c.api == kZ || (c.api == kCombined && (c.h[14] & 2));
  if (z_involved) {
    // mean_squared_lse itself must be representable (a coefficient of 0 does not save it).
    const double weight = c.api == kZ ? std::max(std::abs(c.coefficient), 1.0) : 1e3;
    if (weight * lse * lse > limit) return false;
  }
  if (c.api == kRoute) {
    const moebal::RouterOptions o = router_options(c);
    if (std::abs(o.scaling_factor) > big) return false;
  }
  return true;
}

// ------------------------------------------------------------------------------------------
// Selection margins (double logits only): the gradient check runs only when every discrete
// decision is at least kMargin away from changing.

double softmax_or_sigmoid_margin(const RMd& x, const Facts& f, int score, Index k) {
  const Index T = x.rows(), N = x.cols();
  double margin = kInf;
  std::vector<double> q(std::size_t(N), 0.0);
  for (Index t = 0; t < T; ++t) {
    if (!f.real[std::size_t(t)]) continue;
    const double* row = x.data() + t * N;
    if (score == 0) {
      double mx = -kInf;
      for (Index j = 0; j < N; ++j) mx = std::max(mx, row[j]);
      double sum = 0.0;
      for (Index j = 0; j < N; ++j) sum += (q[std::size_t(j)] = std::exp(row[j] - mx));
      for (auto& v : q) v /= sum;
    } else {
      double sum = 0.0;
      for (Index j = 0; j < N; ++j) sum += (q[std::size_t(j)] = 1.0 / (1.0 + std::exp(-row[j])));
      for (auto& v : q) v /= (sum + 1e-20);
    }
    std::vector<double> sorted = q;
    std::sort(sorted.begin(), sorted.end(), std::greater<double>());
    if (N > 1) margin = std::min(margin, sorted[0] - sorted[1]);
    if (k >= 1 && k < N) margin = std::min(margin, sorted[std::size_t(k - 1)] - sorted[std::size_t(k)]);
  }
  return margin;
}

// The router's selection (bias, groups, top-k order) recomputed in double: the smallest gap
// between consecutive values among the top k + 1, and between the kept and dropped groups.
double router_margin(const Case& c, const RMd& x) {
  const moebal::RouterOptions o = router_options(c);
  const Index T = x.rows(), N = x.cols(), k = c.k;
  double margin = kInf;
  std::vector<double> s(static_cast<std::size_t>(N)), v(static_cast<std::size_t>(N));
  for (Index t = 0; t < T; ++t) {
    const double* row = x.data() + t * N;
    if (o.score == moebal::RouterScore::softmax) {
      double mx = -kInf, sum = 0.0;
      for (Index j = 0; j < N; ++j) mx = std::max(mx, row[j]);
      for (Index j = 0; j < N; ++j) sum += (s[std::size_t(j)] = std::exp(row[j] - mx));
      for (auto& e : s) e /= sum;
    } else if (o.score == moebal::RouterScore::sigmoid) {
      for (Index j = 0; j < N; ++j) s[std::size_t(j)] = 1.0 / (1.0 + std::exp(-row[j]));
    } else {
      for (Index j = 0; j < N; ++j) {
        const double z = row[j];
        s[std::size_t(j)] = std::sqrt(std::max(z, 0.0) + std::log1p(std::exp(-std::abs(z))));
      }
    }
    for (Index j = 0; j < N; ++j) {
      v[std::size_t(j)] = (o.select_on_logits ? row[j] : s[std::size_t(j)]) +
                          (o.expert_bias.size() ? o.expert_bias[j] : 0.0);
    }
    const Index G = o.num_groups;
    if (G > 1) {
      const Index size = N / G, kept = o.group_topk;
      std::vector<double> gs(static_cast<std::size_t>(G));
      for (Index g = 0; g < G; ++g) {
        std::vector<double> vals(v.begin() + g * size, v.begin() + (g + 1) * size);
        std::sort(vals.begin(), vals.end(), std::greater<double>());
        Index top = o.group_score == moebal::GroupScore::max ? 1
                    : o.group_score == moebal::GroupScore::sum_top2 ? std::min<Index>(2, size)
                                                                    : k / kept;
        double sum = 0.0;
        for (Index i = 0; i < top; ++i) sum += vals[std::size_t(i)];
        gs[std::size_t(g)] = sum;
      }
      std::vector<Index> order(static_cast<std::size_t>(G));
      std::iota(order.begin(), order.end(), Index(0));
      std::stable_sort(order.begin(), order.end(),
                       [&](Index a, Index b) { return gs[std::size_t(a)] > gs[std::size_t(b)]; });
      if (kept < G)
        margin = std::min(margin, gs[std::size_t(order[std::size_t(kept - 1)])] -
                                      gs[std::size_t(order[std::size_t(kept)])]);
      const double fill = o.group_fill == moebal::GroupFill::zero ? 0.0 : -kInf;
      for (Index i = kept; i < G; ++i) {
        const Index g = order[std::size_t(i)];
        std::fill(v.begin() + g * size, v.begin() + (g + 1) * size, fill);
      }
    }
    std::vector<double> sorted = v;
    std::sort(sorted.begin(), sorted.end(), std::greater<double>());
    for (Index i = 0; i < std::min(k, N - 1); ++i)
      margin = std::min(margin, sorted[std::size_t(i)] - sorted[std::size_t(i + 1)]);
    // The weights' kinks: the clamp max(sum u, eps), and a vanishing denominator.
    if (o.normalize) {
      double sum = 0.0;
      std::vector<Index> sel(static_cast<std::size_t>(N));
      std::iota(sel.begin(), sel.end(), Index(0));
      std::stable_sort(sel.begin(), sel.end(),
                       [&](Index a, Index b) { return v[std::size_t(a)] > v[std::size_t(b)]; });
      if (o.weights == moebal::RouterWeights::softmax_of_selected) {
        sum = 1.0;
      } else {
        for (Index i = 0; i < k; ++i) sum += s[std::size_t(sel[std::size_t(i)])];
      }
      if (sum < 1e-6) return 0.0;
      if (o.epsilon_mode == moebal::NormalizeEpsilon::clamp)
        margin = std::min(margin, std::abs(sum - o.normalize_epsilon) / std::max(sum, 1e-300));
    }
  }
  return margin;
}

double expert_choice_margin(const RMd& x, Index C) {
  const Index T = x.rows(), N = x.cols();
  if (C >= T) return kInf;
  RMd s(T, N);
  for (Index t = 0; t < T; ++t) {
    double mx = -kInf, sum = 0.0;
    for (Index j = 0; j < N; ++j) mx = std::max(mx, x(t, j));
    for (Index j = 0; j < N; ++j) sum += (s(t, j) = std::exp(x(t, j) - mx));
    s.row(t) /= sum;
  }
  double margin = kInf;
  for (Index e = 0; e < N; ++e) {
    std::vector<double> col(static_cast<std::size_t>(T));
    for (Index t = 0; t < T; ++t) col[std::size_t(t)] = s(t, e);
    std::sort(col.begin(), col.end(), std::greater<double>());
    margin = std::min(margin, col[std::size_t(C - 1)] - col[std::size_t(C)]);
  }
  return margin;
}

double selection_margin(const Case& c, const RMd& x, const Facts& f, const Outcome& base) {
  switch (c.api) {
    case kZ: return kInf;
    case kCv2: {
      const bool topk = enum_code(c.h[28] & 15, 2) == 1;
      const bool load = (c.h[31] & 8) && c.type != 2;
      if (!topk && !load) return kInf;  // dense gates: no selection involved
      return softmax_or_sigmoid_margin(x, f, c.score, c.k);
    }
    case kRoute: return router_margin(c, x);
    case kCapacity: return 0.0;  // no gradient checked
    case kExpertChoice: {
      const Index C = base.discrete.empty() ? 0 : Index(base.discrete.size() - 1) / c.N;
      return expert_choice_margin(x, C);
    }
    case kCombined: {
      const std::uint8_t b = c.h[14];
      if (!(b & (1 | 4))) return kInf;  // only z and dense CV^2: no selection involved
      return softmax_or_sigmoid_margin(x, f, c.score, c.k);
    }
    default: return softmax_or_sigmoid_margin(x, f, c.score, c.k);
  }
}

// ------------------------------------------------------------------------------------------
// The checks.

void check_message(const moebal::invalid_argument& e) {
  const std::string m = e.what();
  if (m.rfind("moebal::", 0) != 0 || m.find("argument '") == std::string::npos) {
    fail(cat("badly formed invalid_argument message: \"", m, "\""));
  }
}

template <class C>
void check_finite(const Outcome& out, const char* what) {
  if (!std::isfinite(out.objective)) fail(cat(what, ": non-finite value ", out.objective));
  if (out.has_grad) {
    for (Index i = 0; i < out.grad.size(); ++i) {
      if (!std::isfinite(out.grad.data()[i])) {
        fail(cat(what, ": non-finite gradient ", out.grad.data()[i], " at row ",
                 i / out.grad.cols(), ", column ", i % out.grad.cols()));
      }
    }
  }
  for (std::size_t i = 0; i < out.values.size(); ++i) {
    if (!std::isfinite(out.values[i])) fail(cat(what, ": non-finite output #", i, " = ", out.values[i]));
  }
}

void compare_bitwise(const Outcome& a, const Outcome& b) {
  if (!same_bits(a.objective, b.objective))
    fail(cat("bfloat16 value ", a.objective, " != float value of the upcast logits ", b.objective));
  if (a.grad.size() != b.grad.size()) fail("bfloat16 and float gradients differ in shape");
  for (Index i = 0; i < a.grad.size(); ++i) {
    if (!same_bits(a.grad.data()[i], b.grad.data()[i]))
      fail(cat("bfloat16 gradient element ", i, " = ", a.grad.data()[i], " != float ", b.grad.data()[i]));
  }
  if (a.values.size() != b.values.size()) fail("bfloat16 and float outputs differ in count");
  for (std::size_t i = 0; i < a.values.size(); ++i) {
    if (!same_bits(a.values[i], b.values[i]))
      fail(cat("bfloat16 output #", i, " = ", a.values[i], " != float ", b.values[i]));
  }
  if (a.discrete != b.discrete) fail("bfloat16 and float selections differ");
}

// Runs the call; returns the outcome, or nothing if it threw invalid_argument (checked).
template <class S>
std::optional<Outcome> run(const Case& c, const RM<S>& x, std::string* message = nullptr) {
  try {
    return call_api<S>(c, x);
  } catch (const moebal::invalid_argument& e) {
    check_message(e);
    if (message) *message = e.what();
    return std::nullopt;
  } catch (const std::exception& e) {
    fail(cat("exception other than moebal::invalid_argument: ", e.what()));
  } catch (...) {
    fail("non-standard exception");
  }
}

// Per-API counters, printed at exit with MOEBAL_FUZZ_STATS=1 in the environment: how many
// inputs reached each API, were accepted, and had their gradient checked.
struct Stats {
  long long calls[kApiCount] = {}, accepted[kApiCount] = {}, gradchecks[kApiCount] = {};
  ~Stats() {
    const char* v = std::getenv("MOEBAL_FUZZ_STATS");
    if (v == nullptr || v[0] == '\0' || v[0] == '0') return;
    std::fprintf(stderr, "fuzz_api stats: api calls accepted gradient-checked\n");
    for (int a = 0; a < kApiCount; ++a)
      std::fprintf(stderr, "  %-20s %10lld %10lld %10lld\n", kApiNames[a], calls[a], accepted[a],
                   gradchecks[a]);
  }
};
Stats g_stats;

// The central difference along v with step h: f(x + h v) - f(x - h v), and the analytic
// prediction g . (dp - dm) for the perturbations dp = fl(x + h v) - x, dm = fl(x - h v) - x
// actually applied (non-finite entries stay put).
struct Difference {
  double numerical = 0.0, analytic = 0.0, scale = 0.0;
};

Difference central_difference(const Case& c, const RMd& x, const RMd& v, double h,
                              const Outcome& base, double margin) {
  RMd xp = x + h * v, xm = x - h * v;
  Difference d;
  for (Index i = 0; i < x.size(); ++i) {
    if (!std::isfinite(x.data()[i])) {
      xp.data()[i] = xm.data()[i] = x.data()[i];
      continue;
    }
    d.analytic += base.grad.data()[i] * ((xp.data()[i] - x.data()[i]) - (xm.data()[i] - x.data()[i]));
  }
  std::string message;
  const std::optional<Outcome> plus = run<double>(c, xp, &message);
  if (!plus) fail(cat("a perturbation of ", h, " made the input invalid: ", message));
  const std::optional<Outcome> minus = run<double>(c, xm, &message);
  if (!minus) fail(cat("a perturbation of ", h, " made the input invalid: ", message));
  if (plus->discrete != base.discrete || minus->discrete != base.discrete) {
    fail(cat("the selection changed under a perturbation of ", h,
             " although every decision has a margin of ", margin, " (>= ", kMargin, ")"));
  }
  d.numerical = plus->objective - minus->objective;
  d.scale = std::max({base.scale, std::abs(plus->objective), std::abs(minus->objective)});
  return d;
}

// Central differences with Richardson extrapolation along one random unit direction v:
//   R = (8 D(h/2) - D(h)) / 6 = h g.v + O(h^5),  D(s) = f(x + s v) - f(x - s v),
// against the same combination of the analytic predictions. The step h is as large as the
// selection margins allow (every top-k decision stays the same; this is verified), so that the
// loss's rounding noise (1024 eps |L| per evaluation) is far below the 1e-4 relative tolerance.
void gradient_check(const Case& c, const RMd& x, const Facts& f, const Outcome& base) {
  if (!base.has_grad) return;
  if (f.max_abs > 1e3) return;  // small perturbations would be lost in rounding
  const double margin = selection_margin(c, x, f, base);
  if (!(margin >= kMargin)) return;
  // A random unit direction over the finite entries.
  Rng rng(std::uint64_t(c.h[30]) * 1315423911ull + 17);
  RMd v(x.rows(), x.cols());
  for (Index i = 0; i < v.size(); ++i)
    v.data()[i] = std::isfinite(x.data()[i]) ? rng.normal() : 0.0;
  const double norm = v.norm();
  if (!(norm > 0)) return;
  v /= norm;
  // Scores move by at most 2 h per unit of logit, group scores by up to N times that.
  const double h = std::clamp(margin / (8.0 * double(c.N)), kStep, 1e-3);
  const Difference full = central_difference(c, x, v, h, base, margin);
  const Difference half = central_difference(c, x, v, h / 2, base, margin);
  ++g_stats.gradchecks[c.api];
  double analytic = (8.0 * half.analytic - full.analytic) / 6.0;
#ifdef MOEBAL_FUZZ_SELFTEST
  analytic *= 1.001;  // a gradient wrong by 0.1 %: the check must catch it
#endif
  const double numerical = (8.0 * half.numerical - full.numerical) / 6.0;
  const double scale = std::max(full.scale, half.scale);
  const double noise = 3.0 * 1024.0 * std::numeric_limits<double>::epsilon() * scale;
  const double tolerance = noise + 1e-4 * std::max(std::abs(numerical), std::abs(analytic));
  if (!(std::abs(numerical - analytic) <= tolerance)) {
    fail(cat("directional gradient check (step ", h, "): analytic ", analytic / h, ", numerical ",
             numerical / h, " (difference ", std::abs(numerical - analytic) / h, ", tolerance ",
             tolerance / h, ", margin ", margin, ")"));
  }
}

// Calls whose outputs are known to be wrong (non-finite, or a failing gradient check). None is
// open: every issue found on 2026-11-23 is fixed (tests/fuzz/README.md); each reproducer in
// tests/fuzz/crashes/ must now pass. Add a class here while a newly found one is open.
const char* known_issue(const Case&, const Facts&, const Outcome*) { return nullptr; }

template <class S>
void fuzz_one(const Case& c) {
  using C = Compute<S>;
  const RM<S> x = c.logits.template cast<S>();
  const RMd xc = to_double(x);  // what the library sees
  const Facts f = facts_of(c, xc);
  if (skip_known() && known_undefined_behaviour(c) != nullptr) return;
  const Expect expect = predict(c, f);
  std::string message;
  ++g_stats.calls[c.api];
  const std::optional<Outcome> out = run<S>(c, x, &message);
  if (out) ++g_stats.accepted[c.api];
  if (skip_known() && known_issue(c, f, out ? &*out : nullptr) != nullptr) return;
  if (std::is_same_v<S, Eigen::bfloat16>) {
    // README: the float path on the upcast logits performs the very same float operations.
    const RM<float> xf = x.template cast<float>();
    const std::optional<Outcome> ref = run<float>(c, xf);
    if (out.has_value() != ref.has_value())
      fail(cat("bfloat16 and its float upcast disagree on throwing: ", message));
    if (out) compare_bitwise(*out, *ref);
  }
  if (!out) {
    if (expect == Expect::must_not_throw) fail(cat("valid input rejected: ", message));
    return;
  }
  if (expect == Expect::must_throw) fail("invalid input accepted (no moebal::invalid_argument)");
  if (!finite_expected<C>(c, f)) return;  // huge parameters: no crash is all we ask
  check_finite<C>(*out, kApiNames[c.api]);
  if constexpr (std::is_same_v<S, double>) {
    if (std::abs(c.coefficient) <= 1e100) gradient_check(c, xc, f, *out);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const Case c = decode(data, size);
  g_case = &c;
  switch (c.type) {
    case 0: fuzz_one<double>(c); break;
    case 1: fuzz_one<float>(c); break;
    default: fuzz_one<Eigen::bfloat16>(c); break;
  }
  g_case = nullptr;
  return 0;
}
