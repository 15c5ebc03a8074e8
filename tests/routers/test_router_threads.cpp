// SPDX-License-Identifier: Apache-2.0
// moebal::Router on several threads: indices, weights and both backward forms are bitwise
// identical on 1, 2 and 4 threads for every kind of router option, and the first bad row (a
// NaN logit, an index out of range) is the one reported whatever the thread count.
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "moebal/core/threads.hpp"
#include "moebal/routers/presets.hpp"
#include "moebal/routers/router.hpp"
#include "support/random.hpp"
#include "support/threads.hpp"

using moebal::Index;
using moebal::IndexMatrix;
using moebal::RouterOptions;
using moebal::RouterScore;
using moebal::RouterWeights;
using moebal::RowMatrix;
using moebal_test::kThreadCounts;
using moebal_test::random_logits;
using moebal_test::ThreadScope;
using moebal_test::tied_logits;
namespace presets = moebal::presets;

namespace {

// Three chunks of moebal::detail::kRouterChunkRows rows, the last one partial.
constexpr Index kRows = 1500;
constexpr Index kExperts = 32;

static_assert(kRows > 2 * moebal::detail::kRouterChunkRows &&
                  kRows % moebal::detail::kRouterChunkRows != 0,
              "several chunks, the last one partial");

struct RouterCase {
  const char* name;
  Index k;
  RouterOptions options;
};

std::vector<RouterCase> router_cases() {
  const Eigen::VectorXd bias = random_logits(kExperts, 1, 0.3, 99u).col(0);
  std::vector<RouterCase> cases;
  cases.push_back({"softmax (default options)", 2, RouterOptions{}});
  cases.push_back({"softmax, k = 20 (above the threshold top-k's range)", 20, RouterOptions{}});
  RouterOptions sigmoid;
  sigmoid.score = RouterScore::sigmoid;
  sigmoid.normalize = true;
  sigmoid.normalize_epsilon = 1e-20;
  sigmoid.scaling_factor = 2.5;
  sigmoid.expert_bias = bias;
  cases.push_back({"sigmoid, normalized, scaled, expert bias", 4, sigmoid});
  cases.push_back({"HF DeepSeek-V3 (8 groups, 4 kept, fill 0)", 8,
                   presets::hf_deepseek_v3(8, 4, true, 2.5, bias)});
  cases.push_back({"DeepSeek-V3 official (8 groups, 4 kept, fill -Inf)", 8,
                   presets::deepseek_v3_official(true, 8, 4, 2.5, bias)});
  cases.push_back({"softmax_of_selected (Megatron post-softmax)", 2, presets::megatron_softmax()});
  RouterOptions softplus;
  softplus.score = RouterScore::sqrt_softplus;
  softplus.normalize = true;
  softplus.normalize_epsilon = 1e-6;
  softplus.epsilon_mode = moebal::NormalizeEpsilon::clamp;
  cases.push_back({"sqrt-softplus, normalized with a clamp", 3, softplus});
  return cases;
}

template <class T>
struct RouterRun {
  IndexMatrix indices, one_line_indices;
  RowMatrix<T> weights, one_line_weights, grad, grad_acc, one_line_grad;
};

template <class T>
RouterRun<T> run_router(const RowMatrix<T>& x, const RowMatrix<T>& upstream, Index k,
                        const RouterOptions& options) {
  RouterRun<T> r;
  moebal::Router<T> router(x.cols(), k, options);
  r.indices.resize(x.rows(), k);
  r.weights.resize(x.rows(), k);
  router.forward(x, r.indices, r.weights);
  r.grad.resize(x.rows(), x.cols());
  router.backward(x, r.indices, upstream, r.grad, T(0.75));
  r.grad_acc = RowMatrix<T>::Constant(x.rows(), x.cols(), T(0.5));
  router.backward_accumulate(x, r.indices, upstream, r.grad_acc, T(-2));
  const auto one_line = moebal::route(x, k, options);
  r.one_line_indices = one_line.indices;
  r.one_line_weights = one_line.weights;
  r.one_line_grad = moebal::route_backward(x, one_line.indices, upstream, options);
  return r;
}

template <class T>
void check_same(const RouterRun<T>& a, const RouterRun<T>& b) {
  CHECK(a.indices == b.indices);
  CHECK(a.weights == b.weights);
  CHECK(a.grad == b.grad);
  CHECK(a.grad_acc == b.grad_acc);
  CHECK(a.one_line_indices == b.one_line_indices);
  CHECK(a.one_line_weights == b.one_line_weights);
  CHECK(a.one_line_grad == b.one_line_grad);
}

}  // namespace

TEMPLATE_TEST_CASE("Router threads: bitwise identical on 1, 2 and 4 threads",
                   "[router][threads][determinism]", float, double) {
  using T = TestType;
  const RowMatrix<T> x = tied_logits<T>(kRows, kExperts, 17u);
  for (const RouterCase& c : router_cases()) {
    INFO(c.name << ", k = " << c.k);
    const RowMatrix<T> upstream = random_logits(kRows, c.k, 1.0, 23u).cast<T>();
    RouterRun<T> reference;
    {
      ThreadScope scope(1);
      reference = run_router(x, upstream, c.k, c.options);
    }
    // The reference itself is sane: the one-line and object forms agree, the gradient is used.
    CHECK(reference.one_line_indices == reference.indices);
    CHECK(reference.one_line_weights == reference.weights);
    CHECK(reference.grad.cwiseAbs().maxCoeff() > T(0));
    for (const int threads : kThreadCounts) {
      INFO("threads = " << threads);
      ThreadScope scope(threads);
      check_same(run_router(x, upstream, c.k, c.options), reference);
    }
  }
}

TEST_CASE("Router threads: one object reused across thread counts",
          "[router][threads][determinism]") {
  const RowMatrix<float> x = tied_logits<float>(kRows, kExperts, 5u);
  const RowMatrix<float> upstream = RowMatrix<float>::Ones(kRows, 8);
  const Eigen::VectorXd bias = Eigen::VectorXd::LinSpaced(kExperts, -0.2, 0.2);
  moebal::Router<float> router(kExperts, 8, presets::hf_deepseek_v3(8, 4, true, 2.5, bias));
  IndexMatrix reference_indices(kRows, 8), indices(kRows, 8);
  RowMatrix<float> reference_weights(kRows, 8), weights(kRows, 8);
  RowMatrix<float> reference_grad(kRows, kExperts), grad(kRows, kExperts);
  {
    ThreadScope scope(1);
    router.forward(x, reference_indices, reference_weights);
    router.backward(x, reference_indices, upstream, reference_grad);
  }
  for (const int threads : {4, 2, 1, 4}) {
    INFO("threads = " << threads);
    ThreadScope scope(threads);
    router.forward(x, indices, weights);
    router.backward(x, indices, upstream, grad);
    CHECK(indices == reference_indices);
    CHECK(weights == reference_weights);
    CHECK(grad == reference_grad);
    // Fewer rows than one chunk: one thread, the same rows.
    router.forward(x.topRows(100), indices.topRows(100), weights.topRows(100));
    CHECK(indices.topRows(100) == reference_indices.topRows(100));
    CHECK(weights.topRows(100) == reference_weights.topRows(100));
  }
}

TEMPLATE_TEST_CASE("Router threads: the first bad row is reported whatever the thread count",
                   "[router][threads][errors]", float, double) {
  using T = TestType;
  const RowMatrix<T> good = tied_logits<T>(kRows, kExperts, 3u);
  RowMatrix<T> x = good;
  x(1300, 9) = std::numeric_limits<T>::quiet_NaN();
  x(700, 3) = std::numeric_limits<T>::quiet_NaN();
  for (const RouterCase& c : router_cases()) {
    INFO(c.name << ", k = " << c.k);
    const RowMatrix<T> upstream = RowMatrix<T>::Ones(kRows, c.k);
    IndexMatrix indices(kRows, c.k);
    RowMatrix<T> weights(kRows, c.k), grad(kRows, kExperts);
    {
      ThreadScope scope(1);
      moebal::Router<T>(kExperts, c.k, c.options).forward(good, indices, weights);
    }
    IndexMatrix bad_indices = indices;
    bad_indices(1300, 0) = kExperts;
    bad_indices(700, 1) = -1;
    for (const int threads : kThreadCounts) {
      INFO("threads = " << threads);
      ThreadScope scope(threads);
      moebal::Router<T> router(kExperts, c.k, c.options);
      IndexMatrix out_indices(kRows, c.k);
      RowMatrix<T> out_weights(kRows, c.k);
      CHECK_THROWS_WITH(router.forward(x, out_indices, out_weights),
                        Catch::StartsWith("moebal::Router::forward:") &&
                            Catch::Contains("nan at row 700, column 3"));
      CHECK_THROWS_WITH(moebal::route(x, c.k, c.options),
                        Catch::StartsWith("moebal::route:") &&
                            Catch::Contains("nan at row 700, column 3"));
      // Backward: NaN at selected experts of rows 1300 and 700 (the selected-logits router
      // reads only those; the others read every logit).
      RowMatrix<T> xb = good;
      xb(1300, indices(1300, 0)) = std::numeric_limits<T>::quiet_NaN();
      xb(700, indices(700, 1)) = std::numeric_limits<T>::quiet_NaN();
      CHECK_THROWS_WITH(router.backward(xb, indices, upstream, grad),
                        Catch::StartsWith("moebal::Router::backward:") &&
                            Catch::Contains("nan at row 700, column " +
                                            std::to_string(indices(700, 1))));
      CHECK_THROWS_WITH(router.backward(good, bad_indices, upstream, grad),
                        Catch::StartsWith("moebal::Router::backward:") &&
                            Catch::Contains("got -1 at row 700, slot 1"));
      CHECK_THROWS_WITH(router.backward_accumulate(good, bad_indices, upstream, grad),
                        Catch::StartsWith("moebal::Router::backward_accumulate:") &&
                            Catch::Contains("got -1 at row 700, slot 1"));
      CHECK_THROWS_WITH(moebal::route_backward(good, bad_indices, upstream, c.options),
                        Catch::StartsWith("moebal::route_backward:") &&
                            Catch::Contains("got -1 at row 700, slot 1"));
      // The object is usable again after a failed call, with the same results.
      router.forward(good, out_indices, out_weights);
      CHECK(out_indices == indices);
      CHECK(out_weights == weights);
    }
  }
}
