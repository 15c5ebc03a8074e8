// SPDX-License-Identifier: Apache-2.0
// Determinism and thread safety: the same inputs give bitwise identical outputs on every call
// (fresh or reused objects), seeded noise gives identical routing, and distinct objects (and
// the free functions) used concurrently from several threads give exactly the sequential
// results.
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "moebal/moebal.hpp"
#include "support/random.hpp"

using moebal::Index;
using moebal::RowMatrix;
using moebal_test::random_logits;

namespace {

// Everything one "training step" computes from a batch, in one struct for exact comparison.
struct StepOutputs {
  float switch_value = 0, z_value = 0, combined_value = 0, global_value = 0;
  RowMatrix<float> switch_grad, z_grad, combined_grad, global_grad, weights, router_grad;
  moebal::IndexMatrix indices;

  bool operator==(const StepOutputs& o) const {
    return switch_value == o.switch_value && z_value == o.z_value &&
           combined_value == o.combined_value && global_value == o.global_value &&
           switch_grad == o.switch_grad && z_grad == o.z_grad &&
           combined_grad == o.combined_grad && global_grad == o.global_grad &&
           weights == o.weights && router_grad == o.router_grad && indices == o.indices;
  }
};

// Objects reused across steps (one set per thread: a loss object is not shared).
struct Workspace {
  explicit Workspace(Index n)
      : switch_loss(n, 2),
        combined(n, 2, [] {
          moebal::CombinedOptions o;
          o.weights.z = 1e-3;
          o.weights.cv2_importance = 0.1;
          return o;
        }()),
        global(n, 2),
        router(n, 2, moebal::presets::hf_mixtral()) {}
  moebal::SwitchAuxLoss<float> switch_loss;
  moebal::ZLoss<float> z{1e-3};
  moebal::CombinedAuxLoss<float> combined;
  moebal::GlobalBatchBalance<float> global;
  moebal::Router<float> router;
};

StepOutputs step(Workspace& w, const RowMatrix<float>& x, const RowMatrix<float>& x2) {
  const Index T = x.rows(), N = x.cols();
  StepOutputs o;
  o.switch_grad.resize(T, N);
  o.switch_value = w.switch_loss.forward_backward(x, o.switch_grad);
  o.z_grad.resize(T, N);
  o.z_value = w.z.forward(x);
  w.z.backward(x, o.z_grad);
  o.combined_grad.resize(T, N);
  o.combined_value = w.combined.forward_backward(x, o.combined_grad);
  w.global.reset();
  w.global.count(x);
  w.global.count(x2);
  w.global.synchronize();
  o.global_grad.resize(T, N);
  o.global_value = w.global.forward_backward(x, o.global_grad);
  o.indices.resize(T, 2);
  o.weights.resize(T, 2);
  w.router.forward(x, o.indices, o.weights);
  o.router_grad.resize(T, N);
  const RowMatrix<float> upstream = RowMatrix<float>::Ones(T, 2);
  w.router.backward(x, o.indices, upstream, o.router_grad);
  return o;
}

RowMatrix<float> batch(unsigned seed, Index T = 700, Index N = 16) {
  return random_logits(T, N, 2.0, seed).cast<float>();
}

}  // namespace

TEST_CASE("determinism: repeated calls give bitwise identical outputs", "[determinism]") {
  const RowMatrix<float> x = batch(1), x2 = batch(2);
  Workspace reused(16);
  const StepOutputs first = step(reused, x, x2);
  // Another batch in between must leave no trace.
  step(reused, batch(3, 300), batch(4, 300));
  CHECK(step(reused, x, x2) == first);
  Workspace fresh(16);
  CHECK(step(fresh, x, x2) == first);
  // The one-line forms agree bitwise with the objects.
  const auto one_line = moebal::switch_aux_loss(x, 2);
  CHECK(one_line.loss == first.switch_value);
  CHECK(one_line.grad == first.switch_grad);
}

TEST_CASE("determinism: seeded noise gives identical routing", "[determinism][noise]") {
  const RowMatrix<double> x = random_logits(200, 8, 1.0, 9);
  const auto route_with_noise = [&](std::uint64_t seed) {
    const RowMatrix<double> noisy = x + moebal::gaussian_noise<double>(200, 8, 0.5, seed);
    return moebal::route(noisy, 2);
  };
  const auto a = route_with_noise(42), b = route_with_noise(42), c = route_with_noise(43);
  CHECK(a.indices == b.indices);
  CHECK(a.weights == b.weights);
  CHECK(a.indices != c.indices);  // another seed routes differently (200 tokens: certain)
  CHECK(moebal::gumbel_noise<float>(5, 7, 3) == moebal::gumbel_noise<float>(5, 7, 3));
  moebal::CapacityOptions capacity;
  capacity.priority = moebal::DropPriority::random;
  capacity.capacity_factor = 0.5;
  capacity.seed = 7;
  const auto d1 = moebal::apply_capacity(a.indices, a.weights, 8, capacity);
  const auto d2 = moebal::apply_capacity(a.indices, a.weights, 8, capacity);
  CHECK(d1.kept == d2.kept);
  CHECK(d1.weights == d2.weights);
}

TEST_CASE("thread safety: distinct objects on concurrent threads match the sequential run",
          "[determinism][threads]") {
  const int threads = 4, steps = 3;
  std::vector<RowMatrix<float>> inputs;
  for (int i = 0; i < threads * steps + 1; ++i) inputs.push_back(batch(100u + unsigned(i)));
  // Sequential reference: one workspace per thread id, steps in order.
  std::vector<std::vector<StepOutputs>> expected(threads);
  for (int t = 0; t < threads; ++t) {
    Workspace w(16);
    for (int s = 0; s < steps; ++s) {
      const int i = t * steps + s;
      expected[t].push_back(step(w, inputs[i], inputs[i + 1]));
    }
  }
  std::vector<std::vector<StepOutputs>> got(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      Workspace w(16);
      for (int s = 0; s < steps; ++s) {
        const int i = t * steps + s;
        got[t].push_back(step(w, inputs[i], inputs[i + 1]));
        // The free functions are reentrant too.
        (void)moebal::switch_aux_loss(inputs[i], 2);
      }
    });
  }
  for (auto& th : pool) th.join();
  for (int t = 0; t < threads; ++t) {
    for (int s = 0; s < steps; ++s) {
      INFO("thread " << t << ", step " << s);
      CHECK(got[t][s] == expected[t][s]);
    }
  }
}
