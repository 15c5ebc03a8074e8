// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// The library's exception type and its two tiers of checks.
///
/// Tier 1, always on: every public function validates its arguments and throws
/// `moebal::invalid_argument` with a message of the form
///     "<function>: argument '<name>': expected <what>, got <value>".
/// Tier 2, internal invariants: `MOEBAL_ASSERT(cond)`, compiled out under `NDEBUG`. Define
/// `MOEBAL_ASSERT` before including any moebal header to route it to your own handler.

#include <cassert>
#include <sstream>
#include <stdexcept>
#include <string>

#ifndef MOEBAL_ASSERT
#ifdef NDEBUG
#define MOEBAL_ASSERT(condition) ((void)0)
#else
#define MOEBAL_ASSERT(condition) assert(condition)
#endif
#endif

namespace moebal {

/// Thrown for every invalid argument at the API boundary: wrong shapes, k out of range,
/// NaN or +Inf logits, masks of the wrong length, empty batches, output buffers of the
/// wrong shape. Derives from `std::invalid_argument`, so existing handlers catch it.
/// The message names the function, the argument, what was expected and what was given.
class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

/// Streams every part into one string (numbers with enough digits to round-trip).
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  out.precision(17);
  (out << ... << parts);
  return out.str();
}

/// Throws `moebal::invalid_argument` with the library's message format.
[[noreturn]] inline void throw_invalid(const char* function, const char* argument,
                                       const std::string& expected, const std::string& got) {
  throw invalid_argument(concat(function, ": argument '", argument, "': expected ", expected,
                                ", got ", got));
}

}  // namespace detail
}  // namespace moebal
