// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// Opt-in libtorch adapter: moebal's losses and routers on `torch::Tensor` (= `at::Tensor`)
/// router logits, for C++ trainers built on libtorch. Not included by <moebal/moebal.hpp>;
/// needs libtorch (Debian: `libtorch-dev`; CMake: link `moebal::torch`, built when
/// `MOEBAL_WITH_TORCH` is on).
///
/// Every function here has the name and the meaning of its Eigen counterpart (the formulas,
/// conventions and sources are documented in that loss's header) and differs only in its
/// arguments and results:
///
///  - logits: a CPU tensor of dtype float32, float64, bfloat16 or float16, 2-D [T, N] (rows are
///    tokens, columns experts) or 3-D [B, S, N] (B sequences of S tokens; token b S + s is row
///    b S + s, the tensor's memory order: Hugging Face's batch-major layout). The memory is read
///    in place, never copied, when the last dimension is contiguous and the T rows are equally
///    spaced: every contiguous tensor, and column slices such as `x.narrow(-1, 0, N)` of a wider
///    tensor. Any other layout (a transpose, a permuted or expanded tensor) is made contiguous
///    once per call. bfloat16 and float16 logits are read in place too (as `Eigen::bfloat16` /
///    `Eigen::half`, which have the bits of `at::BFloat16` / `at::Half`) and computed and
///    accumulated in float32 (`moebal::compute_type_t`; as Megatron-core's
///    `moe_router_dtype=fp32` and Hugging Face's upcast of router logits).
///  - mask: an undefined tensor (default: every token is real) or a CPU tensor of T elements,
///    1-D [T], or [B, S] for 3-D logits, of any real dtype (bool, any integer type, float32,
///    float64, bfloat16, float16): nonzero = real token, zero = padding. bool, integer, float32
///    and float64 masks are read in place (1-D masks with any stride); others are converted once.
///    The mask may instead be given in the options' `TokenMask` (but not both).
///  - results: `loss`, a 0-d tensor (float64 for float64 logits, float32 otherwise), and
///    `grad` = d loss / d logits, a new contiguous tensor of the logits' shape whose dtype is the
///    logits' (`TorchGradDtype::like_logits`, the default) or float32
///    (`TorchGradDtype::float32`, for trainers that keep fp32 master gradients), plus the
///    statistics of the Eigen result. Gradients are computed in the compute type (float64 for
///    float64 logits, float32 otherwise) and rounded once to the requested dtype; a gradient in
///    the compute type is the Eigen result's own buffer, handed to the tensor without a copy.
///  - errors: `moebal::invalid_argument` (a `std::invalid_argument`), with the library's message
///    "<function>: argument '<name>': expected <what>, got <value>", for an undefined, CUDA
///    (or other non-CPU), sparse, integer, bool or complex logits tensor, a rank other than 2 or
///    3, a mask on another device or of the wrong shape, and for everything the Eigen function
///    rejects (k out of range, NaN or +Inf logits, a mask of the wrong length, ...).
///
/// The global-batch losses (Qiu et al. 2025) are `TorchGlobalBatchBalance`, a thin wrapper of
/// `GlobalBatchBalance<S>` whose storage type S is taken from the logits. The Eigen objects can
/// also be used directly on tensor memory through `torch_view` (read-only logits),
/// `torch_mutable_view` (gradient buffers) and `torch_mask`:
///
///   moebal::SwitchAuxLoss<float> balance(N, k, options);        // allocation-free in steady state
///   auto mask = moebal::torch_mask(attention_mask);               // keeps its storage alive
///   float value = balance.forward(moebal::torch_view<float>(logits), mask.view);
///   auto grad = moebal::torch_mutable_view<float>(router_grad);  // a float32 [T, N] tensor
///   balance.backward_accumulate(moebal::torch_view<float>(logits), grad);       // +=
///
/// Note: Debian's libtorch includes glog, whose `CHECK` macro collides with the test
/// frameworks' (Catch2, doctest): include those after this header, with `#undef CHECK` before.

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"
#include "moebal/detail/input.hpp"
#include "moebal/losses/combined.hpp"
#include "moebal/losses/cv2.hpp"
#include "moebal/losses/global_batch.hpp"
#include "moebal/losses/sequence.hpp"
#include "moebal/losses/switch.hpp"
#include "moebal/losses/z.hpp"
#include "moebal/routers/router.hpp"

namespace moebal {

/// The dtype of the gradient tensors the torch functions return.
enum class TorchGradDtype {
  /// The logits' dtype (bfloat16 logits get a bfloat16 gradient, rounded once from float32).
  like_logits,
  /// float32 whatever the logits' dtype (fp32 master gradients; float64 logits are computed in
  /// float64 and rounded once).
  float32,
};

/// Result of the torch `switch_aux_loss`.
struct TorchSwitchResult {
  /// L, a 0-d tensor (float64 for float64 logits, float32 otherwise).
  at::Tensor loss;
  /// d L / d logits, the logits' shape, contiguous (zero rows for padded tokens).
  at::Tensor grad;
  /// Counts, f, P, the balanced value and the balance metrics (see `SwitchStats`).
  SwitchStats stats;
};

/// Result of the torch `z_loss`.
struct TorchZResult {
  /// L, a 0-d tensor.
  at::Tensor loss;
  /// d L / d logits, the logits' shape.
  at::Tensor grad;
  /// T, the number of real tokens.
  std::int64_t tokens = 0;
  /// (1/T) sum_t lse_t^2 without the coefficient (0 when T = 0).
  double mean_squared_lse = 0.0;
};

/// Result of the torch `sequence_aux_loss`.
struct TorchSequenceResult {
  /// L, a 0-d tensor.
  at::Tensor loss;
  /// d L / d logits, the logits' shape.
  at::Tensor grad;
  /// Each sequence's Switch loss (0 for a sequence with no real token).
  Eigen::VectorXd sequence_losses;
  /// Real tokens per sequence.
  CountVector sequence_tokens;
  /// Top-k counts per sequence, sequences x N.
  Eigen::Matrix<std::int64_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> counts;
};

/// Result of the torch `cv2_importance_loss`.
struct TorchCv2ImportanceResult {
  /// L, a 0-d tensor.
  at::Tensor loss;
  /// d L / d logits, the logits' shape.
  at::Tensor grad;
  /// I_i, length N.
  Eigen::VectorXd importance;
  /// T, the number of real tokens.
  std::int64_t tokens = 0;
};

/// Result of the torch `combined_aux_loss`.
struct TorchCombinedResult {
  /// L, a 0-d tensor.
  at::Tensor loss;
  /// d L / d logits, the logits' shape.
  at::Tensor grad;
  /// Each term's weighted value.
  CombinedTerms terms;
  /// The Switch term's statistics.
  SwitchStats stats;
};

/// A loss value and its gradient (the global-batch share of `TorchGlobalBatchBalance`).
struct TorchLossResult {
  /// L, a 0-d tensor (float64 for float64 logits, float32 otherwise).
  at::Tensor loss;
  /// d L / d logits, the logits' shape.
  at::Tensor grad;
};

/// Result of the torch `route`.
struct TorchRouteResult {
  /// The selected experts by decreasing selection value, int64, [T, k] (or [B, S, k] for 3-D
  /// logits).
  at::Tensor indices;
  /// Their combine weights, aligned with `indices`, same shape; float64 for float64 logits,
  /// float32 otherwise.
  at::Tensor weights;
};

/// A padding mask converted from a tensor: the `TokenMask` to pass to moebal, and the tensor it
/// views (the input itself, or its one converted copy), which must outlive every use of `view`.
struct TorchMask {
  /// The mask as moebal reads it (empty for an undefined tensor: every token is real).
  TokenMask view;
  /// The tensor `view` points into (undefined for the empty mask).
  at::Tensor storage;
};

namespace detail {

/// The torch dtype of a moebal storage type.
template <class S>
constexpr at::ScalarType torch_dtype_of() {
  static_assert(
      is_logit_scalar_v<S>,
      "moebal: torch tensors are viewed as float, double, Eigen::bfloat16 or Eigen::half");
  if constexpr (std::is_same_v<S, float>) {
    return at::kFloat;
  } else if constexpr (std::is_same_v<S, double>) {
    return at::kDouble;
  } else if constexpr (std::is_same_v<S, Eigen::bfloat16>) {
    return at::kBFloat16;
  } else {
    return at::kHalf;
  }
}

static_assert(sizeof(Eigen::bfloat16) == sizeof(at::BFloat16) &&
                  sizeof(Eigen::half) == sizeof(at::Half),
              "moebal: Eigen::bfloat16 / Eigen::half must have the bit layout of at::BFloat16 / "
              "at::Half (16 bits)");

/// torch's name of a dtype ("float32", "int64", ...).
inline std::string torch_dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    case at::kBFloat16:
      return "bfloat16";
    case at::kHalf:
      return "float16";
    case at::kBool:
      return "bool";
    case at::kByte:
      return "uint8";
    case at::kChar:
      return "int8";
    case at::kShort:
      return "int16";
    case at::kInt:
      return "int32";
    case at::kLong:
      return "int64";
    case at::kComplexFloat:
      return "complex64";
    case at::kComplexDouble:
      return "complex128";
    case at::kComplexHalf:
      return "complex32";
    default:
      return c10::toString(type);
  }
}

/// "[2, 3, 4]".
inline std::string torch_shape_string(at::IntArrayRef sizes) {
  std::string out = "[";
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(sizes[i]);
  }
  return out + "]";
}

/// "a 1-D tensor of shape [5]".
inline std::string torch_tensor_string(const at::Tensor& tensor) {
  return concat("a ", tensor.dim(), "-D tensor of shape ", torch_shape_string(tensor.sizes()));
}

/// Whether `type` is one of the logits dtypes.
inline bool is_torch_logits_dtype(at::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kBFloat16 || type == at::kHalf;
}

/// Checks that a tensor argument is defined, strided and on the CPU.
inline void check_torch_cpu(const char* function, const char* argument, const at::Tensor& tensor) {
  if (!tensor.defined()) {
    throw_invalid(function, argument, "a defined tensor", "an undefined tensor");
  }
  if (!tensor.device().is_cpu()) {
    throw_invalid(function, argument,
                  "a CPU tensor (moebal computes on the CPU: move it with .cpu())",
                  concat("a tensor on ", tensor.device().str()));
  }
  if (tensor.layout() != at::kStrided) {
    throw_invalid(function, argument, "a dense (strided) tensor",
                  concat("a tensor with layout ", c10::toString(tensor.layout())));
  }
}

/// The row spacing of a rank-2 or rank-3 tensor read as (numel / N) x N rows, if its last
/// dimension is contiguous and its rows are equally spaced (and do not overlap); -1 otherwise.
inline Index torch_row_stride(const at::Tensor& t) {
  const Index n = t.size(-1);
  if (t.numel() == 0) return n;
  if (n > 1 && t.stride(-1) != 1) return -1;
  Index stride = n;
  if (t.dim() == 2) {
    if (t.size(0) > 1) stride = t.stride(0);
  } else {
    const Index b = t.size(0), s = t.size(1);
    if (b > 1 && s > 1) {
      if (t.stride(0) != s * t.stride(1)) return -1;
      stride = t.stride(1);
    } else if (s > 1) {
      stride = t.stride(1);
    } else if (b > 1) {
      stride = t.stride(0);
    }
  }
  return stride >= n ? stride : -1;
}

/// Router logits validated and seen as a row-major T x N matrix.
struct TorchLogits {
  /// The tensor read: the caller's, or its one contiguous copy.
  at::Tensor tensor;
  /// The caller's shape ([T, N] or [B, S, N]); gradients take it.
  std::vector<std::int64_t> sizes;
  Index rows = 0;
  Index cols = 0;
  Index row_stride = 0;
  /// The caller's dtype (the gradient's default dtype).
  at::ScalarType dtype = at::kFloat;

  Index dim() const { return static_cast<Index>(sizes.size()); }
  Index batch() const { return sizes.size() == 3 ? sizes[0] : 1; }
  Index seq_len() const { return sizes.size() == 3 ? sizes[1] : rows; }

  /// The T x N view of `tensor` (whose dtype must be S's).
  template <class S>
  Eigen::Map<const RowMatrix<S>, 0, Eigen::OuterStride<>> matrix() const {
    MOEBAL_ASSERT(tensor.scalar_type() == torch_dtype_of<S>());
    return Eigen::Map<const RowMatrix<S>, 0, Eigen::OuterStride<>>(
        static_cast<const S*>(tensor.data_ptr()), rows, cols, Eigen::OuterStride<>(row_stride));
  }
};

/// Validates logits (defined, CPU, strided, a floating dtype, rank 2 or 3) and views them.
inline TorchLogits torch_logits(const char* function, const at::Tensor& logits) {
  check_torch_cpu(function, "logits", logits);
  if (!is_torch_logits_dtype(logits.scalar_type())) {
    throw_invalid(function, "logits",
                  "a floating-point tensor (float32, float64, bfloat16 or float16)",
                  concat("dtype ", torch_dtype_name(logits.scalar_type())));
  }
  if (logits.dim() != 2 && logits.dim() != 3) {
    throw_invalid(function, "logits",
                  "a 2-D [T, N] (tokens x experts) or 3-D [B, S, N] (batch x sequence x "
                  "experts) tensor",
                  torch_tensor_string(logits));
  }
  TorchLogits in;
  in.sizes.assign(logits.sizes().begin(), logits.sizes().end());
  in.dtype = logits.scalar_type();
  in.cols = logits.size(-1);
  in.rows = logits.dim() == 2 ? logits.size(0) : logits.size(0) * logits.size(1);
  in.row_stride = torch_row_stride(logits);
  if (in.row_stride < 0) {
    in.tensor = logits.contiguous();
    in.row_stride = in.cols;
  } else {
    in.tensor = logits;
  }
  return in;
}

/// Calls `f(x)` with x the logits' T x N Eigen view in their storage type (float, double,
/// Eigen::bfloat16 or Eigen::half).
template <class F>
decltype(auto) visit_torch_logits(const TorchLogits& in, F&& f) {
  switch (in.tensor.scalar_type()) {
    case at::kDouble:
      return f(in.matrix<double>());
    case at::kBFloat16:
      return f(in.matrix<Eigen::bfloat16>());
    case at::kHalf:
      return f(in.matrix<Eigen::half>());
    default:
      MOEBAL_ASSERT(in.tensor.scalar_type() == at::kFloat);
      return f(in.matrix<float>());
  }
}

/// The dtype of loss values and compute-type results: float64 for float64 logits, else float32.
inline at::ScalarType torch_value_dtype(const TorchLogits& in) {
  return in.dtype == at::kDouble ? at::kDouble : at::kFloat;
}

/// The gradient dtype requested for these logits.
inline at::ScalarType torch_grad_dtype(const TorchLogits& in, TorchGradDtype grad) {
  return grad == TorchGradDtype::float32 ? at::kFloat : in.dtype;
}

/// A 0-d tensor holding `value`.
inline at::Tensor torch_scalar(double value, at::ScalarType dtype) {
  return at::scalar_tensor(value, at::TensorOptions().dtype(dtype));
}

/// Moves an Eigen matrix into a tensor of the given shape, without copying its elements (the
/// tensor's deleter frees the matrix).
template <class Matrix>
at::Tensor adopt_matrix(Matrix&& matrix, at::IntArrayRef sizes) {
  using M = std::decay_t<Matrix>;
  using Scalar = typename M::Scalar;
  at::ScalarType dtype;
  if constexpr (std::is_same_v<Scalar, std::int64_t>) {
    dtype = at::kLong;
  } else {
    dtype = torch_dtype_of<Scalar>();
  }
  auto owner = std::make_unique<M>(std::forward<Matrix>(matrix));
#ifndef NDEBUG
  std::int64_t elements = 1;
  for (const std::int64_t size : sizes) elements *= size;
  MOEBAL_ASSERT(static_cast<std::int64_t>(owner->size()) == elements);
#endif
  M* raw = owner.get();
  at::Tensor out = at::from_blob(
      raw->data(), sizes, [raw](void*) { delete raw; }, at::TensorOptions().dtype(dtype));
  owner.release();  // the tensor owns it now
  return out;
}

/// A T x N compute-type gradient as a tensor of the logits' shape in the requested dtype.
template <class Scalar>
at::Tensor torch_gradient(RowMatrix<Scalar>&& grad, const TorchLogits& in, TorchGradDtype type) {
  at::Tensor out = adopt_matrix(std::move(grad), in.sizes);
  const at::ScalarType dtype = torch_grad_dtype(in, type);
  return out.scalar_type() == dtype ? out : out.to(dtype);
}

/// Converts a mask tensor (given `logits`, a [B, S] mask is accepted for 3-D logits). The
/// element count is left to the loss's own check (its message names T).
inline TorchMask torch_mask_impl(const char* function, const at::Tensor& mask,
                                 const TorchLogits* logits) {
  TorchMask out;
  if (!mask.defined()) return out;
  if (!mask.device().is_cpu()) {
    throw_invalid(function, "mask", "a CPU tensor, on the logits' device (cpu)",
                  concat("a tensor on ", mask.device().str()));
  }
  check_torch_cpu(function, "mask", mask);
  const at::ScalarType type = mask.scalar_type();
  if (at::isComplexType(type) || !(at::isFloatingType(type) || at::isIntegralType(type, true))) {
    throw_invalid(function, "mask", "a bool, integer or floating-point tensor",
                  concat("dtype ", torch_dtype_name(type)));
  }
  at::Tensor flat;
  if (mask.dim() == 1) {
    flat = mask;
  } else if (logits != nullptr && logits->dim() == 3 && mask.dim() == 2 &&
             mask.size(0) == logits->batch() && mask.size(1) == logits->seq_len()) {
    flat = mask.contiguous().view({-1});
  } else {
    const std::string expected =
        logits == nullptr ? std::string("a 1-D tensor (one element per token)")
        : logits->dim() == 3
            ? concat("a 1-D tensor of length T = ", logits->rows, " or a [B, S] = [",
                     logits->batch(), ", ", logits->seq_len(), "] tensor (one element per token)")
            : concat("a 1-D tensor of length T = ", logits->rows, " (one element per token)");
    throw_invalid(function, "mask", expected, torch_tensor_string(mask));
  }
  if (type == at::kHalf || type == at::kBFloat16) flat = flat.to(at::kFloat);
  const Index size = flat.size(0), stride = flat.stride(0);
  const void* data = flat.data_ptr();
  switch (flat.scalar_type()) {
    case at::kBool:
      out.view = TokenMask(static_cast<const bool*>(data), size, stride);
      break;
    case at::kByte:
      out.view = TokenMask(static_cast<const std::uint8_t*>(data), size, stride);
      break;
    case at::kChar:
      out.view = TokenMask(static_cast<const std::int8_t*>(data), size, stride);
      break;
    case at::kShort:
      out.view = TokenMask(static_cast<const std::int16_t*>(data), size, stride);
      break;
    case at::kInt:
      out.view = TokenMask(static_cast<const std::int32_t*>(data), size, stride);
      break;
    case at::kLong:
      out.view = TokenMask(static_cast<const std::int64_t*>(data), size, stride);
      break;
    case at::kFloat:
      out.view = TokenMask(static_cast<const float*>(data), size, stride);
      break;
    case at::kDouble:
      out.view = TokenMask(static_cast<const double*>(data), size, stride);
      break;
    default:
      throw_invalid(function, "mask", "a bool, integer or floating-point tensor",
                    concat("dtype ", torch_dtype_name(type)));
  }
  out.storage = flat;
  return out;
}

/// The mask to use: the tensor's, or the options' `TokenMask` (not both).
inline TorchMask torch_call_mask(const char* function, const at::Tensor& mask,
                                 const TokenMask& options_mask, const TorchLogits& logits) {
  if (mask.defined() && !options_mask.empty()) {
    throw_invalid(function, "options.mask", "an empty TokenMask when a mask tensor is given",
                  concat("a TokenMask of length ", options_mask.size()));
  }
  if (!mask.defined()) {
    TorchMask out;
    out.view = options_mask;
    return out;
  }
  return torch_mask_impl(function, mask, &logits);
}

/// For 3-D [B, S, N] logits, the layout must be batch_major(S): rows are in memory order.
inline void check_torch_layout(const char* function, const SequenceLayout& layout,
                               const TorchLogits& in) {
  if (in.dim() != 3) return;
  if (layout.kind() == SequenceLayout::Kind::batch_major && layout.seq_len() == in.seq_len()) {
    return;
  }
  std::string got;
  switch (layout.kind()) {
    case SequenceLayout::Kind::batch_major:
      got = concat("batch_major(", layout.seq_len(), ")");
      break;
    case SequenceLayout::Kind::sequence_major:
      got = concat("sequence_major(", layout.seq_len(), ")");
      break;
    default:
      got = concat("segments of ", layout.lengths().size(), " sequences");
      break;
  }
  throw_invalid(function, "layout",
                concat("batch_major(S) with S = logits.size(1) = ", in.seq_len(),
                       " for 3-D logits [B, S, N] (pass 2-D [T, N] logits for other layouts)"),
                got);
}

/// The logits' storage type as moebal views it (float for half-precision logits until the
/// core accepts them).
template <class X>
using view_scalar_t = typename std::decay_t<X>::Scalar;

}  // namespace detail

/// A read-only T x N view of a tensor's memory as moebal's Eigen API takes it (no copy ever):
/// 2-D [T, N] or 3-D [B, S, N] (rows b S + s), dtype S's (float32, float64, bfloat16 for
/// `Eigen::bfloat16`, float16 for `Eigen::half`), last dimension contiguous, rows equally spaced
/// (any contiguous tensor; call `.contiguous()` first otherwise). The tensor must outlive the
/// view.
/// @throws moebal::invalid_argument for an undefined, non-CPU or sparse tensor, another dtype,
///   another rank, or a layout that cannot be viewed.
template <class S>
Eigen::Map<const RowMatrix<S>, 0, Eigen::OuterStride<>> torch_view(const at::Tensor& tensor) {
  constexpr const char* function = "moebal::torch_view";
  detail::check_torch_cpu(function, "tensor", tensor);
  if (tensor.scalar_type() != detail::torch_dtype_of<S>()) {
    detail::throw_invalid(
        function, "tensor",
        detail::concat("dtype ", detail::torch_dtype_name(detail::torch_dtype_of<S>()),
                       " (the view's scalar type)"),
        detail::concat("dtype ", detail::torch_dtype_name(tensor.scalar_type())));
  }
  if (tensor.dim() != 2 && tensor.dim() != 3) {
    detail::throw_invalid(function, "tensor", "a 2-D [T, N] or 3-D [B, S, N] tensor",
                          detail::torch_tensor_string(tensor));
  }
  const Index stride = detail::torch_row_stride(tensor);
  if (stride < 0) {
    detail::throw_invalid(
        function, "tensor",
        "a contiguous last dimension and equally spaced rows (call "
        ".contiguous() first)",
        detail::concat("strides ", detail::torch_shape_string(tensor.strides()), " for shape ",
                       detail::torch_shape_string(tensor.sizes())));
  }
  const Index cols = tensor.size(-1);
  const Index rows = tensor.numel() == 0
                         ? (tensor.dim() == 2 ? tensor.size(0) : tensor.size(0) * tensor.size(1))
                         : tensor.numel() / cols;
  return Eigen::Map<const RowMatrix<S>, 0, Eigen::OuterStride<>>(
      static_cast<const S*>(tensor.data_ptr()), rows, cols, Eigen::OuterStride<>(stride));
}

/// A writable T x N view of a tensor's memory (a gradient buffer for the loss objects'
/// `backward` and `backward_accumulate`): same requirements as `torch_view`. Writes go straight
/// into the tensor's memory. Bind it to a variable before passing it as a `RowMatrixRef`
/// (`auto out = moebal::torch_mutable_view<float>(grad); loss.backward(x, out);`).
/// @throws moebal::invalid_argument as `torch_view`.
template <class S>
Eigen::Map<RowMatrix<S>, 0, Eigen::OuterStride<>> torch_mutable_view(at::Tensor& tensor) {
  const auto view = torch_view<S>(tensor);
  return Eigen::Map<RowMatrix<S>, 0, Eigen::OuterStride<>>(
      static_cast<S*>(tensor.data_ptr()), view.rows(), view.cols(),
      Eigen::OuterStride<>(view.outerStride()));
}

/// A padding mask tensor as moebal's `TokenMask`: an undefined tensor gives the empty mask
/// (every token real); a 1-D CPU tensor of any real dtype is read in place when it is bool,
/// integer, float32 or float64 (any stride) and converted once otherwise; a 2-D or higher mask
/// is flattened in memory order (one contiguous copy if needed), as [B, S] masks of 3-D logits.
/// Keep the result alive while its `view` is used. The length is checked by the loss.
/// @throws moebal::invalid_argument for a non-CPU, sparse or complex mask.
inline TorchMask torch_mask(const at::Tensor& mask) {
  constexpr const char* function = "moebal::torch_mask";
  if (mask.defined() && mask.dim() >= 2 && mask.device().is_cpu()) {
    return detail::torch_mask_impl(function, mask.contiguous().view({-1}), nullptr);
  }
  if (mask.defined() && mask.dim() == 0) {
    detail::throw_invalid(function, "mask", "a tensor with one element per token", "a 0-D tensor");
  }
  return detail::torch_mask_impl(function, mask, nullptr);
}

/// `switch_aux_loss` on torch logits: the Switch Transformer load-balancing loss
/// L = a N sum_i f_i P_i in the convention of `options` (Megatron-core by default, Hugging Face,
/// first choice; see <moebal/losses/switch.hpp>), and its analytic gradient.
/// @param logits CPU [T, N] or [B, S, N] (every token of every sequence one row), float32,
///   float64, bfloat16 or float16. @param k experts per token, 1 <= k <= N.
/// @param options convention, score function, coefficient (its `mask` must be empty if `mask`
///   is given). @param mask undefined, or T elements ([T], or [B, S] for 3-D logits).
/// @param grad_dtype the gradient's dtype (the logits' by default, or float32).
/// @return loss (0-d), grad (the logits' shape) and stats (counts, f, P, metrics).
/// @throws moebal::invalid_argument as the file comment says, and as the Eigen
///   `switch_aux_loss`.
inline TorchSwitchResult switch_aux_loss(const at::Tensor& logits, Index k,
                                         const SwitchOptions& options = {},
                                         const at::Tensor& mask = {},
                                         TorchGradDtype grad_dtype = TorchGradDtype::like_logits) {
  constexpr const char* function = "moebal::switch_aux_loss";
  const detail::TorchLogits in = detail::torch_logits(function, logits);
  const TorchMask m = detail::torch_call_mask(function, mask, options.mask, in);
  SwitchOptions o = options;
  o.mask = m.view;
  return detail::visit_torch_logits(in, [&](const auto& x) {
    auto r = switch_aux_loss(x, k, o);
    return TorchSwitchResult{detail::torch_scalar(double(r.loss), detail::torch_value_dtype(in)),
                             detail::torch_gradient(std::move(r.grad), in, grad_dtype),
                             std::move(r.stats)};
  });
}

/// `z_loss` on torch logits: the router z-loss L = a (1/T) sum_t (logsumexp x_t)^2 (ST-MoE;
/// Megatron-core `z_loss_func`; see <moebal/losses/z.hpp>); -Inf logits (disabled experts) are
/// allowed.
/// @param logits CPU [T, N] or [B, S, N]. @param options coefficient (and an optional
///   `TokenMask`). @param mask undefined or T elements. @param grad_dtype see `TorchGradDtype`.
/// @return loss (0-d), grad (the logits' shape), tokens, mean squared log-sum-exp.
/// @throws moebal::invalid_argument as the file comment says, and as the Eigen `z_loss`.
inline TorchZResult z_loss(const at::Tensor& logits, const ZLossOptions& options = {},
                           const at::Tensor& mask = {},
                           TorchGradDtype grad_dtype = TorchGradDtype::like_logits) {
  constexpr const char* function = "moebal::z_loss";
  const detail::TorchLogits in = detail::torch_logits(function, logits);
  const TorchMask m = detail::torch_call_mask(function, mask, options.mask, in);
  ZLossOptions o = options;
  o.mask = m.view;
  return detail::visit_torch_logits(in, [&](const auto& x) {
    auto r = z_loss(x, o);
    return TorchZResult{detail::torch_scalar(double(r.loss), detail::torch_value_dtype(in)),
                        detail::torch_gradient(std::move(r.grad), in, grad_dtype), r.tokens,
                        r.mean_squared_lse};
  });
}

/// `sequence_aux_loss` on torch logits: the mean over sequences of the Switch loss computed
/// within each sequence (DeepSeek-V2/V3; Megatron-core `seq_aux_loss`; see
/// <moebal/losses/sequence.hpp>), with an explicit layout of the T rows.
/// @param logits CPU [T, N] with any `layout`, or [B, S, N] with `SequenceLayout::
///   batch_major(S)` (the only layout a 3-D tensor's memory has).
/// @param k experts per token. @param layout batch-major, sequence-major or segments.
/// @param options convention, score, coefficient, mask mode. @param mask undefined or T
///   elements. @param grad_dtype see `TorchGradDtype`.
/// @return loss (0-d), grad (the logits' shape), per-sequence losses, tokens and counts.
/// @throws moebal::invalid_argument for another layout with 3-D logits, as the file comment
///   says, and as the Eigen `sequence_aux_loss`.
inline TorchSequenceResult sequence_aux_loss(
    const at::Tensor& logits, Index k, const SequenceLayout& layout,
    const SequenceOptions& options = {}, const at::Tensor& mask = {},
    TorchGradDtype grad_dtype = TorchGradDtype::like_logits) {
  constexpr const char* function = "moebal::sequence_aux_loss";
  const detail::TorchLogits in = detail::torch_logits(function, logits);
  detail::check_torch_layout(function, layout, in);
  const TorchMask m = detail::torch_call_mask(function, mask, options.mask, in);
  SequenceOptions o = options;
  o.mask = m.view;
  return detail::visit_torch_logits(in, [&](const auto& x) {
    auto r = sequence_aux_loss(x, k, layout, o);
    return TorchSequenceResult{detail::torch_scalar(double(r.loss), detail::torch_value_dtype(in)),
                               detail::torch_gradient(std::move(r.grad), in, grad_dtype),
                               std::move(r.sequence_losses), std::move(r.sequence_tokens),
                               std::move(r.counts)};
  });
}

/// `sequence_aux_loss` on 3-D [B, S, N] logits: B sequences of S tokens (batch-major, the
/// layout of the tensor's memory; Hugging Face). As the overload with
/// `SequenceLayout::batch_major(S)`.
/// @throws moebal::invalid_argument for logits that are not 3-D (give 2-D logits a layout), and
///   as the other overload.
inline TorchSequenceResult sequence_aux_loss(
    const at::Tensor& logits, Index k, const SequenceOptions& options = {},
    const at::Tensor& mask = {}, TorchGradDtype grad_dtype = TorchGradDtype::like_logits) {
  constexpr const char* function = "moebal::sequence_aux_loss";
  const detail::TorchLogits in = detail::torch_logits(function, logits);
  if (in.dim() != 3) {
    detail::throw_invalid(function, "logits",
                          "3-D [B, S, N] logits when no layout is given (pass a SequenceLayout "
                          "with 2-D logits)",
                          detail::torch_tensor_string(logits));
  }
  return sequence_aux_loss(logits, k, SequenceLayout::batch_major(in.seq_len()), options, mask,
                           grad_dtype);
}

/// `cv2_importance_loss` on torch logits: importance CV^2, L = a Var(I) / Mean(I)^2 with
/// I_i = sum_t g_ti (Shazeer et al. 2017; gates dense or top-k renormalized, population or
/// unbiased variance as in `options`; see <moebal/losses/cv2.hpp>).
/// @param logits CPU [T, N] or [B, S, N]. @param k experts per token (top-k gates only).
/// @param options gates, variance, score, coefficient. @param mask undefined or T elements.
/// @param grad_dtype see `TorchGradDtype`.
/// @return loss (0-d), grad (the logits' shape), importance I (length N), tokens.
/// @throws moebal::invalid_argument as the file comment says, and as the Eigen
///   `cv2_importance_loss`.
inline TorchCv2ImportanceResult cv2_importance_loss(
    const at::Tensor& logits, Index k, const Cv2Options& options = {}, const at::Tensor& mask = {},
    TorchGradDtype grad_dtype = TorchGradDtype::like_logits) {
  constexpr const char* function = "moebal::cv2_importance_loss";
  const detail::TorchLogits in = detail::torch_logits(function, logits);
  const TorchMask m = detail::torch_call_mask(function, mask, options.mask, in);
  Cv2Options o = options;
  o.mask = m.view;
  return detail::visit_torch_logits(in, [&](const auto& x) {
    auto r = cv2_importance_loss(x, k, o);
    return TorchCv2ImportanceResult{
        detail::torch_scalar(double(r.loss), detail::torch_value_dtype(in)),
        detail::torch_gradient(std::move(r.grad), in, grad_dtype), std::move(r.importance),
        r.tokens};
  });
}

/// `combined_aux_loss` on torch logits: w_switch Switch + w_z z + w_seq sequence + w_cv2
/// importance CV^2 in one pass (see <moebal/losses/combined.hpp>). For 3-D [B, S, N] logits a
/// missing `options.layout` is batch_major(S); a given one must be batch_major(S).
/// @param logits CPU [T, N] or [B, S, N]. @param k experts per token.
/// @param options weights, convention, score, layout, mask mode, CV^2 variance.
/// @param mask undefined or T elements. @param grad_dtype see `TorchGradDtype`.
/// @return loss (0-d), grad (the logits' shape), each term's value, the Switch statistics.
/// @throws moebal::invalid_argument as the file comment says, and as the Eigen
///   `combined_aux_loss`.
inline TorchCombinedResult combined_aux_loss(
    const at::Tensor& logits, Index k, const CombinedOptions& options = {},
    const at::Tensor& mask = {}, TorchGradDtype grad_dtype = TorchGradDtype::like_logits) {
  constexpr const char* function = "moebal::combined_aux_loss";
  const detail::TorchLogits in = detail::torch_logits(function, logits);
  CombinedOptions o = options;
  if (in.dim() == 3) {
    if (o.layout) {
      detail::check_torch_layout(function, *o.layout, in);
    } else {
      o.layout = SequenceLayout::batch_major(in.seq_len());
    }
  }
  const TorchMask m = detail::torch_call_mask(function, mask, options.mask, in);
  o.mask = m.view;
  return detail::visit_torch_logits(in, [&](const auto& x) {
    auto r = combined_aux_loss(x, k, o);
    return TorchCombinedResult{detail::torch_scalar(double(r.loss), detail::torch_value_dtype(in)),
                               detail::torch_gradient(std::move(r.grad), in, grad_dtype), r.terms,
                               std::move(r.stats)};
  });
}

/// `route` on torch logits: per token the k selected experts and their combine weights (see
/// <moebal/routers/router.hpp> for the steps and `RouterOptions` for every option).
/// @param logits CPU [T, N] or [B, S, N]. @param k experts per token.
/// @param options score function, weights, normalization, scaling, groups, expert bias.
/// @return indices (int64) and weights (float64 for float64 logits, float32 otherwise), both
///   [T, k] or [B, S, k].
/// @throws moebal::invalid_argument as the file comment says, and as the Eigen `route`.
inline TorchRouteResult route(const at::Tensor& logits, Index k,
                              const RouterOptions& options = {}) {
  constexpr const char* function = "moebal::route";
  const detail::TorchLogits in = detail::torch_logits(function, logits);
  return detail::visit_torch_logits(in, [&](const auto& x) {
    auto r = route(x, k, options);
    std::vector<std::int64_t> sizes = in.sizes;
    sizes.back() = k;
    TorchRouteResult result;
    result.indices = detail::adopt_matrix(std::move(r.indices), sizes);
    result.weights = detail::adopt_matrix(std::move(r.weights), sizes);
    return result;
  });
}

/// `route_backward` on torch tensors: d loss / d logits from d loss / d weights through the
/// router (the selection has no gradient).
/// @param logits the logits given to `route` (CPU [T, N] or [B, S, N]).
/// @param indices the indices `route` returned ([T, k] or [B, S, k]; any integer dtype).
/// @param dloss_dweights d loss / d weights, the shape of `indices`, any floating dtype
///   (converted to the compute type: float64 for float64 logits, float32 otherwise).
/// @param options the options given to `route`. @param grad_dtype see `TorchGradDtype`.
/// @return d loss / d logits, the logits' shape.
/// @throws moebal::invalid_argument for non-CPU, non-integer indices, non-floating weights,
///   shapes that do not match the logits', and as the Eigen `route_backward`.
inline at::Tensor route_backward(const at::Tensor& logits, const at::Tensor& indices,
                                 const at::Tensor& dloss_dweights,
                                 const RouterOptions& options = {},
                                 TorchGradDtype grad_dtype = TorchGradDtype::like_logits) {
  constexpr const char* function = "moebal::route_backward";
  const detail::TorchLogits in = detail::torch_logits(function, logits);
  detail::check_torch_cpu(function, "indices", indices);
  detail::check_torch_cpu(function, "dloss_dweights", dloss_dweights);
  if (!at::isIntegralType(indices.scalar_type(), /*includeBool=*/false)) {
    detail::throw_invalid(
        function, "indices", "an integer tensor (as route returns: int64)",
        detail::concat("dtype ", detail::torch_dtype_name(indices.scalar_type())));
  }
  if (!at::isFloatingType(dloss_dweights.scalar_type())) {
    detail::throw_invalid(
        function, "dloss_dweights", "a floating-point tensor",
        detail::concat("dtype ", detail::torch_dtype_name(dloss_dweights.scalar_type())));
  }
  const bool leading_match =
      indices.dim() == in.dim() &&
      std::equal(in.sizes.begin(), in.sizes.end() - 1, indices.sizes().begin());
  if (!leading_match) {
    std::string expected = "shape [";
    for (std::size_t i = 0; i + 1 < in.sizes.size(); ++i)
      expected += detail::concat(in.sizes[i], ", ");
    expected += "k] (k experts per token, as route returns)";
    detail::throw_invalid(function, "indices", expected,
                          detail::concat("shape ", detail::torch_shape_string(indices.sizes())));
  }
  if (!dloss_dweights.sizes().equals(indices.sizes())) {
    detail::throw_invalid(
        function, "dloss_dweights",
        detail::concat("the shape of indices, ", detail::torch_shape_string(indices.sizes())),
        detail::concat("shape ", detail::torch_shape_string(dloss_dweights.sizes())));
  }
  const Index k = indices.size(-1);
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  const Eigen::Map<const IndexMatrix> index_matrix(idx.data_ptr<std::int64_t>(), in.rows, k);
  const IndexMatrix index_copy = index_matrix;  // route_backward takes an IndexMatrix
  return detail::visit_torch_logits(in, [&](const auto& x) {
    using C = compute_type_t<detail::view_scalar_t<decltype(x)>>;
    const at::Tensor dw = dloss_dweights.to(detail::torch_dtype_of<C>()).contiguous();
    const Eigen::Map<const RowMatrix<C>> dw_matrix(static_cast<const C*>(dw.data_ptr()), in.rows,
                                                   k);
    RowMatrix<C> grad = route_backward(x, index_copy, dw_matrix, options);
    return detail::torch_gradient(std::move(grad), in, grad_dtype);
  });
}

/// Exact global-batch balance (Qiu et al. 2025) on torch logits: a thin wrapper of
/// `GlobalBatchBalance<S>` (see <moebal/losses/global_batch.hpp> for the formulas, weightings
/// and the synchronization contract) whose storage type S is taken from the logits. Per
/// optimizer step:
///   for each micro-batch j: balance.count(logits_j, mask_j);      // phase 1, no gradient
///   balance.synchronize(sync);                                    // every rank
///   for each micro-batch j: auto r = balance.forward_backward(logits_j, mask_j);  // L_j, grad
///   balance.reset();                                              // next step
/// The first micro-batch of a step (in `count`, or in `forward_backward` on a rank that counted
/// nothing) fixes the step's logits dtype (float32, float64, bfloat16 or float16); every other
/// micro-batch of the step must have the same. A rank that counts nothing synchronizes as
/// float32 (the payload does not depend on the dtype). The sync callable is any in-place
/// all-reduce SUM `sync(double* data, Index size)`; with a torch process group, run it on
/// `at::from_blob(data, {size}, at::kDouble)`.
/// Errors: invalid micro-batch contents (NaN logits, a mask of the wrong length, a column
/// count other than N) are deferred to `synchronize` and raised on every rank, as the core's
/// `count`; tensor errors (a CUDA tensor, an integer dtype, a rank other than 2 or 3, a mask on
/// another device or of another shape, a dtype other than the step's) throw at once from
/// `count`, since they are the same on every rank running the same code.
class TorchGlobalBatchBalance {
 public:
  /// @param num_experts N >= 1. @param k 1 <= k <= N. @param options convention, score,
  ///   coefficient, weighting, micro-batch weight.
  /// @throws moebal::invalid_argument for N < 1, k out of range or invalid options.
  TorchGlobalBatchBalance(Index num_experts, Index k, const GlobalBatchOptions& options = {})
      : num_experts_(num_experts), k_(k), options_(options), impl_(make_impl(at::kFloat)) {}

  /// N.
  Index num_experts() const noexcept { return num_experts_; }
  /// k.
  Index k() const noexcept { return k_; }
  /// The options given at construction.
  const GlobalBatchOptions& options() const noexcept { return options_; }

  /// Phase 1: adds one micro-batch's top-k counts and real tokens (no gradient).
  /// @param logits CPU [T, N] or [B, S, N]. @param mask undefined or T elements.
  /// @throws moebal::invalid_argument for tensor errors (see the class comment) and after
  ///   `synchronize` (call `reset` first).
  void count(const at::Tensor& logits, const at::Tensor& mask = {}) {
    constexpr const char* function = "moebal::TorchGlobalBatchBalance::count";
    const detail::TorchLogits in = detail::torch_logits(function, logits);
    const TorchMask m = detail::torch_mask_impl(function, mask, &in);
    select(function, in);
    impl_->count(in, m.view);
  }

  /// Sums the counts of every micro-batch on every rank (call on every rank after the step's
  /// last `count`). @param sync the all-reduce SUM callable `sync(double*, Index)`.
  /// @throws moebal::invalid_argument on every rank if ranks disagree on N or k or a rank
  ///   counted an invalid micro-batch; whatever `sync` throws.
  template <class Sync>
  void synchronize(Sync&& sync) {
    step_started_ = true;
    impl_->synchronize(std::function<void(double*, Index)>(std::ref(sync)));
  }

  /// `synchronize` for a single process.
  void synchronize() { synchronize(NoSync{}); }

  /// Phase 2: this micro-batch's share L_j of the global loss and its gradient.
  /// @param logits CPU [T, N] or [B, S, N] of the step's dtype. @param mask undefined or T
  ///   elements. @param grad_dtype see `TorchGradDtype`.
  /// @return loss (0-d, float64 for float64 logits, float32 otherwise) and grad (the logits'
  ///   shape); the statistics are the object's (`global_f`, `global_counts`, ...).
  /// @throws moebal::invalid_argument before `synchronize`, for tensor errors, and as the
  ///   core's `forward_backward`.
  TorchLossResult forward_backward(const at::Tensor& logits, const at::Tensor& mask = {},
                                   TorchGradDtype grad_dtype = TorchGradDtype::like_logits) {
    constexpr const char* function = "moebal::TorchGlobalBatchBalance::forward_backward";
    const detail::TorchLogits in = detail::torch_logits(function, logits);
    const TorchMask m = detail::torch_mask_impl(function, mask, &in);
    select(function, in);
    TorchLossResult result;
    double value = 0.0;
    result.grad = impl_->forward_backward(function, in, m.view, grad_dtype, value);
    result.loss = detail::torch_scalar(value, detail::torch_value_dtype(in));
    return result;
  }

  /// Starts the next optimizer step: clears every count and the step's dtype.
  void reset() {
    impl_->reset();
    step_started_ = false;
  }

  /// Whether `synchronize` completed for this step.
  bool synchronized() const { return impl_->synchronized(); }
  /// fbar, the global f (after `synchronize`), length N.
  Eigen::VectorXd global_f() const { return impl_->global_f(); }
  /// The global top-k counts (after `synchronize`), length N.
  Eigen::VectorXd global_counts() const { return impl_->global_counts(); }
  /// Tbar, the global real-token count (after `synchronize`).
  double global_tokens() const { return impl_->global_tokens(); }
  /// Mbar, the global number of micro-batches (after `synchronize`).
  double global_micro_batches() const { return impl_->global_micro_batches(); }
  /// This rank's counts so far in the step, length N.
  Eigen::VectorXd local_counts() const { return impl_->local_counts(); }

 private:
  // The core object behind a type-erased interface (its storage type is chosen at run time).
  struct Impl {
    virtual ~Impl() = default;
    virtual at::ScalarType storage() const = 0;
    virtual void count(const detail::TorchLogits& in, const TokenMask& mask) = 0;
    virtual void synchronize(const std::function<void(double*, Index)>& sync) = 0;
    virtual at::Tensor forward_backward(const char* function, const detail::TorchLogits& in,
                                        const TokenMask& mask, TorchGradDtype grad_dtype,
                                        double& value) = 0;
    virtual void reset() = 0;
    virtual bool synchronized() const = 0;
    virtual Eigen::VectorXd global_f() const = 0;
    virtual Eigen::VectorXd global_counts() const = 0;
    virtual double global_tokens() const = 0;
    virtual double global_micro_batches() const = 0;
    virtual Eigen::VectorXd local_counts() const = 0;
  };

  template <class S>
  struct TypedImpl final : Impl {
    using C = compute_type_t<S>;

    TypedImpl(Index n, Index k, const GlobalBatchOptions& options) : balance(n, k, options) {}

    at::ScalarType storage() const override { return detail::torch_dtype_of<S>(); }
    void count(const detail::TorchLogits& in, const TokenMask& mask) override {
      balance.count(in.template matrix<S>(), mask);
    }
    void synchronize(const std::function<void(double*, Index)>& sync) override {
      balance.synchronize(sync);
    }
    at::Tensor forward_backward(const char* function, const detail::TorchLogits& in,
                                const TokenMask& mask, TorchGradDtype grad_dtype,
                                double& value) override {
      const auto x = in.template matrix<S>();
      const at::ScalarType wanted = detail::torch_grad_dtype(in, grad_dtype);
      // Written in place when moebal writes the wanted dtype (S or C); else in C, rounded once.
      const at::ScalarType written =
          wanted == detail::torch_dtype_of<S>() || wanted == detail::torch_dtype_of<C>()
              ? wanted
              : detail::torch_dtype_of<C>();
      at::Tensor grad = at::empty(in.sizes, at::TensorOptions().dtype(written));
      if (written == detail::torch_dtype_of<C>()) {
        auto out = torch_mutable_view<C>(grad);
        value = double(balance.forward_backward(x, out, mask));
      } else if constexpr (!std::is_same_v<S, C>) {
        auto out = torch_mutable_view<S>(grad);
        value = double(balance.forward_backward(x, out, mask));
      } else {
        detail::throw_invalid(function, "grad_dtype", "float32 or the logits' dtype",
                              detail::torch_dtype_name(written));
      }
      return written == wanted ? grad : grad.to(wanted);
    }
    void reset() override { balance.reset(); }
    bool synchronized() const override { return balance.synchronized(); }
    Eigen::VectorXd global_f() const override { return balance.global_f(); }
    Eigen::VectorXd global_counts() const override { return balance.global_counts(); }
    double global_tokens() const override { return balance.global_tokens(); }
    double global_micro_batches() const override { return balance.global_micro_batches(); }
    Eigen::VectorXd local_counts() const override { return balance.local_counts(); }

    GlobalBatchBalance<S> balance;
  };

  // The core object for logits of `dtype` (GlobalBatchBalance<S>, S the storage type).
  std::unique_ptr<Impl> make_impl(at::ScalarType dtype) const {
    switch (dtype) {
      case at::kDouble:
        return std::make_unique<TypedImpl<double>>(num_experts_, k_, options_);
      case at::kBFloat16:
        return std::make_unique<TypedImpl<Eigen::bfloat16>>(num_experts_, k_, options_);
      case at::kHalf:
        return std::make_unique<TypedImpl<Eigen::half>>(num_experts_, k_, options_);
      default:
        return std::make_unique<TypedImpl<float>>(num_experts_, k_, options_);
    }
  }

  // The first micro-batch of a step fixes its dtype (and, on a fresh step, the core object's
  // storage type); later ones must match.
  void select(const char* function, const detail::TorchLogits& in) {
    if (!step_started_ && in.dtype != impl_->storage()) impl_ = make_impl(in.dtype);
    step_started_ = true;
    if (in.dtype != impl_->storage()) {
      detail::throw_invalid(
          function, "logits",
          detail::concat("this step's dtype, ", detail::torch_dtype_name(impl_->storage()),
                         " (the step's first micro-batch fixes it; reset() starts the next step)"),
          detail::concat("dtype ", detail::torch_dtype_name(in.dtype)));
    }
  }

  Index num_experts_;
  Index k_;
  GlobalBatchOptions options_;
  std::unique_ptr<Impl> impl_;
  bool step_started_ = false;
};

}  // namespace moebal
