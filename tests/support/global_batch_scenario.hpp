// SPDX-License-Identifier: Apache-2.0
#pragma once

// Test support: the multi-rank global-batch scenario shared by the thread-based test and the
// MPI test. R ranks x M micro-batches of different sizes; each rank runs the two-phase exact
// global-batch loss on its own micro-batches and also computes, independently, what
// switch_aux_loss gives on the concatenated global batch (every rank can build it, since the
// data is deterministic), so that each rank can compare its shares and gradient rows.

#include <vector>

#include "moebal/core/scores.hpp"
#include "moebal/losses/global_batch.hpp"
#include "moebal/losses/switch.hpp"
#include "support/random.hpp"

namespace moebal_test {

struct GlobalScenario {
  int ranks = 4;
  int micro_batches = 2;
  moebal::Index experts = 8;
  moebal::Index k = 2;

  moebal::Index rows(int r, int j) const { return 5 + 3 * r + 7 * j; }
  moebal::RowMatrix<double> logits(int r, int j, moebal::Index experts_override = 0) const {
    const moebal::Index n = experts_override > 0 ? experts_override : experts;
    return random_logits(rows(r, j), n, 1.5, unsigned(100 + 10 * r + j));
  }
  Eigen::VectorXi mask(int r, int j) const {
    Eigen::VectorXi m = Eigen::VectorXi::Ones(rows(r, j));
    for (moebal::Index t = 2; t < m.size(); t += 4) m[t] = 0;
    return m;
  }
  // The global batch, rank-major then micro-batch.
  moebal::RowMatrix<double> all_logits() const {
    moebal::Index total = 0;
    for (int r = 0; r < ranks; ++r)
      for (int j = 0; j < micro_batches; ++j) total += rows(r, j);
    moebal::RowMatrix<double> all(total, experts);
    moebal::Index at = 0;
    for (int r = 0; r < ranks; ++r)
      for (int j = 0; j < micro_batches; ++j) {
        all.middleRows(at, rows(r, j)) = logits(r, j);
        at += rows(r, j);
      }
    return all;
  }
  Eigen::VectorXi all_mask() const {
    std::vector<int> values;
    for (int r = 0; r < ranks; ++r)
      for (int j = 0; j < micro_batches; ++j) {
        const Eigen::VectorXi m = mask(r, j);
        for (moebal::Index t = 0; t < m.size(); ++t) values.push_back(m[t]);
      }
    return Eigen::Map<const Eigen::VectorXi>(values.data(), moebal::Index(values.size()));
  }
  moebal::Index offset(int r, int j) const {
    moebal::Index at = 0;
    for (int rr = 0; rr < ranks; ++rr)
      for (int jj = 0; jj < micro_batches; ++jj) {
        if (rr == r && jj == j) return at;
        at += rows(rr, jj);
      }
    return at;
  }
};

struct RankResult {
  std::vector<double> shares, expected_shares;
  std::vector<moebal::RowMatrix<double>> grads, expected_grads;
};

/// Rank r's part of the exact global-batch protocol and its independent expectation.
template <class Sync>
RankResult run_exact_rank(const GlobalScenario& s, int r, Sync sync,
                          const moebal::GlobalBatchOptions& options) {
  moebal::GlobalBatchBalance<double> balance(s.experts, s.k, options);
  std::vector<moebal::RowMatrix<double>> logits;
  std::vector<Eigen::VectorXi> masks;
  for (int j = 0; j < s.micro_batches; ++j) {
    logits.push_back(s.logits(r, j));
    masks.push_back(s.mask(r, j));
  }
  for (int j = 0; j < s.micro_batches; ++j) balance.count(logits[j], moebal::TokenMask(masks[j]));
  balance.synchronize(sync);
  RankResult result;
  for (int j = 0; j < s.micro_batches; ++j) {
    moebal::RowMatrix<double> grad(logits[j].rows(), logits[j].cols());
    result.shares.push_back(balance.forward_backward(logits[j], grad, moebal::TokenMask(masks[j])));
    result.grads.push_back(grad);
  }
  // Expectation: switch_aux_loss on the concatenated global batch; this rank's rows of its
  // gradient, and its share a N sum_i f_i S_i^j / T with S^j from moebal::scores.
  const moebal::RowMatrix<double> all = s.all_logits();
  const Eigen::VectorXi all_mask = s.all_mask();
  moebal::SwitchOptions switch_options;
  switch_options.convention = options.convention;
  switch_options.score = options.score;
  switch_options.coefficient = options.coefficient;
  switch_options.mask = moebal::TokenMask(all_mask);
  const auto reference = moebal::switch_aux_loss(all, s.k, switch_options);
  for (int j = 0; j < s.micro_batches; ++j) {
    const moebal::RowMatrix<double> q = moebal::scores(logits[j], options.score);
    Eigen::VectorXd sums = Eigen::VectorXd::Zero(s.experts);
    for (moebal::Index t = 0; t < q.rows(); ++t)
      if (masks[j][t] != 0) sums += q.row(t).transpose();
    result.expected_shares.push_back(options.coefficient * double(s.experts) *
                                     reference.stats.f.dot(sums) / double(reference.stats.tokens));
    result.expected_grads.push_back(reference.grad.middleRows(s.offset(r, j), logits[j].rows()));
  }
  return result;
}

}  // namespace moebal_test
