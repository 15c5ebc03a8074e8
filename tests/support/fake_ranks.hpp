// SPDX-License-Identifier: Apache-2.0
#pragma once

// Test support: R "ranks" as threads of one process, with an all-reduce SUM callable that
// follows the global-batch synchronization contract. Lets the multi-rank protocol be tested
// without MPI (the MPI tests run the same checks over real processes).

#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "moebal/core/types.hpp"

namespace moebal_test {

class FakeWorld {
 public:
  explicit FakeWorld(int ranks) : ranks_(ranks) {}

  /// The all-reduce callable of one rank.
  struct Sync {
    FakeWorld* world;
    void operator()(double* data, moebal::Index size) const { world->all_reduce(data, size); }
  };

  /// Runs body(rank, sync) on every rank concurrently; returns each rank's exception message
  /// ("" if it returned normally).
  template <class Body>
  std::vector<std::string> run(Body&& body) {
    std::vector<std::string> errors(static_cast<std::size_t>(ranks_));
    std::vector<std::thread> threads;
    for (int r = 0; r < ranks_; ++r) {
      threads.emplace_back([&, r] {
        try {
          body(r, Sync{this});
        } catch (const std::exception& e) {
          errors[static_cast<std::size_t>(r)] = e.what();
        }
      });
    }
    for (auto& t : threads) t.join();
    return errors;
  }

 private:
  void all_reduce(double* data, moebal::Index size) {
    std::unique_lock<std::mutex> lock(mutex_);
    // Wait until the previous reduction has been read by every rank.
    wait(lock, [&] { return readers_ == 0; });
    if (arrived_ == 0) sum_.assign(static_cast<std::size_t>(size), 0.0);
    if (static_cast<moebal::Index>(sum_.size()) != size) {
      throw std::runtime_error("FakeWorld: ranks called all_reduce with different sizes");
    }
    for (moebal::Index i = 0; i < size; ++i) sum_[std::size_t(i)] += data[i];
    const long generation = generation_;
    if (++arrived_ == ranks_) {
      arrived_ = 0;
      readers_ = ranks_;
      ++generation_;
      changed_.notify_all();
    } else {
      wait(lock, [&] { return generation_ != generation; });
    }
    for (moebal::Index i = 0; i < size; ++i) data[i] = sum_[std::size_t(i)];
    if (--readers_ == 0) changed_.notify_all();
  }

  template <class Predicate>
  void wait(std::unique_lock<std::mutex>& lock, Predicate predicate) {
    if (!changed_.wait_for(lock, std::chrono::seconds(20), predicate)) {
      throw std::runtime_error("FakeWorld: a rank did not reach the all-reduce (would hang)");
    }
  }

  int ranks_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<double> sum_;
  int arrived_ = 0;
  int readers_ = 0;
  long generation_ = 0;
};

}  // namespace moebal_test
