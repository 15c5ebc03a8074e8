// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// Auxiliary-loss-free balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy
/// for Mixture-of-Experts"; DeepSeek-V3): a per-expert bias added to the selection scores only
/// (see `RouterOptions::expert_bias`), updated once per optimizer step from the step's final
/// per-expert counts c (summed over micro-batches and ranks):
///   b_i += rate * sign(mean_j c_j - c_i)          (sign(0) = 0)
/// as Megatron-core `get_updated_expert_bias` (default rate 1e-3, `moe_router_bias_update_rate`).
/// Overloaded experts get a lower bias, underloaded ones a higher bias.

#include <string>
#include <vector>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"
#include "moebal/losses/global_batch.hpp"

namespace moebal {

/// Accumulates per-expert counts over a step and updates an expert bias from them.
class ExpertBiasBalancer {
 public:
  /// @param num_experts N >= 1. @param rate the update rate, finite and >= 0 (default 1e-3).
  /// @throws moebal::invalid_argument otherwise.
  explicit ExpertBiasBalancer(Index num_experts, double rate = 1e-3)
      : counts_(Eigen::VectorXd::Zero(num_experts)), rate_(rate) {
    constexpr const char* function = "moebal::ExpertBiasBalancer";
    if (num_experts < 1) detail::throw_invalid(function, "num_experts", "at least 1", detail::concat(num_experts));
    detail::check_finite_parameter(function, "rate", rate);
    if (rate < 0) detail::throw_invalid(function, "rate", "a rate >= 0", detail::concat(rate));
  }

  /// Adds one micro-batch's per-expert counts (length N, e.g. `SwitchStats::tokens_per_expert`
  /// or the column sums of a router's selections; non-negative and finite).
  /// @throws moebal::invalid_argument for a wrong length or a negative / non-finite count.
  template <class Derived>
  void add_counts(const Eigen::MatrixBase<Derived>& counts) {
    constexpr const char* function = "moebal::ExpertBiasBalancer::add_counts";
    if (counts.size() != counts_.size()) {
      detail::throw_invalid(function, "counts", detail::concat("one count per expert (length N = ", counts_.size(), ")"),
                            detail::concat("length ", counts.size()));
    }
    for (Index i = 0; i < counts_.size(); ++i) {
      const double c = double(counts.derived().coeff(i));
      if (!(c >= 0) || !std::isfinite(c)) {
        detail::throw_invalid(function, "counts", "finite counts >= 0",
                              detail::concat(c, " at expert ", i));
      }
      counts_[i] += c;
    }
  }

  /// Adds the selections of a router's T x k index matrix (each index counts once).
  /// @throws moebal::invalid_argument for an index outside [0, N).
  void add_selections(const Eigen::Ref<const IndexMatrix>& indices) {
    for (Index t = 0; t < indices.rows(); ++t) {
      for (Index i = 0; i < indices.cols(); ++i) {
        const Index e = indices(t, i);
        if (e < 0 || e >= counts_.size()) {
          detail::throw_invalid("moebal::ExpertBiasBalancer::add_selections", "indices",
                                detail::concat("expert indices in [0, ", counts_.size(), ")"),
                                detail::concat(e, " at row ", t, ", slot ", i));
        }
        counts_[e] += 1.0;
      }
    }
  }

  /// Ends the step: sums the counts over ranks with `sync` (the all-reduce SUM contract of
  /// <moebal/losses/global_batch.hpp>; every rank must call), applies
  /// b_i += rate * sign(mean(c) - c_i) to `bias` (length N) and clears the counts.
  /// @throws moebal::invalid_argument on every rank if the ranks disagree on N, and for a bias
  ///   of the wrong length.
  template <class Sync>
  void update(Eigen::VectorXd& bias, Sync&& sync) {
    constexpr const char* function = "moebal::ExpertBiasBalancer::update";
    std::string error;
    if (bias.size() != counts_.size()) {
      error = detail::concat(function, ": argument 'bias': expected one bias per expert (length N = ",
                             counts_.size(), "), got length ", bias.size());
    }
    detail::checked_all_reduce(function, sync, counts_.size(), 0, 3, error, counts_.data(),
                               counts_.size());
    const double mean = counts_.mean();
    for (Index i = 0; i < counts_.size(); ++i) {
      const double offset = mean - counts_[i];
      bias[i] += rate_ * double((offset > 0) - (offset < 0));
    }
    counts_.setZero();
  }

  /// `update` for a single process.
  void update(Eigen::VectorXd& bias) { update(bias, NoSync{}); }

  /// The counts accumulated in this step.
  const Eigen::VectorXd& counts() const noexcept { return counts_; }
  double rate() const noexcept { return rate_; }

 private:
  Eigen::VectorXd counts_;
  double rate_;
};

}  // namespace moebal
