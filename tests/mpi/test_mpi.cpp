// SPDX-License-Identifier: Apache-2.0
// The global-batch losses over real processes: run by CTest as `mpiexec -n 4`. Every rank
// checks its own results; a failure on any rank fails the run.

#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <mpi.h>

#include <cmath>
#include <string>

#include "moebal/mpi.hpp"
#include "support/global_batch_fixtures.hpp"
#include "support/global_batch_scenario.hpp"
#include "support/matchers.hpp"
#include "support/random.hpp"

namespace {

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

int world_size() {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

}  // namespace

TEST_CASE("MPI: 4 ranks x 2 micro-batches equal the concatenated global batch", "[mpi]") {
  REQUIRE(world_size() == 4);
  const moebal_test::GlobalScenario scenario;
  const int r = world_rank();
  for (const auto score : {moebal::ScoreFunction::softmax, moebal::ScoreFunction::sigmoid}) {
    moebal::GlobalBatchOptions options;
    options.score = score;
    options.coefficient = 0.01;
    const auto result =
        moebal_test::run_exact_rank(scenario, r, moebal::MpiAllreduce(MPI_COMM_WORLD), options);
    double local = 0.0;
    for (std::size_t j = 0; j < result.shares.size(); ++j) {
      INFO("rank " << r << ", micro-batch " << j);
      CHECK(std::abs(result.shares[j] - result.expected_shares[j]) <=
            1e-12 * std::abs(result.expected_shares[j]));
      CHECK_THAT(result.grads[j], moebal_test::IsCloseTo(result.expected_grads[j], 1e-17, 1e-12));
      local += result.shares[j];
    }
    // The shares of every rank sum to the global-batch Switch loss.
    double total = 0.0;
    MPI_Allreduce(&local, &total, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    const moebal::RowMatrix<double> all = scenario.all_logits();
    const Eigen::VectorXi mask = scenario.all_mask();
    moebal::SwitchOptions so;
    so.score = score;
    so.coefficient = 0.01;
    so.mask = moebal::TokenMask(mask);
    CHECK(total == Approx(moebal::switch_aux_loss(all, 2, so).loss).epsilon(1e-12));
  }
}

TEST_CASE("MPI: running and exact fixtures with 4 ranks", "[mpi][reference]") {
  using namespace moebal_test::global_fixture;
  const auto cases = load();
  int checked = 0;
  for (const auto& c : cases) {
    if (c.ranks != world_size()) continue;
    INFO("fixture " << c.name << ", rank " << world_rank());
    const int r = world_rank();
    const auto out = c.is_float() ? run_rank<float>(c, r, moebal::MpiAllreduce())
                                  : run_rank<double>(c, r, moebal::MpiAllreduce());
    std::size_t j = 0;
    for (const auto& b : c.batches) {
      if (b.rank != r) continue;
      compare(c, b, out[j].value, out[j].grad, b.value, b.grad);
      if (c.kind == "running") {
        compare(c, b, out[j].megatron_value, out[j].megatron_grad, b.megatron_value, b.megatron_grad);
      }
      ++j;
    }
    ++checked;
  }
  CHECK(checked >= 4);
}

TEST_CASE("MPI: mismatched N or an invalid micro-batch throw on every rank", "[mpi][errors]") {
  const int r = world_rank();
  const moebal::MpiAllreduce sync;
  {
    const moebal::Index n = r == 2 ? 9 : 8;
    moebal::GlobalBatchBalance<double> balance(n, 2);
    balance.count(moebal_test::random_logits(6, n, 1.0, unsigned(r)));
    std::string message;
    try {
      balance.synchronize(sync);
    } catch (const moebal::invalid_argument& e) {
      message = e.what();
    }
    INFO("rank " << r << ": " << message);
    CHECK(message.find("argument 'sync': expected every rank to use the same") != std::string::npos);
  }
  {
    moebal::RunningGlobalBalance<double> running(4, 2);
    moebal::RowMatrix<double> x = moebal_test::random_logits(6, 4, 1.0, unsigned(r));
    if (r == 3) x(0, 0) = std::nan("");
    CHECK_THROWS_AS(running.forward(x, sync), moebal::invalid_argument);
  }
  // The ranks are still in step: a final collective completes.
  int one = 1, total = 0;
  MPI_Allreduce(&one, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  CHECK(total == 4);
}

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const int result = Catch::Session().run(argc, argv);
  int failures = result, worst = 0;
  MPI_Allreduce(&failures, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst == 0 ? 0 : 1;
}
