// SPDX-License-Identifier: Apache-2.0
#pragma once

// Internal: the two-pass row engine shared by the losses whose gradient flows through the
// score function (sequence-level, CV2 of importance, DeepSeek device and communication).
//
// Pass 1 (forward) computes each real row's scores q_t (and, if asked, its top-k) and hands
// them to the loss, which adds its batch sums; it keeps the row's normalizer, so that
// pass 2 (backward) can rebuild q_t bitwise, ask the loss for d L / d q_t and push it through
// the score function's vector-Jacobian product into the caller's buffer.

#include <Eigen/Core>
#include <algorithm>
#include <type_traits>
#include <vector>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"
#include "moebal/detail/input.hpp"
#include "moebal/detail/score_kernels.hpp"
#include "moebal/detail/topk_kernels.hpp"

namespace moebal {
namespace detail {

/// Adds one row's top-k selection to count vectors c (top-k) and c1 (first choice): either the
/// ordered indices, or (selected == nullptr, the branch-free path) {j : q_j >= tau} with the
/// unique maximum `top` as first choice.
template <class Scalar>
void add_selection(const Scalar* q, const Index* selected, Scalar tau, Scalar top, Index n,
                   Index k, double* c, double* c1) {
  if (selected == nullptr) {
    for (Index j = 0; j < n; ++j) {
      c[j] += q[j] >= tau ? 1.0 : 0.0;
      c1[j] += q[j] == top ? 1.0 : 0.0;
    }
    return;
  }
  for (Index i = 0; i < k; ++i) c[selected[i]] += 1.0;
  c1[selected[0]] += 1.0;
}

/// @tparam S the logits' storage type; rows are computed in C = compute_type_t<S>.
template <class S>
class ScoredRows {
 public:
  using C = compute_type_t<S>;

  /// Sizes the per-row workspace for N experts and top-k selections of k (0: no selection).
  /// `unordered`: when a row has no tie around its top k, visit receives selected == nullptr
  /// and the selection is {j : q_j >= threshold()}, with first choice the unique q_j == top()
  /// (the branch-free fast path; the loss counts with vector adds).
  void reset(Index num_experts, Index k, ScoreFunction score, bool unordered = false) {
    n_ = num_experts;
    k_ = k;
    unordered_ = unordered && k <= kThresholdTopkMaxK;
    score_ = score;
    raw_.resize(num_experts);
    reader_.resize(num_experts);
    q_.resize(num_experts);
    g_.resize(num_experts);
    drow_.resize(num_experts);
    selected_.resize(static_cast<std::size_t>(std::max<Index>(k, 1)));
    topk_.resize(num_experts, std::max<Index>(k, 1));
    rows_ = -1;
  }

  Index num_experts() const noexcept { return n_; }
  Index k() const noexcept { return k_; }
  /// T of the last completed forward, or -1.
  Index rows() const noexcept { return rows_; }
  /// Whether row t of the last forward was a real token.
  bool is_real(Index t) const { return norms_[static_cast<std::size_t>(t)].inv != C(0); }

  /// Pass 1. For each real row t (in order): visit(t, q, selected), with q the row's N scores
  /// and selected its k top-k indices by decreasing score (ties to the lower index).
  /// With `raw_out`, each real row's raw scores are also left in that buffer for a backward
  /// with `raw_in_out` (the fused form: the output buffer carries the scores between passes).
  template <class Visit>
  void forward(const char* function, const RowInput<S>& x, const TokenMask& mask, Visit&& visit,
               RowMatrixRef<C>* raw_out = nullptr) {
    rows_ = -1;
    const Index rows = x.rows();
    norms_.resize(static_cast<std::size_t>(rows));
    for (Index t = 0; t < rows; ++t) {
      RowNorm<C>& norm = norms_[static_cast<std::size_t>(t)];
      if (!mask.is_real(t)) {
        norm = RowNorm<C>{};
        continue;
      }
      const C* row = reader_.read(x.data() + t * x.outerStride(), n_);
      if (!raw_scores(row, n_, score_, raw_, norm)) throw_invalid_row(function, row, n_, t, score_);
      scores_from_raw(raw_, norm, q_);
      const Index* selected = selected_.data();
      if (k_ > 0) {
        if (unordered_ && topk_threshold(q_.data(), n_, k_, tau_, top_)) {
          selected = nullptr;
        } else {
          topk_row(q_.data(), n_, k_, selected_.data(), topk_);
        }
      }
      visit(t, static_cast<const C*>(q_.data()), selected);
      if (raw_out != nullptr) raw_out->row(t) = raw_.transpose().matrix();
    }
    rows_ = rows;
  }

  /// Checks that a backward call matches the last forward.
  template <class Out>
  void check_backward(const char* function, const RowInput<S>& x, const RowMatrixRef<Out>& out,
                      double scale) const {
    if (rows_ < 0) {
      throw_invalid(function, "logits", "the logits of a completed forward",
                    "a call before any forward completed");
    }
    if (x.rows() != rows_ || x.cols() != n_) {
      throw_invalid(function, "logits",
                    concat("the ", shape_string(rows_, n_), " logits given to forward"),
                    concat("shape ", shape_string(x.rows(), x.cols())));
    }
    check_output_shape(function, "dloss_dlogits", out.rows(), out.cols(), rows_, n_);
    check_finite_parameter(function, "scale", scale);
  }

  /// Pass 2. For each real row t: grad_row(t, q, selected, g) writes d L / d q_t into g
  /// (length N, every element); the row's d L / d x_t = scale * VJP(g) is written (or added,
  /// `Accumulate`) into out. Padded rows are zeroed (written) or left alone (accumulated).
  /// `raw_in_out`: the forward left each real row's raw scores in `out` (write form only);
  /// otherwise they are recomputed from x. `reselect`: recompute the top-k for grad_row
  /// (otherwise `selected` is not meaningful in grad_row).
  template <bool Accumulate, class Out, class GradRow>
  void backward(const char* function, const RowInput<S>& x, RowMatrixRef<Out>& out, C scale,
                GradRow&& grad_row, bool raw_in_out = false, bool reselect = true) {
    backward<Accumulate>(
        function, x, out, scale, grad_row, [](Index, C*) {}, raw_in_out, reselect);
  }

  /// As above; then after_row(t, dx) may add a term of its own to the finished row dx (a C*
  /// row: for another output type the row is finished in C and stored once).
  template <bool Accumulate, class Out, class GradRow, class AfterRow>
  void backward(const char* function, const RowInput<S>& x, RowMatrixRef<Out>& out, C scale,
                GradRow&& grad_row, AfterRow&& after_row, bool raw_in_out, bool reselect) {
    MOEBAL_ASSERT(!(Accumulate && raw_in_out));
    // A buffer of another type than C cannot carry the scores: they are recomputed.
    raw_in_out = raw_in_out && std::is_same_v<Out, C>;
    for (Index t = 0; t < rows_; ++t) {
      const RowNorm<C>& norm = norms_[static_cast<std::size_t>(t)];
      Out* dx = out.data() + t * out.outerStride();
      if (norm.inv == C(0)) {
        if constexpr (!Accumulate) std::fill(dx, dx + n_, Out(0));
        continue;
      }
      const C* raw = raw_.data();
      if constexpr (std::is_same_v<Out, C>) {
        if (raw_in_out) raw = dx;
      }
      if (!raw_in_out) {
        const C* row = reader_.read(x.data() + t * x.outerStride(), n_);
        RowNorm<C> again;
        if (!raw_scores(row, n_, score_, raw_, again)) {
          throw_invalid_row(function, row, n_, t, score_);
        }
        raw = raw_.data();
      }
      for (Index j = 0; j < n_; ++j) q_[j] = raw[j] * norm.inv;
      if (k_ > 0 && reselect) topk_row(q_.data(), n_, k_, selected_.data(), topk_);
      grad_row(t, static_cast<const C*>(q_.data()), static_cast<const Index*>(selected_.data()),
               g_.data());
      const C g_dot_q = dot_with_scores(g_.data(), raw, norm, n_);
      if constexpr (std::is_same_v<Out, C>) {
        score_vjp_row<Accumulate>(raw, norm, g_.data(), g_dot_q, scale, score_, n_, dx);
        after_row(t, dx);
      } else {
        // Another output type (bfloat16/half): the row is finished in C and rounded once.
        score_vjp_row<false>(raw, norm, g_.data(), g_dot_q, scale, score_, n_, drow_.data());
        after_row(t, drow_.data());
        for (Index j = 0; j < n_; ++j) store<Accumulate>(dx[j], drow_[j]);
      }
    }
  }

  /// The current row's k-th largest score when visit received selected == nullptr.
  C threshold() const noexcept { return tau_; }
  /// The current row's (unique) largest score when visit received selected == nullptr.
  C top() const noexcept { return top_; }

  /// Checks the call and runs `backward` with the same d L / d q vector g (length N) for every
  /// real row: the losses that are linear in the scores with constant weights.
  template <bool Accumulate, class Out>
  void backward_constant(const char* function, const RowInput<S>& x, RowMatrixRef<Out>& out,
                         C scale, const C* g, bool raw_in_out) {
    check_backward(function, x, out, double(scale));
    const Index n = n_;
    backward<Accumulate>(
        function, x, out, scale,
        [&](Index, const C*, const Index*, C* row_g) { std::copy(g, g + n, row_g); },
        [](Index, C*) {}, raw_in_out, false);
  }

  /// Row t's normalizer from the last forward (valid inside `visit` for the current row).
  const RowNorm<C>& norm(Index t) const { return norms_[static_cast<std::size_t>(t)]; }
  /// Row t's scores as rebuilt by the current backward (valid inside `after_row`).
  const C* current_scores() const { return q_.data(); }

 private:
  Index n_ = 0;
  Index k_ = 0;
  bool unordered_ = false;
  C tau_ = C(0), top_ = C(0);
  ScoreFunction score_ = ScoreFunction::softmax;
  ScratchArray<C> raw_, q_, g_, drow_;
  RowReader<S, C> reader_;
  std::vector<Index> selected_;
  TopkScratch<C> topk_;
  std::vector<RowNorm<C>> norms_;
  Index rows_ = -1;
};

}  // namespace detail
}  // namespace moebal
