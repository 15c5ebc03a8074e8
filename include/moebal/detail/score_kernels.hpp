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

/// Width of the fixed-size blocks the row kernels compute in: the 8 lanes of the fixed-order
/// reductions (detail/reduce.hpp) and of the threshold top-k.
inline constexpr Index kRowBlock = 8;

/// Width of the wide blocks the exponentials are computed in: every element of a row goes
/// through Eigen's vectorized exp in a fixed-size block (blocks of this size while they fit,
/// then of 8, the last one padded), a layout fixed by the row's length alone, whatever its
/// address, so any pass rebuilds a row's scores bitwise. A dynamic-size Eigen expression would
/// instead compute a head or tail with the scalar std::exp (and a row shorter than one packet,
/// 8 experts under AVX-512, entirely so). 16 (one AVX-512 packet of floats) when the build
/// enables AVX-512, else 8 (one AVX packet, two SSE packets).
#ifdef EIGEN_VECTORIZE_AVX512
inline constexpr Index kExpBlock = 16;
#else
inline constexpr Index kExpBlock = 8;
#endif
static_assert(kExpBlock % kRowBlock == 0, "exp blocks are made of whole row blocks");

template <class C>
using RowBlock = Eigen::Array<C, kRowBlock, 1>;
template <class C>
using ExpBlock = Eigen::Array<C, kExpBlock, 1>;

/// Block of B values at x (unaligned), converted to C.
template <class C, Index B = kRowBlock, class S>
MOEBAL_ALWAYS_INLINE Eigen::Array<C, B, 1> load_block(const S* x) {
  return Eigen::Map<const Eigen::Array<S, B, 1>>(x).template cast<C>();
}

/// The first `count` (< B) values at x, converted to C, the other lanes set to pad.
template <class C, Index B = kRowBlock, class S>
MOEBAL_ALWAYS_INLINE Eigen::Array<C, B, 1> load_partial(const S* x, Index count, C pad) {
  Eigen::Array<C, B, 1> b = Eigen::Array<C, B, 1>::Constant(pad);
  for (Index l = 0; l < count; ++l) b[l] = static_cast<C>(x[l]);
  return b;
}

/// Writes the first `count` lanes of b to out.
template <class C, int B>
MOEBAL_ALWAYS_INLINE void store_partial(const Eigen::Array<C, B, 1>& b, C* out, Index count) {
  for (Index l = 0; l < count; ++l) out[l] = b[l];
}

/// One block of raw values from logits xb: exp(xb - max) flushed to 0 below log(smallest
/// normal) (softmax), or 1 / (1 + exp(-xb)) (sigmoid).
/// e_l = 0 where d_l < bound, else e_l (a NaN d_l keeps its e_l), with Eigen's packet
/// compare-and-mask: a per-lane conditional is left scalar by GCC inside the fixed-size block.
template <class C, int B>
MOEBAL_ALWAYS_INLINE void zero_below(Eigen::Array<C, B, 1>& e, const Eigen::Array<C, B, 1>& d,
                                     C bound) {
  using Packet = typename Eigen::internal::packet_traits<C>::type;
  constexpr int size = Eigen::internal::packet_traits<C>::size;
  if constexpr (size > 1 && B % size == 0) {
    const Packet limit = Eigen::internal::pset1<Packet>(bound);
    for (int h = 0; h < B; h += size) {
      const Packet below = Eigen::internal::pcmp_lt(Eigen::internal::ploadu<Packet>(d.data() + h),
                                                    limit);
      Eigen::internal::pstoreu(
          e.data() + h,
          Eigen::internal::pandnot(Eigen::internal::ploadu<Packet>(e.data() + h), below));
    }
  } else {
    for (Index l = 0; l < B; ++l) e[l] = d[l] < bound ? C(0) : e[l];
  }
}

/// Whether `exp_nonpositive` has its own packet path for C (float, with an integer packet of
/// the same width to build 2^m in: SSE, AVX, AVX-512, NEON); otherwise it is Eigen's exp.
template <class C>
inline constexpr bool kOwnExp = std::is_same_v<C, float> &&
                                Eigen::internal::packet_traits<C>::Vectorizable &&
                                (Eigen::internal::packet_traits<C>::size > 1);

/// exp(d) for the softmax's arguments d = x - max(x) <= 0, one block of B values, for the
/// lanes with d >= log(smallest normal) (about -87.34 in float); the other lanes hold
/// unspecified values (NaN for d = NaN or -Inf) that the caller replaces (`zero_below`).
/// Float: exp(d) = 2^m exp(r) with m = round(d / ln 2) in [-126, 0], r = d - m ln 2 with ln 2
/// in two parts (Cody and Waite: 0.693359375 exact in a float, -2.12194440e-4), and exp(r) =
/// 1 + r + r^2 P(r), P the degree-5 polynomial of Cephes' expf (Moshier; the coefficients Eigen
/// 3.4's pexp_float uses too), evaluated in Estrin's order. m is rounded by adding
/// 1.5 * 2^23 + 127 (a float whose unit in the last place is 1), whose low bits then hold the
/// biased exponent m + 127 in [1, 127]: 2^m is those bits shifted into the exponent field,
/// always a normal number. Half the operations of Eigen's exp, which clamps for both signs and
/// builds 2^m in four factors to reach the subnormals; the error is within 2 ulp of the exact
/// value (tests/core/test_scores.cpp sweeps [-87.3, 0]). Double: Eigen's exp.
// Naming Eigen's integer packet (unpacket_traits<__m256>) drops the vector type's alignment
// attribute from the template argument, which GCC reports; Eigen's own headers silence it.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif
template <class C, int B>
MOEBAL_ALWAYS_INLINE Eigen::Array<C, B, 1> exp_nonpositive(const Eigen::Array<C, B, 1>& d) {
  namespace ei = Eigen::internal;
  using Packet = typename ei::packet_traits<C>::type;
  constexpr int size = ei::packet_traits<C>::size;
  if constexpr (kOwnExp<C> && B % size == 0) {
    using PacketI = typename ei::unpacket_traits<Packet>::integer_packet;
    const Packet log2e = ei::pset1<Packet>(1.44269504088896341f);
    const Packet shifter = ei::pset1<Packet>(12582912.0f + 127.0f);  // 1.5 * 2^23 + 127
    const Packet ln2_hi = ei::pset1<Packet>(-0.693359375f);
    const Packet ln2_lo = ei::pset1<Packet>(2.12194440e-4f);
    const Packet p0 = ei::pset1<Packet>(1.9875691500e-4f), p1 = ei::pset1<Packet>(1.3981999507e-3f);
    const Packet p2 = ei::pset1<Packet>(8.3334519073e-3f), p3 = ei::pset1<Packet>(4.1665795894e-2f);
    const Packet p4 = ei::pset1<Packet>(1.6666665459e-1f), p5 = ei::pset1<Packet>(5.0000001201e-1f);
    const Packet one = ei::pset1<Packet>(1.0f);
    Eigen::Array<C, B, 1> e;
    for (int h = 0; h < B; h += size) {
      const Packet x = ei::ploadu<Packet>(d.data() + h);
      const Packet t = ei::pmadd(x, log2e, shifter);  // 1.5 * 2^23 + 127 + m
      const Packet m = ei::psub(t, shifter);
      Packet r = ei::pmadd(m, ln2_hi, x);
      r = ei::pmadd(m, ln2_lo, r);
      const Packet r2 = ei::pmul(r, r);
      const Packet a = ei::pmadd(p0, r, p1), b = ei::pmadd(p2, r, p3), c = ei::pmadd(p4, r, p5);
      const Packet poly = ei::pmadd(ei::pmadd(a, r2, b), r2, c);
      const Packet er = ei::pmadd(poly, r2, ei::padd(r, one));
      const Packet two_m = ei::preinterpret<Packet>(
          ei::plogical_shift_left<23>(ei::preinterpret<PacketI>(t)));
      ei::pstoreu(e.data() + h, ei::pmul(er, two_m));
    }
    return e;
  } else {
    return d.exp();
  }
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

/// `Flush = false` leaves out the flush to 0 (softmax), for a row whose caller knows that no
/// x_j - max is below log(smallest normal) (where the flush changes nothing).
template <class C, int B, bool Flush = true>
MOEBAL_ALWAYS_INLINE Eigen::Array<C, B, 1> raw_block(const Eigen::Array<C, B, 1>& xb, C max,
                                                     ScoreFunction score) {
  if (score == ScoreFunction::softmax) {
    // Below the normal range, -Inf included, exp_nonpositive leaves unspecified values (and
    // Eigen 3.4's exp, used for double, a tiny positive floor, about 3e-39 in float). Below
    // log(smallest normal) the result is flushed to exactly 0 instead, so -Inf logits get
    // probability 0 as in PyTorch (the values replaced are below 1.2e-38 in float, 2.3e-308 in
    // double).
    const C lowest = kLogSmallestNormal<C>;
    const Eigen::Array<C, B, 1> d = xb - max;
    Eigen::Array<C, B, 1> e = exp_nonpositive(d);
    if constexpr (Flush) {
      zero_below(e, d, lowest);
    } else {
      (void)lowest;
    }
    return e;
  }
  return (C(1) + (-xb).exp()).inverse();
}

/// The largest of the 8 lanes (exact: any order gives the same value).
template <class C>
MOEBAL_ALWAYS_INLINE C max_of_lanes(const RowBlock<C>& m) {
  const Eigen::Array<C, 4, 1> a = m.template head<4>().max(m.template tail<4>());
  const C b0 = a[0] > a[2] ? a[0] : a[2], b1 = a[1] > a[3] ? a[1] : a[3];
  return b0 > b1 ? b0 : b1;
}

/// The block hook of `raw_scores_to` and `raw_scores_rows` that does nothing.
struct NoBlockHook {
  template <class... Args>
  void operator()(const Args&...) const noexcept {}
};

/// `raw_scores_to` for R rows at once (R = 1 or 2): every row is computed by exactly the
/// operations, in exactly the order, of the one-row function (the rows are only interleaved,
/// so that their dependency chains, the maximum's and the sum's reductions and the
/// reciprocal, overlap), so each row's raw values and normalizer are bitwise those of
/// `raw_scores_to`. `block(r, b)` is called with row r's full blocks of kExpBlock raw values.
/// valid[r] as `raw_scores_to`'s result for row r.
/// `KnownMax`: the rows' maxima are given in known_max[0..R) (a pass that found them before:
/// the maximum is exact, so any pass finds the same value, and the first pass is skipped).
/// `Flush = false`: see `raw_block` (only with KnownMax).
template <int R, bool KnownMax = false, bool Flush = true, class S, class C, class BlockHook>
MOEBAL_ALWAYS_INLINE void raw_scores_rows(const S* const* x, Index n, ScoreFunction score,
                                          C* const* raw, RowNorm<C>* norm, bool* valid,
                                          BlockHook&& block, const C* known_max = nullptr) {
  static_assert(kRowBlock == kReduceLanes, "the row blocks are the reduction's lanes");
  static_assert(R >= 1 && R <= 2, "one or two rows at once");
  static_assert(Flush || KnownMax, "the flush is left out only for rows of a known maximum");
  using Block = ExpBlock<C>;
  using Out = Eigen::Map<Block>;
  constexpr C minus_inf = -std::numeric_limits<C>::infinity();
  C max[R];
  if constexpr (KnownMax) {
    for (int r = 0; r < R; ++r) max[r] = known_max[r];
  } else {
    (void)known_max;
    // First pass: the maximum (exact in any order), in two wide accumulators while pairs of
    // wide blocks fit, then in 8-blocks.
    Block wa[R], wb[R];
    for (int r = 0; r < R; ++r) wa[r] = wb[r] = Block::Constant(minus_inf);
    Index j = 0;
    for (; j + 2 * kExpBlock <= n; j += 2 * kExpBlock) {
      for (int r = 0; r < R; ++r) {
        wa[r] = wa[r].max(load_block<C, kExpBlock>(x[r] + j));
        wb[r] = wb[r].max(load_block<C, kExpBlock>(x[r] + j + kExpBlock));
      }
    }
    RowBlock<C> m[R];
    for (int r = 0; r < R; ++r) {
      wa[r] = wa[r].max(wb[r]);
      m[r] = RowBlock<C>::Constant(minus_inf);
      for (Index h = 0; h < kExpBlock; h += kRowBlock) {
        m[r] = m[r].max(wa[r].template segment<kRowBlock>(h));
      }
    }
    for (; j + kRowBlock <= n; j += kRowBlock) {
      for (int r = 0; r < R; ++r) m[r] = m[r].max(load_block<C>(x[r] + j));
    }
    if (j < n) {
      for (int r = 0; r < R; ++r) m[r] = m[r].max(load_partial<C>(x[r] + j, n - j, minus_inf));
    }
    // (A fixed tree rather than maxCoeff(), which GCC leaves as a call.)
    for (int r = 0; r < R; ++r) max[r] = max_of_lanes(m[r]);
  }
  // Second pass: blocks of kExpBlock while they fit, then blocks of 8, the last one padded
  // (a function of n alone, so every pass computes each element the same way). The sum: the
  // wide blocks alternate between two wide accumulators (even and odd blocks), which are added
  // and folded into 8 lanes; the 8-blocks add to those lanes; then a fixed tree.
  Block sa[R], sb[R];
  for (int r = 0; r < R; ++r) sa[r] = sb[r] = Block::Zero();
  Index j = 0;
  for (; j + 2 * kExpBlock <= n; j += 2 * kExpBlock) {
    for (int r = 0; r < R; ++r) {
      const Block r0 =
          raw_block<C, kExpBlock, Flush>(load_block<C, kExpBlock>(x[r] + j), max[r], score);
      const Block r1 = raw_block<C, kExpBlock, Flush>(load_block<C, kExpBlock>(x[r] + j + kExpBlock),
                                                      max[r], score);
      sa[r] += r0;
      sb[r] += r1;
      Out(raw[r] + j) = r0;
      Out(raw[r] + j + kExpBlock) = r1;
      block(r, r0);
      block(r, r1);
    }
  }
  if (j + kExpBlock <= n) {
    for (int r = 0; r < R; ++r) {
      const Block b =
          raw_block<C, kExpBlock, Flush>(load_block<C, kExpBlock>(x[r] + j), max[r], score);
      sa[r] += b;
      Out(raw[r] + j) = b;
      block(r, b);
    }
    j += kExpBlock;
  }
  RowBlock<C> lanes[R];
  for (int r = 0; r < R; ++r) {
    sa[r] += sb[r];
    lanes[r] = sa[r].template segment<kRowBlock>(0);
    for (Index h = kRowBlock; h < kExpBlock; h += kRowBlock) {
      lanes[r] += sa[r].template segment<kRowBlock>(h);
    }
  }
  for (; j + kRowBlock <= n; j += kRowBlock) {
    for (int r = 0; r < R; ++r) {
      const RowBlock<C> b = raw_block<C>(load_block<C>(x[r] + j), max[r], score);
      lanes[r] += b;
      Eigen::Map<RowBlock<C>>(raw[r] + j) = b;
    }
  }
  if (j < n) {
    // Padding lanes: -Inf gives 0 for softmax; the sigmoid's are zeroed before the sum.
    const Index rest = n - j;
    for (int r = 0; r < R; ++r) {
      RowBlock<C> b = raw_block<C>(load_partial<C>(x[r] + j, rest, minus_inf), max[r], score);
      for (Index l = rest; l < kRowBlock; ++l) b[l] = C(0);
      lanes[r] += b;
      store_partial(b, raw[r] + j, rest);
    }
  }
  for (int r = 0; r < R; ++r) {
    const RowBlock<C>& l = lanes[r];
    const C sum = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    if (score == ScoreFunction::softmax) {
      // NaN, +Inf (inf - inf) and an all -Inf row (-inf - -inf) all make the sum NaN.
      norm[r].shift = max[r];
      norm[r].inv = C(1) / sum;
      valid[r] = std::isfinite(sum) && sum > C(0);
    } else {
      norm[r].shift = C(0);
      norm[r].inv = C(1) / (sum + kSigmoidNormEps<C>);
      valid[r] = std::isfinite(sum) && max[r] != std::numeric_limits<C>::infinity();
    }
  }
}

/// Computes raw_j for one row of n logits into raw[0..n) (any address; it may be the row of
/// the caller's output buffer, even the logits' own row: each block is read before it is
/// written) and the row's normalizer. Returns false if the row is not a valid input: a NaN or
/// +Inf logit, or (softmax) every logit -Inf. The sum over the row has a fixed order that
/// depends on n alone (see `raw_scores_rows`, which this is for one row).
/// `block(b)` is called with each full block of kExpBlock raw values as it is computed (in row
/// order; the blocks of 8 and the padded tail that follow when n is not a multiple of
/// kExpBlock are not passed): a fused kernel's hook (detail/row_kernels.hpp).
template <class S, class C, class BlockHook = NoBlockHook>
MOEBAL_FLATTEN bool raw_scores_to(const S* x, Index n, ScoreFunction score, C* raw,
                                  RowNorm<C>& norm, BlockHook&& block = BlockHook()) {
  const S* rows[1] = {x};
  C* out[1] = {raw};
  bool valid[1];
  raw_scores_rows<1>(rows, n, score, out, &norm, valid,
                     [&](int, const ExpBlock<C>& b) { block(b); });
  return valid[0];
}

/// Whether a row of n logits is a valid input as `raw_scores_to` judges it, without computing
/// the scores: no NaN, no +Inf, and (softmax) at least one logit above -Inf.
template <class C>
bool valid_logits_row(const C* x, Index n, bool softmax) {
  constexpr C inf = std::numeric_limits<C>::infinity();
  int bad = 0, finite = 0;
  for (Index j = 0; j < n; ++j) {
    bad |= x[j] < inf ? 0 : 1;  // NaN or +Inf
    finite |= x[j] > -inf ? 1 : 0;
  }
  return bad == 0 && (finite != 0 || !softmax);
}

/// `raw_scores_to` into an aligned scratch array of size n.
template <class S, class C>
bool raw_scores(const S* x, Index n, ScoreFunction score, ScratchArray<C>& raw, RowNorm<C>& norm) {
  MOEBAL_ASSERT(raw.size() == n);
  return raw_scores_to(x, n, score, raw.data(), norm);
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

/// `score_vjp_row` (written, not accumulated) that also adds each score q_j = raw_j * inv to
/// sums[j] (in double: the values phase 1 of a forward would add, in the same order when rows
/// come in order). With `z`, the combined objective's z-loss term z_coef * q_j is added to
/// each element (softmax only). raw and dx must not overlap.
template <class C, class Out>
MOEBAL_ALWAYS_INLINE void score_vjp_row_summing(const C* MOEBAL_RESTRICT raw,
                                                Out* MOEBAL_RESTRICT dx, const RowNorm<C>& norm,
                                                const C* MOEBAL_RESTRICT g, C g_dot_q, C scale,
                                                C z_coef, bool z, ScoreFunction score, Index n,
                                                double* MOEBAL_RESTRICT sums) {
  const C inv = norm.inv;
  if (z) {
    for (Index j = 0; j < n; ++j) {
      const C q = raw[j] * inv;
      sums[j] += static_cast<double>(q);
      store<false>(dx[j], C(scale * q * (g[j] - g_dot_q) + z_coef * q));
    }
  } else if (score == ScoreFunction::softmax) {
    for (Index j = 0; j < n; ++j) {
      const C q = raw[j] * inv;
      sums[j] += static_cast<double>(q);
      store<false>(dx[j], C(scale * q * (g[j] - g_dot_q)));
    }
  } else {
    for (Index j = 0; j < n; ++j) {
      const C r = raw[j];
      sums[j] += static_cast<double>(r * inv);
      store<false>(dx[j], C(scale * (r * (C(1) - r) * inv) * (g[j] - g_dot_q)));
    }
  }
}

/// `score_vjp_row_summing` for a row whose raw values are in dx itself: each raw_j is read
/// (and its score added to sums[j]) before it is overwritten by the gradient.
template <class C>
MOEBAL_ALWAYS_INLINE void score_vjp_row_summing_in_place(C* MOEBAL_RESTRICT dx,
                                                         const RowNorm<C>& norm,
                                                         const C* MOEBAL_RESTRICT g, C g_dot_q,
                                                         C scale, C z_coef, bool z,
                                                         ScoreFunction score, Index n,
                                                         double* MOEBAL_RESTRICT sums) {
  const C inv = norm.inv;
  if (z) {
    for (Index j = 0; j < n; ++j) {
      const C q = dx[j] * inv;
      sums[j] += static_cast<double>(q);
      dx[j] = C(scale * q * (g[j] - g_dot_q) + z_coef * q);
    }
  } else if (score == ScoreFunction::softmax) {
    for (Index j = 0; j < n; ++j) {
      const C q = dx[j] * inv;
      sums[j] += static_cast<double>(q);
      dx[j] = C(scale * q * (g[j] - g_dot_q));
    }
  } else {
    for (Index j = 0; j < n; ++j) {
      const C raw = dx[j];
      sums[j] += static_cast<double>(raw * inv);
      dx[j] = C(scale * (raw * (C(1) - raw) * inv) * (g[j] - g_dot_q));
    }
  }
}

/// `score_vjp_row_summing` for R rows at once (R = 1 or 2) with the same g (g_dot_q[r],
/// z_coef[r] per row): one loop over the experts, in which row 0's score is added to sums[j]
/// before row 1's (the sums of the rows taken one after the other) and every element is
/// computed as that function computes it.
template <int R, class C, class Out>
MOEBAL_ALWAYS_INLINE void score_vjp_rows_summing(const C* const* raw, Out* const* dx,
                                                 const RowNorm<C>* norm, const C* g,
                                                 const C* g_dot_q, C scale, const C* z_coef,
                                                 bool z, ScoreFunction score, Index n,
                                                 double* MOEBAL_RESTRICT sums) {
  static_assert(R >= 1 && R <= 2, "one or two rows at once");
  if constexpr (R == 1) {
    score_vjp_row_summing(raw[0], dx[0], norm[0], g, g_dot_q[0], scale, z_coef[0], z, score, n,
                          sums);
  } else {
    const C* MOEBAL_RESTRICT raw0 = raw[0];
    const C* MOEBAL_RESTRICT raw1 = raw[1];
    Out* MOEBAL_RESTRICT dx0 = dx[0];
    Out* MOEBAL_RESTRICT dx1 = dx[1];
    const C inv0 = norm[0].inv, inv1 = norm[1].inv, d0 = g_dot_q[0], d1 = g_dot_q[1];
    if (z) {
      const C c0 = z_coef[0], c1 = z_coef[1];
      for (Index j = 0; j < n; ++j) {
        const C q0 = raw0[j] * inv0, q1 = raw1[j] * inv1;
        sums[j] = (sums[j] + static_cast<double>(q0)) + static_cast<double>(q1);
        store<false>(dx0[j], C(scale * q0 * (g[j] - d0) + c0 * q0));
        store<false>(dx1[j], C(scale * q1 * (g[j] - d1) + c1 * q1));
      }
    } else if (score == ScoreFunction::softmax) {
      for (Index j = 0; j < n; ++j) {
        const C q0 = raw0[j] * inv0, q1 = raw1[j] * inv1;
        sums[j] = (sums[j] + static_cast<double>(q0)) + static_cast<double>(q1);
        store<false>(dx0[j], C(scale * q0 * (g[j] - d0)));
        store<false>(dx1[j], C(scale * q1 * (g[j] - d1)));
      }
    } else {
      for (Index j = 0; j < n; ++j) {
        const C r0 = raw0[j], r1 = raw1[j];
        sums[j] = (sums[j] + static_cast<double>(r0 * inv0)) + static_cast<double>(r1 * inv1);
        store<false>(dx0[j], C(scale * (r0 * (C(1) - r0) * inv0) * (g[j] - d0)));
        store<false>(dx1[j], C(scale * (r1 * (C(1) - r1) * inv1) * (g[j] - d1)));
      }
    }
  }
}

}  // namespace detail
}  // namespace moebal
