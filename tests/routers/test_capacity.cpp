// SPDX-License-Identifier: Apache-2.0
#include <cmath>
#include <limits>

#include <catch2/catch.hpp>

#include "moebal/losses/switch.hpp"
#include "moebal/routers/capacity.hpp"
#include "moebal/routers/expert_choice.hpp"
#include "moebal/routers/noise.hpp"
#include "moebal/routers/router.hpp"
#include "moebal/routers/sinkhorn.hpp"
#include "moebal/testing/gradcheck.hpp"
#include "support/matchers.hpp"
#include "support/random.hpp"

using moebal::CapacityFormula;
using moebal::CapacityOptions;
using moebal::DropPriority;
using moebal::Index;
using moebal::IndexMatrix;
using moebal::RowMatrix;
using moebal_test::IsCloseTo;
using moebal_test::random_logits;

TEST_CASE("expert_capacity: each formula", "[capacity]") {
  CapacityOptions o;
  o.capacity_factor = 1.25;
  // Megatron-core: ceil(T k cf / N) = ceil(100 * 2 * 1.25 / 8) = ceil(31.25) = 32.
  CHECK(moebal::expert_capacity(100, 8, 2, o) == 32);
  o.min_capacity = 40;
  CHECK(moebal::expert_capacity(100, 8, 2, o) == 40);
  // DeepSpeed top-2: max(ceil(T / N * 2 cf), min) = max(ceil(12.5 * 2.5), 4) = 32.
  o.formula = CapacityFormula::deepspeed;
  o.min_capacity = 4;
  CHECK(moebal::expert_capacity(100, 8, 2, o) == 32);
  // Tutel: k int(cf ceil(T / N)) = 2 int(1.25 * 13) = 2 * 16 = 32, aligned up to 8 -> 32;
  // alignment 5 -> 35.
  o.formula = CapacityFormula::tutel;
  CHECK(moebal::expert_capacity(100, 8, 2, o) == 32);
  o.alignment = 5;
  CHECK(moebal::expert_capacity(100, 8, 2, o) == 35);
  o.alignment = 1;
  o.capacity_factor = 0.0;  // dropless: the largest count
  CHECK(moebal::expert_capacity(100, 8, 2, o, 57) == 57);
  o.capacity_factor = -1.0;  // capped dropless: min(largest, 2 int(1 * 13)) = 26
  CHECK(moebal::expert_capacity(100, 8, 2, o, 57) == 26);
  CHECK(moebal::expert_capacity(100, 8, 2, o, 20) == 20);
  o.formula = CapacityFormula::absolute;
  o.absolute_capacity = 7;
  CHECK(moebal::expert_capacity(100, 8, 2, o) == 7);
}

TEST_CASE("apply_capacity: priorities on a hand-made case", "[capacity]") {
  // 5 tokens, 2 experts, k = 2 (every token picks both): weights of the slot for expert 0 and 1.
  IndexMatrix idx(5, 2);
  idx << 0, 1, 1, 0, 0, 1, 1, 0, 0, 1;
  RowMatrix<double> w(5, 2);
  w << 0.6, 0.4,   // token 0: expert 0 first
       0.7, 0.3,   // token 1: expert 1 first
       0.5, 0.5,   // token 2: a tie between its slots
       0.9, 0.1,   // token 3: expert 1 first
       0.6, 0.4;   // token 4: same weights as token 0
  CapacityOptions o;
  o.formula = CapacityFormula::absolute;
  o.absolute_capacity = 2;

  SECTION("weight: the largest weights, ties to the lower token") {
    o.priority = DropPriority::weight;
    const auto r = moebal::apply_capacity(idx, w, 2, o);
    // Expert 0 receives 0.6 (t0), 0.3 (t1), 0.5 (t2), 0.1 (t3), 0.6 (t4): keeps t0 and t4.
    // Expert 1 receives 0.4, 0.7, 0.5, 0.9, 0.4: keeps t3 and t1.
    CHECK(r.kept(0, 0) == 1);
    CHECK(r.kept(4, 0) == 1);
    CHECK(r.kept(2, 0) == 0);
    CHECK(r.kept(3, 0) == 1);
    CHECK(r.kept(1, 0) == 1);
    CHECK(r.counts_after == (moebal::CountVector(2) << 2, 2).finished());
    CHECK(r.counts_before == (moebal::CountVector(2) << 5, 5).finished());
    CHECK(r.dropped_fraction_overall == Approx(0.6));
  }
  SECTION("position: the earliest tokens") {
    o.priority = DropPriority::position;
    const auto r = moebal::apply_capacity(idx, w, 2, o);
    for (Index t = 0; t < 2; ++t) CHECK((r.kept(t, 0) == 1 && r.kept(t, 1) == 1));
    for (Index t = 2; t < 5; ++t) CHECK((r.kept(t, 0) == 0 && r.kept(t, 1) == 0));
  }
  SECTION("choice then position: first choices of every token before second choices") {
    o.priority = DropPriority::choice_then_position;
    const auto r = moebal::apply_capacity(idx, w, 2, o);
    // First choices in token order: e0 (t0), e1 (t1), e0 (t2), e1 (t3) fill both experts.
    CHECK(r.kept(0, 0) == 1);
    CHECK(r.kept(1, 0) == 1);
    CHECK(r.kept(2, 0) == 1);
    CHECK(r.kept(3, 0) == 1);
    CHECK(r.kept(4, 0) == 0);
    CHECK(r.kept.col(1).isZero());
  }
  SECTION("batch prioritized: tokens by their best weight") {
    o.priority = DropPriority::batch_prioritized;
    const auto r = moebal::apply_capacity(idx, w, 2, o);
    // Best weights 0.6, 0.7, 0.5, 0.9, 0.6: order t3, t1, t0, t4, t2. First choices: t3 -> e1,
    // t1 -> e1 (full), t0 -> e0, t4 -> e0 (full).
    CHECK(r.kept(3, 0) == 1);
    CHECK(r.kept(1, 0) == 1);
    CHECK(r.kept(0, 0) == 1);
    CHECK(r.kept(4, 0) == 1);
    CHECK(r.kept(2, 0) == 0);
  }
  SECTION("random: seeded, reproducible, and never over capacity") {
    o.priority = DropPriority::random;
    o.seed = 42;
    const auto a = moebal::apply_capacity(idx, w, 2, o);
    const auto b = moebal::apply_capacity(idx, w, 2, o);
    CHECK(a.kept == b.kept);
    CHECK(a.counts_after.maxCoeff() <= 2);
  }
  SECTION("renormalization after dropping, padding, and zero weights for dropped slots") {
    o.priority = DropPriority::choice_then_position;
    o.renormalize = true;
    o.pad_to_capacity = true;
    const auto r = moebal::apply_capacity(idx, w, 2, o);
    CHECK(r.weights(0, 0) == Approx(1.0));  // its second slot was dropped: 0.6 / 0.6
    CHECK(r.weights(0, 1) == 0.0);
    CHECK(r.weights.row(4).isZero(0));
    CHECK(r.padded.isZero());  // both experts are full
  }
}

TEST_CASE("apply_capacity: capacity never exceeded; dropless drops nothing; gradient",
          "[capacity][grad]") {
  const RowMatrix<double> x = random_logits(40, 8, 2.0, 31);
  const auto routed = moebal::route(x, 2, moebal::RouterOptions{});
  for (const auto priority : {DropPriority::weight, DropPriority::position,
                              DropPriority::choice_then_position, DropPriority::random,
                              DropPriority::batch_prioritized}) {
    CapacityOptions o;
    o.capacity_factor = 0.75;
    o.priority = priority;
    const auto r = moebal::apply_capacity(routed.indices, routed.weights, 8, o);
    CHECK(r.counts_after.maxCoeff() <= r.capacity);
    CHECK(r.counts_after.sum() == r.kept.cast<Index>().sum());
  }
  CapacityOptions dropless;
  dropless.formula = CapacityFormula::tutel;
  dropless.capacity_factor = 0.0;
  const auto all = moebal::apply_capacity(routed.indices, routed.weights, 8, dropless);
  CHECK(all.dropped_fraction_overall == 0.0);
  CHECK(all.weights == routed.weights);

  // Gradient of sum(G * kept weights) through the renormalization (selection frozen).
  CapacityOptions o;
  o.capacity_factor = 0.75;
  o.renormalize = true;
  o.priority = DropPriority::position;  // independent of the weights: no flips under the step
  const RowMatrix<double> G = random_logits(40, 2, 1.0, 32);
  const auto r = moebal::apply_capacity(routed.indices, routed.weights, 8, o);
  const RowMatrix<double> g = moebal::capacity_backward(routed.weights, r, G, o);
  auto f = [&](const RowMatrix<double>& w) {
    return (moebal::apply_capacity(routed.indices, w, 8, o).weights.array() * G.array()).sum();
  };
  const auto report = moebal::testing::gradcheck(f, routed.weights, g);
  INFO(report.message());
  CHECK(report.passed);
}

TEST_CASE("expert choice: every expert gets exactly C tokens; gradient", "[capacity][grad]") {
  const RowMatrix<double> x = random_logits(12, 4, 1.5, 33);
  const auto r = moebal::expert_choice(x, 2.0);  // C = 12 * 2 / 4 = 6
  CHECK(r.capacity == 6);
  for (Index e = 0; e < 4; ++e) CHECK((r.weights.col(e).array() > 0).count() == 6);
  CHECK(r.tokens_without_expert == (r.weights.rowwise().maxCoeff().array() == 0).count());
  const RowMatrix<double> G = random_logits(12, 4, 1.0, 34);
  const RowMatrix<double> g = moebal::expert_choice_backward(x, r, G);
  auto f = [&](const RowMatrix<double>& z) {
    return (moebal::expert_choice(z, 2.0).weights.array() * G.array()).sum();
  };
  const auto report = moebal::testing::gradcheck(f, x, g);
  INFO(report.message());
  CHECK(report.passed);
}

TEST_CASE("Sinkhorn: near-uniform column sums; routing gradient", "[capacity][sinkhorn]") {
  const RowMatrix<double> x = random_logits(24, 6, 1.0, 35);
  const RowMatrix<double> a = moebal::sinkhorn(x, 1e-6);
  for (Index j = 0; j < 6; ++j) CHECK(a.col(j).sum() == Approx(1.0 / 6).epsilon(1e-4));
  for (const Index k : {Index(1), Index(2)}) {
    const auto r = moebal::sinkhorn_route(x, k);
    const RowMatrix<double> G = random_logits(24, k, 1.0, 36);
    const RowMatrix<double> g = moebal::sinkhorn_route_backward(x, r.indices, G);
    auto f = [&](const RowMatrix<double>& z) {
      const auto q = moebal::sinkhorn_route(z, k);
      if (q.indices != r.indices) return std::nan("");
      return (q.weights.array() * G.array()).sum();
    };
    const auto report = moebal::testing::gradcheck(f, x, g);
    INFO("k = " << k << ": " << report.message());
    CHECK(report.passed);
  }
}

TEST_CASE("Shazeer smooth load loss: gradients for the clean logits and the noise scale",
          "[capacity][noise][grad]") {
  const RowMatrix<double> c = random_logits(10, 6, 1.0, 37);
  const RowMatrix<double> sigma = (random_logits(10, 6, 0.3, 38).array().abs() + 0.2).matrix();
  const RowMatrix<double> e = moebal::gaussian_noise(10, 6, 1.0, 7);
  for (const Index k : {Index(1), Index(2)}) {
    const auto r = moebal::smooth_load_loss(c, sigma, e, k, 0.5);
    CHECK(r.load.sum() > 0.0);
    auto fc = [&](const RowMatrix<double>& z) { return moebal::smooth_load_loss(z, sigma, e, k, 0.5).loss; };
    auto fs = [&](const RowMatrix<double>& z) { return moebal::smooth_load_loss(c, z, e, k, 0.5).loss; };
    const auto rc = moebal::testing::gradcheck(fc, c, r.dloss_dclean);
    const auto rs = moebal::testing::gradcheck(fs, sigma, r.dloss_dnoise_std);
    INFO("k = " << k << ": " << rc.message() << " / " << rs.message());
    CHECK(rc.passed);
    CHECK(rs.passed);
  }
}

TEST_CASE("noise: seeded and identical across calls; moments", "[capacity][noise]") {
  const RowMatrix<double> a = moebal::gaussian_noise(200, 50, 2.0, 9);
  CHECK(a == moebal::gaussian_noise(200, 50, 2.0, 9));
  CHECK(a != moebal::gaussian_noise(200, 50, 2.0, 10));
  CHECK(a.mean() == Approx(0.0).margin(0.05));
  CHECK(std::sqrt(a.array().square().mean()) == Approx(2.0).epsilon(0.03));
  const RowMatrix<double> g = moebal::gumbel_noise(200, 50, 9);
  CHECK(g.mean() == Approx(0.5772156649).margin(0.03));  // the Euler-Mascheroni constant
}

TEST_CASE("capacity and noise: bad input", "[capacity][errors]") {
  CapacityOptions o;
  o.capacity_factor = std::nan("");
  CHECK_THROWS_WITH(moebal::expert_capacity(10, 2, 1, o),
                    "moebal::expert_capacity: argument 'options.capacity_factor': expected a finite "
                    "number, got nan");
  o.capacity_factor = 0.0;
  CHECK_THROWS_WITH(moebal::expert_capacity(10, 2, 1, o),
                    "moebal::expert_capacity: argument 'options.capacity_factor': expected a "
                    "capacity factor > 0, got 0");
  o = CapacityOptions{};
  o.formula = CapacityFormula::absolute;
  CHECK_THROWS_WITH(moebal::expert_capacity(10, 2, 1, o),
                    "moebal::expert_capacity: argument 'options.absolute_capacity': expected a "
                    "capacity >= 1, got 0");
  CHECK_THROWS_WITH(moebal::gaussian_noise(2, 2, -1.0, 0),
                    "moebal::gaussian_noise: argument 'std': expected a noise scale >= 0, got -1");
  const RowMatrix<double> x = RowMatrix<double>::Zero(4, 4);
  CHECK_THROWS_WITH(moebal::smooth_load_loss(x, x, x, 1),
                    "moebal::smooth_load_loss: argument 'noise_std': expected finite noise scales "
                    "> 0, got 0 at element 0");
  CHECK_THROWS_AS(moebal::expert_choice(x, 0.1), moebal::invalid_argument);
  // Noise draws of 100 over clean logits of 0 (sigma 1): h = (100, 100), expert 0 is the top-1
  // (tie to the lower index), and for both experts the other's noisy logit is the threshold,
  // z = (0 - 100) / 1 = -100, P = Phi(-100) = 0 in double (0.5 erfc(70.7) < 5e-324). The load
  // is 0 for both experts and the CV^2 is 0/0.
  const RowMatrix<double> clean = RowMatrix<double>::Zero(1, 2);
  const RowMatrix<double> unit = RowMatrix<double>::Ones(1, 2);
  CHECK_THROWS_WITH(moebal::smooth_load_loss(clean, unit, (100.0 * unit).eval(), 1),
                    "moebal::smooth_load_loss: argument 'clean, noise_std, noise': expected a "
                    "positive smooth load for at least one expert (the population CV^2 divides "
                    "by the mean smooth load squared), got every smooth load 0 over 1 real "
                    "tokens (every P_ti = Phi(z_ti) underflows to 0 for z_ti below about -38.6)");
  // Draws of 30 instead: P = Phi(-30) = 4.9e-198 > 0 for both, equal loads, CV^2 exactly 0.
  const auto tiny = moebal::smooth_load_loss(clean, unit, (30.0 * unit).eval(), 1);
  CHECK(tiny.load.minCoeff() > 0.0);
  CHECK(tiny.loss == 0.0);
  CHECK(tiny.dloss_dclean.allFinite());
}

TEST_CASE("switch_aux_loss_with_counts: counts before or after capacity, never padded",
          "[capacity][loss]") {
  const RowMatrix<double> x = random_logits(40, 8, 2.0, 41);
  const auto routed = moebal::route(x, 2, moebal::RouterOptions{});
  CapacityOptions o;
  o.capacity_factor = 0.75;
  o.pad_to_capacity = true;
  const auto r = moebal::apply_capacity(routed.indices, routed.weights, 8, o);
  // Counts before capacity are the plain top-k counts: the usual Switch loss.
  const auto before = moebal::switch_aux_loss_with_counts(x, r.counts_before, 2);
  const auto plain = moebal::switch_aux_loss(x, 2);
  CHECK(before.loss == Approx(plain.loss).epsilon(1e-13));
  CHECK_THAT(before.grad, IsCloseTo(plain.grad, 1e-16, 1e-11));
  // After capacity: fewer counts, a different loss, and its gradient by central differences.
  const auto after = moebal::switch_aux_loss_with_counts(x, r.counts_after, 2);
  CHECK(after.loss < before.loss);
  auto f = [&](const RowMatrix<double>& z) {
    return double(moebal::switch_aux_loss_with_counts(z, r.counts_after, 2).loss);
  };
  const auto report = moebal::testing::gradcheck(f, x, after.grad);
  INFO(report.message());
  CHECK(report.passed);
  // A padded map's counts are all min(C, T): f is uniform and the loss cannot see imbalance.
  const moebal::CountVector padded = r.counts_after + r.padded;
  CHECK(padded.minCoeff() == padded.maxCoeff());
  CHECK_THROWS_WITH(moebal::switch_aux_loss_with_counts(x, Eigen::VectorXd::Zero(7), 2),
                    "moebal::switch_aux_loss_with_counts: argument 'counts': expected one count per "
                    "expert (length N = 8), got length 7");
}
