// SPDX-License-Identifier: Apache-2.0
#pragma once

// Internal: fused per-row kernels (scores and the threshold top-k search in one pass).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include <Eigen/Core>

#include "moebal/core/types.hpp"
#include "moebal/detail/score_kernels.hpp"
#include "moebal/detail/topk_kernels.hpp"

namespace moebal {
namespace detail {

/// Whether `raw_scores_topk` takes rows of n experts: whole exp blocks only.
inline bool fused_row_kernel(Index n) { return n > 0 && n % kExpBlock == 0; }

/// `raw_scores_topk` (below) for R rows at once (R = 1 or 2; see `raw_scores_rows`): row r's
/// raw values, normalizer, tau and top are those the one-row function computes for that row
/// (it is this function with R = 1); valid[r] is its result.
template <Index K, int R, class S, class C>
MOEBAL_ALWAYS_INLINE void raw_scores_topk_rows(const S* const* x, Index n, Index k,
                                               ScoreFunction score, C* const* raw,
                                               RowNorm<C>* norm, C* tau, C* top, bool* valid) {
  using Lists = LaneTopk<K, C>;
  using Ops = typename Lists::Ops;
  constexpr Index lanes = Lists::kLanes;
  static_assert(kExpBlock % lanes == 0, "exp blocks are made of whole top-k lane blocks");
  MOEBAL_ASSERT(fused_row_kernel(n) && k >= 1 && k <= K);
  Lists lists[R];
  Index depth[R] = {};  // levels of each row's lists that hold values
  raw_scores_rows<R>(x, n, score, raw, norm, valid, [&](int r, const ExpBlock<C>& b) {
    for (Index h = 0; h < kExpBlock; h += lanes) {
      lists[r].insert(Ops::load(b.data() + h), depth[r]);
      depth[r] += depth[r] < K ? 1 : 0;
    }
  });
  for (int r = 0; r < R; ++r) {
    C top_raw, tau_raw;
    if (k == K) {
      lists[r].extremes_of_merged(top_raw, tau_raw);  // tau is the smallest of the K largest
    } else {
      C sorted[K];
      lists[r].merged(sorted);
      top_raw = sorted[0];
      tau_raw = sorted[k - 1];
    }
    top[r] = top_raw * norm[r].inv;
    tau[r] = tau_raw * norm[r].inv;
  }
}

/// `raw_scores_to` (it is that function, with a block hook) fused with the
/// threshold top-k search of `topk_threshold_search<K>` on the scores q_j = raw_j * inv: the
/// search runs on the raw values as each block is computed (q is raw times the positive inv,
/// and rounding is monotone), and the results are taken to the scores' scale as the scores
/// themselves are (tau = tau_raw * inv, top = top_raw * inv), so that {j : q_j >= tau} and
/// q_j == top select exactly as on q. The caller verifies, as `topk_threshold` does, that
/// exactly k scores are >= tau and one equals top (a tie made by the rounding to q fails
/// that test). n must satisfy `fused_row_kernel(n)`. Returns false for an invalid row (as
/// `raw_scores_to`).
template <Index K, class S, class C>
MOEBAL_ALWAYS_INLINE bool raw_scores_topk(const S* x, Index n, Index k, ScoreFunction score,
                                          C* raw, RowNorm<C>& norm, C& tau, C& top) {
  const S* rows[1] = {x};
  C* out[1] = {raw};
  bool valid[1];
  raw_scores_topk_rows<K, 1>(rows, n, k, score, out, &norm, &tau, &top, valid);
  return valid[0];
}

/// A chunk's top-k and first-choice counts packed in one int32 per expert: the top-k count in
/// the low 16 bits, the first-choice count above them (a chunk has at most 65535 rows).
inline constexpr std::int32_t kFirstChoiceUnit = std::int32_t(1) << 16;
inline constexpr std::int32_t kTopkCountMask = kFirstChoiceUnit - 1;

/// The Switch loss's per-row statistics from a row's raw scores (q_j = raw_j * inv) and its
/// threshold search (tau, the k-th largest score, and top, the largest): sums[j] += q_j for
/// every j; if the threshold selection is exact (exactly k scores >= tau and exactly one equal
/// to top, as `topk_threshold` verifies) counts[j] += [q_j >= tau] + [q_j == top] *
/// kFirstChoiceUnit (the packed counts above) and the result is true; otherwise the counts are
/// left unchanged and the result is false (the caller then takes the exact method). One loop
/// that compilers vectorize (the arrays must not overlap).
/// `WithSums = false`: the counts alone (sums untouched), for a pass that sums the scores later.
template <bool WithSums = true, class C>
MOEBAL_ALWAYS_INLINE bool count_threshold_row(const C* MOEBAL_RESTRICT raw, Index n, Index k,
                                              C inv, C tau, C top,
                                              std::int32_t* MOEBAL_RESTRICT counts,
                                              double* MOEBAL_RESTRICT sums) {
  std::int32_t sel = 0, att = 0;
  for (Index j = 0; j < n; ++j) {
    const C q = raw[j] * inv;
    const std::int32_t in_topk = q >= tau ? 1 : 0, is_top = q == top ? 1 : 0;
    counts[j] += in_topk + is_top * kFirstChoiceUnit;
    sel += in_topk;
    att += is_top;
    if constexpr (WithSums) sums[j] += static_cast<double>(q);
  }
  if constexpr (!WithSums) (void)sums;
  if (sel == k && att == 1) return true;
  for (Index j = 0; j < n; ++j) {
    const C q = raw[j] * inv;
    counts[j] -= (q >= tau ? 1 : 0) + (q == top ? kFirstChoiceUnit : 0);
  }
  return false;
}

/// What `count_logits_row` made of a row.
enum class LogitsRow {
  counted,  // the row's top-k and first choice are counted
  exact,    // too close to call on the logits: the caller counts on the scores (exact method)
  invalid,  // NaN or +Inf, or (softmax) every logit -Inf: the caller throws
};

/// `count_logits_row`'s margins. Softmax: the least gap between the shifted logits
/// d = x - max on either side of the selection's boundary, 2^-15 in float and 2^-38 in double,
/// and the least shifted logit of a selected expert, -62 in float (e^-62 > 2^-90) and -600 in
/// double (e^-600 > 2^-865). Sigmoid: the least relative gap between the raw values, 2^-16 and
/// 2^-40, and the least raw value of a selected expert, 2^-90 and 2^-865.
template <class C>
inline constexpr C kLogitsGap = C(sizeof(C) == sizeof(float) ? 0x1p-15 : 0x1p-38);
template <class C>
inline constexpr C kLogitsFloor = C(sizeof(C) == sizeof(float) ? -62.0 : -600.0);
template <class C>
inline constexpr C kRawGap = C(sizeof(C) == sizeof(float) ? 0x1p-16 : 0x1p-40);
template <class C>
inline constexpr C kRawFloor = C(sizeof(C) == sizeof(float) ? 0x1p-90 : 0x1p-865);

/// Up to this k the Switch loss's forward_backward selects on the logits (`count_logits_row`).
/// Above it, deeper lane lists and their merge (tried up to k = 16),
/// run apart from the exponentials, measured slower than the fused forward (k = 8, N = 64,
/// Zen 3: about 138 against 128 ns per row on one thread).
inline constexpr Index kLogitsSelectionMaxK = 2;

/// Whether forward_backward selects on the logits: rows of whole exp blocks, k <=
/// kLogitsSelectionMaxK (and N < 2^30, for the margins).
inline bool logits_selection_applies(Index n, Index k) {
  return fused_row_kernel(n) && k >= 1 && k <= kLogitsSelectionMaxK && n < (Index(1) << 30);
}

/// The Switch loss's top-k and first-choice counts of one row selected on its logits x,
/// without its scores: the counts of the selection on the scores q_j = raw_j * inv
/// (`raw_scores_to`; ties to the lower index) whenever the logits decide it. The lane lists of
/// the threshold method give the row's maximum `top` and tau, the k-th largest logit (with
/// multiplicity; for k = 2 the second largest, for k = 1 the second is `next`); one pass counts counts[j] += [x_j >= tau] + [x_j == top]
/// * kFirstChoiceUnit and checks the row (NaN or +Inf; softmax: top > -Inf); another takes
/// `next`, the largest logit below tau. The row is counted when exactly k logits are >= tau,
/// top is unique, and top, second, tau and next are far enough apart that the scores cannot
/// tie or swap across the boundary (k < n) or at the top:
///   softmax: with d = x - top as every pass rounds it, d(second) <= -gap and (k < n)
///     d(tau) >= floor and d(tau) - d(next) >= gap (kLogitsGap, kLogitsFloor). x_c <= next
///     gives d_c <= d(next) (the subtraction rounds monotonically), so the exact exponentials
///     differ by a factor of at least e^gap; the exponential's error (2 ulp) leaves more than
///     1 + gap / 2 between the raw values, which the rounding of raw * inv (a normal number
///     above e^floor / N) cannot close.
///   sigmoid: the raw values of top, second, tau and next are computed by `raw_block`, lane
///     for lane as every pass computes them, and compared the same way: raw(top) and raw(tau)
///     >= kRawFloor, raw(top) > raw(second) (1 + g) and raw(tau) > raw(next) (1 + g), g =
///     kRawGap (an unselected raw value exceeds raw(next) by 2 ulp at most).
/// Otherwise the counts are left unchanged (`exact`, or `invalid`). `max_out` receives top,
/// the row's exact maximum, and `min_out` the smallest logit. n must satisfy
/// `logits_selection_applies(n, k)`, with K = k (1 or 2).
template <Index K, class C>
MOEBAL_ALWAYS_INLINE LogitsRow count_logits_row(const C* MOEBAL_RESTRICT x, Index n, Index k,
                                                ScoreFunction score, C& max_out, C& min_out,
                                                std::int32_t* MOEBAL_RESTRICT counts) {
  using Lists = LaneTopk<K, C>;
  using Ops = typename Lists::Ops;
  using Block = typename Lists::Block;
  constexpr Index lanes = Lists::kLanes;
  constexpr C inf = std::numeric_limits<C>::infinity();
  static_assert(kExpBlock % lanes == 0, "exp blocks are made of whole top-k lane blocks");
  static_assert(K == 1 || K == 2, "k = 1 or 2 (kLogitsSelectionMaxK), with K = k");
  MOEBAL_ASSERT(logits_selection_applies(n, k) && k == K);
  Lists lists;
  Block low = Ops::splat(inf);
  // The first K blocks fill the lists' levels (block b reaches at most level b), the others
  // go through the whole network.
  Index at = 0;
  for (Index depth = 0; depth < K && at < n; ++depth, at += lanes) {
    const Block v = Ops::load(x + at);
    low = Ops::min(low, v);
    lists.insert(v, depth);
  }
  for (; at < n; at += lanes) {
    const Block v = Ops::load(x + at);
    low = Ops::min(low, v);
    lists.insert_full(v);
  }
  min_out = -Ops::largest(-low);
  C top, tau;
  lists.extremes_of_merged(top, tau);  // k == K: tau is the k-th largest
  C second = tau;                      // K = 2; K = 1 takes next, below
  max_out = top;
  std::int32_t selected = 0, at_top = 0, bad = 0;
  for (Index j = 0; j < n; ++j) {
    const C v = x[j];
    const std::int32_t in_topk = v >= tau ? 1 : 0, is_top = v == top ? 1 : 0;
    counts[j] += in_topk + is_top * kFirstChoiceUnit;
    selected += in_topk;
    at_top += is_top;
    bad |= v < inf ? 0 : 1;  // NaN or +Inf
  }
  if (bad != 0 || (score == ScoreFunction::softmax && !(top > -inf))) return LogitsRow::invalid;
  const auto undo = [&]() {
    for (Index j = 0; j < n; ++j) {
      counts[j] -= (x[j] >= tau ? 1 : 0) + (x[j] == top ? kFirstChoiceUnit : 0);
    }
    return LogitsRow::exact;
  };
  if (selected != k || at_top != 1) return undo();
  const Block bound = Ops::splat(tau);
  Block below = Ops::splat(-inf);
  for (Index j = 0; j < n; j += lanes) below = Ops::max(below, Ops::below(Ops::load(x + j), bound));
  const C next = Ops::largest(below);
  if constexpr (K == 1) second = next;
  bool decided;
  if (score == ScoreFunction::softmax) {
    const C gap = kLogitsGap<C>;
    const C d_tau = tau - top;
    decided = second - top <= -gap;
    if (k < n) decided = decided && d_tau >= kLogitsFloor<C> && d_tau - (next - top) >= gap;
  } else {
    ExpBlock<C> candidates = ExpBlock<C>::Constant(top);
    candidates[1] = second;
    candidates[2] = tau;
    candidates[3] = next;
    const ExpBlock<C> r = raw_block<C>(candidates, top, score);
    const C widen = C(1) + kRawGap<C>;
    const C floor = kRawFloor<C>;
    decided = r[0] >= floor && r[0] > r[1] * widen;
    if (k < n) decided = decided && r[2] >= floor && r[2] > r[3] * widen;
  }
  return decided ? LogitsRow::counted : undo();
}

}  // namespace detail
}  // namespace moebal
