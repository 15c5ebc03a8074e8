// SPDX-License-Identifier: Apache-2.0
//
// Benchmarks of moebal's losses and routers, each next to references in the same binary.
//
// Every figure is meant to be read as a ratio to references measured in the same binary:
//   BM_Copy<S>                         memcpy of the T x N logits into a gradient-sized buffer
//                                      (the memory-traffic floor of any forward+backward), split
//                                      over the same number of threads as the kernel it is read
//                                      against
//   BM_NaiveEigen_Forward<S>           the Switch loss as a user would write it with Eigen
//   BM_NaiveEigen_ForwardBackward<S>   ... plus the analytic gradient
//   BM_Moebal_Forward<S>               moebal::SwitchAuxLoss<S>::forward (Megatron convention)
//   BM_Moebal_ForwardBackward<S>       moebal::SwitchAuxLoss<S>::forward_backward
//   BM_Moebal_ForwardThenBackward<S>   forward, then backward (the recompute path)
//   BM_SwitchHF_* / BM_SwitchFirst_*   the Hugging Face and first-choice conventions
//   BM_ZLoss_*, BM_CombinedSZ_*, BM_Combined_ForwardBackward, BM_Sequence_*, BM_GlobalBatch_*,
//   BM_Router_*                        the other losses and the router (see bench/README.md)
// Arguments: T (tokens), N (experts), k, th (moebal::set_num_threads). BM_Copy has no k.
// Counters: bytes_per_second = T N sizeof(S) per iteration (the logits, read once),
// time_per_token (seconds in JSON; the console prints it with an SI prefix, e.g. "4.2ns") and
// ns_per_token_expert (nanoseconds per T x N element).
// Grid: a default subset of shapes; `--grid=full` registers every T in {4096, 65536, 262144,
// 1048576} x N in {8, 64, 256} x k in {1, 2, 8} x {float, double} x th in {1, 2}.
// See bench/README.md.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "moebal/core/threads.hpp"
#include "moebal/losses/combined.hpp"
#include "moebal/losses/global_batch.hpp"
#include "moebal/losses/sequence.hpp"
#include "moebal/losses/switch.hpp"
#include "moebal/losses/z.hpp"
#include "moebal/routers/presets.hpp"
#include "moebal/routers/router.hpp"

namespace {

using moebal::Index;
template <class S>
using RowMatrix = moebal::RowMatrix<S>;

// ---------------------------------------------------------------------------------------------
// Inputs

/// Random normal logits for a (T, N) with a fixed seed per shape. They are generated once in
/// double and rounded for float, so both scalar types see the same values. Only the latest
/// shape is kept: benchmarks are registered shape by shape, so each shape is generated once.
const RowMatrix<double>& master_logits(Index tokens, Index experts) {
  static RowMatrix<double> cached;
  if (cached.rows() != tokens || cached.cols() != experts) {
    cached.resize(0, 0);  // release the previous shape first
    cached.resize(tokens, experts);
    std::mt19937_64 rng(0x6d6f6562616cULL ^ (static_cast<std::uint64_t>(tokens) << 20) ^
                        static_cast<std::uint64_t>(experts));
    std::normal_distribution<double> normal(0.0, 1.0);
    double* data = cached.data();
    for (Index i = 0; i < tokens * experts; ++i) data[i] = normal(rng);
  }
  return cached;
}

template <class S>
const RowMatrix<S>& logits_for(Index tokens, Index experts) {
  if constexpr (std::is_same_v<S, double>) {
    return master_logits(tokens, experts);
  } else {
    static RowMatrix<S> cached;
    if (cached.rows() != tokens || cached.cols() != experts) {
      cached.resize(0, 0);
      cached = master_logits(tokens, experts).template cast<S>();
    }
    return cached;
  }
}

template <class S>
const char* scalar_name() {
  return std::is_same_v<S, float> ? "float" : "double";
}

void set_counters(benchmark::State& state, Index tokens, Index experts, std::size_t scalar_size) {
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * tokens * experts *
                          static_cast<std::int64_t>(scalar_size));
  // tokens * iterations / elapsed, inverted: seconds per token.
  state.counters["time_per_token"] =
      benchmark::Counter(static_cast<double>(tokens),
                         benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  // Nanoseconds per token x expert: flat in T when the kernel's cost is per element.
  state.counters["ns_per_token_expert"] = benchmark::Counter(
      1e-9 * static_cast<double>(tokens * experts),
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

/// Applies the benchmark's thread argument (state.range(index)) to moebal.
void use_threads(benchmark::State& state, int index) {
  moebal::set_num_threads(static_cast<int>(state.range(index)));
  state.counters["threads"] = static_cast<double>(moebal::num_threads());
}

// ---------------------------------------------------------------------------------------------
// The naive reference: the Megatron Switch loss written the way a user would with Eigen.
//   p = softmax(x) row-wise, top-k by std::partial_sort (ties to the lower index),
//   c_i = top-k counts, f = c / (T k), P = p.colwise().sum() / T, L = N sum_i f_i P_i,
//   dL/dx_tj = (N / T) p_tj (f_j - sum_i f_i p_ti).
// Workspace is allocated once (so the timed loop measures the computation, not malloc and
// page faults), but every intermediate is a full T x N matrix, as in the straightforward code.

template <class S>
class NaiveSwitch {
 public:
  using Matrix = RowMatrix<S>;
  using ColVector = Eigen::Matrix<S, Eigen::Dynamic, 1>;
  using RowVector = Eigen::Matrix<S, 1, Eigen::Dynamic>;

  NaiveSwitch(Index tokens, Index experts, Index k)
      : k_(k),
        probs_(tokens, experts),
        row_max_(tokens),
        row_sum_(tokens),
        order_(static_cast<std::size_t>(experts)),
        counts_(experts),
        f_(experts),
        P_(experts),
        f_dot_p_(tokens) {}

  S forward(const Matrix& x) {
    const Index tokens = x.rows(), experts = x.cols();
    row_max_ = x.rowwise().maxCoeff();
    probs_ = (x.colwise() - row_max_).array().exp().matrix();
    row_sum_ = probs_.rowwise().sum();
    probs_.array().colwise() /= row_sum_.array();

    counts_.setZero();
    for (Index t = 0; t < tokens; ++t) {
      const S* p = probs_.data() + t * experts;
      std::iota(order_.begin(), order_.end(), Index(0));
      std::partial_sort(order_.begin(), order_.begin() + k_, order_.end(),
                        [p](Index a, Index b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
      for (Index s = 0; s < k_; ++s) counts_[order_[static_cast<std::size_t>(s)]] += S(1);
    }
    f_ = counts_ / (S(tokens) * S(k_));
    P_ = probs_.colwise().sum() / S(tokens);
    return S(experts) * f_.dot(P_);
  }

  /// Uses the probabilities kept by the last forward.
  void backward(Matrix& grad) {
    const Index tokens = probs_.rows(), experts = probs_.cols();
    f_dot_p_.noalias() = probs_ * f_.transpose();
    grad = ((probs_.array().rowwise() * f_.array()) - (probs_.array().colwise() * f_dot_p_.array()))
               .matrix() *
           (S(experts) / S(tokens));
  }

 private:
  Index k_;
  Matrix probs_;
  ColVector row_max_;
  ColVector row_sum_;
  std::vector<Index> order_;
  RowVector counts_;
  RowVector f_;
  RowVector P_;
  ColVector f_dot_p_;
};

/// What the untimed agreement check found.
struct CheckResult {
  std::string error;     // empty if the naive version agrees with moebal
  double loss_rel = 0;   // |L_naive - L_moebal| / |L_moebal|
  double grad_rel = 0;   // max |g_naive - g_moebal| / max |g_moebal|
};

/// Once per (S, T, N, k), untimed: does the naive loss (and gradient) agree with moebal's?
template <class S>
const CheckResult& naive_check(Index tokens, Index experts, Index k) {
  static std::map<std::tuple<Index, Index, Index>, CheckResult> results;
  const auto key = std::make_tuple(tokens, experts, k);
  const auto found = results.find(key);
  if (found != results.end()) return found->second;

  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  moebal::SwitchAuxLoss<S> loss(experts, k);
  RowMatrix<S> grad(tokens, experts);
  const double moebal_loss = loss.forward_backward(x, grad);

  NaiveSwitch<S> naive(tokens, experts, k);
  RowMatrix<S> naive_grad(tokens, experts);
  const double naive_loss = naive.forward(x);
  naive.backward(naive_grad);

  CheckResult result;
  result.loss_rel = std::abs(naive_loss - moebal_loss) / std::abs(moebal_loss);
  // Relative to the largest gradient element, or to the gradient's natural scale N / T when
  // that is smaller: at k = N, f is uniform and the exact gradient is zero (rounding noise).
  const double grad_scale = std::max(static_cast<double>(grad.cwiseAbs().maxCoeff()),
                                     double(experts) / double(tokens));
  result.grad_rel = static_cast<double>((naive_grad - grad).cwiseAbs().maxCoeff()) / grad_scale;
  const double grad_tol = std::is_same_v<S, float> ? 1e-4 : 1e-9;
  std::ostringstream why;
  why.precision(17);
  if (!(result.loss_rel <= 1e-5)) {
    why << "naive loss " << naive_loss << " vs moebal " << moebal_loss << " (relative "
        << result.loss_rel << " > 1e-5)";
  } else if (!(result.grad_rel <= grad_tol)) {
    why << "naive gradient differs from moebal's by " << result.grad_rel
        << " of max |grad| (tolerance " << grad_tol << ")";
  }
  result.error = why.str();
  return results.emplace(key, std::move(result)).first->second;
}

/// Runs the check; on disagreement marks the benchmark as failed and returns false.
template <class S>
bool naive_agrees(benchmark::State& state, Index tokens, Index experts, Index k) {
  const CheckResult& check = naive_check<S>(tokens, experts, k);
  if (!check.error.empty()) {
    state.SkipWithError(check.error.c_str());
    return false;
  }
  state.counters["check_loss_rel"] = check.loss_rel;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Benchmarks. state.range(0) = T, range(1) = N, range(2) = k, range(3) = threads (BM_Copy:
// range(2) = threads).

/// Times `step` (one call of the operation), after one untimed call that sizes workspaces.
template <class Step>
void run_timed(benchmark::State& state, Index tokens, Index experts, std::size_t scalar_size,
               Step&& step) {
  step();
  for (auto _ : state) {
    step();
    benchmark::ClobberMemory();
  }
  set_counters(state, tokens, experts, scalar_size);
}

template <class S>
void BM_Copy(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1);
  use_threads(state, 2);
  const RowMatrix<S>& src = logits_for<S>(tokens, experts);
  RowMatrix<S> dst = RowMatrix<S>::Zero(tokens, experts);  // pages touched before timing
  const std::size_t bytes = static_cast<std::size_t>(tokens * experts) * sizeof(S);
  const int threads = moebal::num_threads();
  for (auto _ : state) {
    // Split by rows over the same threads as the kernels (one memcpy on one thread).
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
#endif
    for (int part = 0; part < threads; ++part) {
      const std::size_t begin = bytes / std::size_t(threads) * std::size_t(part);
      const std::size_t end =
          part + 1 == threads ? bytes : bytes / std::size_t(threads) * std::size_t(part + 1);
      std::memcpy(reinterpret_cast<char*>(dst.data()) + begin,
                  reinterpret_cast<const char*>(src.data()) + begin, end - begin);
    }
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  (void)threads;
  set_counters(state, tokens, experts, sizeof(S));
}

template <class S>
void BM_NaiveEigen_Forward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1), k = state.range(2);
  use_threads(state, 3);
  if (!naive_agrees<S>(state, tokens, experts, k)) return;
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  NaiveSwitch<S> naive(tokens, experts, k);
  run_timed(state, tokens, experts, sizeof(S), [&] { benchmark::DoNotOptimize(naive.forward(x)); });
}

template <class S>
void BM_NaiveEigen_ForwardBackward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1), k = state.range(2);
  use_threads(state, 3);
  if (!naive_agrees<S>(state, tokens, experts, k)) return;
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  NaiveSwitch<S> naive(tokens, experts, k);
  RowMatrix<S> grad = RowMatrix<S>::Zero(tokens, experts);
  run_timed(state, tokens, experts, sizeof(S), [&] {
    benchmark::DoNotOptimize(naive.forward(x));
    naive.backward(grad);
    benchmark::DoNotOptimize(grad.data());
  });
}

moebal::SwitchOptions switch_options(moebal::SwitchConvention convention) {
  moebal::SwitchOptions options;
  options.convention = convention;
  return options;
}

template <class S, moebal::SwitchConvention Convention>
void BM_Switch_Forward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1), k = state.range(2);
  use_threads(state, 3);
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  moebal::SwitchAuxLoss<S> loss(experts, k, switch_options(Convention));
  run_timed(state, tokens, experts, sizeof(S), [&] { benchmark::DoNotOptimize(loss.forward(x)); });
}

template <class S, moebal::SwitchConvention Convention>
void BM_Switch_ForwardBackward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1), k = state.range(2);
  use_threads(state, 3);
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  moebal::SwitchAuxLoss<S> loss(experts, k, switch_options(Convention));
  RowMatrix<S> grad = RowMatrix<S>::Zero(tokens, experts);
  run_timed(state, tokens, experts, sizeof(S), [&] {
    benchmark::DoNotOptimize(loss.forward_backward(x, grad));
    benchmark::DoNotOptimize(grad.data());
  });
}

template <class S>
void BM_Moebal_ForwardThenBackward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1), k = state.range(2);
  use_threads(state, 3);
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  moebal::SwitchAuxLoss<S> loss(experts, k);
  RowMatrix<S> grad = RowMatrix<S>::Zero(tokens, experts);
  run_timed(state, tokens, experts, sizeof(S), [&] {
    benchmark::DoNotOptimize(loss.forward(x));
    loss.backward(x, grad);
    benchmark::DoNotOptimize(grad.data());
  });
}

template <class S>
void BM_ZLoss_Forward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1);
  use_threads(state, 3);
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  moebal::ZLoss<S> loss(1e-3);
  run_timed(state, tokens, experts, sizeof(S), [&] { benchmark::DoNotOptimize(loss.forward(x)); });
}

template <class S>
void BM_ZLoss_ForwardBackward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1);
  use_threads(state, 3);
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  moebal::ZLoss<S> loss(1e-3);
  RowMatrix<S> grad = RowMatrix<S>::Zero(tokens, experts);
  run_timed(state, tokens, experts, sizeof(S), [&] {
    benchmark::DoNotOptimize(loss.forward(x));
    loss.backward(x, grad);
    benchmark::DoNotOptimize(grad.data());
  });
}

// The one-pass combined objective. CombinedSZ: Switch + z-loss (the "at most 1.3x the Switch
// loss alone" target). Combined_ForwardBackward: every term on (Switch, z-loss, sequence-level
// over sequence-major sequences of 1024 tokens, importance CV^2).
moebal::CombinedOptions combined_options(Index tokens, bool every_term) {
  moebal::CombinedOptions options;
  if (every_term) {
    options.weights = {1e-2, 1e-3, 1e-3, 1e-2};
    options.layout = moebal::SequenceLayout::sequence_major(tokens >= 1024 ? 1024 : tokens);
  } else {
    options.weights = {1e-2, 1e-3, 0.0, 0.0};
  }
  return options;
}

template <class S, bool EveryTerm>
void BM_Combined_Forward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1), k = state.range(2);
  use_threads(state, 3);
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  moebal::CombinedAuxLoss<S> loss(experts, k, combined_options(tokens, EveryTerm));
  run_timed(state, tokens, experts, sizeof(S), [&] { benchmark::DoNotOptimize(loss.forward(x)); });
}

template <class S, bool EveryTerm>
void BM_Combined_ForwardBackward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1), k = state.range(2);
  use_threads(state, 3);
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  moebal::CombinedAuxLoss<S> loss(experts, k, combined_options(tokens, EveryTerm));
  RowMatrix<S> grad = RowMatrix<S>::Zero(tokens, experts);
  run_timed(state, tokens, experts, sizeof(S), [&] {
    benchmark::DoNotOptimize(loss.forward_backward(x, grad));
    benchmark::DoNotOptimize(grad.data());
  });
}

// Sequence-level loss over sequence-major sequences of 1024 tokens (Megatron-core seq_aux_loss).
template <class S>
void BM_Sequence_Forward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1), k = state.range(2);
  use_threads(state, 3);
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  moebal::SequenceAuxLoss<S> loss(experts, k,
                                  moebal::SequenceLayout::sequence_major(std::min<Index>(tokens, 1024)));
  run_timed(state, tokens, experts, sizeof(S), [&] { benchmark::DoNotOptimize(loss.forward(x)); });
}

template <class S>
void BM_Sequence_ForwardBackward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1), k = state.range(2);
  use_threads(state, 3);
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  moebal::SequenceAuxLoss<S> loss(experts, k,
                                  moebal::SequenceLayout::sequence_major(std::min<Index>(tokens, 1024)));
  RowMatrix<S> grad = RowMatrix<S>::Zero(tokens, experts);
  run_timed(state, tokens, experts, sizeof(S), [&] {
    benchmark::DoNotOptimize(loss.forward(x));
    loss.backward(x, grad);
    benchmark::DoNotOptimize(grad.data());
  });
}

// Global-batch balance, both phases on one micro-batch of one rank: count (phase 1),
// synchronize (no-op sum), then forward (and backward).
template <class S>
void BM_GlobalBatch_Forward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1), k = state.range(2);
  use_threads(state, 3);
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  moebal::GlobalBatchBalance<S> loss(experts, k);
  run_timed(state, tokens, experts, sizeof(S), [&] {
    loss.reset();
    loss.count(x);
    loss.synchronize();
    benchmark::DoNotOptimize(loss.forward(x));
  });
}

template <class S>
void BM_GlobalBatch_ForwardBackward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1), k = state.range(2);
  use_threads(state, 3);
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  moebal::GlobalBatchBalance<S> loss(experts, k);
  RowMatrix<S> grad = RowMatrix<S>::Zero(tokens, experts);
  run_timed(state, tokens, experts, sizeof(S), [&] {
    loss.reset();
    loss.count(x);
    loss.synchronize();
    benchmark::DoNotOptimize(loss.forward_backward(x, grad));
    benchmark::DoNotOptimize(grad.data());
  });
}

// The router (Megatron-core softmax top-k preset): indices and combine weights, then
// d loss / d logits from d loss / d weights (all ones). Softmax of the k selected logits
// (Megatron's default, moe_router_pre_softmax = false) for k >= 2; for k = 1, where that
// weight is constant, softmax over all experts before the top-k (pre_softmax = true).
moebal::RouterOptions router_options(Index k) { return moebal::presets::megatron_softmax(k == 1); }
template <class S>
void BM_Router_Forward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1), k = state.range(2);
  use_threads(state, 3);
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  moebal::Router<S> router(experts, k, router_options(k));
  moebal::IndexMatrix indices(tokens, k);
  RowMatrix<S> weights(tokens, k);
  run_timed(state, tokens, experts, sizeof(S), [&] {
    router.forward(x, indices, weights);
    benchmark::DoNotOptimize(weights.data());
  });
}

template <class S>
void BM_Router_ForwardBackward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1), k = state.range(2);
  use_threads(state, 3);
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  moebal::Router<S> router(experts, k, router_options(k));
  moebal::IndexMatrix indices(tokens, k);
  RowMatrix<S> weights(tokens, k);
  const RowMatrix<S> upstream = RowMatrix<S>::Ones(tokens, k);
  RowMatrix<S> grad = RowMatrix<S>::Zero(tokens, experts);
  run_timed(state, tokens, experts, sizeof(S), [&] {
    router.forward(x, indices, weights);
    router.backward(x, indices, upstream, grad);
    benchmark::DoNotOptimize(grad.data());
  });
}

// ---------------------------------------------------------------------------------------------
// Registration, shape by shape (so each shape's logits are generated once).

struct Shape {
  Index tokens, experts, k;
};

// The default subset: the shapes the README quotes. Ordered so that shapes sharing (T, N) are
// adjacent (one BM_Copy per (T, N)).
constexpr Shape kDefaultShapes[] = {
    {4096, 8, 2},     {65536, 64, 2},    {262144, 8, 2},  {262144, 64, 1}, {262144, 64, 2},
    {262144, 64, 8},  {65536, 256, 8},   {1048576, 64, 2},
};
// Double in the default subset: two shapes.
constexpr Shape kDefaultDoubleShapes[] = {{262144, 64, 2}, {65536, 256, 8}};

using BenchFunction = void (*)(benchmark::State&);

// 0.2 s per benchmark unless --benchmark_min_time is given (then that flag decides).
bool default_min_time = true;

void configure(benchmark::internal::Benchmark* b, std::vector<std::int64_t> args,
               std::vector<std::string> names) {
  b->Args(args)->ArgNames(names)->Unit(benchmark::kMillisecond);
  if (default_min_time) b->MinTime(0.2);
}

template <class S>
void register_shape(const Shape& shape, bool with_copy, const std::vector<int>& threads,
                    bool full) {
  using moebal::SwitchConvention;
  const std::string suffix = std::string("<") + scalar_name<S>() + ">";
  const std::vector<std::string> names = {"T", "N", "k", "th"};
  for (const int th : threads) {
    if (with_copy) {
      configure(benchmark::RegisterBenchmark(("BM_Copy" + suffix).c_str(), &BM_Copy<S>),
                {shape.tokens, shape.experts, th}, {"T", "N", "th"});
    }
  }
  // The naive reference is single-threaded Eigen code: one thread only.
  const std::pair<const char*, BenchFunction> naive[] = {
      {"BM_NaiveEigen_Forward", &BM_NaiveEigen_Forward<S>},
      {"BM_NaiveEigen_ForwardBackward", &BM_NaiveEigen_ForwardBackward<S>},
  };
  for (const auto& [name, function] : naive) {
    configure(benchmark::RegisterBenchmark((name + suffix).c_str(), function),
              {shape.tokens, shape.experts, shape.k, 1}, names);
  }
  std::vector<std::pair<const char*, BenchFunction>> benchmarks = {
      {"BM_Moebal_Forward", &BM_Switch_Forward<S, SwitchConvention::megatron>},
      {"BM_Moebal_ForwardBackward", &BM_Switch_ForwardBackward<S, SwitchConvention::megatron>},
      {"BM_Moebal_ForwardThenBackward", &BM_Moebal_ForwardThenBackward<S>},
      {"BM_SwitchHF_ForwardBackward", &BM_Switch_ForwardBackward<S, SwitchConvention::huggingface>},
      {"BM_SwitchFirst_ForwardBackward",
       &BM_Switch_ForwardBackward<S, SwitchConvention::first_choice>},
      {"BM_ZLoss_Forward", &BM_ZLoss_Forward<S>},
      {"BM_ZLoss_ForwardBackward", &BM_ZLoss_ForwardBackward<S>},
      {"BM_CombinedSZ_Forward", &BM_Combined_Forward<S, false>},
      {"BM_CombinedSZ_ForwardBackward", &BM_Combined_ForwardBackward<S, false>},
      {"BM_Combined_ForwardBackward", &BM_Combined_ForwardBackward<S, true>},
      {"BM_Sequence_Forward", &BM_Sequence_Forward<S>},
      {"BM_Sequence_ForwardBackward", &BM_Sequence_ForwardBackward<S>},
      {"BM_GlobalBatch_Forward", &BM_GlobalBatch_Forward<S>},
      {"BM_GlobalBatch_ForwardBackward", &BM_GlobalBatch_ForwardBackward<S>},
      {"BM_Router_Forward", &BM_Router_Forward<S>},
      {"BM_Router_ForwardBackward", &BM_Router_ForwardBackward<S>},
  };
  if (full) {
    benchmarks.push_back({"BM_SwitchHF_Forward", &BM_Switch_Forward<S, SwitchConvention::huggingface>});
    benchmarks.push_back(
        {"BM_SwitchFirst_Forward", &BM_Switch_Forward<S, SwitchConvention::first_choice>});
  }
  for (const int th : threads) {
    for (const auto& [name, function] : benchmarks) {
      configure(benchmark::RegisterBenchmark((name + suffix).c_str(), function),
                {shape.tokens, shape.experts, shape.k, th}, names);
    }
  }
}

template <class S, std::size_t Count>
void register_shapes(const Shape (&shapes)[Count], const std::vector<int>& threads, bool full) {
  Index last_tokens = -1, last_experts = -1;
  for (const Shape& shape : shapes) {
    const bool new_size = shape.tokens != last_tokens || shape.experts != last_experts;
    register_shape<S>(shape, new_size, threads, full);
    last_tokens = shape.tokens;
    last_experts = shape.experts;
  }
}

std::vector<Shape> full_grid() {
  std::vector<Shape> shapes;
  for (const Index tokens : {4096, 65536, 262144, 1048576}) {
    for (const Index experts : {8, 64, 256}) {
      for (const Index k : {1, 2, 8}) shapes.push_back({tokens, experts, k});
    }
  }
  return shapes;
}

template <class S>
void register_grid(const std::vector<Shape>& shapes, const std::vector<int>& threads) {
  Index last_tokens = -1, last_experts = -1;
  for (const Shape& shape : shapes) {
    const bool new_size = shape.tokens != last_tokens || shape.experts != last_experts;
    register_shape<S>(shape, new_size, threads, true);
    last_tokens = shape.tokens;
    last_experts = shape.experts;
  }
}

}  // namespace

// Extra flags, read (and removed) before Google Benchmark's own:
//   --grid=full        every shape of the grid (default: the subset above)
//   --threads=1,2      the thread counts to register (default: 1 and 2)
int main(int argc, char** argv) {
  bool full = false;
  std::vector<int> threads = {1, 2};
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--grid=full") {
      full = true;
    } else if (arg == "--grid=default") {
      full = false;
    } else if (arg.rfind("--threads=", 0) == 0) {
      threads.clear();
      std::stringstream list(arg.substr(10));
      std::string item;
      while (std::getline(list, item, ',')) threads.push_back(std::stoi(item));
    } else {
      if (arg.rfind("--benchmark_min_time", 0) == 0) default_min_time = false;
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  if (full) {
    const std::vector<Shape> shapes = full_grid();
    register_grid<float>(shapes, threads);
    register_grid<double>(shapes, threads);
  } else {
    register_shapes<float>(kDefaultShapes, threads, false);
    register_shapes<double>(kDefaultDoubleShapes, threads, false);
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
