// SPDX-License-Identifier: Apache-2.0
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <catch2/catch.hpp>

#include "moebal/core/types.hpp"

using moebal::Index;
using moebal::TokenMask;

TEST_CASE("TokenMask: empty mask means every token is real", "[types][mask]") {
  const TokenMask mask;
  CHECK(mask.empty());
  CHECK(mask.size() == 0);
  CHECK(mask.is_real(0));
  CHECK(mask.is_real(12345));
  CHECK_FALSE(mask.is_nan(3));
}

TEST_CASE("TokenMask: reads bool, integer and floating masks without copying",
          "[types][mask]") {
  SECTION("bool pointer") {
    const bool data[4] = {true, false, false, true};
    const TokenMask mask(data, 4);
    CHECK(mask.size() == 4);
    CHECK(mask.is_real(0));
    CHECK_FALSE(mask.is_real(1));
    CHECK_FALSE(mask.is_real(2));
    CHECK(mask.is_real(3));
  }
  SECTION("int64 attention mask as Hugging Face stores it") {
    const std::vector<std::int64_t> data = {1, 1, 0, 7};
    const TokenMask mask(data.data(), 4);
    CHECK(mask.is_real(0));
    CHECK_FALSE(mask.is_real(2));
    CHECK(mask.is_real(3));  // any nonzero value is a real token
  }
  SECTION("Eigen vectors and the view follows later changes") {
    Eigen::VectorXi v(3);
    v << 0, 1, 0;
    const TokenMask mask(v);
    CHECK_FALSE(mask.is_real(0));
    CHECK(mask.is_real(1));
    v[0] = 1;  // a view, not a copy
    CHECK(mask.is_real(0));
  }
  SECTION("a row of a column-major matrix uses the outer stride") {
    Eigen::MatrixXd m(2, 3);
    m << 1, 0, 1,
         0, 0, 1;
    const TokenMask row0(m.row(0));
    CHECK(row0.size() == 3);
    CHECK(row0.is_real(0));
    CHECK_FALSE(row0.is_real(1));
    CHECK(row0.is_real(2));
    const TokenMask row1(m.row(1));
    CHECK_FALSE(row1.is_real(0));
    CHECK_FALSE(row1.is_real(1));
    CHECK(row1.is_real(2));
    const TokenMask col1(m.col(1));
    CHECK_FALSE(col1.is_real(0));
    CHECK_FALSE(col1.is_real(1));
  }
  SECTION("a column of a row-major matrix uses the outer stride") {
    moebal::RowMatrix<float> m(3, 2);
    m << 1, 0,
         0, 1,
         1, 0;
    const TokenMask col0(m.col(0));
    CHECK(col0.is_real(0));
    CHECK_FALSE(col0.is_real(1));
    CHECK(col0.is_real(2));
  }
  SECTION("NaN is detected in floating-point masks") {
    const double data[3] = {1.0, std::numeric_limits<double>::quiet_NaN(), 0.0};
    const TokenMask mask(data, 3);
    CHECK_FALSE(mask.is_nan(0));
    CHECK(mask.is_nan(1));
    CHECK_FALSE(mask.is_nan(2));
  }
}

TEST_CASE("TokenMask: bad views are rejected with a message", "[types][mask][errors]") {
  const int* null = nullptr;
  CHECK_THROWS_WITH(TokenMask(null, 3),
                    "moebal::TokenMask: argument 'data': expected a non-null pointer, got "
                    "nullptr with size 3");
  const int data[1] = {1};
  CHECK_THROWS_AS(TokenMask(data, -1), moebal::invalid_argument);
  const Eigen::MatrixXi matrix = Eigen::MatrixXi::Ones(2, 2);
  CHECK_THROWS_WITH(TokenMask(matrix),
                    "moebal::TokenMask: argument 'mask': expected a vector (one row or one "
                    "column), got 2 x 2 matrix");
}
