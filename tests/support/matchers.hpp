// SPDX-License-Identifier: Apache-2.0
#pragma once

// Test support: a Catch2 matcher for matrices that prints both matrices (and the worst
// element) when they differ.

#include <cmath>
#include <sstream>
#include <string>

#include <Eigen/Core>
#include <catch2/catch.hpp>

#include "moebal/core/types.hpp"

namespace moebal_test {

/// Matches when every element satisfies |actual - expected| <= atol + rtol * |expected| and
/// the shapes agree. NaN never matches.
class MatrixCloseTo : public Catch::MatcherBase<moebal::RowMatrix<double>> {
 public:
  MatrixCloseTo(moebal::RowMatrix<double> expected, double atol, double rtol)
      : expected_(std::move(expected)), atol_(atol), rtol_(rtol) {}

  bool match(const moebal::RowMatrix<double>& actual) const override {
    worst_ = "";
    if (actual.rows() != expected_.rows() || actual.cols() != expected_.cols()) {
      worst_ = "shapes differ";
      return false;
    }
    double worst_ratio = 0.0;
    bool ok = true;
    for (Eigen::Index i = 0; i < actual.rows(); ++i) {
      for (Eigen::Index j = 0; j < actual.cols(); ++j) {
        const double a = actual(i, j), e = expected_(i, j);
        const double ratio = std::abs(a - e) / (atol_ + rtol_ * std::abs(e));
        if (!(ratio <= 1.0)) ok = false;
        if (!(ratio <= worst_ratio)) {
          worst_ratio = std::isnan(ratio) ? INFINITY : ratio;
          std::ostringstream out;
          out.precision(17);
          out << "worst at (" << i << ", " << j << "): actual " << a << ", expected " << e
              << ", ratio to tolerance " << worst_ratio;
          worst_ = out.str();
        }
      }
    }
    return ok;
  }

  std::string describe() const override {
    std::ostringstream out;
    out.precision(10);
    out << "is close to (atol " << atol_ << ", rtol " << rtol_ << ")\n"
        << expected_ << "\n" << worst_;
    return out.str();
  }

 private:
  moebal::RowMatrix<double> expected_;
  double atol_, rtol_;
  mutable std::string worst_;
};

template <class Derived>
MatrixCloseTo IsCloseTo(const Eigen::MatrixBase<Derived>& expected, double atol,
                        double rtol = 0.0) {
  return MatrixCloseTo(expected.template cast<double>(), atol, rtol);
}

/// Converts any matrix to a row-major double matrix for matching.
template <class Derived>
moebal::RowMatrix<double> as_double(const Eigen::MatrixBase<Derived>& m) {
  return m.template cast<double>();
}

}  // namespace moebal_test
