// SPDX-License-Identifier: Apache-2.0
#include <cmath>
#include <limits>

#include <catch2/catch.hpp>

#include "moebal/losses/combined.hpp"
#include "moebal/losses/cv2.hpp"
#include "moebal/testing/gradcheck.hpp"
#include "support/matchers.hpp"
#include "support/random.hpp"

using moebal::Cv2Options;
using moebal::Cv2Variance;
using moebal::ImportanceGates;
using moebal::Index;
using moebal::RowMatrix;
using moebal::ScoreFunction;
using moebal_test::as_double;
using moebal_test::IsCloseTo;
using moebal_test::random_logits;

TEST_CASE("cv2_importance_loss: hand-derived values", "[loss][cv2]") {
  // Two tokens, two experts: p_0 = (3/4, 1/4), p_1 = (1/4, 3/4) give I = (1, 1): CV^2 = 0.
  RowMatrix<double> x(2, 2);
  x << std::log(3.0), 0.0, 0.0, std::log(3.0);
  CHECK(moebal::cv2_importance_loss(x, 1).loss == Approx(0.0).margin(1e-15));
  // Both tokens p = (3/4, 1/4): I = (3/2, 1/2), mu = 1, Var_pop = 1/4: CV^2 = 1/4.
  // Unbiased: Var = 1/2, L = (1/2) / (1 + 1e-10).
  x << std::log(3.0), 0.0, std::log(3.0), 0.0;
  CHECK(moebal::cv2_importance_loss(x, 1).loss == Approx(0.25).epsilon(1e-14));
  Cv2Options o;
  o.variance = Cv2Variance::unbiased;
  CHECK(moebal::cv2_importance_loss(x, 1, o).loss == Approx(0.5 / (1 + 1e-10)).epsilon(1e-14));
  // Top-1 gates renormalized: each token puts gate 1 on expert 0: I = (2, 0), CV^2 = 1.
  o = Cv2Options{};
  o.gates = ImportanceGates::topk;
  const auto r = moebal::cv2_importance_loss(x, 1, o);
  CHECK(r.loss == Approx(1.0).epsilon(1e-14));
  CHECK(r.importance[0] == Approx(2.0));
  // With k = 1 the renormalized gate is constant (1): the gradient is exactly zero.
  CHECK(r.grad.isZero(0));
}

TEST_CASE("cv2_importance_loss: gradient matches central differences", "[loss][cv2][grad]") {
  const RowMatrix<double> x = random_logits(10, 6, 1.5, 31);
  Eigen::VectorXi mask = Eigen::VectorXi::Ones(10);
  mask[2] = 0;
  for (const auto gates : {ImportanceGates::dense, ImportanceGates::topk}) {
    for (const auto variance : {Cv2Variance::population, Cv2Variance::unbiased}) {
      for (const auto score : {ScoreFunction::softmax, ScoreFunction::sigmoid}) {
        for (const bool masked : {false, true}) {
          Cv2Options o;
          o.gates = gates;
          o.variance = variance;
          o.score = score;
          o.coefficient = 0.4;
          if (masked) o.mask = moebal::TokenMask(mask);
          const auto r = moebal::cv2_importance_loss(x, 3, o);
          auto f = [&](const RowMatrix<double>& z) {
            return double(moebal::cv2_importance_loss(z, 3, o).loss);
          };
          const auto report = moebal::testing::gradcheck(f, x, r.grad);
          INFO("gates " << int(gates) << ", variance " << int(variance) << ", "
                        << moebal::to_string(score) << (masked ? ", mask" : "") << ": "
                        << report.message());
          CHECK(report.passed);
          if (masked) CHECK(r.grad.row(2).isZero(0));
        }
      }
    }
  }
}

TEST_CASE("cv2_importance_loss: float agrees with double; object form", "[loss][cv2][api]") {
  const RowMatrix<double> x = random_logits(64, 8, 1.0, 32);
  const RowMatrix<float> xf = x.cast<float>();
  const RowMatrix<double> xd = xf.cast<double>();
  Cv2Options o;
  o.gates = ImportanceGates::topk;
  const auto d = moebal::cv2_importance_loss(xd, 2, o);
  const auto f = moebal::cv2_importance_loss(xf, 2, o);
  CHECK(double(f.loss) == Approx(d.loss).epsilon(1e-5));
  CHECK_THAT(as_double(f.grad), IsCloseTo(d.grad, 1e-7, 1e-3));
  moebal::Cv2ImportanceLoss<double> loss(8, 2, o);
  CHECK(loss.forward(xd) == d.loss);
  RowMatrix<double> g(64, 8);
  loss.backward(xd, g);
  CHECK(g == d.grad);
}

TEST_CASE("cv2_load: equals its closed form and has zero gradient", "[loss][cv2]") {
  const RowMatrix<double> x = random_logits(50, 7, 2.0, 33);
  for (const Index k : {Index(1), Index(2), Index(4)}) {
    const auto r = moebal::cv2_load(x, k);
    // Closed form: N / (T k)^2 sum_i c_i^2 - 1, computed here from the counts.
    const double n = 7, tk = 50.0 * double(k);
    const double closed = n / (tk * tk) * r.counts.cast<double>().squaredNorm() - 1.0;
    CHECK(r.counts.sum() == 50 * k);
    CHECK(r.loss == Approx(closed).epsilon(1e-12));
    CHECK(r.grad.isZero(0));
  }
  // Uniform logits: every token picks experts 0..k-1, so c = (T, .., T, 0, ..).
  const auto u = moebal::cv2_load(RowMatrix<double>::Zero(10, 4), 2);
  // c = (10, 10, 0, 0): mean 5, Var_pop 25, CV^2 = 1.
  CHECK(u.loss == Approx(1.0));
}

TEST_CASE("CV2: bad input", "[loss][cv2][errors]") {
  const RowMatrix<double> x = RowMatrix<double>::Zero(3, 4);
  CHECK_THROWS_WITH(moebal::cv2_importance_loss(x, 5),
                    "moebal::cv2_importance_loss: argument 'k': expected 1 <= k <= N, the number "
                    "of experts (N = 4), got k = 5");
  Cv2Options o;
  o.variance = Cv2Variance::unbiased;
  CHECK_THROWS_WITH(moebal::cv2_importance_loss(RowMatrix<double>::Zero(3, 1), 1, o),
                    "moebal::cv2_importance_loss: argument 'num_experts': expected at least 2 "
                    "experts for the unbiased variance, got 1");
  o = Cv2Options{};
  o.gates = static_cast<ImportanceGates>(9);
  CHECK_THROWS_WITH(moebal::cv2_importance_loss(x, 1, o),
                    "moebal::cv2_importance_loss: argument 'options.gates': expected dense or "
                    "topk, got 9");
  CHECK_THROWS_AS(moebal::cv2_load(RowMatrix<double>(0, 4), 1), moebal::invalid_argument);
  const Eigen::VectorXi mask = Eigen::VectorXi::Ones(5);
  o = Cv2Options{};
  o.mask = moebal::TokenMask(mask);
  CHECK_THROWS_WITH(moebal::cv2_load(x, 1, o),
                    "moebal::cv2_load: argument 'mask': expected one element per token (length T "
                    "= 3, logits.rows()), got length 5");
}

TEST_CASE("CV2: sigmoid scores that underflow to 0 and gradients beyond float raise",
          "[loss][cv2][errors]") {
  Cv2Options o;
  o.score = ScoreFunction::sigmoid;
  // Every logit below -88.7: float's sigmoid is exactly 0 (as PyTorch's float sigmoid), so
  // every importance is 0 and the population CV^2 Var / Mean^2 is 0/0.
  RowMatrix<float> xf(3, 4);
  for (Index t = 0; t < 3; ++t) xf.row(t) << -95.f, -96.f, -97.f, -98.f;
  CHECK_THROWS_WITH(moebal::cv2_importance_loss(xf, 2, o),
                    "moebal::cv2_importance_loss: argument 'logits': expected a positive "
                    "importance for at least one expert (the population CV^2 divides by the "
                    "mean importance squared), got every importance 0 over 3 real tokens "
                    "(sigmoid scores underflow to 0 for logits below about -88 in float, -745 "
                    "in double)");
  moebal::Cv2ImportanceLoss<float> object(4, 2, o);
  CHECK_THROWS_AS(object.forward(xf), moebal::invalid_argument);
  moebal::CombinedOptions combined;
  combined.score = ScoreFunction::sigmoid;
  combined.weights.cv2_importance = 0.1;
  CHECK_THROWS_AS(moebal::combined_aux_loss(xf, 2, combined), moebal::invalid_argument);
  // Tutel's unbiased form is defined there: 0 / (0 + 1e-10) = 0.
  Cv2Options unbiased = o;
  unbiased.variance = Cv2Variance::unbiased;
  CHECK(moebal::cv2_importance_loss(xf, 2, unbiased).loss == 0.0f);
  // Only padding: no real token, the documented 0.
  const Eigen::VectorXi none = Eigen::VectorXi::Zero(3);
  Cv2Options masked = o;
  masked.mask = moebal::TokenMask(none);
  CHECK(moebal::cv2_importance_loss(xf, 2, masked).loss == 0.0f);
  // In double the same logits are fine: s_j = e^{x_j} (1 + O(e^-95)) and the normalized scores
  // q_j = s_j / (sum s + 1e-20) are proportional to e^{-j}, so I ~ (1, e^-1, e^-2, e^-3) and
  // CV^2 = Var / Mean^2 of that vector.
  const RowMatrix<double> xd = xf.cast<double>();
  const double e[4] = {1.0, std::exp(-1.0), std::exp(-2.0), std::exp(-3.0)};
  const double mean = (e[0] + e[1] + e[2] + e[3]) / 4.0;
  double var = 0.0;
  for (const double v : e) var += (v - mean) * (v - mean) / 4.0;
  CHECK(moebal::cv2_importance_loss(xd, 2, o).loss == Approx(var / (mean * mean)).epsilon(1e-9));

  // A coefficient of 1e39 puts d L / d I beyond float's largest value (|h_1| = 2.5e39 for
  // I = (3 s, 3 u, 3 u, 3 u), s = e^5 / (e^5 + 3), u = 1 / (e^5 + 3)): the backward pass raises
  // instead of writing Inf or NaN (even where the product with the scores' Jacobian would be
  // representable); double computes it.
  Cv2Options large;
  large.coefficient = 1e39;
  RowMatrix<float> skewed = RowMatrix<float>::Zero(3, 4);
  skewed.col(0).setConstant(5.f);
  moebal::Cv2ImportanceLoss<float> loss(4, 1, large);
  loss.forward(skewed);
  RowMatrix<float> grad(3, 4);
  CHECK_THROWS_WITH(loss.backward(skewed, grad),
                    Catch::Matchers::StartsWith(
                        "moebal::Cv2ImportanceLoss::backward: argument 'options.coefficient': "
                        "expected coefficients whose gradient d L / d I is finite in the compute "
                        "type (use double logits or a smaller coefficient), got |d L / d I| up "
                        "to 2.5"));
  const auto in_double = moebal::cv2_importance_loss(RowMatrix<double>(skewed.cast<double>()), 1,
                                                     large);
  CHECK(in_double.grad.allFinite());
  CHECK(in_double.grad.cwiseAbs().maxCoeff() > 1e37);
}
