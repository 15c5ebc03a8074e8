// SPDX-License-Identifier: Apache-2.0
#pragma once

// Internal: how public entry points see their inputs, and the boundary checks they share.
// Never documented as API.

#include <string>
#include <type_traits>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"

namespace moebal {
namespace detail {

/// A read-only row-major view of T x N logits. Row-major input with contiguous rows (a
/// `RowMatrix`, a block of one, an `Eigen::Map` over a PyTorch tensor) is viewed in place;
/// anything else (column-major storage, expressions) is evaluated once into the Ref's own
/// row-major copy.
template <class Scalar>
using RowInput = Eigen::Ref<const RowMatrix<Scalar>, 0, Eigen::OuterStride<>>;

/// float, double, Eigen::bfloat16 or Eigen::half (see `compute_type_t`).
template <class Scalar>
inline constexpr bool is_supported_scalar_v = is_logit_scalar_v<Scalar>;

/// float or double: the types moebal computes in.
template <class Scalar>
inline constexpr bool is_compute_scalar_v =
    std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>;

/// The element type of an output buffer argument (a RowMatrix, a block of one, a Map, a Ref).
template <class Out>
using output_scalar_t = typename std::decay_t<Out>::Scalar;

/// A row-major view of the caller's gradient buffer `out`, whose elements must be the logits'
/// storage type or their compute type (for half-precision logits: bfloat16/half, or float for
/// fp32 master gradients).
template <class Storage, class Out>
RowMatrixRef<output_scalar_t<Out>> output_ref(Out& out) {
  using O = output_scalar_t<Out>;
  static_assert(std::is_same_v<O, Storage> || std::is_same_v<O, compute_type_t<Storage>>,
                "moebal: the gradient buffer's elements must be the logits' type or their "
                "compute type (float for bfloat16/half logits)");
  static_assert(bool(std::decay_t<Out>::IsRowMajor) || std::decay_t<Out>::ColsAtCompileTime == 1,
                "moebal: the gradient buffer must be row-major (moebal::RowMatrix, a block of "
                "one, or an Eigen::Map with Eigen::RowMajor)");
  return RowMatrixRef<O>(out);
}

inline std::string shape_string(Index rows, Index cols) {
  return concat(rows, " x ", cols);
}

/// Checks that logits are a non-empty T x N matrix.
inline void check_logits_shape(const char* function, Index rows, Index cols) {
  if (rows == 0) {
    throw_invalid(function, "logits", "at least one token row (T >= 1)",
                  concat("an empty batch, shape ", shape_string(rows, cols)));
  }
  if (cols == 0) {
    throw_invalid(function, "logits", "at least one expert column (N >= 1)",
                  concat("shape ", shape_string(rows, cols)));
  }
}

/// Checks that logits are a non-empty T x N matrix with the N columns a loss was built for.
inline void check_logits_columns(const char* function, Index rows, Index cols, Index expected) {
  check_logits_shape(function, rows, cols);
  if (cols != expected) {
    throw_invalid(function, "logits", concat("N = ", expected, " expert columns (as constructed)"),
                  concat("shape ", shape_string(rows, cols)));
  }
}

/// Checks 1 <= k <= N.
inline void check_k(const char* function, Index k, Index num_experts) {
  if (k < 1 || k > num_experts) {
    throw_invalid(function, "k",
                  concat("1 <= k <= N, the number of experts (N = ", num_experts, ")"),
                  concat("k = ", k));
  }
}

/// Checks that a mask, when given, has one element per token and no NaN.
inline void check_mask(const char* function, const TokenMask& mask, Index tokens) {
  if (mask.empty()) return;
  if (mask.size() != tokens) {
    throw_invalid(function, "mask",
                  concat("one element per token (length T = ", tokens, ", logits.rows())"),
                  concat("length ", mask.size()));
  }
  for (Index t = 0; t < tokens; ++t) {
    if (mask.is_nan(t)) {
      throw_invalid(function, "mask", "0 (padding) or nonzero (real token) in every element",
                    concat("NaN at element ", t));
    }
  }
}

/// Checks an output buffer's shape against the logits' shape.
inline void check_output_shape(const char* function, const char* argument, Index rows,
                               Index cols, Index expected_rows, Index expected_cols) {
  if (rows != expected_rows || cols != expected_cols) {
    throw_invalid(function, argument,
                  concat("the logits' shape ", shape_string(expected_rows, expected_cols)),
                  concat("shape ", shape_string(rows, cols)));
  }
}

/// Checks that a real scalar parameter is finite.
inline void check_finite_parameter(const char* function, const char* argument, double value) {
  if (!std::isfinite(value)) {
    throw_invalid(function, argument, "a finite number", concat(value));
  }
}

}  // namespace detail
}  // namespace moebal
