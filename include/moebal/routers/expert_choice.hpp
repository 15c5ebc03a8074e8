// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"):
/// every expert picks its C tokens with the largest scores, s = softmax(x) per token,
///   C = round(T c / N)  (c, the paper's capacity factor, is the average number of experts per
///   token), ties to the lower token index;
/// the combine weight of a picked (token, expert) pair is s_te, every other weight is 0. A token
/// may get zero, one or several experts: `tokens_without_expert` reports the first kind.
/// Backward: d loss / d x_t = softmax VJP of the row's d loss / d s (d loss / d weight where
/// picked, 0 elsewhere). Perfect balance by construction: every expert gets exactly C tokens.

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/scores.hpp"
#include "moebal/core/types.hpp"
#include "moebal/detail/input.hpp"
#include "moebal/detail/reduce.hpp"

namespace moebal {

/// Result of `expert_choice`.
template <class Scalar>
struct ExpertChoiceResult {
  /// C, tokens per expert.
  Index capacity = 0;
  /// N x C token indices picked by each expert, by decreasing score.
  IndexMatrix tokens;
  /// T x N combine weights: s_te where expert e picked token t, else 0.
  RowMatrix<Scalar> weights;
  /// Tokens that no expert picked.
  Index tokens_without_expert = 0;
};

/// Expert-choice routing of T x N logits with capacity factor c (see the file comment).
/// @throws moebal::invalid_argument for empty logits, c not finite or <= 0, or C outside [1, T].
template <class Derived>
ExpertChoiceResult<compute_type_t<typename Derived::Scalar>> expert_choice(
    const Eigen::MatrixBase<Derived>& logits, double capacity_factor) {
  using Storage = typename Derived::Scalar;
  using Scalar = compute_type_t<Storage>;
  constexpr const char* function = "moebal::expert_choice";
  const detail::RowInput<Storage> x(logits);
  detail::check_logits_shape(function, x.rows(), x.cols());
  detail::check_finite_parameter(function, "capacity_factor", capacity_factor);
  const Index T = x.rows(), N = x.cols();
  const Index C = static_cast<Index>(std::llround(double(T) * capacity_factor / double(N)));
  if (!(capacity_factor > 0) || C < 1 || C > T) {
    detail::throw_invalid(function, "capacity_factor",
                          detail::concat("c > 0 with 1 <= C = round(T c / N) <= T = ", T),
                          detail::concat("c = ", capacity_factor, " (C = ", C, ")"));
  }
  const RowMatrix<Scalar> s = detail::scores_impl<Storage>(function, x, ScoreFunction::softmax);
  ExpertChoiceResult<Scalar> r;
  r.capacity = C;
  r.tokens.resize(N, C);
  r.weights = RowMatrix<Scalar>::Zero(T, N);
  std::vector<Index> order(static_cast<std::size_t>(T));
  for (Index e = 0; e < N; ++e) {
    std::iota(order.begin(), order.end(), Index(0));
    std::partial_sort(order.begin(), order.begin() + C, order.end(), [&](Index a, Index b) {
      return s(a, e) > s(b, e) || (s(a, e) == s(b, e) && a < b);
    });
    for (Index c = 0; c < C; ++c) {
      const Index t = order[std::size_t(c)];
      r.tokens(e, c) = t;
      r.weights(t, e) = s(t, e);
    }
  }
  for (Index t = 0; t < T; ++t) r.tokens_without_expert += r.weights.row(t).isZero(0) ? 1 : 0;
  return r;
}

/// d loss / d logits of `expert_choice` from d loss / d weights (T x N; only picked pairs
/// matter): per token the softmax VJP of g_te = dloss_dweights_te where picked, else 0.
template <class Derived, class DerivedG>
RowMatrix<compute_type_t<typename Derived::Scalar>> expert_choice_backward(
    const Eigen::MatrixBase<Derived>& logits,
    const ExpertChoiceResult<compute_type_t<typename Derived::Scalar>>& result,
    const Eigen::MatrixBase<DerivedG>& dloss_dweights) {
  using Storage = typename Derived::Scalar;
  using Scalar = compute_type_t<Storage>;
  constexpr const char* function = "moebal::expert_choice_backward";
  const detail::RowInput<Storage> x(logits);
  detail::check_logits_shape(function, x.rows(), x.cols());
  detail::check_output_shape(function, "dloss_dweights", dloss_dweights.rows(), dloss_dweights.cols(),
                             x.rows(), x.cols());
  detail::check_output_shape(function, "result.weights", result.weights.rows(), result.weights.cols(),
                             x.rows(), x.cols());
  RowMatrix<Scalar> g = RowMatrix<Scalar>::Zero(x.rows(), x.cols());
  for (Index e = 0; e < result.tokens.rows(); ++e) {
    for (Index c = 0; c < result.tokens.cols(); ++c) {
      const Index t = result.tokens(e, c);
      g(t, e) = static_cast<Scalar>(dloss_dweights(t, e));
    }
  }
  return detail::scores_backward_impl<Storage>(function, x, detail::RowInput<Scalar>(g),
                                               ScoreFunction::softmax);
}

}  // namespace moebal
