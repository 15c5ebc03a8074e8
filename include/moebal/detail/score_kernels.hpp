// SPDX-License-Identifier: Apache-2.0
#pragma once

// Internal: per-row score kernels shared by every loss and router.
//
// A row's scores are computed in two steps so that any later pass can rebuild them bitwise:
//   raw_j = exp(x_j - max_j x_j)   (softmax)     or   sigmoid(x_j)   (sigmoid)
//   q_j   = raw_j * inv            inv = 1 / sum_j raw_j   or   1 / (sum_j raw_j + 1e-20)
// `raw` is always computed into an aligned scratch array (so Eigen's vectorized exp splits the
// row the same way every time) and summed with a fixed lane order (detail/reduce.hpp).
// Storage type S (what the caller's logits hold) and compute type C are separate parameters.

#include <Eigen/Core>
#include <cmath>
#include <limits>
#include <type_traits>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"
#include "moebal/detail/reduce.hpp"

namespace moebal {
namespace detail {

template <class C>
using ScratchArray = Eigen::Array<C, Eigen::Dynamic, 1>;

/// Reads rows of logits stored as S in the compute type C: for S == C the row is used in place
/// (no copy, no cost); for half-precision storage each row is converted into an aligned
/// scratch row of C, one row at a time, so the T x N logits are still read in place and never
/// copied as a whole.
template <class S, class C>
class RowReader {
 public:
  void resize(Index n) {
    if constexpr (!std::is_same_v<S, C>) row_.resize(n);
    (void)n;
  }
  /// Row of n values at `x`, in C. Valid until the next call.
  const C* read(const S* x, Index n) {
    if constexpr (std::is_same_v<S, C>) {
      (void)n;
      return x;
    } else {
      MOEBAL_ASSERT(row_.size() >= n);
      C* out = row_.data();
      for (Index j = 0; j < n; ++j) out[j] = static_cast<C>(x[j]);
      return out;
    }
  }

 private:
  Eigen::Array<C, Eigen::Dynamic, 1> row_;
};

/// dst = value (or dst += value, `Accumulate`) with one rounding to the output type Out.
template <bool Accumulate, class C, class Out>
inline void store(Out& dst, C value) {
  if constexpr (std::is_same_v<Out, C>) {
    if constexpr (Accumulate) {
      dst += value;
    } else {
      dst = value;
    }
  } else if constexpr (Accumulate) {
    dst = static_cast<Out>(static_cast<C>(static_cast<float>(dst)) + value);
  } else {
    dst = static_cast<Out>(value);
  }
}

/// What a pass needs to rebuild a row's scores from its raw values: q_j = raw_j * inv.
/// `shift` is the subtracted maximum (softmax only). `inv == 0` marks a padded token, which
/// never happens for a real one (inv >= 1/N for softmax, inv >= 1/(N + 1e-20) for sigmoid).
template <class C>
struct RowNorm {
  C shift = C(0);
  C inv = C(0);
};

/// log of the smallest normal number: exp of anything below is flushed to 0.
template <class C>
inline const C kLogSmallestNormal = std::log(std::numeric_limits<C>::min());

/// Megatron-core's epsilon for the normalized sigmoid.
template <class C>
inline constexpr C kSigmoidNormEps = C(1e-20);

/// Computes raw_j for one row of n logits into `raw` (size n) and the row's normalizer.
/// Returns false if the row is not a valid input: a NaN or +Inf logit, or (softmax) every
/// logit -Inf.
template <class S, class C>
bool raw_scores(const S* x, Index n, ScoreFunction score, ScratchArray<C>& raw, RowNorm<C>& norm) {
  MOEBAL_ASSERT(raw.size() == n);
  const Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, 1>> xs(x, n);
  const C max = static_cast<C>(xs.maxCoeff());
  if (score == ScoreFunction::softmax) {
    // Eigen 3.4's vectorized exp returns a tiny positive floor (about 3e-39 in float) for
    // arguments below the normal range, -Inf included. Below log(smallest normal) the result is
    // flushed to exactly 0 instead, so -Inf logits get probability 0 as in PyTorch (the values
    // replaced are below 1.2e-38 in float, 2.3e-308 in double).
    raw = (xs.template cast<C>() - max).exp();
    const C lowest = kLogSmallestNormal<C>;
    C* r = raw.data();
    for (Index j = 0; j < n; ++j) {
      r[j] = static_cast<C>(x[j]) - max < lowest ? C(0) : r[j];
    }
    const C sum = lane_sum(raw.data(), n);
    // NaN, +Inf (inf - inf) and an all -Inf row (-inf - -inf) all make the sum NaN.
    norm.shift = max;
    norm.inv = C(1) / sum;
    return std::isfinite(sum) && sum > C(0);
  }
  raw = (C(1) + (-xs.template cast<C>()).exp()).inverse();
  const C sum = lane_sum(raw.data(), n);
  norm.shift = C(0);
  norm.inv = C(1) / (sum + kSigmoidNormEps<C>);
  return std::isfinite(sum) && max != std::numeric_limits<C>::infinity();
}

/// Builds the message for a row that `raw_scores` rejected and throws it.
template <class S>
[[noreturn]] void throw_invalid_row(const char* function, const S* x, Index n, Index row,
                                    ScoreFunction score) {
  for (Index j = 0; j < n; ++j) {
    const S v = x[j];
    if (std::isnan(v) || v == std::numeric_limits<S>::infinity()) {
      throw_invalid(function, "logits", "finite values or -Inf (no NaN, no +Inf)",
                    concat(v, " at row ", row, ", column ", j));
    }
  }
  throw_invalid(function, "logits",
                concat("at least one logit above -Inf in every real token's row (",
                       to_string(score), " of an all -Inf row is undefined)"),
                concat("every logit -Inf in row ", row));
}

/// q_j = raw_j * inv into `q` (size n).
template <class C>
void scores_from_raw(const ScratchArray<C>& raw, const RowNorm<C>& norm, ScratchArray<C>& q) {
  q = raw * norm.inv;
}

/// sum_i g_i q_i for one row, as inv * sum_i g_i raw_i (the same rounding in every pass).
template <class C>
C dot_with_scores(const C* g, const C* raw, const RowNorm<C>& norm, Index n) {
  return lane_dot(g, raw, n) * norm.inv;
}

/// Vector-Jacobian product of the score function for one row:
///   dx_j = w_j * (g_j - sum_i g_i q_i),   w_j = q_j (softmax) or raw_j (1 - raw_j) inv (sigmoid)
/// where g = d loss / d q. `raw` holds the row's raw values (from the caller's buffer or a
/// recomputation), `dx` may alias nothing else. `Accumulate` adds instead of writing.
template <bool Accumulate, class C, class Out>
void score_vjp_row(const C* raw, const RowNorm<C>& norm, const C* g, C g_dot_q, C scale,
                   ScoreFunction score, Index n, Out* dx) {
  if (score == ScoreFunction::softmax) {
    for (Index j = 0; j < n; ++j) {
      store<Accumulate>(dx[j], C(scale * (raw[j] * norm.inv) * (g[j] - g_dot_q)));
    }
  } else {
    for (Index j = 0; j < n; ++j) {
      store<Accumulate>(dx[j], C(scale * (raw[j] * (C(1) - raw[j]) * norm.inv) * (g[j] - g_dot_q)));
    }
  }
}

}  // namespace detail
}  // namespace moebal
