// SPDX-License-Identifier: Apache-2.0
#include <stdexcept>
#include <string>

#include <catch2/catch.hpp>

#include "moebal/core/error.hpp"

TEST_CASE("invalid_argument derives from std::invalid_argument", "[error]") {
  STATIC_REQUIRE(std::is_base_of<std::invalid_argument, moebal::invalid_argument>::value);
  try {
    moebal::detail::throw_invalid("moebal::f", "k", "1 <= k <= 4", "k = 9");
    FAIL("throw_invalid returned");
  } catch (const std::invalid_argument& e) {
    CHECK(std::string(e.what()) == "moebal::f: argument 'k': expected 1 <= k <= 4, got k = 9");
  }
}

TEST_CASE("concat streams numbers with round-trip precision", "[error]") {
  CHECK(moebal::detail::concat("x = ", 0.1) == "x = 0.10000000000000001");
  CHECK(moebal::detail::concat(3, " x ", 4) == "3 x 4");
}
