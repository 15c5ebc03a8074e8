// SPDX-License-Identifier: Apache-2.0
#include <cmath>

#include <catch2/catch.hpp>

#include "moebal/testing/gradcheck.hpp"

using moebal::RowMatrix;

namespace {

// f(x) = sum_ij c_ij x_ij^3 has gradient 3 c_ij x_ij^2.
RowMatrix<double> point() {
  RowMatrix<double> x(2, 3);
  x << 0.5, -1.0, 2.0, 0.0, 1.5, -0.25;
  return x;
}
RowMatrix<double> coefficients() {
  RowMatrix<double> c(2, 3);
  c << 1.0, 2.0, -1.0, 3.0, 0.5, 4.0;
  return c;
}
double cubic(const RowMatrix<double>& x) {
  return coefficients().cwiseProduct(x.cwiseProduct(x).cwiseProduct(x)).sum();
}
RowMatrix<double> cubic_gradient(const RowMatrix<double>& x) {
  return 3.0 * coefficients().cwiseProduct(x.cwiseProduct(x));
}

}  // namespace

TEST_CASE("numerical_gradient: central differences of a cubic", "[testing][gradcheck]") {
  const RowMatrix<double> x = point();
  const RowMatrix<double> numerical = moebal::testing::numerical_gradient(cubic, x, 1e-4);
  // Central differences of a cubic are exact up to h^2 c_ij: the truncation error is c h^2.
  const RowMatrix<double> error = numerical - cubic_gradient(x);
  CHECK(error.cwiseAbs().maxCoeff() < 5e-8);
}

TEST_CASE("gradcheck: passes a right gradient and catches a wrong one", "[testing][gradcheck]") {
  const RowMatrix<double> x = point();
  const auto good = moebal::testing::gradcheck(cubic, x, cubic_gradient(x));
  INFO(good.message());
  CHECK(good.passed);
  CHECK(good.max_error_ratio <= 1.0);

  RowMatrix<double> wrong = cubic_gradient(x);
  wrong(1, 2) += 1e-3;
  const auto bad = moebal::testing::gradcheck(cubic, x, wrong);
  CHECK_FALSE(bad.passed);
  CHECK(bad.worst_row == 1);
  CHECK(bad.worst_col == 2);
  CHECK(bad.max_abs_error == Approx(1e-3).epsilon(1e-3));

  RowMatrix<double> with_nan = cubic_gradient(x);
  with_nan(0, 0) = std::nan("");
  CHECK_FALSE(moebal::testing::gradcheck(cubic, x, with_nan).passed);
}

TEST_CASE("directional_gradcheck: random directions", "[testing][gradcheck]") {
  const RowMatrix<double> x = point();
  CHECK(moebal::testing::directional_gradcheck(cubic, x, cubic_gradient(x), 8, 1).passed);
  const RowMatrix<double> wrong = 1.01 * cubic_gradient(x);
  CHECK_FALSE(moebal::testing::directional_gradcheck(cubic, x, wrong, 8, 1).passed);
}

TEST_CASE("gradcheck: bad arguments", "[testing][gradcheck][errors]") {
  const RowMatrix<double> x = point();
  CHECK_THROWS_WITH(moebal::testing::gradcheck(cubic, x, RowMatrix<double>::Zero(3, 2)),
                    "moebal::testing::gradcheck: argument 'analytic': expected the shape of x, "
                    "got 3 x 2");
  moebal::testing::GradcheckOptions o;
  o.step = 0;
  CHECK_THROWS_WITH(moebal::testing::gradcheck(cubic, x, cubic_gradient(x), o),
                    "moebal::testing::gradcheck: argument 'options.step': expected a finite step "
                    "> 0, got 0");
  CHECK_THROWS_AS(moebal::testing::directional_gradcheck(cubic, x, cubic_gradient(x), 0),
                  moebal::invalid_argument);
}
