// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// Opt-in adapter for `Eigen::Tensor` and `Eigen::TensorMap` input (pulls in Eigen's
/// unsupported Tensor module; not included by <moebal/moebal.hpp>).
///
/// Rank 2 is [tokens, experts]; rank 3 is [batch, sequence, experts]. Tensor memory is read in
/// place, never copied, when it is row-major (the layout of a PyTorch tensor):
///   RowMajor [B, S, N] is a row-major (B S) x N matrix whose row b S + s is token s of
///   sequence b (batch-major); ColMajor [B, S, N] is a column-major (B S) x N matrix whose row
///   b + B s is token s of sequence b (sequence-major), converted once to row-major.
/// Gradients come back as tensors of the input's rank, dimensions and layout.

#include <type_traits>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>

#include "moebal/losses/sequence.hpp"
#include "moebal/losses/switch.hpp"

namespace moebal {

/// A loss value, its gradient shaped like the input tensor, and the loss's statistics.
template <class Scalar, int Rank, int Layout, class Stats>
struct TensorLossResult {
  Scalar loss = Scalar(0);
  Eigen::Tensor<Scalar, Rank, Layout> grad;
  Stats stats;
};

namespace detail {

template <class TensorType>
using tensor_scalar_t = std::remove_const_t<typename TensorType::Scalar>;

template <class TensorType>
constexpr int tensor_layout_v = int(TensorType::Layout);

/// The T x N matrix view of a rank-2 or rank-3 tensor's memory (no copy).
template <class TensorType>
auto tensor_as_matrix(const TensorType& tensor) {
  using Scalar = tensor_scalar_t<TensorType>;
  constexpr int rank = TensorType::NumDimensions;
  static_assert(rank == 2 || rank == 3,
                "moebal: tensors must be rank 2 [tokens, experts] or rank 3 [batch, sequence, "
                "experts]");
  static_assert(is_supported_scalar_v<Scalar>,
                "moebal: tensor elements must be float, double, Eigen::bfloat16 or Eigen::half");
  constexpr int storage = tensor_layout_v<TensorType> == int(Eigen::RowMajor) ? Eigen::RowMajor
                                                                             : Eigen::ColMajor;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, storage>;
  const Index rows =
      rank == 2 ? Index(tensor.dimension(0)) : Index(tensor.dimension(0) * tensor.dimension(1));
  const Index cols = Index(tensor.dimension(rank - 1));
  return Eigen::Map<const Matrix>(tensor.data(), rows, cols);
}

/// Copies a T x N row-major gradient into a tensor shaped like `like`.
template <class TensorType, class Scalar>
Eigen::Tensor<Scalar, TensorType::NumDimensions, tensor_layout_v<TensorType>> tensor_like(
    const TensorType& like, const RowMatrix<Scalar>& grad) {
  constexpr int layout = tensor_layout_v<TensorType>;
  Eigen::Tensor<Scalar, TensorType::NumDimensions, layout> out(like.dimensions());
  constexpr int storage = layout == int(Eigen::RowMajor) ? Eigen::RowMajor : Eigen::ColMajor;
  Eigen::Map<Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, storage>>(out.data(), grad.rows(),
                                                                             grad.cols()) = grad;
  return out;
}

}  // namespace detail

/// `switch_aux_loss` for a rank-2 [T, N] or rank-3 [B, S, N] `Eigen::Tensor`/`TensorMap`
/// (every token of every sequence is one row). Row-major tensors are read in place.
/// @return loss, grad (a tensor like the input), stats. @throws as `switch_aux_loss`.
template <class TensorType>
auto switch_aux_loss_tensor(const TensorType& logits, Index k, const SwitchOptions& options = {}) {
  using Scalar = compute_type_t<detail::tensor_scalar_t<TensorType>>;
  auto r = switch_aux_loss(detail::tensor_as_matrix(logits), k, options);
  TensorLossResult<Scalar, TensorType::NumDimensions, detail::tensor_layout_v<TensorType>,
                   SwitchStats>
      result;
  result.loss = r.loss;
  result.grad = detail::tensor_like(logits, r.grad);
  result.stats = std::move(r.stats);
  return result;
}

/// `sequence_aux_loss` for a rank-3 [B, S, N] tensor: each of the B sequences has S tokens.
/// The layout follows the storage (RowMajor: batch-major rows; ColMajor: sequence-major rows).
/// A mask, if given, has B S elements in that same row order (b S + s for RowMajor,
/// b + B s for ColMajor: the order of the tensor's memory).
/// @return loss, grad (a tensor like the input), per-sequence results in `stats`.
/// @throws as `sequence_aux_loss`.
template <class TensorType>
auto sequence_aux_loss_tensor(const TensorType& logits, Index k,
                              const SequenceOptions& options = {}) {
  using Scalar = compute_type_t<detail::tensor_scalar_t<TensorType>>;
  static_assert(TensorType::NumDimensions == 3,
                "moebal::sequence_aux_loss_tensor: logits must be rank 3 [batch, sequence, "
                "experts]");
  const Index seq_len = Index(logits.dimension(1));
  const SequenceLayout layout = detail::tensor_layout_v<TensorType> == int(Eigen::RowMajor)
                                    ? SequenceLayout::batch_major(seq_len)
                                    : SequenceLayout::sequence_major(seq_len);
  auto r = sequence_aux_loss(detail::tensor_as_matrix(logits), k, layout, options);
  TensorLossResult<Scalar, 3, detail::tensor_layout_v<TensorType>, SequenceAuxResult<Scalar>>
      result;
  result.loss = r.loss;
  result.grad = detail::tensor_like(logits, r.grad);
  r.grad.resize(0, 0);
  result.stats = std::move(r);
  return result;
}

}  // namespace moebal
