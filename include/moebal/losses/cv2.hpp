// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// Squared coefficient of variation (CV^2) balance terms.
///
/// Importance CV^2 (Shazeer et al. 2017, "Outrageously Large Neural Networks", the importance
/// loss): I_i = sum_t g_ti over real tokens, with gates g either the dense scores (g = q) or
/// the top-k renormalized gates G(x) of Shazeer (g_ti = q_ti / sum_{j in topk_t} q_tj for i in
/// the top-k, 0 elsewhere; for softmax scores this is the softmax over the top-k logits):
///   population (default): L = a Var(I) / Mean(I)^2,  Var = (1/N) sum_i (I_i - mu)^2
///   unbiased (Tutel `load_importance_loss`): L = a Var_u(I) / (Mean(I)^2 + 1e-10),
///                                           Var_u = (1/(N-1)) sum_i (I_i - mu)^2
///   d L / d I_i (population) = a [ (2/N)(I_i - mu)/mu^2 - 2 Var/(N mu^3) ]
///   d L / d I_i (unbiased)   = a [ 2 (I_i - mu)/((N-1) D) - 2 mu Var_u/(N D^2) ],  D = mu^2 + 1e-10
/// then through the gates (top-k: d L / d q_tj = (h_j - sum_{i in topk} h_i g_ti) / s_t for j in
/// the top-k, s_t = sum_{i in topk} q_ti) and the score function's VJP.
///
/// Load CV^2 on the hard counts c_i (the tutorial formula): L = a Var(c) / Mean(c)^2 with the
/// population variance, which has the closed form a (N / (T k)^2 sum_i c_i^2 - 1). The counts
/// are piecewise constant in the logits, so its gradient is exactly zero: it is a metric, not
/// a trainable loss. Train with the importance form (or the Switch loss) instead.
///
/// With a mask, sums run over real tokens; padded rows get zero gradient. With no real token
/// (Mean = 0) the population forms are 0 with a zero gradient. Real tokens whose scores all
/// underflow to 0 (sigmoid, every logit below about -88 in float, -745 in double) make the
/// population importance CV^2 0/0: `moebal::invalid_argument` (PyTorch's formula gives NaN),
/// as does a coefficient so large that d L / d I overflows the compute type.

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"
#include "moebal/detail/input.hpp"
#include "moebal/detail/scored_rows.hpp"

namespace moebal {

/// Which gates the importance sums.
enum class ImportanceGates {
  /// g = q, every expert's score (dense).
  dense,
  /// g_ti = q_ti / sum_{j in topk_t} q_tj on the top-k, 0 elsewhere (Shazeer's G(x)).
  topk,
};

/// Which variance CV^2 uses.
enum class Cv2Variance {
  /// Var = (1/N) sum (I - mu)^2, L = a Var / mu^2 (default; the tutorial formula).
  population,
  /// Var = (1/(N-1)) sum (I - mu)^2, L = a Var / (mu^2 + 1e-10) (Tutel, torch.var default).
  unbiased,
};

/// Options of the CV^2 terms.
struct Cv2Options {
  ImportanceGates gates = ImportanceGates::dense;
  Cv2Variance variance = Cv2Variance::population;
  ScoreFunction score = ScoreFunction::softmax;
  /// The coefficient a, finite.
  double coefficient = 1.0;
  /// Padding mask (used by the one-line forms; the loss objects take it in `forward`).
  TokenMask mask{};
};

/// Result of `cv2_importance_loss`.
template <class Scalar>
struct Cv2ImportanceResult {
  Scalar loss = Scalar(0);
  /// d L / d logits, T x N row-major.
  RowMatrix<Scalar> grad;
  /// I_i, length N.
  Eigen::VectorXd importance;
  std::int64_t tokens = 0;
};

/// Result of `cv2_load`: a metric, so `grad` is exactly zero (kept for a uniform interface).
template <class Scalar>
struct Cv2LoadResult {
  Scalar loss = Scalar(0);
  RowMatrix<Scalar> grad;
  /// c_i, top-k selections per expert (sum = T k).
  CountVector counts;
  std::int64_t tokens = 0;
};

namespace detail {

inline void check_cv2_options(const char* function, Index num_experts, Index k,
                              const Cv2Options& options) {
  if (num_experts < 1) throw_invalid(function, "num_experts", "at least 1 expert", concat(num_experts));
  check_k(function, k, num_experts);
  check_finite_parameter(function, "options.coefficient", options.coefficient);
  if (options.gates != ImportanceGates::dense && options.gates != ImportanceGates::topk) {
    throw_invalid(function, "options.gates", "dense or topk", concat(int(options.gates)));
  }
  if (options.variance != Cv2Variance::population && options.variance != Cv2Variance::unbiased) {
    throw_invalid(function, "options.variance", "population or unbiased",
                  concat(int(options.variance)));
  }
  if (options.score != ScoreFunction::softmax && options.score != ScoreFunction::sigmoid) {
    throw_invalid(function, "options.score", "softmax or sigmoid", concat(int(options.score)));
  }
  if (options.variance == Cv2Variance::unbiased && num_experts < 2) {
    throw_invalid(function, "num_experts", "at least 2 experts for the unbiased variance",
                  concat(num_experts));
  }
}

/// Top-k gates q_i / sum_{j in topk} q_j are undefined when every selected score is 0 (a row of
/// -Inf, or sigmoid scores that underflow: logits below about -745 in double, -103 in float).
[[noreturn]] inline void throw_zero_topk_sum(const char* function, Index t) {
  throw_invalid(function, "logits",
                "rows whose top-k scores have a positive sum (the top-k gates divide by it)",
                concat("a sum of 0 at row ", t));
}

/// Why a population CV^2's statistic can be 0 for every expert while real tokens exist, named in
/// the error: the importance of sigmoid scores that underflow (logits below about -88 in float,
/// -745 in double; PyTorch's sigmoid underflows at the same points).
inline constexpr const char* kZeroImportanceCause =
    "sigmoid scores underflow to 0 for logits below about -88 in float, -745 in double";

/// Where a CV^2 comes from, for the error raised when its statistic is 0/0: the public function,
/// the argument to blame, the statistic's name, the number of real tokens behind it, and why it
/// can be 0 (`kZeroImportanceCause` for importances).
struct Cv2Source {
  const char* function;
  const char* argument;
  const char* statistic;
  double tokens;
  const char* cause;
};

/// d L / d I (h, computed in double) must be finite in the compute type C of the backward pass:
/// float overflows for coefficients near float's range (the gradient itself is then beyond it).
template <class C>
inline void check_gradient_representable(const char* function, const char* argument,
                                         const ScratchArray<C>& h,
                                         const Eigen::VectorXd& h_double) {
  if (!h.allFinite()) {
    throw_invalid(function, argument,
                  "coefficients whose gradient d L / d I is finite in the compute type "
                  "(use double logits or a smaller coefficient)",
                  concat("|d L / d I| up to ", h_double.cwiseAbs().maxCoeff(),
                         ", beyond the compute type's largest value"));
  }
}

/// CV^2 of v and its gradient h = d CV^2 / d v (coefficient included).
/// The population CV^2 Var(v) / Mean(v)^2 is 0/0 when real tokens (`source.tokens` > 0) leave
/// every v_i exactly 0; that raises invalid_argument naming `source.argument` rather than
/// returning 0, which would silently stop the balancing. With no real token it is 0 (nothing to
/// balance). Tutel's unbiased form adds 1e-10 to Mean^2 and stays defined.
inline double cv2_and_gradient(const Cv2Source& source, const Eigen::VectorXd& v,
                               Cv2Variance variance, double a, Eigen::VectorXd& h) {
  const double n = double(v.size());
  h.setZero(v.size());
  if (variance == Cv2Variance::population) {
    // Population CV^2 is scale-invariant: evaluate it on v / m, m = max |v_i|, so that mu^2 and
    // mu^3 cannot underflow for tiny importances (sigmoid scores of logits near -700), and
    // scale the gradient back by 1 / m (L(v) = L(v / m) for the fixed m).
    // No temporaries: the loss objects must not allocate in steady state.
    const double m = v.cwiseAbs().maxCoeff();
    if (m == 0.0) {
      if (source.tokens > 0) {
        throw_invalid(source.function, source.argument,
                      concat("a positive ", source.statistic,
                             " for at least one expert (the population CV^2 divides by the mean ",
                             source.statistic, " squared)"),
                      concat("every ", source.statistic, " 0 over ", source.tokens,
                             " real tokens (", source.cause, ")"));
      }
      return 0.0;
    }
    const double mu = (v.array() / m).mean();
    if (mu == 0.0) return 0.0;
    const double var = (v.array() / m - mu).square().sum() / n;
    h = (a / m * ((2.0 / n) * (v.array() / m - mu) / (mu * mu) -
                  2.0 * var / (n * mu * mu * mu)))
            .matrix();
    return a * var / (mu * mu);
  }
  const double mu = v.mean();
  const double var = (v.array() - mu).square().sum() / (n - 1.0);
  const double d = mu * mu + 1e-10;
  h = a * (2.0 * (v.array() - mu) / ((n - 1.0) * d) - 2.0 * mu * var / (n * d * d)).matrix();
  return a * var / d;
}

}  // namespace detail

/// Importance CV^2 as a reusable object (no allocation in steady state): `forward` sums the
/// gates per expert, `backward` writes (or `backward_accumulate` adds) scale * d L / d logits.
/// @tparam Scalar float or double (importance sums accumulate in double).
/// Threads: pass 1 runs blocks of rows on `moebal::num_threads()` threads (partials added in
/// block order), the backward runs row chunks; results are bitwise identical for any thread
/// count (<moebal/core/threads.hpp>).
template <class Scalar>
class Cv2ImportanceLoss {
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::Cv2ImportanceLoss<Scalar>: Scalar must be float, double, "
                "Eigen::bfloat16 or Eigen::half");

 public:
  /// The compute type: float for bfloat16/half logits, Scalar otherwise.
  using Compute = compute_type_t<Scalar>;

  /// @param num_experts N >= 1 (>= 2 for the unbiased variance). @param k experts per token,
  ///   1 <= k <= N (used by the top-k gates only). @param options gates, variance, score,
  ///   coefficient; the mask is given to `forward`.
  /// @throws moebal::invalid_argument for invalid N, k or options.
  Cv2ImportanceLoss(Index num_experts, Index k, const Cv2Options& options = {})
      : options_(options) {
    detail::check_cv2_options("moebal::Cv2ImportanceLoss", num_experts, k, options);
    options_.mask = TokenMask{};
    rows_.reset(num_experts, options.gates == ImportanceGates::topk ? k : 0, options.score);
    importance_.setZero(num_experts);
    h_.setZero(num_experts);
    h_compute_.setZero(num_experts);
  }

  /// Reads T x N logits, returns L. @throws moebal::invalid_argument for bad shapes, masks or
  /// values (as `switch_aux_loss`).
  template <class Derived>
  Compute forward(const Eigen::MatrixBase<Derived>& logits, const TokenMask& mask = {}) {
    static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                  "moebal::Cv2ImportanceLoss<Scalar> takes logits of the same Scalar");
    return forward_impl("moebal::Cv2ImportanceLoss::forward", detail::RowInput<Scalar>(logits),
                        mask);
  }

  /// dloss_dlogits = scale * d L / d logits for the logits of the last forward.
  template <class Derived, class Out>
  void backward(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                Compute scale = Compute(1)) {
    backward_impl<false>("moebal::Cv2ImportanceLoss::backward", detail::RowInput<Scalar>(logits),
                         detail::output_ref<Scalar>(dloss_dlogits), scale);
  }

  /// dloss_dlogits += scale * d L / d logits.
  template <class Derived, class Out>
  void backward_accumulate(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                           Compute scale = Compute(1)) {
    backward_impl<true>("moebal::Cv2ImportanceLoss::backward_accumulate",
                        detail::RowInput<Scalar>(logits), detail::output_ref<Scalar>(dloss_dlogits),
                        scale);
  }

  Compute loss() const noexcept { return static_cast<Compute>(loss_); }
  /// I_i of the last forward.
  const Eigen::VectorXd& importance() const noexcept { return importance_; }
  std::int64_t tokens() const noexcept { return tokens_; }

  // Internal: the one-line form names itself in error messages.
  Compute forward_impl(const char* function, const detail::RowInput<Scalar>& x,
                       const TokenMask& mask) {
    detail::check_logits_columns(function, x.rows(), x.cols(), rows_.num_experts());
    detail::check_mask(function, mask, x.rows());
    importance_.setZero();
    tokens_ = 0;
    const Index n = rows_.num_experts(), k = rows_.k();
    const bool topk = options_.gates == ImportanceGates::topk;
    // Blocks of rows on the threads, each into its own partial, added in block order.
    const Index blocks = rows_.forward_blocks(
        function, x, mask, partials_,
        [n](Partial& p) {
          p.tokens = 0;
          p.importance.setZero(n);
        },
        [&](Partial& p, Index t, const Compute* q, const detail::RowSelection<Compute>& sel,
            detail::RowWork<Scalar>&) {
          ++p.tokens;
          double* importance = p.importance.data();
          if (!topk) {
            for (Index j = 0; j < n; ++j) importance[j] += double(q[j]);
            return;
          }
          const Index* selected = sel.selected;
          Compute s = Compute(0);
          for (Index i = 0; i < k; ++i) s += q[selected[i]];
          if (!(s > Compute(0))) detail::throw_zero_topk_sum(function, t);
          for (Index i = 0; i < k; ++i) importance[selected[i]] += double(q[selected[i]] / s);
        });
    for (Index b = 0; b < blocks; ++b) {
      const Partial& p = partials_[static_cast<std::size_t>(b)];
      tokens_ += p.tokens;
      importance_ += p.importance.matrix();
    }
    loss_ = detail::cv2_and_gradient(
        {function, "logits", "importance", double(tokens_), detail::kZeroImportanceCause},
        importance_, options_.variance, options_.coefficient, h_);
    h_compute_ = h_.array().template cast<Compute>();
    return loss();
  }

 private:
  template <bool Accumulate, class Out>
  void backward_impl(const char* function, const detail::RowInput<Scalar>& x, RowMatrixRef<Out> out,
                     Compute scale) {
    rows_.check_backward(function, x, out, double(scale));
    detail::check_gradient_representable(function, "options.coefficient", h_compute_, h_);
    const Index n = rows_.num_experts(), k = rows_.k();
    const bool topk = options_.gates == ImportanceGates::topk;
    const Compute* h = h_compute_.data();
    rows_.template backward<Accumulate>(
        function, x, out, scale, [&](Index t, const Compute* q, const Index* selected, Compute* g) {
          if (!topk) {
            for (Index j = 0; j < n; ++j) g[j] = h[j];
            return;
          }
          // g_i = q_i / s on the top-k: d L / d q_j = (h_j - sum_i h_i g_i) / s there.
          std::fill(g, g + n, Compute(0));
          Compute s = Compute(0);
          for (Index i = 0; i < k; ++i) s += q[selected[i]];
          if (!(s > Compute(0))) detail::throw_zero_topk_sum(function, t);
          Compute hg = Compute(0);
          for (Index i = 0; i < k; ++i) hg += h[selected[i]] * (q[selected[i]] / s);
          for (Index i = 0; i < k; ++i) g[selected[i]] = (h[selected[i]] - hg) / s;
        });
  }

  Cv2Options options_;
  detail::ScoredRows<Scalar> rows_;
  // One block's partial of pass 1 (real tokens, importance sums).
  struct Partial {
    std::int64_t tokens = 0;
    Eigen::ArrayXd importance;
  };
  std::vector<Partial> partials_;  // one per block (<= 64), reused
  Eigen::VectorXd importance_, h_;
  detail::ScratchArray<Compute> h_compute_;
  double loss_ = 0.0;
  std::int64_t tokens_ = 0;
};

/// Importance CV^2 and its gradient in one call (see the file comment for the formulas).
/// @param logits T x N, float, double, Eigen::bfloat16 or Eigen::half (computed in float), any
/// Eigen dense expression.
/// @param k experts per token, 1 <= k <= N (matters for `ImportanceGates::topk` only).
/// @param options gates, variance, score function, coefficient, mask.
/// @return loss, grad (T x N row-major), importance I (length N), tokens.
/// @throws moebal::invalid_argument for T = 0 or N = 0, k out of range, N < 2 with the unbiased
///   variance, a non-finite coefficient, bad masks or NaN/+Inf logits.
template <class Derived>
Cv2ImportanceResult<compute_type_t<typename Derived::Scalar>> cv2_importance_loss(
    const Eigen::MatrixBase<Derived>& logits, Index k, const Cv2Options& options = {}) {
  using Scalar = typename Derived::Scalar;
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::cv2_importance_loss: logits must be float, double, "
                "Eigen::bfloat16 or Eigen::half");
  constexpr const char* function = "moebal::cv2_importance_loss";
  const detail::RowInput<Scalar> x(logits);
  detail::check_logits_shape(function, x.rows(), x.cols());
  detail::check_cv2_options(function, x.cols(), k, options);
  Cv2ImportanceLoss<Scalar> loss(x.cols(), k, options);
  Cv2ImportanceResult<compute_type_t<Scalar>> result;
  result.loss = loss.forward_impl(function, x, options.mask);
  result.grad.resize(x.rows(), x.cols());
  loss.backward(x, result.grad);
  result.importance = loss.importance();
  result.tokens = loss.tokens();
  return result;
}

/// Load CV^2 of the hard top-k counts: L = a Var(c) / Mean(c)^2 (population variance)
/// = a (N / (T k)^2 sum_i c_i^2 - 1). A metric, not a trainable loss: its gradient is exactly
/// zero (the counts are piecewise constant in the logits), and `grad` is returned as zeros.
/// Use `cv2_importance_loss` (or the Switch loss) to train. `options.gates` and
/// `options.variance` are ignored (population variance).
/// @return loss (0 when T = 0), zero grad, counts c (sum = T k), tokens.
/// @throws moebal::invalid_argument as `cv2_importance_loss`.
template <class Derived>
Cv2LoadResult<compute_type_t<typename Derived::Scalar>> cv2_load(
    const Eigen::MatrixBase<Derived>& logits, Index k, const Cv2Options& options = {}) {
  using Scalar = typename Derived::Scalar;
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::cv2_load: logits must be float, double, "
                "Eigen::bfloat16 or Eigen::half");
  constexpr const char* function = "moebal::cv2_load";
  const detail::RowInput<Scalar> x(logits);
  detail::check_logits_shape(function, x.rows(), x.cols());
  Cv2Options checked = options;
  checked.variance = Cv2Variance::population;
  detail::check_cv2_options(function, x.cols(), k, checked);
  detail::check_mask(function, options.mask, x.rows());
  detail::ScoredRows<Scalar> rows;
  rows.reset(x.cols(), k, options.score);
  Cv2LoadResult<compute_type_t<Scalar>> result;
  result.counts = CountVector::Zero(x.cols());
  rows.forward(function, x, options.mask, [&](Index, const compute_type_t<Scalar>*, const Index* selected) {
    ++result.tokens;
    for (Index i = 0; i < k; ++i) result.counts[selected[i]] += 1;
  });
  Eigen::VectorXd h;
  // Counts sum to T k, so they are all 0 only without real tokens (loss 0).
  result.loss = static_cast<compute_type_t<Scalar>>(detail::cv2_and_gradient(
      {function, "logits", "count", double(result.tokens), "unreachable: counts sum to T k"},
      result.counts.template cast<double>(), Cv2Variance::population, options.coefficient, h));
  result.grad = RowMatrix<compute_type_t<Scalar>>::Zero(x.rows(), x.cols());
  return result;
}

}  // namespace moebal
