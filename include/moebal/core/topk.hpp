// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// Per-row top-k selection with a documented tie rule.

#include <Eigen/Core>
#include <cmath>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"
#include "moebal/detail/input.hpp"
#include "moebal/detail/score_kernels.hpp"
#include "moebal/detail/topk_kernels.hpp"

namespace moebal {

/// The k largest entries of each row, as expert indices ordered by decreasing score.
/// Ties go to the lower expert index (it is selected, and listed, first). Linear time per row
/// for k <= 16 (a sorted list of k candidates); a partial sort above that. No full sort.
/// @param scores T x N, float, double, bfloat16 or half (compared exactly), no NaN (+/-Inf are
/// ordered as usual).
/// @param k 1 <= k <= N.
/// @return T x k indices (64-bit), row-major.
/// @throws moebal::invalid_argument if T or N is 0, k is out of range, or a score is NaN.
template <class Derived>
IndexMatrix topk_indices(const Eigen::MatrixBase<Derived>& scores, Index k) {
  using Scalar = typename Derived::Scalar;
  using C = compute_type_t<Scalar>;
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::topk_indices: scores must be float, double, Eigen::bfloat16 or "
                "Eigen::half; cast them first");
  constexpr const char* function = "moebal::topk_indices";
  const detail::RowInput<Scalar> q(scores);
  detail::check_logits_shape(function, q.rows(), q.cols());
  detail::check_k(function, k, q.cols());
  IndexMatrix out(q.rows(), k);
  detail::TopkScratch<C> scratch;
  scratch.resize(q.cols(), k);
  detail::RowReader<Scalar, C> reader;
  reader.resize(q.cols());
  for (Index t = 0; t < q.rows(); ++t) {
    const C* row = reader.read(q.data() + t * q.outerStride(), q.cols());
    for (Index j = 0; j < q.cols(); ++j) {
      if (std::isnan(row[j])) {
        detail::throw_invalid(function, "scores", "no NaN",
                              detail::concat("NaN at row ", t, ", column ", j));
      }
    }
    detail::topk_row(row, q.cols(), k, out.data() + t * k, scratch);
  }
  return out;
}

}  // namespace moebal
