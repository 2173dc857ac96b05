// SPDX-License-Identifier: Apache-2.0
// The avx2 instance of the CPU kernels (see quant_kernels.h, matmul_kernels.h and qat_kernels.h; flags set in CMakeLists.txt).
#define FOURBIT_ISA 1
#define FOURBIT_ISA_NS isa_avx2
#include "cpu/quant_kernels.h"
#include "cpu/matmul_kernels.h"
#include "cpu/qat_kernels.h"

namespace fourbit::cpu {

const QuantKernels& avx2_kernels() {
  static const QuantKernels kernels{"avx2", &isa_avx2::quantize_4bit, &isa_avx2::dequantize_4bit,
                                    &isa_avx2::gemv_4bit, &isa_avx2::decode_rows_bf16,
                                    &isa_avx2::decode_row_pairs_bf16, nullptr, &isa_avx2::fake_quantize_affine,
                                    &isa_avx2::fake_quantize_affine_grad, &isa_avx2::fake_quantize_4bit,
                                    &isa_avx2::dequantize_int};
  return kernels;
}

}  // namespace fourbit::cpu
