// kernel_dump: writes every kernel source of the library's registry
// (slowed::cuda::all_kernel_sources()) and the test-only smoke kernels
// (tests/support/smoke_kernels.h), the list the NVRTC test compiles, as NVRTC compiles it,
// for the static kernel statistics of scripts/kernel_stats.py (docs/benchmarks.md). Needs
// libnvrtc, no GPU. Per source and variant, in DIR:
//
//   NAME.cu              the exact text handed to NVRTC (defines are options, listed in NAME.txt)
//   NAME.txt             family, identity, kernels, the NVRTC options for each architecture
//   NAME.sm_XY.cubin     NVRTC's cubin (the binary the library loads on sm_XY)
//   NAME.compute_XY.ptx  NVRTC's PTX for compute_XY (ptxas -v on it reports spills)
//
// NAME is family, then d<value> for each define (entropy_masked_ce_d1 is the bf16 variant).
// Usage: kernel_dump --out DIR [--arch 80] [--arch 90]   (default: 80 and 90)

#include <slowed/cuda/jit.h>
#include <slowed/cuda/kernels/registry.h>

#include "../tests/support/smoke_kernels.h"

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

namespace {

void write(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out || !(out << bytes)) {
    std::cerr << "kernel_dump: cannot write " << path << "\n";
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string out;
  std::vector<int> archs;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) {
      out = argv[++i];
    } else if (a == "--arch" && i + 1 < argc) {
      archs.push_back(std::atoi(argv[++i]));
    } else {
      std::cerr << "usage: kernel_dump --out DIR [--arch 80] [--arch 90]\n";
      return 2;
    }
  }
  if (out.empty()) {
    std::cerr << "usage: kernel_dump --out DIR [--arch 80] [--arch 90]\n";
    return 2;
  }
  if (archs.empty()) archs = {80, 90};
  if (!slowed::cuda::nvrtc_available()) {
    std::cerr << "kernel_dump: NVRTC is not available: " << slowed::cuda::nvrtc_unavailable_reason()
              << "\n";
    return 1;
  }
  write(out + "/nvrtc.txt", "NVRTC " + slowed::cuda::nvrtc().version_string() + " (" +
                                slowed::cuda::nvrtc().path + ")\n");
  try {
    std::vector<const slowed::cuda::KernelSource*> sources = {
        &slowed_tests::smoke_kernels_source()};
    for (const auto* s : slowed::cuda::all_kernel_sources()) sources.push_back(s);
    for (const auto* s : sources) {
      std::string name = s->family();
      for (const auto& d : s->defines()) name += "_d" + d.second;
      std::string info = "family " + s->family() + "\nidentity " + s->identity() + "\nkernels";
      for (const auto& k : s->kernels()) info += " " + k;
      info += "\n";
      write(out + "/" + name + ".cu", s->source());
      for (int arch : archs) {
        const int major = arch / 10, minor = arch % 10;
        const std::string sm = std::to_string(arch);
        write(out + "/" + name + ".sm_" + sm + ".cubin",
              slowed::cuda::compile_to_binary(*s, major, minor, /*cubin=*/true));
        write(out + "/" + name + ".compute_" + sm + ".ptx",
              slowed::cuda::compile_to_binary(*s, major, minor, /*cubin=*/false));
        for (bool cubin : {true, false}) {
          const auto target =
              slowed::cuda::choose_compile_target(slowed::cuda::nvrtc(), major, minor, cubin);
          info += target.name() + " nvrtc options:";
          for (const auto& o : slowed::cuda::nvrtc_options(*s, target)) info += " " + o;
          info += "\n";
        }
      }
      write(out + "/" + name + ".txt", info);
      std::cout << name << "\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "kernel_dump: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
