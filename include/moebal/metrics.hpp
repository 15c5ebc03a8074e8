// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// Balance and specialization metrics of a router's expert selections.
///
/// These are metrics, not losses: they are computed from integer selection counts (or any
/// non-negative loads), have no gradient, and are meant for logging and evaluation. Everything
/// is computed in double. `SwitchStats` will carry the `BalanceMetrics` of its counts.
///
/// Two families:
///   - load balance of one vector of per-expert loads c (length N): `balance_metrics`;
///   - domain specialization of a domain x expert table of selection counts n (D x N), built
///     from logits and per-token domain labels by `domain_expert_counts` and summarized by
///     `specialization_metrics`.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"
#include "moebal/detail/input.hpp"
#include "moebal/detail/score_kernels.hpp"
#include "moebal/detail/topk_kernels.hpp"

namespace moebal {

/// Load balance of a vector of per-expert loads c_0..c_{N-1} (c_i >= 0, S = sum_i c_i).
/// With S > 0:
///   max_vio            = max_i c_i / mean(c) - 1          (0 = balanced, at most N - 1)
///   cv                 = sqrt((1/N) sum_i (c_i - mean(c))^2) / mean(c)     (0 = balanced;
///                        population variance: cv^2 is `cv2_load`'s load CV^2 at a = 1)
///   normalized_entropy = -sum_i p_i log p_i / log N, p = c / S, 0 log 0 = 0
///                        (1 = balanced, 0 = one expert takes everything; 1 when N = 1)
///   min_share, max_share = min_i p_i, max_i p_i                       (both 1/N when balanced)
/// With S = 0 (no load at all) every ratio above is 0 by definition.
struct BalanceMetrics {
  /// MaxVio, the relative overload of the busiest expert (Wang et al. 2024).
  double max_vio = 0.0;
  /// Coefficient of variation: population standard deviation over mean.
  double cv = 0.0;
  /// Entropy of the load shares over its maximum log N.
  double normalized_entropy = 0.0;
  /// Smallest share of the total load.
  double min_share = 0.0;
  /// Largest share of the total load.
  double max_share = 0.0;
  /// Number of experts with c_i == 0.
  Index empty_experts = 0;
  /// N.
  Index num_experts = 0;
  /// S = sum_i c_i (as a double).
  double total = 0.0;
};

/// Domain specialization of a domain x expert table of selection counts n_de, read as a joint
/// distribution p(d, e) = n_de / sum n (each selection is one sample; with top-k counts every
/// real token contributes k samples, so p(d) is the token-weighted domain frequency).
struct SpecializationMetrics {
  /// I(D; E) = sum_{d,e} p(d,e) log(p(d,e) / (p(d) p(e))), in nats (0 when D and E are
  /// independent).
  double mutual_information = 0.0;
  /// I(D; E) / min(H(D), H(E)), in [0, 1]; 0 when that minimum is 0. It is 1 exactly when one
  /// variable determines the other, e.g. when every expert serves a single domain.
  double normalized_mutual_information = 0.0;
  /// Mean, over the domains with at least one selection, of max_e n_de / sum_e n_de. For top-k
  /// counts an expert is selected at most once per token, so this is at most 1/k.
  double mean_top_expert_share = 0.0;
};

namespace detail {

/// A power of two 2^-e that brings the largest of the values near 1 (2^-e * max in [0.5, 1)).
/// Every metric here is invariant to a common scale; scaling by a power of two is exact (for
/// the magnitudes of counts), and avoids overflow in sums and squares of huge loads.
inline double metrics_scale(double max_value) {
  if (!(max_value > 0.0)) return 1.0;
  int exponent = 0;
  std::frexp(max_value, &exponent);
  return std::ldexp(1.0, -exponent);
}

/// -sum_i p_i log p_i over the positive values of v, with p = v / total (total > 0).
template <class Values>
double entropy_of(const Values& v, double total) {
  double h = 0.0;
  for (Eigen::Index i = 0; i < v.size(); ++i) {
    if (v[i] > 0.0) {
      const double p = v[i] / total;
      h -= p * std::log(p);
    }
  }
  return std::max(h, 0.0);
}

/// Checks that a metric input element is finite and non-negative.
inline void check_load_value(const char* function, const char* argument, const char* expected,
                             double value, const std::string& where) {
  if (!std::isfinite(value) || value < 0.0) {
    throw_invalid(function, argument, expected, concat(value, " at ", where));
  }
}

inline BalanceMetrics balance_metrics_impl(const char* function,
                                           const Eigen::Ref<const Eigen::VectorXd>& counts) {
  const Index n = static_cast<Index>(counts.size());
  MOEBAL_ASSERT(n >= 1);
  BalanceMetrics m;
  m.num_experts = n;
  double max_value = 0.0;
  for (Index i = 0; i < n; ++i) {
    const double c = counts[i];
    check_load_value(function, "counts", "finite, non-negative loads", c,
                     concat("element ", i));
    max_value = std::max(max_value, c);
    m.empty_experts += c == 0.0 ? 1 : 0;
  }
  m.total = counts.sum();
  if (max_value == 0.0) return m;  // no load: every ratio is 0

  // Ratios from the loads scaled by a power of two (exact for counts; no overflow).
  const double scale = metrics_scale(max_value);
  const Eigen::ArrayXd c = counts.array() * scale;
  const double sum = c.sum();
  const double mean = sum / double(n);
  m.max_vio = std::max(c.maxCoeff() / mean - 1.0, 0.0);
  m.cv = std::sqrt((c - mean).square().sum() / double(n)) / mean;
  m.normalized_entropy =
      n == 1 ? 1.0 : std::min(entropy_of(c, sum) / std::log(double(n)), 1.0);
  m.min_share = c.minCoeff() / sum;
  m.max_share = c.maxCoeff() / sum;
  return m;
}

inline SpecializationMetrics specialization_metrics_impl(
    const char* function,
    const Eigen::Ref<const RowMatrix<double>, 0, Eigen::OuterStride<>>& table) {
  const Index domains = table.rows(), experts = table.cols();
  MOEBAL_ASSERT(domains >= 1 && experts >= 1);
  double max_value = 0.0;
  for (Index d = 0; d < domains; ++d) {
    for (Index e = 0; e < experts; ++e) {
      const double v = table(d, e);
      check_load_value(function, "table", "finite, non-negative counts", v,
                       concat("row ", d, ", column ", e));
      max_value = std::max(max_value, v);
    }
  }
  SpecializationMetrics m;
  if (max_value == 0.0) return m;  // no selection: every metric is 0

  const RowMatrix<double> scaled = table * metrics_scale(max_value);
  const Eigen::VectorXd per_domain = scaled.rowwise().sum();
  const Eigen::VectorXd per_expert = scaled.colwise().sum().transpose();
  const double total = per_domain.sum();

  // I = sum_{n_de > 0} (n_de / S) log(n_de S / (n_d n_e)); each term's p(d,e) > 0 implies
  // p(d), p(e) > 0.
  double mi = 0.0;
  for (Index d = 0; d < domains; ++d) {
    for (Index e = 0; e < experts; ++e) {
      const double v = scaled(d, e);
      if (v > 0.0) mi += (v / total) * std::log((v / per_domain[d]) * (total / per_expert[e]));
    }
  }
  const double h_min = std::min(entropy_of(per_domain, total), entropy_of(per_expert, total));
  m.mutual_information = std::max(mi, 0.0);
  m.normalized_mutual_information =
      h_min > 0.0 ? std::clamp(m.mutual_information / h_min, 0.0, 1.0) : 0.0;

  double share_sum = 0.0;
  Index used_domains = 0;
  for (Index d = 0; d < domains; ++d) {
    if (per_domain[d] > 0.0) {
      share_sum += scaled.row(d).maxCoeff() / per_domain[d];
      ++used_domains;
    }
  }
  m.mean_top_expert_share = share_sum / double(used_domains);  // used_domains >= 1 here
  return m;
}

template <class Derived>
constexpr void assert_real_counts() {
  static_assert(std::is_arithmetic_v<typename Derived::Scalar>,
                "moebal: counts must be an integer or floating-point Eigen vector/matrix "
                "(e.g. moebal::CountVector or Eigen::VectorXd)");
}

}  // namespace detail

/// Load-balance metrics of per-expert loads c (see `BalanceMetrics` for every formula).
///
/// MaxVio is the batch-level "maximal violation" of Wang, Gao, Zhao, Sun, Dai, "Auxiliary-Loss-
/// Free Load Balancing Strategy for Mixture-of-Experts" (2024, arXiv:2408.15664):
/// MaxVio = (max_i Load_i - mean Load) / mean Load, with Load_i the tokens routed to expert i
/// (for top-k counts, mean Load = T k / N, the load under perfect balance). The coefficient of
/// variation is the imbalance measure behind Shazeer et al. 2017's importance and load losses
/// (w CV^2); the normalized entropy is the entropy of the load shares divided by its maximum, log N.
/// With S = sum c = 0 (no token), max_vio, cv, normalized_entropy, min_share and max_share are
/// all 0, empty_experts = N and total = 0.
///
/// @param counts a length-N vector (a column or a row, N >= 1) of non-negative loads: integer
///   counts (`CountVector`, `RoutingStatistics::counts()`, `SwitchStats::tokens_per_expert`) or
///   reals (`Eigen::VectorXd`, e.g. summed scores). Converted once to double (integer counts
///   are exact up to 2^53).
/// @throws moebal::invalid_argument if counts is not a vector, is empty, or has a negative,
///   NaN or infinite element (the message names the element's index).
template <class Derived>
BalanceMetrics balance_metrics(const Eigen::MatrixBase<Derived>& counts) {
  detail::assert_real_counts<Derived>();
  constexpr const char* function = "moebal::balance_metrics";
  const Index rows = counts.rows(), cols = counts.cols();
  if (rows == 0 || cols == 0) {
    detail::throw_invalid(function, "counts", "at least one expert (N >= 1)",
                          detail::concat("an empty vector, shape ",
                                         detail::shape_string(rows, cols)));
  }
  if (rows != 1 && cols != 1) {
    detail::throw_invalid(function, "counts", "a vector (one row or one column)",
                          detail::concat(detail::shape_string(rows, cols), " matrix"));
  }
  const Eigen::VectorXd values =
      cols == 1 ? Eigen::VectorXd(counts.col(0).template cast<double>())
                : Eigen::VectorXd(counts.row(0).transpose().template cast<double>());
  return detail::balance_metrics_impl(function, values);
}

/// The domain x expert table of top-k selections: entry (d, i) is the number of real tokens t
/// with domains[t] == d whose top-k contains expert i. Each row sums to k times the number of
/// the domain's real tokens; the whole table sums to T k (T real tokens).
///
/// The selection is the one every moebal loss uses (`switch_aux_loss`'s counts): the k largest
/// scores q_t = score(x_t) (softmax or normalized sigmoid, computed in the logits' precision),
/// ties to the lower expert index. Padded tokens (mask 0) are never read: neither their logits
/// nor their labels (so a padding label such as -100 is allowed there).
///
/// @param logits T x N router logits, float, double, Eigen::bfloat16 or Eigen::half (scores
///   computed in float for half precision; rows are tokens). Row-major storage is
///   read in place; column-major is converted once.
/// @param k experts per token, 1 <= k <= N.
/// @param domains length T, the domain label of each token, in [0, num_domains).
/// @param num_domains D >= 1, the number of rows of the table.
/// @param score the score function the top-k is taken on (default softmax). There is no expert
///   bias here: for a router that selects on biased scores (DeepSeek-V3), count its
///   `Router::forward` indices instead.
/// @param mask length T, nonzero = real token; empty = every token real.
/// @return D x N counts (int64).
/// @throws moebal::invalid_argument if T or N is 0, k is out of range, num_domains < 1, domains
///   or mask is not of length T, the mask holds NaN, a real token's label is outside
///   [0, num_domains) (the message names the token and the label), the score function is
///   invalid, or a real token's logits hold NaN or +Inf (or, for softmax, are all -Inf).
template <class Derived>
Eigen::Matrix<std::int64_t, Eigen::Dynamic, Eigen::Dynamic> domain_expert_counts(
    const Eigen::MatrixBase<Derived>& logits, Index k,
    const Eigen::Ref<const Eigen::Matrix<Index, Eigen::Dynamic, 1>>& domains, Index num_domains,
    ScoreFunction score = ScoreFunction::softmax, const TokenMask& mask = {}) {
  using Scalar = typename Derived::Scalar;
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::domain_expert_counts: logits must be float, double, Eigen::bfloat16 or "
                "Eigen::half; cast them first, e.g. logits.template cast<float>()");
  using Compute = compute_type_t<Scalar>;
  constexpr const char* function = "moebal::domain_expert_counts";
  const detail::RowInput<Scalar> x(logits);
  const Index rows = x.rows(), n = x.cols();
  detail::check_logits_shape(function, rows, n);
  detail::check_k(function, k, n);
  if (num_domains < 1) {
    detail::throw_invalid(function, "num_domains", "at least 1 domain",
                          detail::concat(num_domains));
  }
  if (static_cast<Index>(domains.size()) != rows) {
    detail::throw_invalid(function, "domains",
                          detail::concat("one label per token (length T = ", rows,
                                         ", logits.rows())"),
                          detail::concat("length ", domains.size()));
  }
  detail::check_mask(function, mask, rows);
  if (score != ScoreFunction::softmax && score != ScoreFunction::sigmoid) {
    detail::throw_invalid(function, "score", "softmax or sigmoid",
                          detail::concat(static_cast<int>(score)));
  }
  for (Index t = 0; t < rows; ++t) {
    if (!mask.is_real(t)) continue;
    const Index label = domains[t];
    if (label < 0 || label >= num_domains) {
      detail::throw_invalid(function, "domains",
                            detail::concat("a label in [0, num_domains) = [0, ", num_domains,
                                           ") for every real token"),
                            detail::concat(label, " at token ", t));
    }
  }

  Eigen::Matrix<std::int64_t, Eigen::Dynamic, Eigen::Dynamic> table =
      Eigen::Matrix<std::int64_t, Eigen::Dynamic, Eigen::Dynamic>::Zero(num_domains, n);
  detail::ScratchArray<Compute> raw(n), q(n);
  detail::RowNorm<Compute> norm;
  detail::TopkScratch<Compute> scratch;
  detail::RowReader<Scalar, Compute> reader;
  reader.resize(n);
  scratch.resize(n, k);
  Eigen::Matrix<Index, Eigen::Dynamic, 1> selected(k);
  for (Index t = 0; t < rows; ++t) {
    if (!mask.is_real(t)) continue;
    const Compute* row = reader.read(x.data() + t * x.outerStride(), n);
    if (!detail::raw_scores(row, n, score, raw, norm)) {
      detail::throw_invalid_row(function, row, n, t, score);
    }
    detail::scores_from_raw(raw, norm, q);
    detail::topk_row(q.data(), n, k, selected.data(), scratch);
    const Index d = domains[t];
    for (Index s = 0; s < k; ++s) table(d, selected[s]) += 1;
  }
  return table;
}

/// Specialization metrics of a domain x expert count table n (D x N), read as the joint
/// distribution p(d, e) = n_de / S, S = sum_{d,e} n_de, with marginals p(d) = sum_e p(d, e) and
/// p(e) = sum_d p(d, e); natural logarithms, 0 log 0 = 0:
///   mutual_information            I(D; E) = sum_{d,e} p(d,e) log(p(d,e) / (p(d) p(e)))
///   normalized_mutual_information I(D; E) / min(H(D), H(E)), H(X) = -sum_x p(x) log p(x);
///                                 0 when min(H(D), H(E)) = 0 (one domain, or one expert used)
///   mean_top_expert_share         (1/|U|) sum_{d in U} max_e n_de / sum_e n_de,
///                                 U = the domains with sum_e n_de > 0
/// Normalization: I(D; E) <= min(H(D), H(E)), so dividing by the minimum maps onto [0, 1] with
/// 1 reached exactly when one variable is a function of the other (H(D | E) = 0: every expert
/// serves one domain; or H(E | D) = 0: every domain uses one expert). The geometric or
/// arithmetic mean of H(D) and H(E), the other common choices (Strehl and Ghosh 2002;
/// scikit-learn's default), reach 1 only when both hold (domains and used experts one-to-one),
/// which top-k routing with k > 1 never produces. Expert-task mutual information as a measure
/// of specialization: Chen et al. 2023, "Mod-Squad: Designing Mixtures of Experts As Modular
/// Multi-Task Learners".
/// With S = 0 every metric is 0.
///
/// @param table D x N (D, N >= 1) non-negative counts, integer (the output of
///   `domain_expert_counts`) or real; converted once to double.
/// @throws moebal::invalid_argument if the table is empty or has a negative, NaN or infinite
///   entry (the message names its row and column).
template <class Derived>
SpecializationMetrics specialization_metrics(const Eigen::MatrixBase<Derived>& table) {
  detail::assert_real_counts<Derived>();
  constexpr const char* function = "moebal::specialization_metrics";
  const Index rows = table.rows(), cols = table.cols();
  if (rows == 0 || cols == 0) {
    detail::throw_invalid(function, "table",
                          "at least one domain row and one expert column (D >= 1, N >= 1)",
                          detail::concat("shape ", detail::shape_string(rows, cols)));
  }
  const RowMatrix<double> values = table.template cast<double>();
  return detail::specialization_metrics_impl(function, values);
}

}  // namespace moebal
