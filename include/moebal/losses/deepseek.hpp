// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// DeepSeek-V2's device-level and communication balance losses (DeepSeek-AI 2024, "DeepSeek-V2:
/// A Strong, Economical, and Efficient Mixture-of-Experts Language Model", arXiv:2405.04434,
/// section "Auxiliary Loss for Load Balance": the device-level and communication balance
/// losses, next to the expert-level loss that is our Switch loss in the Megatron convention).
///
/// The N experts are split into D equal groups E_1..E_D of consecutive experts (one group per
/// device). With T real tokens, k experts per token, c_i the top-k counts and
/// P_i = (1/T) sum_t q_ti:
///   device-level:   f_i  = N / (k T) c_i,   f'_d = (1/|E_d|) sum_{i in E_d} f_i,
///                   P'_d = sum_{i in E_d} P_i,              L = a sum_d f'_d P'_d
///   communication:  f''_d = D / (M T) (number of tokens whose top-k reaches device d),
///                   P''_d = sum_{i in E_d} P_i,             L = a sum_d f''_d P''_d
/// where M is the number of devices a token may send to (device-limited routing). The counts
/// are constants, so d L / d q_tj = a f'_{d(j)} / T (device) or a f''_{d(j)} / T
/// (communication), then the score function's VJP. The selection is the plain top-k of the
/// scores (apply device-limited routing before, if you use it, and pass the same k).
/// With a mask, sums run over real tokens and padded rows get zero gradient.

#include <cstdint>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"
#include "moebal/detail/input.hpp"
#include "moebal/detail/scored_rows.hpp"

namespace moebal {

/// Which DeepSeek-V2 device term.
enum class DeviceBalanceKind {
  /// L = a sum_d f'_d P'_d (device-level balance loss).
  device,
  /// L = a sum_d f''_d P''_d (communication balance loss).
  communication,
};

/// Options of the DeepSeek-V2 device terms.
struct DeviceBalanceOptions {
  /// D, the number of devices (groups of N / D consecutive experts); must divide N.
  Index devices = 1;
  /// M, the devices a token may send to (communication loss only), 1 <= M <= D.
  Index max_devices = 1;
  ScoreFunction score = ScoreFunction::softmax;
  /// The coefficient a (DeepSeek-V2's alpha_2 or alpha_3), finite.
  double coefficient = 1.0;
  /// Padding mask (used by the one-line forms).
  TokenMask mask{};
};

/// Result of `device_balance_loss` and `communication_balance_loss`.
template <class Scalar>
struct DeviceBalanceResult {
  Scalar loss = Scalar(0);
  /// d L / d logits, T x N row-major.
  RowMatrix<Scalar> grad;
  /// f'_d (device) or f''_d (communication), length D.
  Eigen::VectorXd f;
  /// P'_d = P''_d = sum of P_i over the device's experts, length D.
  Eigen::VectorXd P;
  std::int64_t tokens = 0;
};

namespace detail {

inline void check_device_options(const char* function, Index num_experts, Index k,
                                 const DeviceBalanceOptions& options, DeviceBalanceKind kind) {
  if (num_experts < 1) throw_invalid(function, "num_experts", "at least 1 expert", concat(num_experts));
  check_k(function, k, num_experts);
  check_finite_parameter(function, "options.coefficient", options.coefficient);
  if (options.devices < 1 || num_experts % options.devices != 0) {
    throw_invalid(function, "options.devices",
                  concat("a number of devices D >= 1 dividing N = ", num_experts),
                  concat("D = ", options.devices));
  }
  if (kind == DeviceBalanceKind::communication &&
      (options.max_devices < 1 || options.max_devices > options.devices)) {
    throw_invalid(function, "options.max_devices",
                  concat("1 <= M <= D = ", options.devices), concat("M = ", options.max_devices));
  }
  if (options.score != ScoreFunction::softmax && options.score != ScoreFunction::sigmoid) {
    throw_invalid(function, "options.score", "softmax or sigmoid", concat(int(options.score)));
  }
}

}  // namespace detail

/// A DeepSeek-V2 device term as a reusable object (no allocation in steady state).
/// @tparam Scalar float or double (sums accumulate in double).
/// Threads: pass 1 runs blocks of rows on `moebal::num_threads()` threads (partials added in
/// block order), the backward runs row chunks; results are bitwise identical for any thread
/// count (<moebal/core/threads.hpp>).
template <class Scalar>
class DeviceBalanceLoss {
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::DeviceBalanceLoss<Scalar>: Scalar must be float, double, "
                "Eigen::bfloat16 or Eigen::half");

 public:
  /// The compute type: float for bfloat16/half logits, Scalar otherwise.
  using Compute = compute_type_t<Scalar>;

  /// @throws moebal::invalid_argument for N < 1, k out of range, D not dividing N, M outside
  ///   [1, D] (communication), a non-finite coefficient.
  DeviceBalanceLoss(Index num_experts, Index k, DeviceBalanceKind kind,
                    const DeviceBalanceOptions& options = {})
      : kind_(kind), options_(options) {
    detail::check_device_options("moebal::DeviceBalanceLoss", num_experts, k, options, kind);
    options_.mask = TokenMask{};
    rows_.reset(num_experts, k, options.score);
    group_ = num_experts / options.devices;
    counts_.setZero(num_experts);
    reached_.setZero(options.devices);
    sums_.setZero(num_experts);
    f_.setZero(options.devices);
    P_.setZero(options.devices);
    g_device_.setZero(options.devices);
  }

  /// Reads T x N logits and returns L.
  template <class Derived>
  Compute forward(const Eigen::MatrixBase<Derived>& logits, const TokenMask& mask = {}) {
    static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                  "moebal::DeviceBalanceLoss<Scalar> takes logits of the same Scalar");
    return forward_impl("moebal::DeviceBalanceLoss::forward", detail::RowInput<Scalar>(logits),
                        mask);
  }

  /// dloss_dlogits = scale * d L / d logits for the logits of the last forward.
  template <class Derived, class Out>
  void backward(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                Compute scale = Compute(1)) {
    backward_impl<false>("moebal::DeviceBalanceLoss::backward", detail::RowInput<Scalar>(logits),
                         detail::output_ref<Scalar>(dloss_dlogits), scale);
  }

  /// dloss_dlogits += scale * d L / d logits.
  template <class Derived, class Out>
  void backward_accumulate(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                           Compute scale = Compute(1)) {
    backward_impl<true>("moebal::DeviceBalanceLoss::backward_accumulate",
                        detail::RowInput<Scalar>(logits), detail::output_ref<Scalar>(dloss_dlogits),
                        scale);
  }

  Compute loss() const noexcept { return static_cast<Compute>(loss_); }
  /// f'_d or f''_d of the last forward.
  const Eigen::VectorXd& f() const noexcept { return f_; }
  /// P'_d of the last forward.
  const Eigen::VectorXd& P() const noexcept { return P_; }
  std::int64_t tokens() const noexcept { return static_cast<std::int64_t>(tokens_); }

  // Internal: the one-line forms name themselves in error messages.
  Compute forward_impl(const char* function, const detail::RowInput<Scalar>& x,
                       const TokenMask& mask) {
    const Index n = rows_.num_experts(), k = rows_.k(), devices = options_.devices;
    detail::check_logits_columns(function, x.rows(), x.cols(), n);
    detail::check_mask(function, mask, x.rows());
    counts_.setZero();
    reached_.setZero();
    sums_.setZero();
    tokens_ = 0;
    // Blocks of rows on the threads, each into its own partial, added in block order.
    const Index group = group_;
    const Index blocks = rows_.forward_blocks(
        function, x, mask, partials_,
        [n, devices](Partial& p) {
          p.tokens = 0.0;
          p.counts.setZero(n);
          p.reached.setZero(devices);
          p.sums.setZero(n);
        },
        [&](Partial& p, Index, const Compute* q, const detail::RowSelection<Compute>& sel,
            detail::RowWork<Scalar>& work) {
          p.tokens += 1.0;
          // work.aux (N >= D entries) marks the devices this token reaches.
          Compute* touched = work.aux.data();
          std::fill(touched, touched + devices, Compute(0));
          for (Index i = 0; i < k; ++i) {
            p.counts[sel.selected[i]] += 1.0;
            touched[sel.selected[i] / group] = Compute(1);
          }
          for (Index d = 0; d < devices; ++d) p.reached[d] += double(touched[d]);
          for (Index j = 0; j < n; ++j) p.sums[j] += double(q[j]);
        });
    for (Index b = 0; b < blocks; ++b) {
      const Partial& p = partials_[static_cast<std::size_t>(b)];
      tokens_ += p.tokens;
      counts_ += p.counts.matrix();
      reached_ += p.reached.matrix();
      sums_ += p.sums.matrix();
    }
    const double tokens = tokens_;
    loss_ = 0.0;
    f_.setZero();
    P_.setZero();
    g_device_.setZero();
    if (tokens > 0) {
      for (Index d = 0; d < devices; ++d) {
        P_[d] = sums_.segment(d * group_, group_).sum() / tokens;
        if (kind_ == DeviceBalanceKind::device) {
          // f_i = N c_i / (k T); f'_d = the mean of f_i over the device's experts.
          f_[d] = double(n) * counts_.segment(d * group_, group_).sum() /
                  (double(k) * tokens * double(group_));
        } else {
          f_[d] = double(devices) * reached_[d] / (double(options_.max_devices) * tokens);
        }
      }
      loss_ = options_.coefficient * f_.dot(P_);
      // d L / d q_tj = a f_{d(j)} / T.
      g_device_ = options_.coefficient * f_ / tokens;
    }
    return loss();
  }

 private:
  template <bool Accumulate, class Out>
  void backward_impl(const char* function, const detail::RowInput<Scalar>& x, RowMatrixRef<Out> out,
                     Compute scale) {
    rows_.check_backward(function, x, out, double(scale));
    const Index n = rows_.num_experts();
    rows_.template backward<Accumulate>(function, x, out, scale,
                                        [&](Index, const Compute*, const Index*, Compute* g) {
                                          for (Index j = 0; j < n; ++j)
                                            g[j] = static_cast<Compute>(g_device_[j / group_]);
                                        });
  }

  DeviceBalanceKind kind_;
  DeviceBalanceOptions options_;
  detail::ScoredRows<Scalar> rows_;
  // One block's partial of pass 1.
  struct Partial {
    double tokens = 0.0;
    Eigen::ArrayXd counts, reached, sums;  // N, D, N
  };
  std::vector<Partial> partials_;  // one per block (<= 64), reused
  Index group_ = 1;
  Eigen::VectorXd counts_, reached_, sums_, f_, P_, g_device_;
  double tokens_ = 0.0;
  double loss_ = 0.0;
};

namespace detail {

template <class Derived>
DeviceBalanceResult<compute_type_t<typename Derived::Scalar>> device_term(
    const char* function, const Eigen::MatrixBase<Derived>& logits, Index k,
    const DeviceBalanceOptions& options, DeviceBalanceKind kind) {
  using Scalar = typename Derived::Scalar;
  static_assert(is_supported_scalar_v<Scalar>,
                "moebal: logits must be float, double, "
                "Eigen::bfloat16 or Eigen::half");
  const RowInput<Scalar> x(logits);
  check_logits_shape(function, x.rows(), x.cols());
  check_device_options(function, x.cols(), k, options, kind);
  DeviceBalanceLoss<Scalar> loss(x.cols(), k, kind, options);
  DeviceBalanceResult<compute_type_t<Scalar>> result;
  result.loss = loss.forward_impl(function, x, options.mask);
  result.grad.resize(x.rows(), x.cols());
  loss.backward(x, result.grad);
  result.f = loss.f();
  result.P = loss.P();
  result.tokens = loss.tokens();
  return result;
}

}  // namespace detail

/// DeepSeek-V2's device-level balance loss, L = a sum_d f'_d P'_d, and its gradient.
/// @param logits T x N. @param k experts per token. @param options D (`devices`), score
///   function, coefficient, mask. @return loss, grad, f'_d, P'_d, tokens.
/// @throws moebal::invalid_argument for D not dividing N, and as `switch_aux_loss`.
template <class Derived>
DeviceBalanceResult<compute_type_t<typename Derived::Scalar>> device_balance_loss(
    const Eigen::MatrixBase<Derived>& logits, Index k, const DeviceBalanceOptions& options) {
  return detail::device_term("moebal::device_balance_loss", logits, k, options,
                             DeviceBalanceKind::device);
}

/// DeepSeek-V2's communication balance loss, L = a sum_d f''_d P''_d, and its gradient.
/// @param options D (`devices`), M (`max_devices`), score function, coefficient, mask.
/// @throws moebal::invalid_argument for D not dividing N, M outside [1, D], and as
///   `switch_aux_loss`.
template <class Derived>
DeviceBalanceResult<compute_type_t<typename Derived::Scalar>> communication_balance_loss(
    const Eigen::MatrixBase<Derived>& logits, Index k, const DeviceBalanceOptions& options) {
  return detail::device_term("moebal::communication_balance_loss", logits, k, options,
                             DeviceBalanceKind::communication);
}

}  // namespace moebal
