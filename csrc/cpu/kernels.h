// SPDX-License-Identifier: Apache-2.0
// Torch-free interface between the ATen-facing CPU ops (quant_cpu.cpp) and the per-instruction-set kernels
// (quant_kernels_{scalar,avx2,avx512}.cpp, all built from quant_kernels.h with different compiler flags).
// The kernels work on raw pointers over a range of blocks; quant_cpu.cpp splits the blocks across threads.
#pragma once

#include <cstdint>

#include "core/codebook.h"

namespace fourbit::cpu {

enum class ElemType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Quantize4bitArgs {
  const void* input;  // n contiguous elements of in_type
  ElemType in_type;
  int64_t n;
  int64_t blocksize;
  Codebook4 codebook;
  uint8_t* packed;  // ceil(n / 2) bytes
  float* absmax;    // ceil(n / blocksize) values
};

struct Dequantize4bitArgs {
  const uint8_t* packed;
  const float* absmax;  // plain scales, or null when nested
  // Double quantization: scale[b] = nested_scale(nested_code[qabsmax[b]], nested_absmax[b / nested_blocksize], offset)
  const uint8_t* qabsmax;
  const float* nested_absmax;
  const float* nested_code;
  float offset;
  int64_t nested_blocksize;
  int64_t n;
  int64_t blocksize;
  float lut[16];
  void* out;  // n elements of out_type
  ElemType out_type;
};

// Each function handles blocks [block_begin, block_end). Different ranges touch disjoint bytes, because blocks hold
// an even number of elements and therefore start on a byte boundary of the packed buffer.
struct QuantKernels {
  const char* isa;
  void (*quantize_4bit)(const Quantize4bitArgs&, int64_t block_begin, int64_t block_end);
  void (*dequantize_4bit)(const Dequantize4bitArgs&, int64_t block_begin, int64_t block_end);
};

// One table per instruction set; the AVX ones exist only on x86-64 builds.
const QuantKernels& scalar_kernels();
#if defined(FOURBIT_HAVE_X86_KERNELS)
const QuantKernels& avx2_kernels();
const QuantKernels& avx512_kernels();
#endif

}  // namespace fourbit::cpu
