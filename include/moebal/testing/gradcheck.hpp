// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// A public finite-difference helper: check any analytic gradient of a scalar function of a
/// matrix (a loss of router logits, say) against central differences in double precision.
/// Header-only, needs only Eigen; not included by <moebal/moebal.hpp>.

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"

namespace moebal {
namespace testing {

/// Step and tolerances of a gradient check. An element passes when
/// |analytic - numerical| <= atol + rtol * |numerical|.
struct GradcheckOptions {
  /// Central-difference step h (about sqrt(double epsilon) * 70: truncation error O(h^2) and
  /// rounding error O(eps / h) are both near 1e-10 for functions of order 1).
  double step = 1e-6;
  double atol = 1e-7;
  double rtol = 1e-5;
};

/// The outcome of a gradient check, with the worst element.
struct GradcheckReport {
  bool passed = true;
  /// Largest |analytic - numerical| over the elements (or directions) checked.
  double max_abs_error = 0.0;
  /// Largest |analytic - numerical| / (atol + rtol |numerical|): passed iff <= 1.
  double max_error_ratio = 0.0;
  /// Where the largest ratio occurred (row, column; for a directional check, row = direction).
  Index worst_row = -1;
  Index worst_col = -1;
  double analytic_at_worst = 0.0;
  double numerical_at_worst = 0.0;

  /// A one-line description of the worst element.
  std::string message() const {
    return detail::concat(passed ? "passed" : "FAILED", ": worst at (", worst_row, ", ",
                          worst_col, "): analytic ", analytic_at_worst, ", numerical ",
                          numerical_at_worst, ", |difference| ", max_abs_error,
                          ", ratio to tolerance ", max_error_ratio);
  }
};

namespace detail {

inline void record(GradcheckReport& report, double analytic, double numerical, Index row,
                   Index col, const GradcheckOptions& options) {
  const double error = std::abs(analytic - numerical);
  const double ratio = error / (options.atol + options.rtol * std::abs(numerical));
  if (error > report.max_abs_error) report.max_abs_error = error;
  // NaN on either side fails the check.
  if (!(ratio <= report.max_error_ratio) || report.worst_row < 0) {
    report.max_error_ratio = std::isnan(ratio) ? std::numeric_limits<double>::infinity() : ratio;
    report.worst_row = row;
    report.worst_col = col;
    report.analytic_at_worst = analytic;
    report.numerical_at_worst = numerical;
  }
  report.passed = report.max_error_ratio <= 1.0;
}

inline void check_options(const char* function, const GradcheckOptions& options) {
  if (!(options.step > 0) || !std::isfinite(options.step)) {
    moebal::detail::throw_invalid(function, "options.step", "a finite step > 0",
                                  moebal::detail::concat(options.step));
  }
  if (!(options.atol >= 0) || !(options.rtol >= 0)) {
    moebal::detail::throw_invalid(function, "options.atol/rtol", "non-negative tolerances",
                                  moebal::detail::concat(options.atol, ", ", options.rtol));
  }
}

inline void check_arguments(const char* function, const RowMatrix<double>& x,
                            const RowMatrix<double>& analytic, const GradcheckOptions& options) {
  check_options(function, options);
  if (analytic.rows() != x.rows() || analytic.cols() != x.cols()) {
    moebal::detail::throw_invalid(function, "analytic", "the shape of x",
                                  moebal::detail::concat(analytic.rows(), " x ", analytic.cols()));
  }
}

}  // namespace detail

/// Central-difference gradient of a scalar function:
///   g_ij = (f(x + h e_ij) - f(x - h e_ij)) / (2 h).
/// @param function callable `double(const RowMatrix<double>&)`.
/// @param x the point, T x N. @param step h > 0.
/// @return T x N numerical gradient. Costs 2 T N evaluations: use on small shapes.
template <class Function>
RowMatrix<double> numerical_gradient(Function&& function, const RowMatrix<double>& x,
                                     double step = GradcheckOptions{}.step) {
  GradcheckOptions options;
  options.step = step;
  detail::check_options("moebal::testing::numerical_gradient", options);
  RowMatrix<double> probe = x;
  RowMatrix<double> gradient(x.rows(), x.cols());
  for (Index i = 0; i < x.rows(); ++i) {
    for (Index j = 0; j < x.cols(); ++j) {
      const double saved = probe(i, j);
      probe(i, j) = saved + step;
      const double plus = function(static_cast<const RowMatrix<double>&>(probe));
      probe(i, j) = saved - step;
      const double minus = function(static_cast<const RowMatrix<double>&>(probe));
      probe(i, j) = saved;
      gradient(i, j) = (plus - minus) / (2.0 * step);
    }
  }
  return gradient;
}

/// Checks every element of an analytic gradient against central differences.
/// @param function callable `double(const RowMatrix<double>&)`.
/// @param x the point, T x N. @param analytic d function / d x at x, T x N.
/// @throws moebal::invalid_argument if the shapes differ or the options are invalid.
template <class Function>
GradcheckReport gradcheck(Function&& function, const RowMatrix<double>& x,
                          const RowMatrix<double>& analytic,
                          const GradcheckOptions& options = {}) {
  detail::check_arguments("moebal::testing::gradcheck", x, analytic, options);
  const RowMatrix<double> numerical = numerical_gradient(function, x, options.step);
  GradcheckReport report;
  for (Index i = 0; i < x.rows(); ++i) {
    for (Index j = 0; j < x.cols(); ++j) {
      detail::record(report, analytic(i, j), numerical(i, j), i, j, options);
    }
  }
  return report;
}

/// Checks an analytic gradient along random directions, for shapes too large for
/// `gradcheck`: for each direction v (standard normal entries, then unit Frobenius norm),
///   (f(x + h v) - f(x - h v)) / (2 h)  against  sum_ij analytic_ij v_ij.
/// Costs 2 evaluations per direction. Directions come from std::mt19937_64 seeded by `seed`.
template <class Function>
GradcheckReport directional_gradcheck(Function&& function, const RowMatrix<double>& x,
                                      const RowMatrix<double>& analytic, Index directions = 4,
                                      std::uint64_t seed = 0,
                                      const GradcheckOptions& options = {}) {
  constexpr const char* name = "moebal::testing::directional_gradcheck";
  detail::check_arguments(name, x, analytic, options);
  if (directions < 1) {
    moebal::detail::throw_invalid(name, "directions", "at least 1",
                                  moebal::detail::concat(directions));
  }
  std::mt19937_64 engine(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  GradcheckReport report;
  RowMatrix<double> v(x.rows(), x.cols());
  for (Index d = 0; d < directions; ++d) {
    for (Index i = 0; i < v.size(); ++i) v.data()[i] = normal(engine);
    v /= v.norm();
    const RowMatrix<double> plus_point = x + options.step * v;
    const RowMatrix<double> minus_point = x - options.step * v;
    const double numerical =
        (function(plus_point) - function(minus_point)) / (2.0 * options.step);
    const double projected = analytic.cwiseProduct(v).sum();
    detail::record(report, projected, numerical, d, -1, options);
  }
  return report;
}

}  // namespace testing
}  // namespace moebal
