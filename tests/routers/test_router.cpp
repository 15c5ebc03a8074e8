// SPDX-License-Identifier: Apache-2.0
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include <catch2/catch.hpp>

#include "moebal/core/scores.hpp"
#include "moebal/routers/expert_bias.hpp"
#include "moebal/routers/presets.hpp"
#include "moebal/routers/router.hpp"
#include "moebal/testing/gradcheck.hpp"
#include "support/fake_ranks.hpp"
#include "support/matchers.hpp"
#include "support/random.hpp"

using moebal::GroupFill;
using moebal::GroupScore;
using moebal::Index;
using moebal::IndexMatrix;
using moebal::RouterOptions;
using moebal::RouterScore;
using moebal::RouterWeights;
using moebal::RowMatrix;
using moebal_test::IsCloseTo;
using moebal_test::random_logits;

namespace {

// Sum_tk G_tk w_tk with the selection frozen at `indices` (NaN if it changes): the function
// whose gradient route_backward computes.
double weighted_sum(const RowMatrix<double>& z, const IndexMatrix& indices, const RowMatrix<double>& G,
                    const RouterOptions& o) {
  const auto r = moebal::route(z, indices.cols(), o);
  if (r.indices != indices) return std::numeric_limits<double>::quiet_NaN();
  return (r.weights.array() * G.array()).sum();
}

}  // namespace

TEST_CASE("route: every option's gradient matches central differences", "[router][grad]") {
  // Logits spaced so that no selection flips under a 1e-6 step.
  const RowMatrix<double> x = random_logits(7, 8, 1.5, 11);
  const RowMatrix<double> G = random_logits(7, 4, 1.0, 12);
  for (const auto score : {RouterScore::softmax, RouterScore::sigmoid, RouterScore::sqrt_softplus}) {
    for (const auto weights : {RouterWeights::scores, RouterWeights::softmax_of_selected}) {
      for (const bool normalize : {false, true}) {
        for (const Index groups : {Index(1), Index(4)}) {
          for (const bool bias : {false, true}) {
            RouterOptions o;
            o.score = score;
            o.weights = weights;
            o.select_on_logits = weights == RouterWeights::softmax_of_selected;
            o.normalize = normalize;
            o.normalize_epsilon = 1e-20;
            o.scaling_factor = 2.5;
            o.num_groups = groups;
            o.group_topk = groups > 1 ? 2 : 1;
            if (bias) o.expert_bias = Eigen::VectorXd::LinSpaced(8, -0.3, 0.2);
            const auto r = moebal::route(x, 4, o);
            const RowMatrix<double> g = moebal::route_backward(x, r.indices, G, o);
            auto f = [&](const RowMatrix<double>& z) { return weighted_sum(z, r.indices, G, o); };
            const auto report = moebal::testing::gradcheck(f, x, g);
            INFO("score " << int(score) << ", weights " << int(weights) << ", normalize "
                          << normalize << ", G " << groups << ", bias " << bias << ": "
                          << report.message());
            CHECK(report.passed);
          }
        }
      }
    }
  }
}

TEST_CASE("route_backward: repeated indices in a row follow the chain rule", "[router][grad]") {
  // route_backward takes the caller's indices; an expert named in two slots of a row gets the
  // sum of both slots' derivatives. Softmax of the selected logits: u_ti = exp(z_t,e_ti) /
  // sum_l exp(z_t,e_tl) over the k slots, repeated experts included (written out here).
  const RowMatrix<double> x = random_logits(5, 6, 1.0, 31);
  const RowMatrix<double> G = random_logits(5, 3, 1.0, 32);
  IndexMatrix idx(5, 3);
  idx << 0, 0, 1,  //
      2, 5, 2,     //
      3, 3, 3,     //
      4, 1, 0,     //
      5, 4, 5;
  for (const auto weights : {RouterWeights::softmax_of_selected, RouterWeights::scores}) {
    RouterOptions o;
    o.weights = weights;
    o.select_on_logits = weights == RouterWeights::softmax_of_selected;
    auto f = [&](const RowMatrix<double>& z) {
      double sum = 0.0;
      for (Index t = 0; t < z.rows(); ++t) {
        double norm = 0.0;
        for (Index i = 0; i < 3; ++i) norm += std::exp(z(t, idx(t, i)));
        const double all = z.row(t).array().exp().sum();
        for (Index i = 0; i < 3; ++i) {
          const double e = std::exp(z(t, idx(t, i)));
          sum += G(t, i) * (weights == RouterWeights::softmax_of_selected ? e / norm : e / all);
        }
      }
      return sum;
    };
    const RowMatrix<double> g = moebal::route_backward(x, idx, G, o);
    const auto report = moebal::testing::gradcheck(f, x, g);
    INFO("weights " << int(weights) << ": " << report.message());
    CHECK(report.passed);
    // The same through Router<float> (float output rows) and into bfloat16 output rows.
    moebal::Router<float> router(6, 3, o);
    RowMatrix<float> gf(5, 6);
    router.backward(x.cast<float>(), idx, G.cast<float>(), gf);
    CHECK_THAT(moebal_test::as_double(gf), IsCloseTo(g, 1e-6, 1e-5));
    moebal::Router<Eigen::bfloat16> router_bf16(6, 3, o);
    RowMatrix<Eigen::bfloat16> gb(5, 6);
    router_bf16.backward(x.cast<Eigen::bfloat16>(), idx, G.cast<float>(), gb);
    const RowMatrix<float> gbf = x.cast<Eigen::bfloat16>().cast<float>();  // the rounded logits
    moebal::Router<float> router_ref(6, 3, o);
    RowMatrix<float> gref(5, 6);
    router_ref.backward(gbf, idx, G.cast<float>(), gref);
    for (Index t = 0; t < 5; ++t) {
      for (Index j = 0; j < 6; ++j) {
        // One rounding of the float result to bfloat16.
        CHECK(float(gb(t, j)) == float(Eigen::bfloat16(gref(t, j))));
      }
    }
  }
}

TEST_CASE("route: invariants", "[router]") {
  const RowMatrix<double> x = random_logits(50, 16, 2.0, 13);

  SECTION("normalized weights sum to the scaling factor") {
    for (const auto score : {RouterScore::softmax, RouterScore::sigmoid, RouterScore::sqrt_softplus}) {
      RouterOptions o;
      o.score = score;
      o.normalize = true;
      o.scaling_factor = 2.5;
      const auto r = moebal::route(x, 4, o);
      for (Index t = 0; t < 50; ++t) CHECK(r.weights.row(t).sum() == Approx(2.5).epsilon(1e-14));
    }
  }

  SECTION("the bias shifts the selection, never the weights") {
    RouterOptions o;
    o.score = RouterScore::sigmoid;
    const auto plain = moebal::route(x, 2, o);
    o.expert_bias = Eigen::VectorXd::Zero(16);
    o.expert_bias[5] = 10.0;  // expert 5 is always selected first
    const auto biased = moebal::route(x, 2, o);
    const RowMatrix<double> s = 1.0 / (1.0 + (-x.array()).exp());
    for (Index t = 0; t < 50; ++t) {
      CHECK(biased.indices(t, 0) == 5);
      CHECK(biased.weights(t, 0) == Approx(s(t, 5)).epsilon(1e-14));  // unbiased score
      CHECK(biased.weights(t, 1) == Approx(s(t, biased.indices(t, 1))).epsilon(1e-14));
    }
    CHECK(plain.indices != biased.indices);
  }

  SECTION("group-limited routing with one group equals plain top-k") {
    RouterOptions o;
    const auto plain = moebal::route(x, 4, o);
    o.num_groups = 1;
    o.group_topk = 1;
    CHECK(moebal::route(x, 4, o).indices == plain.indices);
    // Keeping every group is plain top-k too.
    o.num_groups = 4;
    o.group_topk = 4;
    CHECK(moebal::route(x, 4, o).indices == plain.indices);
  }

  SECTION("group-limited routing selects only inside the kept groups") {
    RouterOptions o;
    o.num_groups = 4;
    o.group_topk = 2;
    o.group_score = GroupScore::max;
    const auto r = moebal::route(x, 4, o);
    const RowMatrix<double> s = moebal::softmax(x);
    for (Index t = 0; t < 50; ++t) {
      // The two groups with the largest maxima (ties to the lower group).
      Eigen::VectorXd best(4);
      for (Index g = 0; g < 4; ++g) best[g] = s.row(t).segment(g * 4, 4).maxCoeff();
      Index g1 = 0;
      for (Index g = 1; g < 4; ++g) if (best[g] > best[g1]) g1 = g;
      Index g2 = g1 == 0 ? 1 : 0;
      for (Index g = 0; g < 4; ++g) if (g != g1 && best[g] > best[g2]) g2 = g;
      for (Index i = 0; i < 4; ++i) {
        const Index group = r.indices(t, i) / 4;
        CHECK((group == g1 || group == g2));
      }
    }
  }

  SECTION("zero fill lets a dropped group's expert outrank a kept one's negative value") {
    // One token, 4 experts in 2 groups, sigmoid scores with a bias making group 1's values
    // negative: with -Inf fill the dropped group is never chosen; with 0 fill it can be.
    RowMatrix<double> y(1, 4);
    y << 0.0, -1.0, 3.0, -3.0;
    RouterOptions o;
    o.score = RouterScore::sigmoid;
    o.num_groups = 2;
    o.group_topk = 1;
    o.group_score = GroupScore::max;
    o.expert_bias = (Eigen::VectorXd(4) << 0.0, 0.0, -1.0, -1.0).finished();
    // Values: sigmoid(0) = .5, sigmoid(-1) = .27, sigmoid(3) - 1 = -.05, sigmoid(-3) - 1 = -.95:
    // group 0 (max .5) is kept; group 1 is dropped.
    const auto neg = moebal::route(y, 2, o);
    CHECK(neg.indices(0, 0) == 0);
    CHECK(neg.indices(0, 1) == 1);
    o.group_fill = GroupFill::zero;
    o.expert_bias = (Eigen::VectorXd(4) << 0.0, -0.5, -1.0, -1.0).finished();
    // Now expert 1's value is .27 - .5 < 0 = the fill of experts 2 and 3: expert 2 (lower
    // index among the zeros) outranks it.
    const auto zero = moebal::route(y, 2, o);
    CHECK(zero.indices(0, 0) == 0);
    CHECK(zero.indices(0, 1) == 2);
  }

  SECTION("softmax of the selected logits") {
    RouterOptions o;
    o.weights = RouterWeights::softmax_of_selected;
    o.select_on_logits = true;
    const auto r = moebal::route(x, 3, o);
    for (Index t = 0; t < 50; ++t) {
      double sum = 0.0;
      for (Index i = 0; i < 3; ++i) sum += std::exp(x(t, r.indices(t, i)));
      CHECK(r.weights(t, 0) == Approx(std::exp(x(t, r.indices(t, 0))) / sum).epsilon(1e-13));
      CHECK(r.weights.row(t).sum() == Approx(1.0).epsilon(1e-14));
    }
  }
}

TEST_CASE("Router: object form, float, accumulate", "[router][api]") {
  const RowMatrix<double> x = random_logits(30, 8, 1.0, 14);
  const RowMatrix<double> G = random_logits(30, 2, 1.0, 15);
  RouterOptions o;
  o.normalize = true;
  moebal::Router<double> router(8, 2, o);
  IndexMatrix idx(30, 2);
  RowMatrix<double> w(30, 2), g = RowMatrix<double>::Ones(30, 8);
  router.forward(x, idx, w);
  const auto r = moebal::route(x, 2, o);
  CHECK(idx == r.indices);
  CHECK(w == r.weights);
  router.backward_accumulate(x, idx, G, g, 2.0);
  const RowMatrix<double> expected = RowMatrix<double>::Ones(30, 8) + 2.0 * moebal::route_backward(x, idx, G, o);
  CHECK_THAT(g, IsCloseTo(expected, 1e-15, 1e-13));
  const RowMatrix<float> xf = x.cast<float>();
  const auto rf = moebal::route(xf, 2, o);
  CHECK(rf.indices == r.indices);
  CHECK_THAT(moebal_test::as_double(rf.weights), IsCloseTo(r.weights, 1e-6, 1e-5));
}

TEST_CASE("Router: bad input", "[router][errors]") {
  const RowMatrix<double> x = RowMatrix<double>::Zero(3, 8);
  RouterOptions o;
  o.num_groups = 3;
  CHECK_THROWS_WITH(moebal::route(x, 2, o),
                    "moebal::route: argument 'options.num_groups': expected a number of groups G "
                    ">= 1 dividing N = 8, got G = 3");
  o.num_groups = 4;
  o.group_topk = 5;
  CHECK_THROWS_WITH(moebal::route(x, 2, o),
                    "moebal::route: argument 'options.group_topk': expected 1 <= g <= G = 4, got "
                    "g = 5");
  o.group_topk = 1;
  CHECK_THROWS_WITH(moebal::route(x, 3, o),
                    "moebal::route: argument 'k': expected k <= the experts in the kept groups (g "
                    "N / G = 2), got k = 3");
  o = RouterOptions{};
  o.expert_bias = Eigen::VectorXd::Zero(7);
  CHECK_THROWS_WITH(moebal::route(x, 2, o),
                    "moebal::route: argument 'options.expert_bias': expected one bias per expert "
                    "(length N = 8), got length 7");
  o = RouterOptions{};
  o.weights = RouterWeights::softmax_of_selected;
  CHECK_THROWS_AS(moebal::route(x, 1, o), moebal::invalid_argument);
  RowMatrix<double> bad = x;
  bad(1, 1) = std::nan("");
  o = RouterOptions{};
  o.score = RouterScore::sigmoid;
  CHECK_THROWS_WITH(moebal::route(bad, 2, o),
                    "moebal::route: argument 'logits': expected finite values or -Inf (no NaN, no "
                    "+Inf), got nan at row 1, column 1");
  const IndexMatrix wrong = IndexMatrix::Constant(3, 2, 9);
  CHECK_THROWS_WITH(moebal::route_backward(x, wrong, RowMatrix<double>::Zero(3, 2)),
                    "moebal::route_backward: argument 'indices': expected expert indices in [0, "
                    "8), got 9 at row 0, slot 0");
}

TEST_CASE("ExpertBiasBalancer: sign update from the step's counts", "[router][bias]") {
  moebal::ExpertBiasBalancer balancer(4, 0.01);
  balancer.add_counts((Eigen::VectorXd(4) << 10, 2, 4, 0).finished());
  IndexMatrix selections(2, 2);
  selections << 0, 1, 0, 3;
  balancer.add_selections(selections);
  // Counts (12, 3, 4, 1), mean 5: expert 0 overloaded (-rate), 1, 2, 3 underloaded (+rate).
  Eigen::VectorXd bias = Eigen::VectorXd::Zero(4);
  balancer.update(bias);
  CHECK(bias == (Eigen::VectorXd(4) << -0.01, 0.01, 0.01, 0.01).finished());
  CHECK(balancer.counts().isZero());
  // Equal counts: sign(0) = 0, the bias does not move.
  balancer.add_counts(Eigen::VectorXd::Constant(4, 3.0));
  balancer.update(bias);
  CHECK(bias == (Eigen::VectorXd(4) << -0.01, 0.01, 0.01, 0.01).finished());
  CHECK_THROWS_WITH(balancer.add_counts(Eigen::VectorXd::Zero(3)),
                    "moebal::ExpertBiasBalancer::add_counts: argument 'counts': expected one count "
                    "per expert (length N = 4), got length 3");
  Eigen::VectorXd short_bias = Eigen::VectorXd::Zero(2);
  CHECK_THROWS_WITH(balancer.update(short_bias),
                    "moebal::ExpertBiasBalancer::update: argument 'bias': expected one bias per "
                    "expert (length N = 4), got length 2");
}

TEST_CASE("ExpertBiasBalancer: counts summed across ranks", "[router][bias]") {
  // Rank 0 loads expert 0, rank 1 expert 3: summed (5, 1, 1, 5), mean 3: experts 0 and 3 get
  // -rate, 1 and 2 +rate, on both ranks (which alone would disagree).
  moebal_test::FakeWorld world(2);
  std::vector<Eigen::VectorXd> biases(2, Eigen::VectorXd::Zero(4));
  const auto errors = world.run([&](int r, moebal_test::FakeWorld::Sync sync) {
    moebal::ExpertBiasBalancer balancer(4, 0.5);
    balancer.add_counts(r == 0 ? (Eigen::VectorXd(4) << 5, 1, 0, 0).finished()
                               : (Eigen::VectorXd(4) << 0, 0, 1, 5).finished());
    balancer.update(biases[std::size_t(r)], sync);
  });
  for (int r = 0; r < 2; ++r) {
    CHECK(errors[std::size_t(r)].empty());
    CHECK(biases[std::size_t(r)] == (Eigen::VectorXd(4) << -0.5, 0.5, 0.5, -0.5).finished());
  }
}

namespace {

template <class S>
bool same_bits(const RowMatrix<S>& a, const RowMatrix<S>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(S) * std::size_t(a.size())) == 0;
}

// The selected-logits path (selection on the logits without a bias or groups, softmax of the
// selected logits, k <= 16) against the generic path, forced by a zero bias (x + 0 selects as x):
// indices, weights, backward and backward_accumulate, bit for bit.
template <class S>
void check_selected_logits_path(Index tokens, Index experts, Index k, const RouterOptions& o,
                                unsigned seed) {
  RowMatrix<S> x = (random_logits(tokens, experts, 2.0, seed) * 3.0).cast<S>();
  // Ties inside and around the top k, -Inf logits, a row with one finite logit among -Inf.
  for (Index j = 0; j < experts; j += 3) x(1, j) = S(1.25);
  for (Index j = 1; j < experts; j += 2) x(2, j) = -std::numeric_limits<S>::infinity();
  for (Index j = 1; j < experts; ++j) x(3, j) = -std::numeric_limits<S>::infinity();
  x(3, 0) = S(-0.5);
  RouterOptions generic = o;
  generic.expert_bias = Eigen::VectorXd::Zero(experts);
  moebal::Router<S> fast(experts, k, o), slow(experts, k, generic);
  IndexMatrix fi(tokens, k), si(tokens, k);
  RowMatrix<S> fw(tokens, k), sw(tokens, k);
  fast.forward(x, fi, fw);
  slow.forward(x, si, sw);
  CHECK(fi == si);
  CHECK(same_bits(fw, sw));
  // Backward with the forward's indices, and with a caller's indices naming an expert twice.
  IndexMatrix repeated = fi;
  for (Index t = 0; t < tokens; t += 2) repeated(t, k - 1) = repeated(t, 0);
  const RowMatrix<S> G = random_logits(tokens, k, 1.0, seed + 1).cast<S>();
  for (const IndexMatrix* idx : {&fi, &repeated}) {
    RowMatrix<S> fg = RowMatrix<S>::Constant(tokens, experts, S(7)), sg = fg;
    fast.backward(x, *idx, G, fg, S(0.5));
    slow.backward(x, *idx, G, sg, S(0.5));
    CHECK(same_bits(fg, sg));
    RowMatrix<S> fa = random_logits(tokens, experts, 1.0, seed + 2).cast<S>(), sa = fa;
    fast.backward_accumulate(x, *idx, G, fa, S(2));
    slow.backward_accumulate(x, *idx, G, sa, S(2));
    CHECK(same_bits(fa, sa));
    // Every element written: the unselected experts of a row get exactly 0.
    for (Index t = 0; t < tokens; ++t) {
      for (Index j = 0; j < experts; ++j) {
        bool selected = false;
        for (Index i = 0; i < k; ++i) selected = selected || (*idx)(t, i) == j;
        if (!selected) CHECK(fg(t, j) == S(0));
      }
    }
  }
}

}  // namespace

TEST_CASE("Router: the selected-logits path gives the generic path's bits", "[router]") {
  for (const Index k : {Index(2), Index(3), Index(8), Index(16)}) {
    for (const Index experts : {Index(16), Index(20), Index(64)}) {
      if (k > experts) continue;
      for (const bool normalize : {false, true}) {
        RouterOptions o = moebal::presets::megatron_softmax(false, 2.5);
        o.normalize = normalize;
        o.normalize_epsilon = 1e-20;
        CAPTURE(k, experts, normalize);
        check_selected_logits_path<float>(37, experts, k, o, unsigned(100 + k + experts));
        check_selected_logits_path<double>(37, experts, k, o, unsigned(200 + k + experts));
        // The sigmoid score: its validation rules, the same weights.
        o.score = RouterScore::sigmoid;
        check_selected_logits_path<float>(37, experts, k, o, unsigned(300 + k + experts));
      }
    }
  }
}

TEST_CASE("Router backward, selected-logits router: reads and checks the selected logits only",
          "[router]") {
  // Its gradient depends on the k selected logits alone (the others get 0, as in autograd):
  // backward validates those, names a NaN or +Inf among them, and ignores the others.
  const RowMatrix<double> x = random_logits(4, 8, 1.5, 31);
  const auto o = moebal::presets::megatron_softmax();
  moebal::Router<double> router(8, 2, o);
  IndexMatrix idx(4, 2);
  RowMatrix<double> w(4, 2);
  router.forward(x, idx, w);
  const RowMatrix<double> G = random_logits(4, 2, 1.0, 32);
  RowMatrix<double> clean(4, 8), g(4, 8);
  router.backward(x, idx, G, clean);
  Index other = 0;
  while (other == idx(1, 0) || other == idx(1, 1)) ++other;
  RowMatrix<double> bad = x;
  bad(1, other) = std::nan("");
  router.backward(bad, idx, G, g);
  CHECK(same_bits(g, clean));
  for (const double v : {std::nan(""), std::numeric_limits<double>::infinity()}) {
    bad = x;
    bad(2, idx(2, 1)) = v;
    CHECK_THROWS_WITH(router.backward(bad, idx, G, g),
                      "moebal::Router::backward: argument 'logits': expected finite values or -Inf "
                      "(no NaN, no +Inf), got " +
                          std::string(std::isnan(v) ? "nan" : "inf") + " at row 2, column " +
                          std::to_string(idx(2, 1)));
  }
  bad = x;
  bad(3, idx(3, 0)) = bad(3, idx(3, 1)) = -std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH(router.backward(bad, idx, G, g),
                    Catch::Contains("only -Inf selected at row 3"));
  // A router that computes the scores over all experts still checks the whole row.
  moebal::Router<double> scores(8, 2, moebal::presets::megatron_softmax(true));
  scores.forward(x, idx, w);
  bad = x;
  bad(1, other) = std::nan("");
  CHECK_THROWS_WITH(scores.backward(bad, idx, G, g), Catch::Contains("got nan at row 1"));
}
