// SPDX-License-Identifier: Apache-2.0
#pragma once

// Test support: reads tests/fixtures/global_batch.txt (written by generate_global_batch.py) and
// runs one rank's part of a case with any synchronization callable, so that the same fixtures
// are checked over threads (test_global_batch_reference.cpp) and over MPI processes.

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "moebal/losses/global_batch.hpp"
#include "support/fixtures.hpp"
#include "support/matchers.hpp"

#ifndef MOEBAL_FIXTURE_DIR
#error "MOEBAL_FIXTURE_DIR must name tests/fixtures"
#endif

namespace moebal_test {
namespace global_fixture {

using moebal::Index;
using moebal::RowMatrix;


struct Batch {
  int rank = 0, micro = 0;
  Eigen::VectorXi mask;
  bool has_mask = false;
  RowMatrix<double> logits, grad, megatron_grad;
  double value = 0.0, megatron_value = 0.0;
};

struct Case {
  std::string name, kind, dtype, score, convention, weighting;
  int ranks = 1, micro_batches = 1;
  Index experts = 0, k = 0;
  double coefficient = 1.0, micro_batch_weight = 0.0;
  std::vector<Batch> batches;  // rank-major
  bool is_float() const { return dtype == "float"; }
};


std::vector<Case> load() {
  moebal_test::detail::TokenReader reader(std::string(MOEBAL_FIXTURE_DIR) + "/global_batch.txt");
  std::vector<Case> cases;
  std::string token;
  while (reader.next(token)) {
    if (token != "case") throw std::runtime_error("expected case, got " + token);
    Case c;
    c.name = reader.word();
    reader.expect("kind");
    c.kind = reader.word();
    reader.expect("dtype");
    c.dtype = reader.word();
    reader.expect("ranks");
    c.ranks = int(reader.integer());
    reader.expect("micro_batches");
    c.micro_batches = int(reader.integer());
    reader.expect("experts");
    c.experts = reader.integer();
    reader.expect("k");
    c.k = reader.integer();
    reader.expect("score");
    c.score = reader.word();
    reader.expect("convention");
    c.convention = reader.word();
    reader.expect("coefficient");
    c.coefficient = reader.number(false);
    reader.expect("weighting");
    c.weighting = reader.word();
    reader.expect("micro_batch_weight");
    c.micro_batch_weight = reader.number(false);
    const bool f = c.is_float();
    for (int b = 0; b < c.ranks * c.micro_batches; ++b) {
      Batch batch;
      reader.expect("batch");
      batch.rank = int(reader.integer());
      batch.micro = int(reader.integer());
      const Index rows = reader.integer();
      batch.has_mask = reader.integer() != 0;
      if (batch.has_mask) {
        batch.mask.resize(rows);
        for (Index t = 0; t < rows; ++t) batch.mask[t] = int(reader.integer());
      }
      auto matrix = [&](RowMatrix<double>& m) {
        m.resize(rows, c.experts);
        for (Index i = 0; i < m.size(); ++i) m.data()[i] = reader.number(f);
      };
      reader.expect("logits");
      matrix(batch.logits);
      reader.expect("value");
      batch.value = reader.number(f);
      reader.expect("grad");
      matrix(batch.grad);
      if (c.kind == "running") {
        reader.expect("megatron_value");
        batch.megatron_value = reader.number(f);
        reader.expect("megatron_grad");
        matrix(batch.megatron_grad);
      }
      reader.expect("endbatch");
      c.batches.push_back(std::move(batch));
    }
    reader.expect("end");
    cases.push_back(std::move(c));
  }
  return cases;
}

struct Output {
  double value = 0.0, megatron_value = 0.0;
  RowMatrix<double> grad, megatron_grad;
};

template <class T, class Sync>
std::vector<Output> run_rank(const Case& c, int r, Sync sync) {
  moebal::GlobalBatchOptions options;
  options.coefficient = c.coefficient;
  options.score = c.score == "sigmoid" ? moebal::ScoreFunction::sigmoid : moebal::ScoreFunction::softmax;
  options.convention = c.convention == "huggingface" ? moebal::SwitchConvention::huggingface
                                                     : moebal::SwitchConvention::megatron;
  options.weighting = c.weighting == "micro_batch_mean" ? moebal::GlobalWeighting::micro_batch_mean
                                                        : moebal::GlobalWeighting::tokens;
  options.micro_batch_weight = c.micro_batch_weight;
  std::vector<const Batch*> mine;
  for (const auto& b : c.batches)
    if (b.rank == r) mine.push_back(&b);
  std::vector<RowMatrix<T>> logits;
  for (const Batch* b : mine) logits.push_back(b->logits.cast<T>());
  auto mask_of = [](const Batch* b) {
    return b->has_mask ? moebal::TokenMask(b->mask) : moebal::TokenMask{};
  };
  std::vector<Output> out(mine.size());
  if (c.kind == "running") {
    moebal::RunningGlobalBalance<T> corrected(c.experts, c.k, options);
    options.scaling = moebal::RunningScaling::megatron;
    moebal::RunningGlobalBalance<T> megatron(c.experts, c.k, options);
    for (std::size_t j = 0; j < mine.size(); ++j) {
      RowMatrix<T> g(logits[j].rows(), logits[j].cols()), h(logits[j].rows(), logits[j].cols());
      out[j].value = double(corrected.forward_backward(logits[j], g, sync, mask_of(mine[j])));
      out[j].megatron_value = double(megatron.forward_backward(logits[j], h, sync, mask_of(mine[j])));
      out[j].grad = g.template cast<double>();
      out[j].megatron_grad = h.template cast<double>();
    }
  } else {
    moebal::GlobalBatchBalance<T> balance(c.experts, c.k, options);
    for (std::size_t j = 0; j < mine.size(); ++j) balance.count(logits[j], mask_of(mine[j]));
    balance.synchronize(sync);
    for (std::size_t j = 0; j < mine.size(); ++j) {
      RowMatrix<T> g(logits[j].rows(), logits[j].cols());
      out[j].value = double(balance.forward_backward(logits[j], g, mask_of(mine[j])));
      out[j].grad = g.template cast<double>();
    }
  }
  return out;
}

void compare(const Case& c, const Batch& b, double value, const RowMatrix<double>& grad,
             double expected, const RowMatrix<double>& expected_grad) {
  const double rtol = c.is_float() ? 2e-5 : 1e-11;
  CHECK(std::abs(value - expected) <= rtol * std::abs(expected) + 1e-300);
  const double scale = std::max(expected_grad.cwiseAbs().maxCoeff(),
                                std::abs(expected) / double(b.logits.rows()));
  CHECK_THAT(grad, IsCloseTo(expected_grad, (c.is_float() ? 2e-5 : 1e-12) * scale,
                             c.is_float() ? 2e-3 : 1e-9));
}


}  // namespace global_fixture
}  // namespace moebal_test
