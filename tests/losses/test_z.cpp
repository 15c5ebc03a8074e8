// SPDX-License-Identifier: Apache-2.0
#include <cmath>
#include <limits>

#include <catch2/catch.hpp>

#include "moebal/losses/z.hpp"
#include "moebal/testing/gradcheck.hpp"
#include "support/matchers.hpp"
#include "support/random.hpp"

using moebal::Index;
using moebal::RowMatrix;
using moebal_test::as_double;
using moebal_test::IsCloseTo;
using moebal_test::random_logits;

TEMPLATE_TEST_CASE("z_loss: hand-derived values", "[loss][z]", float, double) {
  using T = TestType;
  const double tol = std::is_same<T, float>::value ? 2e-6 : 1e-14;
  // Row 0: (0, 0): lse = log 2, p = (1/2, 1/2). Row 1: (log 3, -Inf): lse = log 3, p = (1, 0).
  // L = a/2 (log^2 2 + log^2 3); d L / d x_0j = a (2/2) log 2 p_0j = a log 2 / 2 each;
  // d L / d x_1 = (a log 3, 0).
  RowMatrix<T> x(2, 2);
  x << T(0), T(0), T(std::log(3.0)), -std::numeric_limits<T>::infinity();
  moebal::ZLossOptions o;
  o.coefficient = 0.5;
  const auto r = moebal::z_loss(x, o);
  const double l2 = std::log(2.0), l3 = std::log(3.0);
  CHECK(std::abs(double(r.loss) - 0.5 / 2 * (l2 * l2 + l3 * l3)) <= tol);
  RowMatrix<double> expected(2, 2);
  expected << 0.5 * l2 / 2, 0.5 * l2 / 2, 0.5 * l3, 0.0;
  CHECK_THAT(as_double(r.grad), IsCloseTo(expected, tol));
  CHECK(r.grad(1, 1) == T(0));  // a disabled expert gets exactly zero gradient
  CHECK(r.tokens == 2);
}

TEMPLATE_TEST_CASE("z_loss: stable for large logits", "[loss][z]", float, double) {
  using T = TestType;
  const double big = std::is_same<T, float>::value ? 80.0 : 1e4;
  // lse(big, big) = big + log 2 exactly in exact arithmetic; a naive exp overflows.
  RowMatrix<T> x(1, 2);
  x << T(big), T(big);
  const auto r = moebal::z_loss(x);
  const double lse = big + std::log(2.0);
  CHECK(double(r.loss) == Approx(lse * lse).epsilon(1e-6));
  CHECK(double(r.grad(0, 0)) == Approx(lse).epsilon(1e-6));  // 2 lse p with p = 1/2
  CHECK(std::isfinite(double(r.grad(0, 1))));
}

TEST_CASE("z_loss: gradient matches central differences", "[loss][z][grad]") {
  RowMatrix<double> x = random_logits(9, 5, 2.0, 7);
  x(2, 3) = -std::numeric_limits<double>::infinity();
  Eigen::VectorXi mask = Eigen::VectorXi::Ones(9);
  mask[4] = 0;
  for (const bool masked : {false, true}) {
    moebal::ZLossOptions o;
    o.coefficient = 0.3;
    if (masked) o.mask = moebal::TokenMask(mask);
    const auto r = moebal::z_loss(x, o);
    auto f = [&](const RowMatrix<double>& z) {
      RowMatrix<double> y = z;
      y(2, 3) = -std::numeric_limits<double>::infinity();  // keep the disabled expert disabled
      return double(moebal::z_loss(y, o).loss);
    };
    RowMatrix<double> finite = x;
    finite(2, 3) = 0.0;  // the helper perturbs finite entries; the function resets this one
    RowMatrix<double> analytic = r.grad;
    analytic(2, 3) = 0.0;
    const auto report = moebal::testing::gradcheck(f, finite, analytic);
    INFO(report.message());
    CHECK(report.passed);
    if (masked) CHECK(r.grad.row(4).isZero(0));
  }
}

TEST_CASE("ZLoss: object form, accumulate and float agree", "[loss][z][api]") {
  const RowMatrix<double> x = random_logits(40, 8, 3.0, 8);
  const auto r = moebal::z_loss(x);
  moebal::ZLoss<double> loss(1.0);
  CHECK(loss.forward(x) == r.loss);
  RowMatrix<double> g = RowMatrix<double>::Ones(40, 8);
  loss.backward_accumulate(x, g, 2.0);
  const RowMatrix<double> expected = RowMatrix<double>::Ones(40, 8) + 2.0 * r.grad;
  CHECK_THAT(g, IsCloseTo(expected, 1e-15, 1e-13));
  const RowMatrix<float> xf = x.cast<float>();
  const auto rf = moebal::z_loss(xf);
  const auto rd = moebal::z_loss(RowMatrix<double>(xf.cast<double>()));
  CHECK(double(rf.loss) == Approx(rd.loss).epsilon(1e-6));
  CHECK_THAT(as_double(rf.grad), IsCloseTo(rd.grad, 1e-7, 1e-4));
}

TEST_CASE("z_loss: bad input", "[loss][z][errors]") {
  RowMatrix<double> x = RowMatrix<double>::Zero(3, 2);
  CHECK_THROWS_WITH(moebal::z_loss(RowMatrix<double>(0, 2)),
                    "moebal::z_loss: argument 'logits': expected at least one token row (T >= 1), "
                    "got an empty batch, shape 0 x 2");
  x(1, 1) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(moebal::z_loss(x),
                    "moebal::z_loss: argument 'logits': expected finite values or -Inf (no NaN, no "
                    "+Inf), got nan at row 1, column 1");
  x(1, 1) = std::numeric_limits<double>::infinity();
  CHECK_THROWS_AS(moebal::z_loss(x), moebal::invalid_argument);
  x.row(1).setConstant(-std::numeric_limits<double>::infinity());
  CHECK_THROWS_WITH(moebal::z_loss(x),
                    "moebal::z_loss: argument 'logits': expected at least one logit above -Inf in "
                    "every real token's row (softmax of an all -Inf row is undefined), got every "
                    "logit -Inf in row 1");
  moebal::ZLossOptions o;
  const Eigen::VectorXi mask = (Eigen::VectorXi(3) << 1, 0, 1).finished();
  o.mask = moebal::TokenMask(mask);
  CHECK_NOTHROW(moebal::z_loss(x, o));  // the bad row is padding
  const Eigen::VectorXi short_mask = Eigen::VectorXi::Ones(2);
  o.mask = moebal::TokenMask(short_mask);
  CHECK_THROWS_WITH(moebal::z_loss(x, o),
                    "moebal::z_loss: argument 'mask': expected one element per token (length T = "
                    "3, logits.rows()), got length 2");
  o = moebal::ZLossOptions{};
  o.coefficient = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH(moebal::z_loss(RowMatrix<double>::Zero(3, 2), o),
                    "moebal::z_loss: argument 'options.coefficient': expected a finite number, "
                    "got inf");
  moebal::ZLoss<double> loss;
  RowMatrix<double> g(3, 2);
  CHECK_THROWS_WITH(loss.backward(RowMatrix<double>::Zero(3, 2), g),
                    "moebal::ZLoss::backward: argument 'logits': expected the logits of a "
                    "completed forward, got a call before any forward completed");
}
