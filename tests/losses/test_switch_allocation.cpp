// SPDX-License-Identifier: Apache-2.0
// SwitchAuxLoss allocates nothing in steady state: after a first call at the largest batch,
// forward, backward, backward_accumulate and forward_backward neither call operator new nor
// let Eigen allocate; nor do the other loss objects and the router (whose per-thread scratch,
// once sized, serves any smaller thread count). Built as its own executable because it replaces
// the global operator new and compiles Eigen with EIGEN_RUNTIME_NO_MALLOC.

#include <cstdlib>
#include <new>
#include <stdexcept>
#include <utility>

#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x) \
  do {                  \
    if (!(x)) throw std::logic_error("Eigen assertion failed: " #x); \
  } while (false)

#include <catch2/catch.hpp>

#include "moebal/core/threads.hpp"
#include "moebal/losses/combined.hpp"
#include "moebal/losses/cv2.hpp"
#include "moebal/losses/deepseek.hpp"
#include "moebal/losses/global_batch.hpp"
#include "moebal/losses/sequence.hpp"
#include "moebal/losses/switch.hpp"
#include "moebal/losses/z.hpp"
#include "moebal/routers/presets.hpp"
#include "moebal/routers/router.hpp"

namespace {
bool counting = false;
long allocations = 0;
}  // namespace

void* operator new(std::size_t size) {
  if (counting) ++allocations;
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace {

// Counts operator new and forbids Eigen heap allocation inside its scope.
class NoAllocationScope {
 public:
  NoAllocationScope() {
    allocations = 0;
    counting = true;
    Eigen::internal::set_is_malloc_allowed(false);
  }
  ~NoAllocationScope() {
    counting = false;
    Eigen::internal::set_is_malloc_allowed(true);
  }
};

}  // namespace

TEMPLATE_TEST_CASE("SwitchAuxLoss: no allocation in steady state", "[loss][switch][alloc]",
                   float, double) {
  using T = TestType;
  using moebal::RowMatrix;
  const moebal::Index rows = 1500, cols = 32;
  const RowMatrix<T> logits = RowMatrix<T>::Random(rows, cols);
  RowMatrix<T> grad(rows, cols);
  Eigen::VectorXi mask = Eigen::VectorXi::Ones(rows);
  mask[7] = 0;
  for (const auto score : {moebal::ScoreFunction::softmax, moebal::ScoreFunction::sigmoid}) {
    for (const moebal::Index k : {moebal::Index(2), moebal::Index(20)}) {
      moebal::SwitchOptions options;
      options.score = score;
      moebal::SwitchAuxLoss<T> loss(cols, k, options);
      loss.forward_backward(logits, grad, moebal::TokenMask(mask));  // sizes the workspace
      T value = 0;
      {
        NoAllocationScope scope;
        value = loss.forward(logits, moebal::TokenMask(mask));
        loss.backward(logits, grad);
        loss.backward_accumulate(logits, grad, T(0.5));
        loss.forward_backward(logits, grad, moebal::TokenMask(mask));
        // A smaller batch reuses the same workspace.
        loss.forward_backward(logits.topRows(100), grad.topRows(100));
      }
      CHECK(allocations == 0);
      CHECK(value > T(0));
      // The guard is live: an allocating Eigen operation inside a scope is caught.
      {
        NoAllocationScope scope;
        CHECK_THROWS_AS(RowMatrix<T>(RowMatrix<T>::Zero(4, 4)), std::logic_error);
      }
    }
  }
}

TEMPLATE_TEST_CASE("Loss family objects: no allocation in steady state", "[loss][alloc]", float,
                   double) {
  using T = TestType;
  using moebal::RowMatrix;
  const moebal::Index rows = 1024, cols = 16;
  const RowMatrix<T> logits = RowMatrix<T>::Random(rows, cols);
  RowMatrix<T> grad(rows, cols);
  Eigen::VectorXi mask = Eigen::VectorXi::Ones(rows);
  mask[5] = 0;
  const moebal::TokenMask m(mask);

  moebal::CombinedOptions combined_options;
  combined_options.weights = {1.0, 0.1, 0.2, 0.3};
  combined_options.layout = moebal::SequenceLayout::sequence_major(256);
  moebal::CombinedAuxLoss<T> combined(cols, 2, combined_options);
  // Without the sequence term pass 1 runs on the threads (block partials).
  moebal::CombinedOptions sz_options;
  sz_options.weights = {1.0, 0.1, 0.0, 0.3};
  sz_options.score = moebal::ScoreFunction::sigmoid;
  moebal::CombinedAuxLoss<T> combined_sz(cols, 2, sz_options);
  moebal::ZLoss<T> z(0.1);
  moebal::Cv2Options cv2_options;
  cv2_options.gates = moebal::ImportanceGates::topk;
  moebal::Cv2ImportanceLoss<T> cv2(cols, 2, cv2_options);
  moebal::SequenceAuxLoss<T> sequence(cols, 2, moebal::SequenceLayout::segments({100, 900, 24}));
  moebal::DeviceBalanceOptions device_options;
  device_options.devices = 4;
  device_options.max_devices = 2;
  moebal::DeviceBalanceLoss<T> device(cols, 2, moebal::DeviceBalanceKind::communication,
                                      device_options);
  moebal::GlobalBatchBalance<T> global(cols, 2);
  moebal::RunningGlobalBalance<T> running(cols, 2);
  moebal::Router<T> router(cols, 4, moebal::presets::hf_deepseek_v3(4, 2, true, 2.5, Eigen::VectorXd::Zero(cols)));
  moebal::Router<T> post(cols, 2, moebal::presets::megatron_softmax());
  moebal::IndexMatrix indices(rows, 4), indices2(rows, 2);
  RowMatrix<T> weights(rows, 4), weights2(rows, 2);
  const RowMatrix<T> upstream = RowMatrix<T>::Ones(rows, 4);
  auto run = [&] {
    router.forward(logits, indices, weights);
    router.backward(logits, indices, upstream, grad);
    post.forward(logits, indices2, weights2);
    post.backward_accumulate(logits, indices2, upstream.leftCols(2), grad);
    global.reset();
    global.count(logits, m);
    global.count(logits.topRows(100));
    global.synchronize();
    global.forward_backward(logits, grad, m);
    global.forward(logits.topRows(100));
    global.backward_accumulate(logits.topRows(100), grad.topRows(100));
    running.reset();
    running.forward_backward(logits, grad, moebal::NoSync{}, m);
    running.forward(logits, moebal::NoSync{});
    running.backward(logits, grad);
    combined.forward_backward(logits, grad, m);
    combined.forward(logits, m);
    combined.backward_accumulate(logits, grad);
    combined_sz.forward_backward(logits, grad, m);
    combined_sz.forward(logits.topRows(300));
    combined_sz.backward_accumulate(logits.topRows(300), grad.topRows(300));
    z.forward(logits, m);
    z.backward(logits, grad);
    cv2.forward(logits, m);
    cv2.backward(logits, grad);
    sequence.forward(logits, m);
    sequence.backward_accumulate(logits, grad);
    device.forward(logits, m);
    device.backward(logits, grad);
  };
  for (const int threads : {2, 1}) {
    INFO("threads = " << threads);
    moebal::set_num_threads(threads);
    run();  // sizes the workspaces (and starts the thread team)
    {
      NoAllocationScope scope;
      run();
    }
    CHECK(allocations == 0);
  }
  moebal::set_num_threads(0);
}

TEMPLATE_TEST_CASE("Router: no allocation in steady state, any thread count", "[router][alloc]",
                   float, double) {
  using T = TestType;
  using moebal::RowMatrix;
  const moebal::Index rows = 1500, cols = 32;  // three chunks of rows, the last one partial
  const RowMatrix<T> logits = RowMatrix<T>::Random(rows, cols);
  RowMatrix<T> grad(rows, cols);
  const Eigen::VectorXd bias = Eigen::VectorXd::LinSpaced(cols, -0.1, 0.1);
  const std::pair<moebal::Index, moebal::RouterOptions> configs[] = {
      {2, moebal::RouterOptions{}},
      {2, moebal::presets::megatron_softmax()},
      {8, moebal::presets::hf_deepseek_v3(8, 4, true, 2.5, bias)},
      {20, moebal::presets::megatron_sigmoid(20, bias, 2.0, 1, 1, true)},
  };
  for (const auto& [k, options] : configs) {
    moebal::Router<T> router(cols, k, options);
    moebal::IndexMatrix indices(rows, k);
    RowMatrix<T> weights(rows, k);
    const RowMatrix<T> upstream = RowMatrix<T>::Ones(rows, k);
    auto run = [&] {
      router.forward(logits, indices, weights);
      router.backward(logits, indices, upstream, grad);
      router.backward_accumulate(logits, indices, upstream, grad, T(0.5));
      router.forward(logits.topRows(100), indices.topRows(100), weights.topRows(100));
    };
    moebal::set_num_threads(2);
    run();  // sizes the per-thread scratch for two threads
    {
      NoAllocationScope scope;
      run();
      moebal::set_num_threads(1);  // fewer threads reuse the same scratch
      run();
    }
    moebal::set_num_threads(0);
    CHECK(allocations == 0);
    CHECK(weights.allFinite());
  }
}
