// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// The Switch Transformer load-balancing loss, L = a N sum_i f_i P_i, in each framework's
/// convention, with its analytic gradient.
///
/// Notation (T real tokens, N experts, logits x of shape T x N, rows are tokens):
///   q_t   = score(x_t): softmax (default) or normalized sigmoid, see `ScoreFunction`
///   top-k = the k experts with the largest q_ti; ties go to the lower expert index. The
///           selection is made on the scores as computed in the input precision, as the
///           frameworks select on their scores: sigmoids that saturate to the same float
///           (logits above about 17 in float) tie, and the lower index wins.
///   c_i   = number of tokens whose top-k contains i (sum_i c_i = T k)
///   P_i   = (1/T) sum_t q_ti
///   f_i   = the convention's load fraction (below); a constant for the gradient
///   L     = a N sum_i f_i P_i
///   d L / d q_tj = a N f_j / T, so
///   d L / d x_tj = (a N / T) q_tj (f_j - sum_i f_i q_ti)                      (softmax)
///                = (a N / T) s_tj (1 - s_tj) / (sum_i s_ti + 1e-20) (f_j - sum_i f_i q_ti)
///                                                                  (sigmoid, s = sigmoid(x))
/// With a mask, every sum over tokens runs over real tokens only, T is their count, padded rows
/// are never read and get zero gradient.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/statistics.hpp"
#include "moebal/core/types.hpp"
#include "moebal/core/scores.hpp"
#include "moebal/detail/input.hpp"
#include "moebal/detail/parallel.hpp"
#include "moebal/detail/reduce.hpp"
#include "moebal/detail/row_kernels.hpp"
#include "moebal/detail/score_kernels.hpp"
#include "moebal/detail/topk_kernels.hpp"
#include "moebal/metrics.hpp"

namespace moebal {

template <class Scalar>
class CombinedAuxLoss;

/// How the Switch loss counts the load fraction f_i. Each is named after its source.
enum class SwitchConvention {
  /// f_i = c_i / (T k): top-k counts, sum_i f_i = 1, balanced value 1 (times a).
  /// Megatron-core `switch_load_balancing_loss_func` (f sums to 1 over the top-k slots).
  megatron,
  /// f_i = c_i / T: top-k counts, sum_i f_i = k, balanced value k: k times `megatron`.
  /// Hugging Face transformers `load_balancing_loss_func` (Mixtral, Qwen-MoE, OLMoE), whose
  /// per-slot fractions are summed over the k slots; its `attention_mask` is our `mask`
  /// (flattened batch-major, token b * S + s). HF computes one loss over every layer's gate
  /// logits concatenated: to reproduce it, stack the layers' logits (layer-major) into one
  /// matrix and repeat the mask once per layer.
  huggingface,
  /// f_i = (number of tokens whose first choice is i) / T: sum_i f_i = 1, balanced value 1.
  /// GShard, DeepSpeed `top1gating`/`top2gating`, Tutel and fairseq (l_aux = N^2 mean(me * ce)
  /// with ce from the top-1 mask only). With a mask, padding is excluded from f, P and T as in
  /// every convention here (DeepSpeed's `used_token` masks only the counts, not me or T).
  first_choice,
};

/// "megatron", "huggingface" or "first_choice".
inline const char* to_string(SwitchConvention convention) {
  switch (convention) {
    case SwitchConvention::megatron:
      return "megatron";
    case SwitchConvention::huggingface:
      return "huggingface";
    case SwitchConvention::first_choice:
      return "first_choice";
  }
  return "unknown";
}

/// Options of the Switch loss.
struct SwitchOptions {
  /// How f is counted (default: Megatron-core, sum f = 1).
  SwitchConvention convention = SwitchConvention::megatron;
  /// Score function for P and for the top-k selection (default: softmax).
  ScoreFunction score = ScoreFunction::softmax;
  /// The coefficient a (Megatron `moe_aux_loss_coeff`, HF `router_aux_loss_coef`); must be
  /// finite. The loss and its gradient are both scaled by it.
  double coefficient = 1.0;
  /// Padding mask, length T, nonzero = real token (a view: keep the memory alive for the
  /// call). Used by `switch_aux_loss`; `SwitchAuxLoss` takes the mask per call in `forward`.
  TokenMask mask{};
};

/// What the Switch loss measured on its batch.
struct SwitchStats {
  /// T: the number of real tokens.
  std::int64_t tokens = 0;
  /// c_i: tokens whose top-k contains expert i (sum = T k).
  CountVector tokens_per_expert;
  /// Tokens whose first choice is expert i (sum = T).
  CountVector first_choice_tokens;
  /// f_i in the chosen convention (all zero when T = 0).
  Eigen::VectorXd f;
  /// P_i = (1/T) sum_t q_ti (all zero when T = 0).
  Eigen::VectorXd P;
  /// The loss at perfect balance in this convention, coefficient included: a (megatron,
  /// first_choice) or a k (huggingface). loss / balanced_value >= 1 measures imbalance only
  /// approximately (P and f are not independent), but equals 1 at uniform scores and counts.
  double balanced_value = 0.0;
  /// Balance metrics of the top-k counts (MaxVio, CV, normalized entropy, shares, empty
  /// experts): see `balance_metrics` in <moebal/metrics.hpp>.
  BalanceMetrics balance;
};

/// Result of `switch_aux_loss`.
template <class Scalar>
struct SwitchAuxResult {
  /// L = a N sum_i f_i P_i.
  Scalar loss = Scalar(0);
  /// d L / d logits, T x N row-major (zero rows for padded tokens).
  RowMatrix<Scalar> grad;
  /// Counts, f and P.
  SwitchStats stats;
};

namespace detail {

inline void check_switch_config(const char* function, Index num_experts, Index k,
                                const SwitchOptions& options) {
  if (num_experts < 1) {
    throw_invalid(function, "num_experts", "at least 1 expert", concat(num_experts));
  }
  check_k(function, k, num_experts);
  check_finite_parameter(function, "options.coefficient", options.coefficient);
  switch (options.convention) {
    case SwitchConvention::megatron:
    case SwitchConvention::huggingface:
    case SwitchConvention::first_choice:
      break;
    default:
      throw_invalid(function, "options.convention", "megatron, huggingface or first_choice",
                    concat(static_cast<int>(options.convention)));
  }
  if (options.score != ScoreFunction::softmax && options.score != ScoreFunction::sigmoid) {
    throw_invalid(function, "options.score", "softmax or sigmoid",
                  concat(static_cast<int>(options.score)));
  }
}

/// Writes f in the convention: c / (T k) (megatron), c / T (huggingface) or first / T
/// (first_choice), from top-k counts c and first-choice counts over T tokens (T > 0).
template <class Counts, class First, class Out>
void load_fraction(SwitchConvention convention, const Counts& counts, const First& first,
                   double tokens, Index k, Out&& f) {
  if (convention == SwitchConvention::megatron) {
    f = counts / (tokens * double(k));
  } else if (convention == SwitchConvention::huggingface) {
    f = counts / tokens;
  } else {
    f = first / tokens;
  }
}

/// The Switch statistics (counts, f, P, balanced value, balance metrics) from batch sums.
inline SwitchStats make_switch_stats(const RoutingStatistics& statistics, const Eigen::VectorXd& f,
                                     double coefficient, SwitchConvention convention, Index k) {
  SwitchStats s;
  const double tokens = statistics.tokens();
  s.tokens = static_cast<std::int64_t>(tokens);
  s.tokens_per_expert = statistics.counts().template cast<std::int64_t>();
  s.first_choice_tokens = statistics.first_choice_counts().template cast<std::int64_t>();
  s.f = f;
  s.P = tokens > 0 ? Eigen::VectorXd(statistics.score_sums() / tokens)
                   : Eigen::VectorXd::Zero(statistics.num_experts());
  s.balanced_value =
      coefficient * (convention == SwitchConvention::huggingface ? double(k) : 1.0);
  s.balance = balance_metrics(s.tokens_per_expert);
  return s;
}

/// Rows per accumulation chunk. Chunks are grouped into a fixed partition of blocks (see
/// detail/parallel.hpp) whose partial sums are combined in block order, so sums do not depend
/// on how the blocks are spread over threads.
inline constexpr Index kSwitchChunkRows = 512;
static_assert(kSwitchChunkRows < kTopkCountMask, "a chunk's packed counts fit in 16 bits");

}  // namespace detail

template <class Derived>
SwitchAuxResult<compute_type_t<typename Derived::Scalar>> switch_aux_loss(
    const Eigen::MatrixBase<Derived>& logits, Index k, const SwitchOptions& options = {});

/// The Switch load-balancing loss as a reusable object that allocates nothing in steady state
/// (after the first call with the largest T). Two phases:
///   forward:  one pass over the logits fills `statistics()` (counts, score sums, T) and keeps
///             two numbers per token; returns L.
///   backward: writes (or, `backward_accumulate`, adds) scale * d L / d logits into the
///             caller's row-major T x N buffer, recomputing each row's scores from the logits.
///   forward_backward: both in two passes. For rows of whole exp blocks (N a multiple of 8, or
///             of 16 with AVX-512) and k <= 2, the first counts the top-k on the logits (the
///             selection on the scores whenever the logits decide it, the scores' exact top-k
///             on the rare row they do not: detail::count_logits_row) and the second computes
///             each row's scores once, for the gradient and for P; otherwise the output
///             buffer (of the compute type) carries the scores between the passes. The
///             fastest form when the gradient is written, not accumulated.
/// backward must be given the same logits as the last forward. Every phase runs its token
/// chunks on up to `moebal::num_threads()` OpenMP threads (<moebal/core/threads.hpp>); the
/// results are bitwise identical for any thread count.
///
/// @tparam Scalar the logits' type: float, double, Eigen::bfloat16 or Eigen::half. Rows are
///   computed in `Compute` (float for bfloat16/half, converted one row at a time: the logits
///   are still read in place); sums over tokens accumulate in double. The gradient buffer may
///   hold Scalar or Compute elements.
template <class Scalar>
class SwitchAuxLoss {
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::SwitchAuxLoss<Scalar>: Scalar must be float, double, Eigen::bfloat16 "
                "or Eigen::half");

 public:
  /// The compute type: float for bfloat16/half logits, Scalar otherwise.
  using Compute = compute_type_t<Scalar>;

  /// @param num_experts N >= 1. @param k 1 <= k <= N.
  /// @param options convention, score function and coefficient; `options.mask` must be empty
  ///   (pass the mask to `forward`, since it changes with every batch).
  /// @throws moebal::invalid_argument for N < 1, k out of range, a non-finite coefficient, or a
  ///   mask in the options.
  SwitchAuxLoss(Index num_experts, Index k, const SwitchOptions& options = {})
      : SwitchAuxLoss("moebal::SwitchAuxLoss", num_experts, k, options) {}

  /// N, the number of experts (columns of the logits).
  Index num_experts() const noexcept { return num_experts_; }
  /// k, the experts selected per token.
  Index k() const noexcept { return k_; }
  /// The options given at construction (the mask is always empty here).
  const SwitchOptions& options() const noexcept { return options_; }

  /// Phase 1: reads T x N logits (any Eigen dense expression of Compute; row-major storage read
  /// in place, column-major converted once per call), fills `statistics()`, returns L.
  /// @param mask length T, nonzero = real token; empty = all real.
  /// @throws moebal::invalid_argument for T = 0, a column count other than N, a mask of the
  ///   wrong length or with NaN, NaN or +Inf in a real token's logits, or (softmax) a real
  ///   token whose logits are all -Inf.
  template <class Derived>
  Compute forward(const Eigen::MatrixBase<Derived>& logits, const TokenMask& mask = {}) {
    assert_scalar<Derived>();
    const detail::RowInput<Scalar> x(logits);
    return forward_impl("moebal::SwitchAuxLoss::forward", x, mask, nullptr);
  }

  /// Phase 2: dloss_dlogits = scale * d L / d logits, every element written.
  /// @param logits the logits of the last `forward`.
  /// @param dloss_dlogits T x N row-major buffer of Scalar or Compute (a RowMatrix, a block of
  ///   one, an Eigen::Map over a tensor's memory): bfloat16 logits can write a bfloat16 or a
  ///   float (fp32 master) gradient.
  /// @throws moebal::invalid_argument if no forward was run, the shapes differ from forward's.
  template <class Derived, class Out>
  void backward(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                Compute scale = Compute(1)) {
    assert_scalar<Derived>();
    const detail::RowInput<Scalar> x(logits);
    auto out = detail::output_ref<Scalar>(dloss_dlogits);
    backward_impl<false>("moebal::SwitchAuxLoss::backward", x, out, scale);
  }

  /// Phase 2, accumulating: dloss_dlogits += scale * d L / d logits (padded rows untouched).
  template <class Derived, class Out>
  void backward_accumulate(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                           Compute scale = Compute(1)) {
    assert_scalar<Derived>();
    const detail::RowInput<Scalar> x(logits);
    auto out = detail::output_ref<Scalar>(dloss_dlogits);
    backward_impl<true>("moebal::SwitchAuxLoss::backward_accumulate", x, out, scale);
  }

  /// Both phases: returns L and writes dloss_dlogits = scale * d L / d logits, with the
  /// statistics, L and the gradient bitwise those of forward then backward (see the class
  /// comment for the passes).
  template <class Derived, class Out>
  Compute forward_backward(const Eigen::MatrixBase<Derived>& logits, Out&& dloss_dlogits,
                           const TokenMask& mask = {}, Compute scale = Compute(1)) {
    assert_scalar<Derived>();
    const detail::RowInput<Scalar> x(logits);
    auto out = detail::output_ref<Scalar>(dloss_dlogits);
    return forward_backward_impl("moebal::SwitchAuxLoss::forward_backward", x, out, mask, scale);
  }

  /// L of the last forward.
  Compute loss() const noexcept { return static_cast<Compute>(loss_); }

  /// The batch sums of the last forward (T, c_i, first-choice counts, S_i).
  const RoutingStatistics& statistics() const noexcept { return statistics_; }

  /// Counts, f, P and the balanced value of the last forward.
  SwitchStats stats() const {
    return detail::make_switch_stats(statistics_, f_, options_.coefficient, options_.convention,
                                     k_);
  }

 private:
  // The combined objective runs its Switch + z-loss case on this kernel (with z_weight_).
  template <class>
  friend class CombinedAuxLoss;

  template <class D>
  friend SwitchAuxResult<compute_type_t<typename D::Scalar>> switch_aux_loss(
      const Eigen::MatrixBase<D>&, Index, const SwitchOptions&);

  SwitchAuxLoss(const char* function, Index num_experts, Index k, const SwitchOptions& options)
      : num_experts_(num_experts), k_(k), options_(options) {
    detail::check_switch_config(function, num_experts, k, options);
    if (!options.mask.empty()) {
      detail::throw_invalid(function, "options.mask",
                            "an empty mask (SwitchAuxLoss takes the mask in forward)",
                            detail::concat("a mask of length ", options.mask.size()));
    }
    statistics_ = RoutingStatistics(num_experts);
    f_ = Eigen::VectorXd::Zero(num_experts);
    f_compute_.setZero(num_experts);
    ensure_lanes(1);
  }

  // Per-thread scratch: one row's values and one chunk's partial sums. O(N) per thread.
  struct Lane {
    detail::ScratchArray<Compute> raw;           // N, one row's raw scores (aligned)
    detail::ScratchArray<Compute> raw2;          // N, the next row's (phase 1 alternates)
    detail::ScratchArray<Compute> raw3;          // N, phase 1's row pairs: two pairs of rows
    detail::ScratchArray<Compute> raw4;          // N
    detail::RowReader<Scalar, Compute> reader;   // one row converted (half-precision input)
    detail::RowReader<Scalar, Compute> reader2;  // the second row of a pair
    detail::ScratchArray<Compute> scores;        // N, one row's scores
    Eigen::ArrayXd chunk_sums;                   // N, one chunk's score sums
    // N, one chunk's top-k and first-choice counts, packed (detail::kFirstChoiceUnit)
    Eigen::Array<std::int32_t, Eigen::Dynamic, 1> chunk_counts;
    double chunk_tokens = 0.0;                   // real tokens of the chunk
    Eigen::ArrayXd thread_counts;                // N, this thread's top-k counts (exact)
    Eigen::ArrayXd thread_first;                 // N, this thread's first-choice counts
    double thread_tokens = 0.0;                  // this thread's real tokens
    std::vector<Index> selected;                 // k
    detail::TopkScratch<Compute> topk;
  };

  // Sizes the scratch of `threads` threads (allocates only when the thread count grows).
  void ensure_lanes(int threads) {
    detail::ensure_lanes(lanes_, threads, [&](Lane& lane) {
      lane.raw.resize(num_experts_);
      lane.raw2.resize(num_experts_);
      lane.raw3.resize(num_experts_);
      lane.raw4.resize(num_experts_);
      lane.reader.resize(num_experts_);
      lane.reader2.resize(num_experts_);
      lane.scores.resize(num_experts_);
      lane.chunk_sums.resize(num_experts_);
      lane.chunk_counts.resize(num_experts_);
      lane.thread_counts.resize(num_experts_);
      lane.thread_first.resize(num_experts_);
      lane.selected.resize(static_cast<std::size_t>(k_));
      lane.topk.resize(num_experts_, k_);
    });
  }

  template <class Derived>
  static constexpr void assert_scalar() {
    static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                  "moebal::SwitchAuxLoss<Scalar> takes logits of the same Scalar: construct "
                  "SwitchAuxLoss<float> for float logits, SwitchAuxLoss<double> for double, "
                  "SwitchAuxLoss<Eigen::bfloat16> for bfloat16");
  }

  void check_logits(const char* function, const detail::RowInput<Scalar>& x) const {
    detail::check_logits_columns(function, x.rows(), x.cols(), num_experts_);
  }

  template <class Out>
  void check_output(const char* function, const RowMatrixRef<Out>& out) const {
    detail::check_output_shape(function, "dloss_dlogits", out.rows(), out.cols(), rows_,
                               num_experts_);
  }

  // Phase 1. When `raw_out` is given, each real row's raw scores are left in it for phase 2.
  // Blocks of chunks of kSwitchChunkRows rows run on the threads; their partial sums are added
  // to the statistics in block order, so the result does not depend on the thread count.
  //
  // `defer_sums` (forward_backward): phase 1 takes the counts alone and phase 2 (apply_rows),
  // which reads or computes every score anyway, adds the score sums S_i in the same chunk and
  // block order, so they are bitwise those of forward() (finish_sums completes the statistics
  // and L). Logits mode (no raw_out, detail::logits_selection_applies): phase 1 selects on the
  // logits (count_chunk_on_logits) and phase 2 computes the scores and also takes the
  // z-loss's lse_t^2. Buffer mode (raw_out, K > 0, rows of whole exp blocks): phase 1 is the
  // fused forward, leaving the raw scores in raw_out.
  Compute forward_impl(const char* function, const detail::RowInput<Scalar>& x,
                       const TokenMask& mask, RowMatrixRef<Compute>* raw_out,
                       bool defer_sums = false) {
    rows_ = -1;  // no valid forward until this one completes
    sums_pending_ = false;
    check_logits(function, x);
    detail::check_mask(function, mask, x.rows());
    const Index rows = x.rows(), n = num_experts_;
    norms_.resize(static_cast<std::size_t>(rows));
    statistics_.clear();
    // Logits mode (no buffer) or buffer mode (the scores carried in raw_out), see above.
    on_logits_ = defer_sums && raw_out == nullptr && detail::logits_selection_applies(n, k_);
    defer_sums_ = on_logits_ || (defer_sums && raw_out != nullptr &&
                                 k_ <= detail::kThresholdTopkMaxK && detail::fused_row_kernel(n));
    // Rows -> chunk partials -> block partials (one thread per block) -> the total, blocks in
    // order; counts are exact integers, summed per thread. See detail/parallel.hpp.
    const Index chunks = (rows + detail::kSwitchChunkRows - 1) / detail::kSwitchChunkRows;
    const detail::BlockPartition partition(chunks);
    const int threads = detail::threads_for(partition.blocks);
    ensure_lanes(threads);
    const std::size_t block_values = static_cast<std::size_t>(partition.blocks * n);
    if (block_sums_.size() < block_values) block_sums_.resize(block_values);
    const bool use_z = z_weight_ != 0.0;
    if (use_z && block_z_.size() < static_cast<std::size_t>(partition.blocks)) {
      block_z_.resize(static_cast<std::size_t>(partition.blocks));
    }
    for (int i = 0; i < threads; ++i) {
      Lane& lane = lanes_[static_cast<std::size_t>(i)];
      lane.thread_counts.setZero();
      lane.thread_first.setZero();
      lane.thread_tokens = 0.0;
    }
    const auto chunk_body = [&](Lane& lane, Index begin, Index end) {
      // The top-k method's depth is a template parameter: one dispatch per chunk.
      if (on_logits_) {
        if (k_ == 1) {
          count_chunk_on_logits<1>(function, x, mask, lane, begin, end);
        } else {
          count_chunk_on_logits<2>(function, x, mask, lane, begin, end);
        }
      } else if (k_ <= detail::kThresholdTopkMaxK) {
        detail::with_topk_depth(k_, [&](auto depth) {
          accumulate_chunk<decltype(depth)::value>(function, x, mask, raw_out, lane, begin, end);
        });
      } else {
        accumulate_chunk<0>(function, x, mask, raw_out, lane, begin, end);
      }
      for (Index j = 0; j < n; ++j) {  // unpack (detail::kFirstChoiceUnit)
        const std::int32_t packed = lane.chunk_counts[j];
        lane.thread_counts[j] += double(packed & detail::kTopkCountMask);
        lane.thread_first[j] += double(packed >> 16);
      }
      lane.thread_tokens += lane.chunk_tokens;
    };
    // (With defer_sums_ the chunk sums stay zero: phase 2 sums the scores by the same blocks;
    // on the logits the z-loss's lse_t are not known yet either: phase 2 takes them too.)
    for_block_chunks(partition, threads, rows, chunk_body, [&](Lane&, Index block) {
      if (use_z && !on_logits_) sum_block_z(partition, block, rows);
    });
    double& tokens = statistics_.mutable_tokens();
    auto counts = statistics_.mutable_counts();
    auto first = statistics_.mutable_first_choice_counts();
    for (int i = 0; i < threads; ++i) {
      const Lane& lane = lanes_[static_cast<std::size_t>(i)];
      counts += lane.thread_counts.matrix();
      first += lane.thread_first.matrix();
      tokens += lane.thread_tokens;
    }
    update_f();
    rows_ = rows;
    blocks_ = partition.blocks;
    sums_pending_ = defer_sums_;
    if (!sums_pending_) finish_sums();
    return static_cast<Compute>(loss_);
  }

  // The blocks of chunks by which the score sums S_i are taken, on `threads` threads: per
  // block, its partial sums in block_sums_ zeroed; per chunk, in order,
  // chunk(lane, begin, end) fills lane.chunk_sums, which is then added to the block's; then
  // block_done(lane, block). Phase 1 and the phase 2 of a deferred forward_backward both sum
  // through here, so S_i has one order whichever pass takes it (finish_sums adds the blocks).
  template <class Chunk, class BlockDone>
  void for_block_chunks(const detail::BlockPartition& partition, int threads, Index rows,
                        Chunk&& chunk, BlockDone&& block_done) {
    const Index n = num_experts_;
    detail::for_blocks(partition, threads, [&](int thread, Index block) {
      Lane& lane = lanes_[static_cast<std::size_t>(thread)];
      Eigen::Map<Eigen::ArrayXd> block_sum(block_sums_.data() + block * n, n);
      block_sum.setZero();
      for (Index c = partition.begin(block); c < partition.end(block); ++c) {
        const Index begin = c * detail::kSwitchChunkRows;
        chunk(lane, begin, std::min(rows, begin + detail::kSwitchChunkRows));
        block_sum += lane.chunk_sums;
      }
      block_done(lane, block);
    });
  }

  // The z-loss's sum of lse_t^2 over a block's real rows, in row order, into block_z_
  // (lse_t = shift_t - log(inv_t), from the softmax normalizer in norms_).
  void sum_block_z(const detail::BlockPartition& partition, Index block, Index rows) {
    double z = 0.0;
    const Index first = partition.begin(block) * detail::kSwitchChunkRows;
    const Index last = std::min(rows, partition.end(block) * detail::kSwitchChunkRows);
    for (Index t = first; t < last; ++t) {
      const detail::RowNorm<Compute>& norm = norms_[static_cast<std::size_t>(t)];
      if (norm.inv == Compute(0)) continue;
      const double lse = double(lse_of(norm));
      z += lse * lse;
    }
    block_z_[static_cast<std::size_t>(block)] = z;
  }

  // The score sums S_i from the blocks' partials, in block order, and L from them; the z-loss
  // term from its blocks' sums, in block order.
  void finish_sums() {
    const Index n = num_experts_;
    auto sums = statistics_.mutable_score_sums();
    for (Index block = 0; block < blocks_; ++block) {
      sums += Eigen::Map<const Eigen::VectorXd>(block_sums_.data() + block * n, n);
    }
    const double tokens = statistics_.tokens();
    loss_ = tokens > 0 ? options_.coefficient * double(n) * f_.dot(sums) / tokens : 0.0;
    z_value_ = 0.0;
    if (z_weight_ != 0.0) {
      double z_sum = 0.0;
      for (Index block = 0; block < blocks_; ++block) {
        z_sum += block_z_[static_cast<std::size_t>(block)];
      }
      z_value_ = tokens > 0 ? z_weight_ * z_sum / tokens : 0.0;
    }
    sums_pending_ = false;
  }

  // One chunk of phase 1: rows [begin, end) into the lane's partial sums. K: the threshold
  // top-k's lane-list depth (a power of two >= k), or 0 for the exact method only (k > 16).
  template <Index K>
  void accumulate_chunk(const char* function, const detail::RowInput<Scalar>& x,
                        const TokenMask& mask, RowMatrixRef<Compute>* raw_out, Lane& lane,
                        Index begin, Index end) {
    const Index n = num_experts_;
    lane.chunk_sums.setZero();
    lane.chunk_counts.setZero();
    lane.chunk_tokens = 0.0;
    double* cs = lane.chunk_sums.data();
    std::int32_t* cc = lane.chunk_counts.data();
    // Rows of whole exp blocks: the fused kernel, two rows at a time (accumulate_chunk_pairs).
    if constexpr (K > 0) {
      if (detail::fused_row_kernel(n)) {
        accumulate_chunk_pairs<K>(function, x, mask, raw_out, lane, begin, end);
        return;
      }
    }
    // Otherwise each real row: its scores and (K > 0) the threshold search (tau, the k-th
    // largest score, and top, the largest), then the statistics. The statistics of a row are
    // taken after the scores of the next real row, so that the two rows' dependency chains
    // (the maximum, the exponentials, the sum, its reciprocal, the comparisons) overlap; the
    // raw scores of the row that waits stay in its output row or in one of two scratch rows.
    Index pending = -1;  // the real row whose statistics are not taken yet
    Compute pending_tau = Compute(0), pending_top = Compute(0);
    const Compute* pending_raw = nullptr;
    int slot = 0;
    const auto finish = [&](Index t, const Compute* raw, Compute tau, Compute top) {
      finish_row<K>(lane, t, raw, tau, top, cc, cs);
    };
    for (Index t = begin; t < end; ++t) {
      detail::RowNorm<Compute>& norm = norms_[static_cast<std::size_t>(t)];
      if (!mask.is_real(t)) {
        norm = detail::RowNorm<Compute>{};  // inv == 0 marks padding; the row is never read
        continue;
      }
      const Compute* row = lane.reader.read(x.data() + t * x.outerStride(), n);
      // The raw scores go straight into the output row when it carries them to phase 2.
      Compute* raw = raw_out != nullptr ? raw_out->data() + t * raw_out->outerStride()
                                        : (slot == 0 ? lane.raw.data() : lane.raw2.data());
      slot ^= 1;
      Compute tau = Compute(0), top = Compute(0);
      if (!detail::raw_scores_to(row, n, options_.score, raw, norm)) {
        detail::throw_invalid_row(function, row, n, t, options_.score);
      }
      if constexpr (K > 0) {
        Compute* q = lane.scores.data();
        for (Index j = 0; j < n; ++j) q[j] = raw[j] * norm.inv;
        detail::topk_threshold_search<K>(q, n, k_, tau, top);
      }
      if (pending >= 0) finish(pending, pending_raw, pending_tau, pending_top);
      pending = t;
      pending_raw = raw;
      pending_tau = tau;
      pending_top = top;
    }
    if (pending >= 0) finish(pending, pending_raw, pending_tau, pending_top);
  }

  // The statistics of one real row t from its raw scores and (K > 0) its threshold search:
  // into the lane's chunk counts and sums (cc, cs: the lane's chunk arrays).
  template <Index K>
  MOEBAL_ALWAYS_INLINE void finish_row(Lane& lane, Index t, const Compute* raw, Compute tau,
                                       Compute top, std::int32_t* cc, double* cs) {
    const Index n = num_experts_;
    const Compute inv = norms_[static_cast<std::size_t>(t)].inv;
    lane.chunk_tokens += 1.0;
    if constexpr (K > 0) {
      // If exactly k scores are >= tau and the maximum is unique (no tie around the top k),
      // the selection is {j : q_j >= tau} and the first choice the maximum: counted in the
      // same pass as the score sums (exact packed int32 counts: a chunk counts at most 512).
      if (defer_sums_ ? detail::count_threshold_row<false>(raw, n, k_, inv, tau, top, cc, cs)
                      : detail::count_threshold_row<true>(raw, n, k_, inv, tau, top, cc, cs)) {
        return;
      }
    } else {
      MOEBAL_ASSERT(!defer_sums_);
      (void)tau;  // no threshold search
      (void)top;
    }
    // The rare tie (or k above the threshold method's range, where the scores are summed
    // here): the exact method on the scores, ties to the lower expert index.
    Compute* q = lane.scores.data();
    for (Index j = 0; j < n; ++j) q[j] = raw[j] * inv;
    if constexpr (K == 0) {
      for (Index j = 0; j < n; ++j) cs[j] += static_cast<double>(q[j]);
    }
    count_exact(lane, q);
  }

  // accumulate_chunk for rows of whole exp blocks (K > 0): the real rows are taken two at a
  // time by the fused scores + threshold kernel, whose two rows' dependency chains overlap
  // (each row's values are bitwise those of the one-row kernel); a pair's statistics are
  // taken after the next pair's scores, so the statistics of every row are still taken in
  // row order and the sums are those of the one-row loop. An odd last real row takes the
  // one-row kernel.
  template <Index K>
  void accumulate_chunk_pairs(const char* function, const detail::RowInput<Scalar>& x,
                              const TokenMask& mask, RowMatrixRef<Compute>* raw_out, Lane& lane,
                              Index begin, Index end) {
    const Index n = num_experts_;
    double* cs = lane.chunk_sums.data();
    std::int32_t* cc = lane.chunk_counts.data();
    Compute* scratch[2][2] = {{lane.raw.data(), lane.raw2.data()},
                              {lane.raw3.data(), lane.raw4.data()}};
    const auto raw_row = [&](Index t, int pair_slot, int r) {
      return raw_out != nullptr ? raw_out->data() + t * raw_out->outerStride()
                                : scratch[pair_slot][r];
    };
    Index pending[2];  // the real rows (0, 1 or 2) whose statistics are not taken yet
    int pending_count = 0;
    const Compute* pending_raw[2] = {nullptr, nullptr};
    Compute pending_tau[2] = {}, pending_top[2] = {};
    const auto finish_pending = [&]() {
      for (int r = 0; r < pending_count; ++r) {
        finish_row<K>(lane, pending[r], pending_raw[r], pending_tau[r], pending_top[r], cc, cs);
      }
      pending_count = 0;
    };
    int slot = 0;
    Index pair[2];
    int have = 0;
    for (Index t = begin; t < end; ++t) {
      if (!mask.is_real(t)) {
        // inv == 0 marks padding; the row is never read
        norms_[static_cast<std::size_t>(t)] = detail::RowNorm<Compute>{};
        continue;
      }
      pair[have++] = t;
      if (have < 2) continue;
      have = 0;
      const Compute* rows[2] = {lane.reader.read(x.data() + pair[0] * x.outerStride(), n),
                                lane.reader2.read(x.data() + pair[1] * x.outerStride(), n)};
      Compute* raw[2] = {raw_row(pair[0], slot, 0), raw_row(pair[1], slot, 1)};
      slot ^= 1;
      detail::RowNorm<Compute> norm[2];
      Compute tau[2], top[2];
      bool valid[2];
      detail::raw_scores_topk_rows<K, 2>(rows, n, k_, options_.score, raw, norm, tau, top,
                                         valid);
      for (int r = 0; r < 2; ++r) {
        if (!valid[r]) detail::throw_invalid_row(function, rows[r], n, pair[r], options_.score);
        norms_[static_cast<std::size_t>(pair[r])] = norm[r];
      }
      finish_pending();
      for (int r = 0; r < 2; ++r) {
        pending[r] = pair[r];
        pending_raw[r] = raw[r];
        pending_tau[r] = tau[r];
        pending_top[r] = top[r];
      }
      pending_count = 2;
    }
    if (have == 1) {
      const Index t = pair[0];
      const Compute* row = lane.reader.read(x.data() + t * x.outerStride(), n);
      Compute* raw = raw_row(t, slot, 0);
      detail::RowNorm<Compute>& norm = norms_[static_cast<std::size_t>(t)];
      Compute tau, top;
      if (!detail::raw_scores_topk<K>(row, n, k_, options_.score, raw, norm, tau, top)) {
        detail::throw_invalid_row(function, row, n, t, options_.score);
      }
      finish_pending();
      finish_row<K>(lane, t, raw, tau, top, cc, cs);
    } else {
      finish_pending();
    }
  }

  // Phase 1's mark of a real row that needs no flush (norms_[t].inv, until phase 2).
  static constexpr Compute kNoFlush = Compute(2);

  // One chunk of phase 1 in logits mode (on_logits_): the counts alone, selected on the
  // logits (count_logits_row) and, for the rare row the logits do not decide, by the exact
  // method on the scores. Each real row's maximum is kept
  // in norms_ (inv = 1 or kNoFlush until phase 2 computes the normalizer) for phase 2.
  template <Index K>
  void count_chunk_on_logits(const char* function, const detail::RowInput<Scalar>& x,
                             const TokenMask& mask, Lane& lane, Index begin, Index end) {
    const Index n = num_experts_;
    lane.chunk_sums.setZero();  // (the sums are phase 2's)
    lane.chunk_counts.setZero();
    lane.chunk_tokens = 0.0;
    std::int32_t* cc = lane.chunk_counts.data();
    for (Index t = begin; t < end; ++t) {
      detail::RowNorm<Compute>& norm = norms_[static_cast<std::size_t>(t)];
      if (!mask.is_real(t)) {
        norm = detail::RowNorm<Compute>{};  // inv == 0 marks padding; the row is never read
        continue;
      }
      const Compute* row = lane.reader.read(x.data() + t * x.outerStride(), n);
      lane.chunk_tokens += 1.0;
      Compute max, min;
      const detail::LogitsRow outcome =
          detail::count_logits_row<K>(row, n, k_, options_.score, max, min, cc);
      if (outcome == detail::LogitsRow::invalid) {
        detail::throw_invalid_row(function, row, n, t, options_.score);
      }
      norm.shift = max;
      // Phase 2 leaves out the flush of the exponentials below the smallest normal number
      // where no x_j - max is below its log (x_j - max >= min - max, rounded monotonically).
      norm.inv = min - max >= detail::kLogSmallestNormal<Compute> ? kNoFlush : Compute(1);
      if (outcome == detail::LogitsRow::exact) {
        detail::RowNorm<Compute> exact;
        const bool valid = detail::raw_scores_to(row, n, options_.score, lane.raw.data(), exact);
        MOEBAL_ASSERT(valid);
        (void)valid;
        Compute* q = lane.scores.data();
        for (Index j = 0; j < n; ++j) q[j] = lane.raw[j] * exact.inv;
        count_exact(lane, q);
      }
    }
  }

  // Phase 2's kernel for R rows (R = 1 or 2) of whole exp blocks with known maxima: each
  // row's raw scores (into raw[r]) and normalizer as raw_scores_rows computes them, and
  // dots[r] = sum_j f_j raw_rj, taken as the blocks are computed (8 lanes in row order, then
  // the fixed tree). Flush: see detail::raw_block. valid[r] as raw_scores_rows's (which, with
  // a known maximum, does not see a sigmoid row's +Inf: a caller that needs it checks).
  template <int R, bool Flush>
  MOEBAL_ALWAYS_INLINE void scores_and_dots(const Compute* const* row, const Compute* max,
                                            Compute* const* raw, detail::RowNorm<Compute>* norm,
                                            Compute* dots, bool* valid) const {
    const Compute* f = f_compute_.data();
    detail::RowBlock<Compute> lanes[R];
    Index at[R] = {};
    for (int r = 0; r < R; ++r) lanes[r].setZero();
    detail::raw_scores_rows<R, true, Flush>(
        row, num_experts_, options_.score, raw, norm, valid,
        [&](int r, const detail::ExpBlock<Compute>& b) {
          for (Index h = 0; h < detail::kExpBlock; h += detail::kRowBlock) {
            lanes[r] += detail::load_block<Compute>(f + at[r] + h) *
                        b.template segment<detail::kRowBlock>(h);
          }
          at[r] += detail::kExpBlock;
        },
        max);
    for (int r = 0; r < R; ++r) {
      MOEBAL_ASSERT(at[r] == num_experts_);  // every block passed the hook
      const detail::RowBlock<Compute>& l = lanes[r];
      dots[r] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    }
  }

  // The exact top-k of one row's scores q into the lane's chunk counts.
  void count_exact(Lane& lane, const Compute* q) {
    detail::topk_row_exact(q, num_experts_, k_, lane.selected.data(), lane.topk);
    for (Index s = 0; s < k_; ++s) lane.chunk_counts[lane.selected[std::size_t(s)]] += 1;
    lane.chunk_counts[lane.selected[0]] += detail::kFirstChoiceUnit;
  }

  // log sum_j exp(x_tj) from a softmax row's normalizer.
  static Compute lse_of(const detail::RowNorm<Compute>& norm) {
    return norm.shift - std::log(norm.inv);
  }

  // f_i from the counts in the chosen convention (see SwitchConvention).
  void update_f() {
    const double tokens = statistics_.tokens();
    if (tokens <= 0) {
      f_.setZero();
    } else {
      detail::load_fraction(options_.convention, statistics_.counts(),
                            statistics_.first_choice_counts(), tokens, k_, f_);
    }
    f_compute_ = f_.array().template cast<Compute>();
  }

  // Phase 2 over every row. `raw_in_out`: phase 1 left each real row's raw scores in the
  // output buffer (forward_backward); otherwise they are recomputed from the logits. Rows are
  // independent: chunks of rows run on the threads.
  template <bool Accumulate, class Out>
  void apply_rows(const char* function, const detail::RowInput<Scalar>& x, RowMatrixRef<Out>& out,
                  Compute scale, bool raw_in_out) {
    const Index n = num_experts_;
    const double tokens = statistics_.tokens();
    const Compute factor =
        tokens > 0 ? static_cast<Compute>(double(scale) * options_.coefficient * double(n) / tokens)
                   : Compute(0);
    const Index rows = rows_;
    const Index chunks = (rows + detail::kSwitchChunkRows - 1) / detail::kSwitchChunkRows;
    const int threads = detail::threads_for(chunks);
    ensure_lanes(threads);
    const double z_factor =
        z_weight_ != 0.0 && tokens > 0 ? double(scale) * z_weight_ * 2.0 / tokens : 0.0;
    MOEBAL_ASSERT(z_factor == 0.0 || options_.score == ScoreFunction::softmax);
    if (sums_pending_ && !on_logits_) {
      // Buffer mode: phase 1 left the score sums to this pass and the raw scores in the
      // output buffer: the gradient and the sums from them, by blocks of chunks as phase 1
      // takes them (a zeroed chunk sum per chunk, rows in order; chunk sums into the block's in
      // order; blocks in order in finish_sums), so S_i is bitwise phase 1's.
      if constexpr (std::is_same_v<Out, Compute> && !Accumulate) {
        MOEBAL_ASSERT(raw_in_out);
        const detail::BlockPartition partition(chunks);
        const int block_threads = detail::threads_for(partition.blocks);
        ensure_lanes(block_threads);
        const auto chunk_body = [&](Lane& lane, Index begin, Index end) {
          lane.chunk_sums.setZero();
          for (Index t = begin; t < end; ++t) {
            Out* dx = out.data() + t * out.outerStride();
            const detail::RowNorm<Compute>& norm = norms_[static_cast<std::size_t>(t)];
            if (norm.inv == Compute(0)) {  // padded token
              std::fill(dx, dx + n, Out(0));
              continue;
            }
            const Compute* raw[1] = {dx};
            Compute dot[1];
            detail::lane_dot_rows<1>(f_compute_.data(), raw, n, dot);
            const Compute g_dot_q = dot[0] * norm.inv;  // dot_with_scores
            const Compute c =
                z_factor != 0.0 ? static_cast<Compute>(z_factor * double(lse_of(norm)))
                                : Compute(0);
            detail::score_vjp_row_summing_in_place(dx, norm, f_compute_.data(), g_dot_q, factor,
                                                   c, z_factor != 0.0, options_.score, n,
                                                   lane.chunk_sums.data());
          }
        };
        for_block_chunks(partition, block_threads, rows, chunk_body, [](Lane&, Index) {});
        finish_sums();
        return;
      } else {
        MOEBAL_ASSERT(false);
      }
    }
    if (sums_pending_) {
      // Phase 1 counted on the logits and left the scores to this pass (forward_impl's
      // defer_sums): each real row's scores are computed from the logits (the maximum known
      // from phase 1), the row's normalizer kept, its gradient written and its scores added to
      // the sums, by blocks of chunks as a forward takes them (a zeroed chunk sum per chunk,
      // rows in order; chunk sums into the block's in order; blocks in order in finish_sums),
      // so S_i is bitwise that of forward(). Real rows are taken two at a time (their
      // reductions interleaved, each computed as alone).
      if constexpr (!Accumulate) {
        const detail::BlockPartition partition(chunks);
        const int block_threads = detail::threads_for(partition.blocks);
        ensure_lanes(block_threads);
        const bool z = z_factor != 0.0;
        const auto chunk_body = [&](Lane& lane, Index begin, Index end) {
          lane.chunk_sums.setZero();
          double* sums = lane.chunk_sums.data();
          const auto apply_real = [&](auto count, auto flush, const Index* t) {
            constexpr int R = decltype(count)::value;
            const Compute* row[R];
            Compute* raw[2] = {lane.raw.data(), lane.raw2.data()};
            Out* dx[R];
            Compute max[R];
            detail::RowNorm<Compute> norm[R];
            row[0] = lane.reader.read(x.data() + t[0] * x.outerStride(), n);
            if constexpr (R == 2) row[1] = lane.reader2.read(x.data() + t[1] * x.outerStride(), n);
            for (int r = 0; r < R; ++r) {
              max[r] = norms_[static_cast<std::size_t>(t[r])].shift;
              dx[r] = out.data() + t[r] * out.outerStride();
            }
            Compute dots[R];
            bool valid[R];
            scores_and_dots<R, decltype(flush)::value>(row, max, raw, norm, dots, valid);
            for (int r = 0; r < R; ++r) MOEBAL_ASSERT(valid[r]);  // phase 1 checked the rows
            (void)valid;
            Compute g_dot_q[R], c[R];
            for (int r = 0; r < R; ++r) {
              norms_[static_cast<std::size_t>(t[r])] = norm[r];
              g_dot_q[r] = dots[r] * norm[r].inv;  // dot_with_scores
              c[r] = z ? static_cast<Compute>(z_factor * double(lse_of(norm[r]))) : Compute(0);
            }
            detail::score_vjp_rows_summing<R>(raw, dx, norm, f_compute_.data(), g_dot_q, factor,
                                              c, z, options_.score, n, sums);
          };
          Index pair[2];
          int have = 0;
          for (Index t = begin; t < end; ++t) {
            if (norms_[static_cast<std::size_t>(t)].inv == Compute(0)) {  // padded token
              Out* dx = out.data() + t * out.outerStride();
              std::fill(dx, dx + n, Out(0));
              continue;
            }
            pair[have++] = t;
            if (have == 2) {
              // Rows with no logit far enough below the maximum to flush (phase 1 marked
              // them: kNoFlush) leave out the flush, which would change nothing.
              if (norms_[std::size_t(pair[0])].inv == kNoFlush &&
                  norms_[std::size_t(pair[1])].inv == kNoFlush) {
                apply_real(std::integral_constant<int, 2>{}, std::false_type{}, pair);
              } else {
                apply_real(std::integral_constant<int, 2>{}, std::true_type{}, pair);
              }
              have = 0;
            }
          }
          if (have == 1) apply_real(std::integral_constant<int, 1>{}, std::true_type{}, pair);
        };
        for_block_chunks(partition, block_threads, rows, chunk_body, [&](Lane&, Index block) {
          if (z_weight_ != 0.0) sum_block_z(partition, block, rows);
        });
        finish_sums();
        return;
      } else {
        MOEBAL_ASSERT(false);
      }
    }
    // Rows that forward_backward would take by phase 2's kernel are taken by it here too, so
    // that the two forms give the same bits.
    const bool known_max = !raw_in_out && detail::logits_selection_applies(n, k_);
    detail::for_chunks(chunks, threads, [&](int thread, Index chunk) {
      Lane& lane = lanes_[static_cast<std::size_t>(thread)];
      const Index begin = chunk * detail::kSwitchChunkRows;
      const Index end = std::min(rows, begin + detail::kSwitchChunkRows);
      // R real rows (t[0..R), R = 1 or 2) at once: two rows' reductions (the recomputed
      // scores' and the dot products') are interleaved, each row computed as alone.
      const auto apply_real = [&](auto count, const Index* t) {
        constexpr int R = decltype(count)::value;
        const Compute* raw[R];
        Compute dots[R] = {};
        Out* dx[R];
        for (int r = 0; r < R; ++r) dx[r] = out.data() + t[r] * out.outerStride();
        if (raw_in_out) {
          if constexpr (std::is_same_v<Out, Compute>) {
            for (int r = 0; r < R; ++r) raw[r] = dx[r];
          } else {
            MOEBAL_ASSERT(false);
          }
        } else if (known_max) {
          // The forward's maxima and phase 2's kernel (forward_backward's scores and dots).
          const Compute* row[R];
          Compute* scratch[2] = {lane.raw.data(), lane.raw2.data()};
          Compute max[R];
          row[0] = lane.reader.read(x.data() + t[0] * x.outerStride(), n);
          if constexpr (R == 2) row[1] = lane.reader2.read(x.data() + t[1] * x.outerStride(), n);
          for (int r = 0; r < R; ++r) {
            max[r] = norms_[static_cast<std::size_t>(t[r])].shift;
            raw[r] = scratch[r];
          }
          detail::RowNorm<Compute> again[R];
          bool valid[R];
          scores_and_dots<R, true>(row, max, scratch, again, dots, valid);
          for (int r = 0; r < R; ++r) {
            // (A sigmoid's +Inf leaves its sum finite: checked on the logits.)
            if (!valid[r] || (options_.score == ScoreFunction::sigmoid &&
                              !detail::valid_logits_row(row[r], n, false))) {
              detail::throw_invalid_row(function, row[r], n, t[r], options_.score);
            }
          }
        } else {
          const Compute* row[R];
          Compute* scratch[2] = {lane.raw.data(), lane.raw2.data()};
          row[0] = lane.reader.read(x.data() + t[0] * x.outerStride(), n);
          if constexpr (R == 2) row[1] = lane.reader2.read(x.data() + t[1] * x.outerStride(), n);
          detail::RowNorm<Compute> again[R];
          bool valid[R];
          detail::raw_scores_rows<R>(row, n, options_.score, scratch, again, valid,
                                     detail::NoBlockHook());
          for (int r = 0; r < R; ++r) {
            if (!valid[r]) detail::throw_invalid_row(function, row[r], n, t[r], options_.score);
            raw[r] = scratch[r];
          }
        }
        if (raw_in_out || !known_max) detail::lane_dot_rows<R>(f_compute_.data(), raw, n, dots);
        for (int r = 0; r < R; ++r) {
          const detail::RowNorm<Compute>& norm = norms_[static_cast<std::size_t>(t[r])];
          const Compute g_dot_q = dots[r] * norm.inv;  // dot_with_scores
          if (z_factor != 0.0) {
            // The combined objective's z-loss (softmax scores only) in the same pass (raw may
            // be dx itself): d L / d x_tj += w_z (2 / T) lse_t q_tj.
            const Compute c = static_cast<Compute>(z_factor * double(lse_of(norm)));
            const Compute* f = f_compute_.data();
            const Compute* q_raw = raw[r];
            Out* d = dx[r];
            for (Index j = 0; j < n; ++j) {
              const Compute q = q_raw[j] * norm.inv;
              detail::store<Accumulate>(d[j], Compute(factor * q * (f[j] - g_dot_q) + c * q));
            }
            continue;
          }
          detail::score_vjp_row<Accumulate>(raw[r], norm, f_compute_.data(), g_dot_q, factor,
                                            options_.score, n, dx[r]);
        }
      };
      Index pair[2];
      int have = 0;
      for (Index t = begin; t < end; ++t) {
        if (norms_[static_cast<std::size_t>(t)].inv == Compute(0)) {  // padded token
          if constexpr (!Accumulate) {
            Out* dx = out.data() + t * out.outerStride();
            std::fill(dx, dx + n, Out(0));
          }
          continue;
        }
        pair[have++] = t;
        // Pairs where the scores are recomputed; one row at a time where they are read from
        // the output buffer (no faster in pairs: that pass waits on memory).
        if (have == 2 || raw_in_out) {
          if (have == 2) {
            apply_real(std::integral_constant<int, 2>{}, pair);
          } else {
            apply_real(std::integral_constant<int, 1>{}, pair);
          }
          have = 0;
        }
      }
      if (have == 1) apply_real(std::integral_constant<int, 1>{}, pair);
    });
  }

  template <bool Accumulate, class Out>
  void backward_impl(const char* function, const detail::RowInput<Scalar>& x,
                     RowMatrixRef<Out>& out, Compute scale) {
    if (rows_ < 0) {
      detail::throw_invalid(function, "logits", "the logits of a completed forward",
                            "a call before any forward completed");
    }
    check_logits(function, x);
    if (x.rows() != rows_) {
      detail::throw_invalid(function, "logits",
                            detail::concat("the T = ", rows_, " rows given to forward"),
                            detail::concat("shape ", detail::shape_string(x.rows(), x.cols())));
    }
    check_output(function, out);
    detail::check_finite_parameter(function, "scale", double(scale));
    apply_rows<Accumulate>(function, x, out, scale, false);
  }

  template <class Out>
  Compute forward_backward_impl(const char* function, const detail::RowInput<Scalar>& x,
                                RowMatrixRef<Out>& out, const TokenMask& mask, Compute scale) {
    detail::check_finite_parameter(function, "scale", double(scale));
    detail::check_output_shape(function, "dloss_dlogits", out.rows(), out.cols(), x.rows(),
                               x.cols());
    if (detail::logits_selection_applies(num_experts_, k_)) {
      // Phase 1 counts on the logits; phase 2 computes the scores once, for the gradient and
      // the sums (it completes the sums and L).
      forward_impl(function, x, mask, nullptr, true);
      apply_rows<false>(function, x, out, scale, false);
      return static_cast<Compute>(loss_);
    }
    if constexpr (std::is_same_v<Out, Compute>) {
      // The raw scores travel from phase 1 to phase 2 in the output buffer (for rows of whole
      // exp blocks and k <= 16, phase 2 also sums them: buffer mode).
      forward_impl(function, x, mask, &out, true);
      apply_rows<false>(function, x, out, scale, true);  // completes the sums and L
      return static_cast<Compute>(loss_);
    } else {
      const Compute value = forward_impl(function, x, mask, nullptr);
      apply_rows<false>(function, x, out, scale, false);
      return value;
    }
  }

  Index num_experts_;
  Index k_;
  SwitchOptions options_;
  RoutingStatistics statistics_;
  Eigen::VectorXd f_;                               // N, double
  detail::ScratchArray<Compute> f_compute_;         // N, f in the compute type
  std::vector<Lane> lanes_;                         // per thread: row and chunk scratch
  std::vector<double> block_sums_;                  // blocks x N score sums (<= 64 blocks)
  // The combined objective's z-loss term (CombinedAuxLoss, softmax scores only): its weight,
  // the blocks' partial sums of lse^2 and the term's value of the last forward.
  double z_weight_ = 0.0;
  std::vector<double> block_z_;
  double z_value_ = 0.0;
  std::vector<detail::RowNorm<Compute>> norms_;     // T, per token; inv == 0 marks padding
  Index rows_ = -1;                                 // T of the last completed forward
  Index blocks_ = 0;                                // blocks of chunks of the last forward
  // Phase 1 takes the counts alone and phase 2 the score sums (forward_impl's defer_sums);
  // sums_pending_: the last forward's sums and L wait for that phase 2.
  // on_logits_: phase 1 selected on the logits (logits mode); otherwise, with defer_sums_,
  // the scores are carried in the output buffer (buffer mode).
  bool defer_sums_ = false;
  bool on_logits_ = false;
  bool sums_pending_ = false;
  double loss_ = 0.0;
};

/// The Switch Transformer load-balancing loss and its gradient, in one call:
///   L = a N sum_i f_i P_i,  P_i = (1/T) sum_t q_ti,  f_i per `options.convention`
///   d L / d x_tj = (a N / T) q_tj (f_j - sum_i f_i q_ti)   (softmax; see the file comment
///   for the sigmoid form). Counts are constants: no gradient flows through the selection.
/// Conventions: Megatron-core (default, f = c / (T k)), Hugging Face transformers
/// (f = c / T, k times Megatron), first choice (GShard/DeepSpeed/Tutel/fairseq, f from top-1).
/// A batch whose mask has no real token gives L = 0, a zero gradient and zero f and P.
///
/// @param logits T x N router logits (rows are tokens, columns experts), float, double,
///   Eigen::bfloat16 or Eigen::half (half precision is computed and returned in float, as
///   Megatron-core's `moe_router_dtype=fp32`), any Eigen dense expression. Row-major storage with
///   contiguous rows (an `Eigen::Map` over a PyTorch tensor) is read in place; column-major input
///   is converted once.
/// @param k experts selected per token, 1 <= k <= N.
/// @param options convention, score function, coefficient a (default 1) and padding mask.
/// @return loss, grad (T x N row-major, zero rows for padding) and stats (counts, f, P).
/// @throws moebal::invalid_argument for T = 0 or N = 0, k out of range, a mask whose length
///   is not T (or with NaN), a non-finite coefficient, a NaN or +Inf logit in a real token's
///   row, or (softmax) a real token whose logits are all -Inf.
template <class Derived>
SwitchAuxResult<compute_type_t<typename Derived::Scalar>> switch_aux_loss(
    const Eigen::MatrixBase<Derived>& logits, Index k, const SwitchOptions& options) {
  using Scalar = typename Derived::Scalar;
  using Compute = compute_type_t<Scalar>;
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::switch_aux_loss: logits must be float, double, Eigen::bfloat16 or "
                "Eigen::half; cast other types first, e.g. logits.template cast<float>()");
  constexpr const char* function = "moebal::switch_aux_loss";
  const detail::RowInput<Scalar> x(logits);
  detail::check_logits_shape(function, x.rows(), x.cols());
  SwitchOptions loss_options = options;
  loss_options.mask = TokenMask{};
  SwitchAuxLoss<Scalar> loss(function, x.cols(), k, loss_options);
  SwitchAuxResult<Compute> result;
  result.grad.resize(x.rows(), x.cols());
  RowMatrixRef<Compute> grad(result.grad);
  result.loss = loss.forward_backward_impl(function, x, grad, options.mask, Compute(1));
  result.stats = loss.stats();
  return result;
}

}  // namespace moebal

namespace moebal {

/// The Switch loss with the counts given instead of counted from the logits' own top-k: f from
/// `counts` in `options.convention` (megatron: c / (T k); huggingface: c / T; first_choice: the
/// counts are first-choice counts, f = c / T), P from the logits' scores, T the real tokens of
/// `logits`. Use it to feed the loss the routed-before-capacity counts (`CapacityResult::
/// counts_before`, the usual choice) or the routed-after-capacity counts (`counts_after`).
/// Never feed it a padded map's counts: padding makes every expert's count C, f uniform and the
/// loss constant (Megatron-LM issue #1617).
/// @param counts length N, finite and >= 0. @throws moebal::invalid_argument for a wrong
///   length or an invalid count, and as `switch_aux_loss`.
template <class Derived, class DerivedC>
SwitchAuxResult<compute_type_t<typename Derived::Scalar>> switch_aux_loss_with_counts(
    const Eigen::MatrixBase<Derived>& logits, const Eigen::MatrixBase<DerivedC>& counts, Index k,
    const SwitchOptions& options = {}) {
  using Scalar = typename Derived::Scalar;
  using Compute = compute_type_t<Scalar>;
  static_assert(detail::is_supported_scalar_v<Scalar>,
                "moebal::switch_aux_loss_with_counts: logits must be float, double, "
                "Eigen::bfloat16 or Eigen::half");
  constexpr const char* function = "moebal::switch_aux_loss_with_counts";
  const detail::RowInput<Scalar> x(logits);
  detail::check_logits_shape(function, x.rows(), x.cols());
  detail::check_switch_config(function, x.cols(), k, options);
  detail::check_mask(function, options.mask, x.rows());
  const Index n = x.cols();
  if (counts.size() != n) {
    detail::throw_invalid(function, "counts", detail::concat("one count per expert (length N = ", n, ")"),
                          detail::concat("length ", counts.size()));
  }
  Eigen::VectorXd c(n);
  for (Index i = 0; i < n; ++i) {
    c[i] = double(counts.derived().coeff(i));
    if (!(c[i] >= 0) || !std::isfinite(c[i])) {
      detail::throw_invalid(function, "counts", "finite counts >= 0", detail::concat(c[i], " at expert ", i));
    }
  }
  // P: the scores summed over real tokens.
  detail::ScratchArray<Compute> raw(n);
  detail::RowNorm<Compute> norm;
  detail::RowReader<Scalar, Compute> reader;
  reader.resize(n);
  Eigen::VectorXd sums = Eigen::VectorXd::Zero(n);
  double tokens = 0.0;
  for (Index t = 0; t < x.rows(); ++t) {
    if (!options.mask.is_real(t)) continue;
    const Compute* row = reader.read(x.data() + t * x.outerStride(), n);
    if (!detail::raw_scores(row, n, options.score, raw, norm)) {
      detail::throw_invalid_row(function, row, n, t, options.score);
    }
    for (Index j = 0; j < n; ++j) sums[j] += double(raw[j] * norm.inv);
    tokens += 1.0;
  }
  SwitchAuxResult<Compute> result;
  Eigen::VectorXd f = Eigen::VectorXd::Zero(n);
  if (tokens > 0) detail::load_fraction(options.convention, c, c, tokens, k, f);
  const double value = tokens > 0 ? options.coefficient * double(n) * f.dot(sums) / tokens : 0.0;
  result.loss = static_cast<Compute>(value);
  // Gradient: d L / d q_tj = a N f_j / T through the score function.
  RowMatrix<Compute> g(x.rows(), n);
  for (Index t = 0; t < x.rows(); ++t) {
    if (tokens > 0 && options.mask.is_real(t)) {
      g.row(t) =
          (options.coefficient * double(n) / tokens * f).transpose().template cast<Compute>();
    } else {
      g.row(t).setZero();
    }
  }
  result.grad = detail::scores_backward_impl<Scalar>(function, x, detail::RowInput<Compute>(g),
                                                     options.score, options.mask);
  result.stats.tokens = static_cast<std::int64_t>(tokens);
  result.stats.tokens_per_expert = c.template cast<std::int64_t>();
  result.stats.first_choice_tokens = CountVector::Zero(n);
  result.stats.f = f;
  result.stats.P = tokens > 0 ? Eigen::VectorXd(sums / tokens) : Eigen::VectorXd::Zero(n);
  result.stats.balanced_value =
      options.coefficient * (options.convention == SwitchConvention::huggingface ? double(k) : 1.0);
  result.stats.balance = balance_metrics(result.stats.tokens_per_expert);
  return result;
}

}  // namespace moebal
