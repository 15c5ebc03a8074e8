// SPDX-License-Identifier: Apache-2.0
#include <catch2/catch.hpp>

#include "moebal/core/statistics.hpp"

using moebal::RoutingStatistics;

TEST_CASE("RoutingStatistics: one contiguous buffer that adds like numbers", "[statistics]") {
  RoutingStatistics a(3), b(3);
  CHECK(a.num_experts() == 3);
  CHECK(a.size() == 1 + 3 * 3);
  CHECK(a.tokens() == 0.0);
  CHECK(a.counts().isZero());

  a.mutable_tokens() = 2;
  a.mutable_counts() << 1, 3, 0;
  a.mutable_first_choice_counts() << 1, 1, 0;
  a.mutable_score_sums() << 0.5, 1.25, 0.25;
  b.mutable_tokens() = 1;
  b.mutable_counts() << 0, 1, 1;
  b.mutable_first_choice_counts() << 0, 0, 1;
  b.mutable_score_sums() << 0.25, 0.25, 0.5;

  // Layout: [T, counts, first-choice counts, score sums].
  CHECK(a.data()[0] == 2.0);
  CHECK(a.data()[1 + 1] == 3.0);
  CHECK(a.data()[1 + 3 + 0] == 1.0);
  CHECK(a.data()[1 + 6 + 1] == 1.25);

  a += b;
  CHECK(a.tokens() == 3.0);
  CHECK(a.counts()[2] == 1.0);
  CHECK(a.first_choice_counts()[2] == 1.0);
  CHECK(a.score_sums()[0] == 0.75);

  a.clear();
  CHECK(a.num_experts() == 3);
  CHECK(a.tokens() == 0.0);
  CHECK(a.score_sums().isZero());
}

TEST_CASE("RoutingStatistics: bad arguments", "[statistics][errors]") {
  CHECK_THROWS_WITH(RoutingStatistics(0),
                    "moebal::RoutingStatistics: argument 'num_experts': expected at least 1, "
                    "got 0");
  RoutingStatistics a(3);
  const RoutingStatistics b(4);
  CHECK_THROWS_WITH(a += b,
                    "moebal::RoutingStatistics::operator+=: argument 'other': expected "
                    "statistics for N = 3 experts, got N = 4");
  const RoutingStatistics empty;
  CHECK(empty.num_experts() == 0);
  CHECK(empty.size() == 0);
  CHECK(empty.tokens() == 0.0);
}
