// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// The umbrella header: everything in moebal that needs only Eigen and the standard library.
/// Opt-in, not included here: the finite-difference helper `<moebal/testing/gradcheck.hpp>`
/// the Eigen::Tensor adapter `<moebal/tensor.hpp>` and the MPI adapter `<moebal/mpi.hpp>`.

#include "moebal/version.hpp"

#include "moebal/core/error.hpp"
#include "moebal/core/scores.hpp"
#include "moebal/core/statistics.hpp"
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
