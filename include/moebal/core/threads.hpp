// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// The thread count of moebal's kernels: one process-wide setting, `moebal::set_num_threads`.
///
/// Every kernel that reads the T x N logits (each loss, the router) splits the tokens into
/// chunks of a fixed size (independent of the thread count) and runs them on up to
/// `num_threads()` OpenMP threads; sums over tokens are built from per-block partials combined
/// in block order (or, for per-sequence sums, one sequence per thread in row order). Results
/// (loss, statistics, gradient, router output) are therefore bitwise identical for any thread
/// count, 1 included.
///
/// Threads are used only when the including translation unit is compiled with OpenMP
/// (`_OPENMP`; CMake: moebal::moebal links OpenMP::OpenMP_CXX when MOEBAL_WITH_OPENMP is ON and
/// OpenMP is found). Without it every kernel runs on the calling thread and `num_threads()`
/// returns 1. The setting is like `torch.set_num_threads` and `Eigen::setNbThreads`: global to
/// the process, read at the start of each call.

#include <atomic>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "moebal/core/error.hpp"

namespace moebal {
namespace detail {
/// 0 = OpenMP's default (omp_get_max_threads()), else the requested count.
inline std::atomic<int> requested_threads{0};
}  // namespace detail

/// Sets how many threads moebal's kernels may use from now on, process-wide.
/// @param threads >= 1: at most that many OpenMP threads per call (1 = the calling thread
///   only); 0: OpenMP's default, `omp_get_max_threads()` (OMP_NUM_THREADS, else one per core).
///   Results do not depend on it (bitwise), only the speed does.
/// @throws moebal::invalid_argument for threads < 0.
inline void set_num_threads(int threads) {
  if (threads < 0) {
    detail::throw_invalid("moebal::set_num_threads", "threads",
                          "0 (OpenMP's default) or a positive thread count",
                          detail::concat(threads));
  }
  detail::requested_threads.store(threads, std::memory_order_relaxed);
}

/// The number of threads a kernel call may use now: the `set_num_threads` setting, OpenMP's
/// default for 0, and always 1 when compiled without OpenMP or called from inside an OpenMP
/// parallel region (moebal does not nest parallel regions).
inline int num_threads() {
#ifdef _OPENMP
  if (omp_in_parallel()) return 1;
  const int requested = detail::requested_threads.load(std::memory_order_relaxed);
  return requested > 0 ? requested : omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace moebal
