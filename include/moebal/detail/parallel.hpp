// SPDX-License-Identifier: Apache-2.0
#pragma once

// Internal: chunked loops over tokens on OpenMP threads, deterministic for any thread count.
//
// Tokens are split into chunks of a fixed number of rows. `for_chunks_ordered` runs
// body(thread, chunk) on the threads (round-robin, chunk c on thread c % threads) and then
// combine(thread, chunk) strictly in chunk order (an OpenMP `ordered` region), so a sum built by
// `combine` is rounded exactly as the sequential loop rounds it: bitwise identical for any
// thread count, with O(N x threads) memory for the partials. `for_chunks` runs independent
// chunks (per-row outputs) with a static schedule. Without OpenMP both are plain loops.
// An exception thrown by body or combine does not cross the parallel region: the one of the
// lowest chunk is rethrown after it (the one the sequential loop would have thrown first).

#include <algorithm>
#include <exception>

#include "moebal/core/threads.hpp"
#include "moebal/core/types.hpp"

namespace moebal {
namespace detail {

/// The threads a call over `chunks` chunks uses: num_threads(), at most one per chunk.
inline int threads_for(Index chunks) {
  const int threads = num_threads();
  return static_cast<int>(std::max<Index>(1, std::min<Index>(threads, chunks)));
}

/// Keeps the exception of the lowest chunk that threw.
class ChunkErrors {
 public:
  void record(Index chunk, std::exception_ptr error) {
#ifdef _OPENMP
#pragma omp critical(moebal_chunk_errors)
#endif
    {
      if (error_ == nullptr || chunk < chunk_) {
        chunk_ = chunk;
        error_ = error;
      }
    }
  }
  void rethrow() const {
    if (error_ != nullptr) std::rethrow_exception(error_);
  }

 private:
  Index chunk_ = 0;
  std::exception_ptr error_;
};

/// body(thread, chunk) for chunk in [0, chunks) on `threads` threads, then combine(thread,
/// chunk) in increasing chunk order. `thread` is in [0, threads): the index of per-thread
/// scratch. A chunk whose body threw is not combined; the lowest such chunk's exception is
/// rethrown at the end.
template <class Body, class Combine>
void for_chunks_ordered(Index chunks, int threads, Body&& body, Combine&& combine) {
  if (threads <= 1 || chunks <= 1) {
    for (Index c = 0; c < chunks; ++c) {
      body(0, c);
      combine(0, c);
    }
    return;
  }
#ifdef _OPENMP
  ChunkErrors errors;
#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num();
#pragma omp for ordered schedule(static, 1)
    for (Index c = 0; c < chunks; ++c) {
      bool ok = true;
      try {
        body(thread, c);
      } catch (...) {
        ok = false;
        errors.record(c, std::current_exception());
      }
#pragma omp ordered
      {
        if (ok) {
          try {
            combine(thread, c);
          } catch (...) {
            errors.record(c, std::current_exception());
          }
        }
      }
    }
  }
  errors.rethrow();
#else
  for (Index c = 0; c < chunks; ++c) {
    body(0, c);
    combine(0, c);
  }
#endif
}

/// body(thread, chunk) for independent chunks in [0, chunks) on `threads` threads (static
/// schedule). The lowest throwing chunk's exception is rethrown at the end.
template <class Body>
void for_chunks(Index chunks, int threads, Body&& body) {
  if (threads <= 1 || chunks <= 1) {
    for (Index c = 0; c < chunks; ++c) body(0, c);
    return;
  }
#ifdef _OPENMP
  ChunkErrors errors;
#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num();
#pragma omp for schedule(static)
    for (Index c = 0; c < chunks; ++c) {
      try {
        body(thread, c);
      } catch (...) {
        errors.record(c, std::current_exception());
      }
    }
  }
  errors.rethrow();
#else
  for (Index c = 0; c < chunks; ++c) body(0, c);
#endif
}

}  // namespace detail
}  // namespace moebal
