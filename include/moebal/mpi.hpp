// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// Opt-in MPI adapter for the global-batch losses (not included by <moebal/moebal.hpp>; needs
/// an MPI implementation, e.g. Debian's OpenMPI: `libopenmpi-dev`, link `MPI::MPI_CXX`).
///
///   moebal::MpiAllreduce sync(MPI_COMM_WORLD);
///   balance.synchronize(sync);            // GlobalBatchBalance
///   running.forward(logits, sync, mask);  // RunningGlobalBalance

#include <climits>
#include <string>

#include <mpi.h>

#include "moebal/core/error.hpp"
#include "moebal/core/types.hpp"

namespace moebal {

/// The synchronization callable over MPI: `MPI_Allreduce(MPI_IN_PLACE, data, size, MPI_DOUBLE,
/// MPI_SUM, comm)`. Every rank of `comm` must call it (moebal's global-batch losses do, in the
/// same order on every rank). Sums of integer-valued doubles are exact up to 2^53 whatever the
/// reduction order.
class MpiAllreduce {
 public:
  /// @param comm the communicator of the data-parallel ranks (not owned; must outlive this).
  explicit MpiAllreduce(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {}

  /// Sums data[0..size) over the ranks of the communicator, in place.
  /// @throws moebal::invalid_argument if size is negative or above INT_MAX;
  ///   std::runtime_error if MPI reports an error (with MPI's error string).
  void operator()(double* data, Index size) const {
    if (size < 0 || size > Index(INT_MAX)) {
      detail::throw_invalid("moebal::MpiAllreduce", "size", "0 <= size <= INT_MAX",
                            detail::concat(size));
    }
    const int status =
        MPI_Allreduce(MPI_IN_PLACE, data, static_cast<int>(size), MPI_DOUBLE, MPI_SUM, comm_);
    if (status != MPI_SUCCESS) {
      char message[MPI_MAX_ERROR_STRING];
      int length = 0;
      MPI_Error_string(status, message, &length);
      throw std::runtime_error("moebal::MpiAllreduce: MPI_Allreduce failed: " +
                               std::string(message, static_cast<std::size_t>(length)));
    }
  }

  MPI_Comm communicator() const noexcept { return comm_; }

 private:
  MPI_Comm comm_;
};

}  // namespace moebal
