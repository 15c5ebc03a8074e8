// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// The router z-loss (ST-MoE, Zoph et al. 2022; Megatron-core `z_loss_func`; Hugging Face
/// Switch Transformers `router_z_loss_func`): it keeps the router's logits small.
///
///   L = a (1/T) sum_t lse_t^2,   lse_t = log sum_j exp(x_tj)   (max-subtracted, stable)
///   d L / d x_tj = a (2/T) lse_t p_tj,   p_t = softmax(x_t)
///
/// The z-loss acts on the logits directly: no score function and no selection are involved.
/// A logit of -Inf means "expert disabled" and is allowed (it gets p = 0 and zero gradient);
/// NaN and +Inf are rejected, and so is a real token whose logits are all -Inf. Stable for
/// |logits| up to 1e4 and beyond (the row maximum is subtracted before exp).
/// With a mask, the mean runs over real tokens (Megatron-core divides by the number of valid
/// tokens); padded rows get zero gradient; with no real token L = 0.

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"
#include "moebal/detail/input.hpp"
#include "moebal/detail/parallel.hpp"
#include "moebal/detail/score_kernels.hpp"

namespace moebal {

/// Options of the z-loss.
struct ZLossOptions {
  /// The coefficient a (Megatron `moe_z_loss_coeff`, HF `router_z_loss_coef`); finite.
  double coefficient = 1.0;
  /// Padding mask, length T, nonzero = real token (a view; see `TokenMask`).
  TokenMask mask{};
};

/// Result of `z_loss`.
template <class Scalar>
struct ZLossResult {
  /// L = a (1/T) sum_t lse_t^2.
  Scalar loss = Scalar(0);
  /// d L / d logits, T x N row-major (zero rows for padding).
  RowMatrix<Scalar> grad;
  /// T, the number of real tokens.
  std::int64_t tokens = 0;
  /// (1/T) sum_t lse_t^2 without the coefficient (0 when T = 0).
  double mean_squared_lse = 0.0;
};

/// The z-loss as a reusable object that allocates nothing in steady state: `forward` reads the
/// logits once and keeps lse_t and the softmax normalizer per token; `backward` writes (or
/// `backward_accumulate` adds) scale * d L / d logits into the caller's row-major buffer.
/// Both run their token chunks on up to `moebal::num_threads()` threads with results bitwise
/// identical for any thread count (see <moebal/core/threads.hpp>).
/// @tparam Scalar the logits' type: float, double, Eigen::bfloat16 or Eigen::half. Computation
///   is in `Compute` (float for bfloat16/half); sums over tokens accumulate in double. The
///   gradient buffer may hold Scalar or Compute elements.
template <class Scalar>
class ZLoss {
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::ZLoss<Scalar>: Scalar must be float, double, Eigen::bfloat16 or "
                "Eigen::half");

 public:
  /// The compute type: float for bfloat16/half logits, Scalar otherwise.
  using Compute = compute_type_t<Scalar>;

  /// @param coefficient a, finite. @throws moebal::invalid_argument otherwise.
  explicit ZLoss(double coefficient = 1.0) : coefficient_(coefficient) {
    detail::check_finite_parameter("moebal::ZLoss", "coefficient", coefficient);
  }

  /// Reads T x N logits (any Eigen expression of Scalar; row-major read in place) and returns
  /// L. @param mask length T, nonzero = real token.
  /// @throws moebal::invalid_argument for T = 0 or N = 0, a mask of the wrong length or with
  ///   NaN, a NaN or +Inf logit in a real row, or a real row of all -Inf.
  template <class Derived>
  Compute forward(const Eigen::MatrixBase<Derived>& logits, const TokenMask& mask = {}) {
    assert_scalar<Derived>();
    return forward_impl("moebal::ZLoss::forward", detail::RowInput<Scalar>(logits), mask);
  }

  /// dloss_dlogits = scale * d L / d logits for the logits of the last forward.
  /// @param dloss_dlogits T x N row-major buffer of Scalar or Compute (RowMatrix, block, Map).
  template <class Derived, class Out>
  void backward(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                Compute scale = Compute(1)) {
    assert_scalar<Derived>();
    auto out = detail::output_ref<Scalar>(dloss_dlogits);
    backward_impl<false>("moebal::ZLoss::backward", detail::RowInput<Scalar>(logits), out, scale);
  }

  /// dloss_dlogits += scale * d L / d logits (padded rows untouched).
  template <class Derived, class Out>
  void backward_accumulate(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                           Compute scale = Compute(1)) {
    assert_scalar<Derived>();
    auto out = detail::output_ref<Scalar>(dloss_dlogits);
    backward_impl<true>("moebal::ZLoss::backward_accumulate", detail::RowInput<Scalar>(logits), out,
                        scale);
  }

  /// L of the last forward.
  Compute loss() const noexcept { return static_cast<Compute>(coefficient_ * mean_squared_lse_); }
  /// (1/T) sum_t lse_t^2 of the last forward (no coefficient).
  double mean_squared_lse() const noexcept { return mean_squared_lse_; }
  /// T, real tokens of the last forward.
  std::int64_t tokens() const noexcept { return tokens_; }
  /// The coefficient a.
  double coefficient() const noexcept { return coefficient_; }

  // Internal: used by the one-line form to name itself in error messages.
  Compute forward_impl(const char* function, const detail::RowInput<Scalar>& x,
                       const TokenMask& mask) {
    rows_ = -1;
    detail::check_logits_shape(function, x.rows(), x.cols());
    detail::check_mask(function, mask, x.rows());
    const Index rows = x.rows(), n = x.cols();
    cols_ = n;
    norms_.resize(static_cast<std::size_t>(rows));
    lse_.resize(static_cast<std::size_t>(rows));
    // Rows -> chunk sums -> block sums (one thread per block) -> the total, blocks in order:
    // the same rounding for any thread count (detail/parallel.hpp).
    const Index chunks = (rows + kChunkRows - 1) / kChunkRows;
    const detail::BlockPartition partition(chunks);
    const int threads = detail::threads_for(partition.blocks);
    ensure_lanes(threads, n);
    block_sums_.resize(static_cast<std::size_t>(partition.blocks));
    block_tokens_.resize(static_cast<std::size_t>(partition.blocks));
    detail::for_blocks(partition, threads, [&](int thread, Index block) {
      Lane& lane = lanes_[static_cast<std::size_t>(thread)];
      double block_sum = 0.0;
      std::int64_t block_tokens = 0;
      for (Index chunk = partition.begin(block); chunk < partition.end(block); ++chunk) {
        const Index begin = chunk * kChunkRows, end = std::min(rows, begin + kChunkRows);
        double chunk_sum = 0.0;
        for (Index t = begin; t < end; ++t) {
          detail::RowNorm<Compute>& norm = norms_[static_cast<std::size_t>(t)];
          if (!mask.is_real(t)) {
            norm = detail::RowNorm<Compute>{};  // inv == 0 marks padding
            continue;
          }
          const Compute* row = lane.reader.read(x.data() + t * x.outerStride(), n);
          if (!detail::raw_scores(row, n, ScoreFunction::softmax, lane.raw, norm)) {
            detail::throw_invalid_row(function, row, n, t, ScoreFunction::softmax);
          }
          const Compute lse = norm.shift - std::log(norm.inv);
          lse_[static_cast<std::size_t>(t)] = lse;
          chunk_sum += double(lse) * double(lse);
          ++block_tokens;
        }
        block_sum += chunk_sum;
      }
      block_sums_[static_cast<std::size_t>(block)] = block_sum;
      block_tokens_[static_cast<std::size_t>(block)] = block_tokens;
    });
    double sum = 0.0;
    std::int64_t tokens = 0;
    for (Index block = 0; block < partition.blocks; ++block) {
      sum += block_sums_[static_cast<std::size_t>(block)];
      tokens += block_tokens_[static_cast<std::size_t>(block)];
    }
    tokens_ = tokens;
    mean_squared_lse_ = tokens > 0 ? sum / double(tokens) : 0.0;
    rows_ = rows;
    return loss();
  }

  // Internal: phase 2 into a view of the caller's buffer (Out = Scalar or Compute).
  template <bool Accumulate, class Out>
  void backward_impl(const char* function, const detail::RowInput<Scalar>& x,
                     RowMatrixRef<Out>& out, Compute scale) {
    if (rows_ < 0) {
      detail::throw_invalid(function, "logits", "the logits of a completed forward",
                            "a call before any forward completed");
    }
    if (x.rows() != rows_ || x.cols() != cols_) {
      detail::throw_invalid(
          function, "logits",
          detail::concat("the ", detail::shape_string(rows_, cols_), " logits given to forward"),
          detail::concat("shape ", detail::shape_string(x.rows(), x.cols())));
    }
    detail::check_output_shape(function, "dloss_dlogits", out.rows(), out.cols(), rows_, cols_);
    detail::check_finite_parameter(function, "scale", double(scale));
    const Index n = cols_;
    // d L / d x_tj = a (2/T) lse_t p_tj.
    const double factor = tokens_ > 0 ? double(scale) * coefficient_ * 2.0 / double(tokens_) : 0.0;
    const Index rows = rows_;
    const Index chunks = (rows + kChunkRows - 1) / kChunkRows;
    const int threads = detail::threads_for(chunks);
    ensure_lanes(threads, n);
    detail::for_chunks(chunks, threads, [&](int thread, Index chunk) {
      Lane& lane = lanes_[static_cast<std::size_t>(thread)];
      const Index begin = chunk * kChunkRows, end = std::min(rows, begin + kChunkRows);
      for (Index t = begin; t < end; ++t) {
        const detail::RowNorm<Compute>& norm = norms_[static_cast<std::size_t>(t)];
        Out* dx = out.data() + t * out.outerStride();
        if (norm.inv == Compute(0)) {
          if constexpr (!Accumulate) std::fill(dx, dx + n, Out(0));
          continue;
        }
        const Compute* row = lane.reader.read(x.data() + t * x.outerStride(), n);
        detail::RowNorm<Compute> again;
        if (!detail::raw_scores(row, n, ScoreFunction::softmax, lane.raw, again)) {
          detail::throw_invalid_row(function, row, n, t, ScoreFunction::softmax);
        }
        const Compute row_factor =
            static_cast<Compute>(factor * double(lse_[static_cast<std::size_t>(t)])) * norm.inv;
        const Compute* raw = lane.raw.data();
        for (Index j = 0; j < n; ++j) detail::store<Accumulate>(dx[j], Compute(row_factor * raw[j]));
      }
    });
  }

 private:
  template <class Derived>
  static constexpr void assert_scalar() {
    static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                  "moebal::ZLoss<Scalar> takes logits of the same Scalar: use ZLoss<float> for "
                  "float logits, ZLoss<double> for double, ZLoss<Eigen::bfloat16> for bfloat16");
  }

  // Rows per chunk of the threaded loops (fixed: results do not depend on the thread count).
  static constexpr Index kChunkRows = 512;

  // Per-thread scratch: one row's raw scores and its conversion (half-precision input).
  struct Lane {
    detail::ScratchArray<Compute> raw;
    detail::RowReader<Scalar, Compute> reader;
  };

  // Sizes `threads` lanes for N experts (allocates only when they grow).
  void ensure_lanes(int threads, Index n) {
    if (lanes_.size() < static_cast<std::size_t>(threads)) {
      lanes_.resize(static_cast<std::size_t>(threads));
    }
    for (Lane& lane : lanes_) {
      if (lane.raw.size() != n) {
        lane.raw.resize(n);
        lane.reader.resize(n);
      }
    }
  }

  double coefficient_;
  std::vector<Lane> lanes_;
  std::vector<double> block_sums_;          // per block of chunks: sum of lse^2
  std::vector<std::int64_t> block_tokens_;  // per block: real tokens
  std::vector<detail::RowNorm<Compute>> norms_;
  std::vector<Compute> lse_;
  Index rows_ = -1;
  Index cols_ = 0;
  std::int64_t tokens_ = 0;
  double mean_squared_lse_ = 0.0;
};

/// The router z-loss and its gradient in one call: L = a (1/T) sum_t (logsumexp x_t)^2,
/// d L / d x_tj = a (2/T) lse_t softmax(x_t)_j (ST-MoE; Megatron-core `z_loss_func`).
/// @param logits T x N, float, double, Eigen::bfloat16 or Eigen::half (computed in float), any
///   Eigen dense expression (row-major read in place, column-major converted once). -Inf
///   logits (disabled experts) are allowed.
/// @return in the compute type (float for half-precision logits).
/// @param options coefficient a and padding mask.
/// @return loss, grad (T x N row-major), tokens and the mean squared log-sum-exp.
/// @throws moebal::invalid_argument for T = 0 or N = 0, a non-finite coefficient, a mask of
///   the wrong length or with NaN, NaN or +Inf logits, or a real row of all -Inf.
template <class Derived>
ZLossResult<compute_type_t<typename Derived::Scalar>> z_loss(
    const Eigen::MatrixBase<Derived>& logits, const ZLossOptions& options = {}) {
  using Scalar = typename Derived::Scalar;
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::z_loss: logits must be float, double, Eigen::bfloat16 or Eigen::half; "
                "cast them first");
  constexpr const char* function = "moebal::z_loss";
  detail::check_finite_parameter(function, "options.coefficient", options.coefficient);
  const detail::RowInput<Scalar> x(logits);
  ZLoss<Scalar> loss(options.coefficient);
  ZLossResult<compute_type_t<Scalar>> result;
  result.loss = loss.forward_impl(function, x, options.mask);
  result.grad.resize(x.rows(), x.cols());
  RowMatrixRef<compute_type_t<Scalar>> grad(result.grad);
  loss.template backward_impl<false>(function, x, grad, compute_type_t<Scalar>(1));
  result.tokens = loss.tokens();
  result.mean_squared_lse = loss.mean_squared_lse();
  return result;
}

}  // namespace moebal
