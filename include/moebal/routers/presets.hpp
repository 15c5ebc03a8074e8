// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// Router presets: `RouterOptions` that reproduce a framework's router, each named after it and
/// documented with the source it follows. Pass them to `route(logits, k, options)` or
/// `Router<S>(N, k, options)`. Every preset selects with ties to the lower expert (and group)
/// index and returns the k experts by decreasing selection value; frameworks whose torch.topk
/// leaves ties or the output order unspecified agree on the selected set and weights.
/// Precision: moebal computes in the input's type; frameworks that cast to float32 (Mixtral,
/// Megatron-core) or bfloat16 (DeepSeek's official gate) before selecting can differ where
/// those casts create ties.

#include <limits>

#include <Eigen/Core>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"
#include "moebal/losses/switch.hpp"
#include "moebal/routers/router.hpp"

namespace moebal {
namespace presets {

/// Megatron-core `TopKRouter` with score function softmax (megatron/core/transformer/moe/
/// moe_utils.py `topk_routing_with_score_function`). Default "post-softmax": top-k on the
/// logits, weights = softmax over the k selected logits (k >= 2: Megatron-core rejects k = 1,
/// whose weight would be a constant 1 with zero gradient, Megatron-LM issue #894).
/// `pre_softmax` (`--moe-router-pre-softmax`): softmax over all experts, top-k, the k scores
/// unnormalized. `scaling_factor` (`moe_router_topk_scaling_factor`; 1 = none) multiplies the
/// weights. Group-limited routing (`moe_router_num_groups`, `moe_router_group_topk`): group
/// score = sum of the group's top k / g selection values, dropped groups -Inf.
inline RouterOptions megatron_softmax(bool pre_softmax = false, double scaling_factor = 1.0,
                                      Index num_groups = 1, Index group_topk = 1) {
  RouterOptions o;
  o.score = RouterScore::softmax;
  o.weights = pre_softmax ? RouterWeights::scores : RouterWeights::softmax_of_selected;
  o.select_on_logits = !pre_softmax;
  o.scaling_factor = scaling_factor;
  o.num_groups = num_groups;
  o.group_topk = group_topk;
  o.group_score = GroupScore::sum_top_k_over_groups;
  o.group_fill = GroupFill::negative_infinity;
  return o;
}

/// Megatron-core `TopKRouter` with score function sigmoid (DeepSeek-V3 style) or, with
/// `sqrt_softplus`, "sqrtsoftplus": top-k on s + expert_bias, weights = s of the selected,
/// divided by (sum + 1e-20) when k > 1 (not at k = 1), times `scaling_factor`.
/// @param k the router's k (decides the normalization). @param expert_bias length N or empty.
inline RouterOptions megatron_sigmoid(Index k, const Eigen::VectorXd& expert_bias = {},
                                      double scaling_factor = 1.0, Index num_groups = 1,
                                      Index group_topk = 1, bool sqrt_softplus = false) {
  RouterOptions o;
  o.score = sqrt_softplus ? RouterScore::sqrt_softplus : RouterScore::sigmoid;
  o.weights = RouterWeights::scores;
  o.normalize = k > 1;
  o.normalize_epsilon = 1e-20;
  o.scaling_factor = scaling_factor;
  o.num_groups = num_groups;
  o.group_topk = group_topk;
  o.group_score = GroupScore::sum_top_k_over_groups;
  o.group_fill = GroupFill::negative_infinity;
  o.expert_bias = expert_bias;
  return o;
}

/// Hugging Face transformers Mixtral (`MixtralSparseMoeBlock` / `MixtralTopKRouter`): softmax,
/// top-k, the k weights always renormalized to sum 1 (no epsilon).
inline RouterOptions hf_mixtral() {
  RouterOptions o;
  o.score = RouterScore::softmax;
  o.normalize = true;
  o.normalize_epsilon = 0.0;
  return o;
}

/// Hugging Face transformers Qwen2-MoE / Qwen3-MoE and OLMoE (`Qwen3MoeTopKRouter`,
/// `OlmoeSparseMoeBlock`): softmax, top-k, renormalized (no epsilon) iff `norm_topk_prob`
/// (Qwen3-MoE's config default is false; checkpoints set it).
inline RouterOptions hf_qwen_moe(bool norm_topk_prob) {
  RouterOptions o;
  o.score = RouterScore::softmax;
  o.normalize = norm_topk_prob;
  o.normalize_epsilon = 0.0;
  return o;
}

/// Same as `hf_qwen_moe` (OLMoE's router is written the same way).
inline RouterOptions hf_olmoe(bool norm_topk_prob) { return hf_qwen_moe(norm_topk_prob); }

/// Hugging Face transformers DeepSeek-V3 (`DeepseekV3TopkRouter` / `DeepseekV3MoE`): sigmoid;
/// selection on s + e_score_correction_bias; group score = sum of the group's top 2; the best
/// `topk_group` of `n_group` groups kept and the others filled with 0 (not -Inf); weights = s of
/// the selected, divided by (sum + 1e-20) if `norm_topk_prob` (also at k = 1), times
/// `routed_scaling_factor`.
inline RouterOptions hf_deepseek_v3(Index n_group, Index topk_group, bool norm_topk_prob,
                                    double routed_scaling_factor,
                                    const Eigen::VectorXd& e_score_correction_bias = {}) {
  RouterOptions o;
  o.score = RouterScore::sigmoid;
  o.normalize = norm_topk_prob;
  o.normalize_epsilon = 1e-20;
  o.scaling_factor = routed_scaling_factor;
  o.num_groups = n_group;
  o.group_topk = topk_group;
  o.group_score = GroupScore::sum_top2;
  o.group_fill = GroupFill::zero;
  o.expert_bias = e_score_correction_bias;
  return o;
}

/// DeepSeek-V3's official inference gate (deepseek-ai/DeepSeek-V3 inference/model.py `Gate`):
/// softmax or sigmoid scores; selection on s + bias; group score = the group's maximum without a
/// bias, the sum of its top 2 with one; dropped groups -Inf; weights = s of the selected,
/// divided by their sum (no epsilon) for sigmoid only, times `route_scale`.
inline RouterOptions deepseek_v3_official(bool sigmoid, Index n_groups, Index topk_groups,
                                          double route_scale,
                                          const Eigen::VectorXd& bias = {}) {
  RouterOptions o;
  o.score = sigmoid ? RouterScore::sigmoid : RouterScore::softmax;
  o.normalize = sigmoid;
  o.normalize_epsilon = 0.0;
  o.scaling_factor = route_scale;
  o.num_groups = n_groups;
  o.group_topk = topk_groups;
  o.group_score = bias.size() == 0 ? GroupScore::max : GroupScore::sum_top2;
  o.group_fill = GroupFill::negative_infinity;
  o.expert_bias = bias;
  return o;
}

/// DeepSeek-V2 (the Hugging Face remote code `modeling_deepseek.py` `MoEGate`): softmax scores;
/// optional device-limited "group_limited_greedy" routing with group score = the group's maximum
/// and dropped groups filled with 0; weights = the selected scores, divided by (sum + 1e-20)
/// when k > 1 and `norm_topk_prob`, and otherwise (only otherwise) multiplied by
/// `routed_scaling_factor`: DeepSeek-V2 scales only when it does not normalize.
inline RouterOptions deepseek_v2(Index k, bool norm_topk_prob, double routed_scaling_factor,
                                 Index n_group = 1, Index topk_group = 1) {
  RouterOptions o;
  o.score = RouterScore::softmax;
  o.normalize = k > 1 && norm_topk_prob;
  o.normalize_epsilon = 1e-20;
  o.scaling_factor = o.normalize ? 1.0 : routed_scaling_factor;
  o.num_groups = n_group;
  o.group_topk = topk_group;
  o.group_score = GroupScore::max;
  o.group_fill = GroupFill::zero;
  return o;
}

/// DeepSpeed `top1gating` (deepspeed/moe/sharded_moe.py) without capacity, noise or dropping:
/// softmax, the argmax, weight = its probability. Use with k = 1.
inline RouterOptions deepspeed_top1() {
  RouterOptions o;
  o.score = RouterScore::softmax;
  return o;
}

/// DeepSpeed `top2gating` / `topkgating` without capacity, noise or dropping: the top-k of the
/// logits (top-2: the argmax, then the argmax of the logits with it masked), weights = softmax
/// probabilities of the selected divided by max(sum, float32 epsilon).
inline RouterOptions deepspeed_topk() {
  RouterOptions o;
  o.score = RouterScore::softmax;
  o.select_on_logits = true;
  o.normalize = true;
  o.epsilon_mode = NormalizeEpsilon::clamp;
  o.normalize_epsilon = double(std::numeric_limits<float>::epsilon());
  return o;
}

/// Tutel's top-k gate (tutel/impls/fast_dispatch.py `extract_critical`, `normalize_gate` default
/// true): softmax, top-k, and for k > 1 with `normalize_gate` the weights divided by max(sum,
/// float32 epsilon).
inline RouterOptions tutel_topk(Index k, bool normalize_gate = true) {
  RouterOptions o;
  o.score = RouterScore::softmax;
  o.normalize = normalize_gate && k > 1;
  o.epsilon_mode = NormalizeEpsilon::clamp;
  o.normalize_epsilon = double(std::numeric_limits<float>::epsilon());
  return o;
}

/// Hugging Face Switch Transformers `SwitchTransformersTop1Router` (no jitter): softmax, the
/// argmax, weight = its probability (not renormalized). Use with k = 1.
inline RouterOptions hf_switch_top1() {
  RouterOptions o;
  o.score = RouterScore::softmax;
  return o;
}

/// The balance loss that pairs with each framework's router (see <moebal/losses/switch.hpp>):
/// Megatron-core's `switch_load_balancing_loss_func` on the router's score function
/// (`compute_routing_scores_for_aux_loss`: softmax, or the normalized sigmoid for sigmoid routers).
inline SwitchOptions megatron_loss(double moe_aux_loss_coeff, bool sigmoid_router = false) {
  SwitchOptions o;
  o.convention = SwitchConvention::megatron;
  o.score = sigmoid_router ? ScoreFunction::sigmoid : ScoreFunction::softmax;
  o.coefficient = moe_aux_loss_coeff;
  return o;
}

/// Hugging Face transformers `load_balancing_loss_func` (Mixtral, Qwen-MoE, OLMoE) with
/// `router_aux_loss_coef`; pass the `attention_mask` as `SwitchOptions::mask`.
inline SwitchOptions hf_loss(double router_aux_loss_coef) {
  SwitchOptions o;
  o.convention = SwitchConvention::huggingface;
  o.coefficient = router_aux_loss_coef;
  return o;
}

/// DeepSpeed, Tutel, GShard and Switch Transformers: the first-choice loss
/// (l_aux = N^2 mean(me * ce), ce from the top-1 mask).
inline SwitchOptions first_choice_loss(double coefficient) {
  SwitchOptions o;
  o.convention = SwitchConvention::first_choice;
  o.coefficient = coefficient;
  return o;
}

}  // namespace presets
}  // namespace moebal
