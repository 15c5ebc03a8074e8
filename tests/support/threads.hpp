// SPDX-License-Identifier: Apache-2.0
// Helpers of the thread-count tests: a scoped moebal::set_num_threads, the counts every
// threaded test compares, and logits with exact ties so that the slow top-k paths run too.
#pragma once

#include "moebal/core/threads.hpp"
#include "moebal/core/types.hpp"
#include "support/random.hpp"

namespace moebal_test {

// Sets the thread count for a scope and restores OpenMP's default after it.
class ThreadScope {
 public:
  explicit ThreadScope(int threads) { moebal::set_num_threads(threads); }
  ~ThreadScope() { moebal::set_num_threads(0); }
  ThreadScope(const ThreadScope&) = delete;
  ThreadScope& operator=(const ThreadScope&) = delete;
};

inline constexpr int kThreadCounts[] = {1, 2, 4};

// Random logits with exact ties: column 0 copied into the last column every 37th row (a tie
// that may decide the top k), every 101st row constant (all experts tie).
template <class T>
moebal::RowMatrix<T> tied_logits(moebal::Index rows, moebal::Index cols, unsigned seed) {
  moebal::RowMatrix<T> x = random_logits(rows, cols, 1.5, seed).template cast<T>();
  for (moebal::Index t = 0; t < rows; t += 37) x(t, cols - 1) = x(t, 0);
  for (moebal::Index t = 5; t < rows; t += 101) x.row(t).setConstant(T(0.25));
  return x;
}

}  // namespace moebal_test
