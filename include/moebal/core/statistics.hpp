// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// `RoutingStatistics`: the small, additive batch sums every balance loss is built from.
///
/// A balance loss is computed in two phases: accumulate (one pass over a micro-batch's logits
/// adds its sums here) and apply (given the statistics the convention asks for, compute the
/// value and the gradient for one micro-batch's rows). Statistics add like numbers, and their
/// storage is one contiguous buffer of doubles, so summing micro-batches is `+=` and summing
/// ranks is one all-reduce of `data()`/`size()`.

#include <algorithm>
#include <vector>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"

namespace moebal {

/// Batch sums over the real tokens of one or more micro-batches, for N experts:
///   tokens()              T, the number of real tokens
///   counts()              c_i = number of tokens whose top-k contains expert i (sum = T k)
///   first_choice_counts() number of tokens whose first choice is expert i (sum = T)
///   score_sums()          S_i = sum_t q_ti, the scores summed over tokens (P_i = S_i / T)
/// All are stored as doubles in one buffer: [T, c_0..c_{N-1}, first_0.., S_0..]. Counts are
/// exact integers up to 2^53. Counts are constants for the gradient (no gradient flows through
/// the top-k selection).
class RoutingStatistics {
 public:
  using ConstVectorMap = Eigen::Map<const Eigen::VectorXd>;
  using VectorMap = Eigen::Map<Eigen::VectorXd>;

  /// Statistics for 0 experts (assign a sized one before use).
  RoutingStatistics() = default;

  /// Zeroed statistics for `num_experts` experts.
  /// @throws moebal::invalid_argument if num_experts < 1.
  explicit RoutingStatistics(Index num_experts) {
    if (num_experts < 1) {
      detail::throw_invalid("moebal::RoutingStatistics", "num_experts", "at least 1",
                            detail::concat(num_experts));
    }
    num_experts_ = num_experts;
    buffer_.assign(static_cast<std::size_t>(1 + 3 * num_experts), 0.0);
  }

  /// N.
  Index num_experts() const noexcept { return num_experts_; }
  /// T: real tokens summed so far.
  double tokens() const noexcept { return buffer_.empty() ? 0.0 : buffer_[0]; }
  /// c_i: top-k selections per expert.
  ConstVectorMap counts() const { return ConstVectorMap(part(0), num_experts_); }
  /// First-choice selections per expert.
  ConstVectorMap first_choice_counts() const { return ConstVectorMap(part(1), num_experts_); }
  /// S_i = sum_t q_ti.
  ConstVectorMap score_sums() const { return ConstVectorMap(part(2), num_experts_); }

  /// Mutable views, for code that accumulates into these statistics.
  double& mutable_tokens() { return buffer_.at(0); }
  VectorMap mutable_counts() { return VectorMap(part(0), num_experts_); }
  VectorMap mutable_first_choice_counts() { return VectorMap(part(1), num_experts_); }
  VectorMap mutable_score_sums() { return VectorMap(part(2), num_experts_); }

  /// The contiguous buffer (1 + 3N doubles) to sum across ranks in place.
  double* data() noexcept { return buffer_.data(); }
  const double* data() const noexcept { return buffer_.data(); }
  /// Number of doubles in `data()`.
  Index size() const noexcept { return static_cast<Index>(buffer_.size()); }

  /// Sets every sum to zero, keeping N.
  void clear() noexcept { std::fill(buffer_.begin(), buffer_.end(), 0.0); }

  /// Adds another batch's sums (micro-batch accumulation).
  /// @throws moebal::invalid_argument if the expert counts differ.
  RoutingStatistics& operator+=(const RoutingStatistics& other) {
    if (other.num_experts_ != num_experts_) {
      detail::throw_invalid("moebal::RoutingStatistics::operator+=", "other",
                            detail::concat("statistics for N = ", num_experts_, " experts"),
                            detail::concat("N = ", other.num_experts_));
    }
    for (std::size_t i = 0; i < buffer_.size(); ++i) buffer_[i] += other.buffer_[i];
    return *this;
  }

 private:
  double* part(Index which) {
    return buffer_.empty() ? nullptr : buffer_.data() + 1 + which * num_experts_;
  }
  const double* part(Index which) const {
    return buffer_.empty() ? nullptr : buffer_.data() + 1 + which * num_experts_;
  }

  Index num_experts_ = 0;
  std::vector<double> buffer_;
};

}  // namespace moebal
