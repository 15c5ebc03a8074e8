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
  using Lists = LaneTopk<K, C>;
  using Ops = typename Lists::Ops;
  constexpr Index lanes = Lists::kLanes;
  static_assert(kExpBlock % lanes == 0, "exp blocks are made of whole top-k lane blocks");
  MOEBAL_ASSERT(fused_row_kernel(n) && k >= 1 && k <= K);
  Lists lists;
  Index depth = 0;  // levels of the lists that hold values
  const bool valid = raw_scores_to(x, n, score, raw, norm, [&](const ExpBlock<C>& r) {
    for (Index h = 0; h < kExpBlock; h += lanes) {
      lists.insert(Ops::load(r.data() + h), depth);
      depth += depth < K ? 1 : 0;
    }
  });
  C top_raw, tau_raw;
  if (k == K) {
    lists.extremes_of_merged(top_raw, tau_raw);  // tau is the smallest of the K largest
  } else {
    C sorted[K];
    lists.merged(sorted);
    top_raw = sorted[0];
    tau_raw = sorted[k - 1];
  }
  top = top_raw * norm.inv;
  tau = tau_raw * norm.inv;
  return valid;
}

/// The Switch loss's per-row statistics from a row's raw scores (q_j = raw_j * inv) and its
/// threshold search (tau, the k-th largest score, and top, the largest): sums[j] += q_j for
/// every j; if the threshold selection is exact (exactly k scores >= tau and exactly one equal
/// to top, as `topk_threshold` verifies) counts[j] += [q_j >= tau], first[j] += [q_j == top]
/// and the result is true; otherwise the counts are left unchanged and the result is false
/// (the caller then takes the exact method). One loop that compilers vectorize (the arrays
/// must not overlap).
template <class C>
MOEBAL_ALWAYS_INLINE bool count_threshold_row(const C* MOEBAL_RESTRICT raw, Index n, Index k,
                                              C inv, C tau, C top,
                                              std::int32_t* MOEBAL_RESTRICT counts,
                                              std::int32_t* MOEBAL_RESTRICT first,
                                              double* MOEBAL_RESTRICT sums) {
  std::int32_t sel = 0, att = 0;
  for (Index j = 0; j < n; ++j) {
    const C q = raw[j] * inv;
    const std::int32_t in_topk = q >= tau ? 1 : 0, is_top = q == top ? 1 : 0;
    counts[j] += in_topk;
    first[j] += is_top;
    sel += in_topk;
    att += is_top;
    sums[j] += static_cast<double>(q);
  }
  if (sel == k && att == 1) return true;
  for (Index j = 0; j < n; ++j) {
    const C q = raw[j] * inv;
    counts[j] -= q >= tau ? 1 : 0;
    first[j] -= q == top ? 1 : 0;
  }
  return false;
}

}  // namespace detail
}  // namespace moebal
