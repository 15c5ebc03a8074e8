// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// Routing noise, reproducible on every machine from a seed (std::mt19937_64 with moebal's own
/// uniform, normal and Gumbel transforms, so results do not depend on the standard library),
/// and Shazeer et al. 2017's noisy top-k gating with its smooth load estimator.
///
/// Selection noise: frameworks add it to the logits before routing (Tutel computes the weights
/// from the noisy logits too; DeepSpeed uses the Gumbel-noised logits only to pick the second
/// expert): pass `logits + noise` to `route`, or select on the noisy logits and gather weights
/// from the clean scores yourself.
///   `gaussian_noise(T, N, std, seed)`: N(0, std^2) entries; Tutel's `gate_noise` g uses
///     std = g / N (logits + g * randn / num_experts);
///   `gumbel_noise(T, N, seed)`: -log(-log(U)) entries (DeepSpeed `gumbel_rsample` for the
///     second expert's selection).
/// Multiplicative jitter on the router's input (Switch Transformers `jitter_noise`: input *
/// U(1 - eps, 1 + eps)) happens before the router's linear layer: apply it to your hidden states
/// with `uniform_noise`, it is not a function of the logits.
///
/// Smooth load (Shazeer et al. 2017, "Outrageously Large Neural Networks", appendix A): with
/// clean logits c, noise scales sigma > 0 and the standard normal draws e used for the noisy
/// logits h = c + e sigma,
///   P_ti = Phi((c_ti - kth_excluding(h_t, k, i)) / sigma_ti),   Load_i = sum_t P_ti,
///   L = a CV^2(Load) (population variance / mean^2),
/// where kth_excluding(h_t, k, i) is the k-th largest of h_t over the experts j != i (ties to
/// the lower index). Gradients flow to c and sigma both directly and through the h_tj that is
/// the k-th largest (h_tj = c_tj + e_tj sigma_tj). Phi is the standard normal CDF; the argument
/// is a difference of logits over a noise scale, as the paper writes it (not a probability
/// mixed with a logit: Tutel issue #240).

#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"
#include "moebal/detail/input.hpp"
#include "moebal/losses/cv2.hpp"

namespace moebal {
namespace detail {

/// A uniform double in (0, 1) from 53 random bits (never exactly 0 or 1).
inline double open_uniform(std::mt19937_64& engine) {
  return (double(engine() >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

}  // namespace detail

/// T x N independent N(0, std^2) draws (Box-Muller on `open_uniform`), from `seed`.
/// @throws moebal::invalid_argument for a negative or non-finite std, or negative sizes.
template <class Scalar = double>
RowMatrix<Scalar> gaussian_noise(Index rows, Index cols, double std, std::uint64_t seed) {
  constexpr const char* function = "moebal::gaussian_noise";
  detail::check_finite_parameter(function, "std", std);
  if (std < 0) detail::throw_invalid(function, "std", "a noise scale >= 0", detail::concat(std));
  if (rows < 0 || cols < 0) detail::throw_invalid(function, "rows, cols", "sizes >= 0", detail::concat(rows, ", ", cols));
  std::mt19937_64 engine(seed);
  RowMatrix<Scalar> out(rows, cols);
  const double two_pi = 6.283185307179586476925286766559;
  for (Index i = 0; i < out.size(); i += 2) {
    const double u1 = detail::open_uniform(engine), u2 = detail::open_uniform(engine);
    const double radius = std::sqrt(-2.0 * std::log(u1));
    out.data()[i] = static_cast<Scalar>(std * radius * std::cos(two_pi * u2));
    if (i + 1 < out.size()) out.data()[i + 1] = static_cast<Scalar>(std * radius * std::sin(two_pi * u2));
  }
  return out;
}

/// T x N independent standard Gumbel draws -log(-log(U)), from `seed`.
template <class Scalar = double>
RowMatrix<Scalar> gumbel_noise(Index rows, Index cols, std::uint64_t seed) {
  if (rows < 0 || cols < 0) {
    detail::throw_invalid("moebal::gumbel_noise", "rows, cols", "sizes >= 0", detail::concat(rows, ", ", cols));
  }
  std::mt19937_64 engine(seed);
  RowMatrix<Scalar> out(rows, cols);
  for (Index i = 0; i < out.size(); ++i) {
    out.data()[i] = static_cast<Scalar>(-std::log(-std::log(detail::open_uniform(engine))));
  }
  return out;
}

/// T x N independent U(low, high) draws, from `seed` (e.g. jitter factors U(1 - eps, 1 + eps)).
template <class Scalar = double>
RowMatrix<Scalar> uniform_noise(Index rows, Index cols, double low, double high, std::uint64_t seed) {
  constexpr const char* function = "moebal::uniform_noise";
  if (!(low <= high) || !std::isfinite(low) || !std::isfinite(high)) {
    detail::throw_invalid(function, "low, high", "finite low <= high", detail::concat(low, ", ", high));
  }
  std::mt19937_64 engine(seed);
  RowMatrix<Scalar> out(rows, cols);
  for (Index i = 0; i < out.size(); ++i) {
    out.data()[i] = static_cast<Scalar>(low + (high - low) * detail::open_uniform(engine));
  }
  return out;
}

/// Result of `smooth_load_loss`.
struct SmoothLoadResult {
  double loss = 0.0;
  /// Load_i = sum_t P_ti, length N.
  Eigen::VectorXd load;
  /// d L / d clean logits and d L / d noise scales, T x N.
  RowMatrix<double> dloss_dclean, dloss_dnoise_std;
};

/// Shazeer et al. 2017's smooth load loss a CV^2(Load) and its gradients (see the file comment).
/// @param clean T x N clean logits. @param noise_std T x N noise scales (> 0; Shazeer:
///   softplus(x W_noise)). @param noise T x N standard normal draws used for the noisy logits.
/// @param k experts per token, 1 <= k < N. @param coefficient a.
/// @throws moebal::invalid_argument for mismatched shapes, k out of range, a scale <= 0,
///   non-finite inputs, or a load that is 0 for every expert (every P_ti underflows: the CV^2 is
///   0/0; argument 'clean, noise_std, noise').
template <class D1, class D2, class D3>
SmoothLoadResult smooth_load_loss(const Eigen::MatrixBase<D1>& clean, const Eigen::MatrixBase<D2>& noise_std,
                                  const Eigen::MatrixBase<D3>& noise, Index k, double coefficient = 1.0) {
  constexpr const char* function = "moebal::smooth_load_loss";
  const RowMatrix<double> c = clean.template cast<double>();
  const RowMatrix<double> sigma = noise_std.template cast<double>();
  const RowMatrix<double> e = noise.template cast<double>();
  const Index T = c.rows(), N = c.cols();
  detail::check_logits_shape(function, T, N);
  detail::check_output_shape(function, "noise_std", sigma.rows(), sigma.cols(), T, N);
  detail::check_output_shape(function, "noise", e.rows(), e.cols(), T, N);
  if (k < 1 || k >= N) {
    detail::throw_invalid(function, "k", detail::concat("1 <= k < N = ", N, " (the k-th largest excluding one expert)"),
                          detail::concat("k = ", k));
  }
  detail::check_finite_parameter(function, "coefficient", coefficient);
  if (!c.allFinite() || !e.allFinite()) detail::throw_invalid(function, "clean, noise", "finite values", "NaN or Inf");
  for (Index i = 0; i < sigma.size(); ++i) {
    if (!(sigma.data()[i] > 0) || !std::isfinite(sigma.data()[i])) {
      detail::throw_invalid(function, "noise_std", "finite noise scales > 0",
                            detail::concat(sigma.data()[i], " at element ", i));
    }
  }
  const RowMatrix<double> h = c + e.cwiseProduct(sigma);
  RowMatrix<double> z(T, N);
  Eigen::Matrix<Index, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> threshold(T, N);
  SmoothLoadResult r;
  r.load = Eigen::VectorXd::Zero(N);
  std::vector<Index> order(static_cast<std::size_t>(N));
  const double inv_sqrt2 = 0.70710678118654752440;
  for (Index t = 0; t < T; ++t) {
    std::iota(order.begin(), order.end(), Index(0));
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return h(t, a) > h(t, b); });
    const Index kth = order[std::size_t(k - 1)], next = order[std::size_t(k)];
    for (Index i = 0; i < N; ++i) {
      // Excluding i: if i is among the k largest, the k-th largest of the others is the
      // (k+1)-th overall; otherwise the k-th.
      bool in_top = false;
      for (Index r2 = 0; r2 < k; ++r2) in_top = in_top || order[std::size_t(r2)] == i;
      const Index m = in_top ? next : kth;
      threshold(t, i) = m;
      z(t, i) = (c(t, i) - h(t, m)) / sigma(t, i);
      r.load[i] += 0.5 * std::erfc(-z(t, i) * inv_sqrt2);
    }
  }
  Eigen::VectorXd H;
  // Every P_ti can underflow to 0 (Phi(z) is 0 in double for z below about -38.6, e.g. noise
  // draws far above the clean logits): the CV^2 is then 0/0 and raises rather than returning 0.
  r.loss = detail::cv2_and_gradient(
      {function, "clean, noise_std, noise", "smooth load", double(T),
       "every P_ti = Phi(z_ti) underflows to 0 for z_ti below about -38.6"},
      r.load, Cv2Variance::population, coefficient, H);
  r.dloss_dclean = RowMatrix<double>::Zero(T, N);
  r.dloss_dnoise_std = RowMatrix<double>::Zero(T, N);
  const double inv_sqrt_2pi = 0.39894228040143267794;
  for (Index t = 0; t < T; ++t) {
    for (Index i = 0; i < N; ++i) {
      const double phi = inv_sqrt_2pi * std::exp(-0.5 * z(t, i) * z(t, i));
      const double dz = H[i] * phi;  // d L / d z_ti
      const Index m = threshold(t, i);
      const double s = sigma(t, i);
      // z = (c_ti - h_tm) / s_ti, h_tm = c_tm + e_tm s_tm.
      r.dloss_dclean(t, i) += dz / s;
      r.dloss_dclean(t, m) -= dz / s;
      r.dloss_dnoise_std(t, i) -= dz * z(t, i) / s;
      r.dloss_dnoise_std(t, m) -= dz / s * e(t, m);
    }
  }
  return r;
}

}  // namespace moebal
