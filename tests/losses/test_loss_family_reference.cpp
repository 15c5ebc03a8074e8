// SPDX-License-Identifier: Apache-2.0
// The loss family against PyTorch autograd: tests/fixtures/loss_family.txt was written by
// tests/fixtures/generate_loss_family.py, which implements every loss from its written
// definition in PyTorch (never calling moebal). The tests do not need PyTorch.

#include <algorithm>
#include <cmath>
#include <map>
#include <string>

#include <catch2/catch.hpp>

#include "moebal/losses/combined.hpp"
#include "moebal/losses/cv2.hpp"
#include "moebal/losses/deepseek.hpp"
#include "moebal/losses/layers.hpp"
#include "moebal/losses/sequence.hpp"
#include "moebal/losses/switch.hpp"
#include "moebal/losses/z.hpp"
#include "support/fixtures.hpp"
#include "support/matchers.hpp"

using moebal::Index;
using moebal::RowMatrix;
using moebal_test::as_double;
using moebal_test::IsCloseTo;
using moebal_test::LossFixture;

namespace {

moebal::ScoreFunction score_of(const LossFixture& c) {
  return c.score == "sigmoid" ? moebal::ScoreFunction::sigmoid : moebal::ScoreFunction::softmax;
}

moebal::SwitchConvention convention_of(const std::string& name) {
  if (name == "huggingface") return moebal::SwitchConvention::huggingface;
  if (name == "megatron") return moebal::SwitchConvention::megatron;
  throw std::runtime_error("unknown convention " + name);
}

moebal::SequenceLayout layout_of(const LossFixture& c) {
  const std::string& kind = c.param("layout");
  if (kind == "segments") {
    const auto& tokens = c.params.at("segments");
    std::vector<Index> lengths;
    for (std::size_t i = 1; i < tokens.size(); ++i) lengths.push_back(std::stoll(tokens[i]));
    REQUIRE(lengths.size() == std::stoul(tokens[0]));
    return moebal::SequenceLayout::segments(lengths);
  }
  const Index seq_len = std::stoll(c.param("seq_len"));
  return kind == "batch_major" ? moebal::SequenceLayout::batch_major(seq_len)
                               : moebal::SequenceLayout::sequence_major(seq_len);
}

struct Output {
  double value = 0.0;
  RowMatrix<double> grad;
};

template <class T>
Output run(const LossFixture& c) {
  const RowMatrix<T> x = c.logits.cast<T>();
  const moebal::TokenMask mask = c.has_mask ? moebal::TokenMask(c.mask) : moebal::TokenMask{};
  Output out;
  if (c.kind == "z") {
    moebal::ZLossOptions o;
    o.coefficient = c.coefficient;
    o.mask = mask;
    const auto r = moebal::z_loss(x, o);
    out.value = double(r.loss);
    out.grad = as_double(r.grad);
  } else if (c.kind == "cv2_importance" || c.kind == "cv2_load") {
    moebal::Cv2Options o;
    o.coefficient = c.coefficient;
    o.score = score_of(c);
    o.mask = mask;
    if (c.has("gates") && c.param("gates") == "topk") o.gates = moebal::ImportanceGates::topk;
    if (c.has("variance") && c.param("variance") == "unbiased") {
      o.variance = moebal::Cv2Variance::unbiased;
    }
    if (c.kind == "cv2_load") {
      const auto r = moebal::cv2_load(x, c.k, o);
      out.value = double(r.loss);
      out.grad = as_double(r.grad);
    } else {
      const auto r = moebal::cv2_importance_loss(x, c.k, o);
      out.value = double(r.loss);
      out.grad = as_double(r.grad);
    }
  } else if (c.kind == "sequence") {
    moebal::SequenceOptions o;
    o.coefficient = c.coefficient;
    o.score = score_of(c);
    o.convention = convention_of(c.param("convention"));
    o.mask = mask;
    if (c.has("mask_mode") && c.param("mask_mode") == "megatron_mean") {
      o.mask_mode = moebal::SequenceMaskMode::megatron_mean_length;
    }
    const auto r = moebal::sequence_aux_loss(x, c.k, layout_of(c), o);
    out.value = double(r.loss);
    out.grad = as_double(r.grad);
  } else if (c.kind == "device" || c.kind == "comm") {
    moebal::DeviceBalanceOptions o;
    o.coefficient = c.coefficient;
    o.score = score_of(c);
    o.mask = mask;
    o.devices = std::stoll(c.param("devices"));
    if (c.kind == "comm") o.max_devices = std::stoll(c.param("max_devices"));
    const auto r = c.kind == "device" ? moebal::device_balance_loss(x, c.k, o)
                                      : moebal::communication_balance_loss(x, c.k, o);
    out.value = double(r.loss);
    out.grad = as_double(r.grad);
  } else if (c.kind == "switch_layers") {
    const Index layers = std::stoll(c.param("layers"));
    const Index rows = c.rows / layers;
    std::vector<RowMatrix<T>> blocks;
    for (Index l = 0; l < layers; ++l) blocks.push_back(x.middleRows(l * rows, rows));
    const std::string& aggregation = c.param("aggregation");
    moebal::SwitchOptions o;
    o.coefficient = c.coefficient;
    o.score = score_of(c);
    o.mask = mask;  // T_total elements: one per stacked row
    // Megatron-core and MegaBlocks sum/average per-layer Megatron losses; HF pools.
    o.convention = aggregation == "pooled" ? moebal::SwitchConvention::huggingface
                                           : moebal::SwitchConvention::megatron;
    const auto mode = aggregation == "sum"    ? moebal::LayerAggregation::sum
                      : aggregation == "mean" ? moebal::LayerAggregation::mean
                                              : moebal::LayerAggregation::pooled;
    const auto r = moebal::switch_aux_loss_layers(blocks, c.k, o, mode);
    out.value = double(r.loss);
    out.grad.resize(c.rows, c.cols);
    for (Index l = 0; l < layers; ++l) out.grad.middleRows(l * rows, rows) = as_double(r.grads[l]);
  } else if (c.kind == "combined") {
    moebal::CombinedOptions o;
    o.score = score_of(c);
    o.mask = mask;
    o.weights.switch_loss = std::stod(c.param("weights", 0));
    o.weights.z = std::stod(c.param("weights", 1));
    o.weights.sequence = std::stod(c.param("weights", 2));
    o.weights.cv2_importance = std::stod(c.param("weights", 3));
    o.layout = moebal::SequenceLayout::sequence_major(std::stoll(c.param("seq_len")));
    const auto r = moebal::combined_aux_loss(x, c.k, o);
    out.value = double(r.loss);
    out.grad = as_double(r.grad);
  } else {
    FAIL("unknown kind " << c.kind);
  }
  return out;
}

}  // namespace

TEST_CASE("the loss family matches PyTorch autograd references", "[loss][reference]") {
  const auto cases = moebal_test::load_loss_fixtures();
  REQUIRE(cases.size() >= 100);
  std::map<std::string, int> kinds;
  for (const auto& c : cases) {
    INFO("fixture " << c.name);
    ++kinds[c.kind];
    const Output out = c.is_float() ? run<float>(c) : run<double>(c);
    const double rtol = c.is_float() ? 5e-5 : 1e-11;
    CHECK(std::abs(out.value - c.value) <= rtol * std::abs(c.value) + (c.is_float() ? 1e-7 : 1e-15));
    if (c.has_closed_form) {
      CHECK(std::abs(out.value - c.closed_form) <= rtol * std::abs(c.closed_form) + 1e-12);
    }
    // The gradient's natural scale: a N / T (a loss of order a spread over T rows). Where the
    // exact gradient vanishes (k = N, top-1 renormalized gates) both sides hold rounding noise
    // of this scale times the precision.
    const double coefficient = c.kind == "combined" ? 1.0 : std::abs(c.coefficient);
    const double scale = std::max({c.grad.cwiseAbs().maxCoeff(),
                                   coefficient * double(c.cols) / double(c.rows),
                                   std::abs(c.value) / double(c.rows)});
    const double atol = (c.is_float() ? 2e-5 : 1e-12) * scale;
    CHECK_THAT(out.grad, IsCloseTo(c.grad, atol, c.is_float() ? 2e-3 : 1e-9));
    if (c.has_mask) {
      for (Index t = 0; t < c.rows; ++t) {
        if (c.mask[t] == 0) CHECK(out.grad.row(t).isZero(0));
      }
    }
  }
  for (const char* kind :
       {"z", "cv2_importance", "cv2_load", "sequence", "device", "comm", "switch_layers",
        "combined"}) {
    INFO("kind " << kind);
    CHECK(kinds[kind] >= 5);
  }
}
