// SPDX-License-Identifier: Apache-2.0
// Numeric extremes: no NaN or Inf in any output for logits of +/-1e4, -Inf entries (disabled
// experts, down to rows where only k experts are finite), all-equal logits (ties to the lower
// index), T = 1, N = 1, k = N and 2^22 tokens; float results within 1e-5 (relative to the
// largest magnitude) of double on the same inputs.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "moebal/moebal.hpp"
#include "support/random.hpp"

using moebal::Index;
using moebal::RowMatrix;
using moebal_test::random_logits;

namespace {

const double kInf = std::numeric_limits<double>::infinity();

template <class M>
bool all_finite(const M& m) {
  return m.template cast<double>().array().isFinite().all();
}

// |a - b| <= tol * scale elementwise, scale = max(max|b|, floor): relative to the largest
// element; `floor` keeps a gradient that is zero in exact arithmetic (k = N, for instance)
// from being compared with pure rounding noise.
bool close_relative(const RowMatrix<double>& a, const RowMatrix<double>& b, double tol,
                    double floor) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  const double scale = std::max({1e-30, floor, b.cwiseAbs().maxCoeff()});
  return ((a - b).cwiseAbs().array() <= tol * scale).all();
}

bool close_value(double a, double b, double tol) {
  return std::abs(a - b) <= tol * std::max(std::abs(b), 1e-30);
}

// A loss evaluated in one precision: value and gradient, both as double.
struct Evaluated {
  double value;
  RowMatrix<double> grad;
};

// Every loss of the library on the same logits, in float and in double.
std::vector<std::pair<std::string, std::function<Evaluated(const RowMatrix<double>&, bool)>>>
losses(Index k) {
  std::vector<std::pair<std::string, std::function<Evaluated(const RowMatrix<double>&, bool)>>>
      out;
  auto add = [&](std::string name, auto f) {
    out.emplace_back(std::move(name), [f](const RowMatrix<double>& x, bool single) {
      if (single) {
        const RowMatrix<float> xf = x.cast<float>();
        const auto r = f(xf);
        return Evaluated{double(r.loss), r.grad.template cast<double>()};
      }
      const auto r = f(x);
      return Evaluated{double(r.loss), r.grad};
    });
  };
  for (const auto convention : {moebal::SwitchConvention::megatron,
                                moebal::SwitchConvention::huggingface,
                                moebal::SwitchConvention::first_choice}) {
    for (const auto score : {moebal::ScoreFunction::softmax, moebal::ScoreFunction::sigmoid}) {
      moebal::SwitchOptions o;
      o.convention = convention;
      o.score = score;
      add(std::string("switch ") + moebal::to_string(convention) + " " + moebal::to_string(score),
          [o, k](const auto& x) { return moebal::switch_aux_loss(x, k, o); });
    }
  }
  add("z", [](const auto& x) { return moebal::z_loss(x); });
  add("cv2 dense", [k](const auto& x) { return moebal::cv2_importance_loss(x, k); });
  moebal::Cv2Options topk;
  topk.gates = moebal::ImportanceGates::topk;
  add("cv2 top-k", [k, topk](const auto& x) { return moebal::cv2_importance_loss(x, k, topk); });
  add("combined", [k](const auto& x) {
    moebal::CombinedOptions o;
    o.weights.z = 0.001;
    o.weights.cv2_importance = 0.1;
    return moebal::combined_aux_loss(x, k, o);
  });
  return out;
}

void check_all(const RowMatrix<double>& x, Index k, double tol = 1e-5) {
  for (const auto& [name, f] : losses(k)) {
    INFO("loss: " << name);
    const Evaluated d = f(x, false);
    const Evaluated s = f(x, true);
    CHECK(std::isfinite(d.value));
    CHECK(std::isfinite(s.value));
    CHECK(all_finite(d.grad));
    CHECK(all_finite(s.grad));
    CHECK(close_value(s.value, d.value, tol));
    // Floor: one token's share of the value (the natural size of a gradient row of these
    // losses), at most 1.
    const double floor = std::min(1.0, std::abs(d.value) / double(x.rows()));
    INFO("max |float - double| = " << (s.grad - d.grad).cwiseAbs().maxCoeff()
                                   << ", max |double| = " << d.grad.cwiseAbs().maxCoeff()
                                   << ", floor = " << floor);
    CHECK(close_relative(s.grad, d.grad, tol, floor));
  }
}

}  // namespace

TEST_CASE("extremes: logits of +/-1e4", "[extremes]") {
  RowMatrix<double> x = random_logits(16, 8, 1.0, 3);
  for (Index t = 0; t < x.rows(); ++t) x(t, t % 8) = (t % 2 == 0) ? 1e4 : -1e4;
  x.row(5).setConstant(-1e4);
  x(5, 2) = -1e4 + 1.0;
  x.row(6).setConstant(1e4);
  x(6, 7) = 1e4 - 0.5;
  check_all(x, 2);
  // The z-loss is (lse)^2 ~ 1e8: still finite, and exact to float precision.
  const auto z = moebal::z_loss(x);
  CHECK(z.loss > 1e6);
}

TEST_CASE("extremes: -Inf logits, down to rows with exactly k finite experts", "[extremes]") {
  RowMatrix<double> x = random_logits(12, 6, 1.0, 4);
  x(0, 3) = -kInf;
  x.row(1) << -kInf, 0.5, -kInf, -kInf, 0.25, -kInf;  // k = 2 finite experts
  x.row(2) << -kInf, -kInf, -kInf, -kInf, -kInf, 1.0;  // one finite expert (k = 2 > 1)
  check_all(x, 2);
  const auto r = moebal::switch_aux_loss(x, 2);
  // The row with exactly two finite experts routes to them; -Inf entries get zero gradient.
  const moebal::IndexMatrix top = moebal::topk_indices(moebal::softmax(x), 2);
  CHECK(((top(1, 0) == 1 && top(1, 1) == 4) || (top(1, 0) == 4 && top(1, 1) == 1)));
  for (Index j : {0, 2, 3, 5}) CHECK(r.grad(1, j) == 0.0);
  CHECK(r.grad(0, 3) == 0.0);
  // The router gives a disabled expert weight 0 when it has to pick it (row 2, k = 2).
  const auto routed = moebal::route(x, 2);
  CHECK(all_finite(routed.weights));
  CHECK(routed.indices(2, 0) == 5);
  CHECK(routed.weights(2, 1) == 0.0);
}

TEST_CASE("extremes: all-equal logits resolve ties to the lower expert index", "[extremes]") {
  const Index T = 10, N = 8, k = 3;
  const RowMatrix<double> x = RowMatrix<double>::Constant(T, N, 0.7);
  check_all(x, k);
  const auto r = moebal::switch_aux_loss(x, k);
  // Every token picks experts 0, 1, 2: counts T, T, T, 0, ...; P uniform 1/N.
  for (Index i = 0; i < N; ++i) CHECK(r.stats.tokens_per_expert[i] == (i < k ? T : 0));
  CHECK(r.stats.first_choice_tokens[0] == T);
  // L = N sum_i f_i P_i = N (1/N) sum_i f_i = 1 for Megatron's f; with p uniform the
  // gradient is (N/T) (1/N) (f_j - sum_i f_i / N) = (1/T) (f_j - 1/N).
  CHECK(r.loss == Approx(1.0).epsilon(1e-14));
  for (Index j = 0; j < N; ++j) {
    const double f = j < k ? 1.0 / double(k) : 0.0;
    CHECK(r.grad(0, j) == Approx((f - 1.0 / double(N)) / double(T)).margin(1e-15));
  }
  const auto routed = moebal::route(x, k);
  for (Index t = 0; t < T; ++t) {
    for (Index i = 0; i < k; ++i) CHECK(routed.indices(t, i) == i);
  }
}

TEST_CASE("extremes: T = 1, N = 1 and k = N", "[extremes]") {
  SECTION("T = 1") { check_all(random_logits(1, 5, 2.0, 6), 2); }
  SECTION("N = 1, k = 1") {
    const RowMatrix<double> x = random_logits(7, 1, 2.0, 7);
    check_all(x, 1);
    const auto r = moebal::switch_aux_loss(x, 1);
    CHECK(r.loss == Approx(1.0));  // one expert: f = P = 1
    CHECK(r.grad.cwiseAbs().maxCoeff() == 0.0);
  }
  SECTION("k = N") {
    const RowMatrix<double> x = random_logits(9, 4, 2.0, 8);
    check_all(x, 4);
    const auto r = moebal::switch_aux_loss(x, 4);
    // Every expert is selected by every token: f = 1/N, L = N sum_i P_i / N = 1, gradient 0
    // up to rounding (sum_i f_i p_i = 1/N = f_j).
    CHECK(r.loss == Approx(1.0).epsilon(1e-12));
    CHECK(r.grad.cwiseAbs().maxCoeff() < 1e-15);
  }
  SECTION("T = 1, N = 1, routers") {
    const RowMatrix<double> x = RowMatrix<double>::Constant(1, 1, 3.0);
    const auto r = moebal::route(x, 1);
    CHECK(r.indices(0, 0) == 0);
    CHECK(r.weights(0, 0) == 1.0);
  }
}

TEST_CASE("extremes: 2^22 tokens count exactly (no overflow of counts or indices)",
          "[extremes][large]") {
  const Index T = Index(1) << 22, N = 4, k = 2;
  // Token t prefers experts t mod 4 and (t + 1) mod 4 with clear margins: every expert is in
  // exactly half of the top-2 sets.
  RowMatrix<float> x = RowMatrix<float>::Zero(T, N);
  for (Index t = 0; t < T; ++t) {
    x(t, t % N) = 2.0f;
    x(t, (t + 1) % N) = 1.0f;
  }
  const auto r = moebal::switch_aux_loss(x, k);
  CHECK(r.stats.tokens == T);
  for (Index i = 0; i < N; ++i) {
    CHECK(r.stats.tokens_per_expert[i] == T * k / N);
    CHECK(r.stats.first_choice_tokens[i] == T / N);
    CHECK(r.stats.f[i] == 0.25);
  }
  CHECK(r.stats.tokens_per_expert.sum() == T * k);
  // f uniform: L = N sum_i f_i P_i = sum_i P_i = 1.
  CHECK(std::isfinite(r.loss));
  CHECK(double(r.loss) == Approx(1.0).epsilon(1e-6));
  CHECK(all_finite(r.grad));
}
