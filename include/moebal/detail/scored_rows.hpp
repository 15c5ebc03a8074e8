// SPDX-License-Identifier: Apache-2.0
#pragma once

// Internal: the two-pass row engine shared by the losses whose gradient flows through the
// score function (sequence-level, CV2 of importance, DeepSeek device and communication, the
// global-batch classes, and the combined objective outside its Switch + z-loss case).
//
// Pass 1 (forward) computes each real row's scores q_t (and, if asked, its top-k) and hands
// them to the loss, which adds its batch sums; it keeps the row's normalizer, so that
// pass 2 (backward) can rebuild q_t bitwise, ask the loss for d L / d q_t and push it through
// the score function's vector-Jacobian product into the caller's buffer. Both passes run on
// the threads (detail/parallel.hpp): pass 1 by blocks of rows into per-block partials
// (`forward_blocks`) or by groups of rows such as sequences (`forward_groups`), pass 2 by row
// chunks; the plain `forward` visits the rows in order on the calling thread.

#include <Eigen/Core>
#include <algorithm>
#include <type_traits>
#include <vector>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"
#include "moebal/detail/input.hpp"
#include "moebal/detail/parallel.hpp"
#include "moebal/detail/score_kernels.hpp"
#include "moebal/detail/topk_kernels.hpp"

namespace moebal {
namespace detail {

/// One row's top-k selection as pass 1 hands it to a loss: either the ordered indices, or
/// (selected == nullptr, the branch-free path) {j : q_j >= tau} with the unique maximum `top`
/// as first choice.
template <class C>
struct RowSelection {
  const Index* selected = nullptr;
  C tau = C(0);
  C top = C(0);
};

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

/// The batch sums most losses need, as one block's partial of a threaded pass 1: real tokens,
/// top-k counts, first-choice counts and score sums (N each, double). `add` takes one row.
struct SelectionSums {
  double tokens = 0.0;
  Eigen::ArrayXd counts, first, sums;

  void reset(Index n) {
    tokens = 0.0;
    counts.setZero(n);
    first.setZero(n);
    sums.setZero(n);
  }
  template <class C>
  void add(const C* q, const RowSelection<C>& sel, Index n, Index k) {
    tokens += 1.0;
    add_selection(q, sel.selected, sel.tau, sel.top, n, k, counts.data(), first.data());
    double* s = sums.data();
    for (Index j = 0; j < n; ++j) s[j] += static_cast<double>(q[j]);
  }
};

/// Per-thread scratch a loss may use inside visit / after_row: a reader for rows of logits of
/// storage type S and an N-vector of the compute type.
template <class S>
struct RowWork {
  RowReader<S, compute_type_t<S>> reader;
  ScratchArray<compute_type_t<S>> aux;
};

/// The rows of each group, for `ScoredRows::forward_groups`: order lists the rows of group 0,
/// then of group 1, ..., each group's in increasing order; group g's are
/// order[offsets[g] .. offsets[g + 1]). group_of[t] in [0, groups). O(T) memory, reused.
inline void rows_by_group(const std::vector<Index>& group_of, Index groups,
                          std::vector<Index>& order, std::vector<Index>& offsets) {
  offsets.assign(static_cast<std::size_t>(groups + 1), 0);
  for (const Index g : group_of) ++offsets[static_cast<std::size_t>(g + 1)];
  for (Index g = 0; g < groups; ++g) offsets[std::size_t(g + 1)] += offsets[std::size_t(g)];
  order.resize(group_of.size());
  // offsets[g] as group g's cursor: afterwards it is group g's end ...
  for (std::size_t t = 0; t < group_of.size(); ++t) {
    order[static_cast<std::size_t>(offsets[static_cast<std::size_t>(group_of[t])]++)] =
        static_cast<Index>(t);
  }
  // ... which is group g + 1's start.
  for (Index g = groups; g > 0; --g) offsets[std::size_t(g)] = offsets[std::size_t(g - 1)];
  offsets[0] = 0;
}

/// Rows per chunk of the threaded passes (the partition depends on T alone).
inline constexpr Index kScoredChunkRows = 512;

/// @tparam S the logits' storage type; rows are computed in C = compute_type_t<S>.
///
/// Threads (`moebal::set_num_threads`): `forward_blocks` runs blocks of row chunks on the
/// threads, each into its own partial (combined by the loss in block order), and `backward`
/// runs row chunks on the threads; the plain `forward` visits rows in order on one thread.
/// Results do not depend on the thread count.
template <class S>
class ScoredRows {
 public:
  using C = compute_type_t<S>;

  using RowWork = detail::RowWork<S>;

  /// Sizes the per-row workspace for N experts and top-k selections of k (0: no selection).
  /// `unordered`: when a row has no tie around its top k, visit receives selected == nullptr
  /// and the selection is {j : q_j >= tau}, with first choice the unique q_j == top
  /// (the branch-free fast path; the loss counts with vector adds).
  void reset(Index num_experts, Index k, ScoreFunction score, bool unordered = false) {
    n_ = num_experts;
    k_ = k;
    unordered_ = unordered && k <= kThresholdTopkMaxK;
    score_ = score;
    lanes_.clear();
    ensure_lanes(1);
    rows_ = -1;
  }

  Index num_experts() const noexcept { return n_; }
  Index k() const noexcept { return k_; }
  /// T of the last completed forward, or -1.
  Index rows() const noexcept { return rows_; }
  /// Whether row t of the last forward was a real token.
  bool is_real(Index t) const { return norms_[static_cast<std::size_t>(t)].inv != C(0); }

  /// Pass 1 on one thread. For each real row t (in order): visit(t, q, selected), with q the
  /// row's N scores and selected its k top-k indices by decreasing score (ties to the lower
  /// index), or nullptr on the unordered fast path (see `threshold`, `top`).
  /// With `raw_out`, each real row's raw scores are also left in that buffer for a backward
  /// with `raw_in_out` (the fused form: the output buffer carries the scores between passes).
  template <class Visit>
  void forward(const char* function, const RowInput<S>& x, const TokenMask& mask, Visit&& visit,
               RowMatrixRef<C>* raw_out = nullptr) {
    rows_ = -1;
    const Index rows = x.rows();
    norms_.resize(static_cast<std::size_t>(rows));
    Lane& lane = lanes_[0];
    for (Index t = 0; t < rows; ++t) {
      row_forward(function, x, mask, t, lane, raw_out, [&](const C* q, const RowSelection<C>& sel) {
        tau_ = sel.tau;
        top_ = sel.top;
        visit(t, q, sel.selected);
      });
    }
    rows_ = rows;
  }

  /// Pass 1 on the threads. T is split into chunks of kScoredChunkRows rows and the chunks
  /// into at most kMaxBlocks blocks (detail/parallel.hpp); block b's real rows are visited in
  /// order on one thread as visit(partials[b], t, q, selection, work), after
  /// reset_partial(partials[b]). Returns the block count: the loss combines partials[0..blocks)
  /// in order, so the result does not depend on the thread count. `partials` grows (allocates)
  /// only when the block count does. Visit must write nothing but its partial and `work`.
  template <class Partial, class Reset, class Visit>
  Index forward_blocks(const char* function, const RowInput<S>& x, const TokenMask& mask,
                       std::vector<Partial>& partials, Reset&& reset_partial, Visit&& visit,
                       RowMatrixRef<C>* raw_out = nullptr) {
    rows_ = -1;
    const Index rows = x.rows();
    norms_.resize(static_cast<std::size_t>(rows));
    const Index chunks = (rows + kScoredChunkRows - 1) / kScoredChunkRows;
    const BlockPartition partition(chunks);
    const int threads = threads_for(partition.blocks);
    ensure_lanes(threads);
    if (partials.size() < static_cast<std::size_t>(partition.blocks)) {
      partials.resize(static_cast<std::size_t>(partition.blocks));
    }
    for_blocks(partition, threads, [&](int thread, Index block) {
      Lane& lane = lanes_[static_cast<std::size_t>(thread)];
      Partial& partial = partials[static_cast<std::size_t>(block)];
      reset_partial(partial);
      const Index begin = partition.begin(block) * kScoredChunkRows;
      const Index end = std::min(rows, partition.end(block) * kScoredChunkRows);
      for (Index t = begin; t < end; ++t) {
        row_forward(function, x, mask, t, lane, raw_out,
                    [&](const C* q, const RowSelection<C>& sel) {
                      visit(partial, t, q, sel, lane.work);
                    });
      }
    });
    rows_ = rows;
    return partition.blocks;
  }

  /// Pass 1 on the threads by groups of rows (sequences): group g's rows,
  /// order[offsets[g] .. offsets[g + 1]) in increasing order, are visited in that order by one
  /// thread as visit(g, t, q, selection, work). Each group's sums therefore add in row order
  /// whatever the thread count, with no partials. Visit must write nothing but group g's state
  /// and `work`. Where a row is invalid, the error reported is the lowest invalid row's (as the
  /// one-thread `forward` reports it).
  template <class Visit>
  void forward_groups(const char* function, const RowInput<S>& x, const TokenMask& mask,
                      const std::vector<Index>& order, const std::vector<Index>& offsets,
                      Visit&& visit, RowMatrixRef<C>* raw_out = nullptr) {
    rows_ = -1;
    const Index rows = x.rows();
    norms_.resize(static_cast<std::size_t>(rows));
    const Index groups = static_cast<Index>(offsets.size()) - 1;
    MOEBAL_ASSERT(groups >= 0 && static_cast<Index>(order.size()) == rows);
    // Chunks of whole groups of about kScoredChunkRows rows (any partition gives the same sums).
    const Index per_chunk =
        groups > 0 ? std::max<Index>(1, kScoredChunkRows * groups / std::max<Index>(rows, 1)) : 1;
    const Index chunks = (groups + per_chunk - 1) / per_chunk;
    const int threads = threads_for(chunks);
    ensure_lanes(threads);
    try {
      for_chunks(chunks, threads, [&](int thread, Index chunk) {
        Lane& lane = lanes_[static_cast<std::size_t>(thread)];
        const Index end_group = std::min(groups, (chunk + 1) * per_chunk);
        for (Index g = chunk * per_chunk; g < end_group; ++g) {
          for (Index i = offsets[std::size_t(g)]; i < offsets[std::size_t(g + 1)]; ++i) {
            const Index t = order[std::size_t(i)];
            row_forward(function, x, mask, t, lane, raw_out,
                        [&](const C* q, const RowSelection<C>& sel) {
                          visit(g, t, q, sel, lane.work);
                        });
          }
        }
      });
    } catch (const invalid_argument&) {
      // Groups interleave rows (sequence-major): report the lowest invalid row.
      Lane& lane = lanes_[0];
      for (Index t = 0; t < rows; ++t) {
        if (!mask.is_real(t)) continue;
        const C* row = lane.reader.read(x.data() + t * x.outerStride(), n_);
        RowNorm<C> norm;
        if (!raw_scores(row, n_, score_, lane.raw, norm)) {
          throw_invalid_row(function, row, n_, t, score_);
        }
      }
      throw;
    }
    rows_ = rows;
  }

  /// `forward_blocks` with the common batch sums (`SelectionSums`): adds the real tokens to
  /// *tokens and, over experts, the top-k counts to counts, first choices to first and (when
  /// sums != nullptr) score sums to sums, block partials in block order.
  void forward_sums(const char* function, const RowInput<S>& x, const TokenMask& mask,
                    std::vector<SelectionSums>& partials, double* tokens, double* counts,
                    double* first, double* sums, RowMatrixRef<C>* raw_out = nullptr) {
    const Index n = n_, k = k_;
    const Index blocks = forward_blocks(
        function, x, mask, partials, [n](SelectionSums& p) { p.reset(n); },
        [n, k](SelectionSums& p, Index, const C* q, const RowSelection<C>& sel, RowWork&) {
          p.add(q, sel, n, k);
        },
        raw_out);
    for (Index b = 0; b < blocks; ++b) {
      const SelectionSums& p = partials[static_cast<std::size_t>(b)];
      *tokens += p.tokens;
      for (Index j = 0; j < n; ++j) {
        counts[j] += p.counts[j];
        first[j] += p.first[j];
        if (sums != nullptr) sums[j] += p.sums[j];
      }
    }
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

  /// Pass 2 (rows in chunks on the threads). For each real row t: grad_row(t, q, selected, g)
  /// writes d L / d q_t into g (length N, every element); the row's d L / d x_t =
  /// scale * VJP(g) is written (or added, `Accumulate`) into out. Padded rows are zeroed
  /// (written) or left alone (accumulated).
  /// `raw_in_out`: the forward left each real row's raw scores in `out` (write form only);
  /// otherwise they are recomputed from x. `reselect`: recompute the top-k for grad_row
  /// (otherwise `selected` is not meaningful in grad_row). grad_row must write nothing but g.
  /// An exception thrown for a row is rethrown for the lowest such row.
  template <bool Accumulate, class Out, class GradRow>
  void backward(const char* function, const RowInput<S>& x, RowMatrixRef<Out>& out, C scale,
                GradRow&& grad_row, bool raw_in_out = false, bool reselect = true) {
    backward<Accumulate>(
        function, x, out, scale, grad_row, [](Index, const C*, C*, RowWork&) {}, raw_in_out,
        reselect);
  }

  /// As above; then after_row(t, q, dx, work) may add a term of its own to the finished row dx
  /// (a C* row: for another output type the row is finished in C and stored once), with q the
  /// row's scores. after_row must write nothing but dx and `work`.
  template <bool Accumulate, class Out, class GradRow, class AfterRow>
  void backward(const char* function, const RowInput<S>& x, RowMatrixRef<Out>& out, C scale,
                GradRow&& grad_row, AfterRow&& after_row, bool raw_in_out, bool reselect) {
    MOEBAL_ASSERT(!(Accumulate && raw_in_out));
    // A buffer of another type than C cannot carry the scores: they are recomputed.
    raw_in_out = raw_in_out && std::is_same_v<Out, C>;
    const Index rows = rows_;
    const Index chunks = (rows + kScoredChunkRows - 1) / kScoredChunkRows;
    const int threads = threads_for(chunks);
    ensure_lanes(threads);
    for_chunks(chunks, threads, [&](int thread, Index chunk) {
      Lane& lane = lanes_[static_cast<std::size_t>(thread)];
      const Index begin = chunk * kScoredChunkRows;
      const Index end = std::min(rows, begin + kScoredChunkRows);
      for (Index t = begin; t < end; ++t) {
        backward_row<Accumulate>(function, x, out, scale, grad_row, after_row, raw_in_out,
                                 reselect, t, lane);
      }
    });
  }

  /// The current row's k-th largest score when visit received selected == nullptr (`forward`).
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
        [](Index, const C*, C*, RowWork&) {}, raw_in_out, false);
  }

  /// Row t's normalizer from the last forward (valid inside `visit` for the current row).
  const RowNorm<C>& norm(Index t) const { return norms_[static_cast<std::size_t>(t)]; }

 private:
  // Per-thread scratch, O(N) each.
  struct Lane {
    ScratchArray<C> raw, q, g, drow;
    RowReader<S, C> reader;
    std::vector<Index> selected;
    TopkScratch<C> topk;
    RowWork work;
  };

  void ensure_lanes(int threads) {
    detail::ensure_lanes(lanes_, threads, [&](Lane& lane) {
      lane.raw.resize(n_);
      lane.q.resize(n_);
      lane.g.resize(n_);
      lane.drow.resize(n_);
      lane.reader.resize(n_);
      lane.selected.resize(static_cast<std::size_t>(std::max<Index>(k_, 1)));
      lane.topk.resize(n_, std::max<Index>(k_, 1));
      lane.work.reader.resize(n_);
      lane.work.aux.resize(n_);
    });
  }

  // Pass 1 for row t: its normalizer into norms_, then f(q, selection) for a real row.
  template <class F>
  void row_forward(const char* function, const RowInput<S>& x, const TokenMask& mask, Index t,
                   Lane& lane, RowMatrixRef<C>* raw_out, F&& f) {
    RowNorm<C>& norm = norms_[static_cast<std::size_t>(t)];
    if (!mask.is_real(t)) {
      norm = RowNorm<C>{};
      return;
    }
    const C* row = lane.reader.read(x.data() + t * x.outerStride(), n_);
    if (!raw_scores(row, n_, score_, lane.raw, norm)) {
      throw_invalid_row(function, row, n_, t, score_);
    }
    scores_from_raw(lane.raw, norm, lane.q);
    RowSelection<C> sel;
    sel.selected = lane.selected.data();
    if (k_ > 0) {
      if (unordered_ && topk_threshold(lane.q.data(), n_, k_, sel.tau, sel.top)) {
        sel.selected = nullptr;
      } else {
        topk_row(lane.q.data(), n_, k_, lane.selected.data(), lane.topk);
      }
    }
    f(static_cast<const C*>(lane.q.data()), sel);
    if (raw_out != nullptr) raw_out->row(t) = lane.raw.transpose().matrix();
  }

  template <bool Accumulate, class Out, class GradRow, class AfterRow>
  void backward_row(const char* function, const RowInput<S>& x, RowMatrixRef<Out>& out, C scale,
                    GradRow& grad_row, AfterRow& after_row, bool raw_in_out, bool reselect,
                    Index t, Lane& lane) {
    const RowNorm<C>& norm = norms_[static_cast<std::size_t>(t)];
    Out* dx = out.data() + t * out.outerStride();
    if (norm.inv == C(0)) {
      if constexpr (!Accumulate) std::fill(dx, dx + n_, Out(0));
      return;
    }
    const C* raw = lane.raw.data();
    if constexpr (std::is_same_v<Out, C>) {
      if (raw_in_out) raw = dx;
    }
    if (!raw_in_out) {
      const C* row = lane.reader.read(x.data() + t * x.outerStride(), n_);
      RowNorm<C> again;
      if (!raw_scores(row, n_, score_, lane.raw, again)) {
        throw_invalid_row(function, row, n_, t, score_);
      }
      raw = lane.raw.data();
    }
    C* q = lane.q.data();
    for (Index j = 0; j < n_; ++j) q[j] = raw[j] * norm.inv;
    if (k_ > 0 && reselect) topk_row(lane.q.data(), n_, k_, lane.selected.data(), lane.topk);
    C* g = lane.g.data();
    grad_row(t, static_cast<const C*>(q), static_cast<const Index*>(lane.selected.data()), g);
    const C g_dot_q = dot_with_scores(g, raw, norm, n_);
    if constexpr (std::is_same_v<Out, C>) {
      score_vjp_row<Accumulate>(raw, norm, g, g_dot_q, scale, score_, n_, dx);
      after_row(t, static_cast<const C*>(q), dx, lane.work);
    } else {
      // Another output type (bfloat16/half): the row is finished in C and rounded once.
      C* drow = lane.drow.data();
      score_vjp_row<false>(raw, norm, g, g_dot_q, scale, score_, n_, drow);
      after_row(t, static_cast<const C*>(q), drow, lane.work);
      for (Index j = 0; j < n_; ++j) store<Accumulate>(dx[j], drow[j]);
    }
  }

  Index n_ = 0;
  Index k_ = 0;
  bool unordered_ = false;
  C tau_ = C(0), top_ = C(0);
  ScoreFunction score_ = ScoreFunction::softmax;
  std::vector<Lane> lanes_;
  std::vector<RowNorm<C>> norms_;
  Index rows_ = -1;
};

}  // namespace detail
}  // namespace moebal
