// SPDX-License-Identifier: Apache-2.0
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include <catch2/catch.hpp>

#include "moebal/metrics.hpp"

using moebal::BalanceMetrics;
using moebal::CountVector;
using moebal::Index;
using moebal::RowMatrix;
using moebal::ScoreFunction;
using moebal::SpecializationMetrics;

namespace {

using IndexVector = Eigen::Matrix<Index, Eigen::Dynamic, 1>;
using CountTable = Eigen::Matrix<std::int64_t, Eigen::Dynamic, Eigen::Dynamic>;

// Every expected value below is derived by hand in the comments; the tolerance only absorbs
// the rounding of logarithms and square roots.
Approx near(double expected) { return Approx(expected).epsilon(1e-13).margin(1e-14); }

// Entropy (nats) of a distribution given by its probabilities, 0 log 0 = 0.
double entropy(std::initializer_list<double> p) {
  double h = 0.0;
  for (const double x : p) {
    if (x > 0) h -= x * std::log(x);
  }
  return h;
}

void check_balance(const BalanceMetrics& m, const BalanceMetrics& expected) {
  CHECK(m.max_vio == near(expected.max_vio));
  CHECK(m.cv == near(expected.cv));
  CHECK(m.normalized_entropy == near(expected.normalized_entropy));
  CHECK(m.min_share == near(expected.min_share));
  CHECK(m.max_share == near(expected.max_share));
  CHECK(m.empty_experts == expected.empty_experts);
  CHECK(m.num_experts == expected.num_experts);
  CHECK(m.total == expected.total);
}

void check_specialization(const SpecializationMetrics& m, const SpecializationMetrics& expected) {
  CHECK(m.mutual_information == near(expected.mutual_information));
  CHECK(m.normalized_mutual_information ==
        near(expected.normalized_mutual_information));
  CHECK(m.mean_top_expert_share == near(expected.mean_top_expert_share));
}

BalanceMetrics balance(double max_vio, double cv, double entropy, double min_share,
                       double max_share, Index empty, Index n, double total) {
  BalanceMetrics m;
  m.max_vio = max_vio;
  m.cv = cv;
  m.normalized_entropy = entropy;
  m.min_share = min_share;
  m.max_share = max_share;
  m.empty_experts = empty;
  m.num_experts = n;
  m.total = total;
  return m;
}

SpecializationMetrics specialization(double mi, double nmi, double top_share) {
  SpecializationMetrics m;
  m.mutual_information = mi;
  m.normalized_mutual_information = nmi;
  m.mean_top_expert_share = top_share;
  return m;
}

template <class V>
V vec(std::initializer_list<double> values) {
  V v(static_cast<Eigen::Index>(values.size()));
  Eigen::Index i = 0;
  for (const double x : values) v[i++] = static_cast<typename V::Scalar>(x);
  return v;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// balance_metrics

TEMPLATE_TEST_CASE("balance_metrics: hand-derived values", "[metrics][balance]", float, double) {
  using T = TestType;
  using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

  SECTION("perfectly balanced") {
    // c = (2,2,2,2): mean 2, max 2 -> MaxVio 2/2 - 1 = 0; every deviation 0 -> cv 0;
    // p = 1/4 each -> H = log 4 = max -> normalized entropy 1; shares 1/4.
    check_balance(moebal::balance_metrics(vec<Vector>({2, 2, 2, 2})),
                  balance(0, 0, 1, 0.25, 0.25, 0, 4, 8));
  }
  SECTION("one expert takes every token") {
    // c = (4,0,0,0): mean 1 -> MaxVio 4/1 - 1 = 3; variance (3^2 + 1 + 1 + 1)/4 = 3 ->
    // cv sqrt(3)/1; p = (1,0,0,0) -> H = 0; shares 0 and 1; three empty experts.
    check_balance(moebal::balance_metrics(vec<Vector>({4, 0, 0, 0})),
                  balance(3, std::sqrt(3.0), 0, 0, 1, 3, 4, 4));
  }
  SECTION("two experts, 3:1") {
    // c = (3,1): mean 2 -> MaxVio 3/2 - 1 = 0.5; std |3 - 2| = 1 -> cv 1/2;
    // p = (3/4, 1/4) -> H(3/4, 1/4) / log 2 = 0.8112781244591328...
    const double h = -(0.75 * std::log(0.75) + 0.25 * std::log(0.25)) / std::log(2.0);
    CHECK(h == near(0.8112781244591328));
    check_balance(moebal::balance_metrics(vec<Vector>({3, 1})),
                  balance(0.5, 0.5, h, 0.25, 0.75, 0, 2, 4));
  }
  SECTION("real-valued loads") {
    // c = (0.5, 1.5, 0, 2): S = 4, mean 1 -> MaxVio 2 - 1 = 1;
    // variance (0.25 + 0.25 + 1 + 1)/4 = 0.625 -> cv sqrt(0.625);
    // p = (1/8, 3/8, 0, 1/2) -> H / log 4; shares 0 and 1/2.
    const double h = entropy({0.125, 0.375, 0.0, 0.5}) / std::log(4.0);
    check_balance(moebal::balance_metrics(vec<Vector>({0.5, 1.5, 0, 2})),
                  balance(1, std::sqrt(0.625), h, 0, 0.5, 1, 4, 4));
  }
  SECTION("no token at all: every ratio is 0") {
    check_balance(moebal::balance_metrics(vec<Vector>({0, 0, 0})), balance(0, 0, 0, 0, 0, 3, 3, 0));
  }
  SECTION("one expert") {
    // N = 1: the only expert takes everything and is balanced by definition; entropy 1.
    check_balance(moebal::balance_metrics(vec<Vector>({5})), balance(0, 0, 1, 1, 1, 0, 1, 5));
    check_balance(moebal::balance_metrics(vec<Vector>({0})), balance(0, 0, 0, 0, 0, 1, 1, 0));
  }
}

TEST_CASE("balance_metrics: integer counts, row vectors and expressions", "[metrics][balance]") {
  // (3,1) as in the hand-derived case: MaxVio 0.5, cv 0.5, entropy H(3/4,1/4)/log 2.
  const double h = entropy({0.75, 0.25}) / std::log(2.0);
  const BalanceMetrics expected = balance(0.5, 0.5, h, 0.25, 0.75, 0, 2, 4);
  const CountVector counts = (CountVector(2) << 3, 1).finished();
  check_balance(moebal::balance_metrics(counts), expected);
  check_balance(moebal::balance_metrics(counts.transpose()), expected);  // a row vector
  check_balance(moebal::balance_metrics(Eigen::Vector2i(3, 1)), expected);
  check_balance(moebal::balance_metrics(Eigen::RowVector2f(3.0f, 1.0f)), expected);
  // A block of a matrix, and an expression: every ratio is scale-invariant, the total is not.
  Eigen::MatrixXd m(2, 3);
  m << 9, 3, 7, 9, 1, 7;
  check_balance(moebal::balance_metrics(m.col(0)),
                balance(0, 0, 1, 0.5, 0.5, 0, 2, 18));
  check_balance(moebal::balance_metrics(m.col(1)), expected);
  check_balance(moebal::balance_metrics(2.5 * m.col(1)),
                balance(0.5, 0.5, h, 0.25, 0.75, 0, 2, 10));
}

TEST_CASE("balance_metrics: huge loads do not overflow", "[metrics][balance]") {
  // (3e200, 1e200): squares of the deviations (1e400) and the sum of two 1e308 overflow
  // double; the ratios are those of (3, 1) and of (1, 1).
  const double h = entropy({0.75, 0.25}) / std::log(2.0);
  const BalanceMetrics m = moebal::balance_metrics(Eigen::Vector2d(3e200, 1e200));
  CHECK(m.max_vio == near(0.5));
  CHECK(m.cv == near(0.5));
  CHECK(m.normalized_entropy == near(h));
  CHECK(m.total == Approx(4e200));
  const BalanceMetrics big = moebal::balance_metrics(Eigen::Vector2d(1e308, 1e308));
  CHECK(big.max_vio == 0.0);
  CHECK(big.cv == 0.0);
  CHECK(big.normalized_entropy == near(1.0));
  CHECK(big.max_share == 0.5);
}

TEST_CASE("balance_metrics: invalid arguments", "[metrics][balance]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  CHECK_THROWS_AS(moebal::balance_metrics(Eigen::VectorXd(0)), moebal::invalid_argument);
  CHECK_THROWS_WITH(moebal::balance_metrics(Eigen::VectorXd(0)),
                    "moebal::balance_metrics: argument 'counts': expected at least one expert "
                    "(N >= 1), got an empty vector, shape 0 x 1");
  CHECK_THROWS_WITH(moebal::balance_metrics(Eigen::MatrixXd::Ones(2, 3)),
                    "moebal::balance_metrics: argument 'counts': expected a vector (one row or "
                    "one column), got 2 x 3 matrix");
  CHECK_THROWS_WITH(moebal::balance_metrics((CountVector(3) << 1, -2, 3).finished()),
                    "moebal::balance_metrics: argument 'counts': expected finite, non-negative "
                    "loads, got -2 at element 1");
  CHECK_THROWS_WITH(moebal::balance_metrics(Eigen::Vector3d(1, 2, nan)),
                    "moebal::balance_metrics: argument 'counts': expected finite, non-negative "
                    "loads, got nan at element 2");
  CHECK_THROWS_WITH(moebal::balance_metrics(Eigen::Vector3f(float(inf), 2, 3)),
                    "moebal::balance_metrics: argument 'counts': expected finite, non-negative "
                    "loads, got inf at element 0");
  CHECK_THROWS_WITH(moebal::balance_metrics(Eigen::Vector2d(0, -inf)),
                    "moebal::balance_metrics: argument 'counts': expected finite, non-negative "
                    "loads, got -inf at element 1");
}

// ---------------------------------------------------------------------------------------------
// domain_expert_counts

namespace {

// Six tokens, three experts, three domains. Token 4 is padding (NaN logits, label -100).
//   t  logits      domain  top-1                  top-2
//   0  (2, 1, 0)   0       0                      {0, 1}
//   1  (0, 3, 1)   1       1                      {1, 2}
//   2  (1, 1, 0)   0       0 (tie 0/1 -> lower)   {0, 1}
//   3  (0, 2, 2)   1       1 (tie 1/2 -> lower)   {1, 2}
//   4  padding     -100
//   5  (0, 0, 4)   2       2                      {2, 0} (tie 0/1 for the second slot -> 0)
template <class T>
RowMatrix<T> domain_logits() {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  RowMatrix<T> x(6, 3);
  x << 2, 1, 0,
       0, 3, 1,
       1, 1, 0,
       0, 2, 2,
       nan, 0, 0,
       0, 0, 4;
  return x;
}

IndexVector domain_labels() { return (IndexVector(6) << 0, 1, 0, 1, -100, 2).finished(); }

}  // namespace

TEMPLATE_TEST_CASE("domain_expert_counts: hand-derived tables with ties and a mask",
                   "[metrics][specialization]", float, double) {
  using T = TestType;
  const RowMatrix<T> x = domain_logits<T>();
  const IndexVector domains = domain_labels();
  const Eigen::VectorXi mask = (Eigen::VectorXi(6) << 1, 1, 1, 1, 0, 1).finished();
  // k = 1: domain 0 -> expert 0 twice (tokens 0, 2); domain 1 -> expert 1 twice (1, 3);
  // domain 2 -> expert 2 once (5).
  CountTable top1(3, 3);
  top1 << 2, 0, 0,
          0, 2, 0,
          0, 0, 1;
  // k = 2: domain 0: {0,1} twice; domain 1: {1,2} twice; domain 2: {2,0}.
  CountTable top2(3, 3);
  top2 << 2, 2, 0,
          0, 2, 2,
          1, 0, 1;
  // The normalized sigmoid is increasing in each logit and ties where softmax ties, so both
  // score functions select the same experts here.
  for (const ScoreFunction score : {ScoreFunction::softmax, ScoreFunction::sigmoid}) {
    INFO(moebal::to_string(score));
    CHECK(moebal::domain_expert_counts(x, 1, domains, 3, score, mask) == top1);
    CHECK(moebal::domain_expert_counts(x, 2, domains, 3, score, mask) == top2);
  }
  // k = 3 selects every expert: each row is the domain's real token count in every column.
  CountTable all(3, 3);
  all << 2, 2, 2,
         2, 2, 2,
         1, 1, 1;
  CHECK(moebal::domain_expert_counts(x, 3, domains, 3, ScoreFunction::softmax, mask) == all);
  // Extra domains with no token give zero rows.
  const CountTable wide =
      moebal::domain_expert_counts(x, 1, domains, 5, ScoreFunction::softmax, mask);
  REQUIRE(wide.rows() == 5);
  CHECK(wide.topRows(3) == top1);
  CHECK(wide.bottomRows(2).isZero());
  // Column-major logits (converted once) and a boolean mask give the same table.
  const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> column_major = x;
  const Eigen::Matrix<bool, Eigen::Dynamic, 1> bool_mask = mask.cast<bool>();
  CHECK(moebal::domain_expert_counts(column_major, 2, domains, 3, ScoreFunction::softmax,
                                     bool_mask) == top2);
}

TEST_CASE("domain_expert_counts: every row unmasked", "[metrics][specialization]") {
  // The first four tokens of the table above, no mask, default score function (softmax).
  const RowMatrix<double> x = domain_logits<double>().topRows(4);
  const IndexVector domains = domain_labels().head(4);
  CountTable expected(2, 3);
  expected << 2, 0, 0,
              0, 2, 0;
  CHECK(moebal::domain_expert_counts(x, 1, domains, 2) == expected);
}

TEST_CASE("domain_expert_counts feeds specialization_metrics", "[metrics][specialization]") {
  // Top-1 table of the hand-derived case: (2,0,0; 0,2,0; 0,0,1). Each domain uses its own
  // expert, so E determines D: I = H(D) = H(2/5, 2/5, 1/5), normalized 1, top share 1.
  const Eigen::VectorXi mask = (Eigen::VectorXi(6) << 1, 1, 1, 1, 0, 1).finished();
  const CountTable table = moebal::domain_expert_counts(domain_logits<double>(), 1,
                                                        domain_labels(), 3,
                                                        ScoreFunction::softmax, mask);
  const double h_d = entropy({0.4, 0.4, 0.2});
  CHECK(h_d == near(1.0549201679861442));
  check_specialization(moebal::specialization_metrics(table), specialization(h_d, 1, 1));
}

TEST_CASE("domain_expert_counts: invalid arguments", "[metrics][specialization]") {
  const RowMatrix<double> x = domain_logits<double>();
  IndexVector domains = domain_labels();
  const Eigen::VectorXi mask = (Eigen::VectorXi(6) << 1, 1, 1, 1, 0, 1).finished();
  const std::string prefix = "moebal::domain_expert_counts: argument ";
  CHECK_THROWS_AS(moebal::domain_expert_counts(x, 0, domains, 3), moebal::invalid_argument);
  CHECK_THROWS_WITH(moebal::domain_expert_counts(RowMatrix<double>(0, 3), 1, IndexVector(0), 3),
                    prefix + "'logits': expected at least one token row (T >= 1), got an "
                             "empty batch, shape 0 x 3");
  CHECK_THROWS_WITH(moebal::domain_expert_counts(RowMatrix<float>(2, 0), 1, IndexVector(2), 3),
                    prefix + "'logits': expected at least one expert column (N >= 1), got "
                             "shape 2 x 0");
  CHECK_THROWS_WITH(moebal::domain_expert_counts(x, 0, domains, 3, ScoreFunction::softmax, mask),
                    prefix + "'k': expected 1 <= k <= N, the number of experts (N = 3), got "
                             "k = 0");
  CHECK_THROWS_WITH(moebal::domain_expert_counts(x, 4, domains, 3, ScoreFunction::softmax, mask),
                    prefix + "'k': expected 1 <= k <= N, the number of experts (N = 3), got "
                             "k = 4");
  CHECK_THROWS_WITH(moebal::domain_expert_counts(x, 1, domains, 0, ScoreFunction::softmax, mask),
                    prefix + "'num_domains': expected at least 1 domain, got 0");
  CHECK_THROWS_WITH(moebal::domain_expert_counts(x, 1, domains.head(5), 3,
                                                 ScoreFunction::softmax, mask),
                    prefix + "'domains': expected one label per token (length T = 6, "
                             "logits.rows()), got length 5");
  {
    const Eigen::VectorXi short_mask = mask.head(5);
    CHECK_THROWS_WITH(moebal::domain_expert_counts(x, 1, domains, 3, ScoreFunction::softmax,
                                                   short_mask),
                      prefix + "'mask': expected one element per token (length T = 6, "
                               "logits.rows()), got length 5");
    const Eigen::VectorXd nan_mask =
        (Eigen::VectorXd(6) << 1, 1, std::numeric_limits<double>::quiet_NaN(), 1, 0, 1)
            .finished();
    CHECK_THROWS_WITH(moebal::domain_expert_counts(x, 1, domains, 3, ScoreFunction::softmax,
                                                   nan_mask),
                      prefix + "'mask': expected 0 (padding) or nonzero (real token) in every "
                               "element, got NaN at element 2");
  }
  CHECK_THROWS_WITH(moebal::domain_expert_counts(x, 1, domains, 3, static_cast<ScoreFunction>(5),
                                                 mask),
                    prefix + "'score': expected softmax or sigmoid, got 5");
  // Labels: only real tokens' labels are checked. Without the mask, token 4's -100 is read.
  CHECK_THROWS_WITH(moebal::domain_expert_counts(x, 1, domains, 3),
                    prefix + "'domains': expected a label in [0, num_domains) = [0, 3) for "
                             "every real token, got -100 at token 4");
  CHECK_THROWS_WITH(moebal::domain_expert_counts(x, 1, domains, 2, ScoreFunction::softmax, mask),
                    prefix + "'domains': expected a label in [0, num_domains) = [0, 2) for "
                             "every real token, got 2 at token 5");
  // With a valid label and no mask, token 4's NaN logit is read and rejected.
  domains[4] = 0;
  CHECK_THROWS_WITH(moebal::domain_expert_counts(x, 1, domains, 3),
                    prefix + "'logits': expected finite values or -Inf (no NaN, no +Inf), got "
                             "nan at row 4, column 0");
}

// ---------------------------------------------------------------------------------------------
// specialization_metrics

TEMPLATE_TEST_CASE("specialization_metrics: hand-derived values", "[metrics][specialization]",
                   float, double) {
  using T = TestType;
  using Table = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  const double log2 = std::log(2.0);

  SECTION("each domain uses its own expert") {
    // (4,0,0; 0,0,4): p(d) = (1/2,1/2), p(e) = (1/2,0,1/2), p(d,e) = 1/2 on two cells:
    // I = 2 * 1/2 log((1/2) / (1/4)) = log 2 = H(D) = H(E) -> normalized 1; top share 1.
    Table n(2, 3);
    n << 4, 0, 0, 0, 0, 4;
    check_specialization(moebal::specialization_metrics(n), specialization(log2, 1, 1));
  }
  SECTION("each domain uses its own pair of experts") {
    // (2,2,0; 0,0,4): the expert determines the domain, H(D | E) = 0, so
    // I = H(D) = log 2 < H(E) = H(1/4,1/4,1/2) = 1.5 log 2 -> normalized I / min = 1.
    // Top shares 2/4 and 4/4 -> mean 3/4.
    Table n(2, 3);
    n << 2, 2, 0, 0, 0, 4;
    check_specialization(moebal::specialization_metrics(n), specialization(log2, 1, 0.75));
  }
  SECTION("domains independent of experts") {
    // (1,2,3; 2,4,6): rows proportional -> p(d,e) = p(d) p(e) -> I = 0.
    // Top shares 3/6 and 6/12 -> 1/2.
    Table n(2, 3);
    n << 1, 2, 3, 2, 4, 6;
    check_specialization(moebal::specialization_metrics(n), specialization(0, 0, 0.5));
  }
  SECTION("partial specialization") {
    // (3,1; 1,3): uniform marginals, H(D) = H(E) = log 2; given e, d is 3:1, so
    // H(D | E) = H(3/4,1/4) and I = log 2 - H(3/4,1/4); normalized 1 - H(3/4,1/4)/log 2
    // = 1 - 0.8112781... = 0.1887218...; top shares 3/4 and 3/4.
    const double h = entropy({0.75, 0.25});
    Table n(2, 2);
    n << 3, 1, 1, 3;
    check_specialization(moebal::specialization_metrics(n),
                         specialization(log2 - h, 1 - h / log2, 0.75));
    CHECK(1 - h / log2 == near(0.1887218755408672));
  }
  SECTION("a domain with no selection is left out of the top share") {
    // (0,0,0; 1,3,0; 2,0,0): S = 6, p(d) = (0, 2/3, 1/3), p(e) = (1/2, 1/2, 0).
    // Given e = 0 (prob 1/2), d is 1:2 -> H(1/3, 2/3); given e = 1, d = 1 surely.
    // H(D | E) = H(1/3,2/3)/2, so I = H(D) - H(D | E) = H(2/3,1/3)/2, and
    // min(H(D), H(E)) = min(H(2/3,1/3), log 2) = H(2/3,1/3) -> normalized 1/2.
    // Top shares over domains 1 and 2: 3/4 and 1 -> 7/8.
    const double h = entropy({2.0 / 3, 1.0 / 3});
    Table n(3, 3);
    n << 0, 0, 0, 1, 3, 0, 2, 0, 0;
    check_specialization(moebal::specialization_metrics(n), specialization(h / 2, 0.5, 0.875));
  }
  SECTION("one domain, or one expert used: no information, normalized 0") {
    // One domain: H(D) = 0 -> I = 0, normalized 0; top share 2/4.
    Table one_domain(1, 3);
    one_domain << 2, 1, 1;
    check_specialization(moebal::specialization_metrics(one_domain), specialization(0, 0, 0.5));
    // One expert used: H(E) = 0 -> I = 0, normalized 0; every domain's top share 1.
    Table one_expert(2, 2);
    one_expert << 3, 0, 2, 0;
    check_specialization(moebal::specialization_metrics(one_expert), specialization(0, 0, 1));
  }
  SECTION("no selection at all: every metric is 0") {
    check_specialization(moebal::specialization_metrics(Table::Zero(3, 4)),
                         specialization(0, 0, 0));
  }
}

TEST_CASE("specialization_metrics: integer tables, expressions, huge counts",
          "[metrics][specialization]") {
  // (3,1; 1,3) as above, as int64, int, a transposed expression and scaled by 1e300.
  const double h = entropy({0.75, 0.25});
  const double log2 = std::log(2.0);
  const SpecializationMetrics expected = specialization(log2 - h, 1 - h / log2, 0.75);
  CountTable n(2, 2);
  n << 3, 1, 1, 3;
  check_specialization(moebal::specialization_metrics(n), expected);
  check_specialization(moebal::specialization_metrics(n.cast<int>().transpose()), expected);
  const Eigen::MatrixXd huge = 1e300 * n.cast<double>();
  check_specialization(moebal::specialization_metrics(huge), expected);
}

TEST_CASE("specialization_metrics: invalid arguments", "[metrics][specialization]") {
  const std::string prefix = "moebal::specialization_metrics: argument 'table': expected ";
  CHECK_THROWS_AS(moebal::specialization_metrics(Eigen::MatrixXd(0, 3)), moebal::invalid_argument);
  CHECK_THROWS_WITH(moebal::specialization_metrics(Eigen::MatrixXd(0, 3)),
                    prefix + "at least one domain row and one expert column (D >= 1, N >= 1), "
                             "got shape 0 x 3");
  CHECK_THROWS_WITH(moebal::specialization_metrics(CountTable(2, 0)),
                    prefix + "at least one domain row and one expert column (D >= 1, N >= 1), "
                             "got shape 2 x 0");
  CountTable negative(2, 2);
  negative << 1, 2, -1, 0;
  CHECK_THROWS_WITH(moebal::specialization_metrics(negative),
                    prefix + "finite, non-negative counts, got -1 at row 1, column 0");
  Eigen::MatrixXf bad = Eigen::MatrixXf::Ones(2, 3);
  bad(0, 2) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(moebal::specialization_metrics(bad),
                    prefix + "finite, non-negative counts, got nan at row 0, column 2");
  bad(0, 2) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(moebal::specialization_metrics(bad),
                    prefix + "finite, non-negative counts, got inf at row 0, column 2");
}
