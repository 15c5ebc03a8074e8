// SPDX-License-Identifier: Apache-2.0
#include <catch2/catch.hpp>

#include "moebal/losses/layers.hpp"
#include "support/matchers.hpp"
#include "support/random.hpp"

using moebal::Index;
using moebal::LayerAggregation;
using moebal::RowMatrix;
using moebal::SwitchOptions;
using moebal_test::IsCloseTo;
using moebal_test::random_logits;

TEST_CASE("switch_aux_loss_layers: sum, mean and pooled", "[loss][layers]") {
  const std::vector<RowMatrix<double>> layers = {random_logits(20, 6, 1.0, 61),
                                                 random_logits(20, 6, 2.0, 62),
                                                 random_logits(20, 6, 0.5, 63)};
  Eigen::VectorXi mask = Eigen::VectorXi::Ones(20);
  mask[4] = 0;
  SwitchOptions o;
  o.mask = moebal::TokenMask(mask);
  o.coefficient = 0.1;

  SECTION("sum adds the per-layer losses and gradients; mean divides by the layer count") {
    const auto s = moebal::switch_aux_loss_layers(layers, 2, o, LayerAggregation::sum);
    const auto m = moebal::switch_aux_loss_layers(layers, 2, o, LayerAggregation::mean);
    double total = 0.0;
    for (std::size_t l = 0; l < layers.size(); ++l) {
      const auto single = moebal::switch_aux_loss(layers[l], 2, o);
      total += single.loss;
      CHECK(s.layer_losses[l] == single.loss);
      CHECK(s.grads[l] == single.grad);
      CHECK_THAT(m.grads[l], IsCloseTo(RowMatrix<double>(single.grad / 3.0), 1e-17, 1e-14));
    }
    CHECK(s.loss == Approx(total).epsilon(1e-14));
    CHECK(m.loss == Approx(total / 3).epsilon(1e-14));
    // Coefficient translation: sum with a equals mean with a * n_layers.
    SwitchOptions scaled = o;
    scaled.coefficient = 0.3;
    CHECK(moebal::switch_aux_loss_layers(layers, 2, scaled, LayerAggregation::mean).loss ==
          Approx(s.loss).epsilon(1e-14));
  }

  SECTION("pooled equals the Switch loss on the stacked rows (Hugging Face)") {
    o.convention = moebal::SwitchConvention::huggingface;
    const auto p = moebal::switch_aux_loss_layers(layers, 2, o, LayerAggregation::pooled);
    RowMatrix<double> stacked(60, 6);
    Eigen::VectorXi stacked_mask(60);
    for (Index l = 0; l < 3; ++l) {
      stacked.middleRows(l * 20, 20) = layers[std::size_t(l)];
      stacked_mask.segment(l * 20, 20) = mask;
    }
    SwitchOptions so = o;
    so.mask = moebal::TokenMask(stacked_mask);
    const auto ref = moebal::switch_aux_loss(stacked, 2, so);
    CHECK(p.loss == ref.loss);
    for (Index l = 0; l < 3; ++l) CHECK(p.grads[std::size_t(l)] == ref.grad.middleRows(l * 20, 20));
    double shares = 0.0;
    for (const double v : p.layer_losses) shares += v;
    CHECK(shares == Approx(p.loss).epsilon(1e-13));
    CHECK(p.stats.tokens == 57);
  }

  SECTION("a per-layer mask of n_layers T elements") {
    Eigen::VectorXi per_layer = Eigen::VectorXi::Ones(60);
    per_layer[3] = 0;
    per_layer[20 + 7] = 0;
    o.mask = moebal::TokenMask(per_layer);
    const auto s = moebal::switch_aux_loss_layers(layers, 2, o, LayerAggregation::sum);
    const Eigen::VectorXi layer1 = per_layer.segment(20, 20);
    SwitchOptions single = o;
    single.mask = moebal::TokenMask(layer1);
    CHECK(s.layer_losses[1] == moebal::switch_aux_loss(layers[1], 2, single).loss);
    CHECK(s.grads[1].row(7).isZero(0));
    CHECK_FALSE(s.grads[0].row(7).isZero(0));
  }
}

TEST_CASE("switch_aux_loss_layers: bad input", "[loss][layers][errors]") {
  const std::vector<RowMatrix<double>> none;
  CHECK_THROWS_WITH(moebal::switch_aux_loss_layers(none, 1, {}, LayerAggregation::sum),
                    "moebal::switch_aux_loss_layers: argument 'layers': expected at least one "
                    "layer, got an empty list");
  const std::vector<RowMatrix<double>> ragged = {RowMatrix<double>::Zero(4, 3),
                                                 RowMatrix<double>::Zero(5, 3)};
  CHECK_THROWS_WITH(moebal::switch_aux_loss_layers(ragged, 1, {}, LayerAggregation::mean),
                    "moebal::switch_aux_loss_layers: argument 'layers': expected every layer of "
                    "layer 0's shape 4 x 3, got layer 1 of shape 5 x 3");
  const std::vector<RowMatrix<double>> two = {RowMatrix<double>::Zero(4, 3),
                                              RowMatrix<double>::Zero(4, 3)};
  const Eigen::VectorXi wrong = Eigen::VectorXi::Ones(5);
  SwitchOptions o;
  o.mask = moebal::TokenMask(wrong);
  CHECK_THROWS_WITH(moebal::switch_aux_loss_layers(two, 1, o, LayerAggregation::pooled),
                    "moebal::switch_aux_loss_layers: argument 'mask': expected one element per "
                    "token (length T = 4) or per stacked row (length n_layers T = 8), got length 5");
}
