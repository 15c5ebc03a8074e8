// SPDX-License-Identifier: Apache-2.0
#include <cmath>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "moebal/losses/global_batch.hpp"
#include "moebal/testing/gradcheck.hpp"
#include "support/fake_ranks.hpp"
#include "support/global_batch_scenario.hpp"
#include "support/matchers.hpp"
#include "support/random.hpp"

using moebal::GlobalBatchBalance;
using moebal::GlobalBatchOptions;
using moebal::Index;
using moebal::RowMatrix;
using moebal::RunningGlobalBalance;
using moebal_test::IsCloseTo;
using moebal_test::random_logits;

namespace {

void check_rank_result(const moebal_test::RankResult& r) {
  REQUIRE(r.shares.size() == r.expected_shares.size());
  for (std::size_t j = 0; j < r.shares.size(); ++j) {
    CHECK(std::abs(r.shares[j] - r.expected_shares[j]) <= 1e-12 * std::abs(r.expected_shares[j]));
    CHECK_THAT(r.grads[j], IsCloseTo(r.expected_grads[j], 1e-17, 1e-12));
  }
}

}  // namespace

TEST_CASE("GlobalBatchBalance: 4 ranks x 2 micro-batches equal the concatenated global batch",
          "[loss][global]") {
  const moebal_test::GlobalScenario scenario;
  for (const auto score : {moebal::ScoreFunction::softmax, moebal::ScoreFunction::sigmoid}) {
    for (const auto convention :
         {moebal::SwitchConvention::megatron, moebal::SwitchConvention::huggingface}) {
      GlobalBatchOptions options;
      options.score = score;
      options.convention = convention;
      options.coefficient = 0.01;
      moebal_test::FakeWorld world(scenario.ranks);
      std::vector<moebal_test::RankResult> results(std::size_t(scenario.ranks));
      const auto errors = world.run([&](int r, moebal_test::FakeWorld::Sync sync) {
        results[std::size_t(r)] = moebal_test::run_exact_rank(scenario, r, sync, options);
      });
      double total = 0.0, expected = 0.0;
      for (int r = 0; r < scenario.ranks; ++r) {
        INFO("rank " << r << ", " << moebal::to_string(score) << ", "
                     << moebal::to_string(convention));
        CHECK(errors[std::size_t(r)].empty());
        check_rank_result(results[std::size_t(r)]);
        for (double v : results[std::size_t(r)].shares) total += v;
        for (double v : results[std::size_t(r)].expected_shares) expected += v;
      }
      // The shares of every micro-batch on every rank sum to the global-batch Switch loss.
      const RowMatrix<double> all = scenario.all_logits();
      const Eigen::VectorXi mask = scenario.all_mask();
      moebal::SwitchOptions switch_options;
      switch_options.score = score;
      switch_options.convention = convention;
      switch_options.coefficient = 0.01;
      switch_options.mask = moebal::TokenMask(mask);
      const double global = moebal::switch_aux_loss(all, 2, switch_options).loss;
      CHECK(total == Approx(global).epsilon(1e-12));
      CHECK(expected == Approx(global).epsilon(1e-12));  // the reference shares too
    }
  }
}

TEST_CASE("GlobalBatchBalance: micro-batch mean and the added micro-batch loss",
          "[loss][global]") {
  const std::vector<RowMatrix<double>> batches = {random_logits(6, 5, 1.0, 1),
                                                  random_logits(11, 5, 1.0, 2)};
  GlobalBatchOptions options;
  options.weighting = moebal::GlobalWeighting::micro_batch_mean;
  options.micro_batch_weight = 0.01;
  GlobalBatchBalance<double> balance(5, 2, options);
  for (const auto& b : batches) balance.count(b);
  balance.synchronize();
  CHECK(balance.global_micro_batches() == 2.0);
  CHECK(balance.global_tokens() == 17.0);
  const Eigen::VectorXd f = balance.global_f();
  for (const auto& b : batches) {
    const RowMatrix<double> q = moebal::softmax(b);
    const Eigen::VectorXd P = q.colwise().sum().transpose() / double(b.rows());
    const auto own = moebal::switch_aux_loss(b, 2);  // the micro-batch's own Switch loss
    // L_j = (1/2) N sum_i fbar_i P_i^j + 0.01 * own.
    const double expected = 0.5 * 5.0 * f.dot(P) + 0.01 * own.loss;
    RowMatrix<double> g(b.rows(), 5);
    CHECK(balance.forward_backward(b, g) == Approx(expected).epsilon(1e-13));
    auto fn = [&](const RowMatrix<double>& z) {
      const RowMatrix<double> qz = moebal::softmax(z);
      const Eigen::VectorXd Pz = qz.colwise().sum().transpose() / double(z.rows());
      return 0.5 * 5.0 * f.dot(Pz) + 0.01 * 5.0 * own.stats.f.dot(Pz);  // counts are constants
    };
    const auto report = moebal::testing::gradcheck(fn, b, g);
    INFO(report.message());
    CHECK(report.passed);
  }
}

TEST_CASE("RunningGlobalBalance: one rank, running mean over micro-batches", "[loss][global]") {
  const std::vector<RowMatrix<double>> batches = {random_logits(8, 6, 1.0, 3),
                                                  random_logits(8, 6, 2.0, 4)};
  RunningGlobalBalance<double> running(6, 2);
  // Micro-batch 1 alone: the running mean is its own counts: the Switch loss.
  RowMatrix<double> g(8, 6);
  const double first = running.forward_backward(batches[0], g, moebal::NoSync{});
  const auto own = moebal::switch_aux_loss(batches[0], 2);
  CHECK(first == Approx(own.loss).epsilon(1e-14));
  CHECK_THAT(g, IsCloseTo(own.grad, 1e-17, 1e-12));
  // Micro-batch 2: f = mean of both micro-batches' counts / (k T_2).
  const double second = running.forward(batches[1], moebal::NoSync{});
  const Eigen::VectorXd c1 =
      moebal::switch_aux_loss(batches[0], 2).stats.tokens_per_expert.cast<double>();
  const Eigen::VectorXd c2 =
      moebal::switch_aux_loss(batches[1], 2).stats.tokens_per_expert.cast<double>();
  const Eigen::VectorXd f = ((c1 + c2) / 2.0) / (2.0 * 8.0);
  const Eigen::VectorXd P = moebal::softmax(batches[1]).colwise().sum().transpose() / 8.0;
  CHECK(second == Approx(6.0 * f.dot(P)).epsilon(1e-14));
  CHECK(running.steps() == 2);
  running.reset();
  CHECK(running.steps() == 0);
}

TEST_CASE("RunningGlobalBalance: Megatron-exact scaling is 1/R of the corrected one",
          "[loss][global]") {
  // 4 ranks with equal micro-batch sizes and no mask: P_megatron = S / (R T) = P_corrected / R.
  moebal_test::FakeWorld world(4);
  std::vector<double> corrected(4), megatron(4);
  const auto errors = world.run([&](int r, moebal_test::FakeWorld::Sync sync) {
    const RowMatrix<double> x = random_logits(10, 6, 1.0, unsigned(20 + r));
    GlobalBatchOptions options;
    RunningGlobalBalance<double> a(6, 2, options);
    options.scaling = moebal::RunningScaling::megatron;
    RunningGlobalBalance<double> b(6, 2, options);
    corrected[std::size_t(r)] = a.forward(x, sync);
    megatron[std::size_t(r)] = b.forward(x, sync);
  });
  for (int r = 0; r < 4; ++r) {
    CHECK(errors[std::size_t(r)].empty());
    CHECK(megatron[std::size_t(r)] == Approx(corrected[std::size_t(r)] / 4.0).epsilon(1e-14));
  }
}

TEST_CASE("Global batch: protocol errors", "[loss][global][errors]") {
  GlobalBatchBalance<double> balance(4, 2);
  const RowMatrix<double> x = random_logits(5, 4, 1.0, 9);
  RowMatrix<double> g(5, 4);
  CHECK_THROWS_WITH(balance.forward_backward(x, g),
                    "moebal::GlobalBatchBalance::forward_backward: argument 'this': expected "
                    "synchronize() after counting every micro-batch of the step, got a call "
                    "before synchronize");
  balance.count(x);
  balance.synchronize();
  CHECK_THROWS_WITH(balance.count(x),
                    "moebal::GlobalBatchBalance::count: argument 'this': expected counting before "
                    "synchronize (reset() starts a step), got a call after synchronize");
  balance.reset();
  // A micro-batch with the wrong N is reported by synchronize, not by count.
  CHECK_NOTHROW(balance.count(RowMatrix<double>::Zero(5, 3)));
  CHECK_THROWS_WITH(balance.synchronize(),
                    "moebal::GlobalBatchBalance::count: argument 'logits': expected N = 4 expert "
                    "columns (as constructed), got shape 5 x 3");
}

TEST_CASE("Global batch: mismatched N or k across ranks throw on every rank",
          "[loss][global][errors]") {
  SECTION("N differs on rank 2") {
    moebal_test::FakeWorld world(4);
    const auto errors = world.run([&](int r, moebal_test::FakeWorld::Sync sync) {
      const Index n = r == 2 ? 9 : 8;
      GlobalBatchBalance<double> balance(n, 2);
      balance.count(random_logits(6, n, 1.0, unsigned(r)));
      balance.synchronize(sync);
    });
    for (int r = 0; r < 4; ++r) {
      INFO("rank " << r << ": " << errors[std::size_t(r)]);
      CHECK(errors[std::size_t(r)].find("argument 'sync': expected every rank to use the same") !=
            std::string::npos);
    }
  }
  SECTION("k differs on rank 0 (running mode)") {
    moebal_test::FakeWorld world(3);
    const auto errors = world.run([&](int r, moebal_test::FakeWorld::Sync sync) {
      RunningGlobalBalance<double> running(6, r == 0 ? 1 : 2);
      running.forward(random_logits(6, 6, 1.0, unsigned(r)), sync);
    });
    for (int r = 0; r < 3; ++r) CHECK_FALSE(errors[std::size_t(r)].empty());
  }
  SECTION("an invalid micro-batch on one rank") {
    moebal_test::FakeWorld world(4);
    const auto errors = world.run([&](int r, moebal_test::FakeWorld::Sync sync) {
      GlobalBatchBalance<double> balance(4, 2);
      RowMatrix<double> x = random_logits(6, 4, 1.0, unsigned(r));
      if (r == 1) x(3, 2) = std::nan("");
      balance.count(x);
      balance.synchronize(sync);
    });
    CHECK(errors[1] ==
          "moebal::GlobalBatchBalance::count: argument 'logits': expected finite values or -Inf "
          "(no NaN, no +Inf), got nan at row 3, column 2");
    for (const int r : {0, 2, 3}) {
      CHECK(errors[std::size_t(r)] ==
            "moebal::GlobalBatchBalance::synchronize: argument 'logits': expected a valid "
            "micro-batch on every rank, got an invalid micro-batch on 1 other rank(s)");
    }
  }
}
