// SPDX-License-Identifier: Apache-2.0
// The README's usage snippets, compiled and run on small data so the README stays true.

#include <cstdint>
#include <iostream>
#include <sstream>
#include <vector>

#include <catch2/catch.hpp>

#include <moebal/moebal.hpp>

TEST_CASE("README: the usage snippets compile and agree", "[readme]") {
  const moebal::Index T = 6, N = 4;
  std::vector<float> torch_memory(T * N);
  for (std::size_t i = 0; i < torch_memory.size(); ++i) torch_memory[i] = float(i % 7) * 0.3f;
  std::vector<std::int64_t> attention_mask = {1, 1, 1, 1, 0, 0};
  const float* ptr = torch_memory.data();
  const std::int64_t* mask_ptr = attention_mask.data();
  moebal::RowMatrix<float> router_grad = moebal::RowMatrix<float>::Zero(T, N);
  float total_loss = 0;
  std::ostringstream cout;

  // --- README "Using it" ---
  Eigen::Map<const moebal::RowMatrix<float>> logits(ptr, T, N);
  moebal::SwitchOptions options;
  options.convention = moebal::SwitchConvention::huggingface;
  options.coefficient = 0.001;
  options.mask = moebal::TokenMask(mask_ptr, T);

  auto r = moebal::switch_aux_loss(logits, /*k=*/2, options);
  total_loss += r.loss;
  router_grad += r.grad;
  cout << r.stats.tokens_per_expert.transpose() << "\n" << r.stats.f.transpose() << "\n";
  // --- end ---

  CHECK(total_loss == r.loss);
  CHECK(r.stats.tokens == 4);
  CHECK(r.stats.tokens_per_expert.sum() == 8);
  CHECK(router_grad.bottomRows(2).isZero(0));

  // --- README loop ---
  struct Batch {
    Eigen::Map<const moebal::RowMatrix<float>> logits;
    std::vector<std::int64_t> mask;
    moebal::RowMatrix<float> router_grad;
  };
  std::vector<Batch> batches;
  batches.push_back({logits, attention_mask, moebal::RowMatrix<float>::Zero(T, N)});
  moebal::SwitchOptions loss_options;               // convention, score, coefficient: no mask
  loss_options.convention = moebal::SwitchConvention::huggingface;
  loss_options.coefficient = 0.001;                 // (the README's first snippet's value)
  moebal::SwitchAuxLoss<float> balance(/*num_experts=*/N, /*k=*/2, loss_options);
  for (auto& batch : batches) {
    float value = balance.forward(batch.logits, moebal::TokenMask(batch.mask.data(), T));
    balance.backward_accumulate(batch.logits, batch.router_grad, /*scale=*/1.0f);  // +=
    CHECK(value == r.loss);
  }
  // --- end ---
  CHECK(batches[0].router_grad == r.grad);
}
