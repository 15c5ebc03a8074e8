// SPDX-License-Identifier: Apache-2.0
#include <catch2/catch.hpp>

#include "moebal/tensor.hpp"
#include "support/random.hpp"

using moebal::Index;
using moebal::RowMatrix;

TEST_CASE("tensor adapter: rank 3 row-major is batch-major and read in place", "[tensor]") {
  Eigen::Tensor<float, 3, Eigen::RowMajor> t(3, 4, 6);
  const RowMatrix<double> values = moebal_test::random_logits(12, 6, 1.0, 81);
  for (Index b = 0; b < 3; ++b)
    for (Index s = 0; s < 4; ++s)
      for (Index n = 0; n < 6; ++n) t(b, s, n) = float(values(b * 4 + s, n));
  CHECK(moebal::detail::tensor_as_matrix(t).data() == t.data());  // no copy
  const RowMatrix<float> m = values.cast<float>();
  const auto r = moebal::sequence_aux_loss_tensor(t, 2);
  const auto ref = moebal::sequence_aux_loss(m, 2, moebal::SequenceLayout::batch_major(4));
  CHECK(r.loss == ref.loss);
  REQUIRE(r.grad.dimension(0) == 3);
  REQUIRE(r.grad.dimension(1) == 4);
  REQUIRE(r.grad.dimension(2) == 6);
  for (Index b = 0; b < 3; ++b)
    for (Index s = 0; s < 4; ++s)
      for (Index n = 0; n < 6; ++n) CHECK(r.grad(b, s, n) == ref.grad(b * 4 + s, n));
  const auto sw = moebal::switch_aux_loss_tensor(t, 2);
  CHECK(sw.loss == moebal::switch_aux_loss(m, 2).loss);
}

TEST_CASE("tensor adapter: rank 3 column-major is sequence-major; rank 2 maps", "[tensor]") {
  Eigen::Tensor<double, 3> t(2, 5, 4);  // ColMajor
  const RowMatrix<double> values = moebal_test::random_logits(10, 4, 1.0, 82);
  RowMatrix<double> sequence_major(10, 4);
  for (Index b = 0; b < 2; ++b)
    for (Index s = 0; s < 5; ++s)
      for (Index n = 0; n < 4; ++n) {
        t(b, s, n) = values(b * 5 + s, n);
        sequence_major(s * 2 + b, n) = values(b * 5 + s, n);
      }
  const auto r = moebal::sequence_aux_loss_tensor(t, 1);
  const auto ref = moebal::sequence_aux_loss(sequence_major, 1, moebal::SequenceLayout::sequence_major(5));
  CHECK(r.loss == ref.loss);
  for (Index b = 0; b < 2; ++b)
    for (Index s = 0; s < 5; ++s)
      for (Index n = 0; n < 4; ++n) CHECK(r.grad(b, s, n) == ref.grad(s * 2 + b, n));
  Eigen::TensorMap<Eigen::Tensor<const double, 2, Eigen::RowMajor>> map(values.data(), 10, 4);
  const auto two = moebal::switch_aux_loss_tensor(map, 2);
  CHECK(two.loss == moebal::switch_aux_loss(values, 2).loss);
  CHECK(two.grad.dimension(0) == 10);
}
