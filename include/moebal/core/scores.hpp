// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// Row-wise score functions (softmax, normalized sigmoid) and their vector-Jacobian products.
///
/// Every function here reads T x N logits (rows are tokens, columns are experts) of `float`,
/// `double`, `Eigen::bfloat16` or `Eigen::half`, as any Eigen dense expression. Row-major input
/// with contiguous rows is read in place; column-major input is converted once into a row-major
/// copy. Results are row-major, in the compute type (`compute_type_t`: float for half-precision
/// logits).

#include <type_traits>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"
#include "moebal/detail/input.hpp"
#include "moebal/detail/score_kernels.hpp"

namespace moebal {
namespace detail {

template <class S>
RowMatrix<compute_type_t<S>> scores_impl(const char* function, const RowInput<S>& x,
                                         ScoreFunction score) {
  using C = compute_type_t<S>;
  const Index rows = x.rows(), cols = x.cols();
  check_logits_shape(function, rows, cols);
  RowMatrix<C> q(rows, cols);
  ScratchArray<C> raw(cols);
  RowNorm<C> norm;
  RowReader<S, C> reader;
  reader.resize(cols);
  for (Index t = 0; t < rows; ++t) {
    const C* row = reader.read(x.data() + t * x.outerStride(), cols);
    if (!raw_scores(row, cols, score, raw, norm)) throw_invalid_row(function, row, cols, t, score);
    q.row(t) = (raw * norm.inv).transpose().matrix();
  }
  return q;
}

template <class S>
RowMatrix<compute_type_t<S>> scores_backward_impl(const char* function, const RowInput<S>& x,
                                                  const RowInput<compute_type_t<S>>& g,
                                                  ScoreFunction score,
                                                  const TokenMask& mask = {}) {
  using C = compute_type_t<S>;
  const Index rows = x.rows(), cols = x.cols();
  check_logits_shape(function, rows, cols);
  check_output_shape(function, "dloss_dscores", g.rows(), g.cols(), rows, cols);
  RowMatrix<C> dx(rows, cols);
  ScratchArray<C> raw(cols), grow(cols);
  RowNorm<C> norm;
  RowReader<S, C> reader;
  reader.resize(cols);
  for (Index t = 0; t < rows; ++t) {
    if (!mask.is_real(t)) {  // padded rows are never read (they may hold anything)
      dx.row(t).setZero();
      continue;
    }
    const C* row = reader.read(x.data() + t * x.outerStride(), cols);
    if (!raw_scores(row, cols, score, raw, norm)) throw_invalid_row(function, row, cols, t, score);
    grow = g.row(t).transpose().array();
    const C g_dot_q = dot_with_scores(grow.data(), raw.data(), norm, cols);
    score_vjp_row<false>(raw.data(), norm, grow.data(), g_dot_q, C(1), score, cols,
                         dx.data() + t * cols);
  }
  return dx;
}

template <class Derived>
constexpr void assert_float_or_double() {
  static_assert(is_supported_scalar_v<typename Derived::Scalar>,
                "moebal: logits must be float, double, Eigen::bfloat16 or Eigen::half; cast "
                "other types first, e.g. logits.template cast<float>()");
}

}  // namespace detail

/// Row-wise softmax: p_tj = exp(x_tj - m_t) / sum_i exp(x_ti - m_t), m_t = max_i x_ti
/// (the stable form; rows may contain -Inf, which get probability 0).
/// @param logits T x N, float, double, bfloat16 or half. @return T x N probabilities, row-major
/// (float for half-precision logits).
/// @throws moebal::invalid_argument if T or N is 0, a logit is NaN or +Inf, or a row is all -Inf.
template <class Derived>
RowMatrix<compute_type_t<typename Derived::Scalar>> softmax(
    const Eigen::MatrixBase<Derived>& logits) {
  detail::assert_float_or_double<Derived>();
  using Scalar = typename Derived::Scalar;
  return detail::scores_impl<Scalar>("moebal::softmax", detail::RowInput<Scalar>(logits),
                                     ScoreFunction::softmax);
}

/// Softmax vector-Jacobian product: given p = softmax(x) and g = d loss / d p,
/// d loss / d x_tj = p_tj (g_tj - sum_i g_ti p_ti).
/// @param probs T x N softmax probabilities. @param dloss_dprobs T x N.
/// @return dloss_dlogits, T x N row-major.
/// @throws moebal::invalid_argument if the shapes differ or are empty.
template <class DerivedP, class DerivedG>
RowMatrix<compute_type_t<typename DerivedP::Scalar>> softmax_backward(
    const Eigen::MatrixBase<DerivedP>& probs, const Eigen::MatrixBase<DerivedG>& dloss_dprobs) {
  detail::assert_float_or_double<DerivedP>();
  detail::assert_float_or_double<DerivedG>();
  using Scalar = compute_type_t<typename DerivedP::Scalar>;
  static_assert(std::is_same_v<Scalar, compute_type_t<typename DerivedG::Scalar>>,
                "moebal::softmax_backward: probs and dloss_dprobs must have the same compute "
                "type (both float/bfloat16/half, or both double)");
  constexpr const char* function = "moebal::softmax_backward";
  const detail::RowInput<Scalar> p(probs.template cast<Scalar>());
  const detail::RowInput<Scalar> g(dloss_dprobs.template cast<Scalar>());
  detail::check_logits_shape(function, p.rows(), p.cols());
  detail::check_output_shape(function, "dloss_dprobs", g.rows(), g.cols(), p.rows(), p.cols());
  const Index rows = p.rows(), cols = p.cols();
  RowMatrix<Scalar> dx(rows, cols);
  for (Index t = 0; t < rows; ++t) {
    const Scalar* pr = p.data() + t * p.outerStride();
    const Scalar* gr = g.data() + t * g.outerStride();
    const Scalar g_dot_p = detail::lane_dot(gr, pr, cols);
    for (Index j = 0; j < cols; ++j) dx(t, j) = pr[j] * (gr[j] - g_dot_p);
  }
  return dx;
}

/// Row-wise normalized sigmoid: q_tj = s_tj / (sum_i s_ti + 1e-20), s = sigmoid(x)
/// (DeepSeek-V3 routing scores for balance losses; Megatron-core
/// `compute_routing_scores_for_aux_loss`, eps = 1e-20 as there).
/// @param logits T x N, float, double, bfloat16 or half. @return T x N scores, row-major (float
/// for half-precision logits).
/// @throws moebal::invalid_argument if T or N is 0 or a logit is NaN or +Inf.
template <class Derived>
RowMatrix<compute_type_t<typename Derived::Scalar>> normalized_sigmoid(
    const Eigen::MatrixBase<Derived>& logits) {
  detail::assert_float_or_double<Derived>();
  using Scalar = typename Derived::Scalar;
  return detail::scores_impl<Scalar>("moebal::normalized_sigmoid",
                                     detail::RowInput<Scalar>(logits), ScoreFunction::sigmoid);
}

/// Scores of either score function: `softmax(logits)` or `normalized_sigmoid(logits)`.
template <class Derived>
RowMatrix<compute_type_t<typename Derived::Scalar>> scores(const Eigen::MatrixBase<Derived>& logits,
                                                           ScoreFunction score) {
  detail::assert_float_or_double<Derived>();
  using Scalar = typename Derived::Scalar;
  return detail::scores_impl<Scalar>("moebal::scores", detail::RowInput<Scalar>(logits), score);
}

/// Vector-Jacobian product of either score function, recomputed from the logits:
///   softmax:  d loss / d x_tj = q_tj (g_tj - sum_i g_ti q_ti)
///   sigmoid:  d loss / d x_tj = s_tj (1 - s_tj) / (sum_i s_ti + 1e-20) * (g_tj - sum_i g_ti q_ti)
/// with q the scores, s = sigmoid(x), g = d loss / d q.
/// @param logits T x N. @param dloss_dscores T x N. @return dloss_dlogits, T x N row-major.
/// @throws moebal::invalid_argument on empty or mismatched shapes, NaN or +Inf logits.
template <class DerivedX, class DerivedG>
RowMatrix<compute_type_t<typename DerivedX::Scalar>> scores_backward(
    const Eigen::MatrixBase<DerivedX>& logits, const Eigen::MatrixBase<DerivedG>& dloss_dscores,
    ScoreFunction score) {
  detail::assert_float_or_double<DerivedX>();
  detail::assert_float_or_double<DerivedG>();
  using Scalar = typename DerivedX::Scalar;
  using C = compute_type_t<Scalar>;
  static_assert(std::is_same_v<C, compute_type_t<typename DerivedG::Scalar>>,
                "moebal::scores_backward: logits and dloss_dscores must have the same compute "
                "type (both float/bfloat16/half, or both double)");
  return detail::scores_backward_impl<Scalar>(
      "moebal::scores_backward", detail::RowInput<Scalar>(logits),
      detail::RowInput<C>(dloss_dscores.template cast<C>()), score);
}

}  // namespace moebal
