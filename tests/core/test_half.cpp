// SPDX-License-Identifier: Apache-2.0
// Half-precision logits (Eigen::bfloat16, Eigen::half): every loss, router and metric reads them
// in place and computes in float, one row converted at a time. The float path on the upcast
// logits runs the very same float operations, so values and float gradients must be bitwise
// equal to it, and a half-precision gradient buffer must hold exactly the float gradient
// rounded once to the half type (accumulation: old + gradient in float, rounded once).
#include <cmath>
#include <limits>
#include <vector>

#include <catch2/catch.hpp>

#include "moebal/moebal.hpp"
#include "moebal/tensor.hpp"
#include "support/random.hpp"

using moebal::Index;
using moebal::RowMatrix;
using moebal_test::random_logits;

namespace {

template <class H>
RowMatrix<H> half_logits(Index rows, Index cols, double scale, unsigned seed) {
  return random_logits(rows, cols, scale, seed).cast<float>().cast<H>();
}

template <class H>
RowMatrix<H> rounded(const RowMatrix<float>& g) {
  return g.cast<H>();
}

// Bitwise equality of half-precision matrices (compares the stored bits through float, which
// is exact for both types).
template <class H>
bool same_bits(const RowMatrix<H>& a, const RowMatrix<H>& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  for (Index i = 0; i < a.size(); ++i) {
    const float x = static_cast<float>(a.data()[i]), y = static_cast<float>(b.data()[i]);
    if (!(x == y) && !(std::isnan(x) && std::isnan(y))) return false;
    if (std::signbit(x) != std::signbit(y)) return false;
  }
  return true;
}

}  // namespace

TEMPLATE_TEST_CASE("half precision: compute_type_t maps half types to float", "[half]",
                   Eigen::bfloat16, Eigen::half) {
  STATIC_REQUIRE(std::is_same<moebal::compute_type_t<TestType>, float>::value);
  STATIC_REQUIRE(std::is_same<moebal::compute_type_t<float>, float>::value);
  STATIC_REQUIRE(std::is_same<moebal::compute_type_t<double>, double>::value);
  STATIC_REQUIRE(moebal::is_logit_scalar_v<TestType>);
  STATIC_REQUIRE(!moebal::is_logit_scalar_v<int>);
}

TEMPLATE_TEST_CASE("half precision: Switch loss equals the float path on the upcast logits",
                   "[half][switch]", Eigen::bfloat16, Eigen::half) {
  using H = TestType;
  const Index T = 37, N = 8, k = 2;
  const RowMatrix<H> x = half_logits<H>(T, N, 2.0, 11);
  const RowMatrix<float> xf = x.template cast<float>();
  Eigen::VectorXi mask = Eigen::VectorXi::Ones(T);
  mask[3] = 0;
  mask[20] = 0;
  for (const auto convention : {moebal::SwitchConvention::megatron,
                                moebal::SwitchConvention::huggingface,
                                moebal::SwitchConvention::first_choice}) {
    for (const auto score : {moebal::ScoreFunction::softmax, moebal::ScoreFunction::sigmoid}) {
      moebal::SwitchOptions o;
      o.convention = convention;
      o.score = score;
      o.coefficient = 0.01;
      o.mask = moebal::TokenMask(mask);
      const auto rh = moebal::switch_aux_loss(x, k, o);
      const auto rf = moebal::switch_aux_loss(xf, k, o);
      STATIC_REQUIRE(std::is_same<decltype(rh.loss), float>::value);
      CHECK(rh.loss == rf.loss);
      CHECK(rh.grad == rf.grad);
      CHECK(rh.stats.tokens_per_expert == rf.stats.tokens_per_expert);
      CHECK(rh.stats.P == rf.stats.P);

      // The object form writes float (fp32 master) or H gradients.
      o.mask = moebal::TokenMask{};
      moebal::SwitchAuxLoss<H> loss(N, k, o);
      RowMatrix<float> gf(T, N);
      RowMatrix<H> gh(T, N);
      CHECK(loss.forward_backward(x, gf, moebal::TokenMask(mask)) == rf.loss);
      CHECK(gf == rf.grad);
      CHECK(loss.forward_backward(x, gh, moebal::TokenMask(mask)) == rf.loss);
      CHECK(same_bits(gh, rounded<H>(rf.grad)));
      CHECK(loss.forward(x, moebal::TokenMask(mask)) == rf.loss);
      loss.backward(x, gh, 0.5f);
      CHECK(same_bits(gh, rounded<H>(RowMatrix<float>(0.5f * rf.grad))));
      // Accumulation: one rounding of (old + gradient) per element.
      RowMatrix<H> acc = half_logits<H>(T, N, 1.0, 12);
      const RowMatrix<float> old = acc.template cast<float>();
      loss.backward_accumulate(x, acc);
      CHECK(same_bits(acc, rounded<H>(RowMatrix<float>(old + rf.grad))));
      RowMatrix<float> accf = old;
      loss.backward_accumulate(x, accf);
      CHECK(accf == RowMatrix<float>(old + rf.grad));
    }
  }
}

TEMPLATE_TEST_CASE("half precision: the other losses equal the float path", "[half][loss]",
                   Eigen::bfloat16, Eigen::half) {
  using H = TestType;
  const Index T = 24, N = 8, k = 2;
  const RowMatrix<H> x = half_logits<H>(T, N, 2.0, 21);
  const RowMatrix<float> xf = x.template cast<float>();

  SECTION("z-loss") {
    const auto a = moebal::z_loss(x);
    const auto b = moebal::z_loss(xf);
    CHECK(a.loss == b.loss);
    CHECK(a.grad == b.grad);
    moebal::ZLoss<H> z(0.1);
    RowMatrix<H> gh(T, N);
    z.forward(x);
    z.backward(x, gh);
    CHECK(same_bits(gh, rounded<H>(RowMatrix<float>(0.1f * b.grad))));
  }
  SECTION("CV2 of importance, dense and top-k gates") {
    for (const auto gates : {moebal::ImportanceGates::dense, moebal::ImportanceGates::topk}) {
      moebal::Cv2Options o;
      o.gates = gates;
      const auto a = moebal::cv2_importance_loss(x, k, o);
      const auto b = moebal::cv2_importance_loss(xf, k, o);
      CHECK(a.loss == b.loss);
      CHECK(a.grad == b.grad);
      moebal::Cv2ImportanceLoss<H> loss(N, k, o);
      RowMatrix<H> gh(T, N);
      loss.forward(x);
      loss.backward(x, gh);
      CHECK(same_bits(gh, rounded<H>(b.grad)));
    }
  }
  SECTION("sequence-level, both layouts") {
    for (const auto& layout : {moebal::SequenceLayout::batch_major(6),
                               moebal::SequenceLayout::sequence_major(6)}) {
      const auto a = moebal::sequence_aux_loss(x, k, layout);
      const auto b = moebal::sequence_aux_loss(xf, k, layout);
      CHECK(a.loss == b.loss);
      CHECK(a.grad == b.grad);
      moebal::SequenceAuxLoss<H> loss(N, k, layout);
      RowMatrix<H> gh(T, N);
      loss.forward(x);
      loss.backward(x, gh);
      CHECK(same_bits(gh, rounded<H>(b.grad)));
    }
  }
  SECTION("DeepSeek device and communication losses") {
    moebal::DeviceBalanceOptions o;
    o.devices = 4;
    o.max_devices = 2;
    const auto a = moebal::device_balance_loss(x, k, o);
    const auto b = moebal::device_balance_loss(xf, k, o);
    CHECK(a.loss == b.loss);
    CHECK(a.grad == b.grad);
    const auto c = moebal::communication_balance_loss(x, k, o);
    const auto d = moebal::communication_balance_loss(xf, k, o);
    CHECK(c.loss == d.loss);
    CHECK(c.grad == d.grad);
  }
  SECTION("combined objective (Switch + z + CV2 + sequence)") {
    moebal::CombinedOptions o;
    o.weights.z = 0.001;
    o.weights.cv2_importance = 0.1;
    o.weights.sequence = 0.5;
    o.layout = moebal::SequenceLayout::batch_major(8);
    for (const auto score : {moebal::ScoreFunction::softmax, moebal::ScoreFunction::sigmoid}) {
      o.score = score;
      const auto a = moebal::combined_aux_loss(x, k, o);
      const auto b = moebal::combined_aux_loss(xf, k, o);
      CHECK(a.loss == b.loss);
      CHECK(a.grad == b.grad);
      moebal::CombinedAuxLoss<H> loss(N, k, o);
      RowMatrix<H> gh(T, N);
      RowMatrix<float> gf(T, N);
      CHECK(loss.forward_backward(x, gh) == b.loss);
      CHECK(same_bits(gh, rounded<H>(b.grad)));
      CHECK(loss.forward_backward(x, gf) == b.loss);
      CHECK(gf == b.grad);
    }
  }
  SECTION("layers, every aggregation") {
    const std::vector<RowMatrix<H>> layers = {x, half_logits<H>(T, N, 2.0, 22)};
    const std::vector<RowMatrix<float>> layers_f = {layers[0].template cast<float>(),
                                                    layers[1].template cast<float>()};
    for (const auto aggregation : {moebal::LayerAggregation::sum, moebal::LayerAggregation::mean,
                                   moebal::LayerAggregation::pooled}) {
      const auto a = moebal::switch_aux_loss_layers(layers, k, {}, aggregation);
      const auto b = moebal::switch_aux_loss_layers(layers_f, k, {}, aggregation);
      CHECK(a.loss == b.loss);
      CHECK(a.grads[0] == b.grads[0]);
      CHECK(a.grads[1] == b.grads[1]);
    }
  }
  SECTION("global batch, exact and running") {
    const RowMatrix<H> x2 = half_logits<H>(T, N, 2.0, 23);
    moebal::GlobalBatchOptions o;
    o.micro_batch_weight = 0.01;
    moebal::GlobalBatchBalance<H> gh(N, k, o);
    moebal::GlobalBatchBalance<float> gf(N, k, o);
    gh.count(x);
    gh.count(x2);
    gh.synchronize();
    gf.count(xf);
    gf.count(RowMatrix<float>(x2.template cast<float>()));
    gf.synchronize();
    RowMatrix<H> dh(T, N);
    RowMatrix<float> dhf(T, N), df(T, N);
    const float vf = gf.forward_backward(xf, df);
    CHECK(gh.forward_backward(x, dh) == vf);
    CHECK(same_bits(dh, rounded<H>(df)));
    CHECK(gh.forward_backward(x, dhf) == vf);
    CHECK(dhf == df);

    moebal::RunningGlobalBalance<H> rh(N, k);
    moebal::RunningGlobalBalance<float> rf(N, k);
    const float wf = rf.forward_backward(xf, df, moebal::NoSync{});
    CHECK(rh.forward_backward(x, dh, moebal::NoSync{}) == wf);
    CHECK(same_bits(dh, rounded<H>(df)));
  }
}

TEMPLATE_TEST_CASE("half precision: routers and metrics equal the float path", "[half][router]",
                   Eigen::bfloat16, Eigen::half) {
  using H = TestType;
  const Index T = 20, N = 8, k = 2;
  const RowMatrix<H> x = half_logits<H>(T, N, 2.0, 31);
  const RowMatrix<float> xf = x.template cast<float>();
  const RowMatrix<float> dw = random_logits(T, k, 1.0, 32).cast<float>();

  SECTION("route and route_backward over several options") {
    std::vector<moebal::RouterOptions> options(4);
    options[1].score = moebal::RouterScore::sigmoid;
    options[1].normalize = true;
    options[1].normalize_epsilon = 1e-20;
    options[1].num_groups = 4;
    options[1].group_topk = 2;
    options[1].expert_bias = Eigen::VectorXd::LinSpaced(N, -0.2, 0.2);
    options[2].weights = moebal::RouterWeights::softmax_of_selected;
    options[3].score = moebal::RouterScore::sqrt_softplus;
    options[3].scaling_factor = 2.5;
    for (const auto& o : options) {
      const auto a = moebal::route(x, k, o);
      const auto b = moebal::route(xf, k, o);
      CHECK(a.indices == b.indices);
      CHECK(a.weights == b.weights);
      const RowMatrix<float> ga = moebal::route_backward(x, a.indices, dw, o);
      const RowMatrix<float> gb = moebal::route_backward(xf, b.indices, dw, o);
      CHECK(ga == gb);
      // Object form: H weights and H gradient buffers.
      moebal::Router<H> router(N, k, o);
      moebal::IndexMatrix idx(T, k);
      RowMatrix<H> wh(T, k);
      router.forward(x, idx, wh);
      CHECK(idx == b.indices);
      CHECK(same_bits(wh, rounded<H>(b.weights)));
      RowMatrix<H> gh(T, N);
      router.backward(x, idx, dw, gh);
      CHECK(same_bits(gh, rounded<H>(gb)));
    }
  }
  SECTION("scores, top-k, expert choice, Sinkhorn, domain counts") {
    CHECK(moebal::softmax(x) == moebal::softmax(xf));
    CHECK(moebal::normalized_sigmoid(x) == moebal::normalized_sigmoid(xf));
    CHECK(moebal::topk_indices(x, 3) == moebal::topk_indices(xf, 3));
    const auto ea = moebal::expert_choice(x, 2.0);
    const auto eb = moebal::expert_choice(xf, 2.0);
    CHECK(ea.tokens == eb.tokens);
    CHECK(ea.weights == eb.weights);
    CHECK(moebal::sinkhorn(x) == moebal::sinkhorn(xf));
    Eigen::Matrix<Index, Eigen::Dynamic, 1> domains(T);
    for (Index t = 0; t < T; ++t) domains[t] = t % 3;
    CHECK(moebal::domain_expert_counts(x, k, domains, 3) ==
          moebal::domain_expert_counts(xf, k, domains, 3));
  }
  SECTION("Eigen::Tensor adapter over half-precision memory") {
    Eigen::TensorMap<const Eigen::Tensor<H, 3, Eigen::RowMajor>> tensor(x.data(), 4, 5, N);
    const auto a = moebal::switch_aux_loss_tensor(tensor, k);
    const auto b = moebal::switch_aux_loss(xf, k);
    CHECK(a.loss == b.loss);
    const Eigen::Map<const RowMatrix<float>> grad(a.grad.data(), T, N);
    CHECK(grad == b.grad);
  }
}

TEST_CASE("half precision: -Inf logits and errors read from half-precision memory",
          "[half][errors]") {
  using H = Eigen::bfloat16;
  RowMatrix<H> x = half_logits<H>(4, 4, 1.0, 41);
  x(1, 2) = H(-std::numeric_limits<float>::infinity());
  const auto r = moebal::switch_aux_loss(x, 2);
  CHECK(r.grad(1, 2) == 0.0f);
  CHECK(std::isfinite(r.loss));
  x(2, 1) = H(std::numeric_limits<float>::quiet_NaN());
  CHECK_THROWS_WITH(moebal::switch_aux_loss(x, 2),
                    Catch::Matchers::Contains("argument 'logits'") &&
                        Catch::Matchers::Contains("at row 2, column 1"));
  moebal::SwitchAuxLoss<H> loss(4, 2);
  RowMatrix<H> small(3, 4);
  x(2, 1) = H(0.5f);
  loss.forward(x);
  CHECK_THROWS_WITH(loss.backward(x, small),
                    Catch::Matchers::Contains("argument 'dloss_dlogits'") &&
                        Catch::Matchers::Contains("shape 3 x 4"));
}
