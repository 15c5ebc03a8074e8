// SPDX-License-Identifier: Apache-2.0
#include <cmath>
#include <limits>
#include <random>

#include <catch2/catch.hpp>

#include "moebal/core/scores.hpp"
#include "moebal/testing/gradcheck.hpp"
#include "support/matchers.hpp"
#include "support/random.hpp"

using moebal::Index;
using moebal::RowMatrix;
using moebal::ScoreFunction;
using moebal_test::IsCloseTo;
using moebal_test::random_logits;

TEMPLATE_TEST_CASE("softmax: hand-derived values", "[scores][softmax]", float, double) {
  using T = TestType;
  RowMatrix<T> x(2, 3);
  // Row 0: exp(log 1), exp(log 2), exp(log 5) normalize to 1/8, 2/8, 5/8.
  // Row 1: shifting a row by a constant changes nothing; 1000 would overflow a naive exp.
  x << T(std::log(1.0)), T(std::log(2.0)), T(std::log(5.0)),
       T(1000), T(1000), T(1000);
  const RowMatrix<T> p = moebal::softmax(x);
  RowMatrix<double> expected(2, 3);
  expected << 0.125, 0.25, 0.625,
              1.0 / 3, 1.0 / 3, 1.0 / 3;
  const double tol = std::is_same<T, float>::value ? 2e-7 : 1e-15;
  CHECK_THAT(moebal_test::as_double(p), IsCloseTo(expected, tol));
}

TEMPLATE_TEST_CASE("softmax: -Inf logits get probability exactly 0", "[scores][softmax]", float,
                   double) {
  using T = TestType;
  const T inf = std::numeric_limits<T>::infinity();
  RowMatrix<T> x(1, 4);
  x << T(0), -inf, T(0), -inf;
  const RowMatrix<T> p = moebal::softmax(x);
  CHECK(p(0, 0) == T(0.5));
  CHECK(p(0, 1) == T(0));
  CHECK(p(0, 2) == T(0.5));
  CHECK(p(0, 3) == T(0));
}

TEMPLATE_TEST_CASE("normalized sigmoid: hand-derived values", "[scores][sigmoid]", float,
                   double) {
  using T = TestType;
  RowMatrix<T> x(1, 3);
  // sigmoid(0) = 1/2, sigmoid(log 3) = 3/4, sigmoid(-log 3) = 1/4; sum = 3/2.
  x << T(0), T(std::log(3.0)), T(-std::log(3.0));
  const RowMatrix<T> q = moebal::normalized_sigmoid(x);
  RowMatrix<double> expected(1, 3);
  expected << 1.0 / 3, 0.5, 1.0 / 6;
  const double tol = std::is_same<T, float>::value ? 3e-7 : 1e-15;
  CHECK_THAT(moebal_test::as_double(q), IsCloseTo(expected, tol));
  // Extreme logits neither overflow nor produce NaN.
  RowMatrix<T> y(1, 3);
  y << T(-1000), T(1000), -std::numeric_limits<T>::infinity();
  const RowMatrix<T> r = moebal::normalized_sigmoid(y);
  CHECK(r(0, 0) == T(0));
  CHECK(r(0, 1) == T(1));
  CHECK(r(0, 2) == T(0));
}

TEST_CASE("score VJPs match central differences", "[scores][grad]") {
  const RowMatrix<double> w = random_logits(5, 7, 1.0, 11);  // upstream d loss / d scores
  SECTION("softmax_backward from probabilities") {
    const RowMatrix<double> x = random_logits(5, 7, 2.0, 3);
    auto f = [&](const RowMatrix<double>& z) { return moebal::softmax(z).cwiseProduct(w).sum(); };
    const RowMatrix<double> analytic = moebal::softmax_backward(moebal::softmax(x), w);
    const auto report = moebal::testing::gradcheck(f, x, analytic);
    INFO(report.message());
    CHECK(report.passed);
    CHECK_THAT(moebal_test::as_double(moebal::scores_backward(x, w, ScoreFunction::softmax)),
               IsCloseTo(analytic, 1e-15, 1e-12));
  }
  for (const double scale : {1.0, 8.0}) {
    SECTION("normalized sigmoid, logit scale " + std::to_string(scale)) {
      const RowMatrix<double> x = random_logits(5, 7, scale, 4);
      auto f = [&](const RowMatrix<double>& z) {
        return moebal::normalized_sigmoid(z).cwiseProduct(w).sum();
      };
      const RowMatrix<double> analytic = moebal::scores_backward(x, w, ScoreFunction::sigmoid);
      const auto report = moebal::testing::gradcheck(f, x, analytic);
      INFO(report.message());
      CHECK(report.passed);
    }
  }
}

TEST_CASE("score VJPs in float agree with double", "[scores][grad]") {
  const RowMatrix<double> x = random_logits(6, 9, 2.0, 5);
  const RowMatrix<double> w = random_logits(6, 9, 1.0, 6);
  for (const auto score : {ScoreFunction::softmax, ScoreFunction::sigmoid}) {
    const RowMatrix<double> d = moebal::scores_backward(x, w, score);
    const RowMatrix<float> s = moebal::scores_backward(RowMatrix<float>(x.cast<float>()),
                                                       RowMatrix<float>(w.cast<float>()), score);
    CHECK_THAT(moebal_test::as_double(s), IsCloseTo(d, 1e-6, 1e-4));
  }
}

TEST_CASE("scores: bad input", "[scores][errors]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  RowMatrix<double> x = RowMatrix<double>::Zero(2, 3);
  CHECK_THROWS_WITH(moebal::softmax(RowMatrix<double>(0, 3)),
                    "moebal::softmax: argument 'logits': expected at least one token row "
                    "(T >= 1), got an empty batch, shape 0 x 3");
  CHECK_THROWS_WITH(moebal::normalized_sigmoid(RowMatrix<double>(2, 0)),
                    "moebal::normalized_sigmoid: argument 'logits': expected at least one "
                    "expert column (N >= 1), got shape 2 x 0");
  x(1, 2) = nan;
  CHECK_THROWS_WITH(moebal::softmax(x),
                    "moebal::softmax: argument 'logits': expected finite values or -Inf (no "
                    "NaN, no +Inf), got nan at row 1, column 2");
  x(1, 2) = inf;
  CHECK_THROWS_WITH(moebal::normalized_sigmoid(x),
                    "moebal::normalized_sigmoid: argument 'logits': expected finite values or "
                    "-Inf (no NaN, no +Inf), got inf at row 1, column 2");
  x.row(1).setConstant(-inf);
  CHECK_THROWS_WITH(moebal::softmax(x),
                    "moebal::softmax: argument 'logits': expected at least one logit above -Inf "
                    "in every real token's row (softmax of an all -Inf row is undefined), got "
                    "every logit -Inf in row 1");
  CHECK_NOTHROW(moebal::normalized_sigmoid(x));  // sigmoid(-Inf) = 0 is well defined
  CHECK_THROWS_WITH(
      moebal::softmax_backward(RowMatrix<double>::Zero(2, 3), RowMatrix<double>::Zero(3, 2)),
      "moebal::softmax_backward: argument 'dloss_dprobs': expected the logits' shape 2 x 3, "
      "got shape 3 x 2");
}

TEST_CASE("softmax exponential: within 2 ulp of exp in double over the normal range",
          "[scores][softmax][exp]") {
  // moebal's own float exp for the softmax's arguments d = x - max <= 0
  // (detail::exp_nonpositive), against std::exp evaluated in double and rounded to float:
  // 2^21 arguments spread over [log(smallest normal), 0], each block of lanes taking
  // neighbouring values (every lane of the packets is exercised).
  using Block = moebal::detail::ExpBlock<float>;
  constexpr Index lanes = Block::SizeAtCompileTime;
  const float lowest = moebal::detail::kLogSmallestNormal<float>;
  const Index blocks = (Index(1) << 21) / lanes;
  double worst = 0.0;
  float worst_at = 0.0f;
  for (Index b = 0; b < blocks; ++b) {
    Block d;
    for (Index l = 0; l < lanes; ++l) {
      d[l] = lowest * float(double(b * lanes + l) / double(blocks * lanes));
    }
    const Block e = moebal::detail::exp_nonpositive(d);
    for (Index l = 0; l < lanes; ++l) {
      const double exact = std::exp(double(d[l]));
      const float rounded = float(exact);
      const double ulp = double(std::nextafter(rounded, 1.0f)) - double(rounded);
      const double err = std::abs(double(e[l]) - exact) / ulp;
      if (err > worst) {
        worst = err;
        worst_at = d[l];
      }
    }
  }
  INFO("worst error " << worst << " ulp at d = " << worst_at);
  CHECK(worst <= 2.0);
  // exp(0) is exactly 1 (the row maximum's raw score) and the flush below the normal range
  // gives exactly 0, as for -Inf.
  Block d = Block::Zero();
  d[1] = lowest * 1.0001f;
  d[2] = -std::numeric_limits<float>::infinity();
  d[3] = -1.0f;
  const auto r = moebal::detail::raw_block<float>(d, 0.0f, ScoreFunction::softmax);
  CHECK(r[0] == 1.0f);
  CHECK(r[1] == 0.0f);
  CHECK(r[2] == 0.0f);
  CHECK(std::abs(double(r[3]) - std::exp(-1.0)) <= 2.0 * std::exp(-1.0) * 6e-8);
}
