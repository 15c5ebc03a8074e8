// SPDX-License-Identifier: Apache-2.0
#pragma once

// Internal: chunked loops over tokens on OpenMP threads, deterministic for any thread count.
//
// Tokens are split into chunks of a fixed number of rows, and the chunks into at most
// kMaxBlocks blocks of consecutive chunks; the partition depends on T alone. A sum over tokens
// is built as: rows into a chunk partial, chunks in order into their block's partial, blocks in
// order into the total (after the parallel loop). Each block is computed by one thread from
// start to end, so every partial rounds the same way whatever the thread count, and the threads
// never wait for each other inside the loop (one barrier at its end). Sums of integers (counts)
// are exact in double and may be combined per thread. Memory: O(N) per thread plus
// O(N x kMaxBlocks) for the block partials.
// (Combining every chunk's partial in chunk order through an OpenMP `ordered` region was the
// first design: one hand-over between threads per chunk made two threads 40x slower than one
// while the machine was shared.) `for_chunks` runs independent chunks (per-row outputs) with a
// static schedule. Without OpenMP both are plain loops.
// An exception thrown inside a loop does not cross the parallel region: the one of the lowest
// block or chunk is rethrown after it (the one the sequential loop would have thrown first).

#include <algorithm>
#include <exception>
#include <utility>
#include <vector>

#include "moebal/core/threads.hpp"
#include "moebal/core/types.hpp"

namespace moebal {
namespace detail {

/// The threads a call over `chunks` chunks uses: num_threads(), at most one per chunk.
inline int threads_for(Index chunks) {
  const int threads = num_threads();
  return static_cast<int>(std::max<Index>(1, std::min<Index>(threads, chunks)));
}

/// Grows a kernel's per-thread scratch to `threads` lanes, sizing each new lane with
/// init(lane); allocates only when the thread count grows (steady state: never).
template <class Lane, class Init>
void ensure_lanes(std::vector<Lane>& lanes, int threads, Init&& init) {
  const std::size_t wanted = static_cast<std::size_t>(threads);
  if (lanes.size() >= wanted) return;
  const std::size_t old = lanes.size();
  lanes.resize(wanted);
  for (std::size_t i = old; i < wanted; ++i) init(lanes[i]);
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

/// At most this many blocks of consecutive chunks per call (see the file comment).
inline constexpr Index kMaxBlocks = 64;

/// The fixed partition of `chunks` chunks into blocks of `per_block` consecutive chunks.
struct BlockPartition {
  explicit BlockPartition(Index chunk_count)
      : chunks(chunk_count),
        per_block(std::max<Index>(1, (chunk_count + kMaxBlocks - 1) / kMaxBlocks)),
        blocks((chunk_count + per_block - 1) / per_block) {}
  Index begin(Index block) const { return block * per_block; }
  Index end(Index block) const { return std::min(chunks, (block + 1) * per_block); }

  Index chunks;
  Index per_block;
  Index blocks;
};

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

/// body(thread, block) for every block of the partition on `threads` threads (static
/// schedule: each block on one thread). The lowest throwing block's exception is rethrown.
template <class Body>
void for_blocks(const BlockPartition& partition, int threads, Body&& body) {
  for_chunks(partition.blocks, threads, std::forward<Body>(body));
}

}  // namespace detail
}  // namespace moebal
