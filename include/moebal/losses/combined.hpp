// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// The combined balance objective in one pass: a weighted sum of the Switch loss, the router
/// z-loss, the sequence-level loss and importance CV^2,
///   L = w_switch L_switch + w_z L_z + w_seq L_seq + w_cv2 L_cv2
/// with each term defined as in its own header (coefficient 1 inside each term, so the weights
/// are the terms' coefficients). One pass over the logits computes the scores, the top-k and
/// every term's sums (the score sums serve as both the Switch P and the CV^2 importance, the
/// softmax normalizer gives the z-loss's log-sum-exp); a second pass writes one gradient:
///   d L / d q_tj = w_switch N f_j / T + w_seq N f_j^s / (B' T_s) + w_cv2 h_j
/// through the score function's VJP, plus the z-loss's w_z (2/T) lse_t softmax(x_t)_j.
/// The importance term uses dense gates; the sequence term uses the same convention and score
/// function as the Switch term. A term whose weight is 0 costs nothing and is reported as 0.

#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"
#include "moebal/detail/input.hpp"
#include "moebal/detail/scored_rows.hpp"
#include "moebal/losses/cv2.hpp"
#include "moebal/losses/sequence.hpp"
#include "moebal/losses/switch.hpp"

namespace moebal {

/// The weights of the combined objective (each term's coefficient).
struct CombinedWeights {
  double switch_loss = 1.0;
  double z = 0.0;
  double sequence = 0.0;
  double cv2_importance = 0.0;
};

/// Options of the combined objective.
struct CombinedOptions {
  CombinedWeights weights;
  /// f's convention for the Switch and sequence terms.
  SwitchConvention convention = SwitchConvention::megatron;
  /// Score function of the Switch, sequence and CV^2 terms (the z-loss always uses logsumexp).
  ScoreFunction score = ScoreFunction::softmax;
  /// Required when `weights.sequence != 0`.
  std::optional<SequenceLayout> layout;
  SequenceMaskMode mask_mode = SequenceMaskMode::own_length;
  Cv2Variance cv2_variance = Cv2Variance::population;
  /// Padding mask (used by the one-line form; the object takes it in `forward`).
  TokenMask mask{};
};

/// Each term's weighted contribution to the combined value.
struct CombinedTerms {
  double switch_loss = 0.0;
  double z = 0.0;
  double sequence = 0.0;
  double cv2_importance = 0.0;
};

/// Result of `combined_aux_loss`.
template <class Scalar>
struct CombinedResult {
  /// L, the weighted sum.
  Scalar loss = Scalar(0);
  /// d L / d logits, T x N row-major.
  RowMatrix<Scalar> grad;
  /// w_term * L_term for each term.
  CombinedTerms terms;
  /// The Switch term's statistics (counts, f, P), coefficient w_switch.
  SwitchStats stats;
};

namespace detail {

inline void check_combined_options(const char* function, Index num_experts, Index k,
                                   const CombinedOptions& options) {
  SwitchOptions switch_options;
  switch_options.convention = options.convention;
  switch_options.score = options.score;
  check_switch_config(function, num_experts, k, switch_options);
  const CombinedWeights& w = options.weights;
  check_finite_parameter(function, "options.weights.switch_loss", w.switch_loss);
  check_finite_parameter(function, "options.weights.z", w.z);
  check_finite_parameter(function, "options.weights.sequence", w.sequence);
  check_finite_parameter(function, "options.weights.cv2_importance", w.cv2_importance);
  if (w.sequence != 0.0 && !options.layout) {
    throw_invalid(function, "options.layout",
                  "a sequence layout when the sequence weight is nonzero", "none");
  }
  if (options.mask_mode != SequenceMaskMode::own_length &&
      options.mask_mode != SequenceMaskMode::megatron_mean_length) {
    throw_invalid(function, "options.mask_mode", "own_length or megatron_mean_length",
                  concat(int(options.mask_mode)));
  }
  if (options.cv2_variance != Cv2Variance::population &&
      options.cv2_variance != Cv2Variance::unbiased) {
    throw_invalid(function, "options.cv2_variance", "population or unbiased",
                  concat(int(options.cv2_variance)));
  }
  if (w.cv2_importance != 0.0 && options.cv2_variance == Cv2Variance::unbiased &&
      num_experts < 2) {
    throw_invalid(function, "num_experts", "at least 2 experts for the unbiased variance",
                  concat(num_experts));
  }
}

}  // namespace detail

/// The combined objective as a reusable object (no allocation in steady state).
/// @tparam Scalar float or double (sums accumulate in double).
/// Threads: pass 1 runs blocks of rows (without the sequence term) or sequences (with it) on
/// `moebal::num_threads()` threads, the backward runs row chunks; results are bitwise identical
/// for any thread count (<moebal/core/threads.hpp>).
template <class Scalar>
class CombinedAuxLoss {
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::CombinedAuxLoss<Scalar>: Scalar must be float, double, "
                "Eigen::bfloat16 or Eigen::half");

 public:
  /// The compute type: float for bfloat16/half logits, Scalar otherwise.
  using Compute = compute_type_t<Scalar>;

  /// @throws moebal::invalid_argument for invalid N, k, weights, or a missing layout.
  CombinedAuxLoss(Index num_experts, Index k, const CombinedOptions& options = {})
      : options_(options) {
    detail::check_combined_options("moebal::CombinedAuxLoss", num_experts, k, options);
    options_.mask = TokenMask{};
    rows_.reset(num_experts, k, options.score, /*unordered=*/true);
    statistics_ = RoutingStatistics(num_experts);
    const CombinedWeights& w = options.weights;
    if (w.sequence == 0.0 && w.cv2_importance == 0.0 && options.score == ScoreFunction::softmax) {
      // Switch + z-loss with softmax scores: the Switch kernel with the z term fused in (one
      // pass 1, one pass 2; the same value and gradient to rounding). Every storage type takes
      // this path, so half-precision logits compute exactly as their float upcast does.
      SwitchOptions switch_options;
      switch_options.convention = options.convention;
      switch_options.score = ScoreFunction::softmax;
      switch_options.coefficient = w.switch_loss;
      switch_.emplace(
          SwitchAuxLoss<Scalar>("moebal::CombinedAuxLoss", num_experts, k, switch_options));
      switch_->z_weight_ = w.z;
    }
  }

  /// Reads T x N logits and returns L.
  template <class Derived>
  Compute forward(const Eigen::MatrixBase<Derived>& logits, const TokenMask& mask = {}) {
    static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                  "moebal::CombinedAuxLoss<Scalar> takes logits of the same Scalar");
    return forward_impl("moebal::CombinedAuxLoss::forward", detail::RowInput<Scalar>(logits),
                        mask, nullptr);
  }

  /// dloss_dlogits = scale * d L / d logits for the logits of the last forward.
  template <class Derived, class Out>
  void backward(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                Compute scale = Compute(1)) {
    backward_impl<false>("moebal::CombinedAuxLoss::backward", detail::RowInput<Scalar>(logits),
                         detail::output_ref<Scalar>(dloss_dlogits), scale, false);
  }

  /// dloss_dlogits += scale * d L / d logits.
  template <class Derived, class Out>
  void backward_accumulate(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                           Compute scale = Compute(1)) {
    backward_impl<true>("moebal::CombinedAuxLoss::backward_accumulate",
                        detail::RowInput<Scalar>(logits), detail::output_ref<Scalar>(dloss_dlogits),
                        scale, false);
  }

  /// Both passes: returns L and writes dloss_dlogits = scale * d L / d logits (the output
  /// buffer carries the scores between the passes).
  template <class Derived, class Out>
  Compute forward_backward(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                           const TokenMask& mask = {}, Compute scale = Compute(1)) {
    static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                  "moebal::CombinedAuxLoss<Scalar> takes logits of the same Scalar");
    return forward_backward_impl("moebal::CombinedAuxLoss::forward_backward",
                                 detail::RowInput<Scalar>(logits),
                                 detail::output_ref<Scalar>(dloss_dlogits), mask, scale);
  }

  Compute loss() const noexcept { return static_cast<Compute>(loss_); }
  /// Each term's weighted value of the last forward.
  const CombinedTerms& terms() const noexcept { return terms_; }
  /// T, c_i, first-choice counts and score sums of the last forward.
  const RoutingStatistics& statistics() const noexcept { return statistics_; }

  /// The Switch term's counts, f and P (coefficient w_switch).
  SwitchStats stats() const {
    return detail::make_switch_stats(statistics_, f_, options_.weights.switch_loss,
                                     options_.convention, rows_.k());
  }

  // Internal: the one-line form names itself in error messages.
  template <class Out>
  Compute forward_backward_impl(const char* function, const detail::RowInput<Scalar>& x,
                                RowMatrixRef<Out> out, const TokenMask& mask, Compute scale) {
    detail::check_finite_parameter(function, "scale", double(scale));
    detail::check_output_shape(function, "dloss_dlogits", out.rows(), out.cols(), x.rows(),
                               x.cols());
    // A buffer of the compute type carries the scores between the passes.
    constexpr bool fused = std::is_same_v<Out, Compute>;
    RowMatrixRef<Compute>* raw_out = nullptr;
    if constexpr (fused) raw_out = &out;
    if (switch_) {
      // The Switch + z-loss kernel, in its own two passes.
      switch_->forward_backward_impl(function, x, out, mask, scale);
      take_switch_results();
      return loss();
    }
    const Compute value = forward_impl(function, x, mask, raw_out);
    backward_impl<false>(function, x, out, scale, fused);
    return value;
  }

 private:
  // The statistics, f and terms of the Switch + z-loss kernel's last forward.
  void take_switch_results() {
    statistics_ = switch_->statistics_;
    f_ = switch_->f_;
    terms_ = CombinedTerms{};
    terms_.switch_loss = switch_->loss_;
    terms_.z = switch_->z_value_;
    loss_ = terms_.switch_loss + terms_.z;
  }

  Compute forward_impl(const char* function, const detail::RowInput<Scalar>& x,
                       const TokenMask& mask, RowMatrixRef<Compute>* raw_out) {
    if (switch_) {
      switch_->forward_impl(function, x, mask, raw_out);
      take_switch_results();
      return loss();
    }
    const Index n = rows_.num_experts(), k = rows_.k(), rows = x.rows();
    detail::check_logits_columns(function, x.rows(), x.cols(), n);
    detail::check_mask(function, mask, rows);
    const CombinedWeights& w = options_.weights;
    const bool use_z = w.z != 0.0, use_seq = w.sequence != 0.0;
    Index sequences = 0;
    if (use_seq) {
      options_.layout->validate(function, rows);
      options_.layout->assign(rows, sequence_of_);
      sequences = options_.layout->num_sequences(rows);
      seq_counts_.setZero(sequences, n);
      seq_first_.setZero(sequences, n);
      seq_sums_.setZero(sequences, n);
      seq_tokens_.setZero(sequences);
    }
    if (use_z) lse_.resize(static_cast<std::size_t>(rows));
    statistics_.clear();
    double& tokens = statistics_.mutable_tokens();
    auto counts = statistics_.mutable_counts();
    auto first = statistics_.mutable_first_choice_counts();
    auto sums = statistics_.mutable_score_sums();
    double z_sum = 0.0;
    const bool softmax_scores = options_.score == ScoreFunction::softmax;
    // The z-loss term of row t: lse_t = log sum_j exp(x_tj) (from the scores' normalizer, or
    // a softmax of its own for sigmoid scores), kept for backward.
    auto z_term = [&](Index t, detail::RowWork<Scalar>& work) {
      detail::RowNorm<Compute> norm = rows_.norm(t);
      if (!softmax_scores) {
        const Compute* row = work.reader.read(x.data() + t * x.outerStride(), n);
        if (!detail::raw_scores(row, n, ScoreFunction::softmax, work.aux, norm)) {
          detail::throw_invalid_row(function, row, n, t, ScoreFunction::softmax);
        }
      }
      const Compute lse = norm.shift - std::log(norm.inv);
      lse_[static_cast<std::size_t>(t)] = lse;
      return double(lse) * double(lse);
    };
    if (!use_seq) {
      // Batch sums only: blocks of rows on the threads, each into its own partial, combined in
      // block order (independent of the thread count).
      const Index blocks = rows_.forward_blocks(
          function, x, mask, partials_,
          [n](Partial& p) {
            p.sums.reset(n);
            p.z = 0.0;
          },
          [&](Partial& p, Index t, const Compute* q, const detail::RowSelection<Compute>& sel,
              detail::RowWork<Scalar>& work) {
            p.sums.add(q, sel, n, k);
            if (use_z) p.z += z_term(t, work);
          },
          raw_out);
      for (Index b = 0; b < blocks; ++b) {
        const Partial& p = partials_[static_cast<std::size_t>(b)];
        tokens += p.sums.tokens;
        counts += p.sums.counts.matrix();
        first += p.sums.first.matrix();
        sums += p.sums.sums.matrix();
        z_sum += p.z;
      }
      finish(function, z_sum, 0);
      return loss();
    }
    // Per-sequence sums only (the batch sums are their totals, added after the pass), with the
    // sequences on the threads, each one's rows in order (ScoredRows::forward_groups).
    detail::rows_by_group(sequence_of_, sequences, order_, offsets_);
    seq_z_.setZero(sequences);
    rows_.forward_groups(
        function, x, mask, order_, offsets_,
        [&](Index s, Index t, const Compute* q, const detail::RowSelection<Compute>& sel,
            detail::RowWork<Scalar>& work) {
          seq_tokens_[s] += 1.0;
          detail::add_selection(q, sel.selected, sel.tau, sel.top, n, k,
                                seq_counts_.data() + s * n, seq_first_.data() + s * n);
          double* row_sums = seq_sums_.data() + s * n;
          for (Index j = 0; j < n; ++j) row_sums[j] += double(q[j]);
          if (use_z) seq_z_[s] += z_term(t, work);
        },
        raw_out);
    for (Index s = 0; s < sequences; ++s) {
      tokens += seq_tokens_[s];
      z_sum += seq_z_[s];
    }
    if (use_seq) {
      for (Index s = 0; s < sequences; ++s) {
        counts += seq_counts_.row(s).transpose();
        first += seq_first_.row(s).transpose();
        sums += seq_sums_.row(s).transpose();
      }
    }
    finish(function, z_sum, sequences);
    return loss();
  }

  // Values and the per-expert gradient vectors from the sums.
  void finish(const char* function, double z_sum, Index sequences) {
    const Index n = rows_.num_experts(), k = rows_.k();
    const CombinedWeights& w = options_.weights;
    const double tokens = statistics_.tokens();
    terms_ = CombinedTerms{};
    f_.setZero(n);
    g_batch_.setZero(n);
    if (tokens > 0) {
      detail::load_fraction(options_.convention, statistics_.counts(),
                            statistics_.first_choice_counts(), tokens, k, f_);
      // Switch: L = N sum_i f_i S_i / T, d L / d q_tj = N f_j / T.
      terms_.switch_loss = w.switch_loss * double(n) * f_.dot(statistics_.score_sums()) / tokens;
      g_batch_ += w.switch_loss * double(n) / tokens * f_;
      terms_.z = w.z * z_sum / tokens;
    }
    if (w.cv2_importance != 0.0) {
      importance_ = statistics_.score_sums();
      terms_.cv2_importance = detail::cv2_and_gradient(
          {function, "logits", "importance", tokens, detail::kZeroImportanceCause}, importance_,
          options_.cv2_variance, w.cv2_importance, h_);
      g_batch_ += h_;
    }
    seq_factor_.setZero(sequences);
    if (w.sequence != 0.0 && sequences > 0) {
      // Per-sequence f and the factor N / (B' T_s) of d L / d q_tj = w N f_j^s / (B' T_s).
      const double total = seq_tokens_.sum();
      Eigen::VectorXd& denominators = seq_denominators_;
      denominators = seq_tokens_;
      double averaged;
      if (options_.mask_mode == SequenceMaskMode::megatron_mean_length) {
        denominators.setConstant(total / double(sequences));
        averaged = total > 0 ? double(sequences) : 0.0;
      } else {
        averaged = double((seq_tokens_.array() > 0).count());
      }
      seq_f_.setZero(sequences, n);
      double sum = 0.0;
      for (Index s = 0; s < sequences; ++s) {
        const double d = denominators[s];
        if (d <= 0 || seq_tokens_[s] <= 0) continue;
        detail::load_fraction(options_.convention, seq_counts_.row(s), seq_first_.row(s), d, k,
                              seq_f_.row(s));
        sum += double(n) * seq_f_.row(s).dot(seq_sums_.row(s)) / d;
        seq_factor_[s] = w.sequence * double(n) / (averaged * d);
      }
      terms_.sequence = averaged > 0 ? w.sequence * sum / averaged : 0.0;
    }
    g_batch_compute_ = g_batch_.array().template cast<Compute>();
    // The sequence term's d L / d q per sequence, in the compute type: w N f^s / (B' T_s).
    seq_g_.resize(sequences, n);
    for (Index s = 0; s < sequences; ++s) {
      seq_g_.row(s) = (seq_factor_[s] * seq_f_.row(s)).template cast<Compute>();
    }
    loss_ = terms_.switch_loss + terms_.z + terms_.sequence + terms_.cv2_importance;
  }

  template <bool Accumulate, class Out>
  void backward_impl(const char* function, const detail::RowInput<Scalar>& x, RowMatrixRef<Out> out,
                     Compute scale, bool raw_in_out) {
    if (switch_) {
      if (raw_in_out) {
        switch_->template apply_rows<false>(function, x, out, scale, true);
      } else {
        switch_->template backward_impl<Accumulate>(function, x, out, scale);
      }
      return;
    }
    rows_.check_backward(function, x, out, double(scale));
    detail::check_gradient_representable(function, "options.weights", g_batch_compute_,
                                         g_batch_);
    const Index n = rows_.num_experts();
    const bool use_z = options_.weights.z != 0.0 && statistics_.tokens() > 0;
    const bool use_seq = options_.weights.sequence != 0.0;
    const bool softmax_scores = options_.score == ScoreFunction::softmax;
    const double z_factor =
        use_z ? double(scale) * options_.weights.z * 2.0 / statistics_.tokens() : 0.0;
    const Compute* gb = g_batch_compute_.data();
    rows_.template backward<Accumulate>(
        function, x, out, scale,
        [&](Index t, const Compute*, const Index*, Compute* g) {
          if (!use_seq) {
            std::copy(gb, gb + n, g);
            return;
          }
          const Index s = sequence_of_[static_cast<std::size_t>(t)];
          const Compute* gs = seq_g_.data() + s * n;
          for (Index j = 0; j < n; ++j) g[j] = gb[j] + gs[j];
        },
        [&](Index t, const Compute* p, Compute* dx, detail::RowWork<Scalar>& work) {
          if (!use_z) return;
          // z-loss: d L / d x_tj = w_z (2/T) lse_t softmax(x_t)_j.
          const Compute c =
              static_cast<Compute>(z_factor * double(lse_[static_cast<std::size_t>(t)]));
          if (softmax_scores) {
            for (Index j = 0; j < n; ++j) dx[j] += c * p[j];
            return;
          }
          const Compute* row = work.reader.read(x.data() + t * x.outerStride(), n);
          detail::RowNorm<Compute> norm;
          if (!detail::raw_scores(row, n, ScoreFunction::softmax, work.aux, norm)) {
            detail::throw_invalid_row(function, row, n, t, ScoreFunction::softmax);
          }
          for (Index j = 0; j < n; ++j) dx[j] += c * work.aux[j] * norm.inv;
        },
        raw_in_out, false);
  }

  CombinedOptions options_;
  // The Switch + z-loss case (softmax scores): the Switch kernel.
  std::optional<SwitchAuxLoss<Scalar>> switch_;
  detail::ScoredRows<Scalar> rows_;
  RoutingStatistics statistics_;
  // One block's batch sums in the threaded pass 1 (no sequence term).
  struct Partial {
    detail::SelectionSums sums;
    double z = 0.0;
  };
  std::vector<Partial> partials_;          // one per block (<= 64), reused
  std::vector<Compute> lse_;
  std::vector<Index> sequence_of_;
  std::vector<Index> order_, offsets_;  // rows by sequence (detail::rows_by_group)
  Eigen::VectorXd seq_z_;               // per sequence: sum of lse^2 (z-loss)
  RowMatrix<double> seq_counts_, seq_first_, seq_sums_, seq_f_;  // sequences x N
  RowMatrix<Compute> seq_g_;                                     // sequences x N
  Eigen::VectorXd seq_tokens_, seq_factor_, seq_denominators_;
  Eigen::VectorXd f_, g_batch_, importance_, h_;
  detail::ScratchArray<Compute> g_batch_compute_;
  CombinedTerms terms_;
  double loss_ = 0.0;
};

/// The combined objective and its gradient in one call (see the file comment).
/// @param logits T x N, float or double. @param k experts per token.
/// @param options weights, convention, score, sequence layout (if the sequence weight is
///   nonzero), mask mode, CV^2 variance, mask.
/// @return loss, grad, each term's weighted value, and the Switch term's stats.
/// @throws moebal::invalid_argument as the single terms, and for a missing layout.
template <class Derived>
CombinedResult<compute_type_t<typename Derived::Scalar>> combined_aux_loss(
    const Eigen::MatrixBase<Derived>& logits, Index k, const CombinedOptions& options) {
  using Scalar = typename Derived::Scalar;
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::combined_aux_loss: logits must be float, double, "
                "Eigen::bfloat16 or Eigen::half");
  constexpr const char* function = "moebal::combined_aux_loss";
  const detail::RowInput<Scalar> x(logits);
  detail::check_logits_shape(function, x.rows(), x.cols());
  detail::check_combined_options(function, x.cols(), k, options);
  CombinedAuxLoss<Scalar> loss(x.cols(), k, options);
  CombinedResult<compute_type_t<Scalar>> result;
  result.grad.resize(x.rows(), x.cols());
  RowMatrixRef<compute_type_t<Scalar>> grad(result.grad);
  result.loss =
      loss.forward_backward_impl(function, x, grad, options.mask, compute_type_t<Scalar>(1));
  result.terms = loss.terms();
  result.stats = loss.stats();
  return result;
}

}  // namespace moebal
