// SPDX-License-Identifier: Apache-2.0
#pragma once

// Internal: fused per-row kernels (scores and the threshold top-k search in one pass).

#include <Eigen/Core>
#include <limits>

#include "moebal/core/types.hpp"
#include "moebal/detail/score_kernels.hpp"
#include "moebal/detail/topk_kernels.hpp"

namespace moebal {
namespace detail {

/// Whether `raw_scores_topk` takes rows of n experts: whole exp blocks only.
inline bool fused_row_kernel(Index n) { return n > 0 && n % kExpBlock == 0; }

/// `raw_scores_to` (the same raw values, sum and normalizer, bit for bit) fused with the
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
  static_assert(kExpBlock % kRowBlock == 0, "exp blocks are made of whole row blocks");
  using Lists = LaneTopk<K, C>;
  using Ops = typename Lists::Ops;
  constexpr Index lanes = Lists::kLanes;
  static_assert(kExpBlock % lanes == 0, "exp blocks are made of whole top-k lane blocks");
  MOEBAL_ASSERT(fused_row_kernel(n) && k >= 1 && k <= K);
  constexpr C minus_inf = -std::numeric_limits<C>::infinity();
  RowBlock<C> m = RowBlock<C>::Constant(minus_inf);
  for (Index j = 0; j < n; j += kRowBlock) m = m.max(load_block<C>(x + j));
  const C max = max_of_lanes(m);
  RowBlock<C> sums = RowBlock<C>::Zero();
  Lists lists;
  Index depth = 0;
  for (Index j = 0; j < n; j += kExpBlock) {
    const ExpBlock<C> r = raw_block<C>(load_block<C, kExpBlock>(x + j), max, score);
    for (Index h = 0; h < kExpBlock; h += kRowBlock) sums += r.template segment<kRowBlock>(h);
    Eigen::Map<ExpBlock<C>>(raw + j) = r;
    for (Index h = 0; h < kExpBlock; h += lanes) {
      lists.insert(Ops::load(r.data() + h), depth);
      depth += depth < K ? 1 : 0;
    }
  }
  const C sum = ((sums[0] + sums[1]) + (sums[2] + sums[3])) +
                ((sums[4] + sums[5]) + (sums[6] + sums[7]));
  bool valid;
  if (score == ScoreFunction::softmax) {
    norm.shift = max;
    norm.inv = C(1) / sum;
    valid = std::isfinite(sum) && sum > C(0);
  } else {
    norm.shift = C(0);
    norm.inv = C(1) / (sum + kSigmoidNormEps<C>);
    valid = std::isfinite(sum) && max != std::numeric_limits<C>::infinity();
  }
  C sorted[K];
  lists.merged(sorted);
  top = sorted[0] * norm.inv;
  tau = sorted[k - 1] * norm.inv;
  return valid;
}

}  // namespace detail
}  // namespace moebal
