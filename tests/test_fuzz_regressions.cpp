// SPDX-License-Identifier: Apache-2.0
// Regression tests for the library bugs that tests/fuzz/fuzz_api found (tests/fuzz/README.md,
// "Library bugs found"). Each case names its reproducer in tests/fuzz/crashes/; the expected
// values are derived by hand in the comments, not taken from the library's output.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "moebal/moebal.hpp"
#include "moebal/testing/gradcheck.hpp"
#include "support/random.hpp"

using moebal::Index;
using moebal::RowMatrix;

namespace {

const double kInf = std::numeric_limits<double>::infinity();
const double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr Index kIndexMax = std::numeric_limits<Index>::max();

template <class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const moebal::invalid_argument& e) {
    return e.what();
  }
  return "(no exception)";
}

RowMatrix<double> row(std::initializer_list<double> values) {
  RowMatrix<double> x(1, Index(values.size()));
  Index j = 0;
  for (double v : values) x(0, j++) = v;
  return x;
}

}  // namespace

TEST_CASE("fuzz regressions: capacities saturate instead of overflowing",
          "[fuzz][capacity]") {
  // crashes/expert-capacity-factor-overflow: ceil(T k cf / N) = ceil(1e300) does not fit in 64
  // bits; the capacity saturates at the largest Index.
  moebal::CapacityOptions o;
  o.capacity_factor = 1e300;
  for (auto formula : {moebal::CapacityFormula::megatron, moebal::CapacityFormula::deepspeed,
                       moebal::CapacityFormula::tutel}) {
    o.formula = formula;
    CHECK(moebal::expert_capacity(1, 1, 1, o) == kIndexMax);
    CHECK(moebal::expert_capacity(4096, 64, 2, o) == kIndexMax);
  }
  // Just below 2^63 the value converts exactly: ceil(2^62 * 1 * 1 / 1) = 2^62.
  o.formula = moebal::CapacityFormula::megatron;
  o.capacity_factor = 4611686018427387904.0;  // 2^62
  CHECK(moebal::expert_capacity(1, 1, 1, o) == (Index(1) << 62));
  // Ordinary values are unchanged: ceil(10 * 2 * 1.25 / 4) = ceil(6.25) = 7.
  o.capacity_factor = 1.25;
  CHECK(moebal::expert_capacity(10, 4, 2, o) == 7);

  // A saturated capacity drops nothing.
  const RowMatrix<double> x = moebal_test::random_logits(16, 4, 1.0, 3);
  const auto r = moebal::route(x, 2);
  o.capacity_factor = 1e300;
  const auto kept = moebal::apply_capacity(r.indices, r.weights, 4, o);
  CHECK(kept.capacity == kIndexMax);
  CHECK(kept.counts_after == kept.counts_before);
  CHECK(kept.dropped_fraction_overall == 0.0);
  CHECK(kept.weights == r.weights);

  // crashes/expert-capacity-alignment-overflow: Tutel rounds C up to a multiple of the
  // alignment. C = 1 * int(1 * ceil(1 / 1)) = 1 rounds up to 2^63 - 1 itself; C = 2 (T = 2)
  // would need 2 (2^63 - 1): saturated.
  moebal::CapacityOptions t;
  t.formula = moebal::CapacityFormula::tutel;
  t.capacity_factor = 1.0;
  t.alignment = kIndexMax;
  CHECK(moebal::expert_capacity(1, 1, 1, t) == kIndexMax);
  CHECK(moebal::expert_capacity(2, 1, 1, t) == kIndexMax);
  // C = 2 * int(1 * ceil(10 / 4)) = 6, aligned to 8 -> 8; to 3 -> 6 (already a multiple).
  t.alignment = 8;
  CHECK(moebal::expert_capacity(10, 4, 2, t) == 8);
  t.alignment = 3;
  CHECK(moebal::expert_capacity(10, 4, 2, t) == 6);
}

TEMPLATE_TEST_CASE("fuzz regressions: a router scaling factor of 0 gives zero weights and a zero "
                   "gradient",
                   "[fuzz][router]", float, double) {
  // crashes/route-backward-scaling-zero: w = c u / D is linear in c, so with c = 0 every weight
  // and every gradient is exactly 0, and with c = 2.5 the gradient is 2.5 times c = 1's.
  using S = TestType;
  const RowMatrix<S> x = moebal_test::random_logits(6, 4, 1.0, 11).template cast<S>();
  const RowMatrix<S> dw = moebal_test::random_logits(6, 2, 1.0, 12).template cast<S>();
  for (auto weights : {moebal::RouterWeights::scores, moebal::RouterWeights::softmax_of_selected}) {
    moebal::RouterOptions o;
    o.weights = weights;
    o.normalize = weights == moebal::RouterWeights::scores;
    o.scaling_factor = 0.0;
    const auto r0 = moebal::route(x, 2, o);
    CHECK((r0.weights.array() == S(0)).all());
    const RowMatrix<S> g0 = moebal::route_backward(x, r0.indices, dw, o);
    CHECK(g0.array().isFinite().all());
    CHECK((g0.array() == S(0)).all());
    o.scaling_factor = 1.0;
    const RowMatrix<S> g1 = moebal::route_backward(x, r0.indices, dw, o);
    o.scaling_factor = 2.5;
    const RowMatrix<S> g25 = moebal::route_backward(x, r0.indices, dw, o);
    const double tol = std::is_same_v<S, float> ? 1e-6 : 1e-14;
    CHECK((g25 - S(2.5) * g1).cwiseAbs().maxCoeff() <= tol * std::max(1.0, double(g1.cwiseAbs().maxCoeff())));
    CHECK(g1.cwiseAbs().maxCoeff() > S(0));
  }
}

TEST_CASE("fuzz regressions: router weights that are undefined raise invalid_argument",
          "[fuzz][router]") {
  // crashes/route-normalize-zero-sum: sigmoid(-800) underflows to 0 in double, so u / (sum u + 0)
  // is 0 / 0. With epsilon 0 the row is rejected by name; with DeepSeek's 1e-20 the weight is
  // 0 / 1e-20 = 0.
  moebal::RouterOptions o;
  o.score = moebal::RouterScore::sigmoid;
  o.normalize = true;
  const RowMatrix<double> x = row({-800.0, -800.0});
  const std::string m = message_of([&] { moebal::route(x, 1, o); });
  CHECK(m.find("moebal::route: argument 'logits'") != std::string::npos);
  CHECK(m.find("normalize_epsilon") != std::string::npos);
  CHECK(m.find("a sum of 0 at row 0") != std::string::npos);
  o.epsilon_mode = moebal::NormalizeEpsilon::clamp;  // max(0, 0) = 0 as well
  CHECK_THROWS_AS(moebal::route(x, 1, o), moebal::invalid_argument);
  o.epsilon_mode = moebal::NormalizeEpsilon::add;
  o.normalize_epsilon = 1e-20;
  const auto r = moebal::route(x, 1, o);
  CHECK(r.weights(0, 0) == 0.0);
  const RowMatrix<double> g = moebal::route_backward(x, r.indices, RowMatrix<double>::Ones(1, 1), o);
  CHECK(g.array().isFinite().all());

  // crashes/route-softmax-of-selected-all-ninf: sigmoid scores accept -Inf, but the softmax over
  // two selected logits that are both -Inf is exp(-Inf - -Inf) = NaN: rejected.
  moebal::RouterOptions s;
  s.score = moebal::RouterScore::sigmoid;
  s.weights = moebal::RouterWeights::softmax_of_selected;
  const std::string m2 = message_of([&] { moebal::route(row({-kInf, -kInf}), 2, s); });
  CHECK(m2.find("argument 'logits'") != std::string::npos);
  CHECK(m2.find("only -Inf selected at row 0") != std::string::npos);
  // One finite selected logit: softmax([-Inf, 0.5]) = [0, 1] exactly.
  const auto r2 = moebal::route(row({-kInf, 0.5}), 2, s);
  CHECK(r2.indices(0, 0) == 1);
  CHECK(r2.weights(0, 0) == 1.0);
  CHECK(r2.weights(0, 1) == 0.0);
}

TEST_CASE("fuzz regressions: CV^2 of importance", "[fuzz][cv2]") {
  // crashes/cv2-topk-gates-zero-sum: top-k gates q_i / sum_topk q are 0 / 0 for a sigmoid row
  // of -Inf: rejected by name. Dense gates give I = 0, so the population CV^2 is 0 / 0 (NaN in
  // PyTorch's formula): also rejected by name (it used to be returned as 0).
  moebal::Cv2Options o;
  o.score = moebal::ScoreFunction::sigmoid;
  o.gates = moebal::ImportanceGates::topk;
  const RowMatrix<double> dead = row({-kInf, -kInf});
  const std::string m = message_of([&] { moebal::cv2_importance_loss(dead, 1, o); });
  CHECK(m.find("moebal::cv2_importance_loss: argument 'logits'") != std::string::npos);
  CHECK(m.find("a sum of 0 at row 0") != std::string::npos);
  o.gates = moebal::ImportanceGates::dense;
  const std::string m0 = message_of([&] { moebal::cv2_importance_loss(dead, 1, o); });
  CHECK(m0.find("moebal::cv2_importance_loss: argument 'logits'") != std::string::npos);
  CHECK(m0.find("every importance 0 over 1 real tokens") != std::string::npos);

  // crashes/cv2-importance-underflow: importances near e^-700 (mu^3 underflows). CV^2 is scale
  // invariant and sigmoid(x) = e^x (1 + O(e^x)) here, so for logits [-700, -701] the importances
  // are proportional to [1, b], b = e^-1, and the population CV^2 is
  // ((1 - b) / 2)^2 / ((1 + b) / 2)^2 = tanh(1/2)^2.
  const RowMatrix<double> tiny = row({-700.0, -701.0});
  const auto r = moebal::cv2_importance_loss(tiny, 1, o);
  const double expected = std::pow(std::tanh(0.5), 2);
  CHECK(std::abs(r.loss - expected) <= 1e-12 * expected);
  REQUIRE(r.grad.array().isFinite().all());
  // Equal importances: exactly balanced, loss 0.
  CHECK(moebal::cv2_importance_loss(row({-700.0, -700.0}), 1, o).loss == 0.0);
  // The gradient there by central differences (d L / d x_0 = d tanh^2(d/2) / d d at d = 1).
  auto f = [&](const RowMatrix<double>& y) { return double(moebal::cv2_importance_loss(y, 1, o).loss); };
  const auto report = moebal::testing::gradcheck(f, tiny, r.grad);
  CHECK(report.passed);
  INFO(report.message());
  const double dd = std::tanh(0.5) * (1.0 - std::pow(std::tanh(0.5), 2));  // d/dd tanh^2(d/2)
  CHECK(std::abs(r.grad(0, 0) - dd) <= 1e-9);
  CHECK(std::abs(r.grad(0, 1) + dd) <= 1e-9);
}

TEST_CASE("fuzz regressions: combined_aux_loss validates its enums", "[fuzz][combined]") {
  // crashes/combined-enums-not-validated.
  const RowMatrix<double> x = moebal_test::random_logits(8, 4, 1.0, 2);
  moebal::CombinedOptions o;
  o.weights.cv2_importance = 1.0;
  o.cv2_variance = static_cast<moebal::Cv2Variance>(-1);
  const std::string m = message_of([&] { moebal::combined_aux_loss(x, 2, o); });
  CHECK(m.find("argument 'options.cv2_variance'") != std::string::npos);
  CHECK(m.find("population or unbiased, got -1") != std::string::npos);
  o.cv2_variance = moebal::Cv2Variance::population;
  o.mask_mode = static_cast<moebal::SequenceMaskMode>(7);
  const std::string m2 = message_of([&] { moebal::combined_aux_loss(x, 2, o); });
  CHECK(m2.find("argument 'options.mask_mode'") != std::string::npos);
  CHECK(m2.find("got 7") != std::string::npos);
  CHECK_THROWS_AS(moebal::CombinedAuxLoss<double>(4, 2, o), moebal::invalid_argument);
}

TEST_CASE("fuzz regressions: switch_aux_loss_with_counts never reads padded rows",
          "[fuzz][switch]") {
  // crashes/with-counts-reads-padded-rows: padded rows may hold anything (README), so NaN, +Inf
  // or a softmax row of -Inf in a padded row changes nothing: the result equals the same call on
  // logits whose padded row holds zeros, and that row's gradient is 0.
  RowMatrix<double> x = moebal_test::random_logits(5, 4, 1.0, 9);
  const std::vector<std::uint8_t> mask = {0, 1, 1, 1, 1};
  moebal::SwitchOptions o;
  o.mask = moebal::TokenMask(mask.data(), Index(mask.size()));
  const auto plain = moebal::switch_aux_loss(x, 2, o);
  x.row(0).setZero();
  const auto reference = moebal::switch_aux_loss_with_counts(x, plain.stats.tokens_per_expert, 2, o);
  for (double bad : {kNaN, kInf, -kInf}) {
    x.row(0).setConstant(bad);
    const auto r = moebal::switch_aux_loss_with_counts(x, plain.stats.tokens_per_expert, 2, o);
    CHECK(r.loss == reference.loss);
    CHECK(r.grad == reference.grad);
    CHECK((r.grad.row(0).array() == 0.0).all());
  }
  // With the loss's own counts it is the loss itself.
  CHECK(std::abs(reference.loss - plain.loss) <= 1e-15);
}

TEST_CASE("fuzz regressions: cv2_load takes bfloat16 and half logits", "[fuzz][cv2][half]") {
  // tests/fuzz/crashes/cv2_load_bfloat16.cpp did not compile. The half-precision path computes
  // in float on the upcast logits, so it equals the float call on those logits exactly.
  const RowMatrix<double> xd = moebal_test::random_logits(32, 8, 1.0, 4);
  const RowMatrix<Eigen::bfloat16> xb = xd.cast<Eigen::bfloat16>();
  const RowMatrix<Eigen::half> xh = xd.cast<Eigen::half>();
  const auto rb = moebal::cv2_load(xb, 2);
  const auto rh = moebal::cv2_load(xh, 2);
  const auto fb = moebal::cv2_load(RowMatrix<float>(xb.cast<float>()), 2);
  const auto fh = moebal::cv2_load(RowMatrix<float>(xh.cast<float>()), 2);
  static_assert(std::is_same_v<decltype(rb.loss), float>, "cv2_load of bfloat16 computes in float");
  CHECK(rb.loss == fb.loss);
  CHECK(rb.counts == fb.counts);
  CHECK(rh.loss == fh.loss);
  CHECK(rh.counts == fh.counts);
  CHECK(rb.counts.sum() == 32 * 2);
  CHECK((rb.grad.array() == 0.0f).all());
}

TEST_CASE("fuzz regressions: a zero-length mask is a mask of the wrong length, not 'no mask'",
          "[fuzz][mask]") {
  // tests/fuzz/README.md: an empty std::vector's data() may be null, so TokenMask(v.data(), 0)
  // used to be the empty mask and silently count every token. A given mask of length 0 now
  // fails the length check for T > 0; only TokenMask{} means "every token is real".
  const RowMatrix<double> x = moebal_test::random_logits(4, 3, 1.0, 1);
  const std::vector<std::int64_t> none;
  moebal::SwitchOptions o;
  o.mask = moebal::TokenMask(static_cast<const std::int64_t*>(nullptr), 0);
  CHECK_FALSE(o.mask.empty());
  CHECK_THROWS_WITH(moebal::switch_aux_loss(x, 2, o),
                    Catch::Contains("argument 'mask'") && Catch::Contains("got length 0"));
  o.mask = moebal::TokenMask(none.data(), Index(none.size()));
  CHECK_THROWS_AS(moebal::switch_aux_loss(x, 2, o), moebal::invalid_argument);
  o.mask = moebal::TokenMask(Eigen::VectorXi());
  CHECK_THROWS_AS(moebal::switch_aux_loss(x, 2, o), moebal::invalid_argument);
  o.mask = moebal::TokenMask{};
  CHECK(o.mask.empty());
  CHECK_NOTHROW(moebal::switch_aux_loss(x, 2, o));
}

TEST_CASE("fuzz regressions: route_backward names itself in its errors", "[fuzz][router]") {
  const RowMatrix<double> x = moebal_test::random_logits(3, 4, 1.0, 1);
  const moebal::IndexMatrix wrong = moebal::IndexMatrix::Constant(3, 2, 9);
  CHECK_THROWS_WITH(moebal::route_backward(x, wrong, RowMatrix<double>::Zero(3, 2)),
                    Catch::StartsWith("moebal::route_backward: argument 'indices'"));
  moebal::Router<double> router(4, 2);
  RowMatrix<double> g(3, 4);
  CHECK_THROWS_WITH(router.backward(x, wrong, RowMatrix<double>::Zero(3, 2), g),
                    Catch::StartsWith("moebal::Router::backward: argument 'indices'"));
}
