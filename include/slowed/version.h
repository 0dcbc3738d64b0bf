#pragma once

// slowed version, kept equal to project(VERSION) in CMakeLists.txt (a test checks it).
#define SLOWED_VERSION_MAJOR 0
#define SLOWED_VERSION_MINOR 1
#define SLOWED_VERSION_PATCH 0

namespace slowed {
inline constexpr const char* version_string = "0.1.0";
}  // namespace slowed
