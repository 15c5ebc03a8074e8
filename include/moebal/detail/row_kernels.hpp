// SPDX-License-Identifier: Apache-2.0
#pragma once

// Internal: fused per-row kernels (scores and the threshold top-k search in one pass).

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
bool raw_scores_topk(const S* x, Index n, Index k, ScoreFunction score, C* raw, RowNorm<C>& norm,
                     C& tau, C& top) {
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
  C sorted[K];
  lists.merged(sorted);
  top = sorted[0] * norm.inv;
  tau = sorted[k - 1] * norm.inv;
  return valid;
}

}  // namespace detail
}  // namespace moebal
