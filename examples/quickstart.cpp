// SPDX-License-Identifier: Apache-2.0
// moebal quick start: the Switch load-balancing loss of 4096 tokens routed to 8 experts (k = 2)
// under each framework's convention, its statistics, and its gradient added into a router's
// logit gradient, the way a trainer would.

#include <cstdio>
#include <random>

#include <moebal/moebal.hpp>

int main() {
  const moebal::Index tokens = 4096, experts = 8, k = 2;

  // Router logits, tokens x experts, row-major (as a PyTorch tensor is laid out). A skewed
  // router: expert 0 is favoured, expert 7 avoided.
  std::mt19937 engine(2024);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  moebal::RowMatrix<float> logits(tokens, experts);
  for (moebal::Index t = 0; t < tokens; ++t) {
    for (moebal::Index e = 0; e < experts; ++e) {
      logits(t, e) = normal(engine) + 0.6f * float(experts / 2 - e) / float(experts);
    }
  }

  std::printf("moebal %s quick start: T = %lld tokens, N = %lld experts, k = %lld\n\n",
              MOEBAL_VERSION_STRING, static_cast<long long>(tokens),
              static_cast<long long>(experts), static_cast<long long>(k));

  const moebal::SwitchConvention conventions[] = {moebal::SwitchConvention::megatron,
                                                  moebal::SwitchConvention::huggingface,
                                                  moebal::SwitchConvention::first_choice};
  std::printf("%-14s %10s %10s %14s\n", "convention", "loss", "balanced", "loss/balanced");
  for (const auto convention : conventions) {
    moebal::SwitchOptions options;
    options.convention = convention;
    const auto r = moebal::switch_aux_loss(logits, k, options);
    std::printf("%-14s %10.6f %10.6f %14.6f\n", moebal::to_string(convention), double(r.loss),
                r.stats.balanced_value, double(r.loss) / r.stats.balanced_value);
  }

  // The default convention (Megatron-core) with a coefficient, as a trainer would call it.
  moebal::SwitchOptions options;
  options.coefficient = 1e-2;
  const auto r = moebal::switch_aux_loss(logits, k, options);
  std::printf("\n%-8s %16s %10s %10s\n", "expert", "tokens (top-k)", "f_i", "P_i");
  for (moebal::Index e = 0; e < experts; ++e) {
    std::printf("%-8lld %16lld %10.5f %10.5f\n", static_cast<long long>(e),
                static_cast<long long>(r.stats.tokens_per_expert[e]), r.stats.f[e], r.stats.P[e]);
  }

  // A trainer's router gradient (d task loss / d logits, here a stand-in) receives the
  // balance loss's gradient: d (task + a L) / d logits.
  moebal::RowMatrix<float> router_grad = moebal::RowMatrix<float>::Constant(tokens, experts, 1e-4f);
  router_grad += r.grad;

  // The same without allocating, with a reusable loss object accumulating into the buffer.
  moebal::SwitchAuxLoss<float> loss(experts, k, options);
  moebal::RowMatrix<float> router_grad2 = moebal::RowMatrix<float>::Constant(tokens, experts, 1e-4f);
  const float value = loss.forward(logits);
  loss.backward_accumulate(logits, router_grad2);

  std::printf("\nloss with a = 0.01: %.6g (reusable object: %.6g)\n", double(r.loss),
              double(value));
  std::printf("|d L / d logits| = %.6g; router gradient row 0 after adding it:", double(r.grad.norm()));
  for (moebal::Index e = 0; e < experts; ++e) std::printf(" %+.3e", double(router_grad(0, e)));
  std::printf("\nboth forms agree: %s\n",
              (router_grad - router_grad2).cwiseAbs().maxCoeff() == 0.0f ? "yes" : "no");
  return 0;
}
