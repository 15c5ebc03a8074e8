// SPDX-License-Identifier: Apache-2.0
// Capacity, Sinkhorn, expert choice and Shazeer's smooth load against PyTorch autograd:
// tests/fixtures/capacity.txt was written by tests/fixtures/generate_capacity.py from
// Megatron-core (token dropping, Sinkhorn), DeepSpeed (top-1/top-2 capacity), Zhou et al. 2022
// and Shazeer et al. 2017, never calling moebal.

#include <map>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "moebal/routers/capacity.hpp"
#include "moebal/routers/expert_choice.hpp"
#include "moebal/routers/noise.hpp"
#include "moebal/routers/presets.hpp"
#include "moebal/routers/router.hpp"
#include "moebal/routers/sinkhorn.hpp"
#include "support/fixtures.hpp"
#include "support/matchers.hpp"

using moebal::Index;
using moebal::IndexMatrix;
using moebal::RowMatrix;
using moebal_test::IsCloseTo;

namespace {

struct CapacityCase {
  std::string name, kind, dtype;
  Index rows = 0, cols = 0, k = 0;
  std::map<std::string, std::string> params;
  std::map<std::string, RowMatrix<double>> blocks;
  double value = 0.0;
  bool is_float() const { return dtype == "float"; }
  double number(const std::string& key, double fallback) const {
    const auto it = params.find(key);
    return it == params.end() ? fallback : std::stod(it->second);
  }
  const RowMatrix<double>& block(const std::string& key) const {
    const auto it = blocks.find(key);
    if (it == blocks.end()) throw std::runtime_error(name + ": no block " + key);
    return it->second;
  }
};

std::vector<CapacityCase> load() {
  moebal_test::detail::TokenReader reader(std::string(MOEBAL_FIXTURE_DIR) + "/capacity.txt");
  std::vector<CapacityCase> cases;
  std::string token;
  while (reader.next(token)) {
    if (token != "case") throw std::runtime_error("expected case, got " + token);
    CapacityCase c;
    c.name = reader.word();
    reader.expect("kind");
    c.kind = reader.word();
    reader.expect("dtype");
    c.dtype = reader.word();
    reader.expect("shape");
    c.rows = reader.integer();
    c.cols = reader.integer();
    reader.expect("k");
    c.k = reader.integer();
    for (std::string word = reader.word(); word != "end"; word = reader.word()) {
      if (word == "param") {
        const std::string key = reader.word();
        c.params[key] = reader.word();
        continue;
      }
      if (word == "value") {
        c.value = reader.number(c.is_float());
        continue;
      }
      Index rows = c.rows, cols = c.cols;
      if (word == "counts_before" || word == "counts_after") rows = 1;
      if ((word == "upstream" || word == "weights") && c.kind == "sinkhorn") cols = c.k;
      if (word == "indices") cols = c.k;
      RowMatrix<double> m(rows, cols);
      const bool integers = word == "map" || word == "indices" || word.rfind("counts", 0) == 0;
      for (Index i = 0; i < m.size(); ++i) {
        m.data()[i] = integers ? double(reader.integer()) : reader.number(c.is_float());
      }
      c.blocks[word] = m;
    }
    cases.push_back(std::move(c));
  }
  return cases;
}

template <class T>
void check_grad(const CapacityCase& c, const RowMatrix<T>& g, const char* key = "grad") {
  const RowMatrix<double>& expected = c.block(key);
  const double scale = std::max(expected.cwiseAbs().maxCoeff(), 1e-3);
  CHECK_THAT(moebal_test::as_double(g),
             IsCloseTo(expected, (c.is_float() ? 2e-5 : 1e-12) * scale, c.is_float() ? 2e-3 : 1e-9));
}

template <class T>
void check_values(const CapacityCase& c, const RowMatrix<T>& actual, const char* key) {
  const double tol = c.is_float() ? 2e-6 : 1e-13;
  CHECK_THAT(moebal_test::as_double(actual), IsCloseTo(c.block(key), tol, tol));
}

template <class T>
void check_dropping(const CapacityCase& c, const moebal::RouterOptions& router_options,
                    const moebal::CapacityOptions& capacity, bool constant_weight_one) {
  const RowMatrix<T> x = c.block("logits").cast<T>();
  moebal::RouterResult<T> routed;
  if (constant_weight_one) {  // Megatron post-softmax with k = 1: argmax of the logits, weight 1
    routed.indices = moebal::topk_indices(x, 1);
    routed.weights = RowMatrix<T>::Ones(x.rows(), 1);
  } else {
    routed = moebal::route(x, c.k, router_options);
  }
  const auto r = moebal::apply_capacity(routed.indices, routed.weights, c.cols, capacity);
  CHECK(r.dense_map.template cast<double>() == c.block("map"));
  if (c.blocks.count("probs")) check_values(c, r.dense_weights, "probs");
  if (c.blocks.count("weights")) check_values(c, r.dense_weights, "weights");
  if (c.blocks.count("counts_before")) {
    CHECK(r.counts_before.template cast<double>().transpose() == c.block("counts_before"));
    const moebal::CountVector after = r.counts_after + r.padded;
    CHECK(after.template cast<double>().transpose() == c.block("counts_after"));
  }
  // Gradient of sum(Gd * dense weights): slot upstream, through the capacity, then the router.
  const RowMatrix<T> upstream = c.block("upstream").cast<T>();
  RowMatrix<T> slot_upstream(x.rows(), c.k);
  for (Index t = 0; t < x.rows(); ++t)
    for (Index s = 0; s < c.k; ++s) slot_upstream(t, s) = upstream(t, routed.indices(t, s));
  const RowMatrix<T> slot_grad = moebal::capacity_backward(routed.weights, r, slot_upstream, capacity);
  const RowMatrix<T> g = constant_weight_one
                             ? RowMatrix<T>(RowMatrix<T>::Zero(x.rows(), x.cols()))
                             : moebal::route_backward(x, routed.indices, slot_grad, router_options);
  check_grad(c, g);
}

template <class T>
void check_case(const CapacityCase& c) {
  const RowMatrix<T> x = c.block("logits").cast<T>();
  if (c.kind == "megatron_capacity") {
    const bool pre = c.number("pre_softmax", 1) != 0;
    moebal::CapacityOptions o;
    o.formula = moebal::CapacityFormula::megatron;
    o.capacity_factor = c.number("capacity_factor", 1.0);
    o.priority = c.params.at("policy") == "probs" ? moebal::DropPriority::weight : moebal::DropPriority::position;
    o.pad_to_capacity = c.number("pad", 0) != 0;
    check_dropping<T>(c, moebal::presets::megatron_softmax(pre), o, !pre && c.k == 1);
  } else if (c.kind == "deepspeed_top2_capacity") {
    const bool top2 = c.params.at("variant") == "top2";
    moebal::CapacityOptions o;
    o.formula = moebal::CapacityFormula::deepspeed;
    o.capacity_factor = c.number("capacity_factor", 1.0);
    o.min_capacity = Index(c.number("min_capacity", 0));
    o.priority = top2 ? moebal::DropPriority::choice_then_position : moebal::DropPriority::position;
    o.renormalize = top2;
    check_dropping<T>(c, top2 ? moebal::presets::deepspeed_topk() : moebal::presets::deepspeed_top1(), o,
                      false);
  } else if (c.kind == "sinkhorn") {
    const double tol = c.number("tol", 1e-4);
    check_values(c, moebal::sinkhorn(x, tol), "assignment");
    const auto r = moebal::sinkhorn_route(x, c.k, tol);
    CHECK(r.indices.template cast<double>() == c.block("indices"));
    check_values(c, r.weights, "weights");
    check_grad(c, moebal::sinkhorn_route_backward(x, r.indices, RowMatrix<T>(c.block("upstream").cast<T>())));
  } else if (c.kind == "expert_choice") {
    const auto r = moebal::expert_choice(x, c.number("capacity_factor", 1.0));
    check_values(c, r.weights, "weights");
    CHECK((r.weights.array() > T(0)).template cast<double>().matrix() == c.block("map"));
    check_grad(c, moebal::expert_choice_backward(x, r, RowMatrix<T>(c.block("upstream").cast<T>())));
  } else if (c.kind == "shazeer_load") {
    const auto r = moebal::smooth_load_loss(c.block("logits"), c.block("sigma"), c.block("noise"),
                                            c.k, c.number("coefficient", 1.0));
    const double rtol = c.is_float() ? 1e-5 : 1e-12;
    CHECK(std::abs(r.loss - c.value) <= rtol * std::abs(c.value));
    check_grad(c, r.dloss_dclean);
    check_grad(c, r.dloss_dnoise_std, "grad_sigma");
  } else {
    FAIL("unknown kind " << c.kind);
  }
}

}  // namespace

TEST_CASE("capacity, Sinkhorn, expert choice and smooth load match PyTorch references",
          "[capacity][reference]") {
  const auto cases = load();
  REQUIRE(cases.size() >= 50);
  std::map<std::string, int> kinds;
  for (const auto& c : cases) {
    INFO("fixture " << c.name);
    ++kinds[c.kind];
    if (c.is_float()) check_case<float>(c); else check_case<double>(c);
  }
  for (const char* kind : {"megatron_capacity", "deepspeed_top2_capacity", "sinkhorn", "expert_choice", "shazeer_load"}) {
    INFO("kind " << kind);
    CHECK(kinds[kind] >= 5);
  }
}
