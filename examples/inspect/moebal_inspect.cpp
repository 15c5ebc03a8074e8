// SPDX-License-Identifier: Apache-2.0
// moebal-inspect: check router logits dumped from any framework (numpy.save) against every
// convention: balance metrics, every loss under every convention, and the gradient a kernel
// should produce. See README.md ("moebal-inspect") for the options and the JSON keys.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <moebal/moebal.hpp>

#include "npy.hpp"

namespace {

using moebal::Index;
using moebal::RowMatrix;

// A user-facing error: printed as one line, exit status 2.
struct InspectError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Settings {
  std::string logits_path, mask_path, convention = "megatron", score = "softmax";
  std::string layout = "batch-major", layers, grad_of, grad_out;
  Index k = 2, seq_len = 0;
  double coeff = 1.0;
  bool json = false;
};

moebal::SwitchConvention convention_of(const std::string& name) {
  if (name == "hf") return moebal::SwitchConvention::huggingface;
  if (name == "first-choice") return moebal::SwitchConvention::first_choice;
  return moebal::SwitchConvention::megatron;
}

struct Input {
  RowMatrix<double> logits;          // all rows (layers stacked layer-major)
  std::vector<std::int64_t> shape;   // as in the file
  Index layers = 1, tokens = 0, experts = 0;
  std::optional<moebal::SequenceLayout> sequences;
  Eigen::VectorXi mask;              // empty: no mask; else one per row of one layer
};

Input load_input(const Settings& s) {
  moebal_inspect::NpyArray a = moebal_inspect::read_npy(s.logits_path);
  Input in;
  in.shape = a.shape;
  const std::size_t rank = a.shape.size();
  if (!s.layers.empty()) {
    if (rank != 3) {
      throw InspectError(s.logits_path + ": --layers needs shape [L, T, N], got rank " + std::to_string(rank));
    }
    in.layers = a.shape[0];
    in.tokens = a.shape[1];
    in.experts = a.shape[2];
  } else if (rank == 2) {
    in.tokens = a.shape[0];
    in.experts = a.shape[1];
  } else if (rank == 3) {
    in.tokens = a.shape[0] * a.shape[1];
    in.experts = a.shape[2];
  } else {
    throw InspectError(s.logits_path + ": expected shape [T, N], [B, S, N] or [L, T, N] (with --layers), got rank " +
                       std::to_string(rank));
  }
  if (in.tokens < 1 || in.experts < 1) {
    throw InspectError(s.logits_path + ": expected at least one token and one expert, got an empty array");
  }
  in.logits = Eigen::Map<const RowMatrix<double>>(a.data.data(), in.layers * in.tokens, in.experts);
  for (Index i = 0; i < in.logits.size(); ++i) {
    const double v = in.logits.data()[i];
    if (std::isnan(v) || v == std::numeric_limits<double>::infinity()) {
      throw InspectError(s.logits_path + ": " + (std::isnan(v) ? "NaN" : "+Inf") + " at row " +
                         std::to_string(i / in.experts) + ", column " + std::to_string(i % in.experts));
    }
  }
  // Sequences: [B, S, N] gives S (batch-major; with --layout seq-major the file is [S, B, N]).
  Index seq_len = s.seq_len;
  if (seq_len == 0 && rank == 3 && s.layers.empty()) {
    seq_len = s.layout == "seq-major" ? a.shape[0] : a.shape[1];
  }
  if (seq_len > 0) {
    if (in.tokens % seq_len != 0) {
      throw InspectError(s.logits_path + ": --seq-len " + std::to_string(seq_len) + " does not divide the " +
                         std::to_string(in.tokens) + " tokens");
    }
    in.sequences = s.layout == "seq-major" ? moebal::SequenceLayout::sequence_major(seq_len)
                                           : moebal::SequenceLayout::batch_major(seq_len);
  }
  if (!s.mask_path.empty()) {
    moebal_inspect::NpyArray m = moebal_inspect::read_npy(s.mask_path);
    const Index length = Index(m.data.size());
    if (m.shape.size() > 2 || length != in.tokens) {
      throw InspectError(s.mask_path + ": expected one mask element per token (" + std::to_string(in.tokens) +
                         "), got " + std::to_string(length));
    }
    in.mask.resize(length);
    for (Index t = 0; t < length; ++t) {
      if (std::isnan(m.data[std::size_t(t)])) throw InspectError(s.mask_path + ": NaN at element " + std::to_string(t));
      in.mask[t] = m.data[std::size_t(t)] != 0.0 ? 1 : 0;
    }
  }
  return in;
}

struct Report {
  std::vector<double> switch_by_convention, balanced_by_convention, seq_by_convention;
  double z = 0, cv2_importance = 0, cv2_load = 0;
  moebal::SwitchStats stats;
};

// Every loss of the stacked rows (or, with --layers, the Switch loss aggregated over layers).
Report compute(const Settings& s, const Input& in, RowMatrix<double>* grad) {
  Report r;
  const moebal::TokenMask mask = in.mask.size() > 0 ? moebal::TokenMask(in.mask) : moebal::TokenMask{};
  // With --layers the mask (length T) applies to every layer.
  Eigen::VectorXi stacked_mask;
  if (in.layers > 1 && in.mask.size() > 0) {
    stacked_mask.resize(in.layers * in.tokens);
    for (Index l = 0; l < in.layers; ++l) stacked_mask.segment(l * in.tokens, in.tokens) = in.mask;
  }
  const moebal::TokenMask all_mask =
      stacked_mask.size() > 0 ? moebal::TokenMask(stacked_mask) : mask;
  const moebal::ScoreFunction score = s.score == "sigmoid" ? moebal::ScoreFunction::sigmoid
                                                            : moebal::ScoreFunction::softmax;
  const char* conventions[] = {"megatron", "hf", "first-choice"};
  std::vector<RowMatrix<double>> blocks;
  for (Index l = 0; l < in.layers; ++l) blocks.push_back(in.logits.middleRows(l * in.tokens, in.tokens));
  for (const char* name : conventions) {
    moebal::SwitchOptions o;
    o.convention = convention_of(name);
    o.score = score;
    o.coefficient = s.coeff;
    double value;
    moebal::SwitchStats stats;
    RowMatrix<double> g;
    if (!s.layers.empty()) {
      o.mask = mask;
      const auto agg = s.layers == "sum" ? moebal::LayerAggregation::sum
                       : s.layers == "mean" ? moebal::LayerAggregation::mean
                                            : moebal::LayerAggregation::pooled;
      const auto lr = moebal::switch_aux_loss_layers(blocks, s.k, o, agg);
      value = lr.loss;
      stats = lr.stats;
      g.resize(in.logits.rows(), in.logits.cols());
      for (Index l = 0; l < in.layers; ++l) g.middleRows(l * in.tokens, in.tokens) = lr.grads[std::size_t(l)];
    } else {
      o.mask = all_mask;
      auto sr = moebal::switch_aux_loss(in.logits, s.k, o);
      value = sr.loss;
      stats = sr.stats;
      g = sr.grad;
    }
    r.switch_by_convention.push_back(value);
    r.balanced_by_convention.push_back(stats.balanced_value);
    if (name == s.convention) {
      r.stats = stats;
      if (grad != nullptr && s.grad_of == "switch") *grad = g;
    }
    if (in.sequences) {
      moebal::SequenceOptions q;
      q.convention = o.convention;
      q.score = score;
      q.coefficient = s.coeff;
      q.mask = mask;
      const auto sq = moebal::sequence_aux_loss(in.logits, s.k, *in.sequences, q);
      r.seq_by_convention.push_back(sq.loss);
      if (name == s.convention && grad != nullptr && s.grad_of == "seq") *grad = sq.grad;
    }
  }
  moebal::ZLossOptions zo;
  zo.coefficient = s.coeff;
  zo.mask = all_mask;
  const auto z = moebal::z_loss(in.logits, zo);
  r.z = z.loss;
  moebal::Cv2Options co;
  co.coefficient = s.coeff;
  co.score = score;
  co.mask = all_mask;
  const auto cv = moebal::cv2_importance_loss(in.logits, s.k, co);
  r.cv2_importance = cv.loss;
  r.cv2_load = moebal::cv2_load(in.logits, s.k, co).loss;
  if (grad != nullptr && s.grad_of == "z") *grad = z.grad;
  if (grad != nullptr && s.grad_of == "cv2-importance") *grad = cv.grad;
  return r;
}

nlohmann::ordered_json to_json(const Settings& s, const Input& in, const Report& r) {
  nlohmann::ordered_json j;
  j["tokens"] = r.stats.tokens;
  j["experts"] = in.experts;
  j["k"] = s.k;
  j["convention"] = s.convention;
  j["score"] = s.score;
  const std::size_t c = s.convention == "hf" ? 1 : s.convention == "first-choice" ? 2 : 0;
  nlohmann::ordered_json losses;
  losses["switch"] = r.switch_by_convention[c];
  losses["z"] = r.z;
  losses["cv2_importance"] = r.cv2_importance;
  losses["cv2_load"] = r.cv2_load;
  if (!r.seq_by_convention.empty()) losses["seq"] = r.seq_by_convention[c];
  j["losses"] = losses;
  j["balanced_value"] = r.balanced_by_convention[c];
  j["tokens_per_expert"] = std::vector<std::int64_t>(r.stats.tokens_per_expert.data(),
                                                      r.stats.tokens_per_expert.data() + in.experts);
  j["f"] = std::vector<double>(r.stats.f.data(), r.stats.f.data() + in.experts);
  j["P"] = std::vector<double>(r.stats.P.data(), r.stats.P.data() + in.experts);
  const auto& m = r.stats.balance;
  j["metrics"] = {{"max_vio", m.max_vio}, {"cv", m.cv}, {"entropy", m.normalized_entropy},
                  {"min_share", m.min_share}, {"max_share", m.max_share},
                  {"empty_experts", m.empty_experts}};
  nlohmann::ordered_json by;
  const char* names[] = {"megatron", "hf", "first-choice"};
  for (std::size_t i = 0; i < 3; ++i) {
    by[names[i]] = {{"switch", r.switch_by_convention[i]}, {"balanced_value", r.balanced_by_convention[i]}};
    if (!r.seq_by_convention.empty()) by[names[i]]["seq"] = r.seq_by_convention[i];
  }
  j["conventions"] = by;
  return j;
}

void print_human(const Settings& s, const Input& in, const Report& r) {
  std::string shape;
  for (std::size_t i = 0; i < in.shape.size(); ++i) shape += (i ? " x " : "") + std::to_string(in.shape[i]);
  std::printf("moebal-inspect %s: %s [%s], %lld real tokens, N = %lld experts, k = %lld, convention %s, "
              "score %s, coefficient %g%s\n\n",
              MOEBAL_VERSION_STRING, s.logits_path.c_str(), shape.c_str(),
              static_cast<long long>(r.stats.tokens), static_cast<long long>(in.experts),
              static_cast<long long>(s.k), s.convention.c_str(), s.score.c_str(), s.coeff,
              s.layers.empty() ? "" : (", layers " + s.layers).c_str());
  std::printf("Load per expert (top-%lld selections; share of T k; | marks a perfectly even share)\n",
              static_cast<long long>(s.k));
  const double total = double(r.stats.tokens_per_expert.sum());
  const double even = 1.0 / double(in.experts);
  const double top = std::max(r.stats.balance.max_share, even);
  const int width = 40;
  for (Index e = 0; e < in.experts; ++e) {
    const double share = total > 0 ? double(r.stats.tokens_per_expert[e]) / total : 0.0;
    const int bar = int(std::lround(share / top * width));
    const int mark = int(std::lround(even / top * width));
    std::string line(std::size_t(width + 1), ' ');
    for (int i = 0; i < bar; ++i) line[std::size_t(i)] = '#';
    if (mark <= width) line[std::size_t(mark)] = '|';
    std::printf("  expert %3lld %s %6.2f%% %10lld\n", static_cast<long long>(e), line.c_str(), 100.0 * share,
                static_cast<long long>(r.stats.tokens_per_expert[e]));
  }
  const auto& m = r.stats.balance;
  std::printf("\nMetrics: MaxVio %.4f, CV %.4f, normalized entropy %.4f, min share %.2f%%, max share "
              "%.2f%%, empty experts %lld\n\n",
              m.max_vio, m.cv, m.normalized_entropy, 100 * m.min_share, 100 * m.max_share,
              static_cast<long long>(m.empty_experts));
  std::printf("Losses (coefficient %g)  %14s %14s %14s\n", s.coeff, "megatron", "hf", "first-choice");
  std::printf("  %-22s %14.6g %14.6g %14.6g\n", "switch", r.switch_by_convention[0], r.switch_by_convention[1],
              r.switch_by_convention[2]);
  std::printf("  %-22s %14.6g %14.6g %14.6g\n", "  balanced value", r.balanced_by_convention[0],
              r.balanced_by_convention[1], r.balanced_by_convention[2]);
  if (!r.seq_by_convention.empty()) {
    std::printf("  %-22s %14.6g %14.6g %14.6g\n", "seq (sequence-level)", r.seq_by_convention[0],
                r.seq_by_convention[1], r.seq_by_convention[2]);
  }
  std::printf("  %-22s %14.6g   (no convention)\n", "z", r.z);
  std::printf("  %-22s %14.6g   (no convention)\n", "cv2_importance", r.cv2_importance);
  std::printf("  %-22s %14.6g   (a metric: zero gradient)\n", "cv2_load", r.cv2_load);
}

int run(const Settings& s) {
  if (s.grad_of.empty() != s.grad_out.empty()) {
    throw InspectError("--grad-of and --grad-out go together");
  }
  const Input in = load_input(s);
  if (s.grad_of == "seq" && !in.sequences) throw InspectError("--grad-of seq needs --seq-len (or [B, S, N] input)");
  RowMatrix<double> grad;
  Report r;
  try {
    r = compute(s, in, s.grad_of.empty() ? nullptr : &grad);
  } catch (const moebal::invalid_argument& e) {
    throw InspectError(s.logits_path + ": " + e.what());
  }
  if (!s.grad_out.empty()) {
    moebal_inspect::write_npy(s.grad_out, in.shape, grad.data());  // same shape, float64, atomic
  }
  if (s.json) {
    std::cout << to_json(s, in, r).dump(2) << "\n";
  } else {
    print_human(s, in, r);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Settings s;
  CLI::App app{"moebal-inspect: balance, every framework's loss and the gradient for router logits "
               "saved with numpy.save"};
  app.add_option("logits", s.logits_path, "LOGITS.npy: [T, N], [B, S, N] or [L, T, N] (with --layers)")
      ->required();
  app.add_option("--k", s.k, "experts per token (default 2)")->check(CLI::PositiveNumber);
  app.add_option("--convention", s.convention, "megatron|hf|first-choice (default megatron)")
      ->check(CLI::IsMember({"megatron", "hf", "first-choice"}));
  app.add_option("--score", s.score, "softmax|sigmoid (default softmax)")
      ->check(CLI::IsMember({"softmax", "sigmoid"}));
  app.add_option("--coeff", s.coeff, "the loss coefficient a (default 1)");
  app.add_option("--mask", s.mask_path, "MASK.npy: length-T vector, nonzero = real token");
  app.add_option("--seq-len", s.seq_len, "sequence length S: enables the sequence-level loss")
      ->check(CLI::PositiveNumber);
  app.add_option("--layout", s.layout, "batch-major|seq-major (default batch-major)")
      ->check(CLI::IsMember({"batch-major", "seq-major"}));
  app.add_option("--layers", s.layers, "sum|mean|pooled for [L, T, N] input")
      ->check(CLI::IsMember({"sum", "mean", "pooled"}));
  app.add_option("--grad-of", s.grad_of, "switch|z|seq|cv2-importance: the gradient to write")
      ->check(CLI::IsMember({"switch", "z", "seq", "cv2-importance"}));
  app.add_option("--grad-out", s.grad_out, "GRAD.npy: d loss / d logits, float64, the input's shape");
  app.add_flag("--json", s.json, "a JSON report on stdout");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "moebal-inspect: " << e.what() << "\n";
    return 2;
  }
  try {
    return run(s);
  } catch (const std::exception& e) {
    std::cerr << "moebal-inspect: " << e.what() << "\n";
    return 2;
  }
}
