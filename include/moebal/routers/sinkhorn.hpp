// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// Sinkhorn routing (Lewis et al. 2021, BASE layers; Megatron-core `sinkhorn` and
/// `TopKRouter.sinkhorn_load_balancing`).
///
/// `sinkhorn(logits, tol)` balances C = exp(logits) (T x N) exactly as Megatron-core does:
///   d0 = 1 (T), d1 = 1 (N), d1_old = d1; repeat:
///     d0_t = (1/T) / (sum_j d1_j C_tj + 1e-8);   d1_j = (1/N) / (sum_t d0_t C_tj + 1e-8);
///     error = mean_j |d1_old_j - d1_j|;  d1_old = d1;
///   until error <= tol (default 1e-4); result A_tj = d1_j C_tj d0_t (columns sum to about 1/N).
/// `sinkhorn_route(logits, k)`: the top-k of A per token (ties to the lower index; no gradient
/// through the selection), combine weights = sigmoid(x) of the selected if k = 1, else
/// softmax(x) of the selected (Megatron-core `_sinkhorn_activation`). Backward through the
/// weights only. `max_iterations` bounds the loop (Megatron-core's has no bound).

#include <cmath>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/scores.hpp"
#include "moebal/core/topk.hpp"
#include "moebal/core/types.hpp"
#include "moebal/detail/input.hpp"
#include "moebal/routers/router.hpp"

namespace moebal {

/// The Sinkhorn-balanced assignment of T x N logits (see the file comment).
/// @throws moebal::invalid_argument for empty or non-finite logits, tol not > 0, or no
///   convergence within max_iterations.
template <class Derived>
RowMatrix<compute_type_t<typename Derived::Scalar>> sinkhorn(
    const Eigen::MatrixBase<Derived>& logits, double tol = 1e-4, Index max_iterations = 100000) {
  // Computed in the compute type (bfloat16/half logits are converted once to float: the
  // iteration needs a T x N working matrix anyway).
  using Scalar = compute_type_t<typename Derived::Scalar>;
  constexpr const char* function = "moebal::sinkhorn";
  const detail::RowInput<Scalar> x(logits.template cast<Scalar>());
  detail::check_logits_shape(function, x.rows(), x.cols());
  if (!(tol > 0) || !std::isfinite(tol)) detail::throw_invalid(function, "tol", "a finite tolerance > 0", detail::concat(tol));
  if (!x.allFinite()) detail::throw_invalid(function, "logits", "finite values", "NaN or Inf");
  const Index T = x.rows(), N = x.cols();
  const RowMatrix<Scalar> cost = x.array().exp().matrix();
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> d0 = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>::Ones(T);
  Eigen::Matrix<Scalar, 1, Eigen::Dynamic> d1 = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>::Ones(N);
  Eigen::Matrix<Scalar, 1, Eigen::Dynamic> d1_old = d1;
  const Scalar eps = Scalar(1e-8);
  double error = 1e9;
  Index iterations = 0;
  while (error > tol) {
    if (++iterations > max_iterations) {
      detail::throw_invalid(function, "tol", detail::concat("convergence within ", max_iterations, " iterations"),
                            detail::concat("error ", error, " > tol ", tol));
    }
    d0 = ((cost * d1.transpose()).array() + eps).inverse().matrix() / Scalar(T);
    d1 = ((d0.transpose() * cost).array() + eps).inverse().matrix() / Scalar(N);
    error = double((d1_old - d1).cwiseAbs().mean());
    d1_old = d1;
  }
  RowMatrix<Scalar> result = cost;
  for (Index t = 0; t < T; ++t) result.row(t) = result.row(t).cwiseProduct(d1) * d0[t];
  return result;
}

/// Sinkhorn routing: top-k of the balanced assignment, weights from sigmoid (k = 1) or softmax.
template <class Derived>
RouterResult<compute_type_t<typename Derived::Scalar>> sinkhorn_route(
    const Eigen::MatrixBase<Derived>& logits, Index k, double tol = 1e-4) {
  using Scalar = compute_type_t<typename Derived::Scalar>;  // half precision: converted once
  constexpr const char* function = "moebal::sinkhorn_route";
  const detail::RowInput<Scalar> x(logits.template cast<Scalar>());
  detail::check_logits_shape(function, x.rows(), x.cols());
  detail::check_k(function, k, x.cols());
  const RowMatrix<Scalar> assignment = sinkhorn(x, tol);
  RouterResult<Scalar> r;
  r.indices = topk_indices(assignment, k);
  r.weights.resize(x.rows(), k);
  const RowMatrix<Scalar> activation =
      k == 1 ? RowMatrix<Scalar>((Scalar(1) + (-x.array()).exp()).inverse().matrix())
             : detail::scores_impl<Scalar>(function, x, ScoreFunction::softmax);
  for (Index t = 0; t < x.rows(); ++t)
    for (Index i = 0; i < k; ++i) r.weights(t, i) = activation(t, r.indices(t, i));
  return r;
}

/// d loss / d logits of `sinkhorn_route` from d loss / d weights (T x k), through the
/// activation only (sigmoid for k = 1, softmax otherwise).
template <class Derived, class DerivedG>
RowMatrix<compute_type_t<typename Derived::Scalar>> sinkhorn_route_backward(
    const Eigen::MatrixBase<Derived>& logits, const IndexMatrix& indices,
    const Eigen::MatrixBase<DerivedG>& dloss_dweights) {
  RouterOptions o;
  o.score = indices.cols() == 1 ? RouterScore::sigmoid : RouterScore::softmax;
  return route_backward(logits, indices, dloss_dweights, o);
}

}  // namespace moebal
