// SPDX-License-Identifier: Apache-2.0
// switch_aux_loss against PyTorch autograd: tests/fixtures/switch_aux_loss.txt was written by
// tests/fixtures/generate_fixtures.py, which implements each convention from its framework's
// written definition (Megatron-core switch_load_balancing_loss_func, Hugging Face
// load_balancing_loss_func with attention_mask, GShard/DeepSpeed first choice) in PyTorch and
// differentiates with autograd. It never calls moebal. The tests do not need PyTorch.

#include <cmath>
#include <string>

#include <catch2/catch.hpp>

#include "moebal/losses/switch.hpp"
#include "support/fixtures.hpp"
#include "support/matchers.hpp"

using moebal::Index;
using moebal::RowMatrix;
using moebal_test::as_double;
using moebal_test::IsCloseTo;
using moebal_test::SwitchFixture;

namespace {

moebal::SwitchOptions options_of(const SwitchFixture& c) {
  moebal::SwitchOptions o;
  if (c.convention == "megatron") {
    o.convention = moebal::SwitchConvention::megatron;
  } else if (c.convention == "huggingface") {
    o.convention = moebal::SwitchConvention::huggingface;
  } else if (c.convention == "first_choice") {
    o.convention = moebal::SwitchConvention::first_choice;
  } else {
    FAIL("unknown convention " << c.convention);
  }
  if (c.score == "softmax") {
    o.score = moebal::ScoreFunction::softmax;
  } else if (c.score == "sigmoid") {
    o.score = moebal::ScoreFunction::sigmoid;
  } else {
    FAIL("unknown score " << c.score);
  }
  o.coefficient = c.coefficient;
  if (c.has_mask) o.mask = moebal::TokenMask(c.mask);
  return o;
}

template <class T>
void check_case(const SwitchFixture& c) {
  const bool is_float = std::is_same<T, float>::value;
  const RowMatrix<T> logits = c.logits.cast<T>();  // exact: float cases hold float values
  const auto r = moebal::switch_aux_loss(logits, c.k, options_of(c));
  // Natural scale of the gradient: a N max(f) / T.
  const double tokens = c.has_mask ? double(c.mask.sum()) : double(c.rows);
  const double scale =
      tokens > 0 ? std::abs(c.coefficient) * double(c.cols) * c.f.maxCoeff() / tokens : 1.0;
  const double loss_rtol = is_float ? 2e-6 : 1e-13;
  const double grad_atol = (is_float ? 2e-6 : 1e-14) * scale;
  const double grad_rtol = is_float ? 1e-4 : 1e-10;

  CHECK(std::abs(double(r.loss) - c.loss) <= loss_rtol * std::abs(c.loss) + 1e-30);
  CHECK(r.stats.tokens_per_expert.template cast<double>() == c.counts);
  CHECK(r.stats.first_choice_tokens.template cast<double>() == c.first_counts);
  CHECK(r.stats.tokens == static_cast<std::int64_t>(tokens));
  CHECK_THAT(as_double(RowMatrix<double>(r.stats.f.transpose())),
             IsCloseTo(RowMatrix<double>(c.f.transpose()), is_float ? 1e-7 : 1e-15));
  CHECK_THAT(as_double(RowMatrix<double>(r.stats.P.transpose())),
             IsCloseTo(RowMatrix<double>(c.P.transpose()), is_float ? 1e-6 : 1e-14));
  CHECK_THAT(as_double(r.grad), IsCloseTo(c.grad, grad_atol, grad_rtol));
}

}  // namespace

TEST_CASE("switch_aux_loss matches PyTorch autograd references", "[loss][switch][reference]") {
  const auto cases = moebal_test::load_switch_fixtures();
  REQUIRE(cases.size() >= 60);
  int doubles = 0, floats = 0, masked = 0, sigmoid = 0;
  for (const auto& c : cases) {
    INFO("fixture " << c.name);
    if (c.dtype == "double") {
      ++doubles;
      check_case<double>(c);
    } else {
      ++floats;
      check_case<float>(c);
    }
    masked += c.has_mask ? 1 : 0;
    sigmoid += c.score == "sigmoid" ? 1 : 0;
  }
  // Every combination is present in the file.
  CHECK(doubles > 20);
  CHECK(floats > 20);
  CHECK(masked > 20);
  CHECK(sigmoid > 20);
}
