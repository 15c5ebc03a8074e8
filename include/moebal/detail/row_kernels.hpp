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

}  // namespace detail
}  // namespace moebal
