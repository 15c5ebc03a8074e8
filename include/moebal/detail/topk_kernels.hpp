// SPDX-License-Identifier: Apache-2.0
#pragma once

// Internal: top-k of one row with ties to the lower index.

#include <algorithm>
#include <vector>

#include "moebal/core/types.hpp"

namespace moebal {
namespace detail {

/// Up to this k, top-k keeps a sorted list of k candidates and inserts into it: O(N k) per
/// row with no allocation. Above it, a partial sort of an index array: O(N log k).
inline constexpr Index kInsertionTopkMaxK = 16;

/// Scratch for `topk_row`, sized once per (N, k).
template <class C>
struct TopkScratch {
  std::vector<C> values;     // k
  std::vector<Index> order;  // N, only for k > kInsertionTopkMaxK
  void resize(Index n, Index k) {
    values.resize(static_cast<std::size_t>(k));
    if (k > kInsertionTopkMaxK) order.resize(static_cast<std::size_t>(n));
  }
};

/// Writes the indices of the k largest of q[0..n) into `out`, by decreasing value; equal values
/// are ordered by increasing index, so on a tie the lower expert index is selected first.
/// q must contain no NaN.
template <class C>
void topk_row(const C* q, Index n, Index k, Index* out, TopkScratch<C>& scratch) {
  MOEBAL_ASSERT(k >= 1 && k <= n);
  if (k <= kInsertionTopkMaxK) {
    C* values = scratch.values.data();
    Index filled = 0;
    for (Index j = 0; j < n; ++j) {
      const C v = q[j];
      if (filled == k) {
        // Only a strictly larger value displaces the current k-th: on a tie the earlier
        // (lower) index stays.
        if (!(v > values[k - 1])) continue;
        filled = k - 1;
      }
      Index pos = filled;
      while (pos > 0 && values[pos - 1] < v) {
        values[pos] = values[pos - 1];
        out[pos] = out[pos - 1];
        --pos;
      }
      values[pos] = v;
      out[pos] = j;
      ++filled;
    }
    return;
  }
  Index* order = scratch.order.data();
  for (Index j = 0; j < n; ++j) order[j] = j;
  std::partial_sort(order, order + k, order + n, [q](Index a, Index b) {
    return q[a] > q[b] || (q[a] == q[b] && a < b);
  });
  std::copy(order, order + k, out);
}

}  // namespace detail
}  // namespace moebal
