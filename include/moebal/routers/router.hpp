// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// Top-k routers with an analytic backward. A router maps T x N logits to, per token, the k
/// selected experts (T x k indices, by decreasing selection score) and their combine weights
/// (T x k, what the experts' outputs are multiplied by). Its backward maps d loss / d weights
/// (T x k) to d loss / d logits (T x N). The selection itself has no gradient.
///
/// Per token, with logits x, scores s = score(x) and optional expert bias b (selection only):
///   1. selection values v = s + b, or x + b (`select_on_logits`);
///   2. group-limited routing (G groups of N / G consecutive experts): each group's score from
///      v (sum of its top k/g, sum of its top 2, or its maximum), the best g groups kept (ties to
///      the lower group index), the other experts' v replaced by -Inf or by 0;
///   3. the top k of v, ties to the lower expert index;
///   4. weights u = s[selected] (`scores`) or softmax(x[selected]) (`softmax_of_selected`);
///      optionally normalized, w = u / (sum u + eps) or u / max(sum u, eps); then scaled,
///      w = scaling_factor * w.
/// Backward: through the scaling and the normalization, then the score function's derivative:
///   softmax: VJP of the row softmax; sigmoid: s (1 - s); sqrt(softplus): sigmoid(x) / (2 s);
///   softmax_of_selected: VJP of the softmax over the k selected logits (others get 0).
/// Every option is named after the framework that uses it; `routers/presets.hpp` combines them
/// into each framework's router.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"
#include "moebal/detail/input.hpp"
#include "moebal/detail/parallel.hpp"
#include "moebal/detail/score_kernels.hpp"
#include "moebal/detail/topk_kernels.hpp"

namespace moebal {

/// The router's score function s = score(x) (Megatron-core `moe_router_score_function`).
enum class RouterScore {
  /// s = softmax(x) over all experts.
  softmax,
  /// s_i = sigmoid(x_i), elementwise, not normalized (DeepSeek-V3).
  sigmoid,
  /// s_i = sqrt(softplus(x_i)), elementwise (Megatron-core "sqrtsoftplus").
  sqrt_softplus,
};

/// Where the combine weights come from.
enum class RouterWeights {
  /// u = s[selected]: the scores of the selected experts ("pre-softmax" for softmax scores:
  /// Mixtral, Qwen-MoE, DeepSeek; sigmoid or sqrt-softplus scores).
  scores,
  /// u = softmax over the k selected logits (with `select_on_logits`: Megatron-core's default
  /// "post-softmax" router). With k = 1 the weight is always 1 and its gradient is zero
  /// (Megatron-LM issue #894): `check_router_options` rejects it.
  softmax_of_selected,
};

/// How a group of experts is scored for group-limited routing.
enum class GroupScore {
  /// Sum of the group's top (k / g) selection values (Megatron-core `group_limited_topk`).
  sum_top_k_over_groups,
  /// Sum of the group's top 2 (DeepSeek-V3 with a bias; HF `DeepseekV3TopkRouter`).
  sum_top2,
  /// The group's maximum (DeepSeek-V3 official gate without a bias).
  max,
};

/// What the experts of dropped groups get before the top-k.
enum class GroupFill {
  /// -Inf: they are never selected (Megatron-core, DeepSeek official).
  negative_infinity,
  /// 0 (HF `DeepseekV3TopkRouter`): with negative biased scores an expert of a dropped group can
  /// outrank a kept one.
  zero,
};

/// How the normalization's epsilon enters the denominator.
enum class NormalizeEpsilon {
  /// w = u / (sum u + eps) (Megatron-core, HF DeepSeek-V3: eps = 1e-20).
  add,
  /// w = u / max(sum u, eps) (DeepSpeed, Tutel: eps = float32 epsilon); when the clamp is
  /// active the denominator is a constant for the gradient.
  clamp,
};

/// Options of a router. Every option is named after its source.
struct RouterOptions {
  RouterScore score = RouterScore::softmax;
  RouterWeights weights = RouterWeights::scores;
  /// Take the top-k on the logits (plus bias) instead of the scores: Megatron-core
  /// post-softmax, DeepSpeed top-2 (second expert) and top-k. For softmax scores without a bias
  /// the same order as the scores except for ties and underflow.
  bool select_on_logits = false;
  /// Divide the k weights by their sum plus `normalize_epsilon` (HF `norm_topk_prob`, Mixtral
  /// always; Megatron-core for sigmoid when k > 1).
  bool normalize = false;
  /// The epsilon of the normalization (HF Qwen: 0; Megatron-core and HF DeepSeek-V3: 1e-20).
  /// Megatron-LM issue #1545 shows how a tiny epsilon can be gamed by near-zero scores.
  double normalize_epsilon = 0.0;
  NormalizeEpsilon epsilon_mode = NormalizeEpsilon::add;
  /// Multiplies the weights after normalization (Megatron-core
  /// `moe_router_topk_scaling_factor`, DeepSeek-V3 `routed_scaling_factor`).
  double scaling_factor = 1.0;
  /// Group-limited routing: G groups (1 = off) of which g are kept.
  Index num_groups = 1;
  Index group_topk = 1;
  GroupScore group_score = GroupScore::sum_top_k_over_groups;
  GroupFill group_fill = GroupFill::negative_infinity;
  /// Per-expert bias added to the selection values only (DeepSeek-V3 auxiliary-loss-free
  /// balancing); empty = none. Length N.
  Eigen::VectorXd expert_bias;
};

/// A router's output: per token the selected experts and their combine weights.
template <class Scalar>
struct RouterResult {
  /// T x k expert indices by decreasing selection value.
  IndexMatrix indices;
  /// T x k combine weights, aligned with `indices`.
  RowMatrix<Scalar> weights;
};

namespace detail {

/// Rows per chunk of the router's threaded loops (the Switch loss's chunk size). Rows are
/// independent, so the chunks only decide how the work is spread over the threads.
inline constexpr Index kRouterChunkRows = 512;

inline void check_router_options(const char* function, Index num_experts, Index k,
                                 const RouterOptions& o) {
  if (num_experts < 1) throw_invalid(function, "num_experts", "at least 1 expert", concat(num_experts));
  check_k(function, k, num_experts);
  if (o.score != RouterScore::softmax && o.score != RouterScore::sigmoid &&
      o.score != RouterScore::sqrt_softplus) {
    throw_invalid(function, "options.score", "softmax, sigmoid or sqrt_softplus", concat(int(o.score)));
  }
  if (o.epsilon_mode != NormalizeEpsilon::add && o.epsilon_mode != NormalizeEpsilon::clamp) {
    throw_invalid(function, "options.epsilon_mode", "add or clamp", concat(int(o.epsilon_mode)));
  }
  if (o.weights != RouterWeights::scores && o.weights != RouterWeights::softmax_of_selected) {
    throw_invalid(function, "options.weights", "scores or softmax_of_selected", concat(int(o.weights)));
  }
  if (o.weights == RouterWeights::softmax_of_selected && k == 1) {
    throw_invalid(function, "k",
                  "k >= 2 with softmax_of_selected weights (the softmax of one logit is 1: a "
                  "constant weight with zero gradient, Megatron-LM issue #894)",
                  "k = 1");
  }
  check_finite_parameter(function, "options.normalize_epsilon", o.normalize_epsilon);
  if (o.normalize_epsilon < 0) {
    throw_invalid(function, "options.normalize_epsilon", "a value >= 0", concat(o.normalize_epsilon));
  }
  check_finite_parameter(function, "options.scaling_factor", o.scaling_factor);
  if (o.num_groups < 1 || num_experts % o.num_groups != 0) {
    throw_invalid(function, "options.num_groups",
                  concat("a number of groups G >= 1 dividing N = ", num_experts),
                  concat("G = ", o.num_groups));
  }
  if (o.num_groups > 1) {
    if (o.group_topk < 1 || o.group_topk > o.num_groups) {
      throw_invalid(function, "options.group_topk",
                    concat("1 <= g <= G = ", o.num_groups), concat("g = ", o.group_topk));
    }
    const Index kept = o.group_topk * (num_experts / o.num_groups);
    if (k > kept) {
      throw_invalid(function, "k",
                    concat("k <= the experts in the kept groups (g N / G = ", kept, ")"),
                    concat("k = ", k));
    }
    if (o.group_score == GroupScore::sum_top_k_over_groups && k % o.group_topk != 0) {
      throw_invalid(function, "options.group_topk",
                    concat("g dividing k = ", k, " for the sum of the top k / g scores"),
                    concat("g = ", o.group_topk));
    }
  }
  if (o.expert_bias.size() != 0) {
    if (o.expert_bias.size() != num_experts) {
      throw_invalid(function, "options.expert_bias", concat("one bias per expert (length N = ", num_experts, ")"),
                    concat("length ", o.expert_bias.size()));
    }
    if (!o.expert_bias.allFinite()) {
      throw_invalid(function, "options.expert_bias", "finite values", "NaN or Inf");
    }
  }
}

/// Elementwise scores of a row for sigmoid and sqrt(softplus) (stable for any finite or -Inf x).
template <class C>
void elementwise_scores(const C* x, Index n, RouterScore score, C* s) {
  for (Index j = 0; j < n; ++j) {
    const C v = x[j];
    if (score == RouterScore::sigmoid) {
      s[j] = v >= C(0) ? C(1) / (C(1) + std::exp(-v)) : std::exp(v) / (C(1) + std::exp(v));
    } else {
      const C softplus = (v > C(0) ? v : C(0)) + std::log1p(std::exp(-std::abs(v)));
      s[j] = std::sqrt(softplus);
    }
  }
}

}  // namespace detail

/// A router as a reusable object (no allocation in steady state: per-thread scratch is sized
/// once for each new, larger thread count).
///
/// Threads: `forward`, `backward` and `backward_accumulate` (and so `route` and
/// `route_backward`) split the tokens into chunks of `detail::kRouterChunkRows` rows, a
/// partition fixed by T alone, and run the chunks on up to `moebal::num_threads()` OpenMP
/// threads (<moebal/core/threads.hpp>). Rows are independent and each is computed by one thread
/// with the same arithmetic as on one thread, so indices, weights and gradients are bitwise
/// identical for any thread count. An invalid row (a NaN or +Inf logit, an index out of range)
/// is reported as the sequential loop would: the lowest bad row. After a throw the outputs'
/// contents are unspecified.
/// @tparam Scalar float or double.
template <class Scalar>
class Router {
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::Router<Scalar>: Scalar must be float, double, "
                "Eigen::bfloat16 or Eigen::half");

 public:
  /// The compute type: float for bfloat16/half logits, Scalar otherwise.
  using Compute = compute_type_t<Scalar>;

  /// @param num_experts N. @param k experts per token. @param options see `RouterOptions`.
  /// @throws moebal::invalid_argument for N < 1, k out of range, N not divisible by G, g > G,
  ///   k larger than the experts in the kept groups, a bias of the wrong length, k = 1 with
  ///   softmax_of_selected weights, non-finite factors.
  Router(Index num_experts, Index k, RouterOptions options = {})
      : Router("moebal::Router", num_experts, k, std::move(options)) {
    backward_name_ = "moebal::Router::backward";
  }

  Index num_experts() const noexcept { return n_; }
  Index k() const noexcept { return k_; }
  const RouterOptions& options() const noexcept { return options_; }

  /// Replaces the expert bias (selection only; length N, or empty for none).
  void set_expert_bias(const Eigen::VectorXd& bias) {
    RouterOptions o = options_;
    o.expert_bias = bias;
    detail::check_router_options("moebal::Router::set_expert_bias", n_, k_, o);
    options_.expert_bias = bias;
    bias_compute_ = bias.template cast<Compute>();
  }

  /// Routes T x N logits: writes the T x k indices and weights.
  /// @param weights T x k row-major buffer of Scalar or Compute (float for bfloat16/half
  ///   logits); weights are computed in Compute and rounded once.
  /// @throws moebal::invalid_argument for bad shapes, NaN or +Inf logits.
  template <class Derived, class OutW>
  void forward(const Eigen::MatrixBase<Derived>& logits, Eigen::Ref<IndexMatrix> indices,
               OutW&& weights) {
    static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                  "moebal::Router<Scalar> takes logits of the same Scalar");
    forward_impl("moebal::Router::forward", detail::RowInput<Scalar>(logits), indices,
                 detail::output_ref<Scalar>(weights));
  }

  /// d loss / d logits from d loss / d weights (T x k), for the logits and indices of a
  /// forward: dloss_dlogits = scale * J^T dloss_dweights (every element written).
  /// @param dloss_dweights T x k of Scalar or Compute (read in Compute).
  /// @param dloss_dlogits T x N row-major buffer of Scalar or Compute.
  /// @throws moebal::invalid_argument for bad shapes, an index outside [0, N), NaN or +Inf
  ///   logits. With selection on the logits and softmax_of_selected weights (Megatron-core's
  ///   default router) the gradient depends on the k selected logits of a row alone: only those
  ///   are read and checked (the others get 0 whatever they hold, as in autograd); the other
  ///   routers check every logit, as forward does.
  template <class Derived, class DerivedG, class Out>
  void backward(const Eigen::MatrixBase<Derived>& logits,
                const Eigen::Ref<const IndexMatrix>& indices,
                const Eigen::MatrixBase<DerivedG>& dloss_dweights, Out&& dloss_dlogits,
                Compute scale = Compute(1)) {
    backward_impl<false>(backward_name_, detail::RowInput<Scalar>(logits), indices,
                         compute_input(dloss_dweights), detail::output_ref<Scalar>(dloss_dlogits),
                         scale);
  }

  /// As `backward`, adding into dloss_dlogits.
  template <class Derived, class DerivedG, class Out>
  void backward_accumulate(const Eigen::MatrixBase<Derived>& logits,
                           const Eigen::Ref<const IndexMatrix>& indices,
                           const Eigen::MatrixBase<DerivedG>& dloss_dweights, Out&& dloss_dlogits,
                           Compute scale = Compute(1)) {
    backward_impl<true>("moebal::Router::backward_accumulate", detail::RowInput<Scalar>(logits),
                        indices, compute_input(dloss_dweights),
                        detail::output_ref<Scalar>(dloss_dlogits), scale);
  }

  // Internal: the one-line forms name themselves in error messages.
  Router(const char* function, Index num_experts, Index k, RouterOptions options)
      : n_(num_experts), k_(k), options_(std::move(options)), backward_name_(function) {
    detail::check_router_options(function, num_experts, k, options_);
    bias_compute_ = options_.expert_bias.template cast<Compute>();
    ensure_lanes(1);
  }

  template <class OutW>
  void forward_impl(const char* function, const detail::RowInput<Scalar>& x,
                    Eigen::Ref<IndexMatrix> indices, RowMatrixRef<OutW> weights) {
    detail::check_logits_columns(function, x.rows(), x.cols(), n_);
    detail::check_output_shape(function, "indices", indices.rows(), indices.cols(), x.rows(), k_);
    detail::check_output_shape(function, "weights", weights.rows(), weights.cols(), x.rows(), k_);
    if (selected_logits_path()) {
      // Megatron-core's default router: the generic steps below on local arrays of k slots.
      const ScoreFunction score = validation_score();
      const bool softmax = score == ScoreFunction::softmax;
      // k = 2 (Megatron-core's and Mixtral's usual top-2): the validation and the top 2 in one
      // pass (top2_row), in topk_row's order.
      const bool top2 = k_ == 2 && detail::top2_row_applies<Compute>(n_);
      for_row_chunks(x.rows(), [&](Lane& lane, Index begin, Index end) {
        Index selected[kLocalSlots];
        Compute raw[kLocalSlots], u[kLocalSlots];
        for (Index t = begin; t < end; ++t) {
          const Compute* row = lane.reader.read(x.data() + t * x.outerStride(), n_);
          if (top2) {
            bool bad = false, any_finite = false;
            detail::top2_row(row, n_, selected, bad, any_finite);
            if (bad || (softmax && !any_finite)) {
              detail::throw_invalid_row(function, row, n_, t, score);  // as scores_row
            }
          } else {
            if (!detail::valid_logits_row(row, n_, softmax)) {
              detail::throw_invalid_row(function, row, n_, t, score);  // as scores_row
            }
            detail::topk_row(row, n_, k_, selected, lane.topk);
          }
          if (top2) {
            weights_of<2>(function, row, selected, nullptr, t, raw, u);
          } else {
            weights_of(function, row, selected, nullptr, t, raw, u);
          }
          for (Index i = 0; i < k_; ++i) {
            indices(t, i) = selected[i];
            weights(t, i) = static_cast<OutW>(u[i]);
          }
        }
      });
      return;
    }
    for_row_chunks(x.rows(), [&](Lane& lane, Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        const Compute* row = lane.reader.read(x.data() + t * x.outerStride(), n_);
        scores_row(lane, function, row, t);
        select_row(lane, row);
        weights_row(lane, function, row, t);
        for (Index i = 0; i < k_; ++i) {
          indices(t, i) = lane.selected[std::size_t(i)];
          weights(t, i) = static_cast<OutW>(lane.u[i]);
        }
      }
    });
  }

 private:
  // Per-thread scratch for one row. O(N) per thread. Cache-line aligned so that one thread's
  // per-row writes (sum, norm) never share a line with another thread's lane.
  struct alignas(64) Lane {
    detail::ScratchArray<Compute> s, v, u, raw, gk, g, group_scores;
    detail::RowReader<Scalar, Compute> reader;  // one row converted (half-precision input)
    std::vector<Index> group_order;             // G
    std::vector<Compute> group_values;          // N
    std::vector<Index> selected;                // k, the row's experts
    detail::TopkScratch<Compute> topk, group_topk;
    detail::RowNorm<Compute> norm;
    Compute sum = Compute(0);  // the row's unnormalized weight sum (set by weights_row)
  };

  // Sizes the scratch of `threads` threads (allocates only when the thread count grows).
  void ensure_lanes(int threads) {
    detail::ensure_lanes(lanes_, threads, [&](Lane& lane) {
      lane.s.resize(n_);
      lane.v.resize(n_);
      lane.u.resize(k_);
      lane.raw.resize(k_);
      lane.gk.resize(k_);
      lane.g.resize(n_);
      lane.group_scores.resize(options_.num_groups);
      lane.reader.resize(n_);
      lane.group_order.resize(static_cast<std::size_t>(options_.num_groups));
      lane.group_values.resize(static_cast<std::size_t>(n_));
      lane.selected.resize(static_cast<std::size_t>(k_));
      lane.topk.resize(n_, k_);
      lane.group_topk.resize(options_.num_groups, std::max<Index>(options_.group_topk, 1));
    });
  }

  // body(lane, begin, end) for the chunks of kRouterChunkRows rows of [0, rows), on up to
  // num_threads() threads; rethrows the lowest throwing chunk's exception.
  template <class Body>
  void for_row_chunks(Index rows, Body&& body) {
    const Index chunks = (rows + detail::kRouterChunkRows - 1) / detail::kRouterChunkRows;
    const int threads = detail::threads_for(chunks);
    ensure_lanes(threads);
    detail::for_chunks(chunks, threads, [&](int thread, Index chunk) {
      const Index begin = chunk * detail::kRouterChunkRows;
      const Index end = std::min(rows, begin + detail::kRouterChunkRows);
      body(lanes_[static_cast<std::size_t>(thread)], begin, end);
    });
  }

  // d loss / d weights read in Compute (a cast view for bfloat16/half, in place otherwise).
  template <class DerivedG>
  static detail::RowInput<Compute> compute_input(const Eigen::MatrixBase<DerivedG>& g) {
    static_assert(std::is_same_v<compute_type_t<typename DerivedG::Scalar>, Compute>,
                  "moebal::Router: dloss_dweights must be of the logits' type or their compute "
                  "type");
    return detail::RowInput<Compute>(g.template cast<Compute>());
  }

  // lane.s = score(x) for one row; validates the row.
  void scores_row(Lane& lane, const char* function, const Compute* row, Index t) const {
    if (scores_unused()) {
      // Selection on the logits and softmax-of-selected weights (Megatron-core's default,
      // Mixtral): the scores over all experts are never read, only the row is validated as
      // computing them would (same error for the same row).
      const ScoreFunction score = validation_score();
      if (!detail::valid_logits_row(row, n_, score == ScoreFunction::softmax)) {
        detail::throw_invalid_row(function, row, n_, t, score);
      }
      return;
    }
    if (options_.score == RouterScore::softmax) {
      if (!detail::raw_scores(row, n_, ScoreFunction::softmax, lane.v, lane.norm)) {
        detail::throw_invalid_row(function, row, n_, t, ScoreFunction::softmax);
      }
      detail::scores_from_raw(lane.v, lane.norm, lane.s);
      return;
    }
    for (Index j = 0; j < n_; ++j) {
      if (std::isnan(row[j]) || row[j] == std::numeric_limits<Compute>::infinity()) {
        detail::throw_invalid_row(function, row, n_, t, ScoreFunction::sigmoid);
      }
    }
    detail::elementwise_scores(row, n_, options_.score, lane.s.data());
  }

  // Whether no step reads the scores over all experts (selection on the logits, weights from
  // a softmax of the selected logits).
  bool scores_unused() const {
    return options_.select_on_logits && options_.weights == RouterWeights::softmax_of_selected;
  }

  // The top-k (with groups) of the selection values, into lane.selected.
  void select_row(Lane& lane, const Compute* row) const {
    const bool logits = options_.select_on_logits;
    const Index groups = options_.num_groups;
    if (bias_compute_.size() == 0 && groups <= 1) {
      // The selection values are the logits or the scores themselves: no copy.
      detail::topk_row(logits ? row : static_cast<const Compute*>(lane.s.data()), n_, k_,
                       lane.selected.data(), lane.topk);
      return;
    }
    auto& v = lane.v;
    for (Index j = 0; j < n_; ++j) v[j] = logits ? row[j] : lane.s[j];
    if (bias_compute_.size() != 0) v += bias_compute_;
    if (groups > 1) {
      const Index size = n_ / groups, kept = options_.group_topk;
      for (Index g = 0; g < groups; ++g) {
        lane.group_scores[g] = group_score(lane, v.data() + g * size, size);
      }
      detail::topk_row_exact(lane.group_scores.data(), groups, kept, lane.group_order.data(),
                             lane.group_topk);
      const Compute fill = options_.group_fill == GroupFill::zero
                               ? Compute(0)
                               : -std::numeric_limits<Compute>::infinity();
      for (Index g = 0; g < groups; ++g) {
        bool keep = false;
        for (Index i = 0; i < kept; ++i) keep = keep || lane.group_order[std::size_t(i)] == g;
        if (!keep) std::fill(v.data() + g * size, v.data() + (g + 1) * size, fill);
      }
    }
    // The threshold fast path, with the exact method's order (ties to the lower index).
    detail::topk_row(static_cast<const Compute*>(v.data()), n_, k_, lane.selected.data(),
                     lane.topk);
  }

  Compute group_score(Lane& lane, const Compute* values, Index size) const {
    if (options_.group_score == GroupScore::max) return *std::max_element(values, values + size);
    const Index top = options_.group_score == GroupScore::sum_top2
                          ? std::min<Index>(2, size)
                          : k_ / options_.group_topk;
    auto& sorted = lane.group_values;
    std::copy(values, values + size, sorted.begin());
    std::partial_sort(sorted.begin(), sorted.begin() + top, sorted.begin() + size,
                      [](Compute a, Compute b) { return a > b; });
    Compute sum = Compute(0);
    for (Index i = 0; i < top; ++i) sum += sorted[std::size_t(i)];
    return sum;
  }

  // lane.u = the k weights of the row (after normalization and scaling); keeps the
  // unnormalized weights in lane.raw and their sum in lane.sum for backward (see weights_of).
  void weights_row(Lane& lane, const char* function, const Compute* row, Index t) const {
    lane.sum = weights_of(function, row, lane.selected.data(), lane.s.data(), t, lane.raw.data(),
                          lane.u.data());
  }

  // The k weights of one row, on plain arrays of k slots: raw = the unnormalized weights
  // (softmax over the selected logits of `row`, or the selected scores of `s`), u = the weights
  // after normalization and scaling; returns the sum of raw in slot order. Throws (naming row
  // t) where the weights are undefined: a softmax over k selected logits that are all -Inf, or
  // a normalization whose denominator is 0 (every selected score 0 with epsilon 0).
  // Slots: k itself (0: the run-time k_; the fast path's k = 2 unrolls the slot loops, with the
  // same operations in the same order).
  template <Index Slots = 0>
  MOEBAL_ALWAYS_INLINE Compute weights_of(const char* function, const Compute* row,
                                          const Index* selected, const Compute* s, Index t,
                                          Compute* raw, Compute* u) const {
    const Index k = Slots > 0 ? Slots : k_;
    MOEBAL_ASSERT(k == k_);
    if (options_.weights == RouterWeights::softmax_of_selected) {
      Compute max = -std::numeric_limits<Compute>::infinity();
      for (Index i = 0; i < k; ++i) max = std::max(max, row[selected[i]]);
      if (max == -std::numeric_limits<Compute>::infinity()) {
        detail::throw_invalid(function, "logits",
                              "a finite logit among the k selected experts (softmax_of_selected "
                              "weights)",
                              detail::concat("only -Inf selected at row ", t));
      }
      Compute sum = Compute(0);
      for (Index i = 0; i < k; ++i) {
        // exp(0) = 1 exactly: the largest selected logit (the first slot, in forward's order)
        // takes no call.
        const Compute d = row[selected[i]] - max;
        raw[i] = d == Compute(0) ? Compute(1) : std::exp(d);
        sum += raw[i];
      }
      for (Index i = 0; i < k; ++i) raw[i] /= sum;
    } else {
      for (Index i = 0; i < k; ++i) raw[i] = s[selected[i]];
    }
    // Plain loops over the k slots (Eigen's dynamic-size expressions cost more than the work
    // for k = 2): the sum in slot order, then u = raw / D * scaling.
    Compute total = Compute(0);
    for (Index i = 0; i < k; ++i) total += raw[i];
    const Compute scaling = static_cast<Compute>(options_.scaling_factor);
    if (options_.normalize) {
      const Compute d = denominator_of(total);
      if (!(d > Compute(0))) {
        detail::throw_invalid(function, "logits",
                              "selected scores with a positive sum when normalizing with "
                              "normalize_epsilon = 0 (set normalize_epsilon > 0)",
                              detail::concat("a sum of 0 at row ", t));
      }
      for (Index i = 0; i < k; ++i) u[i] = raw[i] / d * scaling;
    } else {
      for (Index i = 0; i < k; ++i) u[i] = raw[i] * scaling;
    }
    return total;
  }

  // The normalization's denominator for a row whose unnormalized weights sum to `sum`.
  Compute denominator_of(Compute sum) const {
    const Compute eps = static_cast<Compute>(options_.normalize_epsilon);
    return options_.epsilon_mode == NormalizeEpsilon::add ? sum + eps : std::max(sum, eps);
  }
  // Whether that denominator varies with u (not clamped).
  bool denominator_varies_of(Compute sum) const {
    return options_.epsilon_mode == NormalizeEpsilon::add ||
           sum >= static_cast<Compute>(options_.normalize_epsilon);
  }

  // Whether rows take the selected-logits fast path: selection on the logits without a bias
  // or groups and softmax-of-selected weights (Megatron-core's default router), k slots in
  // local arrays. Its arithmetic is the generic path's, step for step (weights_of,
  // selected_softmax_grad), so both give the same bits.
  bool selected_logits_path() const {
    return scores_unused() && bias_compute_.size() == 0 && options_.num_groups <= 1 &&
           k_ <= kLocalSlots;
  }

  // The score function whose validity the logits of a row must have when the scores are
  // never computed (scores_unused): the same error as computing them would give.
  ScoreFunction validation_score() const {
    return options_.score == RouterScore::softmax ? ScoreFunction::softmax
                                                  : ScoreFunction::sigmoid;
  }

  // The softmax-of-selected backward of one row: p = raw (the softmax over the k selected
  // logits, slots in `selected`), g = scale d L / d w for the k slots (dw_row), through the
  // scaling c and the normalization D (d L / d u_i = (c / D) (g_i - [D varies] sum_l g_l u_l /
  // D)), then d L / d x_e = sum over the slots i of expert e of p_i (g_i - sum_l g_l p_l); the
  // experts not selected get 0. For Compute outputs added straight into dx (no N-wide
  // scratch); for half-precision outputs summed in `scratch` (N values) and rounded once.
  template <bool Accumulate, Index Slots = 0, class Out>
  MOEBAL_ALWAYS_INLINE void selected_softmax_grad(const Index* selected, const Compute* raw,
                                                  Compute total, const Compute* dw_row,
                                                  Compute scale, Compute* gk, Compute* scratch,
                                                  Out* dx) const {
    const Index k = Slots > 0 ? Slots : k_;  // as weights_of
    MOEBAL_ASSERT(k == k_);
    const Compute scaling = static_cast<Compute>(options_.scaling_factor);
    const Compute denominator = options_.normalize ? denominator_of(total) : Compute(1);
    const bool varies = options_.normalize && denominator_varies_of(total);
    Compute gu = Compute(0);
    if (varies) {
      for (Index i = 0; i < k; ++i) gu += dw_row[i] * raw[i];
      gu /= denominator;
    }
    Compute gp = Compute(0);
    for (Index i = 0; i < k; ++i) {
      gk[i] = scaling * (dw_row[i] - gu) / denominator;
      gp += gk[i] * raw[i];
    }
    if constexpr (std::is_same_v<Out, Compute>) {
      (void)scratch;
      if constexpr (Accumulate) {
        for (Index i = 0; i < k; ++i) dx[selected[i]] += scale * raw[i] * (gk[i] - gp);
      } else {
        // The row zeroed (+0.0 is all zero bits), then each selected expert's value stored
        // once: 0 plus its slots' terms in slot order (an expert named in two slots gets both,
        // the chain rule), the sums `dx[e] += term` over a zeroed row would make, without
        // reading back what the zeroing just wrote (a stalled store-to-load forward: 31 against
        // 38 ns per row of backward at k = 2 on the Zen 3 VM).
        std::memset(static_cast<void*>(dx), 0, static_cast<std::size_t>(n_) * sizeof(Out));
        for (Index i = 0; i < k; ++i) {
          const Index e = selected[i];
          bool seen = false;
          for (Index l = 0; l < i; ++l) seen = seen || selected[l] == e;
          if (seen) continue;
          Compute value = Compute(0);
          for (Index l = i; l < k; ++l) {
            if (selected[l] == e) value += scale * raw[l] * (gk[l] - gp);
          }
          dx[e] = value;
        }
      }
    } else {
      std::fill(scratch, scratch + n_, Compute(0));
      for (Index i = 0; i < k; ++i) scratch[selected[i]] += scale * raw[i] * (gk[i] - gp);
      for (Index j = 0; j < n_; ++j) detail::store<Accumulate>(dx[j], scratch[j]);
    }
  }

  // The k experts of row t from the caller's indices, each checked to be in [0, N).
  template <Index Slots = 0>
  MOEBAL_ALWAYS_INLINE void read_indices(const char* function,
                                         const Eigen::Ref<const IndexMatrix>& indices, Index t,
                                         Index* selected) const {
    const Index k = Slots > 0 ? Slots : k_;  // as weights_of
    for (Index i = 0; i < k; ++i) {
      const Index e = indices(t, i);
      if (e < 0 || e >= n_) {
        detail::throw_invalid(function, "indices",
                              detail::concat("expert indices in [0, ", n_, ")"),
                              detail::concat(e, " at row ", t, ", slot ", i));
      }
      selected[i] = e;
    }
  }

  // The selected logits of row t are valid inputs: no NaN, no +Inf (named with the column).
  template <Index Slots = 0>
  MOEBAL_ALWAYS_INLINE void check_selected(const char* function, const Compute* row,
                                           const Index* selected, Index t) const {
    const Index k = Slots > 0 ? Slots : k_;  // as weights_of
    for (Index i = 0; i < k; ++i) {
      const Compute v = row[selected[i]];
      if (std::isnan(v) || v == std::numeric_limits<Compute>::infinity()) {
        detail::throw_invalid(function, "logits", "finite values or -Inf (no NaN, no +Inf)",
                              detail::concat(v, " at row ", t, ", column ", selected[i]));
      }
    }
  }

  template <bool Accumulate, class Out>
  void backward_impl(const char* function, const detail::RowInput<Scalar>& x,
                     const Eigen::Ref<const IndexMatrix>& indices,
                     const detail::RowInput<Compute>& dw, RowMatrixRef<Out> out, Compute scale) {
    detail::check_logits_columns(function, x.rows(), x.cols(), n_);
    detail::check_output_shape(function, "indices", indices.rows(), indices.cols(), x.rows(), k_);
    detail::check_output_shape(function, "dloss_dweights", dw.rows(), dw.cols(), x.rows(), k_);
    detail::check_output_shape(function, "dloss_dlogits", out.rows(), out.cols(), x.rows(), n_);
    detail::check_finite_parameter(function, "scale", double(scale));
    if (selected_logits_path()) {
      // Megatron-core's default router: backward_row's steps on local arrays of k slots. Only
      // the k selected logits of a row are read: scattered loads that the hardware does not
      // predict, so they are requested a few rows ahead.
      for_row_chunks(x.rows(), [&](Lane& lane, Index begin, Index end) {
        Index selected[kLocalSlots];
        Compute raw[kLocalSlots], u[kLocalSlots], gk[kLocalSlots];
        for (Index t = begin; t < end; ++t) {
          if (t + kGatherAhead < end) {
            const Index ahead = t + kGatherAhead;
            for (Index i = 0; i < k_; ++i) {
              const Index e = indices(ahead, i);
              if (e >= 0 && e < n_) detail::prefetch(x.data() + ahead * x.outerStride() + e);
            }
          }
          const Compute* row = lane.reader.read(x.data() + t * x.outerStride(), n_);
          const Compute* dw_row = dw.data() + t * dw.outerStride();
          Out* dx = out.data() + t * out.outerStride();
          if (k_ == 2) {  // the slot loops unrolled (the same operations)
            read_indices<2>(function, indices, t, selected);
            check_selected<2>(function, row, selected, t);
            const Compute total = weights_of<2>(function, row, selected, nullptr, t, raw, u);
            selected_softmax_grad<Accumulate, 2>(selected, raw, total, dw_row, scale, gk,
                                                 lane.g.data(), dx);
          } else {
            read_indices(function, indices, t, selected);
            check_selected(function, row, selected, t);
            const Compute total = weights_of(function, row, selected, nullptr, t, raw, u);
            selected_softmax_grad<Accumulate>(selected, raw, total, dw_row, scale, gk,
                                              lane.g.data(), dx);
          }
        }
      });
      return;
    }
    for_row_chunks(x.rows(), [&](Lane& lane, Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        backward_row<Accumulate>(lane, function, x, indices, dw, out, scale, t);
      }
    });
  }

  // One row of backward_impl: validates the row's indices (naming the row), then writes (or
  // adds) the row of scale * d loss / d logits.
  template <bool Accumulate, class Out>
  void backward_row(Lane& lane, const char* function, const detail::RowInput<Scalar>& x,
                    const Eigen::Ref<const IndexMatrix>& indices,
                    const detail::RowInput<Compute>& dw, RowMatrixRef<Out>& out, Compute scale,
                    Index t) const {
    std::vector<Index>& selected = lane.selected;
    read_indices(function, indices, t, selected.data());
    const Compute* row = lane.reader.read(x.data() + t * x.outerStride(), n_);
    if (scores_unused()) {
      // Selection on the logits, weights from a softmax of the selected logits: the gradient
      // depends on the k selected logits alone (the others get 0, as autograd gives them), so
      // only those are validated (a NaN or +Inf there is named; all -Inf is named by
      // weights_row), not the whole row.
      check_selected(function, row, selected.data(), t);
    } else {
      scores_row(lane, function, row, t);
    }
    weights_row(lane, function, row, t);  // recomputes the unnormalized weights and their sum
    const auto& s = lane.s;
    const auto& raw = lane.raw;
    auto& g = lane.g;
    Out* dx = out.data() + t * out.outerStride();
    const Compute* dw_row = dw.data() + t * dw.outerStride();
    if (options_.weights == RouterWeights::softmax_of_selected) {
      selected_softmax_grad<Accumulate>(selected.data(), raw.data(), lane.sum, dw_row, scale,
                                        lane.gk.data(), g.data(), dx);
      return;
    }
    // w = c u / D with c the scaling and D = sum u + eps (add) or max(sum u, eps) (clamp):
    // d L / d u_j = (c / D) (g_j - [D varies] sum_i g_i u_i / D). Uses the unnormalized raw,
    // never a division by c (c = 0 gives a zero gradient).
    const Compute scaling = static_cast<Compute>(options_.scaling_factor);
    const Compute denominator = options_.normalize ? denominator_of(lane.sum) : Compute(1);
    const bool varies = options_.normalize && denominator_varies_of(lane.sum);
    Compute gu = Compute(0);
    if (varies) {
      for (Index i = 0; i < k_; ++i) gu += dw_row[i] * raw[i];
      gu /= denominator;
    }
    g.setZero();
    for (Index i = 0; i < k_; ++i) {
      g[selected[std::size_t(i)]] += scaling * (dw_row[i] - gu) / denominator;
    }
    if (options_.score == RouterScore::softmax) {
      const Compute gs = detail::lane_dot(g.data(), s.data(), n_);
      for (Index j = 0; j < n_; ++j) {
        detail::store<Accumulate>(dx[j], Compute(scale * s[j] * (g[j] - gs)));
      }
    } else {
      for (Index j = 0; j < n_; ++j) {
        Compute derivative;
        if (options_.score == RouterScore::sigmoid) {
          derivative = s[j] * (Compute(1) - s[j]);
        } else {
          // d sqrt(softplus(x)) / dx = sigmoid(x) / (2 sqrt(softplus(x))).
          const Compute v = row[j];
          const Compute sig = v >= Compute(0) ? Compute(1) / (Compute(1) + std::exp(-v))
                                              : std::exp(v) / (Compute(1) + std::exp(v));
          derivative = s[j] > Compute(0) ? sig / (Compute(2) * s[j]) : Compute(0);
        }
        detail::store<Accumulate>(dx[j], Compute(scale * derivative * g[j]));
      }
    }
  }

  // Rows ahead at which backward requests the selected logits it will read.
  static constexpr Index kGatherAhead = 8;
  // The most slots the selected-logits path holds in local arrays.
  static constexpr Index kLocalSlots = 16;

  Index n_, k_;
  RouterOptions options_;
  // The name `backward` reports errors under (`route_backward` names itself).
  const char* backward_name_ = "moebal::Router::backward";
  Eigen::Array<Compute, Eigen::Dynamic, 1> bias_compute_;
  std::vector<Lane> lanes_;  // per thread: one row's scratch
};

/// Routes T x N logits in one call (see the file comment for the steps).
/// @param logits T x N, float, double, Eigen::bfloat16 or Eigen::half (computed in float).
/// @param k experts per token.
/// @param options score function, weights, normalization, scaling, groups, expert bias.
/// @return T x k indices (by decreasing selection value) and T x k weights.
/// @throws moebal::invalid_argument as `Router`.
template <class Derived>
RouterResult<compute_type_t<typename Derived::Scalar>> route(
    const Eigen::MatrixBase<Derived>& logits, Index k, const RouterOptions& options = {}) {
  using Scalar = typename Derived::Scalar;
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::route: logits must be float, double, Eigen::bfloat16 or Eigen::half");
  constexpr const char* function = "moebal::route";
  const detail::RowInput<Scalar> x(logits);
  detail::check_logits_shape(function, x.rows(), x.cols());
  Router<Scalar> router(function, x.cols(), k, options);
  RouterResult<compute_type_t<Scalar>> result;
  result.indices.resize(x.rows(), k);
  result.weights.resize(x.rows(), k);
  RowMatrixRef<compute_type_t<Scalar>> weights(result.weights);
  router.forward_impl(function, x, result.indices, weights);
  return result;
}

/// d loss / d logits of a route: maps d loss / d weights (T x k) through the router.
/// @param logits and @p indices as given to / returned by `route` with the same options.
/// @throws moebal::invalid_argument for mismatched shapes, indices out of range, or NaN or +Inf
///   logits: only among each row's k selected logits for selection on the logits with
///   softmax_of_selected weights (whose gradient depends on nothing else), anywhere in the row
///   for the other routers (see `Router::backward`).
template <class Derived, class DerivedG>
RowMatrix<compute_type_t<typename Derived::Scalar>> route_backward(
    const Eigen::MatrixBase<Derived>& logits, const IndexMatrix& indices,
    const Eigen::MatrixBase<DerivedG>& dloss_dweights, const RouterOptions& options = {}) {
  using Scalar = typename Derived::Scalar;
  constexpr const char* function = "moebal::route_backward";
  const detail::RowInput<Scalar> x(logits);
  detail::check_logits_shape(function, x.rows(), x.cols());
  Router<Scalar> router(function, x.cols(), indices.cols() > 0 ? indices.cols() : 1, options);
  RowMatrix<compute_type_t<Scalar>> grad(x.rows(), x.cols());
  router.backward(x, indices, dloss_dweights, grad);
  return grad;
}

}  // namespace moebal
