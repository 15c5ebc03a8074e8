// SPDX-License-Identifier: Apache-2.0
// bfloat16 and float16 logits against PyTorch autograd: tests/fixtures/half.txt was written by
// tests/fixtures/generate_half.py, which rounds its logits to the half type, upcasts them to
// float32 and computes every loss and router (the other generators' PyTorch references) in
// float32 with torch autograd (never calling moebal). Here the same half values are built as
// Eigen::bfloat16 / Eigen::half matrices and read in place; moebal computes in float
// (compute_type_t), so values and one-line gradients are float, and a half-typed gradient
// buffer holds the float gradient rounded once. Also checked: the half path equals the float
// path on the upcast logits, and the object forms write half and float buffers and accumulate.

#include <Eigen/Core>
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moebal/core/types.hpp"
#include "moebal/losses/combined.hpp"
#include "moebal/losses/cv2.hpp"
#include "moebal/losses/deepseek.hpp"
#include "moebal/losses/global_batch.hpp"
#include "moebal/losses/sequence.hpp"
#include "moebal/losses/switch.hpp"
#include "moebal/losses/z.hpp"
#include "moebal/routers/router.hpp"
#include "support/fixtures.hpp"
#include "support/matchers.hpp"

using moebal::Index;
using moebal::IndexMatrix;
using moebal::RowMatrix;
using moebal::RowMatrixRef;
using moebal::TokenMask;
using moebal_test::as_double;
using moebal_test::IsCloseTo;

static_assert(std::is_same_v<moebal::compute_type_t<Eigen::bfloat16>, float>);
static_assert(std::is_same_v<moebal::compute_type_t<Eigen::half>, float>);
static_assert(std::is_same_v<moebal::compute_type_t<float>, float>);
static_assert(std::is_same_v<moebal::compute_type_t<double>, double>);

namespace {

// ------------------------------------------------------------------------------------------
// The fixture file
// ------------------------------------------------------------------------------------------

struct HalfBatch {
  Index rows = 0;
  bool has_mask = false;
  Eigen::VectorXi mask;
  RowMatrix<float> logits, upstream, weights, weights_half, grad, grad_half;
  IndexMatrix indices;
  bool has_value = false;
  float value = 0.0f;
  TokenMask token_mask() const { return has_mask ? TokenMask(mask) : TokenMask{}; }
  bool is_real(Index t) const { return !has_mask || mask[t] != 0; }
};

struct HalfCase {
  std::string name, kind, dtype, score;
  Index experts = 0, k = 0;
  double coefficient = 1.0;
  std::map<std::string, std::vector<std::string>> params;
  Eigen::VectorXd bias;
  std::vector<HalfBatch> batches;

  const std::string& param(const std::string& key, std::size_t i = 0) const {
    const auto it = params.find(key);
    if (it == params.end() || it->second.size() <= i) {
      throw std::runtime_error("fixture " + name + ": no param " + key);
    }
    return it->second[i];
  }
  double number(const std::string& key, std::size_t i = 0) const {
    return std::stod(param(key, i));
  }
  Index integer(const std::string& key) const { return std::stoll(param(key)); }
};

std::vector<HalfCase> load() {
  moebal_test::detail::TokenReader reader(std::string(MOEBAL_FIXTURE_DIR) + "/half.txt");
  std::vector<HalfCase> cases;
  std::string token;
  while (reader.next(token)) {
    if (token != "case") throw std::runtime_error("half.txt: expected 'case', got " + token);
    HalfCase c;
    c.name = reader.word();
    reader.expect("kind");
    c.kind = reader.word();
    reader.expect("dtype");
    c.dtype = reader.word();
    reader.expect("experts");
    c.experts = reader.integer();
    reader.expect("k");
    c.k = reader.integer();
    reader.expect("score");
    c.score = reader.word();
    reader.expect("coefficient");
    c.coefficient = reader.number(false);
    std::string word = reader.word();
    while (word == "param") {
      const std::string key = reader.word();
      c.params[key] = reader.rest_of_line();
      word = reader.word();
    }
    if (word != "bias") throw std::runtime_error("half.txt: expected 'bias', got " + word);
    if (reader.integer() != 0) {
      c.bias.resize(c.experts);
      for (Index j = 0; j < c.experts; ++j) c.bias[j] = reader.number(true);
    }
    reader.expect("batches");
    const Index count = reader.integer();
    for (Index b = 0; b < count; ++b) {
      HalfBatch batch;
      reader.expect("batch");
      batch.rows = reader.integer();
      reader.expect("mask");
      batch.has_mask = reader.integer() != 0;
      if (batch.has_mask) {
        batch.mask.resize(batch.rows);
        for (Index t = 0; t < batch.rows; ++t) batch.mask[t] = static_cast<int>(reader.integer());
      }
      auto matrix = [&](RowMatrix<float>& m, Index cols) {
        m.resize(batch.rows, cols);
        for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(reader.number(true));
      };
      for (word = reader.word(); word != "endbatch"; word = reader.word()) {
        if (word == "logits") {
          matrix(batch.logits, c.experts);
        } else if (word == "upstream") {
          matrix(batch.upstream, c.k);
        } else if (word == "indices") {
          batch.indices.resize(batch.rows, c.k);
          for (Index i = 0; i < batch.indices.size(); ++i)
            batch.indices.data()[i] = reader.integer();
        } else if (word == "weights") {
          matrix(batch.weights, c.k);
        } else if (word == "weights_half") {
          matrix(batch.weights_half, c.k);
        } else if (word == "value") {
          batch.has_value = true;
          batch.value = static_cast<float>(reader.number(true));
        } else if (word == "grad") {
          matrix(batch.grad, c.experts);
        } else if (word == "grad_half") {
          matrix(batch.grad_half, c.experts);
        } else {
          throw std::runtime_error("half.txt: unexpected '" + word + "' in case " + c.name);
        }
      }
      c.batches.push_back(std::move(batch));
    }
    reader.expect("end");
    cases.push_back(std::move(c));
  }
  return cases;
}

// ------------------------------------------------------------------------------------------
// Half-precision helpers
// ------------------------------------------------------------------------------------------

/// The half value's bits as an integer that orders like the value (+0 and -0 both 0), so that
/// the difference of two is their distance in units in the last place.
template <class H>
long ordered_bits(H h) {
  static_assert(sizeof(H) == sizeof(std::uint16_t));
  std::uint16_t bits = 0;
  std::memcpy(&bits, &h, sizeof bits);
  const long magnitude = long(bits & 0x7fffu);
  return (bits & 0x8000u) != 0 ? -magnitude : magnitude;
}

template <class H>
long ulp_distance(H a, H b) {
  return std::abs(ordered_bits(a) - ordered_bits(b));
}

/// Builds the half matrix from the fixture's float values, which must be exact half values.
template <class H>
RowMatrix<H> to_half_exact(const RowMatrix<float>& values) {
  const RowMatrix<H> h = values.template cast<H>();
  const RowMatrix<float> back = h.template cast<float>();
  for (Index i = 0; i < values.size(); ++i) {
    if (!(back.data()[i] == values.data()[i])) {
      FAIL("fixture value " << values.data()[i] << " is not exact in the half type");
    }
  }
  return h;
}

/// Every element of the half buffer `got` is within 1 ulp (of the half type) of the reference
/// rounded to the half type, or within `atol` of it (for tiny elements whose float value has
/// no relative accuracy to speak of).
template <class H>
void check_half_close(const RowMatrix<H>& got, const RowMatrix<float>& expected_half, double atol,
                      const char* what) {
  REQUIRE(got.rows() == expected_half.rows());
  REQUIRE(got.cols() == expected_half.cols());
  long worst = 0;
  std::string where;
  int bad = 0;
  for (Index i = 0; i < got.rows(); ++i) {
    for (Index j = 0; j < got.cols(); ++j) {
      const H e = H(expected_half(i, j));
      const long d = ulp_distance(got(i, j), e);
      const double diff = std::abs(double(float(got(i, j))) - double(expected_half(i, j)));
      if (d > 1 && !(diff <= atol)) {
        ++bad;
        if (d > worst) {
          worst = d;
          std::ostringstream out;
          out.precision(9);
          out << "(" << i << ", " << j << "): got " << float(got(i, j)) << ", expected "
              << expected_half(i, j) << ", " << d << " ulp apart";
          where = out.str();
        }
      }
    }
  }
  INFO(what << ": " << bad << " elements more than 1 ulp and " << atol << " apart; worst "
            << where);
  CHECK(bad == 0);
}

/// The half buffer holds the float gradient rounded once to the half type (bitwise).
template <class H>
void check_rounded_once(const RowMatrix<H>& got, const RowMatrix<float>& float_grad,
                        const char* what) {
  REQUIRE(got.rows() == float_grad.rows());
  REQUIRE(got.cols() == float_grad.cols());
  int bad = 0;
  for (Index i = 0; i < got.size(); ++i) {
    if (ulp_distance(got.data()[i], H(float_grad.data()[i])) != 0) ++bad;
  }
  INFO(what << ": " << bad << " elements differ from the float gradient rounded to half");
  CHECK(bad == 0);
}

/// Whether the loss object has forward_backward(logits, out, mask).
template <class Loss, class H, class = void>
struct has_forward_backward : std::false_type {};
template <class Loss, class H>
struct has_forward_backward<
    Loss, H,
    std::void_t<decltype(std::declval<Loss&>().forward_backward(
        std::declval<const Eigen::Map<const RowMatrix<H>>&>(), std::declval<RowMatrixRef<float>>(),
        std::declval<const TokenMask&>()))>> : std::true_type {};
template <class Loss, class H>
inline constexpr bool has_forward_backward_v = has_forward_backward<Loss, H>::value;
static_assert(has_forward_backward_v<moebal::SwitchAuxLoss<Eigen::bfloat16>, Eigen::bfloat16>);
static_assert(has_forward_backward_v<moebal::CombinedAuxLoss<Eigen::half>, Eigen::half>);

double max_abs(const RowMatrix<float>& m) {
  return m.size() == 0 ? 0.0 : double(m.cwiseAbs().maxCoeff());
}

/// A float prefill for backward_accumulate (exactly representable values).
RowMatrix<float> prefill(Index rows, Index cols) {
  RowMatrix<float> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = 0.125f * float((i * 7 + j * 3) % 11) - 0.5f;
  return m;
}

template <class T>
Eigen::Map<const RowMatrix<T>> view(const RowMatrix<T>& m) {
  return Eigen::Map<const RowMatrix<T>>(m.data(), m.rows(), m.cols());
}

// ------------------------------------------------------------------------------------------
// Options of each kind
// ------------------------------------------------------------------------------------------

moebal::ScoreFunction score_of(const HalfCase& c) {
  return c.score == "sigmoid" ? moebal::ScoreFunction::sigmoid : moebal::ScoreFunction::softmax;
}

moebal::SwitchConvention convention_of(const std::string& name) {
  if (name == "megatron") return moebal::SwitchConvention::megatron;
  if (name == "huggingface") return moebal::SwitchConvention::huggingface;
  if (name == "first_choice") return moebal::SwitchConvention::first_choice;
  throw std::runtime_error("unknown convention " + name);
}

moebal::SwitchOptions switch_options(const HalfCase& c, const TokenMask& mask) {
  moebal::SwitchOptions o;
  o.convention = convention_of(c.param("convention"));
  o.score = score_of(c);
  o.coefficient = c.coefficient;
  o.mask = mask;
  return o;
}

moebal::ZLossOptions z_options(const HalfCase& c, const TokenMask& mask) {
  moebal::ZLossOptions o;
  o.coefficient = c.coefficient;
  o.mask = mask;
  return o;
}

moebal::Cv2Options cv2_options(const HalfCase& c, const TokenMask& mask) {
  moebal::Cv2Options o;
  o.score = score_of(c);
  o.coefficient = c.coefficient;
  o.gates =
      c.param("gates") == "topk" ? moebal::ImportanceGates::topk : moebal::ImportanceGates::dense;
  o.variance = c.param("variance") == "unbiased" ? moebal::Cv2Variance::unbiased
                                                 : moebal::Cv2Variance::population;
  o.mask = mask;
  return o;
}

moebal::SequenceLayout layout_of(const HalfCase& c) {
  const Index seq_len = c.integer("seq_len");
  return c.param("layout") == "batch_major" ? moebal::SequenceLayout::batch_major(seq_len)
                                            : moebal::SequenceLayout::sequence_major(seq_len);
}

moebal::SequenceOptions sequence_options(const HalfCase& c, const TokenMask& mask) {
  moebal::SequenceOptions o;
  o.convention = convention_of(c.param("convention"));
  o.score = score_of(c);
  o.coefficient = c.coefficient;
  o.mask = mask;
  return o;
}

moebal::CombinedOptions combined_options(const HalfCase& c, const TokenMask& mask) {
  moebal::CombinedOptions o;
  o.score = score_of(c);
  o.weights.switch_loss = c.number("term_weights", 0);
  o.weights.z = c.number("term_weights", 1);
  o.weights.sequence = c.number("term_weights", 2);
  o.weights.cv2_importance = c.number("term_weights", 3);
  if (o.weights.sequence != 0.0) {
    o.layout = moebal::SequenceLayout::sequence_major(c.integer("seq_len"));
  }
  o.mask = mask;
  return o;
}

moebal::DeviceBalanceOptions device_options(const HalfCase& c, const TokenMask& mask) {
  moebal::DeviceBalanceOptions o;
  o.score = score_of(c);
  o.coefficient = c.coefficient;
  o.devices = c.integer("devices");
  if (c.kind == "comm") o.max_devices = c.integer("max_devices");
  o.mask = mask;
  return o;
}

moebal::GlobalBatchOptions global_options(const HalfCase& c) {
  moebal::GlobalBatchOptions o;
  o.score = score_of(c);
  o.coefficient = c.coefficient;
  o.convention = convention_of(c.param("convention"));
  o.weighting = c.param("weighting") == "micro_batch_mean"
                    ? moebal::GlobalWeighting::micro_batch_mean
                    : moebal::GlobalWeighting::tokens;
  o.micro_batch_weight = c.number("micro_batch_weight");
  return o;
}

moebal::RouterOptions router_options(const HalfCase& c) {
  moebal::RouterOptions o;
  const std::string& score = c.param("score");
  o.score = score == "sigmoid"         ? moebal::RouterScore::sigmoid
            : score == "sqrt_softplus" ? moebal::RouterScore::sqrt_softplus
                                       : moebal::RouterScore::softmax;
  o.select_on_logits = c.param("select") == "logits";
  o.weights = c.param("weights") == "softmax_of_selected"
                  ? moebal::RouterWeights::softmax_of_selected
                  : moebal::RouterWeights::scores;
  o.normalize = c.integer("normalize") != 0;
  o.epsilon_mode = c.param("epsilon_mode") == "clamp" ? moebal::NormalizeEpsilon::clamp
                                                      : moebal::NormalizeEpsilon::add;
  o.normalize_epsilon = c.number("epsilon");
  o.scaling_factor = c.number("scaling_factor");
  o.num_groups = c.integer("groups");
  o.group_topk = c.integer("group_topk");
  const std::string& gs = c.param("group_score");
  o.group_score = gs == "sum_top2" ? moebal::GroupScore::sum_top2
                  : gs == "max"    ? moebal::GroupScore::max
                                   : moebal::GroupScore::sum_top_k_over_groups;
  o.group_fill =
      c.param("fill") == "zero" ? moebal::GroupFill::zero : moebal::GroupFill::negative_infinity;
  o.expert_bias = c.bias;
  return o;
}

// ------------------------------------------------------------------------------------------
// One-line forms: logits of T (a half type, or float for the float path), results in float
// ------------------------------------------------------------------------------------------

struct Output {
  float value = 0.0f;
  RowMatrix<float> grad;
};

template <class R>
Output output_of(const R& r) {
  static_assert(std::is_same_v<decltype(r.loss), float>, "half-precision logits give a float loss");
  static_assert(std::is_same_v<decltype(r.grad), RowMatrix<float>>,
                "half-precision logits give a float gradient");
  return Output{r.loss, r.grad};
}

template <class T>
Output one_line(const HalfCase& c, const HalfBatch& b, const RowMatrix<T>& x) {
  const auto in = view(x);
  const TokenMask mask = b.token_mask();
  if (c.kind == "switch")
    return output_of(moebal::switch_aux_loss(in, c.k, switch_options(c, mask)));
  if (c.kind == "z") return output_of(moebal::z_loss(in, z_options(c, mask)));
  if (c.kind == "cv2_importance") {
    return output_of(moebal::cv2_importance_loss(in, c.k, cv2_options(c, mask)));
  }
  if (c.kind == "sequence") {
    return output_of(moebal::sequence_aux_loss(in, c.k, layout_of(c), sequence_options(c, mask)));
  }
  if (c.kind == "combined")
    return output_of(moebal::combined_aux_loss(in, c.k, combined_options(c, mask)));
  if (c.kind == "device") {
    return output_of(moebal::device_balance_loss(in, c.k, device_options(c, mask)));
  }
  if (c.kind == "comm") {
    return output_of(moebal::communication_balance_loss(in, c.k, device_options(c, mask)));
  }
  throw std::runtime_error("one_line: unknown kind " + c.kind);
}

/// Runs `body(loss)` with a fresh loss object of logits type H for the case.
template <class H, class Body>
void with_object(const HalfCase& c, Body&& body) {
  const Index n = c.experts;
  if (c.kind == "switch") {
    moebal::SwitchAuxLoss<H> loss(n, c.k, switch_options(c, TokenMask{}));
    body(loss);
  } else if (c.kind == "z") {
    moebal::ZLoss<H> loss(c.coefficient);
    body(loss);
  } else if (c.kind == "cv2_importance") {
    moebal::Cv2ImportanceLoss<H> loss(n, c.k, cv2_options(c, TokenMask{}));
    body(loss);
  } else if (c.kind == "sequence") {
    moebal::SequenceAuxLoss<H> loss(n, c.k, layout_of(c), sequence_options(c, TokenMask{}));
    body(loss);
  } else if (c.kind == "combined") {
    moebal::CombinedAuxLoss<H> loss(n, c.k, combined_options(c, TokenMask{}));
    body(loss);
  } else if (c.kind == "device" || c.kind == "comm") {
    moebal::DeviceBalanceLoss<H> loss(n, c.k,
                                      c.kind == "device" ? moebal::DeviceBalanceKind::device
                                                         : moebal::DeviceBalanceKind::communication,
                                      device_options(c, TokenMask{}));
    body(loss);
  } else {
    throw std::runtime_error("with_object: unknown kind " + c.kind);
  }
}

// ------------------------------------------------------------------------------------------
// Checks
// ------------------------------------------------------------------------------------------

/// The gradient tolerance: 1e-5 of the reference's largest element (plus a tiny absolute
/// floor for an all-zero reference).
double grad_atol(const RowMatrix<float>& reference) { return 1e-5 * max_abs(reference) + 1e-30; }

void check_value(float got, float expected, const char* what) {
  INFO(what << ": got " << got << ", expected " << expected);
  CHECK(std::abs(double(got) - double(expected)) <= 1e-5 * std::abs(double(expected)) + 1e-30);
}

/// The half path against the float path on the upcast logits: value and gradient bitwise, or
/// within 1e-6 (relative; gradient: of its largest element).
void check_same_as_float_path(const Output& half_path, const Output& float_path) {
  INFO("half path vs float path on the upcast logits");
  CHECK(std::abs(double(half_path.value) - double(float_path.value)) <=
        1e-6 * std::abs(double(float_path.value)));
  CHECK_THAT(as_double(half_path.grad),
             IsCloseTo(float_path.grad, 1e-6 * max_abs(float_path.grad) + 1e-30));
}

/// Padded rows of a written (not accumulated) gradient are exactly zero.
template <class T>
void check_padded_rows_zero(const HalfBatch& b, const RowMatrix<T>& g) {
  for (Index t = 0; t < b.rows; ++t) {
    if (!b.is_real(t)) {
      for (Index j = 0; j < g.cols(); ++j) {
        INFO("padded row " << t);
        CHECK(float(g(t, j)) == 0.0f);
      }
    }
  }
}

/// backward_accumulate into `acc` (prefilled with `before`) must add `grad` (the float
/// gradient of backward) and leave padded rows untouched.
void check_accumulated(const HalfBatch& b, const RowMatrix<float>& before,
                       const RowMatrix<float>& acc, const RowMatrix<float>& grad) {
  const RowMatrix<float> expected = before + grad;
  const double eps = double(std::numeric_limits<float>::epsilon());
  for (Index t = 0; t < b.rows; ++t) {
    for (Index j = 0; j < acc.cols(); ++j) {
      INFO("accumulated element (" << t << ", " << j << "): before " << before(t, j) << ", grad "
                                   << grad(t, j) << ", got " << acc(t, j));
      if (!b.is_real(t)) {
        CHECK(acc(t, j) == before(t, j));
      } else {
        CHECK(std::abs(double(acc(t, j)) - double(expected(t, j))) <=
              eps * (std::abs(double(before(t, j))) + std::abs(double(grad(t, j)))) +
                  1e-6 * max_abs(grad));
      }
    }
  }
}

/// backward_accumulate into a half buffer holding `before` (exact half values): each element
/// becomes half(before + float gradient), within 1 ulp; padded rows are untouched.
template <class H>
void check_accumulated_half(const HalfBatch& b, const RowMatrix<float>& before,
                            const RowMatrix<H>& acc, const RowMatrix<float>& grad) {
  const RowMatrix<float> expected =
      RowMatrix<float>(before + grad).template cast<H>().template cast<float>();
  check_half_close(acc, expected, 1e-6 * max_abs(grad) + 1e-30, "accumulated into a half buffer");
  for (Index t = 0; t < b.rows; ++t) {
    if (b.is_real(t)) continue;
    for (Index j = 0; j < acc.cols(); ++j) {
      INFO("padded row " << t << " of the accumulated half buffer");
      CHECK(float(acc(t, j)) == before(t, j));
    }
  }
}

template <class H>
void check_loss_case(const HalfCase& c) {
  REQUIRE(c.batches.size() == 1);
  const HalfBatch& b = c.batches[0];
  REQUIRE(b.has_value);
  const RowMatrix<H> xh = to_half_exact<H>(b.logits);
  const double atol = grad_atol(b.grad);

  // One-line form, logits read in place through an Eigen::Map of the half type.
  const Output out = one_line<H>(c, b, xh);
  check_value(out.value, b.value, "one-line value");
  CHECK_THAT(as_double(out.grad), IsCloseTo(b.grad, atol));
  check_padded_rows_zero(b, out.grad);

  // The same as the float API on the upcast logits.
  const RowMatrix<float> xf = xh.template cast<float>();
  check_same_as_float_path(out, one_line<float>(c, b, xf));

  // Object forms: forward; backward into a float buffer, into a half buffer (the float
  // gradient rounded once), with a scale, and accumulating into existing float and half buffers;
  // forward_backward into either buffer where the object has it.
  with_object<H>(c, [&](auto& loss) {
    const auto in = view(xh);
    const auto value = loss.forward(in, b.token_mask());
    static_assert(std::is_same_v<std::decay_t<decltype(value)>, float>,
                  "forward of half-precision logits returns float");
    check_value(value, b.value, "object forward value");
    CHECK(std::abs(double(value) - double(out.value)) <= 1e-6 * std::abs(double(out.value)));

    RowMatrix<float> gf = RowMatrix<float>::Constant(b.rows, c.experts, 7.0f);
    loss.backward(in, RowMatrixRef<float>(gf));
    CHECK_THAT(as_double(gf), IsCloseTo(b.grad, atol));
    CHECK_THAT(as_double(gf), IsCloseTo(out.grad, 1e-6 * max_abs(out.grad) + 1e-30));
    check_padded_rows_zero(b, gf);

    RowMatrix<H> gh = RowMatrix<float>::Constant(b.rows, c.experts, 7.0f).template cast<H>();
    loss.backward(in, RowMatrixRef<H>(gh));
    check_half_close(gh, b.grad_half, atol, "half buffer vs reference rounded to half");
    check_rounded_once(gh, gf, "half buffer vs the float buffer rounded");
    check_padded_rows_zero(b, gh);

    RowMatrix<float> scaled = RowMatrix<float>::Constant(b.rows, c.experts, 7.0f);
    loss.backward(in, RowMatrixRef<float>(scaled), 0.5f);
    CHECK_THAT(as_double(scaled),
               IsCloseTo(RowMatrix<float>(0.5f * gf), 1e-6 * max_abs(gf) + 1e-30));

    const RowMatrix<float> before = prefill(b.rows, c.experts);
    RowMatrix<float> acc = before;
    loss.backward_accumulate(in, RowMatrixRef<float>(acc));
    check_accumulated(b, before, acc, gf);
    RowMatrix<H> acc_h = to_half_exact<H>(before);
    loss.backward_accumulate(in, RowMatrixRef<H>(acc_h));
    check_accumulated_half(b, before, acc_h, gf);

    using Loss = std::decay_t<decltype(loss)>;
    if constexpr (has_forward_backward_v<Loss, H>) {
      // Both passes at once: with a float buffer the scores travel in the buffer, with a half
      // buffer they must not (they are recomputed in float).
      RowMatrix<float> ff = RowMatrix<float>::Constant(b.rows, c.experts, 7.0f);
      const float fv = loss.forward_backward(in, RowMatrixRef<float>(ff), b.token_mask());
      CHECK(std::abs(double(fv) - double(out.value)) <= 1e-6 * std::abs(double(out.value)));
      CHECK_THAT(as_double(ff), IsCloseTo(gf, 1e-6 * max_abs(gf) + 1e-30));
      RowMatrix<H> fh = RowMatrix<float>::Constant(b.rows, c.experts, 7.0f).template cast<H>();
      const float hv = loss.forward_backward(in, RowMatrixRef<H>(fh), b.token_mask());
      CHECK(hv == fv);
      check_half_close(fh, b.grad_half, atol, "forward_backward half buffer vs reference");
      check_rounded_once(fh, ff, "forward_backward half buffer vs its float buffer rounded");
      check_padded_rows_zero(b, fh);
    }
  });
}

template <class H>
void check_router_case(const HalfCase& c) {
  REQUIRE(c.batches.size() == 1);
  const HalfBatch& b = c.batches[0];
  const moebal::RouterOptions o = router_options(c);
  const RowMatrix<H> xh = to_half_exact<H>(b.logits);
  const RowMatrix<float> xf = xh.template cast<float>();
  const RowMatrix<float> upstream = b.upstream;
  const RowMatrix<H> upstream_h = to_half_exact<H>(b.upstream);
  const double wtol = 1e-6 * std::max(1.0, max_abs(b.weights));
  const double atol = grad_atol(b.grad);

  const auto r = moebal::route(view(xh), c.k, o);
  static_assert(std::is_same_v<decltype(r.weights), RowMatrix<float>>,
                "routing half-precision logits gives float weights");
  CHECK(r.indices == b.indices);
  CHECK_THAT(as_double(r.weights), IsCloseTo(b.weights, wtol, 1e-5));
  const RowMatrix<float> g = moebal::route_backward(view(xh), b.indices, upstream, o);
  CHECK_THAT(as_double(g), IsCloseTo(b.grad, atol));

  // Float path on the upcast logits.
  const auto rf = moebal::route(view(xf), c.k, o);
  CHECK(rf.indices == r.indices);
  CHECK_THAT(as_double(r.weights),
             IsCloseTo(rf.weights, 1e-6 * std::max(1.0, max_abs(rf.weights))));
  const RowMatrix<float> gf_path = moebal::route_backward(view(xf), b.indices, upstream, o);
  CHECK_THAT(as_double(g), IsCloseTo(gf_path, 1e-6 * max_abs(gf_path) + 1e-30));
  // d loss / d weights given in the half type reads the same values.
  CHECK_THAT(as_double(moebal::route_backward(view(xh), b.indices, upstream_h, o)),
             IsCloseTo(g, 1e-6 * max_abs(g) + 1e-30));

  // Object form: weights into float and half buffers, gradients into half and float buffers.
  moebal::Router<H> router(c.experts, c.k, o);
  IndexMatrix idx(b.rows, c.k);
  RowMatrix<float> w(b.rows, c.k);
  router.forward(view(xh), idx, RowMatrixRef<float>(w));
  CHECK(idx == b.indices);
  CHECK_THAT(as_double(w), IsCloseTo(r.weights, 1e-6 * std::max(1.0, max_abs(r.weights))));
  RowMatrix<H> wh(b.rows, c.k);
  router.forward(view(xh), idx, RowMatrixRef<H>(wh));
  check_half_close(wh, b.weights_half, wtol, "router weights in a half buffer");
  check_rounded_once(wh, w, "router weights in a half buffer vs float weights rounded");

  RowMatrix<float> gbuf = RowMatrix<float>::Constant(b.rows, c.experts, 7.0f);
  router.backward(view(xh), b.indices, upstream, RowMatrixRef<float>(gbuf));
  CHECK_THAT(as_double(gbuf), IsCloseTo(g, 1e-6 * max_abs(g) + 1e-30));
  RowMatrix<H> gh = RowMatrix<float>::Constant(b.rows, c.experts, 7.0f).template cast<H>();
  router.backward(view(xh), b.indices, upstream, RowMatrixRef<H>(gh));
  check_half_close(gh, b.grad_half, atol, "router gradient in a half buffer");
  check_rounded_once(gh, gbuf, "router gradient in a half buffer vs the float buffer rounded");
  const RowMatrix<float> before = prefill(b.rows, c.experts);
  RowMatrix<float> acc = before;
  router.backward_accumulate(view(xh), b.indices, upstream, RowMatrixRef<float>(acc));
  check_accumulated(b, before, acc, gbuf);
  RowMatrix<H> acc_h = to_half_exact<H>(before);
  router.backward_accumulate(view(xh), b.indices, upstream, RowMatrixRef<H>(acc_h));
  check_accumulated_half(b, before, acc_h, gbuf);
}

template <class H>
void check_global_case(const HalfCase& c) {
  const moebal::GlobalBatchOptions o = global_options(c);
  std::vector<RowMatrix<H>> xh;
  std::vector<RowMatrix<float>> xf;
  for (const HalfBatch& b : c.batches) {
    xh.push_back(to_half_exact<H>(b.logits));
    xf.push_back(xh.back().template cast<float>());
  }
  moebal::GlobalBatchBalance<H> half_balance(c.experts, c.k, o);
  moebal::GlobalBatchBalance<float> float_balance(c.experts, c.k, o);
  for (std::size_t j = 0; j < c.batches.size(); ++j) {
    half_balance.count(view(xh[j]), c.batches[j].token_mask());
    float_balance.count(view(xf[j]), c.batches[j].token_mask());
  }
  half_balance.synchronize();
  float_balance.synchronize();
  for (std::size_t j = 0; j < c.batches.size(); ++j) {
    const HalfBatch& b = c.batches[j];
    INFO("micro-batch " << j);
    const double atol = grad_atol(b.grad);
    const auto in = view(xh[j]);

    Output half_path;
    half_path.grad = RowMatrix<float>::Constant(b.rows, c.experts, 7.0f);
    const auto value =
        half_balance.forward_backward(in, RowMatrixRef<float>(half_path.grad), b.token_mask());
    static_assert(std::is_same_v<std::decay_t<decltype(value)>, float>,
                  "the global-batch share of half-precision logits is float");
    half_path.value = value;
    check_value(half_path.value, b.value, "micro-batch share");
    CHECK_THAT(as_double(half_path.grad), IsCloseTo(b.grad, atol));
    check_padded_rows_zero(b, half_path.grad);

    Output float_path;
    float_path.grad.resize(b.rows, c.experts);
    float_path.value = float_balance.forward_backward(
        view(xf[j]), RowMatrixRef<float>(float_path.grad), b.token_mask());
    check_same_as_float_path(half_path, float_path);

    CHECK(half_balance.forward(in, b.token_mask()) == half_path.value);
    RowMatrix<H> gh = RowMatrix<float>::Constant(b.rows, c.experts, 7.0f).template cast<H>();
    half_balance.backward(in, RowMatrixRef<H>(gh));
    check_half_close(gh, b.grad_half, atol, "global-batch gradient in a half buffer");
    check_rounded_once(gh, half_path.grad, "global-batch half buffer vs float buffer rounded");
    check_padded_rows_zero(b, gh);
    const RowMatrix<float> before = prefill(b.rows, c.experts);
    RowMatrix<float> acc = before;
    half_balance.backward_accumulate(in, RowMatrixRef<float>(acc));
    check_accumulated(b, before, acc, half_path.grad);
    RowMatrix<H> acc_h = to_half_exact<H>(before);
    half_balance.backward_accumulate(in, RowMatrixRef<H>(acc_h));
    check_accumulated_half(b, before, acc_h, half_path.grad);
  }
}

template <class H>
void check_case(const HalfCase& c) {
  if (c.kind == "router") {
    check_router_case<H>(c);
  } else if (c.kind == "global_batch") {
    check_global_case<H>(c);
  } else {
    check_loss_case<H>(c);
  }
}

}  // namespace

TEST_CASE("bfloat16 and float16 logits match PyTorch float32 references",
          "[half][loss][router][reference]") {
  const auto cases = load();
  REQUIRE(cases.size() >= 40);
  std::map<std::string, int> seen;
  for (const auto& c : cases) {
    INFO("fixture " << c.name);
    ++seen[c.kind + "/" + c.dtype];
    if (c.dtype == "bfloat16") {
      check_case<Eigen::bfloat16>(c);
    } else if (c.dtype == "float16") {
      check_case<Eigen::half>(c);
    } else {
      FAIL("unknown dtype " << c.dtype);
    }
  }
  for (const char* kind : {"switch", "z", "cv2_importance", "sequence", "combined", "device",
                           "comm", "router", "global_batch"}) {
    for (const char* dtype : {"bfloat16", "float16"}) {
      INFO("kind " << kind << ", dtype " << dtype);
      CHECK(seen[std::string(kind) + "/" + dtype] >= 1);
    }
  }
}

TEST_CASE("half-precision ties are resolved on float32 scores, lower index first",
          "[half][switch][reference]") {
  // The *_ties fixtures: saturated sigmoids (exactly 1.0 in float32, distinct in double) and
  // exactly equal float16 logits placed far apart in a row. Checked above like every case;
  // here it is made sure that they are present and that they do select differently from a
  // double computation (the saturated ones).
  const auto cases = load();
  int ties = 0;
  for (const auto& c : cases) {
    if (c.name.find("_ties_") == std::string::npos) continue;
    ++ties;
    INFO("fixture " << c.name);
    const HalfBatch& b = c.batches[0];
    if (c.dtype == "bfloat16") {
      // Some row has two saturated logits, the higher one at the higher index.
      bool reversed = false;
      for (Index t = 0; t < b.rows; ++t)
        for (Index i = 0; i < c.experts; ++i)
          for (Index j = i + 1; j < c.experts; ++j)
            reversed = reversed || (b.logits(t, i) >= 18.0f && b.logits(t, j) > b.logits(t, i));
      CHECK(reversed);
      // On those logits, a double computation picks differently: the float32 result must not
      // equal the double one (so the case really tests the compute type).
      const RowMatrix<Eigen::bfloat16> xh = to_half_exact<Eigen::bfloat16>(b.logits);
      const auto r32 = moebal::switch_aux_loss(view(xh), c.k, switch_options(c, TokenMask{}));
      const RowMatrix<double> xd = b.logits.cast<double>();
      const auto r64 = moebal::switch_aux_loss(xd, c.k, switch_options(c, TokenMask{}));
      CHECK(r32.stats.first_choice_tokens != r64.stats.first_choice_tokens);
    }
  }
  CHECK(ties == 4);
}
