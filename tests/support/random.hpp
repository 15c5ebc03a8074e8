// SPDX-License-Identifier: Apache-2.0
#pragma once

// Test support: reproducible random logits.

#include <random>

#include "moebal/core/types.hpp"

namespace moebal_test {

/// rows x cols logits, independent normal(0, scale) entries from std::mt19937(seed).
inline moebal::RowMatrix<double> random_logits(moebal::Index rows, moebal::Index cols,
                                               double scale, unsigned seed) {
  std::mt19937 engine(seed);
  std::normal_distribution<double> normal(0.0, scale);
  moebal::RowMatrix<double> x(rows, cols);
  for (moebal::Index i = 0; i < x.size(); ++i) x.data()[i] = normal(engine);
  return x;
}

}  // namespace moebal_test
