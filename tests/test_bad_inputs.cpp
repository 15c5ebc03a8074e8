// SPDX-License-Identifier: Apache-2.0
// The catalogue of bad inputs across the public API: each one must raise
// moebal::invalid_argument whose message names the function, the argument, what was expected
// and what was given ("<function>: argument '<name>': expected <what>, got <value>").
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "moebal/moebal.hpp"
#include "support/fake_ranks.hpp"
#include "support/random.hpp"

using moebal::Index;
using moebal::RowMatrix;
using moebal_test::random_logits;

namespace {

struct BadInput {
  const char* name;
  std::function<void()> call;
  // Fragments the message must contain, in addition to the common format.
  std::vector<std::string> fragments;
};

const double kInf = std::numeric_limits<double>::infinity();
const double kNaN = std::numeric_limits<double>::quiet_NaN();

RowMatrix<double> logits(Index rows = 6, Index cols = 4) {
  return random_logits(rows, cols, 1.0, 5);
}

std::vector<BadInput> catalogue() {
  std::vector<BadInput> c;
  // ---- shapes, k, empty batches ----
  c.push_back({"empty batch (T = 0)", [] { moebal::switch_aux_loss(RowMatrix<double>(0, 4), 2); },
               {"moebal::switch_aux_loss", "argument 'logits'", "an empty batch, shape 0 x 4"}});
  c.push_back({"no experts (N = 0)", [] { moebal::z_loss(RowMatrix<float>(3, 0)); },
               {"moebal::z_loss", "argument 'logits'", "shape 3 x 0"}});
  c.push_back({"k = 0", [] { moebal::switch_aux_loss(logits(), 0); },
               {"argument 'k'", "1 <= k <= N", "got k = 0"}});
  c.push_back({"k > N", [] { moebal::route(logits(), 5); },
               {"moebal::route", "argument 'k'", "got k = 5"}});
  c.push_back({"k > N in topk_indices", [] { moebal::topk_indices(logits(), 9); },
               {"moebal::topk_indices", "argument 'k'", "got k = 9"}});
  c.push_back({"logits with other columns than constructed",
               [] {
                 moebal::SwitchAuxLoss<double> loss(8, 2);
                 loss.forward(logits(6, 4));
               },
               {"moebal::SwitchAuxLoss::forward", "argument 'logits'", "N = 8", "shape 6 x 4"}});
  c.push_back({"backward before any forward",
               [] {
                 moebal::ZLoss<double> loss;
                 RowMatrix<double> g(6, 4);
                 loss.backward(logits(), g);
               },
               {"moebal::ZLoss::backward", "argument 'logits'", "before any forward"}});
  c.push_back({"backward with other logits than forward",
               [] {
                 moebal::SwitchAuxLoss<double> loss(4, 2);
                 loss.forward(logits(6, 4));
                 RowMatrix<double> g(5, 4);
                 loss.backward(logits(5, 4), g);
               },
               {"moebal::SwitchAuxLoss::backward", "argument 'logits'", "T = 6", "shape 5 x 4"}});
  c.push_back({"gradient buffer of the wrong shape",
               [] {
                 moebal::SwitchAuxLoss<double> loss(4, 2);
                 RowMatrix<double> g(6, 3);
                 loss.forward_backward(logits(), g);
               },
               {"argument 'dloss_dlogits'", "6 x 4", "shape 6 x 3"}});
  // ---- masks ----
  c.push_back({"mask of the wrong length",
               [] {
                 Eigen::VectorXi mask = Eigen::VectorXi::Ones(5);
                 moebal::SwitchOptions o;
                 o.mask = moebal::TokenMask(mask);
                 moebal::switch_aux_loss(logits(), 2, o);
               },
               {"argument 'mask'", "length T = 6", "got length 5"}});
  c.push_back({"mask holding NaN",
               [] {
                 Eigen::VectorXd mask = Eigen::VectorXd::Ones(6);
                 mask[2] = kNaN;
                 moebal::ZLossOptions o;
                 o.mask = moebal::TokenMask(mask);
                 moebal::z_loss(logits(), o);
               },
               {"moebal::z_loss", "argument 'mask'", "NaN at element 2"}});
  c.push_back({"mask given to the loss object's constructor",
               [] {
                 Eigen::VectorXi mask = Eigen::VectorXi::Ones(6);
                 moebal::SwitchOptions o;
                 o.mask = moebal::TokenMask(mask);
                 moebal::SwitchAuxLoss<float> loss(4, 2, o);
               },
               {"moebal::SwitchAuxLoss", "argument 'options.mask'", "a mask of length 6"}});
  c.push_back({"negative mask length",
               [] {
                 const int m[1] = {1};
                 moebal::TokenMask mask(m, -1);
               },
               {"moebal::TokenMask", "argument 'size'", "-1"}});
  // ---- non-finite values ----
  c.push_back({"NaN logit",
               [] {
                 RowMatrix<double> x = logits();
                 x(3, 1) = kNaN;
                 moebal::switch_aux_loss(x, 2);
               },
               {"argument 'logits'", "no NaN", "at row 3, column 1"}});
  c.push_back({"+Inf logit",
               [] {
                 RowMatrix<float> x = logits().cast<float>();
                 x(0, 2) = std::numeric_limits<float>::infinity();
                 moebal::combined_aux_loss(x, 2, moebal::CombinedOptions{});
               },
               {"moebal::combined_aux_loss", "argument 'logits'", "inf at row 0, column 2"}});
  c.push_back({"a real token whose logits are all -Inf",
               [] {
                 RowMatrix<double> x = logits();
                 x.row(4).setConstant(-kInf);
                 moebal::z_loss(x);
               },
               {"argument 'logits'", "every logit -Inf in row 4"}});
  c.push_back({"non-finite coefficient",
               [] {
                 moebal::SwitchOptions o;
                 o.coefficient = kNaN;
                 moebal::switch_aux_loss(logits(), 2, o);
               },
               {"argument 'options.coefficient'", "a finite number", "nan"}});
  c.push_back({"non-finite backward scale",
               [] {
                 moebal::SwitchAuxLoss<double> loss(4, 2);
                 RowMatrix<double> g(6, 4);
                 loss.forward(logits());
                 loss.backward(logits(), g, kInf);
               },
               {"argument 'scale'", "a finite number", "inf"}});
  // ---- sequences and segments ----
  c.push_back({"sequence length not dividing T",
               [] {
                 moebal::sequence_aux_loss(logits(), 2, moebal::SequenceLayout::batch_major(4));
               },
               {"moebal::sequence_aux_loss", "argument 'layout'", "4"}});
  c.push_back({"segment lengths not summing to T",
               [] {
                 moebal::sequence_aux_loss(logits(), 2, moebal::SequenceLayout::segments({2, 3}));
               },
               {"moebal::sequence_aux_loss", "argument 'layout'", "5"}});
  c.push_back({"sequence weight without a layout",
               [] {
                 moebal::CombinedOptions o;
                 o.weights.sequence = 1.0;
                 moebal::combined_aux_loss(logits(), 2, o);
               },
               {"moebal::combined_aux_loss", "layout"}});
  // ---- groups, bias, device and capacity settings ----
  c.push_back({"groups not dividing N",
               [] {
                 moebal::RouterOptions o;
                 o.num_groups = 3;
                 moebal::route(logits(6, 4), 1, o);
               },
               {"moebal::route", "argument 'options.num_groups'", "3"}});
  c.push_back({"more kept groups than groups",
               [] {
                 moebal::RouterOptions o;
                 o.num_groups = 2;
                 o.group_topk = 3;
                 moebal::route(logits(6, 4), 1, o);
               },
               {"moebal::route", "argument 'options.group_topk'", "3"}});
  c.push_back({"expert bias of the wrong length",
               [] {
                 moebal::RouterOptions o;
                 o.expert_bias = Eigen::VectorXd::Zero(3);
                 moebal::route(logits(6, 4), 2, o);
               },
               {"moebal::route", "argument 'options.expert_bias'", "length 3"}});
  c.push_back({"devices not dividing N",
               [] {
                 moebal::DeviceBalanceOptions o;
                 o.devices = 3;
                 moebal::device_balance_loss(logits(6, 4), 2, o);
               },
               {"argument 'options.devices'", "D = 3"}});
  c.push_back({"negative capacity factor",
               [] {
                 moebal::CapacityOptions o;
                 o.capacity_factor = -1.0;
                 const auto r = moebal::route(logits(), 2);
                 moebal::apply_capacity(r.indices, r.weights, 4, o);
               },
               {"moebal::apply_capacity", "argument 'options.capacity_factor'", "-1"}});
  c.push_back({"routed expert index out of range",
               [] {
                 auto r = moebal::route(logits(), 2);
                 r.indices(1, 0) = 7;
                 moebal::apply_capacity(r.indices, r.weights, 4, moebal::CapacityOptions{});
               },
               {"moebal::apply_capacity", "argument 'indices'", "7"}});
  c.push_back({"route_backward with indices out of range",
               [] {
                 auto r = moebal::route(logits(), 2);
                 r.indices(2, 1) = -1;
                 moebal::route_backward(logits(), r.indices, r.weights);
               },
               {"argument 'indices'", "-1 at row 2, slot 1"}});
  // ---- metrics ----
  c.push_back({"negative count in balance metrics",
               [] {
                 Eigen::VectorXd counts(3);
                 counts << 1, -2, 3;
                 moebal::balance_metrics(counts);
               },
               {"moebal::balance_metrics", "-2"}});
  c.push_back({"domain label out of range",
               [] {
                 Eigen::Matrix<Index, Eigen::Dynamic, 1> domains = Eigen::Matrix<Index, Eigen::Dynamic, 1>::Zero(6);
                 domains[5] = 4;
                 moebal::domain_expert_counts(logits(), 2, domains, 2);
               },
               {"moebal::domain_expert_counts", "argument 'domains'", "4 at token 5"}});
  // ---- global batch ----
  c.push_back({"global loss before synchronize",
               [] {
                 moebal::GlobalBatchBalance<double> balance(4, 2);
                 balance.count(logits());
                 balance.forward(logits());
               },
               {"moebal::GlobalBatchBalance::forward", "synchronize", "before synchronize"}});
  c.push_back({"count after synchronize without reset",
               [] {
                 moebal::GlobalBatchBalance<double> balance(4, 2);
                 balance.count(logits());
                 balance.synchronize();
                 balance.count(logits());
               },
               {"moebal::GlobalBatchBalance::count", "reset"}});
  return c;
}

}  // namespace

TEST_CASE("bad inputs: every case raises moebal::invalid_argument with a precise message",
          "[errors][catalogue]") {
  const auto cases = catalogue();
  REQUIRE(cases.size() >= 25);
  for (const BadInput& bad : cases) {
    INFO("case: " << bad.name);
    bool thrown = false;
    try {
      bad.call();
    } catch (const moebal::invalid_argument& e) {
      thrown = true;
      const std::string message = e.what();
      INFO("message: " << message);
      CHECK(message.rfind("moebal::", 0) == 0);
      CHECK(message.find(": argument '") != std::string::npos);
      CHECK(message.find("': expected ") != std::string::npos);
      CHECK(message.find(", got ") != std::string::npos);
      for (const std::string& fragment : bad.fragments) {
        INFO("fragment: " << fragment);
        CHECK(message.find(fragment) != std::string::npos);
      }
    } catch (const std::exception& e) {
      FAIL_CHECK("another exception type: " << e.what());
      thrown = true;
    }
    CHECK(thrown);
  }
}

TEST_CASE("bad inputs: ranks that disagree on N or k fail on every rank, none hangs",
          "[errors][catalogue][global]") {
  moebal_test::FakeWorld world(3);
  const auto errors = world.run([](int rank, moebal_test::FakeWorld::Sync sync) {
    const Index n = rank == 1 ? 6 : 4;  // rank 1 was built with another N
    moebal::GlobalBatchBalance<double> balance(n, 2);
    balance.count(random_logits(5, n, 1.0, unsigned(rank)));
    balance.synchronize(sync);
  });
  for (const std::string& e : errors) {
    INFO(e);
    CHECK(e.rfind("moebal::GlobalBatchBalance::synchronize: argument '", 0) == 0);
    CHECK(e.find("N") != std::string::npos);
  }
}

TEST_CASE("bad inputs: an invalid micro-batch on one rank fails on every rank",
          "[errors][catalogue][global]") {
  moebal_test::FakeWorld world(2);
  const auto errors = world.run([](int rank, moebal_test::FakeWorld::Sync sync) {
    moebal::GlobalBatchBalance<double> balance(4, 2);
    RowMatrix<double> x = random_logits(5, 4, 1.0, unsigned(rank));
    if (rank == 0) x(2, 2) = std::numeric_limits<double>::quiet_NaN();
    balance.count(x);  // deferred: reported by synchronize, on every rank
    balance.synchronize(sync);
  });
  REQUIRE(errors.size() == 2);
  // Rank 0 reports its own row; rank 1 learns that another rank failed.
  CHECK(errors[0].rfind("moebal::GlobalBatchBalance::count: argument 'logits'", 0) == 0);
  CHECK(errors[0].find("nan at row 2, column 2") != std::string::npos);
  CHECK(errors[1].rfind("moebal::GlobalBatchBalance::synchronize: argument 'logits'", 0) == 0);
  CHECK(errors[1].find("an invalid micro-batch on 1 other rank(s)") != std::string::npos);
}
