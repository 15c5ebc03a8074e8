// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// Expert capacity and token dropping after a router's top-k (see routers/router.hpp).
///
/// Capacity C per expert, each formula named after its source (T tokens, N experts, k slots,
/// cf the capacity factor):
///   megatron:  ceil(T k cf / N), at least `min_capacity` (Megatron-core `get_capacity`)
///   deepspeed: max(ceil(T cf k / N), min_capacity) (DeepSpeed `_capacity`; top-2 passes 2 cf)
///   tutel:     k * int(cf * ceil(T / N)) rounded up to a multiple of `alignment`; cf = 0 means
///              dropless (C = the largest count), cf < 0 capped dropless (C = min(largest count,
///              k * int(-cf * ceil(T / N))))
///   absolute:  `absolute_capacity` (HF Switch Transformers `expert_capacity`)
/// Capacities are saturated at the largest Index (2^63 - 1) instead of overflowing: a factor of
/// 1e300 or an alignment of 2^63 - 1 gives a capacity that never drops a slot.
/// Priority, i.e. which of an expert's tokens are kept when more than C chose it:
///   weight:               the largest routing weights (Megatron-core drop policy "probs")
///   position:             the earliest tokens (Megatron-core "position")
///   choice_then_position: every first choice before any second choice, each by position
///                         (DeepSpeed top-2, Tutel, fairseq)
///   random:               a seeded random order (DeepSpeed random token selection)
///   batch_prioritized:    choice by choice, tokens ordered by their best weight, largest first
///                         (Tutel, flaxformer batch-prioritized routing)
/// Every order is deterministic: ties go to the lower token index, then the lower slot.
/// Dropped slots get weight 0 and zero gradient. `renormalize` divides each token's kept weights
/// by max(their sum, float32 epsilon) (DeepSpeed top-2 does; Megatron-core does not).
/// `pad_to_capacity` (Megatron-core `moe_pad_expert_input_to_capacity`) fills every expert up to
/// min(C, T) with tokens not routed to it, weight 0, lowest token indices first (`padded`,
/// `dense_map`). The result also holds the dense T x N map and weights.
/// The balance losses should take counts from the plain top-k or the routed-before-capacity
/// counts, never from a padded map (Megatron-LM issue #1617: padded maps made the loss constant).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"
#include "moebal/detail/input.hpp"

namespace moebal {

/// How the capacity is computed.
enum class CapacityFormula { megatron, deepspeed, tutel, absolute };

/// Which tokens an over-subscribed expert keeps.
enum class DropPriority { weight, position, choice_then_position, random, batch_prioritized };

/// Options of capacity and dropping.
struct CapacityOptions {
  CapacityFormula formula = CapacityFormula::megatron;
  /// cf: finite; >= 0 except for the Tutel formula (< 0: capped dropless).
  double capacity_factor = 1.0;
  /// Lower bound of the capacity (Megatron-core, DeepSpeed); 0 = none.
  Index min_capacity = 0;
  /// Tutel: round the capacity up to a multiple of this (>= 1).
  Index alignment = 1;
  /// The capacity of `CapacityFormula::absolute` (>= 1).
  Index absolute_capacity = 0;
  DropPriority priority = DropPriority::weight;
  /// Divide each token's kept weights by max(their sum, float32 epsilon) after dropping.
  bool renormalize = false;
  /// Fill every expert up to the capacity with unrouted tokens of weight 0.
  bool pad_to_capacity = false;
  /// Seed of `DropPriority::random` (std::mt19937_64; identical on every machine).
  std::uint64_t seed = 0;
};

/// The outcome of dropping, for T tokens and k slots.
template <class Scalar>
struct CapacityResult {
  /// C, the capacity of every expert.
  Index capacity = 0;
  /// T x k: 1 where the slot was kept, 0 where it was dropped.
  Eigen::Matrix<std::uint8_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> kept;
  /// T x k weights after dropping (0 for dropped slots; renormalized if asked).
  RowMatrix<Scalar> weights;
  /// Per expert: slots routed to it (before capacity) and kept (after).
  CountVector counts_before, counts_after;
  /// Per expert: padding tokens added by `pad_to_capacity` (0 otherwise).
  CountVector padded;
  /// The same as dense T x N matrices (Megatron-core's routing map and probs): 1 where token t
  /// goes to expert e (kept, or padding), and its weight (0 for padding).
  Eigen::Matrix<std::uint8_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> dense_map;
  RowMatrix<Scalar> dense_weights;
  /// Per expert: dropped / routed (0 for an expert nobody chose); overall: dropped / (T k).
  Eigen::VectorXd dropped_fraction;
  double dropped_fraction_overall = 0.0;
};

namespace detail {

inline void check_capacity_options(const char* function, const CapacityOptions& o) {
  check_finite_parameter(function, "options.capacity_factor", o.capacity_factor);
  if (o.formula != CapacityFormula::tutel && o.formula != CapacityFormula::absolute &&
      !(o.capacity_factor > 0)) {
    throw_invalid(function, "options.capacity_factor", "a capacity factor > 0",
                  concat(o.capacity_factor));
  }
  if (o.min_capacity < 0) {
    throw_invalid(function, "options.min_capacity", "a value >= 0", concat(o.min_capacity));
  }
  if (o.alignment < 1) throw_invalid(function, "options.alignment", "a value >= 1", concat(o.alignment));
  if (o.formula == CapacityFormula::absolute && o.absolute_capacity < 1) {
    throw_invalid(function, "options.absolute_capacity", "a capacity >= 1",
                  concat(o.absolute_capacity));
  }
  if (int(o.formula) < 0 || int(o.formula) > 3) {
    throw_invalid(function, "options.formula", "megatron, deepspeed, tutel or absolute", concat(int(o.formula)));
  }
  if (int(o.priority) < 0 || int(o.priority) > 4) {
    throw_invalid(function, "options.priority",
                  "weight, position, choice_then_position, random or batch_prioritized",
                  concat(int(o.priority)));
  }
}

/// ceil(value) as an Index, saturated at the largest Index (a capacity that large never drops a
/// slot; a factor such as 1e300 must not convert out of range, which is undefined behaviour).
inline Index saturating_ceil(double value) {
  const double c = std::ceil(value);
  // 2^63 is exactly representable; every double below it converts to an Index in range.
  if (!(c < 9223372036854775808.0)) return std::numeric_limits<Index>::max();
  return c > 0 ? static_cast<Index>(c) : Index(0);
}

/// c rounded up to a multiple of `alignment` (>= 1), saturated at the largest Index.
inline Index saturating_align(Index c, Index alignment) {
  const Index rest = c % alignment;
  if (rest == 0) return c;
  const Index step = alignment - rest;
  return c > std::numeric_limits<Index>::max() - step ? std::numeric_limits<Index>::max() : c + step;
}

}  // namespace detail

/// The capacity C of every expert (see the file comment for each formula).
/// @param tokens T. @param num_experts N. @param k slots per token.
/// @param largest_count the largest per-expert count (used by Tutel's dropless modes).
/// @throws moebal::invalid_argument for invalid options.
inline Index expert_capacity(Index tokens, Index num_experts, Index k, const CapacityOptions& o,
                             Index largest_count = 0) {
  constexpr const char* function = "moebal::expert_capacity";
  detail::check_capacity_options(function, o);
  if (tokens < 0 || num_experts < 1 || k < 1) {
    detail::throw_invalid(function, "tokens, num_experts, k", "T >= 0, N >= 1, k >= 1",
                          detail::concat(tokens, ", ", num_experts, ", ", k));
  }
  const double T = double(tokens), N = double(num_experts), kk = double(k), cf = o.capacity_factor;
  switch (o.formula) {
    case CapacityFormula::megatron: {
      const Index c = detail::saturating_ceil(T * kk / N * cf);
      return o.min_capacity > 0 ? std::max(c, o.min_capacity) : c;
    }
    case CapacityFormula::deepspeed:
      return std::max(detail::saturating_ceil((T / N) * (cf * kk)), o.min_capacity);
    case CapacityFormula::tutel: {
      // k * int(|cf| * ceil(T / N)): the truncation of a nonnegative value, then the product,
      // both saturated.
      const Index base =
          detail::saturating_ceil(kk * std::floor(std::abs(cf) * std::ceil(T / N)));
      Index c;
      if (cf == 0) {
        c = largest_count;
      } else if (cf < 0) {
        c = std::min(largest_count, base);
      } else {
        c = base;
      }
      return detail::saturating_align(c, o.alignment);
    }
    case CapacityFormula::absolute:
      return o.absolute_capacity;
  }
  return 0;
}

/// Drops the slots that exceed each expert's capacity.
/// @param indices T x k experts per token (e.g. `route(...).indices`), each in [0, N).
/// @param weights T x k combine weights aligned with `indices`.
/// @param num_experts N. @param options capacity, priority, renormalization, padding, seed.
/// @return which slots were kept, the weights after dropping, counts before and after, padding
///   and dropped fractions. @throws moebal::invalid_argument for mismatched shapes, indices out
///   of range, or invalid options.
template <class DerivedW>
CapacityResult<typename DerivedW::Scalar> apply_capacity(const Eigen::Ref<const IndexMatrix>& indices,
                                                         const Eigen::MatrixBase<DerivedW>& weights,
                                                         Index num_experts,
                                                         const CapacityOptions& options) {
  using Scalar = typename DerivedW::Scalar;
  constexpr const char* function = "moebal::apply_capacity";
  detail::check_capacity_options(function, options);
  const Index T = indices.rows(), k = indices.cols();
  detail::check_output_shape(function, "weights", weights.rows(), weights.cols(), T, k);
  if (num_experts < 1) detail::throw_invalid(function, "num_experts", "at least 1", detail::concat(num_experts));
  CapacityResult<Scalar> r;
  r.counts_before = CountVector::Zero(num_experts);
  for (Index t = 0; t < T; ++t) {
    for (Index s = 0; s < k; ++s) {
      const Index e = indices(t, s);
      if (e < 0 || e >= num_experts) {
        detail::throw_invalid(function, "indices", detail::concat("expert indices in [0, ", num_experts, ")"),
                              detail::concat(e, " at row ", t, ", slot ", s));
      }
      ++r.counts_before[e];
    }
  }
  r.capacity = expert_capacity(T, num_experts, k, options, T > 0 ? r.counts_before.maxCoeff() : 0);

  // The priority order of every (token, slot): smaller key first; ties by token, then slot.
  const Index slots = T * k;
  std::vector<Index> order(static_cast<std::size_t>(slots));
  std::iota(order.begin(), order.end(), Index(0));
  std::vector<double> key(static_cast<std::size_t>(slots), 0.0);
  auto slot_key = [&](Index id) -> double& { return key[std::size_t(id)]; };
  switch (options.priority) {
    case DropPriority::weight:
      for (Index id = 0; id < slots; ++id) slot_key(id) = -double(weights(id / k, id % k));
      break;
    case DropPriority::position:
      for (Index id = 0; id < slots; ++id) slot_key(id) = double(id);  // token-major
      break;
    case DropPriority::choice_then_position:
      for (Index id = 0; id < slots; ++id) slot_key(id) = double((id % k) * T + id / k);
      break;
    case DropPriority::random: {
      std::mt19937_64 engine(options.seed);
      for (Index id = 0; id < slots; ++id) {
        slot_key(id) = double(engine() >> 11) * (1.0 / 9007199254740992.0);  // [0, 1), 53 bits
      }
      break;
    }
    case DropPriority::batch_prioritized: {
      // Slot by slot, tokens by decreasing best weight (ties to the lower token).
      std::vector<Index> tokens(static_cast<std::size_t>(T));
      std::iota(tokens.begin(), tokens.end(), Index(0));
      auto best = [&](Index t) {
        Scalar m = weights(t, 0);
        for (Index s = 1; s < k; ++s) m = std::max(m, Scalar(weights(t, s)));
        return m;
      };
      std::stable_sort(tokens.begin(), tokens.end(), [&](Index a, Index b) { return best(a) > best(b); });
      for (Index rank = 0; rank < T; ++rank) {
        const Index t = tokens[std::size_t(rank)];
        for (Index s = 0; s < k; ++s) slot_key(t * k + s) = double(s * T + rank);
      }
      break;
    }
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](Index a, Index b) { return key[std::size_t(a)] < key[std::size_t(b)]; });

  r.kept.setZero(T, k);
  r.counts_after = CountVector::Zero(num_experts);
  for (const Index id : order) {
    const Index e = indices(id / k, id % k);
    if (r.counts_after[e] < r.capacity) {
      ++r.counts_after[e];
      r.kept(id / k, id % k) = 1;
    }
  }
  r.weights = RowMatrix<Scalar>::Zero(T, k);
  for (Index t = 0; t < T; ++t) {
    Scalar sum = Scalar(0);
    for (Index s = 0; s < k; ++s) {
      if (r.kept(t, s)) {
        r.weights(t, s) = weights(t, s);
        sum += weights(t, s);
      }
    }
    if (options.renormalize) {
      const Scalar d = std::max(sum, Scalar(std::numeric_limits<float>::epsilon()));
      for (Index s = 0; s < k; ++s) r.weights(t, s) /= d;
    }
  }
  r.dense_map.setZero(T, num_experts);
  r.dense_weights = RowMatrix<Scalar>::Zero(T, num_experts);
  for (Index t = 0; t < T; ++t) {
    for (Index s = 0; s < k; ++s) {
      if (!r.kept(t, s)) continue;
      r.dense_map(t, indices(t, s)) = 1;
      r.dense_weights(t, indices(t, s)) = r.weights(t, s);
    }
  }
  r.padded = CountVector::Zero(num_experts);
  if (options.pad_to_capacity) {
    // Fill each expert with the lowest-index tokens that were not routed to it (Megatron-core
    // keeps the top-C of the dense probs, where unrouted tokens are 0: ties to the lower index).
    std::vector<std::uint8_t> routed(static_cast<std::size_t>(T));
    for (Index e = 0; e < num_experts; ++e) {
      std::fill(routed.begin(), routed.end(), std::uint8_t(0));
      for (Index t = 0; t < T; ++t)
        for (Index s = 0; s < k; ++s) if (indices(t, s) == e) routed[std::size_t(t)] = 1;
      const Index target = std::min<Index>(r.capacity, T);
      for (Index t = 0; t < T && r.counts_after[e] + r.padded[e] < target; ++t) {
        if (routed[std::size_t(t)] == 0) {
          r.dense_map(t, e) = 1;
          ++r.padded[e];
        }
      }
    }
  }
  r.dropped_fraction = Eigen::VectorXd::Zero(num_experts);
  for (Index e = 0; e < num_experts; ++e) {
    if (r.counts_before[e] > 0) {
      r.dropped_fraction[e] = double(r.counts_before[e] - r.counts_after[e]) / double(r.counts_before[e]);
    }
  }
  r.dropped_fraction_overall =
      slots > 0 ? double(r.counts_before.sum() - r.counts_after.sum()) / double(slots) : 0.0;
  return r;
}

/// d loss / d weights before dropping, from d loss / d weights after dropping: zero for dropped
/// slots; through the renormalization w'_s = w_s / max(sum_kept w, eps) when `renormalize`.
/// @param weights the T x k weights before dropping. @param result `apply_capacity`'s result.
template <class DerivedW, class DerivedG>
RowMatrix<typename DerivedW::Scalar> capacity_backward(const Eigen::MatrixBase<DerivedW>& weights,
                                                       const CapacityResult<typename DerivedW::Scalar>& result,
                                                       const Eigen::MatrixBase<DerivedG>& dloss_dkept,
                                                       const CapacityOptions& options) {
  using Scalar = typename DerivedW::Scalar;
  constexpr const char* function = "moebal::capacity_backward";
  const Index T = weights.rows(), k = weights.cols();
  detail::check_output_shape(function, "dloss_dkept", dloss_dkept.rows(), dloss_dkept.cols(), T, k);
  detail::check_output_shape(function, "result", result.kept.rows(), result.kept.cols(), T, k);
  RowMatrix<Scalar> g = RowMatrix<Scalar>::Zero(T, k);
  for (Index t = 0; t < T; ++t) {
    if (!options.renormalize) {
      for (Index s = 0; s < k; ++s) if (result.kept(t, s)) g(t, s) = dloss_dkept(t, s);
      continue;
    }
    Scalar sum = Scalar(0), gw = Scalar(0);
    for (Index s = 0; s < k; ++s) {
      if (result.kept(t, s)) {
        sum += weights(t, s);
        gw += dloss_dkept(t, s) * result.weights(t, s);
      }
    }
    const Scalar eps = Scalar(std::numeric_limits<float>::epsilon());
    const Scalar d = std::max(sum, eps);
    const bool varies = sum >= eps;
    for (Index s = 0; s < k; ++s) {
      if (result.kept(t, s)) g(t, s) = varies ? (dloss_dkept(t, s) - gw) / d : dloss_dkept(t, s) / d;
    }
  }
  return g;
}

}  // namespace moebal
