// SPDX-License-Identifier: Apache-2.0
// The scalar instance of the CPU kernels (see quant_kernels.h, matmul_kernels.h and qat_kernels.h; flags set in CMakeLists.txt).
#define FOURBIT_ISA 0
#define FOURBIT_ISA_NS isa_scalar
#include "cpu/quant_kernels.h"
#include "cpu/matmul_kernels.h"
#include "cpu/qat_kernels.h"

namespace fourbit::cpu {

const QuantKernels& scalar_kernels() {
  static const QuantKernels kernels{"scalar", &isa_scalar::quantize_4bit, &isa_scalar::dequantize_4bit,
                                    &isa_scalar::gemv_4bit, &isa_scalar::decode_rows_bf16,
                                    &isa_scalar::decode_row_pairs_bf16, nullptr, &isa_scalar::fake_quantize_affine,
                                    &isa_scalar::fake_quantize_affine_grad, &isa_scalar::fake_quantize_4bit,
                                    &isa_scalar::dequantize_int};
  return kernels;
}

}  // namespace fourbit::cpu
