// SPDX-License-Identifier: Apache-2.0
#include <algorithm>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include <catch2/catch.hpp>

#include "moebal/core/topk.hpp"
#include "moebal/detail/row_kernels.hpp"

using moebal::Index;
using moebal::IndexMatrix;
using moebal::RowMatrix;

namespace {

// Independent reference: a stable sort of all indices by decreasing score.
template <class T>
std::vector<Index> reference_topk(const RowMatrix<T>& q, Index row, Index k) {
  std::vector<Index> order(static_cast<std::size_t>(q.cols()));
  std::iota(order.begin(), order.end(), Index(0));
  std::stable_sort(order.begin(), order.end(),
                   [&](Index a, Index b) { return q(row, a) > q(row, b); });
  order.resize(static_cast<std::size_t>(k));
  return order;
}

// Every row of topk_indices(q, k) against the reference, slot by slot.
template <class T>
void check_topk_rows(const RowMatrix<T>& q, Index k) {
  const IndexMatrix top = moebal::topk_indices(q, k);
  for (Index t = 0; t < q.rows(); ++t) {
    const std::vector<Index> expected = reference_topk(q, t, k);
    for (Index s = 0; s < k; ++s) {
      INFO("n = " << q.cols() << ", k = " << k << ", row " << t << ", slot " << s);
      CHECK(top(t, s) == expected[static_cast<std::size_t>(s)]);
    }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("topk_indices: ties go to the lower expert index", "[topk]", float, double) {
  using T = TestType;
  RowMatrix<T> q(3, 5);
  q << 1, 3, 3, 2, 3,   // three-way tie for first place
       0, 0, 0, 0, 0,   // all equal
       5, 4, 4, 4, 1;   // tie for the last slot
  const IndexMatrix top = moebal::topk_indices(q, 2);
  CHECK(top(0, 0) == 1);
  CHECK(top(0, 1) == 2);
  CHECK(top(1, 0) == 0);
  CHECK(top(1, 1) == 1);
  CHECK(top(2, 0) == 0);
  CHECK(top(2, 1) == 1);
  const IndexMatrix all = moebal::topk_indices(q, 5);
  CHECK(all.row(0) == (Eigen::Matrix<Index, 1, 5>() << 1, 2, 4, 3, 0).finished());
}

TEMPLATE_TEST_CASE("topk_indices: matches a stable sort for small and large k", "[topk]", float,
                   double) {
  using T = TestType;
  std::mt19937 engine(7);
  std::uniform_int_distribution<int> level(0, 9);  // few distinct values: many ties
  for (const Index n : {1, 5, 16, 40}) {
    RowMatrix<T> q(20, n);
    for (Index i = 0; i < q.size(); ++i) q.data()[i] = T(level(engine));
    // k above 16 exercises the partial-sort path; below, the insertion path.
    for (Index k = 1; k <= n; k += (n > 8 ? 3 : 1)) check_topk_rows(q, k);
  }
}

TEMPLATE_TEST_CASE("topk_indices: distinct values (the threshold path) and exact fallback agree",
                   "[topk]", float, double) {
  using T = TestType;
  std::mt19937 engine(8);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (const Index n : {2, 8, 64, 256}) {
    RowMatrix<T> q(30, n);
    for (Index i = 0; i < q.size(); ++i) q.data()[i] = T(normal(engine));
    q.row(3).setConstant(T(0.5));          // all tied: the exact fallback
    q.row(4).head(n / 2).setConstant(T(2));  // ties at the top
    // Every compile-time lane depth of the threshold method (1, 2, 4, 8, 16) and the exact
    // method above k = 16.
    for (const Index k : {Index(1), Index(2), Index(3), Index(4), Index(5), Index(8), Index(12),
                          Index(16), Index(17), n / 2, n}) {
      if (k < 1 || k > n) continue;
      const IndexMatrix top = moebal::topk_indices(q, k);
      moebal::detail::TopkScratch<T> scratch;
      scratch.resize(n, k);
      std::vector<Index> exact(static_cast<std::size_t>(k));
      for (Index t = 0; t < q.rows(); ++t) {
        const std::vector<Index> expected = reference_topk(q, t, k);
        moebal::detail::topk_row_exact(q.data() + t * n, n, k, exact.data(), scratch);
        for (Index s = 0; s < k; ++s) {
          INFO("n = " << n << ", k = " << k << ", row " << t << ", slot " << s);
          CHECK(top(t, s) == expected[static_cast<std::size_t>(s)]);
          CHECK(exact[static_cast<std::size_t>(s)] == expected[static_cast<std::size_t>(s)]);
        }
      }
    }
  }
}

TEST_CASE("topk_indices: infinities are ordered, column-major input works", "[topk]") {
  const double inf = std::numeric_limits<double>::infinity();
  Eigen::MatrixXd q(1, 4);  // column-major
  q << -inf, 2, inf, 1;
  const IndexMatrix top = moebal::topk_indices(q, 3);
  CHECK(top(0, 0) == 2);
  CHECK(top(0, 1) == 1);
  CHECK(top(0, 2) == 3);
}

TEST_CASE("topk_indices: bad input", "[topk][errors]") {
  RowMatrix<double> q = RowMatrix<double>::Zero(2, 4);
  CHECK_THROWS_WITH(moebal::topk_indices(q, 0),
                    "moebal::topk_indices: argument 'k': expected 1 <= k <= N, the number of "
                    "experts (N = 4), got k = 0");
  CHECK_THROWS_WITH(moebal::topk_indices(q, 5),
                    "moebal::topk_indices: argument 'k': expected 1 <= k <= N, the number of "
                    "experts (N = 4), got k = 5");
  q(1, 3) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(moebal::topk_indices(q, 1),
                    "moebal::topk_indices: argument 'scores': expected no NaN, got NaN at row 1, "
                    "column 3");
  CHECK_THROWS_AS(moebal::topk_indices(RowMatrix<double>(0, 4), 1), moebal::invalid_argument);
}

TEMPLATE_TEST_CASE("topk_indices: equal values inside the top k and -Inf keep the exact order",
                   "[topk]", float, double) {
  // Rows whose k-th value is unique but with equal values above it: the threshold path
  // accepts them (exactly k values >= tau, one maximum) and must still list equal values by
  // increasing index; -Inf entries (disabled experts) are selected only when k needs them.
  using T = TestType;
  constexpr T inf = std::numeric_limits<T>::infinity();
  for (const Index n : {Index(16), Index(64), Index(48), Index(20)}) {
    std::mt19937 engine(static_cast<unsigned>(n));
    std::uniform_int_distribution<Index> column(0, n - 1);
    RowMatrix<T> q = RowMatrix<T>::Constant(40, n, T(-1));
    for (Index t = 0; t < q.rows(); ++t) {
      q(t, column(engine)) = T(9);  // the unique maximum
      for (int r = 0; r < 3; ++r) q(t, column(engine)) = T(4);  // equal values below it
      q(t, column(engine)) = T(2);
      if (t % 4 == 0) q.row(t).tail(n / 2).setConstant(-inf);
    }
    q(1, 0) = -inf;
    for (const Index k : {Index(2), Index(3), Index(4), Index(5), n}) check_topk_rows(q, k);
  }
}

TEMPLATE_TEST_CASE("fused row kernel: tau and the maximum of the scores for every k",
                   "[topk][softmax]", float, double) {
  // raw_scores_topk (the Switch loss's pass 1) against the sorted scores q = raw * inv of the
  // same row from raw_scores_to: tau is the k-th largest (with multiplicity) and top the
  // largest, bitwise, for k below, at and between the lists' depths (1, 2, 4, 8, 16; at the
  // depth the last merge takes the extremes instead of sorting).
  using T = TestType;
  using moebal::ScoreFunction;
  std::mt19937 engine(11);
  std::normal_distribution<double> normal(0.0, 2.0);
  std::uniform_int_distribution<int> level(0, 5);
  for (const Index n : {Index(16), Index(64), Index(96)}) {
    REQUIRE(moebal::detail::fused_row_kernel(n));
    for (int row = 0; row < 40; ++row) {
      std::vector<T> x(static_cast<std::size_t>(n));
      // Rows 0-9 with many equal values (ties inside and around the top k).
      for (auto& v : x) v = row < 10 ? T(level(engine)) : T(normal(engine));
      std::vector<T> raw(x.size()), raw_fused(x.size());
      moebal::detail::RowNorm<T> norm, norm_fused;
      REQUIRE(moebal::detail::raw_scores_to(x.data(), n, ScoreFunction::softmax, raw.data(),
                                            norm));
      std::vector<T> q(x.size());
      for (std::size_t j = 0; j < q.size(); ++j) q[j] = raw[j] * norm.inv;
      std::sort(q.begin(), q.end(), [](T a, T b) { return a > b; });
      for (Index k = 1; k <= 16; ++k) {
        T tau = T(0), top = T(0);
        const bool valid = moebal::detail::with_topk_depth(k, [&](auto depth) {
          return moebal::detail::raw_scores_topk<decltype(depth)::value>(
              x.data(), n, k, ScoreFunction::softmax, raw_fused.data(), norm_fused, tau, top);
        });
        INFO("n = " << n << ", row " << row << ", k = " << k);
        CHECK(valid);
        CHECK(norm_fused.inv == norm.inv);
        CHECK(raw_fused == raw);
        CHECK(top == q[0]);
        CHECK(tau == q[static_cast<std::size_t>(k - 1)]);
      }
    }
  }
}

TEMPLATE_TEST_CASE("two-row kernels: each row bitwise as the one-row kernels compute it",
                   "[topk][scores]", float, double) {
  // raw_scores_rows<2> and raw_scores_topk_rows<K, 2> (the Switch loss's pass 1 takes real rows
  // in pairs) interleave two rows; each row's raw values, normalizer, validity, tau and top
  // must be those of raw_scores_to / raw_scores_topk on that row alone, for row lengths with
  // and without the wide-block tail, both score functions, tied rows and invalid rows (NaN,
  // +Inf, all -Inf) in either position.
  using T = TestType;
  using moebal::ScoreFunction;
  namespace d = moebal::detail;
  constexpr T inf = std::numeric_limits<T>::infinity();
  std::mt19937 engine(12);
  std::normal_distribution<double> normal(0.0, 3.0);
  std::uniform_int_distribution<int> level(0, 3);
  for (const Index n : {Index(5), Index(8), Index(13), Index(24), Index(40), Index(64)}) {
    for (const ScoreFunction score : {ScoreFunction::softmax, ScoreFunction::sigmoid}) {
      for (int trial = 0; trial < 24; ++trial) {
        std::vector<T> x(static_cast<std::size_t>(2 * n));
        for (auto& v : x) v = trial % 4 == 0 ? T(level(engine)) : T(normal(engine));
        if (trial == 5) x[1] = std::numeric_limits<T>::quiet_NaN();
        if (trial == 6) x[static_cast<std::size_t>(n + 2)] = inf;
        if (trial == 7) std::fill(x.begin() + n, x.end(), -inf);
        if (trial == 8) x[0] = -inf;
        const T* rows[2] = {x.data(), x.data() + n};
        std::vector<T> pair_raw(x.size()), one_raw(x.size());
        T* raw[2] = {pair_raw.data(), pair_raw.data() + n};
        d::RowNorm<T> norm[2];
        bool valid[2];
        d::raw_scores_rows<2>(rows, n, score, raw, norm, valid, d::NoBlockHook());
        INFO("n = " << n << ", " << moebal::to_string(score) << ", trial " << trial);
        for (int r = 0; r < 2; ++r) {
          d::RowNorm<T> one;
          const bool ok = d::raw_scores_to(rows[r], n, score, one_raw.data() + r * n, one);
          CHECK(valid[r] == ok);
          if (!ok) continue;
          CHECK(norm[r].inv == one.inv);
          CHECK(norm[r].shift == one.shift);
          CHECK(std::equal(one_raw.begin() + r * n, one_raw.begin() + (r + 1) * n,
                           pair_raw.begin() + r * n));
        }
        CHECK(valid[0] == (trial != 5));
        CHECK(valid[1] == (trial != 6 && !(trial == 7 && score == ScoreFunction::softmax)));
        if (!d::fused_row_kernel(n)) continue;
        for (Index k = 1; k <= std::min<Index>(n, 16); ++k) {
          T tau[2], top[2];
          d::with_topk_depth(k, [&](auto depth) {
            d::raw_scores_topk_rows<decltype(depth)::value, 2>(rows, n, k, score, raw, norm, tau,
                                                               top, valid);
          });
          for (int r = 0; r < 2; ++r) {
            d::RowNorm<T> one;
            T one_tau = T(0), one_top = T(0);
            const bool ok = d::with_topk_depth(k, [&](auto depth) {
              return d::raw_scores_topk<decltype(depth)::value>(
                  rows[r], n, k, score, one_raw.data() + r * n, one, one_tau, one_top);
            });
            INFO("k = " << k << ", row " << r);
            CHECK(valid[r] == ok);
            if (!ok) continue;
            CHECK(norm[r].inv == one.inv);
            CHECK(tau[r] == one_tau);
            CHECK(top[r] == one_top);
            CHECK(std::equal(one_raw.begin() + r * n, one_raw.begin() + (r + 1) * n,
                             pair_raw.begin() + r * n));
          }
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("top2_row: the router's fused top 2 and row validation", "[topk][router]",
                   float, double) {
  using T = TestType;
  constexpr T inf = std::numeric_limits<T>::infinity();
  std::mt19937 engine(91);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_int_distribution<int> pick(0, 9);
  int checked = 0;
  for (const Index n : {Index(4), Index(8), Index(12), Index(16), Index(24), Index(32),
                        Index(64), Index(96), Index(256)}) {
    if (!moebal::detail::top2_row_applies<T>(n)) continue;
    RowMatrix<T> q(400, n);
    for (Index t = 0; t < q.rows(); ++t) {
      for (Index j = 0; j < n; ++j) {
        // Values from a few levels (many ties), -Inf, signed zeros, or normal draws.
        const int kind = pick(engine);
        q(t, j) = kind < 3   ? T(pick(engine) % 3)
                  : kind < 4 ? -inf
                  : kind < 5 ? (pick(engine) % 2 ? T(0) : -T(0))
                             : T(normal(engine));
      }
    }
    // Rows with one finite value, all -Inf, the maximum in the last block, ties everywhere.
    q.row(0).setConstant(-inf);
    q(0, n - 1) = T(-3);
    q.row(1).setConstant(-inf);
    q.row(2).setConstant(T(1));
    q.row(3).setConstant(T(0));
    q(3, n - 1) = T(5);
    q(3, n - 2) = T(5);
    for (Index t = 0; t < q.rows(); ++t) {
      Index out[2] = {-1, -1};
      bool bad = true, any_finite = false;
      moebal::detail::top2_row(q.data() + t * n, n, out, bad, any_finite);
      const std::vector<Index> expected = reference_topk(q, t, 2);
      INFO("n = " << n << ", row " << t);
      CHECK(!bad);
      CHECK(any_finite == (q.row(t).maxCoeff() > -inf));
      CHECK(out[0] == expected[0]);
      CHECK(out[1] == expected[1]);
      ++checked;
    }
    // NaN or +Inf anywhere is flagged.
    for (const Index at : {Index(0), n / 2, n - 1}) {
      for (const T v : {std::numeric_limits<T>::quiet_NaN(), inf}) {
        RowMatrix<T> r = q.row(10);
        r(0, at) = v;
        Index out[2];
        bool bad = false, any_finite = false;
        moebal::detail::top2_row(r.data(), n, out, bad, any_finite);
        CHECK(bad);
      }
    }
  }
  CHECK(checked >= 400 * 6);
}
