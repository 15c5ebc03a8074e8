// SPDX-License-Identifier: Apache-2.0
// Compile-time reproducer (found while writing fuzz_api.cpp): moebal::cv2_load does not
// compile for Eigen::bfloat16 (nor Eigen::half) logits, although its documentation and
// README.md list them. In include/moebal/losses/cv2.hpp, cv2_load's visitor is declared
// `[&](Index, const Scalar*, const Index*)` with Scalar the storage type, but ScoredRows
// passes the rows in the compute type (`const float*`); and `result.grad` is assigned a
// RowMatrix<Scalar> where the result holds RowMatrix<compute_type_t<Scalar>>.
//
//   g++ -std=c++17 -Iinclude -I/usr/include/eigen3 -c tests/fuzz/crashes/cv2_load_bfloat16.cpp
//   -> error: no match for call to '(cv2_load<...>::<lambda(Index, const Scalar*, const Index*)>)
//            (Index&, const ScoredRows<Eigen::bfloat16>::C*, const Index*&)'
//   -> static assertion failed: YOU_MIXED_DIFFERENT_NUMERIC_TYPES...
#include <moebal/moebal.hpp>

int main() {
  moebal::RowMatrix<Eigen::bfloat16> logits(2, 3);
  logits.setConstant(Eigen::bfloat16(0.5f));
  const auto r = moebal::cv2_load(logits, 1);  // expected: compiles, r.loss is a float
  return static_cast<int>(r.tokens);
}
