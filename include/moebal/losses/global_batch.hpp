// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// Micro-batch and global-batch balance (Qiu et al. 2025, "Demons in the Detail: On
/// Implementing Load Balancing Loss for Training Specialized Mixture-of-Expert Models").
///
/// The Switch loss a N sum_i f_i P_i can take f from the micro-batch (the usual
/// implementation) or from the global batch: every micro-batch of the optimizer step on every
/// data-parallel rank. Global f lets experts specialize by domain; since f is N numbers, the
/// synchronization is almost free. Three modes:
///
///  - micro-batch (Megatron-core `aux_loss`): `SwitchAuxLoss` on each micro-batch, averaged
///    over the M micro-batches of a step (call backward with scale 1 / M).
///  - global, exact (`GlobalBatchBalance`): phase 1 `count`s the routing of every micro-batch
///    (top-k counts and real tokens; forward only), `synchronize` sums those counts over ranks;
///    phase 2 gives each micro-batch j its share of the loss and its gradient with the global
///    fbar and its local score sums S^j:
///      tokens weighting (default): L_j = a N sum_i fbar_i S_i^j / Tbar, so that the shares of
///        every micro-batch on every rank sum to a N sum_i fbar_i Pbar_i, the Switch loss of
///        the concatenated global batch (and its gradient rows are that loss's gradient rows);
///      micro-batch mean (the paper): L_j = (1 / Mbar) a N sum_i fbar_i P_i^j, P^j = S^j / T_j,
///    with Tbar the global real-token count and Mbar the global number of micro-batches.
///  - global, running (`RunningGlobalBalance`, Megatron-core `global_aux_loss` parity): each
///    micro-batch's counts are summed over ranks as it is processed; micro-batch j uses the
///    running mean of the counts of micro-batches 1..j, f = mean / (k T_j) with T_j the global
///    real-token count of micro-batch j; `reset` at each optimizer step. Megatron-core sums only
///    the local scores but divides them by the global token count (P = S_local / T_j), so its
///    loss and gradient are 1/R (R ranks) of the micro-batch loss at the same coefficient
///    (Megatron-LM issue #3672). moebal's default scaling uses the local token count
///    (P = S_local / T_local, `RunningScaling::corrected`); `RunningScaling::megatron`
///    reproduces Megatron-core exactly.
///
/// Any mode can add the micro-batch loss at a small weight (`micro_batch_weight`; the paper uses
/// 0.01 of the global coefficient) to keep each micro-batch balanced for speed.
///
/// Synchronization contract: a callable `sync(double* data, Index size)` that replaces
/// data[0..size) on every rank with the element-wise sum over ranks, in place (an all-reduce
/// SUM: `MPI_Allreduce(MPI_IN_PLACE, ..., MPI_SUM)`, `torch.distributed.all_reduce`, NCCL or
/// Gloo). Every rank calls it the same number of times. moebal first reduces a small header
/// (N, k, the mode, the payload size, an error flag) and checks that every rank agrees, so that
/// mismatched N or k, or an invalid micro-batch on any rank, raise `moebal::invalid_argument`
/// on every rank instead of hanging or summing unrelated buffers. Counts are integer-valued
/// doubles: their sums are exact up to 2^53. `<moebal/mpi.hpp>` provides an MPI adapter.

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/statistics.hpp"
#include "moebal/core/types.hpp"
#include "moebal/detail/input.hpp"
#include "moebal/detail/scored_rows.hpp"
#include "moebal/losses/switch.hpp"

namespace moebal {

/// The synchronization callable for a single process: leaves the buffer as it is.
struct NoSync {
  void operator()(double*, Index) const noexcept {}
};

/// How the exact global loss is shared between micro-batches.
enum class GlobalWeighting {
  /// L_j = a N sum_i fbar_i S_i^j / Tbar: the shares sum to the global-batch Switch loss.
  tokens,
  /// L_j = (1 / Mbar) a N sum_i fbar_i P_i^j: the mean over micro-batches (Qiu et al.).
  micro_batch_mean,
};

/// How the running global loss scales P (see the file comment).
enum class RunningScaling {
  /// P = S_local / T_local (default; the loss has the micro-batch loss's scale).
  corrected,
  /// P = S_local / T_global, as Megatron-core `global_aux_loss` (1/R of the above).
  megatron,
};

/// Options of the global-batch losses.
struct GlobalBatchOptions {
  /// f's convention (Megatron-core: c / (T k); Hugging Face: c / T; first choice).
  SwitchConvention convention = SwitchConvention::megatron;
  ScoreFunction score = ScoreFunction::softmax;
  /// The coefficient a of the global term, finite.
  double coefficient = 1.0;
  /// Exact mode only.
  GlobalWeighting weighting = GlobalWeighting::tokens;
  /// Running mode only.
  RunningScaling scaling = RunningScaling::corrected;
  /// Coefficient of the added micro-batch Switch loss (f and P of the micro-batch alone);
  /// 0 (default) adds nothing. Qiu et al. use 0.01 x `coefficient`. It applies to each
  /// micro-batch's own loss: over M micro-batches of a step the added terms sum to M times
  /// this weight (divide by M for a step-level weight, as examples/train_toy_moe does).
  double micro_batch_weight = 0.0;
};

namespace detail {

inline void check_global_options(const char* function, Index num_experts, Index k,
                                 const GlobalBatchOptions& options) {
  SwitchOptions switch_options;
  switch_options.convention = options.convention;
  switch_options.score = options.score;
  switch_options.coefficient = options.coefficient;
  check_switch_config(function, num_experts, k, switch_options);
  check_finite_parameter(function, "options.micro_batch_weight", options.micro_batch_weight);
  if (options.weighting != GlobalWeighting::tokens &&
      options.weighting != GlobalWeighting::micro_batch_mean) {
    throw_invalid(function, "options.weighting", "tokens or micro_batch_mean",
                  concat(int(options.weighting)));
  }
  if (options.scaling != RunningScaling::corrected && options.scaling != RunningScaling::megatron) {
    throw_invalid(function, "options.scaling", "corrected or megatron", concat(int(options.scaling)));
  }
}

/// Reduces a header that every rank must agree on, then (if it agrees and no rank reported an
/// error) the payload. Throws `moebal::invalid_argument` on every rank otherwise.
template <class Sync>
void checked_all_reduce(const char* function, Sync& sync, Index num_experts, Index k, int mode,
                        const std::string& local_error, double* payload, Index payload_size) {
  const double n = double(num_experts), kk = double(k), m = double(mode),
               p = double(payload_size);
  double header[10] = {1.0, n, n * n, kk, kk * kk, m, m * m, p, p * p,
                       local_error.empty() ? 0.0 : 1.0};
  sync(header, Index(10));
  const double ranks = header[0];
  const bool agree = header[1] == ranks * n && header[2] == ranks * n * n &&
                     header[3] == ranks * kk && header[4] == ranks * kk * kk &&
                     header[5] == ranks * m && header[6] == ranks * m * m &&
                     header[7] == ranks * p && header[8] == ranks * p * p;
  if (!agree) {
    throw_invalid(function, "sync",
                  concat("every rank to use the same N = ", num_experts, ", k = ", k,
                         " and loss mode"),
                  concat("ranks that disagree (mean N over ", ranks, " ranks = ",
                         header[1] / ranks, ", mean k = ", header[3] / ranks, ")"));
  }
  if (header[9] > 0.0) {
    if (!local_error.empty()) throw invalid_argument(local_error);
    throw_invalid(function, "logits", "a valid micro-batch on every rank",
                  concat("an invalid micro-batch on ", header[9], " other rank(s)"));
  }
  sync(payload, payload_size);
}

}  // namespace detail

/// Exact global-batch balance in two phases (see the file comment). Usage per optimizer step:
///   for each micro-batch j: balance.count(logits_j, mask_j);       // phase 1, forward only
///   balance.synchronize(sync);                                     // all ranks
///   for each micro-batch j: loss += balance.forward_backward(logits_j, grad_j, mask_j);
///   balance.reset();                                               // next step
/// count never throws for its inputs: an invalid micro-batch (wrong shape, NaN logits, bad
/// mask) is reported by synchronize, on every rank, so that no rank is left waiting.
/// @tparam Scalar float or double (sums accumulate in double).
/// Threads: `count` and the forward run blocks of rows on `moebal::num_threads()` threads
/// (partials added in block order), the backward runs row chunks; results are bitwise identical
/// for any thread count (<moebal/core/threads.hpp>).
template <class Scalar>
class GlobalBatchBalance {
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::GlobalBatchBalance<Scalar>: Scalar must be float, double, "
                "Eigen::bfloat16 or Eigen::half");

 public:
  /// The compute type: float for bfloat16/half logits, Scalar otherwise.
  using Compute = compute_type_t<Scalar>;

  /// @throws moebal::invalid_argument for N < 1, k out of range, invalid options.
  GlobalBatchBalance(Index num_experts, Index k, const GlobalBatchOptions& options = {})
      : options_(options) {
    detail::check_global_options("moebal::GlobalBatchBalance", num_experts, k, options);
    rows_.reset(num_experts, k, options.score, /*unordered=*/true);
    payload_.assign(static_cast<std::size_t>(2 + 2 * num_experts), 0.0);
    local_.setZero(num_experts);
    local_first_.setZero(num_experts);
    sums_.setZero(num_experts);
    f_global_.setZero(num_experts);
    f_local_.setZero(num_experts);
    g_.setZero(num_experts);
    g_compute_.setZero(num_experts);
    micro_counts_.setZero(num_experts);
    micro_first_.setZero(num_experts);
    global_counts_.setZero(num_experts);
  }

  /// Phase 1: adds one micro-batch's top-k counts and real tokens. Errors are deferred to
  /// `synchronize`. @throws moebal::invalid_argument if called after `synchronize` (call
  /// `reset` to start the next step).
  template <class Derived>
  void count(const Eigen::MatrixBase<Derived>& logits, const TokenMask& mask = {}) {
    static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                  "moebal::GlobalBatchBalance<Scalar> takes logits of the same Scalar");
    constexpr const char* function = "moebal::GlobalBatchBalance::count";
    if (synchronized_) {
      detail::throw_invalid(function, "this", "counting before synchronize (reset() starts a step)",
                            "a call after synchronize");
    }
    micro_batches_ += 1.0;
    try {
      const detail::RowInput<Scalar> x(logits);
      detail::check_logits_columns(function, x.rows(), x.cols(), rows_.num_experts());
      detail::check_mask(function, mask, x.rows());
      accumulate(function, x, mask, local_, local_first_, &tokens_, nullptr);
    } catch (const invalid_argument& error) {
      if (error_.empty()) error_ = error.what();
    }
  }

  /// Sums the counts of every micro-batch of every rank; call on every rank after the last
  /// `count` of the step. @param sync the all-reduce SUM callable (see the file comment).
  /// @throws moebal::invalid_argument on every rank if the ranks disagree on N or k or any
  ///   rank counted an invalid micro-batch.
  template <class Sync>
  void synchronize(Sync&& sync) {
    constexpr const char* function = "moebal::GlobalBatchBalance::synchronize";
    const Index n = rows_.num_experts();
    payload_[0] = tokens_;
    payload_[1] = micro_batches_;
    for (Index i = 0; i < n; ++i) {
      payload_[std::size_t(2 + i)] = local_[i];
      payload_[std::size_t(2 + n + i)] = local_first_[i];
    }
    detail::checked_all_reduce(function, sync, n, rows_.k(), 1, error_, payload_.data(),
                               Index(payload_.size()));
    global_tokens_ = payload_[0];
    global_micro_batches_ = payload_[1];
    const Eigen::Map<const Eigen::VectorXd> counts(payload_.data() + 2, n);
    const Eigen::Map<const Eigen::VectorXd> first(payload_.data() + 2 + n, n);
    global_counts_ = counts;
    if (global_tokens_ > 0) {
      detail::load_fraction(options_.convention, counts, first, global_tokens_, rows_.k(), f_global_);
    } else {
      f_global_.setZero();
    }
    synchronized_ = true;
  }

  /// `synchronize` for a single process (no other rank).
  void synchronize() { synchronize(NoSync{}); }

  /// Phase 2: this micro-batch's share of the loss (see the file comment); keeps what
  /// `backward` needs. @throws moebal::invalid_argument before `synchronize`, and for invalid
  /// input as `switch_aux_loss`.
  template <class Derived>
  Compute forward(const Eigen::MatrixBase<Derived>& logits, const TokenMask& mask = {}) {
    static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                  "moebal::GlobalBatchBalance<Scalar> takes logits of the same Scalar");
    return forward_impl("moebal::GlobalBatchBalance::forward", detail::RowInput<Scalar>(logits),
                        mask, nullptr);
  }

  /// dloss_dlogits = scale * d L_j / d logits for the logits of the last forward.
  template <class Derived, class Out>
  void backward(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                Compute scale = Compute(1)) {
    backward_impl<false>("moebal::GlobalBatchBalance::backward", detail::RowInput<Scalar>(logits),
                         detail::output_ref<Scalar>(dloss_dlogits), scale, false);
  }

  /// dloss_dlogits += scale * d L_j / d logits.
  template <class Derived, class Out>
  void backward_accumulate(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                           Compute scale = Compute(1)) {
    backward_impl<true>("moebal::GlobalBatchBalance::backward_accumulate",
                        detail::RowInput<Scalar>(logits), detail::output_ref<Scalar>(dloss_dlogits),
                        scale, false);
  }

  /// forward and backward in two passes (the output buffer carries the scores between them).
  template <class Derived, class Out>
  Compute forward_backward(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                           const TokenMask& mask = {}, Compute scale = Compute(1)) {
    static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                  "moebal::GlobalBatchBalance<Scalar> takes logits of the same Scalar");
    constexpr const char* function = "moebal::GlobalBatchBalance::forward_backward";
    const detail::RowInput<Scalar> x(logits);
    detail::check_finite_parameter(function, "scale", double(scale));
    auto out = detail::output_ref<Scalar>(dloss_dlogits);
    detail::check_output_shape(function, "dloss_dlogits", out.rows(), out.cols(), x.rows(),
                               x.cols());
    // A buffer of the compute type carries the scores between the passes.
    constexpr bool fused = std::is_same_v<detail::output_scalar_t<Out>, Compute>;
    RowMatrixRef<Compute>* raw_out = nullptr;
    if constexpr (fused) raw_out = &out;
    const Compute value = forward_impl(function, x, mask, raw_out);
    backward_impl<false>(function, x, out, scale, fused);
    return value;
  }

  /// Starts the next optimizer step: clears every count.
  void reset() {
    local_.setZero();
    local_first_.setZero();
    tokens_ = 0.0;
    micro_batches_ = 0.0;
    error_.clear();
    synchronized_ = false;
  }

  /// Whether `synchronize` completed for this step.
  bool synchronized() const noexcept { return synchronized_; }
  /// fbar, the global f (valid after `synchronize`).
  const Eigen::VectorXd& global_f() const noexcept { return f_global_; }
  /// The global top-k counts (valid after `synchronize`).
  const Eigen::VectorXd& global_counts() const noexcept { return global_counts_; }
  /// Tbar, the global real-token count (valid after `synchronize`).
  double global_tokens() const noexcept { return global_tokens_; }
  /// Mbar, the global number of micro-batches (valid after `synchronize`).
  double global_micro_batches() const noexcept { return global_micro_batches_; }
  /// This rank's counts so far in the step.
  const Eigen::VectorXd& local_counts() const noexcept { return local_; }

 private:
  // One pass over real rows: counts into c and c1, real tokens into *tokens, score sums into
  // *sums (if given).
  void accumulate(const char* function, const detail::RowInput<Scalar>& x, const TokenMask& mask,
                  Eigen::VectorXd& c, Eigen::VectorXd& c1, double* tokens, Eigen::VectorXd* sums,
                  RowMatrixRef<Compute>* raw_out = nullptr) {
    rows_.forward_sums(function, x, mask, partials_, tokens, c.data(), c1.data(),
                       sums != nullptr ? sums->data() : nullptr, raw_out);
  }

  Compute forward_impl(const char* function, const detail::RowInput<Scalar>& x,
                       const TokenMask& mask, RowMatrixRef<Compute>* raw_out) {
    if (!synchronized_) {
      detail::throw_invalid(function, "this",
                            "synchronize() after counting every micro-batch of the step",
                            "a call before synchronize");
    }
    const Index n = rows_.num_experts(), k = rows_.k();
    detail::check_logits_columns(function, x.rows(), x.cols(), n);
    detail::check_mask(function, mask, x.rows());
    micro_counts_.setZero();
    micro_first_.setZero();
    sums_.setZero();
    double tokens = 0.0;
    accumulate(function, x, mask, micro_counts_, micro_first_, &tokens, &sums_, raw_out);
    const double a = options_.coefficient, nn = double(n);
    double value = 0.0;
    g_.setZero();
    if (global_tokens_ > 0 && tokens > 0) {
      if (options_.weighting == GlobalWeighting::tokens) {
        value = a * nn * f_global_.dot(sums_) / global_tokens_;
        g_ = (a * nn / global_tokens_) * f_global_;
      } else {
        const double w = a * nn / (global_micro_batches_ * tokens);
        value = w * f_global_.dot(sums_);
        g_ = w * f_global_;
      }
    }
    if (options_.micro_batch_weight != 0.0 && tokens > 0) {
      detail::load_fraction(options_.convention, micro_counts_, micro_first_, tokens, k, f_local_);
      const double w = options_.micro_batch_weight * nn / tokens;
      value += w * f_local_.dot(sums_);
      g_ += w * f_local_;
    }
    g_compute_ = g_.array().template cast<Compute>();
    value_ = value;
    return static_cast<Compute>(value);
  }

  template <bool Accumulate, class Out>
  void backward_impl(const char* function, const detail::RowInput<Scalar>& x, RowMatrixRef<Out> out,
                     Compute scale, bool raw_in_out) {
    rows_.template backward_constant<Accumulate>(function, x, out, scale, g_compute_.data(),
                                                 raw_in_out);
  }

  GlobalBatchOptions options_;
  detail::ScoredRows<Scalar> rows_;
  std::vector<detail::SelectionSums> partials_;  // pass 1's block partials (<= 64), reused
  std::vector<double> payload_;
  Eigen::VectorXd local_, local_first_, sums_, micro_counts_, micro_first_;
  Eigen::VectorXd global_counts_, f_global_, f_local_, g_;
  detail::ScratchArray<Compute> g_compute_;
  double tokens_ = 0.0, micro_batches_ = 0.0;
  double global_tokens_ = 0.0, global_micro_batches_ = 0.0;
  double value_ = 0.0;
  std::string error_;
  bool synchronized_ = false;
};

/// Running global-batch balance (Megatron-core `global_aux_loss` parity; see the file comment).
/// Per micro-batch j, on every rank: `forward(logits_j, sync, mask_j)` sums this micro-batch's
/// counts over ranks, updates the running mean and returns L_j; then `backward`. `reset` at
/// each optimizer step.
/// @tparam Scalar float or double.
/// Threads: `count` and the forward run blocks of rows on `moebal::num_threads()` threads
/// (partials added in block order), the backward runs row chunks; results are bitwise identical
/// for any thread count (<moebal/core/threads.hpp>).
template <class Scalar>
class RunningGlobalBalance {
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::RunningGlobalBalance<Scalar>: Scalar must be float, double, "
                "Eigen::bfloat16 or Eigen::half");

 public:
  /// The compute type: float for bfloat16/half logits, Scalar otherwise.
  using Compute = compute_type_t<Scalar>;

  /// @throws moebal::invalid_argument for N < 1, k out of range, invalid options.
  RunningGlobalBalance(Index num_experts, Index k, const GlobalBatchOptions& options = {})
      : options_(options) {
    detail::check_global_options("moebal::RunningGlobalBalance", num_experts, k, options);
    rows_.reset(num_experts, k, options.score, /*unordered=*/true);
    payload_.assign(static_cast<std::size_t>(1 + 2 * num_experts), 0.0);
    running_.setZero(num_experts);
    running_first_.setZero(num_experts);
    mean_.setZero(num_experts);
    mean_first_.setZero(num_experts);
    counts_.setZero(num_experts);
    first_.setZero(num_experts);
    sums_.setZero(num_experts);
    f_.setZero(num_experts);
    f_local_.setZero(num_experts);
    g_.setZero(num_experts);
    g_compute_.setZero(num_experts);
  }

  /// Reads micro-batch j's logits, sums its counts over ranks with `sync` (on every rank),
  /// updates the running mean and returns L_j.
  /// @throws moebal::invalid_argument on every rank if the ranks disagree on N or k or any
  ///   rank's micro-batch is invalid.
  template <class Derived, class Sync>
  Compute forward(const Eigen::MatrixBase<Derived>& logits, Sync&& sync,
                  const TokenMask& mask = {}) {
    static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                  "moebal::RunningGlobalBalance<Scalar> takes logits of the same Scalar");
    return forward_impl("moebal::RunningGlobalBalance::forward", detail::RowInput<Scalar>(logits),
                        sync, mask, nullptr);
  }

  /// dloss_dlogits = scale * d L_j / d logits for the logits of the last forward.
  template <class Derived, class Out>
  void backward(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                Compute scale = Compute(1)) {
    backward_impl<false>("moebal::RunningGlobalBalance::backward", detail::RowInput<Scalar>(logits),
                         detail::output_ref<Scalar>(dloss_dlogits), scale, false);
  }

  /// dloss_dlogits += scale * d L_j / d logits.
  template <class Derived, class Out>
  void backward_accumulate(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                           Compute scale = Compute(1)) {
    backward_impl<true>("moebal::RunningGlobalBalance::backward_accumulate",
                        detail::RowInput<Scalar>(logits), detail::output_ref<Scalar>(dloss_dlogits),
                        scale, false);
  }

  /// forward and backward in two passes.
  template <class Derived, class Out, class Sync>
  Compute forward_backward(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                           Sync&& sync, const TokenMask& mask = {}, Compute scale = Compute(1)) {
    static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                  "moebal::RunningGlobalBalance<Scalar> takes logits of the same Scalar");
    constexpr const char* function = "moebal::RunningGlobalBalance::forward_backward";
    const detail::RowInput<Scalar> x(logits);
    detail::check_finite_parameter(function, "scale", double(scale));
    auto out = detail::output_ref<Scalar>(dloss_dlogits);
    const bool shape_ok = out.rows() == x.rows() && out.cols() == x.cols();
    // A buffer of the compute type carries the scores between the passes.
    constexpr bool fused = std::is_same_v<detail::output_scalar_t<Out>, Compute>;
    RowMatrixRef<Compute>* raw_out = nullptr;
    if constexpr (fused) raw_out = shape_ok ? &out : nullptr;
    const Compute value = forward_impl(function, x, sync, mask, raw_out);
    detail::check_output_shape(function, "dloss_dlogits", out.rows(), out.cols(), x.rows(),
                               x.cols());
    backward_impl<false>(function, x, out, scale, fused);
    return value;
  }

  /// Starts the next optimizer step: clears the running counts.
  void reset() {
    running_.setZero();
    running_first_.setZero();
    steps_ = 0;
  }

  /// f of the last forward (running mean of the global counts over k T_j).
  const Eigen::VectorXd& f() const noexcept { return f_; }
  /// The global real-token count T_j of the last forward's micro-batch.
  double global_tokens() const noexcept { return global_tokens_; }
  /// Micro-batches seen in this step.
  Index steps() const noexcept { return steps_; }

 private:
  template <class Sync>
  Compute forward_impl(const char* function, const detail::RowInput<Scalar>& x, Sync& sync,
                       const TokenMask& mask, RowMatrixRef<Compute>* raw_out) {
    const Index n = rows_.num_experts(), k = rows_.k();
    counts_.setZero();
    first_.setZero();
    sums_.setZero();
    double tokens = 0.0;
    std::string error;
    try {
      detail::check_logits_columns(function, x.rows(), x.cols(), n);
      detail::check_mask(function, mask, x.rows());
      rows_.forward_sums(function, x, mask, partials_, &tokens, counts_.data(), first_.data(),
                         sums_.data(), raw_out);
    } catch (const invalid_argument& e) {
      error = e.what();
    }
    payload_[0] = tokens;
    for (Index i = 0; i < n; ++i) {
      payload_[std::size_t(1 + i)] = counts_[i];
      payload_[std::size_t(1 + n + i)] = first_[i];
    }
    detail::checked_all_reduce(function, sync, n, k, 2, error, payload_.data(),
                               Index(payload_.size()));
    global_tokens_ = payload_[0];
    running_ += Eigen::Map<const Eigen::VectorXd>(payload_.data() + 1, n);
    running_first_ += Eigen::Map<const Eigen::VectorXd>(payload_.data() + 1 + n, n);
    ++steps_;
    // Megatron-core: tokens_per_expert = the running mean, total_num_tokens = T_j (global).
    f_.setZero();
    g_.setZero();
    double value = 0.0;
    const double a = options_.coefficient, nn = double(n), steps = double(steps_);
    if (global_tokens_ > 0 && tokens > 0) {
      mean_ = running_ / steps;
      mean_first_ = running_first_ / steps;
      detail::load_fraction(options_.convention, mean_, mean_first_, global_tokens_, k, f_);
      const double denominator =
          options_.scaling == RunningScaling::corrected ? tokens : global_tokens_;
      value = a * nn * f_.dot(sums_) / denominator;
      g_ = (a * nn / denominator) * f_;
    }
    if (options_.micro_batch_weight != 0.0 && tokens > 0) {
      detail::load_fraction(options_.convention, counts_, first_, tokens, k, f_local_);
      const double w = options_.micro_batch_weight * nn / tokens;
      value += w * f_local_.dot(sums_);
      g_ += w * f_local_;
    }
    g_compute_ = g_.array().template cast<Compute>();
    return static_cast<Compute>(value);
  }

  template <bool Accumulate, class Out>
  void backward_impl(const char* function, const detail::RowInput<Scalar>& x, RowMatrixRef<Out> out,
                     Compute scale, bool raw_in_out) {
    rows_.template backward_constant<Accumulate>(function, x, out, scale, g_compute_.data(),
                                                 raw_in_out);
  }

  GlobalBatchOptions options_;
  detail::ScoredRows<Scalar> rows_;
  std::vector<detail::SelectionSums> partials_;  // pass 1's block partials (<= 64), reused
  std::vector<double> payload_;
  Eigen::VectorXd running_, running_first_, mean_, mean_first_, counts_, first_, sums_, f_,
      f_local_, g_;
  detail::ScratchArray<Compute> g_compute_;
  double global_tokens_ = 0.0;
  Index steps_ = 0;
};

}  // namespace moebal
