// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// The sequence-level balance loss: the Switch loss computed within each sequence, averaged
/// over sequences (DeepSeek-V2/V3 sequence-wise balance loss; Megatron-core `seq_aux_loss`;
/// Hugging Face Switch Transformers' per-group load-balancing loss).
///
/// For sequence s with T_s real tokens, c_i^s its top-k counts and P_i^s = (1/T_s) sum_{t in s}
/// q_ti, f_i^s in the chosen `SwitchConvention` (Megatron / DeepSeek: c_i^s / (T_s k);
/// Hugging Face: c_i^s / T_s; first choice: first-choice count / T_s):
///   L = (1/B') sum_s a N sum_i f_i^s P_i^s,   d L / d q_tj = a N f_j^s / (B' T_s)  (t in s)
/// where B' is the number of sequences with at least one real token. DeepSeek-V3 writes the
/// same loss as alpha sum_i f_i P_i with f_i = N/(K T) c_i, which is our Megatron convention.
///
/// Mask modes: `own_length` (default) uses each sequence's own number of real tokens T_s;
/// `megatron_mean_length` uses the micro-batch's mean valid length T_bar = (sum_s T_s) / B in
/// place of every T_s, and averages over all B sequences (Megatron-core's behaviour with a
/// padding mask). Without a mask both are the same.
///
/// Token layouts of the T rows: batch-major (row b S + s, Hugging Face [B, S, N] flattened),
/// sequence-major (row s B + b, Megatron-core `probs.view(seq_length, batch_size, -1)`), or
/// packed variable-length segments of consecutive rows. Rank-3 `Eigen::Tensor` input is in the
/// opt-in header <moebal/tensor.hpp>.

#include <cstdint>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"
#include "moebal/detail/input.hpp"
#include "moebal/detail/scored_rows.hpp"
#include "moebal/losses/switch.hpp"

namespace moebal {

/// Which rows of the T x N logits belong to which sequence.
class SequenceLayout {
 public:
  enum class Kind { batch_major, sequence_major, segments };

  /// Row b S + s is token s of sequence b (Hugging Face, [B, S, N] flattened). B = T / S.
  static SequenceLayout batch_major(Index seq_len) {
    return SequenceLayout(Kind::batch_major, seq_len, {});
  }
  /// Row s B + b is token s of sequence b (Megatron-core, [S, B, N] flattened). B = T / S.
  static SequenceLayout sequence_major(Index seq_len) {
    return SequenceLayout(Kind::sequence_major, seq_len, {});
  }
  /// Packed variable-length sequences: consecutive runs of the given lengths (sum = T).
  static SequenceLayout segments(std::vector<Index> lengths) {
    return SequenceLayout(Kind::segments, 0, std::move(lengths));
  }

  Kind kind() const noexcept { return kind_; }
  Index seq_len() const noexcept { return seq_len_; }
  const std::vector<Index>& lengths() const noexcept { return lengths_; }

  /// Checks the layout against T rows. @throws moebal::invalid_argument when S < 1, S does not
  /// divide T, a segment length is < 1, or the lengths do not sum to T.
  void validate(const char* function, Index rows) const {
    if (kind_ == Kind::segments) {
      if (lengths_.empty()) {
        throw_layout(function, "at least one segment", "no segment");
      }
      Index sum = 0;
      for (std::size_t i = 0; i < lengths_.size(); ++i) {
        if (lengths_[i] < 1) {
          throw_layout(function, "segment lengths >= 1",
                       detail::concat("length ", lengths_[i], " for segment ", i));
        }
        sum += lengths_[i];
      }
      if (sum != rows) {
        throw_layout(function,
                     detail::concat("segment lengths summing to T = ", rows, " (logits.rows())"),
                     detail::concat("a sum of ", sum));
      }
      return;
    }
    if (seq_len_ < 1) throw_layout(function, "a sequence length S >= 1", detail::concat("S = ", seq_len_));
    if (rows % seq_len_ != 0) {
      throw_layout(function,
                   detail::concat("a sequence length S dividing T = ", rows, " (logits.rows())"),
                   detail::concat("S = ", seq_len_));
    }
  }

  /// Number of sequences for T rows (after `validate`).
  Index num_sequences(Index rows) const {
    return kind_ == Kind::segments ? static_cast<Index>(lengths_.size()) : rows / seq_len_;
  }

  /// Writes the sequence of every row into `out` (size T; after `validate`).
  void assign(Index rows, std::vector<Index>& out) const {
    out.resize(static_cast<std::size_t>(rows));
    if (kind_ == Kind::segments) {
      Index t = 0;
      for (std::size_t s = 0; s < lengths_.size(); ++s) {
        for (Index i = 0; i < lengths_[s]; ++i) out[static_cast<std::size_t>(t++)] = Index(s);
      }
      return;
    }
    const Index batch = rows / seq_len_;
    for (Index t = 0; t < rows; ++t) {
      out[static_cast<std::size_t>(t)] =
          kind_ == Kind::batch_major ? t / seq_len_ : t % batch;
    }
  }

 private:
  SequenceLayout(Kind kind, Index seq_len, std::vector<Index> lengths)
      : kind_(kind), seq_len_(seq_len), lengths_(std::move(lengths)) {}

  [[noreturn]] static void throw_layout(const char* function, const std::string& expected,
                                        const std::string& got) {
    detail::throw_invalid(function, "layout", expected, got);
  }

  Kind kind_;
  Index seq_len_;
  std::vector<Index> lengths_;
};

/// How a mask shortens sequences.
enum class SequenceMaskMode {
  /// Each sequence uses its own number of real tokens T_s (default).
  own_length,
  /// Every sequence uses the micro-batch mean valid length T_bar = (sum_s T_s) / B, and the
  /// mean runs over all B sequences (Megatron-core with a padding mask).
  megatron_mean_length,
};

/// Options of the sequence-level loss.
struct SequenceOptions {
  /// How f is counted within a sequence (default Megatron-core / DeepSeek: sum f = 1).
  SwitchConvention convention = SwitchConvention::megatron;
  /// Score function (DeepSeek-V3 uses `ScoreFunction::sigmoid`, the normalized sigmoid).
  ScoreFunction score = ScoreFunction::softmax;
  /// The coefficient a (DeepSeek's alpha), finite.
  double coefficient = 1.0;
  SequenceMaskMode mask_mode = SequenceMaskMode::own_length;
  /// Padding mask (used by the one-line form; the loss object takes it in `forward`).
  TokenMask mask{};
};

namespace detail {

inline void check_sequence_options(const char* function, Index num_experts, Index k,
                                   const SequenceOptions& options) {
  SwitchOptions switch_options;
  switch_options.convention = options.convention;
  switch_options.score = options.score;
  switch_options.coefficient = options.coefficient;
  check_switch_config(function, num_experts, k, switch_options);
  if (options.mask_mode != SequenceMaskMode::own_length &&
      options.mask_mode != SequenceMaskMode::megatron_mean_length) {
    throw_invalid(function, "options.mask_mode", "own_length or megatron_mean_length",
                  concat(int(options.mask_mode)));
  }
}

}  // namespace detail

/// Result of `sequence_aux_loss`.
template <class Scalar>
struct SequenceAuxResult {
  Scalar loss = Scalar(0);
  /// d L / d logits, T x N row-major.
  RowMatrix<Scalar> grad;
  /// Each sequence's Switch loss a N sum_i f_i^s P_i^s (0 for a sequence with no real token).
  Eigen::VectorXd sequence_losses;
  /// Real tokens per sequence.
  CountVector sequence_tokens;
  /// Top-k counts per sequence, sequences x N.
  Eigen::Matrix<std::int64_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> counts;
};

/// The sequence-level loss as a reusable object. Per-sequence statistics take O(N x sequences)
/// memory; `forward` fills them, `backward` writes (`backward_accumulate` adds) the gradient.
/// @tparam Scalar float or double (sums accumulate in double).
/// Threads: pass 1 runs sequences on `moebal::num_threads()` threads (each sequence's rows in
/// row order), the backward runs row chunks; results are bitwise identical for any thread
/// count (<moebal/core/threads.hpp>).
template <class Scalar>
class SequenceAuxLoss {
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::SequenceAuxLoss<Scalar>: Scalar must be float, double, "
                "Eigen::bfloat16 or Eigen::half");

 public:
  /// The compute type: float for bfloat16/half logits, Scalar otherwise.
  using Compute = compute_type_t<Scalar>;

  /// @param num_experts N. @param k 1 <= k <= N. @param layout which rows form a sequence.
  /// @param options convention, score, coefficient, mask mode (the mask goes to `forward`).
  /// @throws moebal::invalid_argument for invalid N, k or options.
  SequenceAuxLoss(Index num_experts, Index k, SequenceLayout layout,
                  const SequenceOptions& options = {})
      : layout_(std::move(layout)), options_(options) {
    detail::check_sequence_options("moebal::SequenceAuxLoss", num_experts, k, options);
    options_.mask = TokenMask{};
    rows_.reset(num_experts, k, options.score);
  }

  /// Reads T x N logits and returns L. @throws moebal::invalid_argument for a layout that does
  /// not fit T, and as `switch_aux_loss` for shapes, masks and values.
  template <class Derived>
  Compute forward(const Eigen::MatrixBase<Derived>& logits, const TokenMask& mask = {}) {
    static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                  "moebal::SequenceAuxLoss<Scalar> takes logits of the same Scalar");
    return forward_impl("moebal::SequenceAuxLoss::forward", detail::RowInput<Scalar>(logits),
                        mask);
  }

  /// dloss_dlogits = scale * d L / d logits for the logits of the last forward.
  template <class Derived, class Out>
  void backward(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                Compute scale = Compute(1)) {
    backward_impl<false>("moebal::SequenceAuxLoss::backward", detail::RowInput<Scalar>(logits),
                         detail::output_ref<Scalar>(dloss_dlogits), scale);
  }

  /// dloss_dlogits += scale * d L / d logits.
  template <class Derived, class Out>
  void backward_accumulate(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                           Compute scale = Compute(1)) {
    backward_impl<true>("moebal::SequenceAuxLoss::backward_accumulate",
                        detail::RowInput<Scalar>(logits), detail::output_ref<Scalar>(dloss_dlogits),
                        scale);
  }

  Compute loss() const noexcept { return static_cast<Compute>(loss_); }
  /// Each sequence's loss of the last forward.
  const Eigen::VectorXd& sequence_losses() const noexcept { return sequence_losses_; }
  /// Real tokens per sequence of the last forward.
  const Eigen::VectorXd& sequence_tokens() const noexcept { return tokens_; }
  /// Top-k counts, sequences x N, of the last forward.
  const RowMatrix<double>& counts() const noexcept { return counts_; }

  // Internal: the one-line form names itself in error messages.
  Compute forward_impl(const char* function, const detail::RowInput<Scalar>& x,
                       const TokenMask& mask) {
    const Index n = rows_.num_experts(), k = rows_.k();
    detail::check_logits_columns(function, x.rows(), x.cols(), n);
    detail::check_mask(function, mask, x.rows());
    layout_.validate(function, x.rows());
    layout_.assign(x.rows(), sequence_of_);
    const Index sequences = layout_.num_sequences(x.rows());
    counts_.setZero(sequences, n);
    first_.setZero(sequences, n);
    sums_.setZero(sequences, n);
    tokens_.setZero(sequences);
    // Sequences on the threads, each one's rows in order (see ScoredRows::forward_groups).
    detail::rows_by_group(sequence_of_, sequences, order_, offsets_);
    rows_.forward_groups(function, x, mask, order_, offsets_,
                         [&](Index s, Index, const Compute* q,
                             const detail::RowSelection<Compute>& sel, detail::RowWork<Scalar>&) {
                           tokens_[s] += 1.0;
                           for (Index i = 0; i < k; ++i) counts_(s, sel.selected[i]) += 1.0;
                           first_(s, sel.selected[0]) += 1.0;
                           for (Index j = 0; j < n; ++j) sums_(s, j) += double(q[j]);
                         });
    // Per-sequence denominators and the mean's count.
    const double total = tokens_.sum();
    denominators_ = tokens_;
    double averaged = 0;
    if (options_.mask_mode == SequenceMaskMode::megatron_mean_length) {
      denominators_.setConstant(total / double(sequences));
      averaged = total > 0 ? double(sequences) : 0.0;
    } else {
      averaged = double((tokens_.array() > 0).count());
    }
    f_.setZero(sequences, n);
    sequence_losses_.setZero(sequences);
    const double a = options_.coefficient;
    for (Index s = 0; s < sequences; ++s) {
      const double d = denominators_[s];
      if (d <= 0 || tokens_[s] <= 0) continue;
      detail::load_fraction(options_.convention, counts_.row(s), first_.row(s), d, k, f_.row(s));
      sequence_losses_[s] = a * double(n) * f_.row(s).dot(sums_.row(s)) / d;
    }
    averaged_ = averaged;
    loss_ = averaged > 0 ? sequence_losses_.sum() / averaged : 0.0;
    return loss();
  }

 private:
  template <bool Accumulate, class Out>
  void backward_impl(const char* function, const detail::RowInput<Scalar>& x, RowMatrixRef<Out> out,
                     Compute scale) {
    rows_.check_backward(function, x, out, double(scale));
    const Index n = rows_.num_experts();
    const double a = options_.coefficient;
    rows_.template backward<Accumulate>(
        function, x, out, scale, [&](Index t, const Compute*, const Index*, Compute* g) {
          const Index s = sequence_of_[static_cast<std::size_t>(t)];
          const double d = denominators_[s];
          // d L / d q_tj = a N f_j^s / (B' T_s).
          const double factor = averaged_ > 0 && d > 0 ? a * double(n) / (averaged_ * d) : 0.0;
          for (Index j = 0; j < n; ++j) g[j] = static_cast<Compute>(factor * f_(s, j));
        });
  }

  SequenceLayout layout_;
  SequenceOptions options_;
  detail::ScoredRows<Scalar> rows_;
  std::vector<Index> sequence_of_;
  std::vector<Index> order_, offsets_;  // rows by sequence (detail::rows_by_group)
  RowMatrix<double> counts_, first_, sums_, f_;  // sequences x N
  Eigen::VectorXd tokens_, denominators_, sequence_losses_;
  double averaged_ = 0.0;
  double loss_ = 0.0;
};

/// The sequence-level balance loss and its gradient in one call (see the file comment).
/// @param logits T x N, float, double, Eigen::bfloat16 or Eigen::half (computed in float), any
/// Eigen dense expression.
/// @param k experts per token. @param layout batch-major, sequence-major or segments.
/// @param options convention, score function, coefficient, mask and mask mode.
/// @return loss, grad (T x N row-major), per-sequence losses, tokens and counts.
/// @throws moebal::invalid_argument for a sequence length not dividing T, segment lengths not
///   summing to T, and as `switch_aux_loss`.
template <class Derived>
SequenceAuxResult<compute_type_t<typename Derived::Scalar>> sequence_aux_loss(
    const Eigen::MatrixBase<Derived>& logits, Index k, const SequenceLayout& layout,
    const SequenceOptions& options = {}) {
  using Scalar = typename Derived::Scalar;
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::sequence_aux_loss: logits must be float, double, "
                "Eigen::bfloat16 or Eigen::half");
  constexpr const char* function = "moebal::sequence_aux_loss";
  const detail::RowInput<Scalar> x(logits);
  detail::check_logits_shape(function, x.rows(), x.cols());
  detail::check_sequence_options(function, x.cols(), k, options);
  SequenceAuxLoss<Scalar> loss(x.cols(), k, layout, options);
  SequenceAuxResult<compute_type_t<Scalar>> result;
  result.loss = loss.forward_impl(function, x, options.mask);
  result.grad.resize(x.rows(), x.cols());
  loss.backward(x, result.grad);
  result.sequence_losses = loss.sequence_losses();
  result.sequence_tokens = loss.sequence_tokens().template cast<std::int64_t>();
  result.counts = loss.counts().template cast<std::int64_t>();
  return result;
}

}  // namespace moebal
