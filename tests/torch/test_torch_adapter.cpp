// SPDX-License-Identifier: Apache-2.0
// <moebal/torch.hpp>: every torch overload gives the Eigen API's values and gradients on the
// same data, for each logits dtype; 3-D equals 2-D flattened; non-contiguous input equals
// contiguous; masks of every dtype and layout; every tensor error's message.

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

// libtorch first: it brings glog, whose CHECK macro must give way to Catch's.
#include "moebal/torch.hpp"
#undef CHECK

#include <catch2/catch.hpp>

#include "moebal/moebal.hpp"
#include "support/matchers.hpp"

namespace {

using Catch::Matchers::Contains;
using moebal::Index;
using moebal::RowMatrix;

constexpr Index kT = 24, kN = 8, kK = 2, kB = 4, kS = 6;  // kB * kS == kT

/// Reproducible logits with a spread wide enough for distinct top-k choices.
at::Tensor random_logits(at::ScalarType dtype, Index rows = kT, Index cols = kN,
                         std::uint64_t seed = 7) {
  at::manual_seed(seed);
  return (1.5 * at::randn({rows, cols}, at::kDouble)).to(dtype);
}

/// The logits as the Eigen API's reference sees them: a copy of the tensor's elements in their
/// storage type (float, double, Eigen::bfloat16, Eigen::half).
template <class S>
RowMatrix<S> eigen_logits(const at::Tensor& t) {
  return moebal::torch_view<S>(t);
}

/// A tensor's elements as a row-major double matrix of (numel / last dim) rows.
RowMatrix<double> as_matrix(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kDouble).contiguous();
  const Index cols = d.dim() == 0 ? 1 : d.size(-1);
  const Index rows = cols == 0 ? 0 : d.numel() / cols;
  return Eigen::Map<const RowMatrix<double>>(d.data_ptr<double>(), rows, cols);
}

double value_of(const at::Tensor& t) { return t.to(at::kDouble).item<double>(); }

/// The reference gradient (compute type) rounded to `dtype` with Eigen's conversions, as a
/// double matrix.
template <class Derived>
RowMatrix<double> rounded(const Eigen::MatrixBase<Derived>& grad, at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16:
      return grad.template cast<Eigen::bfloat16>().template cast<double>();
    case at::kHalf:
      return grad.template cast<Eigen::half>().template cast<double>();
    case at::kFloat:
      return grad.template cast<float>().template cast<double>();
    default:
      return grad.template cast<double>();
  }
}

at::ScalarType value_dtype(at::ScalarType logits) {
  return logits == at::kDouble ? at::kDouble : at::kFloat;
}

/// Checks a torch loss result (loss, grad) against an Eigen result (reference loss and grad in
/// the compute type) for logits of `dtype` and the requested gradient dtype.
template <class Result, class Reference>
void check_against(const Result& r, const Reference& ref, const at::Tensor& logits,
                   moebal::TorchGradDtype grad_dtype) {
  const at::ScalarType dtype = logits.scalar_type();
  REQUIRE(r.loss.dim() == 0);
  CHECK(r.loss.scalar_type() == value_dtype(dtype));
  CHECK(value_of(r.loss) == double(ref.loss));
  const at::ScalarType grad_type =
      grad_dtype == moebal::TorchGradDtype::float32 ? at::kFloat : dtype;
  CHECK(r.grad.scalar_type() == grad_type);
  CHECK(r.grad.sizes().equals(logits.sizes()));
  CHECK(r.grad.is_contiguous());
  CHECK(as_matrix(r.grad) == rounded(ref.grad, grad_type));
}

/// Runs `check(reference_logits)` with an Eigen copy of the logits in their storage type.
template <class Check>
void with_reference(const at::Tensor& logits, Check&& check) {
  switch (logits.scalar_type()) {
    case at::kDouble:
      check(eigen_logits<double>(logits));
      break;
    case at::kFloat:
      check(eigen_logits<float>(logits));
      break;
    case at::kBFloat16:
      check(eigen_logits<Eigen::bfloat16>(logits));
      break;
    default:
      check(eigen_logits<Eigen::half>(logits));
      break;
  }
}

std::string dtype_name(at::ScalarType t) { return moebal::detail::torch_dtype_name(t); }

}  // namespace

TEST_CASE("torch switch_aux_loss equals the Eigen API for every dtype", "[torch][switch]") {
  const auto dtype = GENERATE(at::kFloat, at::kDouble, at::kBFloat16, at::kHalf);
  const auto grad_dtype =
      GENERATE(moebal::TorchGradDtype::like_logits, moebal::TorchGradDtype::float32);
  const auto convention =
      GENERATE(moebal::SwitchConvention::megatron, moebal::SwitchConvention::huggingface,
               moebal::SwitchConvention::first_choice);
  const auto score = GENERATE(moebal::ScoreFunction::softmax, moebal::ScoreFunction::sigmoid);
  CAPTURE(dtype_name(dtype), int(grad_dtype), moebal::to_string(convention),
          moebal::to_string(score));
  const at::Tensor logits = random_logits(dtype);
  moebal::SwitchOptions options;
  options.convention = convention;
  options.score = score;
  options.coefficient = 0.01;
  const auto r = moebal::switch_aux_loss(logits, kK, options, {}, grad_dtype);
  with_reference(logits, [&](const auto& x) {
    const auto ref = moebal::switch_aux_loss(x, kK, options);
    check_against(r, ref, logits, grad_dtype);
    CHECK(r.stats.tokens_per_expert == ref.stats.tokens_per_expert);
    CHECK(r.stats.f == ref.stats.f);
    CHECK(r.stats.P == ref.stats.P);
    CHECK(r.stats.tokens == kT);
  });
}

TEST_CASE("torch z_loss cv2_importance_loss and combined_aux_loss equal the Eigen API",
          "[torch][z][cv2][combined]") {
  const auto dtype = GENERATE(at::kFloat, at::kDouble, at::kBFloat16, at::kHalf);
  const auto grad_dtype =
      GENERATE(moebal::TorchGradDtype::like_logits, moebal::TorchGradDtype::float32);
  CAPTURE(dtype_name(dtype), int(grad_dtype));
  const at::Tensor logits = random_logits(dtype);

  SECTION("z-loss") {
    moebal::ZLossOptions options;
    options.coefficient = 1e-3;
    const auto r = moebal::z_loss(logits, options, {}, grad_dtype);
    with_reference(logits, [&](const auto& x) {
      const auto ref = moebal::z_loss(x, options);
      check_against(r, ref, logits, grad_dtype);
      CHECK(r.tokens == ref.tokens);
      CHECK(r.mean_squared_lse == ref.mean_squared_lse);
    });
  }
  SECTION("importance CV^2, top-k gates, unbiased") {
    moebal::Cv2Options options;
    options.gates = moebal::ImportanceGates::topk;
    options.variance = moebal::Cv2Variance::unbiased;
    const auto r = moebal::cv2_importance_loss(logits, kK, options, {}, grad_dtype);
    with_reference(logits, [&](const auto& x) {
      const auto ref = moebal::cv2_importance_loss(x, kK, options);
      check_against(r, ref, logits, grad_dtype);
      CHECK(r.importance == ref.importance);
      CHECK(r.tokens == ref.tokens);
    });
  }
  SECTION("combined, every term") {
    moebal::CombinedOptions options;
    options.weights.z = 1e-3;
    options.weights.sequence = 0.5;
    options.weights.cv2_importance = 0.1;
    options.layout = moebal::SequenceLayout::batch_major(kS);
    const auto r = moebal::combined_aux_loss(logits, kK, options, {}, grad_dtype);
    with_reference(logits, [&](const auto& x) {
      const auto ref = moebal::combined_aux_loss(x, kK, options);
      check_against(r, ref, logits, grad_dtype);
      CHECK(r.terms.z == ref.terms.z);
      CHECK(r.terms.sequence == ref.terms.sequence);
      CHECK(r.stats.tokens_per_expert == ref.stats.tokens_per_expert);
    });
    // 3-D logits: the layout defaults to batch_major(S).
    moebal::CombinedOptions no_layout = options;
    no_layout.layout.reset();
    const auto r3 =
        moebal::combined_aux_loss(logits.view({kB, kS, kN}), kK, no_layout, {}, grad_dtype);
    CHECK(value_of(r3.loss) == value_of(r.loss));
    CHECK(as_matrix(r3.grad) == as_matrix(r.grad));
  }
}

TEST_CASE("torch sequence_aux_loss equals the Eigen API and 3-D logits are batch-major",
          "[torch][sequence]") {
  const auto dtype = GENERATE(at::kFloat, at::kDouble, at::kBFloat16, at::kHalf);
  CAPTURE(dtype_name(dtype));
  const at::Tensor logits = random_logits(dtype);
  moebal::SequenceOptions options;
  options.coefficient = 0.1;

  SECTION("2-D with each layout") {
    for (const auto& layout :
         {moebal::SequenceLayout::batch_major(kS), moebal::SequenceLayout::sequence_major(kS),
          moebal::SequenceLayout::segments({5, 7, 12})}) {
      const auto r = moebal::sequence_aux_loss(logits, kK, layout, options);
      with_reference(logits, [&](const auto& x) {
        const auto ref = moebal::sequence_aux_loss(x, kK, layout, options);
        check_against(r, ref, logits, moebal::TorchGradDtype::like_logits);
        CHECK(r.sequence_losses == ref.sequence_losses);
        CHECK(r.sequence_tokens == ref.sequence_tokens);
        CHECK(r.counts == ref.counts);
      });
    }
  }
  SECTION("3-D [B, S, N] equals 2-D batch_major(S)") {
    const at::Tensor logits3 = logits.view({kB, kS, kN});
    const auto r3 = moebal::sequence_aux_loss(logits3, kK, options);
    const auto r3_layout =
        moebal::sequence_aux_loss(logits3, kK, moebal::SequenceLayout::batch_major(kS), options);
    const auto r2 =
        moebal::sequence_aux_loss(logits, kK, moebal::SequenceLayout::batch_major(kS), options);
    CHECK(r3.grad.sizes().equals(logits3.sizes()));
    CHECK(value_of(r3.loss) == value_of(r2.loss));
    CHECK(value_of(r3_layout.loss) == value_of(r2.loss));
    CHECK(as_matrix(r3.grad) == as_matrix(r2.grad));
    CHECK(r3.sequence_losses.size() == kB);
  }
}

TEST_CASE("torch 3-D logits equal the 2-D flattened ones", "[torch][shape]") {
  const auto dtype = GENERATE(at::kFloat, at::kDouble, at::kBFloat16, at::kHalf);
  CAPTURE(dtype_name(dtype));
  const at::Tensor logits = random_logits(dtype);
  const at::Tensor logits3 = logits.view({kB, kS, kN});
  at::manual_seed(3);
  const at::Tensor mask2 = at::rand({kB, kS}) > 0.3;
  const at::Tensor mask1 = mask2.reshape({kT});

  const auto s2 = moebal::switch_aux_loss(logits, kK, {}, mask1);
  const auto s3 = moebal::switch_aux_loss(logits3, kK, {}, mask2);
  const auto s3_flat_mask = moebal::switch_aux_loss(logits3, kK, {}, mask1);
  CHECK(s3.grad.sizes().equals(logits3.sizes()));
  CHECK(value_of(s3.loss) == value_of(s2.loss));
  CHECK(value_of(s3_flat_mask.loss) == value_of(s2.loss));
  CHECK(as_matrix(s3.grad) == as_matrix(s2.grad));

  const auto z2 = moebal::z_loss(logits, {}, mask1);
  const auto z3 = moebal::z_loss(logits3, {}, mask2);
  CHECK(value_of(z3.loss) == value_of(z2.loss));
  CHECK(as_matrix(z3.grad) == as_matrix(z2.grad));

  const auto c2 = moebal::cv2_importance_loss(logits, kK, {}, mask1);
  const auto c3 = moebal::cv2_importance_loss(logits3, kK, {}, mask2);
  CHECK(value_of(c3.loss) == value_of(c2.loss));
  CHECK(as_matrix(c3.grad) == as_matrix(c2.grad));

  const auto r2 = moebal::route(logits, kK);
  const auto r3 = moebal::route(logits3, kK);
  CHECK(r3.indices.sizes().equals(at::IntArrayRef{kB, kS, kK}));
  CHECK(r3.weights.sizes().equals(at::IntArrayRef{kB, kS, kK}));
  CHECK(as_matrix(r3.indices) == as_matrix(r2.indices));
  CHECK(as_matrix(r3.weights) == as_matrix(r2.weights));
}

TEST_CASE("torch non-contiguous logits equal contiguous ones read in place", "[torch][layout]") {
  const auto dtype = GENERATE(at::kFloat, at::kDouble, at::kBFloat16, at::kHalf);
  CAPTURE(dtype_name(dtype));
  const at::Tensor logits = random_logits(dtype);
  const auto expected = moebal::switch_aux_loss(logits, kK);

  SECTION("contiguous: viewed in place") {
    const auto in = moebal::detail::torch_logits("test", logits);
    CHECK(in.tensor.data_ptr() == logits.data_ptr());
  }
  SECTION("a transpose (column-major memory): one contiguous copy") {
    const at::Tensor transposed = logits.t().contiguous().t();
    REQUIRE_FALSE(transposed.is_contiguous());
    const auto in = moebal::detail::torch_logits("test", transposed);
    CHECK(in.tensor.data_ptr() != transposed.data_ptr());
    const auto r = moebal::switch_aux_loss(transposed, kK);
    CHECK(value_of(r.loss) == value_of(expected.loss));
    CHECK(as_matrix(r.grad) == as_matrix(expected.grad));
    CHECK(r.grad.is_contiguous());
  }
  SECTION("a column slice of a wider tensor: read in place with its row stride") {
    const at::Tensor wide = at::cat({logits, random_logits(dtype, kT, 5, 11)}, 1);
    const at::Tensor slice = wide.narrow(1, 0, kN);
    REQUIRE_FALSE(slice.is_contiguous());
    const auto in = moebal::detail::torch_logits("test", slice);
    CHECK(in.tensor.data_ptr() == slice.data_ptr());
    CHECK(in.row_stride == kN + 5);
    const auto r = moebal::switch_aux_loss(slice, kK);
    CHECK(value_of(r.loss) == value_of(expected.loss));
    CHECK(as_matrix(r.grad) == as_matrix(expected.grad));
    // 3-D slices too.
    const at::Tensor slice3 = wide.view({kB, kS, kN + 5}).narrow(2, 0, kN);
    const auto r3 = moebal::switch_aux_loss(slice3, kK);
    CHECK(moebal::detail::torch_logits("test", slice3).tensor.data_ptr() == slice3.data_ptr());
    CHECK(as_matrix(r3.grad) == as_matrix(expected.grad));
  }
  SECTION("a permuted 3-D tensor: one contiguous copy") {
    const at::Tensor logits3 = logits.view({kB, kS, kN});
    const at::Tensor permuted = logits3.permute({1, 0, 2}).contiguous().permute({1, 0, 2});
    REQUIRE_FALSE(permuted.is_contiguous());
    const auto r = moebal::switch_aux_loss(permuted, kK);
    CHECK(value_of(r.loss) == value_of(expected.loss));
    CHECK(as_matrix(r.grad) == as_matrix(expected.grad));
    const auto z = moebal::z_loss(permuted);
    CHECK(as_matrix(z.grad) == as_matrix(moebal::z_loss(logits).grad));
  }
  SECTION("an expanded tensor (rows of stride 0): one contiguous copy") {
    const at::Tensor row = logits.narrow(0, 0, 1);
    const at::Tensor expanded = row.expand({kT, kN});
    const auto r = moebal::switch_aux_loss(expanded, kK);
    const auto r_copy = moebal::switch_aux_loss(expanded.contiguous(), kK);
    CHECK(value_of(r.loss) == value_of(r_copy.loss));
    CHECK(as_matrix(r.grad) == as_matrix(r_copy.grad));
  }
}

TEST_CASE("torch masks of every dtype and layout equal an Eigen TokenMask", "[torch][mask]") {
  const at::Tensor logits = random_logits(at::kFloat);
  Eigen::VectorXi keep(kT);
  for (Index t = 0; t < kT; ++t) keep[t] = (t % 3 == 1 || t == 7) ? 0 : 1;
  moebal::SwitchOptions options;
  options.mask = keep;
  const auto ref = moebal::switch_aux_loss(eigen_logits<float>(logits), kK, options);
  const at::Tensor mask_int = at::from_blob(keep.data(), {kT}, at::kInt).clone();

  const auto mask_dtype = GENERATE(at::kBool, at::kByte, at::kChar, at::kShort, at::kInt, at::kLong,
                                   at::kFloat, at::kDouble, at::kBFloat16, at::kHalf);
  CAPTURE(dtype_name(mask_dtype));
  const at::Tensor mask = mask_int.to(mask_dtype);
  const auto r = moebal::switch_aux_loss(logits, kK, {}, mask);
  check_against(r, ref, logits, moebal::TorchGradDtype::like_logits);
  CHECK(r.stats.tokens == ref.stats.tokens);

  // A strided 1-D mask is read in place; a [B, S] mask of 3-D logits too.
  const at::Tensor strided = at::stack({mask, at::zeros_like(mask)}, 1).select(1, 0);
  REQUIRE(strided.stride(0) == 2);
  CHECK(value_of(moebal::switch_aux_loss(logits, kK, {}, strided).loss) == double(ref.loss));
  const auto r3 = moebal::switch_aux_loss(logits.view({kB, kS, kN}), kK, {}, mask.view({kB, kS}));
  CHECK(value_of(r3.loss) == double(ref.loss));
  // The public helper: a view of the tensor (no copy for read-in-place dtypes).
  const moebal::TorchMask view = moebal::torch_mask(mask);
  CHECK(view.view.size() == kT);
  for (Index t = 0; t < kT; ++t) CHECK(view.view.is_real(t) == (keep[t] != 0));
  if (mask_dtype != at::kBFloat16 && mask_dtype != at::kHalf) {
    CHECK(view.storage.data_ptr() == mask.data_ptr());
  }
}

TEST_CASE("torch route and route_backward equal the Eigen API", "[torch][router]") {
  const auto dtype = GENERATE(at::kFloat, at::kDouble, at::kBFloat16, at::kHalf);
  const auto grad_dtype =
      GENERATE(moebal::TorchGradDtype::like_logits, moebal::TorchGradDtype::float32);
  CAPTURE(dtype_name(dtype), int(grad_dtype));
  const at::Tensor logits = random_logits(dtype);
  moebal::RouterOptions options;
  options.normalize = true;
  options.normalize_epsilon = 1e-20;
  options.scaling_factor = 2.5;
  options.num_groups = 4;
  options.group_topk = 2;
  options.expert_bias = Eigen::VectorXd::LinSpaced(kN, -0.1, 0.1);

  const auto r = moebal::route(logits, kK, options);
  CHECK(r.indices.scalar_type() == at::kLong);
  CHECK(r.weights.scalar_type() == value_dtype(dtype));
  at::manual_seed(5);
  const at::Tensor dw = at::randn({kT, kK}, at::kDouble);
  const at::Tensor grad = moebal::route_backward(logits, r.indices, dw, options, grad_dtype);
  const at::ScalarType grad_type =
      grad_dtype == moebal::TorchGradDtype::float32 ? at::kFloat : dtype;
  CHECK(grad.scalar_type() == grad_type);
  CHECK(grad.sizes().equals(logits.sizes()));
  with_reference(logits, [&](const auto& x) {
    using C = moebal::compute_type_t<typename std::decay_t<decltype(x)>::Scalar>;
    const auto ref = moebal::route(x, kK, options);
    CHECK(as_matrix(r.indices) == ref.indices.template cast<double>());
    CHECK(as_matrix(r.weights) == ref.weights.template cast<double>());
    const RowMatrix<C> dw_ref = as_matrix(dw).template cast<C>();
    const RowMatrix<C> ref_grad = moebal::route_backward(x, ref.indices, dw_ref, options);
    CHECK(as_matrix(grad) == rounded(ref_grad, grad_type));
  });
  // 3-D: [B, S, k] in, the logits' shape out.
  const at::Tensor grad3 =
      moebal::route_backward(logits.view({kB, kS, kN}), r.indices.view({kB, kS, kK}).to(at::kInt),
                             dw.view({kB, kS, kK}).to(at::kFloat), options, grad_dtype);
  CHECK(grad3.sizes().equals(at::IntArrayRef{kB, kS, kN}));
}

TEST_CASE("TorchGlobalBatchBalance equals GlobalBatchBalance on the same micro-batches",
          "[torch][global]") {
  const auto dtype = GENERATE(at::kFloat, at::kDouble, at::kBFloat16, at::kHalf);
  const auto weighting =
      GENERATE(moebal::GlobalWeighting::tokens, moebal::GlobalWeighting::micro_batch_mean);
  CAPTURE(dtype_name(dtype), int(weighting));
  moebal::GlobalBatchOptions options;
  options.weighting = weighting;
  options.micro_batch_weight = 0.01;
  const std::vector<at::Tensor> micro = {random_logits(dtype, 10, kN, 1),
                                         random_logits(dtype, 14, kN, 2).view({2, 7, kN})};
  const at::Tensor mask0 = at::arange(10) % 4 != 3;
  // Another "rank" with the same counts: the sum over two ranks doubles every entry.
  const auto two_ranks = [](double* data, Index size) {
    for (Index i = 0; i < size; ++i) data[i] *= 2.0;
  };

  moebal::TorchGlobalBatchBalance balance(kN, kK, options);
  balance.count(micro[0], mask0);
  balance.count(micro[1]);
  balance.synchronize(two_ranks);
  CHECK(balance.synchronized());
  const auto r0 = balance.forward_backward(micro[0], mask0);
  const auto r1 = balance.forward_backward(micro[1], {}, moebal::TorchGradDtype::float32);
  CHECK(r0.grad.scalar_type() == dtype);
  CHECK(r1.grad.scalar_type() == at::kFloat);
  CHECK(r1.grad.sizes().equals(micro[1].sizes()));
  CHECK(r0.loss.scalar_type() == value_dtype(dtype));

  const auto reference = [&](auto tag) {
    using S = decltype(tag);
    using C = moebal::compute_type_t<S>;
    moebal::GlobalBatchBalance<S> core(kN, kK, options);
    const RowMatrix<S> x0 = eigen_logits<S>(micro[0]);
    const RowMatrix<S> x1 = eigen_logits<S>(micro[1]);
    const at::Tensor mask0_int = mask0.to(at::kInt);
    const moebal::TokenMask m0(mask0_int.data_ptr<std::int32_t>(), 10);
    core.count(x0, m0);
    core.count(x1);
    core.synchronize(two_ranks);
    CHECK(balance.global_f() == core.global_f());
    CHECK(balance.global_counts() == core.global_counts());
    CHECK(balance.global_tokens() == core.global_tokens());
    CHECK(balance.global_micro_batches() == core.global_micro_batches());
    RowMatrix<C> g0(10, kN), g1(14, kN);
    const double v0 = double(core.forward_backward(x0, g0, m0));
    const double v1 = double(core.forward_backward(x1, g1));
    CHECK(value_of(r0.loss) == v0);
    CHECK(value_of(r1.loss) == v1);
    CHECK(as_matrix(r0.grad) == rounded(g0, dtype));
    CHECK(as_matrix(r1.grad) == rounded(g1, at::kFloat));
  };
  switch (dtype) {
    case at::kDouble:
      reference(double{});
      break;
    case at::kBFloat16:
      reference(Eigen::bfloat16{});
      break;
    case at::kHalf:
      reference(Eigen::half{});
      break;
    default:
      reference(float{});
      break;
  }

  SECTION("a step's micro-batches share one dtype; reset starts the next step") {
    const at::ScalarType other = dtype == at::kDouble ? at::kFloat : at::kDouble;
    balance.reset();
    balance.count(micro[0]);
    CHECK_THROWS_WITH(balance.count(micro[1].to(other)),
                      Contains("moebal::TorchGlobalBatchBalance::count: argument 'logits': "
                               "expected this step's dtype, " +
                               dtype_name(dtype)) &&
                          Contains("got dtype " + dtype_name(other)));
    balance.reset();
    balance.count(micro[1].to(other));  // a new step may change the dtype
    balance.synchronize();
    CHECK(balance.global_tokens() == 14.0);
    CHECK_NOTHROW(balance.forward_backward(micro[1].to(other)));
  }
  SECTION("invalid contents are deferred to synchronize, tensor errors throw at once") {
    balance.reset();
    balance.count(micro[0].narrow(1, 0, kN - 1));  // N - 1 columns: deferred
    CHECK_THROWS_AS(balance.synchronize(), moebal::invalid_argument);
    balance.reset();
    CHECK_THROWS_WITH(balance.count(at::zeros({3, kN}, at::kLong)),
                      Contains("argument 'logits'") && Contains("got dtype int64"));
    CHECK_THROWS_WITH(balance.forward_backward(micro[0]),
                      Contains("moebal::GlobalBatchBalance::forward"));
  }
}

TEST_CASE("torch_view and torch_mutable_view map tensor memory", "[torch][view]") {
  at::Tensor logits = random_logits(at::kFloat);
  const auto view = moebal::torch_view<float>(logits);
  CHECK(view.data() == logits.data_ptr<float>());
  CHECK(view.rows() == kT);
  CHECK(view.cols() == kN);
  at::Tensor grad = at::zeros({kB, kS, kN}, at::kFloat);
  auto out = moebal::torch_mutable_view<float>(grad);
  CHECK(out.rows() == kT);
  moebal::SwitchAuxLoss<float> loss(kN, kK);
  const float value = loss.forward(view);
  loss.backward_accumulate(view, out);
  const auto ref = moebal::switch_aux_loss(view, kK);
  CHECK(value == ref.loss);
  CHECK(as_matrix(grad) == ref.grad.cast<double>());
  const at::Tensor half = logits.to(at::kHalf);
  CHECK(moebal::torch_view<Eigen::half>(half).cast<float>() ==
        moebal::torch_view<float>(half.to(at::kFloat)));

  CHECK_THROWS_WITH(moebal::torch_view<double>(logits),
                    Contains("moebal::torch_view: argument 'tensor': expected dtype float64") &&
                        Contains("got dtype float32"));
  CHECK_THROWS_WITH(moebal::torch_view<float>(logits.t()),
                    Contains("expected a contiguous last dimension"));
  CHECK_THROWS_WITH(moebal::torch_view<float>(logits.view({-1})),
                    Contains("expected a 2-D [T, N] or 3-D [B, S, N] tensor, got a 1-D tensor"));
}

TEST_CASE("torch functions reject bad tensors with the library message", "[torch][errors]") {
  const at::Tensor logits = random_logits(at::kFloat);

  SECTION("a tensor on another device (meta: what a CUDA tensor triggers)") {
    const at::Tensor meta = at::empty({kT, kN}, at::TensorOptions().device(at::kMeta));
    CHECK_THROWS_WITH(moebal::switch_aux_loss(meta, kK),
                      Contains("moebal::switch_aux_loss: argument 'logits': expected a CPU "
                               "tensor") &&
                          Contains("got a tensor on meta"));
    CHECK_THROWS_AS(moebal::z_loss(meta), moebal::invalid_argument);
    CHECK_THROWS_AS(moebal::route(meta, kK), moebal::invalid_argument);
    CHECK_THROWS_WITH(moebal::switch_aux_loss(logits, kK, {}, at::ones({kT}, at::kMeta)),
                      Contains("moebal::switch_aux_loss: argument 'mask': expected a CPU tensor, "
                               "on the logits' device (cpu), got a tensor on meta"));
  }
  SECTION("integer, bool and complex logits") {
    for (const auto dtype : {at::kLong, at::kInt, at::kBool, at::kByte, at::kComplexFloat}) {
      CAPTURE(dtype_name(dtype));
      CHECK_THROWS_WITH(moebal::switch_aux_loss(at::zeros({kT, kN}, dtype), kK),
                        Contains("moebal::switch_aux_loss: argument 'logits': expected a "
                                 "floating-point tensor (float32, float64, bfloat16 or float16), "
                                 "got dtype " +
                                 dtype_name(dtype)));
    }
    CHECK_THROWS_WITH(moebal::cv2_importance_loss(at::zeros({kT, kN}, at::kLong), kK),
                      Contains("moebal::cv2_importance_loss: argument 'logits'"));
  }
  SECTION("a rank other than 2 or 3") {
    CHECK_THROWS_WITH(moebal::switch_aux_loss(logits.view({-1}), kK),
                      Contains("moebal::switch_aux_loss: argument 'logits': expected a 2-D [T, N] "
                               "(tokens x experts) or 3-D [B, S, N] (batch x sequence x experts) "
                               "tensor, got a 1-D tensor of shape [192]"));
    CHECK_THROWS_WITH(moebal::z_loss(logits.view({2, 2, 6, kN})),
                      Contains("got a 4-D tensor of shape [2, 2, 6, 8]"));
    CHECK_THROWS_WITH(
        moebal::route(at::scalar_tensor(1.0), kK),
        Contains("moebal::route: argument 'logits'") && Contains("got a 0-D tensor of shape []"));
  }
  SECTION("an undefined tensor") {
    CHECK_THROWS_WITH(moebal::switch_aux_loss(at::Tensor(), kK),
                      Contains("argument 'logits': expected a defined tensor, got an undefined "
                               "tensor"));
  }
  SECTION("masks of the wrong shape, length or dtype") {
    CHECK_THROWS_WITH(moebal::switch_aux_loss(logits, kK, {}, at::ones({kT - 1})),
                      Contains("moebal::switch_aux_loss: argument 'mask': expected one element "
                               "per token (length T = 24, logits.rows()), got length 23"));
    CHECK_THROWS_WITH(moebal::switch_aux_loss(logits, kK, {}, at::ones({kB, kS})),
                      Contains("argument 'mask': expected a 1-D tensor of length T = 24 (one "
                               "element per token), got a 2-D tensor of shape [4, 6]"));
    CHECK_THROWS_WITH(
        moebal::switch_aux_loss(logits.view({kB, kS, kN}), kK, {}, at::ones({kS, kB})),
        Contains("expected a 1-D tensor of length T = 24 or a [B, S] = [4, 6] "
                 "tensor (one element per token), got a 2-D tensor of shape [6, 4]"));
    CHECK_THROWS_WITH(moebal::z_loss(logits, {}, at::ones({kT}, at::kComplexFloat)),
                      Contains("moebal::z_loss: argument 'mask': expected a bool, integer or "
                               "floating-point tensor, got dtype complex64"));
    at::Tensor nan_mask = at::ones({kT});
    nan_mask[3] = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH(moebal::switch_aux_loss(logits, kK, {}, nan_mask),
                      Contains("argument 'mask'") && Contains("NaN at element 3"));
    Eigen::VectorXi keep = Eigen::VectorXi::Ones(kT);
    moebal::SwitchOptions with_mask;
    with_mask.mask = keep;
    CHECK_THROWS_WITH(moebal::switch_aux_loss(logits, kK, with_mask, at::ones({kT})),
                      Contains("argument 'options.mask': expected an empty TokenMask when a "
                               "mask tensor is given, got a TokenMask of length 24"));
    CHECK_NOTHROW(moebal::switch_aux_loss(logits, kK, with_mask));
  }
  SECTION("the Eigen API's own checks come through") {
    CHECK_THROWS_WITH(moebal::switch_aux_loss(logits, kN + 1),
                      Contains("moebal::switch_aux_loss: argument 'k': expected 1 <= k <= N"));
    at::Tensor bad = logits.clone();
    bad[2][5] = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH(moebal::switch_aux_loss(bad, kK),
                      Contains("argument 'logits'") && Contains("NaN"));
    CHECK_THROWS_WITH(moebal::z_loss(at::zeros({0, kN})),
                      Contains("moebal::z_loss: argument 'logits'") && Contains("empty batch"));
  }
  SECTION("sequence layouts") {
    const at::Tensor logits3 = logits.view({kB, kS, kN});
    CHECK_THROWS_WITH(
        moebal::sequence_aux_loss(logits3, kK, moebal::SequenceLayout::sequence_major(kS)),
        Contains("moebal::sequence_aux_loss: argument 'layout': expected batch_major(S) with "
                 "S = logits.size(1) = 6 for 3-D logits [B, S, N]") &&
            Contains("got sequence_major(6)"));
    CHECK_THROWS_WITH(
        moebal::sequence_aux_loss(logits3, kK, moebal::SequenceLayout::batch_major(3)),
        Contains("got batch_major(3)"));
    CHECK_THROWS_WITH(moebal::sequence_aux_loss(logits, kK),
                      Contains("moebal::sequence_aux_loss: argument 'logits': expected 3-D "
                               "[B, S, N] logits when no layout is given"));
    moebal::CombinedOptions combined;
    combined.weights.sequence = 1.0;
    combined.layout = moebal::SequenceLayout::segments({kT});
    CHECK_THROWS_WITH(moebal::combined_aux_loss(logits3, kK, combined),
                      Contains("moebal::combined_aux_loss: argument 'layout'") &&
                          Contains("got segments of 1 sequences"));
  }
  SECTION("route_backward arguments") {
    const auto r = moebal::route(logits, kK);
    CHECK_THROWS_WITH(moebal::route_backward(logits, r.indices.to(at::kFloat), r.weights),
                      Contains("moebal::route_backward: argument 'indices': expected an integer "
                               "tensor (as route returns: int64), got dtype float32"));
    CHECK_THROWS_WITH(moebal::route_backward(logits, r.indices, r.indices),
                      Contains("argument 'dloss_dweights': expected a floating-point tensor, "
                               "got dtype int64"));
    CHECK_THROWS_WITH(moebal::route_backward(logits, r.indices.narrow(0, 0, 5), r.weights),
                      Contains("argument 'indices': expected shape [24, k] (k experts per "
                               "token, as route returns), got shape [5, 2]"));
    CHECK_THROWS_WITH(moebal::route_backward(logits, r.indices, r.weights.narrow(1, 0, 1)),
                      Contains("argument 'dloss_dweights': expected the shape of indices, "
                               "[24, 2], got shape [24, 1]"));
  }
}
