// SPDX-License-Identifier: Apache-2.0
// A consumer of moebal::torch: the torch overload equals the Eigen API on the same memory.

#include <cstdio>

#include <moebal/torch.hpp>

int main() {
  at::manual_seed(1);
  const at::Tensor logits = at::randn({16, 8}, at::kFloat);
  const auto from_torch = moebal::switch_aux_loss(logits, 2);
  const auto from_eigen = moebal::switch_aux_loss(moebal::torch_view<float>(logits), 2);
  const bool same_loss = from_torch.loss.item<float>() == from_eigen.loss;
  const bool same_grad =
      (moebal::torch_view<float>(from_torch.grad).array() == from_eigen.grad.array()).all();
  std::printf("loss %.7f (Eigen %.7f), gradients %s\n", double(from_torch.loss.item<float>()),
              double(from_eigen.loss), same_grad ? "equal" : "differ");
  return same_loss && same_grad ? 0 : 1;
}
