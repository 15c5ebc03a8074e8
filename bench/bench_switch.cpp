// SPDX-License-Identifier: Apache-2.0
//
// Benchmarks of the Switch load-balancing loss (Megatron convention, softmax, k of N).
//
// Every figure is meant to be read as a ratio to references measured in the same binary:
//   BM_Copy<S>                         memcpy of the T x N logits into a gradient-sized buffer
//                                      (the memory-traffic floor of any forward+backward)
//   BM_NaiveEigen_Forward<S>           the loss as a user would write it with Eigen expressions
//   BM_NaiveEigen_ForwardBackward<S>   ... plus the analytic gradient
//   BM_Moebal_Forward<S>               moebal::SwitchAuxLoss<S>::forward
//   BM_Moebal_ForwardBackward<S>       moebal::SwitchAuxLoss<S>::forward_backward
//   BM_Moebal_ForwardThenBackward<S>   forward, then backward (the recompute path)
// Arguments: T (tokens), N (experts), k. BM_Copy depends on T and N only and has no k.
// Counters: bytes_per_second = T N sizeof(S) per iteration (the logits, read once) and
// time_per_token (seconds in JSON; the console prints it with an SI prefix, e.g. "4.2ns").
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

#include "moebal/losses/combined.hpp"
#include "moebal/losses/switch.hpp"

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
  result.grad_rel = static_cast<double>((naive_grad - grad).cwiseAbs().maxCoeff()) /
                    static_cast<double>(grad.cwiseAbs().maxCoeff());
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
// Benchmarks. state.range(0) = T, range(1) = N, range(2) = k (not for BM_Copy).

template <class S>
void BM_Copy(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1);
  const RowMatrix<S>& src = logits_for<S>(tokens, experts);
  RowMatrix<S> dst = RowMatrix<S>::Zero(tokens, experts);  // pages touched before timing
  const std::size_t bytes = static_cast<std::size_t>(tokens * experts) * sizeof(S);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, tokens, experts, sizeof(S));
}

template <class S>
void BM_NaiveEigen_Forward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1), k = state.range(2);
  if (!naive_agrees<S>(state, tokens, experts, k)) return;
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  NaiveSwitch<S> naive(tokens, experts, k);
  benchmark::DoNotOptimize(naive.forward(x));  // warm-up: touches the workspace
  for (auto _ : state) {
    S value = naive.forward(x);
    benchmark::DoNotOptimize(value);
    benchmark::ClobberMemory();
  }
  set_counters(state, tokens, experts, sizeof(S));
}

template <class S>
void BM_NaiveEigen_ForwardBackward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1), k = state.range(2);
  if (!naive_agrees<S>(state, tokens, experts, k)) return;
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  NaiveSwitch<S> naive(tokens, experts, k);
  RowMatrix<S> grad = RowMatrix<S>::Zero(tokens, experts);
  benchmark::DoNotOptimize(naive.forward(x));
  naive.backward(grad);
  for (auto _ : state) {
    S value = naive.forward(x);
    naive.backward(grad);
    benchmark::DoNotOptimize(value);
    benchmark::DoNotOptimize(grad.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, tokens, experts, sizeof(S));
}

template <class S>
void BM_Moebal_Forward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1), k = state.range(2);
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  moebal::SwitchAuxLoss<S> loss(experts, k);
  benchmark::DoNotOptimize(loss.forward(x));  // warm-up: sizes the per-token workspace
  for (auto _ : state) {
    S value = loss.forward(x);
    benchmark::DoNotOptimize(value);
    benchmark::ClobberMemory();
  }
  set_counters(state, tokens, experts, sizeof(S));
}

template <class S>
void BM_Moebal_ForwardBackward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1), k = state.range(2);
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  moebal::SwitchAuxLoss<S> loss(experts, k);
  RowMatrix<S> grad = RowMatrix<S>::Zero(tokens, experts);
  benchmark::DoNotOptimize(loss.forward_backward(x, grad));
  for (auto _ : state) {
    S value = loss.forward_backward(x, grad);
    benchmark::DoNotOptimize(value);
    benchmark::DoNotOptimize(grad.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, tokens, experts, sizeof(S));
}

template <class S>
void BM_Moebal_ForwardThenBackward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1), k = state.range(2);
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  moebal::SwitchAuxLoss<S> loss(experts, k);
  RowMatrix<S> grad = RowMatrix<S>::Zero(tokens, experts);
  benchmark::DoNotOptimize(loss.forward(x));
  loss.backward(x, grad);
  for (auto _ : state) {
    S value = loss.forward(x);
    loss.backward(x, grad);
    benchmark::DoNotOptimize(value);
    benchmark::DoNotOptimize(grad.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, tokens, experts, sizeof(S));
}

// The combined objective (Switch + z-loss + sequence-level + importance CV^2, one pass) with
// every term active, for the "at most 1.3x the Switch loss alone" target. Sequences of 1024
// tokens, sequence-major (Megatron-core).
template <class S>
void BM_Combined_ForwardBackward(benchmark::State& state) {
  const Index tokens = state.range(0), experts = state.range(1), k = state.range(2);
  const RowMatrix<S>& x = logits_for<S>(tokens, experts);
  moebal::CombinedOptions options;
  options.weights = {1e-2, 1e-3, 1e-3, 1e-2};
  options.layout = moebal::SequenceLayout::sequence_major(tokens >= 1024 ? 1024 : tokens);
  moebal::CombinedAuxLoss<S> loss(experts, k, options);
  RowMatrix<S> grad = RowMatrix<S>::Zero(tokens, experts);
  benchmark::DoNotOptimize(loss.forward_backward(x, grad));
  for (auto _ : state) {
    S value = loss.forward_backward(x, grad);
    benchmark::DoNotOptimize(value);
    benchmark::DoNotOptimize(grad.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, tokens, experts, sizeof(S));
}

// ---------------------------------------------------------------------------------------------
// Registration, shape by shape (so each shape's logits are generated once).

struct Shape {
  Index tokens, experts, k;
};

// Ordered so that shapes sharing (T, N) are adjacent (one BM_Copy per (T, N)).
constexpr Shape kShapes[] = {
    {4096, 8, 2}, {65536, 64, 2}, {65536, 64, 8}, {262144, 64, 2}, {65536, 256, 8},
};

using BenchFunction = void (*)(benchmark::State&);

void configure(benchmark::internal::Benchmark* b, std::vector<std::int64_t> args,
               std::vector<std::string> names) {
  b->Args(args)->ArgNames(names)->Unit(benchmark::kMillisecond);
}

template <class S>
void register_shape(const Shape& shape, bool with_copy) {
  const std::string suffix = std::string("<") + scalar_name<S>() + ">";
  if (with_copy) {
    configure(benchmark::RegisterBenchmark(("BM_Copy" + suffix).c_str(), &BM_Copy<S>),
              {shape.tokens, shape.experts}, {"T", "N"});
  }
  const std::pair<const char*, BenchFunction> benchmarks[] = {
      {"BM_NaiveEigen_Forward", &BM_NaiveEigen_Forward<S>},
      {"BM_NaiveEigen_ForwardBackward", &BM_NaiveEigen_ForwardBackward<S>},
      {"BM_Moebal_Forward", &BM_Moebal_Forward<S>},
      {"BM_Moebal_ForwardBackward", &BM_Moebal_ForwardBackward<S>},
      {"BM_Moebal_ForwardThenBackward", &BM_Moebal_ForwardThenBackward<S>},
      {"BM_Combined_ForwardBackward", &BM_Combined_ForwardBackward<S>},
  };
  for (const auto& [name, function] : benchmarks) {
    configure(benchmark::RegisterBenchmark((name + suffix).c_str(), function),
              {shape.tokens, shape.experts, shape.k}, {"T", "N", "k"});
  }
}

void register_all() {
  Index last_tokens = -1, last_experts = -1;
  for (const Shape& shape : kShapes) {
    const bool new_size = shape.tokens != last_tokens || shape.experts != last_experts;
    register_shape<float>(shape, new_size);
    register_shape<double>(shape, new_size);
    last_tokens = shape.tokens;
    last_experts = shape.experts;
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
