// SPDX-License-Identifier: Apache-2.0
#include <cmath>

#include <catch2/catch.hpp>

#include "moebal/losses/deepseek.hpp"
#include "moebal/losses/switch.hpp"
#include "moebal/testing/gradcheck.hpp"
#include "support/matchers.hpp"
#include "support/random.hpp"

using moebal::DeviceBalanceOptions;
using moebal::Index;
using moebal::RowMatrix;
using moebal::ScoreFunction;
using moebal_test::as_double;
using moebal_test::IsCloseTo;
using moebal_test::random_logits;

TEST_CASE("DeepSeek-V2 device terms: gradients match central differences",
          "[loss][deepseek][grad]") {
  const RowMatrix<double> x = random_logits(11, 8, 1.5, 51);
  Eigen::VectorXi mask = Eigen::VectorXi::Ones(11);
  mask[5] = 0;
  for (const Index devices : {Index(2), Index(4)}) {
    for (const Index k : {Index(1), Index(3)}) {
      for (const auto score : {ScoreFunction::softmax, ScoreFunction::sigmoid}) {
        for (const bool comm : {false, true}) {
          DeviceBalanceOptions o;
          o.devices = devices;
          o.max_devices = comm ? 2 : 1;
          o.score = score;
          o.coefficient = 0.6;
          o.mask = moebal::TokenMask(mask);
          auto loss = [&](const RowMatrix<double>& z) {
            return comm ? moebal::communication_balance_loss(z, k, o)
                        : moebal::device_balance_loss(z, k, o);
          };
          const auto r = loss(x);
          auto f = [&](const RowMatrix<double>& z) { return double(loss(z).loss); };
          const auto report = moebal::testing::gradcheck(f, x, r.grad);
          INFO("D = " << devices << ", k = " << k << ", " << moebal::to_string(score)
                      << (comm ? ", communication" : ", device") << ": " << report.message());
          CHECK(report.passed);
          CHECK(r.grad.row(5).isZero(0));
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("DeepSeek-V2 device terms: identities", "[loss][deepseek]", float, double) {
  using T = TestType;
  const double rel = std::is_same<T, float>::value ? 1e-5 : 1e-13;
  const RowMatrix<T> x = random_logits(30, 8, 1.0, 52).cast<T>();
  DeviceBalanceOptions o;
  o.coefficient = 0.3;
  // D = N: each device is one expert, f'_d = f_i = N c_i / (k T), so the device loss is the
  // Megatron Switch loss.
  o.devices = 8;
  moebal::SwitchOptions s;
  s.coefficient = 0.3;
  const auto device = moebal::device_balance_loss(x, 2, o);
  const auto switch_loss = moebal::switch_aux_loss(x, 2, s);
  CHECK(double(device.loss) == Approx(double(switch_loss.loss)).epsilon(rel));
  CHECK_THAT(as_double(device.grad),
             IsCloseTo(switch_loss.grad.template cast<double>(), rel * 1e-2, rel * 10));
  // D = 1: f'_1 = mean_i f_i = N (T k) / (N k T) = 1 and P'_1 = 1: L = a, gradient 0.
  o.devices = 1;
  const auto one = moebal::device_balance_loss(x, 2, o);
  CHECK(double(one.loss) == Approx(0.3).epsilon(rel));
  CHECK(as_double(one.grad).cwiseAbs().maxCoeff() < rel);
  // Communication with k = 1, D = N, M = 1: every token reaches exactly its expert's device,
  // f''_d = N c_d / T = f_d: the same as the device loss.
  o.devices = 8;
  o.max_devices = 1;
  const auto comm = moebal::communication_balance_loss(x, 1, o);
  const auto dev1 = moebal::device_balance_loss(x, 1, o);
  CHECK(double(comm.loss) == Approx(double(dev1.loss)).epsilon(rel));
  // Hand count: D = 2 devices of 4 experts; f''_d sums to D / (M T) * (tokens reaching d).
  o.devices = 2;
  o.max_devices = 2;
  const auto c2 = moebal::communication_balance_loss(x, 2, o);
  CHECK(c2.f.sum() >= 2.0 / 2.0 - 1e-12);  // every token reaches at least one device
  CHECK(c2.f.sum() <= 2.0 * 2.0 / 2.0 + 1e-12);
  CHECK(c2.P.sum() == Approx(1.0).epsilon(1e-6));
}

TEST_CASE("DeepSeek-V2 device terms: bad input", "[loss][deepseek][errors]") {
  const RowMatrix<double> x = RowMatrix<double>::Zero(4, 6);
  DeviceBalanceOptions o;
  o.devices = 4;
  CHECK_THROWS_WITH(moebal::device_balance_loss(x, 2, o),
                    "moebal::device_balance_loss: argument 'options.devices': expected a number "
                    "of devices D >= 1 dividing N = 6, got D = 4");
  o.devices = 3;
  o.max_devices = 4;
  CHECK_THROWS_WITH(moebal::communication_balance_loss(x, 2, o),
                    "moebal::communication_balance_loss: argument 'options.max_devices': expected "
                    "1 <= M <= D = 3, got M = 4");
  o.max_devices = 1;
  CHECK_NOTHROW(moebal::device_balance_loss(x, 2, o));
  CHECK_THROWS_WITH(moebal::device_balance_loss(x, 7, o),
                    "moebal::device_balance_loss: argument 'k': expected 1 <= k <= N, the number "
                    "of experts (N = 6), got k = 7");
}
