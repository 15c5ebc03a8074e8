// SPDX-License-Identifier: Apache-2.0
#pragma once

// Internal: reductions whose rounding never depends on where the data lives.
//
// Eigen's vectorized reductions start at the first aligned element, so the same row summed at
// two addresses can round differently. These sum in a fixed number of lanes with a fixed
// combination order; compilers still vectorize the lane loop.

#include "moebal/core/types.hpp"

namespace moebal {
namespace detail {

inline constexpr Index kReduceLanes = 8;

/// Combines the lanes pairwise in a fixed order.
template <class C>
C combine_lanes(const C (&lanes)[kReduceLanes]) {
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

/// sum_j x[j], rounding fixed by n alone.
template <class C>
C lane_sum(const C* x, Index n) {
  C lanes[kReduceLanes] = {};
  Index j = 0;
  for (; j + kReduceLanes <= n; j += kReduceLanes) {
    for (Index l = 0; l < kReduceLanes; ++l) lanes[l] += x[j + l];
  }
  for (Index l = 0; j < n; ++j, ++l) lanes[l] += x[j];
  return combine_lanes(lanes);
}

/// sum_j a[j] * b[j], rounding fixed by n alone.
template <class C>
C lane_dot(const C* a, const C* b, Index n) {
  C lanes[kReduceLanes] = {};
  Index j = 0;
  for (; j + kReduceLanes <= n; j += kReduceLanes) {
    for (Index l = 0; l < kReduceLanes; ++l) lanes[l] += a[j + l] * b[j + l];
  }
  for (Index l = 0; j < n; ++j, ++l) lanes[l] += a[j] * b[j];
  return combine_lanes(lanes);
}

/// lane_dot(a, b[r], n) for R rows b[0..R) (R = 1 or 2), inlined one after the other so that
/// the rows' add chains overlap: out[r] is bitwise lane_dot(a, b[r], n).
template <int R, class C>
MOEBAL_ALWAYS_INLINE void lane_dot_rows(const C* a, const C* const* b, Index n, C* out) {
  for (int r = 0; r < R; ++r) {
    C lanes[kReduceLanes] = {};
    const C* row = b[r];
    Index j = 0;
    for (; j + kReduceLanes <= n; j += kReduceLanes) {
      for (Index l = 0; l < kReduceLanes; ++l) lanes[l] += a[j + l] * row[j + l];
    }
    for (Index l = 0; j < n; ++j, ++l) lanes[l] += a[j] * row[j];
    out[r] = combine_lanes(lanes);
  }
}

}  // namespace detail
}  // namespace moebal
