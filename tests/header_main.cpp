// Links the one-translation-unit-per-header objects (each compiled without the PCH) and checks
// that the version macros match the CMake project version.
#include <slowed/version.h>

#include <cstdio>
#include <cstring>
#include <string>

int main() {
  const std::string header = std::to_string(SLOWED_VERSION_MAJOR) + "." +
                             std::to_string(SLOWED_VERSION_MINOR) + "." +
                             std::to_string(SLOWED_VERSION_PATCH);
  if (header != SLOWED_PROJECT_VERSION || header != slowed::version_string) {
    std::fprintf(stderr, "version mismatch: slowed/version.h says %s (%s), CMake says %s\n",
                 header.c_str(), slowed::version_string, SLOWED_PROJECT_VERSION);
    return 1;
  }
  std::printf("%d public headers compiled on their own; version %s\n", SLOWED_HEADER_TU_COUNT,
              header.c_str());
  return 0;
}
