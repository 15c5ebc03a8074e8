// SPDX-License-Identifier: Apache-2.0
#include <catch2/catch.hpp>

#include "moebal/losses/combined.hpp"
#include "moebal/losses/cv2.hpp"
#include "moebal/losses/sequence.hpp"
#include "moebal/losses/switch.hpp"
#include "moebal/losses/z.hpp"
#include "moebal/testing/gradcheck.hpp"
#include "support/matchers.hpp"
#include "support/random.hpp"

using moebal::CombinedOptions;
using moebal::Index;
using moebal::RowMatrix;
using moebal::ScoreFunction;
using moebal::SequenceLayout;
using moebal_test::as_double;
using moebal_test::IsCloseTo;
using moebal_test::random_logits;

TEMPLATE_TEST_CASE("combined_aux_loss: equals the weighted sum of the single terms",
                   "[loss][combined]", float, double) {
  using T = TestType;
  const double rel = std::is_same<T, float>::value ? 1e-5 : 1e-13;
  const RowMatrix<T> x = random_logits(24, 8, 1.5, 71).cast<T>();
  Eigen::VectorXi mask = Eigen::VectorXi::Ones(24);
  mask[3] = 0;
  mask[17] = 0;
  for (const auto score : {ScoreFunction::softmax, ScoreFunction::sigmoid}) {
    for (const auto convention :
         {moebal::SwitchConvention::megatron, moebal::SwitchConvention::huggingface}) {
      CombinedOptions o;
      o.weights = {0.01, 0.001, 0.5, 0.1};
      o.score = score;
      o.convention = convention;
      o.layout = SequenceLayout::sequence_major(6);
      o.mask = moebal::TokenMask(mask);
      const auto r = moebal::combined_aux_loss(x, 2, o);

      moebal::SwitchOptions so;
      so.coefficient = 0.01;
      so.score = score;
      so.convention = convention;
      so.mask = o.mask;
      moebal::ZLossOptions zo;
      zo.coefficient = 0.001;
      zo.mask = o.mask;
      moebal::SequenceOptions qo;
      qo.coefficient = 0.5;
      qo.score = score;
      qo.convention = convention;
      qo.mask = o.mask;
      moebal::Cv2Options co;
      co.coefficient = 0.1;
      co.score = score;
      co.mask = o.mask;
      const auto a = moebal::switch_aux_loss(x, 2, so);
      const auto b = moebal::z_loss(x, zo);
      const auto c = moebal::sequence_aux_loss(x, 2, SequenceLayout::sequence_major(6), qo);
      const auto d = moebal::cv2_importance_loss(x, 2, co);
      INFO(moebal::to_string(score) << ", " << moebal::to_string(convention));
      CHECK(r.terms.switch_loss == Approx(double(a.loss)).epsilon(rel));
      CHECK(r.terms.z == Approx(double(b.loss)).epsilon(rel));
      CHECK(r.terms.sequence == Approx(double(c.loss)).epsilon(rel));
      CHECK(r.terms.cv2_importance == Approx(double(d.loss)).epsilon(rel));
      const double total = double(a.loss) + double(b.loss) + double(c.loss) + double(d.loss);
      CHECK(double(r.loss) == Approx(total).epsilon(rel));
      const RowMatrix<double> sum = as_double(a.grad) + as_double(b.grad) + as_double(c.grad) +
                                    as_double(d.grad);
      CHECK_THAT(as_double(r.grad), IsCloseTo(sum, rel * 1e-3, rel * 10));
      CHECK(r.stats.tokens_per_expert == a.stats.tokens_per_expert);
    }
  }
}

TEST_CASE("combined_aux_loss: gradient matches central differences", "[loss][combined][grad]") {
  const RowMatrix<double> x = random_logits(12, 6, 1.5, 72);
  for (const auto score : {ScoreFunction::softmax, ScoreFunction::sigmoid}) {
    CombinedOptions o;
    o.weights = {0.3, 0.2, 0.5, 0.7};
    o.score = score;
    o.layout = SequenceLayout::batch_major(4);
    o.cv2_variance = moebal::Cv2Variance::unbiased;
    const auto r = moebal::combined_aux_loss(x, 2, o);
    auto f = [&](const RowMatrix<double>& z) { return double(moebal::combined_aux_loss(z, 2, o).loss); };
    const auto report = moebal::testing::gradcheck(f, x, r.grad);
    INFO(report.message());
    CHECK(report.passed);
  }
}

TEST_CASE("CombinedAuxLoss: forms agree; zero weights cost nothing", "[loss][combined][api]") {
  const RowMatrix<double> x = random_logits(40, 8, 1.0, 73);
  CombinedOptions o;
  o.weights = {1.0, 0.1, 0.0, 0.0};
  moebal::CombinedAuxLoss<double> loss(8, 2, o);
  RowMatrix<double> fused(40, 8), split(40, 8);
  const double value = loss.forward_backward(x, fused);
  const Eigen::VectorXd fused_sums = loss.statistics().score_sums();
  const double fused_z = loss.terms().z;
  CHECK(loss.terms().sequence == 0.0);
  CHECK(loss.terms().cv2_importance == 0.0);
  CHECK(loss.forward(x) == value);
  // The fused pass sums the scores in its second pass, in the first pass's order: same bits.
  CHECK(loss.statistics().score_sums() == fused_sums);
  CHECK(loss.terms().z == fused_z);
  loss.backward(x, split);
  CHECK(fused == split);
  RowMatrix<double> acc = RowMatrix<double>::Ones(40, 8);
  loss.backward_accumulate(x, acc, -1.0);
  CHECK_THAT(acc, IsCloseTo(RowMatrix<double>(RowMatrix<double>::Ones(40, 8) - fused), 1e-15, 1e-13));
  // With only the Switch weight, the combined objective is the Switch loss.
  CombinedOptions only;
  const auto c = moebal::combined_aux_loss(x, 2, only);
  const auto s = moebal::switch_aux_loss(x, 2);
  CHECK(c.loss == Approx(s.loss).epsilon(1e-14));
  CHECK_THAT(c.grad, IsCloseTo(s.grad, 1e-17, 1e-13));
}

TEST_CASE("combined_aux_loss: bad input", "[loss][combined][errors]") {
  const RowMatrix<double> x = RowMatrix<double>::Zero(8, 4);
  CombinedOptions o;
  o.weights.sequence = 1.0;
  CHECK_THROWS_WITH(moebal::combined_aux_loss(x, 2, o),
                    "moebal::combined_aux_loss: argument 'options.layout': expected a sequence "
                    "layout when the sequence weight is nonzero, got none");
  o.layout = SequenceLayout::batch_major(3);
  CHECK_THROWS_WITH(moebal::combined_aux_loss(x, 2, o),
                    "moebal::combined_aux_loss: argument 'layout': expected a sequence length S "
                    "dividing T = 8 (logits.rows()), got S = 3");
  o.weights.z = std::nan("");
  CHECK_THROWS_WITH(moebal::combined_aux_loss(x, 2, o),
                    "moebal::combined_aux_loss: argument 'options.weights.z': expected a finite "
                    "number, got nan");
}
