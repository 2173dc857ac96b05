// SPDX-License-Identifier: Apache-2.0
// The scalar instance of the CPU quantization kernels (see quant_kernels.h; flags set in CMakeLists.txt).
#define FOURBIT_ISA 0
#define FOURBIT_ISA_NS isa_scalar
#include "cpu/quant_kernels.h"

namespace fourbit::cpu {

const QuantKernels& scalar_kernels() {
  static const QuantKernels kernels{"scalar", &isa_scalar::quantize_4bit, &isa_scalar::dequantize_4bit};
  return kernels;
}

}  // namespace fourbit::cpu
