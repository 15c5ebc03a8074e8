// SPDX-License-Identifier: Apache-2.0
#pragma once

// Internal: top-k of one row with ties to the lower index.
//
// Two methods with the same result:
// - threshold (the fast path): k rounds of a vectorized "largest value below the previous
//   one" give the k-th largest value tau; if exactly k values are >= tau, they are the top-k
//   (their values are then distinct, so their order is unambiguous). Branch-free and linear.
// - exact (the fallback when values tie around the top k): a sorted list of k candidates with
//   insertion for k <= 16, a partial sort of an index array above.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "moebal/core/types.hpp"

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define MOEBAL_HAS_SHUFFLEVECTOR 1
#endif
#endif
#ifndef MOEBAL_HAS_SHUFFLEVECTOR
#define MOEBAL_HAS_SHUFFLEVECTOR 0
#endif

namespace moebal {
namespace detail {

/// Up to this k, the exact method inserts into a sorted list of k candidates: O(N k) per row
/// with no allocation. Above it, a partial sort of an index array: O(N log k).
inline constexpr Index kInsertionTopkMaxK = 16;

/// Scratch for the top-k kernels, sized once per (N, k).
template <class C>
struct TopkScratch {
  std::vector<C> values;     // k
  std::vector<Index> order;  // N, only for k > kInsertionTopkMaxK
  void resize(Index n, Index k) {
    values.resize(static_cast<std::size_t>(k));
    if (k > kInsertionTopkMaxK) order.resize(static_cast<std::size_t>(n));
  }
};

/// The exact method: writes the indices of the k largest of q[0..n) into `out`, by decreasing
/// value; equal values are ordered by increasing index, so on a tie the lower expert index is
/// selected first. q must contain no NaN.
template <class C>
void topk_row_exact(const C* q, Index n, Index k, Index* out, TopkScratch<C>& scratch) {
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

/// Lanes of the threshold search: one vector register of C (Eigen's packet: 16 floats or 8
/// doubles under AVX-512, 8 or 4 under AVX). The lane count changes no result: tau and the
/// maximum are exact values of the row.
template <class C>
inline constexpr Index kTopkLanes = std::max<Index>(
    2, static_cast<Index>(Eigen::internal::packet_traits<C>::size));

/// Up to this k, top-k uses the threshold method first; above it, the exact method only.
inline constexpr Index kThresholdTopkMaxK = 16;

/// The vector operations of the threshold search on blocks of L lanes of C: a GCC/Clang
/// vector type (one register; lane shuffles by __builtin_shufflevector) where the compiler
/// has it, else a fixed-size Eigen array with lane loops.
template <class C, Index L>
struct LaneOps {
#if MOEBAL_HAS_SHUFFLEVECTOR
  typedef C Block __attribute__((vector_size(sizeof(C) * L)));
  static MOEBAL_ALWAYS_INLINE Block load(const C* p) {
    Block b;
    std::memcpy(&b, p, sizeof b);
    return b;
  }
  static MOEBAL_ALWAYS_INLINE Block splat(C v) { return Block{} + v; }
  static MOEBAL_ALWAYS_INLINE Block max(Block a, Block b) { return a > b ? a : b; }
  static MOEBAL_ALWAYS_INLINE Block min(Block a, Block b) { return a < b ? a : b; }
  /// v_l where v_l < bound_l, else -Inf.
  static MOEBAL_ALWAYS_INLINE Block below(Block v, Block bound) {
    return v < bound ? v : splat(-std::numeric_limits<C>::infinity());
  }
  /// The largest lane (exact: a butterfly of lane maxima).
  static MOEBAL_ALWAYS_INLINE C largest(Block v) {
    return largest_step<int(L) / 2>(v)[0];
  }
  template <int S>
  static MOEBAL_ALWAYS_INLINE Block largest_step(Block v) {
    if constexpr (S >= 1) {
      return largest_step<S / 2>(max(v, xor_lanes<S>(v, std::make_integer_sequence<int, int(L)>{})));
    } else {
      return v;
    }
  }
  /// out_l = v_(l ^ S), one register shuffle.
  template <int S, int... I>
  static MOEBAL_ALWAYS_INLINE Block xor_lanes(Block v, std::integer_sequence<int, I...>) {
    return __builtin_shufflevector(v, v, (I ^ S)...);
  }
#else
  using Block = Eigen::Array<C, L, 1>;
  static Block load(const C* p) { return Eigen::Map<const Block>(p); }
  static Block splat(C v) { return Block::Constant(v); }
  static Block max(const Block& a, const Block& b) { return a.max(b); }
  static Block min(const Block& a, const Block& b) { return a.min(b); }
  static Block below(const Block& v, const Block& bound) {
    Block out;
    for (Index l = 0; l < L; ++l) {
      out[l] = v[l] < bound[l] ? v[l] : -std::numeric_limits<C>::infinity();
    }
    return out;
  }
  static C largest(const Block& v) {
    C m = v[0];
    for (Index l = 1; l < L; ++l) m = v[l] > m ? v[l] : m;
    return m;
  }
  template <int S, int... I>
  static Block xor_lanes(const Block& v, std::integer_sequence<int, I...>) {
    Block out;
    for (Index l = 0; l < L; ++l) out[l] = v[l ^ S];
    return out;
  }
#endif
};

/// The lane lists of the threshold method: each of kTopkLanes lanes keeps its K largest
/// values (sorted, with multiplicity) through a min/max insertion network (vector operations
/// only, no branch). K is a compile-time power of two >= k, so the lists live in registers
/// when K is small. Values are inserted a block of kTopkLanes at a time, in any order.
template <Index K, class C>
struct LaneTopk {
  static_assert(K >= 1 && (K & (K - 1)) == 0, "the lane lists' depth is a power of two");
  static constexpr Index kLanes = kTopkLanes<C>;
  using Ops = LaneOps<C, kLanes>;
  using Block = typename Ops::Block;
  static constexpr C lowest = -std::numeric_limits<C>::infinity();

  MOEBAL_ALWAYS_INLINE LaneTopk() {
    for (Index r = 0; r < K; ++r) best[r] = Ops::splat(lowest);
  }

  /// Inserts a block into full lists (`insert` with depth K).
  MOEBAL_ALWAYS_INLINE void insert_full(Block v) {
    for (Index r = 0; r < K; ++r) {
      const Block higher = Ops::max(best[r], v);
      v = Ops::min(best[r], v);
      best[r] = higher;
    }
  }

  /// Inserts a block into the lists, of which only the first `depth` levels hold values yet
  /// (the others are -Inf): the b-th block inserted reaches at most level b, so a row of few
  /// blocks per lane (N = 64 in 16 lanes: 4) skips the deeper levels of the network.
  MOEBAL_ALWAYS_INLINE void insert(Block v, Index depth = K) {
    for (Index r = 0; r < K; ++r) {
      if (r == depth) {
        best[r] = v;
        return;
      }
      const Block higher = Ops::max(best[r], v);
      v = Ops::min(best[r], v);
      best[r] = higher;
    }
  }

  /// The K largest values of all lanes, sorted, with multiplicity, into out[0..K): the lanes'
  /// lists are merged pairwise by a bitonic merge (m_i = max(a_i, b_(K-1-i)) holds the K
  /// largest of two sorted lists as a bitonic sequence, which log2(K) compare-exchange stages
  /// sort), log2(kLanes) times. With vector types, each step merges the low half of the lanes
  /// with the high half into a vector of half the width (cheaper operations as it narrows);
  /// otherwise lane l is merged with lane l ^ s at full width.
  MOEBAL_ALWAYS_INLINE void merged(C* out) const {
#if MOEBAL_HAS_SHUFFLEVECTOR
    merge_halves<int(kLanes)>(best, out);
#else
    Block lists[K];
    for (Index i = 0; i < K; ++i) lists[i] = best[i];
    merge_step<int(kLanes) / 2>(lists);
    for (Index i = 0; i < K; ++i) out[i] = lists[i][0];
#endif
  }

  /// The largest value of all lanes (top) and the K-th largest counted with multiplicity
  /// (tau): as `merged`, except that the last merge, whose K values hold the K largest as a
  /// bitonic sequence, takes their maximum and minimum instead of sorting them (for k == K,
  /// where the order of the others is never read).
  MOEBAL_ALWAYS_INLINE void extremes_of_merged(C& top, C& tau) const {
#if MOEBAL_HAS_SHUFFLEVECTOR
    merge_halves<int(kLanes), true>(best, &top, &tau);
#else
    C out[K];
    merged(out);
    top = out[0];
    tau = out[K - 1];
#endif
  }

  /// Sorts the bitonic lists m[0..K) (elementwise over lanes) into decreasing order.
  template <class V>
  MOEBAL_ALWAYS_INLINE static void bitonic_sort(V (&m)[K]) {
    for (Index stride = K / 2; stride >= 1; stride /= 2) {
      for (Index i = 0; i < K; ++i) {
        if ((i & stride) != 0) continue;
        const V a = m[i], b = m[i + stride];
        m[i] = a > b ? a : b;
        m[i + stride] = a < b ? a : b;
      }
    }
  }

#if MOEBAL_HAS_SHUFFLEVECTOR
  template <int L>
  struct VectorOf {
    typedef C type __attribute__((vector_size(sizeof(C) * L)));
  };

  /// Lanes [Offset, Offset + H) of v as a vector of H lanes.
  template <int Offset, class V, int... I>
  MOEBAL_ALWAYS_INLINE static auto lanes_of(V v, std::integer_sequence<int, I...>) {
    return __builtin_shufflevector(v, v, (Offset + I)...);
  }

  /// Extremes: out is the maximum and tau_out the minimum of the last merge (see
  /// `extremes_of_merged`); otherwise out[0..K) the sorted values.
  template <int L, bool Extremes = false>
  MOEBAL_ALWAYS_INLINE static void merge_halves(const typename VectorOf<L>::type (&lists)[K],
                                                C* out, C* tau_out = nullptr) {
    if constexpr (L == 2) {
      C m[K];
      for (Index i = 0; i < K; ++i) {
        const C a = lists[i][0], b = lists[K - 1 - i][1];
        m[i] = a > b ? a : b;
      }
      if constexpr (Extremes) {
        C high = m[0], low = m[0];
        for (Index i = 1; i < K; ++i) {
          high = m[i] > high ? m[i] : high;
          low = m[i] < low ? m[i] : low;
        }
        *out = high;
        *tau_out = low;
      } else {
        bitonic_sort(m);
        for (Index i = 0; i < K; ++i) out[i] = m[i];
      }
    } else {
      constexpr int H = L / 2;
      using Half = typename VectorOf<H>::type;
      Half m[K];
      for (Index i = 0; i < K; ++i) {
        const Half a = lanes_of<0>(lists[i], std::make_integer_sequence<int, H>{});
        const Half b = lanes_of<H>(lists[K - 1 - i], std::make_integer_sequence<int, H>{});
        m[i] = a > b ? a : b;
      }
      bitonic_sort(m);
      merge_halves<H, Extremes>(m, out, tau_out);
    }
  }
#else
  template <int S>
  MOEBAL_ALWAYS_INLINE static void merge_step(Block (&lists)[K]) {
    if constexpr (S >= 1) {
      Block m[K];
      for (Index i = 0; i < K; ++i) {
        m[i] = Ops::max(lists[i], Ops::template xor_lanes<S>(
                                      lists[K - 1 - i],
                                      std::make_integer_sequence<int, int(kLanes)>{}));
      }
      for (Index stride = K / 2; stride >= 1; stride /= 2) {
        for (Index i = 0; i < K; ++i) {
          if ((i & stride) != 0) continue;
          const Block high = Ops::max(m[i], m[i + stride]);
          m[i + stride] = Ops::min(m[i], m[i + stride]);
          m[i] = high;
        }
      }
      for (Index i = 0; i < K; ++i) lists[i] = m[i];
      merge_step<S / 2>(lists);
    }
  }
#endif

  Block best[K];
};

/// The threshold method's search, keeping the K largest values of q[0..n) sorted (with
/// multiplicity; -Inf past n) in sorted[0..K).
template <Index K, class C>
MOEBAL_ALWAYS_INLINE void topk_sorted_values(const C* q, Index n, C (&sorted)[K]) {
  using Lists = LaneTopk<K, C>;
  using Ops = typename Lists::Ops;
  constexpr Index lanes = Lists::kLanes;
  Lists lists;
  Index j = 0;
  Index depth = 0;  // levels of the lists that hold values
  for (; j + lanes <= n; j += lanes) {
    lists.insert(Ops::load(q + j), depth);
    depth += depth < K ? 1 : 0;
  }
  if (j < n) {
    C tail[lanes];
    for (Index l = 0; l < lanes; ++l) tail[l] = j + l < n ? q[j + l] : Lists::lowest;
    lists.insert(Ops::load(tail), depth);
  }
  lists.merged(sorted);
}

/// The threshold method's search: writes tau, the k-th largest value of q[0..n) counted with
/// multiplicity (k <= K), and top, the largest. No verification (see `topk_threshold`).
template <Index K, class C>
MOEBAL_ALWAYS_INLINE void topk_threshold_search(const C* q, Index n, Index k, C& tau, C& top) {
  C sorted[K];
  topk_sorted_values<K>(q, n, sorted);
  top = sorted[0];
  tau = sorted[k - 1];
}

#if MOEBAL_HAS_SHUFFLEVECTOR
/// Vector lanes for `topk_row`'s verification and index search: one register of C and the
/// integers of C's width that its comparisons give (-1 true, 0 false).
template <class C>
struct IndexLanes {
  static constexpr int kLanes = static_cast<int>(kTopkLanes<C>);
  using Int = std::conditional_t<sizeof(C) == 4, std::int32_t, std::int64_t>;
  typedef C V __attribute__((vector_size(sizeof(C) * kLanes)));
  typedef Int I __attribute__((vector_size(sizeof(C) * kLanes)));
  static MOEBAL_ALWAYS_INLINE V load(const C* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static MOEBAL_ALWAYS_INLINE I iota() {
    I v;
    for (int l = 0; l < kLanes; ++l) v[l] = static_cast<Int>(l);
    return v;
  }
  static MOEBAL_ALWAYS_INLINE Int sum(I v) {
    Int total = 0;
    for (int l = 0; l < kLanes; ++l) total += v[l];
    return total;
  }
  static MOEBAL_ALWAYS_INLINE Int min(I v) {
    Int m = v[0];
    for (int l = 1; l < kLanes; ++l) m = v[l] < m ? v[l] : m;
    return m;
  }
};
#endif

/// The threshold method with its verification: see `topk_threshold`.
template <Index K, class C>
bool topk_threshold_fixed(const C* q, Index n, Index k, C& tau, C& top) {
  topk_threshold_search<K>(q, n, k, tau, top);
  Index selected = 0, at_top = 0;
  for (Index i = 0; i < n; ++i) {
    selected += q[i] >= tau ? 1 : 0;
    at_top += q[i] == top ? 1 : 0;
  }
  return selected == k && at_top == 1;
}

/// Calls f(std::integral_constant<Index, K>{}) with the lane-list depth K used for k
/// (k <= kThresholdTopkMaxK): 1, 2, 4, 8 or 16.
template <class F>
decltype(auto) with_topk_depth(Index k, F&& f) {
  switch (k) {
    case 1:
      return f(std::integral_constant<Index, 1>{});
    case 2:
      return f(std::integral_constant<Index, 2>{});
    case 3:
    case 4:
      return f(std::integral_constant<Index, 4>{});
    case 5:
    case 6:
    case 7:
    case 8:
      return f(std::integral_constant<Index, 8>{});
    default:
      return f(std::integral_constant<Index, kThresholdTopkMaxK>{});
  }
}

/// The threshold method's search, for k <= kThresholdTopkMaxK. Each of 8 lanes keeps its k
/// largest values with a min/max insertion network (vector operations only, no branch), the
/// 8 lane lists are merged into tau, the k-th largest value counted with multiplicity, and
/// `top`, the row maximum. Returns true when the top-k is {j : q_j >= tau} with no tie to
/// break: exactly k values are >= tau and the maximum is unique (so it is the first choice).
/// Returns false when values tie around the top k or at the maximum; the caller then uses the
/// exact method. q must contain no NaN.
template <class C>
bool topk_threshold(const C* q, Index n, Index k, C& tau, C& top) {
  MOEBAL_ASSERT(k >= 1 && k <= n && k <= kThresholdTopkMaxK);
  switch (k) {
    case 1:
      return topk_threshold_fixed<1>(q, n, k, tau, top);
    case 2:
      return topk_threshold_fixed<2>(q, n, k, tau, top);
    case 3:
    case 4:
      return topk_threshold_fixed<4>(q, n, k, tau, top);
    case 5:
    case 6:
    case 7:
    case 8:
      return topk_threshold_fixed<8>(q, n, k, tau, top);
    default:
      return topk_threshold_fixed<kThresholdTopkMaxK>(q, n, k, tau, top);
  }
}

#if MOEBAL_HAS_SHUFFLEVECTOR
/// One step S of `top2_row`'s lane merge (then S / 2, down to 1): each lane's ordered pair
/// (value, index) x 2 merged with lane l ^ S's, ranking by value, then lower index; the
/// validity masks are or-ed the same way.
template <int S, class V, class I, int... Lane>
MOEBAL_ALWAYS_INLINE void top2_merge_lanes(V& best0, I& index0, V& best1, I& index1, I& bad,
                                           I& finite, std::integer_sequence<int, Lane...> lanes) {
  if constexpr (S >= 1) {
    const V b0 = __builtin_shufflevector(best0, best0, (Lane ^ S)...);
    const V b1 = __builtin_shufflevector(best1, best1, (Lane ^ S)...);
    const I j0 = __builtin_shufflevector(index0, index0, (Lane ^ S)...);
    const I j1 = __builtin_shufflevector(index1, index1, (Lane ^ S)...);
    bad |= __builtin_shufflevector(bad, bad, (Lane ^ S)...);
    finite |= __builtin_shufflevector(finite, finite, (Lane ^ S)...);
    const auto before = [](V va, I ia, V vb, I ib) -> I {
      return (va > vb) | ((va == vb) & (ia < ib));
    };
    const I a_first = before(best0, index0, b0, j0);
    // The runner-up: a's second against b's first (a first), or b's second against a's first.
    const I a1_first = before(best1, index1, b0, j0);
    const I b1_first = before(b1, j1, best0, index0);
    const V second_a = a1_first ? best1 : b0, second_b = b1_first ? b1 : best0;
    const I second_ia = a1_first ? index1 : j0, second_ib = b1_first ? j1 : index0;
    const V c1 = a_first ? second_a : second_b;
    const I k1 = a_first ? second_ia : second_ib;
    best0 = a_first ? best0 : b0;
    index0 = a_first ? index0 : j0;
    best1 = c1;
    index1 = k1;
    top2_merge_lanes<S / 2>(best0, index0, best1, index1, bad, finite, lanes);
  }
}
#endif

/// Whether `top2_row` takes rows of n values: whole blocks of its lanes, at least two.
template <class C>
inline bool top2_row_applies(Index n) {
#if MOEBAL_HAS_SHUFFLEVECTOR
  constexpr Index L = IndexLanes<C>::kLanes;
  return n >= 2 * L && n % L == 0;
#else
  (void)n;
  return false;
#endif
}

/// The top 2 of x[0..n) with `topk_row`'s order (decreasing value, equal values by
/// increasing index) in one pass, for `top2_row_applies(n)`, fused with the validity checks of
/// a row of logits: `bad` (a NaN or +Inf anywhere) and `any_finite` (a value above -Inf). The
/// result is defined only without `bad`. Each lane keeps its best two (value, index) pairs:
/// the first two blocks ordered lane by lane, then each block enters with strict comparisons
/// (its indices are higher than every kept one, so an equal value never displaces a kept one);
/// the lanes are then merged by (value, lower index). No verification pass, no tie fallback.
template <class C>
MOEBAL_ALWAYS_INLINE void top2_row(const C* x, Index n, Index* out, bool& bad,
                                   bool& any_finite) {
#if MOEBAL_HAS_SHUFFLEVECTOR
  using Lanes = IndexLanes<C>;
  using V = typename Lanes::V;
  using I = typename Lanes::I;
  using Int = typename Lanes::Int;
  constexpr int L = Lanes::kLanes;
  MOEBAL_ASSERT(top2_row_applies<C>(n));
  constexpr C inf = std::numeric_limits<C>::infinity();
  const I iota = Lanes::iota();
  const V a = Lanes::load(x), b = Lanes::load(x + L);
  I bad_lanes = ~(a < inf) | ~(b < inf);  // NaN or +Inf
  I finite_lanes = (a > -inf) | (b > -inf);
  const I swap = b > a;  // equal: the first block's (lower) index first
  V best0 = swap ? b : a, best1 = swap ? a : b;
  I index0 = swap ? iota + Int(L) : iota, index1 = swap ? iota : iota + Int(L);
  for (Index j = 2 * L; j < n; j += L) {
    const V v = Lanes::load(x + j);
    const I index = iota + static_cast<Int>(j);
    bad_lanes |= ~(v < inf);
    finite_lanes |= v > -inf;
    const I above0 = v > best0, above1 = v > best1;
    best1 = above0 ? best0 : (above1 ? v : best1);
    index1 = above0 ? index0 : (above1 ? index : index1);
    best0 = above0 ? v : best0;
    index0 = above0 ? index : index0;
  }
  // The lanes merged pairwise, lane l with lane l ^ s for s = L/2, ..., 1 (branch-free): two
  // ordered pairs (a0, a1) and (b0, b1) give c0 = the first of a0, b0 and c1 = the first of
  // the other and the winner's second. Every lane then holds the row's top 2.
  top2_merge_lanes<L / 2>(best0, index0, best1, index1, bad_lanes, finite_lanes,
                          std::make_integer_sequence<int, L>());
  bad = bad_lanes[0] != 0;
  any_finite = finite_lanes[0] != 0;
  out[0] = static_cast<Index>(index0[0]);
  out[1] = static_cast<Index>(index1[0]);
#else
  (void)x;
  (void)n;
  (void)out;
  bad = true;
  any_finite = false;
  MOEBAL_ASSERT(false);
#endif
}

/// Writes the top-k indices of q[0..n), ordered as `topk_row_exact` orders them.
template <class C>
void topk_row(const C* q, Index n, Index k, Index* out, TopkScratch<C>& scratch) {
  MOEBAL_ASSERT(k >= 1 && k <= n);
  if (k > kThresholdTopkMaxK) {
    topk_row_exact(q, n, k, out, scratch);
    return;
  }
#if MOEBAL_HAS_SHUFFLEVECTOR
  using Lanes = IndexLanes<C>;
  constexpr Index L = Lanes::kLanes;
  if (n % L == 0) {
    // The k largest values, sorted, from the lane lists; exactly k values >= tau and one equal
    // to the maximum (counted with vector compares) make them the top-k without a tie at the
    // boundary. Each is then found by value: the lowest index holding it (after the previous
    // slot's index when two selected values are equal), as a vector minimum over the row.
    const bool done = with_topk_depth(k, [&](auto depth) {
      constexpr Index K = decltype(depth)::value;
      C sorted[K];
      topk_sorted_values<K>(q, n, sorted);
      const C tau = sorted[k - 1], top = sorted[0];
      typename Lanes::I selected = {}, at_top = {};
      const typename Lanes::I iota = Lanes::iota();
      const typename Lanes::Int none = static_cast<typename Lanes::Int>(n);
      // k distinct values (the common case, tried for k <= 4): once the verification passes
      // each is held by exactly one index, so every slot's search shares the verification's
      // pass; otherwise each slot is searched after it, in slot order.
      bool one_pass = K <= 4;
      for (Index i = 1; i < k && one_pass; ++i) one_pass = sorted[i] != sorted[i - 1];
      constexpr Index kOnePass = K <= 4 ? K : 1;
      typename Lanes::I slot_best[kOnePass];
      for (Index i = 0; i < kOnePass; ++i) slot_best[i] = iota * 0 + none;
      for (Index j = 0; j < n; j += L) {
        const typename Lanes::V v = Lanes::load(q + j);
        selected -= v >= tau;
        at_top -= v == top;
        if constexpr (K <= 4) {
          if (one_pass) {
            const typename Lanes::I index = iota + static_cast<typename Lanes::Int>(j);
            for (Index i = 0; i < K && i < k; ++i) {
              const typename Lanes::I hit = v == sorted[i];
              const typename Lanes::I candidate = (index & hit) | (none & ~hit);
              slot_best[i] = candidate < slot_best[i] ? candidate : slot_best[i];
            }
          }
        }
      }
      if (Lanes::sum(selected) != k || Lanes::sum(at_top) != 1) return false;
      if constexpr (K <= 4) {
        if (one_pass) {
          for (Index i = 0; i < k; ++i) out[i] = static_cast<Index>(Lanes::min(slot_best[i]));
          return true;
        }
      }
      for (Index i = 0; i < k; ++i) {
        const C value = sorted[i];
        const typename Lanes::Int after =
            i > 0 && sorted[i - 1] == value ? static_cast<typename Lanes::Int>(out[i - 1]) : -1;
        typename Lanes::I best = iota * 0 + none;
        for (Index j = 0; j < n; j += L) {
          const typename Lanes::I index = iota + static_cast<typename Lanes::Int>(j);
          const typename Lanes::I hit = (Lanes::load(q + j) == value) & (index > after);
          const typename Lanes::I candidate = (index & hit) | (none & ~hit);
          best = candidate < best ? candidate : best;
        }
        out[i] = static_cast<Index>(Lanes::min(best));
      }
      return true;
    });
    if (!done) topk_row_exact(q, n, k, out, scratch);
    return;
  }
#endif
  C tau = C(0), top = C(0);
  with_topk_depth(k, [&](auto depth) {
    topk_threshold_search<decltype(depth)::value>(q, n, k, tau, top);
  });
  // Verification and collection in one branch-free pass (whether q_j >= tau is
  // unpredictable): each index is written at the next free slot and kept only if selected;
  // past k selected every write goes to the spare slot k. Without a tie exactly k are
  // selected and one equals the maximum.
  Index found[kThresholdTopkMaxK + 1];
  Index filled = 0, at_top = 0;
  for (Index j = 0; j < n; ++j) {
    found[filled < k ? filled : k] = j;
    filled += q[j] >= tau ? 1 : 0;
    at_top += q[j] == top ? 1 : 0;
  }
  if (filled != k || at_top != 1) {
    topk_row_exact(q, n, k, out, scratch);
    return;
  }
  // The k selected values are distinct: sort the k by decreasing value.
  std::copy(found, found + k, out);
  for (Index i = 1; i < k; ++i) {
    const Index index = out[i];
    Index pos = i;
    while (pos > 0 && q[out[pos - 1]] < q[index]) {
      out[pos] = out[pos - 1];
      --pos;
    }
    out[pos] = index;
  }
}

}  // namespace detail
}  // namespace moebal
