// SPDX-License-Identifier: Apache-2.0
// moebal::set_num_threads and the threaded kernels: every threaded kernel gives bitwise
// identical results (loss, statistics, gradient) on 1, 2 and 4 threads, and reports the same
// first bad row whatever the thread count.
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "moebal/core/threads.hpp"
#include "moebal/moebal.hpp"
#include "support/random.hpp"
#include "support/threads.hpp"

using moebal::Index;
using moebal::RowMatrix;
using moebal_test::kThreadCounts;
using moebal_test::tied_logits;
using moebal_test::ThreadScope;

namespace {

Eigen::VectorXi threaded_mask(Index rows) {
  Eigen::VectorXi mask = Eigen::VectorXi::Ones(rows);
  for (Index t = 3; t < rows; t += 97) mask[t] = 0;
  for (Index t = 1024; t < 1536 && t < rows; ++t) mask[t] = 0;  // a whole padded chunk
  return mask;
}

template <class T>
struct SwitchRun {
  T value = 0, value_fb = 0;
  RowMatrix<T> grad, grad_fb, grad_acc;
  Eigen::VectorXd counts, first, sums;
  double tokens = 0;
  T one_line = 0;
  RowMatrix<T> one_line_grad;
};

template <class T>
SwitchRun<T> run_switch(const RowMatrix<T>& x, const moebal::TokenMask& mask, Index k,
                        const moebal::SwitchOptions& options) {
  SwitchRun<T> r;
  moebal::SwitchAuxLoss<T> loss(x.cols(), k, options);
  r.grad_fb.resize(x.rows(), x.cols());
  r.value_fb = loss.forward_backward(x, r.grad_fb, mask, T(0.75));
  r.value = loss.forward(x, mask);
  r.counts = loss.statistics().counts();
  r.first = loss.statistics().first_choice_counts();
  r.sums = loss.statistics().score_sums();
  r.tokens = loss.statistics().tokens();
  r.grad.resize(x.rows(), x.cols());
  loss.backward(x, r.grad);
  r.grad_acc = RowMatrix<T>::Constant(x.rows(), x.cols(), T(0.5));
  loss.backward_accumulate(x, r.grad_acc, T(-2));
  moebal::SwitchOptions with_mask = options;
  with_mask.mask = mask;
  const auto result = moebal::switch_aux_loss(x, k, with_mask);
  r.one_line = result.loss;
  r.one_line_grad = result.grad;
  return r;
}

template <class T>
void check_same(const SwitchRun<T>& a, const SwitchRun<T>& b) {
  CHECK(a.value == b.value);
  CHECK(a.value_fb == b.value_fb);
  CHECK(a.tokens == b.tokens);
  CHECK(a.counts == b.counts);
  CHECK(a.first == b.first);
  CHECK(a.sums == b.sums);
  CHECK(a.grad == b.grad);
  CHECK(a.grad_fb == b.grad_fb);
  CHECK(a.grad_acc == b.grad_acc);
  CHECK(a.one_line == b.one_line);
  CHECK(a.one_line_grad == b.one_line_grad);
}

}  // namespace

TEST_CASE("set_num_threads: the setting and its bounds", "[threads]") {
  {
    ThreadScope scope(3);
#ifdef _OPENMP
    CHECK(moebal::num_threads() == 3);
#else
    CHECK(moebal::num_threads() == 1);
#endif
  }
  CHECK(moebal::num_threads() >= 1);
  CHECK_THROWS_AS(moebal::set_num_threads(-1), moebal::invalid_argument);
  CHECK_THROWS_WITH(moebal::set_num_threads(-2),
                    Catch::Contains("threads") && Catch::Contains("-2"));
}

TEMPLATE_TEST_CASE("threads: the Switch loss is bitwise identical on 1, 2 and 4 threads",
                   "[threads][determinism][switch]", float, double) {
  using T = TestType;
  const Index rows = 2600;
  for (const Index cols : {Index(16), Index(7)}) {
    const RowMatrix<T> x = tied_logits<T>(rows, cols, 11u + unsigned(cols));
    const Eigen::VectorXi mask_values = threaded_mask(rows);
    for (const bool masked : {false, true}) {
      const moebal::TokenMask mask = masked ? moebal::TokenMask(mask_values) : moebal::TokenMask();
      for (const auto score : {moebal::ScoreFunction::softmax, moebal::ScoreFunction::sigmoid}) {
        for (const auto convention :
             {moebal::SwitchConvention::megatron, moebal::SwitchConvention::huggingface,
              moebal::SwitchConvention::first_choice}) {
          for (const Index k : {Index(1), Index(2), Index(5)}) {
            moebal::SwitchOptions options;
            options.score = score;
            options.convention = convention;
            options.coefficient = 0.01;
            INFO("N = " << cols << ", masked = " << masked << ", " << moebal::to_string(score)
                        << ", " << moebal::to_string(convention) << ", k = " << k);
            SwitchRun<T> reference;
            {
              ThreadScope scope(1);
              reference = run_switch(x, mask, k, options);
            }
            CHECK(reference.value > T(0));
            for (const int threads : kThreadCounts) {
              INFO("threads = " << threads);
              ThreadScope scope(threads);
              check_same(run_switch(x, mask, k, options), reference);
            }
          }
        }
      }
    }
  }
}

TEST_CASE("threads: one Switch object reused across thread counts", "[threads][determinism][switch]") {
  const RowMatrix<float> x = tied_logits<float>(3000, 32, 5u);
  moebal::SwitchAuxLoss<float> loss(32, 2);
  RowMatrix<float> reference(3000, 32), grad(3000, 32);
  float value = 0;
  {
    ThreadScope scope(1);
    value = loss.forward_backward(x, reference);
  }
  for (const int threads : {4, 2, 1, 4}) {
    ThreadScope scope(threads);
    CHECK(loss.forward_backward(x, grad) == value);
    CHECK(grad == reference);
  }
}

TEST_CASE("threads: the first bad row is reported whatever the thread count",
          "[threads][determinism][switch]") {
  RowMatrix<float> x = tied_logits<float>(4000, 8, 3u);
  x(3500, 2) = std::numeric_limits<float>::quiet_NaN();
  x(700, 5) = std::numeric_limits<float>::infinity();
  x(2100, 1) = std::numeric_limits<float>::quiet_NaN();
  RowMatrix<float> grad(4000, 8);
  for (const int threads : kThreadCounts) {
    INFO("threads = " << threads);
    ThreadScope scope(threads);
    moebal::SwitchAuxLoss<float> loss(8, 2);
    CHECK_THROWS_WITH(loss.forward_backward(x, grad),
                      Catch::Contains("row 700, column 5") && Catch::Contains("inf"));
    CHECK_THROWS_WITH(moebal::switch_aux_loss(x, 2), Catch::Contains("row 700, column 5"));
    // The object is usable again after the failed call.
    CHECK(loss.forward_backward(x.topRows(600), grad.topRows(600)) > 0.0f);
  }
}

TEMPLATE_TEST_CASE("threads: the z-loss is bitwise identical on 1, 2 and 4 threads",
                   "[threads][determinism][z]", float, double) {
  using T = TestType;
  const Index rows = 2600;
  for (const Index cols : {Index(16), Index(7)}) {
    RowMatrix<T> x = tied_logits<T>(rows, cols, 21u + unsigned(cols));
    x(9, 2) = -std::numeric_limits<T>::infinity();  // a disabled expert
    const Eigen::VectorXi mask_values = threaded_mask(rows);
    for (const bool masked : {false, true}) {
      INFO("N = " << cols << ", masked = " << masked);
      const moebal::TokenMask mask = masked ? moebal::TokenMask(mask_values) : moebal::TokenMask();
      auto run = [&] {
        moebal::ZLoss<T> z(0.01);
        std::pair<T, RowMatrix<T>> r;
        r.first = z.forward(x, mask);
        r.second = RowMatrix<T>::Constant(rows, cols, T(0.25));
        z.backward_accumulate(x, r.second, T(3));
        RowMatrix<T> written(rows, cols);
        z.backward(x, written);
        r.second += written;
        moebal::ZLossOptions options;
        options.coefficient = 0.01;
        options.mask = mask;
        const auto one_line = moebal::z_loss(x, options);
        CHECK(one_line.loss == r.first);
        CHECK(one_line.grad == written);
        return r;
      };
      std::pair<T, RowMatrix<T>> reference;
      {
        ThreadScope scope(1);
        reference = run();
      }
      CHECK(reference.first > T(0));
      for (const int threads : kThreadCounts) {
        INFO("threads = " << threads);
        ThreadScope scope(threads);
        const auto got = run();
        CHECK(got.first == reference.first);
        CHECK(got.second == reference.second);
      }
    }
  }
}

namespace {

// What a loss object gives on one thread count: values and every backward form.
template <class T>
struct LossRun {
  std::vector<T> values;
  std::vector<RowMatrix<T>> grads;
};

template <class T>
void check_same(const LossRun<T>& a, const LossRun<T>& b) {
  REQUIRE(a.values.size() == b.values.size());
  REQUIRE(a.grads.size() == b.grads.size());
  for (std::size_t i = 0; i < a.values.size(); ++i) {
    INFO("value " << i);
    CHECK(a.values[i] == b.values[i]);
  }
  for (std::size_t i = 0; i < a.grads.size(); ++i) {
    INFO("gradient " << i);
    CHECK(a.grads[i] == b.grads[i]);
  }
}

// forward, backward, backward_accumulate of a fresh loss object from make().
template <class T, class Make>
LossRun<T> run_object(Make&& make, const RowMatrix<T>& x, const moebal::TokenMask& mask) {
  LossRun<T> r;
  auto loss = make();
  r.values.push_back(loss.forward(x, mask));
  RowMatrix<T> grad(x.rows(), x.cols());
  loss.backward(x, grad);
  r.grads.push_back(grad);
  RowMatrix<T> acc = RowMatrix<T>::Constant(x.rows(), x.cols(), T(0.5));
  loss.backward_accumulate(x, acc, T(-2));
  r.grads.push_back(acc);
  return r;
}

// The same run on 1, 2 and 4 threads; the reference must be a non-trivial loss.
template <class T, class Run>
void check_thread_counts(Run&& run) {
  LossRun<T> reference;
  {
    ThreadScope scope(1);
    reference = run();
  }
  REQUIRE(!reference.values.empty());
  CHECK(reference.values.front() != T(0));
  for (const int threads : kThreadCounts) {
    INFO("threads = " << threads);
    ThreadScope scope(threads);
    check_same(run(), reference);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("threads: the combined objective is bitwise identical on 1, 2 and 4 threads",
                   "[threads][determinism][combined]", float, double) {
  using T = TestType;
  const Index rows = 2600, cols = 16;
  const RowMatrix<T> x = tied_logits<T>(rows, cols, 31u);
  const Eigen::VectorXi mask_values = threaded_mask(rows);
  for (const bool masked : {false, true}) {
    const moebal::TokenMask mask = masked ? moebal::TokenMask(mask_values) : moebal::TokenMask();
    for (const auto score : {moebal::ScoreFunction::softmax, moebal::ScoreFunction::sigmoid}) {
      for (const int terms : {0, 1, 2}) {
        moebal::CombinedOptions options;
        options.score = score;
        options.weights.switch_loss = 0.01;
        options.weights.z = 0.001;
        if (terms == 1) options.weights.cv2_importance = 0.1;
        if (terms == 2) {
          options.weights.sequence = 0.05;
          options.layout = moebal::SequenceLayout::batch_major(100);
        }
        INFO("masked = " << masked << ", " << moebal::to_string(score) << ", terms " << terms);
        check_thread_counts<T>([&] {
          LossRun<T> r = run_object<T>(
              [&] { return moebal::CombinedAuxLoss<T>(cols, 2, options); }, x, mask);
          moebal::CombinedAuxLoss<T> fused(cols, 2, options);
          RowMatrix<T> grad(rows, cols);
          r.values.push_back(fused.forward_backward(x, grad, mask, T(0.75)));
          r.grads.push_back(grad);
          moebal::CombinedOptions one_line = options;
          one_line.mask = mask;
          const auto result = moebal::combined_aux_loss(x, 2, one_line);
          r.values.push_back(result.loss);
          r.grads.push_back(result.grad);
          return r;
        });
      }
    }
  }
}

TEMPLATE_TEST_CASE("threads: the ScoredRows losses are bitwise identical on 1, 2 and 4 threads",
                   "[threads][determinism][loss]", float, double) {
  using T = TestType;
  const Index rows = 2600, cols = 16;
  const RowMatrix<T> x = tied_logits<T>(rows, cols, 41u);
  const Eigen::VectorXi mask_values = threaded_mask(rows);
  const moebal::TokenMask mask(mask_values);
  SECTION("CV2 of importance, top-k gates") {
    moebal::Cv2Options options;
    options.gates = moebal::ImportanceGates::topk;
    check_thread_counts<T>([&] {
      return run_object<T>([&] { return moebal::Cv2ImportanceLoss<T>(cols, 2, options); }, x,
                           mask);
    });
  }
  SECTION("sequence-level, sequence-major") {
    moebal::SequenceOptions options;
    options.score = moebal::ScoreFunction::sigmoid;
    check_thread_counts<T>([&] {
      return run_object<T>(
          [&] {
            return moebal::SequenceAuxLoss<T>(cols, 3, moebal::SequenceLayout::sequence_major(50),
                                              options);
          },
          x, mask);
    });
  }
  SECTION("DeepSeek-V2 communication balance") {
    moebal::DeviceBalanceOptions options;
    options.devices = 4;
    options.max_devices = 2;
    check_thread_counts<T>([&] {
      return run_object<T>(
          [&] {
            return moebal::DeviceBalanceLoss<T>(cols, 2,
                                                moebal::DeviceBalanceKind::communication, options);
          },
          x, mask);
    });
  }
  SECTION("global batch, two micro-batches") {
    check_thread_counts<T>([&] {
      LossRun<T> r;
      moebal::GlobalBatchBalance<T> balance(cols, 2);
      const RowMatrix<T> second = tied_logits<T>(1700, cols, 43u);
      balance.count(x, mask);
      balance.count(second);
      balance.synchronize();
      RowMatrix<T> grad(rows, cols);
      r.values.push_back(balance.forward_backward(x, grad, mask));
      r.grads.push_back(grad);
      r.values.push_back(balance.forward(second));
      RowMatrix<T> grad2(second.rows(), cols);
      balance.backward(second, grad2);
      r.grads.push_back(grad2);
      moebal::RunningGlobalBalance<T> running(cols, 2);
      r.values.push_back(running.forward_backward(second, grad2, moebal::NoSync{}));
      r.values.push_back(running.forward_backward(x, grad, moebal::NoSync{}, mask));
      r.grads.push_back(grad);
      return r;
    });
  }
}

TEST_CASE("threads: the ScoredRows losses report the first bad row whatever the thread count",
          "[threads][determinism][loss]") {
  RowMatrix<float> x = tied_logits<float>(4000, 8, 7u);
  x(3500, 2) = std::numeric_limits<float>::quiet_NaN();
  x(1800, 4) = std::numeric_limits<float>::infinity();
  x(2900, 1) = std::numeric_limits<float>::quiet_NaN();
  moebal::CombinedOptions options;
  options.weights.z = 0.001;
  for (const int threads : kThreadCounts) {
    INFO("threads = " << threads);
    ThreadScope scope(threads);
    moebal::CombinedAuxLoss<float> combined(8, 2, options);
    RowMatrix<float> grad(4000, 8);
    CHECK_THROWS_WITH(combined.forward_backward(x, grad),
                      Catch::Contains("row 1800, column 4") && Catch::Contains("inf"));
    // GlobalBatchBalance defers a micro-batch's error to synchronize.
    moebal::GlobalBatchBalance<float> balance(8, 2);
    balance.count(x.topRows(1000));
    balance.count(x);
    CHECK_THROWS_WITH(balance.synchronize(), Catch::Contains("row 1800, column 4"));
    // The objects are usable again after the failed call.
    CHECK(combined.forward_backward(x.topRows(1000), grad.topRows(1000)) > 0.0f);
  }
}

TEST_CASE("threads: sequence-level losses report the lowest bad row, sequences interleaved",
          "[threads][determinism][sequence]") {
  // Sequence-major, 40 sequences of 100 tokens: row s B + b is token s of sequence b, so
  // sequence 39's row 39 comes before sequence 0's row 2000 although its sequence is later.
  RowMatrix<float> x = tied_logits<float>(4000, 8, 9u);
  x(2000, 3) = std::numeric_limits<float>::quiet_NaN();  // sequence 0
  x(3239, 6) = -std::numeric_limits<float>::quiet_NaN();
  x(39, 1) = std::numeric_limits<float>::infinity();  // sequence 39
  moebal::CombinedOptions options;
  options.weights.sequence = 0.1;
  options.weights.z = 0.01;
  options.layout = moebal::SequenceLayout::sequence_major(100);
  for (const int threads : kThreadCounts) {
    INFO("threads = " << threads);
    ThreadScope scope(threads);
    moebal::SequenceAuxLoss<float> sequence(8, 2, moebal::SequenceLayout::sequence_major(100));
    CHECK_THROWS_WITH(sequence.forward(x), Catch::Contains("row 39, column 1"));
    moebal::CombinedAuxLoss<float> combined(8, 2, options);
    RowMatrix<float> grad(4000, 8);
    CHECK_THROWS_WITH(combined.forward_backward(x, grad), Catch::Contains("row 39, column 1"));
    // Usable again afterwards.
    CHECK(sequence.forward(x.bottomRows(700)) > 0.0f);
  }
}
