// SPDX-License-Identifier: Apache-2.0
// The avx512 instance of the CPU kernels (see quant_kernels.h, matmul_kernels.h and qat_kernels.h; flags set in CMakeLists.txt).
#define FOURBIT_ISA 2
#define FOURBIT_ISA_NS isa_avx512
#include "cpu/quant_kernels.h"
#include "cpu/matmul_kernels.h"
#include "cpu/qat_kernels.h"

namespace fourbit::cpu {

const QuantKernels& avx512_kernels() {
  static const QuantKernels kernels{"avx512", &isa_avx512::quantize_4bit, &isa_avx512::dequantize_4bit,
                                    &isa_avx512::gemv_4bit, &isa_avx512::decode_rows_bf16,
                                    &isa_avx512::decode_row_pairs_bf16, &isa_avx512::gemv_grad_4bit, &isa_avx512::fake_quantize_affine,
                                    &isa_avx512::fake_quantize_affine_grad, &isa_avx512::fake_quantize_4bit,
                                    &isa_avx512::dequantize_int};
  return kernels;
}

}  // namespace fourbit::cpu
