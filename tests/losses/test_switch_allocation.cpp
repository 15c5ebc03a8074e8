// SPDX-License-Identifier: Apache-2.0
// SwitchAuxLoss allocates nothing in steady state: after a first call at the largest batch,
// forward, backward, backward_accumulate and forward_backward neither call operator new nor
// let Eigen allocate. Built as its own executable because it replaces the global operator new
// and compiles Eigen with EIGEN_RUNTIME_NO_MALLOC.

#include <cstdlib>
#include <new>
#include <stdexcept>

#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x) \
  do {                  \
    if (!(x)) throw std::logic_error("Eigen assertion failed: " #x); \
  } while (false)

#include <catch2/catch.hpp>

#include "moebal/losses/switch.hpp"

namespace {
bool counting = false;
long allocations = 0;
}  // namespace

void* operator new(std::size_t size) {
  if (counting) ++allocations;
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace {

// Counts operator new and forbids Eigen heap allocation inside its scope.
class NoAllocationScope {
 public:
  NoAllocationScope() {
    allocations = 0;
    counting = true;
    Eigen::internal::set_is_malloc_allowed(false);
  }
  ~NoAllocationScope() {
    counting = false;
    Eigen::internal::set_is_malloc_allowed(true);
  }
};

}  // namespace

TEMPLATE_TEST_CASE("SwitchAuxLoss: no allocation in steady state", "[loss][switch][alloc]",
                   float, double) {
  using T = TestType;
  using moebal::RowMatrix;
  const moebal::Index rows = 1500, cols = 32;
  const RowMatrix<T> logits = RowMatrix<T>::Random(rows, cols);
  RowMatrix<T> grad(rows, cols);
  Eigen::VectorXi mask = Eigen::VectorXi::Ones(rows);
  mask[7] = 0;
  for (const auto score : {moebal::ScoreFunction::softmax, moebal::ScoreFunction::sigmoid}) {
    for (const moebal::Index k : {moebal::Index(2), moebal::Index(20)}) {
      moebal::SwitchOptions options;
      options.score = score;
      moebal::SwitchAuxLoss<T> loss(cols, k, options);
      loss.forward_backward(logits, grad, moebal::TokenMask(mask));  // sizes the workspace
      T value = 0;
      {
        NoAllocationScope scope;
        value = loss.forward(logits, moebal::TokenMask(mask));
        loss.backward(logits, grad);
        loss.backward_accumulate(logits, grad, T(0.5));
        loss.forward_backward(logits, grad, moebal::TokenMask(mask));
        // A smaller batch reuses the same workspace.
        loss.forward_backward(logits.topRows(100), grad.topRows(100));
      }
      CHECK(allocations == 0);
      CHECK(value > T(0));
      // The guard is live: an allocating Eigen operation inside a scope is caught.
      {
        NoAllocationScope scope;
        CHECK_THROWS_AS(RowMatrix<T>(RowMatrix<T>::Zero(4, 4)), std::logic_error);
      }
    }
  }
}
