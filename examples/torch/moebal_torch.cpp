// SPDX-License-Identifier: Apache-2.0
// moebal_torch: moebal's load-balancing losses and routers as differentiable PyTorch functions
// (a pybind11 extension over <moebal/torch.hpp>). The Python API is fixed by
// notes/torch_python_api.md; in short:
//
//   import torch, moebal_torch
//   loss = moebal_torch.switch_aux_loss(router_logits, k=2, convention="hf", coeff=0.01,
//                                       mask=attention_mask)
//   loss.backward()        # d loss / d logits = grad_output * moebal's analytic gradient
//
// Each loss is a custom autograd node (torch::autograd::Function): its forward runs moebal once,
// which returns the value and the analytic gradient together; the node keeps the gradient
// (float32 for half-precision logits, the logits' dtype otherwise) and its backward multiplies
// it by the incoming gradient and rounds it once to the logits' dtype (when the incoming
// gradient is exactly 1 and no rounding is needed, it returns the kept gradient itself, which
// PyTorch can then take without a copy). No autodiff runs through
// moebal's internals. Bad input raises ValueError with moebal's message (pybind11 maps
// std::invalid_argument, and so moebal::invalid_argument, to ValueError).

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <utility>

#include <torch/extension.h>

#include "moebal/torch.hpp"

namespace py = pybind11;

namespace {

using moebal::Index;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- option strings ---------------------------------------------------------------------------

/// "First-Choice" -> "first_choice": lower case, '-' read as '_'.
std::string normalized(std::string value) {
  for (char& c : value) {
    c = c == '-' ? '_' : static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  return value;
}

/// One accepted spelling of an enumerator.
template <class Enum>
struct Name {
  const char* name;
  Enum value;
};

/// The enumerator a string names (after `normalized`); invalid_argument listing the choices.
template <class Enum>
Enum parse(const char* function, const char* argument, const std::string& value,
           std::initializer_list<Name<Enum>> names) {
  const std::string key = normalized(value);
  for (const auto& n : names) {
    if (key == n.name) return n.value;
  }
  std::string expected = "one of ";
  bool first = true;
  for (const auto& n : names) {
    expected += first ? "" : ", ";
    expected += std::string("\"") + n.name + "\"";
    first = false;
  }
  expected += " ('-' and '_' alike)";
  moebal::detail::throw_invalid(function, argument, expected, "\"" + value + "\"");
}

moebal::SwitchConvention parse_convention(const char* function, const std::string& value) {
  return parse<moebal::SwitchConvention>(
      function, "convention", value,
      {{"megatron", moebal::SwitchConvention::megatron},
       {"huggingface", moebal::SwitchConvention::huggingface},
       {"hf", moebal::SwitchConvention::huggingface},
       {"first_choice", moebal::SwitchConvention::first_choice}});
}

moebal::ScoreFunction parse_score(const char* function, const std::string& value) {
  return parse<moebal::ScoreFunction>(
      function, "score", value,
      {{"softmax", moebal::ScoreFunction::softmax}, {"sigmoid", moebal::ScoreFunction::sigmoid}});
}

/// The gradient dtype the autograd nodes keep: float32 (the compute type) for half-precision
/// logits, so that the product with grad_output is rounded once; the logits' dtype otherwise.
moebal::TorchGradDtype kept_grad_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? moebal::TorchGradDtype::like_logits
                                             : moebal::TorchGradDtype::float32;
}

at::Tensor mask_or_undefined(const c10::optional<at::Tensor>& mask) {
  return mask.has_value() ? *mask : at::Tensor();
}

/// An Eigen vector as a new float64 tensor [N].
at::Tensor to_tensor(const Eigen::VectorXd& v) {
  at::Tensor out = at::empty({v.size()}, at::TensorOptions().dtype(at::kDouble));
  std::copy(v.data(), v.data() + v.size(), out.data_ptr<double>());
  return out;
}

// ---- the differentiable loss node -----------------------------------------------------------

/// Computes a loss's value and d value / d logits (shaped like the logits).
using LossAndGrad = std::function<std::pair<at::Tensor, at::Tensor>(const at::Tensor&)>;

/// value = loss(logits); d value / d logits = moebal's analytic gradient, kept from the forward.
struct AnalyticLoss : torch::autograd::Function<AnalyticLoss> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits,
                            const LossAndGrad& loss) {
    std::pair<at::Tensor, at::Tensor> value_grad = loss(logits);
    ctx->save_for_backward({value_grad.second});
    ctx->saved_data["dtype"] = static_cast<std::int64_t>(logits.scalar_type());
    return value_grad.first;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    at::Tensor grad = ctx->get_saved_variables()[0];
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    if (grad.scalar_type() == dtype && grad_outputs[0].numel() == 1 &&
        grad_outputs[0].item<double>() == 1.0) {
      // The usual case (the loss added to the task loss): grad_output is exactly 1, and the
      // kept gradient is the result as it is. Returned without a copy: once the engine frees
      // this node's saved tensors (backward without retain_graph), nothing else holds it, so
      // PyTorch can take it as logits.grad (or add into it) instead of allocating; with
      // retain_graph, PyTorch copies it as for any shared tensor.
      return {grad, at::Tensor()};
    }
    const at::Tensor upstream = grad_outputs[0].to(grad.scalar_type());
    return {(grad * upstream).to(dtype), at::Tensor()};
  }
};

/// Runs a torch-adapter loss as an autograd node.
template <class Compute>
at::Tensor differentiable(const at::Tensor& logits, Compute&& compute) {
  return AnalyticLoss::apply(logits, LossAndGrad([&](const at::Tensor& x) {
                               auto r = compute(x, kept_grad_dtype(x));
                               return std::make_pair(std::move(r.loss), std::move(r.grad));
                             }));
}

// ---- losses ---------------------------------------------------------------------------------

at::Tensor switch_aux_loss(const at::Tensor& logits, Index k, const std::string& convention,
                           const std::string& score, double coeff,
                           const c10::optional<at::Tensor>& mask) {
  constexpr const char* function = "moebal_torch.switch_aux_loss";
  moebal::SwitchOptions options;
  options.convention = parse_convention(function, convention);
  options.score = parse_score(function, score);
  options.coefficient = coeff;
  const at::Tensor m = mask_or_undefined(mask);
  return differentiable(logits, [&](const at::Tensor& x, moebal::TorchGradDtype grad) {
    return moebal::switch_aux_loss(x, k, options, m, grad);
  });
}

at::Tensor z_loss(const at::Tensor& logits, double coeff, const c10::optional<at::Tensor>& mask) {
  moebal::ZLossOptions options;
  options.coefficient = coeff;
  const at::Tensor m = mask_or_undefined(mask);
  return differentiable(logits, [&](const at::Tensor& x, moebal::TorchGradDtype grad) {
    return moebal::z_loss(x, options, m, grad);
  });
}

at::Tensor seq_aux_loss(const at::Tensor& logits, Index k, Index seq_len, const std::string& layout,
                        const std::string& score, double coeff,
                        const c10::optional<at::Tensor>& mask) {
  constexpr const char* function = "moebal_torch.seq_aux_loss";
  enum class Layout { batch_major, sequence_major };
  const Layout kind = parse<Layout>(function, "layout", layout,
                                    {{"batch_major", Layout::batch_major},
                                     {"seq_major", Layout::sequence_major},
                                     {"sequence_major", Layout::sequence_major}});
  if (logits.defined() && logits.dim() == 3) {
    // [B, S, N]: the sequences are the tensor's rows of S tokens (memory order, batch-major).
    if (seq_len != logits.size(1)) {
      moebal::detail::throw_invalid(
          function, "seq_len",
          moebal::detail::concat("S = logits.size(1) = ", logits.size(1),
                                 " for 3-D logits [B, S, N] (or pass 2-D [T, N] logits)"),
          moebal::detail::concat("seq_len = ", seq_len));
    }
    if (kind != Layout::batch_major) {
      moebal::detail::throw_invalid(
          function, "layout",
          "\"batch-major\" for 3-D logits [B, S, N] (the tensor's memory order; pass 2-D "
          "[T, N] logits for \"seq-major\")",
          "\"" + layout + "\"");
    }
  }
  const moebal::SequenceLayout sequences = kind == Layout::batch_major
                                               ? moebal::SequenceLayout::batch_major(seq_len)
                                               : moebal::SequenceLayout::sequence_major(seq_len);
  moebal::SequenceOptions options;
  options.score = parse_score(function, score);
  options.coefficient = coeff;
  const at::Tensor m = mask_or_undefined(mask);
  return differentiable(logits, [&](const at::Tensor& x, moebal::TorchGradDtype grad) {
    return moebal::sequence_aux_loss(x, k, sequences, options, m, grad);
  });
}

at::Tensor cv2_importance_loss(const at::Tensor& logits, Index k, double coeff,
                               const std::string& gates, const std::string& variance,
                               const c10::optional<at::Tensor>& mask) {
  constexpr const char* function = "moebal_torch.cv2_importance_loss";
  moebal::Cv2Options options;
  options.coefficient = coeff;
  options.gates = parse<moebal::ImportanceGates>(function, "gates", gates,
                                                 {{"dense", moebal::ImportanceGates::dense},
                                                  {"topk", moebal::ImportanceGates::topk},
                                                  {"top_k", moebal::ImportanceGates::topk}});
  options.variance = parse<moebal::Cv2Variance>(function, "variance", variance,
                                                {{"population", moebal::Cv2Variance::population},
                                                 {"unbiased", moebal::Cv2Variance::unbiased}});
  const at::Tensor m = mask_or_undefined(mask);
  return differentiable(logits, [&](const at::Tensor& x, moebal::TorchGradDtype grad) {
    return moebal::cv2_importance_loss(x, k, options, m, grad);
  });
}

// ---- router ---------------------------------------------------------------------------------

/// RouterOptions <-> the autograd context's saved IValues (the backward needs the options).
void save_router_options(AutogradContext* ctx, const moebal::RouterOptions& o) {
  ctx->saved_data["score"] = static_cast<std::int64_t>(o.score);
  ctx->saved_data["weights"] = static_cast<std::int64_t>(o.weights);
  ctx->saved_data["select_on_logits"] = o.select_on_logits;
  ctx->saved_data["normalize"] = o.normalize;
  ctx->saved_data["normalize_epsilon"] = o.normalize_epsilon;
  ctx->saved_data["epsilon_mode"] = static_cast<std::int64_t>(o.epsilon_mode);
  ctx->saved_data["scaling_factor"] = o.scaling_factor;
  ctx->saved_data["num_groups"] = static_cast<std::int64_t>(o.num_groups);
  ctx->saved_data["group_topk"] = static_cast<std::int64_t>(o.group_topk);
  ctx->saved_data["group_score"] = static_cast<std::int64_t>(o.group_score);
  ctx->saved_data["group_fill"] = static_cast<std::int64_t>(o.group_fill);
  ctx->saved_data["expert_bias"] = to_tensor(o.expert_bias);
}

moebal::RouterOptions load_router_options(AutogradContext* ctx) {
  auto& d = ctx->saved_data;
  moebal::RouterOptions o;
  o.score = static_cast<moebal::RouterScore>(d["score"].toInt());
  o.weights = static_cast<moebal::RouterWeights>(d["weights"].toInt());
  o.select_on_logits = d["select_on_logits"].toBool();
  o.normalize = d["normalize"].toBool();
  o.normalize_epsilon = d["normalize_epsilon"].toDouble();
  o.epsilon_mode = static_cast<moebal::NormalizeEpsilon>(d["epsilon_mode"].toInt());
  o.scaling_factor = d["scaling_factor"].toDouble();
  o.num_groups = d["num_groups"].toInt();
  o.group_topk = d["group_topk"].toInt();
  o.group_score = static_cast<moebal::GroupScore>(d["group_score"].toInt());
  o.group_fill = static_cast<moebal::GroupFill>(d["group_fill"].toInt());
  const at::Tensor bias = d["expert_bias"].toTensor();
  o.expert_bias = Eigen::Map<const Eigen::VectorXd>(bias.data_ptr<double>(), bias.numel());
  return o;
}

/// (indices, weights) = route(logits); d weights / d logits through moebal's route_backward.
struct RouteFunction : torch::autograd::Function<RouteFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, Index k,
                               const moebal::RouterOptions& options) {
    moebal::TorchRouteResult r = moebal::route(logits, k, options);
    ctx->mark_non_differentiable({r.indices});
    ctx->save_for_backward({logits, r.indices});
    save_router_options(ctx, options);
    return {r.indices, r.weights};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor dweights = grad_outputs[1];
    at::Tensor grad =
        moebal::route_backward(saved[0], saved[1], dweights, load_router_options(ctx));
    return {grad, at::Tensor(), at::Tensor()};
  }
};

std::pair<at::Tensor, at::Tensor> route(const at::Tensor& logits, Index k, const std::string& score,
                                        const std::string& weights, bool select_on_logits,
                                        bool normalize, double normalize_epsilon,
                                        const std::string& epsilon_mode, double scaling_factor,
                                        Index num_groups, Index group_topk,
                                        const std::string& group_score,
                                        const std::string& group_fill,
                                        const c10::optional<at::Tensor>& expert_bias) {
  constexpr const char* function = "moebal_torch.route";
  moebal::RouterOptions o;
  o.score = parse<moebal::RouterScore>(function, "score", score,
                                       {{"softmax", moebal::RouterScore::softmax},
                                        {"sigmoid", moebal::RouterScore::sigmoid},
                                        {"sqrt_softplus", moebal::RouterScore::sqrt_softplus},
                                        {"sqrtsoftplus", moebal::RouterScore::sqrt_softplus}});
  o.weights = parse<moebal::RouterWeights>(
      function, "weights", weights,
      {{"scores", moebal::RouterWeights::scores},
       {"softmax_of_selected", moebal::RouterWeights::softmax_of_selected}});
  o.select_on_logits = select_on_logits;
  o.normalize = normalize;
  o.normalize_epsilon = normalize_epsilon;
  o.epsilon_mode = parse<moebal::NormalizeEpsilon>(
      function, "epsilon_mode", epsilon_mode,
      {{"add", moebal::NormalizeEpsilon::add}, {"clamp", moebal::NormalizeEpsilon::clamp}});
  o.scaling_factor = scaling_factor;
  o.num_groups = num_groups;
  o.group_topk = group_topk;
  o.group_score = parse<moebal::GroupScore>(
      function, "group_score", group_score,
      {{"sum_top_k_over_groups", moebal::GroupScore::sum_top_k_over_groups},
       {"sum_top2", moebal::GroupScore::sum_top2},
       {"max", moebal::GroupScore::max}});
  o.group_fill =
      parse<moebal::GroupFill>(function, "group_fill", group_fill,
                               {{"negative_infinity", moebal::GroupFill::negative_infinity},
                                {"zero", moebal::GroupFill::zero}});
  if (expert_bias.has_value() && expert_bias->defined()) {
    const at::Tensor& b = *expert_bias;
    moebal::detail::check_torch_cpu(function, "expert_bias", b);
    if (b.dim() != 1 ||
        !(at::isFloatingType(b.scalar_type()) || at::isIntegralType(b.scalar_type(), false))) {
      moebal::detail::throw_invalid(
          function, "expert_bias", "a real 1-D tensor of length N (one bias per expert)",
          moebal::detail::concat(moebal::detail::torch_tensor_string(b), " of dtype ",
                                 moebal::detail::torch_dtype_name(b.scalar_type())));
    }
    const at::Tensor bd = b.to(at::kDouble).contiguous();
    o.expert_bias = Eigen::Map<const Eigen::VectorXd>(bd.data_ptr<double>(), bd.numel());
  }
  variable_list out = RouteFunction::apply(logits, k, o);
  return {out[0], out[1]};
}

// ---- global-batch balance -------------------------------------------------------------------

/// GlobalBatchBalance for Python: moebal::TorchGlobalBatchBalance with
/// torch.distributed.all_reduce as its synchronization and a differentiable `loss`.
class GlobalBatchBalance {
 public:
  GlobalBatchBalance(Index num_experts, Index k, const std::string& convention,
                     const std::string& score, double coeff, const std::string& weighting,
                     double micro_batch_weight)
      : balance_(num_experts, k, options(convention, score, coeff, weighting, micro_batch_weight)) {
  }

  void count(const at::Tensor& logits, const c10::optional<at::Tensor>& mask) {
    balance_.count(logits, mask_or_undefined(mask));
  }

  /// Sums the counts over the ranks of `group` (torch.distributed.all_reduce, SUM, float64) when
  /// torch.distributed is available and initialized; else keeps the local counts.
  void synchronize(const py::object& group) {
    const py::module_ dist = py::module_::import("torch.distributed");
    const bool distributed =
        dist.attr("is_available")().cast<bool>() && dist.attr("is_initialized")().cast<bool>();
    if (!distributed) {
      balance_.synchronize();
      return;
    }
    const py::object sum = dist.attr("ReduceOp").attr("SUM");
    const std::string backend = py::str(dist.attr("get_backend")(group));
    balance_.synchronize([&](double* data, Index size) {
      // The double buffer as a CPU tensor (no copy); all_reduce sums it in place.
      const at::Tensor buffer = at::from_blob(data, {size}, at::TensorOptions().dtype(at::kDouble));
      const py::object tensor = py::cast(buffer);
      if (backend == "nccl") {
        // NCCL reduces CUDA tensors only: a round trip through the current device.
        const py::object device =
            py::module_::import("torch").attr("cuda").attr("current_device")();
        const py::object on_device = tensor.attr("to")(device);
        dist.attr("all_reduce")(on_device, py::arg("op") = sum, py::arg("group") = group);
        tensor.attr("copy_")(on_device);
      } else {
        dist.attr("all_reduce")(tensor, py::arg("op") = sum, py::arg("group") = group);
      }
    });
  }

  at::Tensor loss(const at::Tensor& logits, const c10::optional<at::Tensor>& mask) {
    const at::Tensor m = mask_or_undefined(mask);
    return differentiable(logits, [&](const at::Tensor& x, moebal::TorchGradDtype grad) {
      return balance_.forward_backward(x, m, grad);
    });
  }

  void reset() { balance_.reset(); }
  bool synchronized() const { return balance_.synchronized(); }
  at::Tensor global_counts() const { return to_tensor(balance_.global_counts()); }
  at::Tensor global_f() const { return to_tensor(balance_.global_f()); }
  at::Tensor local_counts() const { return to_tensor(balance_.local_counts()); }
  double global_tokens() const { return balance_.global_tokens(); }
  double global_micro_batches() const { return balance_.global_micro_batches(); }
  Index num_experts() const { return balance_.num_experts(); }
  Index k() const { return balance_.k(); }

 private:
  static moebal::GlobalBatchOptions options(const std::string& convention, const std::string& score,
                                            double coeff, const std::string& weighting,
                                            double micro_batch_weight) {
    constexpr const char* function = "moebal_torch.GlobalBatchBalance";
    moebal::GlobalBatchOptions o;
    o.convention = parse_convention(function, convention);
    o.score = parse_score(function, score);
    o.coefficient = coeff;
    o.weighting = parse<moebal::GlobalWeighting>(
        function, "weighting", weighting,
        {{"tokens", moebal::GlobalWeighting::tokens},
         {"micro_batch_mean", moebal::GlobalWeighting::micro_batch_mean}});
    o.micro_batch_weight = micro_batch_weight;
    return o;
  }

  moebal::TorchGlobalBatchBalance balance_;
};

}  // namespace

PYBIND11_MODULE(moebal_torch, m) {
  // The tensor type casters need torch's Python module.
  py::module_::import("torch");
  m.doc() =
      "moebal's Mixture-of-Experts load-balancing losses and routers as differentiable PyTorch "
      "functions (CPU). Every backward is moebal's analytic gradient. Logits: float32, float64, "
      "bfloat16 or float16, [T, N] or [B, S, N] (token b*S+s); half precision is computed in "
      "float32. Masks: None or T elements ([T] or [B, S]), any dtype, nonzero = real token. "
      "Option strings accept '-' and '_' alike. Bad input raises ValueError.";

  m.def("switch_aux_loss", &switch_aux_loss, py::arg("logits"), py::arg("k"),
        py::arg("convention") = "megatron", py::arg("score") = "softmax", py::arg("coeff") = 1.0,
        py::arg("mask") = py::none(),
        "Switch Transformer load-balancing loss coeff * N * sum_i f_i P_i (a 0-d tensor: "
        "float64 for float64 logits, float32 otherwise).\n"
        "convention: 'megatron' f = c/(T k); 'huggingface'/'hf' f = c/T; 'first-choice' f = "
        "first-choice count/T. score: 'softmax' or 'sigmoid' (s / (sum s + 1e-20)).\n"
        "See include/moebal/losses/switch.hpp.");
  m.def("z_loss", &z_loss, py::arg("logits"), py::arg("coeff") = 1.0, py::arg("mask") = py::none(),
        "Router z-loss coeff * mean over real tokens of logsumexp(x_t)^2 (ST-MoE). "
        "See include/moebal/losses/z.hpp.");
  m.def("seq_aux_loss", &seq_aux_loss, py::arg("logits"), py::arg("k"), py::arg("seq_len"),
        py::arg("layout") = "batch-major", py::arg("score") = "softmax", py::arg("coeff") = 1.0,
        py::arg("mask") = py::none(),
        "Sequence-level balance loss: the mean over sequences of the Switch loss (megatron f) "
        "within each sequence (DeepSeek-V2/V3). layout: 'batch-major' (token b*S+s) or "
        "'seq-major' (token s*B+b, Megatron). 3-D logits need seq_len == S and batch-major. "
        "See include/moebal/losses/sequence.hpp.");
  m.def("cv2_importance_loss", &cv2_importance_loss, py::arg("logits"), py::arg("k"),
        py::arg("coeff") = 1.0, py::arg("gates") = "dense", py::arg("variance") = "population",
        py::arg("mask") = py::none(),
        "Importance CV^2: coeff * Var(I) / Mean(I)^2, I_i = sum_t g_ti (Shazeer et al. 2017), "
        "with moebal's default Cv2Options: gates 'dense' (g = softmax; 'topk': the top-k "
        "renormalized gates) and the 'population' variance ('unbiased': Tutel). "
        "See include/moebal/losses/cv2.hpp.");
  m.def("route", &route, py::arg("logits"), py::arg("k"), py::arg("score") = "softmax",
        py::arg("weights") = "scores", py::arg("select_on_logits") = false,
        py::arg("normalize") = false, py::arg("normalize_epsilon") = 0.0,
        py::arg("epsilon_mode") = "add", py::arg("scaling_factor") = 1.0, py::arg("num_groups") = 1,
        py::arg("group_topk") = 1, py::arg("group_score") = "sum_top_k_over_groups",
        py::arg("group_fill") = "negative_infinity", py::arg("expert_bias") = py::none(),
        "Top-k router: (indices int64 [T, k], weights [T, k]) ([B, S, k] for 3-D logits); "
        "weights are float64 for float64 logits, float32 otherwise, differentiable through "
        "moebal's route_backward. Options are RouterOptions' fields "
        "(include/moebal/routers/router.hpp).");

  py::class_<GlobalBatchBalance>(
      m, "GlobalBatchBalance",
      "Exact global-batch balance (Qiu et al. 2025): count() every micro-batch, synchronize() "
      "(torch.distributed.all_reduce when initialized), then loss() per micro-batch, reset() per "
      "optimizer step. See include/moebal/losses/global_batch.hpp.")
      .def(py::init<Index, Index, const std::string&, const std::string&, double,
                    const std::string&, double>(),
           py::arg("num_experts"), py::arg("k"), py::arg("convention") = "megatron",
           py::arg("score") = "softmax", py::arg("coeff") = 1.0, py::arg("weighting") = "tokens",
           py::arg("micro_batch_weight") = 0.0)
      .def("count", &GlobalBatchBalance::count, py::arg("logits"), py::arg("mask") = py::none(),
           "Phase 1: adds one micro-batch's top-k counts and real tokens (no gradient).")
      .def("synchronize", &GlobalBatchBalance::synchronize, py::arg("group") = py::none(),
           "Sums the counts over ranks with torch.distributed.all_reduce (SUM, float64) when "
           "torch.distributed is initialized; else keeps them local.")
      .def("loss", &GlobalBatchBalance::loss, py::arg("logits"), py::arg("mask") = py::none(),
           "Phase 2: this micro-batch's share of the global loss, a differentiable 0-d tensor.")
      .def("reset", &GlobalBatchBalance::reset, "Starts the next optimizer step.")
      .def_property_readonly("global_counts", &GlobalBatchBalance::global_counts,
                             "Global top-k counts, float64 [N] (after synchronize).")
      .def_property_readonly("global_tokens", &GlobalBatchBalance::global_tokens,
                             "Global real-token count (after synchronize).")
      .def_property_readonly("global_f", &GlobalBatchBalance::global_f,
                             "Global f in the convention, float64 [N] (after synchronize).")
      .def_property_readonly("global_micro_batches", &GlobalBatchBalance::global_micro_batches,
                             "Global number of micro-batches (after synchronize).")
      .def_property_readonly("local_counts", &GlobalBatchBalance::local_counts,
                             "This rank's top-k counts so far in the step, float64 [N].")
      .def_property_readonly("synchronized", &GlobalBatchBalance::synchronized)
      .def_property_readonly("num_experts", &GlobalBatchBalance::num_experts)
      .def_property_readonly("k", &GlobalBatchBalance::k);
}
