// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// The umbrella header: everything in moebal that needs only Eigen and the standard library.
/// Opt-in, not included here: the finite-difference helper `<moebal/testing/gradcheck.hpp>`
/// the Eigen::Tensor adapter `<moebal/tensor.hpp>`, the MPI adapter `<moebal/mpi.hpp>` and
/// the libtorch adapter `<moebal/torch.hpp>`.
///
/// Threads and determinism: the free functions are reentrant (they share no state) and may be
/// called from any number of threads at once. A loss, router or balancer object (SwitchAuxLoss,
/// GlobalBatchBalance, Router, ExpertBiasBalancer, ...) holds its workspace and the state of
/// its last forward: use one object per thread, or serialize the calls; distinct objects may
/// be used concurrently. A `TokenMask` is a view: the memory it views must outlive the calls,
/// and must not be written while they run. The same inputs give bitwise identical results on
/// every call, fresh or reused objects alike, and seeded noise and random drop priorities are
/// reproducible (std::mt19937_64, the same on every machine).

#include "moebal/version.hpp"

#include "moebal/core/error.hpp"
#include "moebal/core/scores.hpp"
#include "moebal/core/statistics.hpp"
#include "moebal/core/threads.hpp"
#include "moebal/core/topk.hpp"
#include "moebal/core/types.hpp"
#include "moebal/losses/combined.hpp"
#include "moebal/losses/cv2.hpp"
#include "moebal/losses/deepseek.hpp"
#include "moebal/losses/global_batch.hpp"
#include "moebal/losses/layers.hpp"
#include "moebal/losses/sequence.hpp"
#include "moebal/losses/switch.hpp"
#include "moebal/losses/z.hpp"
#include "moebal/metrics.hpp"
#include "moebal/routers/capacity.hpp"
#include "moebal/routers/expert_bias.hpp"
#include "moebal/routers/expert_choice.hpp"
#include "moebal/routers/noise.hpp"
#include "moebal/routers/presets.hpp"
#include "moebal/routers/router.hpp"
#include "moebal/routers/sinkhorn.hpp"
