// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// Shared vocabulary types: the index type, the row-major matrix every kernel works on, and
/// `TokenMask`, a non-owning view of a per-token padding mask.

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#include "moebal/core/error.hpp"

// Internal: MOEBAL_ALWAYS_INLINE forces the inlining of the small per-block row kernels (GCC
// otherwise keeps some of them, with Eigen's fixed-size packets, as calls that pass every block
// through memory). MOEBAL_FLATTEN inlines every call made inside a function, Eigen's own
// included: GCC keeps Eigen's vectorized exp and max of a fixed-size block as out-of-line calls
// through the stack (on a Zen 1 core with AVX2, 335 against 235 ns per row of 64 floats for
// the Switch forward pass), which an always_inline of moebal's kernels cannot reach.
#if defined(__GNUC__) || defined(__clang__)
#define MOEBAL_ALWAYS_INLINE inline __attribute__((always_inline))
#define MOEBAL_FLATTEN __attribute__((flatten))
#else
#define MOEBAL_ALWAYS_INLINE inline
#define MOEBAL_FLATTEN
#endif

// Internal: pointers that do not alias (lets the compiler vectorize a row loop without a
// run-time overlap check).
#if defined(__GNUC__) || defined(__clang__) || defined(_MSC_VER)
#define MOEBAL_RESTRICT __restrict
#else
#define MOEBAL_RESTRICT
#endif

namespace moebal {

namespace detail {
/// Internal: asks for the cache line holding `address` ahead of a scattered read (no effect
/// where the compiler has no prefetch builtin; never faults).
template <class T>
MOEBAL_ALWAYS_INLINE void prefetch(const T* address) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(static_cast<const void*>(address));
#else
  (void)address;
#endif
}
}  // namespace detail

/// Token, expert and count indices are 64-bit everywhere.
using Index = std::int64_t;

/// Tokens x experts, row-major: the layout of a contiguous PyTorch tensor, and the one storage
/// order every moebal kernel works in.
template <class Scalar>
using RowMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// A row-major T x N buffer the caller owns (a `RowMatrix`, a block of one, or an `Eigen::Map`
/// over raw row-major memory); gradients are written into it in place.
template <class Scalar>
using RowMatrixRef = Eigen::Ref<RowMatrix<Scalar>, 0, Eigen::OuterStride<>>;

/// The type moebal computes and accumulates in for logits stored as `Storage`: `float` for the
/// half-precision types `Eigen::bfloat16` and `Eigen::half` (as Megatron-core's
/// `moe_router_dtype=fp32` and Hugging Face's upcast of router logits), the type itself for
/// `float` and `double`. Values and one-line results of half-precision logits are in this type.
template <class Storage>
struct compute_type {
  using type = Storage;
};
template <>
struct compute_type<Eigen::bfloat16> {
  using type = float;
};
template <>
struct compute_type<Eigen::half> {
  using type = float;
};
/// `compute_type<Storage>::type`: float for bfloat16 and half logits, the type itself otherwise.
template <class Storage>
using compute_type_t = typename compute_type<Storage>::type;

/// Whether `Scalar` is one of the logit types every loss and router accepts: `float`, `double`,
/// `Eigen::bfloat16` or `Eigen::half`.
template <class Scalar>
inline constexpr bool is_logit_scalar_v =
    std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double> ||
    std::is_same_v<Scalar, Eigen::bfloat16> || std::is_same_v<Scalar, Eigen::half>;

/// Per-expert integer counts (64-bit).
using CountVector = Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1>;

/// T x k expert indices, row-major (one row per token).
using IndexMatrix = Eigen::Matrix<Index, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// The per-token score function q_t = score(x_t) used both for the balance statistic P and for
/// the top-k selection.
enum class ScoreFunction {
  /// q_ti = exp(x_ti) / sum_j exp(x_tj), computed with the row maximum subtracted (stable).
  /// Switch Transformer, Mixtral and most routers.
  softmax,
  /// q_ti = s_ti / (sum_j s_tj + 1e-20) with s = sigmoid(x): the normalized sigmoid that
  /// DeepSeek-V3 routers use for their balance losses (Megatron-core
  /// `compute_routing_scores_for_aux_loss`, eps = 1e-20 as there).
  sigmoid,
};

/// "softmax" or "sigmoid".
inline const char* to_string(ScoreFunction score) {
  return score == ScoreFunction::softmax ? "softmax" : "sigmoid";
}

namespace detail {

template <class T>
bool mask_element_is_real(const void* data, Index index, Index stride) {
  return static_cast<const T*>(data)[index * stride] != T(0);
}

template <class T>
bool mask_element_is_nan(const void* data, Index index, Index stride) {
  if constexpr (std::is_floating_point_v<T>) {
    return std::isnan(static_cast<const T*>(data)[index * stride]);
  } else {
    (void)data;
    (void)index;
    (void)stride;
    return false;
  }
}

}  // namespace detail

/// A per-token padding mask: element t nonzero means token t is real, zero means padding.
///
/// A non-owning view (like `std::string_view`): the viewed memory must outlive every call
/// that uses the mask. A default-constructed mask is empty and means "every token is real".
/// Elements may be `bool`, any integer type, `float` or `double`, so a Hugging Face
/// `attention_mask` (int64) or a boolean padding mask is read as it is, without a copy.
/// A floating-point mask must not contain NaN (checked where it is used).
class TokenMask {
 public:
  /// The empty mask: every token is real.
  TokenMask() = default;

  /// A view of `size` elements starting at `data`, `stride` elements apart. Always a given
  /// mask, even of length 0 (`data` may then be null, as an empty `std::vector`'s is): a
  /// zero-length mask for T > 0 tokens is a mask of the wrong length, never "no mask".
  template <class T>
  TokenMask(const T* data, Index size, Index stride = 1)
      : given_(true),
        data_(data),
        size_(size),
        stride_(stride),
        is_real_(&detail::mask_element_is_real<T>),
        is_nan_(&detail::mask_element_is_nan<T>) {
    static_assert(std::is_arithmetic_v<T>,
                  "moebal::TokenMask: the mask's elements must be bool, an integer or a "
                  "floating-point type");
    if (data == nullptr && size != 0) {
      detail::throw_invalid("moebal::TokenMask", "data", "a non-null pointer",
                            "nullptr with size " + std::to_string(size));
    }
    if (size < 0) {
      detail::throw_invalid("moebal::TokenMask", "size", "a non-negative length",
                            std::to_string(size));
    }
  }

  /// A view of an Eigen vector (or a one-row or one-column matrix, block or map) with direct
  /// memory access. Evaluate expressions such as `(v.array() > 0)` into a vector first.
  template <class Derived>
  TokenMask(const Eigen::DenseBase<Derived>& vector)  // NOLINT: implicit by design
      : TokenMask(vector.derived().data(), static_cast<Index>(vector.size()),
                  stride_of(vector)) {
    static_assert(bool(Derived::Flags & Eigen::DirectAccessBit),
                  "moebal::TokenMask views memory: evaluate the mask expression into an "
                  "Eigen vector (e.g. Eigen::VectorXi m = expr;) and pass that vector");
    if (vector.rows() != 1 && vector.cols() != 1) {
      detail::throw_invalid("moebal::TokenMask", "mask", "a vector (one row or one column)",
                            detail::concat(vector.rows(), " x ", vector.cols(), " matrix"));
    }
  }

  /// True when no mask was given (every token is real): only the default-constructed mask.
  bool empty() const noexcept { return !given_; }
  /// Number of elements viewed (0 for the empty mask).
  Index size() const noexcept { return size_; }
  /// Whether token `t` is real. The empty mask says yes for every token.
  bool is_real(Index t) const {
    MOEBAL_ASSERT(empty() || (t >= 0 && t < size_));
    return empty() || is_real_(data_, t, stride_);
  }
  /// Whether element `t` is NaN (only possible for floating-point masks).
  bool is_nan(Index t) const { return !empty() && is_nan_(data_, t, stride_); }

 private:
  template <class Derived>
  static Index stride_of(const Eigen::DenseBase<Derived>& vector) {
    // Consecutive elements of a column vector in column-major storage (or a row vector in
    // row-major storage) are innerStride() apart; otherwise outerStride() apart.
    const bool along_inner = (vector.cols() == 1) != bool(Derived::IsRowMajor);
    return static_cast<Index>(along_inner || vector.size() <= 1 ? vector.derived().innerStride()
                                                                : vector.derived().outerStride());
  }

  bool given_ = false;
  const void* data_ = nullptr;
  Index size_ = 0;
  Index stride_ = 1;
  bool (*is_real_)(const void*, Index, Index) = nullptr;
  bool (*is_nan_)(const void*, Index, Index) = nullptr;
};

}  // namespace moebal
