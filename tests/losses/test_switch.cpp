// SPDX-License-Identifier: Apache-2.0
#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "moebal/losses/switch.hpp"
#include "moebal/core/scores.hpp"
#include "moebal/testing/gradcheck.hpp"
#include "support/matchers.hpp"
#include "support/random.hpp"

using moebal::Index;
using moebal::RowMatrix;
using moebal::ScoreFunction;
using moebal::SwitchConvention;
using moebal::SwitchOptions;
using moebal_test::as_double;
using moebal_test::IsCloseTo;
using moebal_test::random_logits;

namespace {

const SwitchConvention kConventions[] = {SwitchConvention::megatron,
                                         SwitchConvention::huggingface,
                                         SwitchConvention::first_choice};
const ScoreFunction kScores[] = {ScoreFunction::softmax, ScoreFunction::sigmoid};


template <class T>
constexpr bool is_float() {
  return std::is_same<T, float>::value;
}

SwitchOptions make_options(SwitchConvention convention, ScoreFunction score, double coefficient,
                           const Eigen::VectorXi* mask = nullptr) {
  SwitchOptions o;
  o.convention = convention;
  o.score = score;
  o.coefficient = coefficient;
  if (mask != nullptr) o.mask = moebal::TokenMask(*mask);
  return o;
}

std::string describe(const SwitchOptions& o, Index k) {
  return std::string(moebal::to_string(o.convention)) + "/" + moebal::to_string(o.score) +
         "/k=" + std::to_string(k) + (o.mask.empty() ? "" : "/mask");
}

// The loss with the counts frozen at those of `stats` (counts are constants of the gradient by
// definition): a N sum_i f_i P_i(z), P from moebal::scores over real rows. Used where the
// selection is tied, so that central differences would otherwise cross a selection boundary.
double loss_with_frozen_f(const RowMatrix<double>& z, const Eigen::VectorXd& f, double a,
                          ScoreFunction score, const Eigen::VectorXi* mask) {
  const RowMatrix<double> q = moebal::scores(z, score);
  Eigen::VectorXd sums = Eigen::VectorXd::Zero(z.cols());
  double tokens = 0;
  for (Index t = 0; t < z.rows(); ++t) {
    if (mask != nullptr && (*mask)[t] == 0) continue;
    sums += q.row(t).transpose();
    tokens += 1;
  }
  return a * double(z.cols()) * f.dot(sums) / tokens;
}

// Logits whose sorted values are `margin` apart in every row (margin >> the finite-difference
// step), so every top-k boundary is a near tie that a perturbation of one step cannot flip.
RowMatrix<double> near_tie_logits(Index rows, Index cols, double margin, unsigned seed) {
  std::mt19937 engine(seed);
  RowMatrix<double> x(rows, cols);
  for (Index t = 0; t < rows; ++t) {
    std::vector<Index> order(static_cast<std::size_t>(cols));
    std::iota(order.begin(), order.end(), Index(0));
    std::shuffle(order.begin(), order.end(), engine);
    for (Index r = 0; r < cols; ++r) {
      // Rank r gets 0.5 - r * margin: every adjacent pair, the k-th/k+1-th included, is
      // `margin` apart.
      x(t, order[static_cast<std::size_t>(r)]) = 0.5 - double(r) * margin;
    }
  }
  return x;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Small cases derived by hand.

TEMPLATE_TEST_CASE("switch_aux_loss: hand-derived values", "[loss][switch]", float, double) {
  using T = TestType;
  const double tol = is_float<T>() ? 1e-6 : 1e-15;

  SECTION("uniform logits, top-1 ties all go to expert 0") {
    // T = 2, N = 2, k = 1, p = (1/2, 1/2) for both tokens; ties -> expert 0, c = (2, 0).
    // Megatron: f = c / (T k) = (1, 0), P = (1/2, 1/2), L = N sum f P = 2 * 1/2 = 1.
    // grad_tj = (N/T) p_j (f_j - sum_i f_i p_i) = 1 * 1/2 * (f_j - 1/2) = (1/4, -1/4).
    const RowMatrix<T> x = RowMatrix<T>::Zero(2, 2);
    const auto r = moebal::switch_aux_loss(x, 1);
    CHECK(r.loss == T(1));
    CHECK(r.stats.tokens == 2);
    CHECK(r.stats.tokens_per_expert[0] == 2);
    CHECK(r.stats.tokens_per_expert[1] == 0);
    RowMatrix<double> expected(2, 2);
    expected << 0.25, -0.25, 0.25, -0.25;
    CHECK_THAT(as_double(r.grad), IsCloseTo(expected, tol));
  }

  SECTION("balanced routing gives a zero gradient") {
    // p_0 = (3/4, 1/4), p_1 = (1/4, 3/4); k = 1 picks experts 0 and 1: f = P = (1/2, 1/2),
    // L = 2 (1/4 + 1/4) = 1 and f_j - sum_i f_i p_i = 1/2 - 1/2 = 0 everywhere.
    RowMatrix<T> x(2, 2);
    x << T(std::log(3.0)), T(0), T(0), T(std::log(3.0));
    const auto r = moebal::switch_aux_loss(x, 1);
    CHECK(std::abs(double(r.loss) - 1.0) <= tol);
    CHECK_THAT(as_double(r.grad), IsCloseTo(RowMatrix<double>::Zero(2, 2), tol));
  }

  SECTION("one token, three conventions, a tie for the second slot") {
    // x = (log 4, log 2, log 2): p = (1/2, 1/4, 1/4). Top-2 = {0, 1} (1 beats 2 on the tie),
    // first choice 0. P = p, T = 1, N = 3.
    //   megatron:     f = (1/2, 1/2, 0), L = 3 (1/4 + 1/8) = 9/8
    //   huggingface:  f = (1, 1, 0),     L = 3 (1/2 + 1/4) = 9/4
    //   first_choice: f = (1, 0, 0),     L = 3 (1/2)       = 3/2
    // Megatron gradient: 3 p_j (f_j - 3/8) = (3/16, 3/32, -9/32).
    RowMatrix<T> x(1, 3);
    x << T(std::log(4.0)), T(std::log(2.0)), T(std::log(2.0));
    SwitchOptions o;
    const auto m = moebal::switch_aux_loss(x, 2, o);
    CHECK(std::abs(double(m.loss) - 9.0 / 8) <= 2 * tol);
    CHECK(m.stats.tokens_per_expert == (moebal::CountVector(3) << 1, 1, 0).finished());
    CHECK(m.stats.first_choice_tokens == (moebal::CountVector(3) << 1, 0, 0).finished());
    RowMatrix<double> expected(1, 3);
    expected << 3.0 / 16, 3.0 / 32, -9.0 / 32;
    CHECK_THAT(as_double(m.grad), IsCloseTo(expected, 2 * tol));
    o.convention = SwitchConvention::huggingface;
    CHECK(std::abs(double(moebal::switch_aux_loss(x, 2, o).loss) - 9.0 / 4) <= 4 * tol);
    o.convention = SwitchConvention::first_choice;
    CHECK(std::abs(double(moebal::switch_aux_loss(x, 2, o).loss) - 3.0 / 2) <= 2 * tol);
  }

  SECTION("normalized sigmoid, one token") {
    // x = (0, 0): s = (1/2, 1/2), q = s / (1 + 1e-20) = (1/2, 1/2); k = 1 picks expert 0.
    // L = 2 * (1 * 1/2) = 1. grad_j = (N/T) s_j (1 - s_j) / (sum s) (f_j - sum f q)
    //                               = 2 * 1/4 / 1 * (f_j - 1/2) = (1/4, -1/4).
    const RowMatrix<T> x = RowMatrix<T>::Zero(1, 2);
    SwitchOptions o;
    o.score = ScoreFunction::sigmoid;
    const auto r = moebal::switch_aux_loss(x, 1, o);
    CHECK(r.loss == T(1));
    RowMatrix<double> expected(1, 2);
    expected << 0.25, -0.25;
    CHECK_THAT(as_double(r.grad), IsCloseTo(expected, tol));
  }

  SECTION("padding: rows are never read and get zero gradient") {
    // The single-token case above with two padded rows holding NaN and +Inf.
    const T nan = std::numeric_limits<T>::quiet_NaN();
    RowMatrix<T> x(3, 3);
    x << nan, T(1), T(2),
         T(std::log(4.0)), T(std::log(2.0)), T(std::log(2.0)),
         std::numeric_limits<T>::infinity(), T(0), T(0);
    const Eigen::VectorXi mask = (Eigen::VectorXi(3) << 0, 1, 0).finished();
    SwitchOptions o;
    o.mask = moebal::TokenMask(mask);
    o.coefficient = 0.5;
    const auto r = moebal::switch_aux_loss(x, 2, o);
    CHECK(std::abs(double(r.loss) - 0.5 * 9.0 / 8) <= 2 * tol);
    CHECK(r.stats.tokens == 1);
    RowMatrix<double> expected(3, 3);
    expected << 0, 0, 0, 0.5 * 3.0 / 16, 0.5 * 3.0 / 32, -0.5 * 9.0 / 32, 0, 0, 0;
    CHECK_THAT(as_double(r.grad), IsCloseTo(expected, 2 * tol));
    CHECK(r.grad.row(0).isZero(0));
    CHECK(r.grad.row(2).isZero(0));
  }
}

// ---------------------------------------------------------------------------------------------
// Gradients against central differences, for every option and the five kinds of logits.

// Checks the gradient of every option (convention x score x mask x k) at `logits` against
// central differences of the double-precision loss. For float, the analytic gradient is
// computed in float at the same (float-representable) point and the tolerance is float's.
template <class T>
void check_all_options_against_central_differences(const RowMatrix<double>& point, bool tied,
                                                   const char* scenario) {
  const RowMatrix<T> logits = point.cast<T>();
  const RowMatrix<double> x = logits.template cast<double>();
  const Index rows = x.rows();
  Eigen::VectorXi mask = Eigen::VectorXi::Ones(rows);
  for (Index t = 1; t < rows; t += 3) mask[t] = 0;
  moebal::testing::GradcheckOptions tolerance;
  if (is_float<T>()) {
    tolerance.atol = 2e-6;
    tolerance.rtol = 1e-3;
  }
  for (const auto convention : kConventions) {
    for (const auto score : kScores) {
      for (const bool masked : {false, true}) {
        for (const Index k : {Index(1), Index(2), Index(4)}) {
          const Eigen::VectorXi* m = masked ? &mask : nullptr;
          const SwitchOptions o = make_options(convention, score, 0.7, m);
          const auto r = moebal::switch_aux_loss(logits, k, o);
          const RowMatrix<double> analytic = as_double(r.grad);
          INFO(scenario << ": " << describe(o, k));
          moebal::testing::GradcheckReport report;
          if (tied || is_float<T>()) {
            // Float: saturated sigmoids round to exactly 1 and tie in float where they do not
            // in double (selection is on the scores as computed, as in the frameworks), so
            // the float gradient is checked for the float selection's counts.
            auto f = [&](const RowMatrix<double>& z) {
              return loss_with_frozen_f(z, r.stats.f, 0.7, score, m);
            };
            report = moebal::testing::gradcheck(f, x, analytic, tolerance);
          } else {
            auto f = [&](const RowMatrix<double>& z) {
              return double(moebal::switch_aux_loss(z, k, o).loss);
            };
            report = moebal::testing::gradcheck(f, x, analytic, tolerance);
          }
          INFO(report.message());
          CHECK(report.passed);
          if (tied) {
            // The frozen f is the selection the ties define: the lowest k indices.
            CHECK(r.stats.tokens_per_expert.head(k).minCoeff() > 0);
            CHECK(r.stats.tokens_per_expert.tail(x.cols() - k).isZero());
          }
          if (masked) CHECK(r.grad.row(1).isZero(0));
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("switch_aux_loss: gradient matches central differences",
                   "[loss][switch][grad]", float, double) {
  using T = TestType;
  const Index rows = 9, cols = 6;
  SECTION("uniform logits (tied selection: differentiated with the counts frozen)") {
    check_all_options_against_central_differences<T>(RowMatrix<double>::Constant(rows, cols, 0.3),
                                                     true, "uniform");
  }
  SECTION("near ties: top-k margin 1e-3, step 1e-6") {
    check_all_options_against_central_differences<T>(near_tie_logits(rows, cols, 1e-3, 21),
                                                     false, "near ties");
  }
  SECTION("saturated one-hot routing") {
    check_all_options_against_central_differences<T>(random_logits(rows, cols, 12.0, 22), false,
                                                     "saturated");
  }
  SECTION("an expert with no tokens") {
    RowMatrix<double> x = random_logits(rows, cols, 1.0, 23);
    x.col(4).array() -= 8.0;
    for (const Index k : {Index(1), Index(2), Index(4)}) {
      CHECK(moebal::switch_aux_loss(x, k).stats.tokens_per_expert[4] == 0);
    }
    check_all_options_against_central_differences<T>(x, false, "empty expert");
  }
  SECTION("random logits") {
    check_all_options_against_central_differences<T>(random_logits(rows, cols, 1.5, 24), false,
                                                     "random");
  }
}

TEST_CASE("switch_aux_loss: float gradients agree with double", "[loss][switch][grad]") {
  const RowMatrix<double> x = random_logits(64, 8, 2.0, 31);
  const RowMatrix<float> xf = x.cast<float>();
  const RowMatrix<double> xd = xf.cast<double>();  // the same values in both precisions
  Eigen::VectorXi mask = Eigen::VectorXi::Ones(64);
  mask.segment(10, 7).setZero();
  for (const auto convention : kConventions) {
    for (const auto score : kScores) {
      for (const Index k : {Index(1), Index(2), Index(8)}) {
        const SwitchOptions o = make_options(convention, score, 1.0, &mask);
        INFO(describe(o, k));
        const auto d = moebal::switch_aux_loss(xd, k, o);
        const auto f = moebal::switch_aux_loss(xf, k, o);
        CHECK(f.stats.tokens_per_expert == d.stats.tokens_per_expert);
        CHECK(std::abs(double(f.loss) - d.loss) <= 1e-6 * std::abs(d.loss));
        CHECK_THAT(as_double(f.grad), IsCloseTo(d.grad, 1e-7, 1e-4));
      }
    }
  }
}

TEST_CASE("switch_aux_loss: random-direction gradient check on a large case",
          "[loss][switch][grad]") {
  const RowMatrix<double> x = random_logits(2048, 64, 1.0, 41);
  for (const Index k : {Index(2), Index(20)}) {  // k = 20 uses the partial-sort top-k
    for (const auto score : kScores) {
      const SwitchOptions o = make_options(SwitchConvention::megatron, score, 1.0);
      const auto r = moebal::switch_aux_loss(x, k, o);
      auto f = [&](const RowMatrix<double>& z) {
        return double(moebal::switch_aux_loss(z, k, o).loss);
      };
      moebal::testing::GradcheckOptions g;
      g.atol = 1e-9;  // directional derivatives here are of order 1e-3
      g.rtol = 1e-5;
      const auto report = moebal::testing::directional_gradcheck(f, x, r.grad, 6, 5, g);
      INFO(describe(o, k) << ": " << report.message());
      CHECK(report.passed);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Invariants.

TEMPLATE_TEST_CASE("switch_aux_loss: invariants", "[loss][switch]", float, double) {
  using T = TestType;
  const double rel = is_float<T>() ? 2e-6 : 1e-13;
  const RowMatrix<T> x = random_logits(37, 8, 1.5, 51).cast<T>();

  SECTION("Hugging Face value and gradient are k times Megatron's") {
    for (const auto score : kScores) {
      for (const Index k : {Index(1), Index(3), Index(8)}) {
        const auto m = moebal::switch_aux_loss(x, k, make_options(SwitchConvention::megatron,
                                                                   score, 0.01));
        const auto h = moebal::switch_aux_loss(
            x, k, make_options(SwitchConvention::huggingface, score, 0.01));
        INFO("k = " << k << ", " << moebal::to_string(score));
        CHECK(std::abs(double(h.loss) - double(k) * double(m.loss)) <=
              rel * double(k) * std::abs(double(m.loss)));
        const RowMatrix<double> scaled = double(k) * as_double(m.grad);
        CHECK_THAT(as_double(h.grad), IsCloseTo(scaled, rel * 1e-2, rel * 10));
        CHECK(h.stats.f.sum() == Approx(double(k)).epsilon(1e-12));
        CHECK(m.stats.f.sum() == Approx(1.0).epsilon(1e-12));
        CHECK(h.stats.balanced_value == Approx(0.01 * double(k)));
        CHECK(m.stats.balanced_value == Approx(0.01));
      }
    }
  }

  SECTION("adding padded rows changes nothing") {
    RowMatrix<T> padded(x.rows() + 5, x.cols());
    Eigen::VectorXi mask(padded.rows());
    // Interleave: padded rows 0, 8, 16, 24, 32 hold garbage.
    Index src = 0;
    for (Index t = 0; t < padded.rows(); ++t) {
      if (t % 8 == 0 && t / 8 < 5) {
        padded.row(t).setConstant(T(1000));
        mask[t] = 0;
      } else {
        padded.row(t) = x.row(src++);
        mask[t] = 1;
      }
    }
    for (const auto convention : kConventions) {
      for (const auto score : kScores) {
        const auto plain = moebal::switch_aux_loss(x, 2, make_options(convention, score, 1.0));
        const auto masked =
            moebal::switch_aux_loss(padded, 2, make_options(convention, score, 1.0, &mask));
        CHECK(masked.loss == plain.loss);  // fewer than 512 rows: one chunk, same order
        CHECK(masked.stats.tokens_per_expert == plain.stats.tokens_per_expert);
        src = 0;
        for (Index t = 0; t < padded.rows(); ++t) {
          if (mask[t] == 0) {
            CHECK(masked.grad.row(t).isZero(0));
          } else {
            CHECK(masked.grad.row(t) == plain.grad.row(src++));
          }
        }
      }
    }
  }

  SECTION("permuting tokens permutes the gradient rows") {
    std::vector<Index> perm(static_cast<std::size_t>(x.rows()));
    std::iota(perm.begin(), perm.end(), Index(0));
    std::shuffle(perm.begin(), perm.end(), std::mt19937(3));
    RowMatrix<T> shuffled(x.rows(), x.cols());
    for (Index t = 0; t < x.rows(); ++t) shuffled.row(t) = x.row(perm[std::size_t(t)]);
    for (const auto convention : kConventions) {
      for (const auto score : kScores) {
        const auto a = moebal::switch_aux_loss(x, 2, make_options(convention, score, 1.0));
        const auto b = moebal::switch_aux_loss(shuffled, 2, make_options(convention, score, 1.0));
        CHECK(std::abs(double(a.loss) - double(b.loss)) <= rel * std::abs(double(a.loss)));
        RowMatrix<double> expected(x.rows(), x.cols());
        for (Index t = 0; t < x.rows(); ++t) expected.row(t) = as_double(a.grad).row(perm[std::size_t(t)]);
        CHECK_THAT(as_double(b.grad), IsCloseTo(expected, rel * 1e-2, rel * 10));
      }
    }
  }

  SECTION("uniform probabilities with balanced counts give exactly the balanced value") {
    // T = N = 8 tokens, k = 2: token t prefers experts t and t+1 (mod 8) by the same margin,
    // so every expert is chosen by exactly 2 tokens and each P_i averages the same 8 numbers.
    // Uniform logits give P_i = 1/8 exactly; megatron L = N sum (2/16)(1/8) = 1.
    const Index n = 8;
    const RowMatrix<T> uniform = RowMatrix<T>::Zero(n, n);
    const auto u = moebal::switch_aux_loss(uniform, 2, make_options(SwitchConvention::megatron,
                                                                     ScoreFunction::softmax, 0.25));
    CHECK(u.loss == T(0.25));  // P_i = 1/8 and f sums to 1: exact in binary
    CHECK(u.stats.P.isApprox(Eigen::VectorXd::Constant(n, 0.125), 0));
    RowMatrix<T> rolled = RowMatrix<T>::Zero(n, n);
    for (Index t = 0; t < n; ++t) {
      rolled(t, t) = T(1);
      rolled(t, (t + 1) % n) = T(0.5);
    }
    for (const auto convention : kConventions) {
      for (const auto score : kScores) {
        const auto r = moebal::switch_aux_loss(rolled, 2, make_options(convention, score, 1.0));
        CHECK(double(r.loss) == Approx(r.stats.balanced_value).epsilon(is_float<T>() ? 1e-6 : 1e-15));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The allocation-free form.

TEMPLATE_TEST_CASE("SwitchAuxLoss: forward/backward forms agree", "[loss][switch][api]", float,
                   double) {
  using T = TestType;
  const RowMatrix<T> x = random_logits(700, 16, 1.0, 61).cast<T>();  // two chunks
  Eigen::VectorXi mask = Eigen::VectorXi::Ones(700);
  mask.segment(100, 50).setZero();
  for (const auto convention : kConventions) {
    for (const auto score : kScores) {
      SwitchOptions o = make_options(convention, score, 0.1);
      moebal::SwitchAuxLoss<T> loss(16, 4, o);
      const T value = loss.forward(x, moebal::TokenMask(mask));
      const Eigen::VectorXd sums = loss.statistics().score_sums();
      const Eigen::VectorXd counts = loss.statistics().counts();
      RowMatrix<T> g1(700, 16), g2(700, 16);
      g1.setConstant(T(42));  // backward must overwrite every element
      loss.backward(x, g1, T(3));
      const T fused = loss.forward_backward(x, g2, moebal::TokenMask(mask), T(3));
      INFO(describe(o, 4));
      CHECK(value == fused);
      // forward_backward sums the scores in its second pass, in phase 1's order: the same bits.
      CHECK(loss.statistics().score_sums() == sums);
      CHECK(loss.statistics().counts() == counts);
      CHECK(g1 == g2);  // bitwise: both passes rebuild each row's scores the same way
      CHECK(g1.row(120).isZero(0));

      o.mask = moebal::TokenMask(mask);
      const auto r = moebal::switch_aux_loss(x, 4, o);
      CHECK(r.loss == value);
      const RowMatrix<T> tripled = r.grad * T(3);
      CHECK_THAT(as_double(g1), IsCloseTo(tripled, 1e-12, is_float<T>() ? 1e-6 : 1e-14));

      RowMatrix<T> acc = RowMatrix<T>::Constant(700, 16, T(1));
      loss.backward_accumulate(x, acc, T(-2));
      const RowMatrix<T> expected = RowMatrix<T>::Constant(700, 16, T(1)) + T(-2) * r.grad;
      CHECK_THAT(as_double(acc), IsCloseTo(expected, 1e-7));
      CHECK(acc.row(120).isConstant(T(1), 0));  // padded rows are left as they were

      const auto& s = loss.statistics();
      CHECK(s.tokens() == 650.0);
      CHECK(s.counts().sum() == 650.0 * 4);
      CHECK(s.first_choice_counts().sum() == 650.0);
      CHECK(s.score_sums().sum() == Approx(650.0).epsilon(1e-6));
    }
  }
}

TEST_CASE("SwitchAuxLoss: reuse across batch sizes", "[loss][switch][api]") {
  moebal::SwitchAuxLoss<double> loss(8, 2);
  for (const Index rows : {Index(300), Index(5), Index(1100), Index(17)}) {
    const RowMatrix<double> x = random_logits(rows, 8, 1.0, unsigned(rows));
    RowMatrix<double> g(rows, 8);
    const double value = loss.forward_backward(x, g);
    const auto r = moebal::switch_aux_loss(x, 2);
    CHECK(value == r.loss);
    CHECK(g == r.grad);
    CHECK(loss.stats().tokens_per_expert == r.stats.tokens_per_expert);
  }
}

TEMPLATE_TEST_CASE("switch_aux_loss: counts match a stable sort of the scores, ties included",
                   "[loss][switch]", float, double) {
  using T = TestType;
  const Index rows = 300, cols = 20;
  RowMatrix<T> x = random_logits(rows, cols, 1.0, 95).cast<T>();
  std::mt19937 engine(96);
  std::uniform_int_distribution<int> level(0, 3);
  for (Index t = 0; t < rows; t += 3) {  // every third row: few distinct values, many ties
    for (Index j = 0; j < cols; ++j) x(t, j) = T(level(engine));
  }
  for (const auto score : kScores) {
    const RowMatrix<T> q = moebal::scores(x, score);
    for (Index k = 1; k <= cols; ++k) {
      moebal::CountVector counts = moebal::CountVector::Zero(cols);
      moebal::CountVector first = moebal::CountVector::Zero(cols);
      for (Index t = 0; t < rows; ++t) {
        std::vector<Index> order(static_cast<std::size_t>(cols));
        std::iota(order.begin(), order.end(), Index(0));
        std::stable_sort(order.begin(), order.end(),
                         [&](Index a, Index b) { return q(t, a) > q(t, b); });
        for (Index s = 0; s < k; ++s) counts[order[std::size_t(s)]] += 1;
        first[order[0]] += 1;
      }
      SwitchOptions o;
      o.score = score;
      const auto r = moebal::switch_aux_loss(x, k, o);
      INFO(moebal::to_string(score) << ", k = " << k);
      CHECK(r.stats.tokens_per_expert == counts);
      CHECK(r.stats.first_choice_tokens == first);
    }
  }
}

TEMPLATE_TEST_CASE("switch_aux_loss: rows of whole blocks, taken in pairs: counts, P, errors",
                   "[loss][switch]", float, double) {
  // Rows whose length is a whole number of exp blocks (N = 24, 64) run the fused kernel on
  // pairs of real rows. Against a stable sort of moebal::scores per real row (counts) and
  // the scores' column sums in double (P), with an odd number of real rows, padding between
  // them (so pairs straddle padded rows) and every third row tied; then the error for a bad
  // row names that row whichever position of its pair it takes.
  using T = TestType;
  constexpr T inf = std::numeric_limits<T>::infinity();
  for (const Index cols : {Index(24), Index(64)}) {
    // Chunks of 512 rows: two full ones (399 and 400 real rows) and a short third (4).
    const Index rows = 1030;
    RowMatrix<T> x = random_logits(rows, cols, 1.5, 97).cast<T>();
    std::mt19937 engine(98);
    std::uniform_int_distribution<int> level(0, 3);
    Eigen::VectorXi mask = Eigen::VectorXi::Ones(rows);
    for (Index t = 0; t < rows; ++t) {
      if (t % 3 == 0) {
        for (Index j = 0; j < cols; ++j) x(t, j) = T(level(engine));
      }
      if (t % 7 == 2 || t % 11 == 5) {
        mask[t] = 0;
        x.row(t).setConstant(std::numeric_limits<T>::quiet_NaN());  // never read
      }
    }
    RowMatrix<T> x_real = x;  // the reference's scores: padded rows replaced by zeros
    for (Index t = 0; t < rows; ++t) {
      if (mask[t] == 0) x_real.row(t).setZero();
    }
    for (const auto score : kScores) {
      const RowMatrix<T> q = moebal::scores(x_real, score);
      for (const Index k : {Index(1), Index(2), Index(3), Index(8)}) {
        moebal::CountVector counts = moebal::CountVector::Zero(cols);
        moebal::CountVector first = moebal::CountVector::Zero(cols);
        Eigen::VectorXd sums = Eigen::VectorXd::Zero(cols);
        Index real = 0;
        for (Index t = 0; t < rows; ++t) {
          if (mask[t] == 0) continue;
          ++real;
          std::vector<Index> order(static_cast<std::size_t>(cols));
          std::iota(order.begin(), order.end(), Index(0));
          std::stable_sort(order.begin(), order.end(),
                           [&](Index a, Index b) { return q(t, a) > q(t, b); });
          for (Index s = 0; s < k; ++s) counts[order[std::size_t(s)]] += 1;
          first[order[0]] += 1;
          for (Index j = 0; j < cols; ++j) sums[j] += double(q(t, j));
        }
        REQUIRE(real == 803);
        SwitchOptions o;
        o.score = score;
        moebal::SwitchAuxLoss<T> loss(cols, k, o);
        RowMatrix<T> grad(rows, cols);
        INFO("N = " << cols << ", " << moebal::to_string(score) << ", k = " << k);
        for (int form = 0; form < 2; ++form) {  // forward alone; forward_backward
          const moebal::TokenMask m(mask);
          if (form == 0) {
            loss.forward(x, m);
          } else {
            loss.forward_backward(x, grad, m);
          }
          const moebal::SwitchStats st = loss.stats();
          CHECK(st.tokens == real);
          CHECK(st.tokens_per_expert == counts);
          CHECK(st.first_choice_tokens == first);
          CHECK_THAT(as_double(st.P), IsCloseTo(sums / double(real), 1e-12));
        }
      }
    }
    // A collapsed batch: every token's first choice is expert 3 and its second expert 5, so
    // a full chunk counts 512 for both (the chunk's packed counts hold up to 65535 each).
    {
      RowMatrix<T> c = x_real;
      c.col(3).setConstant(T(10));
      c.col(5).setConstant(T(9));
      moebal::SwitchAuxLoss<T> loss(cols, 2);
      loss.forward(c);
      const moebal::SwitchStats st = loss.stats();
      moebal::CountVector expected = moebal::CountVector::Zero(cols);
      expected[3] = expected[5] = rows;
      CHECK(st.tokens_per_expert == expected);
      expected[5] = 0;
      CHECK(st.first_choice_tokens == expected);
    }
    // A bad row in the first or the second place of a pair (rows 0 and 1 are real and form
    // the first pair; so do 3 and 4).
    REQUIRE((mask[0] == 1 && mask[1] == 1 && mask[3] == 1 && mask[4] == 1 && mask[2] == 0));
    for (const Index bad : {Index(0), Index(1), Index(3), Index(4)}) {
      RowMatrix<T> y = x;
      y(bad, 5) = inf;
      moebal::SwitchAuxLoss<T> loss(cols, 2);
      CHECK_THROWS_WITH(loss.forward(y, moebal::TokenMask(mask)),
                        Catch::Contains("got inf at row " + std::to_string(bad) + ", column 5"));
    }
    // backward recomputes the scores in pairs too: a bad row given to backward is named.
    for (const Index bad : {Index(3), Index(4)}) {
      moebal::SwitchAuxLoss<T> loss(cols, 2);
      loss.forward(x, moebal::TokenMask(mask));
      RowMatrix<T> y = x, grad(rows, cols);
      y(bad, 7) = std::numeric_limits<T>::quiet_NaN();
      CHECK_THROWS_WITH(loss.backward(y, grad),
                        Catch::Contains("got nan at row " + std::to_string(bad) + ", column 7"));
    }
    // Two bad rows in one pair: the lower row is named.
    RowMatrix<T> y = x;
    y(3, 1) = -inf;
    y.row(4).setConstant(-inf);
    y(3, 0) = std::numeric_limits<T>::quiet_NaN();
    moebal::SwitchAuxLoss<T> loss(cols, 2);
    CHECK_THROWS_WITH(loss.forward(y, moebal::TokenMask(mask)),
                      Catch::Contains("got nan at row 3, column 0"));
  }
}

TEMPLATE_TEST_CASE("SwitchAuxLoss::forward_backward: selection on the logits, near ties",
                   "[loss][switch]", float, double) {
  // forward_backward counts on the logits and falls back to the scores' exact top-k where
  // the logits do not decide (detail::count_logits_row). Rows built to sit on either side of
  // its margins: the k-th and (k+1)-th logits, or the first and second, a few ulps apart, at
  // the gap (2^-15 in float, 2^-38 in double) and around it, far apart, exactly tied; the
  // k-th shifted logit near -62 (float) / -600 (double) or where the scores flush to 0; -Inf
  // logits; sigmoids that saturate. Against a stable sort of moebal::scores per row and
  // against forward(), whose selection is made on the scores (counts and sums bitwise).
  using T = TestType;
  constexpr T inf = std::numeric_limits<T>::infinity();
  const T gap = T(is_float<T>() ? 0x1p-15 : 0x1p-38);
  const T floor = T(is_float<T>() ? -62.0 : -600.0);
  const T offsets[] = {T(0), gap / 4, gap / 2, gap * T(0.99), gap, gap * T(1.01), gap * 2,
                       T(1e-3), T(1)};
  const T depths[] = {T(0), T(-1), floor + T(0.5), floor - T(0.5), T(-80), T(-90), T(-200),
                      T(-800)};
  for (const Index cols : {Index(16), Index(64)}) {
    for (const Index k : {Index(1), Index(2), Index(3), Index(4), Index(8), Index(16)}) {
      if (k > cols) continue;
      const Index rows = 400;
      RowMatrix<T> x = random_logits(rows, cols, 1.0, unsigned(11 * cols + k)).cast<T>();
      std::mt19937 engine(unsigned(cols + 7 * k));
      for (Index t = 0; t < rows; ++t) {
        std::vector<Index> order(static_cast<std::size_t>(cols));
        std::iota(order.begin(), order.end(), Index(0));
        std::shuffle(order.begin(), order.end(), engine);
        const auto at = [&](Index rank) -> T& { return x(t, order[std::size_t(rank)]); };
        const T base = T(std::uniform_real_distribution<double>(-3.0, 3.0)(engine));
        // Ranks: 0 the top, then k - 1 values below it, the boundary, and the rest below.
        const T depth = depths[std::size_t(t / 9) % std::size(depths)];
        const T offset = offsets[std::size_t(t) % std::size(offsets)];
        at(0) = base;
        const int kind = int(t / 72) % 4;
        for (Index r = 1; r < cols; ++r) at(r) = base + depth - T(2) - T(r);
        if (k > 1) {
          for (Index r = 1; r < k; ++r) at(r) = base + depth * T(r) / T(k);  // tau at rank k-1
        }
        const T tau = k > 1 ? at(k - 1) : base;
        if (kind == 0 && k < cols) {
          at(k) = tau - offset;  // the boundary
        } else if (kind == 1 && cols > 1) {
          at(1) = base - offset;  // the first choice
        } else if (kind == 2) {
          // ulps apart at the boundary (nextafter steps), -Inf below it
          T v = tau;
          for (Index step = 0; step < t % 4; ++step) v = std::nextafter(v, -inf);
          if (k < cols) at(k) = v;
          for (Index r = k + 1; r < cols; r += 2) at(r) = -inf;
        } else if (k < cols) {
          at(k) = tau - offset;
          if (cols > 1 && k > 1) at(1) = base - offset;
        }
      }
      for (const auto score : kScores) {
        RowMatrix<T> xs = x;
        if (score == ScoreFunction::sigmoid) xs.array() += T(16);  // some saturate in float
        const RowMatrix<T> q = moebal::scores(xs, score);
        moebal::CountVector counts = moebal::CountVector::Zero(cols);
        moebal::CountVector first = moebal::CountVector::Zero(cols);
        for (Index t = 0; t < rows; ++t) {
          std::vector<Index> order(static_cast<std::size_t>(cols));
          std::iota(order.begin(), order.end(), Index(0));
          std::stable_sort(order.begin(), order.end(),
                           [&](Index a, Index b) { return q(t, a) > q(t, b); });
          for (Index s = 0; s < k; ++s) counts[order[std::size_t(s)]] += 1;
          first[order[0]] += 1;
        }
        SwitchOptions o;
        o.score = score;
        INFO("N = " << cols << ", k = " << k << ", " << moebal::to_string(score));
        moebal::SwitchAuxLoss<T> loss(cols, k, o);
        const T value = loss.forward(xs);
        const Eigen::VectorXd sums = loss.statistics().score_sums();
        RowMatrix<T> g1(rows, cols), g2(rows, cols);
        loss.backward(xs, g1);
        CHECK(loss.stats().tokens_per_expert == counts);
        CHECK(loss.stats().first_choice_tokens == first);
        const T fused = loss.forward_backward(xs, g2);
        CHECK(loss.stats().tokens_per_expert == counts);
        CHECK(loss.stats().first_choice_tokens == first);
        CHECK(loss.statistics().score_sums() == sums);
        CHECK(fused == value);
        CHECK(g1 == g2);
      }
    }
  }
}

TEST_CASE("switch_aux_loss: selection is on the scores as computed", "[loss][switch]") {
  // sigmoid(17) and sigmoid(20) both round to 1.0f in float: the scores tie and expert 0 wins.
  // In double they differ and expert 1 is selected.
  SwitchOptions o;
  o.score = ScoreFunction::sigmoid;
  RowMatrix<float> xf(1, 3);
  xf << 17.0f, 20.0f, 0.0f;
  CHECK(moebal::switch_aux_loss(xf, 1, o).stats.tokens_per_expert[0] == 1);
  const RowMatrix<double> xd = xf.cast<double>();
  CHECK(moebal::switch_aux_loss(xd, 1, o).stats.tokens_per_expert[1] == 1);
}

TEST_CASE("switch_aux_loss: stats carry the balance metrics of the counts", "[loss][switch]") {
  // Uniform logits, k = 1: every token picks expert 0: counts (T, 0, 0, 0), MaxVio = N - 1 = 3,
  // three empty experts, normalized entropy 0.
  const auto r = moebal::switch_aux_loss(RowMatrix<double>::Zero(10, 4), 1);
  CHECK(r.stats.balance.max_vio == Approx(3.0));
  CHECK(r.stats.balance.empty_experts == 3);
  CHECK(r.stats.balance.normalized_entropy == Approx(0.0).margin(1e-15));
  CHECK(r.stats.balance.max_share == Approx(1.0));
}

TEST_CASE("switch_aux_loss: a batch with no real token", "[loss][switch]") {
  const RowMatrix<double> x = random_logits(4, 3, 1.0, 71);
  const Eigen::VectorXi none = Eigen::VectorXi::Zero(4);
  for (const auto convention : kConventions) {
    const auto r = moebal::switch_aux_loss(x, 2, make_options(convention, ScoreFunction::softmax,
                                                              1.0, &none));
    CHECK(r.loss == 0.0);
    CHECK(r.grad.isZero(0));
    CHECK(r.stats.tokens == 0);
    CHECK(r.stats.f.isZero(0));
    CHECK(r.stats.P.isZero(0));
    CHECK(r.stats.tokens_per_expert.isZero());
  }
}

// ---------------------------------------------------------------------------------------------
// Input layouts: every form gives the same numbers; row-major memory is read in place.

TEST_CASE("switch_aux_loss: input layouts", "[loss][switch][api]") {
  const RowMatrix<double> x = random_logits(50, 8, 1.0, 81);
  const auto reference = moebal::switch_aux_loss(x, 2);

  SECTION("column-major") {
    const Eigen::MatrixXd col = x;
    const auto r = moebal::switch_aux_loss(col, 2);
    CHECK(r.loss == reference.loss);
    CHECK(r.grad == reference.grad);
  }
  SECTION("a Map over a raw row-major buffer is viewed, not copied") {
    std::vector<double> buffer(x.data(), x.data() + x.size());
    const Eigen::Map<const RowMatrix<double>> map(buffer.data(), 50, 8);
    const moebal::detail::RowInput<double> view(map);
    CHECK(view.data() == buffer.data());
    const auto r = moebal::switch_aux_loss(map, 2);
    CHECK(r.loss == reference.loss);
    CHECK(r.grad == reference.grad);
  }
  SECTION("a row-major block (strided rows) is viewed, not copied") {
    RowMatrix<double> wide = RowMatrix<double>::Constant(60, 12, 7.0);
    wide.block(5, 2, 50, 8) = x;
    const auto block = wide.block(5, 2, 50, 8);
    const moebal::detail::RowInput<double> view(block);
    CHECK(view.data() == &wide(5, 2));
    const auto r = moebal::switch_aux_loss(block, 2);
    CHECK(r.loss == reference.loss);
    CHECK(r.grad == reference.grad);
  }
  SECTION("a column-major block and an expression") {
    const Eigen::MatrixXd big = Eigen::MatrixXd::Constant(70, 9, -3.0);
    Eigen::MatrixXd holder = big;
    holder.block(10, 1, 50, 8) = x;
    const auto r = moebal::switch_aux_loss(holder.block(10, 1, 50, 8), 2);
    CHECK(r.grad == reference.grad);
    const auto e = moebal::switch_aux_loss(x * 1.0, 2);
    CHECK(e.grad == reference.grad);
  }
  SECTION("the gradient goes into a caller's Map over raw memory") {
    std::vector<double> out(50 * 8, -1.0);
    Eigen::Map<RowMatrix<double>> grad(out.data(), 50, 8);
    moebal::SwitchAuxLoss<double> loss(8, 2);
    loss.forward_backward(x, grad);
    CHECK(grad == reference.grad);
  }
}

// ---------------------------------------------------------------------------------------------
// Bad input: each case throws moebal::invalid_argument naming the argument, what was expected
// and what was given.

TEST_CASE("switch_aux_loss: bad input", "[loss][switch][errors]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  RowMatrix<double> x = random_logits(4, 3, 1.0, 91);
  const char* k_msg_prefix = "moebal::switch_aux_loss: argument 'k': expected 1 <= k <= N, the "
                             "number of experts (N = 3), got k = ";
  CHECK_THROWS_WITH(moebal::switch_aux_loss(x, 0), std::string(k_msg_prefix) + "0");
  CHECK_THROWS_WITH(moebal::switch_aux_loss(x, 4), std::string(k_msg_prefix) + "4");
  CHECK_THROWS_WITH(moebal::switch_aux_loss(x, -1), std::string(k_msg_prefix) + "-1");
  CHECK_THROWS_WITH(moebal::switch_aux_loss(RowMatrix<double>(0, 3), 1),
                    "moebal::switch_aux_loss: argument 'logits': expected at least one token row "
                    "(T >= 1), got an empty batch, shape 0 x 3");
  CHECK_THROWS_WITH(moebal::switch_aux_loss(RowMatrix<float>(5, 0), 1),
                    "moebal::switch_aux_loss: argument 'logits': expected at least one expert "
                    "column (N >= 1), got shape 5 x 0");
  {
    RowMatrix<double> y = x;
    y(2, 1) = nan;
    CHECK_THROWS_WITH(moebal::switch_aux_loss(y, 1),
                      "moebal::switch_aux_loss: argument 'logits': expected finite values or "
                      "-Inf (no NaN, no +Inf), got nan at row 2, column 1");
    y(2, 1) = inf;
    SwitchOptions o;
    o.score = ScoreFunction::sigmoid;
    CHECK_THROWS_WITH(moebal::switch_aux_loss(y, 1, o),
                      "moebal::switch_aux_loss: argument 'logits': expected finite values or "
                      "-Inf (no NaN, no +Inf), got inf at row 2, column 1");
    y.row(2).setConstant(-inf);
    CHECK_THROWS_WITH(moebal::switch_aux_loss(y, 1),
                      "moebal::switch_aux_loss: argument 'logits': expected at least one logit "
                      "above -Inf in every real token's row (softmax of an all -Inf row is "
                      "undefined), got every logit -Inf in row 2");
    y(2, 0) = 0.0;  // a single finite logit is enough
    CHECK_NOTHROW(moebal::switch_aux_loss(y, 1));
  }
  {
    const Eigen::VectorXi short_mask = Eigen::VectorXi::Ones(3);
    SwitchOptions o;
    o.mask = moebal::TokenMask(short_mask);
    CHECK_THROWS_WITH(moebal::switch_aux_loss(x, 1, o),
                      "moebal::switch_aux_loss: argument 'mask': expected one element per token "
                      "(length T = 4, logits.rows()), got length 3");
    const Eigen::VectorXd nan_mask = (Eigen::VectorXd(4) << 1, nan, 1, 0).finished();
    o.mask = moebal::TokenMask(nan_mask);
    CHECK_THROWS_WITH(moebal::switch_aux_loss(x, 1, o),
                      "moebal::switch_aux_loss: argument 'mask': expected 0 (padding) or nonzero "
                      "(real token) in every element, got NaN at element 1");
  }
  {
    SwitchOptions o;
    o.coefficient = nan;
    CHECK_THROWS_WITH(moebal::switch_aux_loss(x, 1, o),
                      "moebal::switch_aux_loss: argument 'options.coefficient': expected a finite "
                      "number, got nan");
  }
}

TEST_CASE("SwitchAuxLoss: bad input", "[loss][switch][errors]") {
  const RowMatrix<double> x = random_logits(4, 3, 1.0, 92);
  CHECK_THROWS_WITH(moebal::SwitchAuxLoss<double>(0, 1),
                    "moebal::SwitchAuxLoss: argument 'num_experts': expected at least 1 expert, "
                    "got 0");
  CHECK_THROWS_WITH(moebal::SwitchAuxLoss<double>(3, 4),
                    "moebal::SwitchAuxLoss: argument 'k': expected 1 <= k <= N, the number of "
                    "experts (N = 3), got k = 4");
  {
    const Eigen::VectorXi mask = Eigen::VectorXi::Ones(4);
    SwitchOptions o;
    o.mask = moebal::TokenMask(mask);
    CHECK_THROWS_WITH(moebal::SwitchAuxLoss<double>(3, 1, o),
                      "moebal::SwitchAuxLoss: argument 'options.mask': expected an empty mask "
                      "(SwitchAuxLoss takes the mask in forward), got a mask of length 4");
  }
  {
    SwitchOptions o;
    o.convention = static_cast<SwitchConvention>(7);
    CHECK_THROWS_WITH(moebal::SwitchAuxLoss<double>(3, 1, o),
                      "moebal::SwitchAuxLoss: argument 'options.convention': expected megatron, "
                      "huggingface or first_choice, got 7");
    o = SwitchOptions{};
    o.score = static_cast<ScoreFunction>(5);
    CHECK_THROWS_WITH(moebal::switch_aux_loss(x, 1, o),
                      "moebal::switch_aux_loss: argument 'options.score': expected softmax or "
                      "sigmoid, got 5");
  }
  moebal::SwitchAuxLoss<double> loss(3, 2);
  RowMatrix<double> g(4, 3);
  CHECK_THROWS_WITH(loss.backward(x, g),
                    "moebal::SwitchAuxLoss::backward: argument 'logits': expected the logits of "
                    "a completed forward, got a call before any forward completed");
  CHECK_THROWS_WITH(loss.forward(RowMatrix<double>::Zero(4, 5)),
                    "moebal::SwitchAuxLoss::forward: argument 'logits': expected N = 3 expert "
                    "columns (as constructed), got shape 4 x 5");
  loss.forward(x);
  RowMatrix<double> wrong(4, 2);
  CHECK_THROWS_WITH(loss.backward(x, wrong),
                    "moebal::SwitchAuxLoss::backward: argument 'dloss_dlogits': expected the "
                    "logits' shape 4 x 3, got shape 4 x 2");
  CHECK_THROWS_WITH(loss.backward(RowMatrix<double>::Zero(5, 3), g),
                    "moebal::SwitchAuxLoss::backward: argument 'logits': expected the T = 4 rows "
                    "given to forward, got shape 5 x 3");
  RowMatrix<double> wrong_rows(5, 3);
  CHECK_THROWS_WITH(loss.forward_backward(x, wrong_rows),
                    "moebal::SwitchAuxLoss::forward_backward: argument 'dloss_dlogits': expected "
                    "the logits' shape 4 x 3, got shape 5 x 3");
  CHECK_THROWS_WITH(loss.backward(x, g, std::numeric_limits<double>::infinity()),
                    "moebal::SwitchAuxLoss::backward: argument 'scale': expected a finite number, "
                    "got inf");
  // A forward that threw leaves no forward to differentiate.
  RowMatrix<double> bad = x;
  bad(0, 0) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_AS(loss.forward(bad), moebal::invalid_argument);
  CHECK_THROWS_AS(loss.backward(x, g), moebal::invalid_argument);
}
