// SPDX-License-Identifier: Apache-2.0
// A consumer of the moebal package: exits 0 only if the library gives the hand-derived value.
#include <cmath>
#include <cstdio>

#include <moebal/moebal.hpp>

int main() {
  // Two tokens, two experts, uniform logits, k = 1: ties go to expert 0, so f = (1, 0),
  // P = (1/2, 1/2), L = N sum f P = 1, and d L / d x = (1/4, -1/4) in each row.
  const moebal::RowMatrix<double> logits = moebal::RowMatrix<double>::Zero(2, 2);
  const auto r = moebal::switch_aux_loss(logits, 1);
  const bool ok = r.loss == 1.0 && r.grad(0, 0) == 0.25 && r.grad(1, 1) == -0.25 &&
                  r.stats.tokens_per_expert[0] == 2;
  std::printf("moebal %s: loss %.17g -> %s\n", MOEBAL_VERSION_STRING, r.loss, ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
