// moebal: Mixture-of-Experts router load-balancing losses with analytic gradients.
// SPDX-License-Identifier: Apache-2.0
#pragma once

/// @file
/// The library version. CMake reads these three macros to set `project(moebal VERSION ...)`,
/// so this header is the single place the version is written.

#define MOEBAL_VERSION_MAJOR 0
#define MOEBAL_VERSION_MINOR 1
#define MOEBAL_VERSION_PATCH 0

/// The version as a string literal, e.g. "0.1.0".
#define MOEBAL_VERSION_STRING "0.1.0"
