// SPDX-License-Identifier: Apache-2.0
#include <cmath>

#include <catch2/catch.hpp>

#include "moebal/core/scores.hpp"
#include "moebal/routers/presets.hpp"
#include "support/matchers.hpp"
#include "support/random.hpp"

using moebal::Index;
using moebal::RowMatrix;
namespace presets = moebal::presets;
using moebal_test::random_logits;

TEST_CASE("presets: each reproduces its framework's formula", "[router][presets]") {
  const RowMatrix<double> x = random_logits(40, 8, 1.5, 21);
  const RowMatrix<double> p = moebal::softmax(x);
  const RowMatrix<double> s = 1.0 / (1.0 + (-x.array()).exp());

  SECTION("HF Mixtral: renormalized top-k softmax") {
    const auto r = moebal::route(x, 2, presets::hf_mixtral());
    for (Index t = 0; t < 40; ++t) {
      const double a = p(t, r.indices(t, 0)), b = p(t, r.indices(t, 1));
      CHECK(r.weights(t, 0) == Approx(a / (a + b)).epsilon(1e-14));
      CHECK(a >= b);
    }
    // Qwen with norm_topk_prob is the same router; without it the raw probabilities.
    CHECK(moebal::route(x, 2, presets::hf_qwen_moe(true)).weights == r.weights);
    const auto raw = moebal::route(x, 2, presets::hf_olmoe(false));
    CHECK(raw.weights(3, 1) == Approx(p(3, raw.indices(3, 1))).epsilon(1e-14));
  }

  SECTION("Megatron-core post-softmax equals renormalized pre-softmax top-k") {
    const auto post = moebal::route(x, 3, presets::megatron_softmax());
    const auto mixtral = moebal::route(x, 3, presets::hf_mixtral());
    CHECK(post.indices == mixtral.indices);
    CHECK_THAT(post.weights, moebal_test::IsCloseTo(mixtral.weights, 1e-15, 1e-13));
    const auto pre = moebal::route(x, 3, presets::megatron_softmax(true, 2.0));
    CHECK(pre.weights(0, 0) == Approx(2.0 * p(0, pre.indices(0, 0))).epsilon(1e-14));
  }

  SECTION("Megatron-core sigmoid: normalized only for k > 1") {
    const auto one = moebal::route(x, 1, presets::megatron_sigmoid(1));
    CHECK(one.weights(5, 0) == Approx(s(5, one.indices(5, 0))).epsilon(1e-14));
    const auto two = moebal::route(x, 2, presets::megatron_sigmoid(2, {}, 2.5));
    CHECK(two.weights.row(5).sum() == Approx(2.5).epsilon(1e-14));
  }

  SECTION("DeepSpeed top-2 and Switch top-1") {
    const auto top2 = moebal::route(x, 2, presets::deepspeed_topk());
    for (Index t = 0; t < 40; ++t) {
      Index first = 0;
      for (Index j = 1; j < 8; ++j) if (x(t, j) > x(t, first)) first = j;
      CHECK(top2.indices(t, 0) == first);
      const double a = p(t, top2.indices(t, 0)), b = p(t, top2.indices(t, 1));
      CHECK(top2.weights(t, 1) == Approx(b / (a + b)).epsilon(1e-14));
    }
    const auto top1 = moebal::route(x, 1, presets::hf_switch_top1());
    CHECK(top1.weights(7, 0) == Approx(p.row(7).maxCoeff()).epsilon(1e-15));
    CHECK(moebal::route(x, 1, presets::deepspeed_top1()).indices == top1.indices);
    // Tutel normalizes only for k > 1.
    CHECK(moebal::route(x, 1, presets::tutel_topk(1)).weights == top1.weights);
  }

  SECTION("DeepSeek-V2 scales only when it does not normalize") {
    const auto normalized = moebal::route(x, 2, presets::deepseek_v2(2, true, 16.0));
    for (Index t = 0; t < 40; ++t) CHECK(normalized.weights.row(t).sum() == Approx(1.0).epsilon(1e-14));
    const auto scaled = moebal::route(x, 2, presets::deepseek_v2(2, false, 16.0));
    CHECK(scaled.weights(0, 0) == Approx(16.0 * p(0, scaled.indices(0, 0))).epsilon(1e-14));
    const auto grouped = moebal::route(x, 2, presets::deepseek_v2(2, true, 16.0, 4, 1));
    for (Index t = 0; t < 40; ++t) CHECK(grouped.indices(t, 0) / 2 == grouped.indices(t, 1) / 2);
  }

  SECTION("loss presets pair each router with its framework's balance loss") {
    CHECK(presets::megatron_loss(0.01).convention == moebal::SwitchConvention::megatron);
    CHECK(presets::megatron_loss(0.01, true).score == moebal::ScoreFunction::sigmoid);
    CHECK(presets::hf_loss(0.02).convention == moebal::SwitchConvention::huggingface);
    CHECK(presets::hf_loss(0.02).coefficient == 0.02);
    CHECK(presets::first_choice_loss(1.0).convention == moebal::SwitchConvention::first_choice);
  }

  SECTION("DeepSeek-V3: HF fills dropped groups with 0, the official gate with -Inf") {
    // Official gate without bias: group score = the group's maximum.
    const auto official = moebal::route(x, 2, presets::deepseek_v3_official(true, 4, 2, 2.5));
    for (Index t = 0; t < 40; ++t) CHECK(official.weights.row(t).sum() == Approx(2.5).epsilon(1e-14));
    const auto hf = moebal::route(x, 2, presets::hf_deepseek_v3(4, 2, true, 2.5, Eigen::VectorXd::Zero(8)));
    for (Index t = 0; t < 40; ++t) CHECK(hf.weights.row(t).sum() == Approx(2.5).epsilon(1e-14));
  }
}
