// SPDX-License-Identifier: Apache-2.0
// Runtime choice of the CPU kernels' instruction set: the best one this CPU supports, or the one named by the
// FOURBIT_CPU_ISA environment variable (avx512 | avx2 | scalar), read on every call so tests can switch it.
#pragma once

#include <string>
#include <vector>

#include "cpu/kernels.h"

namespace fourbit::cpu {

// Instruction sets this build has kernels for and this CPU can run, best first.
std::vector<std::string> supported_isas();

// The kernels to use now. Throws (ValueError in Python) if FOURBIT_CPU_ISA names an unknown or unsupported ISA.
const QuantKernels& select_kernels();

}  // namespace fourbit::cpu
