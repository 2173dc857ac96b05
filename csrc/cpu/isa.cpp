// SPDX-License-Identifier: Apache-2.0
#include "cpu/isa.h"

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <cstdlib>
#include <string_view>

namespace fourbit::cpu {
namespace {

struct IsaEntry {
  const char* name;
  const QuantKernels& (*kernels)();
  bool (*cpu_supports)();
};

#if defined(FOURBIT_HAVE_X86_KERNELS)
// __builtin_cpu_supports also checks that the OS saves the wide registers (XCR0).
bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif
bool always() { return true; }

const std::vector<IsaEntry>& isa_table() {
  static const std::vector<IsaEntry> table = {
#if defined(FOURBIT_HAVE_X86_KERNELS)
      {"avx512", &avx512_kernels, &cpu_has_avx512},
      {"avx2", &avx2_kernels, &cpu_has_avx2},
#endif
      {"scalar", &scalar_kernels, &always},
  };
  return table;
}

}  // namespace

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const IsaEntry& e : isa_table()) {
    if (e.cpu_supports()) names.emplace_back(e.name);
  }
  return names;
}

const QuantKernels& select_kernels() {
  const char* forced = std::getenv("FOURBIT_CPU_ISA");
  if (forced == nullptr || *forced == '\0') {
    for (const IsaEntry& e : isa_table()) {
      if (e.cpu_supports()) return e.kernels();
    }
  }
  const std::string_view want(forced);
  for (const IsaEntry& e : isa_table()) {
    if (want == e.name) {
      TORCH_CHECK_VALUE(e.cpu_supports(), "FOURBIT_CPU_ISA=", want, " but this CPU does not support it; supported: ",
                        c10::Join(", ", supported_isas()));
      return e.kernels();
    }
  }
  TORCH_CHECK_VALUE(false, "FOURBIT_CPU_ISA must be one of avx512, avx2, scalar (this build and CPU support: ",
                    c10::Join(", ", supported_isas()), "), got '", want, "'");
}

}  // namespace fourbit::cpu
