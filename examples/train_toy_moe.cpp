// SPDX-License-Identifier: Apache-2.0
// train_toy_moe: what load balancing does to a small Mixture-of-Experts model, trained end to
// end in C++ with Eigen and hand-written backward passes.
//
// The model. A linear router (logits = W_r x + b_r, N experts) and N linear experts
// (out_e = A_e x + b_e, C class scores each). moebal's `Router` picks each token's top-k experts
// and their combine weights (the softmax scores of the selected experts, not renormalized: the
// default `RouterOptions`, as Qwen-MoE with norm_topk_prob = false), the model's class scores are
// y = sum_slots w_slot out_{e_slot}, and the task loss is the softmax cross-entropy of y. Adam
// trains every parameter. The backward is written by hand:
//   d CE / d y      = softmax(y) - onehot(label)                       (per token, / tokens)
//   d CE / d w_slot = (d CE / d y) . out_e;   d CE / d A_e += w (d CE / d y) x^T
//   d CE / d logits = moebal `Router::backward` of d CE / d w      (+ the balance loss's own
//                     d L_bal / d logits from moebal)
//   d / d W_r       = (d / d logits)^T X;     d / d b_r = column sums.
//
// The data. D = 4 domains. A token of domain d is x = m + o_d + z, z ~ N(0, I_16), with a mean m
// every domain shares (|m| = 12: it makes every domain start on the same experts) and a domain
// offset o_d (|o_d| = 4); its label is argmax_c (V_d z)_c with a random teacher V_d (C = 4
// classes) of its own domain. One linear
// expert fits one domain exactly but no linear map fits two domains at once, so a model whose
// experts specialize by domain wins. Every micro-batch holds tokens of one domain only, as in a
// pretraining corpus where a micro-batch often holds one kind of text (Qiu et al. 2025); an
// optimizer step has M = 8 micro-batches, two of each domain, in a random order.
//
// The balancing methods (moebal's pieces):
//   none          no balancing;
//   micro         Switch loss a N sum_i f_i P_i on each micro-batch (`SwitchAuxLoss`), averaged
//                 over the step's micro-batches (Switch Transformer; Megatron-core `aux_loss`);
//   global        the same loss with f from the whole step (`GlobalBatchBalance`: count every
//                 micro-batch, synchronize with a single-process identity all-reduce, then
//                 forward_backward each micro-batch; Qiu et al. 2025);
//   global+micro  global plus 0.01 x the micro-batch loss at the same a (the paper's recipe);
//   bias          no balance loss: DeepSeek-V3's auxiliary-loss-free expert bias on the
//                 selection scores (`ExpertBiasBalancer`, b_i += rate sign(mean c - c_i)).
//
// Output: a CSV per run (one row per step: task loss, accuracy, std of tokens per expert,
// MaxVio, normalized mutual information between domain and expert, domain x expert selection
// frequencies), and with --all the three SVG figures and a summary table. Run with --help.
// The domain x expert tables are built from the router's own selections (with the expert bias,
// when there is one), not with `domain_expert_counts`, which selects on the unbiased scores.
// Reproducible: the same seed gives the same CSV bytes with the same standard library (the
// std::normal_distribution algorithm is the library's).

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <moebal/moebal.hpp>

#include "toy_svg.hpp"

namespace {

using moebal::Index;
using moebal::RowMatrix;
using Vector = Eigen::VectorXd;

constexpr Index kDim = 16, kClasses = 4, kDomains = 4, kTopK = 2;
constexpr double kDomainSeparation = 4.0;  // |mu_d - m|: how far apart the domains' inputs are
constexpr double kCommonMean = 12.0;       // |m|: the input mean every domain shares
constexpr double kGlobalMicroWeight = 0.01;  // global + 0.01 x micro (Qiu et al. 2025)

enum class Method { none, micro, global, global_micro, bias };

const char* method_name(Method m) {
  switch (m) {
    case Method::none: return "none";
    case Method::micro: return "micro";
    case Method::global: return "global";
    case Method::global_micro: return "global+micro";
    case Method::bias: return "bias";
  }
  return "?";
}

bool uses_alpha(Method m) {
  return m == Method::micro || m == Method::global || m == Method::global_micro;
}

struct Config {
  Method method = Method::none;
  double alpha = 1e-2;         // balance coefficient a
  int steps = 1000;            // optimizer steps
  unsigned seed = 1;           // task, initialization and data order
  Index experts = 8;           // N
  int micro_batches = 8;       // per optimizer step (a multiple of the 4 domains)
  Index tokens = 64;           // per micro-batch
  double learning_rate = 1e-2; // Adam
  double bias_rate = 1e-3;     // expert-bias update rate (Megatron-core's default)
  int progress_every = 100;    // steps between progress lines (0: none)
};

// ---- the synthetic task ---------------------------------------------------------------------

struct Task {
  std::vector<Vector> means;             // mu_d = m + (domain offset)
  std::vector<RowMatrix<double>> teachers;  // V_d, C x d

  explicit Task(unsigned seed) {
    std::mt19937_64 engine(seed * 7919ull + 11ull);
    std::normal_distribution<double> normal(0.0, 1.0);
    for (Index d = 0; d < kDomains; ++d) {
      Vector mu(kDim);
      for (Index i = 0; i < kDim; ++i) mu[i] = normal(engine);
      means.push_back(kDomainSeparation * mu / mu.norm());
      RowMatrix<double> v(kClasses, kDim);
      for (Index i = 0; i < v.size(); ++i) v.data()[i] = normal(engine);
      teachers.push_back(v);
    }
    // The component every domain shares (hidden states of language models share a large mean
    // direction too): it dominates the router's logits at initialization, so every domain starts
    // on the same experts.
    Vector common(kDim);
    for (Index i = 0; i < kDim; ++i) common[i] = normal(engine);
    for (auto& mu : means) mu += kCommonMean * common / common.norm();
  }

  // T tokens of one domain: inputs (T x d) and labels.
  void sample(Index domain, Index count, std::mt19937_64& engine, RowMatrix<double>& x,
              std::vector<Index>& labels) const {
    std::normal_distribution<double> normal(0.0, 1.0);
    x.resize(count, kDim);
    labels.resize(std::size_t(count));
    Vector z(kDim);
    for (Index t = 0; t < count; ++t) {
      for (Index i = 0; i < kDim; ++i) z[i] = normal(engine);
      x.row(t) = (means[std::size_t(domain)] + z).transpose();
      Index label = 0;
      (teachers[std::size_t(domain)] * z).maxCoeff(&label);
      labels[std::size_t(t)] = label;
    }
  }
};

// ---- the model: every parameter in one flat vector (for Adam) ---------------------------------

struct Layout {
  Index n;
  Index router_w() const { return 0; }
  Index router_b() const { return n * kDim; }
  Index expert_a(Index e) const { return n * kDim + n + e * kClasses * kDim; }
  Index expert_b(Index e) const { return n * kDim + n + n * kClasses * kDim + e * kClasses; }
  Index size() const { return n * kDim + n + n * kClasses * (kDim + 1); }
};

using ConstMap = Eigen::Map<const RowMatrix<double>>;
using MutMap = Eigen::Map<RowMatrix<double>>;

struct Adam {
  Vector m, v;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  int t = 0;
  explicit Adam(Index size) : m(Vector::Zero(size)), v(Vector::Zero(size)) {}
  void step(Vector& theta, const Vector& grad, double lr) {
    ++t;
    m = beta1 * m + (1 - beta1) * grad;
    v = beta2 * v + (1 - beta2) * grad.cwiseProduct(grad);
    const double c1 = 1 - std::pow(beta1, t), c2 = 1 - std::pow(beta2, t);
    theta.array() -= lr * (m.array() / c1) / ((v.array() / c2).sqrt() + eps);
  }
};

// What one pass over a batch of one domain measured.
struct BatchResult {
  double loss_sum = 0.0;  // sum over tokens of the cross-entropy
  Index correct = 0;
  Vector counts;          // tokens per expert (top-k selections)
};

class Model {
 public:
  Model(const Config& config, unsigned seed)
      : layout_{config.experts}, theta_(Vector::Zero(layout_.size())),
        router_(config.experts, kTopK) {
    std::mt19937_64 engine(seed * 104729ull + 3ull);
    std::normal_distribution<double> normal(0.0, 1.0);
    const Index n = layout_.n;
    // Small router weights (near-uniform routing at the start), experts ~ N(0, 1/d).
    for (Index i = 0; i < n * kDim; ++i) theta_[layout_.router_w() + i] = 0.01 * normal(engine);
    for (Index e = 0; e < n; ++e) {
      for (Index i = 0; i < kClasses * kDim; ++i) {
        theta_[layout_.expert_a(e) + i] = normal(engine) / std::sqrt(double(kDim));
      }
    }
  }

  Index experts() const { return layout_.n; }
  Index size() const { return layout_.size(); }
  Vector& parameters() { return theta_; }
  moebal::Router<double>& router() { return router_; }

  // Router logits of a batch, T x N.
  RowMatrix<double> logits(const RowMatrix<double>& x) const {
    const ConstMap w(theta_.data() + layout_.router_w(), layout_.n, kDim);
    const Eigen::Map<const Eigen::RowVectorXd> b(theta_.data() + layout_.router_b(), layout_.n);
    RowMatrix<double> out = x * w.transpose();
    out.rowwise() += b;
    return out;
  }

  // Forward (and, if grad != nullptr, backward) of the task loss on one batch whose router
  // logits are `logits`. `scale` multiplies every gradient (1 / tokens of the step).
  // `dloss_dlogits` holds the balance loss's gradient on entry (or zeros); the task's router
  // gradient is added to it, and the router parameters' gradient is accumulated into *grad.
  BatchResult task(const RowMatrix<double>& x, const std::vector<Index>& labels,
                   const RowMatrix<double>& logits, moebal::IndexMatrix& indices,
                   RowMatrix<double>& dloss_dlogits, Vector* grad, double scale) {
    const Index rows = x.rows(), n = layout_.n;
    RowMatrix<double> weights(rows, kTopK);
    indices.resize(rows, kTopK);
    router_.forward(logits, indices, weights);
    BatchResult result;
    result.counts = Vector::Zero(n);
    RowMatrix<double> dloss_dweights(rows, kTopK);
    Eigen::Matrix<double, kClasses, kTopK> outs;
    for (Index t = 0; t < rows; ++t) {
      Eigen::Matrix<double, kClasses, 1> y = Eigen::Matrix<double, kClasses, 1>::Zero();
      for (Index s = 0; s < kTopK; ++s) {
        const Index e = indices(t, s);
        result.counts[e] += 1.0;
        const ConstMap a(theta_.data() + layout_.expert_a(e), kClasses, kDim);
        const Eigen::Map<const Vector> b(theta_.data() + layout_.expert_b(e), kClasses);
        outs.col(s) = a * x.row(t).transpose() + b;
        y += weights(t, s) * outs.col(s);
      }
      const double max = y.maxCoeff();
      const Eigen::Matrix<double, kClasses, 1> p_unnormalized = (y.array() - max).exp().matrix();
      const double sum = p_unnormalized.sum();
      const Index label = labels[std::size_t(t)];
      result.loss_sum += -(y[label] - max - std::log(sum));
      Index predicted = 0;
      y.maxCoeff(&predicted);
      result.correct += predicted == label ? 1 : 0;
      if (grad == nullptr) continue;
      Eigen::Matrix<double, kClasses, 1> dy = p_unnormalized / sum;  // d CE / d y
      dy[label] -= 1.0;
      dy *= scale;
      for (Index s = 0; s < kTopK; ++s) {
        const Index e = indices(t, s);
        dloss_dweights(t, s) = dy.dot(outs.col(s));
        MutMap da(grad->data() + layout_.expert_a(e), kClasses, kDim);
        da.noalias() += (weights(t, s) * dy) * x.row(t);
        grad->segment(layout_.expert_b(e), kClasses) += weights(t, s) * dy;
      }
    }
    if (grad != nullptr) {
      router_.backward_accumulate(logits, indices, dloss_dweights, dloss_dlogits);
      MutMap dw(grad->data() + layout_.router_w(), n, kDim);
      dw.noalias() += dloss_dlogits.transpose() * x;
      grad->segment(layout_.router_b(), n) += dloss_dlogits.colwise().sum().transpose();
    }
    return result;
  }

 private:
  Layout layout_;
  Vector theta_;
  moebal::Router<double> router_;
};

// ---- one training run -------------------------------------------------------------------------

// Per-step record (one CSV row).
struct StepRecord {
  int step = 0;
  double task_loss = 0, accuracy = 0, balance_loss = 0;
  double tokens_std_micro = 0;  // population std of tokens per expert within a micro-batch (mean)
  double tokens_std_global = 0; // the same over the whole step (global batch)
  double max_vio_micro = 0;     // MaxVio within a micro-batch (mean over the step's)
  double max_vio_global = 0;    // MaxVio of the whole step's counts
  double nmi = 0;               // normalized mutual information (domain, expert), this step
  RowMatrix<double> frequency;  // D x N: share of domain d's tokens that select expert e
};

// Metrics of the trained model on a fixed evaluation set (every domain, equal sizes).
struct Evaluation {
  double loss = 0, accuracy = 0, max_vio_global = 0, max_vio_micro = 0, nmi = 0, top_share = 0;
  double tokens_std_micro = 0;
  RowMatrix<double> frequency;
};

struct RunResult {
  Config config;
  std::vector<StepRecord> steps;
  Evaluation eval;
  double seconds = 0;
};

double population_std(const Vector& v) {
  return std::sqrt((v.array() - v.mean()).square().mean());
}

RowMatrix<double> frequencies(const RowMatrix<double>& table, const Vector& domain_tokens) {
  RowMatrix<double> f = table;
  for (Index d = 0; d < f.rows(); ++d) {
    if (domain_tokens[d] > 0) f.row(d) /= domain_tokens[d];
  }
  return f;
}

// The held-out set: 512 tokens of each domain (at least one micro-batch), in single-domain
// micro-batches of the training size; micro-batch metrics are means over those micro-batches.
Evaluation evaluate(Model& model, const Task& task, const Config& config) {
  const Index chunks = std::max<Index>(1, 512 / config.tokens);
  std::mt19937_64 engine(config.seed * 15485863ull + 5ull);
  Evaluation ev;
  const Index n = model.experts();
  RowMatrix<double> table = RowMatrix<double>::Zero(kDomains, n);
  Vector total = Vector::Zero(n), domain_tokens = Vector::Zero(kDomains);
  double loss = 0;
  Index correct = 0;
  for (Index d = 0; d < kDomains; ++d) {
    for (Index c = 0; c < chunks; ++c) {
      RowMatrix<double> x;
      std::vector<Index> labels;
      task.sample(d, config.tokens, engine, x, labels);
      const RowMatrix<double> logits = model.logits(x);
      moebal::IndexMatrix indices;
      RowMatrix<double> unused;
      const BatchResult r = model.task(x, labels, logits, indices, unused, nullptr, 1.0);
      loss += r.loss_sum;
      correct += r.correct;
      table.row(d) += r.counts.transpose();
      total += r.counts;
      domain_tokens[d] += double(config.tokens);
      ev.max_vio_micro += moebal::balance_metrics(r.counts).max_vio / double(kDomains * chunks);
      ev.tokens_std_micro += population_std(r.counts) / double(kDomains * chunks);
    }
  }
  const double tokens = domain_tokens.sum();
  ev.loss = loss / tokens;
  ev.accuracy = double(correct) / tokens;
  ev.max_vio_global = moebal::balance_metrics(total).max_vio;
  const moebal::SpecializationMetrics s = moebal::specialization_metrics(table);
  ev.nmi = s.normalized_mutual_information;
  ev.top_share = s.mean_top_expert_share;
  ev.frequency = frequencies(table, domain_tokens);
  return ev;
}

std::string run_label(const Config& c) {
  std::string label = method_name(c.method);
  if (uses_alpha(c.method)) {
    char buffer[32];
    std::snprintf(buffer, sizeof buffer, " a=%g", c.alpha);
    label += buffer;
  }
  return label;
}

// One training run's state: the task, the model, the optimizer, moebal's balancing objects and
// the current step's micro-batches.
class Trainer {
 public:
  explicit Trainer(const Config& config)
      : config_(config), task_(config.seed), model_(config, config.seed), adam_(model_.size()),
        data_(config.seed * 2654435761ull + 1ull),
        micro_(config.experts, kTopK, switch_options(config)),
        global_(config.experts, kTopK, global_options(config)),
        balancer_(config.experts, config.bias_rate), bias_(Vector::Zero(config.experts)),
        xs_(std::size_t(config.micro_batches)), labels_(std::size_t(config.micro_batches)),
        logits_(std::size_t(config.micro_batches)), indices_(std::size_t(config.micro_batches)),
        domains_(std::size_t(config.micro_batches)), grad_(model_.size()) {}

  Model& model() { return model_; }
  const Task& task() const { return task_; }
  const Vector& gradient() const { return grad_; }
  const std::vector<Index>& domains() const { return domains_; }
  const std::vector<moebal::IndexMatrix>& indices() const { return indices_; }

  // Draws the next step's micro-batches: M / D of each domain, in a random order.
  void sample_step() {
    const int m = config_.micro_batches;
    for (int j = 0; j < m; ++j) domains_[std::size_t(j)] = Index(j % kDomains);
    std::shuffle(domains_.begin(), domains_.end(), data_);
    for (int j = 0; j < m; ++j) {
      task_.sample(domains_[std::size_t(j)], config_.tokens, data_, xs_[std::size_t(j)],
                   labels_[std::size_t(j)]);
    }
  }

  // The step's objective, task cross-entropy (mean over the step's tokens) + balance loss, at
  // the current parameters; writes its gradient into gradient(). Returns the per-micro-batch
  // task results and the balance loss's value in *balance.
  std::vector<BatchResult> objective(double* task_loss, double* balance) {
    const int m = config_.micro_batches;
    const double step_tokens = double(m) * double(config_.tokens);
    for (int j = 0; j < m; ++j) logits_[std::size_t(j)] = model_.logits(xs_[std::size_t(j)]);
    if (config_.method == Method::bias) model_.router().set_expert_bias(bias_);
    if (config_.method == Method::global || config_.method == Method::global_micro) {
      // Phase 1: the counts of every micro-batch of the step; one process, so the all-reduce
      // is the identity (under data parallelism it would be MPI/NCCL/Gloo's SUM).
      global_.reset();
      for (const auto& l : logits_) global_.count(l);
      global_.synchronize(moebal::NoSync{});
    }
    grad_.setZero();
    *balance = 0;
    double loss_sum = 0;
    std::vector<BatchResult> results;
    for (int j = 0; j < m; ++j) {
      const RowMatrix<double>& l = logits_[std::size_t(j)];
      dloss_dlogits_.resize(l.rows(), l.cols());
      switch (config_.method) {
        case Method::micro:
          // The mean over the step's micro-batches: scale 1 / M.
          *balance += micro_.forward_backward(l, dloss_dlogits_, {}, 1.0 / double(m)) / double(m);
          break;
        case Method::global:
        case Method::global_micro:
          // Phase 2: this micro-batch's share of the global-batch loss, and its gradient.
          *balance += global_.forward_backward(l, dloss_dlogits_);
          break;
        case Method::none:
        case Method::bias:
          dloss_dlogits_.setZero();
          break;
      }
      results.push_back(model_.task(xs_[std::size_t(j)], labels_[std::size_t(j)], l,
                                    indices_[std::size_t(j)], dloss_dlogits_, &grad_,
                                    1.0 / step_tokens));
      loss_sum += results.back().loss_sum;
    }
    *task_loss = loss_sum / step_tokens;
    return results;
  }

  // One optimizer step on the current micro-batches; returns its record.
  StepRecord step(int step) {
    const int m = config_.micro_batches;
    const Index n = config_.experts;
    StepRecord record;
    record.step = step;
    const std::vector<BatchResult> results = objective(&record.task_loss, &record.balance_loss);
    adam_.step(model_.parameters(), grad_, config_.learning_rate);
    if (config_.method == Method::bias) {
      // After the step, from the step's counts (DeepSeek-V3; Megatron-core updates the bias
      // once per optimizer step).
      for (const auto& idx : indices_) balancer_.add_selections(idx);
      balancer_.update(bias_);
      model_.router().set_expert_bias(bias_);  // the trained model routes with the new bias
    }
    RowMatrix<double> table = RowMatrix<double>::Zero(kDomains, n);
    Vector step_counts = Vector::Zero(n), domain_tokens = Vector::Zero(kDomains);
    Index correct = 0;
    for (int j = 0; j < m; ++j) {
      const BatchResult& r = results[std::size_t(j)];
      const Index d = domains_[std::size_t(j)];
      correct += r.correct;
      table.row(d) += r.counts.transpose();
      domain_tokens[d] += double(config_.tokens);
      step_counts += r.counts;
      record.tokens_std_micro += population_std(r.counts) / double(m);
      record.max_vio_micro += moebal::balance_metrics(r.counts).max_vio / double(m);
    }
    record.accuracy = double(correct) / (double(m) * double(config_.tokens));
    record.tokens_std_global = population_std(step_counts);
    record.max_vio_global = moebal::balance_metrics(step_counts).max_vio;
    record.nmi = moebal::specialization_metrics(table).normalized_mutual_information;
    record.frequency = frequencies(table, domain_tokens);
    return record;
  }

 private:
  static moebal::SwitchOptions switch_options(const Config& c) {
    moebal::SwitchOptions o;
    o.coefficient = c.alpha;
    return o;
  }
  static moebal::GlobalBatchOptions global_options(const Config& c) {
    moebal::GlobalBatchOptions o;
    o.coefficient = c.alpha;
    if (c.method == Method::global_micro) {
      // The added micro-batch term at weight 0.01 a per micro-batch, divided by M so that it
      // is 0.01 x the `micro` method's loss (the mean over micro-batches) at the same a.
      o.micro_batch_weight = kGlobalMicroWeight * c.alpha / double(c.micro_batches);
    }
    return o;
  }

  Config config_;
  Task task_;
  Model model_;
  Adam adam_;
  std::mt19937_64 data_;
  moebal::SwitchAuxLoss<double> micro_;
  moebal::GlobalBatchBalance<double> global_;
  moebal::ExpertBiasBalancer balancer_;
  Vector bias_;
  std::vector<RowMatrix<double>> xs_;
  std::vector<std::vector<Index>> labels_;
  std::vector<RowMatrix<double>> logits_;
  std::vector<moebal::IndexMatrix> indices_;
  std::vector<Index> domains_;
  Vector grad_;
  RowMatrix<double> dloss_dlogits_;
};

RunResult train(const Config& config) {
  const auto start = std::chrono::steady_clock::now();
  Trainer trainer(config);
  RunResult result;
  result.config = config;
  for (int step = 1; step <= config.steps; ++step) {
    trainer.sample_step();
    result.steps.push_back(trainer.step(step));
    const StepRecord& record = result.steps.back();
    if (config.progress_every > 0 && (step % config.progress_every == 0 || step == config.steps)) {
      std::fprintf(stderr,
                   "  [%-18s] step %5d/%d  task loss %.4f  acc %.3f  std tokens/expert %6.2f  "
                   "MaxVio %.3f  NMI %.3f\n",
                   run_label(config).c_str(), step, config.steps, record.task_loss,
                   record.accuracy, record.tokens_std_micro, record.max_vio_global, record.nmi);
    }
  }
  result.eval = evaluate(trainer.model(), trainer.task(), config);
  result.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

// Central differences of the step objective (task + balance loss, counts held fixed) against
// the hand-written gradient, on `probes` random parameters after `warmup` training steps.
// Returns the largest relative error max |fd - g| / max(|fd|, |g|, 1e-6).
double gradient_check(Config config, int warmup, int probes) {
  config.progress_every = 0;
  Trainer trainer(config);
  for (int step = 1; step <= warmup; ++step) {
    trainer.sample_step();
    trainer.step(step);
  }
  trainer.sample_step();
  double task = 0, balance = 0;
  trainer.objective(&task, &balance);
  const Vector analytic = trainer.gradient();
  const std::vector<moebal::IndexMatrix> routing = trainer.indices();
  std::mt19937_64 engine(config.seed + 99);
  std::uniform_int_distribution<Index> pick(0, trainer.model().size() - 1);
  Vector& theta = trainer.model().parameters();
  double worst = 0;
  const double h = 1e-6;
  for (int p = 0; p < probes; ++p) {
    const Index i = pick(engine);
    const double saved = theta[i];
    double plus = 0, minus = 0, t = 0, b = 0;
    theta[i] = saved + h;
    trainer.objective(&t, &b);
    plus = t + b;
    const bool same_plus = trainer.indices() == routing;
    theta[i] = saved - h;
    trainer.objective(&t, &b);
    minus = t + b;
    const bool same_minus = trainer.indices() == routing;
    theta[i] = saved;
    if (!same_plus || !same_minus) continue;  // a top-k switch: no derivative there
    const double fd = (plus - minus) / (2 * h), g = analytic[i];
    worst = std::max(worst, std::abs(fd - g) / std::max({std::abs(fd), std::abs(g), 1e-6}));
  }
  return worst;
}

// ---- output -----------------------------------------------------------------------------------

void write_csv(const RunResult& run, const std::string& path) {
  std::ofstream out(path, std::ios::binary);
  if (!out) throw std::runtime_error("cannot write '" + path + "'");
  const Index n = run.config.experts;
  out << "step,task_loss,accuracy,balance_loss,tokens_std_micro,tokens_std_global,"
         "max_vio_micro,max_vio_global,specialization_nmi";
  for (Index d = 0; d < kDomains; ++d) {
    for (Index e = 0; e < n; ++e) out << ",freq_d" << d << "_e" << e;
  }
  out << "\n";
  char buffer[64];
  auto put = [&](double v) {
    std::snprintf(buffer, sizeof buffer, ",%.6g", v);
    out << buffer;
  };
  for (const StepRecord& r : run.steps) {
    out << r.step;
    put(r.task_loss);
    put(r.accuracy);
    put(r.balance_loss);
    put(r.tokens_std_micro);
    put(r.tokens_std_global);
    put(r.max_vio_micro);
    put(r.max_vio_global);
    put(r.nmi);
    for (Index i = 0; i < r.frequency.size(); ++i) put(r.frequency.data()[i]);
    out << "\n";
  }
  if (!out) throw std::runtime_error("error writing '" + path + "'");
}

// Reads a CSV written by write_csv back and checks its shape and values; returns an error
// message, empty if the file is well formed.
std::string check_csv(const std::string& path, int steps, Index experts) {
  std::ifstream in(path);
  if (!in) return "cannot read " + path;
  std::string line;
  std::getline(in, line);
  const std::size_t columns = 9 + std::size_t(kDomains * experts);
  if (std::size_t(std::count(line.begin(), line.end(), ',')) + 1 != columns) {
    return path + ": header has the wrong number of columns";
  }
  int rows = 0;
  while (std::getline(in, line)) {
    ++rows;
    std::stringstream fields(line);
    std::string field;
    std::size_t count = 0;
    while (std::getline(fields, field, ',')) {
      char* end = nullptr;
      const double v = std::strtod(field.c_str(), &end);
      if (field.empty() || *end != '\0' || !std::isfinite(v)) {
        return path + ": bad value '" + field + "' at row " + std::to_string(rows);
      }
      if (count == 0 && v != rows) return path + ": step column out of order";
      ++count;
    }
    if (count != columns) return path + ": row " + std::to_string(rows) + " has " +
                                 std::to_string(count) + " fields, expected " +
                                 std::to_string(columns);
  }
  if (rows != steps) return path + ": " + std::to_string(rows) + " rows, expected " + std::to_string(steps);
  return {};
}

std::vector<double> running_mean(const std::vector<double>& v, std::size_t window) {
  std::vector<double> out(v.size());
  double sum = 0;
  for (std::size_t i = 0; i < v.size(); ++i) {
    sum += v[i];
    if (i >= window) sum -= v[i - window];
    out[i] = sum / double(std::min(i + 1, window));
  }
  return out;
}

toy_svg::Series curve(const RunResult& run, double StepRecord::*field, std::string label,
                      std::string color, bool dashed = false) {
  toy_svg::Series s;
  s.label = std::move(label);
  s.color = std::move(color);
  s.dashed = dashed;
  std::vector<double> y;
  for (const StepRecord& r : run.steps) y.push_back(r.*field);
  const std::vector<double> smooth = running_mean(y, 10);
  // Every 5th step is enough for the figure (and keeps the SVG small).
  for (std::size_t i = 0; i < smooth.size(); ++i) {
    if ((i + 1) % 5 == 0 || i == 0 || i + 1 == smooth.size()) {
      s.x.push_back(run.steps[i].step);
      s.y.push_back(smooth[i]);
    }
  }
  return s;
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  if (!out) throw std::runtime_error("cannot write '" + path + "'");
}

std::string file_stem(const Config& c) {
  std::string stem = c.method == Method::global_micro ? "global_micro" : method_name(c.method);
  if (uses_alpha(c.method)) {
    char buffer[32];
    std::snprintf(buffer, sizeof buffer, "_a%g", c.alpha);
    stem += buffer;
  }
  return stem;
}

double train_tail_loss(const RunResult& r) {
  // Mean task loss of the last 20 training steps.
  double train = 0;
  const std::size_t tail = std::min<std::size_t>(20, r.steps.size());
  for (std::size_t i = r.steps.size() - tail; i < r.steps.size(); ++i) train += r.steps[i].task_loss;
  return train / double(tail);
}

// The summary table: one row per configuration; with several seeds (by_seed[s][c] is
// configuration c under seed s) the mean and the standard deviation over the seeds.
void print_summary(const std::vector<std::vector<RunResult>>& by_seed) {
  const std::size_t seeds = by_seed.size();
  std::printf("\nThe trained model on a held-out set (512 tokens per domain, single-domain "
              "micro-batches)%s;\ntrain loss: mean task loss of the last 20 training steps.\n",
              seeds > 1 ? ", mean +- standard deviation over the seeds" : "");
  const int w = seeds > 1 ? 15 : 9;
  std::printf("%-14s %6s | %*s %*s %*s %*s %*s | %*s\n", "method", "a", w, "task loss", w,
              "accuracy", w, "MaxVio global", w, "MaxVio micro", w, "spec (NMI)", w,
              "train loss");
  for (std::size_t c = 0; c < by_seed.front().size(); ++c) {
    const RunResult& first = by_seed.front()[c];
    char alpha[16] = "-";
    if (uses_alpha(first.config.method)) std::snprintf(alpha, sizeof alpha, "%g", first.config.alpha);
    std::printf("%-14s %6s |", method_name(first.config.method), alpha);
    auto column = [&](auto value, bool last) {
      double sum = 0, sum2 = 0;
      for (const auto& runs : by_seed) {
        const double v = value(runs[c]);
        sum += v;
        sum2 += v * v;
      }
      const double mean = sum / double(seeds);
      if (seeds > 1) {
        const double sd = std::sqrt(std::max(0.0, sum2 / double(seeds) - mean * mean));
        std::printf(" %8.3f +-%5.3f", mean, sd);
      } else {
        std::printf(" %9.4f", mean);
      }
      if (last) std::printf("\n");
    };
    column([](const RunResult& r) { return r.eval.loss; }, false);
    column([](const RunResult& r) { return r.eval.accuracy; }, false);
    column([](const RunResult& r) { return r.eval.max_vio_global; }, false);
    column([](const RunResult& r) { return r.eval.max_vio_micro; }, false);
    column([](const RunResult& r) { return r.eval.nmi; }, false);
    std::printf(" |");
    column([](const RunResult& r) { return train_tail_loss(r); }, true);
  }
}

void write_summary_csv(const std::vector<std::vector<RunResult>>& by_seed, const std::string& path) {
  std::ofstream out(path, std::ios::binary);
  out << "method,alpha,seed,eval_task_loss,eval_accuracy,eval_max_vio_global,eval_max_vio_micro,"
         "eval_tokens_std_micro,eval_specialization_nmi,eval_top_expert_share,train_task_loss\n";
  char buffer[256];
  for (const auto& runs : by_seed) {
    for (const RunResult& r : runs) {
      std::snprintf(buffer, sizeof buffer, "%s,%g,%u,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g\n",
                    method_name(r.config.method),
                    uses_alpha(r.config.method) ? r.config.alpha : 0.0, r.config.seed, r.eval.loss,
                    r.eval.accuracy, r.eval.max_vio_global, r.eval.max_vio_micro,
                    r.eval.tokens_std_micro, r.eval.nmi, r.eval.top_share, train_tail_loss(r));
      out << buffer;
    }
  }
  if (!out) throw std::runtime_error("cannot write '" + path + "'");
}

// The a in {1e-3, 1e-2, 1e-1}, and a = 1: in this toy the micro-batch loss spreads a
// domain's tokens over the experts only from a of about 0.3 (see the README).
constexpr int kNumAlphas = 4;
const double kAlphas[kNumAlphas] = {1e-3, 1e-2, 1e-1, 1.0};
const char* const kAlphaColors[kNumAlphas] = {"#2ca02c", "#ff7f0e", "#d62728", "#8c564b"};
const double kFigureAlphas[2] = {1e-1, 1.0};  // the a of figure 3's two panels

const RunResult& find(const std::vector<RunResult>& runs, Method m, double alpha = 0) {
  for (const RunResult& r : runs) {
    if (r.config.method == m && (!uses_alpha(m) || r.config.alpha == alpha)) return r;
  }
  throw std::logic_error("missing run");
}

void write_figures(const std::vector<RunResult>& runs, const std::string& dir) {
  char buffer[128];
  // Figure 1: std of tokens per expert against step, one curve per a: over the step's whole
  // batch (left) and within a micro-batch (right).
  toy_svg::LinePlot global_std, micro_std;
  global_std.title = "Global batch (8 x 64 tokens)";
  micro_std.title = "Within a micro-batch (64 tokens, one domain)";
  global_std.x_label = micro_std.x_label = "optimizer step";
  global_std.y_label = "std of tokens per expert in the step (10-step mean)";
  micro_std.y_label = "std of tokens per expert in a micro-batch (10-step mean)";
  global_std.width = micro_std.width = 560;
  global_std.series.push_back(curve(find(runs, Method::none), &StepRecord::tokens_std_global,
                                    "no balancing", "#555555"));
  micro_std.series.push_back(curve(find(runs, Method::none), &StepRecord::tokens_std_micro,
                                   "no balancing", "#555555"));
  for (int i = 0; i < kNumAlphas; ++i) {
    std::snprintf(buffer, sizeof buffer, "micro, a = %g", kAlphas[i]);
    const RunResult& r = find(runs, Method::micro, kAlphas[i]);
    global_std.series.push_back(curve(r, &StepRecord::tokens_std_global, buffer, kAlphaColors[i]));
    micro_std.series.push_back(curve(r, &StepRecord::tokens_std_micro, buffer, kAlphaColors[i]));
  }
  write_text(dir + "/tokens_std.svg", toy_svg::render_row({global_std, micro_std}));

  // Figure 2: domain x expert selection frequency on the held-out set, micro against global.
  toy_svg::HeatGrid grid;
  grid.title = "Share of each domain's tokens sent to each expert (top-2, held-out set)";
  grid.row_label = "domain";
  grid.col_label = "expert";
  grid.scale_label = "tokens of the domain selecting the expert";
  grid.grid_rows = 2;
  grid.grid_cols = kNumAlphas;
  for (Method m : {Method::micro, Method::global}) {
    for (double a : kAlphas) {
      const RunResult& r = find(runs, m, a);
      toy_svg::HeatMap map;
      std::snprintf(buffer, sizeof buffer, "%s, a = %g (NMI %.2f)",
                    m == Method::micro ? "micro-batch" : "global-batch", a, r.eval.nmi);
      map.title = buffer;
      map.rows = int(r.eval.frequency.rows());
      map.cols = int(r.eval.frequency.cols());
      map.values.assign(r.eval.frequency.data(),
                        r.eval.frequency.data() + r.eval.frequency.size());
      grid.maps.push_back(map);
    }
  }
  write_text(dir + "/domain_expert.svg", toy_svg::render(grid));

  // Figure 3: task loss against step for each method, at two values of a.
  std::vector<toy_svg::LinePlot> panels;
  for (double a : kFigureAlphas) {
    toy_svg::LinePlot p;
    std::snprintf(buffer, sizeof buffer, "Task loss, a = %g", a);
    p.title = buffer;
    p.x_label = "optimizer step";
    p.y_label = "task cross-entropy of the step (10-step running mean)";
    p.log_y = true;
    p.width = 560;
    p.series.push_back(
        curve(find(runs, Method::none), &StepRecord::task_loss, "no balancing", "#555555"));
    p.series.push_back(
        curve(find(runs, Method::micro, a), &StepRecord::task_loss, "micro-batch", "#d62728"));
    p.series.push_back(
        curve(find(runs, Method::global, a), &StepRecord::task_loss, "global-batch", "#1f77b4"));
    p.series.push_back(curve(find(runs, Method::global_micro, a), &StepRecord::task_loss,
                             "global + 0.01 micro", "#17becf", true));
    p.series.push_back(curve(find(runs, Method::bias), &StepRecord::task_loss,
                             "expert bias (no a)", "#9467bd"));
    panels.push_back(p);
  }
  write_text(dir + "/task_loss.svg", toy_svg::render_row(panels));
}

// Every configuration of the issue, in a fixed order.
std::vector<Config> all_configs(const Config& base) {
  std::vector<Config> configs;
  Config c = base;
  c.method = Method::none;
  configs.push_back(c);
  for (Method m : {Method::micro, Method::global, Method::global_micro}) {
    for (double a : kAlphas) {
      c.method = m;
      c.alpha = a;
      configs.push_back(c);
    }
  }
  c.method = Method::bias;
  configs.push_back(c);
  return configs;
}

// ---- command line -----------------------------------------------------------------------------

const char* const kUsage =
    "usage: train_toy_moe [--method none|micro|global|global+micro|bias] [--alpha A]\n"
    "                     [--steps S] [--seed N] [--csv FILE] [options]\n"
    "       train_toy_moe --all [--out DIR] [--steps S] [--seed N] [options]\n"
    "       train_toy_moe --check\n"
    "\n"
    "Trains a toy MoE classifier (4 domains, one domain per micro-batch, top-2 of N experts)\n"
    "with one kind of load balancing and writes one CSV row per optimizer step.\n"
    "\n"
    "  --method M          none (default), micro, global, global+micro or bias\n"
    "  --alpha A           balance coefficient a >= 0 of micro/global/global+micro (0.01)\n"
    "  --steps S           optimizer steps, 1..100000 (1000)\n"
    "  --seed N            seed of the task, the initialization and the data (1)\n"
    "  --csv FILE          per-step CSV of this run\n"
    "  --all               every configuration: none; micro, global, global+micro at\n"
    "                      a = 0.001, 0.01, 0.1, 1; bias. Writes DIR/<run>.csv, DIR/summary.csv\n"
    "                      and the figures DIR/tokens_std.svg, DIR/domain_expert.svg,\n"
    "                      DIR/task_loss.svg; prints a summary table\n"
    "  --out DIR           output directory of --all, created if missing (default .)\n"
    "  --seeds K           --all: repeat every configuration for seeds N..N+K-1 and report\n"
    "                      mean +- std in the table and summary.csv (1); per-step CSVs and\n"
    "                      figures show seed N\n"
    "  --check             short runs (150 steps, a = 0.1) that must show the expected\n"
    "                      effects, a gradient check and a reproducibility check; exit 1\n"
    "                      otherwise\n"
    "  --experts N         number of experts, 4..16 (8)\n"
    "  --micro-batches M   micro-batches per step, a multiple of 4, 4..64 (8)\n"
    "  --tokens T          tokens per micro-batch, 8..4096 (64)\n"
    "  --lr R              Adam learning rate, > 0 (0.01)\n"
    "  --bias-rate R       expert-bias update rate of --method bias, >= 0 (0.001)\n"
    "  --progress N        a progress line on stderr every N steps, 0 = none (100)\n"
    "  --help              this text\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

double parse_double(const std::string& flag, const std::string& value) {
  char* end = nullptr;
  const double v = std::strtod(value.c_str(), &end);
  if (value.empty() || *end != '\0' || !std::isfinite(v)) {
    throw UsageError(flag + " expects a finite number, got '" + value + "'");
  }
  return v;
}

long parse_integer(const std::string& flag, const std::string& value, long lo, long hi) {
  char* end = nullptr;
  const long v = std::strtol(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0') {
    throw UsageError(flag + " expects an integer, got '" + value + "'");
  }
  if (v < lo || v > hi) {
    throw UsageError(flag + " expects a value in [" + std::to_string(lo) + ", " +
                     std::to_string(hi) + "], got " + value);
  }
  return v;
}

struct Options {
  Config config;
  bool all = false, check = false, help = false, method_given = false, alpha_given = false;
  int seeds = 1;  // --all: seeds seed, seed + 1, ...
  std::string csv, out;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError(flag + " expects a value");
      return argv[++i];
    };
    if (flag == "--help" || flag == "-h") {
      o.help = true;
    } else if (flag == "--all") {
      o.all = true;
    } else if (flag == "--check") {
      o.check = true;
    } else if (flag == "--method") {
      const std::string m = value();
      o.method_given = true;
      if (m == "none") o.config.method = Method::none;
      else if (m == "micro") o.config.method = Method::micro;
      else if (m == "global") o.config.method = Method::global;
      else if (m == "global+micro") o.config.method = Method::global_micro;
      else if (m == "bias") o.config.method = Method::bias;
      else throw UsageError("--method expects none, micro, global, global+micro or bias, got '" + m + "'");
    } else if (flag == "--alpha") {
      o.config.alpha = parse_double(flag, value());
      o.alpha_given = true;
      if (o.config.alpha < 0) throw UsageError("--alpha expects a >= 0");
    } else if (flag == "--steps") {
      o.config.steps = int(parse_integer(flag, value(), 1, 100000));
    } else if (flag == "--seed") {
      o.config.seed = unsigned(parse_integer(flag, value(), 0, 4294967295L));
    } else if (flag == "--seeds") {
      o.seeds = int(parse_integer(flag, value(), 1, 100));
    } else if (flag == "--csv") {
      o.csv = value();
    } else if (flag == "--out") {
      o.out = value();
    } else if (flag == "--experts") {
      o.config.experts = Index(parse_integer(flag, value(), 4, 16));
    } else if (flag == "--micro-batches") {
      o.config.micro_batches = int(parse_integer(flag, value(), 4, 64));
      if (o.config.micro_batches % kDomains != 0) {
        throw UsageError("--micro-batches expects a multiple of 4 (two of each domain for 8)");
      }
    } else if (flag == "--tokens") {
      o.config.tokens = Index(parse_integer(flag, value(), 8, 4096));
    } else if (flag == "--lr") {
      o.config.learning_rate = parse_double(flag, value());
      if (o.config.learning_rate <= 0) throw UsageError("--lr expects a rate > 0");
    } else if (flag == "--bias-rate") {
      o.config.bias_rate = parse_double(flag, value());
      if (o.config.bias_rate < 0) throw UsageError("--bias-rate expects a rate >= 0");
    } else if (flag == "--progress") {
      o.config.progress_every = int(parse_integer(flag, value(), 0, 100000));
    } else {
      throw UsageError("unknown option '" + flag + "'");
    }
  }
  if (o.all && o.check) throw UsageError("--all and --check are exclusive");
  if ((o.all || o.check) && (o.method_given || o.alpha_given || !o.csv.empty())) {
    throw UsageError("--method, --alpha and --csv select one run: not with --all or --check");
  }
  if (!o.out.empty() && !o.all) throw UsageError("--out is for --all");
  if (o.seeds != 1 && !o.all) throw UsageError("--seeds is for --all");
  if (o.out.empty()) o.out = ".";
  return o;
}

// The --check mode: short runs whose outcome could be false.
int check(Config base) {
  base.steps = 150;
  base.progress_every = 0;
  int failures = 0;
  auto expect = [&](bool ok, const std::string& what) {
    std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what.c_str());
    failures += ok ? 0 : 1;
  };
  Config c = base;
  c.method = Method::none;
  const RunResult none = train(c);
  c.method = Method::micro;
  c.alpha = 0.1;
  const RunResult micro = train(c);
  c.method = Method::global;
  const RunResult global = train(c);
  char line[256];
  std::snprintf(line, sizeof line, "MaxVio (micro-batch) of no balancing %.3f > micro a=0.1 %.3f",
                none.eval.max_vio_micro, micro.eval.max_vio_micro);
  expect(none.eval.max_vio_micro > micro.eval.max_vio_micro, line);
  std::snprintf(line, sizeof line, "MaxVio (global batch) of no balancing %.3f > global a=0.1 %.3f",
                none.eval.max_vio_global, global.eval.max_vio_global);
  expect(none.eval.max_vio_global > global.eval.max_vio_global, line);
  std::snprintf(line, sizeof line, "specialization (NMI) of global a=0.1 %.3f > micro a=0.1 %.3f",
                global.eval.nmi, micro.eval.nmi);
  expect(global.eval.nmi > micro.eval.nmi, line);
  // The hand-written backward against central differences, for each balance loss.
  for (Method m : {Method::none, Method::micro, Method::global, Method::global_micro}) {
    Config g = base;
    g.method = m;
    g.alpha = 0.1;
    const double error = gradient_check(g, 20, 40);
    std::snprintf(line, sizeof line, "gradient of task + %s balance loss against central "
                  "differences: max relative error %.2e < 1e-5", method_name(m), error);
    expect(error < 1e-5, line);
  }
  // CSVs: well formed and reproducible byte for byte.
  const std::string a = "train_toy_moe_check_a.csv", b = "train_toy_moe_check_b.csv";
  write_csv(micro, a);
  write_csv(train(micro.config), b);
  expect(check_csv(a, micro.config.steps, micro.config.experts).empty(),
         "CSV well formed " + check_csv(a, micro.config.steps, micro.config.experts));
  std::ifstream fa(a, std::ios::binary), fb(b, std::ios::binary);
  const std::string sa((std::istreambuf_iterator<char>(fa)), std::istreambuf_iterator<char>());
  const std::string sb((std::istreambuf_iterator<char>(fb)), std::istreambuf_iterator<char>());
  expect(!sa.empty() && sa == sb, "same seed, same CSV bytes");
  std::remove(a.c_str());
  std::remove(b.c_str());
  std::printf(failures == 0 ? "check passed\n" : "check FAILED (%d)\n", failures);
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  try {
    options = parse(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "train_toy_moe: %s\nRun 'train_toy_moe --help' for the options.\n",
                 e.what());
    return 2;
  }
  if (options.help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  try {
    if (options.check) return check(options.config);
    if (!options.all) {
      const RunResult run = train(options.config);
      if (!options.csv.empty()) write_csv(run, options.csv);
      print_summary({{run}});
      std::printf("\nheld-out set: %% of each domain's tokens that select each expert (top-%lld)\n",
                  static_cast<long long>(kTopK));
      for (Index d = 0; d < kDomains; ++d) {
        std::printf("  domain %lld:", static_cast<long long>(d));
        for (Index e = 0; e < run.eval.frequency.cols(); ++e) {
          std::printf(" %4.0f", 100 * run.eval.frequency(d, e));
        }
        std::printf("\n");
      }
      return 0;
    }
    const auto start = std::chrono::steady_clock::now();
    std::error_code error;
    std::filesystem::create_directories(options.out, error);
    if (error) throw std::runtime_error("cannot create '" + options.out + "': " + error.message());
    std::vector<std::vector<RunResult>> by_seed;
    for (int s = 0; s < options.seeds; ++s) {
      Config base = options.config;
      base.seed = options.config.seed + unsigned(s);
      const std::vector<Config> configs = all_configs(base);
      std::vector<RunResult> runs;
      for (std::size_t i = 0; i < configs.size(); ++i) {
        std::fprintf(stderr, "run %zu/%zu (seed %u): %s\n", i + 1, configs.size(), base.seed,
                     run_label(configs[i]).c_str());
        runs.push_back(train(configs[i]));
        // The per-step CSVs and the figures show the first seed.
        if (s == 0) write_csv(runs.back(), options.out + "/" + file_stem(configs[i]) + ".csv");
      }
      if (s == 0) write_figures(runs, options.out);
      by_seed.push_back(std::move(runs));
    }
    write_summary_csv(by_seed, options.out + "/summary.csv");
    print_summary(by_seed);
    std::printf("\nwrote %zu per-step CSVs (seed %u), summary.csv, tokens_std.svg, "
                "domain_expert.svg and task_loss.svg into %s (%.1f s)\n",
                by_seed.front().size(), options.config.seed, options.out.c_str(),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_toy_moe: %s\n", e.what());
    return 1;
  }
}
