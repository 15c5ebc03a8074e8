// SPDX-License-Identifier: Apache-2.0
#include <cmath>
#include <vector>

#include <catch2/catch.hpp>

#include "moebal/losses/sequence.hpp"
#include "moebal/testing/gradcheck.hpp"
#include "support/matchers.hpp"
#include "support/random.hpp"

using moebal::Index;
using moebal::RowMatrix;
using moebal::ScoreFunction;
using moebal::SequenceLayout;
using moebal::SequenceMaskMode;
using moebal::SequenceOptions;
using moebal::SwitchConvention;
using moebal_test::as_double;
using moebal_test::IsCloseTo;
using moebal_test::random_logits;

TEST_CASE("sequence_aux_loss: gradient matches central differences", "[loss][sequence][grad]") {
  const RowMatrix<double> x = random_logits(12, 5, 1.5, 41);
  Eigen::VectorXi mask = Eigen::VectorXi::Ones(12);
  mask[1] = 0;
  mask[7] = 0;
  const std::vector<SequenceLayout> layouts = {SequenceLayout::batch_major(4),
                                               SequenceLayout::sequence_major(3),
                                               SequenceLayout::segments({2, 7, 3})};
  for (const auto& layout : layouts) {
    for (const auto convention :
         {SwitchConvention::megatron, SwitchConvention::huggingface, SwitchConvention::first_choice}) {
      for (const auto score : {ScoreFunction::softmax, ScoreFunction::sigmoid}) {
        for (const auto mode : {SequenceMaskMode::own_length, SequenceMaskMode::megatron_mean_length}) {
          SequenceOptions o;
          o.convention = convention;
          o.score = score;
          o.mask_mode = mode;
          o.coefficient = 0.8;
          o.mask = moebal::TokenMask(mask);
          const auto r = moebal::sequence_aux_loss(x, 2, layout, o);
          auto f = [&](const RowMatrix<double>& z) {
            return double(moebal::sequence_aux_loss(z, 2, layout, o).loss);
          };
          const auto report = moebal::testing::gradcheck(f, x, r.grad);
          INFO("layout " << int(layout.kind()) << ", " << moebal::to_string(convention) << ", "
                         << moebal::to_string(score) << ", mode " << int(mode) << ": "
                         << report.message());
          CHECK(report.passed);
          CHECK(r.grad.row(1).isZero(0));
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("sequence_aux_loss: invariants", "[loss][sequence]", float, double) {
  using T = TestType;
  const double rel = std::is_same<T, float>::value ? 1e-5 : 1e-13;
  const RowMatrix<T> x = random_logits(24, 6, 1.0, 42).cast<T>();

  SECTION("one sequence covering the batch equals the Switch loss") {
    for (const auto convention : {SwitchConvention::megatron, SwitchConvention::huggingface}) {
      SequenceOptions o;
      o.convention = convention;
      moebal::SwitchOptions s;
      s.convention = convention;
      const auto a = moebal::sequence_aux_loss(x, 2, SequenceLayout::batch_major(24), o);
      const auto b = moebal::switch_aux_loss(x, 2, s);
      CHECK(double(a.loss) == Approx(double(b.loss)).epsilon(rel));
      CHECK_THAT(as_double(a.grad), IsCloseTo(b.grad.template cast<double>(), rel * 1e-2, rel * 10));
    }
  }

  SECTION("batch-major and sequence-major agree after the matching permutation") {
    // Batch-major row b S + s holds the token that sequence-major stores at row s B + b.
    const Index S = 6, B = 4;
    RowMatrix<T> sequence_major(24, 6);
    for (Index b = 0; b < B; ++b)
      for (Index s = 0; s < S; ++s) sequence_major.row(s * B + b) = x.row(b * S + s);
    const auto a = moebal::sequence_aux_loss(x, 2, SequenceLayout::batch_major(S));
    const auto c = moebal::sequence_aux_loss(sequence_major, 2, SequenceLayout::sequence_major(S));
    CHECK(double(a.loss) == Approx(double(c.loss)).epsilon(rel));
    for (Index b = 0; b < B; ++b)
      for (Index s = 0; s < S; ++s)
        CHECK_THAT(as_double(RowMatrix<T>(c.grad.row(s * B + b))),
                   IsCloseTo(RowMatrix<double>(a.grad.row(b * S + s).template cast<double>()),
                             rel * 1e-2, rel * 10));
    // Equal segments are the batch-major layout.
    const auto g = moebal::sequence_aux_loss(x, 2, SequenceLayout::segments({6, 6, 6, 6}));
    CHECK(g.loss == a.loss);
    CHECK(g.grad == a.grad);
  }

  SECTION("per-sequence results and the mean over sequences") {
    const auto r = moebal::sequence_aux_loss(x, 2, SequenceLayout::segments({5, 10, 9}));
    REQUIRE(r.sequence_losses.size() == 3);
    CHECK(double(r.loss) == Approx(r.sequence_losses.mean()).epsilon(rel));
    CHECK(r.sequence_tokens == (moebal::CountVector(3) << 5, 10, 9).finished());
    CHECK(r.counts.rowwise().sum() == (moebal::CountVector(3) << 10, 20, 18).finished());
    // Each sequence's loss is the Switch loss of its own rows.
    const auto first = moebal::switch_aux_loss(x.topRows(5), 2);
    CHECK(r.sequence_losses[0] == Approx(double(first.loss)).epsilon(rel));
  }

  SECTION("mask modes: own length and Megatron's mean valid length") {
    // Sequence 0 (rows 0-3) keeps 2 real tokens, sequence 1 (rows 4-7) keeps 4; S = 4.
    const RowMatrix<T> y = x.topRows(8);
    Eigen::VectorXi mask = Eigen::VectorXi::Ones(8);
    mask[1] = 0;
    mask[2] = 0;
    SequenceOptions o;
    o.mask = moebal::TokenMask(mask);
    const auto own = moebal::sequence_aux_loss(y, 1, SequenceLayout::batch_major(4), o);
    // Own length: sequence 0 is the Switch loss of its two real rows (0 and 3).
    RowMatrix<T> real0(2, 6);
    real0 << y.row(0), y.row(3);
    const auto s0 = moebal::switch_aux_loss(real0, 1);
    const auto s1 = moebal::switch_aux_loss(RowMatrix<T>(y.bottomRows(4)), 1);
    CHECK(double(own.loss) == Approx((double(s0.loss) + double(s1.loss)) / 2).epsilon(rel));
    // Mean valid length T_bar = 3 for both: L_s = N sum_i (c_i^s / 3)(S_i^s / 3).
    o.mask_mode = SequenceMaskMode::megatron_mean_length;
    const auto mean = moebal::sequence_aux_loss(y, 1, SequenceLayout::batch_major(4), o);
    const double l0 = double(s0.loss) * (2.0 * 2.0) / 9.0;  // own-length loss rescaled by T_s^2 / T_bar^2
    const double l1 = double(s1.loss) * (4.0 * 4.0) / 9.0;
    CHECK(double(mean.loss) == Approx((l0 + l1) / 2).epsilon(rel));
  }

  SECTION("a sequence with no real token") {
    const RowMatrix<T> y = x.topRows(8);
    Eigen::VectorXi mask = Eigen::VectorXi::Ones(8);
    mask.head(4).setZero();
    SequenceOptions o;
    o.mask = moebal::TokenMask(mask);
    const auto own = moebal::sequence_aux_loss(y, 2, SequenceLayout::batch_major(4), o);
    const auto s1 = moebal::switch_aux_loss(RowMatrix<T>(y.bottomRows(4)), 2);
    CHECK(double(own.loss) == Approx(double(s1.loss)).epsilon(rel));  // excluded from the mean
    CHECK(own.sequence_losses[0] == 0.0);
    o.mask_mode = SequenceMaskMode::megatron_mean_length;
    const auto mean = moebal::sequence_aux_loss(y, 2, SequenceLayout::batch_major(4), o);
    // T_bar = 2: sequence 1's loss scales by (4/2)^2 and the mean runs over both sequences.
    CHECK(double(mean.loss) == Approx(double(s1.loss) * 4.0 / 2).epsilon(rel));
  }
}

TEST_CASE("SequenceAuxLoss: object form and no-allocation reuse", "[loss][sequence][api]") {
  const RowMatrix<double> x = random_logits(32, 8, 1.0, 43);
  const auto r = moebal::sequence_aux_loss(x, 2, SequenceLayout::sequence_major(8));
  moebal::SequenceAuxLoss<double> loss(8, 2, SequenceLayout::sequence_major(8));
  CHECK(loss.forward(x) == r.loss);
  RowMatrix<double> g = RowMatrix<double>::Zero(32, 8);
  loss.backward_accumulate(x, g, 3.0);
  CHECK_THAT(g, IsCloseTo(RowMatrix<double>(3.0 * r.grad), 1e-16, 1e-13));
}

TEST_CASE("sequence_aux_loss: bad input", "[loss][sequence][errors]") {
  const RowMatrix<double> x = RowMatrix<double>::Zero(10, 4);
  CHECK_THROWS_WITH(moebal::sequence_aux_loss(x, 2, SequenceLayout::batch_major(4)),
                    "moebal::sequence_aux_loss: argument 'layout': expected a sequence length S "
                    "dividing T = 10 (logits.rows()), got S = 4");
  CHECK_THROWS_WITH(moebal::sequence_aux_loss(x, 2, SequenceLayout::sequence_major(0)),
                    "moebal::sequence_aux_loss: argument 'layout': expected a sequence length S "
                    ">= 1, got S = 0");
  CHECK_THROWS_WITH(moebal::sequence_aux_loss(x, 2, SequenceLayout::segments({3, 4})),
                    "moebal::sequence_aux_loss: argument 'layout': expected segment lengths "
                    "summing to T = 10 (logits.rows()), got a sum of 7");
  CHECK_THROWS_WITH(moebal::sequence_aux_loss(x, 2, SequenceLayout::segments({3, 0, 7})),
                    "moebal::sequence_aux_loss: argument 'layout': expected segment lengths >= 1, "
                    "got length 0 for segment 1");
  CHECK_THROWS_WITH(moebal::sequence_aux_loss(x, 2, SequenceLayout::segments({})),
                    "moebal::sequence_aux_loss: argument 'layout': expected at least one segment, "
                    "got no segment");
  CHECK_THROWS_WITH(moebal::sequence_aux_loss(x, 5, SequenceLayout::batch_major(5)),
                    "moebal::sequence_aux_loss: argument 'k': expected 1 <= k <= N, the number of "
                    "experts (N = 4), got k = 5");
  SequenceOptions o;
  o.mask_mode = static_cast<SequenceMaskMode>(4);
  CHECK_THROWS_WITH(moebal::sequence_aux_loss(x, 2, SequenceLayout::batch_major(5), o),
                    "moebal::sequence_aux_loss: argument 'options.mask_mode': expected own_length "
                    "or megatron_mean_length, got 4");
}
