// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// The umbrella header: everything in moebal that needs only Eigen and the standard library.
/// The public finite-difference helper is `<moebal/testing/gradcheck.hpp>` (opt-in).

#include "moebal/version.hpp"

#include "moebal/core/error.hpp"
#include "moebal/core/scores.hpp"
#include "moebal/core/statistics.hpp"
#include "moebal/core/topk.hpp"
#include "moebal/core/types.hpp"
#include "moebal/losses/switch.hpp"
