// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// The Switch loss over many MoE layers, aggregated the way each framework does it:
///   sum    (Megatron-core): L = sum_l L_l, each layer's own Switch loss with coefficient a
///   mean   (MegaBlocks `batched_load_balancing_loss`): L = (1/n_layers) sum_l L_l
///   pooled (Hugging Face transformers `load_balancing_loss_func`, which concatenates every
///          layer's gate logits): one Switch loss over all layers' rows stacked, so f and P
///          mix layers and the products f_i P_i cross layers.
/// Coefficients translate between sum and mean exactly: sum with a equals mean with
/// a * n_layers. Pooled is not a rescaling of either: its f and P are averages over the
/// layers, so L_pooled = a N sum_i fbar_i Pbar_i includes cross-layer products f_i^l P_i^m and
/// can be above or below the mean of the per-layer losses. At perfect balance mean and pooled
/// both give the convention's balanced value, and sum gives n_layers times it; so a pooled
/// coefficient a corresponds to a mean coefficient a and a sum coefficient a / n_layers only in
/// that balanced limit.
/// This one-line helper allocates; in a training loop the same results come without
/// allocation from one `SwitchAuxLoss` per layer (sum: backward with scale 1; mean: scale
/// 1 / n_layers) or, for pooled, one `SwitchAuxLoss` over a buffer holding the stacked rows.
/// Every layer has the same T x N shape. The mask has either T elements, applied to every
/// layer (as Hugging Face repeats its attention mask per layer), or n_layers T elements, one
/// per row of the layers stacked layer-major.

#include <cstdint>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/scores.hpp"
#include "moebal/core/types.hpp"
#include "moebal/detail/input.hpp"
#include "moebal/losses/switch.hpp"

namespace moebal {

/// How per-layer losses combine.
enum class LayerAggregation {
  /// L = sum_l L_l (Megatron-core adds every layer's aux loss).
  sum,
  /// L = (1/n_layers) sum_l L_l (MegaBlocks).
  mean,
  /// One loss over all layers' rows stacked (Hugging Face transformers).
  pooled,
};

/// Result of `switch_aux_loss_layers`.
template <class Scalar>
struct LayersResult {
  /// The aggregated loss.
  Scalar loss = Scalar(0);
  /// d L / d logits of each layer, T x N row-major each.
  std::vector<RowMatrix<Scalar>> grads;
  /// Each layer's own Switch loss L_l (for sum and mean; for pooled, each layer's share of
  /// the pooled value, a N sum_i f_i S_i^l / T_total, which sums to the pooled loss).
  std::vector<double> layer_losses;
  /// Statistics of the pooled rows (every aggregation): counts, f and P over all layers.
  SwitchStats stats;
};

/// The Switch loss over layers with the chosen aggregation, and each layer's gradient.
/// @param layers one T x N logits matrix per layer (any Eigen dense type of float, double,
///   Eigen::bfloat16 or Eigen::half, all the same shape). The layers are stacked into one
///   matrix for the pooled statistics (a copy of the input, in its own type).
/// @param k experts per token. @param options convention, score, coefficient, mask (length T
///   for every layer, or n_layers T layer-major). @param aggregation sum, mean or pooled.
/// @throws moebal::invalid_argument for no layer, layers of different shapes, and as
///   `switch_aux_loss`.
template <class Matrix>
LayersResult<compute_type_t<typename Matrix::Scalar>> switch_aux_loss_layers(
    const std::vector<Matrix>& layers, Index k, const SwitchOptions& options,
    LayerAggregation aggregation) {
  using Scalar = typename Matrix::Scalar;
  using Compute = compute_type_t<Scalar>;
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::switch_aux_loss_layers: logits must be float, double, Eigen::bfloat16 "
                "or Eigen::half");
  constexpr const char* function = "moebal::switch_aux_loss_layers";
  if (layers.empty()) {
    detail::throw_invalid(function, "layers", "at least one layer", "an empty list");
  }
  if (aggregation != LayerAggregation::sum && aggregation != LayerAggregation::mean &&
      aggregation != LayerAggregation::pooled) {
    detail::throw_invalid(function, "aggregation", "sum, mean or pooled",
                          detail::concat(int(aggregation)));
  }
  const Index rows = layers[0].rows(), cols = layers[0].cols();
  detail::check_logits_shape(function, rows, cols);
  for (std::size_t l = 1; l < layers.size(); ++l) {
    if (layers[l].rows() != rows || layers[l].cols() != cols) {
      detail::throw_invalid(function, "layers",
                            detail::concat("every layer of layer 0's shape ",
                                           detail::shape_string(rows, cols)),
                            detail::concat("layer ", l, " of shape ",
                                           detail::shape_string(layers[l].rows(), layers[l].cols())));
    }
  }
  detail::check_switch_config(function, cols, k, options);
  const Index count = static_cast<Index>(layers.size());
  const bool per_layer_mask = !options.mask.empty() && options.mask.size() == rows * count &&
                              count > 1;
  if (!options.mask.empty() && options.mask.size() != rows && !per_layer_mask) {
    detail::throw_invalid(function, "mask",
                          detail::concat("one element per token (length T = ", rows,
                                         ") or per stacked row (length n_layers T = ",
                                         rows * count, ")"),
                          detail::concat("length ", options.mask.size()));
  }
  detail::check_mask(function, options.mask, per_layer_mask ? rows * count : rows);
  LayersResult<Compute> result;
  result.layer_losses.assign(layers.size(), 0.0);
  SwitchOptions loss_options = options;
  loss_options.mask = TokenMask{};

  // Pooled: stack the layers (layer-major) and repeat the mask per layer.
  RowMatrix<Scalar> stacked(rows * count, cols);
  Eigen::VectorXi repeated;
  for (Index l = 0; l < count; ++l) stacked.middleRows(l * rows, rows) = layers[std::size_t(l)];
  if (!options.mask.empty()) {
    repeated.resize(rows * count);
    for (Index l = 0; l < count; ++l) {
      for (Index t = 0; t < rows; ++t) {
        repeated[l * rows + t] = options.mask.is_real(per_layer_mask ? l * rows + t : t) ? 1 : 0;
      }
    }
  }
  const TokenMask stacked_mask = options.mask.empty() ? TokenMask{} : TokenMask(repeated);
  SwitchAuxLoss<Scalar> pooled(cols, k, loss_options);
  RowMatrix<Compute> stacked_grad(rows * count, cols);
  const Compute pooled_value = pooled.forward_backward(stacked, stacked_grad, stacked_mask);
  result.stats = pooled.stats();
  result.grads.resize(layers.size());

  if (aggregation == LayerAggregation::pooled) {
    result.loss = pooled_value;
    const double tokens = pooled.statistics().tokens();
    const Eigen::VectorXd& f = result.stats.f;
    for (Index l = 0; l < count; ++l) {
      result.grads[std::size_t(l)] = stacked_grad.middleRows(l * rows, rows);
    }
    // Each layer's share of the pooled value: a N sum_i f_i S_i^l / T_total.
    if (tokens > 0) {
      const RowMatrix<Compute> q =
          detail::scores_impl<Scalar>(function, detail::RowInput<Scalar>(stacked), options.score);
      for (Index l = 0; l < count; ++l) {
        Eigen::VectorXd s = Eigen::VectorXd::Zero(cols);
        for (Index t = 0; t < rows; ++t) {
          if (!stacked_mask.is_real(l * rows + t)) continue;
          s += q.row(l * rows + t).template cast<double>().transpose();
        }
        result.layer_losses[std::size_t(l)] = options.coefficient * double(cols) * f.dot(s) / tokens;
      }
    }
    return result;
  }

  const double weight = aggregation == LayerAggregation::mean ? 1.0 / double(count) : 1.0;
  SwitchAuxLoss<Scalar> single(cols, k, loss_options);
  double total = 0.0;
  for (Index l = 0; l < count; ++l) {
    RowMatrix<Compute>& grad = result.grads[std::size_t(l)];
    grad.resize(rows, cols);
    const TokenMask layer_mask =
        options.mask.empty() ? TokenMask{} : TokenMask(repeated.data() + l * rows, rows);
    const Compute value =
        single.forward_backward(layers[std::size_t(l)], grad, layer_mask, Compute(weight));
    result.layer_losses[std::size_t(l)] = double(value);
    total += double(value);
  }
  result.loss = static_cast<Compute>(total * weight);
  return result;
}

}  // namespace moebal
