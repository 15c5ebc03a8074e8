// SPDX-License-Identifier: Apache-2.0
// Routers and presets against PyTorch autograd: tests/fixtures/routers.txt was written by
// tests/fixtures/generate_routers.py, which implements each framework's router in PyTorch from
// its source's definition (never calling moebal) and records indices, weights and the gradient
// of sum(G * weights) for a random upstream G.

#include <map>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "moebal/routers/presets.hpp"
#include "moebal/routers/router.hpp"
#include "support/fixtures.hpp"
#include "support/matchers.hpp"

using moebal::Index;
using moebal::IndexMatrix;
using moebal::RouterOptions;
using moebal::RowMatrix;
namespace presets = moebal::presets;

namespace {

struct RouterCase {
  std::string name, preset, dtype;
  Index rows = 0, cols = 0, k = 0;
  std::map<std::string, std::string> params;
  Eigen::VectorXd bias;
  RowMatrix<double> logits, upstream, weights, grad;
  IndexMatrix indices;
  bool is_float() const { return dtype == "float"; }
  double number(const std::string& key, double fallback) const {
    const auto it = params.find(key);
    return it == params.end() ? fallback : std::stod(it->second);
  }
  std::string text(const std::string& key, const std::string& fallback) const {
    const auto it = params.find(key);
    return it == params.end() ? fallback : it->second;
  }
};

std::vector<RouterCase> load() {
  moebal_test::detail::TokenReader reader(std::string(MOEBAL_FIXTURE_DIR) + "/routers.txt");
  std::vector<RouterCase> cases;
  std::string token;
  while (reader.next(token)) {
    if (token != "case") throw std::runtime_error("expected case, got " + token);
    RouterCase c;
    c.name = reader.word();
    reader.expect("preset");
    c.preset = reader.word();
    reader.expect("dtype");
    c.dtype = reader.word();
    reader.expect("shape");
    c.rows = reader.integer();
    c.cols = reader.integer();
    reader.expect("k");
    c.k = reader.integer();
    std::string word = reader.word();
    while (word == "param") {
      const std::string key = reader.word();
      c.params[key] = reader.word();
      word = reader.word();
    }
    if (word != "bias") throw std::runtime_error("expected bias, got " + word);
    if (reader.integer() != 0) {
      c.bias.resize(c.cols);
      for (Index j = 0; j < c.cols; ++j) c.bias[j] = reader.number(false);
    }
    const bool f = c.is_float();
    auto matrix = [&](RowMatrix<double>& m, Index cols) {
      m.resize(c.rows, cols);
      for (Index i = 0; i < m.size(); ++i) m.data()[i] = reader.number(f);
    };
    reader.expect("logits");
    matrix(c.logits, c.cols);
    reader.expect("upstream");
    matrix(c.upstream, c.k);
    reader.expect("indices");
    c.indices.resize(c.rows, c.k);
    for (Index i = 0; i < c.indices.size(); ++i) c.indices.data()[i] = reader.integer();
    reader.expect("weights");
    matrix(c.weights, c.k);
    reader.expect("grad");
    matrix(c.grad, c.cols);
    reader.expect("end");
    cases.push_back(std::move(c));
  }
  return cases;
}

RouterOptions options_of(const RouterCase& c) {
  const double scaling = c.number("scaling_factor", 1.0);
  const Index groups = Index(c.number("groups", 1)), kept = Index(c.number("group_topk", 1));
  const std::string& p = c.preset;
  if (p == "megatron_post_softmax") return presets::megatron_softmax(false, scaling, groups, kept);
  if (p == "megatron_pre_softmax") return presets::megatron_softmax(true, scaling, groups, kept);
  if (p == "megatron_sigmoid") return presets::megatron_sigmoid(c.k, c.bias, scaling, groups, kept);
  if (p == "megatron_sqrtsoftplus") {
    return presets::megatron_sigmoid(c.k, c.bias, scaling, groups, kept, true);
  }
  if (p == "hf_mixtral") return presets::hf_mixtral();
  if (p == "hf_qwen_moe" || p == "hf_olmoe") return presets::hf_qwen_moe(c.number("norm_topk_prob", 0) != 0);
  if (p == "hf_deepseek_v3") {
    return presets::hf_deepseek_v3(groups, kept, c.number("norm_topk_prob", 1) != 0, scaling, c.bias);
  }
  if (p == "deepseek_v3_official") {
    return presets::deepseek_v3_official(c.text("score", "softmax") == "sigmoid", groups, kept,
                                         scaling, c.bias);
  }
  if (p == "deepspeed_top1") return presets::deepspeed_top1();
  if (p == "deepspeed_top2" || p == "deepspeed_topk") return presets::deepspeed_topk();
  if (p == "tutel_topk") return presets::tutel_topk(c.k, c.number("normalize_gate", 1) != 0);
  if (p == "hf_switch_top1") return presets::hf_switch_top1();
  if (p != "options") throw std::runtime_error("unknown preset " + p);
  RouterOptions o;
  const std::string score = c.text("score", "softmax");
  o.score = score == "sigmoid"         ? moebal::RouterScore::sigmoid
            : score == "sqrt_softplus" ? moebal::RouterScore::sqrt_softplus
                                       : moebal::RouterScore::softmax;
  o.select_on_logits = c.text("select", "scores") == "logits";
  o.weights = c.text("weights", "scores") == "softmax_of_selected"
                  ? moebal::RouterWeights::softmax_of_selected
                  : moebal::RouterWeights::scores;
  o.normalize = c.number("normalize", 0) != 0;
  o.epsilon_mode = c.text("epsilon_mode", "add") == "clamp" ? moebal::NormalizeEpsilon::clamp
                                                             : moebal::NormalizeEpsilon::add;
  o.normalize_epsilon = c.number("epsilon", 0.0);
  o.scaling_factor = scaling;
  o.num_groups = groups;
  o.group_topk = kept;
  const std::string gs = c.text("group_score", "sum_top_k_over_groups");
  o.group_score = gs == "sum_top2" ? moebal::GroupScore::sum_top2
                  : gs == "max"    ? moebal::GroupScore::max
                                   : moebal::GroupScore::sum_top_k_over_groups;
  o.group_fill = c.text("fill", "neg_inf") == "zero" ? moebal::GroupFill::zero
                                                     : moebal::GroupFill::negative_infinity;
  o.expert_bias = c.bias;
  return o;
}

template <class T>
void check_case(const RouterCase& c) {
  const RouterOptions o = options_of(c);
  const RowMatrix<T> x = c.logits.cast<T>();
  const auto r = moebal::route(x, c.k, o);
  CHECK(r.indices == c.indices);
  const double tol = c.is_float() ? 2e-6 : 1e-13;
  CHECK_THAT(moebal_test::as_double(r.weights),
             moebal_test::IsCloseTo(c.weights, tol * std::max(1.0, c.weights.cwiseAbs().maxCoeff()), tol));
  const RowMatrix<T> upstream = c.upstream.cast<T>();
  const RowMatrix<T> g = moebal::route_backward(x, c.indices, upstream, o);
  const double scale = std::max(c.grad.cwiseAbs().maxCoeff(), 1e-3);
  CHECK_THAT(moebal_test::as_double(g),
             moebal_test::IsCloseTo(c.grad, (c.is_float() ? 2e-5 : 1e-12) * scale,
                                    c.is_float() ? 2e-3 : 1e-9));
}

}  // namespace

TEST_CASE("routers and presets match PyTorch autograd references", "[router][reference]") {
  const auto cases = load();
  REQUIRE(cases.size() >= 40);
  std::map<std::string, int> seen;
  for (const auto& c : cases) {
    INFO("fixture " << c.name);
    ++seen[c.preset];
    if (c.is_float()) check_case<float>(c); else check_case<double>(c);
  }
  for (const char* preset :
       {"megatron_post_softmax", "megatron_pre_softmax", "megatron_sigmoid", "hf_mixtral",
        "hf_qwen_moe", "hf_deepseek_v3", "deepseek_v3_official", "deepspeed_top1",
        "deepspeed_top2", "tutel_topk", "hf_switch_top1", "options"}) {
    INFO("preset " << preset);
    CHECK(seen[preset] >= 1);
  }
}
