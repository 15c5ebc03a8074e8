// SPDX-License-Identifier: Apache-2.0
// Micro-batch versus global-batch balance (Qiu et al. 2025) on a toy router.
//
// Four "domains" of tokens; each domain's tokens are best served by two experts of eight (a
// task signal pulls them there). A gradient-accumulation step has M micro-batches, each drawn
// from one domain (as a data loader that packs documents by source would), and trains a
// per-domain router bias with the task signal plus a balance loss:
//   micro-batch balance: f from each micro-batch alone, so every single-domain micro-batch is
//     pushed to use every expert: domains cannot specialize;
//   global balance: f from the whole step (all micro-batches, all ranks), so only the total
//     load must be even: each domain keeps its own experts.
// Runs on one process, or under `mpiexec -n R` (R dividing 4) when built with MPI, where each
// rank holds 4 / R of the micro-batches and the counts are summed with MPI_Allreduce.

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <moebal/moebal.hpp>

#ifdef MOEBAL_EXAMPLE_WITH_MPI
#include <moebal/mpi.hpp>
#endif

namespace {

using moebal::Index;
using moebal::RowMatrix;

constexpr Index kExperts = 8, kTopK = 2, kDomains = 4, kTokens = 256;
constexpr int kSteps = 60;
constexpr double kBalanceCoefficient = 1.0, kLearningRate = 2.0;

struct World {
  int rank = 0, size = 1;
  void sum(double* data, Index size_) const {
#ifdef MOEBAL_EXAMPLE_WITH_MPI
    moebal::MpiAllreduce()(data, size_);
#else
    (void)data;
    (void)size_;
#endif
  }
};

// One micro-batch: tokens of one domain, logits = the domain's bias + fixed token noise.
RowMatrix<double> logits_of(const RowMatrix<double>& bias, Index domain,
                            const RowMatrix<double>& noise) {
  RowMatrix<double> x = noise;
  x.rowwise() += bias.row(domain);
  return x;
}

// The task signal: d/dx of -(1/2) sum_{e in domain's experts} log p_e, i.e. p - target, where
// the target puts 1/2 on experts 2d and 2d + 1.
RowMatrix<double> task_gradient(const RowMatrix<double>& x, Index domain) {
  RowMatrix<double> g = moebal::softmax(x);
  g.col(2 * domain).array() -= 0.5;
  g.col(2 * domain + 1).array() -= 0.5;
  return g / double(x.rows());
}

struct Summary {
  moebal::SpecializationMetrics specialization;
  Eigen::Matrix<std::int64_t, Eigen::Dynamic, Eigen::Dynamic> table;
  moebal::BalanceMetrics global_load;
};

Summary train(bool global, const World& world, const std::vector<RowMatrix<double>>& noise) {
  RowMatrix<double> bias = RowMatrix<double>::Zero(kDomains, kExperts);
  const int local = int(kDomains) / world.size;  // micro-batches (domains) on this rank
  moebal::GlobalBatchBalance<double> balance(kExperts, kTopK);
  moebal::SwitchAuxLoss<double> micro(kExperts, kTopK);
  std::printf("\n== %s balance ==\n%5s %14s %14s   %-40s %s\n", global ? "global" : "micro-batch",
              "step", "micro loss", "global loss", "load of micro-batch 0 (tokens/expert)",
              "global load");
  for (int step = 0; step <= kSteps; ++step) {
    RowMatrix<double> grad_bias = RowMatrix<double>::Zero(kDomains, kExperts);
    std::vector<RowMatrix<double>> xs;
    for (int j = 0; j < local; ++j) {
      xs.push_back(logits_of(bias, world.rank * local + j, noise[std::size_t(j)]));
    }
    balance.reset();
    for (const auto& x : xs) balance.count(x);
    balance.synchronize([&](double* d, Index n) { world.sum(d, n); });
    double micro_loss = 0.0, global_loss = 0.0;
    Eigen::VectorXd micro0_load;
    for (int j = 0; j < local; ++j) {
      const Index domain = world.rank * local + j;
      const RowMatrix<double>& x = xs[std::size_t(j)];
      RowMatrix<double> g_micro(x.rows(), x.cols()), g_global(x.rows(), x.cols());
      // Each mode's own value is reported; only the chosen one trains. The micro-batch loss is
      // averaged over the step's micro-batches (scale 1 / M_total).
      micro_loss += double(micro.forward_backward(x, g_micro)) / double(kDomains);
      if (j == 0) micro0_load = micro.statistics().counts();
      global_loss += double(balance.forward_backward(x, g_global));
      RowMatrix<double> g = task_gradient(x, domain) / double(kDomains);
      g += kBalanceCoefficient * (global ? g_global : RowMatrix<double>(g_micro / double(kDomains)));
      grad_bias.row(domain) += g.colwise().sum();
    }
    world.sum(grad_bias.data(), grad_bias.size());  // data-parallel gradient
    double losses[2] = {micro_loss, global_loss};
    world.sum(losses, 2);
    bias -= kLearningRate * grad_bias;
    if (world.rank == 0 && step % 10 == 0) {
      std::string load0, load;
      for (Index e = 0; e < kExperts; ++e) load0 += std::to_string(Index(micro0_load[e])) + " ";
      const Eigen::VectorXd& counts = balance.global_counts();
      for (Index e = 0; e < kExperts; ++e) load += std::to_string(Index(counts[e])) + " ";
      std::printf("%5d %14.6f %14.6f   %-40s %s\n", step, losses[0], losses[1], load0.c_str(),
                  load.c_str());
    }
  }
  // Domain x expert table of the trained router (every rank builds the full table).
  Summary summary;
  RowMatrix<double> all(kDomains * kTokens, kExperts);
  Eigen::Matrix<Index, Eigen::Dynamic, 1> domains(kDomains * kTokens);
  for (Index d = 0; d < kDomains; ++d) {
    all.middleRows(d * kTokens, kTokens) = logits_of(bias, d, noise[std::size_t(d % local)]);
    domains.segment(d * kTokens, kTokens).setConstant(d);
  }
  summary.table = moebal::domain_expert_counts(all, kTopK, domains, kDomains);
  summary.specialization = moebal::specialization_metrics(summary.table);
  summary.global_load = moebal::balance_metrics(summary.table.colwise().sum().transpose());
  return summary;
}

void report(const char* name, const Summary& s) {
  std::printf("\n%s balance, trained router: tokens per expert for each domain (top-%lld)\n", name,
              static_cast<long long>(kTopK));
  for (Index d = 0; d < kDomains; ++d) {
    std::printf("  domain %lld:", static_cast<long long>(d));
    for (Index e = 0; e < kExperts; ++e) std::printf(" %4lld", static_cast<long long>(s.table(d, e)));
    std::printf("\n");
  }
  std::printf("  normalized mutual information (domain, expert) = %.3f, mean top-expert share = "
              "%.3f, global MaxVio = %.3f\n",
              s.specialization.normalized_mutual_information,
              s.specialization.mean_top_expert_share, s.global_load.max_vio);
}

}  // namespace

int main(int argc, char** argv) {
  World world;
#ifdef MOEBAL_EXAMPLE_WITH_MPI
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &world.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world.size);
#else
  (void)argc;
  (void)argv;
#endif
  int status = 0;
  if (kDomains % world.size != 0) {
    if (world.rank == 0) std::printf("run with a number of ranks dividing %lld\n", static_cast<long long>(kDomains));
    status = 1;
  } else {
    // Fixed token noise per local micro-batch.
    std::mt19937 engine(7 + unsigned(world.rank));
    std::normal_distribution<double> normal(0.0, 0.5);
    std::vector<RowMatrix<double>> noise;
    for (Index j = 0; j < kDomains; ++j) {
      RowMatrix<double> n(kTokens, kExperts);
      for (Index i = 0; i < n.size(); ++i) n.data()[i] = normal(engine);
      noise.push_back(n);
    }
    if (world.rank == 0) {
      std::printf("moebal %s: %lld domains, %lld experts, top-%lld, %d rank(s); each micro-batch "
                  "holds one domain\n",
                  MOEBAL_VERSION_STRING, static_cast<long long>(kDomains),
                  static_cast<long long>(kExperts), static_cast<long long>(kTopK), world.size);
    }
    const Summary micro = train(false, world, noise);
    const Summary global = train(true, world, noise);
    if (world.rank == 0) {
      report("micro-batch", micro);
      report("global", global);
      std::printf("\nMicro-batch balance spreads every domain over every expert; global balance "
                  "keeps the total load even while each domain keeps its own experts.\n");
    }
  }
#ifdef MOEBAL_EXAMPLE_WITH_MPI
  MPI_Finalize();
#endif
  return status;
}
