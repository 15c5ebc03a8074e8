// SPDX-License-Identifier: Apache-2.0
// Global-batch losses against PyTorch autograd: tests/fixtures/global_batch.txt was written by
// tests/fixtures/generate_global_batch.py from the written definitions (Megatron-core
// global_aux_loss for the running mode, Qiu et al. 2025 for the exact mode), simulating R
// data-parallel ranks. Here the R ranks are threads of one process (support/fake_ranks.hpp).

#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "support/fake_ranks.hpp"
#include "support/global_batch_fixtures.hpp"

using namespace moebal_test::global_fixture;


TEST_CASE("global-batch losses match PyTorch references over simulated ranks",
          "[loss][global][reference]") {
  const auto cases = load();
  REQUIRE(cases.size() >= 30);
  int running = 0, exact = 0;
  for (const auto& c : cases) {
    INFO("fixture " << c.name);
    (c.kind == "running" ? running : exact) += 1;
    moebal_test::FakeWorld world(c.ranks);
    std::vector<std::vector<Output>> outputs(std::size_t(c.ranks));
    const auto errors = world.run([&](int r, moebal_test::FakeWorld::Sync sync) {
      outputs[std::size_t(r)] = c.is_float() ? run_rank<float>(c, r, sync) : run_rank<double>(c, r, sync);
    });
    for (int r = 0; r < c.ranks; ++r) {
      INFO("rank " << r);
      REQUIRE(errors[std::size_t(r)].empty());
      std::size_t j = 0;
      for (const auto& b : c.batches) {
        if (b.rank != r) continue;
        INFO("micro-batch " << b.micro);
        const Output& o = outputs[std::size_t(r)][j++];
        compare(c, b, o.value, o.grad, b.value, b.grad);
        if (c.kind == "running") compare(c, b, o.megatron_value, o.megatron_grad, b.megatron_value, b.megatron_grad);
      }
    }
  }
  CHECK(running >= 10);
  CHECK(exact >= 10);
}
